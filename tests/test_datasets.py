"""Both dataset readers, malformed rows, missing columns, planning and box checks."""
import csv

import pandas as pd
import pytest

from extractor.datasets import find_annotations, read_dataset
from extractor.plan import make_plan
from extractor.settings import ExtractSettings
from facet_fixtures import FACET_HEADER, person_row, write_coco, write_facet

IMAGES = {"sa_101.jpg": (120, 90), "sa_102.jpg": (90, 120), "sa_103.jpg": (100, 100)}


def _rows():
    return [
        person_row(11, "sa_101.jpg", (10, 10, 50, 70), tones={8: 2, 9: 1}, lighting_dimly_lit=1, lighting_well_lit=0),
        person_row(12, "sa_101.jpg", (60, 5, 50, 80), tones={2: 3}),
        person_row(13, "sa_102.jpg", (5, 5, 80, 110), tones={}, skin_tone_na=3),
        person_row(14, "sa_103.jpg", (0, 0, 100, 100), tones={5: 1, 6: 1}),
    ]


def test_facet_reader_finds_images_in_folders_and_derives_groups(tmp_path):
    root = write_facet(tmp_path / "facet", _rows(), IMAGES)
    ds = read_dataset(root)
    assert ds.format == "facet" and ds.rows_read == 4 and not ds.skipped
    assert set(ds.images["path"].str.split("/").str[0]) == {"imgs_a", "imgs_b"}
    assert ds.images["image_id"].tolist() == [101, 102, 103]   # FACET's own numbers
    p = ds.persons.set_index("person_id")
    assert p.loc[11, "mst_mode"] == 8 and p.loc[11, "mst_any_9"] and p.loc[11, "lighting_dimly_lit"]
    assert pd.isna(p.loc[13, "mst_mode"]) and p.loc[13, "mst_band"] == "unknown"
    assert (p.loc[11, "gt_x2"], p.loc[11, "gt_y2"]) == (60, 80)


def test_coco_reader_matches_facet_reader(tmp_path):
    rows = _rows()
    facet = read_dataset(write_facet(tmp_path / "facet", rows, IMAGES)).persons
    coco = read_dataset(write_coco(tmp_path / "coco", rows, IMAGES))
    assert coco.format == "coco"
    # COCO conversions number persons by annotation id; everything else must agree.
    cols = [c for c in facet.columns if c not in ("person_id", "image_id")]
    pd.testing.assert_frame_equal(facet[cols].reset_index(drop=True), coco.persons[cols].reset_index(drop=True),
                                  check_dtype=False)


def test_malformed_rows_are_reported_with_their_line_and_skipped(tmp_path):
    rows = _rows() + [
        person_row(21, "sa_103.jpg", "not a box"),
        person_row(22, "sa_103.jpg", (10, 10, 0, 20)),
        person_row(23, "sa_103.jpg", (500, 500, 40, 40)),      # outside the 100x100 image
        person_row(24, "sa_103.jpg", (-1, 0, 101, 100)),       # overruns by 1 px: clipped, kept
        person_row(25, "sa_103.jpg", (10, 10, 20, 20), skin_tone_4="many"),
    ]
    root = write_facet(tmp_path / "facet", rows, IMAGES)
    ds = read_dataset(root)
    where = {s.where: s.reason for s in ds.skipped}
    assert set(where) == {"line 6", "line 7", "line 10"}
    assert "not a dict" in where["line 6"] and "non-positive" in where["line 7"] and "skin_tone_4" in where["line 10"]
    plan = make_plan(ds, ExtractSettings(data=root, out=tmp_path / "run").resolved())
    assert [s.where for s in plan.skipped][-1] == "person 23"
    kept = plan.persons.set_index("person_id")
    assert 23 not in kept.index and kept.loc[24, "gt_x1"] == 0 and kept.loc[24, "gt_x2"] == 100


def test_missing_columns_stop_before_any_work(tmp_path):
    root = tmp_path / "bad"
    root.mkdir()
    header = [c for c in FACET_HEADER if c not in ("skin_tone_3", "lighting_dimly_lit")]
    with open(root / "annotations.csv", "w", newline="") as fh:
        csv.writer(fh).writerow(header)
    with pytest.raises(ValueError, match="lacks 2 required FACET columns: skin_tone_3, lighting_dimly_lit"):
        read_dataset(root)


def test_unknown_layout_and_ambiguous_json(tmp_path):
    with pytest.raises(ValueError, match="no annotations under"):
        find_annotations(tmp_path)
    (tmp_path / "a.json").write_text("{}")
    (tmp_path / "b.json").write_text("{}")
    with pytest.raises(ValueError, match="several annotation files"):
        find_annotations(tmp_path)
    with pytest.raises(ValueError, match="not a COCO-style file"):
        read_dataset(tmp_path, tmp_path / "a.json")


def test_missing_image_is_planned_as_failed_and_limit_where_select(tmp_path):
    root = write_facet(tmp_path / "facet", _rows(), IMAGES)
    next(root.rglob("sa_102.jpg")).unlink()
    (next(root.rglob("sa_103.jpg"))).write_bytes(b"not a jpeg")
    ds = read_dataset(root)
    plan = make_plan(ds, ExtractSettings(data=root, out=tmp_path / "run").resolved())
    status = dict(zip(plan.images["image_id"], plan.images["status"]))
    assert status[101] == "ok" and status[102].startswith("missing") and status[103].startswith("error")
    assert [list(s) for s in plan.shards] == [[101]]
    sel = make_plan(ds, ExtractSettings(data=root, out=tmp_path / "r", where="mst_band == 'darker'").resolved())
    assert sel.persons["person_id"].tolist() == [11]
    lim = make_plan(ds, ExtractSettings(data=root, out=tmp_path / "r", limit=2).resolved())
    assert lim.images["image_id"].tolist() == [101, 102]
