"""Turn a pandas query string over a frame's columns into a boolean row mask.

The one implementation of ``--where``: the extractor selects annotated persons with it
(``extractor.datasets.select_persons``), the index filters searches and read-outs with it
(``index.where``). Missing values (pandas NA) count as False everywhere.
"""
from __future__ import annotations

import difflib
import re

import numpy as np
import pandas as pd

# Shown when a filter names an unknown column: the ones people filter on most.
_COMMON = ("mst_mode", "mst_band", "mst_any_1", "lighting_dimly_lit", "gender_mode", "age_mode",
           "matched", "detected", "has_person", "score", "image_id")


def evaluate_where(frame: pd.DataFrame, where: str) -> np.ndarray:
    """bool [len(frame)] for a query like ``"mst_mode in [7,8,9,10] and lighting_dimly_lit"``.

    Missing values (pandas NA) count as False.
    """
    if not where.strip():
        raise ValueError("where is empty: give a condition such as \"mst_band == 'darker'\" or None for all rows")
    try:
        # The python engine keeps pandas' nullable dtypes (NA) intact. Categoricals named in
        # the query are compared as strings: an unordered categorical refuses '<'.
        named = {c: frame[c].astype(str) for c in frame.columns
                 if isinstance(frame[c].dtype, pd.CategoricalDtype) and str(c) in where}
        result = (frame.assign(**named) if named else frame).eval(where, engine="python")
    except pd.errors.UndefinedVariableError as exc:
        name = _missing_name(str(exc))
        close = difflib.get_close_matches(name, [str(c) for c in frame.columns], n=3) if name else []
        suggestions = close + [c for c in _COMMON if c in frame.columns and c not in close]
        raise ValueError(
            f"where {where!r} names an unknown column {name!r}; valid columns include "
            f"{', '.join(suggestions[:8])}"
        ) from None
    except SyntaxError as exc:
        raise ValueError(f"where {where!r} is not a valid expression ({exc.msg}); "
                         "example: \"mst_mode in [7, 8] and lighting_dimly_lit\"") from None
    except Exception as exc:  # pandas raises many types for bad expressions
        raise ValueError(f"where {where!r} could not be evaluated: {type(exc).__name__}: {exc}") from None
    if not isinstance(result, pd.Series) or len(result) != len(frame):
        raise ValueError(f"where {where!r} does not give one True/False per row (got {type(result).__name__})")
    if not (pd.api.types.is_bool_dtype(result.dtype)):
        raise ValueError(f"where {where!r} gives {result.dtype} values, not True/False: compare it, e.g. 'score > 0.9'")
    return result.to_numpy(dtype=bool, na_value=False)


def _missing_name(message: str) -> str:
    match = re.search(r"'([^']+)'", message)
    return match.group(1) if match else ""
