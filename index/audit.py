"""Detection audit under the COCO protocol: per-person average recall (DESIGN §6).

Person detections of an image are the queries whose ``label`` (argmax over the 91 real
classes) is person, scored by ``label_score``: what DETR's PostProcess hands pycocotools.
At most ``MAX_DETS`` per image, by descending score. They are matched to *all* annotated
persons of the image as ``COCOeval.evaluateImg`` does (iscrowd 0, area range all), at
each IoU threshold t separately: detections in descending score (ties keep query order,
COCOeval's stable mergesort over the results list), each to the not-yet-matched person
of highest IoU >= t; among equal IoUs the *last* person in annotation order wins (the
``ious < iou: continue`` comparison lets an equal IoU replace the best so far). IoU is
pycocotools' ``bbIou`` on (x, y, w, h) pixel boxes, no +1.

Per person: matched at each of the ten thresholds, ``ar`` = their mean, ``recall50``,
``recall75``. The mean ``ar`` over all persons equals COCOeval's AR@100 (area all,
person category, ``stats[8]``), tested against pycocotools.

Vectorised over images: the greedy is sequential only in a detection's rank among its
image's candidate detections (those with IoU >= 0.5 to someone), so step r handles the
r-th candidate of every image at once, all thresholds together.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from extractor.matching import PERSON_CLASS
from extractor.rundir import open_run

log = logging.getLogger(__name__)

# Exactly COCOeval's Params.iouThrs (np.linspace, so 0.7000000000000001 and the like).
IOU_THRESHOLDS = np.linspace(.5, 0.95, int(np.round((0.95 - .5) / .05)) + 1, endpoint=True)
MAX_DETS = 100
MATCH_COLUMNS = tuple(f"matched_{round(100 * t)}" for t in IOU_THRESHOLDS)
AUDIT_METRICS = ("ar", "recall50", "recall75")
PROTOCOLS = {
    "ar": "COCO AR@100 IoU .50:.05:.95 (area all, label = person, scored by label_score)",
    "recall50": "COCO recall@100 IoU .50 (area all, label = person, scored by label_score)",
    "recall75": "COCO recall@100 IoU .75 (area all, label = person, scored by label_score)",
    "recall": "kept detection (P(person) >= threshold) matched at IoU 0.5 (Hungarian)",
}
_BOX = ("x1", "y1", "x2", "y2")


def coco_iou(dt: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """pycocotools' bbIou for aligned pairs of xyxy boxes: [K, 4] x [K, 4] -> [K] float64.

    The boxes become (x, y, w, h) with w = x2 - x1 in float32, as DETR's evaluator
    converts them before ``tolist()``; then pycocotools' double arithmetic: overlap
    w = min(x + w) - max(x), zero when w <= 0 or h <= 0. So thresholds compare exactly
    as in COCOeval.
    """
    d32 = np.asarray(dt, dtype=np.float32).reshape(-1, 4)
    g32 = np.asarray(gt, dtype=np.float32).reshape(-1, 4)
    d, g = d32.astype(np.float64), g32.astype(np.float64)
    dw, dh = (d32[:, 2] - d32[:, 0]).astype(np.float64), (d32[:, 3] - d32[:, 1]).astype(np.float64)
    gw, gh = (g32[:, 2] - g32[:, 0]).astype(np.float64), (g32[:, 3] - g32[:, 1]).astype(np.float64)
    w = np.minimum(d[:, 0] + dw, g[:, 0] + gw) - np.maximum(d[:, 0], g[:, 0])
    h = np.minimum(d[:, 1] + dh, g[:, 1] + gh) - np.maximum(d[:, 1], g[:, 1])
    inter = w * h
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = inter / (dw * dh + gw * gh - inter)
    return np.where((w > 0) & (h > 0), iou, 0.0)


def _ragged_pairs(det_start: np.ndarray, det_count: np.ndarray, gt_start: np.ndarray,
                  gt_count: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All (det, gt) index pairs of each image: images given by contiguous ranges."""
    n_pairs = det_count * gt_count
    img = np.repeat(np.arange(len(det_count)), n_pairs)
    within = np.arange(n_pairs.sum()) - np.repeat(np.cumsum(n_pairs) - n_pairs, n_pairs)
    gc = gt_count[img]
    return det_start[img] + within // gc, gt_start[img] + within % gc


def coco_matches(det_image: np.ndarray, det_score: np.ndarray, det_box: np.ndarray,
                 gt_image: np.ndarray, gt_box: np.ndarray, det_order: np.ndarray | None = None,
                 thresholds: np.ndarray = IOU_THRESHOLDS, max_dets: int = MAX_DETS) -> np.ndarray:
    """Which ground-truth boxes COCOeval matches at each threshold: bool [G, T].

    det_image [D], det_score [D], det_box [D, 4] xyxy pixels, float32 (one category already);
    gt_image [G], gt_box [G, 4]; the gt order within an image is their order here.
    det_order [D]: position of a detection in the results list (ties in score keep it;
    default: the given order).
    """
    det_image, gt_image = np.asarray(det_image), np.asarray(gt_image)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    D, G, T = len(det_image), len(gt_image), len(thresholds)
    matched = np.zeros((T, G), dtype=bool)
    if D == 0 or G == 0:
        return matched.T
    # Three stable passes (query order, then score, then image): much faster than lexsort
    # on mixed dtypes; the first is skipped when the rows already come in query order.
    d_sort = np.arange(D)
    if det_order is not None:
        d_sort = np.argsort(np.asarray(det_order), kind="stable")
    d_sort = d_sort[np.argsort(-np.asarray(det_score, dtype=np.float64)[d_sort], kind="stable")]
    d_sort = d_sort[np.argsort(det_image[d_sort], kind="stable")]
    d_img = det_image[d_sort]
    d_first = np.r_[True, d_img[1:] != d_img[:-1]]
    d_start_of = np.maximum.accumulate(np.where(d_first, np.arange(D), 0))
    top = (np.arange(D) - d_start_of) < max_dets
    d_sort, d_img = d_sort[top], d_img[top]

    g_sort = np.argsort(gt_image, kind="stable")
    g_img = gt_image[g_sort]
    images, d_start, d_count = np.unique(d_img, return_index=True, return_counts=True)
    g_lo, g_hi = np.searchsorted(g_img, images, "left"), np.searchsorted(g_img, images, "right")
    pd_, pg = _ragged_pairs(d_start, d_count, g_lo, g_hi - g_lo)  # positions in d_sort / g_sort
    det_box = np.ascontiguousarray(det_box, dtype=np.float32)[d_sort]
    gt_box = np.ascontiguousarray(gt_box, dtype=np.float32)[g_sort]
    iou = coco_iou(det_box[pd_], gt_box[pg])
    keep = iou >= min(thresholds.min(), 1 - 1e-10)
    pd_, pg, iou = pd_[keep], pg[keep], iou[keep]
    if len(pd_) == 0:
        return matched.T

    # Step of a candidate detection = its rank among its image's candidates.
    cand, pair_cand = np.unique(pd_, return_inverse=True)
    c_img = d_img[cand]
    c_first = np.r_[True, c_img[1:] != c_img[:-1]]
    step = np.arange(len(cand)) - np.maximum.accumulate(np.where(c_first, np.arange(len(cand)), 0))
    pair_step = step[pair_cand]
    order = np.argsort(pair_step, kind="stable")  # within a step: by detection, then gt order
    pd_, pg, iou, pair_step = pd_[order], pg[order], iou[order], pair_step[order]
    bounds = np.searchsorted(pair_step, np.arange(pair_step[-1] + 2))
    thr = np.minimum(thresholds, 1 - 1e-10)[:, None]
    for s in range(len(bounds) - 1):
        lo, hi = bounds[s], bounds[s + 1]
        dets, gts, v = pd_[lo:hi], pg[lo:hi], iou[lo:hi]
        seg = np.flatnonzero(np.r_[True, dets[1:] != dets[:-1]])
        eligible = (v[None, :] >= thr) & ~matched[:, gts]  # [T, k]
        key = np.where(eligible, v[None, :], -1.0)
        best_iou = np.maximum.reduceat(key, seg, axis=1)
        seg_of = np.repeat(np.arange(len(seg)), np.diff(np.r_[seg, len(dets)]))
        is_best = eligible & (key == best_iou[:, seg_of])
        # The last gt (in annotation order) of equal IoU wins, as in COCOeval.
        last = np.maximum.reduceat(np.where(is_best, np.arange(len(dets))[None, :], -1), seg, axis=1)
        t_idx, s_idx = np.nonzero(last >= 0)
        matched[t_idx, gts[last[t_idx, s_idx]]] = True
    # g_sort positions back to the caller's gt order
    out = np.zeros((G, T), dtype=bool)
    out[g_sort] = matched.T
    return out


def read_predictions(run_dir: Path | str) -> pd.DataFrame:
    """The run's predictions table, or a one-line ValueError saying to re-extract (through
    the run-format reader, which checks the table against its schema)."""
    return open_run(run_dir, check=False).predictions()


def person_audit(persons: pd.DataFrame, predictions: pd.DataFrame, ok_images: np.ndarray | None = None,
                 max_dets: int = MAX_DETS) -> pd.DataFrame:
    """Per-person COCO matches of the evaluated persons.

    persons: person_id, image_id, gt_x1..gt_y2 (and ``evaluated`` if ``ok_images`` is
    None); predictions: the run's predictions table. Persons on images that are not ok
    are left out; every other person is ground truth for every detection of the image.
    Returns one row per evaluated person (in the given order): person_id, image_id,
    matched_50 .. matched_95 (bool), ar, recall50, recall75.
    """
    if ok_images is None:
        keep = persons["evaluated"].to_numpy(dtype=bool, na_value=False)
    else:
        keep = persons["image_id"].isin(np.asarray(ok_images)).to_numpy()
    p = persons[keep]
    dets = predictions[predictions["label"].to_numpy() == PERSON_CLASS]
    flags = coco_matches(
        dets["image_id"].to_numpy(), dets["label_score"].to_numpy(), dets[list(_BOX)].to_numpy(),
        p["image_id"].to_numpy(), p[[f"gt_{c}" for c in _BOX]].to_numpy(),
        det_order=dets["query_idx"].to_numpy(), max_dets=max_dets)
    out = pd.DataFrame({"person_id": p["person_id"].to_numpy(), "image_id": p["image_id"].to_numpy()})
    for j, col in enumerate(MATCH_COLUMNS):
        out[col] = flags[:, j]
    out["ar"] = flags.mean(axis=1)
    out["recall50"] = flags[:, 0].astype(np.float64)
    out["recall75"] = flags[:, 5].astype(np.float64)
    return out


def matched_flags(audit: pd.DataFrame) -> np.ndarray:
    """bool [n, 10]: the per-threshold flags of a ``person_audit`` frame."""
    return audit[list(MATCH_COLUMNS)].to_numpy(dtype=bool)


def run_audit(run_dir: Path | str, persons: pd.DataFrame | None = None) -> pd.DataFrame:
    """``person_audit`` of a run directory (its persons, predictions and image statuses)."""
    files = open_run(run_dir, check=False)
    predictions = files.predictions()
    persons = files.persons() if persons is None else persons
    images = files.images()
    return person_audit(persons, predictions, images.loc[images["status"] == "ok", "image_id"].to_numpy())
