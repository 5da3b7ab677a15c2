"""Per-person metrics averaged per group, and the disparities between groups.

``mean_readout`` turns per-person values (detected 0/1 for the threshold ``recall``;
``ar``, ``recall50``, ``recall75`` of the detection audit) into a tidy frame with, all
from one image-cluster bootstrap (``index.bootstrap``, same rounds for every row):

- ``<metric>`` per group: the mean, BCa interval, ``design_effect``, ``n_images_a``, and
  a row for ``all`` persons (the reference; in no pair, not in the choice);
- ``<metric>_difference`` and ``<metric>_ratio`` for every pair of groups (a before b
  in label order): interval and p-value (BCa-inverted, against 0 and 1), and for the
  difference ``p_holm``, Holm-adjusted over the family of pairs of eligible groups
  (``in_family``; ``family_size`` pairs);
- ``<metric>_gap``: best minus worst eligible group, both re-chosen inside every round
  so the interval accounts for the choice; group_a / group_b name the groups chosen
  on the data, ``family_size`` says how many groups were in the choice.

Eligible: not ``unknown`` (``include_unknown``) and at least ``min_group_size`` persons
(``include_small``; never fewer than 2). Small groups keep their rows, flagged
``small_group``; empty groups keep theirs with n = 0 and NaN.
"""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from index.bootstrap import BootSettings, estimate, group_means, holm
from index.groupings import ALL, Groups

_NAN = np.nan


def eligible(groups: Groups, n: np.ndarray, min_group_size: int, include_unknown: bool = False,
             include_small: bool = False) -> np.ndarray:
    """bool [G]: groups that may be chosen for the gap and enter the Holm family."""
    ok = np.asarray(n) >= (2 if include_small else max(2, min_group_size))
    return ok if include_unknown else ok & ~groups.unknown


def mean_readout(groups: Groups, values: np.ndarray, image_ids: np.ndarray, metric: str,
                 boot: BootSettings, min_group_size: int, include_unknown: bool = False,
                 include_small: bool = False, counts: bool = False,
                 params: dict[str, object] | None = None) -> pd.DataFrame:
    """Tidy frame of a per-person metric (values [N], finite) by ``groups`` (see module).

    counts: add ``detected_a`` / ``detected_b`` (sums of 0/1 values per group).
    params: constant columns (grouping parameters) appended to every row.
    """
    G = len(groups.labels)
    # One more column, every person: the ``all`` row, resampled in the same rounds.
    res = group_means(values, np.column_stack([groups.M, np.ones(len(groups.M), dtype=bool)]), image_ids, boot)
    labels = np.asarray(groups.labels, dtype=object)
    value, n = res.value[:G, 0], res.n[:G]
    small = n < min_group_size
    ok = eligible(groups, n, min_group_size, include_unknown, include_small)
    rows: dict[str, list] = {k: [] for k in (
        "group_a", "group_b", "metric", "value", "ci_low", "ci_high", "n_a", "n_b", "p_value", "p_holm",
        "n_images_a", "n_images_b", "design_effect", "small_group", "in_family", "family_size")}

    def add(**kw: object) -> None:
        for k, v in kw.items():
            rows[k].extend(np.atleast_1d(v).tolist() if not isinstance(v, list) else v)

    add(group_a=list(labels), group_b=[""] * G, metric=[metric] * G, value=value, ci_low=res.ci_low[:G, 0],
        ci_high=res.ci_high[:G, 0], p_value=[_NAN] * G, p_holm=[_NAN] * G, n_a=n, n_b=[0] * G,
        n_images_a=res.n_images[:G], n_images_b=[0] * G, design_effect=res.design_effect[:G, 0], small_group=small,
        in_family=ok, family_size=[int(ok.sum())] * G)
    add(group_a=[ALL], group_b=[""], metric=[metric], value=res.value[G, 0], ci_low=res.ci_low[G, 0],
        ci_high=res.ci_high[G, 0], p_value=[_NAN], p_holm=[_NAN], n_a=res.n[G], n_b=[0], n_images_a=res.n_images[G],
        n_images_b=[0], design_effect=res.design_effect[G, 0], small_group=[bool(res.n[G] < min_group_size)],
        in_family=[False], family_size=[int(ok.sum())])

    a, b = np.triu_indices(G, k=1)
    P = len(a)
    fam = ok[a] & ok[b]
    with np.errstate(invalid="ignore", divide="ignore"):
        diff = estimate(value[a] - value[b], res.boot[:, a, 0] - res.boot[:, b, 0],
                        res.jack[:, a, 0] - res.jack[:, b, 0], boot.level)
        # A ratio over a zero is undefined on the data (NaN) but an ordered +inf in a round.
        ratio = estimate(np.where(value[b] != 0, value[a] / value[b], np.nan), res.boot[:, a, 0] / res.boot[:, b, 0],
                         res.jack[:, a, 0] / res.jack[:, b, 0], boot.level, null=1.0)
    p_holm = np.full(P, np.nan)
    p_holm[fam] = holm(diff.p_value[fam])
    pair = dict(group_a=list(labels[a]), group_b=list(labels[b]), n_a=n[a], n_b=n[b], n_images_a=res.n_images[a],
                n_images_b=res.n_images[b], design_effect=[_NAN] * P, small_group=small[a] | small[b],
                in_family=fam, family_size=[int(fam.sum())] * P)
    add(metric=[f"{metric}_difference"] * P, value=diff.value, ci_low=diff.ci_low, ci_high=diff.ci_high,
        p_value=diff.p_value, p_holm=p_holm, **pair)
    add(metric=[f"{metric}_ratio"] * P, value=ratio.value, ci_low=ratio.ci_low, ci_high=ratio.ci_high,
        p_value=ratio.p_value, p_holm=[_NAN] * P, **pair)

    best, worst, gap = _gap(value, res.boot[:, :G, 0], res.jack[:, :G, 0], ok, boot.level)
    chosen = best is not None
    add(group_a=[labels[best] if chosen else ""], group_b=[labels[worst] if chosen else ""],
        metric=[f"{metric}_gap"], value=gap[0], ci_low=gap[1], ci_high=gap[2], p_value=[_NAN], p_holm=[_NAN],
        n_a=[int(n[best]) if chosen else 0], n_b=[int(n[worst]) if chosen else 0],
        n_images_a=[int(res.n_images[best]) if chosen else 0], n_images_b=[int(res.n_images[worst]) if chosen else 0],
        design_effect=[_NAN], small_group=[bool(chosen and (small[best] or small[worst]))], in_family=[chosen],
        family_size=[int(ok.sum())])
    out = pd.DataFrame(rows)
    out["n_a"], out["n_b"] = out["n_a"].astype(np.int64), out["n_b"].astype(np.int64)
    if counts:
        x = np.round(np.nan_to_num(res.value[:, 0]) * res.n).astype(np.int64)
        idx = {lab: i for i, lab in enumerate([*groups.labels, ALL])}
        out["detected_a"] = [int(x[idx[g]]) if g in idx else 0 for g in out["group_a"]]
        out["detected_b"] = [int(x[idx[g]]) if g in idx else 0 for g in out["group_b"]]
    out.insert(list(out.columns).index("small_group") + 1, "rule", groups.rule)
    for name, col in (params or {}).items():
        out[name] = col
    return out


def _gap(value: np.ndarray, boot: np.ndarray, jack: np.ndarray, ok: np.ndarray,
         level: float) -> tuple[int | None, int | None, tuple[float, float, float]]:
    """(best, worst, (gap, ci_low, ci_high)): max minus min over eligible groups, re-chosen
    in every round and every jackknife replicate (rounds with < 2 finite groups: NaN)."""
    E = np.flatnonzero(ok & np.isfinite(value))
    if len(E) < 2:
        return None, None, (_NAN, _NAN, _NAN)
    best = E[np.argmax(value[E])]
    rest = E[E != best]
    worst = rest[np.argmin(value[rest])]  # on ties still another group than best

    def spread(x: np.ndarray) -> np.ndarray:
        x = x[:, E]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.where(np.isfinite(x).sum(axis=1) >= 2, np.nanmax(x, axis=1) - np.nanmin(x, axis=1), np.nan)

    est = estimate(np.array(value[best] - value[worst]), spread(boot), spread(jack), level)
    return int(best), int(worst), (float(est.value), float(est.ci_low), float(est.ci_high))
