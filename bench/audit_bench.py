"""Benchmark of the detection audit (index.audit.person_audit) at FACET scale.

    python bench/audit_bench.py --images 32000 --persons 50000 --repeats 3

Synthetic predictions, 100 queries per image: every person gets 1-6 person-labelled
queries around its box (jittered, so some overlap it at IoU >= 0.5 and some do not),
--person-share of the remaining queries are person-labelled boxes anywhere, the rest
other classes. Persons per image follow a heavy tail (a few crowd images of up to 60).
Prints the time of person_audit (label filter, pairs, IoU, the greedy at ten thresholds)
and the resulting AR. Tests check the same function against pycocotools.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from index.audit import person_audit  # noqa: E402


def synthetic(n_images: int, n_persons: int, person_share: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    weights = rng.pareto(1.5, n_images) + 1
    per_image = np.minimum(rng.multinomial(n_persons - n_images // 2, weights / weights.sum()), 59)
    per_image[: n_images // 2] += 1  # half the images hold at least one person
    image = np.repeat(np.arange(n_images), per_image)
    n = len(image)
    xy, wh = rng.uniform(0, 1000, (n, 2)), rng.uniform(20, 400, (n, 2))
    gt = np.c_[xy, xy + wh].astype(np.float32)
    persons = pd.DataFrame({"person_id": np.arange(n), "image_id": image, "evaluated": True,
                            **{f"gt_{c}": gt[:, j] for j, c in enumerate(("x1", "y1", "x2", "y2"))}})

    q_image = np.repeat(np.arange(n_images), 100)
    box = np.c_[rng.uniform(0, 1000, (len(q_image), 2)), np.zeros((len(q_image), 2))]
    box[:, 2:] = box[:, :2] + rng.uniform(20, 400, (len(q_image), 2))
    label = np.where(rng.random(len(q_image)) < person_share, 1, rng.integers(2, 91, len(q_image)))
    # queries near persons: the first slots of each image's 100 (at most 100 per image)
    dup = rng.integers(1, 7, n)
    src = np.repeat(np.arange(n), dup)
    slot = np.arange(len(src)) - np.repeat(np.cumsum(dup) - dup, dup)
    pos = image[src] * 100 + (np.arange(len(src)) - np.searchsorted(image[src], image[src]))
    ok = pos < image[src] * 100 + 100
    src, pos, slot = src[ok], pos[ok], slot[ok]
    w = gt[src, 2:] - gt[src, :2]
    box[pos] = gt[src] + rng.normal(0, 0.08, (len(src), 4)) * np.c_[w, w]
    label[pos] = 1
    score = rng.beta(0.5, 3, len(q_image)).astype(np.float32)
    score[pos] = np.where(slot == 0, rng.uniform(0.5, 1, len(src)), rng.uniform(0, 0.5, len(src)))
    pred = pd.DataFrame({"image_id": q_image, "query_idx": np.tile(np.arange(100, dtype=np.int16), n_images),
                         **{c: box[:, j].astype(np.float32) for j, c in enumerate(("x1", "y1", "x2", "y2"))},
                         "label": label.astype(np.int8), "label_score": score})
    return persons, pred


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=32_000)
    ap.add_argument("--persons", type=int, default=50_000)
    ap.add_argument("--person-share", type=float, default=0.3, help="share of other queries labelled person")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    persons, pred = synthetic(args.images, args.persons, args.person_share, args.seed)
    n_det = int((pred["label"] == 1).sum())
    print(f"{len(persons)} persons on {persons['image_id'].nunique()} of {args.images} images, "
          f"{len(pred)} queries ({n_det} labelled person), largest image {persons.groupby('image_id').size().max()} persons")
    times, cpu = [], []
    for _ in range(args.repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        audit = person_audit(persons, pred)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    print(f"person_audit wall: median {np.median(times):.2f} s (min {min(times):.2f}, max {max(times):.2f}); "
          f"CPU: median {np.median(cpu):.2f} s, over {args.repeats} runs; "
          f"AR {audit['ar'].mean():.4f}, recall50 {audit['recall50'].mean():.4f}")


if __name__ == "__main__":
    main()
