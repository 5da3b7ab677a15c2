"""Seeded synthetic run directories, without DETR, for tests, benchmarks and demos.

``write_synthetic_run(RUN, n_rows)`` writes every file of the run contract:
clustered 256-d embeddings (a mixture of Gaussians, each cluster spread along a few
directions like real embeddings, plus a shared per-image offset and a mild shift
along a tone and a lighting direction), FACET-like annotator counts turned into the
group columns by ``extractor.groups.derive_groups``, and images / persons /
detections tables that agree with each other. Darker tones and dim lighting are
missed a little more often, so every read-out has some structure to show.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from extractor.groups import (
    AGE_COLUMNS, ATTRIBUTE_COLUMNS, GENDER_COLUMNS, LIGHTING_COLUMNS, LIGHTING_NA_COLUMN,
    SKIN_COLUMNS, SKIN_NA_COLUMN, derive_groups,
)
from extractor.rundir import NUM_QUERIES, Manifest, write_run

log = logging.getLogger(__name__)

THRESHOLD = 0.7
ROWS_PER_IMAGE = 4
UNMATCHED_SHARE = 0.1
_TONE_P = np.array([.06, .12, .16, .16, .14, .11, .09, .07, .05, .04])
_CLASSES = ("guitarist", "nurse", "skateboarder", "farmer", "doctor", "dancer", "referee", "chef",
            "lifeguard", "climber", "painter", "waiter")
_HAIR = ("hair_color_black", "hair_color_blonde", "hair_color_brown", "hair_color_grey", "hair_color_na")
_HAIRTYPE = ("hairtype_straight", "hairtype_curly", "hairtype_wavy", "hairtype_coily", "hairtype_na")
_HAS = ("has_facial_hair", "has_tattoo", "has_cap", "has_mask", "has_headscarf", "has_eyeware")


def clustered_vectors(n: int, dim: int, n_clusters: int, rng: np.random.Generator,
                      rank: int = 16, chunk: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
    """float32 [n, dim] from a mixture of Gaussians, and each row's cluster.

    Each cluster is a Gaussian with a low-rank-plus-noise covariance around a centre
    that shares a common mean direction: cosines are positive overall, higher inside a
    cluster, and nearest neighbours are meaningful (low intrinsic dimension).
    """
    mean = rng.standard_normal(dim).astype(np.float32)
    centres = rng.standard_normal((n_clusters, dim)).astype(np.float32) + mean
    bases = (rng.standard_normal((n_clusters, rank, dim)) * 0.2).astype(np.float32)
    weights = rng.dirichlet(np.full(n_clusters, 2.0))
    labels = rng.choice(n_clusters, size=n, p=weights)
    out = np.empty((n, dim), dtype=np.float32)
    for lo in range(0, n, chunk):
        lab = labels[lo:lo + chunk]
        x = centres[lab] + rng.standard_normal((len(lab), dim), dtype=np.float32) * 0.4
        z = rng.standard_normal((len(lab), rank), dtype=np.float32)
        order = np.argsort(lab, kind="stable")
        bounds = np.searchsorted(lab[order], np.arange(n_clusters + 1))
        for c in np.flatnonzero(np.diff(bounds)):
            rows = order[bounds[c]:bounds[c + 1]]
            x[rows] += z[rows] @ bases[c]
        out[lo:lo + len(lab)] = x
    return out, labels


def _counts(rng: np.random.Generator, latent: np.ndarray, n_values: int, spread: float) -> np.ndarray:
    """Annotator counts [n, n_values]: 1-3 annotators near the latent value (-1 = none)."""
    n = len(latent)
    counts = np.zeros((n, n_values), dtype=np.int16)
    has = latent >= 0
    for _ in range(3):
        votes = has & (rng.random(n) < 0.8)
        pick = np.clip(latent + rng.choice([-1, 0, 1], size=n, p=[spread, 1 - 2 * spread, spread]), 0, n_values - 1)
        np.add.at(counts, (np.flatnonzero(votes), pick[votes]), 1)
    first = np.flatnonzero(has & (counts.sum(axis=1) == 0))
    counts[first, latent[first]] = 1
    return counts


def _person_attributes(rng: np.random.Generator, n: int) -> pd.DataFrame:
    tone = rng.choice(10, size=n, p=_TONE_P)
    tone[rng.random(n) < 0.05] = -1
    gender = rng.choice(4, size=n, p=[.58, .37, .02, .03])
    gender[gender == 3] = -1
    age = rng.choice(4, size=n, p=[.3, .53, .14, .03])
    age[age == 3] = -1
    cols: dict[str, np.ndarray] = {}
    skin = _counts(rng, tone, 10, 0.2)
    cols.update({c: skin[:, j] for j, c in enumerate(SKIN_COLUMNS)})
    cols[SKIN_NA_COLUMN] = (tone < 0).astype(np.int16)
    for columns, latent in ((GENDER_COLUMNS, gender), (AGE_COLUMNS, age)):
        counts = _counts(rng, latent, len(columns), 0.05)
        cols.update({c: counts[:, j] for j, c in enumerate(columns)})
        cols[columns[0].rsplit("_", 1)[0] + "_na"] = (latent < 0).astype(np.int16)
    light = rng.choice(5, size=n, p=[.72, .14, .07, .05, .02])
    flags = np.zeros((n, 5), dtype=bool)
    flags[np.arange(n), light] = True
    second = rng.random(n) < 0.05
    flags[np.flatnonzero(second), rng.integers(0, 4, second.sum())] |= light[second] < 4
    cols.update({c: flags[:, j] for j, c in enumerate(LIGHTING_COLUMNS + (LIGHTING_NA_COLUMN,))})
    for group in (_HAIR, _HAIRTYPE):
        pick = rng.integers(0, len(group), n)
        cols.update({c: (pick == j).astype(np.int16) for j, c in enumerate(group)})
    cols.update({c: rng.random(n) < 0.08 for c in _HAS})
    cols["visible_torso"], cols["visible_face"] = rng.random(n) < 0.7, rng.random(n) < 0.6
    cols["visible_minimal"] = rng.random(n) < 0.1
    cols["class1"] = np.array(_CLASSES)[rng.integers(0, len(_CLASSES), n)]
    cols["class2"] = np.where(rng.random(n) < 0.1, np.array(_CLASSES)[rng.integers(0, len(_CLASSES), n)], "")
    return derive_groups(pd.DataFrame(cols))


def _boxes(rng: np.random.Generator, w: np.ndarray, h: np.ndarray) -> np.ndarray:
    bw, bh = w * rng.uniform(0.1, 0.5, len(w)), h * rng.uniform(0.2, 0.8, len(h))
    x1, y1 = rng.uniform(0, 1, len(w)) * (w - bw), rng.uniform(0, 1, len(h)) * (h - bh)
    return np.stack([x1, y1, x1 + bw, y1 + bh], axis=1).astype(np.float32)


def _jitter(rng: np.random.Generator, box: np.ndarray, amount: float, w: np.ndarray, h: np.ndarray) -> np.ndarray:
    wh = box[:, 2:] - box[:, :2]
    out = box + rng.uniform(-amount, amount, box.shape) * np.concatenate([wh, wh], axis=1)
    out[:, [0, 2]] = np.clip(out[:, [0, 2]], 0, w[:, None])
    out[:, [1, 3]] = np.clip(out[:, [1, 3]], 0, h[:, None])
    out[:, 2:] = np.maximum(out[:, 2:], out[:, :2] + 1)
    return out.astype(np.float32)


def _nullable(values: np.ndarray, valid: np.ndarray) -> pd.arrays.IntegerArray:
    return pd.arrays.IntegerArray(np.where(valid, values, 0).astype(np.int64), ~np.asarray(valid, dtype=bool))


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    iw = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    inter = iw * ih
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return (inter / (area(a) + area(b) - inter)).astype(np.float32)


def write_synthetic_run(run_dir: Path | str, n_rows: int, seed: int = 0, dim: int = 256,
                        n_clusters: int | None = None, group_shift: float = 0.25) -> Path:
    """Write a complete synthetic run of ``n_rows`` embeddings to ``run_dir``."""
    if n_rows < 2:
        raise ValueError(f"a synthetic run needs at least 2 rows, got {n_rows}")
    run_dir = Path(run_dir)
    rng = np.random.default_rng(seed)
    n_clusters = n_clusters or int(np.clip(n_rows // 200, 2, 64))

    # Rows: one per annotated person of an ok image (matched or fallback), plus
    # detections matching nobody; a few failed images hold persons without rows.
    n_unmatched = int(round(UNMATCHED_SHARE * n_rows))
    n_people = n_rows - n_unmatched
    n_images = max(1, -(-n_rows // ROWS_PER_IMAGE))
    n_failed = max(1, n_images // 100)
    image_w = rng.integers(480, 1600, n_images + n_failed).astype(np.int32)
    image_h = rng.integers(360, 1200, n_images + n_failed).astype(np.int32)
    row_image = np.sort(rng.integers(0, n_images, n_rows))
    is_person = np.zeros(n_rows, dtype=bool)
    is_person[rng.choice(n_rows, n_people, replace=False)] = True
    failed_people = rng.integers(1, 4, n_failed)
    person_image = np.concatenate([row_image[is_person], np.repeat(np.arange(n_images, n_images + n_failed), failed_people)])
    n_persons = len(person_image)
    attrs = _person_attributes(rng, n_persons)

    # Darker tones and dim light are missed more often (structure for the recall read-out).
    tone = attrs["mst_mode"].to_numpy(dtype=float, na_value=0)
    p_miss = 0.12 + 0.08 * (tone >= 7) + 0.1 * attrs["lighting_dimly_lit"].to_numpy()
    person_detected = rng.random(n_persons) < 1 - p_miss
    person_evaluated = np.arange(n_persons) < n_people
    person_detected &= person_evaluated
    person_row = np.full(n_persons, -1, dtype=np.int64)
    person_row[:n_people] = np.flatnonzero(is_person)
    row_person = np.full(n_rows, -1, dtype=np.int64)
    row_person[is_person] = np.arange(n_people)

    pw, ph = image_w[person_image], image_h[person_image]
    gt = _boxes(rng, pw.astype(float), ph.astype(float))
    rw, rh = image_w[row_image], image_h[row_image]
    boxes = _boxes(rng, rw.astype(float), rh.astype(float))
    pr = row_person[is_person]
    boxes[is_person] = _jitter(rng, gt[pr], np.where(person_detected[pr], 0.05, 0.4)[:, None], rw[is_person], rh[is_person])
    iou = np.full(n_rows, np.nan, dtype=np.float32)
    iou[is_person] = _iou(boxes[is_person], gt[pr])
    row_detected = np.where(is_person, person_detected[np.maximum(row_person, 0)], True)
    matched = is_person & row_detected
    score = np.where(row_detected, rng.uniform(THRESHOLD, 1.0, n_rows), rng.uniform(0.0, THRESHOLD, n_rows)).astype(np.float32)

    # Embeddings: cluster structure + per-image context + mild group shift.
    xb, _ = clustered_vectors(n_rows, dim, n_clusters, rng)
    xb += rng.standard_normal((n_images, dim), dtype=np.float32)[row_image] * 0.3
    tone_dir, dim_dir = rng.standard_normal((2, dim)).astype(np.float32) * group_shift
    row_tone = np.where(is_person, tone[np.maximum(row_person, 0)], 0)
    xb[is_person] += np.where(row_tone[is_person] > 0, (row_tone[is_person] - 5.5) / 4.5, 0)[:, None] * tone_dir
    dim_lit = attrs["lighting_dimly_lit"].to_numpy()[np.maximum(row_person, 0)] & is_person
    xb[dim_lit] += dim_dir

    filenames = np.array([f"sa_{i:07d}.jpg" for i in range(n_images + n_failed)], dtype=object)
    nobody = derive_groups(pd.DataFrame({c: [0] for c in SKIN_COLUMNS + LIGHTING_COLUMNS + GENDER_COLUMNS + AGE_COLUMNS}))
    row_attrs = pd.concat([attrs, nobody], ignore_index=True).iloc[np.where(is_person, row_person, n_persons)]
    query_idx = (np.arange(n_rows) - np.searchsorted(row_image, row_image) + 7 * row_image) % 100
    detections = pd.DataFrame({
        "det_id": np.arange(n_rows, dtype=np.int64), "image_id": row_image.astype(np.int64),
        "filename": filenames[row_image], "query_idx": query_idx.astype(np.int16), "score": score,
        **{c: boxes[:, j] for j, c in enumerate(("x1", "y1", "x2", "y2"))},
        "person_id": _nullable(row_person, is_person),
        "iou": iou, "detected": row_detected, "matched": matched, "has_person": is_person,
    })
    detections = pd.concat([detections, row_attrs[list(ATTRIBUTE_COLUMNS)].reset_index(drop=True)], axis=1)

    persons = pd.DataFrame({
        "person_id": np.arange(n_persons, dtype=np.int64), "image_id": person_image.astype(np.int64),
        "filename": filenames[person_image], **{f"gt_{c}": gt[:, j] for j, c in enumerate(("x1", "y1", "x2", "y2"))},
    })
    persons = pd.concat([persons, attrs[list(ATTRIBUTE_COLUMNS)]], axis=1)
    persons["evaluated"] = person_evaluated
    persons["detected"] = person_detected
    persons["det_id"] = _nullable(person_row, person_detected)
    persons["embedding_det_id"] = _nullable(person_row, person_evaluated)
    safe_row = np.maximum(person_row, 0)
    persons["best_iou"] = np.where(person_evaluated, iou[safe_row], np.nan).astype(np.float32)
    persons["best_score"] = np.where(person_evaluated, score[safe_row], np.nan).astype(np.float32)

    all_images = np.arange(n_images + n_failed)
    images = pd.DataFrame({
        "image_id": all_images.astype(np.int64), "filename": filenames, "path": "images/" + filenames,
        "width": image_w, "height": image_h,
        "status": np.where(all_images < n_images, "ok", "error: cannot identify image file"),
        "n_persons": np.bincount(person_image, minlength=len(all_images)).astype(np.int32),
        "n_detections": np.bincount(row_image[row_detected], minlength=len(all_images)).astype(np.int32),
        "n_rows": np.bincount(row_image, minlength=len(all_images)).astype(np.int32),
    })

    manifest = Manifest(
        kind="synthetic", embedding_dim=dim, threshold=THRESHOLD,
        checkpoint={"name": "synthetic", "untrained": True, "sha256": None},
        model={"name": "synthetic", "num_queries": NUM_QUERIES},
        dataset={"format": "synthetic", "root": None},
        settings={"n_rows": n_rows, "seed": seed, "dim": dim, "n_clusters": n_clusters, "group_shift": group_shift},
    )
    write_run(run_dir, manifest, images=images, persons=persons, detections=detections, embeddings=xb)
    log.info("wrote a synthetic run of %d rows to %s", n_rows, run_dir)
    return run_dir
