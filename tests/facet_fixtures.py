"""Tiny FACET-format datasets written by the tests (no real data is available offline)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image

from extractor.groups import RAW_ATTRIBUTE_COLUMNS

FACET_HEADER = ["person_id", "filename", "class1", "class2"] + list(RAW_ATTRIBUTE_COLUMNS) + ["bounding_box"]


def person_row(person_id: int, filename: str, box: tuple[float, float, float, float] | str,
               tones: dict[int, int] | None = None, **attrs) -> dict:
    row = {c: 0 for c in FACET_HEADER}
    row.update(person_id=person_id, filename=filename, class1="guitarist", class2="")
    for k, n in ({5: 2} if tones is None else tones).items():
        row[f"skin_tone_{k}"] = n
    row["lighting_well_lit"] = 1
    row["gender_presentation_masc"] = 2
    row["age_presentation_middle"] = 2
    row.update(attrs)
    if isinstance(box, str):
        row["bounding_box"] = box
    else:
        x, y, w, h = box
        row["bounding_box"] = str({"x": float(x), "y": float(y), "width": float(w), "height": float(h)})
    return row


def write_image(path: Path, width: int, height: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 // max(width - 1, 1), yy * 255 // max(height - 1, 1),
                     np.full_like(xx, 90)], axis=-1)
    noise = rng.integers(-20, 20, size=base.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(path, quality=90)


def write_facet(root: Path, rows: list[dict], images: dict[str, tuple[int, int]],
                folders: tuple[str, ...] = ("imgs_a", "imgs_b")) -> Path:
    """annotations.csv + the named images spread over several folders."""
    root.mkdir(parents=True, exist_ok=True)
    for i, (name, (w, h)) in enumerate(sorted(images.items())):
        write_image(root / folders[i % len(folders)] / name, w, h, seed=i)
    with open(root / "annotations.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FACET_HEADER)
        writer.writeheader()
        writer.writerows(rows)
    return root


def write_coco(root: Path, rows: list[dict], images: dict[str, tuple[int, int]],
               json_name: str = "instances_all.json") -> Path:
    """The COCO-style conversion: val2017/*.jpg and a json whose annotations carry the FACET columns."""
    ids = {name: i + 1 for i, name in enumerate(sorted(images))}
    for name, (w, h) in images.items():
        write_image(root / "val2017" / name, w, h, seed=ids[name])
    anns = []
    for n, row in enumerate(rows):
        box = eval(row["bounding_box"])  # test data we wrote ourselves
        attrs = {c: int(row[c]) for c in RAW_ATTRIBUTE_COLUMNS}
        anns.append({"id": n + 1, "image_id": ids[row["filename"]], "category_id": 1,
                     "bbox": [box["x"], box["y"], box["width"], box["height"]], "area": 1.0, "iscrowd": 0,
                     "attributes": attrs, "class1": row["class1"], "class2": row["class2"]})
    data = {"images": [{"id": i, "file_name": n, "width": 2250, "height": 1500} for n, i in ids.items()],
            "annotations": anns, "categories": [{"id": 1, "name": "person"}]}
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / json_name).write_text(json.dumps(data))
    return root
