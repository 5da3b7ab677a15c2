"""Synthetic FACET-format dataset: the fixture of the tests and the offline demo.

Neither FACET's images nor DETR weights can be downloaded here, so this module draws
people-like figures whose skin is painted with the Monk Skin Tone palette and writes
them in the FACET release layout (``annotations.csv`` + ``images_*/sa_<n>.jpg``) or
in the COCO-style conversion (``annotations/instances_all.json`` + ``val2017/``).

Two steps, so tests can check labels without pixels: ``make_scenes`` is pure and
seeded (figures, poses, tones, lighting, annotator labels, boxes); ``render_scene``
turns one spec into pixels and draws its noise from the spec's own seed.
"""
from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

# Re-exported: the specs and the renderer are part of this module's surface.
from .demo_draw import (MST_HEX, MST_RGB, RGB, FigureSpec, SceneSpec, Shape, face_region,  # noqa: F401
                        figure_shapes, render_scene, _tight_box)

log = logging.getLogger(__name__)

GENDERS = ("masc", "fem", "non_binary")
AGES = ("young", "middle", "older")
HAIR_COLORS = ("black", "blonde", "brown", "colored", "red", "grey")
HAIR_TYPES = ("coily", "dreadlocks", "bald", "straight", "curly", "wavy")
HAS = ("facial_hair", "tattoo", "cap", "mask", "headscarf", "eyeware")
LIGHTINGS = ("underexposed", "dimly_lit", "well_lit", "overexposed")
ATTRIBUTE_COLUMNS: tuple[str, ...] = (
    *(f"gender_presentation_{v}" for v in GENDERS + ("na",)),
    *(f"skin_tone_{k}" for k in range(1, 11)), "skin_tone_na",
    *(f"age_presentation_{v}" for v in AGES + ("na",)),
    *(f"hair_color_{v}" for v in HAIR_COLORS + ("na",)),
    *(f"hairtype_{v}" for v in HAIR_TYPES + ("na",)),
    *(f"has_{v}" for v in HAS), "visible_torso", "visible_face", "visible_minimal",
    *(f"lighting_{v}" for v in LIGHTINGS), "lighting_na",
)
FACET_COLUMNS: tuple[str, ...] = (
    "person_id", "filename", "class1", "class2", *ATTRIBUTE_COLUMNS, "bounding_box")

CLASSES = ("guitarist", "dancer", "nurse", "gardener", "skateboarder", "farmer", "student",
           "doctor", "drummer", "runner", "waiter", "painter", "backpacker", "singer",
           "laborer", "hairdresser", "reporter", "seller", "climber", "tennis player")
HAIR_RGB = {"black": (28, 24, 22), "blonde": (222, 192, 118), "brown": (104, 68, 40),
            "red": (168, 62, 30), "grey": (168, 168, 162)}
COLORED_HAIR = ((196, 60, 160), (60, 118, 216), (56, 176, 118))
PANTS = ((42, 58, 96), (30, 30, 34), (150, 130, 92), (96, 96, 100), (70, 52, 40))
SIZES = ((320, 240), (400, 300), (480, 360), (512, 384), (640, 480), (480, 270), (640, 360),
         (450, 300), (600, 400))
BACKGROUNDS = ("flat", "vgrad", "hgrad", "stripes", "noise", "room", "outdoor")
# Share of scenes with 1, 2, 3 figures; fixed quotas rather than draws so that any
# seed gives the same mix.
SCENE_MIX = (0.6, 0.3, 0.1)
# Gain per render mode: how far the scene is pushed from a neutral exposure.
EXPOSURE = {"well_lit": (0.95, 1.04), "dimly_lit": (0.42, 0.58), "underexposed": (0.28, 0.4),
            "overexposed": (1.45, 1.8)}
README_MARKER = "SYNTHETIC FACET-FORMAT DEMO"
ANNOTATIONS_CSV = "annotations.csv"
COCO_JSON = Path("annotations") / "instances_all.json"



@dataclass(frozen=True)
class DemoSummary:
    root: Path
    n_images: int
    n_persons: int
    annotations: Path
    seed: int


# ------------------------------------------------------------------------- labels
def _votes(rng: np.random.Generator, n: int, truth: int, k: int, agree: float) -> list[int]:
    """Counts over k options from n annotators who pick `truth` w.p. agree, else another."""
    counts = [0] * k
    for _ in range(n):
        counts[truth if rng.random() < agree else (truth + int(rng.integers(1, k))) % k] += 1
    return counts


def _labels(rng: np.random.Generator, truth: dict[str, int], hair: str | None,
            has: dict[str, int], lighting: dict[str, int]) -> dict[str, int]:
    """Annotator counts and flags for one person; truth holds tone (1..10), gender and age
    (indices into GENDERS / AGES + na)."""
    tone = truth["tone"]
    n = int(rng.choice((2, 3), p=(0.35, 0.65)))  # annotators of this person
    lab: dict[str, int] = dict.fromkeys(ATTRIBUTE_COLUMNS, 0)
    if rng.random() < 0.03:  # the annotators could not tell: FACET's "unknown" tone
        lab["skin_tone_na"] = n
    else:
        near = [k for k in (tone - 1, tone + 1) if 1 <= k <= 10]
        for _ in range(n):
            lab[f"skin_tone_{tone if rng.random() < 0.6 else int(rng.choice(near))}"] += 1
    colors, types = HAIR_COLORS + ("na",), HAIR_TYPES + ("na",)
    # A cap hides the hair colour from the annotators; drawn hair decides it otherwise.
    hair_truth = colors.index(hair) if hair is not None and not has["cap"] else len(colors) - 1
    kind = "bald" if hair is None else str(rng.choice(("coily", "dreadlocks", "straight", "curly", "wavy")))
    for prefix, options, truth, agree in (
            ("gender_presentation", GENDERS + ("na",), truth["gender"], 0.9),
            ("age_presentation", AGES + ("na",), truth["age"], 0.85),
            ("hair_color", colors, hair_truth, 0.85),
            ("hairtype", types, types.index(kind), 0.8)):
        for v, c in zip(options, _votes(rng, n, truth, len(options), agree)):
            lab[f"{prefix}_{v}"] = c
    lab.update({f"has_{k}": v for k, v in has.items()})
    lab.update(visible_torso=1, visible_face=1, visible_minimal=0, **lighting)
    return lab


def _lighting(rng: np.random.Generator) -> tuple[str, dict[str, int]]:
    """(render mode, per-person flags) for one scene."""
    kind = str(rng.choice(LIGHTINGS + ("na",), p=(0.12, 0.22, 0.5, 0.12, 0.04)))
    flags = {f"lighting_{v}": 0 for v in LIGHTINGS + ("na",)}
    flags[f"lighting_{kind}"] = 1
    if kind in ("dimly_lit", "underexposed") and rng.random() < 0.15:
        flags["lighting_dimly_lit"] = flags["lighting_underexposed"] = 1
        kind = "underexposed"
    return ("well_lit" if kind == "na" else kind), flags


# --------------------------------------------------------------------------- spec
def _rgb(rng: np.random.Generator, lo: int = 20, hi: int = 235) -> RGB:
    r, g, b = (int(v) for v in rng.integers(lo, hi, 3))
    return r, g, b


def _figure(rng: np.random.Generator, cx: float, top: float, height: float,
            lighting: dict[str, int]) -> FigureSpec:
    """One figure; its person_id is assigned once the scene's figures are ordered."""
    truth = {"tone": int(rng.integers(1, 11)),
             "gender": int(rng.choice(4, p=(0.46, 0.44, 0.03, 0.07))),
             "age": int(rng.choice(4, p=(0.3, 0.5, 0.15, 0.05)))}
    older, masc, fem = truth["age"] == 2, truth["gender"] == 0, truth["gender"] == 1
    # Drawn appearance leans on the presentation the annotators will see, so labels and
    # pixels agree the way they would in a photo (grey hair with age, beards on masc).
    hair = str(rng.choice(HAIR_COLORS + ("bald",), p=(0.25, 0.06, 0.13, 0.02, 0.02, 0.42, 0.1) if older
                          else (0.38, 0.12, 0.26, 0.05, 0.05, 0.08, 0.06)))
    hair_rgb = None if hair == "bald" else (
        COLORED_HAIR[int(rng.integers(3))] if hair == "colored" else HAIR_RGB[hair])
    has = {"facial_hair": int(masc and hair_rgb is not None and rng.random() < 0.3),
           "tattoo": int(rng.random() < 0.04), "cap": int(rng.random() < 0.1), "mask": 0,
           "headscarf": 0, "eyeware": int(rng.random() < (0.3 if older else 0.1))}
    a1l, a1r = rng.uniform(5, 110, 2)
    a2l, a2r = np.clip([a1l, a1r] + rng.uniform(-30, 60, 2), 0, 160)
    return FigureSpec(
        person_id=0, tone=truth["tone"], cx=cx, top=top, height=height,
        width_scale=float(rng.uniform(0.8, 1.3) * (0.9 if fem else 1.0)),
        head_scale=float(rng.uniform(0.9, 1.2)),
        arm_angles=(float(a1l), float(a2l), float(a1r), float(a2r)),
        leg_spread=float(rng.uniform(1, 14)), short_sleeves=bool(rng.random() < 0.55),
        long_hair=bool(rng.random() < (0.6 if fem else 0.15)), beard=bool(has["facial_hair"]),
        glasses=bool(has["eyeware"]), cap_rgb=_rgb(rng) if has["cap"] else None,
        hair_rgb=hair_rgb, shirt_rgb=_rgb(rng), pants_rgb=PANTS[int(rng.integers(len(PANTS)))],
        class1=str(rng.choice(CLASSES)),
        class2=str(rng.choice(CLASSES)) if rng.random() < 0.2 else "",
        labels=_labels(rng, truth, None if hair == "bald" else hair, has, lighting))


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def make_scenes(n_images: int, seed: int = 0) -> list[SceneSpec]:
    """Seeded, pixel-free description of every demo image and its annotated persons."""
    if not _is_int(n_images) or not 1 <= n_images <= 100_000:
        raise ValueError(f"n_images must be an int in 1..100000, got {n_images!r}")
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    n_images, seed = int(n_images), int(seed)
    rng = np.random.default_rng(seed)
    quota = [round(n_images * SCENE_MIX[1]), round(n_images * SCENE_MIX[2])]
    n_figs = rng.permutation([2] * quota[0] + [3] * quota[1] + [1] * (n_images - sum(quota)))
    n_folders = min(3, n_images)
    scenes, number, pid = [], 1_000_000, 1000
    for i, n_fig in enumerate(int(k) for k in n_figs):
        number += int(rng.integers(1, 40))
        w, h = SIZES[int(rng.integers(len(SIZES)))]
        if rng.random() < (0.5 if n_fig == 1 else 0.15):
            w, h = h, w
        mode, flags = _lighting(rng)
        lo, hi = {1: (0.6, 0.95), 2: (0.45, 0.8), 3: (0.35, 0.65)}[n_fig]
        slots = {1: (0.5,), 2: (0.28, 0.72), 3: (0.18, 0.5, 0.82)}[n_fig]
        figs = []
        for slot in slots:
            fh = float(rng.uniform(lo, hi)) * h
            jitter = 0.2 if n_fig == 1 else 0.05
            cx = (slot + float(rng.uniform(-jitter, jitter))) * w
            top = float(rng.uniform(0.01 * h, max(0.01 * h, 0.99 * h - fh)))
            figs.append(_figure(rng, cx, top, fh, flags))
        # Nearer figures (feet lower in the frame) are drawn last, over the others.
        figs.sort(key=lambda f: f.top + f.height)
        figs = [replace(f, person_id=pid + j, bbox=_tight_box(f, w, h)) for j, f in enumerate(figs)]
        pid += len(figs)
        bg = str(rng.choice(BACKGROUNDS))
        scenes.append(SceneSpec(
            number=number, filename=f"sa_{number}.jpg", folder=f"images_{i * n_folders // n_images + 1}",
            width=w, height=h, background=bg, bg_colors=(_rgb(rng), _rgb(rng), _rgb(rng)),
            lighting=mode, exposure=float(rng.uniform(*EXPOSURE[mode])),
            blur=float(rng.uniform(0.4, 0.9)), render_seed=int(rng.integers(2**31)),
            figures=tuple(figs)))
    return scenes


# ------------------------------------------------------------------------ writers
def _prepare(out: Path | str) -> Path:
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise ValueError(f"demo output {root} is a file; pass a folder path")
    if root.is_dir() and any(root.iterdir()):
        readme = root / "README.txt"
        if not (readme.is_file() and readme.read_text(errors="replace").startswith(README_MARKER)):
            raise ValueError(f"{root} is not empty and holds no synthetic demo; pass a new or empty folder")
        # A previous demo: drop its images so a smaller or re-seeded one leaves no strays.
        for stale in [*root.glob("images_*/sa_*.jpg"), *root.glob("val2017/sa_*.jpg")]:
            stale.unlink()
    root.mkdir(parents=True, exist_ok=True)
    return root


def _save_jpeg(pixels: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Pillow writes no EXIF or timestamp unless asked, so equal pixels give equal bytes.
    Image.fromarray(pixels, "RGB").save(path, "JPEG", quality=90, optimize=False)


def _readme(root: Path, kind: str, seed: int, scenes: list[SceneSpec]) -> None:
    n_persons = sum(len(s.figures) for s in scenes)
    mix = {k: sum(len(s.figures) == k for s in scenes) for k in (1, 2, 3)}
    (root / "README.txt").write_text(
        f"{README_MARKER}\n\nThis folder is synthetic: procedurally drawn figures whose skin is "
        f"painted with the Monk Skin Tone palette, written in the {kind} layout.\nNo real person "
        f"or FACET image is in it. Written by extractor.demo.\n\nseed: {seed}\nimages: {len(scenes)}\n"
        f"persons: {n_persons}\nimages with 1/2/3 persons: {mix[1]}/{mix[2]}/{mix[3]}\n")


def _box_string(bbox: tuple[float, float, float, float]) -> str:
    x, y, w, h = bbox
    return f"{{'x': {x!r}, 'y': {y!r}, 'width': {w!r}, 'height': {h!r}}}"


def write_demo(out: Path, n_images: int = 120, seed: int = 0) -> DemoSummary:
    """Write a synthetic dataset in the FACET release layout under `out`."""
    scenes = make_scenes(n_images, seed)
    root = _prepare(out)
    rows: list[list[object]] = []
    for scene in scenes:
        _save_jpeg(render_scene(scene), root / scene.folder / scene.filename)
        for fig in scene.figures:
            rows.append([fig.person_id, scene.filename, fig.class1, fig.class2,
                         *(fig.labels[c] for c in ATTRIBUTE_COLUMNS), _box_string(fig.bbox)])
    path = root / ANNOTATIONS_CSV
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(FACET_COLUMNS)
        writer.writerows(rows)
    _readme(root, "FACET release (annotations.csv + images_*/)", seed, scenes)
    log.info("wrote %d synthetic images, %d persons to %s", len(scenes), len(rows), root)
    return DemoSummary(root=root, n_images=len(scenes), n_persons=len(rows), annotations=path, seed=seed)


def write_demo_coco(out: Path, n_images: int = 40, seed: int = 0) -> DemoSummary:
    """Write the same kind of synthetic data in the COCO-style FACET conversion under `out`."""
    scenes = make_scenes(n_images, seed)
    root = _prepare(out)
    images, annotations = [], []
    for scene in scenes:
        _save_jpeg(render_scene(scene), root / "val2017" / scene.filename)
        images.append({"id": scene.number, "file_name": scene.filename,
                       "width": scene.width, "height": scene.height})
        for fig in scene.figures:
            annotations.append({
                "id": fig.person_id, "image_id": scene.number, "category_id": 1,
                "bbox": list(fig.bbox), "area": fig.bbox[2] * fig.bbox[3], "iscrowd": 0,
                "attributes": {c: fig.labels[c] for c in ATTRIBUTE_COLUMNS},
                "class1": fig.class1, "class2": fig.class2})
    path = root / COCO_JSON
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"images": images, "categories": [{"id": 1, "name": "person"}], "annotations": annotations}
    path.write_text(json.dumps(doc), encoding="utf-8")
    _readme(root, "COCO-style (annotations/instances_all.json + val2017/)", seed, scenes)
    log.info("wrote %d synthetic images, %d persons to %s", len(scenes), len(annotations), root)
    return DemoSummary(root=root, n_images=len(scenes), n_persons=len(annotations), annotations=path, seed=seed)
