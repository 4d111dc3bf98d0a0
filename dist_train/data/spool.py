"""Arrays on a worker's local disk instead of its heap, so that a shard never has to fit in
memory (a Spark task's partition, a Parquet file read row group by row group).

A spool is an array in a memory-mapped file whose name is unlinked as soon as it is
mapped: the file lives exactly as long as the mapping, so a worker killed with SIGKILL
leaves nothing behind. Random access stays (shuffling, "every sample once"), and the
pages read or written are given back to the kernel beyond `data.resident_mb` (`Pager`), so
a worker's resident memory does not grow with the dataset: the data stays in the page
cache, which the kernel shares and reclaims, not in the process. The price: a row read
again after its page was given back costs a minor page fault (measured ~7 us a row for
random 256-byte rows; docs/performance.md), paid only by shards larger than the budget.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import tempfile

import numpy as np

RESIDENT_BYTES = 64 << 20  # pages a worker keeps mapped between two releases
WILLNEED_BYTES = 1 << 20  # bytes asked of the disk a call (read_ahead_kb: 128 by default, 1280 per request on most disks)


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
        mm.madvise(mmap.MADV_RANDOM)  # no readahead: small page-cache folios, so a fault maps only its neighbours
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
        a = a.obj if isinstance(a, memoryview) else getattr(a, "base", None)
    return None


def will_need(a: np.ndarray, lo: int, hi: int) -> None:
    """Ask the kernel to read rows [lo, hi) of a file-backed array into the page cache now,
    in the background and in large sequential requests (a fault reads page by page, and a
    spool's readahead is off). Nothing for a heap array or rows that are not contiguous."""
    m, base, start, end = _span(a, lo, hi)
    for at in range(start, end, WILLNEED_BYTES):  # the kernel reads at most its readahead size a call
        _madvise(m, base, at, min(WILLNEED_BYTES, end - at), mmap.MADV_WILLNEED)


def _madvise(m: mmap.mmap, base: int, at: int, length: int, advice: int) -> None:
    """madvise(2) on bytes [at, at + length) of `m` (mapped at `base`), through libc with
    ctypes, which lets go of the GIL while the kernel works: mmap.madvise holds it, and the
    training thread stalled up to 5-7 ms a call behind a read-ahead thread. mmap.madvise
    where libc cannot be found."""
    if _LIBC_MADVISE is None:
        m.madvise(advice, at, length)
    elif _LIBC_MADVISE(base + at, length, advice) != 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))


def _libc_madvise():
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn


_LIBC_MADVISE = _libc_madvise()


def _span(a: np.ndarray, lo: int, hi: int) -> tuple[mmap.mmap | None, int, int, int]:
    """(the mapping, its address, first byte, end byte) of rows [lo, hi) of `a` in its
    mapping, the first byte on a page boundary; an empty span for a heap array or rows not
    contiguous."""
    m = mapping(a)
    if m is None or hi <= lo or not a.flags.c_contiguous or not len(m):
        return m, 0, 0, 0
    view = np.frombuffer(m, np.uint8)  # the mapping's address: where the array's rows lie in it
    base = view.ctypes.data
    del view  # (an exported buffer would keep the mapping from closing)
    start = a.ctypes.data - base + lo * a.strides[0]
    end = min(start + (hi - lo) * a.strides[0], len(m))
    return m, base, start - start % mmap.PAGESIZE, end


class Pager:
    """Gives the pages of file-backed arrays back to the kernel whenever this process holds
    more than `budget` bytes of file pages beyond what it held at the start (read from
    /proc/self/statm, a few microseconds; an estimate from the rows touched would be wrong
    several-fold, as a fault maps up to 16 cached pages around the one asked for).
    MADV_DONTNEED on a shared file mapping drops only this process's hold: the pages, dirty
    ones too, stay in the page cache, which the kernel shares and reclaims. Arrays that fit
    in the budget whole, and heap arrays, are never touched."""

    def __init__(self, *arrays: np.ndarray, budget: int = RESIDENT_BYTES):
        maps = {id(m): m for m in map(mapping, arrays) if m is not None and len(m) > budget}
        self.maps, self.budget = list(maps.values()), budget
        self.base = _file_pages() if self.maps else 0

    def touch(self) -> None:
        """Rows were read or written through the arrays: release if over budget."""
        if self.maps and (_file_pages() - self.base) * mmap.PAGESIZE > self.budget:
            self.release()

    def release(self) -> None:
        for m in self.maps:
            m.madvise(mmap.MADV_DONTNEED)


def _file_pages() -> int:
    """Pages of files (and shared memory) this process has mapped: statm's third field."""
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[2])
