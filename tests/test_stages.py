"""The stage layout in dvc.yaml: per-category trainings depend only on their own category, the
dataset-wide synthesis gives identical files for a category whose data did not change (so DVC
skips that category's training), run.train_methods matches the methods' code."""

from pathlib import Path

import pytest
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
