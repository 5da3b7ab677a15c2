"""Box conversion, IoU and the one-to-one matching with fallback rows."""
import numpy as np
import torch

from extractor.matching import (box_iou, cxcywh_to_xyxy_pixels, match_image, match_max_iou,
                                person_probability, xywh_to_xyxy)


def test_box_conversions():
    xyxy = cxcywh_to_xyxy_pixels(np.array([[0.5, 0.5, 0.5, 1.0]]), width=200, height=100)
    np.testing.assert_allclose(xyxy, [[50, 0, 150, 100]])
    np.testing.assert_allclose(xywh_to_xyxy([[10, 20, 30, 40]]), [[10, 20, 40, 60]])


def test_iou_known_values():
    a = np.array([[0, 0, 10, 10]])
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 0, 0]])
    np.testing.assert_allclose(box_iou(a, b), [[1.0, 50 / 150, 0.0, 0.0]])


def test_person_probability_is_softmax_over_all_classes():
    logits = torch.zeros(1, 92)
    logits[0, 1] = np.log(91.0 * 3)   # p(person) = 273 / (273 + 91) = 0.75
    assert abs(float(person_probability(logits)[0]) - 0.75) < 1e-6


def test_hungarian_prefers_total_iou_and_respects_threshold():
    iou = np.array([[0.9, 0.6], [0.8, 0.1]])
    # Greedy would give (0,0) and leave row 1 with 0.1; the optimum pairs (0,1),(1,0).
    assert sorted(match_max_iou(iou, 0.5)) == [(0, 1), (1, 0)]
    # Pairs below the threshold never count, even when the solver could use them.
    assert match_max_iou(np.array([[0.4]]), 0.5) == []


def test_match_image_rows_detected_and_fallback():
    Q = 6
    scores = np.array([0.95, 0.9, 0.2, 0.1, 0.8, 0.05])
    boxes = np.array([[0, 0, 10, 10], [100, 100, 110, 110], [50, 50, 60, 62],
                      [49, 49, 61, 61], [200, 200, 210, 210], [0, 0, 1, 1]], float)
    gt = np.array([[0, 0, 10, 11], [50, 50, 60, 60]], float)   # person 1 is missed by kept queries
    m = match_image(scores, boxes, gt, threshold=0.7)
    rows = {int(q): (int(p), bool(d)) for q, p, d in zip(m.query_idx, m.person_idx, m.detected)}
    # kept: 0 (matched to person 0), 1 and 4 (no person); fallback for person 1: the best non-kept query
    assert rows[0] == (0, True) and rows[1] == (-1, True) and rows[4] == (-1, True)
    # query 2 overlaps person 1 most among the non-kept queries (IoU 100/120 against 100/144)
    assert rows[2] == (1, False) and 3 not in rows
    assert list(m.query_idx) == sorted(m.query_idx)
    assert np.isnan(m.iou[list(m.query_idx).index(1)])
    assert len(m.query_idx) == len(set(m.query_idx)) == 4


def test_fallback_is_one_to_one_for_two_missed_persons():
    scores = np.zeros(4)
    boxes = np.array([[0, 0, 10, 10], [1, 1, 10, 10], [100, 100, 101, 101], [200, 200, 201, 201]], float)
    gt = np.array([[0, 0, 10, 10], [1, 1, 10, 10]], float)
    m = match_image(scores, boxes, gt, threshold=0.7)
    assert sorted(zip(m.query_idx.tolist(), m.person_idx.tolist())) == [(0, 0), (1, 1)]
    assert not m.detected.any()
