"""Scores of the attribute probe and their image-cluster BCa intervals.

The probe's out-of-fold class scores P [N, K] are fixed once by cross-validation (index.probe).
Balanced accuracy, macro one-vs-rest AUC and the class recalls are then functions of the
persons' (label, score) pairs in which every person carries a weight: 1 for the estimate, its
image's draw count in a bootstrap round (``index.bootstrap.image_weights``: persons come with
their photo), and 0 for the persons of the one image a jackknife value leaves out. The interval
is BCa (``index.bootstrap.bca_interval``), its acceleration from the exact delete-one-image
jackknife, computed here in closed form (one sort per class, no pass per image).

Conditional on the fitted folds: a round reweights the held-out predictions, it does not refit
the probes, so the interval is that of the fixed scoring rule's performance on the population of
photos (what resampling the evaluated photos can tell), not of the training's variability.

Metric columns of ``Resampled``: 0 balanced accuracy, 1 macro AUC, 2.. class recall per class.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from index.bootstrap import bca_interval

BAL, AUC, RECALL = 0, 1, 2  # column of the metric (RECALL: the first class's)
_BOOT_CHUNK = 16  # rounds per pass over the rows (at 43k rows the best of 8-100)
_CHUNK_CELLS = 2**18  # at most ~this many (round, row) cells per pass, beyond _BOOT_CHUNK rounds


def weighted_auc(score: np.ndarray, positive: np.ndarray, C: np.ndarray,
                 codes: np.ndarray | None = None) -> np.ndarray:
    """[B] ROC AUC (ties count 1/2) of ``score`` [N] for ``positive`` [N] under each row of
    weights: row weights ``C[:, codes]`` [B, N] (``codes`` None: C [B, N] is already per row).

    One sort: a positive beats the negatives sorted below it and ties half of those equal to
    it, so per round the numerator is the cumulative negative weight read at each positive's
    place in the sorted negatives."""
    score = np.asarray(score)
    pos = np.asarray(positive, dtype=bool)
    C = np.atleast_2d(np.asarray(C, dtype=np.float64))
    idx = np.arange(len(score)) if codes is None else np.asarray(codes)
    out = np.full(len(C), np.nan)
    if pos.all() or not pos.any():
        return out
    neg_order = np.argsort(score[~pos], kind="stable")
    neg_s, neg_idx = score[~pos][neg_order], idx[~pos][neg_order]
    pos_order = np.argsort(score[pos], kind="stable")  # reads of ``cum`` in memory order
    pos_s, pos_idx = score[pos][pos_order], idx[pos][pos_order]
    hi = np.searchsorted(neg_s, pos_s, "right")  # negatives <= each positive
    lo = np.searchsorted(neg_s, pos_s, "left")  # negatives < each positive
    tied = np.flatnonzero(hi > lo)
    # Draw counts and 0/1 jackknife weights are small integers: summed exactly in int32 (each
    # partial sum <= N * max weight < 2**31) from int16 copies, a quarter of float64's memory
    # traffic and ~2x faster; other weights take float64.
    integral = bool(np.all(C == np.rint(C))) and C.min() >= 0 and C.max() * len(score) < 2**31 - 1
    chunk = max(_BOOT_CHUNK, _CHUNK_CELLS // len(score))  # few rows: more rounds per pass
    for start in range(0, len(C), chunk):
        c = C[start:start + chunk]
        c = c.astype(np.int16) if integral and c.max() < 2**15 else c
        acc = np.int32 if c.dtype == np.int16 else np.float64
        cum = np.zeros((len(c), len(neg_idx) + 1), dtype=acc)
        np.cumsum(c[:, neg_idx], axis=1, out=cum[:, 1:], dtype=acc)
        wp = c[:, pos_idx].astype(np.int64 if acc is np.int32 else np.float64)
        num = (wp * cum[:, hi]).sum(axis=1)
        if len(tied):
            num = num - 0.5 * (wp[:, tied] * (cum[:, hi[tied]] - cum[:, lo[tied]])).sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[start:start + chunk] = num / (wp.sum(axis=1) * cum[:, -1].astype(np.float64))
    return out


def auc_jackknife(score: np.ndarray, positive: np.ndarray, codes: np.ndarray,
                  n_images: int) -> tuple[float, np.ndarray]:
    """(AUC of all rows, [n_images] AUC with image a's rows left out), all weights 1.

    The pair count without image a is the total minus the pairs a positive of a makes with any
    negative, minus those a negative of a makes with any positive, plus the pairs inside a
    (subtracted twice); the within-image pairs come from one sort by (image, score)."""
    score = np.asarray(score)
    pos = np.asarray(positive, dtype=bool)
    codes = np.asarray(codes)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if not n_pos or not n_neg:
        return np.nan, np.full(n_images, np.nan)
    neg_s, pos_s = np.sort(score[~pos]), np.sort(score[pos])

    def beaten(sorted_other: np.ndarray, s: np.ndarray) -> np.ndarray:  # below + half the ties
        lo, hi = np.searchsorted(sorted_other, s, "left"), np.searchsorted(sorted_other, s, "right")
        return lo + 0.5 * (hi - lo)

    R = beaten(neg_s, score[pos])  # per positive: negatives it beats
    S = n_pos - beaten(pos_s, score[~pos])  # per negative: positives that beat it
    # within an image: integer keys (image, dense score rank) sorted once
    _, rank = np.unique(score, return_inverse=True)
    n_ranks = int(rank.max()) + 1
    key = codes.astype(np.int64) * n_ranks + rank.ravel()
    neg_keys = np.sort(key[~pos])
    Q = beaten(neg_keys, key[pos]) - np.searchsorted(neg_keys, codes[pos].astype(np.int64) * n_ranks, "left")
    per = lambda mask, w=None: np.bincount(codes[mask], weights=w, minlength=n_images)  # noqa: E731
    num = R.sum()
    left_num = num - per(pos, R) - per(~pos, S) + per(pos, Q)
    with np.errstate(invalid="ignore", divide="ignore"):
        jack = left_num / ((n_pos - per(pos)) * (n_neg - per(~pos)))
    return num / (n_pos * n_neg), np.where(np.isfinite(jack), jack, np.nan)


def _balanced(correct: np.ndarray, total: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(balanced accuracy [R], recall [R, K]) from weighted correct / total counts [R, K]; a
    class without weight (absent from a resample) is left out of the mean."""
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = correct / total
    present = np.isfinite(recall)
    bal = np.where(present.any(axis=1), np.nansum(recall, axis=1) / present.sum(axis=1).clip(min=1), np.nan)
    return bal, np.where(present, recall, np.nan)


def _macro(aucs: list[np.ndarray]) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a class absent from a resample
        return np.nanmean(np.column_stack(aucs), axis=1)


def _per_image(P: np.ndarray, y: np.ndarray, codes: np.ndarray, n_images: int) -> tuple[np.ndarray, np.ndarray]:
    """(correct, total) [n_images, K]: per image and class, persons predicted right / persons."""
    K = P.shape[1]
    count = lambda w: np.bincount(codes * K + y, weights=w, minlength=n_images * K).reshape(n_images, K)  # noqa: E731
    return count((P.argmax(axis=1) == y).astype(np.float64)), count(np.ones(len(y)))


def weighted_scores(P: np.ndarray, y: np.ndarray, codes: np.ndarray, C: np.ndarray) -> np.ndarray:
    """[B, 2 + K] metric columns (module doc) of scores P [N, K] for labels y [N] (0..K-1), image
    codes [N] (0..n_images-1) and per-image weights C [B, n_images] (a row of ones: the estimate)."""
    correct, total = _per_image(P, y, codes, C.shape[1])
    bal, recall = _balanced(C @ correct, C @ total)
    auc = _macro([weighted_auc(P[:, k], y == k, C, codes) for k in range(P.shape[1])])
    return np.column_stack([bal, auc, recall])


def jackknife_scores(P: np.ndarray, y: np.ndarray, codes: np.ndarray, n_images: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(value [2 + K], delete-one-image values [n_images, 2 + K]) of ``weighted_scores``'s
    columns, exactly (a row equals ``weighted_scores`` with that image's weight 0)."""
    correct, total = _per_image(P, y, codes, n_images)
    bal, recall = _balanced(correct.sum(axis=0)[None], total.sum(axis=0)[None])
    j_bal, j_recall = _balanced(correct.sum(axis=0) - correct, total.sum(axis=0) - total)
    aucs = [auc_jackknife(P[:, k], y == k, codes, n_images) for k in range(P.shape[1])]
    value = np.concatenate([bal, _macro([np.atleast_1d(a) for a, _ in aucs]), recall[0]])
    return value, np.column_stack([j_bal, _macro([j for _, j in aucs]), j_recall])


@dataclass(frozen=True)
class Resampled:
    """A space's metric columns: value [m], boot [n_boot, m], jack [n_images, m]."""

    value: np.ndarray
    boot: np.ndarray
    jack: np.ndarray

    def interval(self, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
        """BCa (ci_low, ci_high) [m]; each contains its estimate."""
        return bca_interval(self.value, self.boot, self.jack, level)

    def minus(self, other: "Resampled", column: int = BAL) -> "Resampled":
        """One column of self minus other's, paired (the same rounds and left-out images)."""
        return Resampled(self.value[[column]] - other.value[[column]], self.boot[:, [column]] - other.boot[:, [column]],
                         self.jack[:, [column]] - other.jack[:, [column]])


def resampled_scores(P: np.ndarray, y: np.ndarray, codes: np.ndarray, draws: np.ndarray) -> Resampled:
    """``Resampled`` metric columns of scores P [N, K], labels y [N], image codes [N] under
    image draws [n_boot, n_images] (column j = code j)."""
    value, jack = jackknife_scores(P, y, codes, draws.shape[1])
    return Resampled(value, weighted_scores(P, y, codes, draws), jack)
