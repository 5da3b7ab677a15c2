"""The extraction settings: one frozen dataclass, built at the edge (CLI, app, bench)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .infer import resolve_device, resolve_precision
from .perturb import Perturbation
from .policy import POLICY


EXECUTORS = ("local", "ray")


@dataclass(frozen=True)
class ExtractSettings:
    data: Path
    out: Path
    annotations: Path | None = None
    checkpoint: str = "detr-r50"
    threshold: float = 0.7
    batch_size: int = 0            # 0: auto (1 on the CPU, 16 on a GPU)
    device: str = "auto"
    precision: str = "auto"        # extractor/precisions.py: auto | fp32 | tf32 | bf16 | fp16
    min_size: int = 800
    max_size: int = 1333
    limit: int | None = None
    where: str | None = None
    overwrite: bool = False
    workers: int = 0               # decoding threads; 0: auto
    shard_size: int = 64           # images per crash-safe shard
    seed: int = 0                  # seeded weights for --checkpoint none
    draft: bool = False            # reduced-scale JPEG decoding where it does not upsample (opt-in)
    min_iou: float = 0.5
    build_index: bool = False
    features: tuple[str, ...] = ("query",)  # extractor/features.py: query, decoder, encoder, backbone
    perturb: Perturbation = Perturbation()   # applied before the resize (extractor/perturb.py)
    # Where the shards run: "local" (this process) or "ray" (extractor/ray_run.py). Not in the
    # fingerprint: both write the same files, so either resumes the other's run.
    executor: str = "local"
    ray_address: str | None = None  # None: a Ray started here; "auto" or HOST:PORT: a running cluster
    ray_actors: int = 0             # 0: one per GPU, else the cluster's CPUs / SpeedPolicy.cpu_actor_threads

    def resolved(self, local_device: bool = True) -> "ExtractSettings":
        """Auto values made concrete for this machine; validates ranges.

        local_device=False: ``device`` and ``precision`` were made concrete for a Ray cluster's
        actors (``ray_run.cluster_device``) and this machine's GPUs are not asked about."""
        if self.executor not in EXECUTORS:
            raise ValueError(f"unknown --executor {self.executor!r}: use {' or '.join(EXECUTORS)}")
        if self.ray_actors < 0:
            raise ValueError(f"--ray-actors must be >= 0 (0 = auto), got {self.ray_actors}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"--threshold must be within 0..1, got {self.threshold}")
        if self.min_size < 32 or self.max_size < self.min_size:
            raise ValueError(f"need 32 <= --min-size <= --max-size, got {self.min_size} and {self.max_size}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be at least 1, got {self.limit}")
        if self.batch_size < 0 or self.shard_size < 1 or self.workers < 0:
            raise ValueError("--batch-size, --workers must be >= 0 and the shard size >= 1")
        from .features import parse_features
        features = parse_features(self.features)
        if not isinstance(self.perturb, Perturbation):
            raise ValueError(f"perturb must be a Perturbation (extractor.perturb.parse_perturbation), "
                             f"got {type(self.perturb).__name__}")
        if self.draft and self.perturb.per_pixel_grain:
            raise ValueError(f"--perturb {self.perturb} adds per-pixel grain (noise, jpeg), which a reduced-scale "
                             f"decode would shrink: drop --draft")
        device = resolve_device(self.device, check=local_device)
        precision = resolve_precision(self.precision, device)
        batch = self.batch_size or POLICY.batch_size(device)
        workers = self.workers or POLICY.decode_workers(device=device)
        shard = max(self.shard_size, batch)
        return replace(self, data=Path(self.data).resolve(), out=Path(self.out).resolve(),
                       device=device, precision=precision, batch_size=batch, workers=workers,
                       shard_size=shard - shard % batch, features=features)

    def fingerprint_fields(self) -> dict:
        """What decides the content of a run: a run dir is only resumed with the same."""
        d = asdict(self)
        for k in ("out", "overwrite", "workers", "build_index", "perturb", "executor", "ray_address", "ray_actors"):
            d.pop(k)
        if tuple(d["features"]) == ("query",):
            d.pop("features")  # runs made before --features existed keep their fingerprint
        else:
            d["features"] = list(d["features"])
        # Only a perturbation that changes pixels enters (so runs from before it keep their fingerprint,
        # and darken:1.0 is the plain run).
        if not self.perturb.is_identity:
            d["perturb"] = self.perturb.effective.canonical
        d["device"] = "cuda" if str(d["device"]).startswith("cuda") else d["device"]
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}


def fingerprint(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]
