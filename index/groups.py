"""Group read-outs over a run: similarity matrices, neighbour composition, recall.

A grouping is an [N, G] boolean membership matrix plus labels, so overlapping
(``mst_any``, ``lighting``) and exclusive (``mst_mode``) groupings share the code.
Every read-out returns a tidy long frame: ``group_a, group_b, metric, value, ci_low,
ci_high, n_a, n_b, small_group`` plus the parameters that produced it. ``small_group``
is True when group_a or group_b has fewer than ``min_group_size`` rows. Empty groups
stay in the output with n = 0 and NaN values. In population ``all``, detections
matching nobody carry no attributes and so fall in ``unknown`` (``no`` for a
``lighting_<flag>`` grouping).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import pandas as pd

from extractor.groups import AGE_VALUES, GENDER_VALUES, LIGHTING_FLAGS, MST_BANDS, MST_TONES, UNKNOWN
from index.stats import newcombe_difference, percentile_interval, resample_counts, wilson
from index.store import Run

try:
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover - installed with scikit-learn
    threadpool_limits = None

GROUPINGS = (
    "mst_any", "mst_mode", "mst_band", "lighting", *(f"lighting_{f}" for f in LIGHTING_FLAGS),
    "gender_mode", "gender_any", "age_mode", "age_any",
)
POPULATIONS = ("detections", "persons", "all")
METRICS = ("similarity", "neighbours", "recall", "probe")
_BOOT_CHUNK = 64  # bootstrap rounds per matrix product; fixed so results do not depend on n


def _one_blas_thread() -> contextlib.AbstractContextManager:
    """Our products have a long inner dimension ([64, n] @ [n, 256]); numpy's OpenBLAS
    ran that shape 30-40x slower on two threads than on one on the 2-core VM
    ([64, 20000] @ [20000, 256]: 210-380 ms against 6-9 ms)."""
    return threadpool_limits(1, user_api="blas") if threadpool_limits else contextlib.nullcontext()


@dataclass(frozen=True)
class GroupSettings:
    """Parameters of the read-outs; each appears as a column of the output."""

    k: int = 10
    n_boot: int = 1000
    seed: int = 0
    min_group_size: int = 30
    # The neighbour search costs nq x N x 256; 500 queries per group keep 100k rows
    # and 11 groups near 4 s on 2 cores with an exact index (bench/index_bench.py).
    max_queries_per_group: int = 500

    def __post_init__(self) -> None:
        for name in ("k", "n_boot", "max_queries_per_group"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.min_group_size < 0:
            raise ValueError(f"min_group_size must be >= 0, got {self.min_group_size}")


def _bool(frame: pd.DataFrame, col: str) -> np.ndarray:
    return frame[col].to_numpy(dtype=bool, na_value=False)


def _flags(frame: pd.DataFrame, columns: list[str], labels: list[str]) -> tuple[list[str], np.ndarray]:
    """Overlapping groups from flag columns, plus ``unknown`` for rows in none of them."""
    M = np.stack([_bool(frame, c) for c in columns], axis=1) if columns else np.zeros((len(frame), 0), bool)
    return labels + [UNKNOWN], np.column_stack([M, ~M.any(axis=1)])


def _exclusive(values: np.ndarray, labels: list[str]) -> tuple[list[str], np.ndarray]:
    """One group per label; values outside the labels go to ``unknown``."""
    M = np.stack([values == lab for lab in labels], axis=1)
    return labels + [UNKNOWN], np.column_stack([M, ~M.any(axis=1)])


def membership(frame: pd.DataFrame, by: str) -> tuple[list[str], np.ndarray]:
    """Labels (stable order, ``unknown`` last) and bool [len(frame), G] membership."""
    if by not in GROUPINGS:
        raise ValueError(f"unknown grouping {by!r}: choose one of {', '.join(GROUPINGS)}")
    tones = [str(t) for t in MST_TONES]
    if by == "mst_any":
        return _flags(frame, [f"mst_any_{t}" for t in tones], tones)
    if by == "mst_mode":
        mode = frame["mst_mode"].astype("Float64").to_numpy(dtype=float, na_value=np.nan)
        return _exclusive(np.where(np.isnan(mode), -1, mode).astype(int).astype(str), tones)
    if by == "mst_band":
        return _exclusive(frame["mst_band"].astype(str).to_numpy(), list(MST_BANDS))
    if by == "lighting":
        return _flags(frame, [f"lighting_{f}" for f in LIGHTING_FLAGS], list(LIGHTING_FLAGS))
    if by.startswith("lighting_"):
        yes = _bool(frame, by)
        return ["yes", "no"], np.column_stack([yes, ~yes])
    values = GENDER_VALUES if by.startswith("gender") else AGE_VALUES
    stem = by.rsplit("_", 1)[0]
    if by.endswith("_mode"):
        return _exclusive(frame[by].astype(str).to_numpy(), list(values))
    return _flags(frame, [f"{stem}_any_{v}" for v in values], list(values))


def population_rows(meta: pd.DataFrame, population: str) -> np.ndarray:
    """Sorted det_ids of a population: detections = matched rows, persons = rows with a
    person (one per annotated person, detected or not), all = every row."""
    if population == "detections":
        return np.flatnonzero(_bool(meta, "matched"))
    if population == "persons":
        return np.flatnonzero(_bool(meta, "has_person"))
    if population == "all":
        return np.arange(len(meta))
    raise ValueError(f"unknown population {population!r}: choose one of {', '.join(POPULATIONS)}")


def _pairs_frame(labels: list[str], sizes: np.ndarray, metric: str, value: np.ndarray,
                 lo: np.ndarray, hi: np.ndarray, min_size: int, **extra: object) -> pd.DataFrame:
    """Long frame with one row per ordered pair (g, h) of an [G, G] matrix."""
    G = len(labels)
    a, b = np.repeat(np.arange(G), G), np.tile(np.arange(G), G)
    n = np.asarray(sizes, dtype=np.int64)
    out = pd.DataFrame({
        "group_a": np.asarray(labels, dtype=object)[a], "group_b": np.asarray(labels, dtype=object)[b],
        "metric": metric, "value": np.ravel(value), "ci_low": np.ravel(lo), "ci_high": np.ravel(hi),
        "n_a": n[a], "n_b": n[b], "small_group": (n[a] < min_size) | (n[b] < min_size),
    })
    for name, col in extra.items():
        out[name] = np.ravel(col)[a * G + b] if isinstance(col, np.ndarray) and col.size == G * G else col
    return out


def _cosines(gram: np.ndarray, same: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(centroid cosine, mean pairwise cosine) from Gram matrices of group sums.

    gram[..., g, h] = S_g . S_h; same[..., g, h] = the self-pairs inside g x h (|g n h|
    without resampling, sum_i w_gi w_hi with it); each self-pair contributes cos = 1.
    """
    norms = np.sqrt(np.einsum("...gg->...g", gram))
    with np.errstate(divide="ignore", invalid="ignore"):
        centroid = gram / (norms[..., :, None] * norms[..., None, :])
        pairs = sizes[:, None].astype(np.float64) * sizes[None, :] - same
        pairwise = np.where(pairs > 0, (gram - same) / pairs, np.nan)
    return centroid, pairwise


def _strata(M: np.ndarray, X: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Membership patterns Q [P, G] (float64, the set of groups a row is in) and the
    unit vectors of each pattern's rows [n_p, d]; P = 0 for an empty population."""
    patterns, stratum = np.unique(M, axis=0, return_inverse=True)
    stratum = stratum.ravel()  # some numpy 2 releases return it as [N, 1] with axis=0
    order = np.argsort(stratum, kind="stable")
    counts = np.bincount(stratum, minlength=len(patterns))
    return patterns.astype(np.float64), [X[order[e - c:e]] for e, c in zip(np.cumsum(counts), counts)]


def _bootstrap_similarity(rng: np.random.Generator, n_boot: int, Q: np.ndarray, Xs: list[np.ndarray],
                          sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[n_boot, G, G] centroid and pairwise cosines of resamples within each membership
    pattern (``_strata``).

    A row in two overlapping groups is drawn with one weight for both, as in the data,
    and every group keeps its size; for an exclusive grouping this is resampling within
    each group. A round's sum of g adds the resampled sums of g's patterns; the pairs
    of a row with its own copies, w_i^2 of them with cosine 1, are removed.
    """
    (P, G), d = Q.shape, (Xs[0].shape[1] if Xs else 0)
    boot_c, boot_p = np.empty((n_boot, G, G)), np.empty((n_boot, G, G))
    with _one_blas_thread():
        for lo in range(0, n_boot, _BOOT_CHUNK):
            b = min(_BOOT_CHUNK, n_boot - lo)
            Sp, sq = np.zeros((b, P, d)), np.zeros((b, P))  # resampled sums and sum of w^2 per pattern
            for p, x in enumerate(Xs):
                w = resample_counts(rng, len(x), b)
                Sp[:, p] = w @ x
                sq[:, p] = (w.astype(np.float64) ** 2).sum(axis=1)
            Sb = np.einsum("bpd,pg->bgd", Sp, Q)
            same = np.einsum("bp,pg,ph->bgh", sq, Q, Q)
            boot_c[lo:lo + b], boot_p[lo:lo + b] = _cosines(Sb @ Sb.transpose(0, 2, 1), same, sizes)
    return boot_c, boot_p


def similarity(run: Run, by: str, population: str = "detections", settings: GroupSettings = GroupSettings()) -> pd.DataFrame:
    """``centroid_cosine`` and ``mean_pairwise_cosine`` for every ordered pair of groups.

    Exact and linear in the rows: with unit vectors the sum of cosines over the pairs
    of g x h is S_g . S_h minus one per row in both. Intervals: percentile bootstrap,
    resampling rows within their membership pattern (``n_boot`` rounds, ``seed``).
    """
    rows = population_rows(run.meta, population)
    labels, M = membership(run.meta.iloc[rows], by)
    X = run.normalised(rows)
    sizes = M.sum(axis=0)
    Q, Xs = _strata(M, X)
    S = Q.T @ np.array([x.sum(axis=0, dtype=np.float64) for x in Xs]).reshape(len(Xs), X.shape[1])  # [G, d]
    overlap = (M.T.astype(np.int64) @ M.astype(np.int64)).astype(np.float64)  # integer: no BLAS
    centroid, pairwise = _cosines(S @ S.T, overlap, sizes)
    boot_c, boot_p = _bootstrap_similarity(np.random.default_rng(settings.seed), settings.n_boot, Q, Xs, sizes)

    params = dict(grouping=by, population=population, n_boot=settings.n_boot, seed=settings.seed,
                  min_group_size=settings.min_group_size)
    frames = [
        _pairs_frame(labels, sizes, name, value, *percentile_interval(boot), settings.min_group_size, **params)
        for name, value, boot in (("centroid_cosine", centroid, boot_c), ("mean_pairwise_cosine", pairwise, boot_p))
    ]
    return pd.concat(frames, ignore_index=True)


def neighbour_composition(run: Run, by: str, population: str = "detections",
                          settings: GroupSettings = GroupSettings()) -> pd.DataFrame:
    """Share of the k nearest neighbours of group g's rows that fall in group h.

    Candidates are the population's rows (an IDSelector inside FAISS), never the query
    itself. ``neighbour_share`` is that share, ``neighbour_ratio`` the share over h's
    base rate n_h / N (> 1: over-retrieved). At most ``max_queries_per_group`` seeded
    queries per group; their neighbours are searched once and reused for every (g, h).
    Intervals: percentile bootstrap over g's queries.
    """
    rows = population_rows(run.meta, population)
    labels, M = membership(run.meta.iloc[rows], by)
    G, N = len(labels), len(rows)
    rng = np.random.default_rng(settings.seed)
    cap = settings.max_queries_per_group
    sampled = [m if len(m) <= cap else np.sort(rng.choice(m, cap, replace=False))
               for m in (np.flatnonzero(M[:, g]) for g in range(G))]
    queries = np.unique(np.concatenate(sampled)) if N else np.zeros(0, dtype=np.int64)
    allowed = np.zeros(run.n, dtype=bool)
    allowed[rows] = True
    _, I = run.neighbours(rows[queries], settings.k, where=allowed)
    valid = I >= 0
    pos = np.searchsorted(rows, np.where(valid, I, rows[0] if N else 0))
    hits = (M[pos] & valid[..., None]).sum(axis=1)  # [nq, G]: neighbours of q in h
    with np.errstate(invalid="ignore", divide="ignore"):
        share_q = hits / valid.sum(axis=1, keepdims=True)
        base = M.sum(axis=0) / N if N else np.full(G, np.nan)

    share = np.full((G, G), np.nan)
    lo, hi = np.full((G, G), np.nan), np.full((G, G), np.nan)
    n_queries = np.array([len(s) for s in sampled])
    for g, s in enumerate(sampled):
        if len(s) == 0:
            continue
        q = share_q[np.searchsorted(queries, s)]  # NaN only in a population of one row
        share[g] = q.mean(axis=0)
        W = resample_counts(rng, len(s), settings.n_boot)
        with _one_blas_thread():
            lo[g], hi[g] = percentile_interval((W @ q) / len(s))
    sizes = M.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio, rlo, rhi = share / base, lo / base, hi / base
    params = dict(grouping=by, population=population, k=settings.k, n_boot=settings.n_boot, seed=settings.seed,
                  min_group_size=settings.min_group_size, max_queries_per_group=cap,
                  n_queries=np.repeat(n_queries, G).reshape(G, G), base_rate=np.tile(base, (G, 1)), share=share)
    return pd.concat([
        _pairs_frame(labels, sizes, "neighbour_share", share, lo, hi, settings.min_group_size, **params),
        _pairs_frame(labels, sizes, "neighbour_ratio", ratio, rlo, rhi, settings.min_group_size, **params),
    ], ignore_index=True)


def detection_recall(run: Run, by: str, settings: GroupSettings = GroupSettings()) -> pd.DataFrame:
    """Detected / annotated persons of evaluated images per group (Wilson 95%), and
    ``recall_gap``: best minus worst non-empty group (Newcombe hybrid score 95%)."""
    persons = run.persons[_bool(run.persons, "evaluated")]
    labels, M = membership(persons, by)
    detected = _bool(persons, "detected")
    n = M.sum(axis=0)
    x = (M & detected[:, None]).sum(axis=0)
    p, lo, hi = wilson(x, n)
    small = n < settings.min_group_size
    params = dict(grouping=by, population="persons", min_group_size=settings.min_group_size)
    out = pd.DataFrame({
        "group_a": labels, "group_b": "", "metric": "recall", "value": p, "ci_low": lo, "ci_high": hi,
        "n_a": n.astype(np.int64), "n_b": 0, "small_group": small, **params,
        "detected_a": x.astype(np.int64), "detected_b": 0,
    })
    filled = np.flatnonzero(n > 0)
    gap = dict.fromkeys(("value", "ci_low", "ci_high"), np.nan)
    a = b = None
    if len(filled) >= 2:
        a = filled[np.argmax(p[filled])]
        rest = filled[filled != a]
        # On ties (all recalls equal) the worst is still another group, so the gap of 0
        # compares two groups rather than one with itself.
        b = rest[np.argmin(p[rest])]
        gap = dict(zip(("value", "ci_low", "ci_high"), newcombe_difference(x[a], n[a], x[b], n[b])))
    row = {
        "group_a": labels[a] if a is not None else "", "group_b": labels[b] if b is not None else "",
        "metric": "recall_gap", **gap, "n_a": int(n[a]) if a is not None else 0,
        "n_b": int(n[b]) if b is not None else 0,
        "small_group": bool(a is not None and (small[a] or small[b])), **params,
        "detected_a": int(x[a]) if a is not None else 0, "detected_b": int(x[b]) if b is not None else 0,
    }
    return pd.concat([out, pd.DataFrame([row])], ignore_index=True)


def compare(run: Run, by: str, metric: str, population: str | None = None,
            settings: GroupSettings = GroupSettings()) -> pd.DataFrame:
    """Dispatch on ``metric``; ``population`` defaults to detections (recall: persons)."""
    if metric == "similarity":
        return similarity(run, by, population or "detections", settings)
    if metric == "neighbours":
        return neighbour_composition(run, by, population or "detections", settings)
    if metric == "recall":
        if population not in (None, "persons"):
            raise ValueError(f"recall counts annotated persons of evaluated images: population must be 'persons', not {population!r}")
        return detection_recall(run, by, settings)
    if metric == "probe":  # the run's own space; index.probe.probe covers several at once
        from index.probe import ProbeSettings, probe
        ps = ProbeSettings(n_boot=settings.n_boot, seed=settings.seed, min_group_size=settings.min_group_size)
        return probe(run.run_dir, by, [run.space], population or "persons", ps, meta=run.meta, images=run.images,
                     arrays={run.space: run.xb})
    raise ValueError(f"unknown metric {metric!r}: choose one of {', '.join(METRICS)}")
