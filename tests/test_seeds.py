"""Several seeds per result: mean ± std over seeds (report.seed_summary) and
`defectlab benchmark --seeds` (one fit per seed, each at its own seed)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_seed_summary_matches_hand_computed_mean_and_sample_std():
    from defectlab.report import fmt_mean_std, mean_std, seed_summary

    per_seed = {0: {"image_auroc": 0.80, "aupro": 0.5, "seed": 0, "image_size": 64, "method": "x", "ok": True},
                1: {"image_auroc": 0.90, "aupro": None, "seed": 1, "image_size": 64, "method": "x", "ok": True},
                2: {"image_auroc": 1.00, "aupro": 0.7, "seed": 2, "image_size": 64, "method": "x", "ok": True}}
    s = seed_summary(per_seed)
    assert set(s) == {"image_auroc", "aupro"}            # not the run's seed / size, not strings or bools
    # mean 0.9; sample std sqrt(((-0.1)^2 + 0 + 0.1^2) / (3 - 1)) = 0.1
    assert s["image_auroc"]["mean"] == pytest.approx(0.9)
    assert s["image_auroc"]["std"] == pytest.approx(0.1)
    assert s["image_auroc"]["n"] == 3 and s["image_auroc"]["values"] == [0.8, 0.9, 1.0]
    # a seed without the metric is left out of its mean and n: mean 0.6, std sqrt(0.02 / 1)
    assert s["aupro"]["values"] == [0.5, None, 0.7]
    assert (s["aupro"]["mean"], s["aupro"]["std"], s["aupro"]["n"]) == pytest.approx((0.6, 0.02 ** 0.5, 2))
    assert mean_std([0.3]) == {"mean": 0.3, "std": None, "n": 1}
    assert mean_std([None]) == {"mean": None, "std": None, "n": 0}
    assert fmt_mean_std(s["image_auroc"]) == "0.900 ± 0.100"
    assert fmt_mean_std(mean_std([0.3])) == "0.300"
    assert fmt_mean_std(mean_std([])) == "—"


def test_benchmark_seeds_fits_once_per_seed_and_reports_mean_and_std(tiny_demo, tmp_path, monkeypatch):
    """``--seeds 0,1,2``: three fits, each at its own seed (different random backbone and coreset
    picks), per-seed outputs in seed-<s>/, and metrics.json's mean / std are those of the per-seed
    metrics. One seed writes the single-run layout."""
    from defectlab import pipeline
    from defectlab.config import Params
    from defectlab.methods.patchcore import PatchCore

    fits = []
    original = PatchCore.fit

    def recording_fit(self, ctx):
        out = original(self, ctx)
        fits.append((ctx.seed, self.bank.detach().cpu().numpy().copy()))
        return out

    monkeypatch.setattr(PatchCore, "fit", recording_fit)
    params = Params.load(ROOT / "params.yaml", profile="smoke")
    assert params.seed == 0
    out = tmp_path / "out"
    summary = pipeline.benchmark(params, "patchcore", tiny_demo, "board", out, image_size=32, progress=False,
                                 seeds=[0, 1, 2])

    assert [s for s, _ in fits] == [0, 1, 2]
    banks = [b for _, b in fits]
    for i in range(3):
        for j in range(i + 1, 3):
            assert banks[i].shape != banks[j].shape or not np.allclose(banks[i], banks[j])
    per_seed = {s: json.loads((out / f"seed-{s}" / "metrics.json").read_text()) for s in (0, 1, 2)}
    assert [m["seed"] for m in per_seed.values()] == [0, 1, 2]
    assert all((out / f"seed-{s}" / "maps").is_dir() for s in (0, 1, 2))
    written = json.loads((out / "metrics.json").read_text())
    assert written["seeds"] == [0, 1, 2] and written["n_seeds"] == 3
    for key in ("image_auroc", "pixel_auroc", "aupro", "image_auroc_logical"):
        values = [per_seed[s][key] for s in (0, 1, 2)]
        entry = written["metrics"][key]
        assert entry["values"] == pytest.approx(values)
        assert entry["mean"] == pytest.approx(sum(values) / 3)
        assert entry["std"] == pytest.approx(float(np.std(values, ddof=1)))
        assert entry["n"] == 3
    assert summary["metrics"]["image_auroc"] == written["metrics"]["image_auroc"]
    assert len({v for v in written["metrics"]["pixel_auroc"]["values"]}) == 3   # the runs differ

    fits.clear()
    one = pipeline.benchmark(params, "patchcore", tiny_demo, "board", tmp_path / "one", image_size=32,
                             progress=False, seeds=[7])
    assert [s for s, _ in fits] == [7]
    assert one["seed"] == 7 and isinstance(one["image_auroc"], float)
    assert (tmp_path / "one" / "maps").is_dir() and not list((tmp_path / "one").glob("seed-*"))


@pytest.mark.parametrize("text, problem", [("0,x", "comma-separated list of integers"), ("", "comma-separated"),
                                           ("1,1", "seed listed twice")])
def test_benchmark_cli_refuses_bad_seeds(tiny_demo, tmp_path, text, problem):
    from typer.testing import CliRunner

    from defectlab.cli import app

    r = CliRunner().invoke(app, ["benchmark", "--method", "patchcore", "--root", str(tiny_demo), "--category",
                                 "board", "--out", str(tmp_path / "out"), "--params", str(ROOT / "params.yaml"),
                                 "--seeds", text])
    assert r.exit_code == 2, r.output
    assert "--seeds" in r.output and problem in r.output
    assert not (tmp_path / "out").exists()
