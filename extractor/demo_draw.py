"""Drawing the synthetic demo's people-like figures: scene specs, geometry, rendering.

Split from :mod:`extractor.demo` (which makes the seeded specs and writes the files) so
that each stays small; ``render_scene`` is deterministic in its spec.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .rundir.facet import MST_HEX

MST_RGB: tuple[tuple[int, int, int], ...] = tuple(
    (int(h[1:3], 16), int(h[3:5], 16), int(h[5:7], 16)) for h in MST_HEX)

RGB = tuple[int, int, int]


@dataclass(frozen=True)
class Shape:
    kind: str  # "ellipse" (points = two corners), "ring" (outline ellipse) or "poly"
    points: tuple[tuple[float, float], ...]
    role: str  # colour role, resolved against the figure at render time


@dataclass(frozen=True)
class FigureSpec:
    person_id: int
    tone: int  # palette tone actually painted, 1..10
    cx: float
    top: float
    height: float
    width_scale: float
    head_scale: float
    arm_angles: tuple[float, float, float, float]  # degrees from hanging down: L upper, L fore, R upper, R fore
    leg_spread: float
    short_sleeves: bool
    long_hair: bool
    beard: bool
    glasses: bool
    cap_rgb: RGB | None
    hair_rgb: RGB | None  # None: bald
    shirt_rgb: RGB
    pants_rgb: RGB
    class1: str
    class2: str
    labels: dict[str, int] = field(default_factory=dict)
    bbox: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)  # x, y, w, h


@dataclass(frozen=True)
class SceneSpec:
    number: int
    filename: str
    folder: str
    width: int
    height: int
    background: str
    bg_colors: tuple[RGB, RGB, RGB]
    lighting: str  # how the scene is rendered: one of LIGHTINGS
    exposure: float
    blur: float
    render_seed: int
    figures: tuple[FigureSpec, ...]


# ----------------------------------------------------------------------- geometry
def _ellipse(cx: float, cy: float, rx: float, ry: float, role: str, kind: str = "ellipse") -> Shape:
    return Shape(kind, ((cx - rx, cy - ry), (cx + rx, cy + ry)), role)


def _limb(p0: tuple[float, float], p1: tuple[float, float], width: float, role: str) -> Shape:
    dx, dy = p1[0] - p0[0], p1[1] - p0[1]
    norm = math.hypot(dx, dy) or 1.0
    ox, oy = -dy / norm * width / 2, dx / norm * width / 2
    return Shape("poly", ((p0[0] + ox, p0[1] + oy), (p1[0] + ox, p1[1] + oy),
                          (p1[0] - ox, p1[1] - oy), (p0[0] - ox, p0[1] - oy)), role)


def _cap_of_ellipse(cx: float, cy: float, rx: float, ry: float, cut_y: float, top: bool,
                    role: str) -> Shape:
    """Polygon of the part of an ellipse above (top) or below a horizontal chord."""
    s = max(-1.0, min(1.0, (cy - cut_y) / ry if top else (cut_y - cy) / ry))
    t0 = math.asin(s)
    sign = -1.0 if top else 1.0
    pts = tuple((cx + rx * math.cos(t), cy + sign * ry * math.sin(t))
                for t in np.linspace(t0, math.pi - t0, 14))
    return Shape("poly", pts, role)


def _head(fig: FigureSpec) -> tuple[float, float]:
    hh = 13.0 * fig.height / 100.0 * fig.head_scale
    return hh, 0.78 * hh


def face_region(fig: FigureSpec) -> tuple[int, int, int, int]:
    """Cheek band between the eyes and the mouth (x0, y0, x1, y1): only skin is drawn there."""
    hh, hw = _head(fig)
    return (round(fig.cx - 0.25 * hw), round(fig.top + 0.58 * hh),
            round(fig.cx + 0.25 * hw), round(fig.top + 0.68 * hh))


def figure_shapes(fig: FigureSpec) -> list[Shape]:
    """Shapes of one figure in drawing order (back to front), in image pixels."""
    u = fig.height / 100.0
    hh, hw = _head(fig)
    cx, top = fig.cx, fig.top
    sy = top + hh + 2.5 * u  # shoulder line
    hip = sy + 31.0 * u
    sw, pw = 12.0 * u * fig.width_scale, 9.0 * u * fig.width_scale
    foot = top + fig.height - 2.5 * u
    out: list[Shape] = []
    for s in (-1, 1):
        hx = cx + s * pw * 0.5
        fx = hx + s * math.tan(math.radians(fig.leg_spread)) * (foot - hip)
        out.append(_limb((hx, hip), (fx, foot), 7.5 * u * fig.width_scale, "pants"))
        out.append(_ellipse(fx + s * 1.5 * u, foot, 5.0 * u, 2.5 * u, "shoe"))
    out.append(_limb((cx, top + 0.85 * hh), (cx, sy + u), 0.38 * hw, "skin"))
    out.append(Shape("poly", ((cx - sw, sy), (cx + sw, sy), (cx + pw, hip + 2 * u),
                              (cx - pw, hip + 2 * u)), "shirt"))
    if fig.hair_rgb is not None and fig.long_hair:
        out.append(Shape("ellipse", ((cx - 0.62 * hw, top - 0.04 * hh),
                                     (cx + 0.62 * hw, top + 1.35 * hh)), "hair"))
    aw = 5.0 * u * math.sqrt(fig.width_scale)
    for s, (a1, a2) in ((-1, fig.arm_angles[:2]), (1, fig.arm_angles[2:])):
        sh = (cx + s * (sw - 2.5 * u), sy + 2.5 * u)
        d1 = (s * math.sin(math.radians(a1)), math.cos(math.radians(a1)))
        d2 = (s * math.sin(math.radians(a2)), math.cos(math.radians(a2)))
        el = (sh[0] + 15 * u * d1[0], sh[1] + 15 * u * d1[1])
        wr = (el[0] + 13 * u * d2[0], el[1] + 13 * u * d2[1])
        upper = "skin" if fig.short_sleeves else "shirt"
        out += [_limb(sh, el, aw, upper), _ellipse(*el, aw / 2, aw / 2, upper),
                _limb(el, wr, 0.9 * aw, upper), _ellipse(*sh, 0.6 * aw, 0.6 * aw, "shirt")]
        if fig.short_sleeves:
            out.append(_limb(sh, (sh[0] + 7 * u * d1[0], sh[1] + 7 * u * d1[1]), 1.2 * aw, "shirt"))
        out.append(_ellipse(wr[0] + 2 * u * d2[0], wr[1] + 2 * u * d2[1], 3 * u, 3 * u, "skin"))
    hcy = top + hh / 2
    out.append(_ellipse(cx, hcy, hw / 2, hh / 2, "skin"))
    if fig.hair_rgb is not None:
        out.append(_cap_of_ellipse(cx, hcy, 0.53 * hw, 0.53 * hh, top + 0.28 * hh, True, "hair"))
    if fig.beard:
        out.append(_cap_of_ellipse(cx, hcy, 0.5 * hw, 0.5 * hh, top + 0.72 * hh, False, "hair"))
    for s in (-1, 1):
        ex, ey = cx + s * 0.2 * hw, top + 0.5 * hh
        out += [_ellipse(ex, ey, 0.09 * hw, 0.05 * hh, "eye_white"),
                _ellipse(ex, ey, 0.045 * hw, 0.045 * hw, "pupil")]
        if fig.glasses:
            out.append(_ellipse(ex, ey, 0.15 * hw, 0.08 * hh, "glasses", kind="ring"))
    out.append(_ellipse(cx, top + 0.79 * hh, 0.14 * hw, 0.03 * hh, "mouth"))
    if fig.cap_rgb is not None:
        out.append(_cap_of_ellipse(cx, hcy, 0.55 * hw, 0.55 * hh, top + 0.3 * hh, True, "cap"))
        out.append(_ellipse(cx + 0.3 * hw, top + 0.3 * hh, 0.32 * hw, 0.05 * hh, "cap"))
    return out


def _tight_box(fig: FigureSpec, width: int, height: int) -> tuple[float, float, float, float]:
    pts = np.array([p for shape in figure_shapes(fig) for p in shape.points])
    x0, y0 = max(0, math.floor(pts[:, 0].min())), max(0, math.floor(pts[:, 1].min()))
    x1, y1 = min(width, math.ceil(pts[:, 0].max())), min(height, math.ceil(pts[:, 1].max()))
    return float(x0), float(y0), float(x1 - x0), float(y1 - y0)


# ---------------------------------------------------------------------- rendering
def _background(scene: SceneSpec, rng: np.random.Generator) -> np.ndarray:
    h, w = scene.height, scene.width
    c0, c1, c2 = (np.array(c, np.float32) / 255 for c in scene.bg_colors)
    yy = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    xx = np.linspace(0, 1, w, dtype=np.float32)[None, :, None]
    kind = scene.background
    if kind == "vgrad":
        return c0 + (c1 - c0) * yy + 0 * xx
    if kind == "hgrad":
        return c0 + (c1 - c0) * xx + 0 * yy
    if kind == "stripes":
        angle, period = rng.uniform(0, math.pi), rng.uniform(12, 40)
        phase = (xx * w * math.cos(angle) + yy * h * math.sin(angle)) / period
        mix = (np.sin(2 * math.pi * phase) > 0).astype(np.float32) * 0.8
        return c0 + (c1 - c0) * mix
    if kind == "noise":
        grid = Image.fromarray(rng.integers(0, 256, (5, 7), dtype=np.uint8))
        mix = np.asarray(grid.resize((w, h), Image.Resampling.BICUBIC), np.float32)[..., None] / 255
        return c0 + (c1 - c0) * mix
    if kind in ("room", "outdoor"):
        horizon = rng.uniform(0.5, 0.8)
        if kind == "outdoor":  # sky above, ground below; fixed hues so it reads as outdoors
            c0 = np.array((0.55, 0.72, 0.92), np.float32) * rng.uniform(0.8, 1.05)
            c1 = np.array((0.35, 0.55, 0.25), np.float32) * rng.uniform(0.6, 1.2)
        img = np.where(yy < horizon, c0 + (0.95 - c0) * yy * 0.6, c1 * (0.8 + 0.3 * yy)) + 0 * xx
        x0, y0 = rng.uniform(0.05, 0.6), rng.uniform(0.05, 0.25)
        box = (xx > x0) & (xx < x0 + rng.uniform(0.15, 0.35)) & (yy > y0) & (yy < horizon - 0.1)
        # A window in a room, a building or tree block outdoors: something behind people.
        return np.where(box, c2, img)
    return np.broadcast_to(c0, (h, w, 3)).copy()


def _apply_lighting(img: np.ndarray, mode: str, exposure: float, rng: np.random.Generator) -> np.ndarray:
    if mode == "dimly_lit":  # low, warm light: darker and flatter, sensor noise shows
        mean = img.mean()
        img = (mean + (img - mean) * 0.7) * exposure * np.array((1.0, 0.96, 0.88), np.float32)
        sigma = 0.02
    elif mode == "underexposed":  # gamma + offset pushes shadows below zero: crushed blacks
        img = img ** 1.5 * exposure - 0.03
        sigma = 0.015
    elif mode == "overexposed":  # gain + lift clips highlights at white
        img = img * exposure + 0.12
        sigma = 0.01
    else:
        img = img * exposure
        sigma = 0.008
    img = img + rng.standard_normal(img.shape, dtype=np.float32) * sigma
    return np.clip(img, 0.0, 1.0)


def _mouth_rgb(skin: RGB) -> RGB:
    # Darker and redder than the skin around it, whatever the tone.
    return int(skin[0] * 0.6 + 50), int(skin[1] * 0.4 + 10), int(skin[2] * 0.4 + 10)


def render_scene(scene: SceneSpec) -> np.ndarray:
    """RGB uint8 [H, W, 3] of one scene, lighting applied; deterministic in the spec."""
    rng = np.random.default_rng(scene.render_seed)
    bg = np.clip(_background(scene, rng), 0, 1)
    canvas = Image.fromarray((bg * 255 + 0.5).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(canvas)
    for fig in scene.figures:
        colors = {"skin": MST_RGB[fig.tone - 1], "shirt": fig.shirt_rgb, "pants": fig.pants_rgb,
                  "hair": fig.hair_rgb, "cap": fig.cap_rgb, "shoe": (34, 30, 30),
                  "eye_white": (236, 236, 230), "pupil": (24, 20, 20), "glasses": (20, 20, 24),
                  "mouth": _mouth_rgb(MST_RGB[fig.tone - 1])}
        for shape in figure_shapes(fig):
            color = colors[shape.role]
            if shape.kind == "poly":
                draw.polygon(shape.points, fill=color)
            elif shape.kind == "ring":
                draw.ellipse(shape.points, outline=color, width=max(1, round(0.04 * _head(fig)[1])))
            else:
                draw.ellipse(shape.points, fill=color)
    # Blur is the lens (before light), noise is the sensor (after).
    canvas = canvas.filter(ImageFilter.GaussianBlur(scene.blur))
    img = np.asarray(canvas, np.float32) / 255
    img = _apply_lighting(img, scene.lighting, scene.exposure, rng)
    return (img * 255 + 0.5).astype(np.uint8)
