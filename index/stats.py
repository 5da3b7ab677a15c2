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

