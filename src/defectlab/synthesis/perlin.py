"""Perlin gradient noise and DRAEM-style binary anomaly masks.

Noise is evaluated at arbitrary (rotated, non-integer) lattice coordinates, with a gradient
lattice just large enough to cover them, so any ``res`` works for any ``shape`` and rotation
costs nothing extra.
"""

from __future__ import annotations

import numpy as np

_SQRT_TWO = float(np.sqrt(2.0))  # 2-D Perlin noise with unit gradients lies in [-1/√2, 1/√2]: scale to [-1, 1]


def _fade(t: np.ndarray) -> np.ndarray:
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def _lattice_noise(u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gradient noise at lattice coordinates (u along x, v along y), random unit gradients."""
    u, v = u - np.floor(u.min()), v - np.floor(v.min())
    angles = rng.uniform(0.0, 2.0 * np.pi, size=(int(v.max()) + 2, int(u.max()) + 2))
    gx, gy = np.cos(angles), np.sin(angles)
    i0, j0 = np.floor(u).astype(np.int64), np.floor(v).astype(np.int64)
    fu, fv = u - i0, v - j0

    def corner(dj: int, di: int) -> np.ndarray:
        return gx[j0 + dj, i0 + di] * (fu - di) + gy[j0 + dj, i0 + di] * (fv - dj)

    n00, n10, n01, n11 = corner(0, 0), corner(0, 1), corner(1, 0), corner(1, 1)
    su, sv = _fade(fu), _fade(fv)
    top = n00 + su * (n10 - n00)
    bottom = n01 + su * (n11 - n01)
    return top + sv * (bottom - top)


def perlin_noise(
    shape: tuple[int, int], res: tuple[int, int], rng: np.random.Generator, *, angle: float = 0.0
) -> np.ndarray:
    """2-D Perlin noise, float32 HxW in about [-0.71, 0.71].

    ``res`` = (periods along y, periods along x) over the image; it need not divide ``shape``.
    ``angle`` (radians) rotates the noise field about the image centre.
    """
    h, w = shape
    ry, rx = max(1, int(res[0])), max(1, int(res[1]))
    y = (np.arange(h, dtype=np.float64) + 0.5 - h / 2.0)[:, None]
    x = (np.arange(w, dtype=np.float64) + 0.5 - w / 2.0)[None, :]
    c, s = np.cos(angle), np.sin(angle)
    xr, yr = c * x - s * y, s * x + c * y
    u = (xr + w / 2.0) * (rx / w)
    v = (yr + h / 2.0) * (ry / h)
    return _lattice_noise(u, v, rng).astype(np.float32)


def fractal_noise(
    shape: tuple[int, int],
    rng: np.random.Generator,
    *,
    base_res: int = 2,
    octaves: int = 5,
    persistence: float = 0.5,
) -> np.ndarray:
    """Sum of Perlin octaves (resolution x2, amplitude x ``persistence`` each), scaled to [0, 1]."""
    total = np.zeros(shape, dtype=np.float32)
    amplitude = 1.0
    for octave in range(octaves):
        res = base_res * 2**octave
        total += amplitude * perlin_noise(shape, (res, res), rng)
        amplitude *= persistence
    lo, hi = float(total.min()), float(total.max())
    return (total - lo) / max(hi - lo, 1e-6)


def perlin_mask(
    shape: tuple[int, int],
    rng: np.random.Generator,
    *,
    min_scale: int = 0,
    max_scale: int = 6,
    threshold: float = 0.5,
    rotate: bool = True,
    max_tries: int = 32,
) -> np.ndarray:
    """DRAEM-style anomaly mask: Perlin noise with random power-of-2 resolution, thresholded.

    As in DRAEM's reference code the noise is scaled by √2 to about [-1, 1] before the
    threshold (0.5 there): without the scale, 0.5 keeps only the peaks and masks shrink to
    scattered dots (~0.4 % of the image instead of several percent).
    Resolutions along y and x are drawn independently as 2**k, k in [min_scale, max_scale);
    the field is rotated by a random angle in [-90, 90) degrees when ``rotate``. The mask is
    never empty: empty draws are redrawn, and after ``max_tries`` the top 5 % of the last
    noise field is used.
    """
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold must lie in [0, 1), got {threshold}")
    if not 0 <= min_scale < max_scale:
        raise ValueError(f"need 0 <= min_scale < max_scale, got {min_scale}, {max_scale}")
    noise = np.zeros(shape, dtype=np.float32)
    for _ in range(max_tries):
        ry, rx = 2 ** rng.integers(min_scale, max_scale, size=2)
        angle = float(rng.uniform(-np.pi / 2, np.pi / 2)) if rotate else 0.0
        noise = _SQRT_TWO * perlin_noise(shape, (int(ry), int(rx)), rng, angle=angle)
        mask = noise > threshold
        if mask.any():
            return mask
    return noise >= np.quantile(noise, 0.95)
