"""Markers: `slow` for the tests that start other processes (mpirun, torchrun, Spark,
spawned workers); `-m "not slow"` runs the fast subset (about a minute). `mpi` and
`spark` for the tests that use MPI or Spark (`-m "not spark"` on a machine without Java)."""

import inspect

import pytest

SLOW_MODULES = {"test_byo", "test_mpi", "test_spark", "test_spark_ml", "test_spark_connect", "test_holes",
                "test_signals", "test_torchrun", "test_shm", "test_training_faults", "test_mlflow"}
MPI_WORDS = ("mpirun", '"mpi"', "dist_train_mpi", "mpi_hosts")
SPARK_WORDS = ('"spark"', "SPARK", "local[", "spark_session", "spark.")


def pytest_collection_modifyitems(items):
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        if module in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
        try:
            source = inspect.getsource(item.function)
        except (OSError, TypeError):
            source = ""
        case = item.callspec.id if hasattr(item, "callspec") else ""
        if module == "test_mpi" or any(w in source for w in MPI_WORDS) or "mpi" in case:
            item.add_marker(pytest.mark.mpi)
        if module.startswith("test_spark") or any(w in source for w in SPARK_WORDS) or "spark" in case:
            item.add_marker(pytest.mark.spark)
