"""MLflow tracking: one run per stage execution.

- Tracking URI: ``MLFLOW_TRACKING_URI`` when set, else params ``tracking.uri``, else the local
  SQLite store of the project, ``<project root>/mlflow.db`` as an absolute URI (artifacts in
  ``<project root>/mlartifacts/``) — a database store, so the model registry (aliases
  ``champion`` / ``challenger``) works locally. The project root is the DVC repo root of the
  original project, also when a stage runs in a `dvc exp run --temp` / `--queue` copy under
  ``<root>/.dvc/tmp/exps/...`` (``project_root``): every experiment lands in one store.
- Experiment per dataset; run name ``<stage>/<method>/<category>``; tags for method, dataset,
  category, profile, stage, DVC stage name, seed, library versions, MLflow's source tags
  (``mlflow.source.git.commit`` / ``.git.branch`` / ``.name`` / ``.type``; ``git.commit`` kept)
  and ``dvc.exp_name`` inside a DVC experiment. A stage that covers all categories of a dataset
  (fit, evaluate, synthesize) opens one parent run ``<stage>/<method>`` and one nested child run
  per category (``StageRun.child``) holding that category's metrics, artifacts and registered
  model; a child gets the parent's params plus ``category``, so MLflow's compare view diffs any
  two runs. A per-category run logs the category's prepared data as an MLflow dataset input
  (name ``<dataset>/<category>``, digest from its ``manifest.csv``).
- Training loops' per-step losses (``defectlab.steplog``) become step-indexed metrics of the
  stage's run.
- A fitted model is registered as a new version of ``<method>-<dataset>-<category>`` only when its
  files differ from the latest version's (tag ``content.sha256``): rerunning a dataset-wide fit
  after one category changed adds no version to the others.
- A remote server that cannot be reached fails fast (a few seconds) with a clear message, or —
  with ``tracking.fallback_local: true`` — falls back to the local store, never hangs.
- ``DEFECTLAB_TRACKING=off`` disables tracking (for unit tests of other modules).
"""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

from defectlab import steplog
from defectlab.errors import DefectlabError

LOCAL_DB = "mlflow.db"
LOCAL_ARTIFACTS = "mlartifacts"
#: where DVC runs a `dvc exp run --temp` / queued experiment: a copy of the repo in a temp dir
#: under the original repo's ``.dvc/tmp/exps/`` (dvc.repo.experiments.executor.local.TempDirExecutor)
EXPS_DIR = "/.dvc/tmp/exps/"


class TrackingError(DefectlabError, RuntimeError):
    """The tracking server is unusable."""


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists become their string form."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def project_root(cwd: str | Path | None = None) -> Path:
    """The project's DVC repo root: the original repo for a stage running in a DVC experiment's temp
    copy (``<root>/.dvc/tmp/exps/<tmp>/...``), else the nearest folder at or above ``cwd`` holding
    ``.dvc``, else ``cwd``. DVC also passes ``DVC_ROOT`` (the original root in queued / temp runs), but
    a plain `dvc repro` keeps a ``DVC_ROOT`` inherited from an outer process (dvc.stage.run.prepare_kwargs),
    so it can name another project: the path is the signal used."""
    cwd = Path(cwd or os.getcwd()).resolve()
    text = cwd.as_posix() + "/"
    if EXPS_DIR in text:
        return Path(text[:text.index(EXPS_DIR)])
    return next((d for d in (cwd, *cwd.parents) if (d / ".dvc").is_dir()), cwd)


def local_uri(root: str | Path | None = None) -> str:
    """The project's local store as an absolute sqlite URI (``sqlite:////abs/path/mlflow.db``)."""
    return f"sqlite:///{(Path(root) if root else project_root()) / LOCAL_DB}"


def _git(root, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()


def git_info(root: str | Path = ".") -> dict[str, str]:
    """{'commit': sha or 'unknown', 'dirty': 'True' | 'False', 'branch': name or ''} of the checkout at ``root``."""
    try:
        sha = _git(root, "rev-parse", "HEAD")
        dirty = bool(_git(root, "status", "--porcelain", "--untracked-files=no"))
        branch = _git(root, "rev-parse", "--abbrev-ref", "HEAD") if sha else ""
    except (OSError, subprocess.SubprocessError):
        sha, dirty, branch = "", False, ""
    return {"commit": sha or "unknown", "dirty": str(dirty), "branch": "" if branch == "HEAD" else branch}


def versions() -> dict[str, str]:
    """Installed versions (package metadata: no import, so stages without torch stay light)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("torch", "torchvision", "numpy", "defectlab"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "none"
    return out


def tracking_uri(config: dict | None = None) -> str:
    config = config or {}
    return os.environ.get("MLFLOW_TRACKING_URI") or config.get("uri") or local_uri()


def _check_reachable(uri: str, timeout: float) -> None:
    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout)  # noqa: S310 - user-configured URI
    except Exception as err:  # noqa: BLE001 - any failure means unusable
        raise TrackingError(f"MLflow tracking server {uri} is unreachable ({err}); start it, unset MLFLOW_TRACKING_URI, "
                            f"or set tracking.fallback_local: true in params.yaml") from None


def setup(config: dict | None = None) -> str | None:
    """Configure mlflow; returns the URI in use, or None when tracking is disabled."""
    if os.environ.get("DEFECTLAB_TRACKING", "on").lower() in ("off", "0", "false"):
        return None
    import mlflow

    config = config or {}
    uri = tracking_uri(config)
    try:
        _check_reachable(uri, float(config.get("timeout_s", 5)))
    except TrackingError:
        if not config.get("fallback_local", False):
            raise
        uri = local_uri()
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(config.get("timeout_s", 5)) * 2))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    mlflow.set_tracking_uri(uri)
    if uri.startswith("sqlite:///"):
        _init_sqlite_store(uri)
    return uri


def _init_sqlite_store(uri: str) -> None:
    """Create / migrate a local sqlite store under a file lock. MLflow runs its schema migrations
    the first time a process opens the file; two stages starting at once on a new store (parallel
    roots of the pipeline graph, a Dask cluster) would otherwise both migrate and one crashes with
    "table _alembic_tmp_... already exists"."""
    import mlflow
    from filelock import FileLock

    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(db) + ".lock"):
        client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
        client.search_experiments(max_results=1)            # tracking tables
        client.search_registered_models(max_results=1)      # model-registry tables (same file)


def _experiment(name: str) -> str:
    import mlflow

    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    uri = mlflow.get_tracking_uri()
    # a sqlite store keeps its artifacts next to the database file (the project root for the local store)
    db = Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None
    location = (db.parent / LOCAL_ARTIFACTS).resolve().as_uri() + f"/{name}" if db else None
    try:
        return mlflow.create_experiment(name, artifact_location=location)
    except Exception:  # created concurrently by another process
        return mlflow.get_experiment_by_name(name).experiment_id


#: the MLflow tag listing what stood in for a missing external resource (defectlab.resources)
SUBSTITUTED_TAG = "substituted"


class StageRun:
    """Thin wrapper handed to stage code; every method is a no-op when tracking is off."""

    def __init__(self, run=None, tags: dict | None = None, data_dir: Callable[[str, str], Path] | None = None):
        self.run = run
        self.tags = dict(tags or {})
        self.data_dir = data_dir   # (dataset, category) -> its prepared folder (the stage's layout)
        self.params: dict[str, str] = {}     # what log_params sent (a child starts with these)

    @contextlib.contextmanager
    def child(self, category: str, data_context: str | None = None) -> Iterator["StageRun"]:
        """A nested run for one category of a dataset-wide stage (a no-op when tracking is off): the
        parent's tags and params plus ``category``, and the category's data as a dataset input
        (``data_context``: "evaluation" for the evaluate stage, else "training")."""
        if not self.run:
            yield StageRun(None)
            return
        import mlflow

        tags = {**self.tags, "category": category}
        name = "/".join(x for x in (tags.get("stage"), tags.get("method"), category) if x)
        with mlflow.start_run(experiment_id=self.run.info.experiment_id, run_name=name, nested=True,
                              tags=tags) as run:
            child = StageRun(run, tags, self.data_dir)
            child.log_params({**self.params, "category": category})
            child.log_category_input(tags["dataset"], category, data_context or _data_context(tags.get("stage")))
            yield child

    @property
    def active(self) -> bool:
        return self.run is not None

    @property
    def run_id(self) -> str | None:
        return self.run.info.run_id if self.run else None

    def log_params(self, params: dict) -> None:
        if self.run:
            import mlflow

            flat = {k: str(v)[:6000] for k, v in flatten(params).items()}
            self.params.update(flat)
            items = list(flat.items())
            for i in range(0, len(items), 100):
                mlflow.log_params(dict(items[i:i + 100]))

    def log_metrics(self, metrics: dict, prefix: str = "") -> None:
        if self.run:
            import mlflow

            clean = {f"{prefix}{k}": float(v) for k, v in flatten(metrics).items()
                     if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v}
            if clean:
                mlflow.log_metrics(clean)

    def log_category_input(self, dataset: str, category: str, context: str) -> None:
        """Log ``data/prepared/<dataset>/<category>`` as this run's MLflow dataset input ``<dataset>/<category>``:
        digest = the sha256 of its ``manifest.csv`` (every file by sha256), cut to the 36 characters
        MLflow stores (the full hash is the input tag ``manifest.sha256``). Nothing when there is no manifest."""
        from defectlab.io import sha256_file

        if not self.run or self.data_dir is None:
            return
        folder = Path(self.data_dir(dataset, category))
        if not (folder / "manifest.csv").is_file():
            return
        import mlflow
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.data.sources import LocalArtifactDatasetSource

        sha = sha256_file(folder / "manifest.csv")
        # the folder in the project itself (not in the temp copy of a `dvc exp run --temp`)
        source = LocalArtifactDatasetSource(str(folder if folder.is_absolute() else project_root() / folder))
        ds = MetaDataset(source, name=f"{dataset}/{category}", digest=sha[:36])
        mlflow.log_input(ds, context=context, tags={"manifest.sha256": sha})

    def log_artifacts(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.run:
            import mlflow

            path = Path(path)
            if path.is_dir():
                mlflow.log_artifacts(str(path), artifact_path)
            elif path.exists():
                mlflow.log_artifact(str(path), artifact_path)

    def register_model(self, name: str, artifact_path: str = "model", tags: dict | None = None,
                       content_sha256: str | None = None) -> str | None:
        """Register the run's ``artifact_path`` as a new version of model ``name``; returns the version.
        With ``content_sha256`` (``pipeline.model_sha256``), a model identical to the latest version is not
        registered again: that version is returned (and tagged ``unchanged: true`` on this run)."""
        if not self.run:
            return None
        client, unchanged = self._registered(name, content_sha256)
        if unchanged:
            return unchanged
        source = f"{self.run.info.artifact_uri}/{artifact_path}"
        mv = client.create_model_version(name, source, run_id=self.run_id, tags=self._version_tags(tags, content_sha256))
        client.set_tag(self.run_id, "model.version", mv.version)
        return mv.version

    def register_pyfunc(self, name: str, model_dir: str | Path, tags: dict | None = None,
                        content_sha256: str | None = None, example_image: str | Path | None = None) -> str | None:
        """Log ``model_dir`` as an MLflow pyfunc model (defectlab.serving) in this run and register it
        as a new version of ``name``; unchanged content reuses the latest version (as ``register_model``)."""
        if not self.run:
            return None
        import mlflow

        from defectlab import serving

        client, unchanged = self._registered(name, content_sha256)
        if unchanged:
            return unchanged
        info = serving.log_model(model_dir, example_image=example_image)
        mv = mlflow.register_model(info.model_uri, name, tags=self._version_tags(tags, content_sha256))
        client.set_tag(self.run_id, "model.version", mv.version)
        return mv.version

    @staticmethod
    def _version_tags(tags: dict | None, content_sha256: str | None) -> dict:
        return {**(tags or {}), **({"content.sha256": content_sha256} if content_sha256 else {})}

    def _registered(self, name: str, content_sha256: str | None):
        """(client, latest version if it holds the same content else None); creates ``name`` if new."""
        from mlflow import MlflowClient

        client = MlflowClient()
        try:
            client.create_registered_model(name)
        except Exception:  # already exists
            pass
        if content_sha256:
            existing = client.search_model_versions(f"name='{name}'")
            latest = max(existing, key=lambda v: int(v.version), default=None)
            if latest is not None and (latest.tags or {}).get("content.sha256") == content_sha256:
                client.set_tag(self.run_id, "model.unchanged", "true")
                client.set_tag(self.run_id, "model.version", latest.version)
                return client, latest.version
        return client, None


@contextlib.contextmanager
def stage_run(stage: str, *, dataset: str, method: str | None = None, category: str | None = None,
              profile: str | None = None, seed: int | None = None, params: dict | None = None,
              config: dict | None = None, dvc_stage: str | None = None,
              data_dir: Callable[[str, str], Path] | None = None,
              substituted: list[str] | None = None) -> Iterator[StageRun]:
    """Open an MLflow run for one stage execution (or a no-op when tracking is disabled).
    ``data_dir(dataset, category)``: the category's prepared folder, logged as the run's dataset input.
    ``substituted``: the substitution records of this stage (``defectlab.resources``), tagged
    ``substituted=<their keys, comma-separated>`` on the run and its category runs."""
    if setup(config) is None:
        yield StageRun(None)
        return
    import mlflow

    tags = {"stage": stage, "dataset": dataset, "method": method or "", "category": category or "",
            "profile": profile or "", "seed": str(seed), "dvc.stage": dvc_stage or stage,
            **source_tags(stage, dvc_stage), **{f"version.{k}": v for k, v in versions().items()}}
    if substituted:
        from defectlab.resources import tag_value

        tags[SUBSTITUTED_TAG] = tag_value(substituted)
    name = "/".join(x for x in (stage, method, category) if x)
    with mlflow.start_run(experiment_id=_experiment(dataset), run_name=name, tags=tags) as run:
        sr = StageRun(run, tags, data_dir)
        sr.log_params({"dataset": dataset, **({"method": method} if method else {}),
                       **({"category": category} if category else {}), **(params or {})})
        if category:
            sr.log_category_input(dataset, category, _data_context(stage))
        steps = _StepBuffer()
        try:
            with steplog.sink(steps.add):
                yield sr
        finally:
            try:
                steps.flush()
            except Exception as err:  # noqa: BLE001 - never hide the stage's own outcome behind its curves
                print(f"warning: the training curves of run {sr.run_id} were not logged: {err}", file=sys.stderr)


class _StepBuffer:
    """Per-step training metrics, sent to the run that was active when each was recorded in batches
    of up to 1000 (``MlflowClient.log_batch``: one call per batch instead of one per point, ~50x
    less time on a local sqlite store than ``mlflow.log_metric`` per step)."""

    def __init__(self, size: int = 1000):
        self.size, self.points = size, []

    def add(self, key: str, value: float, step: int) -> None:
        import time

        import mlflow
        from mlflow.entities import Metric

        run = mlflow.active_run()
        if run is not None:
            self.points.append((run.info.run_id, Metric(key, value, int(time.time() * 1000), step)))
        if len(self.points) >= self.size:
            self.flush()

    def flush(self) -> None:
        from mlflow import MlflowClient

        by_run: dict[str, list] = {}
        for run_id, metric in self.points:
            by_run.setdefault(run_id, []).append(metric)
        self.points = []
        client = MlflowClient()
        for run_id, metrics in by_run.items():
            for i in range(0, len(metrics), self.size):
                client.log_batch(run_id, metrics=metrics[i:i + self.size])


def _data_context(stage: str | None) -> str:
    return "evaluation" if stage == "evaluate" else "training"


def source_tags(stage: str, dvc_stage: str | None = None) -> dict[str, str]:
    """MLflow's standard source tags (``mlflow.source.*``; the UI's Source / Git commit columns), the
    ``git.*`` tags and, inside `dvc exp run`, the experiment's name and baseline commit."""
    from mlflow.entities import SourceType
    from mlflow.utils.mlflow_tags import (MLFLOW_GIT_BRANCH, MLFLOW_GIT_COMMIT, MLFLOW_SOURCE_NAME,
                                          MLFLOW_SOURCE_TYPE)

    git = git_info()
    script = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
    root = Path.cwd().resolve()
    name = script.relative_to(root).as_posix() if script and script.is_file() and script.is_relative_to(root) \
        else os.environ.get("DVC_STAGE") or dvc_stage or stage
    tags = {MLFLOW_GIT_COMMIT: git["commit"], MLFLOW_SOURCE_NAME: name,
            MLFLOW_SOURCE_TYPE: SourceType.to_string(SourceType.LOCAL),
            "git.commit": git["commit"], "git.dirty": git["dirty"]}
    if git["branch"]:
        tags[MLFLOW_GIT_BRANCH] = git["branch"]
    for env, tag in (("DVC_EXP_NAME", "dvc.exp_name"), ("DVC_EXP_BASELINE_REV", "dvc.exp_baseline_rev")):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    return tags
