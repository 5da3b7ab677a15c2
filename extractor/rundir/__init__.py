"""The run directory: the contract between the stages (DESIGN §5), owned here alone.

- ``files``: file names and crash-safe, umask-respecting writes;
- ``facet``: FACET's attribute vocabulary (tones, bands, lighting flags, palette);
- ``schema``: every table's columns, types and meanings, checked on write and read;
- ``manifest``: the versioned ``Manifest`` dataclass;
- ``io``: ``write_run`` (the one writer: extractor and synthetic runs) and
  ``open_run`` (the one reader: ``index/`` and ``ui/``);
- ``migrate``: ``python -m extractor migrate RUN`` for runs of an older version.
"""
from .files import (  # noqa: F401
    BACKBONE_ROI, CACHE_DIR, DECODER_LAYERS, DETECTIONS, EMBEDDINGS, ENCODER_ROI, FEATURE_FILES, IMAGES, INDEX_DIR,
    INDEX_LOCK, exclusive,
    MANIFEST, OUTPUTS, PERSONS, PREDICTIONS, SWEEP_FILE, TABLES, WORK_DIR, atomic_dir, atomic_write, fsync_dir, read_json,
    save_npy, write_json,
)
from .io import FEATURE_SPACES, NUM_QUERIES, FeatureSpace, RunFiles, open_run, package_versions, write_run  # noqa: F401
from .manifest import SCHEMA_VERSION, Manifest, load_manifest, now, read_manifest_doc  # noqa: F401
from .schema import SCHEMAS, Column, markdown_table  # noqa: F401


def read_manifest(run_dir) -> dict:
    """The run's manifest as a plain dict (version checked), for code that shows it."""
    return load_manifest(run_dir).to_json()
