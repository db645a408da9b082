"""External resources: the paper profile never substitutes silently. A missing resource is one error
listing every missing one (before any work), or, with ``allow_substitutes: true`` and in the smoke /
default profiles, a substitution recorded in the metrics JSON, the results table and the MLflow tag
``substituted``."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import ROOT, git_dvc_init, make_project, project_env

from defectlab import resources
from defectlab.config import Params
from defectlab.errors import ResourceMissingError

#: what a paper run of the project's params needs from outside on a machine that has nothing
PAPER_KEYS = ("imagenet.wide_resnet50_2", "imagenet.vgg16", "imagenet.resnet50", "apc.weights",
              "dsr.general_images", "synthesis.dtd_dir")


def project_params(**overrides) -> Params:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw.update(overrides)
    return Params(raw, ROOT / "params.yaml")


def configs(params: Params) -> dict:
    from defectlab import pipeline

    return {m: pipeline.load_method_config(params, m)[1] for m in params.run.methods}


@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


def test_imagenet_file_names_and_hub_dir_are_torchvisions(empty_torch_home):
    import torch
    import torchvision

    from defectlab.backbones import ARCHS

    assert set(resources.IMAGENET_FILES) == set(ARCHS)
    for arch, (_, enum) in ARCHS.items():
        assert resources.IMAGENET_FILES[arch] == Path(getattr(torchvision.models, enum).DEFAULT.url).name
    assert resources.torch_hub_dir() == Path(torch.hub.get_dir())


def test_field_defaults_are_the_method_configs():
    """The stages check the raw params sections (no method import): a field they leave out has the
    Config's default."""
    from defectlab.methods import REGISTRY, get_method

    for method in REGISTRY:
        fields = get_method(method).Config.model_fields
        for name in resources.FIELD_DEFAULTS:
            if name in fields:
                assert fields[name].default == resources.config_default(method, name), (method, name)


def test_raw_sections_and_validated_configs_give_the_same_check(empty_torch_home):
    params = project_params(profile="paper", allow_substitutes=True)
    raw = {m: params.profiled("methods", m) for m in params.run.methods}
    for m in raw:
        raw[m].pop("weights", None)          # left out: the Config default (random) applies
    validated = {m: dict(params.profiled("methods", m)) for m in params.run.methods}
    for m in validated:
        validated[m].pop("weights", None)
    from defectlab.methods import get_method

    validated = {m: get_method(m).Config.model_validate(v) for m, v in validated.items()}
    assert [r for r in resources.needed(params, raw)] == [r for r in resources.needed(params, validated)]


def test_paper_profile_names_every_missing_resource_in_one_error(empty_torch_home):
    params = project_params(profile="paper")
    with pytest.raises(ResourceMissingError) as err:
        resources.check(params, configs(params))
    msg = str(err.value)
    assert msg.startswith("6 external resource(s) missing for profile 'paper'")
    for key in PAPER_KEYS:
        assert f"\n  - {key}: " in msg, key
    for needle in ("wide_resnet50_2-9ba9bcbe.pth", "vgg16-397923af.pth", "resnet50-11ad3fa6.pth",
                   str(empty_torch_home / "hub" / "checkpoints"), resources.MOCO_V3_URL, "methods.apc.paper.weights",
                   "methods.dsr.paper.general_images", "synthesis.cache.paper.dtd_dir", "dtd-r1.0.1.tar.gz",
                   "allow_substitutes: true"):
        assert needle in msg, needle
    # the WRN-50 file is one entry naming both methods that read it
    assert msg.count("- imagenet.wide_resnet50_2:") == 1 and "patchcore (weights: imagenet); padim" in msg


def test_allow_substitutes_records_what_has_a_substitute_and_still_refuses_the_rest(empty_torch_home):
    params = project_params(profile="paper", allow_substitutes=True)
    with pytest.raises(ResourceMissingError) as err:       # ImageNet weights have no substitute
        resources.check(params, configs(params))
    assert "dsr.general_images" not in str(err.value) and "MoCo v3" not in str(err.value)
    for arch, name in resources.IMAGENET_FILES.items():    # with the weights in the hub cache: records only
        (empty_torch_home / "hub" / "checkpoints").mkdir(parents=True, exist_ok=True)
        (empty_torch_home / "hub" / "checkpoints" / name).write_bytes(b"")
    found = resources.check(params, configs(params))
    assert found.records(method="dsr") == [
        "dsr.general_images: the dataset's own normal train images + procedural textures (not ImageNet)"]
    assert found.records(method="apc") == ["apc.weights: imagenet weights instead of moco_v3"]
    assert found.records(method="slsg") == ["synthesis.dtd_dir: procedural textures instead of DTD"]
    assert found.records(method="patchcore") == []


def test_allow_substitutes_must_be_a_boolean():
    from defectlab.errors import ConfigError

    with pytest.raises(ConfigError, match="allow_substitutes"):
        project_params(allow_substitutes="yes")


def test_configured_paths_that_do_not_exist_are_errors_in_every_profile(tmp_path):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["methods"]["dsr"]["smoke"]["general_images"] = str(tmp_path / "imagenet")
    raw["synthesis"]["cache"]["smoke"]["dtd_dir"] = str(tmp_path / "dtd")
    params = Params(raw, ROOT / "params.yaml")
    with pytest.raises(ResourceMissingError, match="2 external resource") as err:
        resources.check(params, configs(params))
    assert str(tmp_path / "imagenet") in str(err.value) and str(tmp_path / "dtd") in str(err.value)


def test_smoke_records_its_documented_substitutions():
    params = project_params()
    found = resources.check(params, configs(params))
    assert found.records(method="dsr") == [
        "dsr.general_images: the dataset's own normal train images + procedural textures (not ImageNet)"]
    assert "synthesis.dtd_dir: procedural textures instead of DTD" in found.records(stage="synthesize")
    assert found.records(method="patchcore") == ["patchcore.weights: random weights instead of imagenet"]
    assert found.records(method="ds2") == []


def test_dsr_stage1_without_general_images_is_an_error_when_strict_and_recorded_otherwise(tiny_demo, caplog):
    import torch

    from defectlab.methods.base import PretrainContext
    from defectlab.methods.dsr import DSRConfig, general_image_set

    ctx = PretrainContext(dataset="demo", data_root=tiny_demo, categories=["grain"], out_dir=Path("."),
                          image_size=64, seed=0, device=torch.device("cpu"), progress=False)
    cfg = DSRConfig(n_procedural_textures=2)
    with resources.strict(), pytest.raises(ResourceMissingError, match="general_images"):
        general_image_set(cfg, ctx)
    with caplog.at_level("WARNING"):
        images, _ = general_image_set(cfg, ctx)
    assert len(images) == 16 + 2
    assert "substituted dsr.general_images" in caplog.text


def test_slsg_segnet_without_gptnet_is_an_error_when_strict_and_recorded_otherwise(tiny_demo, tmp_path):
    import torch

    from defectlab.data import scan_category
    from defectlab.methods.base import FitContext
    from defectlab.methods.slsg import SLSG, SLSGConfig

    cfg = SLSGConfig(decoder_channels=[16, 8, 8, 8], head_channels=8, disc_width=8, sg_skip_channels=8, seg_iters=1,
                     n_normal=1, n_anomalous=1, synth_n=2, batch_size=2, grid_cell=None, optimizer="adam")
    ctx = FitContext(dataset="demo", category="board", data=scan_category(tiny_demo, "board"), image_size=64, seed=0,
                     device=torch.device("cpu"), pretrain_dir=None, progress=False, work_dir=tmp_path)
    with resources.strict(), pytest.raises(ResourceMissingError, match="GPT-Net"):
        SLSG(cfg).train(ctx)
    model = SLSG(cfg)
    model.train(ctx)
    assert any(s.startswith("slsg.gptnet: SegNet encoder from random weights") for s in model.meta["substitutions"])
    assert "synthesis.dtd_dir: procedural textures instead of DTD" in model.meta["substitutions"]


def test_foreground_falling_back_to_the_whole_image_is_recorded_per_category(tmp_path):
    from defectlab.synthesis.cache import build_cache

    good = tmp_path / "flat" / "train" / "good"
    good.mkdir(parents=True)
    for i in range(4):
        image = np.full((32, 32, 3), 40, np.uint8)
        if i == 3:
            image[8:24, 8:24] = 200      # an object the heuristic finds
        else:
            image[15:17, 15 + i:17 + i] = 200    # a speck under 2 % of the image: no object found
        Image.fromarray(image).save(good / f"{i}.png")
    out = tmp_path / "synth" / "flat"
    build_cache(sorted(good.iterdir()), out, n=2, seed=0, image_size=32, kinds={"structural": 1.0},
                object_kind="object")
    records = resources.synthesis_records(out)
    fg = [r for r in records if r.startswith("synthesis.foreground:")]
    assert len(fg) == 1 and "for 3/4 normal images of flat" in fg[0], records
    assert json.loads((out / "params.json").read_text())["foreground_whole_image"] == ["0.png", "1.png", "2.png"]
    build_cache(sorted(good.iterdir()), tmp_path / "synth" / "tex", n=2, seed=0, image_size=32,
                kinds={"structural": 1.0}, object_kind="texture")
    assert not any(r.startswith("synthesis.foreground") for r in resources.synthesis_records(tmp_path / "synth/tex"))


def test_substitutions_reach_the_metrics_json_and_the_results_table(tmp_path, empty_torch_home):
    """paper + allow_substitutes with PatchCore on random weights: fit records it, evaluate writes it
    into the category's metrics JSON, the report adds a `substituted` column and a note."""
    from defectlab import pipeline
    from defectlab.data.demo import generate_demo
    from defectlab.report import build_report

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw.update(profile="paper", allow_substitutes=True)
    raw["run"] = {"datasets": ["demo"], "categories": ["board"], "methods": ["patchcore"], "train_methods": []}
    raw["datasets"]["demo"].update(categories=["board"], image_size=64)
    raw["methods"]["patchcore"]["paper"] = {"backbone": "resnet18", "weights": "random", "layers": ["layer1"],
                                            "embed_dim": 32, "coreset_ratio": 0.1}
    params = Params(raw, tmp_path / "params.yaml")
    layout = pipeline.Layout(tmp_path)
    generate_demo(layout.prepared("demo"), image_size=64, n_train=8, n_test_good=2, n_test_per_defect=1,
                  categories=["board"])
    pipeline.fit(params, "patchcore", "demo", "board", layout, progress=False)
    pipeline.evaluate(params, "patchcore", "demo", "board", layout, progress=False)
    metrics = json.loads(layout.metrics("patchcore", "demo", "board").read_text())
    assert metrics["substitutions"] == ["patchcore.weights: random weights instead of imagenet"]
    build_report(tmp_path, tmp_path / "reports")
    md = (tmp_path / "reports" / "results.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| method"))
    assert header.rstrip(" |").endswith("substituted")
    assert "| patchcore | demo | board |" in md and "patchcore.weights |" in md
    assert "- `patchcore.weights`: random weights instead of imagenet (1 rows: patchcore/demo/board)" in md


def test_stage_runs_are_tagged_with_what_was_substituted(tracked_project):
    import mlflow

    from defectlab.stagekit import run_stage

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw.update(profile="paper", allow_substitutes=True)
    raw["run"] = {"datasets": ["demo"], "categories": ["board"], "methods": ["dsr", "padim"], "train_methods": ["dsr"]}
    raw["methods"]["padim"]["paper"]["weights"] = "random"
    (tracked_project / "params.yaml").write_text(yaml.safe_dump(raw))
    seen = {}
    for method in ("dsr", "padim"):
        run_stage("fit", lambda params, run: seen.setdefault(method, run.run_id) and None, dataset="demo",
                  method=method)
    mlflow.set_tracking_uri(f"sqlite:///{tracked_project / 'mlflow.db'}")
    assert mlflow.get_run(seen["dsr"]).data.tags["substituted"] == "dsr.general_images"
    assert mlflow.get_run(seen["padim"]).data.tags["substituted"] == "padim.weights"


@pytest.mark.slow
def test_dvc_repro_of_the_paper_profile_stops_at_the_first_stage_naming_every_missing_resource(tmp_path):
    proj = make_project(tmp_path / "proj", categories=["weave"],
                        methods=["patchcore", "padim", "msp_svdd", "slsg", "dsr", "apc"], extra={"profile": "paper"})
    env = dict(project_env(proj), TORCH_HOME=str(tmp_path / "torch_home"))
    git_dvc_init(proj, env)
    r = subprocess.run(["dvc", "repro"], cwd=proj, env=env, capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert [line for line in out.splitlines() if line.startswith("Running stage")] == ["Running stage 'prepare@demo':"]
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "6 external resource(s) missing for profile 'paper'" in errors[0], out[-3000:]
    for needle in ("wide_resnet50_2-9ba9bcbe.pth", "vgg16-397923af.pth", "resnet50-11ad3fa6.pth", "MoCo v3",
                   "general_images", "dtd_dir"):
        assert needle in out, needle
    # before any work: no outputs, no MLflow run
    assert not (proj / "data" / "prepared").exists() and not (proj / "mlflow.db").exists()
    assert not (proj / "dvc.lock").exists()
