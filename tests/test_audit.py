"""Detection audit: per-person COCO matches against pycocotools and a hand-worked example."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from coco_reference import coco_ar100
from index.audit import MATCH_COLUMNS, coco_iou, matched_flags, person_audit, read_predictions

pytest.importorskip("pycocotools")


def _persons(rows: list[tuple[int, tuple[float, float, float, float]]]) -> pd.DataFrame:
    box = np.array([b for _, b in rows], dtype=np.float32).reshape(-1, 4)
    return pd.DataFrame({"person_id": np.arange(len(rows)) + 100, "image_id": [i for i, _ in rows],
                         "evaluated": True, **{f"gt_{c}": box[:, j] for j, c in enumerate(("x1", "y1", "x2", "y2"))}})


def _predictions(rows: list[tuple[int, int, tuple[float, float, float, float], float, int]]) -> pd.DataFrame:
    """rows: (image_id, query_idx, xyxy, label_score, label)."""
    box = np.array([r[2] for r in rows], dtype=np.float32).reshape(-1, 4)
    score = np.array([r[3] for r in rows], dtype=np.float32)
    return pd.DataFrame({"image_id": [r[0] for r in rows], "query_idx": np.array([r[1] for r in rows], np.int16),
                         **{c: box[:, j] for j, c in enumerate(("x1", "y1", "x2", "y2"))},
                         "p_person": score, "label": np.array([r[4] for r in rows], np.int8), "label_score": score})


def test_coco_iou_is_pycocotools_bbiou():
    from pycocotools import mask as mask_utils
    rng = np.random.default_rng(0)
    a = rng.uniform(0, 50, (200, 4)).astype(np.float32)
    b = rng.uniform(0, 50, (200, 4)).astype(np.float32)
    a[:, 2:] += a[:, :2]
    b[:, 2:] += b[:, :2]
    xywh = lambda x: np.c_[x[:, :2], x[:, 2:] - x[:, :2]].astype(np.float64)  # noqa: E731
    ref = mask_utils.iou(xywh(a), xywh(b), [0] * len(b))
    assert np.array_equal(coco_iou(np.repeat(a, len(b), 0), np.tile(b, (len(a), 1))), ref.ravel())


def test_hand_worked_flags():
    # Image 1: A (0,0,10,10), B (5,0,15,10). d1 .9 = A exactly (IoU B 1/3); d2 .8 (1,0,11,10):
    # IoU A .818, B .429; d3 .7 (5,0,15,11): IoU B 100/110 = .909. A: d1 at every t; d2 finds A
    # taken and B under .5; B: d3 up to t = .90, not at .95.
    # Image 2: C (0,0,10,10), D (2,0,12,10). e1 .9 (1,0,11,10): IoU C = IoU D = 90/110 = .818:
    # COCOeval gives the tie to the later person, D, up to t = .80; e2 .5 = C exactly (IoU D
    # .667) then takes C everywhere. (Were the tie given to C, D would match only up to .65.)
    # Image 3: nobody detects E; image 4 has a detection but no person; a car detection on
    # image 3 (label 3) is not a person detection.
    persons = _persons([(1, (0, 0, 10, 10)), (1, (5, 0, 15, 10)), (2, (0, 0, 10, 10)), (2, (2, 0, 12, 10)),
                        (3, (0, 0, 10, 10))])
    pred = _predictions([(1, 0, (0, 0, 10, 10), .9, 1), (1, 1, (1, 0, 11, 10), .8, 1), (1, 2, (5, 0, 15, 11), .7, 1),
                         (2, 0, (1, 0, 11, 10), .9, 1), (2, 1, (0, 0, 10, 10), .5, 1),
                         (3, 0, (0, 0, 10, 10), .9, 3), (4, 0, (0, 0, 10, 10), .9, 1)])
    audit = person_audit(persons, pred)
    t = np.linspace(.5, .95, 10)
    expected = np.array([np.ones(10, bool), t <= 0.9 + 1e-9, np.ones(10, bool), t <= 0.8 + 1e-9, np.zeros(10, bool)])
    np.testing.assert_array_equal(matched_flags(audit), expected)
    np.testing.assert_allclose(audit["ar"], [1.0, 0.9, 1.0, 0.7, 0.0])
    np.testing.assert_array_equal(audit["recall50"], [1, 1, 1, 1, 0])
    np.testing.assert_array_equal(audit["recall75"], [1, 1, 1, 1, 0])
    assert list(audit["person_id"]) == [100, 101, 102, 103, 104]
    assert audit["ar"].mean() == pytest.approx(coco_ar100(persons, pred, [1, 2, 3, 4]), abs=1e-12)


def test_persons_of_failed_images_are_left_out_and_others_stay_ground_truth():
    persons = _persons([(1, (0, 0, 10, 10)), (1, (1, 0, 11, 10)), (2, (0, 0, 10, 10))])
    pred = _predictions([(1, 0, (1, 0, 11, 10), .9, 1), (2, 0, (0, 0, 10, 10), .9, 1)])
    audit = person_audit(persons, pred, ok_images=np.array([1]))
    assert list(audit["person_id"]) == [100, 101]
    # The one detection goes to the person it fits best, never to both.
    assert audit["ar"].tolist() == [0.0, 1.0]


def _random_case(rng: np.random.Generator, n_images: int, n_persons: int, dets_per_person: int,
                 score_decimals: int | None, crowd_image_dets: int = 0):
    image = np.sort(rng.integers(0, n_images, n_persons))
    xy, wh = rng.uniform(0, 200, (n_persons, 2)), rng.uniform(5, 80, (n_persons, 2))
    gt = np.c_[xy, xy + wh].astype(np.float32)
    persons = pd.DataFrame({"person_id": np.arange(n_persons), "image_id": image, "evaluated": True,
                            **{f"gt_{c}": gt[:, j] for j, c in enumerate(("x1", "y1", "x2", "y2"))}})
    src = rng.integers(0, n_persons, n_persons * dets_per_person)
    box = gt[src] + rng.normal(0, 4, (len(src), 4)).astype(np.float32)
    d_image = image[src]
    # false positives anywhere, including images without persons
    n_fp = n_persons
    fp_xy = rng.uniform(0, 200, (n_fp, 2))
    box = np.r_[box, np.c_[fp_xy, fp_xy + rng.uniform(5, 80, (n_fp, 2))]].astype(np.float32)
    d_image = np.r_[d_image, rng.integers(0, n_images + 5, n_fp)]
    if crowd_image_dets:
        c_xy = rng.uniform(0, 50, (crowd_image_dets, 2))
        box = np.r_[box, np.c_[c_xy, c_xy + 60].astype(np.float32)]
        d_image = np.r_[d_image, np.full(crowd_image_dets, image[0])]
    box[:, 2:] = np.maximum(box[:, 2:], box[:, :2] + 0.5)
    score = rng.uniform(0, 1, len(box))
    if score_decimals is not None:
        score = np.round(score, score_decimals)
    label = np.where(rng.random(len(box)) < 0.85, 1, rng.integers(2, 91, len(box)))
    order = np.argsort(d_image, kind="stable")
    d_image, box, score, label = d_image[order], box[order], score[order], label[order]
    query = np.arange(len(d_image)) - np.searchsorted(d_image, d_image)
    pred = pd.DataFrame({"image_id": d_image, "query_idx": query.astype(np.int16),
                         **{c: box[:, j] for j, c in enumerate(("x1", "y1", "x2", "y2"))},
                         "label": label.astype(np.int8), "label_score": score.astype(np.float32)})
    return persons, pred, np.arange(n_images + 5)


@pytest.mark.parametrize("case", [
    dict(n_images=60, n_persons=150, dets_per_person=3, score_decimals=None),
    dict(n_images=40, n_persons=200, dets_per_person=4, score_decimals=1),   # many ties in score
    dict(n_images=80, n_persons=100, dets_per_person=1, score_decimals=2),   # many persons undetected
    dict(n_images=5, n_persons=60, dets_per_person=2, score_decimals=None, crowd_image_dets=150),  # > 100 per image
])
def test_mean_ar_equals_pycocotools(case):
    rng = np.random.default_rng(len(str(case)))
    persons, pred, image_ids = _random_case(rng, **case)
    audit = person_audit(persons, pred)
    assert len(audit) == len(persons)
    ref = coco_ar100(persons, pred, image_ids)
    assert 0.05 < ref < 0.95  # a case that exercises matching and missing both
    assert audit["ar"].mean() == pytest.approx(ref, abs=1e-6)


def test_max_dets_keeps_the_top_scores():
    persons = _persons([(1, (0, 0, 10, 10))])
    decoys = [(1, q, (100, 100, 110, 110), .9, 1) for q in range(100)]
    pred = _predictions(decoys + [(1, 100, (0, 0, 10, 10), .5, 1)])
    assert person_audit(persons, pred)["ar"].tolist() == [0.0]
    assert person_audit(persons, pred, max_dets=101)["ar"].tolist() == [1.0]
    assert coco_ar100(persons, pred, [1]) == 0.0


def test_match_columns_are_the_coco_thresholds():
    assert MATCH_COLUMNS == ("matched_50", "matched_55", "matched_60", "matched_65", "matched_70", "matched_75",
                             "matched_80", "matched_85", "matched_90", "matched_95")


def test_run_without_predictions_says_to_re_extract(tmp_path):
    from index import write_synthetic_run
    from test_audit_readout import _without_predictions
    old = _without_predictions(write_synthetic_run(tmp_path / "run", 100, seed=1), tmp_path / "old")
    with pytest.raises(ValueError, match="extract it again") as exc:
        read_predictions(old)
    assert "\n" not in str(exc.value)


@pytest.mark.slow
def test_real_extraction_keeps_every_query_and_agrees_with_detections(ui_demo):
    import json
    run = ui_demo.run_dir
    pred = pd.read_parquet(run / "predictions.parquet")
    det = pd.read_parquet(run / "detections.parquet")
    images = pd.read_parquet(run / "images.parquet")
    ok = images.loc[images["status"] == "ok", "image_id"]
    assert len(pred) == 100 * len(ok)
    assert pred.groupby("image_id")["query_idx"].apply(list).map(lambda q: q == list(range(100))).all()
    assert pred["image_id"].is_monotonic_increasing
    assert dict(pred.dtypes.astype(str)) == {"image_id": "int64", "query_idx": "int16", "x1": "float32",
                                             "y1": "float32", "x2": "float32", "y2": "float32", "p_person": "float32",
                                             "label": "int16", "label_score": "float32"}
    assert pred["label"].between(0, 90).all()
    person = pred["label"] == 1
    assert (pred.loc[person, "label_score"] == pred.loc[person, "p_person"]).all()
    assert (pred["label_score"] >= pred["p_person"]).all()
    both = det.merge(pred, on=["image_id", "query_idx"], suffixes=("", "_pred"), validate="one_to_one")
    assert len(both) == len(det) > 0
    for c in ("x1", "y1", "x2", "y2"):
        assert (both[c] == both[f"{c}_pred"]).all()
    assert (both["score"] == both["p_person"]).all()
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["files"]["predictions.parquet"] == (run / "predictions.parquet").stat().st_size
    persons = pd.read_parquet(run / "persons.parquet")
    from index.audit import run_audit
    audit = run_audit(run)
    assert len(audit) == int(persons["evaluated"].sum())
    assert audit["ar"].mean() == pytest.approx(coco_ar100(persons[persons["evaluated"]], pred, ok), abs=1e-6)


def test_mean_ar_equals_pycocotools_on_a_synthetic_run(tmp_path):
    from index import write_synthetic_run
    from index.audit import run_audit
    run = write_synthetic_run(tmp_path / "run", 1200, seed=4)
    persons = pd.read_parquet(run / "persons.parquet")
    images = pd.read_parquet(run / "images.parquet")
    pred = pd.read_parquet(run / "predictions.parquet")
    audit = run_audit(run)
    assert len(audit) == int(persons["evaluated"].sum()) and audit["ar"].between(0.2, 0.9).all() is not None
    ref = coco_ar100(persons[persons["evaluated"]], pred, images.loc[images["status"] == "ok", "image_id"])
    assert 0.3 < ref < 0.9
    assert audit["ar"].mean() == pytest.approx(ref, abs=1e-6)
