"""Shared fixtures: a tiny demo dataset generated once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("DEFECTLAB_TRACKING", "off")   # unit tests don't write MLflow runs unless they opt in
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory) -> Path:
    """The demo dataset at 64 px with few images (all four categories)."""
    from defectlab.data.demo import generate_demo

    root = tmp_path_factory.mktemp("demo") / "demo"
    generate_demo(root, seed=0, image_size=64, n_train=16, n_test_good=6, n_test_per_defect=2)
    return root


@pytest.fixture(scope="session")
def small_demo(tmp_path_factory) -> Path:
    """The demo dataset at 96 px (more images): for detection-quality tests."""
    from defectlab.data.demo import generate_demo

    root = tmp_path_factory.mktemp("demo96") / "demo"
    generate_demo(root, seed=0, image_size=96, n_train=24, n_test_good=8, n_test_per_defect=3)
    return root


@pytest.fixture
def tracked_project(tmp_path, monkeypatch) -> Path:
    """A DVC-looking project (``.dvc/``) with one prepared category, as the cwd, tracking on into its
    own local store (no tracking URI or DVC experiment variables inherited)."""
    (tmp_path / ".dvc").mkdir()
    cat = tmp_path / "data" / "prepared" / "demo" / "board"
    cat.mkdir(parents=True)
    (cat / "manifest.csv").write_text("category,split,path,sha256\nboard,train,train/good/0.png,abc\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DEFECTLAB_TRACKING", "on")
    for var in ("MLFLOW_TRACKING_URI", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


# ---------------------------------------------------------------------------------------------
# tiny copies of the project for the end-to-end tests (dvc repro, flows, MLflow UI)
# ---------------------------------------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[1]


def sh(cmd, cwd, env=None, timeout=900) -> str:
    """Run a command; fail the test with its output tail when it fails."""
    import subprocess

    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{cmd} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout + r.stderr


def make_project(dest: Path, *, categories, methods, size: int = 64, n_train: int = 12, n_test_good: int = 4,
                 n_test_per_defect: int = 2, backbone: bool = True, extra: dict | None = None) -> Path:
    """Copy the project (src, stages, dvc.yaml, params.yaml) to ``dest`` with a small matrix and tiny
    images. ``backbone=True`` keeps the DS2 backbone stage with a few-second training budget;
    ``False`` drops it (and the deps on its output) for tests whose methods use random weights."""
    import shutil

    import yaml

    for item in ("src", "stages", "dvc.yaml", "params.yaml", ".dvcignore", "data/accepted"):
        src = ROOT / item
        (dest / item).parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dest / item)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    trains = [m for m in methods if m in params["run"].get("train_methods", [])]
    params["run"] = {"datasets": ["demo"], "categories": list(categories), "methods": list(methods),
                     "train_methods": trains}
    demo = params["datasets"]["demo"]
    demo.update(categories=list(categories), image_size=size,
                texture_categories=[c for c in demo["texture_categories"] if c in categories],
                generator={"image_size": size, "n_train": n_train, "n_test_good": n_test_good,
                           "n_test_per_defect": n_test_per_defect})
    params["synthesis"]["cache"]["smoke"] = {"n": 4, "image_size": size}
    params["evaluation"]["eval"]["smoke"] = {"n_overlays": 2}
    params["backbone"]["ds2"]["smoke"].update(crop_size=32, batch_size=8, epochs=1, proj_hidden=64, proj_dim=32)
    for key, value in (extra or {}).items():     # "a.b.c": value
        *path, last = key.split(".")
        node = params
        for p in path:
            node = node.setdefault(p, {})
        node[last] = value
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dvc = yaml.safe_load((dest / "dvc.yaml").read_text())
    if not trains:                     # DVC refuses a matrix over an empty list
        del dvc["stages"]["train"]
    if not backbone:
        del dvc["stages"]["backbone"]
        for stage in dvc["stages"].values():
            body = stage.get("do", stage)
            body["deps"] = [d for d in body.get("deps", []) if not str(d).startswith("models/backbone/")]
    (dest / "dvc.yaml").write_text(yaml.safe_dump(dvc, sort_keys=False))
    return dest


def project_env(proj: Path) -> dict:
    import sys

    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               PYTHONPATH=str(proj / "src"), DEFECTLAB_TRACKING="on")
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def git_dvc_init(proj: Path, env: dict) -> None:
    import shutil

    for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "t@t"], ["git", "config", "user.name", "t"],
                ["dvc", "init", "-q"]):
        sh(cmd, proj, env)
    shutil.copytree(ROOT / ".dvc" / "plots", proj / ".dvc" / "plots")   # the project's chart templates
    for cmd in (["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        sh(cmd, proj, env)


def build_repro_project(tmp_path_factory):
    """A tiny project (patchcore + padim on weave + board, DS2 backbone stage included) after one
    full `dvc repro` with MLflow tracking on: (project, env, output of the first repro)."""
    proj = make_project(tmp_path_factory.mktemp("proj"), categories=["weave", "board"], methods=["patchcore", "padim"])
    env = project_env(proj)
    git_dvc_init(proj, env)
    first = sh(["dvc", "repro"], proj, env)
    return proj, env, first


@pytest.fixture(scope="session")
def repro_project(tmp_path_factory):
    """``build_repro_project``, shared, read only: a module that changes params, data or models
    builds its own (tests run in any order, and in parallel workers)."""
    return build_repro_project(tmp_path_factory)


class record_field_reads:
    """Context manager recording which fields of a pydantic config class are read (attribute
    access on any instance) while the block runs: ``with record_field_reads(DSRConfig) as reads:``.
    ``model_dump`` (saving the whole config next to an output) is not a read."""

    def __init__(self, config_cls):
        self.cls, self.reads = config_cls, set()

    def __enter__(self) -> set:
        fields, reads = set(self.cls.model_fields), self.reads
        base_get = object.__getattribute__

        def getattribute(obj, name):
            if name in fields:
                reads.add(name)
            return base_get(obj, name)

        self._had = "__getattribute__" in self.cls.__dict__
        self._old = self.cls.__dict__.get("__getattribute__")
        type.__setattr__(self.cls, "__getattribute__", getattribute)
        return reads

    def __exit__(self, *exc) -> None:
        if self._had:
            type.__setattr__(self.cls, "__getattribute__", self._old)
        else:
            type.__delattr__(self.cls, "__getattribute__")


def assert_phase_reads_declared(method_cls, phase: str, reads: set) -> None:
    """Every config field the phase read is one of its declared inputs (``phase_fields``), or a
    field declared result-neutral (checkpoint cadence, workers)."""
    undeclared = reads - set(method_cls.phase_fields(phase)) - set(method_cls.RESULT_NEUTRAL)
    assert not undeclared, (f"{method_cls.name}.{phase} read {sorted(undeclared)}, which its stage does not "
                            f"depend on: remove them from {phase.upper()}_IGNORES")
    assert reads, f"recorded no reads for {method_cls.name}.{phase}: the recorder is not working"


class check_phase_reads:
    """While the block runs, record the config fields ``method_cls.<phase>`` reads (pretrain or
    train, however it is called) and on exit assert they are declared (assert_phase_reads_declared)."""

    def __init__(self, method_cls, phase: str):
        self.cls, self.phase, self.reads = method_cls, phase, set()

    def __enter__(self) -> set:
        import inspect

        cls, phase, reads = self.cls, self.phase, self.reads
        self._own = phase in cls.__dict__                     # else inherited: delete the patch on exit
        self._orig = inspect.getattr_static(cls, phase)
        func = self._orig.__func__ if isinstance(self._orig, classmethod) else self._orig

        def wrapped(*args, **kwargs):
            with record_field_reads(cls.Config) as r:
                out = func(*args, **kwargs)
            reads.update(r)
            return out

        setattr(cls, phase, classmethod(wrapped) if isinstance(self._orig, classmethod) else wrapped)
        return reads

    def __exit__(self, exc_type, *exc) -> None:
        if self._own:
            setattr(self.cls, self.phase, self._orig)
        else:
            delattr(self.cls, self.phase)
        if exc_type is None:
            assert_phase_reads_declared(self.cls, self.phase, self.reads)
