"""Arrays on a worker's local disk instead of its heap, so that a shard never has to fit in
memory (a Spark task's partition, a Parquet file read row group by row group).

A spool is an array in a memory-mapped file whose name is unlinked as soon as it is
mapped: the file lives exactly as long as the mapping, so a worker killed with SIGKILL
leaves nothing behind. Random access stays (shuffling, "every sample once"), and the
pages read or written are given back to the kernel every `RESIDENT_BYTES` (`Pager`), so a
worker's resident memory does not grow with the dataset: the data stays in the page
cache, which the kernel shares and reclaims, not in the process.
"""

from __future__ import annotations

import mmap
import os
import tempfile

import numpy as np

RESIDENT_BYTES = 64 << 20  # pages a worker keeps mapped between two releases


def spool_dir(configured: str | None = None) -> str:
    """Where spools go: data.cache_dir, else a Spark executor's local directory
    (spark.local.dir, which Spark hands its Python workers as SPARK_LOCAL_DIRS), else the
    system's temporary directory."""
    if configured:
        os.makedirs(configured, exist_ok=True)
        return configured
    spark_dirs = [d for d in os.environ.get("SPARK_LOCAL_DIRS", "").split(",") if d and os.path.isdir(d)]
    return spark_dirs[0] if spark_dirs else tempfile.gettempdir()


def spool(shape: tuple[int, ...], dtype, directory: str) -> np.ndarray:
    """A zero-filled writable array of `shape` backed by an unlinked file in `directory`."""
    dtype = np.dtype(dtype)
    count = int(np.prod(shape))
    if count == 0:
        return np.zeros(shape, dtype)
    fd, path = tempfile.mkstemp(prefix="dist-train-spool-", dir=directory)
    try:
        os.unlink(path)  # the mapping keeps the file; nothing is left behind if this process dies
        try:
            os.ftruncate(fd, count * dtype.itemsize)
        except OSError as e:
            raise OSError(f"cannot make a {count * dtype.itemsize / 2**20:.0f} MB spool file in {directory}: "
                          f"{e.strerror}") from None
        mm = mmap.mmap(fd, count * dtype.itemsize)
    finally:
        os.close(fd)
    return np.frombuffer(mm, dtype, count).reshape(shape)


def mapping(a: np.ndarray) -> mmap.mmap | None:
    """The mmap under an array (a spool's, or np.memmap's), or None for an array in the heap."""
    while a is not None:
        if isinstance(a, mmap.mmap):
            return a
        if isinstance(a, np.memmap) and isinstance(getattr(a, "_mmap", None), mmap.mmap):
            return a._mmap
        a = getattr(a, "base", None) if not isinstance(a, (bytes, bytearray, memoryview)) else None
    return None


class Pager:
    """Gives the pages of file-backed arrays back to the kernel after every `budget` bytes
    touched through them (MADV_DONTNEED: a shared file mapping's pages, dirty ones too, stay
    in the page cache; only this process's hold on them goes). No-op for heap arrays."""

    def __init__(self, *arrays: np.ndarray, budget: int = RESIDENT_BYTES):
        self.maps = [m for m in {id(m): m for m in map(mapping, arrays) if m is not None}.values()]
        self.budget, self.touched = budget, 0

    def touch(self, rows: int, row_bytes: int) -> None:
        """`rows` rows of `row_bytes` each were read or written (a scattered row costs a page)."""
        if not self.maps:
            return
        self.touched += rows * max(row_bytes, mmap.PAGESIZE)
        if self.touched >= self.budget:
            self.release()

    def release(self) -> None:
        for m in self.maps:
            m.madvise(mmap.MADV_DONTNEED)
        self.touched = 0
