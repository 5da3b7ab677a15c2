"""A simulated audit: several synthetic runs of ONE synthetic dataset with planted losses.

```
OUT_DIR/
  sweep.json      the runs in order (the first is the reference), as ``extractor sweep`` writes it
  base/           darkening 1.0
  darken-0.5/
  darken-0.1/
```
Every run holds the same images, persons and embeddings (``index.synthetic`` with the
dataset seed); only who is detected differs. Person i is detected in a run when
u_i < p(run, band_i), with u_i uniform from a detection seed of its own (common random
numbers: a darker run only loses persons, as real darkening mostly does), and

    p(run, band) = BASE[band] - (1 - factor) * LOSS[band]

so darkening costs darker tones more. The truth is written to each manifest's
``planted`` (``planted["recall"]["mst_band"][band]`` = p), from which the planted
difference and difference-in-differences follow (``planted_difference``). Every run
is indexed, so the app opens it; the app labels runs with planted truth "simulated".
"""
from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from extractor.groups import UNKNOWN
from extractor.rundir import SWEEP_FILE, open_run, write_json, write_run
from index.build import build_index
from index.synthetic import write_synthetic_run

log = logging.getLogger(__name__)

GROUPING = "mst_band"
BASE = {"lighter": 0.92, "medium": 0.9, "darker": 0.86, UNKNOWN: 0.88}
LOSS = {"lighter": 0.08, "medium": 0.14, "darker": 0.3, UNKNOWN: 0.14}


@dataclass(frozen=True)
class AuditSettings:
    """The simulated audit: dataset seed and size, darkening factors (the first is the reference)."""

    seed: int = 0
    rows: int = 4000
    factors: tuple[float, ...] = (1.0, 0.5, 0.1)

    def __post_init__(self) -> None:
        if self.rows < 200:
            raise ValueError(f"a simulated audit needs at least 200 rows to show anything, got {self.rows}")
        if not self.factors or any(not 0 < f <= 1 for f in self.factors):
            raise ValueError(f"darkening factors must be in (0, 1], got {self.factors}")

    @property
    def detection_seed(self) -> int:
        return self.seed + 1_000_003  # separate from the dataset's seed: the same dataset, other draws


def run_name(factor: float) -> str:
    return "base" if factor == 1.0 else f"darken-{factor:g}"


def planted_recall(factor: float) -> dict[str, float]:
    """p(run, band) of every band for a darkening factor."""
    return {b: round(BASE[b] - (1 - factor) * LOSS[b], 6) for b in BASE}


def planted_difference(planted_a: dict, planted_b: dict, group_a: str, group_b: str,
                       metric: str = "recall", grouping: str = GROUPING) -> float:
    """Planted difference-in-differences (b minus a in group_a) minus (b minus a in group_b)
    from two manifests' ``planted``."""
    pa, pb = planted_a[metric][grouping], planted_b[metric][grouping]
    return (pb[group_a] - pa[group_a]) - (pb[group_b] - pa[group_b])


def _redetect(persons: pd.DataFrame, det: pd.DataFrame, images: pd.DataFrame, u: np.ndarray,
              p: dict[str, float], threshold: float) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Tables with persons detected where u < p[band] (evaluated persons only), and the
    detections / image counts made to agree."""
    persons, det, images = persons.copy(), det.copy(), images.copy()
    band = persons[GROUPING].astype(str).to_numpy()
    prob = np.array([p.get(b, p[UNKNOWN]) for b in band])
    found = (u < prob) & persons["evaluated"].to_numpy(dtype=bool)
    persons["detected"] = found
    row = persons["embedding_det_id"]
    persons["det_id"] = row.where(found, pd.NA).astype(row.dtype)
    has = det["has_person"].to_numpy(dtype=bool)
    pid = det["person_id"].to_numpy(dtype=np.int64, na_value=0)
    pos = pd.Index(persons["person_id"]).get_indexer(pid)
    row_found = np.where(has, found[np.maximum(pos, 0)], det["detected"].to_numpy(dtype=bool))
    # A kept detection scores at least the threshold; a missed person's row below it.
    rng = np.random.default_rng(len(det))
    score = det["score"].to_numpy(np.float32).copy()
    flip_up = has & row_found & (score < threshold)
    flip_down = has & ~row_found & (score >= threshold)
    score[flip_up] = rng.uniform(threshold, 1.0, flip_up.sum())
    score[flip_down] = rng.uniform(0.0, threshold, flip_down.sum())
    det["score"], det["detected"], det["matched"] = score, row_found, has & row_found
    counts = np.bincount(det["image_id"].to_numpy()[row_found], minlength=int(images["image_id"].max()) + 1)
    images["n_detections"] = counts[images["image_id"].to_numpy()].astype(np.int32)
    return persons, det, images


def write_synthetic_audit(out_dir: Path | str, settings: AuditSettings = AuditSettings(),
                          overwrite: bool = False) -> list[Path]:
    """Write and index the runs of the simulated audit under ``out_dir``; -> their directories in order."""
    out_dir = Path(out_dir)
    if (out_dir / "manifest.json").is_file():
        raise ValueError(f"{out_dir} is a run directory; the simulated audit writes one run per factor "
                         "inside a folder of its own: choose another OUT_DIR")
    names = [run_name(f) for f in settings.factors]
    if len(set(names)) != len(names):
        raise ValueError(f"darkening factors repeat: {settings.factors}")
    out_dir.mkdir(parents=True, exist_ok=True)
    template = out_dir / ".template"
    if template.exists():
        shutil.rmtree(template)
    write_synthetic_run(template, settings.rows, seed=settings.seed)
    files = open_run(template)
    persons, det, images, xb = files.persons(), files.detections(), files.images(), np.asarray(files.embeddings())
    u = np.random.default_rng(settings.detection_seed).random(len(persons))
    write_json(out_dir / SWEEP_FILE, {"simulated": True, "runs": [
        {"dir": n, "perturbation": f"darken:{f:g}", "words": f"simulated darkening x{f:g}"}
        for n, f in zip(names, settings.factors)]})
    out = []
    for name, factor in zip(names, settings.factors):
        run_dir = out_dir / name
        if run_dir.exists():
            if not overwrite:
                raise ValueError(f"{run_dir} exists: remove it or pass overwrite (--overwrite)")
            shutil.rmtree(run_dir)
        p = planted_recall(factor)
        pers, dets, imgs = _redetect(persons, det, images, u, p, files.manifest.threshold)
        manifest = files.manifest.replace(
            settings=files.manifest.settings | {"dataset_seed": settings.seed, "detection_seed": settings.detection_seed,
                                                "simulated_audit": True, "darken": factor},
            planted={"simulated": True, "reference": names[0], "darken": factor,
                     "rule": "detected when u < p(band); u uniform per person, shared by the runs",
                     "recall": {GROUPING: p}},
            counts={}, files={}, created="")
        write_run(run_dir, manifest, images=imgs, persons=pers, detections=dets, embeddings=xb)
        build_index(run_dir)
        out.append(run_dir)
        log.info("wrote simulated run %s (darken %g)", run_dir, factor)
    shutil.rmtree(template)
    return out
