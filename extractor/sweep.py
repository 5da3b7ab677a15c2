"""``python -m extractor sweep``: one ordinary run per perturbation, under one folder.

```
runs/<sweep>/
  sweep.json        the runs in the order given (the first is the reference), spec and words
  darken-1.0/       an ordinary run directory (resumable, --overwrite, fingerprint: as any run)
  darken-0.5/
  darken-0.1/
```
Run directory names are :attr:`Perturbation.dirname`. The model is loaded once for all runs.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from . import rundir
from .perturb import Perturbation
from .pipeline import RunResult, run_extraction
from .settings import ExtractSettings

log = logging.getLogger(__name__)

SWEEP_FILE = rundir.SWEEP_FILE


def sweep_runs(base: ExtractSettings, perturbations: tuple[Perturbation, ...]) -> list[ExtractSettings]:
    """The settings of each run of the sweep: ``base`` with ``out/<dirname>`` and the perturbation."""
    if not perturbations:
        raise ValueError("a sweep needs at least one perturbation")
    if not base.perturb.is_identity:
        raise ValueError("a sweep takes its perturbations from the sweep list, not from the base settings")
    out = Path(base.out)
    if (out / rundir.MANIFEST).is_file() or (out / rundir.WORK_DIR).is_dir():
        raise ValueError(f"--out {out} is a run directory; a sweep writes one run per value inside a folder of "
                         f"its own: choose another --out")
    runs = [replace(base, out=out / p.dirname, perturb=p) for p in perturbations]
    for s in runs:
        s.resolved()  # refuse a bad combination (e.g. --draft with noise) before any run starts
    return runs


def run_sweep(base: ExtractSettings, perturbations: tuple[Perturbation, ...]) -> list[RunResult]:
    """Run (or resume, or skip when complete) every run of the sweep, in order."""
    from .checkpoints import build_model

    runs = sweep_runs(base, perturbations)
    out = Path(base.out)
    out.mkdir(parents=True, exist_ok=True)
    rundir.write_json(out / SWEEP_FILE, {"runs": [
        {"dir": s.out.name, "perturbation": s.perturb.canonical, "words": s.perturb.words} for s in runs]})
    model = build_model(base.checkpoint, seed=base.seed)
    results = []
    for i, s in enumerate(runs, 1):
        log.info("sweep run %d of %d: %s (%s)", i, len(runs), s.out, s.perturb.words)
        results.append(run_extraction(s, model=model))
    return results
