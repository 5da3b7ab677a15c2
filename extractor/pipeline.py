"""The extraction run: plan, process shards (crash-safe, resumable), finalise the run dir.

Work is planned deterministically (images sorted by aspect ratio so batches need little
padding, then cut into shards). Each finished shard is written as a directory under
``RUN/.work/shards`` with write-then-rename, so a run killed at any moment and started
again with the same command skips finished shards and ends with the same files as an
uninterrupted run. The final files are written last, the manifest after them.
"""
from __future__ import annotations

import logging
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from . import rundir
from .checkpoints import LoadedCheckpoint, build_model, load_checkpoint
from .datasets import Dataset, read_dataset, select_persons
from .finalize import write_outputs
from .policy import POLICY, keep_freed_memory
from .fastpath import optimise_for_inference
from .features import feature_files, row_features
from .infer import fetch, launch
from .matching import PERSON_CLASS, class_probabilities, cxcywh_to_xyxy_pixels, match_image, query_predictions
from .plan import Plan, make_plan
from .resume import KEY_FILE, image_states, reconcile, shard_keys, shard_name
from .preprocess import collate, load_prepared
from .settings import ExtractSettings, fingerprint

log = logging.getLogger(__name__)

SHARDS = "shards"


@dataclass(frozen=True)
class RunResult:
    out: Path
    manifest: dict
    resumed_shards: int
    processed_shards: int


def run_extraction(settings: ExtractSettings,
                   progress: Callable[[int, int], None] | None = None, *,
                   model: tuple[torch.nn.Module, LoadedCheckpoint] | None = None) -> RunResult:
    """Extract embeddings for ``settings.data`` into ``settings.out`` (see module doc).

    progress: called with (images done, images to do) after every shard (the app's progress
    bar; with ``executor="ray"`` as the workers report batches); the terminal gets a tqdm bar
    either way. model: ``build_model``'s
    result for these settings' checkpoint and seed, to load it once for several runs.
    """
    t0 = time.perf_counter()
    if settings.executor == "ray":
        from .ray_run import RayCluster  # optional extra: a one-line error without it
        cluster = RayCluster.connect(settings)
        try:
            return _run(cluster.settle(settings), progress, model, cluster, t0)
        finally:
            cluster.close()  # the actors' CPUs/GPUs are freed whatever happened
    return _run(settings, progress, model, None, t0)


def _run(settings: ExtractSettings, progress, model, cluster, t0: float) -> RunResult:
    s = settings.resolved(local_device=cluster is None)
    if cluster is None and s.device == "cpu":
        keep_freed_memory(POLICY)  # process-wide; see SpeedPolicy.keep_freed_memory
    dataset = read_dataset(s.data, s.annotations)
    if cluster is not None:
        # The actors build their own models from this checkpoint; the driver needs none.
        ckpt = model[1] if model is not None else load_checkpoint(s.checkpoint, seed=s.seed)
    else:
        model, ckpt = model or build_model(s.checkpoint, seed=s.seed)
    plan = make_plan(dataset, s)
    fields = s.fingerprint_fields() | {
        "annotations_sha256": plan.annotations_sha256, "checkpoint_sha256": ckpt.sha256,
        "schema_version": rundir.SCHEMA_VERSION,
    }
    fp = fingerprint(fields)
    if _prepare_out_dir(s, fp, fields):
        manifest = rundir.read_manifest(s.out)
        log.info("%s is already complete with these settings; nothing to do (use --overwrite to redo)", s.out)
        return RunResult(s.out, manifest, 0, 0)

    work_dir = s.out / rundir.WORK_DIR
    shard_root = work_dir / SHARDS
    shard_root.mkdir(parents=True, exist_ok=True)
    states = image_states(plan, s.data)
    keys = shard_keys(plan, states, fp)
    todo = reconcile(work_dir, shard_root, plan, states, keys)
    done_before = len(plan.shards) - len(todo)
    if done_before:
        log.info("resuming: %d of %d shards already done", done_before, len(plan.shards))

    t_model = time.perf_counter()
    n_todo_images = sum(len(plan.shards[i]) for i in todo)
    # Wall-clock stamps of the first and last finished image: the whole-process bench splits
    # a run's fixed cost (process start to first image) from its per-image cost with them.
    clock: dict[str, float] = {}
    with tqdm(total=n_todo_images, unit="img", desc="extract", dynamic_ncols=True) as bar:
        if cluster is not None:
            clock = cluster.run_shards(ckpt, plan, s, todo, keys, shard_root, bar, progress)
        else:
            kept_total = 0
            fast = optimise_for_inference(model, s.device, s.precision)
            for _, n_images, kept in extract_shards(fast, plan, s, todo, keys, shard_root, clock):
                kept_total += kept
                bar.update(n_images)
                bar.set_postfix(kept=kept_total, refresh=False)
                if progress is not None:
                    progress(bar.n, n_todo_images)
    t_extract = time.perf_counter() - t_model

    shards = [_read_shard(shard_root / shard_name(i)) for i in range(len(plan.shards))]
    timings = {"total_s": None, "extract_s": round(t_extract, 3), "images_this_session": n_todo_images,
               "images_per_s": round(n_todo_images / t_extract, 3) if t_extract > 0 and n_todo_images else None,
               "first_image_unix": clock.get("first"), "last_image_unix": clock.get("last")}
    manifest = write_outputs(s, plan, dataset, ckpt, shards, fields, fp, timings, t0)
    shutil.rmtree(s.out / rundir.WORK_DIR, ignore_errors=True)
    if s.build_index:
        from index import build_index  # the next stage, only on request
        build_index(s.out)
    return RunResult(s.out, manifest, done_before, len(todo))


def _prepare_out_dir(s: ExtractSettings, fp: str, fields: dict) -> bool:
    """Create/check the run dir. True when it already holds this exact finished run."""
    out = s.out
    work_settings = out / rundir.WORK_DIR / "settings.json"
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a directory")
    if out.is_dir() and any(out.iterdir()):
        known = {p.name for p in out.iterdir()} & (set(rundir.OUTPUTS) | set(rundir.FEATURE_FILES) | {
            rundir.WORK_DIR, rundir.INDEX_DIR, rundir.CACHE_DIR})
        if not known:
            raise ValueError(f"--out {out} is a non-empty directory that is not a run; choose a new one")
        previous = None
        recorded = _read_json(out / rundir.MANIFEST) if (out / rundir.MANIFEST).is_file() else {}
        if not recorded and work_settings.is_file():
            recorded = _read_json(work_settings)
            recorded = {"settings_fingerprint": recorded.get("fingerprint"), "settings": recorded.get("fields")}
        previous = recorded.get("settings_fingerprint")
        if s.overwrite:
            for name in known:
                path = out / name
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        elif previous == fp and (out / rundir.MANIFEST).is_file():
            # A kill after the manifest but before the clean-up leaves shards behind.
            shutil.rmtree(out / rundir.WORK_DIR, ignore_errors=True)
            return True
        elif previous != fp:
            raise ValueError(f"{out} holds a run made with other settings ({_difference(recorded.get('settings'), fields)}); "
                             "pass --overwrite to replace it or choose another --out")
    rundir.write_json(work_settings, {"fingerprint": fp, "fields": fields})
    return False


def _read_json(path: Path) -> dict:
    try:
        return rundir.read_json(path)
    except ValueError:
        return {}


def _difference(before: dict | None, now: dict) -> str:
    """The settings that differ, in words (the annotations' sha256 names a changed dataset)."""
    if not isinstance(before, dict):
        return "the recorded settings are unreadable"
    changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    if "annotations_sha256" in changed:
        return "the annotations changed since it was made"
    return "changed: " + ", ".join(f"{k} {before.get(k)!r} -> {now.get(k)!r}" for k in changed[:4]) if changed \
        else "an older version of the tool"


def extract_shards(model, plan: Plan, s: ExtractSettings, todo: list[int], keys: list[str], shard_root: Path,
                   clock: dict[str, float], on_batch: Callable[[int, int], None] | None = None
                   ) -> Iterator[tuple[int, int, int]]:
    """Run and write the shards ``todo`` in order (this process or one Ray actor);
    yields (shard index, images, kept detections) as each shard is on disk.

    model: ``optimise_for_inference``'s; on_batch(shard index, images done in it) after each batch."""
    for shard_idx, results in _process(model, plan, s, todo, clock, on_batch):
        _write_shard(shard_root / shard_name(shard_idx), results, keys[shard_idx])
        yield shard_idx, len(results), kept_count(results)


def kept_count(results: list[dict]) -> int:
    return int(sum(r["rows"]["detected"].sum() for r in results if r["rows"] is not None))


def _process(model, plan: Plan, s: ExtractSettings, todo: list[int], clock: dict[str, float],
             on_batch: Callable[[int, int], None] | None = None) -> Iterator[tuple[int, list[dict]]]:
    """Decode ahead in threads (PIL releases the GIL) while the model runs; yields per shard.

    On a GPU one batch is in flight while the previous one is post-processed: the kernels of
    batch k+1 run while this thread matches and tabulates batch k. On the CPU the model runs at
    the launch, so there is nothing to overlap and each batch is finished at once (the timing
    stamps then mean what they always meant). The results are the same either way.
    clock: gets time.time() after the first ("first") and the latest ("last") batch."""
    root = s.data

    def load(image_id: int):
        row = plan.images_by_id[image_id]
        try:
            return load_prepared(root / row["path"], s.min_size, s.max_size, draft=s.draft,
                                 perturbation=s.perturb, key=str(row["filename"]))
        except Exception as exc:  # any decoding failure is recorded, never fatal
            return f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".strip()

    order = [(i, image_id) for i in todo for image_id in plan.shards[i]]
    batches = [(shard_idx, plan.shards[shard_idx][start:start + s.batch_size])
               for shard_idx in todo for start in range(0, len(plan.shards[shard_idx]), s.batch_size)]
    last_batch_of = {shard_idx: b for b, (shard_idx, _) in enumerate(batches)}
    results: dict[int, list[dict]] = {shard_idx: [] for shard_idx in todo}
    overlap = _overlaps(s.device)

    def finish(b: int, launched: dict) -> Iterator[tuple[int, list[dict]]]:
        shard_idx = batches[b][0]
        results[shard_idx].extend(_finish_batch(model, plan, s, launched))
        clock.setdefault("first", time.time())
        clock["last"] = time.time()
        if on_batch is not None:
            on_batch(shard_idx, len(results[shard_idx]))
        if last_batch_of[shard_idx] == b:
            yield shard_idx, results.pop(shard_idx)

    window = max(2 * s.batch_size, s.workers * 2)
    with ThreadPoolExecutor(max_workers=s.workers, thread_name_prefix="decode") as pool:
        futures = [pool.submit(load, image_id) for _, image_id in order[:window]]
        next_submit = len(futures)
        pos = 0
        in_flight = None  # (batch number, launched batch) still on the device
        for b, (_, batch_ids) in enumerate(batches):
            loaded = []
            for _ in batch_ids:
                loaded.append(futures[pos].result())
                futures[pos] = None  # free the pixels once consumed
                pos += 1
                if next_submit < len(order):
                    futures.append(pool.submit(load, order[next_submit][1]))
                    next_submit += 1
            launched = _launch_batch(model, s, batch_ids, loaded)
            if in_flight is not None:
                yield from finish(*in_flight)
            in_flight = (b, launched)
            if not overlap:
                yield from finish(*in_flight)
                in_flight = None
        if in_flight is not None:
            yield from finish(*in_flight)
    yield from results.items()  # shards without any image to run (none in practice)


def _overlaps(device: str) -> bool:
    """Whether the model runs asynchronously on ``device``, so post-processing can overlap it."""
    return device.startswith("cuda")


def _launch_batch(model, s: ExtractSettings, image_ids: list[int], loaded: list) -> dict:
    """Collate the decoded images of one batch and queue the model on them; decode errors kept."""
    ok = [(iid, p) for iid, p in zip(image_ids, loaded) if not isinstance(p, str)]
    errors = {iid: {"image_id": iid, "status": p, "rows": None} for iid, p in zip(image_ids, loaded)
              if isinstance(p, str)}
    out = None
    if ok:
        pixel_values, mask = collate([p.pixels for _, p in ok], device=s.device)
        # Same-size batches need no mask: the attention then skips the masking work. Decided from
        # the shapes, so that a GPU batch is not waited for here.
        padded = len({p.pixels.shape for _, p in ok}) > 1
        out = launch(model, pixel_values, mask if padded else None, s.device, s.precision,
                     return_features=bool(feature_files(s.features)))
    return {"image_ids": image_ids, "ok": ok, "errors": errors, "out": out}


def _finish_batch(model, plan: Plan, s: ExtractSettings, batch: dict) -> list[dict]:
    """Wait for a launched batch and make its images' rows, in the batch's order."""
    results = dict(batch["errors"])
    if batch["ok"]:
        out = fetch(batch["out"])
        extra = bool(feature_files(s.features))
        probs = class_probabilities(out["pred_logits"]).numpy()
        for b, (iid, prepared) in enumerate(batch["ok"]):
            res = _image_rows(plan, s, iid, prepared, probs[b], out["pred_boxes"][b].numpy(),
                              out["query_embeddings"][b].numpy())
            if extra and res["rows"] is not None:
                input_wh = (prepared.pixels.shape[1], prepared.pixels.shape[0])
                res["features"] = row_features(out, b, res["rows"]["query_idx"], input_wh,
                                               model.stride, s.features)
            results[iid] = res
    return [results[iid] for iid in batch["image_ids"]]


def _image_rows(plan: Plan, s: ExtractSettings, image_id: int, prepared, probs, boxes, emb) -> dict:
    """probs [Q, 92] class probabilities, boxes [Q, 4] normalised cxcywh, emb [Q, 256]."""
    w, h = prepared.orig_size
    scores = probs[:, PERSON_CLASS]
    expected = plan.images_by_id[image_id]
    if (w, h) != (expected["width"], expected["height"]):
        return {"image_id": image_id, "status": f"error: size changed to {w}x{h} while running", "rows": None}
    xyxy = cxcywh_to_xyxy_pixels(boxes, w, h)
    gt, person_ids = plan.context_by_image.get(image_id, (np.zeros((0, 4)), np.zeros(0, np.int64)))
    m = match_image(scores, xyxy, gt, s.threshold, s.min_iou)
    if plan.filtered:
        # Only the selected persons' rows stay; a detection of nobody cannot satisfy a person filter.
        keep = np.array([p >= 0 and int(person_ids[p]) in plan.selected_ids for p in m.person_idx], dtype=bool)
        m = type(m)(m.query_idx[keep], m.person_idx[keep], m.iou[keep], m.detected[keep])
    # Plain arrays per image, one DataFrame per shard (_write_shard): two small DataFrames an image
    # cost ~2.5 ms of the thread that feeds the model.
    rows = {
        "image_id": np.full(len(m.query_idx), image_id, dtype=np.int64),
        "query_idx": m.query_idx.astype(np.int16),
        "score": scores[m.query_idx].astype(np.float32),
        "x1": xyxy[m.query_idx, 0].astype(np.float32), "y1": xyxy[m.query_idx, 1].astype(np.float32),
        "x2": xyxy[m.query_idx, 2].astype(np.float32), "y2": xyxy[m.query_idx, 3].astype(np.float32),
        "person_id": np.where(m.person_idx >= 0, person_ids[np.maximum(m.person_idx, 0)], -1).astype(np.int64)
        if len(person_ids) else np.full(len(m.query_idx), -1, dtype=np.int64),  # -1: none (nullable on write)
        "iou": m.iou.astype(np.float32),
        "detected": m.detected.astype(bool),
    }
    return {"image_id": image_id, "status": "ok", "rows": rows,
            "embeddings": np.ascontiguousarray(emb[m.query_idx], dtype=np.float32),
            "predictions": query_predictions(image_id, probs, xyxy)}


def _frame(parts: list[dict[str, np.ndarray]]) -> pd.DataFrame:
    """One table from the images' column arrays; ``person_id`` -1 becomes <NA> (nullable Int64)."""
    columns = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    if "person_id" in columns:
        ids = columns["person_id"]
        columns["person_id"] = pd.arrays.IntegerArray(np.where(ids >= 0, ids, 0), ids < 0)
    return pd.DataFrame(columns)


def _write_shard(path: Path, results: list[dict], key: str) -> None:
    """One shard directory, complete or absent: written beside, then renamed."""
    status = pd.DataFrame({"image_id": [r["image_id"] for r in results],
                           "status": [r["status"] for r in results]})
    frames = [r["rows"] for r in results if r["rows"] is not None]
    embs = [r["embeddings"] for r in results if r["rows"] is not None]

    def write(tmp: Path) -> None:
        status.to_parquet(tmp / "images.parquet", index=False)
        if frames:
            _frame(frames).to_parquet(tmp / "rows.parquet", index=False)
            np.save(tmp / "embeddings.npy", np.concatenate(embs))
            _frame([r["predictions"] for r in results if r["rows"] is not None]) \
                .to_parquet(tmp / rundir.PREDICTIONS, index=False)
            kept = [r for r in results if r["rows"] is not None]
            for name in kept[0].get("features", {}):
                np.save(tmp / name, np.concatenate([r["features"][name] for r in kept]))
        (tmp / KEY_FILE).write_text(key + "\n")

    rundir.atomic_dir(path, write)


def _read_shard(path: Path) -> dict:
    status = pd.read_parquet(path / "images.parquet")
    if (path / "rows.parquet").is_file():
        rows = pd.read_parquet(path / "rows.parquet")
        emb = np.load(path / "embeddings.npy")
        if not (path / rundir.PREDICTIONS).is_file():
            raise ValueError(f"{path} was written by an older version (no {rundir.PREDICTIONS}): "
                             f"pass --overwrite to extract the run again")
        predictions = pd.read_parquet(path / rundir.PREDICTIONS)
    else:
        rows, emb, predictions = None, np.zeros((0, 256), np.float32), None
    features = {name: np.load(path / name) for name in rundir.FEATURE_FILES if (path / name).is_file()}
    return {"status": status, "rows": rows, "embeddings": emb, "predictions": predictions, "features": features}
