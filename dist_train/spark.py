"""Spark ML for dist-train (importing this imports pyspark; `import dist_train` does not):

    from dist_train.spark import DistTrainEstimator, DistTrainModel, train

See dist_train/launchers/spark/ml.py for the Estimator and Model, driver.py for `train`.
"""

from .launchers.spark.driver import TrainingFailed, train
from .launchers.spark.ml import DistTrainEstimator, DistTrainModel

__all__ = ["DistTrainEstimator", "DistTrainModel", "TrainingFailed", "train"]
