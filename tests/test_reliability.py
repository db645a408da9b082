"""Unattended-run guarantees: atomic outputs survive failures and kills, stale temporaries are
cleaned, concurrent runs of a stage wait for each other (and say so), results are deterministic."""

import errno
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from defectlab.io import atomic_dir, write_json

SRC = Path(__file__).resolve().parents[1] / "src"


def _env():
    return dict(os.environ, PYTHONPATH=str(SRC))


def test_disk_full_while_writing_keeps_old_output(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "weights.bin").write_bytes(b"old")
    with pytest.raises(OSError):
        with atomic_dir(out) as tmp:
            (tmp / "weights.bin").write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert (out / "weights.bin").read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]          # no temporary left behind


def test_killed_writer_leaves_old_output_and_next_run_cleans_up(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "weights.bin").write_bytes(b"old")
    code = textwrap.dedent(f"""
        import time
        from defectlab.io import atomic_dir
        with atomic_dir({str(out)!r}) as tmp:
            (tmp / "weights.bin").write_bytes(b"partial")
            print("writing", flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], env=_env(), stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / "weights.bin").read_bytes() == b"old"
    stale = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(stale) == 1                                             # the killed run's temporary
    with atomic_dir(out) as tmp:                                       # the next run
        (tmp / "weights.bin").write_bytes(b"new")
    assert (out / "weights.bin").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]     # stale temporary removed


def test_second_process_on_same_stage_waits_and_says_what_for(tmp_path):
    holder = textwrap.dedent(f"""
        import time
        from defectlab.stagekit import stage_lock
        with stage_lock("fit@patchcore-demo-grain", {str(tmp_path)!r}):
            print("locked", flush=True)
            time.sleep(3)
    """)
    waiter = textwrap.dedent(f"""
        import time
        from defectlab.stagekit import stage_lock
        t0 = time.time()
        with stage_lock("fit@patchcore-demo-grain", {str(tmp_path)!r}):
            print(f"acquired after {{time.time() - t0:.1f}}", flush=True)
    """)
    first = subprocess.Popen([sys.executable, "-c", holder], env=_env(), stdout=subprocess.PIPE, text=True)
    assert first.stdout.readline().strip() == "locked"
    second = subprocess.run([sys.executable, "-c", waiter], env=_env(), capture_output=True, text=True, timeout=60)
    first.wait()
    assert "waiting for" in second.stderr and "fit@patchcore-demo-grain" in second.stderr
    assert float(second.stdout.split()[-1]) >= 0.5


def test_same_seed_gives_bit_identical_results(tiny_demo):
    from defectlab.data import scan_category
    from defectlab.methods.base import FitContext, make_loader
    from defectlab.methods.patchcore import PatchCore, PatchCoreConfig
    from defectlab.pipeline import seed_everything

    data = scan_category(tiny_demo, "weave")

    def run():
        seed_everything(0)
        model = PatchCore(PatchCoreConfig(embed_dim=64, coreset_ratio=0.2), "cpu")
        model.fit(FitContext(dataset="demo", category="weave", data=data, image_size=64, seed=0,
                             device=torch.device("cpu"), progress=False))
        return model.predict_loader(make_loader(data.test, 64, 4))

    a, b = run(), run()
    assert np.array_equal(a["scores"], b["scores"]) and np.array_equal(a["maps"], b["maps"])


def test_metrics_json_refuses_nan(tmp_path):
    with pytest.raises(ValueError):
        write_json(tmp_path / "m.json", {"auroc": float("nan")})
    assert not list(tmp_path.iterdir())


def test_prepare_keeps_images_the_retrain_flow_accepted(tmp_path):
    import shutil

    import yaml

    from defectlab.config import Params
    from defectlab.pipeline import Layout, prepare

    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    raw["datasets"]["demo"].update(categories=["grain"], generator={"image_size": 32, "n_train": 3,
                                                                     "n_test_good": 1, "n_test_per_defect": 1})
    params, layout = Params(raw), Layout(tmp_path)
    prepare(params, "demo", layout)
    accepted = tmp_path / "data/accepted/demo/grain"
    accepted.mkdir(parents=True)
    shutil.copy(tmp_path / "data/prepared/demo/grain/train/good/000.png", accepted / "incoming_abc.png")
    summary = prepare(params, "demo", layout)             # a rerun of the stage
    assert summary["grain"]["train"] == 4
    assert (tmp_path / "data/prepared/demo/grain/train/good/incoming_abc.png").exists()
