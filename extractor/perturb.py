"""Photometric perturbations of dataset images, applied as a camera would (``--perturb SPEC``).

A SPEC is one or more steps separated by commas, applied in that order:

========================  ===================================================================
``darken:F``              sRGB values times F (0 <= F <= 1): the FACET embedding study's
                          darkness factor (1.0, 0.5, 0.1)
``exposure:EV``           in linear light: sRGB -> linear (the exact sRGB transfer function),
                          times 2^EV, back to sRGB (-10 <= EV <= 10); clips highlights
``gamma:G``               out = 255 (v / 255)^G (0 < G <= 10): G > 1 darkens the mid-tones
``blur:SIGMA``            Gaussian blur, SIGMA in pixels of the original image (0..100),
                          edges replicated, kernel cut at 4 sigma
``noise:SIGMA``           additive Gaussian noise, SIGMA in 0..255 units (0..255), per pixel
                          and channel (float32 draws of numpy's PCG64), seeded by the sha256
                          of the image's file name and the step's position (among the
                          steps that change pixels): a rerun, a resume or another batch
                          size gives the same pixels
``jpeg:Q``                re-encoded as JPEG at quality Q (1..100; PIL, 4:2:0) and decoded
``grayscale``             ITU-R BT.601 luma of the sRGB values, 0.299 R + 0.587 G + 0.114 B
                          (the JPEG / PIL luma), in all three channels
``none``                  the images as stored
========================  ===================================================================

Each step reads and writes 8-bit RGB at the decoded image's resolution, before the
DETR resize: its result is rounded to the nearest integer (halves up) and clipped to
0..255, as a camera writing a file would. With ``--draft`` the "original" is the
reduced-scale JPEG decode: pointwise steps are the same functions of the pixel values,
blur's sigma is scaled by the decode scale so it stays SIGMA pixels of the original, and
noise and jpeg (whose grain is per pixel) are refused with ``--draft``.

A ``sweep`` reads its SPEC differently (:func:`parse_sweep`): each comma item is one run,
and a bare value repeats the kind of the item before it (``darken:1.0,0.5,0.1`` = three
runs); ``+`` chains steps inside one run (``grayscale+darken:0.5``).
"""
from __future__ import annotations

import hashlib
import io
import math
import re
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image

# 601 luma weights (on gamma-encoded values, as JPEG's Y and PIL's convert("L")).
LUMA_601 = (0.299, 0.587, 0.114)
_CHAIN = re.compile(r"\+(?=[A-Za-z])")
# Decimal halves (5 x 0.1) land a hair below .5 in binary; this keeps them halves.
_HALF_UP_EPS = 1e-9


def quantize(x: np.ndarray) -> np.ndarray:
    """Float pixel values -> uint8: nearest integer, halves up, clipped to 0..255 (float32 stays float32)."""
    x = np.asarray(x)
    if x.dtype != np.float32:
        x = x.astype(np.float64)
    x = x + (0.5 + _HALF_UP_EPS)
    np.floor(x, out=x)
    np.clip(x, 0, 255, out=x)
    return x.astype(np.uint8)


def srgb_to_linear(v: np.ndarray) -> np.ndarray:
    """sRGB-encoded values in 0..1 -> linear light (IEC 61966-2-1)."""
    v = np.asarray(v, dtype=np.float64)
    return np.where(v <= 0.04045, v / 12.92, ((v + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(x: np.ndarray) -> np.ndarray:
    """Linear light in 0..1 -> sRGB-encoded values (IEC 61966-2-1)."""
    x = np.asarray(x, dtype=np.float64)
    return np.where(x <= 0.0031308, 12.92 * x, 1.055 * np.power(np.maximum(x, 0.0031308), 1 / 2.4) - 0.055)


@dataclass(frozen=True)
class _Kind:
    value: str                       # "" (no value), "float" or "int"
    lo: float
    hi: float
    lo_open: bool                    # lo itself not allowed
    usage: str                       # for the error line
    identity: float | None           # the value that leaves pixels unchanged
    per_pixel_grain: bool = False    # result depends on the pixel grid (refused with --draft)


KINDS: dict[str, _Kind] = {
    "darken": _Kind("float", 0.0, 1.0, False, "darken:F (0..1)", 1.0),
    "exposure": _Kind("float", -10.0, 10.0, False, "exposure:EV (-10..10)", 0.0),
    "gamma": _Kind("float", 0.0, 10.0, True, "gamma:G (0 < G <= 10)", 1.0),
    "blur": _Kind("float", 0.0, 100.0, False, "blur:SIGMA (pixels, 0..100)", 0.0),
    "noise": _Kind("float", 0.0, 255.0, False, "noise:SIGMA (0..255 units)", 0.0, per_pixel_grain=True),
    "jpeg": _Kind("int", 1, 100, False, "jpeg:Q (1..100)", None, per_pixel_grain=True),
    "grayscale": _Kind("", 0, 0, False, "grayscale", None),
}
VALID = ", ".join(k.usage for k in KINDS.values()) + ", none"


def _fmt(value: float | int | None) -> str:
    # repr: the shortest string that reads back as the same float, so distinct values stay distinct.
    return "" if value is None else (str(value) if isinstance(value, int) else repr(float(value)))


@dataclass(frozen=True)
class Step:
    """One perturbation step; ``value`` is None for ``grayscale``."""

    kind: str
    value: float | int | None = None

    @property
    def canonical(self) -> str:
        return self.kind if self.value is None else f"{self.kind}:{_fmt(self.value)}"

    @property
    def dirname(self) -> str:
        """Filesystem-safe: ``darken-0.5``, ``exposure-m1.0`` (m for minus), ``grayscale``."""
        return self.kind if self.value is None else f"{self.kind}-{_fmt(self.value).replace('-', 'm')}"

    @property
    def is_identity(self) -> bool:
        ident = KINDS[self.kind].identity
        return ident is not None and self.value == ident

    @property
    def words(self) -> str:
        v = _fmt(self.value)
        return {
            "darken": f"sRGB values times {v}",
            "exposure": f"exposure {'+' if self.value and self.value > 0 else ''}{v} EV in linear light",
            "gamma": f"gamma {v} (255·(v/255)^{v})",
            "blur": f"Gaussian blur, sigma {v} px of the original image",
            "noise": f"Gaussian noise, sigma {v} of 255, seeded per image",
            "jpeg": f"JPEG re-encoded at quality {v}",
            "grayscale": "grayscale (BT.601 luma)",
        }[self.kind]


@dataclass(frozen=True)
class Perturbation:
    """Steps applied in order; ``Perturbation()`` is none. Frozen and hashable."""

    steps: tuple[Step, ...] = ()

    def __str__(self) -> str:
        return self.canonical

    @property
    def canonical(self) -> str:
        """The spec read back from its parts: ``darken:0.5,jpeg:75``; ``none`` when empty."""
        return ",".join(s.canonical for s in self.steps) or "none"

    @property
    def dirname(self) -> str:
        return "+".join(s.dirname for s in self.steps) or "none"

    @property
    def words(self) -> str:
        if not self.steps:
            return "none: the images as stored"
        if self.is_identity:
            return ", then ".join(s.words for s in self.steps) + ": changes no pixel, the images as stored"
        return ", then ".join(s.words for s in self.steps) + " (at the original resolution, before the resize)"

    @property
    def effective(self) -> "Perturbation":
        """Without the steps that change no pixel (``darken:1.0``): what decides the run's content."""
        return Perturbation(tuple(s for s in self.steps if not s.is_identity))

    @property
    def is_identity(self) -> bool:
        return not self.effective.steps

    @property
    def per_pixel_grain(self) -> bool:
        """True when a step depends on the pixel grid (noise, jpeg): not defined at a draft scale."""
        return any(KINDS[s.kind].per_pixel_grain for s in self.effective.steps)

    def to_manifest(self, draft: bool = False) -> dict:
        return {
            "spec": self.canonical,
            "words": self.words,
            "steps": [{"kind": s.kind, "value": s.value} for s in self.steps],
            "applied_to": "the reduced-scale JPEG decode (--draft), blur sigma scaled to it" if draft
            else "each image at its original resolution, before the resize",
            "rounding": "8-bit after each step: nearest integer, halves up, clipped to 0..255",
        } | ({"noise_seed": "sha256 of the image file name, and the step's position among the steps that change "
                             "pixels"} if any(s.kind == "noise" for s in self.effective.steps) else {})

    def apply(self, rgb: np.ndarray, *, key: str | None = None, scale: float = 1.0) -> np.ndarray:
        """The perturbed image. rgb: uint8 [H, W, 3] -> uint8 [H, W, 3] (a new array).

        key: the stable per-image string that seeds noise (the file name); scale: decoded
        size / original size (below 1 only for a draft decode), which blur's sigma follows.
        """
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"perturbations take uint8 [H, W, 3] images, got {rgb.dtype} {rgb.shape}")
        out = rgb
        # Positions count the steps that change pixels: darken:1.0,noise:4 is noise:4, as its fingerprint says.
        for position, step in enumerate(self.effective.steps):
            if step.kind == "noise":
                if key is None:
                    raise ValueError("noise needs a per-image key (the file name) to seed it")
                out = add_noise(out, float(step.value), noise_seed(key, position))
            else:
                out = _APPLY[step.kind](out, step.value, scale)
        return rgb.copy() if out is rgb else out


def _lut(fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    """A pointwise 0..255 -> float function as a 256-entry table (exact: inputs are 8-bit)."""
    table = quantize(fn(np.arange(256, dtype=np.float64)))
    return lambda img: table[img]


def darken(img: np.ndarray, factor: float, scale: float = 1.0) -> np.ndarray:
    return _lut(lambda v: v * factor)(img)


def exposure(img: np.ndarray, ev: float, scale: float = 1.0) -> np.ndarray:
    gain = 2.0 ** ev
    return _lut(lambda v: 255.0 * linear_to_srgb(np.clip(srgb_to_linear(v / 255.0) * gain, 0.0, 1.0)))(img)


def gamma(img: np.ndarray, g: float, scale: float = 1.0) -> np.ndarray:
    return _lut(lambda v: 255.0 * (v / 255.0) ** g)(img)


def blur(img: np.ndarray, sigma: float, scale: float = 1.0) -> np.ndarray:
    from scipy import ndimage  # here, not at the top: its import cost ~0.45 s of every extraction's start

    s = sigma * scale
    # float64: the rounding to 8 bits then agrees with an exact convolution.
    return quantize(ndimage.gaussian_filter(img.astype(np.float64), sigma=(s, s, 0), mode="nearest", truncate=4.0))


def jpeg(img: np.ndarray, quality: int, scale: float = 1.0) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(img, "RGB").save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    with Image.open(buf) as decoded:
        return np.array(decoded.convert("RGB"), dtype=np.uint8)


def grayscale(img: np.ndarray, value=None, scale: float = 1.0) -> np.ndarray:
    y = quantize(img.astype(np.float64) @ np.asarray(LUMA_601))
    return np.repeat(y[:, :, None], 3, axis=2)


def noise_seed(key: str, position: int) -> np.random.SeedSequence:
    """A seed that depends only on the image's key and the step's place in the chain."""
    digest = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "little")
    return np.random.SeedSequence([digest, position])


def add_noise(img: np.ndarray, sigma: float, seed: np.random.SeedSequence) -> np.ndarray:
    """img + N(0, sigma) per pixel and channel, in float32 (twice as fast; 8-bit output either way)."""
    z = np.random.default_rng(seed).standard_normal(img.shape, dtype=np.float32)
    z *= np.float32(sigma)
    z += img
    return quantize(z)


_APPLY = {"darken": darken, "exposure": exposure, "gamma": gamma, "blur": blur, "jpeg": jpeg,
          "grayscale": grayscale}


# ------------------------------------------------------------------ parsing
RUN_HINT = "several apply in order, comma-separated, e.g. darken:0.5,jpeg:75"
SWEEP_HINT = "one run per comma item, a bare value repeats the kind before it, + chains, e.g. darken:1.0,0.5,0.1"


def _bad(spec: str, why: str, hint: str = RUN_HINT) -> ValueError:
    return ValueError(f"bad perturbation {spec!r}: {why}; valid: {VALID} ({hint})")


def parse_step(text: str, spec: str | None = None, hint: str = RUN_HINT) -> Step:
    spec = text if spec is None else spec
    name, sep, raw = text.strip().partition(":")
    name, raw = name.strip().lower(), raw.strip()
    kind = KINDS.get(name)
    if kind is None:
        raise _bad(spec, f"unknown kind {name!r}" if name else "an empty step", hint)
    if not kind.value:
        if sep:
            raise _bad(spec, f"{name} takes no value", hint)
        return Step(name)
    if not raw:
        raise _bad(spec, f"{name} needs a value", hint)
    try:
        value: float | int = int(raw) if kind.value == "int" else float(raw)
    except ValueError:
        raise _bad(spec, f"{name} value {raw!r} is not {'an integer' if kind.value == 'int' else 'a number'}",
                   hint) \
            from None
    if not math.isfinite(value) or value < kind.lo or value > kind.hi or (kind.lo_open and value == kind.lo):
        raise _bad(spec, f"{name} value {raw} is out of range", hint)
    return Step(name, value)


def parse_perturbation(spec: str | Perturbation | None, *, _sweep: str | None = None) -> Perturbation:
    """``--perturb`` of a run: comma-separated steps applied in order (``none`` or empty: none)."""
    if isinstance(spec, Perturbation):
        return spec
    if spec is None or spec.strip().lower() in ("", "none"):
        return Perturbation()
    whole, hint = (spec, RUN_HINT) if _sweep is None else (_sweep, SWEEP_HINT)
    items = spec.split(",")
    if any(t.strip().lower() == "none" for t in items):
        raise _bad(whole, "'none' cannot be combined with other steps", hint)
    return Perturbation(tuple(parse_step(t, whole, hint) for t in items))


def parse_sweep(spec: str) -> tuple[Perturbation, ...]:
    """``--perturb`` of a sweep: one run per comma item; a bare value repeats the kind before it.

    ``darken:1.0,0.5,0.1`` -> three runs; ``none,darken:0.5,exposure:-1,-2`` -> four;
    ``grayscale+darken:0.5`` -> one run of two steps (a bare value cannot follow a chain).
    """
    out: list[Perturbation] = []
    previous: str | None = None
    for item in spec.split(","):
        text = item.strip()
        if not text:
            raise _bad(spec, "an empty item", SWEEP_HINT)
        if text[0].isdigit() or text[0] in "+-.":
            if previous is None:
                raise _bad(spec, f"the bare value {text!r} follows no single 'kind:value' item", SWEEP_HINT)
            text = f"{previous}:{text}"
        # '+' before a letter chains steps; after ':' it is a sign (exposure:+1).
        p = parse_perturbation(",".join(_CHAIN.split(text)), _sweep=spec)
        single = len(p.steps) == 1 and p.steps[0].value is not None
        previous = p.steps[0].kind if single else None
        out.append(p)
    names = [p.dirname for p in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise _bad(spec, f"the sweep names {', '.join(dupes)} more than once", SWEEP_HINT)
    return tuple(out)
