"""Running DETR: device and precision choice, one forward, the single-photo detector.

The extraction pipeline and the app share these, so a photo queried in the app goes
through the same preprocessing, precision and post-processing as the run it searches.
"""
from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .fastpath import optimise_for_inference
from .features import row_features
from .matching import cxcywh_to_xyxy_pixels, person_probability
from .precisions import PRECISIONS
from .preprocess import collate, prepare_image, to_rgb

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True where the CPU multiplies bf16 in hardware (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


def resolve_device(device: str, check: bool = True) -> str:
    """``auto`` -> ``cuda`` when a GPU is usable, else ``cpu``.

    check=False: the device is used elsewhere (a Ray cluster's actors), so this machine's own
    GPUs are not asked about (``auto`` must then have been made concrete already)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if check and device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device} asked for, but no CUDA GPU is usable here; use --device cpu")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise ValueError(f"unknown device {device!r}: use auto, cpu or cuda")
    return device


def resolve_precision(precision: str, device: str) -> str:
    """``auto``: float32 on the CPU, TF32 on an Ampere-or-newer GPU (strict float32 before it).

    Not bf16 on a GPU: bf16 autocast moved the query embeddings to cosine 0.990 of float32 and
    flipped kept detections up to 0.19 from the threshold, TF32 to >= 0.9993 and flips within
    0.01 (``bench/precision_proxy.py``, which reproduces both roundings on the CPU); the issue's
    bar is cosine 0.999. On the CPU float32 with the fused path of :mod:`extractor.fastpath`
    keeps the official numbers; bf16 stays available, with its measured cost in the README.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    cuda = device.startswith("cuda")
    if precision != "auto":
        if precision in ("fp16", "tf32") and not cuda:
            raise ValueError(f"{precision} is for CUDA GPUs; on the CPU use fp32 (or bf16)")
        return precision
    if cuda:
        return "tf32" if has_tf32(device) else "fp32"
    return "fp32"


def has_tf32(device: str) -> bool:
    """True where the GPU has TF32 tensor cores (compute capability 8.0, Ampere, or newer)."""
    return torch.cuda.get_device_capability(torch.device(device))[0] >= 8


@contextlib.contextmanager
def precision_context(device: str, precision: str):
    """The arithmetic of ``precision`` for the forwards run inside: autocast for bf16 / fp16;
    on a GPU, TF32 on for ``tf32`` and off otherwise. The process's TF32 flags are restored on exit
    (PyTorch's own default has cuDNN convolutions in TF32, which "fp32" must not inherit)."""
    if not device.startswith("cuda"):
        with autocast(device, precision):
            yield
        return
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    before = (matmul.allow_tf32, cudnn.allow_tf32)
    matmul.allow_tf32 = cudnn.allow_tf32 = precision == "tf32"
    try:
        with autocast(device, precision):
            yield
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = before


def autocast(device: str, precision: str):
    if precision in ("fp32", "tf32"):
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=dtype)


def forward(model: torch.nn.Module, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None,
            device: str, precision: str, return_attention: bool = False,
            return_features: bool = False) -> dict[str, torch.Tensor]:
    """One batch through DETR; every float output comes back float32 on the CPU (masks stay bool)."""
    return fetch(launch(model, pixel_values, pixel_mask, device, precision, return_attention, return_features))


@dataclass(frozen=True)
class Launched:
    """A batch given to the model. ``outputs`` are on the CPU; on a GPU they are valid only once
    ``ready`` has fired (:func:`fetch` waits for it)."""
    outputs: dict[str, torch.Tensor]
    ready: "torch.cuda.Event | None" = None


def launch(model: torch.nn.Module, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None,
           device: str, precision: str, return_attention: bool = False,
           return_features: bool = False) -> Launched:
    """Run one batch; on a GPU, return as soon as its kernels and the copies of its outputs back
    to the CPU are queued, so the caller can post-process the previous batch meanwhile."""
    with torch.inference_mode(), precision_context(device, precision):
        out = model(pixel_values.to(device, non_blocking=True),
                    None if pixel_mask is None else pixel_mask.to(device, non_blocking=True),
                    return_attention=return_attention, return_features=return_features)
        if not device.startswith("cuda"):
            return Launched(out)
        # Queued now, behind this batch's kernels and ahead of the next batch's: a .cpu() made later
        # would also wait for every kernel queued in between. The copies land in pinned memory.
        host = {k: (v.float() if v.is_floating_point() else v).to("cpu", non_blocking=True) for k, v in out.items()}
        ready = torch.cuda.Event()
        ready.record()
    return Launched(host, ready)


def fetch(launched: Launched) -> dict[str, torch.Tensor]:
    """:func:`launch`'s outputs as float32 (masks stay bool) CPU tensors, once the device is done."""
    if launched.ready is not None:
        launched.ready.synchronize()
    return {k: (v.float() if v.is_floating_point() else v).cpu() for k, v in launched.outputs.items()}


@dataclass(frozen=True)
class PhotoDetections:
    """All queries of one photo, best person probability first is NOT implied: row q = query q."""
    scores: np.ndarray            # [Q] person probability
    boxes: np.ndarray             # [Q, 4] x1, y1, x2, y2 in pixels of the photo
    embeddings: np.ndarray        # [Q, 256] float32
    size: tuple[int, int]         # (width, height) of the photo
    input_size: tuple[int, int]   # (width, height) the model saw
    decoder_attention: np.ndarray | None = None   # [Q, h, w]
    encoder_attention: np.ndarray | None = None   # [h*w, h*w]
    # Run-format feature file -> [Q, ...] for every query, exactly as the extractor writes a
    # row (features.row_features): decoder_layers.npy [Q, 6, 256], encoder_roi.npy [Q, 256], ...
    features: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def feature_size(self) -> tuple[int, int] | None:
        """(h, w) of the backbone feature grid the attention maps live on."""
        return None if self.decoder_attention is None else tuple(self.decoder_attention.shape[1:])

    def ranked(self, threshold: float, fallback: int = 5) -> np.ndarray:
        """Query indices at or above threshold, best first; if none pass, the
        ``fallback`` queries with the highest person probability (so a photo always
        leads somewhere, untrained weights included)."""
        order = np.argsort(-self.scores, kind="stable")
        passing = order[self.scores[order] >= threshold]
        return passing if len(passing) else order[:fallback]


class Detector:
    """DETR with a run's checkpoint and preprocessing, for single photos (the app)."""

    def __init__(self, model: torch.nn.Module, *, min_size: int = 800, max_size: int | None = 1333,
                 device: str = "auto", precision: str = "auto"):
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.model = optimise_for_inference(model, self.device, self.precision)
        self.min_size, self.max_size = min_size, max_size

    def detect(self, img: Image.Image, return_attention: bool = True,
               features: tuple[str, ...] = ()) -> PhotoDetections:
        """All queries of one photo; ``features`` (``--features`` names: decoder, encoder,
        backbone) adds every query's rows of those files, pooled by the extractor's own rule."""
        img = to_rgb(img)
        prepared = prepare_image(img, self.min_size, self.max_size)
        pixel_values, _ = collate([prepared.pixels], device=self.device)
        extra = tuple(f for f in features if f != "query")
        out = forward(self.model, pixel_values, None, self.device, self.precision, return_attention,
                      return_features=bool(extra))
        input_wh = (prepared.pixels.shape[1], prepared.pixels.shape[0])
        rows = (row_features(out, 0, np.arange(out["pred_boxes"].shape[1]), input_wh, self.model.stride, extra)
                if extra else {})
        w, h = prepared.orig_size
        dec = out.get("decoder_attention")
        enc = out.get("encoder_attention")
        return PhotoDetections(
            scores=person_probability(out["pred_logits"][0]).numpy(),
            boxes=cxcywh_to_xyxy_pixels(out["pred_boxes"][0].numpy(), w, h).astype(np.float32),
            embeddings=out["query_embeddings"][0].numpy().astype(np.float32),
            size=(w, h),
            input_size=input_wh,
            decoder_attention=None if dec is None else dec[0].numpy(),
            encoder_attention=None if enc is None else enc[0].numpy(),
            features=rows,
        )
