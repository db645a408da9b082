"""Calibration on validation images, self-contained model folders and the inference API
(`defectlab.load`, `Detector.predict`, `defectlab predict`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CAT = "grain"


# ---------------------------------------------------------------------------------------------
# calibration: hand-computed values
# ---------------------------------------------------------------------------------------------
def test_fpr_threshold_and_normalisation_hand_computed():
    from defectlab.calibration import calibrate, normalize

    scores = np.array([1.0, 2.0, 3.0, 4.0])           # normal validation images only
    maps = np.stack([np.full((2, 2), v) for v in (0.0, 1.0, 2.0, 3.0)])
    cal = calibrate(scores, np.zeros(4), maps, rule="auto", target_fpr=0.25, pixel_target_fpr=0.25)
    t = cal["threshold"]
    # fpr <= 0.25 of 4 normals: one image (the 4.0) may be flagged -> threshold just above 3.0
    assert t["rule"] == "fpr<=0.25" and t["source"] == "validation" and t["n_normal"] == 4
    assert t["image"] == np.nextafter(3.0, np.inf)
    assert cal["normalization"]["image"]["low"] == 1.0
    # linear: low -> 0, threshold -> 0.5, threshold + (threshold - low) -> 1, clipped
    n = normalize([1.0, t["image"], 2 * t["image"] - 1.0, 100.0, -5.0], cal["normalization"]["image"])
    assert np.allclose(n, [0.0, 0.5, 1.0, 1.0, 0.0])
    # pixels: 75th percentile of {0,0,0,0,1,1,1,1,2,2,2,2,3,3,3,3} = 2.25 (numpy linear), median 1.5
    assert cal["threshold"]["pixel"] == pytest.approx(2.25)
    assert cal["normalization"]["pixel"]["low"] == 1.5


def test_auto_rule_uses_f1_with_anomalies_and_f1_max_refuses_normals_only():
    from defectlab.calibration import select_threshold
    from defectlab.errors import ConfigError

    scores, labels = np.array([0.1, 0.2, 0.3, 0.8, 0.9]), np.array([0, 0, 0, 1, 1])
    assert select_threshold(scores, labels, "auto") == 0.8
    with pytest.raises(ConfigError, match="normal and anomalous"):
        select_threshold(scores[:3], labels[:3], "f1_max")
    assert select_threshold(scores[:3], labels[:3], "auto", target_fpr=0.0) == np.nextafter(0.3, np.inf)


# ---------------------------------------------------------------------------------------------
# fit writes a self-contained model folder; the inference API reads only that
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """PatchCore fitted by the pipeline's own `fit` on a tiny demo layout: (root, model folder, params)."""
    from defectlab import pipeline
    from defectlab.config import Params

    root = tmp_path_factory.mktemp("fitproj")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["datasets"]["demo"].update(image_size=64, categories=[CAT], generator={
        "image_size": 64, "n_train": 16, "n_test_good": 6, "n_test_per_defect": 2})
    raw["run"] = {"datasets": ["demo"], "categories": [CAT], "methods": ["patchcore"], "train_methods": []}
    raw["device"] = "cpu"
    params = Params(raw)
    layout = pipeline.Layout(root)
    pipeline.prepare(params, "demo", layout)
    pipeline.pretrain(params, "patchcore", "demo", layout, progress=False)
    pipeline.fit(params, "patchcore", "demo", CAT, layout, progress=False)
    return root, layout.model("patchcore", "demo", CAT), params


def test_threshold_comes_from_validation_images_not_test(fitted):
    import defectlab
    from defectlab import pipeline

    root, model_dir, params = fitted
    info = json.loads((model_dir / "model.json").read_text())
    data = pipeline.category_data(params, "demo", CAT, pipeline.Layout(root))
    assert data.validation, "the seeded validation split is empty"
    fit_names = {s.path.name for s in data.train}
    assert not fit_names & {s.path.name for s in data.validation}, "validation images were fitted on"
    thr = info["threshold"]
    assert thr["source"] == "validation" and thr["n_normal"] == len(data.validation) and thr["n_anomalous"] == 0
    det = defectlab.load(model_dir, device="cpu")
    val_scores = det.predict([s.path for s in data.validation]).scores
    test_scores = det.predict([s.path for s in data.test]).scores
    # fpr <= 0.01 on a handful of normals: just above the highest validation score, which a
    # threshold chosen on the test split (or on training images) would not be
    assert thr["image"] == pytest.approx(float(np.nextafter(val_scores.max(), np.inf)), rel=1e-6)
    assert not np.isclose(thr["image"], test_scores.max())
    assert info["preprocess"]["image_size"] == 64 and info["data"]["n_validation"] == len(data.validation)
    assert info["data"]["manifest_sha256"] and info["versions"]["torch"]


def test_detector_scores_equal_the_evaluation_path(fitted):
    """`defectlab.load(...).predict` on files == the method's own predict over the evaluation loader
    (same preprocessing), and maps come back at the original image size."""
    import defectlab
    from defectlab import pipeline
    from defectlab.methods.base import make_loader

    root, model_dir, params = fitted
    det = defectlab.load(model_dir, device="cpu")
    data = pipeline.category_data(params, "demo", CAT, pipeline.Layout(root))
    paths = [s.path for s in data.test]
    ref = det.method.predict_loader(make_loader(data.test, 64, 4))
    out = det.predict(paths, batch_size=3)
    assert np.allclose(out.scores, ref["scores"], rtol=1e-5, atol=1e-6)
    assert out.labels == ["anomalous" if s >= det.threshold["image"] else "normal" for s in out.scores]
    assert np.all((out.normalized >= 0) & (out.normalized <= 1))
    assert np.allclose(out.normalized > 0.5, out.scores > det.threshold["image"])
    assert out.maps[0].shape == (64, 64)
    # the planted defects score above the normal test images far better than chance
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(ref["labels"], out.scores) > 0.75


def test_predict_cli_on_a_folder_with_a_corrupt_file(fitted, tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from defectlab.cli import app

    root, model_dir, params = fitted
    folder = tmp_path / "line"
    folder.mkdir()
    test_dir = root / "data" / "prepared" / "demo" / CAT / "test"
    good = sorted((test_dir / "good").iterdir())[:2]
    bad = sorted(p for p in test_dir.iterdir() if p.name != "good")[0]
    defect = sorted(bad.iterdir())[0]
    for p in (*good, defect):
        shutil.copy(p, folder / f"{p.parent.name}_{p.name}")
    # a non-square, larger image: maps and masks come back at its own size
    Image.open(good[0]).convert("RGB").resize((96, 40)).save(folder / "wide.png")
    (folder / "m_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "preds"
    r = CliRunner().invoke(app, ["predict", str(model_dir), str(folder), "--out", str(out), "--json",
                                 "--device", "cpu"])
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 5
    # input order (sorted folder listing), the unreadable file in its place, not moved to the front
    assert [Path(row["path"]).name for row in rows] == sorted(p.name for p in folder.iterdir())
    by_name = {Path(row["path"]).name: row for row in rows}
    assert by_name["m_broken.png"]["error"] and by_name["m_broken.png"]["score"] is None
    scored = [row for row in rows if row["error"] is None]
    assert len(scored) == 4 and all(row["label"] in ("anomalous", "normal") for row in scored)
    mask = Image.open(out / by_name["wide.png"]["mask"])
    assert mask.size == (96, 40)
    heat = Image.open(out / by_name["wide.png"]["heatmap"])
    assert heat.size == (2 * 96, 40)                       # [image | overlay]
    lines = (out / "predictions.csv").read_text().splitlines()
    assert len(lines) == 6 and sum("m_broken.png" in ln and ",error," in ln for ln in lines) == 1


def test_heatmap_colours_do_not_depend_on_the_batch(fitted):
    """The same image gets the same heatmap whatever else is scored with it (fixed normalisation)."""
    import defectlab
    from defectlab import pipeline

    root, model_dir, params = fitted
    det = defectlab.load(model_dir, device="cpu")
    data = pipeline.category_data(params, "demo", CAT, pipeline.Layout(root))
    good = data.test[0].path
    anomalous = [s.path for s in data.test if s.label == 1]
    alone = det.predict([good])
    mixed = det.predict([good, *anomalous])
    # the same normalised map, to the float noise of batched convolutions (a per-batch rescale moves it
    # by a large fraction of its range) ...
    assert np.allclose(det.normalize_map(alone.maps[0]), det.normalize_map(mixed.maps[0]), atol=1e-4)
    rgb = np.zeros((64, 64, 3), np.uint8)
    a, b = det.overlay(rgb, alone.maps[0]).astype(int), det.overlay(rgb, mixed.maps[0]).astype(int)
    # ... so the colours differ only where that noise crosses a colour-map step, at a few pixels
    assert (np.abs(a - b).max(-1) > 0).mean() < 0.01


def test_old_model_without_preprocess_block_gives_one_clear_error(fitted, tmp_path):
    import defectlab
    from defectlab.errors import ResourceMissingError

    _, model_dir, _ = fitted
    old = tmp_path / "old"
    shutil.copytree(model_dir, old)
    info = json.loads((old / "model.json").read_text())
    info.pop("preprocess")
    (old / "model.json").write_text(json.dumps(info))
    with pytest.raises(ResourceMissingError, match="preprocess"):
        defectlab.load(old, device="cpu")
