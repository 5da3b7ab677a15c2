"""Photos a user brings: decoding with one-line errors, and attention-map geometry.

DETR's attention maps live on the backbone's feature grid (stride 32 of the resized
input). The input is the photo resized without padding, so a feature cell maps back
to the photo by plain scaling.
"""
from __future__ import annotations

import hashlib
import io
import logging
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from extractor.preprocess import MAX_PIXELS, open_image, target_size

log = logging.getLogger(__name__)

MAX_UPLOAD_MB = 25
MAX_UPLOAD_BYTES = MAX_UPLOAD_MB * 1024 * 1024
# What the uploader offers. MIME types as well as extensions: with MIME types
# Streamlit leaves the check to the browser, so a mislabelled file reaches
# ``decode_photo`` and gets its one-line message instead of a Streamlit exception.
UPLOAD_TYPES = ["image/jpeg", "image/png", "image/webp", ".jpg", ".jpeg", ".png", ".webp"]
# Displayed photos are downscaled to this longer side; the model sees its own resize.
DISPLAY_MAX_SIDE = 1024
# The backbone's stride: a resized side shorter than this leaves no feature cell.
MIN_MODEL_SIDE = 32


class PhotoError(ValueError):
    """A photo that cannot be used; the message is one line meant for the user."""


def digest(data: bytes) -> str:
    """Content hash of an upload: the cache key of its detections."""
    return hashlib.sha256(data).hexdigest()


def decode_photo(data: bytes, name: str = "the file") -> Image.Image:
    """8-bit RGB with EXIF orientation applied, or ``PhotoError`` with a one-line reason.

    RGBA/LA/P are composited on white, greyscale and CMYK converted, 16-bit and float
    rescaled from their own range (``extractor.preprocess.to_rgb``).
    """
    if not data:
        raise PhotoError(f"{name} is empty (0 bytes): choose a JPEG, PNG or WebP photo")
    if len(data) > MAX_UPLOAD_BYTES:
        raise PhotoError(f"{name} is {len(data) / 2**20:.1f} MB; the limit is {MAX_UPLOAD_MB} MB")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # e.g. corrupt EXIF: the pixels are still fine
            img = open_image(io.BytesIO(data), exif_transpose=True)
    except UnidentifiedImageError:
        raise PhotoError(f"{name} is not an image this app can read: upload a JPEG, PNG or WebP photo") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise PhotoError(f"{name} is too large to decode safely ({_first_line(exc)}); "
                         f"the limit is {MAX_PIXELS:,} pixels") from None
    except ValueError as exc:  # extractor's own pixel limit, bad modes
        raise PhotoError(f"{name} cannot be used: {_first_line(exc)}") from None
    except Exception as exc:  # truncated or damaged files raise OSError, SyntaxError, struct.error, ...
        log.info("decoding %s failed: %r", name, exc)
        raise PhotoError(f"{name} is damaged or truncated and cannot be decoded ({type(exc).__name__})") from None
    if img.width < 2 or img.height < 2:
        raise PhotoError(f"{name} is {img.width}x{img.height} pixels: too small to hold a person")
    return img


def check_model_size(size: tuple[int, int], min_size: int, max_size: int | None, name: str = "the photo") -> None:
    """``PhotoError`` when DETR's resize would leave a side too short to detect anything
    (a panorama strip: the longer side is capped, the shorter one shrinks with it)."""
    try:
        ow, oh = target_size(size[0], size[1], min_size, max_size)
    except ValueError:
        ow = oh = 0
    if min(ow, oh) < MIN_MODEL_SIDE:
        raise PhotoError(f"{name} is {size[0]}x{size[1]} pixels: too elongated, DETR's resize to at most "
                         f"{max_size} px would make it {ow}x{oh}; crop it closer to the person")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def display_image(img: Image.Image, max_side: int = DISPLAY_MAX_SIDE) -> tuple[Image.Image, float]:
    """The photo as shown (longer side at most ``max_side``) and its scale to the original."""
    scale = min(1.0, max_side / max(img.size))
    if scale >= 1.0:
        return img, 1.0
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    return img.resize(size, Image.BILINEAR), scale


def cell_centres(feature_size: tuple[int, int], photo_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """x, y [h*w] of each feature cell's centre in photo pixels, row-major like the maps."""
    h, w = feature_size
    pw, ph = photo_size
    xs = (np.arange(w) + 0.5) * (pw / w)
    ys = (np.arange(h) + 0.5) * (ph / h)
    gx, gy = np.meshgrid(xs, ys)
    return gx.ravel(), gy.ravel()


def cell_at(x: float, y: float, feature_size: tuple[int, int], photo_size: tuple[int, int]) -> int:
    """Row-major index of the feature cell holding photo pixel (x, y), clipped to the grid."""
    h, w = feature_size
    pw, ph = photo_size
    col = int(np.clip(np.floor(x / pw * w), 0, w - 1))
    row = int(np.clip(np.floor(y / ph * h), 0, h - 1))
    return row * w + col


def encoder_map(encoder_attention: np.ndarray, cell: int, feature_size: tuple[int, int]) -> np.ndarray:
    """Where the encoder cell ``cell`` attends: its attention row as an [h, w] map."""
    h, w = feature_size
    if not 0 <= cell < h * w:
        raise ValueError(f"cell {cell} is outside the {h}x{w} feature grid")
    return np.asarray(encoder_attention[cell], dtype=np.float32).reshape(h, w)


def normalise_map(att: np.ndarray) -> np.ndarray:
    """Scaled to 0..1 by its own maximum, so weak and strong maps are equally readable."""
    att = np.nan_to_num(np.asarray(att, dtype=np.float32))
    top = float(att.max()) if att.size else 0.0
    return att / top if top > 0 else np.zeros_like(att)
