"""The data layer: sources as arrays on the host (built-in datasets, .npz, Parquet) or a
user's map-style dataset (Items, whose transforms draw from `item_generator()` and ask
`training()`); the pure functions that say which rows each worker takes in which order
(sharding); and one worker's view of its rows (WorkerData)."""

from .items import Items, current, item_generator, training
from .sources import (BUILT_IN, DIGITS_CSV, Dataset, check_parquet_schemas, class_ids, digits, feature_columns, find_nonfinite,
                      load, load_npz, load_parquet, parquet_files, perceptron, synthetic, table_to_arrays, user_items,
                      xor)
from .worker import WorkerData

__all__ = ["BUILT_IN", "DIGITS_CSV", "Dataset", "Items", "WorkerData", "check_parquet_schemas", "class_ids", "current", "digits",
           "feature_columns", "find_nonfinite", "item_generator", "load", "load_npz", "load_parquet", "parquet_files", "perceptron",
           "synthetic", "table_to_arrays", "training", "user_items", "xor"]
