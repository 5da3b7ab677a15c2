"""Turning finished shards into the run directory's final files and manifest (DESIGN §5)."""
from __future__ import annotations

import logging
import time

import numpy as np
import pandas as pd

from . import rundir
from .checkpoints import LoadedCheckpoint
from .datasets import Dataset
from .features import POOLING_RULE, feature_dtype, feature_files, feature_shape
from .groups import ATTRIBUTE_COLUMNS
from .plan import Plan
from .preprocess import IMAGENET_MEAN, IMAGENET_STD
from .settings import ExtractSettings

log = logging.getLogger(__name__)

EMBEDDING_DIM = 256
DETECTION_COLUMNS = ("det_id", "image_id", "filename", "query_idx", "score", "x1", "y1", "x2", "y2",
                     "person_id", "iou", "detected", "matched", "has_person")
def assemble_rows(plan: Plan, shards: list[dict]) -> tuple[pd.DataFrame, np.ndarray, pd.DataFrame]:
    """(rows sorted by image and query, their embeddings, image statuses) from the shards."""
    rows, emb, status, _ = assemble_with_features(plan, shards, ())
    return rows, emb, status


def assemble_with_features(plan: Plan, shards: list[dict], files: list[str] | tuple[str, ...]
                           ) -> tuple[pd.DataFrame, np.ndarray, pd.DataFrame, dict[str, np.ndarray]]:
    """``assemble_rows`` plus the feature files' arrays in the same row order."""
    frames, embs, statuses = [], [], []
    feats: dict[str, list[np.ndarray]] = {f: [] for f in files}
    for sh in shards:
        statuses.append(sh["status"])
        if sh["rows"] is not None:
            frames.append(sh["rows"])
            embs.append(sh["embeddings"])
            for f in files:
                feats[f].append(sh["features"][f])
    status = pd.concat(statuses, ignore_index=True) if statuses else pd.DataFrame(columns=["image_id", "status"])
    if not frames:
        empty = {f: np.zeros((0, *feature_shape(f)), feature_dtype(f)) for f in files}
        return pd.DataFrame(), np.zeros((0, EMBEDDING_DIM), np.float32), status, empty
    rows = pd.concat(frames, ignore_index=True)
    emb = np.concatenate(embs).astype(np.float32, copy=False)
    order = np.lexsort((rows["query_idx"].to_numpy(), rows["image_id"].to_numpy()))
    arrays = {f: np.ascontiguousarray(np.concatenate(v)[order]) for f, v in feats.items()}
    return rows.iloc[order].reset_index(drop=True), emb[order], status, arrays


def assemble_predictions(shards: list[dict]) -> pd.DataFrame:
    """Every query of every readable image, sorted by (image_id, query_idx)."""
    columns = rundir.SCHEMAS[rundir.PREDICTIONS]
    frames = [sh["predictions"] for sh in shards if sh.get("predictions") is not None]
    if not frames:
        return pd.DataFrame({c.name: pd.Series(dtype=c.dtype) for c in columns})
    pred = pd.concat(frames, ignore_index=True)[[c.name for c in columns]]
    order = np.lexsort((pred["query_idx"].to_numpy(), pred["image_id"].to_numpy()))
    return pred.iloc[order].reset_index(drop=True)


def _attributes_for(rows: pd.DataFrame, persons: pd.DataFrame) -> pd.DataFrame:
    """The person's attribute columns per row; rows without a person get neutral values
    (flags False, counts 0, modes/bands 'unknown', mst_mode NA) so they fall in 'unknown'."""
    attrs = persons.set_index("person_id")[list(ATTRIBUTE_COLUMNS)]
    joined = attrs.reindex(rows["person_id"].astype("Int64").to_numpy())
    joined.index = rows.index
    for col in ATTRIBUTE_COLUMNS:
        src = persons[col]
        if col == "mst_mode":
            joined[col] = joined[col].astype("Int8")
        elif src.dtype == bool:
            joined[col] = joined[col].fillna(False).astype(bool)
        elif pd.api.types.is_integer_dtype(src.dtype):
            joined[col] = joined[col].fillna(0).astype(src.dtype)
        else:
            fill = "" if col in ("class1", "class2") else "unknown"
            joined[col] = joined[col].fillna(fill).astype(str)
    return joined


def build_tables(plan: Plan, rows: pd.DataFrame, status: pd.DataFrame):
    """detections, persons and images tables of the run (det_id = row order)."""
    st = dict(zip(status["image_id"], status["status"]))
    images = plan.images.copy()
    images["status"] = [st.get(i, s) for i, s in zip(images["image_id"], images["status"])]

    if rows.empty:
        rows = pd.DataFrame({c: pd.Series(dtype=t) for c, t in (
            ("image_id", "int64"), ("query_idx", "int16"), ("score", "float32"), ("x1", "float32"),
            ("y1", "float32"), ("x2", "float32"), ("y2", "float32"), ("person_id", "Int64"),
            ("iou", "float32"), ("detected", "bool"))})
    det = rows.copy()
    det.insert(0, "det_id", np.arange(len(det), dtype=np.int64))
    det.insert(2, "filename", det["image_id"].map(dict(zip(images["image_id"], images["filename"]))).astype(str))
    det["has_person"] = det["person_id"].notna().to_numpy(bool)
    det["matched"] = det["detected"].to_numpy(bool) & det["has_person"].to_numpy(bool)
    det = det[list(DETECTION_COLUMNS)]
    det = pd.concat([det, _attributes_for(det, plan.persons)], axis=1)

    persons = plan.persons.copy()
    ok_images = set(images.loc[images["status"] == "ok", "image_id"])
    persons["evaluated"] = persons["image_id"].isin(ok_images)
    by_person = det[det["has_person"]].set_index("person_id")
    emb_row = by_person["det_id"].reindex(persons["person_id"].to_numpy())
    persons["detected"] = by_person["matched"].reindex(persons["person_id"].to_numpy()).fillna(False) \
        .astype(bool).to_numpy()
    persons["det_id"] = pd.array(np.where(persons["detected"], emb_row.to_numpy(dtype=float), np.nan),
                                 dtype="Float64").astype("Int64")
    persons["embedding_det_id"] = pd.array(emb_row.to_numpy(dtype=float), dtype="Float64").astype("Int64")
    persons["best_iou"] = by_person["iou"].reindex(persons["person_id"].to_numpy()).to_numpy(np.float32)
    persons["best_score"] = by_person["score"].reindex(persons["person_id"].to_numpy()).to_numpy(np.float32)

    n_rows = det.groupby("image_id").size()
    n_det = det[det["detected"]].groupby("image_id").size()
    n_persons = plan.persons.groupby("image_id").size()
    for col, counts in (("n_persons", n_persons), ("n_detections", n_det), ("n_rows", n_rows)):
        images[col] = images["image_id"].map(counts).fillna(0).astype(np.int32)
    images = images[["image_id", "filename", "path", "width", "height", "status",
                     "n_persons", "n_detections", "n_rows"]]
    return det, persons.reset_index(drop=True), images.reset_index(drop=True)


def write_outputs(s: ExtractSettings, plan: Plan, dataset: Dataset, ckpt: LoadedCheckpoint, shards: list[dict],
                  fields: dict, fp: str, timings: dict, t0: float) -> dict:
    """Assemble the shards and write the run through the run-format writer; -> manifest dict."""
    files = feature_files(s.features)
    rows, emb, status, arrays = assemble_with_features(plan, shards, files)
    det, persons, images = build_tables(plan, rows, status)
    pred = assemble_predictions(shards)
    by_file = {space.file: name for name, space in rundir.FEATURE_SPACES.items()}
    features = {by_file[f]: arr for f, arr in arrays.items()}
    skipped_counts: dict[str, int] = {}
    for row in plan.skipped:
        kind = row.reason.split(":", 1)[0]
        skipped_counts[kind] = skipped_counts.get(kind, 0) + 1
    manifest = rundir.Manifest(
        kind="extracted",
        settings_fingerprint=fp,
        settings=fields,
        embedding_dim=EMBEDDING_DIM,
        threshold=s.threshold,
        min_iou=s.min_iou,
        model={"architecture": "DETR", "backbone": ckpt.backbone, "dilation": ckpt.dilation,
               "num_queries": rundir.NUM_QUERIES, "num_classes": 91, "person_class": 1},
        checkpoint={"spec": s.checkpoint, "name": ckpt.name, "source": ckpt.source, "sha256": ckpt.sha256,
                    "untrained": ckpt.untrained, "seed": ckpt.seed},
        preprocessing={"min_size": s.min_size, "max_size": s.max_size, "mean": IMAGENET_MEAN,
                       "std": IMAGENET_STD, "resize": "PIL bilinear", "jpeg_draft": s.draft,
                       "device": s.device, "precision": s.precision, "batch_size": s.batch_size,
                       **({"feature_pooling": POOLING_RULE} if features else {})},
        perturbation=s.perturb.to_manifest(draft=s.draft),
        dataset={"root": str(dataset.root), "format": dataset.format, "annotations": str(dataset.annotations),
                 "annotations_sha256": plan.annotations_sha256, "rows_read": dataset.rows_read,
                 "persons_valid": len(dataset.persons), "images": len(dataset.images),
                 "skipped_rows": len(plan.skipped), "skipped_by_reason": skipped_counts,
                 "skipped_examples": [{"where": r.where, "reason": r.reason} for r in plan.skipped[:20]]},
        filters={"where": s.where, "limit": s.limit, "persons_selected": plan.n_selected_persons},
        timings=dict(timings, total_s=round(time.perf_counter() - t0, 3)),
    )
    written = rundir.write_run(s.out, manifest, images=images, persons=persons, detections=det, embeddings=emb,
                               predictions=pred, features=features)
    c = written.counts
    log.info("done: %d images (%d failed), %d persons, %d detected, %d kept detections, %d rows -> %s",
             c["images"], c["images_failed"], c["persons"], c["persons_detected"], c["detections_kept"],
             c["rows"], s.out)
    return written.to_json()
