"""dist-train: exact, hang-free data-parallel training for PyTorch.

The shared core. It imports neither mpi4py nor pyspark: those live in the launchers.
"""

__version__ = "0.1.0"
