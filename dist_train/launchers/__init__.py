"""Launchers: each answers "where am I, who are my peers", builds a communicator and this
worker's data, and calls the same `fit` (STYLE.md 4). The repository's top-level
`launchers/*.py` are thin shims over these modules, so `mpirun -n N python
launchers/mpi.py` and `python -m dist_train.launchers.mpi` run the same code."""
