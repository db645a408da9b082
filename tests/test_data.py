"""The MVTec-format reader on good and bad input, LOCO per-defect masks, and the
per-dataset converters on small trees laid out like each public dataset."""

from __future__ import annotations

import csv
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from defectlab.data import (
    ImageDataset,
    load_defect_masks,
    load_defects_config,
    load_image,
    load_mask,
    mvtec,
    scan_category,
    verify_samples,
)
from defectlab.data import convert
from defectlab.errors import DatasetError

S = 32


def _save(path: Path, arr: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode).save(path) if mode else Image.fromarray(arr).save(path)
    return path


def _rgb(value: int = 120) -> np.ndarray:
    rng = np.random.default_rng(value)
    return rng.integers(0, 255, (S, S, 3), dtype=np.uint8)


def _mask(size: int = S) -> np.ndarray:
    m = np.zeros((size, size), np.uint8)
    m[4:12, 6:10] = 255
    return m


@pytest.fixture
def cat(tmp_path) -> Path:
    """A small valid category 'widget' under tmp_path/root."""
    base = tmp_path / "root" / "widget"
    for i in range(3):
        _save(base / "train" / "good" / f"{i:03d}.png", _rgb(i))
    _save(base / "test" / "good" / "000.png", _rgb(10))
    _save(base / "test" / "crack" / "000.png", _rgb(11))
    _save(base / "ground_truth" / "crack" / "000_mask.png", _mask())
    (base / "defects.json").write_text(json.dumps({"crack": "structural"}))
    return base


def _raises(root: Path, match: str, path_part: str | None = None, category: str = "widget"):
    with pytest.raises(DatasetError, match=match) as err:
        scan_category(root, category)
    if path_part is not None:
        assert path_part in str(err.value).split(": ")[0], str(err.value)
    return err.value


# --------------------------------------------------------------------------- good input


def test_scan_valid_category(cat):
    data = scan_category(cat.parent, "widget")
    assert [s.path.name for s in data.train] == ["000.png", "001.png", "002.png"]
    assert [(s.defect_type, s.label, s.kind) for s in data.test] == [("crack", 1, "structural"), ("good", 0, "good")]
    assert data.test[0].mask_paths == (cat / "ground_truth" / "crack" / "000_mask.png",)
    assert data.validation == []
    item = ImageDataset(data.test, 16)[0]
    assert item["image"].shape == (3, 16, 16) and item["mask"].shape == (1, 16, 16)
    assert 0 < item["mask"].sum() < 256


def test_demo_dataset_reads(tiny_demo):
    for category in ("weave", "board"):
        data = scan_category(tiny_demo, category)
        assert len(data.train) == 16
        assert {s.kind for s in data.test if s.label} <= {"structural", "logical"}
        assert verify_samples(data.test[:4]) == []


def test_btad_style_mask_name_and_other_extensions(cat):
    (cat / "ground_truth" / "crack" / "000_mask.png").rename(cat / "ground_truth" / "crack" / "000.png")
    img = cat / "test" / "crack" / "000.png"
    Image.open(img).convert("RGB").save(img.with_suffix(".BMP"))
    img.unlink()
    data = scan_category(cat.parent, "widget")
    assert data.test[0].path.name == "000.BMP"
    assert data.test[0].mask_paths[0].name == "000.png"


# --------------------------------------------------------------------------- conversions


def test_mode_conversions(tmp_path):
    gray = np.arange(S * S, dtype=np.uint8).reshape(S, S)
    out = load_image(_save(tmp_path / "g.png", gray))
    assert out.shape == (S, S, 3) and np.allclose(out[..., 0], gray / 255) and np.allclose(out[..., 2], gray / 255)

    rgba = np.dstack([_rgb(), np.full((S, S), 7, np.uint8)])
    assert np.allclose(load_image(_save(tmp_path / "a.png", rgba)), rgba[..., :3] / 255)

    pal = Image.fromarray(_rgb()).quantize(16)
    pal.save(tmp_path / "p.png")
    assert np.allclose(load_image(tmp_path / "p.png"), np.asarray(pal.convert("RGB")) / 255)

    sixteen = (np.arange(S * S, dtype=np.uint16).reshape(S, S) * 60)
    Image.fromarray(sixteen).save(tmp_path / "s16.png")
    assert Image.open(tmp_path / "s16.png").mode.startswith("I")
    got = load_image(tmp_path / "s16.png")[..., 1]
    assert np.abs(got - sixteen / 65535).max() <= 0.5 / 255 + 1e-6  # scaled, not clipped at 255

    floats = np.linspace(0, 1, S * S, dtype=np.float32).reshape(S, S)
    Image.fromarray(floats, "F").save(tmp_path / "f.tif")
    assert np.abs(load_image(tmp_path / "f.tif")[..., 0] - floats).max() <= 1 / 255

    assert load_image(tmp_path / "g.png", size=8).shape == (8, 8, 3)


def test_mask_modes(tmp_path):
    m = _mask()
    _save(tmp_path / "l.png", m)
    Image.fromarray(m > 0).save(tmp_path / "one.png")  # mode "1"
    Image.fromarray((m.astype(np.uint16) * 257)).save(tmp_path / "s16.png")
    _save(tmp_path / "rgb.png", np.dstack([m, 0 * m, 0 * m]))
    for name in ("l.png", "one.png", "s16.png", "rgb.png"):
        assert (load_mask([tmp_path / name]) == (m > 0)).all(), name
    assert load_mask([tmp_path / "l.png"], size=8).shape == (8, 8)


# --------------------------------------------------------------------------- bad input


def test_zero_byte_image(cat):
    (cat / "train" / "good" / "001.png").write_bytes(b"")
    _raises(cat.parent, "empty file", "001.png")


def test_non_image_with_image_extension(cat):
    (cat / "test" / "good" / "000.png").write_text("not really a png")
    _raises(cat.parent, "not a readable image", "test/good/000.png")


def test_truncated_image(cat):
    p = cat / "train" / "good" / "002.png"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    data_ = scan_category(cat.parent, "widget")  # the header is intact ...
    with pytest.raises(DatasetError, match="corrupt or truncated") as err:  # ... the pixels are not
        load_image(p)
    assert err.value.path == p
    with pytest.raises(DatasetError, match="corrupt or truncated"):
        verify_samples(data_.train)
    problems = verify_samples(data_.train, raise_first=False)  # batch mode: quarantine and go on
    assert [pp for pp, _ in problems] == [p]


def test_corrupt_header(cat):
    p = cat / "train" / "good" / "000.png"
    data = bytearray(p.read_bytes())
    data[16:24] = b"\xff" * 8  # IHDR width/height garbled, CRC now wrong
    p.write_bytes(bytes(data))
    err = _raises(cat.parent, "corrupt|too large|not a readable", "000.png")
    assert err.path == p


def test_mask_size_mismatch_names_both_files(cat):
    _save(cat / "ground_truth" / "crack" / "000_mask.png", _mask(16))
    err = _raises(cat.parent, "mask size 16x16 differs", "000_mask.png")
    assert str(cat / "test" / "crack" / "000.png") in str(err)


def test_missing_mask_for_defective_image(cat):
    (cat / "ground_truth" / "crack" / "000_mask.png").unlink()
    err = _raises(cat.parent, "no mask", "test/crack/000.png")
    assert "000_mask.png" in str(err)


def test_mask_for_good_image(cat):
    empty = _save(cat / "ground_truth" / "good" / "000_mask.png", np.zeros((S, S), np.uint8))
    assert scan_category(cat.parent, "widget").test[1].mask_paths == ()  # empty mask: ignored
    _save(empty, _mask())
    err = _raises(cat.parent, "marks defect pixels but its image", "good/000_mask.png")
    assert str(cat / "test" / "good" / "000.png") in str(err)


def test_empty_train_folder(cat):
    for p in (cat / "train" / "good").iterdir():
        p.unlink()
    (cat / "train" / "good" / "notes.txt").write_text("no images here")
    _raises(cat.parent, "no training images", "train/good")


def test_huge_image_refused_from_header(cat, monkeypatch):
    """A 9000x9000 PNG header with no pixel data: refused before decoding (81 MP > 80 MP)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 9000, 9000, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    p = cat / "train" / "good" / "001.png"
    p.write_bytes(png)
    _raises(cat.parent, "image too large .*9000x9000", "001.png")
    with pytest.raises(DatasetError, match="too large"):
        load_image(p)
    monkeypatch.setattr(mvtec, "MAX_PIXELS", 100)  # the limit is a setting
    (p).unlink()
    _raises(cat.parent, r"too large \(32x32", "train/good/000.png")


def test_symlink_outside_root_refused(cat, tmp_path):
    outside = _save(tmp_path / "elsewhere" / "x.png", _rgb(3))
    (cat / "train" / "good" / "link.png").symlink_to(outside)
    _raises(cat.parent, "symlink points outside the dataset root", "link.png")
    (cat / "train" / "good" / "link.png").unlink()
    (cat / "train" / "good" / "inside.png").symlink_to(cat / "train" / "good" / "000.png")
    assert len(scan_category(cat.parent, "widget").train) == 4  # a link inside the root is fine
    (cat / "test" / "extra").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    _raises(cat.parent, "symlink points outside", "test/extra")


def test_unknown_category_lists_valid(cat):
    _raises(cat.parent, "category not found; valid: widget", category="gadget")


def test_malformed_defects_json(cat):
    (cat / "defects.json").write_text("{not json")
    _raises(cat.parent, "malformed JSON", "defects.json")


# --------------------------------------------------------------------------- MVTec LOCO


def _loco_category(base: Path) -> None:
    for split in ("train", "validation"):
        _save(base / split / "good" / "000.png", _rgb(1))
    _save(base / "test" / "good" / "000.png", _rgb(2))
    _save(base / "test" / "logical_anomalies" / "000.png", _rgb(3))
    _save(base / "test" / "structural_anomalies" / "000.png", _rgb(4))
    a = np.zeros((S, S), np.uint8)
    a[0:10, 0:10] = 250  # 100 px, relative threshold 0.555 -> 55.5, truncated to 55 (official)
    b = np.zeros((S, S), np.uint8)
    b[20:30, 20:26] = 251  # 60 px, absolute threshold 40 -> 40
    c = np.zeros((S, S), np.uint8)
    c[5:7, 5:7] = 251  # 4 px, absolute threshold 40 capped at the defect's area
    _save(base / "ground_truth" / "logical_anomalies" / "000" / "000.png", a)
    _save(base / "ground_truth" / "logical_anomalies" / "000" / "001.png", b)
    _save(base / "ground_truth" / "structural_anomalies" / "000" / "000.png", c)
    (base / "defects_config.json").write_text(json.dumps([
        {"defect_name": "missing_thing", "pixel_value": 250, "saturation_threshold": 0.555, "relative_saturation": True},
        {"defect_name": "extra_thing", "pixel_value": 251, "saturation_threshold": 40, "relative_saturation": False},
    ]))


def test_loco_masks_and_saturation(tmp_path):
    src = tmp_path / "loco_raw" / "mvtec_loco_anomaly_detection"
    _loco_category(src / "juice_bottle")
    assert convert.locate_mvtec_loco(tmp_path / "loco_raw") == src
    convert.convert_mvtec_loco(src, tmp_path / "out", ["juice_bottle"])
    data = scan_category(tmp_path / "out", "juice_bottle")
    assert len(data.validation) == 1
    logical = next(s for s in data.test if s.defect_type == "logical_anomalies")
    assert logical.kind == "logical" and len(logical.mask_paths) == 2
    assert load_mask(logical.mask_paths).sum() == 160
    config = load_defects_config(tmp_path / "out" / "juice_bottle")
    assert config[250].defect_name == "missing_thing" and config[251].relative_saturation is False
    defects = load_defect_masks(logical, config)
    assert [(int(m.sum()), sat) for m, sat in defects] == [(100, 55.0), (60, 40.0)]
    structural = next(s for s in data.test if s.defect_type == "structural_anomalies")
    assert [sat for _, sat in load_defect_masks(structural, config)] == [4.0]
    resized = load_defect_masks(logical, config, size=16)
    assert resized[0][0].shape == (16, 16) and resized[0][1] == pytest.approx(55 * 16 ** 2 / 32 ** 2)
    # works with the project's sPRO metric
    from defectlab.metrics import spro

    maps = [np.zeros((S, S)), np.zeros((S, S))]
    maps[1][0:10, 0:10] = 1.0
    value = spro([[], load_defect_masks(logical, config)], maps)
    assert 0.0 <= value <= 1.0


def test_loco_unknown_grey_value(tmp_path):
    _loco_category(tmp_path / "r" / "pushpins")
    _save(tmp_path / "r" / "pushpins" / "ground_truth" / "structural_anomalies" / "000" / "000.png",
          _mask())  # grey 255 is not in the config
    data = scan_category(tmp_path / "r", "pushpins")
    s = next(s for s in data.test if s.defect_type == "structural_anomalies")
    with pytest.raises(DatasetError, match="grey value 255 is not in defects_config.json"):
        load_defect_masks(s, load_defects_config(tmp_path / "r" / "pushpins"))


# --------------------------------------------------------------------------- converters


def test_convert_btad(tmp_path):
    base = tmp_path / "raw" / "BTech_Dataset_transformed" / "03"
    for i in range(2):
        _save(base / "train" / "ok" / f"{i:04d}.bmp", _rgb(i))
    _save(base / "test" / "ok" / "0000.bmp", _rgb(5))
    _save(base / "test" / "ko" / "0000.bmp", _rgb(6))
    _save(base / "ground_truth" / "ko" / "0000.bmp", (_mask() > 0).astype(np.uint8))  # 0/1 bmp mask
    src = convert.locate_btad(tmp_path / "raw")
    assert src == base.parent
    summary = convert.convert_btad(src, tmp_path / "out", ["03"])
    assert summary["03"] == {"train/good": 2, "test/good": 1, "test/ko": 1}
    data = scan_category(tmp_path / "out", "03")
    ko = next(s for s in data.test if s.label == 1)
    assert ko.defect_type == "ko" and ko.path.suffix == ".bmp"
    mask = np.asarray(Image.open(ko.mask_paths[0]))
    assert set(np.unique(mask)) == {0, 255} and (mask > 0).sum() == (_mask() > 0).sum()
    with pytest.raises(DatasetError, match="unknown categories"):
        convert.convert_btad(src, tmp_path / "o2", ["04"])


def test_convert_ksdd2(tmp_path):
    src = tmp_path / "raw" / "KolektorSDD2"
    for split, n in (("train", 3), ("test", 2)):
        for i in range(n):
            _save(src / split / f"{i}{split[:2]}.png", _rgb(i))
            gt = _mask() if i == 0 else np.zeros((S, S), np.uint8)
            _save(src / split / f"{i}{split[:2]}_GT.png", gt)
    assert convert.locate_ksdd2(tmp_path / "raw") == src
    summary = convert.convert_ksdd2(src, tmp_path / "out")
    assert summary["ksdd2"] == {"labelled/defect": 1, "train/good": 2, "test/defect": 1, "test/good": 1}
    data = scan_category(tmp_path / "out", "ksdd2")
    assert len(data.train) == 2 and [s.label for s in data.test] == [1, 0]
    # the defective training image is kept apart, with its mask, in neither train nor test
    [lab] = data.labelled
    assert lab.path.name == "0tr.png" and lab.label == 1 and lab.defect_type == "defect"
    assert lab.path not in {s.path for s in [*data.train, *data.test]}
    mask = np.asarray(Image.open(lab.mask_paths[0]))
    assert set(np.unique(mask)) == {0, 255} and (mask > 0).sum() == (_mask() > 0).sum()
    # a labelled image without its mask is an error naming it
    lab.mask_paths[0].unlink()
    with pytest.raises(DatasetError, match=r"0tr.png: labelled anomalous training image has no mask"):
        scan_category(tmp_path / "out", "ksdd2")


def test_convert_mtd_split_is_deterministic(tmp_path):
    src = tmp_path / "raw" / "Magnetic-tile-defect-datasets.-master"
    for i in range(20):
        _save(src / "MT_Free" / "Imgs" / f"exp{i}.jpg", _rgb(i))
    for d in convert.MTD_DEFECTS:
        _save(src / f"MT_{d}" / "Imgs" / "exp1_num_1.jpg", _rgb(7))
        _save(src / f"MT_{d}" / "Imgs" / "exp1_num_1.png", _mask())
    a = convert.convert_mtd(src, tmp_path / "a")
    b = convert.convert_mtd(src, tmp_path / "b")
    assert a == b and a["magnetic_tile"]["train/good"] + a["magnetic_tile"]["test/good"] == 20
    assert 10 <= a["magnetic_tile"]["train/good"] < 20
    assert sorted(p.name for p in (tmp_path / "a" / "magnetic_tile" / "train" / "good").iterdir()) == \
        sorted(p.name for p in (tmp_path / "b" / "magnetic_tile" / "train" / "good").iterdir())
    assert len(scan_category(tmp_path / "a", "magnetic_tile").test) == 20 - a["magnetic_tile"]["train/good"] + 5


def test_convert_visa(tmp_path):
    src = tmp_path / "raw" / "VisA_20220922"
    rows = []
    for i in range(3):
        rel = f"candle/Data/Images/Normal/{i:04d}.JPG"
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_rgb(i)).save(src / rel, format="JPEG")
        rows.append(["candle", "train" if i < 2 else "test", "normal", rel, ""])
    rel = "candle/Data/Images/Anomaly/000.JPG"
    (src / rel).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_rgb(9)).save(src / rel, format="JPEG")
    m = np.zeros((S, S), np.uint8)
    m[2:5, 2:5], m[20:22, 20:30] = 1, 2  # instance ids, as VisA stores them
    _save(src / "candle/Data/Masks/Anomaly/000.png", m)
    rows.append(["candle", "test", "anomaly", rel, "candle/Data/Masks/Anomaly/000.png"])
    (src / "split_csv").mkdir()
    with open(src / "split_csv" / "1cls.csv", "w", newline="") as f:
        csv.writer(f).writerows([["object", "split", "label", "image", "mask"], *rows])
    assert convert.locate_visa(tmp_path / "raw") == src
    convert.convert_visa(src, tmp_path / "out", ["candle"])
    data = scan_category(tmp_path / "out", "candle")
    assert len(data.train) == 2 and sorted(s.label for s in data.test) == [0, 1]
    bad = next(s for s in data.test if s.label)
    assert load_mask(bad.mask_paths).sum() == 9 + 20
    # a split file pointing outside the dataset folder is refused
    with open(src / "split_csv" / "1cls.csv", "a", newline="") as f:
        csv.writer(f).writerow(["candle", "train", "normal", "../../etc/passwd", ""])
    with pytest.raises(DatasetError, match="leaves the dataset folder"):
        convert.convert_visa(src, tmp_path / "out2", ["candle"])


def test_converter_hardlinks_by_default(tmp_path):
    src = tmp_path / "raw" / "mvtec"
    _save(src / "bottle" / "train" / "good" / "000.png", _rgb(1))
    _save(src / "bottle" / "test" / "good" / "000.png", _rgb(2))
    convert.convert_mvtec_ad(src, tmp_path / "h", ["bottle"])
    convert.convert_mvtec_ad(src, tmp_path / "c", ["bottle"], link="copy")
    orig = src / "bottle" / "train" / "good" / "000.png"
    assert (tmp_path / "h" / "bottle" / "train" / "good" / "000.png").stat().st_ino == orig.stat().st_ino
    assert (tmp_path / "c" / "bottle" / "train" / "good" / "000.png").stat().st_ino != orig.stat().st_ino
    assert not any(p.is_symlink() for p in (tmp_path / "h").rglob("*"))


def test_loco_category_without_defects_config_is_an_error_for_spro_not_a_silent_pro(tmp_path):
    from defectlab.pipeline import defects_for_spro

    _loco_category(tmp_path / "r" / "juice_bottle")
    (tmp_path / "r" / "juice_bottle" / "defects_config.json").unlink()
    data = scan_category(tmp_path / "r", "juice_bottle")
    with pytest.raises(DatasetError, match=r"juice_bottle/defects_config.json.*missing"):
        defects_for_spro(data.test, 32, config_required=True)
    # outside LOCO (no config required) each defect saturates at its own area: a per-defect PRO
    per_defect = defects_for_spro(data.test, 32)
    assert [sat for d in per_defect for _, sat in d] == [100.0, 60.0, 4.0]
