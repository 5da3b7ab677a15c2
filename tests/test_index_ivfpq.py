"""The ivfpq kind (runs larger than memory) and the streamed read-outs, on small runs."""
from __future__ import annotations

import json
import shutil

import faiss
import numpy as np
import pytest

import index.build
import index.store
import index.vectors
from index import BuildSettings, GroupSettings, build_index, load_run, similarity, write_synthetic_run
from index.build import AUTO_RAM_SHARE, INDEX_FILE, INDEX_MANIFEST
from index.vectors import KnnAccumulator, UnitRows, file_checksum, normalise


def _unit(run) -> np.ndarray:
    xb = np.asarray(run.xb, dtype=np.float64)
    return xb / np.linalg.norm(xb, axis=1, keepdims=True)


def _brute(xn: np.ndarray, q: np.ndarray, k: int, allowed: np.ndarray | None = None) -> np.ndarray:
    """Top-k ids of stored rows q among the allowed rows, never q itself (numpy)."""
    s = xn[q] @ xn.T
    s[np.arange(len(q)), q] = -np.inf
    if allowed is not None:
        s[:, ~allowed] = -np.inf
    return np.argsort(-s, axis=1, kind="stable")[:, :k]


def _recall(I: np.ndarray, gt: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(a[a >= 0], b)) for a, b in zip(I, gt)]) / gt.shape[1])


@pytest.fixture(scope="module")
def pq_dir(tmp_path_factory):
    run_dir = write_synthetic_run(tmp_path_factory.mktemp("ivfpq") / "run", 4000, seed=6)
    build_index(run_dir, BuildSettings(kind="ivfpq", n_tune_queries=200))
    return run_dir


@pytest.fixture(scope="module")
def pq_run(pq_dir):
    return load_run(pq_dir)


@pytest.fixture()
def pq_copy(pq_dir, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(pq_dir, dst)
    return dst


def test_manifest_and_index_hold_compressed_codes(pq_dir, pq_run):
    m = json.loads((pq_dir / "index" / INDEX_MANIFEST).read_text())
    assert m["kind"] == "ivfpq" and m["recall_at_10"]["value"] >= 0.95
    p = m["params"]
    assert {"nlist", "nprobe", "rerank", "m", "nbits"} <= set(p) and p["m"] == 64 and p["nbits"] == 8
    assert isinstance(pq_run._index, faiss.IndexIVFPQ) and pq_run._index.code_size == 64
    # Per row a 64-byte code and an 8-byte id, besides the codebooks and centroids; the
    # float32 rows themselves (1 KB each) stay on disk.
    fixed = 4 * 256 * 2**8 + 4 * 256 * p["nlist"]
    assert m["index_file"]["size"] <= 72 * pq_run.n + fixed + 16_384


def test_recall_against_numpy_brute_force_and_exact_distances(pq_run):
    xn = _unit(pq_run)
    q = np.random.default_rng(3).choice(pq_run.n, 300, replace=False)
    D, I = pq_run.neighbours(q, 10)
    assert _recall(I, _brute(xn, q, 10)) >= 0.95
    assert not (I == q[:, None]).any() and (I >= 0).all()
    # Re-ranked from the stored rows: distances are exact cosines, best first.
    np.testing.assert_allclose(D, np.einsum("qd,qkd->qk", xn[q], xn[I]), atol=1e-5)
    assert (np.diff(D, axis=1) <= 1e-6).all()


def test_search_of_a_stored_row_finds_itself(pq_run):
    D, I = pq_run.search(np.asarray(pq_run.xb[[5, 77]]), 3)
    assert I[:, 0].tolist() == [5, 77] and np.allclose(D[:, 0], 1.0, atol=1e-5)


@pytest.mark.parametrize("force_approximate", [False, True])
def test_filtered_search_returns_k_whenever_k_rows_are_allowed(pq_run, monkeypatch, force_approximate):
    if force_approximate:  # no exact shortcut for small filters: the index path must keep the guarantee
        monkeypatch.setattr(index.store, "_EXACT_ALLOWED_MAX", 0)
    rng = np.random.default_rng(2)
    xn = _unit(pq_run)
    for share in (0.003, 0.01, 0.05, 0.3):
        allowed = rng.random(pq_run.n) < share
        for nq in (1, 25):
            q = rng.choice(pq_run.n, nq, replace=False)
            D, I = pq_run.search(np.asarray(pq_run.xb[q]), 10, where=allowed)
            want = min(10, int(allowed.sum()))
            assert ((I >= 0).sum(axis=1) == want).all()
            assert allowed[I[I >= 0]].all() and np.isneginf(D[I < 0]).all()
        _, I = pq_run.neighbours(q, 10, where=allowed)
        assert _recall(I, _brute(xn, q, 10, allowed)) >= 0.9


def test_filter_with_fewer_rows_than_k_pads(pq_run, monkeypatch):
    monkeypatch.setattr(index.store, "_EXACT_ALLOWED_MAX", 0)
    allowed = np.zeros(pq_run.n, dtype=bool)
    allowed[[4, 900, 3001]] = True
    D, I = pq_run.search(np.asarray(pq_run.xb[:2]), 5, where=allowed)
    assert (np.sort(I[:, :3], axis=1) == [4, 900, 3001]).all() and (I[:, 3:] == -1).all()


def _expect_rebuild(run_dir, match=None):
    with pytest.raises(ValueError, match=match) as exc:
        load_run(run_dir)
    assert f"python -m index build {run_dir}" in str(exc.value)


def test_damaged_index_file_needs_a_rebuild(pq_copy):
    path = pq_copy / "index" / INDEX_FILE
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    _expect_rebuild(pq_copy, "missing or damaged")


def test_index_of_another_kind_under_an_ivfpq_manifest_needs_a_rebuild(pq_copy):
    run = load_run(pq_copy)
    flat = faiss.IndexFlatIP(run.dim)
    flat.add(normalise(np.asarray(run.xb)))
    path = pq_copy / "index" / INDEX_FILE
    faiss.write_index(flat, str(path))
    manifest_path = pq_copy / "index" / INDEX_MANIFEST
    m = json.loads(manifest_path.read_text())
    m["index_file"].update(size=path.stat().st_size, checksum=file_checksum(path))
    manifest_path.write_text(json.dumps(m))
    _expect_rebuild(pq_copy, "does not match")


@pytest.mark.parametrize("key, value", [("m", 16), ("nlist", 3), ("rerank", 0)])
def test_manifest_parameters_that_do_not_fit_the_index_need_a_rebuild(pq_copy, key, value):
    manifest_path = pq_copy / "index" / INDEX_MANIFEST
    m = json.loads(manifest_path.read_text())
    m["params"][key] = value
    manifest_path.write_text(json.dumps(m))
    _expect_rebuild(pq_copy, "does not match")


def test_changed_embeddings_need_a_rebuild(pq_copy):
    xb = np.load(pq_copy / "embeddings.npy")
    xb[0] *= -1
    np.save(pq_copy / "embeddings.npy", xb)
    _expect_rebuild(pq_copy, "changed since the index was built")


@pytest.mark.parametrize("ram_mb, kind", [(16, "ivfpq"), (64, "ivf")])
def test_auto_picks_ivfpq_when_the_vectors_exceed_the_ram_share(tmp_path, ram_mb, kind):
    # 3000 x 256 float32 = 3 MB of vectors; the share of 16 MB is 2 MB, of 64 MB 8 MB.
    assert (3000 * 256 * 4 > AUTO_RAM_SHARE * 16 * 2**20) and (3000 * 256 * 4 < AUTO_RAM_SHARE * 64 * 2**20)
    run_dir = write_synthetic_run(tmp_path / "run", 3000, seed=8)
    settings = BuildSettings(exact_max_rows=1000, n_tune_queries=100, ram_bytes=ram_mb * 2**20)
    m = build_index(run_dir, settings)
    assert m["kind"] == kind and m["ram_policy"]["ram_bytes"] == ram_mb * 2**20
    assert load_run(run_dir).kind == kind
    assert BuildSettings(ram_bytes=0).ram() > 2**28  # the machine's own RAM when not given


def test_pq_m_must_divide_the_dimension(tmp_path):
    run_dir = write_synthetic_run(tmp_path / "run", 300, seed=1)
    with pytest.raises(ValueError, match="pq_m=24 does not divide"):
        build_index(run_dir, BuildSettings(kind="ivfpq", pq_m=24))


@pytest.mark.parametrize("stream", [False, True])
def test_unit_rows_sums_equal_numpy(pq_run, monkeypatch, stream):
    monkeypatch.setattr(index.vectors, "CHUNK_ROWS", 256)  # several blocks
    ids = np.sort(np.random.default_rng(0).choice(pq_run.n, 1500, replace=False))
    x = UnitRows(pq_run.xb, ids, stream=stream)
    ref = _unit(pq_run)[ids]
    W = np.random.default_rng(1).random((5, len(ids))).astype(np.float32)
    np.testing.assert_allclose(x.sum(axis=0, dtype=np.float64), ref.sum(axis=0), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(W @ x, W.astype(np.float64) @ ref, rtol=1e-5, atol=1e-4)
    sub = x[np.arange(100, 900)]
    assert sub.shape == (800, pq_run.dim) and sub.stream == stream
    np.testing.assert_allclose(sub.sum(), ref[100:900].sum(axis=0), rtol=1e-5, atol=1e-4)
    with pytest.raises(TypeError):
        np.asarray(x)


def test_similarity_streamed_equals_in_memory(pq_run, monkeypatch):
    settings = GroupSettings(n_boot=50, seed=4)
    kept = similarity(pq_run, "mst_any", "detections", settings)
    monkeypatch.setattr(index.vectors, "IN_MEMORY_BYTES", 0)  # every selection streams
    monkeypatch.setattr(index.vectors, "CHUNK_ROWS", 128)
    streamed = similarity(pq_run, "mst_any", "detections", settings)
    np.testing.assert_allclose(streamed["value"], kept["value"], rtol=1e-6, atol=1e-6, equal_nan=True)
    np.testing.assert_allclose(streamed["ci_low"], kept["ci_low"], rtol=1e-5, atol=1e-5, equal_nan=True)


def test_knn_accumulator_equals_brute_force():
    rng = np.random.default_rng(0)
    xb = normalise(rng.standard_normal((3000, 32)).astype(np.float32))
    xq = normalise(rng.standard_normal((700, 32)).astype(np.float32))  # > Q_BLOCK: two heaps
    acc = KnnAccumulator(xq, 7)
    for lo in range(0, 3000, 1100):
        acc.add(np.arange(lo, min(lo + 1100, 3000)), xb[lo:lo + 1100])
    D, I = acc.result()
    s = xq.astype(np.float64) @ xb.T.astype(np.float64)
    np.testing.assert_array_equal(I, np.argsort(-s, axis=1, kind="stable")[:, :7])
    np.testing.assert_allclose(D, np.sort(s, axis=1)[:, ::-1][:, :7], atol=1e-5)


def _rss_file_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1]) / 1024
    pytest.skip("no RssFile in /proc/self/status")


def test_streamed_pass_does_not_keep_the_file_resident(tmp_path, monkeypatch):
    monkeypatch.setattr(index.vectors, "IN_MEMORY_BYTES", 0)
    path = tmp_path / "x.npy"
    np.save(path, np.random.default_rng(0).random((80_000, 256), dtype=np.float32))  # 78 MB
    xb = np.load(path, mmap_mode="r")
    before = _rss_file_mb()
    total = UnitRows(xb, np.arange(len(xb))).sum()
    assert _rss_file_mb() - before < 20
    assert np.isfinite(total).all()
    np.asarray(xb).sum()  # the same pass through the mapping without releasing: resident
    assert _rss_file_mb() - before > 60
