"""Anomaly source textures: DTD images when available, procedural textures otherwise.

DRAEM and SLSG paste textures from the Describable Textures Dataset (DTD) into normal images.
DTD is a 600 MB download, so without it we fall back to procedural textures from four
visually distinct families (fractal marble, warped stripes/checkers, cellular, plasma), each
mapped through a random colour map.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from defectlab.errors import ResourceMissingError
from defectlab.synthesis.perlin import fractal_noise, perlin_noise

DTD_URL = "https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


def _grid(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates scaled to [0, 1), as (y, x) broadcastable arrays."""
    h, w = shape
    return (np.arange(h)[:, None] + 0.5) / h, (np.arange(w)[None, :] + 0.5) / w


def _marble(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    y, x = _grid(shape)
    turbulence = fractal_noise(shape, rng, base_res=int(rng.integers(2, 5)))
    theta = rng.uniform(0, np.pi)
    freq = rng.uniform(3, 12)
    phase = (np.cos(theta) * x + np.sin(theta) * y) * freq + turbulence * rng.uniform(2, 6)
    return 0.5 + 0.5 * np.sin(2 * np.pi * phase)


def _warped_pattern(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    y, x = _grid(shape)
    strength = rng.uniform(0.02, 0.12)
    res = int(rng.integers(2, 6))
    wx = x + strength * perlin_noise(shape, (res, res), rng)
    wy = y + strength * perlin_noise(shape, (res, res), rng)
    freq = rng.uniform(4, 16)
    if rng.random() < 0.5:  # stripes
        return 0.5 + 0.5 * np.sin(2 * np.pi * freq * wx)
    checker = (np.floor(wx * freq) + np.floor(wy * freq)) % 2
    return checker.astype(np.float64)


def _cellular(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    y, x = _grid(shape)
    n = int(rng.integers(8, 48))
    pts = rng.random((n, 2))
    d = np.sqrt((y[..., None] - pts[:, 0]) ** 2 + (x[..., None] - pts[:, 1]) ** 2)
    d.sort(axis=-1)
    field = d[..., 1] - d[..., 0] if rng.random() < 0.5 else d[..., 0]
    return field / max(float(field.max()), 1e-6)


def _plasma(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    y, x = _grid(shape)
    field = fractal_noise(shape, rng, base_res=int(rng.integers(1, 4)), octaves=6)
    for _ in range(3):
        fy, fx = rng.uniform(-10, 10, size=2)
        field = field + 0.3 * np.sin(2 * np.pi * (fx * x + fy * y) + rng.uniform(0, 2 * np.pi))
    return (field - field.min()) / max(float(np.ptp(field)), 1e-6)


FAMILIES: dict[str, Callable[[tuple[int, int], np.random.Generator], np.ndarray]] = {
    "marble": _marble,
    "warped": _warped_pattern,
    "cellular": _cellular,
    "plasma": _plasma,
}


def _colour_map(field: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Map a [0, 1] scalar field through a random piecewise-linear RGB colour map."""
    n = int(rng.integers(2, 6))
    stops = np.concatenate([[0.0], np.sort(rng.random(n - 2)), [1.0]])
    colours = rng.random((n, 3))
    return np.stack([np.interp(field, stops, colours[:, c]) for c in range(3)], axis=-1)


def procedural_texture(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A random procedural texture, float32 HxWx3 in [0, 1] (family chosen by ``rng``)."""
    family = list(FAMILIES.values())[int(rng.integers(len(FAMILIES)))]
    return _colour_map(np.clip(family(shape, rng), 0.0, 1.0), rng).astype(np.float32)


class TextureSource:
    """Samples anomaly source textures: DTD images if ``dtd_dir`` is given, else procedural.

    Any image file below ``dtd_dir`` counts (e.g. point it at ``dtd/images`` from
    ``dtd-r1.0.1.tar.gz``); a random square crop is resized to the requested shape.
    """

    def __init__(self, dtd_dir: str | Path | None = None):
        self.dtd_dir = None if dtd_dir is None else Path(dtd_dir)
        self.files: list[Path] = []
        if self.dtd_dir is not None:
            if self.dtd_dir.is_dir():
                self.files = sorted(
                    p for p in self.dtd_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
                )
            if not self.files:
                raise ResourceMissingError(
                    f"{self.dtd_dir}: no DTD texture images found. Download {DTD_URL}, extract it "
                    "and pass the extracted 'dtd/images' folder as dtd_dir (or leave dtd_dir "
                    "unset to use procedural textures)."
                )

    def sample(self, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
        """One texture, float32 HxWx3 in [0, 1]."""
        if not self.files:
            return procedural_texture(shape, rng)
        path = self.files[int(rng.integers(len(self.files)))]
        with Image.open(path) as im:
            im = im.convert("RGB")
            side = min(im.size)
            crop = int(rng.integers(max(1, side // 3), side + 1))
            left = int(rng.integers(0, im.size[0] - crop + 1))
            top = int(rng.integers(0, im.size[1] - crop + 1))
            box = (left, top, left + crop, top + crop)
            im = im.resize((shape[1], shape[0]), Image.BILINEAR, box=box)
        return np.asarray(im, dtype=np.float32) / 255.0
