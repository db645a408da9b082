"""CutPaste (Li et al., CVPR 2021) and pasting masked regions (e.g. real anomalies, for APC).

Images are float32 HxWx3 in [0, 1]; masks are bool HxW and mark exactly the pasted pixels.
Copies use nearest-neighbour sampling, so every pasted pixel is a pixel of the source.
"""

from __future__ import annotations

import numpy as np


def _rotated_copy(
    dst_shape: tuple[int, int],
    src: np.ndarray,
    src_mask: np.ndarray,
    src_centre: tuple[float, float],
    dst_centre: tuple[float, float],
    angle: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Map ``src`` (where ``src_mask``), rotated by ``angle``, so ``src_centre`` lands on
    ``dst_centre``.

    Returns (values HxWx3, mask HxW) in destination coordinates.
    """
    h, w = dst_shape
    y = np.arange(h, dtype=np.float64)[:, None] - dst_centre[0]
    x = np.arange(w, dtype=np.float64)[None, :] - dst_centre[1]
    c, s = np.cos(angle), np.sin(angle)
    sy = np.rint(c * y - s * x + src_centre[0]).astype(np.int64)
    sx = np.rint(s * y + c * x + src_centre[1]).astype(np.int64)
    inside = (sy >= 0) & (sy < src.shape[0]) & (sx >= 0) & (sx < src.shape[1])
    sy, sx = np.where(inside, sy, 0), np.where(inside, sx, 0)
    mask = inside & src_mask[sy, sx]
    return src[sy, sx], mask


def _jitter(patch: np.ndarray, rng: np.random.Generator, strength: float = 0.1) -> np.ndarray:
    """Random brightness, contrast and per-channel colour change, as CutPaste's colour jitter."""
    mean = patch.mean(axis=(0, 1), keepdims=True)
    contrast = rng.uniform(1 - strength, 1 + strength)
    shift = rng.uniform(-strength, strength) + rng.uniform(-strength / 2, strength / 2, size=3)
    return np.clip((patch - mean) * contrast + mean + shift, 0.0, 1.0).astype(np.float32)


def cutpaste(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    area_ratio: tuple[float, float] = (0.02, 0.15),
    aspect: tuple[float, float] = (0.3, 3.3),
    scar: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Cut a rectangle of the image, colour-jitter it and paste it elsewhere.

    Normal variant: area ~ U(area_ratio) x H x W, aspect ratio log-uniform in ``aspect``.
    Scar variant: a thin rectangle (2-16 x 10-25 px at 256 px, scaled with the image) rotated
    by up to +-45 degrees. Returns (image, mask of pasted pixels).
    """
    h, w = image.shape[:2]
    if scar:
        scale = min(h, w) / 256.0
        ph = rng.uniform(10, 25) * scale
        pw = rng.uniform(2, 16) * scale
        angle = np.deg2rad(rng.uniform(-45, 45))
    else:
        area = rng.uniform(*area_ratio) * h * w
        ratio = np.exp(rng.uniform(np.log(aspect[0]), np.log(aspect[1])))
        ph, pw = np.sqrt(area * ratio), np.sqrt(area / ratio)
        angle = 0.0
    ph, pw = int(np.clip(round(ph), 1, h - 1)), int(np.clip(round(pw), 1, w - 1))
    top, left = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
    rect = np.zeros((h, w), dtype=bool)
    rect[top : top + ph, left : left + pw] = True
    src = image.copy()
    src[rect] = _jitter(image[top : top + ph, left : left + pw], rng).reshape(-1, 3)
    src_centre = (top + (ph - 1) / 2, left + (pw - 1) / 2)
    dst_centre = (rng.uniform(ph / 2, h - ph / 2), rng.uniform(pw / 2, w - pw / 2))
    values, mask = _rotated_copy((h, w), src, rect, src_centre, dst_centre, angle)
    return np.where(mask[..., None], values, image).astype(np.float32), mask


def paste_region(
    dst: np.ndarray,
    src: np.ndarray,
    src_mask: np.ndarray,
    rng: np.random.Generator,
    *,
    rotate: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Paste the pixels of ``src`` under ``src_mask`` onto ``dst`` at a random position.

    The region is rotated by a random angle when ``rotate`` and placed so its bounding circle
    stays inside ``dst`` where possible. ``src`` may have another size than ``dst``.
    Returns (image, mask of pasted pixels).
    """
    if not src_mask.any():
        raise ValueError("src_mask is empty: nothing to paste")
    h, w = dst.shape[:2]
    ys, xs = np.nonzero(src_mask)
    src_centre = ((ys.min() + ys.max()) / 2, (xs.min() + xs.max()) / 2)
    radius = min(np.hypot(ys.max() - ys.min(), xs.max() - xs.min()) / 2, min(h, w) / 2)
    dst_centre = (rng.uniform(radius, h - radius), rng.uniform(radius, w - radius))
    angle = rng.uniform(0, 2 * np.pi) if rotate else 0.0
    values, mask = _rotated_copy((h, w), src, src_mask, src_centre, dst_centre, angle)
    return np.where(mask[..., None], values, dst).astype(np.float32), mask
