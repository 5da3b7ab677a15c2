"""Build the FAISS index of a run: cosine similarity as inner product on unit vectors.

``build_index(run_dir, settings)`` writes ``RUN/index/faiss.index`` and
``RUN/index/manifest.json``. Ids are row numbers, so FAISS ids are det_ids.
An approximate index gets its search parameter (nprobe / efSearch; nprobe and the
re-rank depth for ivfpq) tuned at build time on one seeded sample of rows and its
recall@10 reported on a disjoint sample.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import faiss
import numpy as np
from tqdm import tqdm

from extractor.rundir import EMBEDDINGS, INDEX_DIR, INDEX_LOCK, atomic_write, exclusive, open_run, write_json
from index import ivfpq
from index.spaces import DEFAULT_SPACE, open_space, space_file, space_index_dir
from index.vectors import CHUNK_ROWS, KnnAccumulator, bad_rows, blocked_knn, file_checksum, normalise

log = logging.getLogger(__name__)

INDEX_FILE = "faiss.index"
INDEX_MANIFEST = "manifest.json"
INDEX_FORMAT = 1
KINDS = ("auto", "flat", "hnsw", "ivf", "ivfpq")
# The approximate kind `auto` picks above `exact_max_rows`. bench/index_bench.py at 1M
# rows on 2 cores: IVF reaches recall@10 0.97 at 1.4 ms p50; HNSW (M=32,
# efConstruction=40) builds as slowly and saturates near recall 0.8 on clustered data.
AUTO_APPROXIMATE = "ivf"
# Above exact_max_rows, `auto` builds ivfpq instead of IVF-Flat when the float32 vectors
# (n x dim x 4 bytes) exceed this share of RAM. A loaded IVF-Flat holds a copy of them;
# its build peaks at 4.4x them (measured: `/usr/bin/time python -m index build RUN
# --kind ivf` on a 300k-row synthetic run, 1478 MB peak for 293 MiB of vectors over a
# 176 MB interpreter: the normalised rows, the index, the memory-mapped file's pages and
# the scoring blocks). At 1/8 that build stays near half of RAM and the loaded index at
# an eighth, leaving the rest to the metadata, the app and the machine's other
# processes. 24 GB of RAM: IVF-Flat up to ~2.9M rows of 256-d, ivfpq above.
AUTO_RAM_SHARE = 0.125
RECALL_K = 10
MIN_APPROXIMATE_ROWS = 100  # enough to train and to draw two recall samples
# Tuning aims a little above the target: the disjoint report sample's estimate has a
# standard error of about 0.003 at 500 queries x 10 neighbours.
TUNE_MARGIN = 0.01
_NPROBES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 2048, 4096)
_EF_SEARCHES = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 2048)


@dataclass(frozen=True)
class BuildSettings:
    """Everything that decides the index; saved in RUN/index/manifest.json."""

    kind: str = "auto"
    seed: int = 0
    exact_max_rows: int = 200_000
    target_recall: float = 0.95
    n_tune_queries: int = 500
    hnsw_m: int = 32
    hnsw_ef_construction: int = 40
    ivf_nlist: int = 0  # 0: about 2 sqrt(n) (ivfpq: sqrt(n)), a power of two
    ivf_niter: int = 10
    # ivfpq: bytes of code per row (sub-quantisers of 8 bits). 64, not 32: at 300k rows the
    # 32-byte codes needed the best 256 candidates to hold 97.8% of the true top 10, the
    # 64-byte ones 64 (at 5M rows 32 bytes needed 1024), and every candidate is a row read
    # from the file; 72 bytes a row with the id is 360 MB at 5M rows.
    pq_m: int = 64
    ram_bytes: int = 0  # RAM the auto policy compares with; 0 = this machine's

    def ram(self) -> int:
        if self.ram_bytes:
            return self.ram_bytes
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown index kind {self.kind!r}: choose one of {', '.join(KINDS)}")
        if not 0.0 < self.target_recall <= 1.0:
            raise ValueError(f"target_recall must be in (0, 1], got {self.target_recall}")
        for name in ("exact_max_rows", "n_tune_queries", "hnsw_m", "hnsw_ef_construction", "ivf_niter", "pq_m"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.ivf_nlist < 0:
            raise ValueError(f"ivf_nlist must be >= 0 (0 = automatic), got {self.ivf_nlist}")
        if self.ram_bytes < 0:
            raise ValueError(f"ram_bytes must be >= 0 (0 = this machine's RAM), got {self.ram_bytes}")

    def resolve_kind(self, n: int, dim: int) -> str:
        if self.kind != "auto":
            return self.kind
        if n <= self.exact_max_rows:
            return "flat"
        return "ivfpq" if n * dim * 4 > AUTO_RAM_SHARE * self.ram() else AUTO_APPROXIMATE

    def nlist_for(self, n: int) -> int:
        if self.ivf_nlist:
            return min(self.ivf_nlist, n)
        # 2 sqrt(n): at 1M rows, 2048 lists build in ~1.5 min on 2 cores and reach
        # recall@10 0.977 at 1.0 ms; 4096 lists took ~4x longer to build for 0.9 ms,
        # 1024 built in 25 s but needed 1.4 ms. FAISS wants ~39 training rows per list.
        return int(max(1, min(n // 39, 2 ** round(np.log2(max(1.0, 2 * np.sqrt(n)))))))


def rebuild_hint(run_dir: Path, space: str = DEFAULT_SPACE) -> str:
    suffix = "" if space == DEFAULT_SPACE else f" --space {space}"
    return f"rebuild it with `python -m index build {run_dir}{suffix}`"


class IndexBusy(ValueError):
    """Another process holds the run's index lock (a build is under way)."""


def build_index(run_dir: Path, settings: BuildSettings = BuildSettings(), space: str = DEFAULT_SPACE) -> dict:
    """Build and write the index of one feature space of ``run_dir`` (index/spaces.py);
    returns the index manifest. Holds ``RUN/.index.lock`` meanwhile, so the CLI and the app
    never write one index at once; raises :class:`IndexBusy` (never waits) if it is held."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"{run_dir} is not a run directory")
    with exclusive(run_dir / INDEX_LOCK) as mine:
        if not mine:
            raise IndexBusy(f"another process is building an index of {run_dir} right now; "
                            "wait for it to finish, then run the build again")
        return _build_index(run_dir, settings, space)


def _build_index(run_dir: Path, settings: BuildSettings, space: str) -> dict:
    xb = open_space(run_dir, space)  # checks every table and the row alignment
    source = space_file(space)
    n, dim = xb.shape
    if n == 0:
        raise ValueError(f"{run_dir} has no embeddings: nothing to index")

    started = time.perf_counter()
    checksum = file_checksum(run_dir / source)
    kind = settings.resolve_kind(n, dim)
    if kind != "flat" and n < MIN_APPROXIMATE_ROWS:
        raise ValueError(f"{run_dir} has {n} rows: an approximate index needs {MIN_APPROXIMATE_ROWS}; use --kind flat")
    log.info("building a %s index over %d x %d", kind, n, dim)
    try:
        if kind == "ivfpq":  # streams the file: never holds the vectors in RAM
            index, params, recall = _build_ivfpq(xb, settings)
        else:
            xn = np.empty((n, dim), dtype=np.float32)
            for lo in tqdm(range(0, n, CHUNK_ROWS), desc="normalise", unit="chunk", disable=None):
                xn[lo:lo + CHUNK_ROWS] = normalise(xb[lo:lo + CHUNK_ROWS])
            bad = bad_rows(xn)
            if len(bad):
                raise ValueError(f"embedding rows {bad[:5].tolist()} are zero or not finite: extract the run again")
            index, params = _BUILDERS[kind](xn, settings)
            recall = _tune_and_measure(index, kind, params, xn, settings)
            del xn
    except ValueError as exc:
        raise ValueError(f"{run_dir}: {exc}") from None
    build_seconds = time.perf_counter() - started

    index_dir = space_index_dir(run_dir, space)
    index_path = index_dir / INDEX_FILE
    atomic_write(index_path, lambda tmp: faiss.write_index(index, str(tmp)))
    result = {
        "format": INDEX_FORMAT,
        "kind": kind,
        "n": int(n),
        "dim": int(dim),
        "metric": "cosine (inner product of L2-normalised vectors)",
        "params": params,
        "recall_at_10": recall,
        "build_seconds": round(build_seconds, 3),
        "faiss_version": faiss.__version__,
        "space": space,
        "embeddings": {"file": source, "checksum": checksum, "size": (run_dir / source).stat().st_size},
        "index_file": {"file": INDEX_FILE, "checksum": file_checksum(index_path), "size": index_path.stat().st_size},
        "settings": dataclasses.asdict(settings),
        "ram_policy": {"vector_bytes": int(n * dim * 4), "ram_bytes": int(settings.ram()), "share": AUTO_RAM_SHARE,
                       "ivfpq_above_bytes": int(AUTO_RAM_SHARE * settings.ram())},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_json(index_dir / INDEX_MANIFEST, result)
    log.info("wrote %s (%s, %.1f s, recall@10 %s)", index_path, kind, build_seconds, recall.get("value"))
    return result


def _add_chunked(index: faiss.Index, xn: np.ndarray, desc: str) -> None:
    for lo in tqdm(range(0, len(xn), CHUNK_ROWS), desc=desc, unit="chunk", disable=None):
        index.add(xn[lo:lo + CHUNK_ROWS])


def _build_flat(xn: np.ndarray, settings: BuildSettings) -> tuple[faiss.Index, dict]:
    index = faiss.IndexFlatIP(xn.shape[1])
    _add_chunked(index, xn, "add flat")
    return index, {}


def _build_hnsw(xn: np.ndarray, settings: BuildSettings) -> tuple[faiss.Index, dict]:
    index = faiss.IndexHNSWFlat(xn.shape[1], settings.hnsw_m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = settings.hnsw_ef_construction
    _add_chunked(index, xn, "add hnsw")
    return index, {"M": settings.hnsw_m, "efConstruction": settings.hnsw_ef_construction}


def _build_ivf(xn: np.ndarray, settings: BuildSettings) -> tuple[faiss.Index, dict]:
    n, dim = xn.shape
    nlist = settings.nlist_for(n)
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.spherical = True  # centroids of unit vectors, compared by inner product
    index.cp.seed = settings.seed
    index.cp.niter = settings.ivf_niter
    # 40 points per centroid is where FAISS stops warning; more only slows k-means.
    rng = np.random.default_rng(settings.seed)
    n_train = min(n, 40 * nlist)
    train = xn[np.sort(rng.choice(n, n_train, replace=False))]
    log.info("training %d centroids on %d rows", nlist, n_train)
    index.train(train)
    _add_chunked(index, xn, "add ivf")
    return index, {"nlist": nlist, "n_train": n_train, "niter": settings.ivf_niter}


_BUILDERS = {"flat": _build_flat, "hnsw": _build_hnsw, "ivf": _build_ivf}


def _build_ivfpq(xb: np.ndarray, settings: BuildSettings) -> tuple[faiss.Index, dict, dict]:
    """Train, add and tune in one pass over the memory-mapped rows; see index.ivfpq.

    The exact top-k of the tuning and report queries is accumulated block by block
    while the rows are added, so the file is read once (plus the training sample).
    """
    n, dim = xb.shape
    m = max(1, min(settings.n_tune_queries, n // 2))
    picks = np.random.default_rng(settings.seed).choice(n, 2 * m, replace=False)
    xq = normalise(xb[picks])
    knn = KnnAccumulator(xq, RECALL_K + 1)
    nlist = ivfpq.nlist_for(n, settings.ivf_nlist)
    index, params = ivfpq.build(xb, nlist, settings.pq_m, settings.seed, settings.ivf_niter,
                                lambda lo, block: knn.add(np.arange(lo, lo + len(block)), block))
    gt = _drop_self(knn.result()[1], picks, RECALL_K)
    aim = min(1.0, settings.target_recall + TUNE_MARGIN)
    nprobes = tuple(v for v in _NPROBES if v < nlist) + (nlist,)
    nprobe, rerank, tuned = ivfpq.tune(index, xq[:m], gt[:m], nprobes, aim, n / nlist)
    if tuned < aim:
        log.warning("recall@10 %.3f at nprobe=%d, rerank=%d is below the aim %.3f", tuned, nprobe, rerank, aim)
    params.update(nprobe=int(nprobe), rerank=int(rerank))
    _, I = ivfpq.search(index, xb, xq[m:], RECALL_K + 1, params)
    recall = {
        "value": round(recall_at(_drop_self(I, picks[m:], RECALL_K), gt[m:]), 4),
        "exact": False, "k": RECALL_K, "n_queries": int(m),
        "tuned_on": {"n_queries": int(m), "recall": round(tuned, 4), "aim": aim},
        "target": settings.target_recall, "seed": settings.seed,
    }
    return index, params, recall


def search_parameters(kind: str, params: dict, sel: faiss.IDSelector | None = None,
                      share: float = 1.0) -> faiss.SearchParameters:
    """The FAISS search parameters of an index built here, optionally with a selector.

    ``share``: the fraction of rows the selector allows. The k nearest allowed rows sit
    deeper than the k nearest overall, so IVF probes nprobe / sqrt(share) lists (IVF
    skips rejected rows before scoring, so the extra lists cost little). Measured at
    1M rows, 2048 lists, nprobe 16, random filters keeping 3 / 10 / 30%: recall@10
    0.89 / 0.93 / 0.95 unscaled, 1.00 / 1.00 / 0.995 scaled at p50 0.5-0.7 ms; scaling
    by 1 / share gave the same recall at 1.4-1.9 ms.
    """
    if kind == "hnsw":
        out = faiss.SearchParametersHNSW(efSearch=int(params["efSearch"]))
    elif kind in ("ivf", "ivfpq"):
        nprobe = int(np.ceil(params["nprobe"] / np.sqrt(max(share, 1e-12))))
        out = faiss.SearchParametersIVF(nprobe=min(nprobe, int(params.get("nlist", nprobe))))
    else:
        out = faiss.SearchParameters()
    if sel is not None:
        out.sel = sel
    return out


def recall_at(I_approx: np.ndarray, I_exact: np.ndarray, k: int = RECALL_K) -> float:
    """Mean share of each exact top-k found in the approximate top-k."""
    hits = [len(np.intersect1d(a[:k][a[:k] >= 0], e[:k])) for a, e in zip(I_approx, I_exact)]
    return float(np.mean(hits) / k)


def _drop_self(I: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """Each row's ids without the query's own id, first k (-1 padded)."""
    out = np.full((len(I), k), -1, dtype=np.int64)
    for r, (ids, own) in enumerate(zip(I, rows)):
        kept = ids[ids != own][:k]
        out[r, :len(kept)] = kept
    return out


def _tune_and_measure(index: faiss.Index, kind: str, params: dict, xn: np.ndarray, settings: BuildSettings) -> dict:
    """Set the search parameter in ``params``; return the recall read-out for the manifest.

    Queries are rows of the run, each excluding itself (as ``neighbours`` does), so the
    trivial self-match does not inflate recall.
    """
    if kind == "flat":
        return {"value": 1.0, "exact": True}
    n = len(xn)
    m = max(1, min(settings.n_tune_queries, n // 2))
    rng = np.random.default_rng(settings.seed)
    picks = rng.choice(n, 2 * m, replace=False)
    tune_rows, report_rows = picks[:m], picks[m:]
    _, gt = blocked_knn(xn[picks], RECALL_K + 1, n, lambda lo, hi: (np.arange(lo, hi), xn[lo:hi]))
    gt = _drop_self(gt, picks, RECALL_K)
    gt_tune, gt_report = gt[:m], gt[m:]

    name, values = ("nprobe", _NPROBES) if kind == "ivf" else ("efSearch", _EF_SEARCHES)
    if kind == "ivf":
        values = tuple(v for v in values if v < params["nlist"]) + (params["nlist"],)
    aim = min(1.0, settings.target_recall + TUNE_MARGIN)
    tuned = None
    for value in values:
        p = search_parameters(kind, {**params, name: value})
        _, I = index.search(xn[tune_rows], RECALL_K + 1, params=p)
        got = recall_at(_drop_self(I, tune_rows, RECALL_K), gt_tune)
        log.info("%s=%d: recall@10 %.4f on the tuning sample", name, value, got)
        tuned = (value, got)
        if got >= aim:
            break
    assert tuned is not None
    params[name] = int(tuned[0])
    if tuned[1] < aim:
        log.warning("recall@10 %.3f at the largest %s=%d is below the aim %.3f", tuned[1], name, tuned[0], aim)
    _, I = index.search(xn[report_rows], RECALL_K + 1, params=search_parameters(kind, params))
    return {
        "value": round(recall_at(_drop_self(I, report_rows, RECALL_K), gt_report), 4),
        "exact": False,
        "k": RECALL_K,
        "n_queries": int(m),
        "tuned_on": {"n_queries": int(m), "recall": round(tuned[1], 4), "aim": aim},
        "target": settings.target_recall,
        "seed": settings.seed,
    }
