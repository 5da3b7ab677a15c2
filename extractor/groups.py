"""FACET attribute columns and the group columns derived from them (DESIGN §4).

The raw FACET columns are annotator counts (skin tone, gender and age presentation,
hair) or 0/1 flags (lighting, has_*, visible_*). From them every person gets:

- ``mst_any_1`` .. ``mst_any_10`` (bool): at least one annotator chose that Monk
  Skin Tone; groups overlap, as in FACET's own evaluation.
- ``mst_mode`` (nullable Int8, 1..10): the most-chosen tone. Ties are broken by the
  lower median of the tied tones, so a 3/5 tie gives 3 and a 3/4/9 tie gives 4.
  NA when nobody chose a tone (``unknown``).
- ``mst_band`` (str): ``lighter`` (1-3), ``medium`` (4-6), ``darker`` (7-10) or
  ``unknown``, from ``mst_mode``.
- ``lighting_*`` (bool): one flag per lighting condition, not exclusive.
- ``gender_mode`` / ``age_mode`` (str): the most-chosen presentation, same tie rule
  on the column order below, ``unknown`` when no annotator chose one;
  ``gender_any_*`` / ``age_any_*`` (bool) membership like ``mst_any``.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from .rundir.facet import (  # noqa: F401  (re-exported: the vocabulary's home is the run format)
    AGE_ANY_COLUMNS, AGE_COLUMNS, AGE_VALUES, ATTRIBUTE_COLUMNS, DERIVED_COLUMNS, FLAG_COLUMNS, GENDER_ANY_COLUMNS,
    GENDER_COLUMNS, GENDER_VALUES, LIGHTING_COLUMNS, LIGHTING_FLAGS, LIGHTING_NA_COLUMN, MST_ANY_COLUMNS, MST_BANDS,
    MST_TONES, OPTIONAL_ATTRIBUTE_COLUMNS, RAW_ATTRIBUTE_COLUMNS, REQUIRED_ATTRIBUTE_COLUMNS, SKIN_COLUMNS,
    SKIN_NA_COLUMN, UNKNOWN,
)


def mode_with_ties(counts: np.ndarray) -> np.ndarray:
    """Index of the most-chosen column per row; ties -> lower median of the tied columns.

    counts: [N, C] non-negative annotator counts. Returns int64 [N], -1 where a row
    has no count at all.
    """
    counts = np.asarray(counts)
    out = np.full(len(counts), -1, dtype=np.int64)
    if counts.size == 0:
        return out
    best = counts.max(axis=1)
    tied = (counts == best[:, None]) & (best[:, None] > 0)
    n_tied = tied.sum(axis=1)
    # The lower median of t tied positions is the ((t - 1) // 2)-th of them, in order.
    rank = np.cumsum(tied, axis=1) - 1
    pick = tied & (rank == ((n_tied - 1) // 2)[:, None])
    has = n_tied > 0
    out[has] = pick[has].argmax(axis=1)
    return out


def band_of(mst_mode: pd.Series) -> pd.Series:
    """Coarse band label for each MST mode value (NA -> ``unknown``)."""
    lookup = {tone: band for band, tones in MST_BANDS.items() for tone in tones}
    return mst_mode.map(lambda v: lookup.get(int(v), UNKNOWN) if pd.notna(v) else UNKNOWN).astype(str)


def derive_groups(attrs: pd.DataFrame) -> pd.DataFrame:
    """Add the derived group columns to a frame holding the raw attribute columns.

    attrs: one row per annotated person with every column of
    ``REQUIRED_ATTRIBUTE_COLUMNS`` (counts as integers). Returns a new frame with the
    raw columns normalised (counts Int16, flags bool) and ``DERIVED_COLUMNS`` added.
    """
    out = attrs.copy()
    for col in RAW_ATTRIBUTE_COLUMNS:
        if col not in out.columns:
            out[col] = 0
        values = pd.to_numeric(out[col], errors="coerce").fillna(0)
        out[col] = values.astype(bool) if col in FLAG_COLUMNS else values.astype("int16")
    for col in ("class1", "class2"):
        if col not in out.columns:
            out[col] = ""
        out[col] = out[col].fillna("").astype(str)

    skin = out[list(SKIN_COLUMNS)].to_numpy()
    for k, col in zip(MST_TONES, MST_ANY_COLUMNS):
        out[col] = skin[:, k - 1] > 0
    mode = mode_with_ties(skin)
    out["mst_mode"] = pd.array(np.where(mode >= 0, mode + 1, 0), dtype="Int8")
    out.loc[mode < 0, "mst_mode"] = pd.NA
    out["mst_band"] = band_of(out["mst_mode"])

    for name, values, columns, any_columns in (
        ("gender_mode", GENDER_VALUES, GENDER_COLUMNS, GENDER_ANY_COLUMNS),
        ("age_mode", AGE_VALUES, AGE_COLUMNS, AGE_ANY_COLUMNS),
    ):
        counts = out[list(columns)].to_numpy()
        idx = mode_with_ties(counts)
        labels = np.array(values + (UNKNOWN,), dtype=object)
        out[name] = labels[np.where(idx >= 0, idx, len(values))].astype(str)
        for j, col in enumerate(any_columns):
            out[col] = counts[:, j] > 0
    return out
