"""Pieces shared by the SLSG/DRAEM-style simulations: the result record, the transparency
blend of Eq. 1 in SLSG, the source jitter and foreground-restricted Perlin masks."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from defectlab.synthesis.perlin import perlin_mask


@dataclass(frozen=True)
class SynthResult:
    """A simulated anomaly: ``image`` float32 HxWx3 in [0, 1], ``mask`` bool HxW,
    ``kind`` structural|logical, ``method`` (e.g. texture, self_permute, logical_paste),
    transparency ``delta`` and the anomaly source image ``source`` (I_N in SLSG)."""

    image: np.ndarray
    mask: np.ndarray
    kind: str
    method: str
    delta: float
    source: np.ndarray


def blend(image: np.ndarray, source: np.ndarray, mask: np.ndarray, delta: float) -> np.ndarray:
    """SLSG Eq. 1, I' = (1-M)*I + (1-delta)*(M*I) + delta*(M*A): ``source`` A shows through
    ``mask`` M with opacity ``delta``."""
    m = mask[..., None].astype(np.float32)
    return ((1 - m) * image + m * ((1 - delta) * image + delta * source)).astype(np.float32)


def jitter_brightness_contrast(
    image: np.ndarray, rng: np.random.Generator, *, brightness: float = 0.15, contrast: float = 0.3
) -> np.ndarray:
    """Random contrast (x U(1-c, 1+c) about the mean) and brightness (+ U(-b, b)), clipped."""
    mean = float(image.mean())
    c = rng.uniform(1 - contrast, 1 + contrast)
    b = rng.uniform(-brightness, brightness)
    return np.clip((image - mean) * c + mean + b, 0.0, 1.0).astype(np.float32)


def foreground_perlin_mask(
    fg: np.ndarray, rng: np.random.Generator, *, tries: int = 16, **perlin_kwargs: object
) -> np.ndarray:
    """Perlin mask AND foreground, redrawn until non-empty (after ``tries``: the foreground)."""
    if not fg.any():
        raise ValueError("foreground mask is empty")
    for _ in range(tries):
        mask = perlin_mask(fg.shape, rng, **perlin_kwargs) & fg
        if mask.any():
            return mask
    return fg.copy()
