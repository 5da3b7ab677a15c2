"""The run directory: file names, schema version, crash-safe writes (DESIGN §5).

```
runs/<name>/
  manifest.json        settings, model + checkpoint, dataset, counts, versions, timings
  images.parquet       image_id, filename, path, width, height, status, n_persons, n_rows
  persons.parquet      person_id, image_id, gt box, attributes, det_id, embedding_det_id, ...
  detections.parquet   det_id, image_id, query_idx, score, x1..y2, person_id, iou, detected, ...
  embeddings.npy       float32 [N, 256]; row i is det_id i
  decoder_layers.npy   optional float32 [N, 6, 256]: every decoder layer (extractor run --features decoder)
  encoder_roi.npy      optional float32 [N, 256]: encoder memory pooled over the row's box (--features encoder)
  backbone_roi.npy     optional float16 [N, 2048]: ResNet layer4 pooled over the row's box (--features backbone)
  index/               built by ``python -m index build``
  cache/               derived, reproducible artefacts (projections)
  .work/               shards of an unfinished extraction; removed when it completes
```
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
IMAGES = "images.parquet"
PERSONS = "persons.parquet"
DETECTIONS = "detections.parquet"
EMBEDDINGS = "embeddings.npy"
WORK_DIR = ".work"
INDEX_DIR = "index"
CACHE_DIR = "cache"
OUTPUTS = (IMAGES, PERSONS, DETECTIONS, EMBEDDINGS, MANIFEST)
# Optional per-row feature files, row-aligned with EMBEDDINGS (extractor/features.py writes them).
DECODER_LAYERS = "decoder_layers.npy"
ENCODER_ROI = "encoder_roi.npy"
BACKBONE_ROI = "backbone_roi.npy"
FEATURE_FILES = (DECODER_LAYERS, ENCODER_ROI, BACKBONE_ROI)
N_DECODER_LAYERS = 6
# Feature space -> (file, layer of a [N, layers, d] file or None for a [N, d] file).
FEATURE_SPACES: dict[str, tuple[str, int | None]] = {
    "query": (EMBEDDINGS, None),
    **{f"decoder_{i}": (DECODER_LAYERS, i - 1) for i in range(1, N_DECODER_LAYERS + 1)},
    "encoder_roi": (ENCODER_ROI, None),
    "backbone_roi": (BACKBONE_ROI, None),
}


def atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then rename it over ``path``.

    A reader (or a resumed run) sees either the old file or the complete new one, never
    a partial file, whenever the process dies.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: Path, obj: Any) -> None:
    text = json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text))


def read_manifest(run_dir: Path) -> dict:
    """The run's manifest, with a clear error when the directory is not a finished run."""
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        hint = " (an extraction is unfinished there: run the same command again to resume)" \
            if (Path(run_dir) / WORK_DIR).is_dir() else ""
        raise ValueError(f"{run_dir} is not a run directory: no {MANIFEST}{hint}")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ValueError(
            f"{run_dir} has run schema version {version!r}; this tool reads version "
            f"{SCHEMA_VERSION}: extract it again with this version"
        )
    return manifest
