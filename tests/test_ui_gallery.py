"""Index-side filters, neighbour tables, composition and crops."""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

import index  # noqa: E402
from ui import gallery  # noqa: E402


def test_build_where_from_widget_choices():
    assert gallery.build_where() is None
    assert gallery.build_where("persons") == "has_person"
    assert gallery.build_where("detections", bands=["darker", "lighter"]) == "matched and mst_band in ['lighter', 'darker']"
    assert gallery.build_where("all", bands=list(gallery.BANDS)) is None  # every band = no restriction
    assert gallery.build_where(lighting=["dimly_lit"]) == "lighting_dimly_lit"
    assert gallery.build_where(lighting=["underexposed", "dimly_lit"]) == "(lighting_dimly_lit or lighting_underexposed)"
    assert gallery.build_where(tones=[9, 7]) == "mst_mode in [7, 9]"
    with pytest.raises(ValueError, match="unknown filter"):
        gallery.build_where(bands=["purple"])
    with pytest.raises(ValueError, match="population"):
        gallery.build_where("everyone")


def test_filters_restrict_the_search_inside_the_index(ui_demo):
    run = index.load_run(ui_demo.run_dir)
    q = run.xb[0]
    where = gallery.build_where("persons", bands=["darker"], lighting=["well_lit", "dimly_lit"])
    D, I = run.search(q, 5, where)
    table = gallery.neighbour_table(run.meta, D[0], I[0])
    assert len(table) == min(5, int(run.mask(where).sum()))
    assert set(table["mst_band"]) == {"darker"}
    assert table["lighting"].str.contains("well_lit|dimly_lit").all()
    _, I_all = run.search(q, 5, "has_person")
    assert not np.array_equal(I_all[0], I[0])


def test_neighbour_table_drops_missing_and_names_unknown_tones():
    meta = pd.DataFrame({
        "det_id": [0, 1, 2], "image_id": [5, 5, 6], "filename": ["a.jpg", "a.jpg", "b.jpg"],
        "person_id": pd.array([1, None, 3], dtype="Int64"), "mst_mode": pd.array([7, None, 2], dtype="Int8"),
        "mst_band": ["darker", "unknown", "lighter"], "lighting_well_lit": [True, False, True],
        "lighting_dimly_lit": [True, False, False], "gender_mode": ["fem", "unknown", "masc"],
        "age_mode": ["young", "unknown", "older"], "detected": [True, True, False], "matched": [True, False, False],
        "score": [0.9, 0.8, 0.2], "x1": [0.0] * 3, "y1": [0.0] * 3, "x2": [5.0] * 3, "y2": [9.0] * 3,
    })
    t = gallery.neighbour_table(meta, np.array([0.9, 0.5, -np.inf]), np.array([1, 0, -1]))
    assert t["rank"].tolist() == [1, 2] and t["det_id"].tolist() == [1, 0]
    assert t["mst_mode"].tolist() == ["unknown", "7"]
    assert t["lighting"].tolist() == ["none", "well_lit+dimly_lit"]
    assert "sim 0.900" in gallery.caption(t.iloc[0])


def test_composition_against_base_rates():
    meta = pd.DataFrame({"mst_band": ["lighter"] * 6 + ["darker"] * 3 + ["unknown"]})
    allowed = np.ones(10, dtype=bool)
    base = gallery.base_rates(meta, allowed, "mst_band")
    assert base.set_index("group")["candidates"].to_dict() == {"lighter": 6, "medium": 0, "darker": 3, "unknown": 1}
    comp = gallery.composition(meta, np.array([6, 7, 0, -1]), "mst_band", base).set_index("group")
    assert comp.loc["darker", "neighbours"] == 2 and comp.loc["darker", "share"] == pytest.approx(2 / 3)
    assert comp.loc["darker", "ratio"] == pytest.approx((2 / 3) / 0.3)
    assert np.isnan(comp.loc["medium", "ratio"])
    # The base rate follows the filter: among lighter-only candidates, lighter is 100%.
    only = gallery.base_rates(meta, meta["mst_band"].eq("lighter").to_numpy(), "mst_band").set_index("group")
    assert only.loc["lighter", "base_rate"] == 1.0
    with pytest.raises(ValueError, match="another grouping"):
        gallery.composition(meta.assign(mst_mode=pd.array([1] * 10, dtype="Int8")), np.array([0]), "mst_mode", base)


def test_crop_person_reads_the_box(tmp_path):
    arr = np.full((1200, 1600, 3), 30, np.uint8)
    arr[400:800, 600:800] = (250, 20, 20)  # a red "person"
    path = tmp_path / "img.jpg"
    Image.fromarray(arr).save(path, quality=95)
    crop = gallery.crop_person(path, (600, 400, 800, 800), size=64)
    assert crop.shape == (64, 64, 3)
    centre = crop[24:40, 24:40].reshape(-1, 3).mean(axis=0)
    assert centre[0] > 200 and centre[1] < 70


def test_crop_person_placeholders(tmp_path):
    grey = gallery.crop_person(tmp_path / "missing.jpg", (0, 0, 10, 10))
    assert grey.shape == (gallery.CROP_SIZE, gallery.CROP_SIZE, 3)
    assert gallery.crop_person(None, (0, 0, 10, 10)).shape == grey.shape
    path = tmp_path / "small.png"
    Image.new("RGB", (50, 50), "blue").save(path)
    assert gallery.crop_person(path, (100, 100, 200, 200)).mean() > 150  # box outside the image: grey tile
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    assert gallery.crop_person(tmp_path / "bad.jpg", (0, 0, 5, 5)).shape == grey.shape
    assert gallery.crop_person(path, (5, 5, 5, 20)).shape == grey.shape  # empty box


def test_image_paths(tmp_path):
    images = pd.DataFrame({"image_id": [1, 2], "filename": ["a.jpg", "b.jpg"], "path": ["x/a.jpg", "b.jpg"]})
    assert gallery.image_paths(images, tmp_path) == {1: tmp_path / "x/a.jpg", 2: tmp_path / "b.jpg"}
    assert gallery.image_paths(images, None) == {1: None, 2: None}
