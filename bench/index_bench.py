"""Benchmark of index/: build, memory, latency, recall per index kind, and group read-outs.

    python bench/index_bench.py --sizes 10000,100000,1000000

For each size a seeded synthetic run (256-d mixture of Gaussians, index.synthetic) is
written under --work-dir, then each kind is built with build_index and queried through
load_run(...).search, the path the UI takes. Latency: one k=10 query at a time
(p50 / p99 over --single queries) and a batch of 1000 queries (p50 / p99 over
--repeats batches), unfiltered and with 10% of rows allowed (where="det_id % 10 == 3",
a filter unrelated to the embeddings). Recall@10 of
approximate kinds is measured against brute-force numpy on 1000 stored rows, each
excluding itself. Then the group read-outs on the --readout-rows run. Prints markdown.
"""
from __future__ import annotations

import argparse
import gc
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from index import GroupSettings, build_index, compare, load_run, write_synthetic_run  # noqa: E402
from index.build import BuildSettings  # noqa: E402
from extractor import rundir  # noqa: E402


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def exact_topk(xn: np.ndarray, q_rows: np.ndarray, k: int, allowed: np.ndarray | None) -> np.ndarray:
    """Brute force in numpy: top-k ids of each query row, excluding itself."""
    out = np.empty((len(q_rows), k), dtype=np.int64)
    for lo in range(0, len(q_rows), 100):
        rows = q_rows[lo:lo + 100]
        s = xn[rows] @ xn.T
        s[np.arange(len(rows)), rows] = -np.inf
        if allowed is not None:
            s[:, ~allowed] = -np.inf
        part = np.argpartition(-s, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(s, part, axis=1), axis=1)
        out[lo:lo + 100] = np.take_along_axis(part, order, axis=1)
    return out


def recall(I: np.ndarray, gt: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(a, b)) for a, b in zip(I, gt)]) / gt.shape[1])


def timed(fn, repeats: int) -> tuple[float, float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.percentile(times, 50) * 1e3), float(np.percentile(times, 99) * 1e3)


def bench_size(n: int, kinds: list[str], work: Path, args: argparse.Namespace) -> list[dict]:
    run_dir = work / f"run_{n}"
    if not (run_dir / rundir.MANIFEST).is_file():
        t0 = time.perf_counter()
        write_synthetic_run(run_dir, n, seed=args.seed)
        logging.info("wrote %d rows in %.1f s", n, time.perf_counter() - t0)
    rng = np.random.default_rng(args.seed)
    # 10% of rows, as a where-string the way the UI filters (cached after the first call).
    where10 = "det_id % 10 == 3"
    mask10 = np.arange(n) % 10 == 3
    q_rows = rng.choice(n, min(1000, n), replace=False)
    single_rows = q_rows[:args.single]
    gt = gt10 = None
    rows = []
    for kind in kinds:
        shutil.rmtree(run_dir / "index", ignore_errors=True)
        gc.collect()
        t0 = time.perf_counter()
        manifest = build_index(run_dir, BuildSettings(kind=kind, seed=args.seed))
        build_s = time.perf_counter() - t0
        gc.collect()
        before = rss_mb()
        run = load_run(run_dir)
        load_mb = rss_mb() - before
        xq = run.normalised(q_rows)
        if gt is None:
            xn = run.normalised(np.arange(n))
            gt, gt10 = exact_topk(xn, q_rows, 10, None), exact_topk(xn, q_rows, 10, mask10)
            del xn
        row = {"n": n, "kind": kind, "params": manifest["params"], "build_s": build_s, "load_mb": load_mb,
               "index_mb": manifest["index_file"]["size"] / 2**20}
        for label, where in (("", None), ("_f10", where10)):
            run.search(xq[:1], 10, where=where)  # warm-up
            row["q1" + label] = timed(lambda it=iter(single_rows): run.search(run.normalised([next(it)]), 10, where=where),
                                      len(single_rows))
            row["b1000" + label] = timed(lambda: run.search(xq, 10, where=where), args.repeats)
        row["recall"] = recall(run.neighbours(q_rows, 10)[1], gt)
        row["recall_f10"] = recall(run.neighbours(q_rows, 10, where=where10)[1], gt10)
        row["manifest_recall"] = manifest["recall_at_10"]["value"]
        logging.info("%s", row)
        rows.append(row)
        del run
    return rows


def bench_readouts(n: int, work: Path, args: argparse.Namespace) -> list[dict]:
    run_dir = work / f"run_{n}"
    if not (run_dir / rundir.MANIFEST).is_file():
        write_synthetic_run(run_dir, n, seed=args.seed)
    shutil.rmtree(run_dir / "index", ignore_errors=True)
    build_index(run_dir, BuildSettings(seed=args.seed))
    run = load_run(run_dir)
    settings = GroupSettings(n_boot=1000, seed=args.seed)
    out = []
    for by in ("mst_mode", "mst_any"):
        for metric in ("similarity", "neighbours", "recall"):
            times = []
            for _ in range(args.readout_repeats):
                t0 = time.perf_counter()
                df = compare(run, by, metric, settings=settings)
                times.append(time.perf_counter() - t0)
            groups = df["group_a"].nunique()
            out.append({"by": by, "metric": metric, "groups": groups, "rows": int(len(run.meta)), "kind": run.kind,
                        "s_median": float(np.median(times)), "s_max": float(np.max(times))})
            logging.info("%s", out[-1])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000,1000000", help="comma-separated row counts")
    parser.add_argument("--kinds", default="flat,ivf,hnsw", help="index kinds to build at each size")
    parser.add_argument("--single", type=int, default=200, help="single queries timed per case")
    parser.add_argument("--repeats", type=int, default=3, help="batches of 1000 queries timed per case")
    parser.add_argument("--readout-rows", type=int, default=100_000, help="run size for the group read-outs (0: skip)")
    parser.add_argument("--readout-repeats", type=int, default=3, help="timings per read-out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/index_bench"), help="where the synthetic runs go")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    logging.getLogger("index").setLevel(logging.WARNING)
    args.work_dir.mkdir(parents=True, exist_ok=True)

    rows = []
    for n in (int(s) for s in args.sizes.split(",") if s):
        rows += bench_size(n, args.kinds.split(","), args.work_dir, args)
    print(f"\nindex/ benchmark, {os.cpu_count()} CPUs, faiss threads default; latencies in ms\n")
    print("| n | kind | params | build s | load RSS MB | 1 query p50 / p99 | 1 query 10% p50 / p99 "
          "| 1000 batch p50 / p99 | 1000 batch 10% p50 / p99 | recall@10 build / bench | recall@10 10% |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    fmt = lambda t: f"{t[0]:.2f} / {t[1]:.2f}"  # noqa: E731
    for r in rows:
        params = ", ".join(f"{k}={v}" for k, v in r["params"].items() if k in ("nlist", "nprobe", "M", "efSearch"))
        print(f"| {r['n']:,} | {r['kind']} | {params or '-'} | {r['build_s']:.1f} | {r['load_mb']:.0f} | {fmt(r['q1'])} "
              f"| {fmt(r['q1_f10'])} | {fmt(r['b1000'])} | {fmt(r['b1000_f10'])} | {r['manifest_recall']:.3f} / {r['recall']:.3f} "
              f"| {r['recall_f10']:.3f} |")
    if args.readout_rows:
        readouts = bench_readouts(args.readout_rows, args.work_dir, args)
        print("\n| read-out | grouping | groups | rows | index | seconds (median / max) |")
        print("|---|---|---|---|---|---|")
        for r in readouts:
            print(f"| {r['metric']} | {r['by']} | {r['groups']} | {r['rows']:,} | {r['kind']} "
                  f"| {r['s_median']:.2f} / {r['s_max']:.2f} |")


if __name__ == "__main__":
    main()
