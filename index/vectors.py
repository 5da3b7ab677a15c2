"""Unit vectors, blocked exact search and file checksums, shared by build and loader."""
from __future__ import annotations

import contextlib
import hashlib
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
