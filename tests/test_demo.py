"""The embedded demo dataset: layout, determinism, defect kinds and mask/pixel agreement."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from defectlab.data.demo import CATEGORIES, generate_demo, render_sample
from defectlab.errors import ConfigError

SMALL = dict(image_size=64, n_train=3, n_test_good=2, n_test_per_defect=2)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("demo") / "demo"
    return root, generate_demo(root, seed=3, **SMALL)


def _digests(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_generation_is_bit_identical_for_a_seed(demo: tuple[Path, dict], tmp_path: Path) -> None:
    root, summary = demo
    again = tmp_path / "again"
    assert generate_demo(again, seed=3, **SMALL) == summary
    assert _digests(again) == _digests(root)


def test_another_seed_gives_other_images(tmp_path: Path) -> None:
    generate_demo(tmp_path / "a", seed=1, categories=["grain"], **SMALL)
    generate_demo(tmp_path / "b", seed=2, categories=["grain"], **SMALL)
    img = "grain/train/good/000.png"
    assert (tmp_path / "a" / img).read_bytes() != (tmp_path / "b" / img).read_bytes()


def test_mvtec_layout(demo: tuple[Path, dict]) -> None:
    root, summary = demo
    assert sorted(p.name for p in root.iterdir()) == sorted(CATEGORIES)
    for cat, info in summary["categories"].items():
        defects = json.loads((root / cat / "defects.json").read_text())
        assert defects == info["defects"] == CATEGORIES[cat].defects
        assert sorted(p.name for p in (root / cat / "test").iterdir()) == sorted(["good", *defects])
        for split, n in (("train/good", 3), ("test/good", 2)):
            files = sorted((root / cat / split).iterdir())
            assert [f.name for f in files] == [f"{i:03d}.png" for i in range(n)]
            with Image.open(files[0]) as im:
                assert im.mode == "RGB" and im.size == (64, 64)
        for defect in defects:
            images = sorted((root / cat / "test" / defect).glob("*.png"))
            assert len(images) == 2
            for img in images:
                mask_path = root / cat / "ground_truth" / defect / f"{img.stem}_mask.png"
                with Image.open(mask_path) as m:
                    assert m.mode == "L" and m.size == (64, 64)
                    mask = np.asarray(m)
                assert set(np.unique(mask)) == {0, 255}


def test_categories_cover_textures_objects_and_logical_defects() -> None:
    textures = [c for c, s in CATEGORIES.items() if s.kind == "texture"]
    objects = [c for c, s in CATEGORIES.items() if s.kind == "object"]
    assert len(textures) >= 2 and len(objects) >= 2
    for cat, spec in CATEGORIES.items():
        assert set(spec.defects.values()) <= {"structural", "logical"}
        assert list(spec.defects.values()).count("structural") >= 3
    for cat in objects:
        logical = {d for d, k in CATEGORIES[cat].defects.items() if k == "logical"}
        assert logical == {"missing_part", "extra_part", "misplaced_part", "wrong_colour"}
    for cat in textures:
        assert "logical" not in CATEGORIES[cat].defects.values()


@pytest.mark.parametrize("category", sorted(CATEGORIES))
def test_masks_mark_the_changed_pixels(category: str) -> None:
    for i, (defect, kind) in enumerate(CATEGORIES[category].defects.items()):
        sample = render_sample(category, defect, np.random.default_rng([7, i]), 64)
        changed = (sample.image != sample.clean).any(-1)
        assert sample.mask.any()
        assert not (changed & ~sample.mask).any(), f"{defect}: pixels changed outside the mask"
        if kind == "structural":
            assert np.array_equal(changed, sample.mask), defect
        else:  # the part's whole footprint is marked; most of it changes
            assert changed.sum() >= 0.15 * sample.mask.sum(), defect


def test_normal_images_vary_but_have_empty_masks() -> None:
    a, b = (render_sample("board", None, np.random.default_rng(s), 64) for s in (0, 1))
    assert not a.mask.any() and np.array_equal(a.image, a.clean)
    assert not np.array_equal(a.image, b.image)


def test_output_root_is_replaced_and_bad_category_refused(tmp_path: Path) -> None:
    root = tmp_path / "demo"
    root.mkdir()
    (root / "stale.txt").write_text("old")
    generate_demo(
        root, categories=["weave"], image_size=32, n_train=1, n_test_good=1, n_test_per_defect=1
    )
    assert not (root / "stale.txt").exists()
    with pytest.raises(ConfigError, match="nonsense"):
        generate_demo(tmp_path / "x", categories=["nonsense"])
