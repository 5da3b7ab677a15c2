"""Benchmark of the attribute probe: every feature space of a run at once.

    python bench/probe_bench.py --rows 50000
    python bench/probe_bench.py --coverage 500      # the intervals' coverage instead

Writes a seeded synthetic run (index.synthetic; its persons carry the FACET groups) and
nine synthetic feature spaces shaped like DETR's (query, decoder_1..6 at 256-d, encoder_roi
256-d, backbone_roi 2048-d float16) with a planted mst_band signal that grows with depth,
then times ``index.probe.probe`` over all of them plus the nuisance baseline (standardise and
PCA to 128 dimensions, label-free, once per space; 5 image-grouped folds; 1000 image-cluster
bootstrap rounds, BCa) and prints the balanced accuracy by space.

``--coverage REPS``: ``index.coverage.probe_coverage``, the share of 95% intervals covering a
planted rule's closed-form balanced accuracy / AUC / class recall, image-cluster vs persons.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from extractor.rundir import DETECTIONS, IMAGES  # noqa: E402
from index.spaces import SPACES as FEATURE_SPACES  # noqa: E402
from index.groupings import membership  # noqa: E402
from index.probe import ProbeSettings, probe  # noqa: E402
from index.synthetic import write_synthetic_run  # noqa: E402


def planted_spaces(meta: pd.DataFrame, seed: int) -> dict[str, np.ndarray]:
    """Space -> [N, d] noise plus a mst_band direction whose strength grows with depth."""
    rng = np.random.default_rng(seed)
    _, M = membership(meta, "mst_band")
    band = M.argmax(axis=1)
    out = {}
    for depth, space in enumerate(FEATURE_SPACES):
        dim, dtype = (2048, np.float16) if space == "backbone_roi" else (256, np.float32)
        directions = rng.normal(size=(M.shape[1], dim))
        strength = 0.05 * depth
        x = rng.normal(size=(len(meta), dim)) + strength * directions[band]
        out[space] = x.astype(dtype)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=50_000)
    ap.add_argument("--by", default="mst_band")
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--coverage", type=int, default=0, metavar="REPS", help="coverage simulation instead")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.coverage:
        from index.coverage import PlantedScores, probe_coverage
        t0 = time.perf_counter()
        table = probe_coverage(PlantedScores(), reps=args.coverage, n_boot=args.n_boot, seed=args.seed)
        print(table.to_string(index=False, float_format="%.3f"))
        print(f"\n{args.coverage} replications, {time.perf_counter() - t0:.0f} s")
        return
    with tempfile.TemporaryDirectory() as tmp:
        run = write_synthetic_run(Path(tmp) / "run", args.rows, seed=args.seed)
        meta, images = pd.read_parquet(run / DETECTIONS), pd.read_parquet(run / IMAGES)
        arrays = planted_spaces(meta, args.seed)
        settings = ProbeSettings(n_boot=args.n_boot, workers=args.workers, seed=args.seed)
        t0, c0 = time.perf_counter(), time.process_time()
        df = probe(run, args.by, list(arrays), population="persons", settings=settings, meta=meta, images=images,
                   arrays=arrays)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    bal = df[df["metric"] == "balanced_accuracy"].set_index("group_a")
    print(f"| rows | probed rows | spaces | wall s | cpu s | n_boot | workers |\n|---|---|---|---|---|---|---|\n"
          f"| {args.rows} | {int(bal['n_a'].iloc[0])} | {len(arrays)} + nuisance | {wall:.1f} | {cpu:.1f} | "
          f"{args.n_boot} | {args.workers} |")
    print("\n| space | balanced accuracy | 95% CI |\n|---|---|---|")
    for space, r in bal.iterrows():
        print(f"| {space} | {r['value']:.3f} | {r['ci_low']:.3f}-{r['ci_high']:.3f} |")


if __name__ == "__main__":
    main()
