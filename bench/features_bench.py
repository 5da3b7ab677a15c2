"""Cost of ``extractor run --features query,decoder,encoder,backbone`` against ``--features query``.

    python bench/features_bench.py --data data/demo --repeats 3 --limit 48

Runs whole ``python -m extractor run`` processes (seeded untrained weights, the README's
demo settings --min-size 320 --max-size 512), alternating the two settings so that load
from other programs hits both alike, and prints wall and CPU seconds (children's user +
sys) of each, their ratios and the storage per row of every file.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALL = "query,decoder,encoder,backbone"


def run_once(data: Path, out: Path, features: str, limit: int) -> tuple[float, float]:
    shutil.rmtree(out, ignore_errors=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "extractor", "run", "--data", str(data), "--out", str(out),
                    "--checkpoint", "none", "--min-size", "320", "--max-size", "512", "--limit", str(limit),
                    "--features", features], cwd=ROOT, check=True, capture_output=True,
                   env=dict(os.environ, OMP_WAIT_POLICY="PASSIVE"))
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="dataset (python -m extractor demo --out DIR)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--limit", type=int, default=48, help="images per run")
    args = ap.parse_args()
    times: dict[str, list[tuple[float, float]]] = {"query": [], ALL: []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for features in (("query", ALL) if r % 2 == 0 else (ALL, "query")):
                times[features].append(run_once(args.data, Path(tmp) / features.replace(",", "_"), features,
                                                args.limit))
                print(f"repeat {r} {features}: wall {times[features][-1][0]:.1f} s, cpu {times[features][-1][1]:.1f} s",
                      flush=True)
        run = Path(tmp) / ALL.replace(",", "_")
        manifest = json.loads((run / "manifest.json").read_text())
    rows = manifest["counts"]["rows"]
    print(f"\n| features | wall s (min / median) | cpu s (min / median) |\n|---|---|---|")
    for f, ts in times.items():
        w, c = sorted(t[0] for t in ts), sorted(t[1] for t in ts)
        print(f"| {f} | {w[0]:.1f} / {w[len(w) // 2]:.1f} | {c[0]:.1f} / {c[len(c) // 2]:.1f} |")
    q, a = times["query"], times[ALL]
    for i, name in ((0, "wall"), (1, "cpu")):
        ratio = min(t[i] for t in a) / min(t[i] for t in q)
        med = sorted(t[i] for t in a)[len(a) // 2] / sorted(t[i] for t in q)[len(q) // 2]
        print(f"{name} ratio all / query: min {ratio:.3f}, median {med:.3f}")
    print(f"\n{rows} rows; bytes per row: " + ", ".join(f"{name} {size / rows:.0f}" for name, size in
                                                  sorted(manifest["files"].items())))


if __name__ == "__main__":
    main()
