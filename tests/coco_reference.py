"""pycocotools' COCOeval as the independent reference for the detection audit."""
from __future__ import annotations

import contextlib
import io

import numpy as np
import pandas as pd


def _xywh(box: np.ndarray) -> np.ndarray:
    """float32 xyxy -> xywh as DETR's evaluator converts it (in float32), then as Python floats."""
    b = np.asarray(box, dtype=np.float32).reshape(-1, 4)
    return np.c_[b[:, :2], b[:, 2:] - b[:, :2]].astype(np.float64)


def coco_ar100(persons: pd.DataFrame, predictions: pd.DataFrame, image_ids) -> float:
    """COCOeval AR@100 (area all, person category, ``stats[8]``) of person-labelled predictions.

    persons: image_id, gt_x1..gt_y2 (annotation order = row order); predictions: image_id,
    query_idx, x1..y2, label, label_score; results are listed by (image_id, query_idx),
    as DETR's evaluator lists them. Annotation ids start at 1 (COCOeval treats id 0 as
    unmatched).
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt_box = _xywh(persons[["gt_x1", "gt_y1", "gt_x2", "gt_y2"]].to_numpy())
    dataset = {
        "images": [{"id": int(i)} for i in image_ids],
        "categories": [{"id": 1, "name": "person"}],
        "annotations": [{"id": k + 1, "image_id": int(i), "category_id": 1, "bbox": gt_box[k].tolist(),
                         "area": float(gt_box[k, 2] * gt_box[k, 3]), "iscrowd": 0}
                        for k, i in enumerate(persons["image_id"].to_numpy())],
    }
    pred = predictions[predictions["label"] == 1].sort_values(["image_id", "query_idx"], kind="stable")
    dt_box = _xywh(pred[["x1", "y1", "x2", "y2"]].to_numpy())
    results = [{"image_id": int(i), "category_id": 1, "bbox": dt_box[k].tolist(), "score": float(s)}
               for k, (i, s) in enumerate(zip(pred["image_id"].to_numpy(), pred["label_score"].to_numpy()))]
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = dataset
        gt.createIndex()
        dt = gt.loadRes(results) if results else COCO()
        if not results:
            dt.dataset = {"images": dataset["images"], "categories": dataset["categories"], "annotations": []}
            dt.createIndex()
        ev = COCOeval(gt, dt, "bbox")
        ev.params.catIds = [1]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[8])
