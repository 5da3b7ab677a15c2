"""The probe's scores and BCa intervals: weighted AUC against scikit-learn, the closed-form
delete-one-image jackknife against brute force, coverage of a planted truth."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from index.coverage import PlantedScores, probe_coverage
from index.probe_scores import AUC, BAL, RECALL, auc_jackknife, jackknife_scores, weighted_auc, weighted_scores


def _data(seed: int = 0, N: int = 500, n_images: int = 70):
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, n_images, N)
    y = rng.integers(0, 3, N)
    P = rng.dirichlet(np.ones(3), N) + 0.3 * (y[:, None] == np.arange(3))
    P[:80] = np.round(P[:80], 1)  # ties, inside and across images
    return P, y, codes, n_images


def test_weighted_auc_with_real_valued_weights_matches_sklearn():
    P, y, codes, n = _data(1)
    C = np.random.default_rng(2).random((3, n))  # not counts: the float64 path
    want = [roc_auc_score(y == 0, P[:, 0], sample_weight=c[codes]) for c in C]
    np.testing.assert_allclose(weighted_auc(P[:, 0], y == 0, C, codes), want, rtol=1e-12)


def test_jackknife_is_the_statistic_with_one_image_left_out():
    P, y, codes, n = _data(3)
    value, jack = jackknife_scores(P, y, codes, n)
    leave_one_out = np.ones((n, n)) - np.eye(n)
    np.testing.assert_allclose(jack, weighted_scores(P, y, codes, leave_one_out), rtol=1e-12)
    assert value[BAL] == balanced_accuracy_score(y, P.argmax(axis=1))
    assert np.isclose(value[AUC], np.mean([roc_auc_score(y == k, P[:, k]) for k in range(3)]), rtol=1e-12)
    np.testing.assert_array_equal(value[RECALL:], [(P.argmax(axis=1) == k)[y == k].mean() for k in range(3)])
    # an image holding the only positive: its AUC without it is undefined
    pos = np.zeros(len(y), bool)
    pos[0] = True
    _, j = auc_jackknife(P[:, 0], pos, codes, n)
    assert np.isnan(j[codes[0]]) and np.isfinite(np.delete(j, codes[0])).all()


@pytest.mark.slow
def test_image_cluster_bca_covers_a_planted_truth_and_independent_persons_do_not():
    """150 seeded replications of a fixed rule whose persons share their photo's effect: the
    image-cluster intervals cover the closed-form truth in ~95%, the person-level ones far less."""
    table = probe_coverage(PlantedScores(), reps=150, n_boot=400).set_index(["clusters", "statistic"])["coverage"]
    images, persons = table["images"], table["persons"]
    assert ((images >= 0.9) & (images <= 0.99)).all(), images
    for s in ("balanced_accuracy", "macro_auc"):
        assert persons[s] < 0.9 and images[s] - persons[s] > 0.05, (s, images[s], persons[s])
