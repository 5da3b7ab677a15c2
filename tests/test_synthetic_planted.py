"""Synthetic runs: predictions agree with detections, planted effects come out as planted."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from index import membership, write_synthetic_run
from index.audit import run_audit
from index.planted import PlantedEffects, expected_found


def test_predictions_cover_every_ok_image_and_agree_with_kept_rows(tmp_path):
    run = write_synthetic_run(tmp_path / "run", 800, seed=1)
    pred = pd.read_parquet(run / "predictions.parquet")
    det = pd.read_parquet(run / "detections.parquet")
    images = pd.read_parquet(run / "images.parquet")
    ok = images.loc[images["status"] == "ok", "image_id"].to_numpy()
    assert len(pred) == 100 * len(ok) and set(pred["image_id"]) == set(ok)
    assert not pred.duplicated(["image_id", "query_idx"]).any()
    both = det.merge(pred, on=["image_id", "query_idx"], suffixes=("", "_pred"), validate="one_to_one")
    assert len(both) == len(det)
    for c in ("x1", "y1", "x2", "y2"):
        assert (both[c] == both[f"{c}_pred"]).all()
    assert (both["score"] == both["p_person"]).all() and (both["label"] == 1).all()
    assert (pred["label_score"] >= pred["p_person"]).all()
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["files"]["predictions.parquet"] == (run / "predictions.parquet").stat().st_size


def test_expected_found_is_the_logit_normal_mean():
    rng = np.random.default_rng(0)
    u = rng.standard_normal(2_000_000)
    for eta, sd in ((1.5, 0.8), (-0.5, 2.0), (2.0, 0.0)):
        mc = (1 / (1 + np.exp(-(eta + sd * u)))).mean()
        assert expected_found(np.array([eta]), sd)[0] == pytest.approx(mc, abs=1e-3)


def test_one_dataset_several_detection_effects(tmp_path):
    strong = PlantedEffects(band_logit=(("lighter", 2.2), ("medium", 2.0), ("darker", -0.5), ("unknown", 1.8)))
    a = write_synthetic_run(tmp_path / "a", 600, seed=7)
    b = write_synthetic_run(tmp_path / "b", 600, seed=7, effects=strong, detection_seed=99)
    for name in ("persons.parquet", "images.parquet"):
        pa, pb = pd.read_parquet(a / name), pd.read_parquet(b / name)
        keep = [c for c in pa.columns if c not in ("detected", "det_id", "best_iou", "best_score", "n_detections")]
        pd.testing.assert_frame_equal(pa[keep], pb[keep])
    assert np.array_equal(np.load(a / "embeddings.npy"), np.load(b / "embeddings.npy"))
    assert not pd.read_parquet(a / "predictions.parquet").equals(pd.read_parquet(b / "predictions.parquet"))
    ma, mb = (json.loads((r / "manifest.json").read_text()) for r in (a, b))
    assert mb["planted"]["recall50"]["mst_band"]["darker"] < ma["planted"]["recall50"]["mst_band"]["darker"] - 0.3
    assert mb["planted"]["recall50"]["mst_band"]["lighter"] == ma["planted"]["recall50"]["mst_band"]["lighter"]


def test_bad_effects_are_refused():
    with pytest.raises(ValueError, match="image_sd"):
        PlantedEffects(image_sd=-1)
    with pytest.raises(ValueError, match="unknown groups"):
        PlantedEffects(lighting_logit=(("moonlit", 1.0),))


@pytest.mark.slow
def test_realised_ar_and_recall_are_close_to_planted(tmp_path):
    """Over 4 seeded runs the realised group values scatter around the planted truth:
    every |z| < 4 and the mean z of each (metric, group) is near 0 (no bias)."""
    zs: dict[tuple, list[float]] = {}
    for seed in range(4):
        run = write_synthetic_run(tmp_path / f"r{seed}", 12_000, seed=seed)
        planted = json.loads((run / "manifest.json").read_text())["planted"]
        audit = run_audit(run)
        persons = pd.read_parquet(run / "persons.parquet").set_index("person_id").loc[audit["person_id"]]
        for by in ("mst_band", "lighting"):
            labels, M = membership(persons, by)
            for metric in ("ar", "recall50", "recall75"):
                for g, label in enumerate(labels):
                    n, truth = int(M[:, g].sum()), planted[metric][by][label]
                    if n < 200:
                        continue
                    value = audit[metric].to_numpy()[M[:, g]].mean()
                    # binomial SE, doubled for the image effect and the AR's ten thresholds
                    z = (value - truth) / (2 * np.sqrt(truth * (1 - truth) / n))
                    zs.setdefault((metric, by, label), []).append(z)
        assert abs(audit["ar"].mean() - planted["ar"]["all"]["all"]) < 0.02
    assert all(abs(z) < 4 for v in zs.values() for z in v)
    assert all(abs(np.mean(v)) < 1.5 for v in zs.values())


def test_run_without_predictions_is_the_same_run_minus_them(tmp_path):
    full = write_synthetic_run(tmp_path / "full", 900, seed=4)
    lean = write_synthetic_run(tmp_path / "lean", 900, seed=4, predictions=False)
    for name in ("images.parquet", "persons.parquet", "detections.parquet", "embeddings.npy"):
        assert (full / name).read_bytes() == (lean / name).read_bytes(), name
    assert not (lean / "predictions.parquet").exists()
    assert sorted(p.name for p in lean.iterdir()) == sorted(p.name for p in full.iterdir() if p.name != "predictions.parquet")
    manifest = json.loads((lean / "manifest.json").read_text())
    assert manifest["counts"]["predictions"] is None and "predictions.parquet" not in manifest["tables"]
    with pytest.raises(ValueError, match="predictions"):
        run_audit(lean)


def test_memory_check_refuses_before_writing_anything(tmp_path):
    from index.synthetic import PEAK_BYTES_PER_ROW, check_memory

    check_memory(1_000_000, True, available=1 << 40)
    check_memory(1_000_000, False, available=None)  # unknown: no check
    with pytest.raises(ValueError, match="--no-predictions"):
        check_memory(5_000_000, True, available=4 << 30)
    with pytest.raises(ValueError, match="fewer rows"):
        check_memory(5_000_000, False, available=4 << 30)
    assert PEAK_BYTES_PER_ROW[False] < PEAK_BYTES_PER_ROW[True]
    from index.__main__ import main
    assert main(["synthetic", str(tmp_path / "huge"), "--rows", str(10**12)]) == 2
    assert not (tmp_path / "huge").exists()
