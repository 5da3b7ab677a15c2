"""Column-level schema of every table of a run: names, types, meanings, validation.

One ``Column`` per column, in file order. The writer conforms a frame to its table's
schema (exact columns, dtypes cast, nullability checked); the reader checks a file's
parquet schema against it before loading. The README's format tables are rendered from
here (``markdown_table``), so the documentation cannot drift from the files.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from . import facet
from .files import DETECTIONS, IMAGES, PERSONS, PREDICTIONS

# pandas dtype used in memory -> arrow type on disk. Capitalised = nullable integer.
_ARROW = {
    "int64": pa.int64(), "Int64": pa.int64(), "int32": pa.int32(), "int16": pa.int16(), "Int16": pa.int16(),
    "Int8": pa.int8(), "float32": pa.float32(), "bool": pa.bool_(), "string": pa.string(),
}


@dataclass(frozen=True)
class Column:
    name: str
    dtype: str            # a key of _ARROW
    meaning: str
    family: str = ""      # consecutive columns of one family share a README row
    categorical: bool = False  # a string of few values: read as a pandas categorical (1 byte a row, not ~13)

    @property
    def nullable(self) -> bool:
        return self.dtype[0].isupper()

    @property
    def arrow(self) -> pa.DataType:
        return _ARROW[self.dtype]


def _family(columns: tuple[str, ...], dtype: str, meaning: str, family: str) -> list[Column]:
    return [Column(c, dtype, meaning, family) for c in columns]


def _attribute_columns() -> list[Column]:
    """The person's FACET attributes and the groups derived from them (DESIGN §4)."""
    f = facet
    cols = [Column("class1", "string", "FACET person class (e.g. 'doctor')", categorical=True),
            Column("class2", "string", "second person class, '' when none", categorical=True)]
    cols += _family(f.SKIN_COLUMNS, "int16", "annotators who chose Monk Skin Tone k", "skin")
    cols += _family(f.LIGHTING_COLUMNS, "bool", "lighting condition flagged (not exclusive)", "lighting")
    cols += _family(f.GENDER_COLUMNS, "int16", "annotators who chose this gender presentation", "gender")
    cols += _family(f.AGE_COLUMNS, "int16", "annotators who chose this age presentation", "age")
    for name in f.OPTIONAL_ATTRIBUTE_COLUMNS:
        flag = name in f.FLAG_COLUMNS
        stem = name.rsplit("_", 1)[0] if not name.startswith(("has_", "visible_")) else name.split("_", 1)[0]
        cols.append(Column(name, "bool" if flag else "int16",
                           "FACET flag (0/1 in the release)" if flag else "FACET annotator count (0 when absent)",
                           f"optional-{stem}"))
    cols += _family(f.MST_ANY_COLUMNS, "bool", "at least one annotator chose tone k (groups overlap)", "mst_any")
    cols += [Column("mst_mode", "Int8", "most-chosen tone 1..10 (ties: lower median), NA = unknown"),
             Column("mst_band", "string", "lighter 1-3 / medium 4-6 / darker 7-10 / unknown, on mst_mode",
                    categorical=True),
             Column("gender_mode", "string", "most-chosen gender presentation or unknown", categorical=True),
             Column("age_mode", "string", "most-chosen age presentation or unknown", categorical=True)]
    cols += _family(f.GENDER_ANY_COLUMNS, "bool", "at least one annotator chose this gender presentation", "gender_any")
    cols += _family(f.AGE_ANY_COLUMNS, "bool", "at least one annotator chose this age presentation", "age_any")
    assert tuple(c.name for c in cols) == f.ATTRIBUTE_COLUMNS
    return cols


_BOX = [Column(f"{c}", "float32", f"box {c[0]} {'left/top' if c[1] == '1' else 'right/bottom'} edge, pixels of the "
                                  "original image", "box") for c in ("x1", "y1", "x2", "y2")]

SCHEMAS: dict[str, tuple[Column, ...]] = {
    IMAGES: (
        Column("image_id", "int64", "image id (the dataset's order)"),
        Column("filename", "string", "file name, e.g. sa_1234.jpg"),
        Column("path", "string", "path relative to the dataset root"),
        Column("width", "int32", "width in pixels, from the file (0 when unreadable)"),
        Column("height", "int32", "height in pixels, from the file (0 when unreadable)"),
        Column("status", "string", "'ok', or why the image was not processed"),
        Column("n_persons", "int32", "annotated persons on the image"),
        Column("n_detections", "int32", "kept detections (P(person) >= threshold) among its rows"),
        Column("n_rows", "int32", "its rows in detections.parquet"),
    ),
    PERSONS: (
        Column("person_id", "int64", "FACET person_id (COCO annotation id)"),
        Column("image_id", "int64", "the person's image"),
        Column("filename", "string", "the image's file name"),
        *[Column(f"gt_{c}", "float32", "annotated box, pixels (clipped to the image)", "gt") for c in ("x1", "y1", "x2", "y2")],
        *_attribute_columns(),
        Column("evaluated", "bool", "the image was readable, so the person was evaluated"),
        Column("detected", "bool", "a kept detection was matched to them (IoU >= min_iou)"),
        Column("det_id", "Int64", "that matched detection's row, NA when not detected"),
        Column("embedding_det_id", "Int64", "the row holding their embedding (matched or best-IoU query)"),
        Column("best_iou", "float32", "IoU of that row's box with theirs"),
        Column("best_score", "float32", "P(person) of that row"),
    ),
    DETECTIONS: (
        Column("det_id", "int64", "row number = row of embeddings.npy"),
        Column("image_id", "int64", "the image"),
        Column("filename", "string", "the image's file name"),
        Column("query_idx", "int16", "DETR query 0..99"),
        Column("score", "float32", "P(person): softmax over the 92 logits, index 1"),
        *_BOX,
        Column("person_id", "Int64", "matched (or, for a missed person, assigned) annotated person"),
        Column("iou", "float32", "IoU with that person's box, NaN without a person"),
        Column("detected", "bool", "kept: score >= threshold"),
        Column("matched", "bool", "kept and matched to a person"),
        Column("has_person", "bool", "the row belongs to an annotated person"),
        *_attribute_columns(),
    ),
    PREDICTIONS: (
        Column("image_id", "int64", "the image (every readable image has 100 rows)"),
        Column("query_idx", "int16", "DETR query 0..99"),
        *_BOX,
        Column("p_person", "float32", "softmax over the 92 logits, index 1"),
        Column("label", "int16", "argmax over the 91 classes (no-object excluded), COCO ids; 1 = person"),
        Column("label_score", "float32", "that class's probability (what DETR's PostProcess scores)"),
    ),
}


def _pandas_dtype(col: Column) -> object:
    return str if col.dtype == "string" else col.dtype


def conform(df: pd.DataFrame, table: str) -> pd.DataFrame:
    """The frame with exactly the table's columns, in order and in their dtypes.

    ValueError naming the problem for a missing or unexpected column, a value that
    does not fit its type, or a missing value in a column that cannot hold one.
    """
    schema = SCHEMAS[table]
    names = [c.name for c in schema]
    missing = [n for n in names if n not in df.columns]
    extra = [c for c in df.columns if c not in names]
    if missing or extra:
        raise ValueError(f"{table}: missing columns {missing[:8]}, unexpected columns {extra[:8]} "
                         "(the run format in extractor/rundir/schema.py names every column)")
    out = {}
    for col in schema:
        s = df[col.name]
        if not col.nullable and col.dtype != "float32" and s.isna().any():
            raise ValueError(f"{table}: column {col.name} ({col.dtype}) has missing values")
        try:
            if col.dtype == "string":
                # .array, not an object ndarray: pandas 3 keeps the strings in Arrow buffers
                # (a Python object per value would be ~1 KB a row more at the write).
                out[col.name] = s.astype(str).array
            elif col.dtype == "float32":
                out[col.name] = s.to_numpy(dtype=np.float32, na_value=np.nan)
            elif col.nullable:
                out[col.name] = s.astype("Float64").astype(col.dtype) if s.dtype.kind == "f" else s.astype(col.dtype)
            else:
                out[col.name] = s.astype(col.dtype).to_numpy()
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{table}: column {col.name} cannot be stored as {col.dtype} ({exc})") from None
    return pd.DataFrame(out, index=pd.RangeIndex(len(df)))


def arrow_schema(table: str) -> pa.Schema:
    return pa.schema([pa.field(c.name, c.arrow, nullable=c.nullable or c.dtype == "float32") for c in SCHEMAS[table]])


def write_table(df: pd.DataFrame, table: str, path: Path) -> int:
    """Conform ``df`` and write it as parquet to ``path``; returns the row count."""
    frame = conform(df, table)
    arrow = pa.Table.from_pandas(frame, schema=arrow_schema(table), preserve_index=False)
    # Dictionaries only where values repeat: on float columns (boxes, scores) they cost ~45%
    # (predictions.parquet: 3.3 KB per image with them, 2.2 KB without).
    dictionary = [c.name for c in SCHEMAS[table] if not c.dtype.startswith("float")]
    pq.write_table(arrow, path, compression="zstd", use_dictionary=dictionary)
    return len(frame)


def check_file(path: Path, table: str) -> int:
    """Check a parquet file's columns and types against the schema; returns its rows."""
    try:
        meta = pq.ParquetFile(path)
    except (OSError, pa.ArrowInvalid) as exc:
        raise ValueError(f"{path} is not a readable parquet file ({exc})") from None
    found = {f.name: f.type for f in meta.schema_arrow}
    problems = []
    for col in SCHEMAS[table]:
        t = found.get(col.name)
        if t is None:
            problems.append(f"no column {col.name}")
        elif not (t == col.arrow or (col.dtype == "string" and t in (pa.string(), pa.large_string()))):
            problems.append(f"{col.name} is {t}, expected {col.arrow}")
    if problems:
        raise ValueError(f"{path.name} does not match the run format ({'; '.join(problems[:4])})")
    return meta.metadata.num_rows


def read_table(path: Path, table: str, columns: list[str] | None = None) -> pd.DataFrame:
    check_file(path, table)
    known = [c.name for c in SCHEMAS[table]]
    columns = columns or known
    # Low-cardinality strings come back as categoricals: at 5M rows that is ~0.6 GB less
    # for detections + persons. Their categories are the values in the file, so a subset
    # can hold categories with no rows (value_counts lists them; groupby in pandas 3 does not).
    categorical = [c.name for c in SCHEMAS[table] if c.categorical and c.name in columns]
    frame = pd.read_parquet(path, columns=columns, read_dictionary=categorical or None)
    # The decoded arrow table is freed by now, but Arrow's allocator keeps the pages for
    # reuse: without this a 5M-row run's detections + persons stayed ~0.9 GB more
    # resident than the frames themselves (300k rows: 195 MB RSS for 131 MB of frames,
    # 145 MB with it; bench/large_index_bench.py).
    pa.default_memory_pool().release_unused()
    return frame


def markdown_table(table: str) -> str:
    """The README's table for one file: column, type, meaning (families on one row)."""
    lines = ["| column | type | meaning |", "| --- | --- | --- |"]
    schema = SCHEMAS[table]
    i = 0
    while i < len(schema):
        col = schema[i]
        j = i + 1
        if col.family:
            while j < len(schema) and schema[j].family == col.family:
                j += 1
        names = f"`{col.name}`" if j - i == 1 else f"`{col.name}` ... `{schema[j - 1].name}`"
        if col.family.startswith("optional"):
            names = ", ".join(f"`{c.name}`" for c in schema[i:j])
        kind = f"{col.dtype}{' (nullable)' if col.nullable else ''}{' (categorical in memory)' if col.categorical else ''}"
        lines.append(f"| {names} | {kind} | {col.meaning} |")
        i = j
    return "\n".join(lines)
