"""One image-cluster bootstrap for every read-out.

Persons of one photo share its lighting, camera and crowd, so they are not
independent draws: a round resamples *images* with replacement and every person (or
embedding row) comes with its photo. ``image_weights`` gives, per round, how often each
image is drawn; a statistic that is a function of per-image sums (group means, group
embedding sums, Gram matrices) is recomputed in a round as ``W @ per_image_sums``.

The draw depends only on (seed, the set of image ids, the round index): rounds come in
fixed chunks of ``CHUNK``, chunk c from its own generator seeded by (seed, a digest of
the sorted image ids, c). Two runs of one dataset, or two metrics of one run, therefore
get the same weights in every round (paired comparisons), and the first 1000 rounds of
``n_boot=2000`` are those of ``n_boot=1000``.

Interval: BCa (Efron 1987). The bias correction z0 is the normal quantile of the share
of rounds below the estimate (ties count half); the acceleration comes from the
jackknife over images (leave one image out). BCa ends lie on the estimate's side of
the bootstrap distribution whenever |z0| < z_{level}; in the remaining, extreme case
(the estimate beyond the level's tail of its own bootstrap distribution) the near end
is moved to the estimate, so every interval contains its estimate. Rounds where a
statistic is undefined (a group drew no image) are left out of its quantiles.

```
settings = BootSettings(n_boot=1000, seed=0)
res = group_means(detected, M, image_ids, settings)     # [N] or [N, m] values, M [N, G]
res.value, res.ci_low, res.ci_high, res.design_effect   # [G, m]
d = res.difference(0, 1)                                # group 0 minus group 1, all columns
```
"""
from __future__ import annotations

import contextlib
import hashlib
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
from scipy import sparse
from scipy.special import ndtr, ndtri

try:
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover - installed with scikit-learn
    threadpool_limits = None

CHUNK = 64  # rounds per generator and per matrix product; fixed so results do not depend on n_boot or the machine


def one_blas_thread() -> contextlib.AbstractContextManager:
    """Our products have a long inner dimension ([64, n] @ [n, k]); numpy's OpenBLAS
    ran that shape 30-40x slower on two threads than on one on the 2-core VM."""
    return threadpool_limits(1, user_api="blas") if threadpool_limits else contextlib.nullcontext()


@dataclass(frozen=True)
class BootSettings:
    """Rounds, seed and interval level of the image-cluster bootstrap."""

    n_boot: int = 1000
    seed: int = 0
    level: float = 0.95

    def __post_init__(self) -> None:
        if self.n_boot < 1:
            raise ValueError(f"n_boot must be >= 1, got {self.n_boot}")
        if not 0 < self.level < 1:
            raise ValueError(f"level must be between 0 and 1 (e.g. 0.95), got {self.level}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")


def image_index(image_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted unique image ids [n_images], each row's position among them [N])."""
    ids = np.asarray(image_ids)
    if ids.ndim != 1:
        raise ValueError(f"image_ids must be one id per row (1-d), got shape {ids.shape}")
    uniq, inverse = np.unique(ids, return_inverse=True)
    return uniq, inverse.ravel()


def _chunk_rng(seed: int, uniq: np.ndarray, chunk: int) -> np.random.Generator:
    digest = hashlib.sha256(np.ascontiguousarray(uniq.astype(np.int64)).tobytes()).digest()
    words = np.frombuffer(digest[:16], dtype=np.uint32).tolist()
    return np.random.default_rng([seed, *words, chunk])


def image_weights(image_ids: np.ndarray, settings: BootSettings = BootSettings()) -> Iterator[np.ndarray]:
    """Chunks of float64 [b, n_images] draw counts (rows sum to n_images), b <= CHUNK,
    n_boot rounds in all; column j is the j-th of the sorted unique image ids."""
    uniq, _ = image_index(image_ids)
    n = len(uniq)
    for c, lo in enumerate(range(0, settings.n_boot, CHUNK)):
        b = min(CHUNK, settings.n_boot - lo)
        if n == 0:
            yield np.zeros((b, 0))
            continue
        draws = _chunk_rng(settings.seed, uniq, c).integers(0, n, size=(CHUNK, n), dtype=np.int64)[:b]
        draws += (np.arange(b, dtype=np.int64) * n)[:, None]
        counts = np.bincount(draws.ravel(), minlength=b * n)
        del draws  # one [CHUNK, n] int64 array less at the peak (0.6 GB at 1.25M images)
        yield counts.reshape(b, n).astype(np.float64)


def per_image_sums(values: np.ndarray, inverse: np.ndarray, n_images: int) -> np.ndarray:
    """float64 [n_images, ...] sums of values [N, ...] over the rows of each image
    (a sparse incidence product: ~20x faster than np.add.reduceat on 2-d rows)."""
    values = np.asarray(values)
    flat = values.reshape(len(values), int(np.prod(values.shape[1:]))).astype(np.float64, copy=False)
    P = sparse.csr_matrix((np.ones(len(values)), (inverse, np.arange(len(values)))), shape=(n_images, len(values)))
    return np.asarray(P @ flat).reshape((n_images,) + values.shape[1:])


def jackknife_weights(uniq: np.ndarray, settings: BootSettings = BootSettings(),
                      n_blocks: int = 50) -> np.ndarray:
    """float64 [K, n_images], K = min(n_blocks, n_images): weight 1, and 0 on the images of
    block k (a seeded partition of the images). Leave-one-block-out values give the
    BCa acceleration where the exact leave-one-image-out is too costly: the third and
    second moments of block influences add up like those of single images."""
    n = len(uniq)
    K = min(n_blocks, n)
    if K == 0:
        return np.ones((0, n))
    block = _chunk_rng(settings.seed, uniq, -1 % 2**32).permutation(n) % K
    return (block[None, :] != np.arange(K)[:, None]).astype(np.float64)


def resample(statistic: Callable[[np.ndarray], np.ndarray], uniq: np.ndarray,
             settings: BootSettings = BootSettings(), n_blocks: int = 50,
             value: np.ndarray | None = None,
             universe: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(value [...], boot [n_boot, ...], jack [K, ...]) of ``statistic``, a function of image
    weights W [b, n_images] returning [b, ...] (W = 1 gives the data itself; pass
    ``value`` when the caller computes the estimate more exactly).

    ``universe``: the image ids drawn from (a superset of ``uniq``; default ``uniq``):
    the rounds and jackknife blocks are those of the universe, restricted to ``uniq``'s
    columns, so statistics of several runs over one universe are paired round by round
    (images outside ``uniq`` still count in a round's draw, as in ``group_means``).
    """
    uniq = np.asarray(uniq)
    drawn, cols = (uniq, slice(None)) if universe is None else rows_in(uniq, universe)
    with one_blas_thread():
        value = statistic(np.ones((1, len(uniq))))[0] if value is None else np.asarray(value)
        boot = np.concatenate([statistic(W[:, cols]) for W in image_weights(drawn, settings)])
        J = jackknife_weights(drawn, settings, n_blocks)[:, cols]
        jack = (np.concatenate([statistic(J[i:i + CHUNK]) for i in range(0, len(J), CHUNK)]) if len(J)
                else np.full((0,) + value.shape, np.nan))
    return value, boot, jack


# --- intervals and tests ---------------------------------------------------------------

def _share_below(boot: np.ndarray, value: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    finite = ~np.isnan(boot)  # +-inf rounds (a ratio over a zero) are ordered values, NaN rounds are left out
    k = finite.sum(axis=0)
    with np.errstate(invalid="ignore"):
        below = ((boot < value) & finite).sum(axis=0) + 0.5 * ((boot == value) & finite).sum(axis=0)
        share = below / k
    # Clipped so a distribution entirely on one side gives a finite z0.
    half = 0.5 / np.maximum(k, 1)
    return np.clip(share, half, 1 - half), k


def acceleration(jack: np.ndarray) -> np.ndarray:
    """BCa acceleration from leave-one-image-out values jack [n_images, ...] (NaN skipped)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        jack = np.where(np.isfinite(jack), jack, np.nan)
        d = np.nanmean(jack, axis=0) - jack
        num, den = np.nansum(d ** 3, axis=0), 6 * np.nansum(d ** 2, axis=0) ** 1.5
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, 0.0)


def _quantiles(boot: np.ndarray, q: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Per-element linear-interpolated quantile q [...] of the k non-NaN rounds."""
    srt = np.sort(boot, axis=0)  # NaN sort last
    pos = np.clip(q, 0, 1) * np.maximum(k - 1, 0)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, np.maximum(k - 1, 0))
    a = np.take_along_axis(srt, lo[None], 0)[0]
    b = np.take_along_axis(srt, hi[None], 0)[0]
    with np.errstate(invalid="ignore"):
        out = np.where((hi > lo) & (a != b), a + (pos - lo) * (b - a), a)
    return np.where(k > 0, out, np.nan)


def bca_interval(value: np.ndarray, boot: np.ndarray, jack: np.ndarray | None,
                 level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """BCa interval (ci_low, ci_high) [...] of estimates value [...] from rounds boot
    [B, ...] and jackknife values jack [n_images, ...] (None: no acceleration). Always
    contains the estimate; NaN where the estimate or every round is NaN."""
    value, boot = np.asarray(value, dtype=np.float64), np.asarray(boot, dtype=np.float64)
    share, k = _share_below(boot, value)
    z0 = ndtri(share)
    a = acceleration(jack) if jack is not None else np.zeros_like(value)
    ends = []
    for z in (ndtri((1 - level) / 2), ndtri((1 + level) / 2)):
        u = z0 + z
        with np.errstate(invalid="ignore", divide="ignore"):
            denom = 1 - a * u
            q = np.where(denom > 0, ndtr(z0 + u / denom), np.where(z < 0, 0.0, 1.0))
        ends.append(_quantiles(boot, q, k))
    lo, hi = ends
    bad = ~np.isfinite(value) | (k == 0)
    return np.where(bad, np.nan, np.fmin(lo, value)), np.where(bad, np.nan, np.fmax(hi, value))


def bca_pvalue(boot: np.ndarray, jack: np.ndarray | None, value: np.ndarray, null: float = 0.0) -> np.ndarray:
    """Two-sided p-value of ``statistic == null`` by inverting the BCa interval: the
    smallest 1 - level whose interval (BCa, widened to contain the estimate) excludes
    ``null``, so p < 0.05 exactly when the 95% interval excludes it. Resolution ~1/B."""
    value, boot = np.asarray(value, dtype=np.float64), np.asarray(boot, dtype=np.float64)
    z0 = ndtri(_share_below(boot, value)[0])
    q, k = _share_below(boot, np.full_like(value, null))
    a = acceleration(jack) if jack is not None else np.zeros_like(value)
    w = ndtri(q) - z0  # = u / (1 - a u) with u = z0 + z, solved for the nominal z
    with np.errstate(invalid="ignore", divide="ignore"):
        denom = 1 + a * w
        z = np.where(denom > 0, w / denom, np.sign(w) * np.inf) - z0
        # The interval at level L is excluded by null below the estimate when its
        # lower end (nominal z_L = ndtri((1 - L) / 2) < 0) passes null: z_L > z.
        p = np.where(null < value, 2 * ndtr(z), np.where(null > value, 2 * ndtr(-z), 1.0))
    return np.where(np.isfinite(value) & (k > 0), np.clip(p, 0, 1), np.nan)


def holm(p: np.ndarray) -> np.ndarray:
    """Holm step-down adjusted p-values over a family (NaN entries are not in it)."""
    p = np.asarray(p, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    m = len(ok)
    if m:
        order = ok[np.argsort(p[ok], kind="stable")]
        adj = np.maximum.accumulate((m - np.arange(m)) * p[order])
        out[order] = np.minimum(adj, 1.0)
    return out


# --- group means -----------------------------------------------------------------------

@dataclass(frozen=True)
class Estimate:
    """A statistic [...], its BCa interval and p-value against 0, with its rounds."""

    value: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray
    p_value: np.ndarray
    boot: np.ndarray = field(repr=False)  # [n_boot, ...]
    jack: np.ndarray = field(repr=False)  # [n_images, ...]


def estimate(value: np.ndarray, boot: np.ndarray, jack: np.ndarray | None, level: float = 0.95,
             null: float = 0.0) -> Estimate:
    """Bundle a statistic with its BCa interval and bootstrap p-value against ``null``."""
    lo, hi = bca_interval(value, boot, jack, level)
    jack = jack if jack is not None else np.full((0,) + np.shape(value), np.nan)
    return Estimate(np.asarray(value, dtype=np.float64), lo, hi, bca_pvalue(boot, jack, value, null), boot, jack)


@dataclass(frozen=True)
class GroupMeans:
    """Group means of m value columns. Shapes: value, ci_low, ci_high, design_effect
    [G, m]; n, n_images [G]; boot [n_boot, G, m]; jack [n_images_total, G, m]."""

    value: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray
    n: np.ndarray
    n_images: np.ndarray
    design_effect: np.ndarray
    boot: np.ndarray = field(repr=False)
    jack: np.ndarray = field(repr=False)
    settings: BootSettings = BootSettings()

    def difference(self, a: int, b: int) -> Estimate:
        """Mean of group a minus group b [m], resampled jointly (same rounds)."""
        return estimate(self.value[a] - self.value[b], self.boot[:, a] - self.boot[:, b],
                        self.jack[:, a] - self.jack[:, b], self.settings.level)

    def ratio(self, a: int, b: int) -> Estimate:
        """Mean of group a over group b [m] (p-value against 1)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return estimate(self.value[a] / self.value[b], self.boot[:, a] / self.boot[:, b],
                            self.jack[:, a] / self.jack[:, b], self.settings.level, null=1.0)


def rows_in(image_ids: np.ndarray, universe: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(sorted unique universe [n_images], each row's position in it [N]); universe None:
    the rows' own images. Rows whose image is outside the universe are an error."""
    if universe is None:
        return image_index(image_ids)
    uniq, _ = image_index(universe)
    ids = np.asarray(image_ids)
    pos = np.searchsorted(uniq, ids)
    if len(ids) and (pos.max() >= len(uniq) or (uniq[np.minimum(pos, len(uniq) - 1)] != ids).any()):
        raise ValueError("some rows' image ids are not in the universe of images given to the bootstrap")
    return uniq, pos


def group_means(values: np.ndarray, M: np.ndarray, image_ids: np.ndarray,
                settings: BootSettings = BootSettings(), universe: np.ndarray | None = None) -> GroupMeans:
    """Mean of values [N] or [N, m] over the rows of each group of membership M [N, G]
    (bool; groups may overlap), with image-cluster BCa intervals.

    design_effect = bootstrap variance / (s^2 / n), s^2 the within-group variance of
    the persons' values (p(1 - p) for 0/1 values): how much the clustering by photo
    widens the interval compared with independent persons. NaN for empty groups.
    ``universe``: the image ids resampled (default: the rows' own images); images
    without rows still count in a round's draw, as in the full sample.
    """
    v = np.asarray(values, dtype=np.float64)
    squeeze = v.ndim == 1
    v = v[:, None] if squeeze else v
    M = np.asarray(M, dtype=bool)
    if v.ndim != 2 or M.ndim != 2 or len(v) != len(M) or len(M) != len(image_ids):
        raise ValueError(f"values {v.shape}, membership {M.shape} and image_ids ({len(image_ids)}) need the same rows")
    if not np.isfinite(v[M.any(axis=1)]).all():
        raise ValueError("values must be finite for every row in a group; drop or fill missing values first")
    v = np.where(M.any(axis=1)[:, None], v, 0.0)
    (N, m), G = v.shape, M.shape[1]
    uniq, inv = rows_in(np.asarray(image_ids), universe)
    n_img = len(uniq)
    Mf = M.astype(np.float64)
    A = per_image_sums((Mf[:, :, None] * v[:, None, :]).reshape(N, G * m), inv, n_img)  # [n_img, G*m]
    C = per_image_sums(Mf, inv, n_img)  # [n_img, G]
    S, n = A.sum(axis=0).reshape(G, m), C.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        value = S / n[:, None]
        jack = (S[None] - A.reshape(n_img, G, m)) / (n[None] - C)[:, :, None]
    boot = np.empty((settings.n_boot, G, m))
    lo = 0
    with one_blas_thread():
        for W in image_weights(uniq, settings):
            with np.errstate(invalid="ignore", divide="ignore"):
                boot[lo:lo + len(W)] = (W @ A).reshape(-1, G, m) / (W @ C)[:, :, None]
            lo += len(W)
    ci_low, ci_high = bca_interval(value, boot, jack, settings.level)
    sq = per_image_sums((Mf[:, :, None] * v[:, None, :] ** 2).reshape(N, G * m), inv, n_img).sum(axis=0).reshape(G, m)
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        s2 = np.maximum(sq / n[:, None] - value ** 2, 0.0)
        deff = np.nanvar(boot, axis=0, ddof=1) / (s2 / n[:, None])
    deff = np.where(np.isfinite(deff), deff, np.nan)
    return GroupMeans(value, ci_low, ci_high, n.astype(np.int64), (C > 0).sum(axis=0).astype(np.int64),
                      deff, boot, jack, settings)
