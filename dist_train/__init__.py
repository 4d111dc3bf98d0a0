"""dist-train: exact, hang-free data-parallel training for PyTorch.

The shared core. `import dist_train` pulls in neither mpi4py nor pyspark (nor, until
`dist_train.fit` is used, torch): those live behind the communication package and the
Spark launcher.
"""

__version__ = "0.1.0"


def __getattr__(name):
    if name == "fit":  # dist_train.fit(config, model=, data=, loss=, ...): the API for a user's script
        from .launchers.script import fit

        return fit
    if name in ("config", "data"):  # dist_train.config.load(...), dist_train.data.item_generator(), ...
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(name)
