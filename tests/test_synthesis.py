"""Training-time anomaly synthesis: Perlin masks, SLSG structural/logical simulation,
CutPaste, foreground estimate, textures and the synthesis cache."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from defectlab.errors import ConfigError, ResourceMissingError
from defectlab.synthesis import (
    DTD_URL,
    TextureSource,
    cutpaste,
    foreground_mask,
    logical_anomaly,
    paste_region,
    perlin_mask,
    perlin_noise,
    permute_patches,
    procedural_texture,
    structural_anomaly,
    texture_anomaly,
)
from defectlab.synthesis.cache import SynthDataset, build_cache, load_cache

S = 64


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def object_image(seed: int, size: int = S) -> np.ndarray:
    """A textured disk (the object) on a flat grey background, float32 HxWx3."""
    r = rng(seed)
    img = np.full((size, size, 3), 0.2, dtype=np.float32)
    y, x = np.mgrid[0:size, 0:size]
    disk = (x - size / 2) ** 2 + (y - size / 2) ** 2 < (0.3 * size) ** 2
    img[disk] = 0.5 + 0.4 * r.random((int(disk.sum()), 3))
    return img


def disk_mask(size: int = S) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size]
    return (x - size / 2) ** 2 + (y - size / 2) ** 2 < (0.3 * size) ** 2


# --------------------------------------------------------------------------- Perlin


def test_perlin_mask_is_non_empty_and_deterministic() -> None:
    for seed in range(20):
        mask = perlin_mask((S, S), rng(seed))
        assert mask.dtype == bool and mask.shape == (S, S) and mask.any()
        assert np.array_equal(mask, perlin_mask((S, S), rng(seed)))
    assert not np.array_equal(perlin_mask((S, S), rng(0)), perlin_mask((S, S), rng(1)))


def test_perlin_mask_area_falls_with_threshold() -> None:
    low = np.mean([perlin_mask((S, S), rng(s), threshold=0.2).mean() for s in range(20)])
    high = np.mean([perlin_mask((S, S), rng(s), threshold=0.5).mean() for s in range(20)])
    assert low > 2 * high > 0


def test_perlin_noise_any_resolution_is_bounded() -> None:
    noise = perlin_noise((50, 70), (3, 4), rng(0), angle=0.3)
    assert noise.shape == (50, 70)
    assert np.abs(noise).max() <= np.sqrt(0.5) + 1e-6 and noise.std() > 0.05


# --------------------------------------------------------------------------- foreground


def test_foreground_of_object_and_texture() -> None:
    fg = foreground_mask(object_image(0), "object")
    truth = disk_mask()
    assert (fg & truth).sum() / (fg | truth).sum() > 0.9
    assert foreground_mask(object_image(0), "texture").all()
    uint8 = (object_image(0) * 255).astype(np.uint8)
    assert np.array_equal(foreground_mask(uint8, "object"), fg)


# --------------------------------------------------------------------------- structural


def test_structural_changes_only_masked_pixels_by_delta_blend() -> None:
    img = object_image(1)
    fg = foreground_mask(img, "object")
    methods = set()
    for seed in range(12):
        res = structural_anomaly(img, rng(seed), fg=fg)
        methods.add(res.method)
        assert res.kind == "structural" and 0.2 <= res.delta <= 1.0
        assert res.mask.any() and not (res.mask & ~fg).any()
        changed = np.abs(res.image - img).max(-1) > 1e-6
        assert not (changed & ~res.mask).any()
        expected = (1 - res.delta) * img + res.delta * res.source
        np.testing.assert_allclose(res.image[res.mask], expected[res.mask], atol=1e-5)
    assert methods == {"texture", "self_permute"}


def test_texture_anomaly_uses_textures_only() -> None:
    img = object_image(2)
    for seed in range(4):
        res = texture_anomaly(img, rng(seed), TextureSource(), None)
        assert res.method == "texture" and res.mask.any()


def test_permutation_source_is_a_patch_permutation() -> None:
    img = rng(3).random((66, 66, 3)).astype(np.float32)  # 66 = 4 * 16 + 2 leftover rows/columns
    out = permute_patches(img, rng(4), 4)
    assert not np.array_equal(out, img)
    np.testing.assert_array_equal(out[64:], img[64:])
    np.testing.assert_array_equal(out[:, 64:], img[:, 64:])

    def patches(a: np.ndarray) -> list[bytes]:
        corners = [(y, x) for y in range(0, 64, 16) for x in range(0, 64, 16)]
        return sorted(a[y : y + 16, x : x + 16].tobytes() for y, x in corners)

    assert patches(out) == patches(img)


# --------------------------------------------------------------------------- logical


def test_logical_copies_the_other_image_into_compact_blobs() -> None:
    img, other = object_image(5), object_image(6)
    fg = disk_mask()
    res = logical_anomaly(img, other, rng(0), fg=fg, delta=(1.0, 1.0), max_angle=0.0)
    assert res.kind == "logical" and res.method == "logical_paste"
    assert res.mask.any() and not (res.mask & ~fg).any()
    np.testing.assert_array_equal(res.image[res.mask], other[res.mask])
    np.testing.assert_array_equal(res.image[~res.mask], img[~res.mask])
    assert ndimage.label(res.mask)[1] <= 2

    rotated = logical_anomaly(img, other, rng(1), delta=(1.0, 1.0))
    np.testing.assert_array_equal(rotated.image[rotated.mask], rotated.source[rotated.mask])
    assert not np.array_equal(rotated.source, other)


def test_logical_masks_are_larger_than_structural_ones() -> None:
    img, other = object_image(5), object_image(6)
    logical = np.mean([logical_anomaly(img, other, rng(s)).mask.mean() for s in range(10)])
    structural = np.mean([structural_anomaly(img, rng(s)).mask.mean() for s in range(10)])
    assert logical > 2 * structural


# --------------------------------------------------------------------------- CutPaste


@pytest.mark.parametrize("scar", [False, True])
def test_cutpaste_mask_matches_changed_pixels(scar: bool) -> None:
    img = rng(7).random((S, S, 3)).astype(np.float32)
    for seed in range(5):
        out, mask = cutpaste(img, rng(seed), scar=scar)
        changed = (out != img).any(-1)
        assert mask.any() and not (changed & ~mask).any()
        assert changed.sum() >= 0.9 * mask.sum()
        if not scar:
            assert 0.01 <= mask.mean() <= 0.2


def test_paste_region_copies_source_pixels() -> None:
    dst = np.zeros((S, S, 3), dtype=np.float32)
    src = rng(8).random((40, 40, 3)).astype(np.float32)
    src_mask = np.zeros((40, 40), dtype=bool)
    src_mask[10:20, 5:30] = True
    out, mask = paste_region(dst, src, src_mask, rng(0), rotate=False)
    assert mask.sum() == src_mask.sum()
    np.testing.assert_array_equal(np.sort(out[mask].ravel()), np.sort(src[src_mask].ravel()))
    assert not out[~mask].any()
    out, mask = paste_region(dst, src, src_mask, rng(1))
    assert abs(int(mask.sum()) - int(src_mask.sum())) <= 0.25 * src_mask.sum()
    assert set(map(tuple, out[mask])) <= set(map(tuple, src[src_mask]))


# --------------------------------------------------------------------------- textures


def test_procedural_textures_and_dtd_folder(tmp_path: Path) -> None:
    textures = [procedural_texture((32, 48), rng(s)) for s in range(8)]
    assert all(t.shape == (32, 48, 3) and t.dtype == np.float32 for t in textures)
    assert all(0 <= t.min() and t.max() <= 1 for t in textures)
    assert np.array_equal(textures[0], procedural_texture((32, 48), rng(0)))
    (tmp_path / "dtd" / "images" / "banded").mkdir(parents=True)
    Image.fromarray((rng(0).random((60, 80, 3)) * 255).astype(np.uint8)).save(
        tmp_path / "dtd" / "images" / "banded" / "a.jpg"
    )
    sample = TextureSource(tmp_path / "dtd").sample((S, S), rng(0))
    assert sample.shape == (S, S, 3) and 0 <= sample.min() <= sample.max() <= 1


def test_missing_dtd_folder_says_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(ResourceMissingError, match="dtd_dir") as err:
        TextureSource(tmp_path / "no_dtd")
    assert DTD_URL in str(err.value)
    assert DTD_URL == "https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz"


# --------------------------------------------------------------------------- cache


@pytest.fixture()
def normal_images(tmp_path: Path) -> list[Path]:
    paths = []
    for i in range(4):
        path = tmp_path / "prepared" / "train" / "good" / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((object_image(10 + i) * 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def _build(paths: list[Path], out: Path, **overrides: object) -> None:
    kwargs = dict(
        n=8, seed=1, image_size=48, kinds={"structural": 0.5, "logical": 0.5}, object_kind="object"
    )
    kwargs.update(overrides)
    build_cache(paths, out, **kwargs)


def test_cache_contents_and_determinism(normal_images: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "synth"
    _build(normal_images, out, params={"delta": [0.5, 1.0]})
    with open(out / "index.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8
    assert list(rows[0]) == [
        "file", "mask", "kind", "method", "source_image", "other_image", "delta"
    ]
    names = {f"{i:03d}.png" for i in range(4)}
    for row in rows:
        assert row["kind"] in {"structural", "logical"}
        methods = {"logical_paste"} if row["kind"] == "logical" else {"texture", "self_permute"}
        assert row["method"] in methods
        assert row["source_image"] in names
        assert (row["other_image"] in names - {row["source_image"]}) == (row["kind"] == "logical")
        assert 0.5 <= float(row["delta"]) <= 1.0
        with Image.open(out / row["mask"]) as m:
            assert m.size == (48, 48) and np.asarray(m).max() == 255
    assert {r["kind"] for r in rows} == {"structural", "logical"}
    params = json.loads((out / "params.json").read_text())
    assert params["seed"] == 1 and params["params"] == {"delta": [0.5, 1.0]}

    again = tmp_path / "again"
    _build(normal_images, again, params={"delta": [0.5, 1.0]})
    for path in sorted(out.rglob("*")):
        if path.is_file():
            assert path.read_bytes() == (again / path.relative_to(out)).read_bytes(), path

    rows = load_cache(out)
    assert rows[0]["image"].is_file() and isinstance(rows[0]["delta"], float)
    item = SynthDataset(out, size=32)[0]
    assert item["image"].shape == (3, 32, 32) and item["mask"].shape == (1, 32, 32)
    assert set(item["mask"].unique().tolist()) <= {0.0, 1.0} and item["kind"] == rows[0]["kind"]


def test_cache_refuses_bad_settings(normal_images: list[Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cutout"):
        _build(normal_images, tmp_path / "a", kinds={"cutout": 1.0})
    with pytest.raises(ConfigError, match="colour"):
        _build(normal_images, tmp_path / "b", params={"colour": 1})
    with pytest.raises(ResourceMissingError, match="dtd"):
        _build(normal_images, tmp_path / "c", dtd_dir=tmp_path / "missing_dtd")
    assert not (tmp_path / "a").exists()
