"""CSV bytes shared by the CLI and the UI's download button (byte-identical)."""
from __future__ import annotations

import io

import pandas as pd

FLOAT_FORMAT = "%.6g"
NA = "NaN"


def to_csv_bytes(df: pd.DataFrame) -> bytes:
    """UTF-8 CSV with a header, ``\\n`` line ends, floats as ``%.6g`` and missing as ``NaN``.

    Read it back with ``read_csv_bytes`` (or ``pd.read_csv(..., keep_default_na=False,
    na_values=["NaN"])``) so that empty group labels stay empty strings.
    """
    buf = io.StringIO()
    df.to_csv(buf, index=False, float_format=FLOAT_FORMAT, na_rep=NA, lineterminator="\n")
    return buf.getvalue().encode("utf-8")


def read_csv_bytes(data: bytes) -> pd.DataFrame:
    """The frame ``to_csv_bytes`` wrote (floats rounded to 6 significant digits)."""
    labels = {c: str for c in ("group_a", "group_b", "metric", "grouping", "population", "where", "rule")}
    return pd.read_csv(io.BytesIO(data), keep_default_na=False, na_values=[NA], dtype=labels)
