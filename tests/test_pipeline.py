"""End to end: demo dataset -> run directory, resume after SIGKILL, settings checks, one photo."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from extractor import rundir
from extractor.demo import write_demo
from extractor.pipeline import run_extraction
from extractor.settings import ExtractSettings
from kill import kill_after_shards

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--checkpoint", "none", "--min-size", "128", "--max-size", "192"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return write_demo(tmp_path_factory.mktemp("demo") / "data", n_images=10, seed=3).root


def _settings(data: Path, out: Path, **kw) -> ExtractSettings:
    base = dict(data=data, out=out, checkpoint="none", min_size=128, max_size=192, shard_size=4)
    return ExtractSettings(**(base | kw))


def _cli(*args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-m", "extractor", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, **kw)
    if check:
        assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def _load(run: Path) -> dict:
    return {"det": pd.read_parquet(run / rundir.DETECTIONS), "persons": pd.read_parquet(run / rundir.PERSONS),
            "images": pd.read_parquet(run / rundir.IMAGES), "emb": np.load(run / rundir.EMBEDDINGS),
            "manifest": json.loads((run / rundir.MANIFEST).read_text())}


def test_demo_run_is_consistent(demo, tmp_path):
    result = run_extraction(_settings(demo, tmp_path / "run"))
    r = _load(result.out)
    det, persons, images, emb, m = r["det"], r["persons"], r["images"], r["emb"], r["manifest"]
    annotated = pd.read_csv(demo / "annotations.csv")
    assert emb.shape == (len(det), 256) and emb.dtype == np.float32 and np.isfinite(emb).all()
    assert det["det_id"].tolist() == list(range(len(det)))
    assert len(persons) == len(annotated) and (persons["evaluated"]).all()
    assert (images["status"] == "ok").all() and len(images) == 10
    # every annotated person has exactly one row holding their embedding
    with_person = det[det["has_person"]]
    assert sorted(with_person["person_id"]) == sorted(annotated["person_id"])
    assert persons["embedding_det_id"].notna().all()
    rows = det.set_index("det_id").loc[persons["embedding_det_id"].astype(int)]
    assert (rows["person_id"].to_numpy() == persons["person_id"].to_numpy()).all()
    # detected persons point at matched kept detections with IoU >= 0.5; the rest at fallback rows
    hit = persons[persons["detected"]]
    assert (det.loc[hit["det_id"].astype(int), "matched"]).all()
    assert (det.loc[hit["det_id"].astype(int), "iou"] >= 0.5).all()
    missed = persons[~persons["detected"]]
    assert not det.loc[missed["embedding_det_id"].astype(int), "detected"].any()
    assert (det.loc[det["detected"], "score"] >= 0.7).all() and (det.loc[~det["detected"], "score"] < 0.7).all()
    assert not det.duplicated(["image_id", "query_idx"]).any()
    # boxes are pixels of the original image
    size = images.set_index("image_id")
    assert (det["x2"] > det["x1"]).all()
    assert (det["x1"] > -size.loc[det["image_id"], "width"].to_numpy()).all()
    # attributes travel with the row
    merged = with_person.merge(annotated[["person_id", "skin_tone_5"]], on="person_id")
    assert (merged["skin_tone_5_x"] == merged["skin_tone_5_y"]).all()
    assert m["checkpoint"]["untrained"] is True and m["counts"]["rows"] == len(det)
    assert m["counts"]["persons_detected"] == int(persons["detected"].sum())
    assert not (result.out / rundir.WORK_DIR).exists()
    # untrained but non-degenerate: embeddings of different persons differ
    x = emb[det["has_person"].to_numpy()]
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    assert (x @ x.T)[np.triu_indices(len(x), 1)].mean() < 0.95


def test_settings_are_checked_on_rerun(demo, tmp_path):
    out = tmp_path / "run"
    run_extraction(_settings(demo, out, limit=2))
    again = run_extraction(_settings(demo, out, limit=2))
    assert again.processed_shards == 0
    with pytest.raises(ValueError, match="other settings.*--overwrite"):
        run_extraction(_settings(demo, out, limit=2, threshold=0.5))
    redone = run_extraction(_settings(demo, out, limit=2, threshold=0.5, overwrite=True))
    assert redone.manifest["threshold"] == 0.5
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a run"):
        run_extraction(_settings(demo, tmp_path / "other", overwrite=True))
    assert (tmp_path / "other" / "notes.txt").exists()


@pytest.mark.slow
def test_sigkill_and_resume_equals_clean_run(demo, tmp_path):
    args = ["run", "--data", str(demo), *SMALL, "--shard-size", "2", "--batch-size", "1"]
    clean = tmp_path / "clean"
    _cli(*args, "--out", str(clean))

    killed = tmp_path / "killed"
    kill_after_shards(args, killed)

    resumed = _cli(*args, "--out", str(killed))
    assert "resuming" in resumed.stderr
    a, b = _load(clean), _load(killed)
    for key in ("det", "persons", "images"):
        pd.testing.assert_frame_equal(a[key], b[key])
    np.testing.assert_array_equal(a["emb"], b["emb"])
    assert a["manifest"]["counts"] == b["manifest"]["counts"]


def test_cli_help_explains_every_option():
    import argparse
    from extractor.__main__ import _parser
    sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in sub.choices.items():
        text = _cli(name, "--help").stdout
        for action in parser._actions:
            if action.option_strings and action.dest != "help":
                assert action.help and len(action.help) > 10, (name, action.dest)
                assert action.option_strings[-1] in text


def test_cli_errors_are_one_line(tmp_path):
    proc = _cli("run", "--data", str(tmp_path), "--out", str(tmp_path / "r"), "--checkpoint", "none", check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: no annotations under") and "Traceback" not in proc.stderr


def test_single_photo_astronaut():
    from skimage import data
    from PIL import Image
    from extractor.checkpoints import build_model
    from extractor.infer import Detector

    model, _ = build_model("none", seed=0)
    det = Detector(model, min_size=256, max_size=400, device="cpu")
    photo = Image.fromarray(data.astronaut())
    out = det.detect(photo, return_attention=True)
    assert out.scores.shape == (100,) and out.boxes.shape == (100, 4) and out.embeddings.shape == (100, 256)
    assert out.size == (512, 512) and out.input_size == (256, 256)
    h, w = out.feature_size
    assert out.decoder_attention.shape == (100, h, w)
    assert out.encoder_attention.shape == (h * w, h * w)
    np.testing.assert_allclose(out.decoder_attention.sum(axis=(1, 2)), 1.0, atol=5e-3)  # bf16
    picks = out.ranked(threshold=0.999999)
    assert 1 <= len(picks) <= 5 and out.scores[picks[0]] == out.scores.max()


def test_overlapped_batches_write_the_same_run(demo, tmp_path, monkeypatch):
    """The GPU schedule (batch k+1 launched before batch k is fetched and tabulated), run on the
    CPU: launches and finishes interleave as designed, and every file is the CPU schedule's."""
    from extractor import pipeline
    events: list[str] = []
    real_launch, real_finish = pipeline._launch_batch, pipeline._finish_batch

    def launch(*a):
        events.append(f"L{len(a[-2])}")
        return real_launch(*a)

    def finish(*a):
        events.append(f"F{len(a[-1]['image_ids'])}")
        return real_finish(*a)

    monkeypatch.setattr(pipeline, "_launch_batch", launch)
    monkeypatch.setattr(pipeline, "_finish_batch", finish)
    plain = run_extraction(_settings(demo, tmp_path / "plain", batch_size=3, shard_size=6))
    assert events == ["L3", "F3", "L3", "F3", "L3", "F3", "L1", "F1"]  # 10 images, shards of 6
    events.clear()
    monkeypatch.setattr(pipeline, "_overlaps", lambda device: True)
    overlapped = run_extraction(_settings(demo, tmp_path / "overlapped", batch_size=3, shard_size=6))
    assert events == ["L3", "L3", "F3", "L3", "F3", "L1", "F3", "F1"]
    for name in (rundir.DETECTIONS, rundir.PERSONS, rundir.IMAGES, rundir.EMBEDDINGS, rundir.PREDICTIONS):
        assert (plain.out / name).read_bytes() == (overlapped.out / name).read_bytes(), name
