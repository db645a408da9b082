"""MLflow tracking: one run per stage execution.

- Tracking URI: ``MLFLOW_TRACKING_URI`` when set, else params ``tracking.uri``, else a local
  SQLite store in the repository (``sqlite:///mlflow.db``, artifacts in ``mlartifacts/``) — a
  database store, so the model registry (aliases ``champion`` / ``challenger``) works locally.
- Experiment per dataset; run name ``<stage>/<method>/<category>``; tags for method, dataset,
  category, profile, stage, DVC stage name, git commit, seed and library versions. A stage that
  covers all categories of a dataset (fit, evaluate) opens one parent run ``<stage>/<method>``
  and one nested child run per category (``StageRun.child``) holding that category's metrics,
  artifacts and registered model.
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
import urllib.request
from pathlib import Path
from typing import Any, Iterator

from defectlab.errors import DefectlabError

LOCAL_URI = "sqlite:///mlflow.db"
LOCAL_ARTIFACTS = "mlartifacts"


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


def git_commit(root: str | Path = ".") -> tuple[str, bool]:
    """(commit sha or 'unknown', dirty flag)."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
        return sha or "unknown", dirty
    except (OSError, subprocess.SubprocessError):
        return "unknown", False


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
    return os.environ.get("MLFLOW_TRACKING_URI") or config.get("uri") or LOCAL_URI


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
        uri = LOCAL_URI
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
    location = Path(LOCAL_ARTIFACTS).resolve().as_uri() + f"/{name}" if uri.startswith("sqlite") else None
    try:
        return mlflow.create_experiment(name, artifact_location=location)
    except Exception:  # created concurrently by another process
        return mlflow.get_experiment_by_name(name).experiment_id


class StageRun:
    """Thin wrapper handed to stage code; every method is a no-op when tracking is off."""

    def __init__(self, run=None, tags: dict | None = None):
        self.run = run
        self.tags = dict(tags or {})

    @contextlib.contextmanager
    def child(self, category: str) -> Iterator["StageRun"]:
        """A nested run for one category of a dataset-wide stage (a no-op when tracking is off)."""
        if not self.run:
            yield StageRun(None)
            return
        import mlflow

        tags = {**self.tags, "category": category}
        name = "/".join(x for x in (tags.get("stage"), tags.get("method"), category) if x)
        with mlflow.start_run(experiment_id=self.run.info.experiment_id, run_name=name, nested=True,
                              tags=tags) as run:
            yield StageRun(run, tags)

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
              config: dict | None = None, dvc_stage: str | None = None) -> Iterator[StageRun]:
    """Open an MLflow run for one stage execution (or a no-op when tracking is disabled)."""
    if setup(config) is None:
        yield StageRun(None)
        return
    import mlflow

    commit, dirty = git_commit()
    tags = {"stage": stage, "dataset": dataset, "method": method or "", "category": category or "",
            "profile": profile or "", "seed": str(seed), "git.commit": commit, "git.dirty": str(dirty),
            "dvc.stage": dvc_stage or stage, **{f"version.{k}": v for k, v in versions().items()}}
    name = "/".join(x for x in (stage, method, category) if x)
    with mlflow.start_run(experiment_id=_experiment(dataset), run_name=name, tags=tags) as run:
        sr = StageRun(run, tags)
        if params:
            sr.log_params(params)
        yield sr
