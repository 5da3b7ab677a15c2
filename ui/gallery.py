"""Neighbours of a query person: index-side filters, the result table, crops, composition."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageOps

from extractor.groups import LIGHTING_FLAGS, MST_BANDS, UNKNOWN
from index import membership
from index.groupings import POPULATION_HELP as INDEX_POPULATION_HELP, POPULATION_REGISTRY

log = logging.getLogger(__name__)

BANDS = (*MST_BANDS, UNKNOWN)
LIGHTINGS = LIGHTING_FLAGS
# Populations as index.groupings defines them (all first: the search page's order).
POPULATION_WHERE = {name: POPULATION_REGISTRY[name].where for name in ("all", "persons", "detections")}
POPULATION_HELP = INDEX_POPULATION_HELP
CROP_SIZE = 160
TABLE_COLUMNS = ("rank", "similarity", "det_id", "image_id", "filename", "person_id", "mst_mode", "mst_band",
                 "lighting", "gender_mode", "age_mode", "detected", "matched", "score", "x1", "y1", "x2", "y2")


def build_where(population: str = "all", bands: Sequence[str] = (), lighting: Sequence[str] = (),
                tones: Sequence[int] = ()) -> str | None:
    """A ``Run.search`` filter from widget choices; None when nothing is restricted.

    An empty choice means "any". ``lighting`` keeps rows with at least one of the
    chosen flags (they are not exclusive); ``tones`` are MST modes 1..10.
    """
    if population not in POPULATION_WHERE:
        raise ValueError(f"unknown population {population!r}: choose one of {', '.join(POPULATION_WHERE)}")
    parts = [POPULATION_WHERE[population]] if POPULATION_WHERE[population] else []
    bad = [b for b in bands if b not in BANDS] + [f for f in lighting if f not in LIGHTINGS]
    bad += [str(t) for t in tones if not (isinstance(t, (int, np.integer)) and 1 <= int(t) <= 10)]
    if bad:
        raise ValueError(f"unknown filter values: {', '.join(map(str, bad))}")
    if bands and set(bands) != set(BANDS):
        parts.append(f"mst_band in {sorted(set(bands), key=BANDS.index)!r}")
    if tones:
        parts.append(f"mst_mode in {sorted({int(t) for t in tones})!r}")
    if lighting and set(lighting) != set(LIGHTINGS):
        flags = [f"lighting_{f}" for f in sorted(set(lighting), key=LIGHTINGS.index)]
        parts.append(flags[0] if len(flags) == 1 else "(" + " or ".join(flags) + ")")
    return " and ".join(parts) if parts else None


def lighting_label(frame: pd.DataFrame) -> pd.Series:
    """The lighting flags of each row joined by '+', or 'none' (vectorised)."""
    label = pd.Series("", index=frame.index, dtype=object)
    for flag in LIGHTINGS:
        col = f"lighting_{flag}"
        if col in frame.columns:
            on = frame[col].to_numpy(dtype=bool, na_value=False)
            label = label.where(~on, label + np.where(label == "", "", "+") + flag)
    return label.where(label != "", "none").astype(str)


def neighbour_table(meta: pd.DataFrame, D: np.ndarray, I: np.ndarray) -> pd.DataFrame:
    """The found neighbours of one query (``D``, ``I`` of length k) as a table, best first."""
    D, I = np.ravel(D), np.ravel(I)
    ok = I >= 0
    rows = meta.iloc[I[ok]]
    out = pd.DataFrame({"rank": np.arange(1, int(ok.sum()) + 1), "similarity": D[ok].astype(np.float64)})
    for col in TABLE_COLUMNS[2:]:
        if col == "lighting":
            out[col] = lighting_label(rows).to_numpy()
        elif col == "mst_mode" and col in rows.columns:
            out[col] = rows[col].astype("string").fillna(UNKNOWN).to_numpy(dtype=object)
        elif col in rows.columns:
            out[col] = rows[col].to_numpy()
    return out


def base_rates(meta: pd.DataFrame, allowed: np.ndarray, by: str) -> pd.DataFrame:
    """Size and share of each group among the candidate rows (``allowed``, bool [len(meta)]).

    The base rate is taken over the rows a filtered search could return, not the whole
    run: a filter on skin band would otherwise make every band look over-retrieved.
    """
    labels, M = membership(meta.iloc[np.flatnonzero(allowed)], by)
    n = M.sum(axis=0).astype(np.int64)
    return pd.DataFrame({"group": labels, "candidates": n, "base_rate": n / max(int(M.shape[0]), 1)})


def composition(meta: pd.DataFrame, neighbour_ids: np.ndarray, by: str, base: pd.DataFrame) -> pd.DataFrame:
    """Share of each group among the neighbours beside its base rate (``base_rates``).

    ``ratio`` > 1: the group is over-represented among the neighbours. Overlapping
    groupings (mst_any, lighting) can sum to more than 100%.
    """
    ids = np.asarray(neighbour_ids, dtype=np.int64)
    ids = ids[ids >= 0]
    labels, M = membership(meta.iloc[ids], by)
    if list(labels) != list(base["group"]):
        raise ValueError(f"base rates were computed for another grouping than {by!r}")
    hits = M.sum(axis=0).astype(np.int64)
    share = hits / len(ids) if len(ids) else np.full(len(labels), np.nan)
    rate = base["base_rate"].to_numpy(dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(rate > 0, share / rate, np.nan)
    return pd.DataFrame({"group": labels, "neighbours": hits, "share": share,
                         "candidates": base["candidates"].to_numpy(), "base_rate": rate, "ratio": ratio})


# ------------------------------------------------------------------------- crops
def placeholder(text: str = "image not on this machine", size: int = CROP_SIZE) -> np.ndarray:
    """A grey tile standing in for a crop whose image file is missing."""
    img = Image.new("RGB", (size, size), (225, 225, 225))
    draw = ImageDraw.Draw(img)
    words, lines, line = text.split(), [], ""
    for w in words:  # wrap to the tile's width
        if len(line) + len(w) + 1 > 18:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}".strip()
    lines.append(line)
    for i, ln in enumerate(lines):
        draw.text((8, size // 2 - 8 * len(lines) + 16 * i), ln, fill=(90, 90, 90))
    return np.asarray(img)


def crop_person(path: Path | None, box: Sequence[float], size: int = CROP_SIZE, pad: float = 0.08) -> np.ndarray:
    """The box (x1, y1, x2, y2 in pixels of the stored image) with a margin, fitted into a
    ``size`` square, as uint8 RGB; a placeholder when the file is missing or unreadable.

    JPEGs are decoded at a reduced DCT scale when the crop allows: a gallery of FACET
    images (~3 MP each) would otherwise spend most of its time decoding pixels it drops.
    """
    if path is None or not Path(path).is_file():
        return placeholder()
    x1, y1, x2, y2 = (float(v) for v in box)
    if not np.all(np.isfinite([x1, y1, x2, y2])) or x2 <= x1 or y2 <= y1:
        return placeholder("no box")
    try:
        with Image.open(path) as img:
            full_w, full_h = img.size
            side = max(x2 - x1, y2 - y1) * (1 + 2 * pad)
            if img.format == "JPEG" and side > size:
                factor = side / size
                img.draft("RGB", (int(full_w / factor), int(full_h / factor)))
            img.load()
            sx, sy = img.width / full_w, img.height / full_h
            mx, my = (x2 - x1) * pad, (y2 - y1) * pad
            region = (max(0, int((x1 - mx) * sx)), max(0, int((y1 - my) * sy)),
                      min(img.width, int(np.ceil((x2 + mx) * sx))), min(img.height, int(np.ceil((y2 + my) * sy))))
            if region[2] <= region[0] or region[3] <= region[1]:
                return placeholder("box outside the image")
            crop = img.crop(region).convert("RGB")
    except Exception as exc:  # a damaged file must not break the gallery
        log.info("crop of %s failed: %r", path, exc)
        return placeholder("image unreadable")
    return np.asarray(ImageOps.pad(crop, (size, size), color=(245, 245, 245)))


def image_paths(images: pd.DataFrame, root: Path | None) -> dict[int, Path | None]:
    """image_id -> file under the dataset root (None when the root is not here)."""
    if root is None:
        return {int(i): None for i in images["image_id"]}
    col = "path" if "path" in images.columns else "filename"
    return {int(i): root / str(p) for i, p in zip(images["image_id"], images[col])}


def caption(row: pd.Series) -> str:
    """One gallery caption: similarity, skin tone, lighting, image id."""
    tone = row.get("mst_mode", UNKNOWN)
    return (f"#{row['rank']} sim {row['similarity']:.3f} · MST {tone} ({row.get('mst_band', UNKNOWN)}) · "
            f"{row.get('lighting', '')} · img {row.get('image_id', '?')}")
