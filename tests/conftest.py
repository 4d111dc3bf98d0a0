"""Markers: `slow` for the tests that start other processes (mpirun, torchrun, Spark,
spawned workers); `-m "not slow"` runs the fast subset (about a minute)."""

import pytest

SLOW_MODULES = {"test_byo", "test_mpi", "test_spark", "test_spark_ml", "test_spark_connect", "test_holes",
                "test_signals", "test_torchrun", "test_shm", "test_training_faults", "test_mlflow"}


def pytest_collection_modifyitems(items):
    for item in items:
        if item.module.__name__.rsplit(".", 1)[-1] in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
