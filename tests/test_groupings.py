"""The groupings registry: membership rules, intersections, populations, the README table."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from extractor.datasets import select_persons
from index.groupings import GROUPINGS, REGISTRY, groups_of, markdown_table, population_rows
from index.where import evaluate_where

ROOT = Path(__file__).resolve().parents[1]


def _frame() -> pd.DataFrame:
    return pd.DataFrame({
        "mst_mode": pd.array([1, 10, None, 5], dtype="Int8"), "mst_band": ["lighter", "darker", "unknown", "medium"],
        "lighting_well_lit": [True, False, False, True], "lighting_dimly_lit": [False, True, False, True],
        "lighting_underexposed": False, "lighting_overexposed": False,
        "class1": ["doctor", "nurse", None, "doctor"], "matched": pd.array([True, None, False, True], dtype="boolean"),
        "has_person": True,
    })


def test_readme_table_is_the_registry():
    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- groupings-table -->\n", 1)[1].split("\n<!-- /groupings-table -->", 1)[0]
    assert block == markdown_table()
    assert all(f"`{name}`" in block for name in GROUPINGS)


def test_intersection_cells_are_both_memberships():
    f = _frame()
    g = groups_of(f, ["mst_band", "lighting"])
    assert g.name == "mst_band & lighting" and g.rule == "overlapping"
    assert len(g.labels) == 4 * 5 and g.labels[1] == "lighter & dimly_lit"
    assert g.M.shape == (4, 20)
    # Row 3 (medium, well and dimly lit) sits in two cells: overlapping stays overlapping.
    assert [g.labels[j] for j in np.flatnonzero(g.M[3])] == ["medium & well_lit", "medium & dimly_lit"]
    assert [g.labels[j] for j in np.flatnonzero(g.M[2])] == ["unknown & unknown"]
    assert g.unknown[g.labels.index("unknown & well_lit")] and not g.unknown[0]
    single = groups_of(f, "mst_band")
    assert single.rule == "exclusive" and (single.M.sum(axis=1) == 1).all()
    assert groups_of(f, ["mst_band", "lighting_dimly_lit"]).rule == "exclusive"
    with pytest.raises(ValueError, match="twice"):
        groups_of(f, ["mst_band", "mst_band"])
    with pytest.raises(ValueError, match="unknown grouping"):
        groups_of(f, ["mst_band", "skin"])


def test_registry_rules_and_labels():
    assert REGISTRY["mst_any"].overlapping and not REGISTRY["mst_mode"].overlapping
    assert REGISTRY["mst_band"].labels == ("lighter", "medium", "darker", "unknown")
    assert all(g.rule for g in REGISTRY.values())


def test_one_where_for_extractor_and_index():
    f = _frame()
    # NA counts as False in both places (class1 missing, matched missing).
    mask = evaluate_where(f, "class1 == 'doctor' or matched")
    assert mask.tolist() == [True, False, False, True]
    assert select_persons(f, "class1 == 'doctor' or matched").index.size == 2
    assert population_rows(f, "detections").tolist() == [0, 3]
    assert population_rows(f, "persons", "class1 == 'nurse'").tolist() == [1]
    with pytest.raises(ValueError, match="unknown column"):
        select_persons(f, "skin == 3")
    with pytest.raises(ValueError, match="unknown column"):
        population_rows(f, "all", "skin == 3")
