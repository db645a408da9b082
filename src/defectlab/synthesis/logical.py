"""Logical anomaly simulation (SLSG Sec. 3.2): content of ANOTHER normal image, randomly
rotated, shows through a concentrated mask (few large Perlin blobs at low resolution), so
parts appear, vanish or move rather than the surface changing."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from defectlab.synthesis.compose import SynthResult, blend, foreground_perlin_mask


def largest_blobs(mask: np.ndarray, k: int) -> np.ndarray:
    """Keep the ``k`` largest connected components of a boolean mask."""
    labels, n = ndimage.label(mask)
    if n <= k:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    keep = 1 + np.argsort(sizes, kind="stable")[::-1][:k]
    return np.isin(labels, keep)


def rotate_image(image: np.ndarray, angle_deg: float) -> np.ndarray:
    """Rotate about the centre (bilinear, mirrored borders), same size."""
    if angle_deg == 0:
        return image.copy()
    out = ndimage.rotate(image, angle_deg, axes=(1, 0), reshape=False, order=1, mode="mirror")
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def logical_anomaly(
    image: np.ndarray,
    other: np.ndarray,
    rng: np.random.Generator,
    *,
    fg: np.ndarray | None = None,
    delta: tuple[float, float] = (0.2, 1.0),
    max_angle: float = 180.0,
    threshold: float = 0.42,   # on the √2-scaled noise of perlin_mask (0.3 before the scale: same areas)
    max_scale: int = 2,
    max_blobs: int = 2,
) -> SynthResult:
    """Simulate one logical anomaly on ``image`` using ``other`` (a different normal image).

    ``other`` is rotated by U(-max_angle, max_angle) degrees; the mask is a low-resolution
    Perlin mask (resolutions 2**[0, max_scale)) AND ``fg``, reduced to its ``max_blobs``
    largest blobs. delta ~ U(``delta``).
    """
    if other.shape != image.shape:
        raise ValueError(f"other image shape {other.shape} differs from {image.shape}")
    h, w = image.shape[:2]
    fg = np.ones((h, w), dtype=bool) if fg is None else fg
    mask = foreground_perlin_mask(fg, rng, threshold=threshold, min_scale=0, max_scale=max_scale)
    mask = largest_blobs(mask, max_blobs)
    source = rotate_image(other, float(rng.uniform(-max_angle, max_angle)))
    d = float(rng.uniform(*delta))
    return SynthResult(blend(image, source, mask, d), mask, "logical", "logical_paste", d, source)
