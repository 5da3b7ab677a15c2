"""Post-processing of DETR outputs: scores, boxes in pixels, matching to annotated persons.

Kept detections (person probability >= threshold) are matched one-to-one to the
image's annotated persons by maximum total IoU (Hungarian), a pair counting only at
IoU >= ``min_iou``. Every annotated person left unmatched gets a fallback query: among
the queries that were not kept, the one-to-one assignment of maximum IoU, so a missed
person keeps an embedding of what the detector "saw" there and every (image, query)
pair appears at most once in the run.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

PERSON_CLASS = 1


def person_probability(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over all 92 logits (no-object included), person column. [..., 92] -> [...]"""
    return logits.float().softmax(-1)[..., PERSON_CLASS]


def class_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over all 92 logits (no-object last), float32. [..., 92] -> [..., 92]

    Its person column is bitwise ``person_probability``: kept rows and predictions agree.
    """
    return logits.float().softmax(-1)


def query_predictions(image_id: int, probs: np.ndarray, boxes_xyxy: np.ndarray) -> dict[str, np.ndarray]:
    """Every query's prediction of one image, as DETR's PostProcess hands it to pycocotools.

    probs: [Q, 92] class probabilities (``class_probabilities``); boxes_xyxy: [Q, 4] pixels
    of the original image. Columns (each [Q]): image_id, query_idx (int16), x1..y2 and
    p_person (probability of class 1) as float32, label = argmax over the 91 real classes
    (no-object excluded, int16 as the run schema has it) and label_score = its probability (float32).
    """
    probs = np.asarray(probs, dtype=np.float32)
    q = len(probs)
    real = probs[:, :-1]
    label = real.argmax(axis=1)
    box = np.asarray(boxes_xyxy).astype(np.float32)
    return {
        "image_id": np.full(q, image_id, dtype=np.int64), "query_idx": np.arange(q, dtype=np.int16),
        "x1": box[:, 0], "y1": box[:, 1], "x2": box[:, 2], "y2": box[:, 3],
        "p_person": probs[:, PERSON_CLASS].copy(), "label": label.astype(np.int16),
        "label_score": real[np.arange(q), label].astype(np.float32),
    }


def cxcywh_to_xyxy_pixels(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """Normalised (cx, cy, w, h) [N, 4] -> pixel (x1, y1, x2, y2) [N, 4] of a width x height image."""
    boxes = np.asarray(boxes, dtype=np.float64)
    cx, cy, w, h = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    out = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    return out * np.array([width, height, width, height], dtype=np.float64)


def xywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    """(x, y, width, height) [N, 4] -> (x1, y1, x2, y2) [N, 4]."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], axis=1)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every pair of xyxy boxes: [N, 4] x [M, 4] -> [N, M] (0 for empty boxes)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, inter / union, 0.0)
    return iou


def match_max_iou(iou: np.ndarray, min_iou: float = 0.0) -> list[tuple[int, int]]:
    """One-to-one assignment maximising total IoU over pairs with IoU >= min_iou.

    iou: [N, M]. Returns (row, col) pairs, each with IoU >= min_iou (and > 0 when
    min_iou is 0, so that an empty overlap never counts as a match).
    """
    if iou.size == 0:
        return []
    eligible = iou >= min_iou if min_iou > 0 else iou > 0
    # Ineligible pairs weigh 0 so the solver never trades a real match for one.
    weight = np.where(eligible, iou, 0.0)
    rows, cols = linear_sum_assignment(weight, maximize=True)
    return [(int(r), int(c)) for r, c in zip(rows, cols) if eligible[r, c]]


@dataclass(frozen=True)
class ImageMatch:
    """Rows kept for one image; arrays are aligned (one entry per kept row)."""
    query_idx: np.ndarray    # [R] int, DETR query of the row
    person_idx: np.ndarray   # [R] int, index into the image's persons, -1 for none
    iou: np.ndarray          # [R] float, IoU with that person (NaN for none)
    detected: np.ndarray     # [R] bool, score >= threshold


def match_image(scores: np.ndarray, boxes_xyxy: np.ndarray, gt_xyxy: np.ndarray,
                threshold: float, min_iou: float = 0.5) -> ImageMatch:
    """Choose and label the rows of one image.

    scores: [Q] person probabilities; boxes_xyxy: [Q, 4] pixels; gt_xyxy: [P, 4] pixels.
    Rows: every kept query (matched to a person or not), then one fallback query for
    each person no kept query matched (best one-to-one IoU among the other queries).
    Rows come out sorted by query index.
    """
    scores = np.asarray(scores)
    kept = np.flatnonzero(scores >= threshold)
    n_persons = len(gt_xyxy)
    iou_all = box_iou(boxes_xyxy, gt_xyxy) if n_persons else np.zeros((len(scores), 0))

    person_of = {int(q): -1 for q in kept}
    for r, c in match_max_iou(iou_all[kept], min_iou):
        person_of[int(kept[r])] = c

    missed = sorted(set(range(n_persons)) - {p for p in person_of.values() if p >= 0})
    if missed:
        others = np.setdiff1d(np.arange(len(scores)), kept)
        sub = iou_all[np.ix_(others, missed)]
        # Any overlap, even zero, is acceptable here: the row exists to keep the person.
        rows, cols = linear_sum_assignment(sub, maximize=True)
        # With more persons than free queries (crowds over ~100 people) the rest get
        # no row; the pipeline reports them as evaluated but without an embedding.
        for r, c in zip(rows, cols):
            person_of[int(others[r])] = missed[c]

    queries = np.array(sorted(person_of), dtype=np.int64)
    persons = np.array([person_of[q] for q in queries], dtype=np.int64)
    ious = np.array([iou_all[q, p] if p >= 0 else np.nan for q, p in zip(queries, persons)],
                    dtype=np.float64)
    return ImageMatch(queries, persons, ious, scores[queries] >= threshold)
