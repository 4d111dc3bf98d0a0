"""A user's script under torchrun: the environment it detects and the communicator it
connects train the same weights as mpirun with as many ranks (DESIGN.md invariant 1)."""

import json
import socket


from dist_train.comm import env

from .helpers import BIN, ROOT, assert_same_weights, mpirun, ok, run

SMALL = ["train.epochs=2", "model.hidden=[32]", "train.log_every=0"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_script_under_torchrun_trains_what_mpirun_trains(tmp_path):
    """gloo throughout (comm.shm false) against MPI with shared memory: the same weights."""
    sets = [*SMALL, "comm.shm=false"]
    ok(run([BIN / "torchrun", "--nproc_per_node", 2, "--master_port", free_port(), ROOT / "tests/torchrun_script.py",
            "conf/digits.yaml", tmp_path / "torchrun", *sets], timeout=180))
    ok(mpirun(2, "conf/digits.yaml", tmp_path / "mpi", *SMALL))
    assert_same_weights(tmp_path / "torchrun", tmp_path / "mpi")
    s = json.loads((tmp_path / "torchrun" / "summary.json").read_text())
    assert s["launcher"] == "torchrun" and s["world_size"] == 2


def test_workers_may_end_apart_once_fit_is_done_without_closing_anything(tmp_path):
    """The simplest script: fit, and nothing else. Rank 1 ends while rank 0 works on."""
    p = run([BIN / "torchrun", "--nproc_per_node", 2, "--master_port", free_port(), ROOT / "tests/torchrun_script.py",
             "conf/xor.yaml", tmp_path / "o", "train.epochs=20", "--plain"], timeout=180)
    assert p.returncode == 0 and "error:" not in p.stderr, p.stderr[-3000:]


def test_each_launch_kind_is_detected_from_its_variables():
    torchrun = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "n1",
                "MASTER_PORT": "29400", "TORCHELASTIC_USE_AGENT_STORE": "True"}
    assert env.detect(torchrun) == env.Environment("torchrun", 3, 8, 1, 2, "n1", 29400, store_running=True)
    ompi = {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
            "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    assert env.detect(ompi) == env.Environment("mpi", 2, 4, 0, 2)
    assert env.detect({"PMI_RANK": "1", "PMI_SIZE": "3", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "3"}) == \
        env.Environment("mpi", 1, 3, 1, 3)
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_TASKS_PER_NODE": "4(x2)",
             "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "1234"}
    assert env.detect(slurm) == env.Environment("slurm", 5, 8, 1, 4, "gpu07", 15000 + 1234)
    pmix = {"PMIX_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
            "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "PMIX_NAMESPACE": "prterun-n1-1@1"}  # Open MPI 5 under PMIx
    assert env.detect(pmix) == env.Environment("mpi", 2, 4, 0, 2)
    srun_pmix = {**slurm, "PMIX_RANK": "5"}  # srun --mpi=pmix: an MPI world, sized by srun
    assert env.detect(srun_pmix) == env.Environment("mpi", 5, 8, 1, 4)
    srun_pmi2 = {**slurm, "PMI_RANK": "5", "PMI_SIZE": "8"}  # srun --mpi=pmi2
    assert env.detect(srun_pmi2) == env.Environment("mpi", 5, 8, 1, 4)
    assert env.detect({"RANK": "0", "WORLD_SIZE": "2"}) == env.Environment()  # no MASTER_ADDR: not torchrun's
    assert env.detect({}) == env.Environment()
    assert env.first_host("cpu1,gpu[12,14-15]") == "cpu1" and env.first_host("gpu[12,14-15]") == "gpu12"
