"""Training-time anomaly synthesis shared by the methods (DRAEM/DSR, SLSG, APC, ...).

Images are float32 HxWx3 arrays in [0, 1], masks bool HxW, randomness a numpy Generator.
This is deliberately unlike the demo dataset's defects (``defectlab.data.demo``), so no
method is evaluated on its own training distortions.
"""

from defectlab.synthesis.compose import SynthResult, blend
from defectlab.synthesis.cutpaste import cutpaste, paste_region
from defectlab.synthesis.foreground import foreground_mask
from defectlab.synthesis.logical import logical_anomaly
from defectlab.synthesis.perlin import fractal_noise, perlin_mask, perlin_noise
from defectlab.synthesis.structural import permute_patches, structural_anomaly, texture_anomaly
from defectlab.synthesis.textures import DTD_URL, TextureSource, procedural_texture

__all__ = [
    "DTD_URL",
    "SynthResult",
    "TextureSource",
    "blend",
    "cutpaste",
    "foreground_mask",
    "fractal_noise",
    "logical_anomaly",
    "paste_region",
    "perlin_mask",
    "perlin_noise",
    "permute_patches",
    "procedural_texture",
    "structural_anomaly",
    "texture_anomaly",
]
