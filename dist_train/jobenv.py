"""The environment variables through which the dist-train wrappers (cli) tell the workers
they start about the job. A module of its own, with no imports, so a wrapper that only
runs mpirun or spark-submit need not import torch (~1 s here) to name them."""

STARTED_ENV = "DIST_TRAIN_STARTED"  # the job's start (epoch seconds), set by the dist-train wrappers
PROGRESS_ENV = "DIST_TRAIN_PROGRESS"  # bar | lines: overrides the terminal test (mpirun gives ranks a pty)
