"""Closed-form intervals for independent persons (Wilson, Newcombe): the references the
image-cluster bootstrap (index.bootstrap) is compared with in tests and the coverage bench."""
from __future__ import annotations

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
