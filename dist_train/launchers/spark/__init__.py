"""The Spark launcher: the driver (preflight, retries, progress), the data feed (Arrow
slicing, assembly) and the barrier task (rendezvous), one module each. The only place
that imports pyspark.

    from dist_train.launchers.spark import train      # the notebook API (driver.train)
"""

_EXPORTS = ("TrainingFailed", "main", "preflight", "train")


def __getattr__(name):  # lazily: spark-submit's entry starts the JVM before the driver imports torch
    if name in _EXPORTS:
        from . import driver

        return getattr(driver, name)
    raise AttributeError(name)


__all__ = list(_EXPORTS)
