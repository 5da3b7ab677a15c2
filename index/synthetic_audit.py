"""A simulated audit: several synthetic runs of ONE synthetic dataset with planted losses.

```
OUT_DIR/
  sweep.json      the runs in order (the first is the reference), as ``extractor sweep`` writes it
  base/           darkening 1.0
  darken-0.5/
  darken-0.1/
```
Every run is ``index.synthetic.write_synthetic_run`` with the same dataset seed (the same
images, persons and embeddings) and the same detection seed (the same image effects and
draws), under the planted detection model of ``index.planted`` with its band logits
lowered by ``(1 - factor) * LOSS[band]``: darkening costs darker tones more. Each
manifest's ``planted`` holds the exact truth per metric and group
(``planted["ar"]["mst_band"]["darker"]``, ``recall50``, ``recall75``, ``recall``), from
which the planted difference and difference-in-differences follow
(``planted_difference``). Every run is indexed, so the app opens it; the app labels runs
with planted truth "simulated".
"""
from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from extractor.groups import UNKNOWN
from extractor.rundir import SWEEP_FILE, write_json
from index.build import build_index
from index.planted import PlantedEffects
from index.synthetic import write_synthetic_run

log = logging.getLogger(__name__)

GROUPING = "mst_band"
# Logit lost at darkening factor 0 (scaled by 1 - factor): darker tones lose most.
LOSS = {"lighter": 0.5, "medium": 0.8, "darker": 1.6, UNKNOWN: 0.8}


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


def darkened(factor: float, base: PlantedEffects = PlantedEffects()) -> PlantedEffects:
    """The planted effects of a run darkened by ``factor``: band logits minus (1 - factor) LOSS."""
    return replace(base, band_logit=tuple((b, round(v - (1 - factor) * LOSS[b], 6)) for b, v in base.band_logit))


def planted_difference(planted_a: dict, planted_b: dict, group_a: str, group_b: str,
                       metric: str = "recall", grouping: str = GROUPING) -> float:
    """Planted difference-in-differences (b minus a in group_a) minus (b minus a in group_b)
    from two manifests' ``planted``."""
    pa, pb = planted_a[metric][grouping], planted_b[metric][grouping]
    return (pb[group_a] - pa[group_a]) - (pb[group_b] - pa[group_b])


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
        write_synthetic_run(run_dir, settings.rows, seed=settings.seed, effects=darkened(factor),
                            detection_seed=settings.detection_seed)
        build_index(run_dir)
        out.append(run_dir)
        log.info("wrote simulated run %s (darken %g)", run_dir, factor)
    return out
