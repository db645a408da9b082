"""Structural anomaly simulation (SLSG Sec. 3.2; DRAEM's texture anomalies are the special
case without self-permutation).

Mask: Perlin mask AND foreground. Source: a texture (DTD or procedural; "heterologous") or the
image itself with its grid patches shuffled ("homologous"), jittered in brightness and
contrast, then blended into the mask with transparency delta.
"""

from __future__ import annotations

import numpy as np

from defectlab.synthesis.compose import (
    SynthResult,
    blend,
    foreground_perlin_mask,
    jitter_brightness_contrast,
)
from defectlab.synthesis.textures import TextureSource

PERMUTE_GRIDS = (2, 4, 8)


def permute_patches(image: np.ndarray, rng: np.random.Generator, grid: int) -> np.ndarray:
    """Shuffle the ``grid`` x ``grid`` patches of ``image`` (never the identity order).

    Rows/columns beyond the last whole patch (when the size is not divisible) are kept.
    """
    h, w = image.shape[:2]
    ph, pw = h // grid, w // grid
    if ph == 0 or pw == 0 or grid < 2:
        raise ValueError(f"cannot cut a {h}x{w} image into {grid}x{grid} patches")
    order = np.arange(grid * grid)
    while np.array_equal(order, np.arange(grid * grid)):
        order = rng.permutation(grid * grid)
    core = image[: grid * ph, : grid * pw]
    patches = core.reshape(grid, ph, grid, pw, -1).transpose(0, 2, 1, 3, 4)
    patches = patches.reshape(grid * grid, ph, pw, -1)
    shuffled = patches[order].reshape(grid, grid, ph, pw, -1).transpose(0, 2, 1, 3, 4)
    out = image.copy()
    out[: grid * ph, : grid * pw] = shuffled.reshape(grid * ph, grid * pw, -1)
    return out


def structural_anomaly(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    fg: np.ndarray | None = None,
    source: TextureSource | None = None,
    self_permute_prob: float = 0.5,
    delta: tuple[float, float] = (0.2, 1.0),
    threshold: float = 0.5,
    min_scale: int = 0,
    max_scale: int = 6,
) -> SynthResult:
    """Simulate one structural anomaly on ``image`` (float32 HxWx3 in [0, 1]).

    ``fg`` restricts the mask (default: whole image); ``source`` supplies textures
    (default: procedural). With probability ``self_permute_prob`` the source is the image
    with shuffled patches instead of a texture. delta ~ U(``delta``).
    """
    h, w = image.shape[:2]
    fg = np.ones((h, w), dtype=bool) if fg is None else fg
    mask = foreground_perlin_mask(
        fg, rng, threshold=threshold, min_scale=min_scale, max_scale=max_scale
    )
    if rng.random() < self_permute_prob:
        method = "self_permute"
        anomaly = permute_patches(image, rng, int(rng.choice(PERMUTE_GRIDS)))
    else:
        method = "texture"
        anomaly = (source or TextureSource()).sample((h, w), rng)
    anomaly = jitter_brightness_contrast(anomaly, rng)
    d = float(rng.uniform(*delta))
    return SynthResult(blend(image, anomaly, mask, d), mask, "structural", method, d, anomaly)


def texture_anomaly(
    image: np.ndarray,
    rng: np.random.Generator,
    source: TextureSource | None = None,
    fg: np.ndarray | None = None,
    **kwargs: object,
) -> SynthResult:
    """DRAEM-style anomaly: :func:`structural_anomaly` with a texture source only."""
    return structural_anomaly(image, rng, fg=fg, source=source, self_permute_prob=0.0, **kwargs)
