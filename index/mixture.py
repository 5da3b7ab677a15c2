"""The embeddings of synthetic runs: a seeded mixture of Gaussians drawn in fixed blocks.

Each cluster is a Gaussian with a low-rank-plus-noise covariance around a centre that
shares a common mean direction. Rows are drawn ``CHUNK`` at a time, so a seed gives the
same rows whether they are drawn at once, streamed block by block, or skipped.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

CHUNK = 65_536  # rows per draw of the mixture noise: part of what a seed produces


def mixture_params(n: int, dim: int, n_clusters: int, rng: np.random.Generator, rank: int = 16) -> dict:
    """The mixture's parameters and each row's cluster (drawn before any row's noise)."""
    mean = rng.standard_normal(dim).astype(np.float32)
    centres = rng.standard_normal((n_clusters, dim)).astype(np.float32) + mean
    bases = (rng.standard_normal((n_clusters, rank, dim)) * 0.2).astype(np.float32)
    weights = rng.dirichlet(np.full(n_clusters, 2.0))
    labels = rng.choice(n_clusters, size=n, p=weights)
    return {"centres": centres, "bases": bases, "labels": labels, "dim": dim, "rank": rank}


def mixture_chunks(mixture: dict, rng: np.random.Generator, chunk: int = CHUNK) -> Iterator[np.ndarray]:
    """float32 [<= chunk, dim] blocks of rows in order, drawn from ``rng``."""
    centres, bases, labels = mixture["centres"], mixture["bases"], mixture["labels"]
    n_clusters = len(centres)
    for lo in range(0, len(labels), chunk):
        lab = labels[lo:lo + chunk]
        x = centres[lab] + rng.standard_normal((len(lab), mixture["dim"]), dtype=np.float32) * 0.4
        z = rng.standard_normal((len(lab), mixture["rank"]), dtype=np.float32)
        order = np.argsort(lab, kind="stable")
        bounds = np.searchsorted(lab[order], np.arange(n_clusters + 1))
        for c in np.flatnonzero(np.diff(bounds)):
            rows = order[bounds[c]:bounds[c + 1]]
            x[rows] += z[rows] @ bases[c]
        yield x


def skip_mixture(mixture: dict, rng: np.random.Generator, chunk: int = CHUNK) -> None:
    """Advance ``rng`` exactly as ``mixture_chunks`` does, without computing rows."""
    for lo in range(0, len(mixture["labels"]), chunk):
        m = min(chunk, len(mixture["labels"]) - lo)
        rng.standard_normal((m, mixture["dim"]), dtype=np.float32)
        rng.standard_normal((m, mixture["rank"]), dtype=np.float32)


def clustered_vectors(n: int, dim: int, n_clusters: int, rng: np.random.Generator,
                      rank: int = 16, chunk: int = CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """float32 [n, dim] from a mixture of Gaussians, and each row's cluster.

    Each cluster is a Gaussian with a low-rank-plus-noise covariance around a centre
    that shares a common mean direction: cosines are positive overall, higher inside a
    cluster, and nearest neighbours are meaningful (low intrinsic dimension).
    """
    params = mixture_params(n, dim, n_clusters, rng, rank)
    out = np.empty((n, dim), dtype=np.float32)
    for lo, x in zip(range(0, n, chunk), mixture_chunks(params, rng, chunk)):
        out[lo:lo + len(x)] = x
    return out, params["labels"]


def generator_at(state: dict) -> np.random.Generator:
    bit_generator = np.random.PCG64()
    bit_generator.state = state
    return np.random.Generator(bit_generator)


def skip_normals(rng: np.random.Generator, rows: int, dim: int) -> None:
    """Advance ``rng`` past ``standard_normal((rows, dim), float32)`` in bounded blocks
    (split draws consume the stream exactly as one draw does)."""
    for lo in range(0, rows, CHUNK):
        rng.standard_normal((min(CHUNK, rows - lo), dim), dtype=np.float32)
