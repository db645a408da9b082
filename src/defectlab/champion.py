"""Champion / challenger bookkeeping on the MLflow model registry, and decision thresholds.

Models are registered by the fit stage as ``<method>-<dataset>-<category>`` (one version per
fit run). The retrain flow evaluates the newest version (the *challenger*) on the held-out test
set and moves the registry alias ``champion`` to it only when

    challenger_score >= champion_score - margin          (higher-is-better metric)
    challenger_score <= champion_score + margin          (lower-is-better metric)

Every decision is written as tags on the challenger's model version (``decision``,
``challenger.<metric>``, ``champion.<metric>``, ``margin``) so the registry records why an alias
moved or did not. The score of a version lives in the version tag ``score.<metric>``.

The image-level decision threshold used by ``inspect`` is chosen on validation scores
(F1-max or a target false-positive rate) and stored with the model version as tags
``threshold``, ``threshold.rule`` and ``threshold.source``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

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
def select_threshold(scores, labels, rule: str = "f1_max", target_fpr: float = 0.05) -> float:
    """Image-score threshold from validation scores: ``f1_max`` (best F1 over all cut points) or
    ``fpr`` (smallest threshold whose false-positive rate on the normal images is <= target_fpr).
    A score ``>= threshold`` is labelled anomalous."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(int)
    if scores.size == 0:
        raise ConfigError("threshold selection: no validation scores")
    if rule == "fpr":
        normal = np.sort(scores[labels == 0])
        if normal.size == 0:
            raise ConfigError("threshold rule 'fpr' needs normal validation images")
        # allow at most floor(target_fpr * n) normal images at or above the threshold
        k = int(np.floor(target_fpr * normal.size))
        if k == 0:
            return float(np.nextafter(normal[-1], np.inf))
        return float(np.nextafter(normal[-k - 1], np.inf))
    if rule == "f1_max":
        if labels.sum() == 0 or labels.sum() == labels.size:
            raise ConfigError("threshold rule 'f1_max' needs normal and anomalous validation images")
        best_t, best_f1 = float(scores.max()), -1.0
        for t in np.unique(scores):
            pred = scores >= t
            tp = float(np.sum(pred & (labels == 1)))
            fp = float(np.sum(pred & (labels == 0)))
            fn = float(np.sum(~pred & (labels == 1)))
            f1 = 2 * tp / max(2 * tp + fp + fn, 1e-12)
            if f1 > best_f1:
                best_t, best_f1 = float(t), f1
        return best_t
    raise ConfigError(f"flows.threshold.rule: must be 'f1_max' or 'fpr' (got {rule!r})")


def validation_samples(data) -> tuple[list, str]:
    """The samples a threshold is chosen on: the category's validation split when it has one
    (with both labels, or normals only for the ``fpr`` rule), else the test split (recorded as the
    threshold's source so nobody mistakes it for an unbiased estimate)."""
    if data.validation:
        return list(data.validation), "validation"
    return list(data.test), "test"


def threshold_for_model(model, data, image_size: int, batch_size: int, rule: str, target_fpr: float) -> dict:
    """Score the validation samples with ``model`` and pick the threshold."""
    from defectlab.methods.base import make_loader

    samples, source = validation_samples(data)
    out = model.predict_loader(make_loader(samples, image_size, batch_size))
    t = select_threshold(out["scores"], out["labels"], rule=rule, target_fpr=target_fpr)
    return {"threshold": t, "threshold.rule": rule if rule != "fpr" else f"fpr<={target_fpr}",
            "threshold.source": source, "threshold.n": int(len(samples))}


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


def download_model(mv, dst: Path) -> Path:
    """Download a model version's files (model.json + model.safetensors) into ``dst``; returns the folder."""
    import mlflow

    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=mv.source, dst_path=str(dst)))
    if not (local / "model.json").exists():
        raise ResourceMissingError(f"model version {mv.name} v{mv.version}: no model.json at {mv.source}")
    return local


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
