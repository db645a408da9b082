"""Rough foreground estimate, used to keep synthetic anomalies on the object (SLSG's
"foreground enhancement"): the object differs from the background colour seen at the border.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from scipy import ndimage

ForegroundKind = Literal["object", "texture"]


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of a 1-D sample (maximises the between-class variance)."""
    hist, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(centres[int(np.argmax(between))])


def foreground_mask(
    image: np.ndarray,
    kind: ForegroundKind = "object",
    *,
    border: float = 0.04,
    min_fraction: float = 0.02,
) -> np.ndarray:
    """Boolean HxW foreground estimate of an HxWx3 image (uint8 or float in [0, 1]).

    ``texture``: everything is foreground. ``object``: per pixel, the larger of the RGB
    distance to the median border colour and the saturation/value difference to it; pixels
    above Otsu's threshold of that score, or above the border's own spread (median + 4 MAD
    + 0.03, for objects with several shades), are foreground; then opening, hole filling and
    dropping specks. If that leaves less than ``min_fraction`` of the image (the object fills
    the frame, or there is no contrast), the whole image is returned.
    """
    h, w = image.shape[:2]
    if kind == "texture":
        return np.ones((h, w), dtype=bool)
    if kind != "object":
        raise ValueError(f"kind must be 'object' or 'texture', got {kind!r}")
    img = image.astype(np.float32)
    if image.dtype == np.uint8:
        img /= 255.0
    b = max(1, int(round(border * min(h, w))))
    ring = np.ones((h, w), dtype=bool)
    ring[b:-b, b:-b] = False
    bg = np.median(img[ring], axis=0)
    value, sat = img.max(-1), img.max(-1) - img.min(-1)
    bg_value, bg_sat = bg.max(), bg.max() - bg.min()
    score = np.maximum(
        np.linalg.norm(img - bg, axis=-1) / np.sqrt(3),
        np.maximum(np.abs(value - bg_value), np.abs(sat - bg_sat)),
    )
    ring_score = score[ring]
    mad = np.median(np.abs(ring_score - np.median(ring_score)))
    background_level = float(np.median(ring_score) + 4 * 1.4826 * mad + 0.03)
    fg = score > min(otsu_threshold(score.ravel()), background_level)
    fg = ndimage.binary_opening(fg, iterations=2)
    fg = ndimage.binary_fill_holes(fg)
    labels, n = ndimage.label(fg)
    if n:
        sizes = np.bincount(labels.ravel())[1:]
        fg = np.isin(labels, 1 + np.flatnonzero(sizes >= min_fraction * h * w))
    if fg.mean() < min_fraction:
        return np.ones((h, w), dtype=bool)
    return fg
