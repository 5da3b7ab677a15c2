"""The one writer and the one reader of a run directory.

``write_run`` is used by the extractor and by ``python -m index synthetic``; it
checks the tables against their schemas and against each other (det_id = row of
embeddings.npy, every row's person and image exist, 100 predictions per readable image),
writes every file crash-safely and the manifest last, with counts and file sizes
computed from the tables. ``open_run`` is used by ``index/`` and ``ui/``: it checks
the manifest's version and every file it opens, and says in one line what to do when a
run is older or its files disagree.
"""
from __future__ import annotations

import importlib.metadata
import logging
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd

from .files import (BACKBONE_ROI, DECODER_LAYERS, DETECTIONS, EMBEDDINGS, ENCODER_ROI, IMAGES, MANIFEST,
                    PERSONS, PREDICTIONS, atomic_write, save_npy, write_json)
from .manifest import Manifest, load_manifest, now
from .schema import check_file, read_table, write_table

log = logging.getLogger(__name__)

NUM_QUERIES = 100
PACKAGES = ("torch", "torchvision", "numpy", "pandas", "pyarrow", "pillow", "faiss-cpu", "scipy")


@dataclass(frozen=True)
class FeatureSpace:
    """A per-row feature file, row-aligned with embeddings.npy."""

    name: str
    file: str
    shape: tuple[int, ...]    # per row
    dtype: str
    meaning: str


FEATURE_SPACES: dict[str, FeatureSpace] = {s.name: s for s in (
    FeatureSpace("query", EMBEDDINGS, (256,), "float32", "final decoder query embedding (after the final LayerNorm)"),
    FeatureSpace("decoder", DECODER_LAYERS, (6, 256), "float32", "every decoder layer's output, final LayerNorm applied"),
    FeatureSpace("encoder", ENCODER_ROI, (256,), "float32", "last encoder layer's memory pooled over the row's box"),
    FeatureSpace("backbone", BACKBONE_ROI, (2048,), "float16", "ResNet layer4 features pooled over the row's box"),
)}


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _check_alignment(images: pd.DataFrame, persons: pd.DataFrame, detections: pd.DataFrame, embeddings: np.ndarray,
                     predictions: pd.DataFrame | None, features: Mapping[str, np.ndarray], dim: int) -> None:
    n = len(detections)
    if embeddings.ndim != 2 or embeddings.shape != (n, dim) or embeddings.dtype != np.float32:
        raise ValueError(f"embeddings must be float32 [{n}, {dim}] (one row per detection), "
                         f"got {embeddings.dtype} {list(embeddings.shape)}")
    if not np.array_equal(detections["det_id"].to_numpy(), np.arange(n)):
        raise ValueError(f"{DETECTIONS}: det_id must equal the row number 0..{n - 1}")
    image_ids = set(images["image_id"].tolist())
    if not set(persons["image_id"].tolist()) <= image_ids or not set(detections["image_id"].tolist()) <= image_ids:
        raise ValueError("every person and detection must belong to an image of images.parquet")
    pid = detections["person_id"].dropna()
    if not set(pid.astype(np.int64).tolist()) <= set(persons["person_id"].tolist()):
        raise ValueError(f"{DETECTIONS}: a row names a person_id that {PERSONS} does not hold")
    if predictions is not None:
        ok = images.loc[images["status"] == "ok", "image_id"].to_numpy()
        per_image = predictions.groupby("image_id").size()
        if len(predictions) != NUM_QUERIES * len(ok) or not per_image.index.isin(ok).all():
            raise ValueError(f"{PREDICTIONS} must hold {NUM_QUERIES} rows per readable image "
                             f"({NUM_QUERIES * len(ok)} rows), got {len(predictions)}")
    for name, arr in features.items():
        space = FEATURE_SPACES.get(name)
        if space is None or name == "query":
            raise ValueError(f"unknown feature space {name!r}: choose from "
                             f"{', '.join(s for s in FEATURE_SPACES if s != 'query')}")
        if arr.shape != (n, *space.shape) or arr.dtype != np.dtype(space.dtype):
            raise ValueError(f"feature {name} must be {space.dtype} [{n}, {', '.join(map(str, space.shape))}], "
                             f"got {arr.dtype} {list(arr.shape)}")


def _counts(images: pd.DataFrame, persons: pd.DataFrame, det: pd.DataFrame, predictions: pd.DataFrame | None) -> dict:
    failed = images[images["status"] != "ok"]
    evaluated = persons[persons["evaluated"]]
    detected, has_person = det["detected"].to_numpy(bool), det["has_person"].to_numpy(bool)
    return {
        "images": int(len(images)), "images_ok": int(len(images) - len(failed)), "images_failed": int(len(failed)),
        "images_failed_by_reason": {str(k): int(v) for k, v in
                                    failed["status"].str.split(":").str[0].value_counts().items()},
        "persons": int(len(persons)), "persons_evaluated": int(len(evaluated)),
        "persons_detected": int(evaluated["detected"].sum()),
        "persons_without_row": int(evaluated["embedding_det_id"].isna().sum()),
        "detections_kept": int(detected.sum()), "detections_matched": int(det["matched"].sum()),
        "detections_unmatched": int((detected & ~has_person).sum()),
        "fallback_rows": int((~detected).sum()), "rows": int(len(det)),
        "predictions": None if predictions is None else int(len(predictions)),
    }


def write_run(run_dir: Path, manifest: Manifest, *, images: pd.DataFrame, persons: pd.DataFrame,
              detections: pd.DataFrame, embeddings: np.ndarray, predictions: pd.DataFrame | None = None,
              features: Mapping[str, np.ndarray] | None = None) -> Manifest:
    """Check and write every file of a run, the manifest last; returns the manifest written.

    embeddings: float32 [N, dim], row i = det_id i. features: space name -> array
    row-aligned with it (``FEATURE_SPACES``). Crash-safe: a process killed here leaves
    no manifest, so the run reads as unfinished and its command resumes it.
    """
    run_dir = Path(run_dir)
    features = dict(features or {})
    embeddings = np.asarray(embeddings)
    _check_alignment(images, persons, detections, embeddings, predictions, features, manifest.embedding_dim)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(run_dir / EMBEDDINGS, lambda p: save_npy(p, embeddings))
    for name, arr in features.items():
        atomic_write(run_dir / FEATURE_SPACES[name].file, lambda p, arr=arr: save_npy(p, arr))
    tables = {IMAGES: images, PERSONS: persons, DETECTIONS: detections}
    if predictions is not None:
        tables[PREDICTIONS] = predictions
    for name, df in tables.items():
        atomic_write(run_dir / name, lambda p, df=df, name=name: write_table(df, name, p))
    files = [EMBEDDINGS, *(FEATURE_SPACES[f].file for f in features), *tables]
    out = manifest.replace(
        created=manifest.created or now(), tables=tuple(tables),
        feature_spaces=("query", *sorted(features)),
        counts=_counts(images, persons, detections, predictions),
        files={f: (run_dir / f).stat().st_size for f in files},
        versions=manifest.versions or package_versions(),
    )
    write_json(run_dir / MANIFEST, out.to_json())
    return out


@dataclass(frozen=True)
class RunFiles:
    """A finished run opened for reading; every accessor checks what it reads."""

    run_dir: Path
    manifest: Manifest

    @property
    def n(self) -> int:
        return int(self.manifest.counts.get("rows", 0))

    def has(self, table: str) -> bool:
        return table in self.manifest.tables

    def _table(self, table: str, columns: list[str] | None = None) -> pd.DataFrame:
        path = self.run_dir / table
        if not self.has(table):
            raise ValueError(f"{self.run_dir} has no {table}: {_missing_hint(table)}")
        if not path.is_file():
            raise ValueError(f"{path} is missing although the manifest lists it: extract the run again")
        return read_table(path, table, columns)

    def images(self) -> pd.DataFrame:
        return self._table(IMAGES)

    def persons(self) -> pd.DataFrame:
        return self._table(PERSONS)

    def detections(self, columns: list[str] | None = None) -> pd.DataFrame:
        det = self._table(DETECTIONS, columns)
        if len(det) != self.n:
            raise ValueError(f"{DETECTIONS} holds {len(det)} rows, the manifest {self.n}: extract the run again")
        if "det_id" in det.columns and not np.array_equal(det["det_id"].to_numpy(), np.arange(len(det))):
            raise ValueError(f"{DETECTIONS}: det_id is not the row number: extract the run again")
        return det

    def predictions(self) -> pd.DataFrame:
        return self._table(PREDICTIONS)

    def embeddings(self, mmap: bool = True) -> np.ndarray:
        """float32 [N, dim], memory-mapped read-only by default."""
        return self.feature("query", mmap)

    def feature(self, space: str, mmap: bool = True) -> np.ndarray:
        """The feature file of ``space`` (``FEATURE_SPACES``), checked against the run."""
        fs = FEATURE_SPACES.get(space)
        if fs is None:
            raise ValueError(f"unknown feature space {space!r}: choose one of {', '.join(FEATURE_SPACES)}")
        if space not in self.manifest.feature_spaces:
            raise ValueError(f"{self.run_dir} has no {space} features: extract it with --features {space}")
        path = self.run_dir / fs.file
        if not path.is_file():
            raise ValueError(f"{self.run_dir} has no {fs.file}: extract the run again")
        try:
            arr = np.load(path, mmap_mode="r" if mmap else None)
        except (ValueError, OSError) as exc:
            raise ValueError(f"{path} is not a readable .npy file ({exc}): extract the run again") from None
        shape = (self.n, *((self.manifest.embedding_dim,) if space == "query" else fs.shape))
        if arr.shape != shape or arr.dtype != np.dtype(fs.dtype):
            raise ValueError(f"{path} holds {arr.dtype} {list(arr.shape)}, the run needs {fs.dtype} {list(shape)}: "
                             "extract the run again")
        return arr

    def check(self) -> None:
        """Every listed table matches its schema and the row counts agree (no data read)."""
        for table in self.manifest.tables:
            rows = check_file(self.run_dir / table, table)
            if table == DETECTIONS and rows != self.n:
                raise ValueError(f"{DETECTIONS} holds {rows} rows, the manifest {self.n}: extract the run again")
        self.embeddings()


def _missing_hint(table: str) -> str:
    if table == PREDICTIONS:
        return "the run was made before every query's prediction was kept; extract it again for the detection audit"
    return "extract the run again"


def open_run(run_dir: Path | str, check: bool = True) -> RunFiles:
    """Open a finished run: its manifest (version checked) and, with ``check``, its files."""
    run_dir = Path(run_dir)
    manifest = load_manifest(run_dir)
    if manifest.status != "complete":
        raise ValueError(f"{run_dir} is not a complete run (status {manifest.status!r}): finish the extraction first")
    run = RunFiles(run_dir, manifest)
    if check:
        run.check()
    return run
