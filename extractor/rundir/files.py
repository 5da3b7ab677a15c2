"""The run directory's file names and its crash-safe, shareable writes.

```
runs/<name>/
  manifest.json        written last: its presence means every other file is complete
  images.parquet  persons.parquet  detections.parquet  predictions.parquet
  embeddings.npy       float32 [N, 256]; row i is det_id i
  decoder_layers.npy  encoder_roi.npy  backbone_roi.npy   optional feature spaces, row-aligned
  index/               built by ``python -m index build``
  cache/               derived, reproducible artefacts (projections)
  .work/               plan and shards of an unfinished extraction; removed when it completes
```
"""
from __future__ import annotations

import contextlib
import itertools
import json
import os
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

MANIFEST = "manifest.json"
IMAGES = "images.parquet"
PERSONS = "persons.parquet"
DETECTIONS = "detections.parquet"
PREDICTIONS = "predictions.parquet"
EMBEDDINGS = "embeddings.npy"
DECODER_LAYERS = "decoder_layers.npy"
ENCODER_ROI = "encoder_roi.npy"
BACKBONE_ROI = "backbone_roi.npy"
WORK_DIR = ".work"
INDEX_DIR = "index"
CACHE_DIR = "cache"
# Held (an OS file lock) by whoever writes RUN/index/: the CLI build and the app's build.
INDEX_LOCK = ".index.lock"
# A folder of runs made by ``python -m extractor sweep`` holds this file (extractor/sweep.py).
SWEEP_FILE = "sweep.json"
TABLES = (IMAGES, PERSONS, DETECTIONS, PREDICTIONS)
FEATURE_FILES = (DECODER_LAYERS, ENCODER_ROI, BACKBONE_ROI)
# Everything the extractor writes at the top of a run directory (what --overwrite removes).
OUTPUTS = TABLES + (EMBEDDINGS,) + FEATURE_FILES + (MANIFEST,)

_counter = itertools.count()
_counter_lock = threading.Lock()


def _temp_name(path: Path) -> Path:
    with _counter_lock:
        n = next(_counter)
    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.{n}.tmp")


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (a power cut then keeps the new name)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then rename it over ``path``.

    A reader (or a resumed run) sees either the old file or the complete new one, never
    a partial file, whenever the process dies. The file is created with mode 0666 less
    the process umask (as ``open`` would), not mkstemp's 0600, so a colleague or a
    service account can read a shared run.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path)
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_dir(path: Path, write: Callable[[Path], Any]) -> None:
    """Like ``atomic_write`` for a directory: ``write(tmp_dir)`` fills it, then it is renamed."""
    path = Path(path)
    tmp = _temp_name(path)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        for f in tmp.iterdir():
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        fsync_dir(tmp)
        if path.exists():
            _remove(path)
        tmp.rename(path)
        fsync_dir(path.parent)
    finally:
        if tmp.exists():
            _remove(tmp)


def _remove(path: Path) -> None:
    import shutil
    shutil.rmtree(path) if path.is_dir() else path.unlink()


def write_json(path: Path, obj: Any) -> None:
    text = json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text))


def read_json(path: Path) -> dict:
    """A JSON object from ``path``; ValueError with the reason when it cannot be read."""
    try:
        doc = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ValueError(f"{path} cannot be read ({exc.strerror or type(exc).__name__})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return doc


def save_npy(path: Path, arr: Any) -> None:
    # Through a handle: np.save on a path not ending in .npy would append the suffix.
    import numpy as np
    with open(path, "wb") as fh:
        np.save(fh, arr)


@contextlib.contextmanager
def exclusive(lock_path: Path) -> Iterator[bool]:
    """Yields False when another process or session holds the lock (never blocks).

    An OS file lock rather than an in-process one: it covers several app processes
    and is released if the process dies mid-build.
    """
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on Linux
        yield True
        return
    with open(lock_path, "a+") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
