"""Interval estimates used by the group read-outs: Wilson, Newcombe, bootstrap."""
from __future__ import annotations

import warnings

import numpy as np

Z95 = 1.959963984540054


def wilson(successes: np.ndarray, n: np.ndarray, z: float = Z95) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Proportion and Wilson score interval; NaN where n = 0."""
    x = np.asarray(successes, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = x / n
        denom = 1.0 + z * z / n
        centre = (p + z * z / (2 * n)) / denom
        half = z / denom * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return p, centre - half, centre + half


def newcombe_difference(x1: float, n1: float, x2: float, n2: float, z: float = Z95) -> tuple[float, float, float]:
    """p1 - p2 with Newcombe's hybrid score interval (his method 10, 1998).

    It assumes independent samples; for overlapping groups it is approximate.
    """
    (p1, l1, u1), (p2, l2, u2) = (tuple(float(v) for v in wilson(x, n, z)) for x, n in ((x1, n1), (x2, n2)))
    d = p1 - p2
    return d, d - np.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), d + np.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)


def resample_counts(rng: np.random.Generator, n: int, rounds: int) -> np.ndarray:
    """float32 [rounds, n]: how often each of n members is drawn in a resample of size n.

    One bootstrap round per row; multiplying by the members' values gives the
    resampled sums as one matrix product.
    """
    if n == 0:
        return np.zeros((rounds, 0), dtype=np.float32)
    dtype = np.int32 if rounds * n < 2**31 else np.int64
    draws = rng.integers(0, n, size=(rounds, n), dtype=dtype)
    draws += (np.arange(rounds, dtype=dtype) * n)[:, None]
    return np.bincount(draws.ravel(), minlength=rounds * n).reshape(rounds, n).astype(np.float32)


def percentile_interval(samples: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap interval over axis 0, ignoring NaN rounds (all NaN -> NaN)."""
    tail = 100 * (1 - level) / 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices: empty groups
        lo, hi = np.nanpercentile(samples, [tail, 100 - tail], axis=0)
    return lo, hi


def cluster_bootstrap_means(values: np.ndarray, clusters: np.ndarray, membership: np.ndarray, n_boot: int,
                            rng: np.random.Generator, level: float = 0.95
                            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean of ``values`` per group with a cluster percentile bootstrap: (value, lo, hi), each [G].

    values [N] float; clusters [N] ids of the unit resampled (an image: persons come with
    their photo); membership [N, G] bool (groups may overlap). Each round draws the
    clusters with replacement and recomputes every group's mean from the same draw.
    Empty groups are NaN; a round in which a group drew nobody is left out of its interval.
    """
    values = np.asarray(values, dtype=np.float64)
    M = np.asarray(membership, dtype=bool).reshape(len(values), -1)
    _, code = np.unique(np.asarray(clusters), return_inverse=True)
    code = code.ravel()
    n_clusters, G = int(code.max()) + 1 if len(code) else 0, M.shape[1]
    S = np.zeros((n_clusters, G))
    K = np.zeros((n_clusters, G))
    for g in range(G):
        S[:, g] = np.bincount(code, weights=values * M[:, g], minlength=n_clusters)
        K[:, g] = np.bincount(code, weights=M[:, g].astype(np.float64), minlength=n_clusters)
    with np.errstate(invalid="ignore", divide="ignore"):
        est = S.sum(axis=0) / K.sum(axis=0)
        boot = np.empty((n_boot, G))
        for lo in range(0, n_boot, 64):
            W = resample_counts(rng, n_clusters, min(64, n_boot - lo)).astype(np.float64)
            boot[lo:lo + len(W)] = (W @ S) / (W @ K)
    lo, hi = percentile_interval(boot, level)
    return est, lo, hi
