"""The attribute probe: planted signal found, shuffled space at chance, image-grouped folds."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from extractor.rundir import DETECTIONS, IMAGES
from index import to_csv_bytes, write_synthetic_run
from index.export import read_csv_bytes
from index.groupings import membership, population_rows
from index.probe import NUISANCE, ProbeSettings, _folds, probe
from index.probe_scores import weighted_auc as _weighted_auc

SETTINGS = ProbeSettings(n_boot=300, seed=1)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    run = write_synthetic_run(tmp_path_factory.mktemp("probe") / "run", 3000, seed=4)
    meta, images = pd.read_parquet(run / DETECTIONS), pd.read_parquet(run / IMAGES)
    _, M = membership(meta, "mst_band")
    rng = np.random.default_rng(0)
    directions = rng.normal(size=(M.shape[1], 64))
    noise = rng.normal(size=(len(meta), 64)).astype(np.float32)
    planted = (noise + 0.6 * directions[M.argmax(axis=1)]).astype(np.float32)
    # the same noise with no tie to the labels: nothing to decode
    shuffled = rng.normal(size=(len(meta), 64)).astype(np.float32)
    return run, meta, images, {"planted": planted, "shuffled": shuffled}


def _read(df: pd.DataFrame, space: str, metric: str) -> pd.Series:
    return df[(df["group_a"] == space) & (df["metric"] == metric)].iloc[0]


def test_probe_finds_a_planted_signal_and_reports_chance_on_a_shuffled_space(synthetic):
    run, meta, images, arrays = synthetic
    df = probe(run, "mst_band", ["planted", "shuffled"], "persons", SETTINGS, meta=meta, images=images,
               arrays=arrays)
    assert set(df["group_a"]) == {NUISANCE, "planted", "shuffled"}
    chance = _read(df, "planted", "chance_balanced_accuracy")["value"]
    n_classes = _read(df, "planted", "balanced_accuracy")["n_classes"]
    assert chance == pytest.approx(1 / n_classes) and n_classes == 3  # lighter / medium / darker
    planted = _read(df, "planted", "balanced_accuracy")
    assert planted["ci_low"] > chance + 0.3
    assert _read(df, "planted", "macro_auc")["ci_low"] > 0.8
    assert _read(df, "planted", "balanced_accuracy_gain")["ci_low"] > 0.2
    for metric, level in (("balanced_accuracy", chance), ("macro_auc", 0.5)):
        row = _read(df, "shuffled", metric)
        assert row["ci_low"] <= level <= row["ci_high"], (metric, row["value"], row["ci_low"], row["ci_high"])
        assert row["ci_low"] <= row["value"] <= row["ci_high"]
    # rows probed: the persons with a known band; images: theirs
    rows = population_rows(meta, "persons")
    known = meta.iloc[rows]["mst_band"] != "unknown"
    assert planted["n_a"] == int(known.sum())
    assert planted["n_b"] == meta.iloc[rows][known.to_numpy()]["image_id"].nunique()
    # one CSV convention with the other read-outs
    back = read_csv_bytes(to_csv_bytes(df))
    assert list(back.columns[:9]) == ["group_a", "group_b", "metric", "value", "ci_low", "ci_high", "n_a", "n_b",
                                      "small_group"]


def test_probe_is_seeded_and_overlapping_groupings_are_binary_tasks(synthetic):
    run, meta, images, arrays = synthetic
    one = {"planted": arrays["planted"]}
    a = probe(run, "lighting", None, "persons", SETTINGS, meta=meta, images=images, arrays=one)
    b = probe(run, "lighting", None, "persons", SETTINGS, meta=meta, images=images, arrays=one)
    pd.testing.assert_frame_equal(a, b)
    assert set(a["group_b"]) == {"well_lit", "dimly_lit", "underexposed", "overexposed"}
    assert (a.loc[a["metric"] == "chance_balanced_accuracy", "value"] == 0.5).all()


def test_folds_never_split_an_image():
    rng = np.random.default_rng(0)
    groups = rng.integers(0, 300, size=2000)
    y = rng.integers(0, 3, size=2000)
    fold = _folds(y, groups, ProbeSettings())
    per_image = pd.Series(fold).groupby(groups).nunique()
    assert (per_image == 1).all() and len(np.unique(fold)) == 5


def test_weighted_auc_matches_sklearn_with_ties_and_weights():
    rng = np.random.default_rng(3)
    score = np.round(rng.normal(size=400), 1)  # many ties
    positive = rng.random(400) < 0.3 + 0.2 * (score > 0)
    W = rng.integers(0, 3, size=(4, 400)).astype(float)
    got = _weighted_auc(score, positive, W)
    # per-image weights: 400 rows in 50 images
    codes = rng.integers(0, 50, size=400)
    C = rng.integers(0, 3, size=(3, 50)).astype(float)
    np.testing.assert_allclose(_weighted_auc(score, positive, C, codes),
                               [roc_auc_score(positive, score, sample_weight=c[codes]) for c in C], rtol=1e-12)
    # continuous scores take the tie-free path
    smooth = score + rng.normal(scale=1e-3, size=400)
    np.testing.assert_allclose(_weighted_auc(smooth, positive, C, codes),
                               [roc_auc_score(positive, smooth, sample_weight=c[codes]) for c in C], rtol=1e-10)
    assert np.isnan(_weighted_auc(smooth, np.ones(400, bool), C, codes)).all()
    want = [roc_auc_score(positive, score, sample_weight=w) for w in W]
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_an_unconverged_fit_is_one_log_line_per_space_not_a_warning_per_fold(synthetic, caplog):
    import warnings

    run, meta, images, arrays = synthetic
    settings = ProbeSettings(n_boot=50, seed=1, max_iter=2)  # lbfgs cannot converge in 2 steps
    with warnings.catch_warnings(record=True) as seen, caplog.at_level("WARNING", logger="index.probe"):
        warnings.simplefilter("always")
        probe(run, "mst_band", ["planted"], "persons", settings, meta=meta, images=images,
              arrays={"planted": arrays["planted"]})
    assert not [w for w in seen if w.category.__name__ == "ConvergenceWarning"]
    lines = [r.getMessage() for r in caplog.records if "max_iter=2" in r.getMessage()]
    assert len(lines) == 2 and any(line.startswith("probe planted:") for line in lines), lines  # + nuisance
    assert all("of 5 folds" in line for line in lines)
