"""Datasets: built-in ones and files, as (features, labels) arrays on the host.

Features are float32 with the natural sample shape ((2,) for xor, (1, 8, 8) for
digits, (1, 28, 28) for synthetic MNIST); labels are int64 class ids. Uncompressed
`.npz` members are memory-mapped, so a dataset larger than RAM streams by batches;
Parquet is read batch by batch into a spool on local disk (spool.py); under Spark each
task spools only its own shard.
"""

from __future__ import annotations

import gzip
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import usercode
from ..errors import DataError, first_line
from . import spool
from .items import Items

DIGITS_CSV = Path(__file__).with_name("datasets") / "digits.csv.gz"


@dataclass
class Dataset:
    x: np.ndarray  # (n, *sample_shape) float32, possibly a memmap
    y: np.ndarray  # (n,) int64 class ids, or (n, k) float32 targets
    name: str
    label_names: tuple[str, ...] | None = None  # string labels: the class of each id (data.label_map)

    def __len__(self) -> int:
        return len(self.x)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    @property
    def classes(self) -> int | None:
        """Number of classes for integer labels (max label + 1), else None."""
        if self.y.dtype.kind in "iu" and len(self.y):
            return int(self.y.max()) + 1
        return None


def xor() -> Dataset:
    x = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=np.float32)
    return Dataset(x, np.array([0, 1, 1, 0], dtype=np.int64), "xor")


def perceptron() -> Dataset:
    """The classic decision unit: three yes/no factors (will it pay, is the maths easy,
    no GPU needed), 'yes' when 8*x1 + 3*x2 + 3*x3 >= 5. All 8 combinations; note
    (0, 1, 1) scores 6 and is a yes."""
    x = np.array([[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)], dtype=np.float32)
    y = (x @ np.array([8, 3, 3], dtype=np.float32) >= 5).astype(np.int64)
    return Dataset(x, y, "perceptron")


def digits() -> Dataset:
    """1,797 real handwritten digits, 8x8 pixels scaled to [0, 1] (UCI optdigits test
    set, the copy scikit-learn ships)."""
    with gzip.open(DIGITS_CSV, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    x = (table[:, :64] / 16.0).reshape(-1, 1, 8, 8)
    return Dataset(np.ascontiguousarray(x), table[:, 64].astype(np.int64), "digits")


def synthetic(size: int, shape: list[int], classes: int, seed: int) -> Dataset:
    """MNIST-shaped noise labelled by a random linear teacher: learnable, seeded."""
    rng = np.random.default_rng([seed, 7919])
    x = rng.standard_normal((size, *shape), dtype=np.float32)
    teacher = rng.standard_normal((int(np.prod(shape)), classes), dtype=np.float32)
    y = np.argmax(x.reshape(size, -1) @ teacher, axis=1).astype(np.int64)
    return Dataset(x, y, "synthetic")


def _npz_member(path: Path, zf: zipfile.ZipFile, name: str) -> np.ndarray:
    """A member of an .npz: memory-mapped when stored uncompressed, else read."""
    info = zf.getinfo(name)
    if info.compress_type != zipfile.ZIP_STORED:
        with zf.open(name) as f:
            return np.lib.format.read_array(f)
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        header = f.read(30)
        start = info.header_offset + 30 + int.from_bytes(header[26:28], "little") + \
            int.from_bytes(header[28:30], "little")
        f.seek(start)
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
            np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        offset = f.tell()
    if dtype.hasobject:
        raise DataError(f"{path}: member {name} holds Python objects; only numeric arrays are loaded")
    return np.memmap(path, dtype=dtype, mode="r", shape=shape, offset=offset, order="F" if fortran else "C")


def load_npz(path: str | Path, label_map=None) -> Dataset:
    """`.npz` with arrays `x` and `y` (also `X`/`Y`, `features`/`labels`)."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as zf:
            members = {n[:-4]: n for n in zf.namelist() if n.endswith(".npy")}
            xk = next((k for k in ("x", "X", "features") if k in members), None)
            yk = next((k for k in ("y", "Y", "labels", "label") if k in members), None)
            if xk is None or yk is None:
                raise DataError(f"{path}: needs arrays 'x' and 'y', found {sorted(members) or 'none'}")
            x, y = _npz_member(path, zf, members[xk]), _npz_member(path, zf, members[yk])
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: not a readable .npz file ({e})") from None
    return _checked(path, x, y, label_map)


def load_parquet(path: str | Path, label_column: str, cache_dir: str | None = None, label_map=None) -> Dataset:
    """Parquet: `label_column` is the label; the features are one list column or
    every other numeric column, in file order. Read batch by batch into a spool on local
    disk (spool.py), so the features never have to fit in memory; the labels are kept in
    memory (one number a row)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("reading Parquet needs pyarrow: pip install 'dist-train[parquet]'") from None
    files = parquet_files(path)
    check_parquet_schemas(files)
    x, labels, at = None, [], 0
    try:
        readers = [pq.ParquetFile(f, buffer_size=1 << 20, pre_buffer=False) for f in files]  # streamed, not mapped
        total = sum(r.metadata.num_rows for r in readers)
        for f, reader in zip(files, readers):
            for batch in reader.iter_batches(batch_size=batch_rows(reader)):
                bx, by = table_to_arrays(batch, label_column, str(f), strings=True)
                if x is None:
                    x = spool.spool((total, *bx.shape[1:]), np.float32, spool.spool_dir(cache_dir))
                    pager = spool.Pager(x)
                elif bx.shape[1:] != x.shape[1:]:
                    raise DataError(f"{f}: rows have {bx.shape[1]} features, earlier rows {x.shape[1]}")
                x[at:at + len(bx)] = bx
                pager.touch()
                labels.append(by)
                at += len(bx)
    except DataError:
        raise
    except Exception as e:  # pyarrow raises several types for a bad file
        raise DataError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from None
    import pyarrow as pa

    pa.default_memory_pool().release_unused()  # the decoded batches' buffers, back to the system
    if x is None:  # no rows at all: the columns still say what a row would be
        x, by = table_to_arrays(readers[0].schema_arrow.empty_table(), label_column, str(files[0]), strings=True)
        labels.append(by)
    return _checked(Path(path), x, np.concatenate(labels), label_map)


PARQUET_BATCH_ROWS = 65536  # rows decoded at a time, at most
PARQUET_BATCH_BYTES = 16 << 20  # and about this many bytes of them (wide rows: fewer rows a batch)


def batch_rows(reader) -> int:
    """Rows to decode at a time from this Parquet file: PARQUET_BATCH_ROWS, fewer where its
    rows are wide (the decoded batch and its copies are the load's peak memory: ~1 GB for
    64k MNIST-sized rows). A row's size is that of its first rows decoded."""
    first = next(reader.iter_batches(batch_size=256), None)
    if first is None or not first.num_rows or not first.nbytes:
        return PARQUET_BATCH_ROWS
    return max(1, min(PARQUET_BATCH_ROWS, PARQUET_BATCH_BYTES * first.num_rows // first.nbytes))


def check_parquet_schemas(files: list[Path]) -> None:
    """Every file of a Parquet dataset has the first one's columns and types (read from the
    footers only); else one line naming the file and the column."""
    import pyarrow.parquet as pq

    first = None
    for f in files:
        try:
            schema = pq.read_schema(f)
        except Exception as e:  # noqa: BLE001
            raise DataError(f"{f}: not a readable Parquet file ({type(e).__name__}: {first_line(e)})") from None
        if first is None:
            first = (f, schema)
            continue
        ref = first[1]
        for field in ref:
            if field.name not in schema.names:
                raise DataError(f"{f}: no column {field.name!r}, which {first[0].name} has (one schema across files)")
            other = schema.field(field.name).type
            if other != field.type:
                raise DataError(f"{f}: column {field.name!r} is {other}, in {first[0].name} it is {field.type} "
                                f"(one schema across files)")
        extra = [n for n in schema.names if n not in ref.names]
        if extra:
            raise DataError(f"{f}: column {extra[0]!r} is not in {first[0].name} (one schema across files)")


def parquet_files(path: str | Path) -> list[Path]:
    """A Parquet file, or a directory's Parquet files in path order: the row order of a
    dataset is file by file in this order, then row by row (the Spark launcher uses the same)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.parquet") if not any(part.startswith(("_", ".")) for part in
                                                                      p.relative_to(path).parts))
        if not files:
            raise DataError(f"{path}: directory holds no .parquet files")
        return files
    return [path]


def table_to_arrays(table, label_column: str, where: str, strings: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """An Arrow table or record batch -> (features, labels) without a per-row loop.
    DataError (one line) for what cannot be features or labels: nulls, nested lists, list
    rows of different lengths, and string labels unless `strings` (then returned as str,
    for string_classes to encode)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    names = list(table.schema.names)
    if label_column not in names:
        raise DataError(f"{where}: no label column {label_column!r} (columns: {', '.join(names)})")
    label = table.column(label_column)
    text = pa.types.is_string(label.type) or pa.types.is_large_string(label.type)
    if not (pa.types.is_integer(label.type) or pa.types.is_floating(label.type) or pa.types.is_boolean(label.type)
            or (text and strings)):
        kind = "strings" if text else str(label.type)
        raise DataError(f"{where}: label column {label_column!r} holds {kind}; labels must be numbers "
                        f"(class ids 0..K-1, or targets): encode them first (e.g. Spark ML's StringIndexer)")
    if label.null_count:
        raise DataError(f"{where}: label column {label_column!r} has {label.null_count} null rows")
    y = label.to_numpy(zero_copy_only=False) if pa.types.is_boolean(label.type) or text else label.to_numpy()
    if text:
        y = y.astype(str)
    if y.dtype == bool:
        y = y.astype(np.int64)
    features = feature_columns(names, label_column, where)
    cols = [table.column(n) for n in features]
    if isinstance(table, pa.Table):
        cols = [c.combine_chunks() if c.num_chunks != 1 else c.chunk(0) for c in cols]
    if len(cols) == 1 and (pa.types.is_list(cols[0].type) or pa.types.is_large_list(cols[0].type)
                           or pa.types.is_fixed_size_list(cols[0].type)):
        col, name = cols[0], features[0]
        inner = col.type.value_type
        if not (pa.types.is_integer(inner) or pa.types.is_floating(inner)):
            raise DataError(f"{where}: feature column {name!r} holds lists of {inner}; it must hold numbers")
        if col.null_count:
            raise DataError(f"{where}: feature column {name!r} has {col.null_count} null rows")
        flat = col.flatten()
        if flat.null_count:
            raise DataError(f"{where}: feature column {name!r} holds {flat.null_count} null values inside its lists")
        if len(y) and not pa.types.is_fixed_size_list(col.type):
            lengths = pc.list_value_length(col)
            lo, hi = pc.min(lengths).as_py(), pc.max(lengths).as_py()
            if lo != hi:
                raise DataError(f"{where}: feature column {name!r} holds lists of different lengths "
                                f"({lo} to {hi}); every row needs the same number of features")
        flat = flat.to_numpy(zero_copy_only=False)
        x = flat.reshape(len(y), -1) if len(y) else flat.reshape(0, 0)
    else:
        for n, c in zip(features, cols):
            if not pa.types.is_integer(c.type) and not pa.types.is_floating(c.type):
                raise DataError(f"{where}: feature column {n!r} is not numeric ({c.type})")
            if c.null_count:
                raise DataError(f"{where}: feature column {n!r} has {c.null_count} null rows")
        x = np.column_stack([c.to_numpy(zero_copy_only=False) for c in cols]) if len(y) else np.zeros((0, len(cols)))
    return x.astype(np.float32, copy=False), y


def feature_columns(names: list[str], label_column: str, where: str) -> list[str]:
    """The feature columns of a table: every column but the label and our own `__` ones
    (one list column, or several numeric ones; the Spark feed reads a DataFrame alike)."""
    features = [n for n in names if n != label_column and not n.startswith("__")]
    if not features:
        raise DataError(f"{where}: no feature columns besides {label_column!r}")
    return features


def class_ids(y: np.ndarray) -> np.ndarray:
    """Labels that are whole numbers become int64 class ids (float columns holding 0.0,
    1.0, ... included, and booleans); other labels (fractional targets, and whole numbers
    too large for an int64) are kept as they are."""
    if y.dtype.kind in "iub":
        return y.astype(np.int64, copy=False)
    if y.dtype.kind == "f" and y.ndim == 1 and len(y) and np.all(np.mod(y, 1) == 0) and np.abs(y).max() < 2 ** 62:
        return y.astype(np.int64)
    return y


def string_classes(where, y: np.ndarray, label_map=None) -> tuple[np.ndarray, tuple[str, ...]]:
    """String labels -> (int64 class ids, the class names): `label_map`'s order, else the
    sorted distinct labels. DataError for a label the map does not list."""
    found, inverse = np.unique(y, return_inverse=True)
    names = tuple(str(n) for n in (label_map if label_map is not None else found))
    index = {n: i for i, n in enumerate(names)}
    missing = [str(f) for f in found if str(f) not in index]
    if missing:
        raise DataError(f"{where}: label {missing[0]!r} is not in data.label_map {list(names)}")
    return np.array([index[str(f)] for f in found], dtype=np.int64)[inverse.reshape(-1)], names


def _labels(path: Path, y: np.ndarray, label_map=None) -> tuple[np.ndarray, tuple[str, ...] | None]:
    if y.ndim == 0:
        raise DataError(f"{path}: labels must hold one label per row (shape (rows,) or (rows, k)), got a 0-d array")
    if y.dtype.kind in "US":
        y = y.astype(str)  # bytes decoded: b"cat" is the class cat
        if y.ndim != 1:
            raise DataError(f"{path}: string labels must be one per row, got shape {y.shape}")
        return string_classes(path, y, label_map)
    if y.dtype.kind not in "fiub":
        raise DataError(f"{path}: labels must be numbers or strings, got {y.dtype}")
    if y.dtype.kind == "f":
        bad = find_nonfinite(y.reshape(len(y), -1))
        if bad is not None:
            raise DataError(f"{path}: the label of row {bad} is NaN or Inf")
    return class_ids(y), tuple(label_map) if label_map is not None else None


def _checked(path: Path, x: np.ndarray, y: np.ndarray, label_map=None) -> Dataset:
    if x.ndim < 2:
        raise DataError(f"{path}: features must be (rows, features...), got shape {x.shape}")
    y, names = _labels(path, y, label_map)
    if len(x) != len(y):
        raise DataError(f"{path}: {len(x)} feature rows but {len(y)} labels")
    if x.dtype.kind not in "fiu":
        raise DataError(f"{path}: features must be numeric, got {x.dtype}")
    if x.dtype != np.float32:
        x = x.astype(np.float32)  # one copy; store float32 to keep the memory map
    return Dataset(x, y, path.name, names)


BUILT_IN = ("xor", "perceptron", "digits", "synthetic")  # made from the package and the config, on any host


def load(cfg, given=None):
    """The dataset that `cfg.data` names, as arrays (a Dataset), or the user's map-style
    dataset (`given`, a dataset or a factory, else data.target's factory) as Items.
    Raises DataError for a bad file."""
    d = cfg.data
    if given is not None or d.target:
        return user_items(cfg, given)
    if d.name == "xor":
        return xor()
    if d.name == "perceptron":
        return perceptron()
    if d.name == "digits":
        return digits()
    if d.name == "synthetic":
        return synthetic(d.size, d.shape, d.classes, cfg.seed)
    if not Path(d.path).exists():
        raise DataError(f"data.path {d.path} does not exist")
    if d.name == "npz":
        return load_npz(d.path, d.label_map)
    return load_parquet(d.path, d.label_column, d.cache_dir, d.label_map)


def user_items(cfg, given=None) -> Items:
    """The user's dataset: `given` (a map-style dataset, or a factory of one), else data.target's factory."""
    d = cfg.data
    key = "data.target" if given is None else "data"
    dataset = given
    if given is None or isinstance(given, type) or not (hasattr(given, "__len__") and hasattr(given, "__getitem__")):
        factory = given if given is not None else usercode.load(d.target, "data.target")
        dataset = usercode.call(factory, key, d.kwargs)
    collate = usercode.load(d.collate, "data.collate") if d.collate else None
    name = d.target or type(dataset).__name__
    items = Items(dataset, cfg.seed, collate, d.workers, name)
    items.describe()
    return items


def find_nonfinite(x: np.ndarray, chunk: int = 65536) -> int | None:
    """Index of the first row holding NaN or Inf, or None (streams a memmap or a spool by chunks)."""
    pager = spool.Pager(x)
    for start in range(0, len(x), chunk):
        rows = x[start:start + chunk]
        ok = np.isfinite(rows.reshape(len(rows), -1)).all(axis=1)
        pager.touch()
        if not ok.all():
            return start + int(np.argmin(ok))
    return None
