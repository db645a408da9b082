"""The stage layout in dvc.yaml: per-category trainings depend only on their own category, the
dataset-wide synthesis gives identical files for a category whose data did not change (so DVC
skips that category's training), run.train_methods matches the methods' code."""

from pathlib import Path

import pytest
import torch
import yaml

from conftest import ROOT


def _stage_deps(repo_dir: Path) -> dict[str, set[str]]:
    from dvc.repo import Repo

    with Repo(str(repo_dir)) as repo:
        return {s.addressing: {Path(d.def_path).as_posix() for d in s.deps} for s in repo.index.stages}


def test_train_stages_read_only_their_own_category():
    deps = _stage_deps(ROOT)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    cats = params["run"]["categories"]
    for method in params["run"]["train_methods"]:
        for cat in cats:
            d = deps[f"train@{method}-demo-{cat}"]
            assert f"data/prepared/demo/{cat}" in d and f"data/synth/demo/{cat}" in d
            others = [c for c in cats if c != cat]
            assert not any(f"/demo/{o}" in x for x in d for o in others), d
            assert "data/prepared/demo" not in d and "data/synth/demo" not in d
        # fit reads every category's training output (the folder holding them)
        assert f"checkpoints/{method}/demo" in deps[f"fit@{method}-demo"]


def test_train_methods_match_the_methods_that_train_per_category():
    from defectlab.methods import get_method

    run = yaml.safe_load((ROOT / "params.yaml").read_text())["run"]
    assert run["train_methods"] == [m for m in run["methods"] if get_method(m).trains_per_category]


def test_train_methods_must_be_listed_methods():
    from defectlab.config import Params
    from defectlab.errors import ConfigError

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["run"]["train_methods"] = ["dsr", "nosuch"]
    with pytest.raises(ConfigError, match="train_methods"):
        Params(raw)


def test_training_stage_of_a_non_training_method_is_refused(tmp_path):
    from defectlab import pipeline
    from defectlab.config import Params
    from defectlab.errors import ConfigError

    params = Params(yaml.safe_load((ROOT / "params.yaml").read_text()))
    with pytest.raises(ConfigError, match="no per-category training"):
        pipeline.train(params, "patchcore", "demo", "weave", pipeline.Layout(tmp_path))


def test_synthesis_is_identical_for_an_unchanged_category(tmp_path, monkeypatch):
    """Adding an image to one category changes only that category's synthesis files."""
    import shutil

    from defectlab import pipeline
    from defectlab.config import Params
    from defectlab.data.demo import generate_demo
    from defectlab.io import sha256_file

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["run"]["categories"] = ["weave", "tray"]
    raw["datasets"]["demo"]["categories"] = ["weave", "tray"]
    raw["datasets"]["demo"]["validation_fraction"] = 0   # every train/good image feeds synthesis here
    raw["synthesis"]["cache"]["smoke"] = {"n": 4, "image_size": 48}
    params = Params(raw)
    layout = pipeline.Layout(tmp_path)
    generate_demo(layout.prepared("demo"), image_size=48, n_train=6, n_test_good=1, n_test_per_defect=1,
                  categories=["weave", "tray"])

    def hashes():
        root = tmp_path / "data/synth/demo"
        return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}

    pipeline.synthesize_dataset(params, "demo", layout)
    first = hashes()
    good = layout.prepared("demo") / "tray/train/good"
    src = sorted(good.iterdir())[0]
    shutil.copy(src, good / "zz_new.png")
    pipeline.synthesize_dataset(params, "demo", layout)
    second = hashes()
    assert {k: v for k, v in first.items() if k.startswith("weave/")} == \
        {k: v for k, v in second.items() if k.startswith("weave/")}
    assert {k: v for k, v in first.items() if k.startswith("tray/")} != \
        {k: v for k, v in second.items() if k.startswith("tray/")}


def test_stages_declare_whole_dataset_sections_not_optional_keys_dvc_would_require():
    """DVC refuses to run a stage whose declared param is missing from params.yaml; a dataset's keys
    are optional (pydantic defaults), so a stage must not name one (a user's `source: folder`
    dataset without `texture_categories` would stop `dvc repro`)."""
    import re

    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    for name, stage in dvc["stages"].items():
        for param in stage.get("do", stage).get("params", []):
            assert not re.match(r"datasets\.\$\{[^}]+\}\.", str(param)), (name, param)


def test_dataset_level_stages_read_the_pinned_training_set_not_the_dataset_folder():
    deps = _stage_deps(ROOT)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    pinned = "data/prepared/demo/pretrain_manifest.csv"
    for stage in ["backbone@demo", *(f"pretrain@{m}-demo" for m in params["run"]["methods"])]:
        assert pinned in deps[stage] and "data/prepared/demo" not in deps[stage], (stage, deps[stage])


def test_pretrain_images_are_the_pinned_training_images_checked_by_hash(tmp_path):
    """prepare pins the train split (validation images excluded); a retrain's new image in one
    category leaves the pin as it was; a file changed under the pin is an error, not read."""
    import csv
    import shutil

    from defectlab import pipeline
    from defectlab.config import Params
    from defectlab.errors import DatasetError

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["run"]["categories"] = raw["datasets"]["demo"]["categories"] = ["weave", "tray"]
    raw["datasets"]["demo"]["generator"] = {"image_size": 32, "n_train": 10, "n_test_good": 1, "n_test_per_defect": 1}
    params, layout = Params(raw), pipeline.Layout(tmp_path)
    pipeline.prepare(params, "demo", layout)
    pinned = pipeline.pretrain_images("demo", ["weave", "tray"], layout)
    for cat in ("weave", "tray"):
        data = pipeline.category_data(params, "demo", cat, layout)
        assert data.validation and sorted(pinned[cat]) == sorted(s.path for s in data.train)
        assert not {s.path for s in data.validation} & set(pinned[cat])
    manifest = (tmp_path / "data/prepared/demo" / pipeline.PRETRAIN_MANIFEST).read_bytes()
    good = layout.prepared("demo") / "tray/train/good"
    shutil.copy(sorted(good.iterdir())[0], good / "incoming_new.png")
    pipeline.update_manifests(params, "demo", "tray", layout)
    assert (tmp_path / "data/prepared/demo" / pipeline.PRETRAIN_MANIFEST).read_bytes() == manifest
    assert good / "incoming_new.png" not in pipeline.pretrain_images("demo", ["tray"], layout)["tray"]
    assert pipeline.refresh_pretrain_manifest("demo", layout) == sum(
        1 for r in csv.DictReader(open(layout.prepared("demo") / "manifest.csv")) if r["split"] == "train")
    assert good / "incoming_new.png" in pipeline.pretrain_images("demo", ["tray"], layout)["tray"]
    victim = pinned["weave"][0]
    victim.write_bytes(victim.read_bytes() + b"x")
    with pytest.raises(DatasetError, match=f"{victim.name}: changed since"):
        pipeline.pretrain_images("demo", ["weave"], layout)


def test_images_added_to_a_prepared_category_never_move_a_training_image_to_validation(tmp_path):
    """The split is part of the data version: new images fill the validation share, the images
    already split keep their side (else an extended memory bank would hold validation images)."""
    import shutil

    from defectlab import pipeline
    from defectlab.config import Params
    from defectlab.data.demo import generate_demo
    from defectlab.data.split import n_held_out

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["run"]["categories"] = raw["datasets"]["demo"]["categories"] = ["weave"]
    raw["datasets"]["demo"]["generator"] = {"image_size": 32, "n_train": 40, "n_test_good": 1, "n_test_per_defect": 1}
    params, layout = Params(raw), pipeline.Layout(tmp_path)
    pipeline.prepare(params, "demo", layout)
    before = pipeline.category_data(params, "demo", "weave", layout)
    generate_demo(tmp_path / "new", seed=11, image_size=32, n_train=8, n_test_good=0, n_test_per_defect=0,
                  categories=["weave"])
    good = layout.prepared("demo") / "weave/train/good"
    for p in sorted((tmp_path / "new/weave/train/good").glob("*.png")):
        shutil.copy(p, good / f"incoming_{p.name}")
    pipeline.update_manifests(params, "demo", "weave", layout)
    after = pipeline.category_data(params, "demo", "weave", layout)
    spec = params.dataset("demo")
    assert len(after.validation) == n_held_out(48, spec.validation_fraction, spec.min_validation) > len(before.validation)
    assert {s.path for s in before.train} <= {s.path for s in after.train}
    assert {s.path for s in before.validation} <= {s.path for s in after.validation}
    assert all(s.path.name.startswith("incoming_") for s in after.validation if s not in before.validation)


# ---- phase configs: a stage depends only on the config fields its phase reads ---------------
def _cfg(name, **over):
    from defectlab.methods import get_method

    cls = get_method(name)
    return cls, cls.Config(**over)


@pytest.mark.parametrize("method, fit_only, trained", [
    ("dsr", {"stage3_iters": 7, "score_filter": 5, "upsampling_width": 8}, {"stage2_iters": 7}),
    ("slsg", {"top_k": 5, "batch_size": 3}, {"seg_iters": 7}),
    ("msp_svdd", {"score_window": 4, "knn_backend": "faiss"}, {"epochs": 3}),
    ("apc", {"coreset_ratio": 0.5, "num_neighbors": 3}, {"epochs": 3}),
])
def test_fit_only_settings_leave_the_train_phase_config_unchanged(method, fit_only, trained):
    cls, base = _cfg(method)
    _, fit_changed = _cfg(method, **fit_only)
    _, train_changed = _cfg(method, **trained)
    assert cls.phase_config(fit_changed, "train") == cls.phase_config(base, "train")
    assert cls.phase_config(train_changed, "train") != cls.phase_config(base, "train")
    # and a network trained before the fit-only change is still accepted by fit
    assert cls(fit_changed).same_training_config(base) and not cls(train_changed).same_training_config(base)


def test_pretrain_phase_configs():
    dsr, base = _cfg("dsr")
    assert dsr.phase_config(_cfg("dsr", stage2_iters=7)[1], "pretrain") == dsr.phase_config(base, "pretrain")
    assert dsr.phase_config(_cfg("dsr", stage1_iters=7)[1], "pretrain") != dsr.phase_config(base, "pretrain")
    for name in ("patchcore", "padim", "ds2", "apc"):      # pretrain = freeze the configured backbone
        cls, cfg = _cfg(name)
        assert set(cls.phase_fields("pretrain")) <= {"backbone", "weights"} and cls.phase_fields("pretrain")
        assert cls.phase_fields("train") == [] or cls.trains_per_category
    assert _cfg("msp_svdd")[0].phase_fields("pretrain") == ["weights", "width"]


def test_default_pretrain_reads_only_backbone_and_weights(tmp_path):
    from conftest import check_phase_reads
    from defectlab.methods.base import PretrainContext
    from defectlab.methods.patchcore import PatchCore

    ctx = PretrainContext(dataset="demo", data_root=tmp_path, categories=["grain"], out_dir=tmp_path, image_size=64,
                          seed=0, device=torch.device("cpu"), progress=False)
    with check_phase_reads(PatchCore, "pretrain") as reads:
        PatchCore.pretrain(PatchCore.Config(backbone="resnet18", weights="random"), ctx)
    assert reads == {"backbone", "weights"} and (tmp_path / "backbone.safetensors").exists()
    assert "pretrain" not in PatchCore.__dict__            # the recorder's patch is gone again


def test_config_stage_rewrites_identical_files_for_a_fit_only_change(tmp_path):
    from defectlab import pipeline
    from defectlab.config import Params

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    layout = pipeline.Layout(tmp_path)
    pipeline.write_phase_configs(Params(raw), layout)
    before = {p.relative_to(tmp_path): p.read_bytes() for p in sorted(layout.configs().rglob("*.json"))}
    assert len(before) == 2 * len(raw["run"]["methods"])
    raw["methods"]["dsr"]["smoke"]["stage3_iters"] = 7               # fit-only
    raw["methods"]["patchcore"]["smoke"]["coreset_ratio"] = 0.2      # fit-only
    pipeline.write_phase_configs(Params(raw), layout)
    assert {p.relative_to(tmp_path): p.read_bytes() for p in sorted(layout.configs().rglob("*.json"))} == before
    raw["methods"]["dsr"]["smoke"]["stage2_iters"] = 7                # read by training
    pipeline.write_phase_configs(Params(raw), layout)
    after = {p.relative_to(tmp_path): p.read_bytes() for p in sorted(layout.configs().rglob("*.json"))}
    changed = {str(p) for p in before if before[p] != after[p]}
    assert changed == {"configs/dsr/train.json"}


def test_dvc_lock_holds_only_current_stages():
    """Stale entries (stages renamed or regrouped since) are parsed by every `dvc repro`;
    scripts/prune_dvc_lock.py removes them."""
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        stages = {s.addressing for s in repo.index.stages}
    locked = set(yaml.safe_load((ROOT / "dvc.lock").read_text())["stages"])
    assert locked <= stages, sorted(locked - stages)


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "stages").glob("*.py")))
def test_every_stage_script_answers_help_without_running(script, tmp_path):
    """`python stages/<s>.py --help` prints its usage and exits; it does not run the stage (the
    option-less `config` and `report` stages used to, rewriting configs/ and reports/)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run([sys.executable, str(ROOT / "stages" / script), "--help"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage:") and "DVC stage" in out.stdout
    assert not list(tmp_path.iterdir())                     # nothing written where it ran
