"""The data layer: sources (built-in datasets, .npz, Parquet) as arrays on the host, the
pure functions that say which rows each worker takes in which order (sharding), and one
worker's view of its rows (WorkerData)."""

from .sources import (DIGITS_CSV, Dataset, class_ids, digits, feature_columns, find_nonfinite, load, load_npz,
                      load_parquet, parquet_files, perceptron, synthetic, table_to_arrays, xor)
from .worker import WorkerData

__all__ = ["DIGITS_CSV", "Dataset", "WorkerData", "class_ids", "digits", "feature_columns", "find_nonfinite", "load",
           "load_npz", "load_parquet", "parquet_files", "perceptron", "synthetic", "table_to_arrays", "xor"]
