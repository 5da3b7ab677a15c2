"""Group read-outs checked against hand computations on tiny fixtures."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from scipy.stats import binomtest

from index import GROUPINGS, BuildSettings, GroupSettings, build_index, load_run, membership, write_synthetic_run
from index.groups import compare, detection_recall, neighbour_composition, similarity
from index.stats import newcombe_difference, wilson

# Tiny fixture: 60 rows, all matched. mst_any: tone 1 = rows 0-19, tone 2 = rows 10-29
# (overlapping tone 1), tone 3 = rows 30-39, tone 10 = row 40 alone, tones 4-9 empty,
# rows 41-59 have no tone (unknown).
TONES = {1: range(0, 20), 2: range(10, 30), 3: range(30, 40), 10: range(40, 41)}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    run_dir = write_synthetic_run(tmp_path_factory.mktemp("tiny") / "run", 60, seed=11)
    meta = pd.read_parquet(run_dir / "detections.parquet")
    meta["matched"] = True
    meta["has_person"] = True
    for t in range(1, 11):
        col = np.zeros(60, dtype=bool)
        col[list(TONES.get(t, []))] = True
        meta[f"mst_any_{t}"] = col
    meta.to_parquet(run_dir / "detections.parquet", index=False)
    build_index(run_dir, BuildSettings(kind="flat"))
    return load_run(run_dir)


def _unit(run) -> np.ndarray:
    x = np.asarray(run.xb, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _groups() -> dict[str, list[int]]:
    out = {str(t): list(TONES.get(t, [])) for t in range(1, 11)}
    out["unknown"] = list(range(41, 60))
    return out


def _value(df: pd.DataFrame, metric: str, a: str, b: str) -> pd.Series:
    row = df[(df.metric == metric) & (df.group_a == a) & (df.group_b == b)]
    assert len(row) == 1
    return row.iloc[0]


def test_membership_labels_order_and_overlap(tiny):
    labels, M = membership(tiny.meta, "mst_any")
    assert labels == [str(t) for t in range(1, 11)] + ["unknown"]
    assert M.sum(axis=0).tolist() == [20, 20, 10, 0, 0, 0, 0, 0, 0, 1, 19]
    assert (M[10:20, 0] & M[10:20, 1]).all()


@pytest.mark.parametrize("by", GROUPINGS)
def test_every_row_is_in_some_group(tiny, by):
    labels, M = membership(tiny.meta, by)
    assert M.shape == (tiny.n, len(labels)) and M.any(axis=1).all()
    if by.endswith(("_mode", "_band")) or by.startswith("lighting_"):
        assert (M.sum(axis=1) == 1).all()


def test_membership_of_exclusive_groupings():
    frame = pd.DataFrame({
        "mst_mode": pd.array([1, 10, None, 5], dtype="Int8"), "mst_band": ["lighter", "darker", "unknown", "medium"],
        "lighting_well_lit": [True, False, False, True], "lighting_dimly_lit": [False, True, False, True],
        "lighting_underexposed": False, "lighting_overexposed": False,
    })
    labels, M = membership(frame, "mst_mode")
    assert [labels[i] for i in M.argmax(axis=1)] == ["1", "10", "unknown", "5"]
    labels, M = membership(frame, "lighting")
    assert labels == ["well_lit", "dimly_lit", "underexposed", "overexposed", "unknown"]
    assert M[:, -1].tolist() == [False, False, True, False] and M[3, :2].all()
    labels, M = membership(frame, "lighting_dimly_lit")
    assert labels == ["yes", "no"] and M[:, 0].tolist() == [False, True, False, True]
    with pytest.raises(ValueError, match="unknown grouping 'skin'.*mst_any"):
        membership(frame, "skin")


def test_similarity_matches_double_loop(tiny):
    df = similarity(tiny, "mst_any", settings=GroupSettings(n_boot=50))
    v = _unit(tiny)
    groups = _groups()
    assert len(df) == 3 * 11 * 11
    pairwise = {}
    for a, ga in groups.items():
        for b, gb in groups.items():
            pair = [float(v[i] @ v[j]) for i in ga for j in gb if i != j]
            want = pairwise[a, b] = np.mean(pair) if pair else np.nan
            got = _value(df, "mean_pairwise_cosine", a, b)
            np.testing.assert_allclose(got.value, want, atol=1e-5, equal_nan=True)
            assert (got.n_a, got.n_b) == (len(ga), len(gb))
            if ga and gb:
                ma, mb = v[ga].mean(axis=0), v[gb].mean(axis=0)
                cos = ma @ mb / np.linalg.norm(ma) / np.linalg.norm(mb)
                assert _value(df, "centroid_cosine", a, b).value == pytest.approx(cos, abs=1e-5)
            else:
                assert np.isnan(_value(df, "centroid_cosine", a, b).value)
    for a in groups:
        for b in groups:
            want = pairwise[a, b] / np.sqrt(pairwise[a, a] * pairwise[b, b])
            np.testing.assert_allclose(_value(df, "corrected_cosine", a, b).value, want, atol=1e-5, equal_nan=True)
    v = df.dropna(subset=["value"])
    assert ((v.ci_low <= v.value + 1e-12) & (v.value <= v.ci_high + 1e-12)).all()


def test_group_of_one_and_empty_group(tiny):
    df = similarity(tiny, "mst_any", settings=GroupSettings(n_boot=20))
    one = _value(df, "mean_pairwise_cosine", "10", "10")
    assert one.n_a == 1 and np.isnan(one.value) and bool(one.small_group)
    assert _value(df, "centroid_cosine", "10", "10").value == pytest.approx(1.0)
    assert np.isfinite(_value(df, "mean_pairwise_cosine", "10", "1").value)
    empty = df[(df.group_a == "5")]
    assert len(empty) == 3 * 11 and (empty.n_a == 0).all() and empty[["value", "ci_low", "ci_high"]].isna().all().all()


def test_bootstrap_round_matches_explicit_resample(tiny):
    """One round's image weights, redrawn by the engine, against a double loop over the
    resampled multisets (every row of an image drawn w times; pairs of a row with its own
    copies excluded). With n_boot = 1 the interval collapses to that round and the estimate."""
    from index.bootstrap import BootSettings, image_weights
    seed = 5
    df = similarity(tiny, "mst_any", settings=GroupSettings(n_boot=1, seed=seed))
    ids = tiny.meta["image_id"].to_numpy()
    uniq = np.unique(ids)
    w_img = next(image_weights(uniq, BootSettings(n_boot=1, seed=seed)))[0].astype(int)
    weight = w_img[np.searchsorted(uniq, ids)]
    groups = _groups()
    v = _unit(tiny)
    for a, b in (("1", "2"), ("1", "1"), ("2", "3"), ("10", "1")):
        bag_a = [(i, c) for i in groups[a] for c in range(weight[i])]
        bag_b = [(j, c) for j in groups[b] for c in range(weight[j])]
        if not bag_a or not bag_b:
            continue
        pair = [float(v[i] @ v[j]) for i, _ in bag_a for j, _ in bag_b if i != j]
        boot = np.mean(pair) if pair else np.nan
        est = _value(df, "mean_pairwise_cosine", a, b)
        got = est.ci_low if boot <= est.value else est.ci_high  # the end away from the estimate
        assert got == pytest.approx(boot, abs=1e-5)
        ma = v[[i for i, _ in bag_a]].mean(axis=0)
        mb = v[[j for j, _ in bag_b]].mean(axis=0)
        cos = ma @ mb / np.linalg.norm(ma) / np.linalg.norm(mb)
        row = _value(df, "centroid_cosine", a, b)
        assert (row.ci_low if cos <= row.value else row.ci_high) == pytest.approx(cos, abs=1e-5)


def test_groups_with_the_same_members_stay_identical_in_every_round(tiny):
    meta = tiny.meta.copy()
    meta["mst_any_4"] = meta["mst_any_3"]
    twin = SimpleNamespace(meta=meta, normalised=tiny.normalised, unit_rows=tiny.unit_rows)
    df = similarity(twin, "mst_any", settings=GroupSettings(n_boot=200))
    row = _value(df, "centroid_cosine", "3", "4")
    assert row.value == pytest.approx(1.0) and row.ci_low == pytest.approx(1.0) and row.ci_high == pytest.approx(1.0)
    assert _value(df, "corrected_cosine", "3", "4").ci_low == pytest.approx(1.0)
    assert _value(df, "mean_pairwise_cosine", "3", "4").ci_low == pytest.approx(_value(df, "mean_pairwise_cosine", "3", "3").ci_low)


def test_bootstrap_is_deterministic_by_seed(tiny):
    a = similarity(tiny, "mst_any", settings=GroupSettings(n_boot=100, seed=1))
    b = similarity(tiny, "mst_any", settings=GroupSettings(n_boot=100, seed=1))
    c = similarity(tiny, "mst_any", settings=GroupSettings(n_boot=100, seed=2))
    pd.testing.assert_frame_equal(a, b)
    assert not np.allclose(a.ci_low.fillna(0), c.ci_low.fillna(0))
    n1 = neighbour_composition(tiny, "mst_any", settings=GroupSettings(k=3, n_boot=100, seed=1))
    n2 = neighbour_composition(tiny, "mst_any", settings=GroupSettings(k=3, n_boot=100, seed=1))
    pd.testing.assert_frame_equal(n1, n2)


def test_neighbour_composition_matches_hand_count(tiny):
    k = 3
    df = neighbour_composition(tiny, "mst_any", settings=GroupSettings(k=k, n_boot=50))
    v = _unit(tiny)
    groups = _groups()
    sims = v @ v.T
    image = tiny.meta["image_id"].to_numpy()
    sims[image[:, None] == image[None, :]] = -np.inf  # the query's own photo, itself included
    nbrs = np.argsort(-sims, axis=1)[:, :k]
    keep = neighbour_composition(tiny, "mst_any", settings=GroupSettings(k=k, n_boot=50, same_image_neighbours=True))
    sims_all = v @ v.T
    np.fill_diagonal(sims_all, -np.inf)
    nbrs_all = np.argsort(-sims_all, axis=1)[:, :k]
    for a, ga in groups.items():
        if ga:
            want = np.mean([np.isin(nbrs_all[q], groups["1"]).mean() for q in ga])
            assert _value(keep, "neighbour_share", a, "1").value == pytest.approx(want, abs=1e-9)
    for a, ga in groups.items():
        for b, gb in groups.items():
            row = _value(df, "neighbour_share", a, b)
            if not ga:
                assert np.isnan(row.value) and row.n_queries == 0
                continue
            want = np.mean([np.isin(nbrs[q], gb).mean() for q in ga])
            assert row.value == pytest.approx(want, abs=1e-9)
            assert row.base_rate == pytest.approx(len(gb) / 60)
            ratio = _value(df, "neighbour_ratio", a, b)
            if gb:
                assert ratio.value == pytest.approx(want / (len(gb) / 60))
                assert ratio.ci_low <= ratio.value + 1e-9 and ratio.ci_high >= ratio.value - 1e-9
            else:
                assert np.isnan(ratio.value)


def test_neighbour_design_effect_over_independent_queries(tiny):
    df = neighbour_composition(tiny, "mst_band", settings=GroupSettings(k=3, n_boot=400))
    row = _value(df, "neighbour_share", "lighter", "medium")
    assert np.isfinite(row.design_effect) and 0.2 < row.design_effect < 10
    assert (df[df.metric == "neighbour_share"].design_effect.dropna() >= 0).all()


def test_neighbour_queries_are_capped_per_group(tiny):
    df = neighbour_composition(tiny, "mst_any", settings=GroupSettings(k=3, n_boot=10, max_queries_per_group=5))
    shares = df[df.metric == "neighbour_share"].drop_duplicates("group_a").set_index("group_a")
    assert shares.n_queries["1"] == 5 and shares.n_queries["10"] == 1 and shares.n_queries["4"] == 0
    assert (df.max_queries_per_group == 5).all()


def test_neighbour_candidates_stay_in_population(tmp_path):
    run_dir = write_synthetic_run(tmp_path / "run", 400, seed=2)
    build_index(run_dir, BuildSettings(kind="flat"))
    run = load_run(run_dir)
    df = neighbour_composition(run, "mst_band", population="detections", settings=GroupSettings(k=5, n_boot=10))
    # Unmatched detections (no person) are "unknown" in population all but absent here.
    shares = df[df.metric == "neighbour_share"]
    n_unknown = int((run.meta.matched & (run.meta.mst_band == "unknown")).sum())
    assert (shares[shares.group_b == "unknown"].n_b == n_unknown).all()
    assert np.allclose(shares.groupby("group_a").value.sum().dropna(), 1.0)


def test_wilson_matches_known_values():
    p, lo, hi = wilson(81, 263)  # Newcombe (1998): 0.2553 to 0.3662
    assert (round(float(lo), 4), round(float(hi), 4)) == (0.2553, 0.3662)
    for x, n in ((0, 10), (3, 7), (10, 10), (456, 1000)):
        ci = binomtest(x, n).proportion_ci(method="wilson")
        np.testing.assert_allclose(wilson(x, n)[1:], (ci.low, ci.high), atol=1e-12)
    assert all(np.isnan(v) for v in wilson(0, 0))


def test_newcombe_matches_published_examples():
    # Newcombe (1998), method 10: 56/70 - 48/80 and 9/10 - 3/10.
    d, lo, hi = newcombe_difference(56, 70, 48, 80)
    assert (round(d, 4), round(float(lo), 4), round(float(hi), 4)) == (0.2, 0.0524, 0.3339)
    d, lo, hi = newcombe_difference(9, 10, 3, 10)
    assert (round(float(lo), 4), round(float(hi), 4)) == (0.1705, 0.8090)


def _persons(groups: dict, per_image: int = 1) -> SimpleNamespace:
    rows = []
    for tone, (n, detected) in groups.items():
        rows += [{"mst_mode": tone, "evaluated": True, "detected": i < detected} for i in range(n)]
    rows += [{"mst_mode": 1, "evaluated": False, "detected": False}] * 7  # failed image: never counted
    frame = pd.DataFrame(rows).astype({"mst_mode": "Int8"})
    frame["image_id"] = np.arange(len(frame)) // per_image
    return SimpleNamespace(persons=frame)


def test_recall_per_group_and_gap():
    run = _persons({1: (70, 56), 2: (80, 48), 10: (1, 1), None: (12, 11)})
    df = detection_recall(run, "mst_mode", GroupSettings(min_group_size=30, n_boot=2000))
    per = df[df.metric == "recall"].set_index("group_a")
    assert per.loc["1", "n_a"] == 70 and per.loc["1", "detected_a"] == 56 and per.loc["1", "value"] == 0.8
    assert per.loc["unknown", "n_a"] == 12 and per.loc["unknown", "value"] == pytest.approx(11 / 12)
    assert per.loc["5", "n_a"] == 0 and np.isnan(per.loc["5", "value"]) and bool(per.loc["5", "small_group"])
    assert per.loc["10", "ci_low"] == per.loc["10", "ci_high"] == 1.0  # one person: no spread, still contains
    # One person per photo: the cluster bootstrap is the ordinary one, close to Wilson, design effect ~1.
    ci = binomtest(48, 80).proportion_ci(method="wilson")
    assert (per.loc["2", "ci_low"], per.loc["2", "ci_high"]) == pytest.approx((ci.low, ci.high), abs=0.02)
    assert 0.8 < per.loc["2", "design_effect"] < 1.2 and per.loc["2", "n_images_a"] == 80
    gap = df[df.metric == "recall_gap"].iloc[0]
    # The group of one and unknown are out of the choice: best tone 1, worst tone 2.
    assert (gap.group_a, gap.group_b, gap.n_a, gap.n_b, gap.family_size) == ("1", "2", 70, 80, 2)
    lo, hi = newcombe_difference(56, 70, 48, 80)[1:]
    assert gap.value == pytest.approx(0.2) and (gap.ci_low, gap.ci_high) == pytest.approx((lo, hi), abs=0.03)
    wide = detection_recall(run, "mst_mode", GroupSettings(min_group_size=30, include_unknown=True, include_small=True))
    g = wide[wide.metric == "recall_gap"].iloc[0]
    assert (g.group_a, g.group_b, g.family_size) == ("unknown", "2", 3)  # n = 1 is never in the choice


def test_recall_pairwise_differences_with_holm():
    run = _persons({1: (300, 270), 2: (300, 240), 3: (300, 238), None: (5, 5)}, per_image=3)
    df = detection_recall(run, "mst_mode", GroupSettings(n_boot=2000))
    diff = df[df.metric == "recall_difference"].set_index(["group_a", "group_b"])
    assert len(diff) == 11 * 10 // 2
    assert diff.loc[("1", "2"), "value"] == pytest.approx(0.1)
    fam = diff[diff.in_family]
    assert len(fam) == 3 and (fam.family_size == 3).all()  # tones 1-3; empty, small and unknown are out
    p = fam.p_value.to_numpy()
    order = np.argsort(p)
    want = np.minimum(np.maximum.accumulate((3 - np.arange(3)) * p[order]), 1)
    np.testing.assert_allclose(fam.p_holm.to_numpy()[order], want)
    # Detected and missed persons sit in whole photos of three: the design effect is ~3
    # and the evidence weaker than with one person per photo.
    assert 0.005 < fam.loc[("1", "2"), "p_value"] < 0.1 and fam.loc[("2", "3"), "p_value"] > 0.5
    alone = detection_recall(_persons({1: (300, 270), 2: (300, 240)}), "mst_mode", GroupSettings(n_boot=2000))
    assert alone.set_index(["metric", "group_a", "group_b"]).loc[("recall_difference", "1", "2"), "p_value"] < 0.005
    assert (df[df.metric == "recall"].set_index("group_a").loc[["1", "2"], "design_effect"] > 2).all()
    assert diff[~diff.in_family].p_holm.isna().all()
    ratio = df[df.metric == "recall_ratio"].set_index(["group_a", "group_b"])
    assert ratio.loc[("1", "2"), "value"] == pytest.approx(0.9 / 0.8)
    assert (ratio.loc[("1", "2"), "ci_low"] > 1) and diff.loc[("1", "2"), "ci_low"] > 0
    assert np.isnan(diff.loc[("1", "5"), "value"])  # empty group: row kept, NaN


def test_recall_gap_with_one_group_is_nan():
    df = detection_recall(_persons({3: (5, 2)}), "mst_mode")
    gap = df[df.metric == "recall_gap"].iloc[0]
    assert np.isnan(gap.value) and gap.group_a == "" and gap.n_a == 0


def test_recall_on_synthetic_run_counts_every_evaluated_person(tiny):
    df = detection_recall(tiny, "mst_band")
    per = df[df.metric == "recall"]
    evaluated = tiny.persons.evaluated.sum()
    assert per[per.group_a != "all"].n_a.sum() == evaluated and "unknown" in per.group_a.tolist()
    everyone = per[per.group_a == "all"].iloc[0]
    assert everyone.n_a == evaluated and everyone.value == pytest.approx(tiny.persons.detected[tiny.persons.evaluated].mean())
    assert not everyone.in_family and "all" not in set(df[df.metric == "recall_difference"].group_a)


def test_empty_population_gives_rows_with_n_zero(tiny):
    """Untrained weights match nobody: the detections population is empty, and every
    read-out still reports each pair of groups with n = 0 instead of failing."""
    nobody = copy.copy(tiny)
    nobody.meta = tiny.meta.assign(matched=False)
    for df in (similarity(nobody, "mst_any", settings=GroupSettings(n_boot=20)),
               neighbour_composition(nobody, "mst_any", settings=GroupSettings(n_boot=20, k=3))):
        assert len(df) and (df.n_a == 0).all() and df.value.isna().all()


@pytest.mark.parametrize("by", ["mst_any", ["mst_band", "lighting"]])
def test_every_interval_contains_its_estimate(tiny, by):
    s = GroupSettings(k=3, n_boot=100, min_group_size=2)
    for metric in ("similarity", "neighbours", "recall"):
        df = compare(tiny, by, metric, settings=s)
        v = df.dropna(subset=["value"])
        assert len(v) and ((v.ci_low <= v.value) & (v.value <= v.ci_high)).all(), metric
        assert (df.rule == ("overlapping")).all()


def test_where_restricts_every_readout(tiny):
    s = GroupSettings(k=3, n_boot=20)
    where = "class1 in ['doctor', 'nurse', 'chef']"
    keep = tiny.meta.eval(where).to_numpy()
    sim = compare(tiny, "mst_band", "similarity", settings=s, where=where)
    assert (sim["where"] == where).all()
    n = sim[(sim.metric == "centroid_cosine") & (sim.group_a == sim.group_b)].n_a.sum()
    assert n == (keep & tiny.meta.matched.to_numpy()).sum()
    rec = compare(tiny, "mst_band", "recall", settings=s, where=where)
    persons = tiny.persons[tiny.persons.evaluated & tiny.persons.eval(where)]
    assert rec[(rec.metric == "recall") & (rec.group_a != "all")].n_a.sum() == len(persons)


def test_similarity_design_effect_grows_with_a_shared_photo_component(tmp_path):
    """Rows that mostly carry their photo's direction move together when photos are
    resampled: the image-cluster variance then exceeds the independent-rows one."""
    run_dir = write_synthetic_run(tmp_path / "run", 1200, seed=4)
    meta = pd.read_parquet(run_dir / "detections.parquet")
    rng = np.random.default_rng(0)
    codes = pd.factorize(meta["image_id"])[0]
    shared = rng.standard_normal((codes.max() + 1, 256)).astype(np.float32)
    deffs = {}
    for name, weight in (("independent", 0.0), ("shared", 3.0)):
        xb = (rng.standard_normal((len(meta), 256)) + weight * shared[codes]).astype(np.float32) + 1.0
        np.save(run_dir / "embeddings.npy", xb)
        build_index(run_dir, BuildSettings(kind="flat"))
        df = similarity(load_run(run_dir), "mst_band", "all", GroupSettings(n_boot=200))
        cell = df[(df.metric == "mean_pairwise_cosine") & (df.group_a == "medium") & (df.group_b == "medium")]
        deffs[name] = cell.design_effect.iloc[0]
    assert 0.5 < deffs["independent"] < 2.0
    assert deffs["shared"] > 2.0 and deffs["shared"] > 1.5 * deffs["independent"], deffs
