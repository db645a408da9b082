"""Several seeds in the DVC pipeline: `seeds: [0, 1]` adds the `seeds@<ds>` stage's extra run of
every method from scratch, and the results table and metrics/summary.json gain mean ± std over the
seeds; an extra-seed run whose inputs did not change is kept, not trained again."""

import json

import numpy as np
import pytest
import yaml

from conftest import git_dvc_init, make_project, project_env, sh
from defectlab.config import Params
from defectlab.errors import ConfigError

pytestmark = pytest.mark.slow


RUN = {"run": {"datasets": ["demo"], "categories": ["board"], "methods": ["patchcore"]}}


def test_seeds_must_be_distinct_integers_and_contain_seed():
    assert Params({**RUN, "seed": 3}).seeds == [3]
    assert Params({**RUN, "seed": 1, "seeds": [0, 1, 2]}).seeds == [0, 1, 2]
    for bad in ([0, 0], [], "0,1", [0, 1.5], [True]):
        with pytest.raises(ConfigError, match="seeds: must be a list of distinct integers"):
            Params({**RUN, "seed": 0, "seeds": bad})
    with pytest.raises(ConfigError, match=r"seeds: must contain seed \(4\)"):
        Params({**RUN, "seed": 4, "seeds": [0, 1]})
    from defectlab.pipeline import with_seed

    assert with_seed(Params({**RUN, "seed": 0, "seeds": [0, 1]}), 7).seeds == [7]      # one run of seed 7


def test_dvc_repro_with_two_seeds_reports_mean_and_std(tmp_path):
    proj = make_project(tmp_path / "proj", categories=["board"], methods=["patchcore"], backbone=False,
                        extra={"seeds": [0, 1]})
    env = project_env(proj)
    git_dvc_init(proj, env)
    out = sh(["dvc", "repro"], proj, env)
    assert "Running stage 'seeds@demo'" in out

    main = json.loads((proj / "metrics/patchcore/demo/board.json").read_text())
    extra = json.loads((proj / "metrics/seeds/demo/patchcore/board/seed-1.json").read_text())
    assert main["seed"] == 0 and extra["seed"] == 1
    # a real second run (another random backbone and coreset), on the same test images
    assert extra["n_test"] == main["n_test"] and extra["image_auroc"] != main["image_auroc"]
    assert not list((proj / "work").glob("seeds-*"))                              # scratch folder removed
    assert not (proj / "models/patchcore/demo/board/seed-1").exists()             # nothing deployed

    values = [main["image_auroc"], extra["image_auroc"]]
    summary = json.loads((proj / "metrics/summary.json").read_text())["demo"]["patchcore"]
    assert summary["image_auroc"] == pytest.approx(main["image_auroc"], abs=1e-4)    # the deployed seed's
    assert summary["seeds"] == 2
    assert summary["image_auroc_seeds_mean"] == pytest.approx(np.mean(values), abs=1e-4)
    assert summary["image_auroc_seeds_std"] == pytest.approx(np.std(values, ddof=1), abs=1e-4)
    md = (proj / "reports/results.md").read_text()
    assert "## Over seeds" in md
    row = next(line for line in md.splitlines() if line.startswith("| patchcore | demo | **mean** |") and "0,1" in line)
    assert f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}" in row

    # nothing changed: nothing runs; a fit setting changed: the seed run is redone with it
    assert "Running stage" not in sh(["dvc", "repro"], proj, env)
    key = (proj / "metrics/seeds/demo/patchcore/board/seed-1.sha256").read_text()
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["methods"]["patchcore"]["smoke"]["coreset_ratio"] = 0.05
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(["dvc", "repro", "seeds@demo"], proj, env)
    assert (proj / "metrics/seeds/demo/patchcore/board/seed-1.sha256").read_text() != key


def test_an_unchanged_extra_seed_run_is_kept(tmp_path, monkeypatch):
    """Rerunning the stage (e.g. after an unrelated method's change) keeps a seed run whose inputs
    are the same: nothing is trained again, the result is copied."""
    from defectlab import pipeline

    proj = make_project(tmp_path / "proj", categories=["board"], methods=["padim"], backbone=False,
                        extra={"seeds": [0, 1]})
    monkeypatch.chdir(proj)
    params = Params.load(proj / "params.yaml")
    layout = pipeline.Layout(root=proj)
    pipeline.prepare(params, "demo", layout)
    first = pipeline.extra_seeds(params, "demo", layout, progress=False)
    assert set(first["padim"]) == {"board/seed-1"}
    saved = (proj / "metrics/seeds/demo/padim/board/seed-1.json").read_text()

    def no_fit(*a, **k):
        raise AssertionError("refitted an unchanged seed run")

    monkeypatch.setattr(pipeline, "fit", no_fit)
    again = pipeline.extra_seeds(params, "demo", layout, progress=False)
    assert (proj / "metrics/seeds/demo/padim/board/seed-1.json").read_text() == saved
    assert again["padim"]["board/seed-1"]["image_auroc"] == first["padim"]["board/seed-1"]["image_auroc"]
    changed = Params({**params.raw, "methods": {**params.raw["methods"], "padim": {
        **params.raw["methods"]["padim"], "smoke": {**params.raw["methods"]["padim"]["smoke"], "n_features": 50}}}})
    with pytest.raises(AssertionError, match="refitted"):
        pipeline.extra_seeds(changed, "demo", layout, progress=False)
    assert (proj / "metrics/seeds/demo/padim/board/seed-1.json").read_text() == saved      # atomic: kept
