"""Deployment from a pipeline run: registered pyfunc models with a champion, `defectlab predict` on a
registry URI, the model served by `mlflow models serve`, and `defectlab export` (ONNX)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

NAME = "patchcore-demo-weave"


def _cli(proj, env, *args, timeout=300, whole=False):
    r = subprocess.run([sys.executable, "-m", "defectlab.cli", *args], cwd=proj, env=env, capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, f"defectlab {' '.join(args)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    if whole:
        return json.loads(r.stdout)
    return [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]


def _images(proj) -> list[Path]:
    test = proj / "data" / "prepared" / "demo" / "weave" / "test"
    return [sorted((test / "good").iterdir())[0], sorted(next(d for d in sorted(test.iterdir()) if d.name != "good").iterdir())[0]]


def _store_env(proj, env):
    return dict(env, MLFLOW_TRACKING_URI=f"sqlite:///{proj / 'mlflow.db'}")


def test_every_fitted_model_is_self_contained_registered_and_champion(repro_project):
    from mlflow import MlflowClient

    proj, env, _ = repro_project
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{proj / 'mlflow.db'}")
    client = MlflowClient()
    for method in ("patchcore", "padim"):
        for cat in ("weave", "board"):
            info = json.loads((proj / "models" / method / "demo" / cat / "model.json").read_text())
            assert info["threshold"]["source"] == "validation" and info["threshold"]["image"] is not None
            assert info["preprocess"]["image_size"] == 64
            mv = client.get_model_version_by_alias(f"{method}-demo-{cat}", "champion")
            assert str(mv.version) == "1" and mv.tags["threshold.source"] == "validation"
            assert float(mv.tags["threshold"]) == pytest.approx(info["threshold"]["image"])


def test_predict_on_a_registry_uri_equals_predict_on_the_folder(repro_project, tmp_path):
    proj, env, _ = repro_project
    folder = tmp_path / "imgs"
    folder.mkdir()
    for p in _images(proj):
        (folder / f"{p.parent.name}_{p.name}").write_bytes(p.read_bytes())
    env = _store_env(proj, env)
    local = _cli(proj, env, "predict", "models/patchcore/demo/weave", str(folder), "--json", "--device", "cpu")
    remote = _cli(proj, env, "predict", f"models:/{NAME}@champion", str(folder), "--json", "--device", "cpu",
                  "--out", str(tmp_path / "out"))
    assert [r["score"] for r in local] == [r["score"] for r in remote]
    assert len(local) == 2 and (tmp_path / "out" / "predictions.csv").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_pyfunc_round_trip_through_a_served_model(repro_project, tmp_path):
    """`mlflow models serve` of the champion answers POST /invocations with predict's scores."""
    import urllib.request

    from defectlab.serving import encode_image

    proj, env, _ = repro_project
    env = _store_env(proj, env)
    images = _images(proj)
    expected = _cli(proj, env, "predict", "models/patchcore/demo/weave", *map(str, images), "--json", "--device", "cpu")
    # a fresh process loads the registered pyfunc model by alias
    code = ("import json, sys, mlflow, pandas as pd; from defectlab.serving import encode_image; "
            f"m = mlflow.pyfunc.load_model('models:/{NAME}@champion'); "
            "df = pd.DataFrame({'image': [encode_image(p) for p in sys.argv[1:]]}); "
            "print(json.dumps(m.predict(df)['score'].tolist()))")
    r = subprocess.run([sys.executable, "-c", code, *map(str, images)], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    # float32 scores from two processes: the BLAS kernels (thread count, batch shapes) may round differently
    assert json.loads(r.stdout.strip().splitlines()[-1]) == pytest.approx([e["score"] for e in expected], rel=1e-4)

    port = _free_port()
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    server = subprocess.Popen([str(mlflow_bin), "models", "serve", "-m", f"models:/{NAME}@champion", "--env-manager",
                               "local", "-h", "127.0.0.1", "-p", str(port)], cwd=tmp_path, env=env,
                              stdout=subprocess.DEVNULL, stderr=open(tmp_path / "serve.log", "w"))
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
                assert time.time() < deadline, "server did not come up: " + (tmp_path / "serve.log").read_text()[-3000:]
                time.sleep(1)
        body = json.dumps({"dataframe_split": {"columns": ["image"],
                                               "data": [[encode_image(p)] for p in images] + [["bm90IGFuIGltYWdl"]]}})
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body.encode(),
                                     headers={"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(req, timeout=60).read())
    finally:
        server.terminate()
        server.wait(timeout=30)
    rows = answer["predictions"]
    assert [row["score"] for row in rows[:2]] == pytest.approx([e["score"] for e in expected], rel=1e-4)
    assert [row["label"] for row in rows[:2]] == [e["label"] for e in expected]
    bad = rows[2]["score"]
    assert rows[2]["error"] and (bad is None or bad != bad)       # not an image: reported (null / NaN), others scored


def test_export_cli_writes_an_onnx_model_that_matches_predict(repro_project, tmp_path):
    import onnxruntime as ort
    from PIL import Image

    proj, env, _ = repro_project
    out = tmp_path / "weave.onnx"
    facts = _cli(proj, env, "export", "models/patchcore/demo/weave", "--format", "onnx", "--out", str(out), whole=True)
    assert facts["score_rel_diff"] <= 1e-4 and facts["map_rel_diff"] <= 1e-4
    assert out.exists() and facts
    images = _images(proj)
    expected = _cli(proj, env, "predict", "models/patchcore/demo/weave", *map(str, images), "--json", "--device", "cpu")
    x = np.stack([np.asarray(Image.open(p).convert("RGB").resize((64, 64), Image.BILINEAR), np.float32) / 255
                  for p in images]).transpose(0, 3, 1, 2)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    scores = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    assert np.allclose(scores, [e["score"] for e in expected], rtol=1e-4)
