"""Champion / challenger bookkeeping on the MLflow model registry, and decision thresholds.

Models are registered by the fit stage as ``<method>-<dataset>-<category>`` (one version per
fit run). The retrain flow evaluates the newest version (the *challenger*) on the held-out test
set and moves the registry alias ``champion`` to it only when

    challenger_score >= champion_score - margin          (higher-is-better metric)
    challenger_score <= champion_score + margin          (lower-is-better metric)

Every decision is written as tags on the challenger's model version (``decision``,
``challenger.<metric>``, ``champion.<metric>``, ``margin``) so the registry records why an alias
moved or did not. The score of a version lives in the version tag ``score.<metric>``.

The image-level decision threshold is chosen on validation images when the model is fitted
(defectlab.calibration, stored in its model.json); the flows copy it onto the model version as
tags ``threshold``, ``threshold.rule`` and ``threshold.source``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from defectlab.calibration import select_threshold  # noqa: F401  (the flows' threshold rules)
from defectlab.errors import ConfigError, ResourceMissingError

CHAMPION = "champion"
CHALLENGER = "challenger"
LOWER_IS_BETTER = {"fit_seconds", "inference_seconds", "peak_rss_mb"}


def model_name(method: str, dataset: str, category: str) -> str:
    """Registry name used by the fit stage."""
    return f"{method}-{dataset}-{category}"


# ---------------------------------------------------------------------------------------------
# decision
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Decision:
    promote: bool
    metric: str
    challenger_score: float
    champion_score: float | None
    margin: float
    reason: str

    def as_dict(self) -> dict:
        return asdict(self)


def decide(challenger_score: float, champion_score: float | None, *, metric: str, margin: float) -> Decision:
    """Promote unless the challenger is worse than the champion by more than ``margin``."""
    if margin < 0:
        raise ConfigError(f"flows.margin: must be >= 0 (got {margin})")
    if challenger_score is None or not np.isfinite(challenger_score):
        return Decision(False, metric, float("nan"), champion_score, margin,
                        f"challenger has no finite {metric}; not promoted")
    if champion_score is None:
        return Decision(True, metric, float(challenger_score), None, margin, "no current champion")
    lower = metric in LOWER_IS_BETTER
    worse_by = (challenger_score - champion_score) if lower else (champion_score - challenger_score)
    if worse_by > margin:
        return Decision(False, metric, float(challenger_score), float(champion_score), margin,
                        f"challenger {metric}={challenger_score:.4f} is worse than champion "
                        f"{champion_score:.4f} by {worse_by:.4f} > margin {margin}")
    return Decision(True, metric, float(challenger_score), float(champion_score), margin,
                    f"challenger {metric}={challenger_score:.4f} vs champion {champion_score:.4f}: "
                    f"not worse by more than margin {margin}")


# ---------------------------------------------------------------------------------------------
# thresholds
# ---------------------------------------------------------------------------------------------
def model_threshold(model_dir) -> dict:
    """The image threshold a model folder's model.json holds (chosen on validation images at fit
    time, defectlab.calibration), as the registry tags the flows write."""
    import json
    from pathlib import Path

    info = json.loads((Path(model_dir) / "model.json").read_text())
    t = info.get("threshold") or {}
    if t.get("image") is None:
        raise ResourceMissingError(f"{model_dir}: the {info.get('method')} model has no threshold in its model.json "
                                   f"({t.get('reason', 'fitted before model.json format 2')}); refit it (dvc repro)")
    return {"threshold": t["image"], "threshold.rule": t.get("rule", ""), "threshold.source": t.get("source", ""),
            "threshold.n": int(t.get("n_normal", 0)) + int(t.get("n_anomalous", 0))}


# ---------------------------------------------------------------------------------------------
# registry access (MlflowClient on the configured tracking URI)
# ---------------------------------------------------------------------------------------------
def _client():
    from mlflow import MlflowClient

    return MlflowClient()


def get_alias(name: str, alias: str):
    """The model version holding ``alias`` or None."""
    from mlflow.exceptions import MlflowException

    try:
        return _client().get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def latest_version(name: str):
    """The newest registered version of ``name`` (None when nothing is registered)."""
    from mlflow.exceptions import MlflowException

    try:
        versions = _client().search_model_versions(f"name='{name}'")
    except MlflowException:
        return None
    return max(versions, key=lambda v: int(v.version)) if versions else None


def version_score(mv, metric: str) -> float | None:
    value = (mv.tags or {}).get(f"score.{metric}")
    return float(value) if value not in (None, "") else None


def tag_version(name: str, version: str | int, tags: dict) -> None:
    client = _client()
    for k, v in tags.items():
        client.set_model_version_tag(name, str(version), k, str(v))


def apply_decision(name: str, challenger_version: str | int, decision: Decision, extra_tags: dict | None = None) -> None:
    """Record the decision on the challenger's version; move ``champion`` when it is promoted.
    The alias ``challenger`` always points at the latest evaluated candidate."""
    client = _client()
    tags = {f"score.{decision.metric}": decision.challenger_score, "decision": "promoted" if decision.promote else "refused",
            "decision.reason": decision.reason, "margin": decision.margin,
            f"champion.{decision.metric}": "" if decision.champion_score is None else decision.champion_score,
            **(extra_tags or {})}
    tag_version(name, challenger_version, tags)
    client.set_registered_model_alias(name, CHALLENGER, str(challenger_version))
    if decision.promote:
        client.set_registered_model_alias(name, CHAMPION, str(challenger_version))


def ensure_champion(name: str, version: str | int | None) -> bool:
    """Give ``champion`` to ``version`` when the model has no champion yet (its first registered
    version, so `predict models:/<name>@champion` works right after `dvc repro`); later versions
    only move it through the retrain flow. Returns whether the alias was set."""
    if version is None or get_alias(name, CHAMPION) is not None:
        return False
    _client().set_registered_model_alias(name, CHAMPION, str(version))
    tag_version(name, version, {"decision": "first version", "decision.reason": "no champion before it"})
    return True


def download_model(mv, dst: Path) -> Path:
    """Download a model version (the MLflow pyfunc model, or a plain model folder logged as
    artifacts) into ``dst``; returns the folder holding model.json."""
    from defectlab.inference import resolve

    return resolve(f"models:/{mv.name}/{mv.version}", cache_dir=dst)


def load_champion(method: str, dataset: str, category: str, dst: Path, device="cpu", alias: str = CHAMPION):
    """(model, model version, local model folder) of the category's ``alias`` (default champion)."""
    from defectlab.methods import get_method

    name = model_name(method, dataset, category)
    mv = get_alias(name, alias)
    if mv is None:
        raise ResourceMissingError(f"registered model {name!r} has no {alias!r} alias; run the retrain flow first "
                                   f"(`defectlab retrain --dataset {dataset} --category {category} --method {method}`)")
    folder = download_model(mv, dst)
    meta = json.loads((folder / "model.json").read_text())
    return get_method(meta["method"]).load(folder, device), mv, folder


def history(dataset: str, category: str) -> list[dict]:
    """Every registered version of every method's model of one category, oldest first: when, which
    data (manifest hash, git commit of the data version), what triggered it, the decision and score."""
    client = _client()
    rows = []
    suffix = f"-{dataset}-{category}"
    for rm in client.search_registered_models(filter_string=f"name LIKE '%{suffix}'"):
        if not rm.name.endswith(suffix):
            continue
        aliases = {}
        for a, v in (rm.aliases or {}).items():
            aliases.setdefault(str(v), []).append(a)
        for mv in client.search_model_versions(f"name='{rm.name}'"):
            t = mv.tags or {}
            score = next(((k[len("score."):], v) for k, v in t.items() if k.startswith("score.")), (None, None))
            rows.append({"model": rm.name, "version": int(mv.version), "created": mv.creation_timestamp,
                         "aliases": ",".join(sorted(aliases.get(str(mv.version), []))),
                         "decision": t.get("decision", ""), "reason": t.get("decision.reason", ""),
                         "metric": score[0] or "", "score": score[1] or "", "trigger": t.get("trigger", ""),
                         "batch": t.get("batch", ""), "n_train": t.get("data.n_train", ""),
                         "data_manifest": t.get("data.manifest_sha256", ""), "data_commit": t.get("data.git_commit", ""),
                         "run_id": mv.run_id})
    return sorted(rows, key=lambda r: (r["created"], r["model"], r["version"]))
