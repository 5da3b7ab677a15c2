"""``python -m extractor run|sweep|demo|migrate``: DETR person embeddings from FACET into run directories."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from .precisions import PRECISION_HELP, PRECISIONS

# Before torch loads: OpenMP threads that spin while waiting make every forward 10-40x
# slower as soon as anything else (our decoding threads, another program) wants a core.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

EXAMPLES = """examples:
  python -m extractor demo --out data/demo
  python -m extractor run --data data/demo --out runs/demo --checkpoint none --min-size 320 --max-size 512
  python -m extractor run --data /data/facet --out runs/facet-r50
  python -m extractor run --data /data/facet --out runs/dark-dim --where "mst_mode in [7,8,9,10] and lighting_dimly_lit"
  python -m extractor run --data /data/facet --out runs/facet-dark-jpeg --perturb darken:0.5,jpeg:75
  python -m extractor sweep --data /data/facet --out runs/darkness --perturb darken:1.0,0.5,0.1
  python -m extractor run --data /shared/facet --out /shared/runs/facet-r50 --executor ray --ray-address auto
"""
PERTURB_HELP = ("photometric change applied to each image at its original resolution before the resize, "
                "several comma-separated in order: darken:F (sRGB values times F, 0..1), exposure:EV (linear "
                "light times 2^EV), gamma:G, blur:SIGMA (px), noise:SIGMA (0..255, seeded by file name), jpeg:Q, "
                "grayscale (BT.601), none. Each step rounds to 8 bits. Default none")
SWEEP_HELP = ("one run per comma item, in RUN/<item>: darken:1.0,0.5,0.1 -> darken-1.0, darken-0.5, darken-0.1 "
              "(a bare value repeats the kind before it; + chains steps in one run: grayscale+darken:0.5 -> "
              "grayscale+darken-0.5; a minus sign is written m: exposure:-1 -> exposure-m1.0)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m extractor", description=__doc__, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="extract one embedding per detected (or missed) person into a run directory",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    _run_options(r, out_help="run directory to write (resumed if unfinished)", perturb_help=PERTURB_HELP)
    w = sub.add_parser("sweep", help="one ordinary run per perturbation value (e.g. the darkness study) under one folder",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    _run_options(w, out_help="folder of the sweep: one run directory per value inside it (each resumed if "
                 "unfinished)", perturb_help=SWEEP_HELP, perturb_required=True)

    d = sub.add_parser("demo", help="write a synthetic dataset in the FACET release format (offline demo)")
    d.add_argument("--out", required=True, type=Path, help="directory to write the dataset to")
    d.add_argument("--images", type=int, default=120, help="number of scenes (default 120)")
    d.add_argument("--seed", type=int, default=0, help="random seed (default 0); same seed, same files")
    d.add_argument("-v", "--verbose", action="store_true", help="debug logging")

    m = sub.add_parser("migrate", help="bring a run of an older schema version to the current one",
                       description="Rewrite RUN in the current run schema version, keeping its tables and "
                                   "embeddings (cheap). Runs that cannot be migrated say so: extract them again.")
    m.add_argument("run", type=Path, help="run directory to migrate in place")
    m.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def _run_options(r: argparse.ArgumentParser, out_help: str, perturb_help: str, perturb_required: bool = False) -> None:
    """The options of one run, shared by ``run`` and ``sweep``."""
    r.add_argument("--data", required=True, type=Path,
                   help="dataset root: the FACET release (annotations.csv + sa_*.jpg in any sub-folders) "
                        "or a COCO-style conversion (val2017/ + a json with FACET attributes)")
    r.add_argument("--annotations", type=Path, default=None,
                   help="annotation file (csv or json) when the root holds several or it sits elsewhere")
    r.add_argument("--out", required=True, type=Path, help=out_help)
    r.add_argument("--checkpoint", default="detr-r50",
                   help="detr-r50 | detr-r50-dc5 | detr-r101 | detr-r101-dc5 (downloaded once, hash-checked, "
                        "cached by torch.hub), a URL, a local .pth, or 'none' for seeded untrained weights "
                        "(demos and tests; the app then says numbers are structural only). Default: detr-r50")
    r.add_argument("--threshold", type=float, default=0.7,
                   help="keep a query when softmax(logits)[person] >= this (default 0.7)")
    r.add_argument("--batch-size", type=int, default=0,
                   help="images per forward pass; 0 = auto (1 on the CPU: no padding, official numbers; 16 on a GPU)")
    r.add_argument("--device", default="auto", help="auto (CUDA when available) | cpu | cuda (default auto)")
    r.add_argument("--precision", default="auto", choices=PRECISIONS, help=PRECISION_HELP)
    r.add_argument("--min-size", type=int, default=800, help="shorter image side after resizing (default 800)")
    r.add_argument("--max-size", type=int, default=1333, help="longest image side after resizing (default 1333)")
    r.add_argument("--limit", type=int, default=None, help="only the first N images (by image id)")
    r.add_argument("--where", default=None,
                   help="select persons with a pandas expression over their columns, e.g. "
                        "\"mst_mode in [7,8,9,10] and lighting_dimly_lit\" (columns: mst_mode, mst_band, "
                        "mst_any_1..10, lighting_well_lit/dimly_lit/underexposed/overexposed, gender_mode, "
                        "age_mode, class1, skin_tone_k counts, ...)")
    r.add_argument("--overwrite", action="store_true",
                   help="replace a run directory made with other settings (otherwise refused)")
    r.add_argument("--workers", type=int, default=0, help="image decoding threads; 0 = auto")
    r.add_argument("--shard-size", type=int, default=64,
                   help="images per crash-safe shard: work since the last finished shard is redone after a "
                        "crash (default 64)")
    r.add_argument("--seed", type=int, default=0, help="seed of the untrained weights for --checkpoint none")
    r.add_argument("--draft", action="store_true",
                   help="decode JPEGs at a reduced DCT scale (1/2, 1/4, 1/8) when that is still at least the "
                        "target size: faster for large photos or small --min-size, but the pixels differ slightly "
                        "from a full decode + resize (off by default)")
    r.add_argument("--perturb", default=None if perturb_required else "none", required=perturb_required,
                   help=perturb_help)
    r.add_argument("--build-index", action="store_true", help="build the FAISS index when done")
    r.add_argument("--features", default="query",
                   help="comma-separated feature spaces kept per row: query (always), decoder (every decoder "
                        "layer), encoder (encoder memory pooled over the box), backbone (layer4 pooled over "
                        "the box) (default: query)")
    r.add_argument("--executor", default="local", choices=("local", "ray"),
                   help="where the shards run: local (this process, default) or ray (actors on a Ray cluster, "
                        "one model each; needs pip install -e \".[ray]\" and, across machines, a run directory "
                        "and dataset every node sees at the same path). Same files either way; either resumes "
                        "the other's run")
    r.add_argument("--ray-address", default=None,
                   help="with --executor ray: auto (the cluster `ray start` runs on this machine) or HEAD:PORT; "
                        "default: start Ray on this machine for this run")
    r.add_argument("--ray-actors", type=int, default=0,
                   help="with --executor ray: number of actors; 0 = auto (one per GPU, else the cluster's CPUs / 2)")
    r.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "demo":
            from .demo import write_demo
            summary = write_demo(args.out, n_images=args.images, seed=args.seed)
            print(f"wrote {summary.n_images} images with {summary.n_persons} persons to {summary.root}")
            return 0
        if args.command == "migrate":
            from .rundir.migrate import migrate_run
            migrated = migrate_run(args.run)
            print(f"migrated {args.run} to run schema version {migrated.schema_version} (tables and embeddings "
                  "kept; the detection audit needs the per-query predictions of a new extraction)")
            return 0
        from .perturb import parse_perturbation, parse_sweep
        from .pipeline import run_extraction
        from .settings import ExtractSettings
        settings = ExtractSettings(
            data=args.data, out=args.out, annotations=args.annotations, checkpoint=args.checkpoint,
            threshold=args.threshold, batch_size=args.batch_size, device=args.device, precision=args.precision,
            min_size=args.min_size, max_size=args.max_size, limit=args.limit, where=args.where,
            overwrite=args.overwrite, workers=args.workers, shard_size=args.shard_size, seed=args.seed, draft=args.draft,
            features=args.features,
            build_index=args.build_index,
            executor=args.executor, ray_address=args.ray_address, ray_actors=args.ray_actors,
            perturb=parse_perturbation(args.perturb) if args.command == "run" else parse_perturbation(None))
        if args.command == "sweep":
            from .sweep import run_sweep
            for result in run_sweep(settings, parse_sweep(args.perturb)):
                _summary(result.manifest, result.out)
            return 0
        result = run_extraction(settings)
        _summary(result.manifest, result.out)
        return 0
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished shards are kept; run the same command again to resume", file=sys.stderr)
        return 130


def _summary(manifest: dict, out: Path) -> None:
    c, d = manifest["counts"], manifest["dataset"]
    ck = manifest["checkpoint"]
    lines = [
        f"run: {out}",
        f"  checkpoint: {ck['name']}" + ("  (untrained weights: numbers are structural only)" if ck["untrained"] else ""),
        f"  perturbation: {(manifest.get('perturbation') or {}).get('words', 'none')}",
        f"  images: {c['images']} ({c['images_failed']} could not be used)",
        f"  persons: {c['persons']} annotated, {c['persons_detected']} detected at threshold {manifest['threshold']}",
        f"  rows: {c['rows']} embeddings ({c['detections_kept']} kept detections, {c['fallback_rows']} for missed persons)",
        f"  skipped annotation rows: {d['skipped_rows']}" + (f" {d['skipped_by_reason']}" if d["skipped_rows"] else ""),
    ]
    t = manifest.get("timings", {})
    if t.get("images_per_s"):
        lines.append(f"  speed: {t['images_per_s']:.2f} images/s")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
