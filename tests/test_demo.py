"""The synthetic FACET-format demo: determinism, format, scene mix, pixels and labels."""
from __future__ import annotations

import ast
import csv
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from extractor.demo import (
    COLORED_HAIR, HAIR_RGB, MST_RGB, DemoSummary, FigureSpec, SceneSpec, face_region, make_scenes, render_scene,
    write_demo, write_demo_coco,
)

# Written out here rather than imported, so a reordering in the module is caught.
EXPECTED_COLUMNS = (
    ["person_id", "filename", "class1", "class2",
     "gender_presentation_masc", "gender_presentation_fem", "gender_presentation_non_binary",
     "gender_presentation_na"]
    + [f"skin_tone_{k}" for k in range(1, 11)] + ["skin_tone_na"]
    + ["age_presentation_young", "age_presentation_middle", "age_presentation_older",
       "age_presentation_na",
       "hair_color_black", "hair_color_blonde", "hair_color_brown", "hair_color_colored",
       "hair_color_red", "hair_color_grey", "hair_color_na",
       "hairtype_coily", "hairtype_dreadlocks", "hairtype_bald", "hairtype_straight",
       "hairtype_curly", "hairtype_wavy", "hairtype_na",
       "has_facial_hair", "has_tattoo", "has_cap", "has_mask", "has_headscarf", "has_eyeware",
       "visible_torso", "visible_face", "visible_minimal",
       "lighting_underexposed", "lighting_dimly_lit", "lighting_well_lit", "lighting_overexposed",
       "lighting_na", "bounding_box"]
)
ATTRIBUTES = EXPECTED_COLUMNS[4:-1]
TONES = [f"skin_tone_{k}" for k in range(1, 11)]
NAME_OF_HAIR = {rgb: name for name, rgb in HAIR_RGB.items()}


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _luma(rgb: np.ndarray) -> float:
    return float(rgb @ np.array([0.299, 0.587, 0.114]))


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoSummary:
    return write_demo(tmp_path_factory.mktemp("facet") / "demo", n_images=16, seed=0)


@pytest.fixture(scope="module")
def rows(demo: DemoSummary) -> list[dict[str, str]]:
    with demo.annotations.open(newline="") as f:
        return list(csv.DictReader(f))


def test_same_seed_gives_identical_files_and_another_seed_differs(tmp_path: Path) -> None:
    a = write_demo(tmp_path / "a", n_images=12, seed=5)
    b = write_demo(tmp_path / "b", n_images=12, seed=5)
    c = write_demo(tmp_path / "c", n_images=12, seed=6)
    fa, fb = _files(a.root), _files(b.root)
    assert fa == fb
    assert sum(name.endswith(".jpg") for name in fa) == 12
    assert a.annotations.read_bytes() != c.annotations.read_bytes()
    jpgs_c = {k: v for k, v in _files(c.root).items() if k.endswith(".jpg")}
    assert set(jpgs_c.values()).isdisjoint(v for k, v in fa.items() if k.endswith(".jpg"))


def test_rewriting_a_demo_folder_leaves_no_stray_images(tmp_path: Path) -> None:
    write_demo(tmp_path / "d", n_images=6, seed=1)
    summary = write_demo(tmp_path / "d", n_images=3, seed=2)
    assert len(list(summary.root.rglob("*.jpg"))) == 3


def test_csv_has_facet_columns_boxes_and_files(demo: DemoSummary, rows: list[dict[str, str]]) -> None:
    with demo.annotations.open(newline="") as f:
        assert next(csv.reader(f)) == EXPECTED_COLUMNS
    assert demo.n_images == 16 and demo.n_persons == len(rows)
    ids = [int(r["person_id"]) for r in rows]
    assert ids == sorted(set(ids))
    folders = set()
    for r in rows:
        hits = list(demo.root.glob(f"images_*/{r['filename']}"))
        assert len(hits) == 1, r["filename"]
        folders.add(hits[0].parent.name)
        box = ast.literal_eval(r["bounding_box"])
        assert set(box) == {"x", "y", "width", "height"}
        assert all(isinstance(v, float) for v in box.values())
        with Image.open(hits[0]) as im:
            w, h = im.size
        assert box["width"] > 0 and box["height"] > 0
        assert box["x"] >= 0 and box["y"] >= 0
        assert box["x"] + box["width"] <= w and box["y"] + box["height"] <= h
        assert r["class1"]
        assert all(r[c].isdigit() for c in ATTRIBUTES)
    assert len(folders) >= 2
    assert "synthetic" in (demo.root / "README.txt").read_text().lower()


def test_single_person_scenes_are_the_majority() -> None:
    for seed in (0, 1, 2):
        scenes = make_scenes(120, seed)
        per = [len(s.figures) for s in scenes]
        assert per.count(1) > 60 and per.count(2) > per.count(3) > 0
        for s in scenes:
            if len(s.figures) == 1:
                assert 0.6 <= s.figures[0].height / s.height <= 0.95
            assert 240 <= min(s.width, s.height) and max(s.width, s.height) <= 640
        tones = np.bincount([f.tone for s in scenes for f in s.figures], minlength=11)[1:]
        assert tones.min() >= 5  # every palette tone is a usable group


def _big_single(scenes: list[SceneSpec]) -> SceneSpec:
    singles = [s for s in scenes if len(s.figures) == 1]
    return max(singles, key=lambda s: s.figures[0].height)


def _face_median(scene: SceneSpec, fig: FigureSpec) -> np.ndarray:
    x0, y0, x1, y1 = face_region(fig)
    return np.median(render_scene(scene)[y0:y1, x0:x1].reshape(-1, 3), axis=0)


@pytest.mark.parametrize("tone", [1, 5, 10])
def test_face_pixels_follow_palette_and_lighting(tone: int) -> None:
    base = _big_single(make_scenes(20, seed=3))
    fig = replace(base.figures[0], tone=tone)
    x0, y0, x1, y1 = face_region(fig)
    assert (x1 - x0) * (y1 - y0) >= 20
    lit = replace(base, figures=(fig,), lighting="well_lit", exposure=1.0)
    well = _face_median(lit, fig)
    assert np.abs(well - np.array(MST_RGB[tone - 1])).max() <= 10
    dim = _face_median(replace(lit, lighting="dimly_lit", exposure=0.5), fig)
    under = _face_median(replace(lit, lighting="underexposed", exposure=0.33), fig)
    over = _face_median(replace(lit, lighting="overexposed", exposure=1.6), fig)
    assert _luma(under) < _luma(well) and _luma(dim) < _luma(well)
    if tone < 10:  # the darkest tone is already near black; crushing only has to keep it dark
        assert _luma(under) < _luma(dim)
    assert _luma(over) > _luma(well)


def test_rendered_scene_lighting_follows_flags() -> None:
    scenes = make_scenes(40, seed=4)
    by_mode: dict[str, list[float]] = {}
    for s in scenes:
        by_mode.setdefault(s.lighting, []).append(float(render_scene(s).mean()))
    means = {k: np.mean(v) for k, v in by_mode.items()}
    assert set(means) == {"well_lit", "dimly_lit", "underexposed", "overexposed"}
    assert means["underexposed"] < means["dimly_lit"] < means["well_lit"] < means["overexposed"]


def test_annotator_counts_are_plausible() -> None:
    persons = [(s, f) for s in make_scenes(200, seed=7) for f in s.figures]
    two_tones = unknown = 0
    hair_agree: list[bool] = []
    for scene, fig in persons:
        lab = fig.labels
        n = sum(lab[c] for c in ATTRIBUTES if c.startswith("gender_presentation_"))
        assert n in (2, 3)
        for prefix in ("age_presentation_", "hair_color_", "hairtype_"):
            assert sum(lab[c] for c in ATTRIBUTES if c.startswith(prefix)) == n
        tones = np.array([lab[c] for c in TONES])
        assert tones.sum() + lab["skin_tone_na"] == n
        if lab["skin_tone_na"]:
            unknown += 1
            assert tones.sum() == 0
        else:
            chosen = np.flatnonzero(tones) + 1
            assert np.all(np.abs(chosen - fig.tone) <= 1)
            two_tones += len(chosen) >= 2
        flags = [lab[f"lighting_{v}"] for v in ("underexposed", "dimly_lit", "well_lit", "overexposed")]
        assert (sum(flags) >= 1) != bool(lab["lighting_na"])
        assert all(other.labels[c] == lab[c] for other in scene.figures
                   for c in ATTRIBUTES if c.startswith("lighting_"))
        assert lab["visible_face"] == lab["visible_torso"] == 1
        if fig.hair_rgb is None:
            assert lab["hairtype_bald"] >= 1
        elif fig.cap_rgb is None:
            drawn = "colored" if fig.hair_rgb in COLORED_HAIR else NAME_OF_HAIR[fig.hair_rgb]
            hair_votes = {c: lab[c] for c in ATTRIBUTES if c.startswith("hair_color_")}
            hair_agree.append(hair_votes[f"hair_color_{drawn}"] == max(hair_votes.values()))
    assert two_tones > len(persons) // 5
    assert 0 < unknown < len(persons) // 10
    assert np.mean(hair_agree) > 0.85  # annotators mostly name the colour that was drawn


def test_coco_variant(tmp_path: Path, rows: list[dict[str, str]]) -> None:
    summary = write_demo_coco(tmp_path / "coco", n_images=8, seed=0)
    doc = json.loads(summary.annotations.read_text())
    assert summary.annotations == tmp_path / "coco" / "annotations" / "instances_all.json"
    assert doc["categories"] == [{"id": 1, "name": "person"}]
    images = {im["id"]: im for im in doc["images"]}
    assert len(images) == 8 and len(doc["annotations"]) == summary.n_persons
    for im in images.values():
        with Image.open(tmp_path / "coco" / "val2017" / im["file_name"]) as pic:
            assert pic.size == (im["width"], im["height"])
    for ann in doc["annotations"]:
        assert list(ann["attributes"]) == ATTRIBUTES
        assert all(isinstance(v, int) for v in ann["attributes"].values())
        assert ann["category_id"] == 1 and ann["iscrowd"] == 0 and ann["class1"]
        x, y, w, h = ann["bbox"]
        im = images[ann["image_id"]]
        assert w > 0 and h > 0 and x + w <= im["width"] and y + h <= im["height"]
        assert ann["area"] == pytest.approx(w * h)


def test_bad_arguments_and_foreign_folders_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="n_images"):
        write_demo(tmp_path / "x", n_images=0)
    with pytest.raises(ValueError, match="seed"):
        make_scenes(3, seed=-1)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty"):
        write_demo(tmp_path / "mine", n_images=2)
    assert not (tmp_path / "x").exists()
