"""The embedded demo dataset: four small procedurally rendered inspection categories.

``generate_demo`` writes MVTec AD layout (``train/good``, ``test/<defect>``,
``ground_truth/<defect>/NNN_mask.png``) plus ``defects.json`` (defect -> structural|logical)
for every category:

* ``weave`` (texture): a 2/2 twill technical fabric, drawn thread by thread.
* ``grain`` (texture): brushed steel: anisotropically filtered noise with a specular band.
* ``board`` (object): a PCB on a conveyor with a fixed part layout (QFP, two SOICs, two
  electrolytic capacitors, SMD capacitors/resistors, two LEDs of set colours).
* ``tray`` (object): a blister tray with 2x3 wells, each holding one pill or capsule of a
  set colour.

Normal variation: pose (shift, rotation), part placement jitter, loose items rolling in
their wells, lighting gain/gradient/vignette/white balance, thread and grain randomness and
sensor noise.

Defects are rendered as physical marks and are deliberately unlike the training-time
synthesis in ``defectlab.synthesis`` (Perlin-shaped masks filled with pasted textures or
shuffled patches, other images' regions, CutPaste rectangles): structural defects here are
analytic curves and disks (scratches: thin Bezier curves with a groove; cracks: branching
random walks; holes: dark irregular disks with a rim; stains: tinted Gaussian blobs with a
drying ring; contamination: particles and fibres), and logical defects re-render the scene
with a part missing, added, moved or recoloured. So no method is evaluated on its own
training distortions.

Masks: structural masks are exactly the pixels that differ from the defect-free render of
the same sample by at least ``DIFF_THRESHOLD`` grey levels (smaller changes are reverted).
Logical masks are the footprints of the parts involved (missing: where the part should be;
misplaced: where it was and where it is now); nothing outside them changes.

Every sample draws from its own ``numpy`` generator seeded with (seed, category, split,
index), so output is bit-identical for a seed and independent of generation order.
"""

from __future__ import annotations

import functools
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from defectlab.errors import ConfigError
from defectlab.io import atomic_dir, write_json

DIFF_THRESHOLD = 8  # grey levels; smaller defect changes are reverted, larger ones are masked
MAX_DEFECT_TRIES = 100
Colour = tuple[float, float, float]
Window = tuple[slice, slice]

# --------------------------------------------------------------------------- drawing helpers


def _coverage(signed_dist: np.ndarray, soft: float = 1.0) -> np.ndarray:
    """Anti-aliased coverage of a shape from its signed distance (negative inside), in pixels."""
    return np.clip(0.5 - signed_dist / soft, 0.0, 1.0)


def _disk(
    u: np.ndarray, v: np.ndarray, cx: float, cy: float, r: float, soft: float = 1.0
) -> np.ndarray:
    return _coverage(np.hypot(u - cx, v - cy) - r, soft)


def _box(
    u: np.ndarray,
    v: np.ndarray,
    cx: float,
    cy: float,
    hw: float,
    hh: float,
    *,
    radius: float = 0.0,
    soft: float = 1.0,
) -> np.ndarray:
    """Coverage of an axis-aligned rounded rectangle with half sizes hw, hh."""
    qx, qy = np.abs(u - cx) - (hw - radius), np.abs(v - cy) - (hh - radius)
    outside = np.hypot(np.maximum(qx, 0.0), np.maximum(qy, 0.0))
    return _coverage(outside + np.minimum(np.maximum(qx, qy), 0.0) - radius, soft)


def _comb(t: np.ndarray, pitch: float, width: float) -> np.ndarray:
    """Coverage of bars of ``width`` every ``pitch`` along coordinate ``t`` (a bar at t=0)."""
    d = np.abs((t / pitch + 0.5) % 1.0 - 0.5) * pitch
    return np.clip(width / 2 - d + 0.5, 0.0, 1.0)


def _polyline_distance(
    u: np.ndarray, v: np.ndarray, pts: np.ndarray, reach: float
) -> tuple[np.ndarray, np.ndarray]:
    """Distance of each pixel to a polyline (N x 2 points, x/y) and its arc position in [0, 1].

    Only pixels within ``reach`` of the polyline's bounding box are evaluated; the others
    get distance inf (and arc 0).
    """
    lo, hi = pts.min(0) - reach, pts.max(0) + reach
    near = (u >= lo[0]) & (u <= hi[0]) & (v >= lo[1]) & (v <= hi[1])
    dist, arc = np.full(u.shape, np.inf), np.zeros(u.shape)
    a, ab = pts[:-1], np.diff(pts, axis=0)
    length = np.maximum((ab**2).sum(1), 1e-9)
    pu, pv = u[near][:, None] - a[:, 0], v[near][:, None] - a[:, 1]
    t = np.clip((pu * ab[:, 0] + pv * ab[:, 1]) / length, 0.0, 1.0)
    d = np.hypot(pu - t * ab[:, 0], pv - t * ab[:, 1])
    k = d.argmin(-1)
    rows = np.arange(len(k))
    seg_len = np.sqrt(length)
    start = np.concatenate([[0.0], np.cumsum(seg_len)])[k]
    dist[near] = d[rows, k]
    arc[near] = (start + t[rows, k] * seg_len[k]) / seg_len.sum()
    return dist, arc


def _over(img: np.ndarray, colour: Colour | np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Composite ``colour`` (RGB or HxWx3) over ``img`` with coverage ``alpha``."""
    return img + (np.asarray(colour, dtype=np.float64) - img) * alpha[..., None]


def _bezier(p0: np.ndarray, p1: np.ndarray, p2: np.ndarray, n: int = 24) -> np.ndarray:
    """n points along the quadratic Bezier curve p0 -> p2 with control point p1."""
    t = np.linspace(0.0, 1.0, n)[:, None]
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2


def _smooth_profile(rng: np.random.Generator, n: int, knots: int) -> np.ndarray:
    """A smooth random 1-D profile of length n, values about N(0, 1)."""
    return np.interp(np.arange(n), np.linspace(0, n - 1, knots), rng.normal(size=knots))


@dataclass(frozen=True)
class _Frame:
    """Pixel grid (x, y) and the design coordinates (u, v) seen through a pose: rotation
    ``angle`` about the image centre, then shift (``tx``, ``ty``)."""

    size: int
    x: np.ndarray
    y: np.ndarray
    u: np.ndarray
    v: np.ndarray
    angle: float = 0.0
    tx: float = 0.0
    ty: float = 0.0

    @classmethod
    def identity(cls, size: int) -> _Frame:
        y, x = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
        return cls(size, x, y, x, y)

    @classmethod
    def posed(cls, size: int, rng: np.random.Generator, shift: float, max_deg: float) -> _Frame:
        """A random pose: shift up to ``shift`` x size, rotation up to ``max_deg`` degrees."""
        grid = cls.identity(size)
        c0 = size / 2.0
        tx, ty = rng.uniform(-shift, shift, size=2) * size
        a = float(np.deg2rad(rng.uniform(-max_deg, max_deg)))
        dx, dy = grid.x - c0 - tx, grid.y - c0 - ty
        u = np.cos(a) * dx + np.sin(a) * dy + c0
        v = -np.sin(a) * dx + np.cos(a) * dy + c0
        return cls(size, grid.x, grid.y, u, v, a, float(tx), float(ty))

    def window(self, ux: float, uy: float, reach: float) -> Window:
        """Pixel slices covering everything within ``reach`` of design point (ux, uy)."""
        c0 = self.size / 2.0
        c, s = np.cos(self.angle), np.sin(self.angle)
        px = c * (ux - c0) - s * (uy - c0) + c0 + self.tx
        py = s * (ux - c0) + c * (uy - c0) + c0 + self.ty

        def span(p: float) -> slice:
            lo, hi = np.clip([np.floor(p - reach), np.ceil(p + reach)], 0, self.size)
            return slice(int(lo), int(hi))

        return span(py), span(px)

    def crop(self, win: Window) -> _Frame:
        return replace(self, x=self.x[win], y=self.y[win], u=self.u[win], v=self.v[win])


# --------------------------------------------------------------------------- texture categories


def _render_weave(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """2/2 twill: each warp thread floats over two weft threads, shifted by one per row."""
    f = _Frame.posed(size, rng, shift=0.5, max_deg=2.5)
    pitch = size / 14 * rng.uniform(0.97, 1.03)
    a, b = f.u / pitch, f.v / pitch
    i, j = np.floor(a).astype(int), np.floor(b).astype(int)
    fa, fb = a - i, b - j
    k = (i + j) % 4
    warp_top = k < 2
    across = np.where(warp_top, fa, fb)  # position across the visible thread
    along = np.where(warp_top, (k + fb) / 2, (k - 2 + fa) / 2)  # position along its float
    thread_var = 1 + 0.06 * rng.normal(size=(2, 64))
    var = np.where(warp_top, thread_var[0][i % 64], thread_var[1][j % 64])
    reflect = np.where(warp_top, 1.0, rng.uniform(0.8, 0.92))
    fibres = 0.06 * np.sin(2 * np.pi * (across * 5 + 0.3 * np.where(warp_top, j, i)))
    shade = np.sin(np.pi * across) ** 0.6 * np.sin(np.pi * along) ** 0.35 * reflect * var
    base = np.array([0.80, 0.76, 0.66]) * rng.uniform(0.98, 1.02, size=3)
    img = base * (0.28 + 0.8 * np.clip(shade + fibres, 0, 1))[..., None]
    return img, np.ones((size, size))


def _render_grain(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Brushed steel: noise filtered into long streaks along a near-horizontal direction."""
    theta = np.deg2rad(rng.uniform(-3, 3))
    ky = np.fft.fftfreq(size)[:, None]
    kx = np.fft.rfftfreq(size)[None, :]
    k_along = kx * np.cos(theta) + ky * np.sin(theta)
    k_across = -kx * np.sin(theta) + ky * np.cos(theta)

    def streaks(length: float, width: float) -> np.ndarray:
        g = np.exp(-2 * np.pi**2 * ((length * k_along) ** 2 + (width * k_across) ** 2))
        spectrum = np.fft.rfft2(rng.normal(size=(size, size))) * g
        field = np.fft.irfft2(spectrum, s=(size, size))
        return field / field.std()

    scale = size / 128
    grain = 0.07 * streaks(30 * scale, 0.5 * scale) + 0.04 * streaks(60 * scale, 2.0 * scale)
    x = np.arange(size) + 0.5
    band_pos = rng.uniform(0.2, 0.8) * size
    band = rng.uniform(0.08, 0.16) * np.exp(-(((x - band_pos) / (0.22 * size)) ** 2))
    base = np.array([0.60, 0.62, 0.64]) * rng.uniform(0.98, 1.02, size=3)
    return base * (1 + grain)[..., None] + band[None, :, None], np.ones((size, size))


# --------------------------------------------------------------------------- object categories


def _bilinear(arr: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Sample HxWxC ``arr`` at continuous pixel coordinates (centres at i + 0.5), edges clamped."""
    h, w, c = arr.shape
    fx = np.clip(x - 0.5, 0, w - 1.001)
    fy = np.clip(y - 0.5, 0, h - 1.001)
    x0, y0 = fx.astype(np.intp), fy.astype(np.intp)
    wx = (fx - x0).astype(arr.dtype)[..., None]
    wy = (fy - y0).astype(arr.dtype)[..., None]
    flat, i = arr.reshape(-1, c), y0 * w + x0
    p00, p01, p10, p11 = (flat.take(j, axis=0) for j in (i, i + 1, i + w, i + w + 1))
    return (p00 + (p01 - p00) * wx) * (1 - wy) + (p10 + (p11 - p10) * wx) * wy


class _Layer:
    """A static object drawn once in design coordinates at twice the output resolution:
    premultiplied colour, alpha (object and its shadow) and the object's own coverage."""

    def __init__(self, rgb: np.ndarray, alpha: np.ndarray, support: np.ndarray):
        stack = np.concatenate([rgb, alpha[..., None], support[..., None]], axis=-1)
        self.stack = stack.astype(np.float32)

    def place(self, f: _Frame, background: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Composite the layer seen through ``f``'s pose over ``background``; also its coverage."""
        scale = self.stack.shape[0] / f.size
        sampled = _bilinear(self.stack, f.u * scale, f.v * scale)
        return background * (1 - sampled[..., 3:4]) + sampled[..., :3], sampled[..., 4]


@dataclass(frozen=True)
class Part:
    """One part of an object scene, in design pixel coordinates (``angle`` in radians)."""

    kind: str
    x: float
    y: float
    colour: Colour
    angle: float = 0.0


DrawPart = Callable[[np.ndarray, _Frame, Part], tuple[np.ndarray, np.ndarray]]


@dataclass
class _ObjectScene:
    """An object instance: background without parts, the parts, what logical defects may do."""

    frame: _Frame
    base: np.ndarray
    support: np.ndarray
    parts: list[Part]
    draw: DrawPart
    spare_spots: list[tuple[float, float]]  # free places for moved parts (design pixels)
    movable: list[int]  # indices of parts that may be misplaced
    palettes: dict[int, list[Colour]]  # part index -> colours it may wrongly have
    add_extra: Callable[[list[Part], np.random.Generator], list[Part]]
    reach: dict[str, float]  # part kind -> pixels around its centre that hold all of it

    def render(
        self, parts: list[Part], base: np.ndarray | None = None
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """``parts`` drawn in order on ``base`` (default: the scene's), and their footprints."""
        img, footprints = (self.base if base is None else base).copy(), []
        for part in parts:
            win = self.frame.window(part.x, part.y, self.reach[part.kind])
            footprint = np.zeros(img.shape[:2])
            img[win], footprint[win] = self.draw(img[win], self.frame.crop(win), part)
            footprints.append(footprint)
        return img, footprints


def _local(f: _Frame, p: Part) -> tuple[np.ndarray, np.ndarray]:
    """Design coordinates relative to a part's centre and orientation."""
    c, s = np.cos(p.angle), np.sin(p.angle)
    du, dv = f.u - p.x, f.v - p.y
    return c * du + s * dv, -s * du + c * dv


def _drop_shadow(
    img: np.ndarray, body: np.ndarray, shadow: np.ndarray, strength: float = 0.45
) -> np.ndarray:
    return _over(img, (0.0, 0.0, 0.0), shadow * strength * (1 - body))


# ---- board

CHIP: Colour = (0.09, 0.09, 0.10)
CERAMIC: Colour = (0.76, 0.62, 0.42)
RED_LED: Colour = (0.85, 0.10, 0.08)
BOARD_SIZES = {  # unit half sizes (x, y) of each part body
    "qfp": (0.10, 0.10),
    "soic": (0.085, 0.045),
    "elcap": (0.07, 0.07),
    "led": (0.04, 0.032),
    "smd": (0.035, 0.018),
}
BOARD_LAYOUT: tuple[tuple[str, float, float, Colour], ...] = (  # kind, unit x, unit y, colour
    ("qfp", 0.33, 0.35, CHIP),
    ("soic", 0.72, 0.24, CHIP),
    ("soic", 0.72, 0.46, CHIP),
    ("elcap", 0.22, 0.73, (0.12, 0.25, 0.62)),
    ("elcap", 0.43, 0.73, (0.13, 0.13, 0.15)),
    ("smd", 0.62, 0.66, CERAMIC),
    ("smd", 0.62, 0.78, CERAMIC),
    ("smd", 0.74, 0.66, CHIP),
    ("smd", 0.74, 0.78, CHIP),
    ("led", 0.87, 0.66, RED_LED),
    ("led", 0.87, 0.78, (0.15, 0.75, 0.20)),
)
BOARD_WRONG_COLOURS: tuple[Colour, ...] = (
    (0.90, 0.55, 0.10),
    (0.60, 0.20, 0.65),
    (0.92, 0.85, 0.20),
    (0.20, 0.70, 0.88),
)
BOARD_SPARE_SPOTS = (
    (0.15, 0.52), (0.55, 0.56), (0.30, 0.88), (0.88, 0.40), (0.55, 0.12), (0.60, 0.88)
)
BOARD_TRACES = (
    ((0.33, 0.47), (0.33, 0.58), (0.22, 0.64)),
    ((0.44, 0.30), (0.55, 0.30), (0.61, 0.24)),
    ((0.44, 0.40), (0.52, 0.46), (0.61, 0.46)),
    ((0.43, 0.64), (0.50, 0.60), (0.62, 0.60)),
    ((0.66, 0.72), (0.70, 0.72)),
    ((0.78, 0.72), (0.84, 0.72)),
    ((0.20, 0.30), (0.12, 0.30), (0.12, 0.85), (0.70, 0.85), (0.87, 0.85)),
    ((0.83, 0.24), (0.90, 0.24), (0.90, 0.55)),
)


def _chip_pins(
    lx: np.ndarray, ly: np.ndarray, kind: str, hw: float, hh: float, s: int, reach: float
) -> np.ndarray:
    """Gull-wing pins (SOIC: top and bottom; QFP: all four sides), ``reach`` beyond the body."""
    pitch, inset = 0.024 * s, 0.012 * s
    pins = _box(lx, ly, 0, 0, hw - inset, hh + reach) * _comb(lx, pitch, 0.5 * pitch)
    pins *= np.abs(ly) > hh - inset
    if kind == "qfp":
        side = _box(lx, ly, 0, 0, hw + reach, hh - inset) * _comb(ly, pitch, 0.5 * pitch)
        pins = np.maximum(pins, side * (np.abs(lx) > hw - inset))
    return pins


def _board_part(img: np.ndarray, f: _Frame, p: Part) -> tuple[np.ndarray, np.ndarray]:
    """Draw one board part; returns (image, footprint coverage including its shadow)."""
    s = f.size
    lx, ly = _local(f, p)
    hw, hh = (h * s for h in BOARD_SIZES[p.kind])
    off = 0.008 * s
    if p.kind == "elcap":
        body, shadow = _disk(lx, ly, 0, 0, hw), _disk(lx - off, ly - off, 0, 0, hw, soft=3.0)
    else:
        body = _box(lx, ly, 0, 0, hw, hh, radius=0.004 * s)
        shadow = _box(lx - off, ly - off, 0, 0, hw, hh, soft=2.5)
    img = _drop_shadow(img, body, shadow)
    footprint = np.maximum(body, shadow)
    if p.kind in ("qfp", "soic"):
        pins = _chip_pins(lx, ly, p.kind, hw, hh, s, 0.025 * s) * (1 - body)
        img = _over(img, (0.74, 0.74, 0.76), pins)
        sheen = (0.06 * (0.5 - ly / (2 * hh)))[..., None]
        img = _over(img, np.clip(np.asarray(p.colour) + sheen, 0, 1), body)
        marks = _box(lx, ly, 0.1 * hw, 0, 0.5 * hw, 0.35 * hh) * _comb(ly, 0.03 * s, 0.008 * s)
        dot = _disk(lx, ly, -hw + 0.025 * s, -hh + 0.025 * s, 0.01 * s)
        img = _over(img, (0.42, 0.42, 0.44), np.maximum(marks * 0.7, dot) * body)
        footprint = np.maximum(footprint, pins)
    elif p.kind == "elcap":  # top view: coloured sleeve, polarity stripe, aluminium lid
        img = _over(img, p.colour, body)
        img = _over(img, (0.82, 0.82, 0.85), body * (lx < -0.55 * hw))
        lid = _disk(lx, ly, 0, 0, 0.72 * hw)
        img = _over(img, (0.74, 0.75, 0.78), lid * (1 - 0.25 * (np.hypot(lx, ly) / hw) ** 2))
        vent = np.maximum(
            _box(lx, ly, 0, 0, 0.5 * hw, 0.05 * hw), _box(lx, ly, 0, 0, 0.05 * hw, 0.5 * hw)
        )
        img = _over(img, (0.42, 0.42, 0.46), vent * lid)
        glint = _disk(lx, ly, -0.3 * hw, -0.3 * hw, 0.22 * hw, soft=3.0)
        img = _over(img, (1.0, 1.0, 1.0), 0.35 * glint)
    elif p.kind == "led":
        img = _over(img, (0.88, 0.88, 0.84), body)
        img = _over(img, p.colour, _disk(lx, ly, 0, 0, 0.62 * hh))
        glint = _disk(lx, ly, -0.2 * hh, -0.2 * hh, 0.2 * hh, soft=2.0)
        img = _over(img, (1.0, 1.0, 1.0), 0.55 * glint)
    else:  # smd capacitor / resistor: body with tinned end caps
        img = _over(img, p.colour, body)
        img = _over(img, (0.80, 0.80, 0.80), body * (np.abs(lx) > 0.65 * hw))
    return img, footprint


def _board_slot(f: _Frame, p: Part) -> tuple[np.ndarray, np.ndarray]:
    """Solder pads and silkscreen outline of a part slot (seen when the part is missing)."""
    s = f.size
    lx, ly = _local(f, p)
    hw, hh = (h * s for h in BOARD_SIZES[p.kind])
    if p.kind in ("qfp", "soic"):
        pads = _chip_pins(lx, ly, p.kind, hw, hh, s, 0.03 * s)
        margin = 0.042 * s
    else:
        px = 0.45 * hw if p.kind == "elcap" else 0.75 * hw
        pads = np.maximum(
            _box(lx, ly, -px, 0, 0.3 * hw, 0.55 * hh), _box(lx, ly, px, 0, 0.3 * hw, 0.55 * hh)
        )
        margin = 0.012 * s
    outer = _box(lx, ly, 0, 0, hw + margin, hh + margin, radius=0.01 * s)
    inner = _box(lx, ly, 0, 0, hw + margin - 1.0, hh + margin - 1.0, radius=0.01 * s)
    return pads, np.clip(outer - inner, 0, 1)


@functools.lru_cache(maxsize=4)
def _board_layer(size: int) -> _Layer:
    """The bare PCB (traces, mounting holes, pads, silkscreen) and its shadow."""
    f = _Frame.identity(2 * size)
    s = f.size
    c, half = 0.5 * s, 0.45 * s
    board = _box(f.u, f.v, c, c, half, half, radius=0.03 * s)
    inner = _box(f.u, f.v, c, c, half - 3, half - 3, radius=0.03 * s)
    shadow = 0.5 * _box(f.u - 0.012 * s, f.v - 0.012 * s, c, c, half, half, soft=8)
    green = np.array([0.10, 0.36, 0.20])
    img = _over(np.zeros((s, s, 3)), green * 1.6, board)
    img = _over(img, green, inner)
    traces = [_polyline_distance(f.u, f.v, np.asarray(t) * s, 0.01 * s)[0] for t in BOARD_TRACES]
    img = _over(img, green * 1.45, _coverage(np.minimum.reduce(traces) - 0.007 * s) * inner)
    corners = [(x * s, y * s) for x in (0.08, 0.92) for y in (0.08, 0.92)]
    hole_dist = np.minimum.reduce([np.hypot(f.u - x, f.v - y) for x, y in corners])
    img = _over(img, (0.80, 0.68, 0.35), _coverage(hole_dist - 0.035 * s))
    img = _over(img, (0.05, 0.05, 0.05), _coverage(hole_dist - 0.02 * s))
    for kind, ux, uy, colour in BOARD_LAYOUT:
        pads, silk = _board_slot(f, Part(kind, ux * s, uy * s, colour))
        img = _over(_over(img, (0.80, 0.78, 0.72), pads), (0.90, 0.90, 0.86), silk)
    return _Layer(img, board + shadow * (1 - board), board)


def _board(rng: np.random.Generator, size: int) -> _ObjectScene:
    """A PCB on a dark conveyor belt, its parts placed on their pads with small jitter."""
    f = _Frame.posed(size, rng, shift=0.02, max_deg=1.5)
    s = size
    belt = 0.16 + 0.015 * _smooth_profile(rng, size, 24)
    img, board = _board_layer(size).place(f, belt[None, :, None] * np.array([1.0, 1.0, 1.06]))
    parts = []
    for kind, ux, uy, colour in BOARD_LAYOUT:
        jx, jy = rng.normal(0, 0.003 * s, size=2)
        angle = np.deg2rad(rng.normal(0, 1.0)) if kind in ("smd", "led") else 0.0
        parts.append(Part(kind, ux * s + jx, uy * s + jy, colour, angle))
    spots = [(x * s, y * s) for x, y in BOARD_SPARE_SPOTS]

    def add_extra(current: list[Part], rng: np.random.Generator) -> list[Part]:
        """An additional small part on a free spot of the board."""
        kind, colour = [("smd", CERAMIC), ("smd", CHIP), ("led", RED_LED)][int(rng.integers(3))]
        x, y = spots[int(rng.integers(len(spots)))]
        return current + [Part(kind, x, y, colour, float(rng.uniform(0, np.pi)))]

    movable = [i for i, p in enumerate(parts) if p.kind != "qfp"]
    palettes = {
        i: list(BOARD_WRONG_COLOURS) for i, p in enumerate(parts) if p.kind in ("elcap", "led")
    }
    reach = {kind: (np.hypot(hw, hh) + 0.04) * s for kind, (hw, hh) in BOARD_SIZES.items()}
    return _ObjectScene(
        f, img, board, parts, _board_part, spots, movable, palettes, add_extra, reach
    )


# ---- tray

TRAY_WELLS = tuple((x, y) for y in (0.31, 0.69) for x in (0.22, 0.50, 0.78))
TRAY_ITEMS: tuple[tuple[str, Colour], ...] = (  # one per well
    ("pill", (0.82, 0.16, 0.12)),
    ("pill", (0.95, 0.78, 0.15)),
    ("pill", (0.18, 0.38, 0.82)),
    ("capsule", (0.20, 0.62, 0.26)),
    ("capsule", (0.95, 0.50, 0.10)),
    ("capsule", (0.52, 0.24, 0.64)),
)
TRAY_SPARE_SPOTS = ((0.36, 0.50), (0.64, 0.50), (0.22, 0.50), (0.50, 0.50), (0.78, 0.50))
WELL_HALF = 0.115


def _tray_item(img: np.ndarray, f: _Frame, p: Part) -> tuple[np.ndarray, np.ndarray]:
    """Draw a pill (disk with score line) or a two-tone capsule; returns (image, footprint)."""
    s = f.size
    lx, ly = _local(f, p)
    off = 0.01 * s
    colour = np.asarray(p.colour)
    if p.kind == "pill":
        r = 0.055 * s
        body, shadow = _disk(lx, ly, 0, 0, r), _disk(lx - off, ly - off, 0, 0, r, soft=3.0)
        img = _drop_shadow(img, body, shadow, 0.35)
        shade = (1 - 0.3 * (np.hypot(lx, ly) / r) ** 2)[..., None]
        img = _over(img, np.clip(colour * shade, 0, 1), body)
        img = _over(img, colour * 0.55, body * _box(lx, ly, 0, 0, 0.8 * r, 0.04 * r + 0.4))
        glint = _disk(f.u, f.v, p.x - 0.3 * r, p.y - 0.35 * r, 0.25 * r, soft=3.0)  # fixed light
        img = _over(img, (1.0, 1.0, 1.0), 0.45 * glint)
    else:
        hw, hh = 0.075 * s, 0.032 * s
        body = _box(lx, ly, 0, 0, hw, hh, radius=hh)
        sx, sy = _local(f, replace(p, x=p.x + off, y=p.y + off))
        shadow = _box(sx, sy, 0, 0, hw, hh, radius=hh, soft=3.0)
        img = _drop_shadow(img, body, shadow, 0.35)
        shell = np.where((lx < 0)[..., None], colour, np.array([0.93, 0.92, 0.88]))
        shade = (1 - 0.35 * (ly / hh) ** 2)[..., None]
        img = _over(img, np.clip(shell * shade, 0, 1), body)
        glint = body * _coverage(np.abs(ly + 0.45 * hh) - 0.12 * hh, 1.5)
        img = _over(img, (1.0, 1.0, 1.0), 0.4 * glint)
    return img, np.maximum(body, shadow)


@functools.lru_cache(maxsize=4)
def _tray_layer(size: int) -> _Layer:
    """The empty white blister tray with six wells, and its shadow."""
    f = _Frame.identity(2 * size)
    s = f.size
    c, hw, hh, r = 0.5 * s, 0.46 * s, 0.42 * s, 0.04 * s
    tray = _box(f.u, f.v, c, c, hw, hh, radius=r)
    shadow = 0.45 * _box(f.u - 0.015 * s, f.v - 0.015 * s, c, c, hw, hh, soft=10)
    plastic = np.array([0.84, 0.85, 0.82])
    img = _over(np.zeros((s, s, 3)), plastic, tray)
    rim = tray - _box(f.u, f.v, c, c, hw - 4, hh - 4, radius=r)
    img = _over(img, np.clip(plastic * 1.1, 0, 1), rim)
    lip = 0.012 * s
    for wx, wy in TRAY_WELLS:
        cx, cy, h = wx * s, wy * s, WELL_HALF * s
        well = _box(f.u, f.v, cx, cy, h, h, radius=r)
        inner_shadow = well * (1 - _box(f.u, f.v, cx + lip, cy + lip, h, h, radius=r, soft=6))
        bright = well * (1 - _box(f.u, f.v, cx - lip / 2, cy - lip / 2, h, h, radius=r, soft=4))
        img = _over(img, plastic * 0.86, well)
        img = _over(img, plastic * 0.62, inner_shadow)
        img = _over(img, np.clip(plastic * 1.12, 0, 1), bright * 0.8)
    return _Layer(img, tray + shadow * (1 - tray), tray)


def _tray(rng: np.random.Generator, size: int) -> _ObjectScene:
    """The blister tray on a blue-grey conveyor; one item per well, loose within it."""
    f = _Frame.posed(size, rng, shift=0.02, max_deg=2.0)
    s = size
    belt = np.array([0.30, 0.34, 0.40]) * (1 + 0.03 * _smooth_profile(rng, size, 16))[:, None, None]
    img, tray = _tray_layer(size).place(f, belt)
    parts = []
    for (wx, wy), (kind, colour) in zip(TRAY_WELLS, TRAY_ITEMS):
        jx, jy = rng.uniform(-0.03, 0.03, size=2) * s
        parts.append(Part(kind, wx * s + jx, wy * s + jy, colour, float(rng.uniform(0, np.pi))))
    spots = [(x * s, y * s) for x, y in TRAY_SPARE_SPOTS]

    def add_extra(current: list[Part], rng: np.random.Generator) -> list[Part]:
        """A second item of the same kind squeezed into a well beside the first."""
        i = int(rng.integers(len(current)))
        p = current[i]
        wx, wy = TRAY_WELLS[TRAY_ITEMS.index((p.kind, p.colour))]
        d, upright = 0.05 * s, np.pi / 2 + float(rng.normal(0, 0.1))
        first = replace(p, x=wx * s - d, y=wy * s + rng.normal(0, 0.01 * s), angle=upright)
        second = replace(p, x=wx * s + d, y=wy * s + rng.normal(0, 0.01 * s), angle=upright + 0.2)
        return current[:i] + [first, second] + current[i + 1 :]

    movable = list(range(len(parts)))
    palettes = {i: [c for _, c in TRAY_ITEMS if c != p.colour] for i, p in enumerate(parts)}
    reach = {"pill": 0.08 * s, "capsule": 0.11 * s}
    return _ObjectScene(f, img, tray, parts, _tray_item, spots, movable, palettes, add_extra, reach)


def _logical(scene: _ObjectScene, defect: str, rng: np.random.Generator) -> list[Part]:
    """The scene's parts after a logical defect."""
    parts = list(scene.parts)
    if defect == "missing_part":
        del parts[int(rng.integers(len(parts)))]
    elif defect == "extra_part":
        parts = scene.add_extra(parts, rng)
    elif defect == "misplaced_part":
        i = scene.movable[int(rng.integers(len(scene.movable)))]
        x, y = scene.spare_spots[int(rng.integers(len(scene.spare_spots)))]
        jx, jy = rng.normal(0, 0.01 * scene.frame.size, size=2)
        turn = float(rng.uniform(-1, 1))
        parts[i] = replace(parts[i], x=x + jx, y=y + jy, angle=parts[i].angle + turn)
    elif defect == "wrong_colour":
        i = sorted(scene.palettes)[int(rng.integers(len(scene.palettes)))]
        palette = scene.palettes[i]
        parts[i] = replace(parts[i], colour=palette[int(rng.integers(len(palette)))])
    else:
        raise ValueError(f"unknown logical defect {defect!r}")
    return parts


# --------------------------------------------------------------------------- structural defects
# Each takes the defect-free image, the pixel grid, a centre (x, y), the rng and a scale k
# (pixels per 128 px of image size) and returns the damaged image.


def _contrast_colour(img: np.ndarray, cx: float, cy: float) -> np.ndarray:
    """A colour that stands out from the surface around (cx, cy): light on dark, dark on light."""
    local = img[int(cy) - 3 : int(cy) + 4, int(cx) - 3 : int(cx) + 4].reshape(-1, 3).mean(0)
    return np.array([0.88, 0.86, 0.80]) if local.mean() < 0.45 else local * 0.3


def _scratch(
    img: np.ndarray, f: _Frame, cx: float, cy: float, rng: np.random.Generator, k: float
) -> np.ndarray:
    """A thin curved scratch with a shaded groove; its strength varies along the curve."""
    direction = rng.uniform(0, np.pi)
    half = np.array([np.cos(direction), np.sin(direction)]) * rng.uniform(12, 28) * k
    c = np.array([cx, cy])
    bend = np.array([-half[1], half[0]]) * rng.uniform(-0.5, 0.5)
    width = rng.uniform(0.5, 0.9) * k
    dist, arc = _polyline_distance(f.x, f.y, _bezier(c - half, c + bend, c + half), 8 * width)
    strength = 0.6 + 0.4 * np.sin(2 * np.pi * (arc * rng.uniform(1, 3) + rng.uniform(0, 1)))
    groove = 0.35 * np.exp(-((dist / (2.2 * width)) ** 2))
    img = _over(img, img * 0.5, groove * strength)
    return _over(img, _contrast_colour(img, cx, cy), _coverage(dist - width) * strength)


def _crack(
    img: np.ndarray, f: _Frame, cx: float, cy: float, rng: np.random.Generator, k: float
) -> np.ndarray:
    """A jagged dark crack from a random walk, tapering to its ends, with one or two branches."""

    def walk(start: np.ndarray, heading: float, steps: int) -> np.ndarray:
        turns = heading + np.cumsum(rng.normal(0, 0.45, size=steps))
        moves = np.stack([np.cos(turns), np.sin(turns)], 1) * rng.uniform(2.0, 3.5, (steps, 1)) * k
        return start + np.concatenate([[[0.0, 0.0]], np.cumsum(moves, 0)])

    heading = rng.uniform(0, 2 * np.pi)
    trunk = walk(np.array([cx, cy]), heading, int(rng.integers(10, 16)))
    trunk -= (trunk[-1] - trunk[0]) / 2  # centre the crack on (cx, cy)
    dist, arc = _polyline_distance(f.x, f.y, trunk, 4 * k)
    width = rng.uniform(0.6, 1.1) * k * (1.1 - 0.6 * np.abs(arc - 0.5))
    for _ in range(int(rng.integers(1, 3))):
        root = trunk[int(rng.integers(2, len(trunk) - 2))]
        turn = rng.choice([-1, 1]) * rng.uniform(0.6, 1.2)
        branch_dist, _ = _polyline_distance(f.x, f.y, walk(root, heading + turn, 6), 4 * k)
        width = np.where(branch_dist < dist, 0.5 * k, width)
        dist = np.minimum(dist, branch_dist)
    img = _over(img, img * 0.55, 0.5 * np.exp(-((dist / (2.5 * width)) ** 2)))
    return _over(img, img * 0.15, _coverage(dist - width))


def _hole(
    img: np.ndarray, f: _Frame, cx: float, cy: float, rng: np.random.Generator, k: float
) -> np.ndarray:
    """A dark irregular hole with a raised light rim (burr / frayed edge)."""
    r0 = rng.uniform(3.0, 6.5) * k
    theta = np.arctan2(f.y - cy, f.x - cx)[..., None]
    harmonics = np.arange(2, 7)
    wobble = (rng.normal(0, 0.06, 5) * np.sin(harmonics * theta + rng.uniform(0, 6.3, 5))).sum(-1)
    dist = np.hypot(f.x - cx, f.y - cy) - r0 * (1 + wobble)
    rim = _coverage(np.abs(dist - 0.8 * k) - 1.0 * k, 1.2)
    img = _over(img, np.clip(img * 1.25 + 0.08, 0, 1), 0.8 * rim)
    depth = np.clip(0.02 + 0.06 * (f.y - cy + r0) / (2 * r0), 0.02, 0.08)[..., None]
    return _over(img, depth * np.array([1.0, 1.0, 1.1]), _coverage(dist))


def _stain(
    img: np.ndarray, f: _Frame, cx: float, cy: float, rng: np.random.Generator, k: float
) -> np.ndarray:
    """A tinted blob (oil, rust, coffee, flux) of a few Gaussians, darker at its drying edge."""
    n = int(rng.integers(3, 7))
    centres = np.array([cx, cy]) + rng.normal(0, 4.0 * k, size=(n, 2))
    sigmas = rng.uniform(2.5, 6.0, size=n) * k
    blob = sum(
        np.exp(-((f.x - x) ** 2 + (f.y - y) ** 2) / (2 * sd**2))
        for (x, y), sd in zip(centres, sigmas)
    )
    inside = np.clip((blob - 0.35) * 3, 0, 1)
    ring = np.exp(-(((blob - 0.4) / 0.08) ** 2)) * (blob < 0.6)
    tints = ((0.45, 0.30, 0.12), (0.60, 0.28, 0.10), (0.25, 0.22, 0.18), (0.55, 0.50, 0.20))
    tint = np.array(tints[int(rng.integers(len(tints)))])
    alpha = np.clip(rng.uniform(0.45, 0.7) * inside + 0.25 * ring, 0, 1)
    return _over(img, img * tint * 1.2, alpha)


def _contamination(
    img: np.ndarray, f: _Frame, cx: float, cy: float, rng: np.random.Generator, k: float
) -> np.ndarray:
    """Foreign particles around a spot plus one or two curly fibres."""
    palette = np.array(  # soot, rust, lint, blue and red fibres
        [(0.08, 0.07, 0.06), (0.45, 0.22, 0.08), (0.95, 0.95, 0.92), (0.15, 0.25, 0.65),
         (0.75, 0.12, 0.15)]
    )
    centre = np.array([cx, cy])
    for _ in range(int(rng.integers(3, 9))):
        x, y = centre + rng.normal(0, 5.0 * k, size=2)
        speck = _disk(f.x, f.y, x, y, rng.uniform(0.6, 1.6) * k)
        img = _over(img, palette[int(rng.integers(len(palette)))], speck)
    for _ in range(int(rng.integers(1, 3))):
        p0 = centre + rng.normal(0, 4.0 * k, size=2)
        fibre = _bezier(p0, p0 + rng.normal(0, 8 * k, 2), p0 + rng.normal(0, 10 * k, 2), 16)
        dist, _ = _polyline_distance(f.x, f.y, fibre, 2 * k)
        cover = 0.9 * _coverage(dist - rng.uniform(0.35, 0.6) * k)
        img = _over(img, palette[int(rng.integers(len(palette)))], cover)
    return img


Structural = Callable[[np.ndarray, _Frame, float, float, np.random.Generator, float], np.ndarray]
STRUCTURAL: dict[str, Structural] = {
    "scratch": _scratch,
    "crack": _crack,
    "hole": _hole,
    "stain": _stain,
    "contamination": _contamination,
}
ON_TOP = {"contamination"}  # lies on an object's parts; other defects damage the surface below
LOGICAL = ("missing_part", "extra_part", "misplaced_part", "wrong_colour")


@dataclass(frozen=True)
class CategorySpec:
    """A demo category: texture or object, and its defect types (name -> structural|logical)."""

    kind: str
    defects: dict[str, str]


def _kinds(structural: tuple[str, ...], logical: tuple[str, ...] = ()) -> dict[str, str]:
    return {**{d: "structural" for d in structural}, **{d: "logical" for d in logical}}


CATEGORIES: dict[str, CategorySpec] = {
    "weave": CategorySpec("texture", _kinds(("hole", "stain", "contamination", "scratch"))),
    "grain": CategorySpec("texture", _kinds(("scratch", "crack", "stain", "hole"))),
    "board": CategorySpec("object", _kinds(("scratch", "contamination", "stain"), LOGICAL)),
    "tray": CategorySpec("object", _kinds(("crack", "hole", "contamination"), LOGICAL)),
}
TEXTURES = {"weave": _render_weave, "grain": _render_grain}
OBJECTS = {"board": _board, "tray": _tray}


# --------------------------------------------------------------------------- samples


@dataclass(frozen=True)
class DemoSample:
    """A rendered sample: ``image`` and its defect-free twin ``clean`` (uint8 HxWx3) and the
    defect ``mask`` (bool HxW, empty for normal samples)."""

    clean: np.ndarray
    image: np.ndarray
    mask: np.ndarray


def _camera(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-image lighting field (gain, gradient, vignette, white balance) and sensor noise."""
    y, x = (np.mgrid[0:size, 0:size] + 0.5) / size - 0.5
    a = rng.uniform(0, 2 * np.pi)
    gradient = 1 + rng.uniform(0, 0.16) * (np.cos(a) * x + np.sin(a) * y)
    light = rng.uniform(0.92, 1.08) * gradient * (1 - 0.25 * (x**2 + y**2))
    light = light[..., None] * rng.uniform(0.98, 1.02, size=3)
    return light, rng.normal(0, rng.uniform(0.006, 0.012), size=(size, size, 3))


def _to_uint8(img: np.ndarray, light: np.ndarray, noise: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(img * light + noise, 0, 1) * 255).astype(np.uint8)


def _structural(
    defect: str, surface: np.ndarray, support: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """``surface`` with a structural defect centred on ``support``, kept to ``support``."""
    size = surface.shape[0]
    lo, hi = int(0.2 * size), int(0.8 * size)
    ys, xs = np.nonzero(support[lo:hi, lo:hi] > 0.99)
    i = int(rng.integers(len(ys)))
    cx, cy = xs[i] + lo + 0.5, ys[i] + lo + 0.5
    damaged = STRUCTURAL[defect](surface, _Frame.identity(size), cx, cy, rng, size / 128)
    return surface + (damaged - surface) * support[..., None]


def render_sample(
    category: str, defect: str | None, rng: np.random.Generator, image_size: int = 128
) -> DemoSample:
    """Render one sample of ``category``; ``defect`` None gives a normal image (empty mask)."""
    spec = CATEGORIES[category]
    scene, before = None, {}
    if spec.kind == "texture":
        base, support = TEXTURES[category](rng, image_size)
    else:
        scene = OBJECTS[category](rng, image_size)
        base, footprints = scene.render(scene.parts)
        before = dict(zip(scene.parts, footprints))
        support = scene.support
    light, noise = _camera(rng, image_size)
    clean = _to_uint8(base, light, noise)
    if defect is None:
        return DemoSample(clean, clean.copy(), np.zeros(clean.shape[:2], dtype=bool))
    kind = spec.defects.get(defect)
    if kind is None:
        raise ValueError(f"category {category!r} has no defect {defect!r}")
    for _ in range(MAX_DEFECT_TRIES):  # redraw defects that end up invisible (hidden by parts)
        if scene is not None and kind == "logical":
            parts = _logical(scene, defect, rng)
            damaged, footprints = scene.render(parts)
            changed = [fp for p, fp in before.items() if p not in parts]
            changed += [fp for p, fp in zip(parts, footprints) if p not in before]
            image = _to_uint8(damaged, light, noise)
            mask = np.maximum.reduce(changed) > 0.1
        else:
            if scene is not None and defect not in ON_TOP:
                surface = _structural(defect, scene.base, support, rng)
                damaged, _ = scene.render(scene.parts, base=surface)
            else:
                damaged = _structural(defect, base, support, rng)
            image = _to_uint8(damaged, light, noise)
            mask = np.abs(image.astype(np.int16) - clean).max(-1) >= DIFF_THRESHOLD
        if mask.any():
            return DemoSample(clean, np.where(mask[..., None], image, clean), mask)
    raise RuntimeError(f"{category}/{defect}: no visible defect in {MAX_DEFECT_TRIES} tries")


# --------------------------------------------------------------------------- dataset


def _seed(seed: int, *names: str) -> list[int]:
    return [seed, *(zlib.crc32(n.encode()) for n in names)]


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, compress_level=1)


def generate_demo(
    out_root: Path,
    *,
    seed: int = 0,
    image_size: int = 128,
    n_train: int = 40,
    n_test_good: int = 10,
    n_test_per_defect: int = 4,
    categories: list[str] | None = None,
) -> dict:
    """Write the demo dataset (MVTec layout + ``defects.json`` per category) to ``out_root``.

    ``out_root`` is replaced atomically. Returns a summary: seed, image size and, per
    category, its kind (texture|object), defect kinds and image counts per split folder.
    """
    names = list(CATEGORIES) if categories is None else list(categories)
    unknown = sorted(set(names) - set(CATEGORIES))
    if unknown:
        raise ConfigError(f"demo categories: unknown {unknown}; choose from {sorted(CATEGORIES)}")
    summary: dict = {"seed": seed, "image_size": image_size, "categories": {}}
    with atomic_dir(out_root) as tmp:
        for cat in names:
            spec = CATEGORIES[cat]
            jobs = [("train", "good", n_train), ("test", "good", n_test_good)]
            jobs += [("test", defect, n_test_per_defect) for defect in spec.defects]
            for split, label, n in jobs:
                for i in range(n):
                    rng = np.random.default_rng(_seed(seed, cat, split, label, str(i)))
                    sample = render_sample(cat, None if label == "good" else label, rng, image_size)
                    _save(tmp / cat / split / label / f"{i:03d}.png", sample.image)
                    if label != "good":
                        mask_path = tmp / cat / "ground_truth" / label / f"{i:03d}_mask.png"
                        _save(mask_path, sample.mask.astype(np.uint8) * 255)
            write_json(tmp / cat / "defects.json", spec.defects)
            summary["categories"][cat] = {
                "kind": spec.kind,
                "defects": dict(spec.defects),
                "counts": {f"{split}/{label}": n for split, label, n in jobs},
            }
    return summary
