"""The papers' datasets and protocols on small data the tests make: region metrics at the ground
truth's resolution, the KolektorSDD2 supervised split, non-square inputs, the resize-and-crop
preprocessing and the report's paper column."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from defectlab.config import EvalParams
from defectlab.data import scan_category
from defectlab.pipeline import metrics_for

# --------------------------------------------------------------------------- sPRO / PRO at GT resolution

GT = 64          # ground-truth (and image) side
MODEL = 16       # the model's map side: nearest-neighbour shrinking by 4 samples pixels 2, 6, 10, ...


def _write(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _tiny_defect_category(root: Path) -> Path:
    """One good and two defective test images: a 16 x 16 defect and a 1-pixel defect at (1, 1),
    which nearest-neighbour shrinking to 16 px erases."""
    rng = np.random.default_rng(0)
    img = lambda: rng.integers(0, 255, (GT, GT, 3), dtype=np.uint8)   # noqa: E731
    cat = root / "parts"
    _write(cat / "train" / "good" / "t0.png", img())
    _write(cat / "test" / "good" / "g0.png", img())
    big, tiny = np.zeros((GT, GT), np.uint8), np.zeros((GT, GT), np.uint8)
    big[32:48, 32:48] = 255
    tiny[1, 1] = 255
    for stem, mask in (("a0", big), ("a1", tiny)):
        _write(cat / "test" / "bad" / f"{stem}.png", img())
        _write(cat / "ground_truth" / "bad" / f"{stem}_mask.png", mask)
    return root


def _out(samples, tiny_found: bool) -> dict:
    """What predict_loader returns at MODEL px: the big defect's cells score 1, the tiny defect's
    cell (0, 0) scores 1 only with ``tiny_found``; every other cell 0."""
    maps = np.zeros((len(samples), MODEL, MODEL), np.float32)
    masks = np.zeros((len(samples), MODEL, MODEL), bool)
    for i, s in enumerate(samples):
        if s.path.stem == "a0":
            maps[i, 8:12, 8:12] = 1.0
            masks[i, 8:12, 8:12] = True
        if s.path.stem == "a1" and tiny_found:
            maps[i, 0, 0] = 1.0
    labels = np.array([s.label for s in samples])
    return {"scores": maps.max(axis=(1, 2)), "maps": maps, "labels": labels, "masks": masks,
            "paths": [str(s.path) for s in samples], "kinds": [s.kind for s in samples],
            "defect_types": [s.defect_type for s in samples]}


def test_tiny_defect_counts_at_ground_truth_resolution(tmp_path):
    data = scan_category(_tiny_defect_category(tmp_path), "parts")
    ev = EvalParams()
    # the 1-pixel defect vanishes from the mask shrunk to the model's 16 px ...
    from defectlab.data import load_mask
    tiny = next(s for s in data.test if s.path.stem == "a1")
    assert load_mask(tiny.mask_paths).sum() == 1 and not load_mask(tiny.mask_paths, MODEL).any()
    # ... but counts as one of the two defects: missed, sPRO and AUPRO are about one half
    missed, _ = metrics_for(_out(data.test, tiny_found=False), ev, data.test, MODEL)
    assert 0.40 < missed["spro"] < 0.55, missed["spro"]
    assert 0.40 < missed["aupro"] < 0.60, missed["aupro"]      # (ties at 0 interpolate up to FPR 0.3)
    assert missed["aupro_bad"] == missed["aupro"]
    # found (its 16-px cell scores high, upsampled onto the pixel), both are near 1
    found, curves = metrics_for(_out(data.test, tiny_found=True), ev, data.test, MODEL)
    assert found["spro"] > 0.9 and found["aupro"] > 0.9, (found["spro"], found["aupro"])
    assert curves["pro"] and curves["pro"][-1]["fpr"] <= ev.max_fpr_pro


def test_overlap_curve_matches_spro_and_keeps_only_the_top_negatives():
    """The streaming curve equals metrics.spro / aupro on the same pixels, while keeping about
    max_fpr of the defect-free pixels."""
    from defectlab import metrics

    rng = np.random.default_rng(1)
    maps = rng.random((6, 40, 40)).astype(np.float32)
    maps[:, ::7] = 0.5                                   # ties
    masks = np.zeros((6, 40, 40), bool)
    masks[1, 5:9, 5:12] = True
    masks[2, 20:30, 3:6] = True
    masks[2, 1, 1] = True
    maps[masks] += 0.3
    defects = [[(masks[i], 5.0)] if masks[i].any() else [] for i in range(6)]
    acc = metrics.OverlapCurve(0.05, maps.size)
    pro_acc = metrics.OverlapCurve(0.3, maps.size)
    for i in range(6):
        acc.add(maps[i], defects[i])
        pro_acc.add(maps[i], metrics.regions(masks[i]))
    assert acc.area() == pytest.approx(metrics.spro(defects, maps, max_fpr=0.05), abs=1e-12)
    assert pro_acc.area() == pytest.approx(metrics.aupro(masks, maps, max_fpr=0.3), abs=1e-12)
    kept = sum(a.size for a in acc._neg)
    assert kept <= 2 * acc.cap + 40 * 40 and acc.cap < 0.06 * maps.size


# --------------------------------------------------------------------------- KolektorSDD2 supervised protocol

KH, KW = 40, 16          # KolektorSDD2 images are tall and narrow (about 630 x 230)


def _raw_ksdd2(root: Path, n_good_train: int = 4, n_bad_train: int = 3, n_good_test: int = 2,
               n_bad_test: int = 2) -> Path:
    """KolektorSDD2's layout: train|test/<id>.png with <id>_GT.png (nonzero = defect)."""
    rng = np.random.default_rng(3)
    src = root / "KolektorSDD2"
    for split, n_good, n_bad, base in (("train", n_good_train, n_bad_train, 10000),
                                       ("test", n_good_test, n_bad_test, 20000)):
        for i in range(n_good + n_bad):
            _write(src / split / f"{base + i}.png", rng.integers(0, 255, (KH, KW, 3), dtype=np.uint8))
            gt = np.zeros((KH, KW), np.uint8)
            if i >= n_good:
                gt[10 + i: 14 + i, 4:9] = 255
            _write(src / split / f"{base + i}_GT.png", gt)
    return src


def test_ksdd2_supervised_draws_labelled_training_images_never_test(tmp_path):
    """DSR's n_supervised (Table 2's N) draws KolektorSDD2's defective *training* images, which the
    converter keeps in labelled/; no test image enters training."""
    import torch

    from defectlab.data import convert
    from defectlab.errors import ConfigError
    from defectlab.methods.base import FitContext
    from defectlab.methods.dsr import DSR, DSRConfig

    convert.convert_ksdd2(_raw_ksdd2(tmp_path / "raw"), tmp_path / "out")
    data = scan_category(tmp_path / "out", "ksdd2")
    assert len(data.labelled) == 3 and sum(s.label for s in data.test) == 2
    ctx = FitContext(dataset="ksdd2", category="ksdd2", data=data, image_size=32, seed=0,
                     device=torch.device("cpu"), progress=False)
    model = DSR(DSRConfig(n_supervised=2), "cpu")
    images, masks = model._supervised_examples(ctx)
    chosen = set(model.meta["supervised_images"])
    assert images.shape == (2, 3, 32, 32) and masks.shape == (2, 1, 32, 32) and (masks.sum((1, 2, 3)) > 0).all()
    assert chosen <= {str(s.path) for s in data.labelled}
    assert not chosen & {str(s.path) for s in data.test}
    with pytest.raises(ConfigError, match=r"methods.dsr.n_supervised: 4 requested, ksdd2 has 3 annotated "
                                          r"anomalous training images"):
        DSR(DSRConfig(n_supervised=4), "cpu")._supervised_examples(ctx)


def test_ksdd2_prepare_records_the_labelled_split(tmp_path):
    """`prepare` of a KolektorSDD2 source: labelled rows in the manifest, none in train or test."""
    from defectlab.config import Params
    from defectlab.pipeline import Layout, category_data, prepare

    raw = tmp_path / "project" / "data" / "raw" / "ksdd2"
    _raw_ksdd2(raw)
    params = Params({"seed": 0, "run": {"datasets": ["ksdd2"], "categories": ["ksdd2"], "methods": []},
                     "datasets": {"ksdd2": {"source": "ksdd2", "root": "data/raw/ksdd2", "categories": ["ksdd2"],
                                            "image_size": 32}}})
    layout = Layout(tmp_path / "project")
    summary = prepare(params, "ksdd2", layout)
    assert summary["ksdd2"]["labelled"] == 3 and summary["ksdd2"]["test"] == 4
    import csv
    with open(layout.prepared("ksdd2") / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    labelled = [r for r in rows if r["split"] == "labelled"]
    assert len(labelled) == 3 and all(r["path"].startswith("ksdd2/labelled/defect/") and r["masks"] for r in labelled)
    assert not {r["path"] for r in labelled} & {r["path"] for r in rows if r["split"] != "labelled"}
    data = category_data(params, "ksdd2", "ksdd2", layout)
    assert len(data.labelled) == 3 and all(s.path.parent.name == "defect" for s in data.labelled)


# --------------------------------------------------------------------------- resize modes: [h, w], resize_crop


def _block_image(h: int, w: int, block: tuple[slice, slice]) -> Image.Image:
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([(yy * 255 // h), (xx * 255 // w), np.full((h, w), 90)], -1).astype(np.uint8)
    img[block] = 255
    return Image.fromarray(img)


def _centroid(mask: np.ndarray) -> np.ndarray:
    return np.argwhere(mask).mean(0)


def test_resize_crop_is_torchvision_resize_256_then_center_crop_224():
    """``resize_crop`` at 224 reproduces PatchCore's / PaDiM's Resize(256) + CenterCrop(224), on a
    non-square image; its mask goes through the same geometry and map_to_original inverts it."""
    from torchvision import transforms as T

    from defectlab.data.transform import map_to_original, resize_image, resize_mask

    h, w, block = 300, 400, (slice(140, 160), slice(230, 250))
    im = _block_image(h, w, block)
    ours = np.asarray(resize_image(im, 224, "resize_crop"), dtype=np.float64)
    ref = np.asarray(T.CenterCrop(224)(T.Resize(256)(im)), dtype=np.float64)
    assert ours.shape == ref.shape == (224, 224, 3)
    assert np.abs(ours - ref).mean() < 2.0       # 8-bit levels; a crop of 1.0 instead of 224/256 gives 5
    mask = np.zeros((h, w), bool)
    mask[block] = True
    small = resize_mask(mask, 224, "resize_crop")
    assert np.abs(_centroid(small) - _centroid(ref[..., 2] > 200)).max() < 0.75
    back = map_to_original(small.astype(np.float32), h, w, "resize_crop")
    assert np.abs(_centroid(back > 0.5) - _centroid(mask)).max() < 0.75
    # squash at 224 is what the pipeline did before: a different geometry
    squashed = np.asarray(resize_image(im, 224, "squash"), dtype=np.float64)
    assert np.abs(squashed - ref).mean() > 10


@pytest.mark.parametrize("mode", ["squash", "shorter_side_crop", "resize_crop", "pad"])
def test_non_square_size_keeps_the_geometry(mode):
    """size (h, w): the output is h x w and a marked block lands where the mode's geometry puts it;
    map_to_original brings the map back onto it."""
    from defectlab.data.transform import geometry, map_to_original, resize_image, resize_mask

    h, w, size = 126, 46, (64, 24)                       # a KolektorSDD2-like strip at 1/5 scale
    block = (slice(60, 70), slice(20, 28))
    mask = np.zeros((h, w), bool)
    mask[block] = True
    out = resize_image(_block_image(h, w, block), size, mode)
    small = resize_mask(mask, size, mode)
    assert (out.height, out.width) == size and small.shape == size
    rows, cols = geometry(h, w, size, mode)
    expect = [rows.out_start + (65 - rows.orig_start) * rows.scale - 0.5,
              cols.out_start + (24 - cols.orig_start) * cols.scale - 0.5]
    assert np.abs(_centroid(small) - expect).max() < 1.0
    back = map_to_original(small.astype(np.float32), h, w, mode)
    assert back.shape == (h, w) and np.abs(_centroid(back > 0.5) - _centroid(mask)).max() < 1.5


# --------------------------------------------------------------------------- non-square inputs through the methods

SH, SW = 128, 64         # tall strips (KolektorSDD2-like), model input [64, 32]: the same 2:1 aspect


def _strips(root: Path, n_train: int = 10, n_good: int = 4, n_bad: int = 4) -> Path:
    """An MVTec-format category of tall noisy strips; defects are dark 12 x 12 squares."""
    rng = np.random.default_rng(5)

    def strip():
        return np.clip(rng.normal(150, 8, (SH, SW, 3)), 0, 255).astype(np.uint8)

    cat = root / "strips"
    for i in range(n_train):
        _write(cat / "train" / "good" / f"t{i}.png", strip())
    for i in range(n_good):
        _write(cat / "test" / "good" / f"g{i}.png", strip())
    for i in range(n_bad):
        img, mask = strip(), np.zeros((SH, SW), np.uint8)
        y, x = int(rng.integers(8, SH - 20)), int(rng.integers(8, SW - 20))
        img[y:y + 12, x:x + 12] = 40
        mask[y:y + 12, x:x + 12] = 255
        _write(cat / "test" / "hole" / f"b{i}.png", img)
        _write(cat / "ground_truth" / "hole" / f"b{i}_mask.png", mask)
    return root


def _params(folder: Path, **spec):
    import yaml

    from defectlab.config import Params

    raw = yaml.safe_load((Path(__file__).parents[1] / "params.yaml").read_text())
    raw.update(profile="smoke", device="cpu")
    raw["run"] = {"datasets": ["strips"], "categories": ["strips"], "methods": ["patchcore", "padim"]}
    raw["datasets"] = {"strips": {"source": "folder", "root": str(folder), "categories": ["strips"],
                                  "validation_fraction": 0.0, **spec}}
    raw["evaluation"]["eval"]["common"]["n_overlays"] = 2
    return Params(raw)


@pytest.mark.parametrize("method", ["patchcore", "padim"])
def test_patchcore_padim_take_a_non_square_input(tmp_path, method):
    """image_size [64, 32]: fitted and scored at 64 x 32 (maps too), the card records it, and the
    dark squares are found far better than chance."""
    from defectlab.pipeline import Layout, evaluate, fit, prepare

    params = _params(_strips(tmp_path / "user"), image_size=[SH // 2, SW // 2])
    layout = Layout(tmp_path / "project")
    prepare(params, "strips", layout)
    model, _ = fit(params, method, "strips", "strips", layout, progress=False)
    assert model.card["preprocess"]["image_size"] == (SH // 2, SW // 2)
    from defectlab.data import ImageDataset, scan_category
    item = ImageDataset(scan_category(layout.prepared("strips"), "strips").test[:1], (SH // 2, SW // 2))[0]
    scores, maps = model.predict(item["image"][None])
    assert tuple(maps.shape) == (1, SH // 2, SW // 2)
    metrics = evaluate(params, method, "strips", "strips", layout, progress=False, model=model)
    assert metrics["image_auroc"] > 0.9 and metrics["pixel_auroc"] > 0.9, metrics
    assert metrics["aupro"] > 0.5, metrics["aupro"]                # at the masks' 128 x 64
    # deployed: the saved model reads [h, w] from model.json and maps back to the image's size
    from defectlab.inference import Detector
    det = Detector(layout.model(method, "strips", "strips"), "cpu")
    batch = det.predict([str(item["path"])])
    assert det.image_size == (SH // 2, SW // 2) and batch.maps[0].shape == (SH, SW)


def test_square_only_methods_refuse_a_non_square_input(tmp_path):
    from defectlab.errors import ConfigError
    from defectlab.pipeline import input_spec

    params = _params(tmp_path, image_size=[SH // 2, SW // 2])
    assert input_spec(params, "padim", "strips").image_size == (SH // 2, SW // 2)
    for method in ("slsg", "msp_svdd", "ds2", "apc"):
        with pytest.raises(ConfigError, match=rf"datasets.strips.image_size: method {method} takes square inputs only"):
            input_spec(params, method, "strips")


def test_dsr_takes_a_non_square_input(tmp_path):
    """DSR's three stages at [96, 64] (each side a multiple of 32): maps at 96 x 64."""
    import torch

    from defectlab.data import ImageDataset
    from defectlab.errors import ConfigError
    from defectlab.methods.base import FitContext, PretrainContext
    from defectlab.methods.dsr import DSR, DSRConfig, check_image_size
    from defectlab.pipeline import train_and_fit

    tiny = dict(n_procedural_textures=2, hidden=8, residual_hidden=4, residual_layers=1, embedding_dim=4,
                codebook_size=16, stage1_iters=3, stage1_batch=2, restriction_width=4, decoder_width=8,
                detection_width=4, stage2_iters=2, stage2_batch=2, stage2_lr_drop_at=1, upsampling_width=4,
                stage3_iters=2, stage3_batch=2,
                live_code_share=0.0)   # 3 stage-1 steps leave most codes dead: draw from every code
    root = _strips(tmp_path / "data", n_train=4, n_good=1, n_bad=1)
    data = scan_category(root, "strips")
    cpu, size = torch.device("cpu"), (96, 64)
    cfg = DSRConfig(**tiny)
    (tmp_path / "pre").mkdir()
    DSR.pretrain(cfg, PretrainContext(dataset="strips", data_root=root, categories=["strips"], out_dir=tmp_path / "pre",
                                      image_size=size, seed=0, device=cpu, progress=False))
    ctx = FitContext(dataset="strips", category="strips", data=data, image_size=size, seed=0, device=cpu,
                     pretrain_dir=tmp_path / "pre", progress=False)
    model, _ = train_and_fit(DSR, cfg, ctx, tmp_path / "train")
    batch = torch.stack([ImageDataset(data.test, size)[i]["image"] for i in range(2)])
    scores, maps = model.predict(batch)
    assert tuple(maps.shape) == (2, 96, 64) and scores.shape == (2,)
    with pytest.raises(ConfigError, match="multiple of 32"):
        check_image_size((96, 48))


# --------------------------------------------------------------------------- the report's paper column


def test_results_table_shows_each_papers_figures_with_their_source():
    from defectlab.report import results_table

    rows = [{"method": m, "dataset": d, "category": "c", "image_auroc": 0.5, "n_supervised": n}
            for m, d, n in (("patchcore", "mvtec_ad", 0), ("padim", "mvtec_ad", 0), ("ds2", "ksdd2", 0),
                            ("msp_svdd", "btad", 0), ("slsg", "mvtec_loco", 0), ("dsr", "ksdd2", 53),
                            ("apc", "mvtec_ad", 0), ("dsr", "btad", 0))]
    table, _ = results_table(rows)
    means = {tuple(cells[0:2]): cells[-1] for line in table.splitlines()
             if "**mean**" in line for cells in [[c.strip() for c in line.strip("|").split("|")]]}
    assert means[("patchcore", "mvtec_ad")] == ("image_auroc 0.990, pixel_auroc 0.981, aupro 0.935 "
                                                "(Roth et al. 2022, Tab. 1-3 (PatchCore-10%))")
    assert "aupro 0.921" in means[("padim", "mvtec_ad")] and "Defard" in means[("padim", "mvtec_ad")]
    assert means[("ds2", "ksdd2")] == "pixel_auroc 0.813 (He et al. 2024, Tab. 3)"
    assert means[("msp_svdd", "btad")] == "image_auroc 0.951, pixel_auroc 0.977 (Tsai et al. 2022, Tab. 4-5)"
    assert means[("slsg", "mvtec_loco")] == "image_auroc 0.903, spro 0.673 (Yang et al. 2024, Tab. 3)"
    # DSR with 53 labelled KolektorSDD2 training images: Table 2's N = 53 column, not the unsupervised one
    assert means[("dsr", "ksdd2")] == "image_ap 0.946, pixel_ap 0.816 (Zavrtanik et al. 2022, Tab. 2 (N = 53))"
    assert "image_auroc 0.988" in means[("apc", "mvtec_ad")]
    assert means[("dsr", "btad")] == "—"                  # DSR's paper has no BTAD figure


def test_params_yaml_datasets_and_paper_preprocessing():
    """params.yaml: BTAD at 512, KolektorSDD2 at [640, 224] (not square), and in the paper profile
    PatchCore / PaDiM at 224 with resize_crop on MVTec AD; smoke keeps the demo's 128 px squash."""
    from defectlab.config import Params
    from defectlab.pipeline import input_spec

    path = Path(__file__).parents[1] / "params.yaml"
    paper, smoke = Params.load(path, profile="paper"), Params.load(path, profile="smoke")
    for method in ("patchcore", "padim"):
        assert input_spec(paper, method, "mvtec_ad").model_dump() == {"image_size": 224, "resize": "resize_crop"}
        assert input_spec(smoke, method, "mvtec_ad").model_dump() == {"image_size": 256, "resize": "squash"}
        assert input_spec(smoke, method, "demo").model_dump() == {"image_size": 128, "resize": "squash"}
    assert input_spec(paper, "apc", "mvtec_ad").image_size == 256            # APC's paper gives no preprocessing
    assert input_spec(paper, "msp_svdd", "btad").image_size == 512
    assert input_spec(paper, "dsr", "ksdd2").image_size == (640, 224)
    assert input_spec(paper, "ds2", "ksdd2").image_size == 256
    assert paper.dataset("ksdd2").source == "ksdd2" and paper.dataset("btad").categories == ["01", "02", "03"]
