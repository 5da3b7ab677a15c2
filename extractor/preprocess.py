"""Image decoding and the official DETR evaluation preprocessing.

Official eval: RGB, resize so the shorter side is ``min_size`` unless the longer side
would exceed ``max_size`` (then the longer side is ``max_size``), PIL bilinear, ImageNet
mean/std; a batch is zero-padded bottom/right and a bool mask marks the padding.

Batches are built channels-last (N, H, W, C memory) because that is what the CPU
convolutions want; the tensor is still indexed as [B, 3, H, W].
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from .perturb import Perturbation

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Decompression-bomb guard for photos users upload (FACET images are ~3 MP).
MAX_PIXELS = 80_000_000


def target_size(width: int, height: int, min_size: int = 800, max_size: int | None = 1333) -> tuple[int, int]:
    """(out_width, out_height) of the official DETR resize for an image of this size."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    size = min_size
    short, long = float(min(width, height)), float(max(width, height))
    if max_size is not None and long / short * size > max_size:
        size = int(round(max_size * short / long))
    if (width <= height and width == size) or (height <= width and height == size):
        return width, height
    out = (size, int(size * height / width)) if width < height else (int(size * width / height), size)
    if min(out) < 1:
        raise ValueError(f"a {width}x{height} image is too elongated: resized for DETR it would be "
                         f"{out[0]}x{out[1]} pixels")
    return out


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode (L, LA, P, RGBA, CMYK, I;16, I, F) as 8-bit RGB.

    16-bit and float images are rescaled from their own range, since PIL's convert
    would clip them to 0..255 and give a white picture.
    """
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        scaled = np.zeros_like(arr) if hi <= lo else (arr - lo) / (hi - lo) * 255.0
        return Image.fromarray(np.nan_to_num(scaled).astype(np.uint8), "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Composite on white: a transparent background shown as black would be a false scene.
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return img.convert("RGB")


def open_image(path, *, exif_transpose: bool = False) -> Image.Image:
    """Decode an image file (path or binary file object) as 8-bit RGB.

    Refuses decompression bombs; with ``exif_transpose`` the EXIF orientation is
    applied (uploaded phone photos). Dataset images are read as stored, like the
    official evaluation, because their boxes were annotated on the stored pixels.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            _check_pixels(img)
            if exif_transpose:
                img = ImageOps.exif_transpose(img)
            img.load()
            return to_rgb(img)


def _check_pixels(img: Image.Image) -> None:
    if img.width * img.height > MAX_PIXELS:
        raise ValueError(f"{img.width}x{img.height} pixels is over the {MAX_PIXELS:,} pixel limit")


def resize_image(img: Image.Image, min_size: int, max_size: int | None) -> Image.Image:
    """The official eval resize (PIL bilinear, which antialiases when shrinking)."""
    ow, oh = target_size(img.width, img.height, min_size, max_size)
    if (ow, oh) == img.size:
        return img
    return img.resize((ow, oh), Image.BILINEAR)


@dataclass(frozen=True)
class Prepared:
    """One decoded, resized image: pixels HWC uint8 and the original size."""
    pixels: np.ndarray          # [h, w, 3] uint8, the resized image
    orig_size: tuple[int, int]  # (width, height) of the decoded original


def prepare_image(img: Image.Image, min_size: int, max_size: int | None,
                  orig_size: tuple[int, int] | None = None) -> Prepared:
    """Resize a decoded RGB image; ``orig_size`` overrides its size (draft decoding)."""
    size = orig_size or img.size
    ow, oh = target_size(size[0], size[1], min_size, max_size)
    if (ow, oh) != img.size:
        img = img.resize((ow, oh), Image.BILINEAR)
    # A writable copy: torch refuses to wrap the read-only buffer PIL exposes.
    return Prepared(np.array(img, dtype=np.uint8), (int(size[0]), int(size[1])))


def load_prepared(path: Path | str, min_size: int, max_size: int | None, *, draft: bool = True,
                  perturbation: Perturbation | None = None, key: str | None = None) -> Prepared:
    """Decode + (perturb) + resize one dataset file.

    With ``draft`` a JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8) that is
    still at least the target size: several times cheaper than a full decode followed
    by a large downscale, and only used when it does not upsample.
    A ``perturbation`` is applied to the decoded 8-bit RGB image before the resize (to
    the draft decode with ``draft``, blur sigma scaled to it); ``key`` seeds its noise.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            _check_pixels(img)
            orig = img.size
            if draft and img.format == "JPEG":
                img.draft("RGB", target_size(orig[0], orig[1], min_size, max_size))
            img.load()
            rgb = to_rgb(img)
    if perturbation is not None and not perturbation.is_identity:
        pixels = perturbation.apply(np.asarray(rgb), key=key, scale=rgb.width / orig[0])
        rgb = Image.fromarray(pixels, "RGB")
    return prepare_image(rgb, min_size, max_size, orig_size=orig)


def collate(images: list[np.ndarray], *, channels_last: bool = True,
            device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Normalise and zero-pad a list of HWC uint8 images into a batch on ``device``.

    Returns pixel_values float32 [B, 3, H, W] (channels-last memory when asked) and
    pixel_mask bool [B, H, W], True on padding. Padding is zero *after*
    normalisation, as in the official NestedTensor. On a GPU the uint8 batch is sent and
    normalised there: a quarter of the bytes over the bus and no per-pixel float work on the
    thread that feeds the GPU; the same float32 operations give the same values.
    """
    batch, mask = pad_uint8(images, pinned=device.startswith("cuda"))
    if device != "cpu":
        batch, mask = batch.to(device, non_blocking=True), mask.to(device, non_blocking=True)
    return normalise(batch, mask, channels_last=channels_last), mask


def pad_uint8(images: list[np.ndarray], *, pinned: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [B, H, W, 3] zero-padded bottom/right to the largest image, and the bool [B, H, W]
    padding mask. ``pinned``: page-locked memory, so the copy to a GPU is asynchronous."""
    if not images:
        raise ValueError("cannot collate an empty batch")
    H = max(im.shape[0] for im in images)
    W = max(im.shape[1] for im in images)
    B = len(images)
    batch = torch.zeros(B, H, W, 3, dtype=torch.uint8, pin_memory=pinned)
    mask = torch.ones(B, H, W, dtype=torch.bool, pin_memory=pinned)
    for i, im in enumerate(images):
        h, w = im.shape[:2]
        batch[i, :h, :w] = torch.from_numpy(im)
        mask[i, :h, :w] = False
    return batch, mask


def normalise(batch: torch.Tensor, mask: torch.Tensor, *, channels_last: bool = True) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float32 [B, 3, H, W], ImageNet-normalised, zero where ``mask``."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=batch.device) * 255.0
    inv_std = 1.0 / (torch.tensor(IMAGENET_STD, dtype=torch.float32, device=batch.device) * 255.0)
    x = batch.float().sub_(mean).mul_(inv_std).masked_fill_(mask[..., None], 0.0)
    pixel_values = x.permute(0, 3, 1, 2)
    return pixel_values if channels_last else pixel_values.contiguous()
