"""Planning a run: which images and persons, their sizes, the malformed boxes, the shards.

Everything here is deterministic for the same dataset and settings, which is what lets
a killed run resume shard by shard and end with the same files.
"""
from __future__ import annotations

import hashlib
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from .datasets import Dataset, SkippedRow, select_persons
from .settings import ExtractSettings

log = logging.getLogger(__name__)

# A box may overrun the image by this share of its side (annotation tools round and
# pad); it is then clipped. Beyond that the row is malformed and skipped.
BOX_TOLERANCE = 0.02


@dataclass(frozen=True)
class Plan:
    images: pd.DataFrame             # selected images: image_id, filename, path, width, height, status
    persons: pd.DataFrame            # selected, valid persons (boxes clipped to their image)
    context: pd.DataFrame            # every valid person on those images: what detections are matched to
    shards: tuple[tuple[int, ...], ...]   # image ids to run, per shard, in processing order
    skipped: tuple[SkippedRow, ...]  # reader's skipped rows + boxes outside their image
    annotations_sha256: str
    n_selected_persons: int          # after --where, before --limit and the box check

    @property
    def images_by_id(self) -> dict[int, dict]:
        return self._cache("_images_by_id", lambda: {int(r["image_id"]): r for r in self.images.to_dict("records")})

    @property
    def context_by_image(self) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """image_id -> (gt boxes float64 [P, 4] x1 y1 x2 y2 pixels, person ids int64 [P]) of its context
        persons. Arrays, made once: selecting DataFrame columns per image cost ~2 ms of the thread
        that feeds the model."""
        def make() -> dict[int, tuple[np.ndarray, np.ndarray]]:
            boxes = self.context[["gt_x1", "gt_y1", "gt_x2", "gt_y2"]].to_numpy(np.float64)
            ids = self.context["person_id"].to_numpy(np.int64)
            return {int(k): (boxes[rows], ids[rows])
                    for k, rows in self.context.groupby("image_id", sort=True).indices.items()}
        return self._cache("_context_by_image", make)

    @property
    def selected_ids(self) -> frozenset[int]:
        return self._cache("_selected_ids", lambda: frozenset(self.persons["person_id"].tolist()))

    @property
    def filtered(self) -> bool:
        """True when --where left out persons on the processed images."""
        return len(self.context) != len(self.persons)

    def _cache(self, name, make):
        if name not in self.__dict__:
            object.__setattr__(self, name, make())
        return self.__dict__[name]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_sizes(root: Path, paths: list[str], workers: int) -> list[tuple[int, int, str]]:
    """(width, height, status) per relative path from the file headers, without decoding."""
    def probe(rel: str) -> tuple[int, int, str]:
        if not rel:
            return 0, 0, "missing: no file of this name under the dataset root"
        try:
            with Image.open(root / rel) as img:
                return int(img.width), int(img.height), "ok"
        except Exception as exc:  # unreadable header: recorded, the run goes on
            return 0, 0, f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".strip()

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(probe, paths))


def check_boxes(persons: pd.DataFrame, sizes: pd.DataFrame) -> tuple[pd.DataFrame, list[SkippedRow]]:
    """Clip boxes that overrun their image slightly; skip those outside it.

    sizes: image_id, width, height (0 for images that could not be read: not checked).
    """
    df = persons.merge(sizes[["image_id", "width", "height"]], on="image_id", how="left")
    w, h = df["width"].to_numpy(float), df["height"].to_numpy(float)
    known = w > 0
    x1, y1, x2, y2 = (df[c].to_numpy(float) for c in ("gt_x1", "gt_y1", "gt_x2", "gt_y2"))
    tol_x, tol_y = BOX_TOLERANCE * w, BOX_TOLERANCE * h
    bad = known & ((x1 < -tol_x) | (y1 < -tol_y) | (x2 > w + tol_x) | (y2 > h + tol_y))
    skipped = [SkippedRow(f"person {pid}", f"box outside the image: ({a:g}, {b:g}, {c:g}, {d:g}) "
                                           f"on {int(ww)}x{int(hh)}")
               for pid, a, b, c, d, ww, hh in zip(df["person_id"][bad], x1[bad], y1[bad], x2[bad], y2[bad],
                                                  w[bad], h[bad])]
    keep = df[~bad].copy()
    for col, lim in (("gt_x1", "width"), ("gt_x2", "width"), ("gt_y1", "height"), ("gt_y2", "height")):
        k = keep[lim].to_numpy(float) > 0
        vals = keep[col].to_numpy(np.float32).copy()
        vals[k] = np.clip(vals[k], 0, keep[lim].to_numpy(np.float32)[k])
        keep[col] = vals
    return keep.drop(columns=["width", "height"]).reset_index(drop=True), skipped


def make_plan(dataset: Dataset, s: ExtractSettings) -> Plan:
    persons = select_persons(dataset.persons, s.where)
    n_selected = len(persons)
    if persons.empty:
        raise ValueError(f"no person matches --where {s.where!r}" if s.where else "the dataset has no persons")
    images = dataset.images[dataset.images["image_id"].isin(persons["image_id"])]
    if s.limit is not None:
        images = images.head(s.limit)
    images = images.reset_index(drop=True).copy()
    persons = persons[persons["image_id"].isin(images["image_id"])]
    # Detections are matched against everybody on the image, selected or not, so a
    # filter never hands one person's detection to their neighbour.
    context = dataset.persons[dataset.persons["image_id"].isin(images["image_id"])]

    sizes = read_sizes(dataset.root, images["path"].tolist(), s.workers)
    images["width"] = np.array([z[0] for z in sizes], dtype=np.int32)
    images["height"] = np.array([z[1] for z in sizes], dtype=np.int32)
    images["status"] = [z[2] for z in sizes]
    context, box_skips = check_boxes(context, images)
    persons = context[context["person_id"].isin(persons["person_id"])]
    # An image whose every person was skipped has nothing left to evaluate.
    empty = ~images["image_id"].isin(persons["image_id"]) & (images["status"] == "ok")
    images.loc[empty, "status"] = "skipped: every annotated person on it was malformed"

    ok = images[images["status"] == "ok"]
    aspect = (ok["width"] / ok["height"]).round(2)
    order = ok.assign(_aspect=aspect).sort_values(["_aspect", "image_id"], kind="stable")["image_id"].tolist()
    shards = tuple(tuple(int(i) for i in order[k:k + s.shard_size]) for k in range(0, len(order), s.shard_size))
    n_bad = int((images["status"] != "ok").sum())
    if n_bad:
        log.warning("%d of %d images cannot be read or have no valid person (see images.parquet)",
                    n_bad, len(images))
    return Plan(images=images.drop(columns=["json_width", "json_height"]), persons=persons.reset_index(drop=True),
                context=context.reset_index(drop=True),
                shards=shards, skipped=tuple(dataset.skipped) + tuple(box_skips),
                annotations_sha256=file_sha256(dataset.annotations), n_selected_persons=n_selected)
