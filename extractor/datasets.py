"""Readers for FACET (release CSV or COCO-style json) into one per-person table.

Both formats become a :class:`Dataset`: ``persons`` (one row per annotated person, with
pixel box ``gt_x1..gt_y2`` and the raw + derived attribute columns of
:mod:`extractor.groups`) and ``images`` (one row per image, found by file name anywhere
under the root). Malformed rows are skipped and reported with their line or annotation
id; missing columns or an unknown layout raise before any work.
"""
from __future__ import annotations

import ast
import json
import logging
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .groups import ATTRIBUTE_COLUMNS, REQUIRED_ATTRIBUTE_COLUMNS, RAW_ATTRIBUTE_COLUMNS, derive_groups
from .where import evaluate_where

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
FACET_ID_COLUMNS = ("person_id", "filename", "bounding_box")
PERSON_COLUMNS = ("person_id", "image_id", "filename", "gt_x1", "gt_y1", "gt_x2", "gt_y2") + ATTRIBUTE_COLUMNS


@dataclass(frozen=True)
class SkippedRow:
    where: str   # "line 17" (FACET csv) or "annotation 123" (COCO json)
    reason: str


@dataclass(frozen=True)
class Dataset:
    root: Path
    format: str                 # "facet" or "coco"
    annotations: Path
    persons: pd.DataFrame       # PERSON_COLUMNS
    images: pd.DataFrame        # image_id, filename, path ("" when not found), json_width, json_height
    skipped: tuple[SkippedRow, ...] = field(default=())
    rows_read: int = 0

    def skipped_counts(self) -> dict[str, int]:
        return dict(Counter(_reason_kind(s.reason) for s in self.skipped))


def _reason_kind(reason: str) -> str:
    return reason.split(":", 1)[0]


def find_annotations(root: Path, annotations: Path | None = None) -> tuple[str, Path]:
    """(format, annotation file) for a dataset root, or a ValueError saying what is there."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"dataset root {root} is not a directory")
    if annotations is not None:
        path = Path(annotations)
        path = path if path.is_absolute() or path.exists() else root / path
        if not path.is_file():
            raise ValueError(f"annotation file {path} does not exist")
        if path.suffix.lower() == ".csv":
            return "facet", path
        if path.suffix.lower() == ".json":
            return "coco", path
        raise ValueError(f"unknown annotation format {path.name}: expected a FACET .csv or a COCO .json")
    for rel in ("annotations.csv", "annotations/annotations.csv"):
        if (root / rel).is_file():
            return "facet", root / rel
    jsons = sorted(p for d in (root, root / "annotations") if d.is_dir()
                   for p in d.glob("*.json") if p.name != "coco_boxes.json")
    if len(jsons) == 1:
        return "coco", jsons[0]
    if len(jsons) > 1:
        names = ", ".join(str(p.relative_to(root)) for p in jsons)
        raise ValueError(f"several annotation files under {root} ({names}): choose one with --annotations")
    raise ValueError(
        f"no annotations under {root}: expected annotations.csv (FACET release) or one COCO-style "
        f"json (e.g. annotations/instances_all.json); pass --annotations FILE to name it"
    )


def index_image_files(root: Path) -> dict[str, str]:
    """Map file name -> path relative to root for every image below root.

    FACET ships its images in several folders, so they are found by name; when a name
    occurs twice the first in sorted path order wins.
    """
    found: dict[str, str] = {}
    dups = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if Path(name).suffix.lower() not in IMAGE_SUFFIXES:
                continue
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            if name in found:
                dups += 1
                continue
            found[name] = rel
    if dups:
        log.warning("%d image file names occur more than once under %s; the first of each is used", dups, root)
    return found


def read_dataset(root: Path, annotations: Path | None = None) -> Dataset:
    """Read either format; the per-person table carries derived group columns."""
    root = Path(root).resolve()
    fmt, path = find_annotations(root, annotations)
    if fmt == "facet":
        raw, skipped, n_read = _read_facet_csv(path)
    else:
        raw, skipped, n_read = _read_coco_json(path)
    files = index_image_files(root)
    persons, images = _assemble(raw, files)
    log.info("%s: %d persons on %d images (%d rows skipped)", path.name, len(persons), len(images), len(skipped))
    return Dataset(root, fmt, path, persons, images, tuple(skipped), n_read)


# --- FACET release csv -------------------------------------------------------------

def _parse_box(text) -> tuple[float, float, float, float]:
    """FACET's ``{'x': .., 'y': .., 'width': .., 'height': ..}`` string -> (x, y, w, h)."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("empty bounding_box")
    try:
        box = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        try:
            box = json.loads(text)
        except json.JSONDecodeError:
            raise ValueError(f"bounding_box is not a dict: {text[:60]!r}") from None
    if not isinstance(box, dict) or not {"x", "y", "width", "height"} <= set(box):
        raise ValueError(f"bounding_box needs x, y, width, height: {text[:60]!r}")
    values = tuple(float(box[k]) for k in ("x", "y", "width", "height"))
    return _check_xywh(values)


def _check_xywh(values) -> tuple[float, float, float, float]:
    x, y, w, h = (float(v) for v in values)
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        raise ValueError("bounding box has a non-finite value")
    if w <= 0 or h <= 0:
        raise ValueError(f"bounding box has non-positive size {w:g}x{h:g}")
    return x, y, w, h


def _read_facet_csv(path: Path) -> tuple[pd.DataFrame, list[SkippedRow], int]:
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise ValueError(f"{path} is not a readable CSV: {str(exc).splitlines()[0]}") from None
    missing = [c for c in FACET_ID_COLUMNS + REQUIRED_ATTRIBUTE_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path.name} lacks {len(missing)} required FACET columns: {', '.join(missing)}")
    records, skipped = [], []
    for i, row in enumerate(df.to_dict("records")):
        where = f"line {i + 2}"   # the header is line 1
        try:
            records.append(_person_record(row, row["person_id"], row["filename"], _parse_box(row["bounding_box"])))
        except ValueError as exc:
            skipped.append(SkippedRow(where, str(exc)))
    return pd.DataFrame.from_records(records), skipped, len(df)


# --- COCO-style conversion ---------------------------------------------------------

def _read_coco_json(path: Path) -> tuple[pd.DataFrame, list[SkippedRow], int]:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise ValueError(f"{path.name} is not a COCO-style file: it needs 'images' and 'annotations' lists")
    anns = data["annotations"]
    seen_keys = set()
    for ann in anns:
        attrs = ann.get("attributes") if isinstance(ann, dict) else None
        seen_keys |= set(attrs) if isinstance(attrs, dict) else set()
    missing = [c for c in REQUIRED_ATTRIBUTE_COLUMNS if c not in seen_keys]
    if missing:
        raise ValueError(f"{path.name}: annotations' 'attributes' lack {len(missing)} required FACET "
                         f"columns: {', '.join(missing)}")
    person_cats = {c.get("id") for c in data.get("categories", []) if str(c.get("name", "")).lower() == "person"}
    images = {}
    for img in data["images"]:
        if isinstance(img, dict) and "id" in img and "file_name" in img:
            images[img["id"]] = img
    records, skipped = [], []
    for n, ann in enumerate(anns):
        where = f"annotation {ann.get('id', f'#{n}') if isinstance(ann, dict) else f'#{n}'}"
        try:
            if not isinstance(ann, dict):
                raise ValueError("annotation is not an object")
            if person_cats and ann.get("category_id") not in person_cats:
                raise ValueError(f"not a person: category {ann.get('category_id')}")
            img = images.get(ann.get("image_id"))
            if img is None:
                raise ValueError(f"unknown image_id {ann.get('image_id')!r}")
            bbox = ann.get("bbox")
            if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
                raise ValueError(f"bbox is not [x, y, width, height]: {bbox!r}")
            attrs = dict(ann.get("attributes") or {})
            for key in ("class1", "class2"):
                attrs.setdefault(key, ann.get(key, ""))
            pid = attrs.get("person_id", ann.get("person_id", ann.get("id")))
            rec = _person_record(attrs, pid, Path(str(img["file_name"])).name, _check_xywh(bbox))
            rec["json_image_id"] = int(img["id"])
            rec["json_width"], rec["json_height"] = img.get("width"), img.get("height")
            records.append(rec)
        except (ValueError, TypeError) as exc:
            skipped.append(SkippedRow(where, str(exc)))
    return pd.DataFrame.from_records(records), skipped, len(anns)


# --- shared --------------------------------------------------------------------------

def _person_record(row: dict, person_id, filename, xywh) -> dict:
    try:
        pid = int(str(person_id).strip())
    except ValueError:
        raise ValueError(f"person_id is not an integer: {person_id!r}") from None
    filename = str(filename).strip()
    if not filename:
        raise ValueError("empty filename")
    rec = {"person_id": pid, "filename": filename,
           "gt_x1": xywh[0], "gt_y1": xywh[1], "gt_x2": xywh[0] + xywh[2], "gt_y2": xywh[1] + xywh[3]}
    for col in RAW_ATTRIBUTE_COLUMNS:
        value = row.get(col, 0)
        value = 0 if value in ("", None) else value
        try:
            count = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{col} is not a number: {value!r}") from None
        if not math.isfinite(count) or count < 0:
            raise ValueError(f"{col} is negative or not finite: {value!r}")
        rec[col] = int(count)
    rec["class1"], rec["class2"] = str(row.get("class1", "") or ""), str(row.get("class2", "") or "")
    return rec


def _image_id_from_name(names: list[str]) -> dict[str, int]:
    """Stable ids: FACET's ``sa_<n>.jpg`` number when every name has one, else sorted order."""
    numbers = {n: re.fullmatch(r"sa_(\d+)\.\w+", n) for n in names}
    if names and all(numbers.values()) and len({int(m.group(1)) for m in numbers.values()}) == len(names):
        return {n: int(m.group(1)) for n, m in numbers.items()}
    return {n: i for i, n in enumerate(sorted(names))}


def _assemble(raw: pd.DataFrame, files: dict[str, str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    if raw.empty:
        raise ValueError("no valid person rows in the annotations (see the skipped rows above)")
    dup = raw["person_id"].duplicated()
    if dup.any():
        ids = raw.loc[dup, "person_id"].head(5).tolist()
        raise ValueError(f"{int(dup.sum())} duplicate person_id values (e.g. {ids}): person ids must be unique")
    names = sorted(raw["filename"].unique())
    if "json_image_id" in raw.columns:
        ids = dict(zip(raw["filename"], raw["json_image_id"].astype(int)))
    else:
        ids = _image_id_from_name(names)
    images = pd.DataFrame({"filename": names})
    images["image_id"] = images["filename"].map(ids).astype("int64")
    images["path"] = images["filename"].map(lambda n: files.get(n, "")).astype(str)
    for col in ("json_width", "json_height"):
        if col in raw.columns:
            first = raw.groupby("filename")[col].first()
            images[col] = pd.to_numeric(images["filename"].map(first), errors="coerce").astype("Int64")
        else:
            images[col] = pd.array([pd.NA] * len(images), dtype="Int64")
    images = images.sort_values("image_id", kind="stable").reset_index(drop=True)
    images = images[["image_id", "filename", "path", "json_width", "json_height"]]

    persons = derive_groups(raw)
    persons["image_id"] = persons["filename"].map(ids).astype("int64")
    for col in ("gt_x1", "gt_y1", "gt_x2", "gt_y2"):
        persons[col] = persons[col].astype(np.float32)
    persons = persons.sort_values(["image_id", "person_id"], kind="stable").reset_index(drop=True)
    return persons[list(PERSON_COLUMNS)], images


def select_persons(persons: pd.DataFrame, where: str | None) -> pd.DataFrame:
    """Persons matching a pandas query over their columns, e.g. ``mst_mode in [7,8] and lighting_dimly_lit``
    (``extractor.where.evaluate_where``: the same rules as the index's filters, NA is False)."""
    if not where:
        return persons
    return persons[evaluate_where(persons, where)].reset_index(drop=True)
