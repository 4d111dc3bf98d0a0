"""The architecture checks itself (STYLE.md 20): the layering contract (import-linter, in
pyproject.toml), no import cycles, the engines behind one import each, the Communicator
contract, functions that fit on a screen, and an installed distribution with no package
of someone else's name."""

import ast
import shutil
import subprocess
import sys
import zipfile

import pytest

from .helpers import BIN, ROOT

MAX_FUNCTION_LINES = 60
CONTRACT = {"rank", "world_size", "allreduce", "broadcast", "close"}


def test_the_layering_contract_holds():
    p = subprocess.run([str(BIN / "lint-imports")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 0 and "0 broken" in p.stdout, p.stdout[-3000:] + p.stderr[-2000:]


def test_no_module_imports_itself_back():
    import grimp

    graph = grimp.build_graph("dist_train")
    cycles = [(a, b) for a in graph.modules for b in graph.find_modules_directly_imported_by(a)
              if a != b and graph.chain_exists(importer=b, imported=a)]
    assert not cycles, f"import cycles through: {sorted(cycles)[:10]}"


def test_import_dist_train_pulls_in_no_engine():
    code = ("import sys, dist_train, dist_train.train, dist_train.cli, dist_train.comm, dist_train.comm.shm, "
            "dist_train.comm.watchdog, dist_train.comm.torchdist, dist_train.launchers.local, dist_train.use; "
            "print(sorted(m for m in ('mpi4py', 'pyspark') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def communicators():
    from dist_train.comm import Communicator, LocalComm, shm, torchdist, watchdog

    found = [LocalComm, torchdist.TorchDistComm, shm.HostShm, watchdog.Watched]
    try:
        import mpi4py

        mpi4py.rc.initialize = mpi4py.rc.finalize = False  # the class alone: no MPI (its /dev/shm segment) here
        from dist_train.comm import mpi

        found.append(mpi.MPIComm)
    except ImportError:
        pass
    assert all(issubclass(c, Communicator) for c in found)
    return found


@pytest.mark.parametrize("cls", communicators(), ids=lambda c: c.__name__)
def test_a_communicator_is_rank_world_size_allreduce_broadcast_close_and_nothing_else(cls):
    """Nothing outside the communication package can reach for more: no other public
    method, and no other public attribute set on an instance."""
    import inspect

    methods = {n for n in dir(cls) if not n.startswith("_")}
    tree = ast.parse(inspect.getsource(cls))
    attributes = {t.attr for node in ast.walk(tree) if isinstance(node, (ast.Assign, ast.AnnAssign))
                  for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
                  for t in (t.elts if isinstance(t, ast.Tuple) else [t])
                  if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"
                  and not t.attr.startswith("_")}
    assert methods | attributes <= CONTRACT, sorted((methods | attributes) - CONTRACT)


def test_every_function_fits_on_a_screen():
    long = []
    for path in [*(ROOT / "dist_train").rglob("*.py"), *(ROOT / "launchers").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.name} ({lines} lines)")
    assert not long, long


def test_the_wheel_installs_only_dist_train(tmp_path):
    """No top-level `launchers` in site-packages: the repository's launchers/ are shims."""
    source = tmp_path / "source"  # a copy: setuptools' build/ lands there, not in the checkout
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "build", "*.egg-info",
                                                                 "__pycache__", "docs"))
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(tmp_path), str(source)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    (wheel,) = tmp_path.glob("*.whl")
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist() if not name.endswith("/")}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"dist_train"}, tops
    names = zipfile.ZipFile(wheel).namelist()
    assert "dist_train/data/datasets/digits.csv.gz" in names and "dist_train/launchers/spark/submit.py" in names
