"""compare-runs in a feature space: per-run similarity / neighbour rows and paired differences."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from extractor.rundir import open_run, write_run
from index import GroupSettings, build_index, compare, load_run, read_csv_bytes, to_csv_bytes, write_synthetic_run
from index.__main__ import main
from index.bootstrap import BootSettings, image_weights, jackknife_weights, resample
from index.crossruns import compare_runs_space

SPACE = "encoder_roi"
SETTINGS = GroupSettings(n_boot=200, seed=1, k=5, max_queries_per_group=100)
ROWS = 1200


def _encoder_rows(meta: pd.DataFrame, seed: int, planted: float) -> np.ndarray:
    """Band centres + a per-photo offset + row noise, freshly drawn per ``seed``; ``planted``
    moves every darker row along one shared direction (their within-group cosine rises)."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(size=(4, 256)) * 0.15  # shared by both runs: the dataset's structure
    band = pd.Categorical(meta["mst_band"].astype(str), categories=["lighter", "medium", "darker", "unknown"]).codes
    _, img = np.unique(meta["image_id"].to_numpy(), return_inverse=True)
    x = centres[band] + 0.04 * rng.normal(size=(img.max() + 1, 256))[img] + 0.06 * rng.normal(size=(len(meta), 256))
    direction = np.random.default_rng(7).normal(size=256) * 0.06
    x[meta["mst_band"].astype(str).to_numpy() == "darker"] += planted * direction
    return x.astype(np.float32)


def _with_encoder(run_dir, seed: int, planted: float = 0.0):
    """Rewrite a synthetic run with an ``encoder`` feature file through the one writer, and index it."""
    f = open_run(run_dir)
    meta = f.detections()
    write_run(run_dir, f.manifest, images=f.images(), persons=f.persons(), detections=meta,
              embeddings=np.array(f.embeddings()), predictions=f.predictions(),
              features={"encoder": _encoder_rows(meta, seed, planted)})
    build_index(run_dir, space=SPACE)
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("space_runs")
    a = _with_encoder(write_synthetic_run(root / "a", ROWS, seed=3), seed=10)
    b = _with_encoder(write_synthetic_run(root / "b", ROWS, seed=3), seed=11, planted=1.0)
    # the same dataset, other planted detections: other matched rows, so other photos in "detections"
    c = _with_encoder(write_synthetic_run(root / "c", ROWS, seed=3, detection_seed=5), seed=12)
    bare = write_synthetic_run(root / "bare", ROWS, seed=3)
    return a, b, c, bare


@pytest.fixture(scope="module")
def sim(runs):
    a, b = runs[:2]
    return compare_runs_space([a, b], "similarity", "mst_band", SPACE, "persons", SETTINGS)


def _row(df: pd.DataFrame, run: str, metric: str, g: str, h: str) -> pd.Series:
    hit = df[(df["run"] == run) & (df["metric"] == metric) & (df["group_a"] == g) & (df["group_b"] == h)]
    assert len(hit) == 1, (run, metric, g, h)
    return hit.iloc[0]


def test_per_run_rows_equal_single_run_compare(runs, sim):
    for r in runs[:2]:
        single = compare(load_run(r, SPACE), "mst_band", "similarity", "persons", SETTINGS)
        mine = sim[(sim["run"] == r.name) & ~sim["metric"].str.endswith("_diff")]
        pd.testing.assert_frame_equal(mine[single.columns].reset_index(drop=True), single)


def test_planted_shift_is_found_and_an_unchanged_group_covers_zero(sim):
    darker = _row(sim, "b", "mean_pairwise_cosine_diff", "darker", "darker")
    lighter = _row(sim, "b", "mean_pairwise_cosine_diff", "lighter", "lighter")
    assert darker["ci_low"] > 0 and darker["p_holm"] < 0.05 and darker["in_family"]
    assert lighter["ci_low"] <= 0 <= lighter["ci_high"] and lighter["p_value"] > 0.05
    assert darker["n_a"] >= 30 and lighter["n_a"] >= 30


def test_diff_is_b_minus_a_with_holm_over_eligible_upper_pairs(sim):
    diff = sim[sim["metric"].str.endswith("_diff")]
    for _, d in diff.iterrows():
        base = d["metric"].removesuffix("_diff")
        va, vb = (_row(sim, run, base, d["group_a"], d["group_b"])["value"] for run in ("a", "b"))
        assert np.isclose(d["value"], vb - va, equal_nan=True, rtol=0, atol=1e-12)
        if np.isfinite(d["value"]):
            assert d["ci_low"] <= d["value"] <= d["ci_high"]
    fam = diff[diff["in_family"]]
    assert not (fam["group_a"] == "unknown").any() and not (fam["group_b"] == "unknown").any()
    corrected = fam[fam["metric"] == "corrected_cosine_diff"]
    assert (corrected["group_a"] != corrected["group_b"]).all()  # its diagonal is 1 by construction
    for kind, rows in fam.groupby("metric"):
        assert (rows["family_size"] == len(rows)).all()
        assert (rows["p_holm"] >= rows["p_value"] - 1e-12).all()
    assert diff.loc[~diff["in_family"], "p_holm"].isna().all()
    assert set(sim["space"]) == {SPACE} and set(sim["reference"]) == {"a"}


def test_other_photos_per_run_are_resampled_over_their_union(runs):
    a, _, c, _ = runs
    df = compare_runs_space([a, c], "neighbours", "mst_band", SPACE, "detections", SETTINGS)
    pa, pc = (set(load_run(r, SPACE).meta.query("matched")["image_id"]) for r in (a, c))
    assert pa != pc  # the union path is exercised
    single = compare(load_run(c, SPACE), "mst_band", "neighbours", "detections", SETTINGS)
    mine = df[(df["run"] == "c") & df["metric"].isin(["neighbour_share", "neighbour_ratio"])]
    pd.testing.assert_frame_equal(mine[single.columns].reset_index(drop=True), single)
    d = _row(df, "c", "neighbour_share_diff", "lighter", "medium")
    va, vc = (_row(df, r, "neighbour_share", "lighter", "medium")["value"] for r in ("a", "c"))
    assert np.isclose(d["value"], vc - va) and d["ci_low"] <= d["value"] <= d["ci_high"]


def test_resample_over_a_universe_takes_its_columns():
    uniq, universe = np.array([2, 5, 9]), np.array([1, 2, 3, 5, 8, 9])
    s = BootSettings(n_boot=70, seed=3)
    got = resample(lambda W: W, uniq, s, universe=universe)
    want = np.concatenate(list(image_weights(universe, s)))[:, [1, 3, 5]]
    np.testing.assert_array_equal(got[1], want)
    np.testing.assert_array_equal(got[2], jackknife_weights(universe, s)[:, [1, 3, 5]])
    plain = resample(lambda W: W.sum(axis=1), uniq, s)
    same = resample(lambda W: W.sum(axis=1), uniq, s, universe=uniq)
    np.testing.assert_array_equal(plain[1], same[1])


def test_a_run_without_the_space_is_one_line(runs):
    a, _, _, bare = runs
    with pytest.raises(ValueError) as err:
        compare_runs_space([a, bare], "similarity", "mst_band", SPACE, "persons", SETTINGS)
    msg = str(err.value)
    assert "\n" not in msg and "run bare" in msg and "--features query,encoder" in msg
    assert f"python -m index build {bare} --space {SPACE}" in msg


def test_cli_writes_the_same_bytes(runs, sim, tmp_path):
    a, b = runs[:2]
    out = tmp_path / "x.csv"
    assert main(["compare-runs", str(a), str(b), "--metric", "similarity", "--by", "mst_band", "--space", SPACE,
                 "--population", "persons", "--n-boot", "200", "--seed", "1", "--k", "5",
                 "--max-queries-per-group", "100", "--out", str(out)]) == 0
    assert out.read_bytes() == to_csv_bytes(sim)
    assert len(read_csv_bytes(out.read_bytes())) == len(sim)
    assert main(["compare-runs", str(a), str(b), "--metric", "recall", "--by", "mst_band", "--space", SPACE,
                 "--out", str(out)]) == 2
