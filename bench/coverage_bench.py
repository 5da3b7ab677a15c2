"""Coverage and speed of the image-cluster bootstrap (index.bootstrap).

    python bench/coverage_bench.py [--reps 300] [--n-boot 400] [--speed-only] [--no-speed]

Coverage: seeded replications of planted synthetic runs (index.coverage: the generator
of ``python -m index synthetic``, the COCO matching of index.audit and the image-cluster
bootstrap of ``compare``), each against its manifest's planted truth; prints, per
statistic and band, the share of 95% intervals that cover it: image-cluster BCa for ar
and recall50 (moderate and strong image effect), independent-persons Wilson for
recall50 (under-covers when persons of a photo share its effect), and centroid /
corrected cosine of a planted embedding mixture.

Speed: 1000 rounds of recall at FACET scale (32k images, 50k persons, 11 groups) with
its pairwise differences, and the similarity read-out (3 cosines, 11 groups) at 100k
rows x 256 dims over 32k images; one BLAS thread, as the read-outs run.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import pandas as pd

from index.bootstrap import BootSettings, image_index, resample
from index.coverage import PlantedMixture, recall_coverage, similarity_coverage, strong_image_effect
from index.disparity import mean_readout
from index.groupings import Groups
from index.planted import PlantedEffects


def speed(repeats: int = 3) -> pd.DataFrame:
    from index.groups import similarity_statistic
    rng = np.random.default_rng(0)
    rows = []
    N, n_img, G = 50_000, 32_000, 11
    ids = rng.integers(0, n_img, N)
    lab = rng.integers(0, G, N)
    groups = Groups("g", [str(g) for g in range(G)], np.eye(G, dtype=bool)[lab], False, np.zeros(G, bool))
    y = (rng.random(N) < 0.8).astype(float)
    times, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        mean_readout(groups, y, ids, "recall", BootSettings(n_boot=1000), 30)
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    rows.append({"read-out": "recall + 55 pair differences/ratios + gap", "rows": N, "images": n_img, "groups": G,
                 "n_boot": 1000, "median_s": np.median(times), "max_s": max(times), "median_cpu_s": np.median(cpu)})
    N = 100_000
    X = rng.standard_normal((N, 256))
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    M = np.eye(G, dtype=bool)[rng.integers(0, G, N)]
    uniq, inv = image_index(rng.integers(0, n_img, N))
    times, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        stat, value = similarity_statistic(M, X, inv)
        resample(stat, uniq, BootSettings(n_boot=1000), value=value)
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    rows.append({"read-out": "similarity (3 cosines)", "rows": N, "images": n_img, "groups": G, "n_boot": 1000,
                 "median_s": np.median(times), "max_s": max(times), "median_cpu_s": np.median(cpu)})
    return pd.DataFrame(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=300)
    p.add_argument("--n-boot", type=int, default=400)
    p.add_argument("--speed-only", action="store_true")
    p.add_argument("--no-speed", action="store_true")
    args = p.parse_args()
    pd.set_option("display.width", 200)
    if not args.speed_only:
        for name, effects in (("moderate image effect (image_sd 0.8)", PlantedEffects()),
                              ("strong image effect (image_sd 2.5)", strong_image_effect())):
            t = time.perf_counter()
            table = recall_coverage(effects, reps=args.reps, n_boot=args.n_boot)
            print(f"\nar / recall50 by mst_band, {name}; synthetic runs of 1200 rows (~300 photos, ~1080 persons), "
                  f"4 datasets x {args.reps // 4} detection seeds ({time.perf_counter() - t:.0f} s):")
            print(table.to_string(index=False))
        print("\nsimilarity of a planted mixture (120 photos, 1-5 rows each):")
        print(similarity_coverage(PlantedMixture(), reps=max(100, args.reps // 2), n_boot=args.n_boot).to_string(index=False))
    if not args.no_speed:
        print(f"\nspeed (seconds, one BLAS thread; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; "
              "cpu_s = this process's CPU time, about the wall time on an idle core):")
        print(speed().to_string(index=False))


if __name__ == "__main__":
    main()
