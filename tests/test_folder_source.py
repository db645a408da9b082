"""``source: folder`` through `prepare` (unit level, no DVC): a user's MVTec-format tree with
non-square images, one category without masks for one defect type (``masks: optional``), one
with ``validation/good`` and defects.json; the links, the manifests, the validation split, null
pixel metrics, bad files and missing categories. Also a registry source restricted to one
category, from an archive and from an unpacked folder that hold only that category."""

from __future__ import annotations

import csv
import dataclasses
import errno
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from defectlab import pipeline
from defectlab.config import EvalParams, Params
from defectlab.data import ImageDataset, registry
from defectlab.data.split import hold_out_validation, n_held_out
from defectlab.errors import ConfigError, DatasetError
from defectlab.pipeline import Layout, category_data, metrics_for, prepare

W, H = 48, 32        # every image is non-square
N_TRAIN = 10


def _image(seed: int, defect: bool = False) -> Image.Image:
    rng = np.random.default_rng(seed)
    im = Image.fromarray(rng.integers(60, 120, (H, W, 3), dtype=np.uint8))
    draw = ImageDraw.Draw(im)
    draw.ellipse((10, 6, 38, 26), fill=(150, 150, 160))
    if defect:
        draw.line((14, 10, 30, 20), fill=(20, 20, 20), width=2)
    return im


def _mask() -> Image.Image:
    m = Image.new("L", (W, H), 0)
    ImageDraw.Draw(m).line((14, 10, 30, 20), fill=255, width=2)
    return m


def _save(im: Image.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)
    return path


def _user_folder(root: Path) -> Path:
    """screws: no defects.json; 'scratch' has masks, 'dent' has none. plates: validation/good and
    defects.json. unused: a category the params do not list."""
    for cat in ("screws", "plates", "unused"):
        for i in range(N_TRAIN):
            _save(_image(100 * len(cat) + i), root / cat / "train" / "good" / f"img_{i:02d}.png")
        for i in range(3):
            _save(_image(500 + i), root / cat / "test" / "good" / f"{i:03d}.png")
    for i in range(2):
        _save(_image(600 + i, True), root / "screws" / "test" / "scratch" / f"{i:03d}.png")
        _save(_mask(), root / "screws" / "ground_truth" / "scratch" / f"{i:03d}_mask.png")
        _save(_image(700 + i, True), root / "screws" / "test" / "dent" / f"{i:03d}.png")   # no mask
        _save(_image(800 + i, True), root / "plates" / "test" / "crack" / f"{i:03d}.png")
        _save(_mask(), root / "plates" / "ground_truth" / "crack" / f"{i:03d}_mask.png")
        _save(_image(900 + i), root / "plates" / "validation" / "good" / f"v{i}.png")
    (root / "plates" / "defects.json").write_text(json.dumps({"crack": "structural"}))
    (root / "screws" / "README.txt").write_text("not an image: left out")
    return root


def _params(folder: Path, **overrides) -> Params:
    spec = {"source": "folder", "root": str(folder), "categories": ["screws", "plates"], "masks": "optional",
            "image_size": 32, **overrides}
    return Params({"seed": 0, "run": {"datasets": ["parts"], "categories": ["screws", "plates"], "methods": []},
                   "datasets": {"parts": spec}})


@pytest.fixture
def folder(tmp_path) -> Path:
    return _user_folder(tmp_path / "userdata")


@pytest.fixture
def layout(tmp_path) -> Layout:
    return Layout(tmp_path / "project")


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _tree(folder: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under ``folder``."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- layout, links, manifests


def test_prepare_links_listed_categories_and_writes_manifests(folder, layout):
    summary = prepare(_params(folder), "parts", layout)
    out = layout.prepared("parts")
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["plates", "screws"]   # not 'unused'
    assert summary["screws"] == {"train": N_TRAIN, "validation": 4, "test": 7, "link_mode": "hardlink"}
    assert summary["plates"] == {"train": N_TRAIN, "validation": 2, "test": 5, "link_mode": "hardlink"}
    src = folder / "screws" / "train" / "good" / "img_03.png"
    assert (out / "screws" / "train" / "good" / "img_03.png").stat().st_ino == src.stat().st_ino
    assert (out / "plates" / "defects.json").exists() and not (out / "screws" / "README.txt").exists()
    assert not any(p.is_symlink() for p in out.rglob("*"))
    assert json.loads((out / "SOURCE.json").read_text())["link_mode"] == {"screws": "hardlink", "plates": "hardlink"}

    rows = _rows(out / "manifest.csv")
    for cat in ("screws", "plates"):
        per_cat = _rows(out / cat / "manifest.csv")
        assert per_cat == [r for r in rows if r["category"] == cat]
        for r in per_cat:
            assert hashlib.sha256((out / r["path"]).read_bytes()).hexdigest() == r["sha256"]
    screws = _rows(out / "screws" / "manifest.csv")
    dent = [r for r in screws if r["defect_type"] == "dent"]
    assert len(dent) == 2 and all(r["label"] == "1" and r["masks"] == "" and r["kind"] == "unknown" for r in dent)
    held = [r for r in screws if r["split"] == "validation"]
    assert len(held) == 4 and all(r["path"].startswith("screws/train/good/") for r in held)
    plates_val = [r["path"] for r in _rows(out / "plates" / "manifest.csv") if r["split"] == "validation"]
    assert plates_val == ["plates/validation/good/v0.png", "plates/validation/good/v1.png"]


def test_copies_when_hard_links_fail(folder, layout, monkeypatch):
    def no_link(src, dst, **kw):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_link)
    summary = prepare(_params(folder), "parts", layout)
    assert {s["link_mode"] for s in summary.values()} == {"copy"}
    src = folder / "screws" / "train" / "good" / "img_03.png"
    dst = layout.prepared("parts") / "screws" / "train" / "good" / "img_03.png"
    assert dst.stat().st_ino != src.stat().st_ino and dst.read_bytes() == src.read_bytes()
    assert not dst.is_symlink()


def test_one_changed_image_changes_only_its_category(folder, layout):
    params = _params(folder)
    prepare(params, "parts", layout)
    out = layout.prepared("parts")
    before = {cat: _tree(out / cat) for cat in ("screws", "plates")}
    _save(_image(4242), folder / "screws" / "train" / "good" / "img_99.png")          # add one
    (folder / "screws" / "test" / "good" / "001.png").unlink()                         # remove one
    prepare(params, "parts", layout)
    after = {cat: _tree(out / cat) for cat in ("screws", "plates")}
    assert after["plates"] == before["plates"]
    changed = {k for k in before["screws"].keys() | after["screws"].keys()
               if before["screws"].get(k) != after["screws"].get(k)}
    assert changed == {"train/good/img_99.png", "test/good/001.png", "manifest.csv"}


def test_merged_accepted_image_never_writes_through_a_link(folder, layout):
    """An accepted image with the name of a linked file replaces the link: the user's file stays."""
    original = (folder / "screws" / "train" / "good" / "img_00.png").read_bytes()
    accepted = layout.root / "data" / "accepted" / "parts" / "screws"
    _save(_image(31337), accepted / "img_00.png")
    prepare(_params(folder), "parts", layout)
    assert (folder / "screws" / "train" / "good" / "img_00.png").read_bytes() == original
    assert ((layout.prepared("parts") / "screws" / "train" / "good" / "img_00.png").read_bytes()
            == (accepted / "img_00.png").read_bytes())


# --------------------------------------------------------------------------- bad input


def test_corrupt_file_is_one_error_and_nothing_is_written(folder, layout):
    bad = folder / "plates" / "test" / "crack" / "001.png"
    data = bad.read_bytes()
    bad.unlink()                          # a new file, not an edit through the hard link
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match="corrupt or truncated") as err:
        prepare(_params(folder), "parts", layout)
    assert err.value.path == bad
    assert not layout.prepared("parts").exists()
    assert not list((layout.root / "data" / "prepared").glob(".parts.*"))     # no temporary left


def test_bad_new_file_leaves_the_previous_version(folder, layout):
    params = _params(folder)
    prepare(params, "parts", layout)
    before = _tree(layout.prepared("parts"))
    (folder / "screws" / "train" / "good" / "zero.png").write_bytes(b"")
    with pytest.raises(DatasetError, match="empty file") as err:
        prepare(params, "parts", layout)
    assert err.value.path == folder / "screws" / "train" / "good" / "zero.png"
    assert _tree(layout.prepared("parts")) == before


def test_missing_categories_are_one_error_listing_existing_ones(folder, layout):
    params = _params(folder, categories=["screws", "bolts", "nuts"])
    with pytest.raises(DatasetError) as err:
        prepare(params, "parts", layout)
    msg = str(err.value)
    assert err.value.path == folder and "'bolts'" in msg and "'nuts'" in msg
    assert "plates, screws, unused" in msg
    assert not layout.prepared("parts").exists()


def test_masks_required_by_default(folder, layout):
    with pytest.raises(DatasetError, match="has no mask") as err:
        prepare(_params(folder, masks="required"), "parts", layout)
    assert err.value.path == folder / "screws" / "test" / "dent" / "000.png"


def test_folder_source_params_are_validated(folder):
    with pytest.raises(ConfigError, match=r"datasets\.parts\.root: .*required for source 'folder'"):
        _params(folder, root=None).dataset("parts")
    with pytest.raises(ConfigError, match=r"datasets\.parts\.root"):
        _params(folder, root="").dataset("parts")
    with pytest.raises(ConfigError, match=r"datasets\.parts\.validation_fraction"):
        _params(folder, validation_fraction=1.0).dataset("parts")
    with pytest.raises(ConfigError, match=r"datasets\.parts\.min_validation"):
        _params(folder, min_validation=-1).dataset("parts")
    with pytest.raises(ConfigError, match=r"datasets\.parts\.resize"):
        _params(folder, resize="stretch").dataset("parts")
    with pytest.raises(ConfigError, match=r"datasets\.parts\.masks"):
        _params(folder, masks="sometimes").dataset("parts")
    spec = _params(folder).dataset("parts")
    assert (spec.resize, spec.validation_fraction, spec.min_validation) == ("squash", 0.15, 4)


# --------------------------------------------------------------------------- validation split


def test_split_sizes():
    assert [n_held_out(n, 0.15, 4) for n in (1, 2, 3, 4, 8, 10, 40, 100)] == [0, 0, 1, 2, 4, 4, 6, 15]
    assert n_held_out(40, 0.0, 4) == 0 and n_held_out(40, 0.5, 0) == 20


def test_split_is_deterministic_and_stable_under_additions(folder, layout):
    from defectlab.data import scan_category

    data = scan_category(folder, "screws", masks_optional=True)
    a = hold_out_validation(data, 0.15, 4, seed=0)
    b = hold_out_validation(dataclasses.replace(data, train=list(reversed(data.train))), 0.15, 4, seed=0)
    assert {s.path for s in a.validation} == {s.path for s in b.validation} and len(a.validation) == 4
    assert {s.path for s in a.train} | {s.path for s in a.validation} == {s.path for s in data.train}
    assert not {s.path for s in a.train} & {s.path for s in a.validation}
    assert {s.path for s in hold_out_validation(data, 0.15, 4, seed=1).validation} != {s.path for s in a.validation}
    assert hold_out_validation(data, 0.0, 4, seed=0).validation == []
    # grow train/good one image at a time: each addition changes at most two assignments (the new
    # image's own and at most one existing image's)
    from defectlab.data import Sample

    names = [Sample(Path(f"/x/train/good/part_{i:04d}.png"), 0, "good") for i in range(60)]

    def held(n: int) -> set:
        split = hold_out_validation(dataclasses.replace(data, train=names[:n], validation=[]), 0.15, 4, seed=0)
        return {s.path for s in split.validation}

    for n in range(3, 59):
        before, after = held(n), held(n + 1)
        moved = {s.path for s in names[:n] if (s.path in before) != (s.path in after)}
        assert len(moved) <= 1 and len(moved) + (names[n].path in after) <= 2, (n, moved)

def test_category_data_holds_out_validation_and_fit_never_sees_it(folder, layout):
    params = _params(folder)
    prepare(params, "parts", layout)
    screws = category_data(params, "parts", "screws", layout)
    assert len(screws.train) == N_TRAIN - 4 and len(screws.validation) == 4
    manifest = _rows(layout.prepared("parts") / "screws" / "manifest.csv")
    assert sorted(s.path.name for s in screws.validation) == sorted(
        Path(r["path"]).name for r in manifest if r["split"] == "validation")
    ctx = pipeline.fit_context(params, "patchcore", "parts", "screws", layout, progress=False)
    assert not {s.path for s in ctx.data.train} & {s.path for s in ctx.data.validation}
    assert len(ctx.data.train) == N_TRAIN - 4
    plates = category_data(params, "parts", "plates", layout)   # validation/good present: used as is
    assert [s.path.name for s in plates.validation] == ["v0.png", "v1.png"] and len(plates.train) == N_TRAIN
    none = category_data(_params(folder, validation_fraction=0), "parts", "screws", layout)
    assert none.validation == [] and len(none.train) == N_TRAIN


# --------------------------------------------------------------------------- metrics


def _fake_out(samples, size: int = 32, seed: int = 0) -> dict:
    """What predict_loader returns, for a model whose scores rank anomalies slightly higher."""
    items = [ImageDataset(samples, size)[i] for i in range(len(samples))]
    rng = np.random.default_rng(seed)
    labels = np.array([it["label"] for it in items])
    return {"scores": rng.random(len(items)) + labels * 0.5, "maps": rng.random((len(items), size, size)).astype(np.float32),
            "labels": labels, "masks": np.stack([it["mask"][0].numpy() > 0.5 for it in items]),
            "paths": [it["path"] for it in items], "kinds": [it["kind"] for it in items],
            "defect_types": [it["defect_type"] for it in items]}


def test_missing_masks_make_pixel_metrics_null_with_a_reason(folder, layout):
    params = _params(folder)
    prepare(params, "parts", layout)
    data = category_data(params, "parts", "screws", layout)
    out = _fake_out(data.test)
    metrics, curves = metrics_for(out, EvalParams(), data.test, 32)
    for key in ("pixel_auroc", "pixel_ap", "pixel_f1_max", "aupro", "spro", "pixel_auroc_dent", "aupro_dent"):
        assert metrics[key] is None, key
    assert any("mask" in w and "2 of 4" in w for w in metrics["warnings"]), metrics["warnings"]
    assert isinstance(metrics["image_auroc"], float) and isinstance(metrics["image_ap"], float)
    assert isinstance(metrics["image_auroc_scratch"], float) and isinstance(metrics["image_auroc_dent"], float)
    assert isinstance(metrics["pixel_auroc_scratch"], float)       # this defect type has all its masks
    assert not any(k.endswith("_unknown") for k in metrics)          # no defects.json: no 'unknown' keys
    assert set(curves) == {"roc_image", "pr_image"}                  # no pixel curves from all-zero masks
    json.dumps(metrics, allow_nan=False)
    # the same from the batches' has_mask (no samples given)
    out["has_mask"] = [bool(s.mask_paths) for s in data.test]
    assert metrics_for(out, EvalParams())[0]["pixel_auroc"] is None


def test_defect_type_and_kind_keys(folder, layout):
    params = _params(folder)
    prepare(params, "parts", layout)
    data = category_data(params, "parts", "plates", layout)
    metrics, curves = metrics_for(_fake_out(data.test), EvalParams(), data.test, 32)
    assert metrics["image_auroc_crack"] == metrics["image_auroc_structural"] == metrics["image_auroc"]
    for key in ("pixel_auroc", "aupro", "spro", "pixel_auroc_crack", "spro_structural"):
        assert isinstance(metrics[key], float), key
    assert "roc_pixel" in curves and metrics["warnings"] == []


# --------------------------------------------------------------------------- registry sources, one category


def _png(value: int, size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _bottle_files() -> dict[str, bytes]:
    m = np.zeros((32, 32), np.uint8)
    m[8:16, 8:16] = 255
    buf = io.BytesIO()
    Image.fromarray(m).save(buf, format="PNG")
    files = {f"bottle/train/good/{i:03d}.png": _png(100 + i) for i in range(6)}
    files.update({"bottle/test/good/000.png": _png(90), "bottle/test/broken_large/000.png": _png(30),
                  "bottle/ground_truth/broken_large/000_mask.png": buf.getvalue()})
    return files


def _registry_params(raw: Path, categories) -> Params:
    return Params({"seed": 0, "run": {"datasets": ["mvtec_ad"], "categories": list(categories), "methods": []},
                   "datasets": {"mvtec_ad": {"source": "mvtec_ad", "root": str(raw), "categories": list(categories),
                                             "image_size": 32}}})


def test_registry_source_with_one_category_from_an_archive(tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    raw.mkdir()
    archive = raw / "mvtec_anomaly_detection.tar.xz"
    with tarfile.open(archive, "w:xz") as tar:
        for name, data in _bottle_files().items():
            info = tarfile.TarInfo(f"mvtec/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    spec = registry.REGISTRY["mvtec_ad"]
    sha = hashlib.sha256(archive.read_bytes()).hexdigest()
    monkeypatch.setitem(registry.REGISTRY, "mvtec_ad", dataclasses.replace(
        spec, archives=(dataclasses.replace(spec.archives[0], sha256=sha),)))
    layout = Layout(tmp_path / "project")
    summary = prepare(_registry_params(raw, ["bottle"]), "mvtec_ad", layout)
    assert summary["bottle"]["train"] == 6 and summary["bottle"]["test"] == 2
    out = layout.prepared("mvtec_ad")
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["bottle"]
    assert (out / "bottle" / "manifest.csv").exists()
    # a category the archive does not hold: one error naming the extracted tree and what it holds
    with pytest.raises(DatasetError, match=r"\['cable'\] not found.*it holds: bottle"):
        prepare(_registry_params(raw, ["bottle", "cable"]), "mvtec_ad", layout)
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["bottle"]     # previous version kept


def test_registry_source_with_one_category_from_an_unpacked_folder(tmp_path):
    raw = tmp_path / "raw"
    for name, data in _bottle_files().items():
        (raw / "unpacked" / name).parent.mkdir(parents=True, exist_ok=True)
        (raw / "unpacked" / name).write_bytes(data)
    layout = Layout(tmp_path / "project")
    summary = prepare(_registry_params(raw, ["bottle"]), "mvtec_ad", layout)
    assert summary["bottle"]["link_mode"] == "hardlink"
    assert (layout.prepared("mvtec_ad") / "bottle" / "test" / "broken_large" / "000.png").stat().st_ino == \
        (raw / "unpacked" / "bottle" / "test" / "broken_large" / "000.png").stat().st_ino
