"""Images/s of ``--executor ray`` with 1 and 2 CPU actors, alternated in one window on one Ray.

    python bench/ray_bench.py --data data/demo --images 24 --repeats 2

Each run is a whole ``run_extraction`` (fresh actors: the model is built in each); printed per run:
images/s over the extraction (actor start-up included) and the steady rate between the first and
the last finished image (what grows with actors), with the load average around it.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.chdir(ROOT)  # Ray puts the driver's working directory on its workers' path: this checkout's code
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--actors", default="1,2")
    ap.add_argument("--min-size", type=int, default=320)
    ap.add_argument("--max-size", type=int, default=512)
    args = ap.parse_args()
    import ray

    from extractor.pipeline import run_extraction
    from extractor.settings import ExtractSettings
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING")
    out = Path(tempfile.mkdtemp(prefix="ray_bench_"))
    rates: dict[int, list[float]] = {}
    try:
        for rep in range(args.repeats):
            for n in (int(a) for a in args.actors.split(",")):
                load = os.getloadavg()[0]
                t = time.perf_counter()
                r = run_extraction(ExtractSettings(
                    data=args.data, out=out / f"a{n}-{rep}", checkpoint="none", limit=args.images,
                    min_size=args.min_size, max_size=args.max_size, shard_size=4, executor="ray", ray_actors=n))
                tm = r.manifest["timings"]
                steady = (args.images - n) / (tm["last_image_unix"] - tm["first_image_unix"])
                rates.setdefault(n, []).append(steady)
                print(f"actors {n} rep {rep}: {tm['images_per_s']:.3f} images/s over the extraction, "
                      f"{steady:.3f} images/s first-to-last image, whole {time.perf_counter() - t:.1f} s, "
                      f"load {load:.1f} -> {os.getloadavg()[0]:.1f}", flush=True)
                shutil.rmtree(out / f"a{n}-{rep}")
    finally:
        ray.shutdown()
        shutil.rmtree(out, ignore_errors=True)
    for n, v in rates.items():
        print(f"actors {n}: steady images/s {', '.join(f'{x:.3f}' for x in v)}")
    if 1 in rates and 2 in rates:
        pairs = [b / a for a, b in zip(rates[1], rates[2])]
        print("ratio 2/1 actors per alternated pair: " + ", ".join(f"{p:.2f}" for p in pairs))


if __name__ == "__main__":
    main()
