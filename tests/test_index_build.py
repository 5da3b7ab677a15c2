"""index build: manifest, auto kind, recall, and the checks load_run makes."""
from __future__ import annotations

import json
import shutil

import faiss
import numpy as np
import pandas as pd
import pytest

import index.vectors
from index import BuildSettings, build_index, load_run, write_synthetic_run
from index.build import AUTO_APPROXIMATE, INDEX_FILE, INDEX_MANIFEST


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    run_dir = write_synthetic_run(tmp_path_factory.mktemp("built") / "run", 800, seed=1)
    build_index(run_dir, BuildSettings())
    return run_dir


@pytest.fixture()
def run_copy(built, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(built, dst)
    return dst


def test_manifest_records_what_the_index_is(built):
    m = json.loads((built / "index" / INDEX_MANIFEST).read_text())
    assert m["kind"] == "flat" and m["n"] == 800 and m["dim"] == 256
    assert m["faiss_version"] == faiss.__version__
    assert m["embeddings"]["checksum"].startswith("blake2b") and m["embeddings"]["size"] == (built / "embeddings.npy").stat().st_size
    assert m["settings"] == {**BuildSettings().__dict__}
    assert m["recall_at_10"]["value"] == 1.0 and m["build_seconds"] >= 0
    assert not list((built / "index").glob("*.tmp"))


def test_auto_picks_approximate_above_threshold_and_reports_recall(tmp_path):
    run_dir = write_synthetic_run(tmp_path / "run", 4000, seed=2)
    m = build_index(run_dir, BuildSettings(exact_max_rows=1000, n_tune_queries=200))
    assert m["kind"] == AUTO_APPROXIMATE
    r = m["recall_at_10"]
    assert r["exact"] is False and r["value"] >= 0.95 and r["n_queries"] == 200
    assert ("efSearch" in m["params"]) or ("nprobe" in m["params"])
    assert load_run(run_dir).kind == AUTO_APPROXIMATE


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_each_approximate_kind_reaches_the_target(tmp_path, kind):
    run_dir = write_synthetic_run(tmp_path / "run", 2500, seed=5)
    m = build_index(run_dir, BuildSettings(kind=kind, n_tune_queries=200))
    assert m["kind"] == kind and m["recall_at_10"]["value"] >= 0.95


def test_ivf_build_is_reproducible_by_seed(tmp_path):
    run_dir = write_synthetic_run(tmp_path / "run", 2500, seed=5)
    a = build_index(run_dir, BuildSettings(kind="ivf", n_tune_queries=200))
    b = build_index(run_dir, BuildSettings(kind="ivf", n_tune_queries=200))
    assert a["params"] == b["params"] and a["recall_at_10"] == b["recall_at_10"]
    assert a["index_file"]["checksum"] == b["index_file"]["checksum"]


def test_approximate_index_of_a_tiny_run_is_refused(tmp_path):
    run_dir = write_synthetic_run(tmp_path / "run", 40)
    with pytest.raises(ValueError, match="use --kind flat"):
        build_index(run_dir, BuildSettings(kind="ivf"))


def test_build_settings_validate():
    with pytest.raises(ValueError, match="unknown index kind"):
        BuildSettings(kind="lsh")
    with pytest.raises(ValueError, match="target_recall"):
        BuildSettings(target_recall=1.5)


def _expect_rebuild(run_dir, match="python -m index build"):
    with pytest.raises(ValueError, match=match):
        load_run(run_dir)


def test_missing_index_says_build_it(tmp_path):
    run_dir = write_synthetic_run(tmp_path / "run", 50)
    _expect_rebuild(run_dir, f"has no index: build it with `python -m index build {run_dir}`")


def test_edited_embeddings_need_a_rebuild(run_copy):
    xb = np.load(run_copy / "embeddings.npy")
    xb[5, 3] += 1.0
    np.save(run_copy / "embeddings.npy", xb)
    _expect_rebuild(run_copy, "embeddings.npy changed since the index was built")


def test_truncated_index_file_needs_a_rebuild(run_copy):
    path = run_copy / "index" / INDEX_FILE
    path.write_bytes(path.read_bytes()[:1000])
    _expect_rebuild(run_copy, "missing or damaged")


def test_unreadable_index_file_with_matching_manifest_needs_a_rebuild(run_copy):
    path = run_copy / "index" / INDEX_FILE
    path.write_bytes(b"\0" * 64)
    manifest_path = run_copy / "index" / INDEX_MANIFEST
    m = json.loads(manifest_path.read_text())
    m["index_file"].update(size=64, checksum=index.vectors.file_checksum(path))
    manifest_path.write_text(json.dumps(m))
    _expect_rebuild(run_copy, "cannot be read")


def test_embeddings_out_of_line_with_the_run_are_reported(run_copy):
    # The run's own files disagree: rebuilding the index cannot fix that, re-extracting can.
    xb = np.load(run_copy / "embeddings.npy")
    np.save(run_copy / "embeddings.npy", xb[:-1])
    _expect_rebuild(run_copy, r"embeddings.npy holds float32 \[799, 256\], the run needs float32 \[800, 256\]: "
                              "extract the run again")


def test_metadata_out_of_line_with_embeddings_is_reported(run_copy):
    meta = pd.read_parquet(run_copy / "detections.parquet")
    meta.iloc[:-1].to_parquet(run_copy / "detections.parquet", index=False)
    _expect_rebuild(run_copy, "detections.parquet holds 799 rows, the manifest 800: extract the run again")


def test_index_manifest_from_another_version_needs_a_rebuild(run_copy):
    manifest_path = run_copy / "index" / INDEX_MANIFEST
    m = json.loads(manifest_path.read_text())
    m["settings"]["unknown_knob"] = 1
    manifest_path.write_text(json.dumps(m))
    _expect_rebuild(run_copy)


def test_unknown_run_schema_is_refused(run_copy):
    path = run_copy / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "schema_version": 99}))
    _expect_rebuild(run_copy, "schema version 99")


def test_checksum_is_cached_per_size_and_mtime(run_copy, monkeypatch):
    load_run(run_copy)
    calls = []
    real = index.vectors.hashlib.blake2b
    monkeypatch.setattr(index.vectors.hashlib, "blake2b", lambda **kw: calls.append(1) or real(**kw))
    load_run(run_copy)
    assert calls == []
    (run_copy / "embeddings.npy").touch()  # new mtime: hashed again (same bytes: still valid)
    load_run(run_copy)
    assert len(calls) == 1


@pytest.mark.slow
def test_approximate_recall_at_chosen_settings_on_100k(tmp_path):
    """recall@10 >= 0.95 of the auto approximate kind on a seeded 100k synthetic run."""
    run_dir = write_synthetic_run(tmp_path / "run", 100_000, seed=0)
    m = build_index(run_dir, BuildSettings(exact_max_rows=50_000))
    assert m["kind"] == AUTO_APPROXIMATE
    assert m["recall_at_10"]["value"] >= 0.95
    run = load_run(run_dir)
    rng = np.random.default_rng(7)
    q = rng.choice(run.n, 300, replace=False)
    xn = run.normalised(np.arange(run.n))
    s = run.normalised(q) @ xn.T
    s[np.arange(len(q)), q] = -np.inf
    gt = np.argsort(-s, axis=1)[:, :10]
    _, I = run.neighbours(q, 10)
    recall = np.mean([len(np.intersect1d(a, b)) for a, b in zip(I, gt)]) / 10
    assert recall >= 0.95
