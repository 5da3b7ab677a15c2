"""IVF-PQ for runs larger than memory: compressed codes in RAM, exact re-ranking from disk.

The index holds a 64-byte product-quantised code per row (FAISS ``IndexIVFPQ``, inner
product on unit vectors, residuals to the coarse centroid). A query asks it for the
``rerank`` best candidates by approximate score, reads those rows from the
memory-mapped ``embeddings.npy`` and returns the top k by exact cosine. So the
distances are exact and the answer is wrong only where a true neighbour is not among
the candidates.

Why PQ and not scalar quantisation: the index of 5M x 256 rows must stay under 0.5 GB.
SQ8 stores 256 bytes a row (1.3 GB at 5M) and SQ4 128 (0.7 GB, ids included); PQ64 stores
64 (+8 for the id), 0.36 GB, and the exact re-ranking recovers what the codes lose.

Tuning needs no re-ranking: a true neighbour found among the candidates is always
ranked back into the top k by the exact scores, so recall@k after re-ranking equals
the share of the true top k among the candidates (ties aside). One search per
``nprobe`` at the deepest ``rerank`` gives the recall of every shallower depth too.
"""
from __future__ import annotations

import logging
from typing import Callable

import faiss
import numpy as np
from tqdm import tqdm

from index.vectors import CHUNK_ROWS, bad_rows, normalise, release_rows

log = logging.getLogger(__name__)

PQ_NBITS = 8
RERANK_DEPTHS = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)
# Cost of re-ranking one candidate (reading its row through the memory map, normalising
# it, one dot product) in units of scanning one code in an inverted list; the tuner
# picks the cheapest (nprobe, rerank) reaching the aim. It hinges on the page cache:
# measured on the shared 2-core VM (bench/large_index_bench.py --cost) 266 at 5M rows
# with 32-byte codes (41 us a candidate, 153 ns a code), ~400 at 5M with 64-byte codes
# (66 us, 152 ns; the file did not fit the cache), 27 at 1M with 64-byte codes (3.3 us,
# 124 ns; it did). Files larger than memory are this kind's case, so the larger figure.
RERANK_COST_CODES = 250


def nlist_for(n: int, requested: int = 0) -> int:
    """Inverted lists: about sqrt(n) / 2, a power of two (>= 39 training rows per list).

    A quarter of IVF-Flat's 2 sqrt(n): assigning every row to its list is the bulk of
    the build at millions of rows (5M rows x 1024 lists x 256 d = 2.6 TFLOP, on 2
    shared cores many minutes), while a 64-byte code scans several times faster than
    IVF-Flat's 1 KB row, so longer lists cost little per query (5M rows: ~4.9k codes a
    list, a few tens of lists probed).
    """
    if requested:
        return min(requested, n)
    return int(max(1, min(n // 39, 2 ** round(np.log2(max(1.0, np.sqrt(n) / 2))))))


def pq_m_for(dim: int, requested: int) -> int:
    if dim % requested:
        raise ValueError(f"pq_m={requested} does not divide the embedding dimension {dim}: choose a divisor of {dim}")
    return requested


def build(xb: np.ndarray, nlist: int, pq_m: int, seed: int, niter: int,
          on_block: Callable[[int, np.ndarray], None]) -> tuple[faiss.IndexIVFPQ, dict]:
    """Train on a seeded sample of rows, then add every row in blocks of CHUNK_ROWS.

    xb: [n, d] raw embeddings (memory-mapped); only blocks are normalised in RAM.
    ``on_block(lo, unit_block)`` sees every normalised block once (ground truth for
    the tuner is accumulated there, in the same pass over the file).
    """
    n, dim = xb.shape
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFPQ(quantizer, dim, nlist, pq_m_for(dim, pq_m), PQ_NBITS, faiss.METRIC_INNER_PRODUCT)
    index.cp.spherical = True
    index.cp.seed = seed
    index.cp.niter = niter
    # Small runs train the sub-quantisers on fewer than FAISS's 39 rows per centroid;
    # the exact re-ranking absorbs the coarser codes, so skip the warning it prints.
    index.pq.cp.min_points_per_centroid = 1
    # FAISS wants ~39 rows per coarse centroid and per PQ centroid (256 per sub-quantiser).
    n_train = min(n, max(40 * nlist, 40 * 2**PQ_NBITS))
    rows = np.sort(np.random.default_rng(seed).choice(n, n_train, replace=False))
    train = normalise(xb[rows])
    release_rows(xb, 0, n)
    if len(bad_rows(train)):
        raise ValueError(f"embedding rows {rows[bad_rows(train)][:5].tolist()} are zero or not finite: extract the run again")
    log.info("training %d lists and %d x %d-bit sub-quantisers on %d rows", nlist, pq_m, PQ_NBITS, n_train)
    index.train(train)
    del train
    for lo in tqdm(range(0, n, CHUNK_ROWS), desc="add ivfpq", unit="chunk", disable=None):
        block = normalise(xb[lo:lo + CHUNK_ROWS])
        bad = bad_rows(block)
        if len(bad):
            raise ValueError(f"embedding rows {(bad[:5] + lo).tolist()} are zero or not finite: extract the run again")
        index.add(block)
        on_block(lo, block)
        release_rows(xb, lo, lo + len(block))
    return index, {"nlist": nlist, "n_train": int(n_train), "niter": niter, "m": pq_m, "nbits": PQ_NBITS}


def candidates(index: faiss.IndexIVFPQ, xn: np.ndarray, depth: int, nprobe: int,
               sel: faiss.IDSelector | None = None) -> np.ndarray:
    """I [nq, depth] of the best candidates by approximate score (-1 padded)."""
    params = faiss.SearchParametersIVF(nprobe=int(min(nprobe, index.nlist)))
    if sel is not None:
        params.sel = sel
    return index.search(xn, depth, params=params)[1]


RERANK_QUERY_BLOCK = 256  # queries re-ranked together: bounds [block, R, d] gathers (~32 MB at R = 128)


def rerank(xb: np.ndarray, xn: np.ndarray, C: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine top-k of each query among its candidates.

    xn: [nq, d] unit queries; C: [nq, R] candidate ids (-1 = none) into the raw
    embeddings xb. Each block of queries reads its candidates' rows once, in file
    order. Returns D, I [nq, k] best first, -inf / -1 past the last candidate.

    Rows come through the memory map, not one ``os.preadv`` per row: on a file in the
    page cache the map took 1.0-1.5 us a row, pread 5 us (system calls are dear in this
    VM; /tmp/readrows-style test, 256-1024 sorted random rows of a 300k-row run).
    """
    nq = len(xn)
    D = np.full((nq, k), -np.inf, dtype=np.float32)
    I = np.full((nq, k), -1, dtype=np.int64)
    for q0 in range(0, nq, RERANK_QUERY_BLOCK):
        c = C[q0:q0 + RERANK_QUERY_BLOCK]
        valid = c >= 0
        if not valid.any():
            continue
        ids = np.unique(c[valid])
        unit = normalise(xb[ids])
        pos = np.searchsorted(ids, np.where(valid, c, ids[0]))
        scores = np.einsum("qrd,qd->qr", unit[pos], xn[q0:q0 + RERANK_QUERY_BLOCK], dtype=np.float32)
        scores[~valid] = -np.inf
        # Best first; equal scores keep FAISS's candidate order.
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        kk = order.shape[1]
        d = np.take_along_axis(scores, order, axis=1)
        D[q0:q0 + len(c), :kk] = d
        I[q0:q0 + len(c), :kk] = np.where(np.isfinite(d), np.take_along_axis(c, order, axis=1), -1)
    return D, I


def search(index: faiss.IndexIVFPQ, xb: np.ndarray, xn: np.ndarray, k: int, params: dict,
           sel: faiss.IDSelector | None = None, share: float = 1.0, need: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Candidates from the codes, then exact re-ranking; D, I [nq, k].

    ``share`` of rows allowed by ``sel`` widens nprobe by 1 / sqrt(share) as for
    IVF-Flat. A query left with fewer than ``need`` (default k) candidates, which a
    selective filter can cause, is searched again over every list: that returns
    min(depth, allowed rows) candidates, so k results come back whenever k rows exist.
    """
    need = k if need is None else need
    depth = max(int(params["rerank"]), k)
    nprobe = int(np.ceil(params["nprobe"] / np.sqrt(max(share, 1e-12))))
    C = candidates(index, xn, depth, nprobe, sel)
    short = np.flatnonzero((C >= 0).sum(axis=1) < need)
    if len(short):
        C[short] = candidates(index, xn[short], depth, index.nlist, sel)
    return rerank(xb, xn, C, k)


def coverage(C: np.ndarray, gt: np.ndarray, depths: tuple[int, ...]) -> np.ndarray:
    """recall@k after re-ranking the first ``d`` candidates, for each depth d.

    C: [nq, max depth] candidates in approximate order (the query itself may be among
    them: it takes no place of a true neighbour); gt: [nq, k] the exact top k
    without the query. Returns float [len(depths)].
    """
    k = gt.shape[1]
    hit = np.zeros(C.shape, dtype=bool)
    for j in range(k):  # hit[q, r]: candidate r of q is one of q's true top k
        hit |= (C == gt[:, j:j + 1]) & (gt[:, j:j + 1] >= 0)
    found = np.cumsum(hit, axis=1)
    return np.array([found[:, min(d, C.shape[1]) - 1].mean() / k for d in depths])


def tune(index: faiss.IndexIVFPQ, xq: np.ndarray, gt: np.ndarray, nprobes: tuple[int, ...], aim: float,
         mean_list: float) -> tuple[int, int, float]:
    """Cheapest (nprobe, rerank) whose recall on (xq, gt) reaches ``aim``.

    Cost = nprobe x mean_list codes scanned + rerank x RERANK_COST_CODES; nprobes are
    tried in increasing order until scanning alone costs more than the best setting
    found. The query itself may take one of the candidate places (conservative for
    ``neighbours``). Returns (nprobe, rerank, recall); the largest setting tried if
    none reaches the aim.
    """
    best = None
    last = None
    for nprobe in nprobes:
        if best is not None and nprobe * mean_list >= best[0]:
            break  # scanning alone now costs more than the best setting found
        C = candidates(index, xq, RERANK_DEPTHS[-1], nprobe)
        rec = coverage(C, gt, RERANK_DEPTHS)
        log.info("nprobe=%d: recall@10 %s at rerank %s", nprobe, np.round(rec, 3).tolist(), list(RERANK_DEPTHS))
        last = (nprobe, RERANK_DEPTHS[-1], float(rec[-1]))
        reached = np.flatnonzero(rec >= aim)
        if len(reached):
            depth = RERANK_DEPTHS[reached[0]]
            cost = nprobe * mean_list + depth * RERANK_COST_CODES
            if best is None or cost < best[0]:
                best = (cost, nprobe, depth, float(rec[reached[0]]))
    if best is None:
        assert last is not None
        return last
    return best[1], best[2], best[3]
