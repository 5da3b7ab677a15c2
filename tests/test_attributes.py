"""Group derivation from FACET annotator counts (DESIGN §4)."""
import numpy as np
import pandas as pd
import pytest

from extractor.groups import (MST_ANY_COLUMNS, REQUIRED_ATTRIBUTE_COLUMNS, derive_groups, mode_with_ties)


def _person(tones: dict[int, int], **extra) -> dict:
    row = {c: 0 for c in REQUIRED_ATTRIBUTE_COLUMNS}
    for k, n in tones.items():
        row[f"skin_tone_{k}"] = n
    row.update(extra)
    return row


@pytest.mark.parametrize("counts,expected", [
    ([0, 0, 3, 0], 2),            # a clear mode
    ([0, 2, 1, 2], 1),            # tie between 1 and 3 -> lower median of {1, 3} = 1
    ([1, 1, 0, 1], 1),            # three-way tie {0, 1, 3} -> median 1
    ([1, 1, 1, 1], 1),            # {0,1,2,3} -> lower median 1
    ([0, 0, 0, 0], -1),           # nobody chose: unknown
])
def test_mode_with_ties(counts, expected):
    assert mode_with_ties(np.array([counts]))[0] == expected


def test_mode_tie_examples_from_docstring():
    # 3/5 tie -> 3; 3/4/9 tie -> 4 (tones are 1-based, columns 0-based)
    counts = np.zeros((2, 10), int)
    counts[0, [2, 4]] = 1
    counts[1, [2, 3, 8]] = 2
    assert list(mode_with_ties(counts) + 1) == [3, 4]


def test_derive_groups_membership_mode_band_unknown():
    df = pd.DataFrame([
        _person({3: 2, 4: 1}, lighting_well_lit=1, gender_presentation_fem=2, age_presentation_young=1),
        _person({7: 1, 8: 1}, lighting_dimly_lit=1, lighting_underexposed=1),
        _person({}, skin_tone_na=3, lighting_na=1),
        _person({6: 1, 7: 1}),
    ])
    out = derive_groups(df)
    assert out.loc[0, "mst_any_3"] and out.loc[0, "mst_any_4"] and not out.loc[0, "mst_any_5"]
    assert out["mst_mode"].tolist()[:2] == [3, 7]
    assert pd.isna(out.loc[2, "mst_mode"])
    assert out["mst_band"].tolist() == ["lighter", "darker", "unknown", "medium"]
    assert not out.loc[2, list(MST_ANY_COLUMNS)].any()
    assert out.loc[1, "lighting_dimly_lit"] and out.loc[1, "lighting_underexposed"]
    assert out["lighting_well_lit"].dtype == bool
    assert out.loc[0, "gender_mode"] == "fem" and out.loc[1, "gender_mode"] == "unknown"
    assert out.loc[0, "age_mode"] == "young" and out.loc[0, "age_any_young"]
    # Absent optional columns are filled, so every run has the same columns.
    assert (out["hairtype_coily"] == 0).all()


def test_where_expression_on_derived_columns():
    from extractor.datasets import select_persons
    df = derive_groups(pd.DataFrame([_person({8: 2}, lighting_dimly_lit=1), _person({8: 2}),
                                     _person({2: 2}, lighting_dimly_lit=1)]))
    picked = select_persons(df, "mst_mode in [7,8,9,10] and lighting_dimly_lit")
    assert len(picked) == 1 and picked.loc[0, "mst_mode"] == 8
    with pytest.raises(ValueError, match="unknown column"):
        select_persons(df, "skin == 3")
    with pytest.raises(ValueError):
        select_persons(df, "mst_mode in [")
