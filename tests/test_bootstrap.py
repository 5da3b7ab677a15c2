"""The image-cluster bootstrap engine against brute force and hand formulas."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import norm

from index.bootstrap import (
    CHUNK, BootSettings, bca_interval, bca_pvalue, group_means, holm, image_weights,
)


def _weights(ids, **kw) -> np.ndarray:
    return np.concatenate(list(image_weights(np.asarray(ids), BootSettings(**kw))))


def test_weights_depend_only_on_seed_and_image_set():
    ids = np.array([40, 7, 7, 12, 99, 12, 3])
    W = _weights(ids, n_boot=150, seed=5)
    assert W.shape == (150, 5) and (W.sum(axis=1) == 5).all() and (W == np.round(W)).all()
    np.testing.assert_array_equal(W, _weights(ids[::-1], n_boot=150, seed=5))  # order, repeats
    np.testing.assert_array_equal(W, _weights(np.unique(ids), n_boot=150, seed=5))
    np.testing.assert_array_equal(W[:100], _weights(ids, n_boot=100, seed=5))  # rounds are a prefix
    assert not np.array_equal(W, _weights(ids, n_boot=150, seed=6))
    assert not np.array_equal(W[:, :4], _weights(ids[ids != 99], n_boot=150, seed=5))
    assert len(list(image_weights(ids, BootSettings(n_boot=150)))) == -(-150 // CHUNK)


def test_weights_are_uniform_multinomial():
    W = _weights(np.arange(20), n_boot=4000, seed=1)
    assert abs(W.mean() - 1) < 0.01 and abs(W.var() - (1 - 1 / 20)) < 0.03  # Multinomial(20, 1/20)


def _clustered(rng, n_img=60, per=(1, 6), p_img_sd=1.5):
    sizes = rng.integers(*per, n_img)
    ids = np.repeat(rng.permutation(1000)[:n_img], sizes)
    effect = np.repeat(rng.normal(0, p_img_sd, n_img), sizes)
    y = (rng.random(len(ids)) < 1 / (1 + np.exp(-(0.5 + effect)))).astype(float)
    return ids, y


def test_group_means_match_brute_force_rounds():
    rng = np.random.default_rng(0)
    ids, y = _clustered(rng)
    x = rng.normal(size=len(ids))
    M = np.column_stack([rng.random(len(ids)) < 0.5, rng.random(len(ids)) < 0.3, np.zeros(len(ids), bool)])
    M[:3, 1] = True
    s = BootSettings(n_boot=70, seed=3)
    res = group_means(np.column_stack([y, x]), M, ids, s)
    uniq = np.unique(ids)
    W = _weights(ids, n_boot=70, seed=3)
    for g in range(2):
        np.testing.assert_allclose(res.value[g], [y[M[:, g]].mean(), x[M[:, g]].mean()])
        assert res.n[g] == M[:, g].sum() and res.n_images[g] == len(np.unique(ids[M[:, g]]))
        for r in (0, 69):  # a round = the persons of the drawn images, each image as often as drawn
            rows = np.concatenate([np.flatnonzero(ids == uniq[j]) for j in np.repeat(np.arange(len(uniq)), W[r].astype(int))])
            rows = rows[M[rows, g]]
            np.testing.assert_allclose(res.boot[r, g], [y[rows].mean(), x[rows].mean()])
        j = 4  # jackknife: without image uniq[4]
        keep = M[:, g] & (ids != uniq[j])
        np.testing.assert_allclose(res.jack[j, g], [y[keep].mean(), x[keep].mean()])
    assert res.n[2] == 0 and np.isnan(res.value[2]).all() and np.isnan(res.ci_low[2]).all()
    assert np.isnan(res.design_effect[2]).all()


def _bca_reference(value, boot, jack, level):
    """Textbook BCa for one scalar (Efron and Tibshirani 1993, 14.3)."""
    z0 = norm.ppf((np.sum(boot < value) + 0.5 * np.sum(boot == value)) / len(boot))
    d = jack.mean() - jack
    a = np.sum(d ** 3) / (6 * np.sum(d ** 2) ** 1.5)
    out = []
    for z in norm.ppf([(1 - level) / 2, (1 + level) / 2]):
        q = norm.cdf(z0 + (z0 + z) / (1 - a * (z0 + z)))
        out.append(np.quantile(boot, q))
    return out


def test_bca_matches_textbook_formula():
    rng = np.random.default_rng(2)
    for _ in range(20):
        x = rng.exponential(size=40)
        boot = np.array([rng.choice(x, 40).mean() for _ in range(500)])
        jack = np.array([np.delete(x, i).mean() for i in range(40)])
        lo, hi = bca_interval(np.array(x.mean()), boot, jack, 0.9)
        np.testing.assert_allclose([lo, hi], _bca_reference(x.mean(), boot, jack, 0.9), rtol=1e-12)


def test_interval_always_contains_estimate():
    rng = np.random.default_rng(4)
    boot = rng.normal(size=(300, 50)) * rng.uniform(0.1, 2, 50) + rng.normal(0, 3, 50)  # shifted far off
    value = rng.normal(size=50)
    lo, hi = bca_interval(value, boot, rng.normal(size=(30, 50)), 0.95)
    assert (lo <= value).all() and (value <= hi).all()
    lo, hi = bca_interval(np.array([1.0]), np.ones((100, 1)), None)  # degenerate: all rounds equal
    assert lo[0] == hi[0] == 1.0
    boot = np.full((100, 1), np.nan)
    assert np.isnan(bca_interval(np.array([0.5]), boot, None)[0]).all()
    for seed in range(30):  # small groups of real clustered data
        ids, y = _clustered(np.random.default_rng(seed), n_img=8, per=(1, 4))
        M = np.column_stack([np.arange(len(y)) < 2, np.arange(len(y)) % 3 == 0, np.ones(len(y), bool)])
        res = group_means(y, M, ids, BootSettings(n_boot=200, seed=seed))
        assert (res.ci_low <= res.value).all() and (res.value <= res.ci_high).all()


def test_pvalue_inverts_the_interval():
    rng = np.random.default_rng(5)
    boot = rng.normal(0.3, 1, size=(2000, 1))
    q = np.mean(boot < 0)
    # No bias (value at the median) and no acceleration: the percentile p-value.
    p = bca_pvalue(boot, None, np.median(boot, axis=0))
    np.testing.assert_allclose(p, 2 * min(q, 1 - q), atol=2e-3)
    # With bias and acceleration: the interval at level 1 - p has 0 at an end.
    jack = rng.gamma(2, size=(50, 1))
    for value, null in ((0.2, 0.0), (0.5, 1.5), (0.1, -1.0)):
        p = bca_pvalue(boot, jack, np.array([value]), null)[0]
        assert 0.001 < p < 0.999
        lo, hi = bca_interval(np.array([value]), boot, jack, level=1 - p)
        assert abs((lo if null < value else hi)[0] - null) < 0.01
    # The estimate below the rounds' median: a null on its other side is never excluded.
    assert bca_pvalue(boot, jack, np.array([0.1]), 0.0)[0] == 1.0


def test_holm_matches_hand_computation():
    p = np.array([0.01, 0.04, 0.03, np.nan, 0.005])
    np.testing.assert_allclose(holm(p), [0.03, 0.06, 0.06, np.nan, 0.02])
    assert np.isnan(holm(np.array([np.nan]))).all()


def test_design_effect_one_for_independent_and_cluster_size_for_identical():
    rng = np.random.default_rng(6)
    y = (rng.random(3000) < 0.3).astype(float)
    M = np.ones((3000, 1), bool)
    indep = group_means(y, M, np.arange(3000), BootSettings(n_boot=2000))
    assert 0.85 < indep.design_effect[0, 0] < 1.15
    same = np.repeat(y[:600], 5)  # five identical persons per photo
    clustered = group_means(same, M, np.repeat(np.arange(600), 5), BootSettings(n_boot=2000))
    assert 4.2 < clustered.design_effect[0, 0] < 5.8


def test_differences_share_rounds():
    rng = np.random.default_rng(7)
    ids, y = _clustered(rng, n_img=200)
    M = np.column_stack([np.ones(len(y), bool), np.ones(len(y), bool)])
    d = group_means(y, M, ids, BootSettings(n_boot=300)).difference(0, 1)
    assert d.value[0] == 0 and (d.boot == 0).all() and d.ci_low[0] == d.ci_high[0] == 0


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="same rows"):
        group_means(np.zeros(3), np.ones((4, 1), bool), np.arange(4))
    with pytest.raises(ValueError, match="finite"):
        group_means(np.array([0, np.nan]), np.ones((2, 1), bool), np.arange(2))
    with pytest.raises(ValueError, match="n_boot"):
        BootSettings(n_boot=0)
