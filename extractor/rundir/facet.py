"""FACET's attribute vocabulary: tones, bands, lighting flags, presentations, the palette.

These values are part of the run format (they name columns and group labels), so they
live here rather than with the readers, the demo painter or the app.
"""
from __future__ import annotations

MST_TONES = tuple(range(1, 11))
# The Monk Skin Tone scale's published swatches, tone 1 (lightest) to 10.
MST_HEX = ("#f6ede4", "#f3e7db", "#f7ead0", "#eadaba", "#d7bd96",
           "#a07e56", "#825c43", "#604134", "#3a312a", "#292420")
MST_BANDS = {"lighter": (1, 2, 3), "medium": (4, 5, 6), "darker": (7, 8, 9, 10)}
UNKNOWN = "unknown"

SKIN_COLUMNS = tuple(f"skin_tone_{k}" for k in MST_TONES)
SKIN_NA_COLUMN = "skin_tone_na"

LIGHTING_FLAGS = ("well_lit", "dimly_lit", "underexposed", "overexposed")
LIGHTING_COLUMNS = tuple(f"lighting_{f}" for f in LIGHTING_FLAGS)
LIGHTING_NA_COLUMN = "lighting_na"

GENDER_VALUES = ("masc", "fem", "non_binary")
GENDER_COLUMNS = tuple(f"gender_presentation_{v}" for v in GENDER_VALUES)
AGE_VALUES = ("young", "middle", "older")
AGE_COLUMNS = tuple(f"age_presentation_{v}" for v in AGE_VALUES)

# Columns a dataset must carry: without them the group read-outs are meaningless.
REQUIRED_ATTRIBUTE_COLUMNS = SKIN_COLUMNS + LIGHTING_COLUMNS + GENDER_COLUMNS + AGE_COLUMNS

HAIR_COLOR_COLUMNS = ("hair_color_black", "hair_color_blonde", "hair_color_brown", "hair_color_colored",
                      "hair_color_red", "hair_color_grey", "hair_color_na")
HAIRTYPE_COLUMNS = ("hairtype_coily", "hairtype_dreadlocks", "hairtype_bald", "hairtype_straight",
                    "hairtype_curly", "hairtype_wavy", "hairtype_na")
HAS_COLUMNS = ("has_facial_hair", "has_tattoo", "has_cap", "has_mask", "has_headscarf", "has_eyeware")
VISIBLE_COLUMNS = ("visible_torso", "visible_face", "visible_minimal")

# Carried through when present, filled with 0 when absent.
OPTIONAL_ATTRIBUTE_COLUMNS = (
    SKIN_NA_COLUMN, LIGHTING_NA_COLUMN, "gender_presentation_na", "age_presentation_na",
    *HAIR_COLOR_COLUMNS, *HAIRTYPE_COLUMNS, *HAS_COLUMNS, *VISIBLE_COLUMNS,
)
RAW_ATTRIBUTE_COLUMNS = REQUIRED_ATTRIBUTE_COLUMNS + OPTIONAL_ATTRIBUTE_COLUMNS
# 0/1 columns stored as booleans; the other raw columns are annotator counts.
FLAG_COLUMNS = LIGHTING_COLUMNS + (LIGHTING_NA_COLUMN,) + HAS_COLUMNS + VISIBLE_COLUMNS

MST_ANY_COLUMNS = tuple(f"mst_any_{k}" for k in MST_TONES)
GENDER_ANY_COLUMNS = tuple(f"gender_any_{v}" for v in GENDER_VALUES)
AGE_ANY_COLUMNS = tuple(f"age_any_{v}" for v in AGE_VALUES)
DERIVED_COLUMNS = (
    MST_ANY_COLUMNS + ("mst_mode", "mst_band", "gender_mode", "age_mode")
    + GENDER_ANY_COLUMNS + AGE_ANY_COLUMNS
)
# Everything a person row carries about the person, in output order.
ATTRIBUTE_COLUMNS = ("class1", "class2") + RAW_ATTRIBUTE_COLUMNS + DERIVED_COLUMNS
