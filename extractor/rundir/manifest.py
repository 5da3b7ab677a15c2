"""The run manifest: one versioned dataclass, read and written only through here."""
from __future__ import annotations

import dataclasses
import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .files import MANIFEST, WORK_DIR, read_json

SCHEMA_VERSION = 2
# What changed per version, for the message an older run gets.
MIGRATABLE = {1: "version 2 adds column types checked on read, predictions.parquet and a normalised manifest"}
KINDS = ("extracted", "synthetic")


@dataclass(frozen=True)
class Manifest:
    """Everything recorded about a run. ``counts`` and ``files`` are filled by the writer
    from the tables themselves, so an extracted and a synthetic run cannot disagree."""

    kind: str                                  # extracted | synthetic
    embedding_dim: int
    threshold: float
    min_iou: float = 0.5
    schema_version: int = SCHEMA_VERSION
    status: str = "complete"
    created: str = ""
    settings_fingerprint: str | None = None
    settings: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)
    checkpoint: dict = field(default_factory=dict)
    preprocessing: dict = field(default_factory=dict)
    perturbation: dict | None = None           # {"spec": ..., "words": ...} of a perturbed run
    feature_spaces: tuple[str, ...] = ("query",)
    tables: tuple[str, ...] = ()               # the table files present (predictions may be absent after a migration)
    dataset: dict = field(default_factory=dict)
    filters: dict = field(default_factory=dict)
    counts: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    planted: dict | None = None                # the planted truth of a synthetic run
    migrated_from: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"manifest kind must be one of {', '.join(KINDS)}, got {self.kind!r}")

    @property
    def untrained(self) -> bool:
        return bool(self.checkpoint.get("untrained", False))

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["feature_spaces"] = list(self.feature_spaces)
        d["tables"] = list(self.tables)
        return d

    @classmethod
    def from_json(cls, doc: dict, where: str = "manifest") -> "Manifest":
        version = doc.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(_version_message(where, version))
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(doc) - names)
        if unknown:
            raise ValueError(f"{where} has fields this tool does not know ({', '.join(unknown[:5])}): "
                             "it was written by a newer version; update the tool")
        try:
            m = cls(**doc)
        except TypeError as exc:
            raise ValueError(f"{where} is incomplete ({exc}): extract the run again") from None
        return dataclasses.replace(m, feature_spaces=tuple(m.feature_spaces), tables=tuple(m.tables))

    def replace(self, **changes: Any) -> "Manifest":
        return dataclasses.replace(self, **changes)


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _version_message(where: str, version: object) -> str:
    if version in MIGRATABLE:
        run = Path(where).parent if where.endswith(MANIFEST) else where
        return (f"{where} is run schema version {version}; this tool reads {SCHEMA_VERSION} "
                f"({MIGRATABLE[version]}): run `python -m extractor migrate {run}` (cheap, keeps the embeddings) "
                "or extract it again")
    return f"{where} has run schema version {version!r}; this tool reads version {SCHEMA_VERSION}: extract it again"


def read_manifest_doc(run_dir: Path) -> dict:
    """The raw manifest JSON, with a clear error when the directory is not a finished run."""
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        hint = " (an extraction is unfinished there: run the same command again to resume)" \
            if (Path(run_dir) / WORK_DIR).is_dir() else ""
        raise ValueError(f"{run_dir} is not a run directory: no {MANIFEST}{hint}")
    return read_json(path)


def load_manifest(run_dir: Path) -> Manifest:
    return Manifest.from_json(read_manifest_doc(run_dir), str(Path(run_dir) / MANIFEST))
