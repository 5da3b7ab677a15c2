"""Planted data with a known truth, to prove the intervals' coverage by simulation.

Persons sit in photos; a photo has a lighting condition and a random effect u ~ N(0,
sigma^2) (logit scale) shared by its persons, as lighting, camera and crowd are. A
person of band g under lighting l is detected with probability expit(beta_g + gamma_l
+ u), and gets ``ar`` = detected x quality (quality ~ Beta(4, 2), mean 2/3, a stand-in
for the share of IoU thresholds met). The planted truth of a band is its expected
value over the image effects and lightings (Gauss-Hermite quadrature), which is what
the group's mean estimates. Embeddings: group mean + a photo offset + noise, so the
planted similarity between two groups is the cosine of their population mean unit
vectors (estimated once from a large sample of the same mixture).

``recall_coverage`` and ``similarity_coverage`` run seeded replications and return one
row per (statistic, group) with the share of 95% intervals that cover the truth.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.special import expit

from index.bootstrap import BootSettings, bca_interval, group_means, image_index, resample
from index.stats import wilson

BANDS = ("lighter", "medium", "darker")
LIGHTS = ("well_lit", "dimly_lit")


@dataclass(frozen=True)
class Planted:
    """The planted model (see module). beta: band logits; gamma: lighting logits."""

    n_images: int = 150
    max_persons: int = 6  # persons per photo uniform on 1..max_persons
    sigma: float = 1.5  # sd of the image effect (logit scale)
    beta: tuple[float, ...] = (1.6, 1.4, 0.9)
    band_p: tuple[float, ...] = (0.4, 0.35, 0.25)
    gamma: tuple[float, ...] = (0.0, -0.8)
    light_p: tuple[float, ...] = (0.75, 0.25)
    quality: tuple[float, float] = (4.0, 2.0)

    def truth(self) -> dict[str, np.ndarray]:
        """Expected recall and ar per band [len(BANDS)] over image effects and lightings."""
        x, w = np.polynomial.hermite_e.hermegauss(80)
        w = w / w.sum()
        eta = np.add.outer(np.asarray(self.beta), np.asarray(self.gamma))[..., None] + self.sigma * x
        recall = (expit(eta) * w).sum(axis=-1) @ np.asarray(self.light_p)
        a, b = self.quality
        return {"recall": recall, "ar": recall * a / (a + b)}

    def draw(self, rng: np.random.Generator) -> pd.DataFrame:
        """One planted dataset: a person per row with image_id, band, lighting, detected, ar."""
        sizes = rng.integers(1, self.max_persons + 1, self.n_images)
        image = np.repeat(np.arange(self.n_images), sizes)
        light = rng.choice(len(LIGHTS), self.n_images, p=self.light_p)[image]
        u = rng.normal(0, self.sigma, self.n_images)[image]
        band = rng.choice(len(BANDS), len(image), p=self.band_p)
        detected = rng.random(len(image)) < expit(np.asarray(self.beta)[band] + np.asarray(self.gamma)[light] + u)
        quality = rng.beta(*self.quality, len(image))
        return pd.DataFrame({"image_id": image, "band": band, "light": light,
                             "detected": detected.astype(float), "ar": detected * quality})


def recall_coverage(planted: Planted = Planted(), reps: int = 400, n_boot: int = 500, seed: int = 0,
                    level: float = 0.95) -> pd.DataFrame:
    """Coverage of the image-cluster BCa intervals of recall and ar per band, and of
    independent-persons Wilson intervals of recall, over ``reps`` seeded datasets."""
    truth = planted.truth()
    hits = {(s, g): 0 for s in ("recall", "ar", "recall_wilson") for g in range(len(BANDS))}
    width = dict.fromkeys(hits, 0.0)
    for r in range(reps):
        df = planted.draw(np.random.default_rng([seed, r]))
        M = df["band"].to_numpy()[:, None] == np.arange(len(BANDS))[None, :]
        res = group_means(df[["detected", "ar"]].to_numpy(), M, df["image_id"].to_numpy(),
                          BootSettings(n_boot=n_boot, seed=r, level=level))
        x = (M * df["detected"].to_numpy()[:, None]).sum(axis=0)
        _, wlo, whi = wilson(x, M.sum(axis=0))
        for g in range(len(BANDS)):
            for s, lo, hi in (("recall", res.ci_low[g, 0], res.ci_high[g, 0]), ("ar", res.ci_low[g, 1], res.ci_high[g, 1]),
                              ("recall_wilson", wlo[g], whi[g])):
                t = truth["ar" if s == "ar" else "recall"][g]
                hits[s, g] += int(lo <= t <= hi)
                width[s, g] += (hi - lo) / reps
    return pd.DataFrame([{"statistic": s, "group": BANDS[g], "truth": truth["ar" if s == "ar" else "recall"][g],
                          "coverage": hits[s, g] / reps, "mean_width": width[s, g], "reps": reps}
                         for s, g in hits])


@dataclass(frozen=True)
class PlantedMixture:
    """Two groups of unit embeddings: group mean + photo offset (sd ``image_sd``) + noise."""

    n_images: int = 120
    max_rows: int = 5
    dim: int = 16
    image_sd: float = 0.8
    noise_sd: float = 1.0
    share_a: float = 0.6

    def means(self) -> np.ndarray:
        rng = np.random.default_rng(12345)  # the mixture itself is fixed; replications vary the sample
        base = rng.normal(size=self.dim)
        return np.stack([base + rng.normal(size=self.dim) * 0.6 for _ in range(2)])

    def draw(self, rng: np.random.Generator, n_images: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(unit vectors [N, dim], membership [N, 2], image ids [N])."""
        n_images = n_images or self.n_images
        sizes = rng.integers(1, self.max_rows + 1, n_images)
        image = np.repeat(np.arange(n_images), sizes)
        group = (rng.random(len(image)) >= self.share_a).astype(int)
        x = (self.means()[group] + rng.normal(0, self.image_sd, (n_images, self.dim))[image]
             + rng.normal(0, self.noise_sd, (len(image), self.dim)))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x, group[:, None] == np.arange(2)[None, :], image

    def truth(self) -> float:
        """Cosine of the two population mean unit vectors (a 300k-photo sample)."""
        x, M, _ = self.draw(np.random.default_rng(7), n_images=300_000)
        ma, mb = x[M[:, 0]].mean(axis=0), x[M[:, 1]].mean(axis=0)
        return float(ma @ mb / np.linalg.norm(ma) / np.linalg.norm(mb))


def similarity_coverage(mixture: PlantedMixture = PlantedMixture(), reps: int = 200, n_boot: int = 400,
                        seed: int = 0) -> pd.DataFrame:
    """Coverage of the 95% intervals of ``centroid_cosine`` and ``corrected_cosine``
    between the two planted groups (both estimate the population means' cosine)."""
    from index.groups import SIMILARITY_METRICS, similarity_statistic
    truth = mixture.truth()
    hits, bias = np.zeros(3), np.zeros(3)
    for r in range(reps):
        x, M, image = mixture.draw(np.random.default_rng([seed, r]))
        uniq, inv = image_index(image)
        stat, value = similarity_statistic(M, x, inv)
        value, boot, jack = resample(stat, uniq, BootSettings(n_boot=n_boot, seed=r), value=value)
        lo, hi = bca_interval(value, boot, jack)
        hits += (lo[:, 0, 1] <= truth) & (truth <= hi[:, 0, 1])
        bias += (value[:, 0, 1] - truth) / reps
    return pd.DataFrame([{"statistic": name, "group": "a x b", "truth": truth, "coverage": hits[i] / reps,
                          "mean_bias": bias[i], "reps": reps}
                         for i, name in enumerate(SIMILARITY_METRICS) if name != "mean_pairwise_cosine"])
