"""Projections: stratified sampling, the methods, the on-disk cache and its key."""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

import index  # noqa: E402
from ui import projections as pj  # noqa: E402


@pytest.fixture(scope="module")
def ui_synthetic_run(tmp_path_factory):
    run_dir = index.write_synthetic_run(tmp_path_factory.mktemp("ui_proj") / "syn", 600, seed=3)
    index.build_index(run_dir)
    return index.load_run(run_dir)


def test_stratified_sample_is_proportional_seeded_and_keeps_small_strata():
    strata = np.array(["a"] * 900 + ["b"] * 90 + ["c"] * 9 + ["d"])
    s = pj.stratified_sample(strata, 100, random_state=0)
    assert len(s) == 100 and len(np.unique(s)) == 100 and np.all(np.diff(s) > 0)
    counts = pd.Series(strata[s]).value_counts().to_dict()
    assert counts["d"] == 1 and counts["c"] == 1 and 8 <= counts["b"] <= 10 and 87 <= counts["a"] <= 90
    assert np.array_equal(s, pj.stratified_sample(strata, 100, random_state=0))
    assert not np.array_equal(s, pj.stratified_sample(strata, 100, random_state=1))
    assert np.array_equal(pj.stratified_sample(strata[:50], 100, 0), np.arange(50))
    assert len(pj.stratified_sample(strata, 3, 0)) == 3  # fewer slots than strata: still at most cap
    with pytest.raises(ValueError):
        pj.stratified_sample(strata, 0, 0)


def test_key_holds_exactly_the_parameters_that_matter():
    p = pj.ProjectionParams()
    key = pj.projection_key("umap", "persons", p, "abc")
    assert key == pj.projection_key("umap", "persons", pj.ProjectionParams(), "abc")
    for other in (pj.ProjectionParams(n_neighbors=30), pj.ProjectionParams(min_dist=0.5),
                  pj.ProjectionParams(random_state=1), pj.ProjectionParams(sample_cap=1000)):
        assert pj.projection_key("umap", "persons", other, "abc") != key
    assert pj.projection_key("umap", "all", p, "abc") != key
    assert pj.projection_key("umap", "persons", p, "abd") != key  # the embeddings changed
    assert pj.projection_key("tsne", "persons", p, "abc") != key
    # Parameters of another method do not split a cache.
    assert pj.projection_key("umap", "persons", pj.ProjectionParams(perplexity=5), "abc") == key
    assert pj.projection_key("pca", "persons", pj.ProjectionParams(n_neighbors=50), "abc") == \
        pj.projection_key("pca", "persons", p, "abc")
    with pytest.raises(ValueError):
        pj.projection_key("mds", "persons", p, "abc")
    with pytest.raises(ValueError):
        pj.ProjectionParams(n_neighbors=1)


def test_project_pca_and_tsne_shapes_and_determinism():
    X = np.random.default_rng(0).standard_normal((60, 256)).astype(np.float32)
    pca = pj.project(X, "pca")
    assert pca.shape == (60, 2) and pca.dtype == np.float32
    # Rows are L2-normalised first: scaling a row does not move it.
    X2 = X.copy()
    X2[5] *= 10
    assert np.allclose(pj.project(X2, "pca"), pca, atol=1e-4)
    params = pj.ProjectionParams(perplexity=10, random_state=4)
    a = pj.project(X, "tsne", params)
    assert a.shape == (60, 2) and np.allclose(a, pj.project(X, "tsne", params))
    with pytest.raises(ValueError, match="at least 3"):
        pj.project(X[:2], "pca")


def test_umap_fits_a_sample_and_transforms_the_rest():
    rng = np.random.default_rng(1)
    X = np.concatenate([rng.normal(0, 1, (40, 16)) + 6, rng.normal(0, 1, (40, 16)) - 6]).astype(np.float32)
    fit = np.arange(0, 80, 2)
    coords = pj.project(X, "umap", pj.ProjectionParams(n_neighbors=8, random_state=0), fit_rows=fit)
    assert coords.shape == (80, 2) and np.isfinite(coords).all()
    # Transformed rows land with their own cluster.
    first, second = coords[:40].mean(axis=0), coords[40:].mean(axis=0)
    assert np.linalg.norm(coords[1] - first) < np.linalg.norm(coords[1] - second)


def test_tsne_above_the_cap_shows_a_stratified_sample(ui_synthetic_run):
    run = ui_synthetic_run
    proj = pj.compute_projection(run, "tsne", "persons", pj.ProjectionParams(sample_cap=50, perplexity=10))
    n_persons = int(run.meta["has_person"].sum())
    assert proj.info["n_population"] == n_persons and proj.info["n_shown"] == 50 == len(proj.frame)
    assert run.meta["has_person"].to_numpy()[proj.frame["det_id"]].all()
    assert proj.frame["fitted"].all()


def test_cache_miss_then_hit_survives_restarts(ui_synthetic_run, monkeypatch):
    run = ui_synthetic_run
    calls = []
    real = pj.compute_projection
    monkeypatch.setattr(pj, "compute_projection", lambda *a: calls.append(a) or real(*a))
    params = pj.ProjectionParams(random_state=7)
    first, hit = pj.load_or_compute(run, "pca", "all", params)
    assert not hit and len(calls) == 1 and len(first.frame) == run.n
    again, hit = pj.load_or_compute(run, "pca", "all", params)
    assert hit and len(calls) == 1
    pd.testing.assert_frame_equal(again.frame, first.frame)
    key = first.info["key"]
    data, meta = pj.cache_paths(run.run_dir, key)
    assert data.is_file() and meta.is_file() and "random_state" in meta.read_text()
    assert not [p for p in data.parent.iterdir() if p.name.endswith(".tmp")]
    # Another parameter is another file; a damaged file is only a miss.
    pj.load_or_compute(run, "pca", "all", pj.ProjectionParams(random_state=8))
    assert len(calls) == 2
    data.write_bytes(b"garbage")
    assert pj.load_cached(run.run_dir, key) is None
    _, hit = pj.load_or_compute(run, "pca", "all", params)
    assert not hit and len(calls) == 3 and pj.load_cached(run.run_dir, key) is not None


def test_map_table_joins_metadata(ui_synthetic_run):
    run = ui_synthetic_run
    frame = pd.DataFrame({"det_id": [3, 1], "x": [0.0, 1.0], "y": [2.0, 3.0], "fitted": [True, False]})
    table = pj.map_table(run.meta, frame)
    assert table["det_id"].tolist() == [3, 1]
    assert set(pj.COLOUR_OPTIONS) <= set(table.columns)
    assert table["mst_band"].tolist() == run.meta["mst_band"].iloc[[3, 1]].astype(str).tolist()
    assert table["mst_mode"].map(type).eq(str).all()


class _Stop(Exception):
    pass


def test_umap_transform_reports_steps_and_can_stop_between_chunks(monkeypatch):
    rng = np.random.default_rng(2)
    X = rng.normal(0, 1, (90, 8)).astype(np.float32)
    fit = np.arange(0, 90, 3)  # 30 fitted, 60 placed by transform
    monkeypatch.setattr(pj, "TRANSFORM_CHUNK", 25)
    seen = []
    full = pj.project(X, "umap", pj.ProjectionParams(n_neighbors=5), fit, step=lambda f, t: seen.append((f, t)))
    assert [t for _, t in seen] == [f"placing the other rows with transform: {lo} of 60" for lo in (0, 25, 50)]
    assert np.isfinite(full).all()

    def stop_at_second(fraction, text):
        if "25 of 60" in text:
            raise _Stop

    with pytest.raises(_Stop):
        pj.project(X, "umap", pj.ProjectionParams(n_neighbors=5), fit, step=stop_at_second)


def test_a_stopped_computation_leaves_no_cache(ui_synthetic_run):
    run, params = ui_synthetic_run, pj.ProjectionParams(random_state=11)
    texts = []

    def stop_before_storing(fraction, text):
        texts.append(text)
        if fraction == 1.0:
            raise _Stop

    with pytest.raises(_Stop):
        pj.load_or_compute(run, "pca", "all", params, step=stop_before_storing)
    assert texts[0] == "selecting the rows" and texts[1].startswith("fitting PCA on")
    key = pj.projection_key("pca", "all", params, run.index_manifest["embeddings"]["checksum"])
    assert pj.load_cached(run.run_dir, key) is None
