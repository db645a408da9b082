"""A user's own MVTec-format folder through `dvc repro` (source: folder): non-square images, one
category without masks, one with its own validation/good; metrics with the expected nulls,
registered models whose threshold came from validation images, and a one-image edit that changes
only that category's prepared data."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import git_dvc_init, make_project, project_env, sh

pytestmark = pytest.mark.slow


def _squeeze(src, dst, size=(80, 56), mask=False):
    im = Image.open(src)
    im = im.convert("L") if mask else im.convert("RGB")
    dst.parent.mkdir(parents=True, exist_ok=True)
    im.resize(size, Image.NEAREST if mask else Image.BILINEAR).save(dst)


def _user_folder(root, demo):
    """housing <- demo weave (masks, + validation/good), gasket <- demo grain (no masks)."""
    for cat, src_cat in (("housing", "weave"), ("gasket", "grain")):
        base = demo / src_cat
        for p in base.glob("train/good/*.png"):
            _squeeze(p, root / cat / "train/good" / p.name)
        for p in base.glob("test/*/*.png"):
            _squeeze(p, root / cat / "test" / p.parent.name / p.name)
        if cat == "housing":
            for p in base.glob("ground_truth/*/*.png"):
                _squeeze(p, root / cat / "ground_truth" / p.parent.name / p.name, mask=True)
    val = root / "housing/validation/good"
    val.mkdir(parents=True)
    for p in sorted((root / "housing/train/good").glob("*.png"))[-4:]:
        shutil.move(p, val / f"val_{p.name}")


@pytest.fixture(scope="module")
def folder_project(tmp_path_factory):
    from defectlab.data.demo import generate_demo

    demo = tmp_path_factory.mktemp("src") / "demo"
    generate_demo(demo, seed=0, image_size=64, n_train=14, n_test_good=4, n_test_per_defect=2,
                  categories=["weave", "grain"])
    user = tmp_path_factory.mktemp("user") / "my_parts"
    _user_folder(user, demo)
    proj = make_project(tmp_path_factory.mktemp("folderproj"), categories=["housing", "gasket"],
                        methods=["patchcore", "padim"], backbone=False,
                        extra={"run.datasets": ["parts"],
                               "datasets.parts": {"source": "folder", "root": str(user), "categories": ["housing", "gasket"],
                                                  "texture_categories": ["housing", "gasket"], "image_size": 64,
                                                  "resize": "squash", "masks": "optional"}})
    env = project_env(proj)
    git_dvc_init(proj, env)
    sh(["dvc", "repro"], proj, env)
    return proj, env, user


def test_folder_dataset_runs_through_the_pipeline(folder_project):
    import mlflow
    from mlflow import MlflowClient

    proj, env, user = folder_project
    mlflow.set_tracking_uri(f"sqlite:///{proj / 'mlflow.db'}")
    client = MlflowClient()
    for method in ("patchcore", "padim"):
        housing = json.loads((proj / f"metrics/{method}/parts/housing.json").read_text())
        gasket = json.loads((proj / f"metrics/{method}/parts/gasket.json").read_text())
        assert housing["pixel_auroc"] is not None and housing["image_auroc"] is not None
        assert gasket["pixel_auroc"] is None and gasket["aupro"] is None and gasket["warnings"]
        assert gasket["image_auroc"] is not None and not np.isnan(gasket["image_auroc"])
        assert "image_auroc_scratch" in gasket and "image_auroc_unknown" not in gasket
        info = json.loads((proj / f"models/{method}/parts/housing/model.json").read_text())
        assert info["threshold"]["source"] == "validation" and info["threshold"]["n_normal"] == 4   # validation/good
        g = json.loads((proj / f"models/{method}/parts/gasket/model.json").read_text())
        assert g["threshold"]["source"] == "validation" and g["data"]["n_validation"] >= 4   # held out of train/good
        assert str(client.get_model_version_by_alias(f"{method}-parts-housing", "champion").version) == "1"
    # prepare linked the user's files instead of copying them (DVC then caches the stage output as
    # it caches every output, so the workspace file is DVC's, not the hard link: see README)
    source = json.loads((proj / "data/prepared/parts/SOURCE.json").read_text())
    assert source["source"] == "folder" and set(source["link_mode"].values()) == {"hardlink"}


def test_editing_one_image_changes_only_its_category(folder_project):
    proj, env, user = folder_project
    before = {c: (proj / f"data/prepared/parts/{c}/manifest.csv").read_bytes() for c in ("housing", "gasket")}
    target = sorted((user / "gasket/train/good").glob("*.png"))[0]
    target.unlink()                                 # a new file (editors often rewrite in place: see README)
    Image.new("RGB", (80, 56), (120, 60, 30)).save(target)
    sh(["dvc", "repro", "--force", "prepare@parts"], proj, env)
    after = {c: (proj / f"data/prepared/parts/{c}/manifest.csv").read_bytes() for c in ("housing", "gasket")}
    assert after["housing"] == before["housing"] and after["gasket"] != before["gasket"]
    status = sh(["dvc", "status"], proj, env)
    assert "fit@patchcore-parts" in status           # downstream of the changed data


def test_bad_file_in_the_folder_is_one_error_and_replaces_nothing(folder_project):
    proj, env, user = folder_project
    before = (proj / "data/prepared/parts/manifest.csv").read_bytes()
    bad = user / "housing/train/good/zz_broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 30)
    try:
        import subprocess

        r = subprocess.run(["dvc", "repro", "--force", "prepare@parts"], cwd=proj, env=env, capture_output=True,
                           text=True, timeout=300)
    finally:
        bad.unlink()
    assert r.returncode != 0
    assert "zz_broken.png" in r.stderr + r.stdout and "Traceback" not in r.stderr + r.stdout
    assert (proj / "data/prepared/parts/manifest.csv").read_bytes() == before
