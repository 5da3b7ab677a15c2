"""Whole-process timing of the two extraction paths, as a user meets them (extract_bench --whole-process).

Both paths run as fresh processes that load the same checkpoint file from disk:
(A) ``bench/plain_extract.py``, the official-equivalent script (unfused eager model, batch
of one, float32, full decode, PIL resize); (B) ``python -m extractor run`` with default
settings except ``--checkpoint`` (and ``--threshold``, chosen from (A)'s scores). They
alternate A, B, A, B, ... so load from other programs on the machine hits both alike;
the spread of the ratios across the repeats is reported with their median.

Fixed cost = process start to the first image done; per-image cost = (last image done -
first image done) / (images - 1); whole = process start to exit.
"""
from __future__ import annotations

import ast
import csv
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from extractor import rundir
from extractor.checkpoints import seeded_state_dict
from extractor.demo import write_demo

REPO = Path(__file__).resolve().parents[1]
FACET_SIZE = (2000, 1500)  # a typical FACET (SA-1B) photo: 1500-pixel shorter side


def real_photos() -> list[np.ndarray]:
    """Real photographs shipped with installed packages (no download): HWC uint8 RGB."""
    import matplotlib
    from skimage import data
    hopper = Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg").convert("RGB")
    camera = np.repeat(data.camera()[:, :, None], 3, axis=2)
    return [data.astronaut(), np.asarray(hopper), camera, data.coffee(), data.chelsea()]


def photo_canvas(photos: list[np.ndarray], rng: np.random.Generator, size: tuple[int, int] = FACET_SIZE) -> Image.Image:
    """A size[0] x size[1] picture tiled from resized, randomly cropped real photos."""
    w, h = size
    canvas = Image.new("RGB", size)
    cols, rows = int(rng.integers(1, 4)), int(rng.integers(1, 3))
    tw, th = -(-w // cols), -(-h // rows)
    for r in range(rows):
        for c in range(cols):
            src = photos[int(rng.integers(len(photos)))]
            sh, sw = src.shape[:2]
            cw, ch = int(sw * rng.uniform(0.6, 1.0)), int(sh * rng.uniform(0.6, 1.0))
            x0, y0 = int(rng.integers(0, sw - cw + 1)), int(rng.integers(0, sh - ch + 1))
            tile = Image.fromarray(src[y0:y0 + ch, x0:x0 + cw]).resize((tw, th), Image.BICUBIC)
            canvas.paste(tile, (c * tw, r * th))
    return canvas


def write_photo_dataset(root: Path, n_images: int, seed: int) -> list[Path]:
    """FACET-layout dataset (the demo's annotations, boxes scaled) whose JPEGs are 2000x1500 real-photo
    composites at quality 92; -> the image paths, sorted."""
    summary = write_demo(root, n_images=n_images, seed=seed)
    rng = np.random.default_rng(seed)
    photos = real_photos()
    scale_of: dict[str, tuple[float, float]] = {}
    paths = sorted(root.rglob("sa_*.jpg"))
    for path in paths:
        with Image.open(path) as small:
            scale_of[path.name] = (FACET_SIZE[0] / small.width, FACET_SIZE[1] / small.height)
        photo_canvas(photos, rng).save(path, quality=92)
    rows = list(csv.DictReader(open(summary.annotations, newline="")))
    for row in rows:
        box, (sx, sy) = ast.literal_eval(row["bounding_box"]), scale_of[row["filename"]]
        row["bounding_box"] = str({k: float(v) * (sx if k in ("x", "width") else sy) for k, v in box.items()})
    with open(summary.annotations, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return paths


@dataclass(frozen=True)
class ProcessTiming:
    whole_s: float      # process start to exit
    fixed_s: float      # process start to the first image done
    per_image_s: float  # between the first and the last image done, per image


def _timing(t_start: float, t_end: float, first: float, last: float, n: int) -> ProcessTiming:
    return ProcessTiming(t_end - t_start, first - t_start, (last - first) / max(n - 1, 1))


def run_plain(ckpt: Path, paths: list[Path], out: Path) -> tuple[ProcessTiming, dict[str, dict]]:
    t0 = time.time()
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "plain_extract.py"), str(ckpt), str(out),
                           *map(str, paths)], capture_output=True, text=True, cwd=REPO)
    t1 = time.time()
    if proc.returncode:
        raise RuntimeError(f"plain path failed: {proc.stderr[-2000:]}")
    stamps = json.loads(proc.stdout.strip().splitlines()[-1])
    arrays = np.load(out)
    plain = {p.name: {"scores": arrays[p.name + ":scores"], "boxes": arrays[p.name + ":boxes"],
                      "emb": arrays[p.name + ":emb"], "size": tuple(int(v) for v in arrays[p.name + ":size"])}
             for p in paths}
    return _timing(t0, t1, stamps["first_image_unix"], stamps["last_image_unix"], len(paths)), plain


def run_fast(ckpt: Path, data: Path, out: Path, threshold: float, n: int,
             extra: tuple[str, ...] = ()) -> ProcessTiming:
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "extractor", "run", "--data", str(data), "--out", str(out),
                           "--checkpoint", str(ckpt), "--threshold", repr(threshold), "--overwrite", *extra],
                          capture_output=True, text=True, cwd=REPO)
    t1 = time.time()
    if proc.returncode:
        raise RuntimeError(f"extractor run failed: {proc.stderr[-2000:]}")
    t = rundir.open_run(out).manifest.timings
    return _timing(t0, t1, t["first_image_unix"], t["last_image_unix"], n)


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f}x (range {min(values):.2f}-{max(values):.2f})"


def whole_process(workdir: Path, n_images: int, repeats: int, seed: int, agreement, pick_threshold,
                  extra: tuple[str, ...] = ()) -> dict:
    """Interleaved A/B process timings and the agreement of B's run with A's outputs; prints a report."""
    data = workdir / "data"
    paths = write_photo_dataset(data, n_images, seed)
    ckpt = workdir / "detr-bench-weights.pth"
    torch.save({"model": seeded_state_dict(seed)}, ckpt)
    print(f"{len(paths)} images {FACET_SIZE[0]}x{FACET_SIZE[1]} (real-photo composites), "
          f"{sum(q.stat().st_size for q in paths) / len(paths) / 1e3:.0f} kB each; checkpoint {ckpt} "
          f"({ckpt.stat().st_size / 1e6:.0f} MB); torch {torch.__version__}; {repeats} interleaved repeats"
          + (f"; extractor options {' '.join(extra)}" if extra else ""))
    plain_t, fast_t, threshold, plain = [], [], None, None
    for i in range(repeats):
        t, outputs = run_plain(ckpt, paths, workdir / "plain.npz")
        plain_t.append(t)
        if plain is None:
            plain, threshold = outputs, pick_threshold(outputs)
        fast_t.append(run_fast(ckpt, data, workdir / "run", threshold, len(paths), extra))
        print(f"  repeat {i + 1}: plain {t.whole_s:.1f} s (fixed {t.fixed_s:.1f}, {t.per_image_s:.2f}/img), "
              f"run {fast_t[-1].whole_s:.1f} s (fixed {fast_t[-1].fixed_s:.1f}, {fast_t[-1].per_image_s:.2f}/img)",
              flush=True)
    persons = rundir.open_run(workdir / "run").persons()
    agree = agreement(plain, workdir / "run", threshold, persons)
    med = lambda ts, f: statistics.median(getattr(t, f) for t in ts)  # noqa: E731
    print("\n| path (whole process) | whole s | fixed s (start to first image) | s/image after the first |")
    print("| --- | --- | --- | --- |")
    for name, ts in (("(A) plain script, official-equivalent", plain_t), ("(B) python -m extractor run", fast_t)):
        print(f"| {name} | {med(ts, 'whole_s'):.1f} | {med(ts, 'fixed_s'):.1f} | {med(ts, 'per_image_s'):.2f} |")
    whole = [a.whole_s / b.whole_s for a, b in zip(plain_t, fast_t)]
    per = [a.per_image_s / b.per_image_s for a, b in zip(plain_t, fast_t)]
    print(f"\nratio A/B, median over {repeats} pairs (range): whole process at {len(paths)} images "
          f"{_spread(whole)}; per image {_spread(per)}")
    print(f"agreement over {agree['rows']} rows (threshold {threshold:.4f}): cosine min {agree['cos_min']:.5f}; "
          f"max |score diff| {agree['score_diff_max']:.2e}; kept-set flips {agree['kept_flips']} "
          f"(all within 0.01 of the threshold: {agree['kept_flips_allowed']})")
    return {"whole": whole, "per_image": per, "plain": plain_t, "fast": fast_t, "agreement": agree}
