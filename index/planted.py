"""Planted detection effects of synthetic runs, and their exact truth (for simulations).

A person of an ok image is *found* (some person-labelled query covers them) with
probability ``sigmoid(band_logit[mst_band] + sum of lighting_logit over their lighting
flags + image_sd * u)``, where ``u ~ N(0, 1)`` is one draw per image shared by all its
persons (a logit-normal image effect: photos are easy or hard as a whole). A found
person's query has IoU ``q ~ Beta(a, b)`` of their band with their box (the box is
their box scaled about its centre, so the IoU is exactly q); a person not found gets
only a badly placed query (IoU < 0.5). So per person

    P(matched at t) = pi_i * P(q >= t),   pi_i = E_u[sigmoid(eta_i + image_sd * u)],

and the planted truth of a group is the mean of that over its evaluated persons:
an expectation over the image effects and the detection draws, given the dataset's
persons. pi_i is computed by Gauss-Hermite quadrature (``_GH_NODES`` nodes; exact to
~1e-12 for this smooth integrand), P(q >= t) by the Beta survival function. The
threshold recall also needs the kept score, ``Beta(score_a, score_b) >= threshold``.
index.synthetic places the persons of a photo side by side and grows a box only at
IoU >= 0.7, so no query can match a neighbour: the realised values scatter around the
truth without bias (checked over seeds in tests/test_synthetic_planted.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import special, stats

from extractor.groups import LIGHTING_FLAGS, MST_BANDS, UNKNOWN

_GH_NODES = 64
_BANDS = (*MST_BANDS, UNKNOWN)
PLANTED_GROUPINGS = ("mst_band", "lighting", "mst_mode")


@dataclass(frozen=True)
class PlantedEffects:
    """The detection model of a synthetic run (see the module doc). Pairs, not dicts, so it is frozen."""

    band_logit: tuple[tuple[str, float], ...] = (("lighter", 2.2), ("medium", 2.0), ("darker", 1.4), (UNKNOWN, 1.8))
    lighting_logit: tuple[tuple[str, float], ...] = (
        ("well_lit", 0.0), ("dimly_lit", -0.8), ("underexposed", -1.0), ("overexposed", -0.4))
    image_sd: float = 0.8
    # IoU quality of a found person's query: Beta(a, b) per band (mean ~0.85 lighter, ~0.80 darker)
    iou_beta: tuple[tuple[str, float, float], ...] = (
        ("lighter", 14.0, 2.4), ("medium", 13.0, 2.5), ("darker", 10.0, 2.6), (UNKNOWN, 12.0, 2.5))
    score_a: float = 5.0       # a found person's label_score ~ Beta(score_a, score_b)
    score_b: float = 1.2
    duplicate_rate: float = 0.5  # found persons with a second, worse and lower-scored query
    false_positives: float = 1.5  # person-labelled low-score queries per image (Poisson mean)

    def __post_init__(self) -> None:
        if self.image_sd < 0:
            raise ValueError(f"image_sd must be >= 0, got {self.image_sd}")
        for name, known in (("band_logit", _BANDS), ("iou_beta", _BANDS), ("lighting_logit", LIGHTING_FLAGS)):
            keys = {p[0] for p in getattr(self, name)}
            if not keys <= set(known):
                raise ValueError(f"{name} has unknown groups {sorted(keys - set(known))}: use {', '.join(known)}")
        if not {p[0] for p in self.band_logit} >= set(_BANDS) or not {p[0] for p in self.iou_beta} >= set(_BANDS):
            raise ValueError(f"band_logit and iou_beta need every band: {', '.join(_BANDS)}")
        if not 0 <= self.duplicate_rate <= 1 or self.false_positives < 0:
            raise ValueError("duplicate_rate must be in [0, 1] and false_positives >= 0")

    def as_dict(self) -> dict:
        return {"band_logit": dict(self.band_logit), "lighting_logit": dict(self.lighting_logit),
                "image_sd": self.image_sd, "iou_beta": {k: [a, b] for k, a, b in self.iou_beta},
                "score_a": self.score_a, "score_b": self.score_b, "duplicate_rate": self.duplicate_rate,
                "false_positives": self.false_positives}


def found_logit(effects: PlantedEffects, persons: pd.DataFrame) -> np.ndarray:
    """eta [n]: the fixed part of the logit of being found (band + lighting flags)."""
    band = persons["mst_band"].astype(str).to_numpy()
    eta = pd.Series(band).map(dict(effects.band_logit)).fillna(dict(effects.band_logit)[UNKNOWN]).to_numpy(float)
    for flag, value in effects.lighting_logit:
        eta = eta + value * persons[f"lighting_{flag}"].to_numpy(dtype=bool, na_value=False)
    return eta


def iou_params(effects: PlantedEffects, persons: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Beta (a [n], b [n]) of each person's IoU quality, by band."""
    band = pd.Series(persons["mst_band"].astype(str).to_numpy())
    table = {k: (a, b) for k, a, b in effects.iou_beta}
    ab = np.array([table.get(x, table[UNKNOWN]) for x in band], dtype=float).reshape(-1, 2)
    return ab[:, 0], ab[:, 1]


def expected_found(eta: np.ndarray, image_sd: float) -> np.ndarray:
    """pi [n] = E[sigmoid(eta + image_sd * u)], u ~ N(0, 1), by Gauss-Hermite quadrature."""
    x, w = np.polynomial.hermite_e.hermegauss(_GH_NODES)  # weight exp(-x^2 / 2)
    w = w / w.sum()
    return special.expit(np.asarray(eta, float)[:, None] + image_sd * x[None, :]) @ w


def planted_truth(effects: PlantedEffects, persons: pd.DataFrame, thresholds: np.ndarray,
                  kept_threshold: float) -> dict:
    """``planted[metric][grouping][group]`` for ar, recall50, recall75 and threshold recall,
    plus ``planted[metric]["all"]["all"]``, over the evaluated persons given."""
    from index.groupings import membership  # the one registry of groupings

    pi = expected_found(found_logit(effects, persons), effects.image_sd)
    a, b = iou_params(effects, persons)
    sf = stats.beta.sf(np.asarray(thresholds)[None, :], a[:, None], b[:, None])  # [n, T]
    p_kept = stats.beta.sf(kept_threshold, effects.score_a, effects.score_b)
    per_person = {"ar": pi * sf.mean(axis=1), "recall50": pi * sf[:, 0], "recall75": pi * sf[:, 5],
                  "recall": pi * sf[:, 0] * p_kept}
    out: dict = {}
    for metric, value in per_person.items():
        out[metric] = {"all": {"all": float(value.mean()) if len(value) else None}}
        for by in PLANTED_GROUPINGS:
            labels, M = membership(persons, by)
            n = M.sum(axis=0)
            out[metric][by] = {lab: (float(value[M[:, g]].mean()) if n[g] else None) for g, lab in enumerate(labels)}
    return out


def scaled_boxes(gt: np.ndarray, iou: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """float32 [n, 4]: gt [n, 4] scaled about its centre to IoU ``iou`` with it, shrunk
    (s = sqrt(iou)) where ``inside`` else grown (s = 1 / sqrt(iou))."""
    s = np.where(inside, np.sqrt(iou), 1 / np.sqrt(iou))[:, None]
    centre, half = (gt[:, :2] + gt[:, 2:]) / 2, (gt[:, 2:] - gt[:, :2]) / 2
    return np.c_[centre - s * half, centre + s * half].astype(np.float32)
