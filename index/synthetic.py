"""Seeded synthetic run directories, without DETR, for tests, benchmarks and demos.

``write_synthetic_run(RUN, n_rows)`` writes every file of the run contract:
clustered 256-d embeddings (a mixture of Gaussians, each cluster spread along a few
directions like real embeddings, plus a shared per-image offset and a mild shift
along a tone and a lighting direction), FACET-like annotator counts turned into the
group columns by ``extractor.groups.derive_groups``, images / persons /
detections tables that agree with each other, and every query's prediction of the ok
images (100 per image) from the planted detection model of ``index.planted``: darker
tones and dim lighting are found less often and localised worse, photos are easy or
hard as a whole (an image effect), and the truth goes into the manifest's ``planted``.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
from scipy import special

from extractor.groups import (
    AGE_COLUMNS, ATTRIBUTE_COLUMNS, GENDER_COLUMNS, LIGHTING_COLUMNS, LIGHTING_NA_COLUMN,
    SKIN_COLUMNS, SKIN_NA_COLUMN, derive_groups,
)
from extractor.rundir import NUM_QUERIES, Manifest, write_run
from index.audit import IOU_THRESHOLDS
from index.mixture import CHUNK, generator_at, mixture_chunks, mixture_params, skip_mixture, skip_normals
from index.planted import PlantedEffects, found_logit, iou_params, planted_truth, scaled_boxes

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


def _person_boxes(rng: np.random.Generator, image: np.ndarray, w: np.ndarray, h: np.ndarray) -> np.ndarray:
    """Annotated boxes [n, 4] of persons on sorted ``image`` ids, side by side without
    overlap (each in its own vertical strip of the photo), so that no detection of one
    person can match a neighbour and the planted truth holds exactly."""
    k = np.arange(len(image)) - np.searchsorted(image, image)
    n = np.bincount(image)[image]
    strip = w / n
    bw, bh = strip * rng.uniform(0.5, 0.95, len(w)), h * rng.uniform(0.2, 0.8, len(h))
    x1 = k * strip + rng.uniform(0, 1, len(w)) * (strip - bw)
    y1 = rng.uniform(0, 1, len(h)) * (h - bh)
    return np.stack([x1, y1, x1 + bw, y1 + bh], axis=1).astype(np.float32)


def _tiny_boxes(rng: np.random.Generator, w: np.ndarray, h: np.ndarray) -> np.ndarray:
    """Boxes of 1% of the image side: IoU < 0.05 with any annotated person."""
    x1, y1 = rng.uniform(0, 0.99, len(w)) * w, rng.uniform(0, 0.99, len(h)) * h
    return np.stack([x1, y1, x1 + 0.01 * w, y1 + 0.01 * h], axis=1).astype(np.float32)


def _plant(rng: np.random.Generator, effects: PlantedEffects, persons: pd.DataFrame, person_image: np.ndarray,
           gt: np.ndarray, row_image: np.ndarray, row_person: np.ndarray, query_idx: np.ndarray,
           image_w: np.ndarray, image_h: np.ndarray, n_images: int, predictions: bool = True) -> dict:
    """Per row its box and score, per evaluated person whether the run detected them, and
    the predictions of the ``n_images`` ok images (100 queries each; None unless
    ``predictions``: they are drawn after everything else, so leaving them out changes
    nothing else); see index.planted.

    Rows of an image hold queries [s, s + n) (s = 7 * image mod 100, ``query_idx``); a
    found person's duplicate takes s + 50 + k and the low-score false positives s + 25 + j,
    so they never collide while an image has at most 25 rows (images with more get neither).
    """
    n_people = len(persons)
    u = rng.standard_normal(n_images)
    found = rng.random(n_people) < special.expit(found_logit(effects, persons) + effects.image_sd * u[person_image])
    a, b = iou_params(effects, persons)
    q = rng.beta(a, b)
    iou = np.where(found, q, rng.uniform(0.1, 0.45, n_people))  # the missed get a badly placed query
    # Grown boxes only at IoU >= 0.7: the part outside the person is then under 30% of the
    # box, too little to reach IoU 0.5 with a neighbour; shrunk boxes stay inside the person.
    p_box = scaled_boxes(gt, iou, inside=(rng.random(n_people) < 0.5) | (iou < 0.7))
    p_score = rng.beta(effects.score_a, effects.score_b, n_people)
    # A kept detection that matches nobody would leave its person a fallback row: keep the
    # run's invariant (a person's row is kept iff matched) by scoring such queries below the threshold.
    p_score = np.where(found & (q >= 0.5), p_score, p_score * THRESHOLD).astype(np.float32)
    detected = p_score >= THRESHOLD

    n_rows = len(row_image)
    is_person = row_person >= 0
    pr = row_person[is_person]
    boxes = _tiny_boxes(rng, image_w[row_image].astype(float), image_h[row_image].astype(float))
    score = rng.uniform(THRESHOLD, 1.0, n_rows).astype(np.float32)  # rows of nobody: kept false positives
    boxes[is_person], score[is_person] = p_box[pr], p_score[pr]
    if not predictions:
        return {"boxes": boxes, "score": score, "person_detected": detected, "predictions": None}

    # Background queries: other classes, anywhere.
    n_q = 100 * n_images
    q_image = np.repeat(np.arange(n_images), 100)
    w, h = image_w[q_image].astype(float), image_h[q_image].astype(float)
    box = _boxes(rng, w, h)
    label = rng.integers(2, 91, n_q)
    label_score = rng.uniform(0.05, 0.6, n_q).astype(np.float32)
    p_person = (label_score * rng.uniform(0, 0.5, n_q)).astype(np.float32)

    def put(at: np.ndarray, b: np.ndarray, sc: np.ndarray) -> None:
        box[at], label[at], label_score[at], p_person[at] = b, 1, sc, sc

    rows_per_image = np.bincount(row_image, minlength=n_images)
    room = rows_per_image <= 25
    put(row_image * 100 + query_idx, boxes, score)
    dup = is_person.copy()
    dup[is_person] = found[pr] & (rng.random(len(pr)) < effects.duplicate_rate)
    dup &= room[row_image]
    dp = row_person[dup]
    dup_iou = q[dp] * rng.uniform(0.3, 0.9, len(dp))
    put(row_image[dup] * 100 + (query_idx[dup] + 50) % 100,
        scaled_boxes(gt[dp], dup_iou, (rng.random(len(dp)) < 0.5) | (dup_iou < 0.7)),
        (p_score[dp] * rng.uniform(0.05, 0.5, len(dp))).astype(np.float32))
    k = np.where(room, np.minimum(rng.poisson(effects.false_positives, n_images), 25), 0)
    fp_image = np.repeat(np.arange(n_images), k)
    j = np.arange(len(fp_image)) - np.repeat(np.cumsum(k) - k, k)
    put(fp_image * 100 + (7 * fp_image + 25 + j) % 100,
        _tiny_boxes(rng, image_w[fp_image].astype(float), image_h[fp_image].astype(float)),
        rng.uniform(0.01, 0.3, len(fp_image)).astype(np.float32))
    predictions = pd.DataFrame({
        "image_id": q_image.astype(np.int64), "query_idx": np.tile(np.arange(100, dtype=np.int16), n_images),
        **{c: box[:, i].astype(np.float32) for i, c in enumerate(("x1", "y1", "x2", "y2"))},
        "p_person": p_person, "label": label.astype(np.int16), "label_score": label_score,
    })
    return {"boxes": boxes, "score": score, "person_detected": detected, "predictions": predictions}


def _nullable(values: np.ndarray, valid: np.ndarray) -> pd.arrays.IntegerArray:
    return pd.arrays.IntegerArray(np.where(valid, values, 0).astype(np.int64), ~np.asarray(valid, dtype=bool))


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    iw = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    inter = iw * ih
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return (inter / (area(a) + area(b) - inter)).astype(np.float32)


# Peak anonymous memory of the writer a row, measured with ``/usr/bin/time -v``: peak RSS
# less the memory-mapped embeddings (page cache, reclaimable) and the imported libraries;
# 2.8 KB a row at 5M rows with predictions (19.9 GB peak RSS), 2.05 KB at 400k without.
PEAK_BYTES_PER_ROW = {True: 2_900, False: 2_100}  # with / without predictions
_BASE_BYTES = 400 << 20


def available_memory() -> int | None:
    """Bytes of memory available now (Linux MemAvailable), None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_memory(n_rows: int, predictions: bool, available: int | None = None) -> None:
    """ValueError before any work when the writer's measured peak would not fit in the
    memory available now (Linux's MemAvailable; no check where it cannot be read)."""
    available = available_memory() if available is None else available
    need = _BASE_BYTES + PEAK_BYTES_PER_ROW[predictions] * n_rows
    if available is not None and need > available:
        hint = ("pass --no-predictions (~28% less; the run then has no detection audit) or fewer rows"
                if predictions else "write fewer rows")
        raise ValueError(f"a synthetic run of {n_rows:,} rows needs ~{need / 2**30:.1f} GiB of memory at its peak "
                         f"and {available / 2**30:.1f} GiB are available: {hint}")


def dataset_layout(n_rows: int, seed: int) -> dict:
    """The dataset part of a run drawn from ``seed`` (images, persons, attributes, boxes,
    row slots), and ``rng`` positioned where the embeddings start."""
    if n_rows < 2:
        raise ValueError(f"a synthetic run needs at least 2 rows, got {n_rows}")
    rng = np.random.default_rng(seed)
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
    person_row = np.full(n_persons, -1, dtype=np.int64)
    person_row[:n_people] = np.flatnonzero(is_person)
    row_person = np.full(n_rows, -1, dtype=np.int64)
    row_person[is_person] = np.arange(n_people)
    pw, ph = image_w[person_image], image_h[person_image]
    gt = _person_boxes(rng, person_image, pw.astype(float), ph.astype(float))
    query_idx = (np.arange(n_rows) - np.searchsorted(row_image, row_image) + 7 * row_image) % 100
    filenames = np.array([f"sa_{i:07d}.jpg" for i in range(n_images + n_failed)], dtype=object)
    persons = pd.DataFrame({
        "person_id": np.arange(n_persons, dtype=np.int64), "image_id": person_image.astype(np.int64),
        "filename": filenames[person_image], **{f"gt_{c}": gt[:, j] for j, c in enumerate(("x1", "y1", "x2", "y2"))},
    })
    persons = pd.concat([persons, attrs[list(ATTRIBUTE_COLUMNS)]], axis=1)
    persons["evaluated"] = np.arange(n_persons) < n_people
    return {"rng": rng, "seed": seed, "n_rows": n_rows, "n_people": n_people, "n_images": n_images,
            "n_failed": n_failed, "image_w": image_w, "image_h": image_h, "row_image": row_image,
            "is_person": is_person, "person_image": person_image, "attrs": attrs, "person_row": person_row,
            "row_person": row_person, "gt": gt, "query_idx": query_idx, "filenames": filenames, "persons": persons}


def planted_detections(layout: dict, effects: PlantedEffects, detection_seed: int | None,
                       predictions: bool = True) -> dict:
    """The planted detections (``_plant``) of a ``dataset_layout`` from their own seed:
    one dataset, several planted detection effects (or many draws, for simulations)."""
    n = layout["n_people"]
    drng = np.random.default_rng(np.random.SeedSequence([layout["seed"], 0xD7]) if detection_seed is None
                                 else detection_seed)
    return _plant(drng, effects, layout["attrs"].iloc[:n].reset_index(drop=True), layout["person_image"][:n],
                  layout["gt"][:n], layout["row_image"], layout["row_person"], layout["query_idx"],
                  layout["image_w"], layout["image_h"], layout["n_images"], predictions)


def planted_tables(n_rows: int, seed: int = 0, effects: PlantedEffects = PlantedEffects(),
                   detection_seed: int | None = None) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray, dict]:
    """The detection part of ``write_synthetic_run(run, n_rows, seed, effects=effects,
    detection_seed=detection_seed)`` in memory, without embeddings or disk (for
    simulations): (evaluated persons [person_id, image_id, gt boxes, group columns],
    the predictions table, the ok image ids, the manifest's ``planted`` truth)."""
    layout = dataset_layout(n_rows, seed)
    predictions = planted_detections(layout, effects, detection_seed)["predictions"]
    persons = layout["persons"][layout["persons"]["evaluated"]].reset_index(drop=True)
    return (persons, predictions, np.arange(layout["n_images"]),
            planted_truth(effects, persons, IOU_THRESHOLDS, THRESHOLD))


def write_synthetic_run(run_dir: Path | str, n_rows: int, seed: int = 0, dim: int = 256,
                        n_clusters: int | None = None, group_shift: float = 0.25,
                        effects: PlantedEffects = PlantedEffects(), detection_seed: int | None = None,
                        predictions: bool = True) -> Path:
    """Write a complete synthetic run of ``n_rows`` embeddings to ``run_dir``.

    ``seed`` fixes the dataset (images, persons, attributes, boxes, embeddings);
    ``detection_seed`` (default: derived from ``seed``) and ``effects`` fix the planted
    detections, so several runs of one dataset can carry different effects. The
    manifest's ``planted`` holds the truth (index.planted). ``predictions=False`` leaves
    out predictions.parquet (100 rows an image, ~28% of the writer's peak memory) and
    nothing else: the run is the same minus the detection audit.
    """
    check_memory(n_rows, predictions)
    layout = dataset_layout(n_rows, seed)
    run_dir = Path(run_dir)
    rng = layout["rng"]
    n_clusters = n_clusters or int(np.clip(n_rows // 200, 2, 64))
    n_people, n_images, n_failed = layout["n_people"], layout["n_images"], layout["n_failed"]
    image_w, image_h, row_image, is_person = layout["image_w"], layout["image_h"], layout["row_image"], layout["is_person"]
    person_image, attrs, person_row, row_person = (layout["person_image"], layout["attrs"], layout["person_row"],
                                                   layout["row_person"])
    gt, query_idx, filenames, persons = layout["gt"], layout["query_idx"], layout["filenames"], layout["persons"].copy()
    n_persons = len(person_image)
    person_evaluated = persons["evaluated"].to_numpy()
    det = planted_detections(layout, effects, detection_seed, predictions)
    boxes, score, prediction_table = det["boxes"], det["score"], det["predictions"]
    person_detected = np.zeros(n_persons, dtype=bool)
    person_detected[:n_people] = det["person_detected"]
    pr = row_person[is_person]
    iou = np.full(n_rows, np.nan, dtype=np.float32)
    iou[is_person] = _iou(boxes[is_person], gt[pr])
    row_detected = score >= THRESHOLD
    matched = is_person & row_detected
    assert np.array_equal(row_detected[is_person], person_detected[pr])
    tone = attrs["mst_mode"].to_numpy(dtype=float, na_value=0)

    # Embeddings: cluster structure + per-image context + mild group shift. They are
    # streamed to the file in blocks of rows (a 5M-row run is 5 GB): the first pass only
    # advances the generator to find where the image offsets and group directions
    # start, the second redraws the same numbers block by block.
    mixture = mixture_params(n_rows, dim, n_clusters, rng)
    noise_state = rng.bit_generator.state
    skip_mixture(mixture, rng)
    offset_state = rng.bit_generator.state
    skip_normals(rng, n_images, dim)
    tone_dir, dim_dir = rng.standard_normal((2, dim)).astype(np.float32) * group_shift
    row_tone = np.where(is_person, tone[np.maximum(row_person, 0)], 0)
    tone_shift = np.where(is_person & (row_tone > 0), (row_tone - 5.5) / 4.5, 0)
    dim_lit = attrs["lighting_dimly_lit"].to_numpy()[np.maximum(row_person, 0)] & is_person

    def embedding_blocks() -> Iterator[np.ndarray]:
        offsets, first = generator_at(offset_state), 0  # image offsets [first, first + len(held))
        held = np.empty((0, dim), dtype=np.float32)
        for lo, x in zip(range(0, n_rows, CHUNK), mixture_chunks(mixture, generator_at(noise_state))):
            hi = lo + len(x)
            img = row_image[lo:hi]  # sorted: each block needs a contiguous run of images
            drop = int(img[0]) - first
            fresh = offsets.standard_normal((int(img[-1]) + 1 - first - len(held), dim), dtype=np.float32)
            held, first = np.concatenate([held, fresh])[drop:], int(img[0])
            x += held[img - first] * 0.3
            person = is_person[lo:hi]
            x[person] += tone_shift[lo:hi][person][:, None] * tone_dir
            x[dim_lit[lo:hi]] += dim_dir
            yield x

    nobody = derive_groups(pd.DataFrame({c: [0] for c in SKIN_COLUMNS + LIGHTING_COLUMNS + GENDER_COLUMNS + AGE_COLUMNS}))
    row_attrs = pd.concat([attrs, nobody], ignore_index=True).iloc[np.where(is_person, row_person, n_persons)]
    detections = pd.DataFrame({
        "det_id": np.arange(n_rows, dtype=np.int64), "image_id": row_image.astype(np.int64),
        "filename": filenames[row_image], "query_idx": query_idx.astype(np.int16), "score": score,
        **{c: boxes[:, j] for j, c in enumerate(("x1", "y1", "x2", "y2"))},
        "person_id": _nullable(row_person, is_person),
        "iou": iou, "detected": row_detected, "matched": matched, "has_person": is_person,
    })
    detections = pd.concat([detections, row_attrs[list(ATTRIBUTE_COLUMNS)].reset_index(drop=True)], axis=1)

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

    # The one writer takes an array: filled block by block into a memory-mapped scratch
    # file beside the run, so the rows live in the page cache, not in the process (5 GB at 5M).
    run_dir.mkdir(parents=True, exist_ok=True)
    scratch = run_dir / ".synthetic-embeddings.npy"
    xb = np.lib.format.open_memmap(scratch, mode="w+", dtype=np.float32, shape=(n_rows, dim))
    for lo, block in zip(range(0, n_rows, CHUNK), embedding_blocks()):
        xb[lo:lo + len(block)] = block
    manifest = Manifest(
        kind="synthetic", embedding_dim=dim, threshold=THRESHOLD,
        checkpoint={"name": "synthetic", "untrained": True, "sha256": None},
        model={"name": "synthetic", "num_queries": NUM_QUERIES},
        dataset={"format": "synthetic", "root": None},
        settings={"n_rows": n_rows, "seed": seed, "dim": dim, "n_clusters": n_clusters, "group_shift": group_shift,
                  "detection_seed": detection_seed, "planted_effects": effects.as_dict()},
        planted=planted_truth(effects, persons[person_evaluated].reset_index(drop=True), IOU_THRESHOLDS, THRESHOLD),
    )
    try:
        write_run(run_dir, manifest, images=images, persons=persons, detections=detections, embeddings=xb,
                  predictions=prediction_table)
    finally:
        del xb
        scratch.unlink(missing_ok=True)
    log.info("wrote a synthetic run of %d rows to %s", n_rows, run_dir)
    return run_dir
