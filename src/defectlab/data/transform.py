"""How an image of any shape becomes the ``size`` input of a model, and how a map at that size
goes back onto the original image.

``size`` is an int (a square ``size`` x ``size`` input) or ``(h, w)`` (``datasets.<name>.image_size:
[h, w]``, e.g. KolektorSDD2's tall strips). Four modes (``datasets.<name>.resize``):

* ``squash``: plain bilinear resize to h x w (the aspect ratio is not kept; what
  ``load_image`` always did, bit-identical).
* ``shorter_side_crop``: scaled so that the image covers h x w (for a square target: the shorter
  side becomes ``size``), the rest centre-cropped (implemented as one bilinear resize of the
  centred window, so the geometry is exact, with no intermediate rounding). What lies outside the
  crop is not seen.
* ``resize_crop``: PatchCore's and PaDiM's preprocessing (torchvision ``Resize(256)`` then
  ``CenterCrop(224)``): the shorter side becomes ``size`` x 256/224, then the centred ``size``
  window is kept (one bilinear resize of the centred window of side min(h, w) x 224/256 of the
  original; masks likewise, nearest). With ``image_size: 224`` exactly the papers' 256 -> 224.
* ``pad``: scaled so that the image fits in h x w (the other side ``round(n * scale)``), centred
  on an h x w canvas filled with the ImageNet mean colour, i.e. ~0 after normalisation, so the
  padding looks like "no signal" to the network.

Every mode is an axis-aligned scale + offset, described per axis by :class:`Axis` (an interval
of the original maps onto an interval of the model's square). ``resize_image`` / ``resize_mask``
go forward (bilinear / nearest), ``map_to_original`` goes back (bilinear; outside the crop of
``shorter_side_crop`` the map's minimum, the padding of ``pad`` cut off first).

The mode travels to the ~15 call sites of ``load_image(path, size)``, ``load_mask(paths, size)``
and ``ImageDataset(samples, size)`` in the methods through a context variable, so they need no
change: ``with resize_mode("pad"): ...`` (default ``squash``). ``ImageDataset`` reads it when it
is constructed, so a DataLoader's worker processes use the mode of the code that built it.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from PIL import Image

from defectlab.errors import ConfigError

RESIZE_MODES = ("squash", "shorter_side_crop", "resize_crop", "pad")
#: ``resize_crop``: the crop keeps this share of the resized shorter side (224 / 256)
CROP_FRACTION = 224 / 256
#: the normalisation every model input gets (ImageDataset)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: the padding of mode ``pad``: the ImageNet mean colour in 8 bits, (124, 116, 104)
PAD_RGB = tuple(round(255 * m) for m in IMAGENET_MEAN)

_MODE: contextvars.ContextVar[str] = contextvars.ContextVar("defectlab_resize_mode", default="squash")


def check_mode(mode: str) -> str:
    if mode not in RESIZE_MODES:
        raise ConfigError(f"resize mode {mode!r}: must be one of {', '.join(RESIZE_MODES)}")
    return mode


@contextlib.contextmanager
def resize_mode(mode: str) -> Iterator[str]:
    """Within the block, ``load_image`` / ``load_mask`` / ``ImageDataset`` resize with ``mode``."""
    token = _MODE.set(check_mode(mode))
    try:
        yield mode
    finally:
        _MODE.reset(token)


def current_mode(mode: str | None = None) -> str:
    """``mode`` if given, else the mode of the enclosing ``resize_mode`` block (default squash)."""
    return check_mode(mode) if mode is not None else _MODE.get()


# --------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class Axis:
    """One axis of the mapping: the original's interval [orig_start, orig_start + orig_len)
    (continuous pixel-edge coordinates) lands on the model's [out_start, out_start + out_len)."""

    orig_start: float
    orig_len: float
    out_start: int
    out_len: int

    @property
    def scale(self) -> float:
        """Model pixels per original pixel."""
        return self.out_len / self.orig_len


def hw(size) -> tuple[int, int]:
    """``size`` (int: square, or (h, w)) as (h, w)."""
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    h, w = size
    return int(h), int(w)


def geometry(h: int, w: int, size, mode: str) -> tuple[Axis, Axis]:
    """(rows, columns) mapping of an h x w image onto the ``size`` input (int: square, or
    (out_h, out_w)) for ``mode``."""
    mode = check_mode(mode)
    oh, ow = hw(size)
    if mode == "squash":
        return Axis(0.0, h, 0, oh), Axis(0.0, w, 0, ow)
    if mode in ("shorter_side_crop", "resize_crop"):
        scale = max(oh / h, ow / w)                      # covers the target
        if mode == "resize_crop":
            scale /= CROP_FRACTION
        ch, cw = oh / scale, ow / scale                  # the window of the original that is kept
        return Axis((h - ch) / 2, ch, 0, oh), Axis((w - cw) / 2, cw, 0, ow)
    if h * ow >= w * oh:                                 # fits in the target: height-limited
        nh, nw = oh, max(1, round(w * oh / h))
    else:
        nh, nw = max(1, round(h * ow / w)), ow
    return Axis(0.0, h, (oh - nh) // 2, nh), Axis(0.0, w, (ow - nw) // 2, nw)


def _box(rows: Axis, cols: Axis) -> tuple[float, float, float, float]:
    return (cols.orig_start, rows.orig_start, cols.orig_start + cols.orig_len, rows.orig_start + rows.orig_len)


def _forward(im: Image.Image, size, mode: str, resample, fill) -> Image.Image:
    rows, cols = geometry(im.height, im.width, size, mode)
    oh, ow = hw(size)
    if mode == "squash":
        return im.resize((ow, oh), resample)
    if mode in ("shorter_side_crop", "resize_crop"):
        return im.resize((ow, oh), resample, box=_box(rows, cols))
    canvas = Image.new(im.mode, (ow, oh), fill)
    canvas.paste(im.resize((cols.out_len, rows.out_len), resample), (cols.out_start, rows.out_start))
    return canvas


def resize_image(im: Image.Image, size, mode: str = "squash") -> Image.Image:
    """``im`` at ``size`` (int: size x size, or (h, w); bilinear) with ``mode``; ``pad`` fills with the ImageNet mean colour
    (RGB images) or 0 (other modes)."""
    return _forward(im, size, mode, Image.BILINEAR, PAD_RGB if im.mode == "RGB" else 0)


def resize_mask(mask: np.ndarray, size, mode: str = "squash") -> np.ndarray:
    """Bool mask HxW at ``size`` (bool, nearest), with the geometry of ``resize_image``; the
    padding of ``pad`` is defect-free."""
    im = Image.fromarray(np.asarray(mask, dtype=bool).astype(np.uint8) * 255)
    return np.asarray(_forward(im, size, mode, Image.NEAREST, 0)) > 0


def area_scale(h: int, w: int, size, mode: str) -> float:
    """Model pixels per original pixel (area): what a defect's area is multiplied by."""
    rows, cols = geometry(h, w, size, mode)
    return rows.scale * cols.scale


def _sample_axis(axis: Axis, n_orig: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For each original pixel along one axis: (lower index, upper index, upper weight, inside)."""
    centres = np.arange(n_orig, dtype=np.float64) + 0.5
    inside = (centres >= axis.orig_start) & (centres <= axis.orig_start + axis.orig_len)
    pos = axis.out_start + (centres - axis.orig_start) * axis.scale - 0.5
    pos = np.clip(pos, axis.out_start, axis.out_start + axis.out_len - 1)   # never read the padding
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, axis.out_start + axis.out_len - 1)
    return lo, hi, pos - lo, inside


def map_to_original(m: np.ndarray, orig_h: int, orig_w: int, mode: str = "squash") -> np.ndarray:
    """A map at the model input's size (square or not) as orig_h x orig_w float32 (bilinear, the
    inverse of ``resize_image``'s geometry). ``shorter_side_crop`` / ``resize_crop``: pixels
    outside the crop get the map's minimum; ``pad``: the padding is cut off before the resize."""
    m = np.asarray(m, dtype=np.float64)
    if m.ndim != 2:
        raise ValueError(f"map_to_original expects a 2-D map (got shape {m.shape})")
    rows, cols = geometry(orig_h, orig_w, m.shape, mode)
    r0, r1, rw, r_in = _sample_axis(rows, orig_h)
    c0, c1, cw, c_in = _sample_axis(cols, orig_w)
    by_row = m[r0] * (1 - rw)[:, None] + m[r1] * rw[:, None]                  # orig_h x size
    out = by_row[:, c0] * (1 - cw)[None, :] + by_row[:, c1] * cw[None, :]     # orig_h x orig_w
    out[~(r_in[:, None] & c_in[None, :])] = m.min()
    return out.astype(np.float32)
