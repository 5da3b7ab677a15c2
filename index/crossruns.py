"""Paired comparisons across runs of one dataset: checkpoints, thresholds, sizes, perturbations.

``compare_runs([RUN_A, RUN_B, ...], metric, by)`` stacks every run's per-person values
as the columns of one [N, R] matrix and averages them per group in ONE
``index.bootstrap.group_means`` call: the same images are drawn in every round for all
runs, so the paired differences and differences-in-differences below are resampled
jointly (the shared images cancel most of the noise, as in a paired test).

Rows (long form, ``index.to_csv_bytes``), each with the ``run`` it belongs to:

- ``<metric>``: per run and group (and ``all``), the mean with its BCa interval; with no
  person dropped these are the numbers of single-run ``python -m index compare``;
- ``<metric>_diff``: per later run and group, that run minus the first run;
- ``<metric>_did``: per later run and pair of groups (a before b in label order),
  group_a's ``_diff`` minus group_b's: "run B costs group a this much more than b".

``_diff`` and ``_did`` rows carry a bootstrap p-value (BCa-inverted, against 0) and
``p_holm``, Holm-adjusted over the eligible rows of that kind in the whole table
(``in_family``, ``family_size``); eligible groups as in the single-run read-outs
(``index.disparity.eligible``). The population is the persons evaluated in EVERY run
(``persons_dropped`` says how many evaluated somewhere were left out).

A metric is a function run directory -> per-person values (``METRIC_FUNCS``): the
threshold ``recall`` (persons.detected) here; the COCO metrics of the detection audit
register themselves when ``index.audit`` is present.

``compare_runs_space(runs, "similarity" | "neighbours", by, space)`` does the same for the
embedding read-outs in one feature space: per run exactly the rows of single-run
``index.compare`` (its own population, its own bootstrap), and ``<statistic>_diff`` per
later run and ordered pair of groups, that run's statistic minus the first run's, from
rounds that draw the same photos for every run (over the union of the runs' photos) with
Holm-adjusted p-values per statistic.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from extractor.rundir import open_run, read_manifest
from index.bootstrap import BootSettings, estimate, group_means, holm, resample
from index.disparity import eligible
from index.groupings import ALL, groups_of, population_mask
from index.groups import GroupSettings, Readout, neighbour_readout, similarity_readout
from index.spaces import check_space, how_to_add, run_spaces
from index.store import Run, load_run

log = logging.getLogger(__name__)

INTERVAL = "BCa 95%, photos resampled, the same photos for every run"
# A metric: run directory -> float per person, indexed by person_id (NaN: not evaluated there).
MetricFunc = Callable[[Path], pd.Series]


def _recall(run_dir: Path) -> pd.Series:
    """Threshold recall: a kept detection matched at IoU 0.5 (persons.detected), 0/1."""
    p = open_run(run_dir).persons()
    ok = p["evaluated"].to_numpy(dtype=bool, na_value=False)
    v = np.where(ok, p["detected"].to_numpy(dtype=bool, na_value=False).astype(np.float64), np.nan)
    return pd.Series(v, index=p["person_id"].to_numpy(), name="recall")


def _audit_metrics() -> dict[str, MetricFunc]:
    """The per-person COCO metrics of ``index.audit`` (absent from builds without it)."""
    try:
        from index.audit import run_audit  # type: ignore[attr-defined]
    except ImportError:
        return {}

    def metric(column: str) -> MetricFunc:
        def f(run_dir: Path) -> pd.Series:
            a = run_audit(run_dir)
            return pd.Series(a[column].to_numpy(dtype=np.float64), index=a["person_id"].to_numpy(), name=column)
        return f
    return {c: metric(c) for c in ("ar", "recall50", "recall75")}


METRIC_FUNCS: dict[str, MetricFunc] = {**_audit_metrics(), "recall": _recall}
CROSS_METRICS = tuple(METRIC_FUNCS)


@dataclass(frozen=True)
class CrossSettings:
    """Bootstrap and eligibility parameters of ``compare_runs``; each is a column of the output."""

    n_boot: int = 1000
    seed: int = 0
    min_group_size: int = 30
    include_unknown: bool = False
    include_small: bool = False

    def __post_init__(self) -> None:
        if self.n_boot < 1:
            raise ValueError(f"n_boot must be >= 1, got {self.n_boot}")
        if self.min_group_size < 0:
            raise ValueError(f"min_group_size must be >= 0, got {self.min_group_size}")


def metric_func(metric: str) -> MetricFunc:
    if metric in METRIC_FUNCS:
        return METRIC_FUNCS[metric]
    if metric in ("ar", "recall50", "recall75"):
        raise ValueError(f"metric {metric!r} needs the detection audit (index.audit), which this build lacks: "
                         "use --metric recall")
    raise ValueError(f"unknown metric {metric!r}: choose one of {', '.join(CROSS_METRICS)}")


def _identity(run_dir: Path) -> tuple[str, object]:
    """(what identifies the run's dataset, its value): the annotations' sha256 of an
    extracted run; the dataset seed and size of a synthetic one."""
    m = open_run(run_dir).manifest
    sha = (m.dataset or {}).get("annotations_sha256")
    if sha:
        return "annotations sha256", sha
    s = m.settings or {}
    return "synthetic dataset (seed, rows)", (s.get("dataset_seed", s.get("seed")), s.get("n_rows"))


def check_same_dataset(run_dirs: Sequence[Path]) -> pd.DataFrame:
    """The first run's persons, after checking every run has the same dataset and persons;
    ValueError naming the first difference otherwise."""
    if len(run_dirs) < 2:
        raise ValueError(f"compare-runs needs at least two runs, got {len(run_dirs)}")
    names = [Path(r).name for r in run_dirs]
    if len(set(map(str, run_dirs))) != len(run_dirs):
        raise ValueError(f"a run appears twice among {', '.join(map(str, run_dirs))}")
    ref_kind, ref_id = _identity(run_dirs[0])
    ref = open_run(run_dirs[0]).persons()
    key = ["person_id", "image_id"]
    for r, name in zip(run_dirs[1:], names[1:]):
        kind, ident = _identity(r)
        if (kind, ident) != (ref_kind, ref_id):
            raise ValueError(f"{name} is not of the same dataset as {names[0]}: {kind} {ident} vs "
                             f"{ref_kind} {ref_id}")
        other = open_run(r).persons()
        if len(other) != len(ref) or not other[key].reset_index(drop=True).equals(ref[key].reset_index(drop=True)):
            raise ValueError(f"{name} and {names[0]} have different persons ({len(other)} vs {len(ref)} annotated, "
                             "or other ids): were they extracted with different --where / --limit?")
    return ref


def run_values(run_dirs: Sequence[Path], metric: str) -> tuple[pd.DataFrame, np.ndarray]:
    """(the first run's persons [N], per-person values float64 [N, R] with NaN where a run did not evaluate)."""
    run_dirs = [Path(r) for r in run_dirs]
    persons = check_same_dataset(run_dirs)
    f = metric_func(metric)
    ids = persons["person_id"].to_numpy()
    V = np.column_stack([f(r).reindex(ids).to_numpy(dtype=np.float64) for r in run_dirs])
    return persons, V


def compare_runs(run_dirs: Sequence[Path | str], metric: str, by: str | Sequence[str],
                 settings: CrossSettings = CrossSettings(), where: str | None = None) -> pd.DataFrame:
    """The long frame of per-run values, paired differences and differences-in-differences (module doc)."""
    run_dirs = [Path(r) for r in run_dirs]
    persons, V = run_values(run_dirs, metric)
    names = _names(run_dirs)
    keep = np.isfinite(V).all(axis=1)
    evaluated_somewhere = np.isfinite(V).any(axis=1)
    if where:
        keep &= population_mask(persons, "all", where)
        evaluated_somewhere &= population_mask(persons, "all", where)
    dropped = int(evaluated_somewhere.sum() - keep.sum())
    if dropped:
        log.info("%d persons evaluated in some but not every run are left out", dropped)
    persons, V = persons[keep], V[keep]
    groups = groups_of(persons, by)
    G, R = len(groups.labels), len(run_dirs)
    boot_settings = BootSettings(n_boot=settings.n_boot, seed=settings.seed)
    M = np.column_stack([groups.M, np.ones(len(persons), dtype=bool)])  # + the ``all`` column
    res = group_means(V, M, persons["image_id"].to_numpy(), boot_settings)
    labels = np.asarray([*groups.labels, ALL], dtype=object)
    n, n_img = res.n, res.n_images
    ok = np.append(eligible(groups, n[:G], settings.min_group_size, settings.include_unknown,
                            settings.include_small), False)
    small = n < settings.min_group_size
    frames = []

    def frame(kind: str, run: np.ndarray, a: np.ndarray, b: np.ndarray | None, value, lo, hi, p, fam,
              deff: np.ndarray | float = np.nan) -> pd.DataFrame:
        p_holm = np.full(len(value), np.nan)
        if p is not None:
            p_holm[fam] = holm(np.asarray(p)[fam])
        return pd.DataFrame({
            "run": np.asarray(names, dtype=object)[run], "group_a": labels[a],
            "group_b": labels[b] if b is not None else "", "metric": kind, "value": value, "ci_low": lo,
            "ci_high": hi, "n_a": n[a], "n_b": n[b] if b is not None else 0,
            "p_value": p if p is not None else np.nan, "p_holm": p_holm,
            "n_images_a": n_img[a], "n_images_b": n_img[b] if b is not None else 0,
            "design_effect": deff, "small_group": small[a] | (small[b] if b is not None else False),
            "in_family": fam, "family_size": int(fam.sum()) if p is not None else int(ok.sum()),
        })

    # Per run: group-major within each run, runs in the order given.
    run_i, g_i = np.repeat(np.arange(R), G + 1), np.tile(np.arange(G + 1), R)
    frames.append(frame(metric, run_i, g_i, None, res.value[g_i, run_i], res.ci_low[g_i, run_i],
                        res.ci_high[g_i, run_i], None, ok[g_i], res.design_effect[g_i, run_i]))
    # Paired differences: run r minus the first run, per group.
    run_i, g_i = np.repeat(np.arange(1, R), G + 1), np.tile(np.arange(G + 1), R - 1)
    d_boot = res.boot[:, :, 1:] - res.boot[:, :, :1]  # [B, G+1, R-1]
    d_jack = res.jack[:, :, 1:] - res.jack[:, :, :1]
    d_val = res.value[:, 1:] - res.value[:, :1]
    d = estimate(d_val[g_i, run_i - 1], d_boot[:, g_i, run_i - 1], d_jack[:, g_i, run_i - 1])
    frames.append(frame(f"{metric}_diff", run_i, g_i, None, d.value, d.ci_low, d.ci_high, d.p_value, ok[g_i]))
    # Differences-in-differences: group a's paired difference minus group b's.
    a, b = np.triu_indices(G, k=1)
    run_i, a_i, b_i = np.repeat(np.arange(1, R), len(a)), np.tile(a, R - 1), np.tile(b, R - 1)
    with np.errstate(invalid="ignore"):
        dd = estimate(d_val[a_i, run_i - 1] - d_val[b_i, run_i - 1],
                      d_boot[:, a_i, run_i - 1] - d_boot[:, b_i, run_i - 1],
                      d_jack[:, a_i, run_i - 1] - d_jack[:, b_i, run_i - 1])
    frames.append(frame(f"{metric}_did", run_i, a_i, b_i, dd.value, dd.ci_low, dd.ci_high, dd.p_value,
                        ok[a_i] & ok[b_i]))
    out = pd.concat(frames, ignore_index=True)
    out["n_a"], out["n_b"] = out["n_a"].astype(np.int64), out["n_b"].astype(np.int64)
    out.insert(list(out.columns).index("small_group") + 1, "rule", groups.rule)
    params = dict(reference=names[0], grouping=groups.name, population="persons evaluated in every run",
                  where=where or "", persons_dropped=dropped, n_boot=settings.n_boot, seed=settings.seed,
                  min_group_size=settings.min_group_size, include_unknown=settings.include_unknown,
                  include_small=settings.include_small, interval=INTERVAL)
    for k, v in params.items():
        out[k] = v
    return out


def _names(run_dirs: Sequence[Path]) -> list[str]:
    names = [r.name for r in run_dirs]
    if len(set(names)) != len(names):
        raise ValueError(f"runs need different directory names (the run column): {', '.join(names)}")
    return names


SPACE_METRICS = {"similarity": similarity_readout, "neighbours": neighbour_readout}
# Similarity matrices are symmetric: a pair enters the Holm family once (a <= b), and the
# corrected cosine's diagonal is 1 by construction, so it starts above it.
_SYMMETRIC_FROM = {"centroid_cosine": 0, "mean_pairwise_cosine": 0, "corrected_cosine": 1}


def open_space_runs(run_dirs: Sequence[Path], space: str) -> list[Run]:
    """Every run opened in ``space``; one line naming the run and how to add the space otherwise."""
    check_space(space)
    out = []
    for r in run_dirs:
        if space not in run_spaces(read_manifest(r)):
            raise ValueError(f"run {r.name} ({r}) has no {space} features: extract it with {how_to_add(space, str(r))}")
        try:
            out.append(load_run(r, space))
        except ValueError as exc:
            raise ValueError(f"run {r.name}: {exc}") from None
    return out


def compare_runs_space(run_dirs: Sequence[Path | str], metric: str, by: str | Sequence[str], space: str = "query",
                       population: str = "detections", settings: GroupSettings = GroupSettings(),
                       where: str | None = None) -> pd.DataFrame:
    """Similarity or neighbour read-outs of several runs of one dataset in one feature space:
    the per-run rows of ``index.compare`` and the paired ``_diff`` rows (module doc)."""
    if metric not in SPACE_METRICS:
        raise ValueError(f"unknown metric {metric!r} in a feature space: choose one of {', '.join(SPACE_METRICS)}")
    run_dirs = [Path(r) for r in run_dirs]
    check_same_dataset(run_dirs)
    names = _names(run_dirs)
    parts = [SPACE_METRICS[metric](run, by, population, settings, where) for run in open_space_runs(run_dirs, space)]
    labels = parts[0].groups.labels
    if any(list(p.groups.labels) != list(labels) for p in parts[1:]):
        raise ValueError("the runs' groups differ (a grouping with data-driven labels?): compare them one by one")
    universe = np.unique(np.concatenate([p.uniq for p in parts]))
    frames, rounds = [], []
    for name, p in zip(names, parts):
        value, boot, jack = resample(p.statistic, p.uniq, settings.boot, value=p.value)
        frames.append(p.frame(value, boot, jack))
        frames[-1].insert(0, "run", name)
        if len(p.uniq) < len(universe):  # other photos in other runs: redraw over all of them, paired
            _, boot, jack = resample(p.statistic, p.uniq, settings.boot, value=value, universe=universe)
        rounds.append((value, boot, jack))
    diff = _space_diffs(parts, names, rounds, settings)
    per_run = pd.concat(frames, ignore_index=True)
    per_run = per_run.assign(p_value=np.nan, p_holm=np.nan, in_family=False, family_size=0)
    constant = [c for c in ("grouping", "population", "where", "n_boot", "seed", "min_group_size", "k",
                            "max_queries_per_group", "same_image_neighbours") if c in per_run.columns]
    diff = diff.assign(**{c: per_run[c].iloc[0] for c in constant}, interval=INTERVAL)
    if "n_queries" in per_run.columns:  # neighbours: run r's queries of group_a, per pair as in its own rows
        G2 = len(labels) ** 2
        diff["n_queries"] = np.concatenate([np.tile(f["n_queries"].to_numpy()[:G2], len(parts[0].metrics))
                                            for f in frames[1:]])
    out = pd.concat([per_run, diff], ignore_index=True)
    out["n_a"], out["n_b"] = out["n_a"].astype(np.int64), out["n_b"].astype(np.int64)
    return out.assign(reference=names[0], space=space, include_unknown=settings.include_unknown,
                      include_small=settings.include_small)


def _space_diffs(parts: list[Readout], names: list[str], rounds: list[tuple], settings: GroupSettings) -> pd.DataFrame:
    """``<statistic>_diff`` rows: run r minus the first run, per statistic and ordered pair of groups."""
    G = len(parts[0].groups.labels)
    a, b = np.repeat(np.arange(G), G), np.tile(np.arange(G), G)
    labels = np.asarray(parts[0].groups.labels, dtype=object)
    ok = [eligible(p.groups, p.sizes, settings.min_group_size, settings.include_unknown, settings.include_small)
          for p in parts]
    small = [np.asarray(p.sizes) < settings.min_group_size for p in parts]
    v0, b0, j0 = rounds[0]
    frames = []
    for r in range(1, len(parts)):
        v, bt, jk = rounds[r]
        with np.errstate(invalid="ignore"):
            d = estimate(v - v0, bt - b0, jk - j0)
        n = np.asarray(parts[r].sizes, dtype=np.int64)
        both = ok[0] & ok[r]
        for i, name in enumerate(parts[r].metrics):
            fam = both[a] & both[b] & ((b - a) >= _SYMMETRIC_FROM.get(name, -G))
            frames.append(pd.DataFrame({
                "run": names[r], "group_a": labels[a], "group_b": labels[b], "metric": f"{name}_diff",
                "value": d.value[i].ravel(), "ci_low": d.ci_low[i].ravel(), "ci_high": d.ci_high[i].ravel(),
                "n_a": n[a], "n_b": n[b], "small_group": (small[0] | small[r])[a] | (small[0] | small[r])[b],
                "rule": parts[r].groups.rule, "p_value": d.p_value[i].ravel(), "in_family": fam}))
    out = pd.concat(frames, ignore_index=True)
    out["p_holm"], out["family_size"] = np.nan, 0
    for kind, rows in out.groupby("metric").groups.items():
        fam = out.loc[rows, "in_family"].to_numpy(dtype=bool)
        idx = np.asarray(rows)[fam]
        out.loc[idx, "p_holm"] = holm(out.loc[idx, "p_value"].to_numpy())
        out.loc[rows, "family_size"] = int(fam.sum())
    return out


def did_sentence(row: pd.Series, metric: str) -> str:
    """A ``_did`` row in words; ``_did`` = diff(a) - diff(b), so a negative value means
    the run costs group a more than group b."""
    v = float(row["value"])
    return (f"{row['run']} (vs {row['reference']}) costs {row['group_a']} {abs(v):.3g} "
            f"{'more' if v < 0 else 'less'} {metric} than {row['group_b']} "
            f"(difference-in-differences {v:+.3g}, 95% CI {row['ci_low']:+.3g} to {row['ci_high']:+.3g}, "
            f"Holm p {row['p_holm']:.3g})")
