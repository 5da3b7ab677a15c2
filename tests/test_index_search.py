"""index.load_run(...).search / .neighbours: exactness, filters, padding, errors."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import index
import index.store
from index import BuildSettings, build_index, load_run, write_synthetic_run


def _brute(xn: np.ndarray, q: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    s = q @ xn.T
    if allowed is not None:
        s[:, ~allowed] = -np.inf
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, order, axis=1), order


@pytest.fixture(scope="module")
def flat_run(tmp_path_factory):
    run_dir = write_synthetic_run(tmp_path_factory.mktemp("flat") / "run", 1500, seed=3)
    build_index(run_dir, BuildSettings(kind="flat"))
    return load_run(run_dir)


@pytest.fixture(scope="module", params=["ivf", "hnsw"])
def approx_run(request, tmp_path_factory):
    run_dir = write_synthetic_run(tmp_path_factory.mktemp(request.param) / "run", 3000, seed=4)
    build_index(run_dir, BuildSettings(kind=request.param))
    return load_run(run_dir)


@pytest.mark.parametrize("nq", [1, 5, 64])  # 64 queries take the batched exact path
def test_flat_search_equals_brute_force(flat_run, nq):
    rng = np.random.default_rng(nq)
    # Queries near the data (not in it), keeping those whose top 11 have no near-ties.
    pool = np.asarray(flat_run.xb[rng.choice(flat_run.n, 4 * nq)]) + rng.standard_normal((4 * nq, flat_run.dim)) * 0.5
    xn = flat_run.normalised(np.arange(flat_run.n)).astype(np.float64)
    pn = pool / np.linalg.norm(pool, axis=1, keepdims=True)
    bD, bI = _brute(xn, pn, 11)
    keep = np.flatnonzero((np.abs(np.diff(bD, axis=1)) > 1e-5).all(axis=1))[:nq]
    assert len(keep) == nq
    xq, bD, bI = pool[keep].astype(np.float32), bD[keep], bI[keep]
    D, I = flat_run.search(xq, 10)
    assert D.shape == I.shape == (nq, 10)
    np.testing.assert_array_equal(I, bI[:, :10])
    np.testing.assert_allclose(D, bD[:, :10], atol=1e-5)


def test_single_vector_query_gives_one_row(flat_run):
    D, I = flat_run.search(np.asarray(flat_run.xb[7]), 3)
    assert I.shape == (1, 3) and I[0, 0] == 7 and D[0, 0] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("nq", [1, 40])
def test_filtered_search_returns_k_allowed_rows(flat_run, nq):
    where = "mst_band == 'darker' and matched"
    allowed = flat_run.meta.eval(where).to_numpy(dtype=bool, na_value=False)
    assert 10 < allowed.sum() < flat_run.n // 4
    xq = np.asarray(flat_run.xb[:nq])
    D, I = flat_run.search(xq, 10, where=where)
    assert (I >= 0).all() and allowed[I].all()
    xn = flat_run.normalised(np.arange(flat_run.n)).astype(np.float64)
    _, bI = _brute(xn, xn[:nq], 10, allowed)
    np.testing.assert_array_equal(I, bI)
    assert (np.diff(D, axis=1) <= 1e-7).all()
    # The same filter as a boolean mask gives the same answer.
    D2, I2 = flat_run.search(xq, 10, where=allowed)
    np.testing.assert_array_equal(I, I2)


@pytest.mark.parametrize("nq", [1, 30])
def test_selective_filter_pads_with_minus_one(flat_run, nq):
    allowed = np.zeros(flat_run.n, dtype=bool)
    allowed[[3, 50, 700]] = True
    D, I = flat_run.search(np.asarray(flat_run.xb[:nq]), 5, where=allowed)
    assert (np.sort(I[:, :3], axis=1) == [3, 50, 700]).all()
    assert (I[:, 3:] == -1).all() and np.isneginf(D[:, 3:]).all() and np.isfinite(D[:, :3]).all()
    D, I = flat_run.search(np.asarray(flat_run.xb[:nq]), 5, where=np.zeros(flat_run.n, dtype=bool))
    assert (I == -1).all() and np.isneginf(D).all()


def test_nullable_columns_in_where_count_na_as_false(flat_run):
    mask = flat_run.mask("mst_mode >= 7")
    mode = flat_run.meta["mst_mode"]
    assert mode.isna().any()
    np.testing.assert_array_equal(mask, (mode >= 7).fillna(False).to_numpy(dtype=bool))
    assert flat_run.mask("mst_mode in [7, 8, 9, 10] and lighting_dimly_lit").sum() > 0


def test_where_masks_are_cached_and_read_only(flat_run):
    a = flat_run.mask("score > 0.9")
    assert flat_run.mask("score > 0.9") is a
    with pytest.raises(ValueError):
        a[0] = not a[0]


@pytest.mark.parametrize("exclude", [False, True])
@pytest.mark.parametrize("nq", [3, 50])
def test_neighbours_never_self_and_respect_same_image(flat_run, exclude, nq):
    ids = np.random.default_rng(0).choice(flat_run.n, nq, replace=False)
    D, I = flat_run.neighbours(ids, 10, exclude_same_image=exclude)
    assert I.shape == (nq, 10) and (I >= 0).all()
    assert not (I == ids[:, None]).any()
    image = flat_run.meta["image_id"].to_numpy()
    same = image[I] == image[ids][:, None]
    if exclude:
        assert not same.any()
    xn = flat_run.normalised(np.arange(flat_run.n)).astype(np.float64)
    for q, row in zip(ids, I):
        allowed = np.ones(flat_run.n, dtype=bool)
        allowed[q] = False
        if exclude:
            allowed &= image != image[q]
        _, bI = _brute(xn, xn[[q]], 10, allowed)
        np.testing.assert_array_equal(row, bI[0])


def test_neighbours_with_filter_and_exclusion_returns_what_exists(flat_run):
    image = flat_run.meta["image_id"].to_numpy()
    q = int(np.flatnonzero(np.bincount(image)[image] >= 3)[0])
    allowed = image == image[q]
    allowed[np.flatnonzero(image != image[q])[:2]] = True  # two rows of other images
    D, I = flat_run.neighbours([q], 10, where=allowed, exclude_same_image=True)
    assert sorted(I[0, :2]) == sorted(np.flatnonzero(allowed & (image != image[q])))
    assert (I[0, 2:] == -1).all()


def test_approximate_search_guarantees_k_under_filters(approx_run, monkeypatch):
    rng = np.random.default_rng(1)
    xq = np.asarray(approx_run.xb[:20])
    for share in (0.01, 0.05, 0.3):
        allowed = rng.random(approx_run.n) < share
        for force_approximate in (False, True):
            if force_approximate:  # no exact shortcut: exercises the exact fall-back for short rows
                monkeypatch.setattr(index.store, "_EXACT_ALLOWED_MAX", 0)
            for nq in (1, 20):
                D, I = approx_run.search(xq[:nq], 10, where=allowed)
                want = min(10, int(allowed.sum()))
                assert ((I >= 0).sum(axis=1) == want).all()
                assert allowed[I[I >= 0]].all()
            monkeypatch.undo()


def test_approximate_neighbours_exclude_self(approx_run):
    ids = np.arange(0, 300, 7)
    D, I = approx_run.neighbours(ids, 10, exclude_same_image=True)
    assert (I >= 0).all() and not (I == ids[:, None]).any()
    image = approx_run.meta["image_id"].to_numpy()
    assert not (image[I] == image[ids][:, None]).any()


@pytest.mark.parametrize("xq, k, match", [
    (np.full(256, np.nan), 5, "finite"),
    (np.ones(128), 5, "shape"),
    (np.zeros(256), 5, "zero norm"),
    (np.ones(256), 0, "k must be"),
    (np.ones(256), 2.5, "k must be"),
])
def test_bad_queries_raise_value_error(flat_run, xq, k, match):
    with pytest.raises(ValueError, match=match):
        flat_run.search(xq, k)


@pytest.mark.parametrize("where, match", [
    ("mst_mod == 3", "unknown column 'mst_mod'.*mst_mode"),
    ("mst_mode ==", "not a valid expression"),
    ("score + 1", "not True/False"),
    ("", "empty"),
])
def test_bad_where_raises_value_error(flat_run, where, match):
    with pytest.raises(ValueError, match=match):
        flat_run.search(np.ones(256), 3, where=where)


def test_bad_masks_and_ids_raise_value_error(flat_run):
    with pytest.raises(ValueError, match="length"):
        flat_run.search(np.ones(256), 3, where=np.ones(5, dtype=bool))
    with pytest.raises(ValueError, match="det_ids"):
        flat_run.neighbours([flat_run.n], 3)


def test_nullable_boolean_mask_counts_na_as_false(flat_run):
    mask = pd.Series(pd.array([True, None] + [False] * (flat_run.n - 2), dtype="boolean"))
    _, I = flat_run.search(np.asarray(flat_run.xb[5]), 3, where=mask)
    assert I[0].tolist() == [0, -1, -1]
