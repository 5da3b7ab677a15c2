"""Coverage of the image-cluster intervals, proven on planted data (index.coverage)."""
from __future__ import annotations

import numpy as np
import pytest

from index.coverage import Planted, PlantedMixture, recall_coverage, similarity_coverage


def test_planted_truth_matches_a_large_sample():
    planted = Planted(n_images=60_000)
    df = planted.draw(np.random.default_rng(0))
    truth = planted.truth()
    for g in range(3):
        rows = df[df.band == g]
        assert rows.detected.mean() == pytest.approx(truth["recall"][g], abs=0.01)
        assert rows.ar.mean() == pytest.approx(truth["ar"][g], abs=0.01)


@pytest.mark.slow
def test_cluster_intervals_cover_and_wilson_does_not():
    """400 seeded planted runs: every band's 95% interval of recall and ar covers the
    planted value in 92-98% of them; with a strong image effect the independent-persons
    Wilson interval under-covers."""
    moderate = recall_coverage(Planted(), reps=400, n_boot=400)
    strong = recall_coverage(Planted(sigma=3.0, max_persons=10), reps=400, n_boot=400)
    for table in (moderate, strong):
        ours = table[table.statistic.isin(["recall", "ar"])]
        assert ((ours.coverage >= 0.92) & (ours.coverage <= 0.98)).all(), ours
    wilson = strong[strong.statistic == "recall_wilson"]
    assert (wilson.coverage < 0.89).all(), wilson
    cluster = strong[strong.statistic == "recall"].coverage.to_numpy()
    assert (cluster - wilson.coverage.to_numpy() > 0.06).all()


@pytest.mark.slow
def test_similarity_intervals_cover_the_planted_mixture():
    table = similarity_coverage(PlantedMixture(), reps=200, n_boot=400)
    assert ((table.coverage >= 0.90) & (table.coverage <= 0.98)).all(), table
    corrected = table.set_index("statistic").loc["corrected_cosine"]
    assert abs(corrected.mean_bias) < 0.005
