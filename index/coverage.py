"""The intervals' coverage proven by simulation, with a planted truth.

Recall and AR: the project's own synthetic runs (``index.synthetic.planted_tables``,
the generator behind ``python -m index synthetic``), whose planted detection model
(``index.planted``) conditions on the dataset's persons: the truth of a group is its
expected value over the image effects and detection draws *given* the persons. So a
replication keeps the dataset (``seed``) and redraws the detections
(``detection_seed``), and every replication's estimand is the manifest's ``planted``
value exactly. Each replication goes through the read-out's own code: the COCO
matching of ``index.audit.person_audit`` and the image-cluster BCa intervals of
``index.bootstrap.group_means`` on the groups and the ``all`` column exactly as
``index.disparity.mean_readout`` (behind ``compare(run, by, "ar")``) forms them.

Similarity: a small planted mixture of unit embeddings (group mean + photo offset +
noise); the synthetic runs' embeddings have no closed-form similarity truth. Its truth
is the cosine of the two population mean unit vectors, estimated once from a large
sample of the same mixture.

``recall_coverage`` and ``similarity_coverage`` return one row per (statistic, group)
with the share of 95% intervals that cover the truth.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from index.audit import IOU_THRESHOLDS, person_audit
from index.bootstrap import BootSettings, bca_interval, group_means, image_index, image_weights, resample
from index.groupings import ALL, groups_of
from index.planted import PlantedEffects, planted_truth
from index.stats import wilson
from index.synthetic import THRESHOLD, dataset_layout, planted_detections

COVERAGE_METRICS = ("ar", "recall50")


def _replications(effects: PlantedEffects, n_rows: int, seed: int, detection_seeds: range, n_boot: int,
                  by: str, level: float) -> list[dict]:
    """One row per (detection seed, statistic, group) of dataset ``seed``: the interval and the truth."""
    layout = dataset_layout(n_rows, seed)
    persons = layout["persons"][layout["persons"]["evaluated"]].reset_index(drop=True)
    ok_images = np.arange(layout["n_images"])
    planted = planted_truth(effects, persons, IOU_THRESHOLDS, THRESHOLD)
    groups = groups_of(persons, by)
    labels = [*groups.labels, ALL]
    M = np.column_stack([groups.M, np.ones(len(persons), dtype=bool)])  # as mean_readout: the groups, then all
    n = M.sum(axis=0)
    truth = np.array([[planted[m][by][g] if g != ALL else planted[m][ALL][ALL] for m in COVERAGE_METRICS]
                      for g in labels])  # [G + 1, 2]
    truth = np.column_stack([truth, truth[:, 1]])  # the Wilson interval of recall50 beside ours
    stats = (*COVERAGE_METRICS, "recall50_wilson")
    rows = []
    for r in detection_seeds:
        predictions = planted_detections(layout, effects, detection_seed=r)["predictions"]
        audit = person_audit(persons, predictions, ok_images)
        values = audit[list(COVERAGE_METRICS)].to_numpy(np.float64)
        res = group_means(values, M, persons["image_id"].to_numpy(), BootSettings(n_boot=n_boot, seed=r, level=level))
        _, wlo, whi = wilson((M * values[:, 1:2]).sum(axis=0), n)
        lo, hi = np.column_stack([res.ci_low, wlo]), np.column_stack([res.ci_high, whi])
        rows += [{"statistic": s, "group": g, "seed": seed, "detection_seed": r, "n": int(n[i]), "truth": truth[i, j],
                  "ci_low": lo[i, j], "ci_high": hi[i, j]} for j, s in enumerate(stats) for i, g in enumerate(labels)]
    return rows


def recall_coverage(effects: PlantedEffects = PlantedEffects(), n_rows: int = 1200, seeds: tuple[int, ...] = (0, 1, 2, 3),
                    reps: int = 300, n_boot: int = 400, by: str = "mst_band", level: float = 0.95,
                    first_seed: int = 0, intervals: bool = False) -> pd.DataFrame:
    """Coverage over ``reps`` replications of planted synthetic runs of ``n_rows`` rows:
    ``reps / len(seeds)`` detection seeds (``first_seed`` on; each also seeds its
    bootstrap) for each dataset seed in ``seeds``, each judged against its own dataset's
    planted value (the truth is conditional on the persons, and conditional coverage
    varies a little between datasets, so several are averaged). Per metric (ar,
    recall50) and group of ``by`` (and ``all``): the share of image-cluster BCa
    intervals holding the planted value, and for recall50 also of independent-persons
    Wilson intervals (``recall50_wilson``); ``truth`` and ``n`` are means over the
    datasets. intervals: instead, every replication's interval."""
    if reps < len(seeds):
        raise ValueError(f"reps ({reps}) must be at least the number of dataset seeds ({len(seeds)})")
    per = reps // len(seeds)
    rows = [row for seed in seeds
            for row in _replications(effects, n_rows, seed, range(first_seed, first_seed + per), n_boot, by, level)]
    raw = pd.DataFrame(rows)
    if intervals:
        return raw
    raw["covered"] = (raw["ci_low"] <= raw["truth"]) & (raw["truth"] <= raw["ci_high"])
    raw["width"] = raw["ci_high"] - raw["ci_low"]
    out = raw.groupby(["statistic", "group"], sort=False).agg(
        n=("n", "mean"), truth=("truth", "mean"), coverage=("covered", "mean"), mean_width=("width", "mean"),
        reps=("covered", "size")).reset_index()
    out["image_sd"] = effects.image_sd
    return out


def strong_image_effect(effects: PlantedEffects = PlantedEffects(), image_sd: float = 2.5) -> PlantedEffects:
    """``effects`` with a strong image effect: photos found or missed nearly as a whole."""
    return replace(effects, image_sd=image_sd)


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


@dataclass(frozen=True)
class PlantedScores:
    """A fixed probe scoring rule on clustered persons, with its population truth in closed form.

    ``n_images`` photos of 1 + Poisson(``extra_persons``) persons; a photo has a class and each
    of its persons takes it with probability ``same_class`` (else a uniform class), so classes
    cluster by photo. Scores z [K] = ``separation`` * one-hot(class) + a photo effect (sd
    ``photo_sd``, shared by the photo's persons) + person noise (sd ``person_sd``), independent
    per component. Population truth, with sd = hypot(photo_sd, person_sd) and d = separation / sd:
    every class recall (argmax) and the balanced accuracy = int phi(t) Phi(t + d)^(K-1) dt; every
    one-vs-rest AUC (score z_k) = Phi(d / sqrt 2), the AUC of two persons from different photos
    (pairs inside one photo, ~E[m^2] / (n_images E[m]^2) < 1% of them, are the only bias)."""

    n_images: int = 200
    n_classes: int = 3
    extra_persons: float = 2.0
    same_class: float = 0.7
    separation: float = 1.5
    photo_sd: float = 1.0
    person_sd: float = 0.6

    def truth(self) -> dict[str, float]:
        from scipy import integrate, stats
        d = self.separation / np.hypot(self.photo_sd, self.person_sd)
        recall, _ = integrate.quad(lambda t: stats.norm.pdf(t) * stats.norm.cdf(t + d) ** (self.n_classes - 1),
                                   -np.inf, np.inf)
        return {"balanced_accuracy": recall, "macro_auc": float(stats.norm.cdf(d / np.sqrt(2))), "class_recall": recall}

    def draw(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(scores [N, K], labels [N], image codes [N] 0..n_images-1)."""
        K = self.n_classes
        image = np.repeat(np.arange(self.n_images), 1 + rng.poisson(self.extra_persons, self.n_images))
        own = rng.integers(0, K, self.n_images)[image]
        y = np.where(rng.random(len(image)) < self.same_class, own, rng.integers(0, K, len(image)))
        z = (self.separation * (y[:, None] == np.arange(K)) + rng.normal(0, self.photo_sd, (self.n_images, K))[image]
             + rng.normal(0, self.person_sd, (len(image), K)))
        return z, y, image


def probe_coverage(planted: PlantedScores = PlantedScores(), reps: int = 300, n_boot: int = 1000,
                   seed: int = 0) -> pd.DataFrame:
    """Coverage of the probe's 95% intervals (``index.probe_scores``: image-cluster BCa with the
    delete-one-image jackknife) of the planted rule's balanced accuracy, macro AUC and class
    recalls, beside the same BCa resampling persons as if independent (``persons``)."""
    from index.probe_scores import RECALL, resampled_scores
    truth = planted.truth()
    names = ["balanced_accuracy", "macro_auc"] + ["class_recall"] * planted.n_classes
    target = np.array([truth[n] for n in names])
    hits, width = np.zeros((2, len(names))), np.zeros((2, len(names)))
    for r in range(reps):
        z, y, image = planted.draw(np.random.default_rng([seed, r]))
        for i, codes in enumerate((image, np.arange(len(y)))):  # photos, then persons, as the clusters
            draws = np.concatenate(list(image_weights(np.arange(codes.max() + 1), BootSettings(n_boot=n_boot, seed=r))))
            lo, hi = resampled_scores(z, y, codes, draws).interval()
            hits[i] += (lo <= target) & (target <= hi)
            width[i] += (hi - lo) / reps
    labels = names[:RECALL] + [f"class_recall_{k}" for k in range(planted.n_classes)]
    return pd.DataFrame([{"statistic": s, "clusters": c, "truth": target[j], "coverage": hits[i, j] / reps,
                          "mean_width": width[i, j], "reps": reps, "n_boot": n_boot}
                         for i, c in enumerate(("images", "persons")) for j, s in enumerate(labels)])
