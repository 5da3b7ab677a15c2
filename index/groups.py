"""Group read-outs over a run: similarity matrices, neighbour composition, recall, COCO AR.

Groups come from ``index.groupings`` (one grouping or an intersection, exclusive or
overlapping, as an [N, G] membership matrix), restricted to a population and an
optional ``where`` over the rows. Every interval comes from one image-cluster
bootstrap (``index.bootstrap``: images resampled with replacement, rows come with
their photo, BCa intervals that contain their estimate). Every read-out returns a
tidy long frame: ``group_a, group_b, metric, value, ci_low, ci_high, n_a, n_b,
small_group, rule`` plus the parameters that produced it. ``small_group`` is True
when group_a or group_b has fewer than ``min_group_size`` rows. Empty groups stay in
the output with n = 0 and NaN values. In population ``all``, detections matching
nobody carry no attributes and so fall in ``unknown`` (``no`` for a
``lighting_<flag>`` grouping).
"""
from __future__ import annotations

import logging
import warnings
import weakref
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import pandas as pd

from index.audit import AUDIT_METRICS, PROTOCOLS, run_audit
from index.bootstrap import (BootSettings, bca_interval, image_index, image_weights, one_blas_thread, per_image_sums,
                             resample)
from index.disparity import mean_readout
from index.groupings import GROUPINGS, POPULATIONS, Groups, by_names, groups_of, population_mask, population_rows
from index.store import Run

log = logging.getLogger(__name__)

METRICS = ("similarity", "neighbours", "recall", *AUDIT_METRICS, "probe")
INTERVAL = "BCa 95%, photos resampled"  # the interval column of every read-out
__all__ = ["GROUPINGS", "METRICS", "POPULATIONS", "GroupSettings", "audit_recall", "compare", "detection_recall",
           "neighbour_composition", "population_rows", "similarity"]


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
    # Neighbours from the query's own photo share its context: left out by default.
    same_image_neighbours: bool = False
    # The gap's choice and the Holm family leave out unknown and small groups by default.
    include_unknown: bool = False
    include_small: bool = False

    def __post_init__(self) -> None:
        for name in ("k", "n_boot", "max_queries_per_group"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.min_group_size < 0:
            raise ValueError(f"min_group_size must be >= 0, got {self.min_group_size}")

    @property
    def boot(self) -> BootSettings:
        return BootSettings(n_boot=self.n_boot, seed=self.seed)


def _params(groups: Groups, population: str, where: str | None, settings: GroupSettings, **extra: object) -> dict:
    return dict(grouping=groups.name, population=population, where=where or "", n_boot=settings.n_boot,
                seed=settings.seed, min_group_size=settings.min_group_size, interval=INTERVAL, **extra)


def _pairs_frame(groups: Groups, sizes: np.ndarray, metric: str, value: np.ndarray,
                 lo: np.ndarray, hi: np.ndarray, min_size: int, **extra: object) -> pd.DataFrame:
    """Long frame with one row per ordered pair (g, h) of an [G, G] matrix."""
    G = len(groups.labels)
    a, b = np.repeat(np.arange(G), G), np.tile(np.arange(G), G)
    n = np.asarray(sizes, dtype=np.int64)
    labels = np.asarray(groups.labels, dtype=object)
    out = pd.DataFrame({
        "group_a": labels[a], "group_b": labels[b], "metric": metric, "value": np.ravel(value),
        "ci_low": np.ravel(lo), "ci_high": np.ravel(hi), "n_a": n[a], "n_b": n[b],
        "small_group": (n[a] < min_size) | (n[b] < min_size), "rule": groups.rule,
    })
    for name, col in extra.items():
        out[name] = np.ravel(col)[a * G + b] if isinstance(col, np.ndarray) and col.size == G * G else col
    return out


def _cosines(gram: np.ndarray, same: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, ...]:
    """(centroid, mean pairwise, bias-corrected) cosines [..., G, G] from Gram matrices
    of group sums gram[..., g, h] = S_g . S_h and group sizes [..., G].

    same[..., g, h] = the self-pairs inside g x h (|g n h|, or sum_i w_i^2 over rows in
    both when row i carries weight w_i); each contributes cos = 1 and is removed from
    the pairwise mean. bias-corrected = pairwise(g, h) / sqrt(pairwise(g, g) pairwise(h, h)).
    """
    norms = np.sqrt(np.einsum("...gg->...g", gram))
    with np.errstate(divide="ignore", invalid="ignore"):
        centroid = gram / (norms[..., :, None] * norms[..., None, :])
        pairs = sizes[..., :, None].astype(np.float64) * sizes[..., None, :] - same
        pairwise = np.where(pairs > 0.5, (gram - same) / np.where(pairs > 0.5, pairs, 1.0), np.nan)
        within = np.einsum("...gg->...g", pairwise)
        within = np.where(within > 0, within, np.nan)
        corrected = pairwise / np.sqrt(within[..., :, None] * within[..., None, :])
    return centroid, pairwise, corrected


def _patterns(M: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Membership patterns Q float64 [P, G] (the sets of groups rows are in) and each
    row's pattern [N]; rows packed to bytes first (np.unique over rows is ~50x slower)."""
    packed = np.packbits(M, axis=1)
    keys = np.ascontiguousarray(packed).view(np.dtype((np.void, max(packed.shape[1], 1)))).ravel()
    if M.shape[1] == 0:
        keys = np.zeros(len(M), dtype=np.int8)
    _, first, stratum = np.unique(keys, return_index=True, return_inverse=True)
    return M[first].astype(np.float64), stratum.ravel()


def _blocks(X) -> Iterator[tuple[int, np.ndarray]]:
    """(lo, rows lo..) of an array, or of index.vectors.UnitRows block by block."""
    return X.blocks() if hasattr(X, "blocks") else iter([(0, X)])


def similarity_statistic(M: np.ndarray, X: np.ndarray, inv: np.ndarray):
    """(statistic, value): statistic(W [b, n_images]) -> [b, 3, G, G] (centroid, pairwise,
    corrected cosines) of the rows weighted by their image's weight; value [3, G, G] the
    same for the data, exactly (float64).

    Rows are split once into membership patterns (the set of groups a row is in), then
    per pattern into per-image sums, so a round costs b x (pattern-image cells) x d:
    a row in two overlapping groups carries one weight for both, as in the data. The
    rounds multiply in float32 (half the time; their cosines move by ~1e-6, far below
    the bootstrap spread).
    """
    Q, stratum = _patterns(M)
    order = np.argsort(stratum, kind="stable")
    bounds = np.searchsorted(stratum[order], np.arange(len(Q) + 1))
    cells, sums = [], np.zeros((len(Q), X.shape[1]))
    for p in range(len(Q)):
        rows = order[bounds[p]:bounds[p + 1]]
        imgs, local = np.unique(inv[rows], return_inverse=True)
        local = local.ravel()
        # X may be Run.unit_rows (streamed from the file in blocks): sum block by block, each
        # block over the images it spans (rows come in image order, so a few), into float32
        # cells; the data's sums stay float64. A float64 [images, d] per block cost 2.5 GB at 5M rows.
        A = np.zeros((len(imgs), X.shape[1]), dtype=np.float32)
        for lo, x in _blocks(X[rows]):
            part = local[lo:lo + len(x)]
            first = int(part.min(initial=0))
            block = per_image_sums(x, part - first, int(part.max(initial=-1)) + 1 - first)
            sums[p] += block.sum(axis=0)
            A[first:first + len(block)] += block
        cells.append((imgs, A, np.bincount(local, minlength=len(imgs)).astype(np.float32)))
    S = Q.T @ sums
    with one_blas_thread():
        Mf = M.astype(np.float64)
        overlap = Mf.T @ Mf  # counts: exact in float64
    value = np.stack(_cosines(S @ S.T, overlap, M.sum(axis=0)))

    def statistic(W: np.ndarray) -> np.ndarray:
        b, P, d = len(W), len(cells), X.shape[1]
        Sp, sq, cnt = np.zeros((b, P, d)), np.zeros((b, P)), np.zeros((b, P))
        WT = np.ascontiguousarray(W.T, dtype=np.float32)  # gathering rows of [n_images, b] beats columns ~10x
        for p, (imgs, A, c) in enumerate(cells):
            w = WT[imgs]
            Sp[:, p], sq[:, p], cnt[:, p] = (A.T @ w).T, c @ (w * w), c @ w
        Sb = np.einsum("bpd,pg->bgd", Sp, Q)
        same = np.einsum("bp,pg,ph->bgh", sq, Q, Q)
        return np.stack(_cosines(Sb @ Sb.transpose(0, 2, 1), same, cnt @ Q), axis=1)
    return statistic, value


SIMILARITY_METRICS = ("centroid_cosine", "mean_pairwise_cosine", "corrected_cosine")


def similarity(run: Run, by: str | Sequence[str], population: str = "detections",
               settings: GroupSettings = GroupSettings(), where: str | None = None) -> pd.DataFrame:
    """``centroid_cosine`` (the FACET scripts' cosine of the group means),
    ``mean_pairwise_cosine`` (self-pairs excluded) and ``corrected_cosine`` (between-group
    mean pairwise cosine over the geometric mean of the two within-group ones) for every
    ordered pair of groups.

    Exact and linear in the rows: with unit vectors the sum of cosines over the pairs
    of g x h is S_g . S_h minus one per row in both. Intervals: image-cluster BCa
    (acceleration from a 50-block jackknife over images).
    """
    return similarity_readout(run, by, population, settings, where).frame_of(settings.boot)


@dataclass(frozen=True)
class Readout:
    """A pair read-out before its bootstrap rounds, so that several runs can be resampled
    with the same photos (index.crossruns): ``statistic(W [b, n_images]) -> [b, m, G, G]``
    over the images ``uniq``, its exact ``value`` [m, G, G] (None: the statistic at W = 1),
    and ``frame(value, boot, jack)`` -> the long frame, one block of rows per ``metrics``."""

    groups: Groups
    sizes: np.ndarray  # [G] rows per group
    uniq: np.ndarray
    statistic: Callable[[np.ndarray], np.ndarray]
    value: np.ndarray | None
    frame: Callable[[np.ndarray, np.ndarray, np.ndarray], pd.DataFrame]
    metrics: tuple[str, ...]

    def frame_of(self, boot: BootSettings) -> pd.DataFrame:
        return self.frame(*resample(self.statistic, self.uniq, boot, value=self.value))


def similarity_readout(run: Run, by: str | Sequence[str], population: str = "detections",
                       settings: GroupSettings = GroupSettings(), where: str | None = None) -> Readout:
    """``similarity`` before its rounds (``Readout``)."""
    rows = population_rows(run.meta, population, where)
    groups = groups_of(run.meta, by, rows)
    sizes = groups.M.sum(axis=0)
    uniq, inv = image_index(run.meta["image_id"].to_numpy()[rows])
    stat, value = similarity_statistic(groups.M, run.unit_rows(rows), inv)

    def frame(value: np.ndarray, boot: np.ndarray, jack: np.ndarray) -> pd.DataFrame:
        lo, hi = bca_interval(value, boot, jack)
        deff = _similarity_design_effect(groups.M, run.unit_rows(rows), boot, settings)
        params = _params(groups, population, where, settings)
        return pd.concat([_pairs_frame(groups, sizes, name, value[i], lo[i], hi[i], settings.min_group_size,
                                       **params, design_effect=deff[i])
                          for i, name in enumerate(SIMILARITY_METRICS)], ignore_index=True)
    return Readout(groups, sizes, uniq, stat, value, frame, SIMILARITY_METRICS)


# A variance ratio needs fewer rounds than an interval; rows beyond the cap would make the
# independent-rows statistic hold every row's vector in memory (its "images" are rows).
DEFF_ROUNDS = 100
DEFF_MAX_ROWS = 200_000


def _similarity_design_effect(M: np.ndarray, X, boot: np.ndarray, settings: GroupSettings) -> np.ndarray:
    """[3, G, G] bootstrap variance with photos resampled over the variance with rows
    resampled as if independent (each row its own photo); NaN above ``DEFF_MAX_ROWS``."""
    n = len(M)
    if n > DEFF_MAX_ROWS or n < 2:
        return np.full(boot.shape[1:], np.nan)
    ids = np.arange(n)
    stat_rows, _ = similarity_statistic(M, X, ids)
    rows_boot = BootSettings(n_boot=min(settings.n_boot, DEFF_ROUNDS), seed=settings.seed)
    with one_blas_thread():
        independent = np.concatenate([stat_rows(W) for W in image_weights(ids, rows_boot)])
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # empty groups: all-NaN rounds
        deff = np.nanvar(boot, axis=0, ddof=1) / np.nanvar(independent, axis=0, ddof=1)
    return np.where(np.isfinite(deff), deff, np.nan)


def neighbour_composition(run: Run, by: str | Sequence[str], population: str = "detections",
                          settings: GroupSettings = GroupSettings(), where: str | None = None) -> pd.DataFrame:
    """Share of the k nearest neighbours of group g's rows that fall in group h
    (``neighbour_readout``), with image-cluster BCa intervals."""
    return neighbour_readout(run, by, population, settings, where).frame_of(settings.boot)


NEIGHBOUR_METRICS = ("neighbour_share", "neighbour_ratio")


def neighbour_readout(run: Run, by: str | Sequence[str], population: str = "detections",
                      settings: GroupSettings = GroupSettings(), where: str | None = None) -> Readout:
    """Share of the k nearest neighbours of group g's rows that fall in group h.

    Candidates are the population's rows (an IDSelector inside FAISS), never the query
    itself, and not the query's own photo unless ``same_image_neighbours``.
    ``neighbour_share`` is that share, ``neighbour_ratio`` the share over h's base rate
    n_h / N (> 1: over-retrieved). At most ``max_queries_per_group`` seeded queries per
    group; their neighbours are searched once and reused for every (g, h). Intervals:
    image-cluster BCa over the population's images (queries come with their photo; the
    base rate is recomputed in every round).
    """
    rows = population_rows(run.meta, population, where)
    groups = groups_of(run.meta, by, rows)
    M, G, N = groups.M, len(groups.labels), len(rows)
    rng = np.random.default_rng(settings.seed)
    cap = settings.max_queries_per_group
    sampled = [m if len(m) <= cap else np.sort(rng.choice(m, cap, replace=False))
               for m in (np.flatnonzero(M[:, g]) for g in range(G))]
    queries = np.unique(np.concatenate(sampled)) if N else np.zeros(0, dtype=np.int64)
    allowed = np.zeros(run.n, dtype=bool)
    allowed[rows] = True
    _, I = run.neighbours(rows[queries], settings.k, where=allowed, exclude_same_image=not settings.same_image_neighbours)
    valid = I >= 0
    pos = np.searchsorted(rows, np.where(valid, I, rows[0] if N else 0))
    hits = (M[pos] & valid[..., None]).sum(axis=1)  # [nq, G]: neighbours of q in h
    n_valid = valid.sum(axis=1)
    share_q = hits / np.maximum(n_valid, 1)[:, None]
    Mq = np.zeros((len(queries), G), dtype=bool)
    for g, s in enumerate(sampled):
        Mq[np.searchsorted(queries, s), g] = True
    Mq &= (n_valid > 0)[:, None]  # a query without any candidate says nothing

    uniq, inv = image_index(run.meta["image_id"].to_numpy()[rows])
    qimg = inv[queries]
    C = per_image_sums(M, inv, len(uniq))  # [n_images, G] rows of each group
    n_img = np.bincount(inv, minlength=len(uniq)).astype(np.float64)
    Mf = Mq.astype(np.float64)

    def statistic(W: np.ndarray) -> np.ndarray:
        Wq = W[:, qimg]
        with np.errstate(invalid="ignore", divide="ignore"):
            share = np.einsum("bq,qg,qh->bgh", Wq, Mf, share_q) / (Wq @ Mf)[:, :, None]
            base = (W @ C) / (W @ n_img)[:, None]
            return np.stack([share, share / base[:, None, :]], axis=1)

    nq = Mq.sum(axis=0)
    sizes = M.sum(axis=0)

    def frame(value: np.ndarray, boot: np.ndarray, jack: np.ndarray) -> pd.DataFrame:
        lo, hi = bca_interval(value, boot, jack)
        with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            base = M.sum(axis=0) / N if N else np.full(G, np.nan)
            # Independent queries: s^2 / n_q of the per-query shares of each (g, h).
            s2 = (Mf.T @ share_q ** 2) / nq[:, None] - value[0] ** 2
            deff = np.nanvar(boot[:, 0], axis=0, ddof=1) / (np.maximum(s2, 0) / nq[:, None])
        deff = np.where(np.isfinite(deff), deff, np.nan)
        params = _params(groups, population, where, settings, k=settings.k, max_queries_per_group=cap,
                         same_image_neighbours=settings.same_image_neighbours,
                         n_queries=np.repeat(nq, G).reshape(G, G), base_rate=np.tile(base, (G, 1)),
                         share=value[0], design_effect=deff)
        return pd.concat([
            _pairs_frame(groups, sizes, name, value[i], lo[i], hi[i], settings.min_group_size, **params)
            for i, name in enumerate(NEIGHBOUR_METRICS)], ignore_index=True)
    return Readout(groups, sizes, uniq, statistic, None, frame, NEIGHBOUR_METRICS)


def person_readout(persons: pd.DataFrame, values: np.ndarray, metric: str, by: str | Sequence[str],
                   settings: GroupSettings, where: str | None = None, counts: bool = False,
                   **extra: object) -> pd.DataFrame:
    """A per-person metric (values [len(persons)], finite) by group with every pairwise
    disparity and the gap (``index.disparity.mean_readout``); ``where`` restricts the
    persons. The detection audit's ``ar`` / ``recall50`` / ``recall75`` go through here
    as the threshold recall does. extra: constant columns (e.g. the protocol)."""
    mask = population_mask(persons, "all", where) if where else np.ones(len(persons), dtype=bool)
    persons, values = persons[mask], np.asarray(values, dtype=np.float64)[mask]
    groups = groups_of(persons, by)
    return mean_readout(groups, values, persons["image_id"].to_numpy(), metric, settings.boot,
                        settings.min_group_size, settings.include_unknown, settings.include_small, counts=counts,
                        params=_params(groups, "persons", where, settings, include_unknown=settings.include_unknown,
                                       include_small=settings.include_small, **extra))


def detection_recall(run: Run, by: str | Sequence[str], settings: GroupSettings = GroupSettings(),
                     where: str | None = None) -> pd.DataFrame:
    """Threshold recall (a kept detection matched at IoU 0.5) of annotated persons of
    evaluated images per group, every pairwise difference and ratio with Holm-adjusted
    p-values, and ``recall_gap`` (``index.disparity``); image-cluster BCa intervals."""
    persons = run.persons[run.persons["evaluated"].to_numpy(dtype=bool, na_value=False)]
    detected = persons["detected"].to_numpy(dtype=bool, na_value=False).astype(np.float64)
    return person_readout(persons, detected, "recall", by, settings, where, counts=True,
                          protocol=PROTOCOLS["recall"])


_AUDITS: "weakref.WeakKeyDictionary[Run, pd.DataFrame]" = weakref.WeakKeyDictionary()


def person_audit_of(run: Run) -> pd.DataFrame:
    """The run's per-person COCO audit (index.audit.run_audit), computed once per opened run."""
    audit = _AUDITS.get(run)
    if audit is None:
        audit = _AUDITS[run] = run_audit(run.run_dir, run.persons)
    return audit


def audit_recall(run: Run, by: str | Sequence[str], metric: str = "ar", settings: GroupSettings = GroupSettings(),
                 where: str | None = None) -> pd.DataFrame:
    """COCO AR@100, recall@0.5 or recall@0.75 per group (and ``all``), with every pairwise
    disparity and the gap, on the image-cluster bootstrap like the threshold recall.

    A group's value is the mean of the per-person value over its persons; persons outside
    the group (or outside ``where``) stay ground truth of their photo.
    """
    if metric not in AUDIT_METRICS:
        raise ValueError(f"unknown audit metric {metric!r}: choose one of {', '.join(AUDIT_METRICS)}")
    audit = person_audit_of(run)
    if (run.manifest.get("filters") or {}).get("where"):
        # persons.parquet then holds only the selected persons: the others are missing from the ground truth
        log.warning("%s was extracted with --where %r: persons outside the filter are not ground truth, so AR "
                    "can be too high; extract without --where for the COCO protocol", run.run_dir,
                    run.manifest["filters"]["where"])
    persons = run.persons.set_index("person_id").loc[audit["person_id"].to_numpy()].reset_index()
    return person_readout(persons, audit[metric].to_numpy(), metric, by, settings, where,
                          protocol=PROTOCOLS[metric])


def compare(run: Run, by: str | Sequence[str], metric: str, population: str | None = None,
            settings: GroupSettings = GroupSettings(), where: str | None = None) -> pd.DataFrame:
    """Dispatch on ``metric``; ``population`` defaults to detections (recall: persons).
    ``by``: a grouping or a list of them (their intersection); ``where``: a condition
    on the rows (``index.where.evaluate_where``) restricting the population."""
    by_names(by)
    if metric == "similarity":
        return similarity(run, by, population or "detections", settings, where)
    if metric == "neighbours":
        return neighbour_composition(run, by, population or "detections", settings, where)
    if metric == "recall":
        if population not in (None, "persons"):
            raise ValueError(f"recall counts annotated persons of evaluated images: population must be 'persons', not {population!r}")
        return detection_recall(run, by, settings, where)
    if metric in AUDIT_METRICS:
        if population not in (None, "persons"):
            raise ValueError(f"{metric} counts annotated persons of evaluated images: population must be 'persons', "
                             f"not {population!r}")
        return audit_recall(run, by, metric, settings, where)
    if metric == "probe":  # the run's own space; index.probe.probe covers several at once
        from index.probe import ProbeSettings, probe
        ps = ProbeSettings(n_boot=settings.n_boot, seed=settings.seed, min_group_size=settings.min_group_size)
        return probe(run.run_dir, by, [run.space], population or "persons", ps, meta=run.meta, images=run.images,
                     arrays={run.space: run.xb})
    raise ValueError(f"unknown metric {metric!r}: choose one of {', '.join(METRICS)}")
