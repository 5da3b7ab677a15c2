"""Unit vectors, blocked exact search and file checksums, shared by build and loader."""
from __future__ import annotations

import contextlib
import hashlib
import mmap
import threading
from pathlib import Path
from typing import Callable, Iterator

import faiss
import numpy as np

CHUNK_ROWS = 65_536
# Exact batches score blocks of rows with numpy's BLAS and keep the top k in FAISS's
# heap. FAISS's selector path is a per-row loop and its bundled BLAS is slower here
# (5500 queries over 70k allowed rows: ~20 s in FAISS, ~4 s this way on the 2-core
# VM). Blocks bound the score matrix to 512 x 65536 floats (128 MB).
Q_BLOCK = 512
_HASH_BLOCK = 8 << 20
_checksums: dict[tuple[str, int, int], str] = {}
_checksums_lock = threading.Lock()


def normalise(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` scaled to unit L2 norm, float32.

    Norms are taken in float64 and row by row, so a row gets the same bits whether it
    is normalised alone (a query) or inside a chunk (the build); chunks bound the
    float64 temporaries. Rows with a zero or non-finite norm come back non-finite;
    callers check with ``bad_rows``.
    """
    out = np.empty(np.shape(x), dtype=np.float32)
    for lo in range(0, len(out), CHUNK_ROWS):
        x64 = np.asarray(x[lo:lo + CHUNK_ROWS], dtype=np.float64)
        norms = np.sqrt((x64 * x64).sum(axis=1, keepdims=True))
        with np.errstate(divide="ignore", invalid="ignore"):
            out[lo:lo + CHUNK_ROWS] = x64 / norms
    return out


def bad_rows(xn: np.ndarray) -> np.ndarray:
    """Positions of the rows of a ``normalise`` output that are not finite unit vectors."""
    return np.flatnonzero(~np.isfinite(xn).all(axis=1))


def file_checksum(path: Path) -> str:
    """blake2b of the file bytes, cached per (path, size, mtime_ns) in this process.

    A 1M-row run has a 1 GB embeddings file: hashing it on every load of the same
    unchanged file would dominate the UI's start-up.
    """
    path = Path(path).resolve()
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    with _checksums_lock:
        cached = _checksums.get(key)
    if cached is not None:
        return cached
    digest = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as fh:
        while block := fh.read(_HASH_BLOCK):
            digest.update(block)
    value = "blake2b-160:" + digest.hexdigest()
    with _checksums_lock:
        _checksums[key] = value
    return value


def release_rows(xb: np.ndarray, lo: int, hi: int) -> None:
    """Drop rows lo..hi-1 of a memory-mapped file (``np.load(..., mmap_mode="r")``) from
    this process's resident set; a no-op for other arrays.

    Pages read through a mapping stay counted in the process's RSS (RssFile) until it
    is unmapped, so one pass over a 5 GB embeddings file would show as 5 GB resident.
    MADV_DONTNEED on clean pages of a read-only file mapping only unmaps them: the page
    cache keeps them and the next read maps them again.
    """
    if not isinstance(getattr(xb, "base", None), mmap.mmap) or not hasattr(mmap, "MADV_DONTNEED") or hi <= lo:
        return
    mm = xb.base
    first = xb.offset % mmap.ALLOCATIONGRANULARITY  # where numpy's mapping puts row 0
    start, end = first + lo * xb.strides[0], min(first + hi * xb.strides[0], len(mm))
    start -= start % mmap.PAGESIZE
    mm.madvise(mmap.MADV_DONTNEED, start, end - start)


@contextlib.contextmanager
def faiss_threads(n: int | None) -> Iterator[None]:
    """FAISS's OpenMP threads set to ``n`` for the calling thread (None: unchanged)."""
    if n is None:
        yield
        return
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def blocked_knn(xq: np.ndarray, k: int, n_rows: int,
                block: Callable[[int, int], tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k of unit queries over ``n_rows`` candidates.

    ``block(lo, hi)`` returns the ids and unit vectors of candidates lo..hi-1.
    Returns D, I [len(xq), k], best first (I = -1 past the last candidate).
    """
    D = np.empty((len(xq), k), dtype=np.float32)
    I = np.empty((len(xq), k), dtype=np.int64)
    for q0 in range(0, len(xq), Q_BLOCK):
        q = xq[q0:q0 + Q_BLOCK]
        heap = _heap(len(q), k)
        every = np.arange(len(q))
        for lo in range(0, n_rows, CHUNK_ROWS):
            ids, vectors = block(lo, min(lo + CHUNK_ROWS, n_rows))
            scores = q @ vectors.T
            with faiss_threads(1):
                heap.add_result_subset(every, scores, ids)
        with faiss_threads(1):
            heap.finalize()
        D[q0:q0 + len(q)], I[q0:q0 + len(q)] = heap.D, heap.I
    return D, I


def _heap(nq: int, k: int) -> faiss.ResultHeap:
    # FAISS's heap merges are cheap; waking a second OpenMP thread for them cost more
    # than the work (1000 queries x 1000 rows: 80-110 ms with two threads, ~30 ms with one).
    with faiss_threads(1):
        return faiss.ResultHeap(nq, k, keep_max=True)


class KnnAccumulator:
    """Exact inner-product top-k of fixed unit queries over candidates seen in blocks.

    The transpose of ``blocked_knn``: the caller streams the candidates once (e.g. while
    adding them to an index) and each block is scored against every query.
    xq: [nq, d]; ``add(ids [b], vectors [b, d])``; ``result()`` -> D, I [nq, k].
    """

    def __init__(self, xq: np.ndarray, k: int) -> None:
        self.xq = xq
        self.heaps = [_heap(len(xq[q0:q0 + Q_BLOCK]), k) for q0 in range(0, len(xq), Q_BLOCK)]

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        for h, q0 in zip(self.heaps, range(0, len(self.xq), Q_BLOCK)):
            q = self.xq[q0:q0 + Q_BLOCK]
            for lo in range(0, len(ids), CHUNK_ROWS):
                scores = q @ vectors[lo:lo + CHUNK_ROWS].T
                with faiss_threads(1):
                    h.add_result_subset(np.arange(len(q)), scores, ids[lo:lo + CHUNK_ROWS])

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        with faiss_threads(1):
            for h in self.heaps:
                h.finalize()
        if not self.heaps:
            return np.empty((0, 0), np.float32), np.empty((0, 0), np.int64)
        return np.concatenate([h.D for h in self.heaps]), np.concatenate([h.I for h in self.heaps])


# A selection of rows up to this size is read and normalised once and kept; a larger
# one is streamed from the memory-mapped file at every pass (a 5M-row run is 5 GB).
IN_MEMORY_BYTES = 1 << 30


class UnitRows:
    """Unit vectors of some rows of an [N, d] (memory-mapped) embedding matrix, lazily.

    Implements the part of the ndarray interface that sums over rows need, so code
    written for ``normalise(xb[ids])`` runs on selections larger than RAM:
    ``shape``, ``len``, ``x[positions]`` (a sub-selection), ``x.sum(axis=0, dtype=...)``
    and ``W @ x`` for W [b, n] (float64 results, accumulated over blocks of rows).
    Anything else (``np.asarray(x)``, ufuncs) raises TypeError rather than silently
    loading everything. Whether rows are kept or streamed is decided once, by the size
    of the first selection, and inherited by its sub-selections.
    """

    __array_ufunc__ = None  # numpy defers `W @ x` to __rmatmul__

    def __init__(self, xb: np.ndarray, ids: np.ndarray, stream: bool | None = None) -> None:
        self.xb, self.ids = xb, np.asarray(ids, dtype=np.int64)
        self.stream = len(self.ids) * xb.shape[1] * 4 > IN_MEMORY_BYTES if stream is None else stream
        self._kept: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.ids), int(self.xb.shape[1])

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, positions: np.ndarray | slice) -> "UnitRows":
        return UnitRows(self.xb, self.ids[positions], self.stream)

    def __array__(self, *args: object, **kwargs: object) -> np.ndarray:
        raise TypeError("UnitRows are read in blocks: use .sum(), W @ rows or .blocks(), not a full array")

    def blocks(self) -> Iterator[tuple[int, np.ndarray]]:
        """(lo, float32 [b, d] unit vectors of rows lo..lo+b-1) in order."""
        if not self.stream:
            if self._kept is None:
                self._kept = normalise(self.xb[self.ids]) if len(self.ids) else np.empty(self.shape, np.float32)
            yield 0, self._kept
            return
        for lo in range(0, len(self.ids), CHUNK_ROWS):
            ids = self.ids[lo:lo + CHUNK_ROWS]
            block = normalise(self.xb[ids])
            if len(ids):
                release_rows(self.xb, int(ids.min()), int(ids.max()) + 1)
            yield lo, block

    def sum(self, axis: int = 0, dtype: type = np.float64) -> np.ndarray:
        if axis != 0:
            raise ValueError("UnitRows sum over rows only (axis=0)")
        out = np.zeros(self.shape[1], dtype=dtype)
        for _, x in self.blocks():
            out += x.sum(axis=0, dtype=dtype)
        return out

    def __rmatmul__(self, W: np.ndarray) -> np.ndarray:
        W = np.asarray(W)
        if W.shape[-1] != len(self):
            raise ValueError(f"W has {W.shape[-1]} columns for {len(self)} rows")
        out = np.zeros(W.shape[:-1] + (self.shape[1],), dtype=np.float64)
        for lo, x in self.blocks():
            out += W[..., lo:lo + len(x)] @ x
        return out
