"""Per-row features from every depth of DETR (``extractor run --features ...``).

For each kept row (det_id) besides the final query embedding:

- ``decoder``: ``decoder_layers.npy`` float32 [N, 6, 256], the row's query after every
  decoder layer and the decoder's final LayerNorm (row[:, -1] equals ``embeddings.npy``);
- ``encoder``: ``encoder_roi.npy`` float32 [N, 256], the last encoder layer's memory pooled
  over the row's box;
- ``backbone``: ``backbone_roi.npy`` float16 [N, 2048], ResNet layer4 pooled over the row's box
  (float16 halves 8 KB a row; post-ReLU activations lose ~1e-3 relative, far below what any
  read-out resolves).

Pooling rule (:func:`pool_boxes`), for one image and its feature map [C, h, w]:

1. the row's predicted box (cx, cy, w, h, normalised to the unpadded image) in pixels of the
   model input (the resized image, W_in x H_in), clipped to [0, W_in] x [0, H_in];
2. the feature map cut to the image's unpadded cells (``feature_mask`` False: the top-left
   h_v x w_v block), so padding never enters, whatever the batch;
3. ``torchvision.ops.roi_align(output_size=7, spatial_scale=1/stride, sampling_ratio=2,
   aligned=True)``: 7 x 7 bins over the box, each the mean of 2 x 2 bilinear samples at
   cell coordinates x / stride - 0.5 (cell j's centre is at j); a sample past the last
   unpadded cell centre takes that border cell's value;
4. the mean of the 49 bins.
"""
from __future__ import annotations

import numpy as np
import torch

from . import rundir

FEATURE_CHOICES = ("query", "decoder", "encoder", "backbone")
N_DECODER_LAYERS = 6
ROI_OUTPUT = 7
ROI_SAMPLES = 2
POOLING_RULE = ("predicted box in model-input pixels clipped to the unpadded image; feature map cut to its "
                "unpadded cells; torchvision roi_align output 7x7, spatial_scale 1/stride, sampling_ratio 2, "
                "aligned=True; mean of the 49 bins")
# What each --features choice adds: file -> (model output key, numpy dtype).
_FILES = {
    "decoder": (rundir.DECODER_LAYERS, "decoder_layers", np.float32),
    "encoder": (rundir.ENCODER_ROI, "encoder_memory", np.float32),
    "backbone": (rundir.BACKBONE_ROI, "backbone_features", np.float16),
}


def parse_features(value: str | tuple[str, ...] | list[str] | None) -> tuple[str, ...]:
    """``"query,decoder"`` -> ``("query", "decoder")`` in the canonical order; query is always in."""
    if value is None:
        return ("query",)
    items = [v.strip() for v in value.split(",")] if isinstance(value, str) else [str(v).strip() for v in value]
    items = [v for v in items if v]
    unknown = sorted(set(items) - set(FEATURE_CHOICES))
    if unknown:
        raise ValueError(f"unknown --features {', '.join(unknown)}: choose from {', '.join(FEATURE_CHOICES)} "
                         f"(comma-separated)")
    return tuple(c for c in FEATURE_CHOICES if c in items or c == "query")


def feature_spaces(features: tuple[str, ...]) -> list[str]:
    """The index spaces (index/spaces.py) a run with these ``features`` has (``query`` first)."""
    out = ["query"]
    if "decoder" in features:
        out += [f"decoder_{i}" for i in range(1, N_DECODER_LAYERS + 1)]
    return out + [name for f, name in (("encoder", "encoder_roi"), ("backbone", "backbone_roi")) if f in features]


def feature_files(features: tuple[str, ...]) -> list[str]:
    return [_FILES[f][0] for f in features if f in _FILES]


def feature_dtype(file: str) -> np.dtype:
    return np.dtype(next(dt for name, _, dt in _FILES.values() if name == file))


def feature_shape(file: str, dim: int = 256) -> tuple[int, ...]:
    """Per-row shape of a feature file."""
    return {rundir.DECODER_LAYERS: (N_DECODER_LAYERS, dim), rundir.ENCODER_ROI: (dim,),
            rundir.BACKBONE_ROI: (2048,)}[file]


def pool_boxes(fmap: torch.Tensor, valid_hw: tuple[int, int], boxes: np.ndarray, stride: int) -> torch.Tensor:
    """Mean of the 7 x 7 RoIAlign of each box over the unpadded cells (module doc's rule).

    fmap [C, h, w]; valid_hw (h_v, w_v) unpadded cells; boxes [K, 4] x1, y1, x2, y2 in
    model-input pixels, already clipped to the unpadded image -> [K, C] float32.
    """
    hv, wv = int(valid_hw[0]), int(valid_hw[1])
    if hv < 1 or wv < 1:
        raise ValueError(f"an image needs at least one unpadded feature cell, got {hv} x {wv}")
    if len(boxes) == 0:
        return torch.zeros((0, fmap.shape[0]), dtype=torch.float32)
    crop = fmap[None, :, :hv, :wv].float().contiguous()
    rois = torch.cat([torch.zeros(len(boxes), 1), torch.as_tensor(boxes, dtype=torch.float32)], dim=1)
    from torchvision.ops import roi_align  # only runs with --features: keeps torchvision out of a plain start
    pooled = roi_align(crop, rois.to(crop.device), output_size=ROI_OUTPUT, spatial_scale=1.0 / stride,
                       sampling_ratio=ROI_SAMPLES, aligned=True)
    return pooled.mean(dim=(2, 3))


def row_features(out: dict[str, torch.Tensor], b: int, query_idx: np.ndarray, input_wh: tuple[int, int],
                 stride: int, features: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The feature files' rows for image ``b`` of a ``return_features`` forward.

    query_idx [K] the image's kept queries (row order); input_wh the unpadded model-input size.
    """
    q = torch.as_tensor(np.asarray(query_idx, dtype=np.int64))
    rows: dict[str, np.ndarray] = {}
    if "decoder" in features:
        rows[rundir.DECODER_LAYERS] = out["decoder_layers"][b][:, q].transpose(0, 1).numpy().astype(np.float32)
    pooled = [f for f in ("encoder", "backbone") if f in features]
    if not pooled:
        return rows
    pad = out["feature_mask"][b]
    h, w = pad.shape
    valid = (int((~pad[:, 0]).sum()), int((~pad[0, :]).sum()))
    W, H = input_wh
    cx, cy, bw, bh = out["pred_boxes"][b][q].double().unbind(-1)
    boxes = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], dim=-1) * torch.tensor(
        [W, H, W, H], dtype=torch.float64)
    boxes = torch.minimum(boxes.clamp(min=0), torch.tensor([W, H, W, H], dtype=torch.float64)).numpy()
    for f in pooled:
        file, key, dtype = _FILES[f]
        fmap = out[key][b]
        if key == "encoder_memory":  # [h*w, D] row-major -> [D, h, w]
            fmap = fmap.transpose(0, 1).reshape(-1, h, w)
        rows[file] = pool_boxes(fmap, valid, boxes, stride).numpy().astype(dtype)
    return rows
