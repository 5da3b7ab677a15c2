"""Upload decoding (every format and failure a user can bring) and attention-map geometry."""
from __future__ import annotations

import io
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from ui import photos  # noqa: E402


def _bytes(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _marked(w: int = 60, h: int = 40) -> Image.Image:
    """Grey image with a red square in the top-left corner, to follow rotations."""
    arr = np.full((h, w, 3), 128, np.uint8)
    arr[:10, :10] = (255, 0, 0)
    return Image.fromarray(arr)


def test_png_and_webp_decode_to_rgb():
    for fmt in ("PNG", "WEBP"):
        img = photos.decode_photo(_bytes(_marked(), fmt, **({"lossless": True} if fmt == "WEBP" else {})))
        assert img.mode == "RGB" and img.size == (60, 40)
        assert tuple(np.asarray(img)[2, 2]) == (255, 0, 0)


def test_jpeg_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    img = photos.decode_photo(_bytes(_marked(), "JPEG", quality=95, exif=exif.tobytes()), "phone.jpg")
    assert img.size == (40, 60)
    arr = np.asarray(img).astype(int)
    assert arr[3, -4, 0] > 200 and arr[3, -4, 1] < 60, "the red corner moves to the top right"


def test_rgba_is_composited_on_white():
    arr = np.zeros((20, 20, 4), np.uint8)
    arr[:10, :, :] = (0, 0, 255, 255)  # opaque blue top half, transparent bottom half
    img = photos.decode_photo(_bytes(Image.fromarray(arr, "RGBA"), "PNG"))
    out = np.asarray(img)
    assert tuple(out[2, 2]) == (0, 0, 255) and tuple(out[15, 2]) == (255, 255, 255)


def test_greyscale_16bit_and_cmyk():
    grey = photos.decode_photo(_bytes(Image.fromarray(np.tile(np.arange(0, 200, 10, dtype=np.uint8), (8, 1))), "PNG"))
    g = np.asarray(grey)
    assert grey.mode == "RGB" and (g[..., 0] == g[..., 2]).all()

    deep = np.tile(np.linspace(1000, 4000, 32).astype(np.uint16), (16, 1))
    img16 = Image.fromarray(deep)
    assert img16.mode.startswith("I;16")
    out = np.asarray(photos.decode_photo(_bytes(img16, "PNG")))
    # Rescaled from its own range: a gradient from black to white, not a clipped white picture.
    assert out[0, 0, 0] == 0 and out[0, -1, 0] == 255

    cmyk = Image.new("CMYK", (30, 20), (0, 255, 255, 0))  # pure red in CMYK
    out = np.asarray(photos.decode_photo(_bytes(cmyk, "JPEG", quality=95)))
    assert out.shape == (20, 30, 3) and out[10, 15, 0] > 200 and out[10, 15, 1] < 60


@pytest.mark.parametrize("data, name, words", [
    (b"", "empty.png", "empty"),
    (b"just some notes\n", "notes.txt", "not an image"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "broken.png", "not an image"),
], ids=["empty", "text", "bad-header"])
def test_bad_files_get_one_line_messages(data, name, words):
    with pytest.raises(photos.PhotoError) as err:
        photos.decode_photo(data, name)
    message = str(err.value)
    assert words in message and name in message and "\n" not in message


def test_truncated_jpeg():
    data = _bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 300, 3), dtype=np.uint8)), "JPEG")
    with pytest.raises(photos.PhotoError, match="damaged or truncated"):
        photos.decode_photo(data[: len(data) // 2], "cut.jpg")


def test_huge_dimensions_are_refused_before_decoding():
    # A 1-bit PNG of 12000 x 8000 = 96 MP: a few kB on disk, a decompression bomb in memory.
    data = _bytes(Image.new("1", (12_000, 8_000)), "PNG")
    assert len(data) < 2_000_000
    with pytest.raises(photos.PhotoError, match="pixel|too large"):
        photos.decode_photo(data, "bomb.png")


def test_upload_size_limit():
    with pytest.raises(photos.PhotoError, match=f"{photos.MAX_UPLOAD_MB} MB"):
        photos.decode_photo(b"\xff" * (photos.MAX_UPLOAD_BYTES + 1), "big.jpg")


def test_display_image_scales_down_only():
    small, s = photos.display_image(Image.new("RGB", (300, 200)))
    assert s == 1.0 and small.size == (300, 200)
    big, s = photos.display_image(Image.new("RGB", (4000, 2000)), max_side=1000)
    assert big.size == (1000, 500) and s == pytest.approx(0.25)


def test_cell_geometry_round_trips():
    feature, size = (5, 8), (800, 500)  # h, w of the grid; width, height of the photo
    xs, ys = photos.cell_centres(feature, size)
    assert len(xs) == 40 and xs[0] == pytest.approx(50) and ys[0] == pytest.approx(50)
    assert [photos.cell_at(x, y, feature, size) for x, y in zip(xs, ys)] == list(range(40))
    assert photos.cell_at(-5, 10_000, feature, size) == 32  # clipped into the grid: last row, first column


def test_encoder_map_is_the_clicked_row():
    enc = np.arange(36, dtype=np.float32).reshape(6, 6)  # grid 2 x 3
    m = photos.encoder_map(enc, 4, (2, 3))
    assert m.shape == (2, 3) and m.ravel().tolist() == enc[4].tolist()
    with pytest.raises(ValueError):
        photos.encoder_map(enc, 6, (2, 3))
    norm = photos.normalise_map(m)
    assert norm.max() == pytest.approx(1.0) and photos.normalise_map(np.zeros((2, 2))).max() == 0


def test_digest_is_content_hash():
    assert photos.digest(b"a") == photos.digest(b"a") != photos.digest(b"b")


def test_too_elongated_for_the_model():
    photos.check_model_size((640, 480), 800, 1333)
    with pytest.raises(photos.PhotoError, match="too elongated"):
        photos.check_model_size((4000, 3), 160, 192, "strip.png")
