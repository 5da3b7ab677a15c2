"""Benchmark of a run larger than memory: ivfpq at millions of synthetic rows.

    python bench/large_index_bench.py --rows 5000000 --work-dir /tmp/large_index_bench

Steps, each of the commands a user runs in a child process whose peak RSS (wait4's
ru_maxrss) and wall time are reported: `python -m index synthetic`, `python -m index
build --kind auto` (auto picks ivfpq when the vectors exceed the RAM share of
index.build.AUTO_RAM_SHARE), `python -m index compare --metric similarity --by
mst_band`. In this process: resident memory after `load_run` (RssAnon = the process's
own memory; RssFile = pages of memory-mapped files, reclaimable page cache) and, in a
child, after `faiss.read_index` alone; single k=10 queries one at a time (p50 / p99),
unfiltered and with 10% of rows allowed (where="det_id % 10 == 3"); recall@10 of
`neighbours` against brute-force numpy streamed over the memory-mapped file, each query
excluding itself; `--cost`: the per-code scan and per-candidate re-rank times behind
index.ivfpq.RERANK_COST_CODES. The run is deleted at the end unless --keep. Prints
markdown.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from index import load_run  # noqa: E402
from index import ivfpq  # noqa: E402
from index.vectors import normalise, release_rows  # noqa: E402


def child(args: list[str]) -> dict:
    """Run ``python args`` from the repo root under GNU time: wall seconds, peak RSS in MB."""
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "MAXRSS_KB=%M", sys.executable, *args], cwd=ROOT,
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    kb = [line for line in proc.stderr.splitlines() if line.startswith("MAXRSS_KB=")][-1]
    return {"s": wall, "peak_mb": int(kb.split("=")[1]) / 1024, "out": ""}


def status_mb() -> dict:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split(":")[0]
        if key in ("VmRSS", "RssAnon", "RssFile"):
            out[key] = int(line.split()[1]) / 1024
    return out


def brute_topk(xb: np.ndarray, q_rows: np.ndarray, k: int, allowed: np.ndarray,
               block: int = 262_144) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k ids of each query row (excluding itself) by numpy in one pass over the
    file: over every row, and over the ``allowed`` rows."""
    xq = normalise(xb[q_rows]).astype(np.float32)
    best = [(np.full((len(q_rows), k), -np.inf, np.float32), np.full((len(q_rows), k), -1, np.int64)) for _ in range(2)]
    for lo in range(0, len(xb), block):
        x = normalise(xb[lo:lo + block])
        release_rows(xb, lo, lo + len(x))
        s = xq @ x.T
        ids = np.arange(lo, lo + len(x))
        s[q_rows[:, None] == ids[None, :]] = -np.inf
        for j, keep in enumerate((None, allowed[lo:lo + len(x)])):
            if keep is not None:
                s[:, ~keep] = -np.inf
            cat_s = np.concatenate([best[j][0], s], axis=1)
            cat_i = np.concatenate([best[j][1], np.broadcast_to(ids, s.shape)], axis=1)
            part = np.argpartition(-cat_s, k, axis=1)[:, :k]
            best[j] = (np.take_along_axis(cat_s, part, axis=1), np.take_along_axis(cat_i, part, axis=1))
    return best[0][1], best[1][1]


def recall(I: np.ndarray, gt: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(a[a >= 0], b)) for a, b in zip(I, gt)]) / gt.shape[1])


def percentiles(times: list[float]) -> tuple[float, float]:
    return float(np.percentile(times, 50) * 1e3), float(np.percentile(times, 99) * 1e3)


def index_alone_mb(index_path: Path) -> dict:
    code = ("import sys, faiss, json; from pathlib import Path\n"
            "def st():\n"
            "    return {l.split(':')[0]: int(l.split()[1]) / 1024 for l in Path('/proc/self/status').read_text().splitlines()"
            " if l.split(':')[0] in ('VmRSS', 'RssAnon')}\n"
            f"b = st(); ix = faiss.read_index({str(index_path)!r}); a = st()\n"
            "print(json.dumps({k: a[k] - b[k] for k in a}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def cost_figures(run, rng: np.random.Generator) -> dict:
    """Seconds per code scanned and per candidate re-ranked, single queries."""
    index, params = run._index, run.index_manifest["params"]
    rows = rng.choice(run.n, 100, replace=False)
    xq = run.normalised(rows)

    def per_query(fn) -> float:
        t = []
        for i in range(len(xq)):
            t0 = time.perf_counter()
            fn(xq[i:i + 1])
            t.append(time.perf_counter() - t0)
        return float(np.median(t))

    lo, hi = 8, 64
    t_lo = per_query(lambda q: ivfpq.candidates(index, q, 16, lo))
    t_hi = per_query(lambda q: ivfpq.candidates(index, q, 16, hi))
    per_code = (t_hi - t_lo) / ((hi - lo) * run.n / index.nlist)
    C = ivfpq.candidates(index, xq, 512, int(params["nprobe"]))
    t_r = []
    for i in range(len(xq)):
        t0 = time.perf_counter()
        ivfpq.rerank(run.xb, xq[i:i + 1], C[i:i + 1], 10)
        t_r.append(time.perf_counter() - t0)
    per_row = float(np.median(t_r)) / 512
    # One query at the tuned parameters, stage by stage: the scan of nprobe lists for
    # `rerank` candidates, then their exact re-ranking from the file.
    depth, nprobe = int(params["rerank"]), int(params["nprobe"])
    t_scan = per_query(lambda q: ivfpq.candidates(index, q, depth, nprobe))
    C = ivfpq.candidates(index, xq, depth, nprobe)
    t_rr = []
    for i in range(len(xq)):
        t0 = time.perf_counter()
        ivfpq.rerank(run.xb, xq[i:i + 1], C[i:i + 1], 10)
        t_rr.append(time.perf_counter() - t0)
    return {"s_per_code": per_code, "s_per_rerank_row": per_row, "ratio": per_row / per_code if per_code > 0 else float("nan"),
            "tuned_scan_ms": t_scan * 1e3, "tuned_rerank_ms": float(np.median(t_rr)) * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=5_000_000)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/large_index_bench"))
    parser.add_argument("--single", type=int, default=300, help="single queries timed per case")
    parser.add_argument("--recall-queries", type=int, default=200)
    parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap rounds of the compare step")
    parser.add_argument("--cost", action="store_true", help="measure the scan / re-rank cost ratio")
    parser.add_argument("--keep", action="store_true", help="keep the run directory")
    parser.add_argument("--reuse-index", action="store_true", help="keep an index already built (no build figures)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kind", default="auto", help="index kind to build (auto picks ivfpq above the RAM share)")
    parser.add_argument("--compare-by", default="mst_mode", help="grouping of the compare step")
    parser.add_argument("--no-predictions", action="store_true",
                        help="write the run without predictions.parquet (less memory; nothing here reads it)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    logging.getLogger("index").setLevel(logging.WARNING)
    run_dir = args.work_dir / f"run_{args.rows}"
    res: dict = {"rows": args.rows, "cpus": os.cpu_count()}
    try:
        if not (run_dir / "manifest.json").is_file():
            res["synthetic"] = child(["-m", "index", "synthetic", str(run_dir), "--rows", str(args.rows), "--seed", str(args.seed),
                                      *(["--no-predictions"] if args.no_predictions else [])])
            logging.info("synthetic: %.0f s, peak %.0f MB", res["synthetic"]["s"], res["synthetic"]["peak_mb"])
        if args.reuse_index and (run_dir / "index" / "manifest.json").is_file():
            res["build"] = {"s": float("nan"), "peak_mb": float("nan"), "out": ""}
        else:
            shutil.rmtree(run_dir / "index", ignore_errors=True)
            res["build"] = child(["-m", "index", "build", str(run_dir), "--seed", str(args.seed), "--kind", args.kind])
        manifest = json.loads((run_dir / "index" / "manifest.json").read_text())
        logging.info("build: %.0f s, peak %.0f MB, %s %s", res["build"]["s"], res["build"]["peak_mb"], manifest["kind"],
                     manifest["params"])
        res["index_alone"] = index_alone_mb(run_dir / "index" / "faiss.index")

        before = status_mb()
        t0 = time.perf_counter()
        run = load_run(run_dir)
        res["load_s"] = time.perf_counter() - t0
        after = status_mb()
        res["load_run"] = {k: after[k] - before[k] for k in after}
        res["load_run_abs"] = after

        rng = np.random.default_rng(args.seed)
        where10 = "det_id % 10 == 3"
        mask10 = np.arange(run.n) % 10 == 3
        single = rng.choice(run.n, args.single, replace=False)
        for label, where in (("q1", None), ("q1_f10", where10)):
            run.search(run.normalised([0]), 10, where=where)  # warm-up (and the filter's cache)
            times = []
            for r in single:
                xq = run.normalised([r])
                t0 = time.perf_counter()
                run.search(xq, 10, where=where)
                times.append(time.perf_counter() - t0)
            res[label] = percentiles(times)
            res[label + "_spread"] = [float(np.percentile(times, p) * 1e3) for p in (10, 90)]
        q_rows = rng.choice(run.n, args.recall_queries, replace=False)
        gt, gt10 = brute_topk(run.xb, q_rows, 10, mask10)
        res["recall"] = recall(run.neighbours(q_rows, 10)[1], gt)
        res["recall_f10"] = recall(run.neighbours(q_rows, 10, where=where10)[1], gt10)
        # Share of the true top 10 among the first d candidates of the codes, per nprobe:
        # what re-ranking d candidates would give (index.ivfpq.coverage).
        xq = run.normalised(q_rows)
        depths = (64, 128, 256, 512, 1024, 2048, 4096)
        res["coverage"] = {int(p): [round(float(c), 4) for c in ivfpq.coverage(
            ivfpq.candidates(run._index, xq, depths[-1], p), gt, depths)] for p in (16, 64, 256, run._index.nlist)}
        res["coverage_depths"] = list(depths)
        if args.cost:
            res["cost"] = cost_figures(run, rng)
        res["after_queries"] = status_mb()
        res["manifest"] = {k: manifest[k] for k in ("kind", "params", "recall_at_10", "build_seconds", "ram_policy")}
        del run

        out_csv = args.work_dir / "similarity.csv"
        res["compare"] = child(["-m", "index", "compare", str(run_dir), "--metric", "similarity", "--by", args.compare_by,
                                "--n-boot", str(args.n_boot), "--out", str(out_csv)])
        logging.info("compare: %.0f s, peak %.0f MB", res["compare"]["s"], res["compare"]["peak_mb"])
    finally:
        if not args.keep:
            shutil.rmtree(run_dir, ignore_errors=True)
    for step in ("synthetic", "build", "compare"):
        if step in res:
            res[step].pop("out")
    print(json.dumps(res, indent=1, default=float))
    m = res["manifest"]
    print(f"\n{args.rows:,} rows, {res['cpus']} CPUs, load average {os.getloadavg()[0]:.1f} at the end, {m['kind']} {m['params']}\n")
    print("| step | figure |\n|---|---|")
    if "synthetic" in res:
        print(f"| python -m index synthetic | {res['synthetic']['s']:.0f} s, peak RSS {res['synthetic']['peak_mb']:.0f} MB |")
    print(f"| python -m index build (auto) | {res['build']['s']:.0f} s, peak RSS {res['build']['peak_mb']:.0f} MB |")
    print(f"| index alone after read_index | RSS +{res['index_alone']['VmRSS']:.0f} MB |")
    lr = res["load_run"]
    print(f"| load_run | {res['load_s']:.1f} s, RSS +{lr['VmRSS']:.0f} MB (anon +{lr['RssAnon']:.0f}, file +{lr['RssFile']:.0f}) |")
    print(f"| 1 query p50 / p99 (p10-p90) | {res['q1'][0]:.2f} / {res['q1'][1]:.2f} ms ({res['q1_spread'][0]:.2f}-{res['q1_spread'][1]:.2f}) |")
    print(f"| 1 query, 10% filter | {res['q1_f10'][0]:.2f} / {res['q1_f10'][1]:.2f} ms "
          f"({res['q1_f10_spread'][0]:.2f}-{res['q1_f10_spread'][1]:.2f}) |")
    print(f"| recall@10 build / bench / 10% filter | {m['recall_at_10']['value']:.3f} / {res['recall']:.3f} / {res['recall_f10']:.3f} |")
    print(f"| compare --metric similarity --by {args.compare_by} | {res['compare']['s']:.0f} s, peak RSS {res['compare']['peak_mb']:.0f} MB |")
    if "cost" in res:
        c = res["cost"]
        print(f"| scan / re-rank cost | {c['s_per_code'] * 1e9:.1f} ns a code, {c['s_per_rerank_row'] * 1e6:.2f} us a candidate, ratio {c['ratio']:.0f} |")
        print(f"| one query at the tuned setting | scan {c['tuned_scan_ms']:.2f} ms + re-rank {c['tuned_rerank_ms']:.2f} ms (medians) |")


if __name__ == "__main__":
    main()
