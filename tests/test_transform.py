"""Resize modes (defectlab.data.transform): each mode's geometry on a non-square image with a
marked block, the inverse map, squash bit-identical to the plain PIL resize, and the context
variable that carries the mode to load_image / load_mask / ImageDataset."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from defectlab.data import ImageDataset, Sample, load_defect_masks, load_image, load_mask
from defectlab.data.transform import PAD_RGB, map_to_original, resize_image, resize_mask, resize_mode
from defectlab.errors import ConfigError

H, W, SIZE = 60, 120, 30          # non-square: 2:1, model input 30 x 30
BLOCK = (slice(30, 36), slice(70, 76))   # 6 x 6 marked block, centre (33, 73) in pixel-edge coordinates


def _marked() -> np.ndarray:
    img = np.zeros((H, W, 3), np.uint8)
    img[BLOCK] = 255
    return img


def _centroid(gray: np.ndarray) -> tuple[float, float]:
    """Intensity-weighted centre, in pixel-index coordinates (pixel i covers [i, i+1))."""
    w = gray.astype(np.float64)
    ys, xs = np.indices(w.shape)
    return float((w * ys).sum() / w.sum()), float((w * xs).sum() / w.sum())


def _expected(centre_edge: tuple[float, float]) -> tuple[float, float]:
    return centre_edge[0] - 0.5, centre_edge[1] - 0.5


@pytest.mark.parametrize("mode, centre_edge, content_rows", [
    # squash: rows x 30/60, cols x 30/120
    ("squash", (33 * 0.5, 73 * 0.25), slice(0, SIZE)),
    # shorter side 60 -> 30 (x 0.5), centred crop of the 120 px width starts at column 30
    ("shorter_side_crop", (33 * 0.5, (73 - 30) * 0.5), slice(0, SIZE)),
    # longer side 120 -> 30 (x 0.25): 15 content rows, padded by (30 - 15) // 2 = 7 on top
    ("pad", (7 + 33 * 0.25, 73 * 0.25), slice(7, 22)),
])
def test_geometry_of_each_mode(mode, centre_edge, content_rows):
    out = np.asarray(resize_image(Image.fromarray(_marked()), SIZE, mode))
    assert out.shape == (SIZE, SIZE, 3)
    content = out[content_rows, :, 0]
    cy, cx = _centroid(content)
    ey, ex = _expected(centre_edge)
    assert cy + content_rows.start == pytest.approx(ey, abs=0.3) and cx == pytest.approx(ex, abs=0.3)
    mask = np.zeros((H, W), bool)
    mask[BLOCK] = True
    m = resize_mask(mask, SIZE, mode)
    assert m.dtype == bool and m.shape == (SIZE, SIZE)
    my, mx = _centroid(m)
    assert my == pytest.approx(ey, abs=1.0) and mx == pytest.approx(ex, abs=1.0)
    if mode == "pad":
        assert (out[:7] == PAD_RGB).all() and (out[22:] == PAD_RGB).all()   # ImageNet mean colour
        assert not m[:7].any() and not m[22:].any()
        assert (out[7:22, :, 0] < 255).any() and (out[10, 0] == 0).all()   # the content is black there


def test_crop_drops_what_lies_outside_and_squash_keeps_it():
    img = np.zeros((H, W, 3), np.uint8)
    img[:, :20] = 255                                     # the leftmost 20 columns: outside the crop
    crop = np.asarray(resize_image(Image.fromarray(img), SIZE, "shorter_side_crop"))
    squash = np.asarray(resize_image(Image.fromarray(img), SIZE, "squash"))
    assert crop.max() == 0 and squash.max() == 255


def test_squash_is_plain_pil_bilinear(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "x.png"
    Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(path)
    plain = np.asarray(Image.open(path).convert("RGB").resize((SIZE, SIZE), Image.BILINEAR), np.float32) / 255.0
    assert np.array_equal(load_image(path, SIZE), plain)
    assert np.array_equal(load_image(path, SIZE, resize="squash"), plain)
    mask_path = tmp_path / "m.png"
    mask = np.zeros((H, W), np.uint8)
    mask[5:17, 40:71] = 255
    Image.fromarray(mask).save(mask_path)
    plain_mask = np.asarray(Image.fromarray(mask).resize((SIZE, SIZE), Image.NEAREST)) > 0
    assert np.array_equal(load_mask([mask_path], SIZE), plain_mask)


def _smooth() -> np.ndarray:
    ys, xs = np.mgrid[0:H, 0:W].astype(np.float64)
    return (np.sin(2 * np.pi * xs / W) * np.cos(np.pi * ys / H) + 0.3 * ys / H).astype(np.float32)


@pytest.mark.parametrize("mode", ["squash", "shorter_side_crop", "pad"])
def test_map_to_original_inverts_the_geometry(mode):
    f = _smooth()
    small = np.asarray(resize_image(Image.fromarray(f, "F"), SIZE, mode), np.float32)
    back = map_to_original(small, H, W, mode)
    assert back.shape == (H, W) and back.dtype == np.float32
    inside = np.ones((H, W), bool)
    if mode == "shorter_side_crop":
        inside[:, :30] = inside[:, 90:] = False             # the crop covered columns 30..89
        assert np.all(back[~inside] == small.min())
    # half a model pixel (2 original pixels) from an edge, bilinear can only extrapolate: leave it out
    interior = ndimage.binary_erosion(inside, iterations=4, border_value=0)
    err = np.abs(back - f)[interior]
    assert err.max() < 0.03 and err.mean() < 0.01, (err.max(), err.mean())
    assert np.abs(back - f)[inside].max() < 0.15
    if mode == "pad":                                       # the padding (0) is never read back
        assert back.min() >= f.min() - 0.05


def test_map_to_original_rejects_a_map_that_is_not_2d():
    with pytest.raises(ValueError, match="2-D"):
        map_to_original(np.zeros((2, 4, 5)), 8, 8)


def test_mode_travels_through_the_context(tmp_path):
    path = tmp_path / "x.png"
    Image.fromarray(_marked()).save(path)
    mask_path = tmp_path / "x_mask.png"
    Image.fromarray((_marked()[..., 0] > 0).astype(np.uint8) * 255).save(mask_path)
    squash = load_image(path, SIZE)
    with resize_mode("pad"):
        padded = load_image(path, SIZE)
        ds = ImageDataset([Sample(path, 1, "crack", (mask_path,), "structural")], SIZE, normalize=False)
        assert np.array_equal(load_mask([mask_path], SIZE), resize_mask(_marked()[..., 0] > 0, SIZE, "pad"))
    assert np.array_equal(padded, load_image(path, SIZE, resize="pad")) and not np.array_equal(padded, squash)
    assert np.array_equal(load_image(path, SIZE), squash)          # the block restored the default
    item = ds[0]                                                  # built in the block: keeps "pad"
    assert item["orig_size"] == (H, W) and item["has_mask"] is True
    assert np.allclose(item["image"].permute(1, 2, 0).numpy(), padded)
    assert (item["mask"][0].numpy() > 0).sum() == resize_mask(_marked()[..., 0] > 0, SIZE, "pad").sum()
    with pytest.raises(ConfigError, match="squash, shorter_side_crop, resize_crop, pad"):
        with resize_mode("crop"):
            pass


def test_defect_masks_follow_the_mode(tmp_path):
    """sPRO's per-defect masks have the maps' geometry, saturation scaled by the area ratio."""
    mask = np.zeros((H, W), np.uint8)
    mask[BLOCK] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    sample = Sample(tmp_path / "x.png", 1, "crack", (tmp_path / "m.png",))
    with resize_mode("shorter_side_crop"):
        [(m, sat)] = load_defect_masks(sample, None, SIZE)
    assert np.array_equal(m, resize_mask(mask > 0, SIZE, "shorter_side_crop"))
    assert sat == pytest.approx(36 * 0.25)                 # 6 x 6 pixels, x 0.5 per axis
    [(_, sat_pad)] = load_defect_masks(sample, None, SIZE, resize="pad")
    assert sat_pad == pytest.approx(36 * 0.25 * 0.25)
