"""Extraction speed: the plain official path against the project's `extractor run` path.

    python bench/extract_bench.py [--images 16] [--levers] [--workdir /tmp/extract_bench]
                                  [--device auto|cpu|cuda] [--batch-size N] [--precision P]
    python bench/extract_bench.py --whole-process [--images 24] [--repeats 3] [--run-option=--draft]

Writes FACET-sized JPEGs with annotated persons (the synthetic demo scenes upscaled to
a 1500-pixel shorter side, with sensor-like noise so they compress like photographs) and
a fixed, non-degenerate random checkpoint in the official format, then times, in one
process on the same images and weights:

(a) the plain official evaluation path: batch of one, float32, eager, full JPEG decode,
    PIL resize to 800/1333, ImageNet normalisation, torch.no_grad;
(b) the project's default ``extractor run`` path end to end (reading the annotations,
    decoding, preprocessing, model, filtering, matching, writing the run directory).

It prints images/s of each, their ratio, and the agreement of (b) with (a): cosine
between the query embeddings of the same (image, query), max |score difference|, and
whether the kept and matched sets at the threshold are the same (a flip only counts as
allowed when the plain score is within 0.01 of the threshold). The threshold is chosen
from (a)'s scores so that the plain path keeps about three queries per image. With
``--levers`` it also times the model alone under each speed lever (CPU).
``--device``, ``--batch-size`` and ``--precision`` are passed to (b), and (a) runs on
the same device, in strict float32; on a GPU the default picks TF32 and batches of 16.

``--whole-process`` instead times both paths as separate processes, the way a user runs
them, on 2000x1500 real-photo JPEGs (see bench/whole_process.py). Other CPU engines
(OpenVINO, ONNX Runtime, torch.compile, padded shape buckets) are measured against the
default path by bench/engine_bench.py.
"""
from __future__ import annotations

import argparse
import csv
import ast
import logging
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from extractor import rundir  # noqa: E402
from extractor.checkpoints import seeded_state_dict  # noqa: E402
from extractor.demo import write_demo  # noqa: E402
from extractor.detr import build_detr, fold_frozen_batchnorm  # noqa: E402
from extractor.fastpath import optimise_for_inference  # noqa: E402
from extractor.infer import precision_context, resolve_device  # noqa: E402
from extractor.matching import cxcywh_to_xyxy_pixels, match_image  # noqa: E402
from extractor.pipeline import run_extraction  # noqa: E402
from extractor.precisions import PRECISIONS  # noqa: E402
from extractor.preprocess import IMAGENET_MEAN, IMAGENET_STD, collate, load_prepared, target_size  # noqa: E402
from extractor.settings import ExtractSettings  # noqa: E402

log = logging.getLogger("extract_bench")
SHORT_SIDE = 1500  # FACET (SA-1B) images are stored with a 1500-pixel shorter side


def write_dataset(root: Path, n_images: int, seed: int) -> Path:
    """Demo scenes upscaled to FACET size; boxes scaled with them."""
    summary = write_demo(root, n_images=n_images, seed=seed)
    rng = np.random.default_rng(seed)
    scale_of: dict[str, float] = {}
    for path in sorted(root.rglob("sa_*.jpg")):
        with Image.open(path) as small:
            scale = SHORT_SIDE / min(small.size)
            big = small.convert("RGB").resize((round(small.width * scale), round(small.height * scale)),
                                              Image.BICUBIC)
        pixels = np.asarray(big, dtype=np.float32)
        pixels = pixels + rng.normal(0, 6.0, size=pixels.shape).astype(np.float32)  # photographic grain
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=92)
        scale_of[path.name] = scale
    rows = list(csv.DictReader(open(summary.annotations, newline="")))
    for row in rows:
        box, s = ast.literal_eval(row["bounding_box"]), scale_of[row["filename"]]
        row["bounding_box"] = str({k: float(v) * s for k, v in box.items()})
    with open(summary.annotations, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


def plain_path(model: torch.nn.Module, paths: list[Path], device: str = "cpu", min_size: int = 800,
               max_size: int = 1333) -> tuple[float, dict[str, dict]]:
    """(seconds, per file name: scores [Q], boxes [Q,4] cxcywh, embeddings [Q,256], size)."""
    mean = torch.tensor(IMAGENET_MEAN, device=device)[:, None, None]
    std = torch.tensor(IMAGENET_STD, device=device)[:, None, None]
    out: dict[str, dict] = {}
    t0 = time.perf_counter()
    for path in paths:
        with Image.open(path) as photo:
            img, size = photo.convert("RGB"), photo.size
        img = img.resize(target_size(img.width, img.height, min_size, max_size), Image.BILINEAR)
        x = torch.from_numpy(np.array(img)).to(device).permute(2, 0, 1).float().div(255).sub(mean).div(std)[None]
        # Strict float32 on a GPU too: PyTorch's default runs cuDNN convolutions in TF32.
        with torch.no_grad(), precision_context(device, "fp32"):
            o = {k: v[0].float().cpu() for k, v in model(x).items()}  # .cpu() waits for the GPU
        out[path.name] = {"scores": o["pred_logits"].softmax(-1)[:, 1].numpy(),
                          "boxes": o["pred_boxes"].numpy(), "emb": o["query_embeddings"].numpy(),
                          "size": size}
    return time.perf_counter() - t0, out


def pick_threshold(plain: dict[str, dict], per_image: float = 3.0) -> float:
    """A threshold keeping ~per_image queries per image, placed mid-way in a gap of the scores."""
    scores = np.sort(np.concatenate([v["scores"] for v in plain.values()]))[::-1]
    k = int(round(per_image * len(plain)))
    window = scores[max(k - 20, 1):k + 20]
    gaps = window[:-1] - window[1:]
    j = int(np.argmax(gaps))
    return float((window[j] + window[j + 1]) / 2)


def agreement(plain: dict[str, dict], run: Path, threshold: float, persons: pd.DataFrame) -> dict:
    files = rundir.open_run(run)
    det, emb = files.detections(), files.embeddings()
    cos, dscore = [], []
    for row, e in zip(det.itertuples(), emb):
        ref = plain[row.filename]
        a = ref["emb"][row.query_idx]
        cos.append(float(a @ e / (np.linalg.norm(a) * np.linalg.norm(e))))
        dscore.append(abs(float(ref["scores"][row.query_idx]) - float(row.score)))
    kept_a, matched_a, near = set(), set(), {}
    for name, ref in plain.items():
        w, h = ref["size"]
        gt = persons[persons["filename"] == name]
        m = match_image(ref["scores"], cxcywh_to_xyxy_pixels(ref["boxes"], w, h),
                        gt[["gt_x1", "gt_y1", "gt_x2", "gt_y2"]].to_numpy(float), threshold)
        for q in np.flatnonzero(ref["scores"] >= threshold):
            kept_a.add((name, int(q)))
        for q, p, d in zip(m.query_idx, m.person_idx, m.detected):
            if d and p >= 0:
                matched_a.add((name, int(q), int(gt["person_id"].iloc[p])))
        near.update({(name, q): abs(float(s) - threshold) < 0.01 for q, s in enumerate(ref["scores"])})
    kept_b = {(r.filename, int(r.query_idx)) for r in det[det["detected"]].itertuples()}
    matched_b = {(r.filename, int(r.query_idx), int(r.person_id)) for r in det[det["matched"]].itertuples()}
    flips = kept_a ^ kept_b
    return {"rows": len(det), "cos_min": min(cos), "cos_mean": statistics.fmean(cos),
            "score_diff_max": max(dscore), "kept": len(kept_a), "kept_flips": len(flips),
            "kept_flips_allowed": all(near[f] for f in flips),
            "matched_a": len(matched_a), "matched_b": len(matched_b),
            "matched_same": {(n, q) for n, q, _ in matched_a ^ matched_b} <= {f for f in flips}}


def levers(sd: dict, image: Path, repeats: int = 3) -> list[tuple[str, float]]:
    """Model-only seconds per image (median of `repeats` after a warm-up) under each lever."""
    img = Image.open(image).convert("RGB")
    img = img.resize(target_size(img.width, img.height, 800, 1333), Image.BILINEAR)
    pixels = np.array(img)
    base = build_detr()
    base.load_state_dict(sd)
    base.eval()
    folded = fold_frozen_batchnorm(base)
    x_cf, _ = collate([pixels], channels_last=False)
    x_cl, _ = collate([pixels])
    x2_cl, _ = collate([pixels, pixels])

    def timed(model, x, dtype=None, per=1):
        ctx = torch.autocast("cpu", dtype=dtype) if dtype else torch.autocast("cpu", enabled=False)
        with torch.inference_mode(), ctx:
            model(x)
            runs = []
            for _ in range(repeats):
                t = time.perf_counter()
                model(x)
                runs.append((time.perf_counter() - t) / per)
        return statistics.median(runs)

    cl = lambda m: m.to(memory_format=torch.channels_last)  # noqa: E731
    rows = [("fp32 eager (official)", timed(base, x_cf))]
    rows.append(("fp32 channels-last", timed(cl(build_and_load(sd)), x_cl)))
    rows.append(("fp32 channels-last + folded BN", timed(cl(fold_frozen_batchnorm(base)), x_cl)))
    rows.append(("fp32 channels-last + folded BN + fused prepacked convs (default)",
                 timed(optimise_for_inference(build_and_load(sd), "cpu", "fp32"), x_cl)))
    rows.append(("bf16 autocast", timed(build_and_load(sd), x_cf, torch.bfloat16)))
    rows.append(("bf16 channels-last", timed(cl(build_and_load(sd)), x_cl, torch.bfloat16)))
    rows.append(("bf16 channels-last + folded BN", timed(cl(folded), x_cl, torch.bfloat16)))
    rows.append(("bf16 channels-last + folded BN, batch 2", timed(cl(folded), x2_cl, torch.bfloat16, per=2)))
    small = Image.open(image).convert("RGB")
    small = small.resize(target_size(small.width, small.height, 640, 1066), Image.BILINEAR)
    x_small, _ = collate([np.array(small)])
    rows.append(("default path at --min-size 640 --max-size 1066 (changes results)",
                 timed(optimise_for_inference(build_and_load(sd), "cpu", "fp32"), x_small)))
    return rows


def decode_levers(paths: list[Path]) -> list[tuple[str, float]]:
    """Seconds per image to decode + resize to the 800/1333 target, full decode vs JPEG draft."""
    out = []
    for name, draft in (("full decode + resize (official)", False), ("JPEG draft decode + resize (--draft)", True)):
        t = time.perf_counter()
        for path in paths:
            load_prepared(path, 800, 1333, draft=draft)
        out.append((name, (time.perf_counter() - t) / len(paths)))
    return out


def build_and_load(sd: dict) -> torch.nn.Module:
    model = build_detr()
    model.load_state_dict(sd)
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=16, help="number of FACET-sized images (default 16)")
    p.add_argument("--seed", type=int, default=0, help="seed of the scenes and of the weights")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/extract_bench"), help="scratch directory")
    p.add_argument("--levers", action="store_true", help="also time the model alone under each lever (CPU)")
    p.add_argument("--device", default="auto", help="device of both paths: auto (CUDA when available), cpu, cuda")
    p.add_argument("--batch-size", type=int, default=0, help="batch size of (b); 0: the extractor's auto")
    p.add_argument("--precision", default="auto", help="precision of (b): " + ", ".join(PRECISIONS))
    p.add_argument("--whole-process", action="store_true",
                   help="time both paths as whole processes (plain script vs `python -m extractor run`)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved A/B pairs of --whole-process (default 3)")
    p.add_argument("--run-option", action="append", default=[],
                   help="extra option of `extractor run` under --whole-process (a lever), e.g. --run-option=--draft")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    shutil.rmtree(args.workdir, ignore_errors=True)
    if args.whole_process:
        from whole_process import whole_process
        whole_process(args.workdir, args.images, args.repeats, args.seed, agreement, pick_threshold,
                      tuple(args.run_option))
        return 0
    data = write_dataset(args.workdir / "data", args.images, args.seed)
    sd = seeded_state_dict(args.seed)
    ckpt = args.workdir / "detr-bench-weights.pth"
    torch.save({"model": sd}, ckpt)
    paths = sorted(data.rglob("sa_*.jpg"))
    print(f"{len(paths)} images, sizes {sorted({Image.open(q).size for q in paths})}, "
          f"{sum(q.stat().st_size for q in paths) / len(paths) / 1e3:.0f} kB each; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    device = resolve_device(args.device)
    model = build_and_load(sd).to(device)
    plain_path(model, paths[:1], device)              # warm-up: oneDNN primitives / CUDA context, allocator
    t_a, plain = plain_path(model, paths, device)
    threshold = pick_threshold(plain)

    common = dict(data=data, checkpoint=str(ckpt), threshold=threshold, device=device,
                  batch_size=args.batch_size, precision=args.precision)
    run_extraction(ExtractSettings(out=args.workdir / "warm", limit=2, **common))  # same warm-up for (b)
    settings = ExtractSettings(out=args.workdir / "run", **common)
    t0 = time.perf_counter()
    result = run_extraction(settings)
    t_b = time.perf_counter() - t0
    persons = rundir.open_run(result.out).persons()
    agree = agreement(plain, result.out, threshold, persons)
    m = result.manifest
    sizes = m["files"]
    total_bytes = sum(sizes.values()) + (result.out / rundir.MANIFEST).stat().st_size

    n = len(paths)
    print(f"\nthreshold {threshold:.4f} (plain path keeps {agree['kept']} queries on {n} images); "
          f"default path: device {m['preprocessing']['device']}, precision {m['preprocessing']['precision']}, "
          f"batch {m['preprocessing']['batch_size']}\n")
    print("| path | images/s | s/image |")
    print("| --- | --- | --- |")
    print(f"| (a) plain official (batch 1, fp32, eager, full decode) | {n / t_a:.3f} | {t_a / n:.2f} |")
    print(f"| (b) extractor run, end to end | {n / t_b:.3f} | {t_b / n:.2f} |")
    t = m["timings"]
    print(f"| (b) of which the per-image loop (decode to shard written; model loading, planning and "
          f"final files excluded) | {n / t['extract_s']:.3f} | {t['extract_s'] / n:.2f} |")
    print(f"\nratio (b)/(a): {t_a / t_b:.2f}x end to end, {t_a / t['extract_s']:.2f}x per-image loop")
    print(f"agreement over {agree['rows']} rows: cosine min {agree['cos_min']:.4f}, mean {agree['cos_mean']:.5f}; "
          f"max |score diff| {agree['score_diff_max']:.4f}")
    print(f"kept set: {agree['kept_flips']} flips (all within 0.01 of the threshold: {agree['kept_flips_allowed']}); "
          f"matched: plain {agree['matched_a']}, run {agree['matched_b']}, same up to allowed flips: "
          f"{agree['matched_same']}")
    print(f"storage: {total_bytes / max(agree['rows'], 1):.0f} bytes per kept row "
          f"({agree['rows']} rows: {sizes})")
    if args.levers and device == "cpu":
        print("\n| lever (model only, one 800-px image) | s/image | speed-up |")
        print("| --- | --- | --- |")
        rows = levers(sd, paths[0])
        for name, sec in rows:
            print(f"| {name} | {sec:.3f} | {rows[0][1] / sec:.2f}x |")
        print("\n| decoding (all bench images) | s/image |\n| --- | --- |")
        for name, sec in decode_levers(paths):
            print(f"| {name} | {sec:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
