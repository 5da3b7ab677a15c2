"""Bringing a run of an older schema version to the current one, where that is possible.

Version 1 -> 2 keeps every table and the embeddings: the manifest is rewritten in the
versioned form (counts recomputed from the tables), the tables are rewritten with the
checked column types. Version 1 kept no per-query predictions, so the detection audit
still needs the run extracted again; everything else works after the migration.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from .files import DETECTIONS, EMBEDDINGS, IMAGES, PERSONS
from .io import write_run
from .manifest import SCHEMA_VERSION, Manifest, read_manifest_doc

log = logging.getLogger(__name__)


def migrate_run(run_dir: Path | str) -> Manifest:
    """Rewrite ``run_dir`` in the current schema version; ValueError if it cannot be."""
    run_dir = Path(run_dir)
    doc = read_manifest_doc(run_dir)
    version = doc.get("schema_version")
    if version == SCHEMA_VERSION:
        raise ValueError(f"{run_dir} is already run schema version {SCHEMA_VERSION}: nothing to migrate")
    if version != 1:
        raise ValueError(f"{run_dir} has run schema version {version!r}, which cannot be migrated: extract it again")
    synthetic = (doc.get("dataset") or {}).get("format") == "synthetic"
    known = {f.name for f in dataclasses.fields(Manifest)} - {"counts", "files", "tables", "feature_spaces",
                                                               "schema_version", "kind", "versions"}
    fields = {k: v for k, v in doc.items() if k in known}
    fields.setdefault("threshold", 0.7)
    manifest = Manifest(kind="synthetic" if synthetic else "extracted", migrated_from=1, **fields)
    try:
        tables = {name: pd.read_parquet(run_dir / name) for name in (IMAGES, PERSONS, DETECTIONS)}
        xb = np.load(run_dir / EMBEDDINGS, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise ValueError(f"{run_dir} cannot be migrated ({exc}): extract it again") from None
    out = write_run(run_dir, manifest, images=tables[IMAGES], persons=tables[PERSONS],
                    detections=tables[DETECTIONS], embeddings=np.ascontiguousarray(xb))
    log.info("migrated %s from run schema version 1 to %d (no predictions: the detection audit needs a "
             "re-extraction)", run_dir, SCHEMA_VERSION)
    return out
