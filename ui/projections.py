"""2-D maps of a population's embeddings (PCA, t-SNE, UMAP), cached in ``RUN/cache``.

Embeddings are L2-normalised first, so Euclidean distances order pairs exactly as the
index's cosine does. t-SNE above its cap runs on a seeded sample stratified by MST
mode (proportional, every tone kept); UMAP above its cap is fitted on such a sample
and ``transform``s the other rows, so every row is placed.

A projection is stored as ``cache/projection-<key>.parquet`` (det_id, x, y, fitted)
plus ``projection-<key>.json`` (its parameters); the key hashes the method, its
parameters, the population, the feature space, the library version and the vectors'
checksum, so a re-extracted run never shows a stale map. Files are written to a temporary name and
renamed: two sessions computing the same map leave one intact file.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from extractor.rundir import CACHE_DIR, atomic_write, write_json
from index.groupings import POPULATIONS, population_rows
from index.spaces import DEFAULT_SPACE, check_space
from ui.gallery import lighting_label

log = logging.getLogger(__name__)

METHODS = ("pca", "umap", "tsne")
METHOD_LABELS = {"pca": "PCA", "umap": "UMAP", "tsne": "t-SNE"}
DEFAULT_CAPS = {"pca": None, "umap": 20_000, "tsne": 5_000}
# t-SNE's neighbour search is far cheaper on 50 principal components (scikit-learn's advice).
TSNE_PCA_DIMS = 50
CACHE_VERSION = 1
_LIBRARY = {"pca": "scikit-learn", "tsne": "scikit-learn", "umap": "umap-learn"}
_COLUMNS = ["det_id", "x", "y", "fitted"]
# Rows UMAP places per ``transform`` call: the points where a background job reports
# progress and may stop (a fit itself cannot be interrupted).
TRANSFORM_CHUNK = 5_000

# step(fraction done or None, text): progress, called between steps; it may raise to stop.
Step = Callable[[float | None, str], None]


def _no_step(fraction: float | None, text: str) -> None:
    pass


@dataclass(frozen=True)
class ProjectionParams:
    """Parameters of one projection; only the chosen method's own ones enter its key."""

    n_neighbors: int = 15           # UMAP
    min_dist: float = 0.1           # UMAP
    perplexity: float = 30.0        # t-SNE
    sample_cap: int | None = None   # None: the method's default (DEFAULT_CAPS)
    random_state: int = 0

    def __post_init__(self) -> None:
        if self.n_neighbors < 2:
            raise ValueError(f"n_neighbors must be >= 2, got {self.n_neighbors}")
        if not 0.0 <= self.min_dist <= 1.0:
            raise ValueError(f"min_dist must be within 0..1, got {self.min_dist}")
        if self.perplexity <= 0:
            raise ValueError(f"perplexity must be > 0, got {self.perplexity}")
        if self.sample_cap is not None and self.sample_cap < 10:
            raise ValueError(f"the sample cap must be at least 10 rows, got {self.sample_cap}")

    def cap(self, method: str) -> int | None:
        return self.sample_cap if self.sample_cap is not None else DEFAULT_CAPS[method]

    def for_method(self, method: str) -> dict:
        """The parameters that change ``method``'s result."""
        _check_method(method)
        own = {"pca": (), "umap": ("n_neighbors", "min_dist"), "tsne": ("perplexity",)}[method]
        out = {name: getattr(self, name) for name in own}
        out.update(random_state=self.random_state, sample_cap=self.cap(method))
        return out


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown projection method {method!r}: choose one of {', '.join(METHODS)}")


def _library_version(method: str) -> str:
    try:
        return importlib.metadata.version(_LIBRARY[method])
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def projection_key(method: str, population: str, params: ProjectionParams, embeddings_checksum: str,
                   space: str = DEFAULT_SPACE) -> str:
    """Hash of everything that decides the coordinates. ``space`` enters it by name too: the
    decoder layers share one file, hence one checksum (query keeps its keys from before spaces)."""
    if population not in POPULATIONS:
        raise ValueError(f"unknown population {population!r}: choose one of {', '.join(POPULATIONS)}")
    doc = {"version": CACHE_VERSION, "method": method, "population": population, "params": params.for_method(method),
           "library": _library_version(method), "embeddings": embeddings_checksum}
    if check_space(space) != DEFAULT_SPACE:
        doc["space"] = space
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:20]


def stratified_sample(strata: np.ndarray, cap: int, random_state: int) -> np.ndarray:
    """Sorted positions of a seeded sample of at most ``cap`` rows, each stratum in
    proportion to its size (largest remainder) and none left out while ``cap`` allows."""
    strata = np.asarray(strata)
    n = len(strata)
    if cap < 1:
        raise ValueError(f"cap must be >= 1, got {cap}")
    if n <= cap:
        return np.arange(n)
    codes, _ = pd.factorize(pd.Series(strata, dtype=object), use_na_sentinel=False)
    sizes = np.bincount(codes)
    exact = sizes * cap / n
    quota = np.floor(exact).astype(np.int64)
    if cap >= len(sizes):  # small groups are the point of a fairness map: keep one of each
        quota = np.maximum(quota, 1)
    spare = cap - int(quota.sum())
    if spare > 0:
        order = np.argsort(-(exact - np.floor(exact)), kind="stable")
        room = order[quota[order] < sizes[order]]
        quota[room[:spare]] += 1
    while quota.sum() > cap:  # the floor of one can overshoot: trim the largest strata
        quota[np.argmax(quota)] -= 1
    rng = np.random.default_rng(random_state)
    picked = [rng.choice(np.flatnonzero(codes == s), int(q), replace=False) for s, q in enumerate(quota) if q > 0]
    return np.sort(np.concatenate(picked))


def project(X: np.ndarray, method: str, params: ProjectionParams = ProjectionParams(),
            fit_rows: np.ndarray | None = None, step: Step = _no_step) -> np.ndarray:
    """float32 [n, 2] coordinates of the rows of ``X``.

    ``fit_rows`` (UMAP only): positions the model is fitted on; the others are placed
    with ``transform``, ``TRANSFORM_CHUNK`` rows at a time with a ``step`` between.
    Rows are L2-normalised here, so raw embeddings can be passed.
    """
    _check_method(method)
    X = np.asarray(X, dtype=np.float32)
    n = len(X)
    if X.ndim != 2 or n < 3:
        raise ValueError(f"a map needs at least 3 rows of embeddings, got {n}")
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    X = X / np.where(norms > 0, norms, 1)
    if method == "pca":
        from sklearn.decomposition import PCA
        return PCA(n_components=2, random_state=params.random_state).fit_transform(X).astype(np.float32)
    if method == "tsne":
        from sklearn.decomposition import PCA
        from sklearn.manifold import TSNE
        if X.shape[1] > TSNE_PCA_DIMS and n > TSNE_PCA_DIMS:
            X = PCA(n_components=TSNE_PCA_DIMS, random_state=params.random_state).fit_transform(X)
        # scikit-learn requires perplexity < n; small populations get the largest allowed.
        perplexity = min(params.perplexity, max(1.0, (n - 1) / 3))
        tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto",
                    random_state=params.random_state)
        return tsne.fit_transform(X).astype(np.float32)
    import umap  # slow to import (numba): only when asked for

    fit = np.arange(n) if fit_rows is None else np.asarray(fit_rows)
    reducer = umap.UMAP(n_components=2, n_neighbors=min(params.n_neighbors, len(fit) - 1),
                        min_dist=params.min_dist, random_state=params.random_state, n_jobs=1)
    out = np.empty((n, 2), dtype=np.float32)
    if fit_rows is None:
        out[:] = reducer.fit_transform(X)
        return out
    out[fit] = reducer.fit(X[fit]).embedding_
    rest = np.setdiff1d(np.arange(n), fit)
    for lo in range(0, len(rest), TRANSFORM_CHUNK):
        step(0.5 + 0.5 * lo / len(rest), f"placing the other rows with transform: {lo} of {len(rest)}")
        chunk = rest[lo:lo + TRANSFORM_CHUNK]
        out[chunk] = reducer.transform(X[chunk])
    return out


def strata_of(meta: pd.DataFrame) -> np.ndarray:
    """The stratum of each row for sampling: its MST mode ('unknown' when none)."""
    return meta["mst_mode"].astype("string").fillna("unknown").to_numpy(dtype=object)


@dataclass(frozen=True)
class Projection:
    frame: pd.DataFrame   # det_id, x, y, fitted (False: placed by UMAP's transform)
    info: dict            # method, population, parameters, counts, seconds, key


def compute_projection(run, method: str, population: str, params: ProjectionParams,
                       step: Step = _no_step) -> Projection:
    """Project the population of ``run`` (an ``index.Run``); sampling as the module says."""
    started = time.perf_counter()
    step(0.0, "selecting the rows")
    rows = population_rows(run.meta, population)
    cap = params.cap(method)
    n_population = len(rows)
    fit_rows = None
    if cap is not None and n_population > cap:
        sample = stratified_sample(strata_of(run.meta.iloc[rows]), cap, params.random_state)
        if method == "umap":
            fit_rows = sample
        else:
            rows = rows[sample]
    n_fit = len(rows) if fit_rows is None else len(fit_rows)
    step(0.05, f"fitting {METHOD_LABELS[method]} on {n_fit} rows (cannot be interrupted)")
    coords = project(run.xb[rows], method, params, fit_rows, step)
    fitted = np.ones(len(rows), dtype=bool)
    if fit_rows is not None:
        fitted[:] = False
        fitted[fit_rows] = True
    frame = pd.DataFrame({"det_id": rows.astype(np.int64), "x": coords[:, 0], "y": coords[:, 1], "fitted": fitted})
    info = {"method": method, "population": population, "space": run.space, "params": params.for_method(method),
            "n_population": int(n_population), "n_shown": int(len(rows)), "n_fitted": int(fitted.sum()),
            "library": f"{_LIBRARY[method]} {_library_version(method)}",
            "seconds": round(time.perf_counter() - started, 2)}
    return Projection(frame, info)


# ------------------------------------------------------------------------- cache
def cache_paths(run_dir: Path, key: str) -> tuple[Path, Path]:
    base = Path(run_dir) / CACHE_DIR / f"projection-{key}"
    return base.with_suffix(".parquet"), base.with_suffix(".json")


def load_cached(run_dir: Path, key: str) -> Projection | None:
    """The stored projection, or None when absent or unreadable (then it is recomputed)."""
    data, meta = cache_paths(run_dir, key)
    if not data.is_file():
        return None
    try:
        frame = pd.read_parquet(data)
        info = json.loads(meta.read_text()) if meta.is_file() else {}
    except Exception as exc:  # a damaged cache file is only a miss
        log.warning("ignoring unreadable projection cache %s: %r", data, exc)
        return None
    if list(frame.columns) != _COLUMNS:
        log.warning("ignoring projection cache %s with columns %s", data, list(frame.columns))
        return None
    return Projection(frame, info)


def save_cached(run_dir: Path, key: str, projection: Projection) -> bool:
    """Store atomically; False (and a log line) when the run directory is read-only."""
    data, meta = cache_paths(run_dir, key)
    try:
        atomic_write(data, lambda tmp: projection.frame.to_parquet(tmp, index=False))
        write_json(meta, {**projection.info, "key": key})
    except OSError as exc:
        log.warning("cannot cache the projection in %s: %s", data.parent, exc)
        return False
    return True


def run_projection_key(run, method: str, population: str, params: ProjectionParams) -> str:
    """The cache key of a map of ``run`` (an ``index.Run``) in the run's feature space."""
    return projection_key(method, population, params, run.index_manifest["embeddings"]["checksum"], run.space)


def load_or_compute(run, method: str, population: str, params: ProjectionParams,
                    step: Step = _no_step) -> tuple[Projection, bool]:
    """(projection, True if it came from the cache). Computes and stores on a miss; a
    ``step`` that raises before the store leaves nothing in the cache."""
    key = run_projection_key(run, method, population, params)
    cached = load_cached(run.run_dir, key)
    if cached is not None:
        return cached, True
    projection = compute_projection(run, method, population, params, step)
    projection = dataclasses.replace(projection, info={**projection.info, "key": key})
    step(1.0, "storing the map in the cache")
    save_cached(run.run_dir, key, projection)
    return projection, False


# ------------------------------------------------------------------------- display
COLOUR_OPTIONS = ("mst_mode", "mst_band", "lighting", "lighting_well_lit", "lighting_dimly_lit",
                  "lighting_underexposed", "lighting_overexposed", "gender_mode", "age_mode", "detected",
                  "matched", "score")
MAP_COLUMNS = ("det_id", "x", "y", "fitted", "image_id", "filename", "person_id", "score", "detected", "matched",
               "mst_mode", "mst_band", "lighting", "lighting_well_lit", "lighting_dimly_lit", "lighting_underexposed",
               "lighting_overexposed", "gender_mode", "age_mode", "x1", "y1", "x2", "y2")


def map_table(meta: pd.DataFrame, frame: pd.DataFrame) -> pd.DataFrame:
    """The projection joined with each row's metadata: what the map colours and the CSV holds.

    Group columns come out as plain strings/bools ('unknown' for a missing MST mode), so
    colours and the CSV need no further cleaning.
    """
    rows = meta.iloc[frame["det_id"].to_numpy()]
    out = frame.reset_index(drop=True).copy()
    for col in MAP_COLUMNS[4:]:
        if col == "lighting":
            out[col] = lighting_label(rows).to_numpy()
        elif col == "mst_mode":
            out[col] = rows[col].astype("string").fillna("unknown").to_numpy(dtype=object)
        elif col in rows.columns:
            out[col] = rows[col].to_numpy()
    return out[[c for c in MAP_COLUMNS if c in out.columns]]
