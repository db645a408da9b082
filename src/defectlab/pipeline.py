"""The pipeline's steps as library functions; ``stages/*.py`` are thin wrappers around them.

Paths (relative to the repository root, see ARCHITECTURE.md):

    data/prepared/<ds>/<cat>/            MVTec layout (+ data/prepared/<ds>/manifest.csv)
    data/synth/<ds>/<cat>/               synthetic anomalies (images/, masks/, index.csv)
    models/backbone/<ds>/ds2/            the shared DS2 backbone (`backbone` stage)
    checkpoints/<method>/<ds>/pretrain/  dataset-level pretraining / frozen backbone (`pretrain`)
    checkpoints/<method>/<ds>/train/<cat>/  per-category trained network (`train`, training methods)
    models/<method>/<ds>/<cat>/          fitted model (model.safetensors, model.json) (`fit`)
    metrics/<method>/<ds>/<cat>.json     evaluation metrics (DVC metrics)
    plots/<curve>/<method>/<ds>/<cat>.json  ROC / PR / PRO curves (DVC plots; curve in CURVES)
    reports/maps/<method>/<ds>/<cat>/    heatmap overlays
    reports/results.{md,csv,png}         the report
"""

from __future__ import annotations

import csv
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from defectlab.config import EvalParams, Params, SynthesisParams
from defectlab.io import atomic_dir, sha256_file, write_json


#: the curves the evaluate stage writes for `dvc plots` (see metrics.curves)
CURVES = ("roc_image", "pr_image", "roc_pixel", "pr_pixel", "pro")


@dataclass(frozen=True)
class Layout:
    root: Path = Path(".")

    def prepared(self, ds: str) -> Path:
        return self.root / "data" / "prepared" / ds

    def synth(self, ds: str, cat: str) -> Path:
        return self.root / "data" / "synth" / ds / cat

    def backbone(self, ds: str, name: str = "ds2") -> Path:
        return self.root / "models" / "backbone" / ds / name

    def configs(self) -> Path:
        return self.root / "configs"

    def phase_config(self, method: str, phase: str) -> Path:
        return self.configs() / method / f"{phase}.json"

    def checkpoints(self, method: str, ds: str) -> Path:
        return self.root / "checkpoints" / method / ds

    def pretrain(self, method: str, ds: str) -> Path:
        return self.checkpoints(method, ds) / "pretrain"

    def trained(self, method: str, ds: str, cat: str) -> Path:
        return self.checkpoints(method, ds) / "train" / cat

    def models(self, method: str, ds: str) -> Path:
        return self.root / "models" / method / ds

    def model(self, method: str, ds: str, cat: str) -> Path:
        return self.models(method, ds) / cat

    def metrics(self, method: str, ds: str, cat: str) -> Path:
        return self.root / "metrics" / method / ds / f"{cat}.json"

    def plot(self, curve: str, method: str, ds: str, cat: str) -> Path:
        return self.root / "plots" / curve / method / ds / f"{cat}.json"

    def maps(self, method: str, ds: str, cat: str) -> Path:
        return self.root / "reports" / "maps" / method / ds / cat


def model_sha256(model_dir: Path) -> str:
    """Identity of a fitted model: its tensors and its config (not the run's timings in the meta)."""
    import hashlib
    import json

    info = json.loads((Path(model_dir) / "model.json").read_text())
    key = {"method": info.get("method"), "config": info.get("config"),
           "tensors": sha256_file(Path(model_dir) / "model.safetensors")}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def peak_rss_mb() -> float:
    """Peak resident set size of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ---------------------------------------------------------------------------------------------
# prepare
# ---------------------------------------------------------------------------------------------
def prepare(params: Params, dataset: str, layout: Layout = Layout()) -> dict:
    """Materialise a dataset in MVTec layout under data/prepared/<ds> and validate every category."""
    from defectlab.data import scan_category, verify_samples

    spec = params.dataset(dataset)
    out = layout.prepared(dataset)
    with atomic_dir(out) as tmp:
        if spec.source == "demo":
            from defectlab.data.demo import generate_demo

            generate_demo(tmp, seed=params.seed, categories=spec.categories, **spec.generator)
        else:
            from defectlab.data.registry import prepare_dataset

            prepare_dataset(spec.source, Path(spec.root or f"data/raw/{spec.source}"), tmp, download=spec.download,
                            insecure_skip_checksum=spec.insecure_skip_checksum)
        merge_accepted(params, dataset, spec.categories, tmp, layout)
        rows = []
        for cat in spec.categories:
            data = scan_category(tmp, cat)
            verify_samples([*data.train, *data.validation, *data.test])   # decode every file once: fail here, not later
            for split, samples in (("train", data.train), ("test", data.test), ("validation", data.validation)):
                for s in samples:
                    rows.append({"category": cat, "split": split, "path": s.path.relative_to(tmp).as_posix(),
                                 "label": s.label, "defect_type": s.defect_type, "kind": s.kind,
                                 "masks": ";".join(m.relative_to(tmp).as_posix() for m in s.mask_paths),
                                 "sha256": sha256_file(s.path)})
        with open(tmp / "manifest.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    summary = {cat: {"train": sum(1 for r in rows if r["category"] == cat and r["split"] == "train"),
                     "test": sum(1 for r in rows if r["category"] == cat and r["split"] == "test")}
               for cat in spec.categories}
    return summary


def accepted_dir(params: Params, layout: Layout = Layout()) -> Path:
    """Where the retrain flow archives the new normal images it accepted (``flows.retrain.accepted_dir``)."""
    rel = ((params.raw.get("flows") or {}).get("retrain") or {}).get("accepted_dir") or "data/accepted"
    return layout.root / rel


def merge_accepted(params: Params, dataset: str, categories, out: Path, layout: Layout = Layout()) -> int:
    """Add the images the retrain flow accepted (``<accepted_dir>/<ds>/<cat>/``) to the prepared
    training sets, so a rerun of `prepare` keeps every data version the flow recorded."""
    import shutil

    n = 0
    for cat in categories:
        src = accepted_dir(params, layout) / dataset / cat
        if src.is_dir():
            for p in sorted(src.iterdir()):
                if p.is_file() and not p.name.startswith("."):
                    shutil.copy2(p, out / cat / "train" / "good" / p.name)
                    n += 1
    return n


def category_data(params: Params, dataset: str, category: str, layout: Layout = Layout()):
    from defectlab.data import scan_category

    spec = params.dataset(dataset)
    if category not in spec.categories:
        from defectlab.errors import ConfigError

        raise ConfigError(f"unknown category {category!r} for dataset {dataset!r}; valid: {', '.join(spec.categories)}")
    return scan_category(layout.prepared(dataset), category)


# ---------------------------------------------------------------------------------------------
# synthesize
# ---------------------------------------------------------------------------------------------
def synthesize(params: Params, dataset: str, category: str, layout: Layout = Layout(), out_dir: Path | None = None) -> dict:
    from defectlab.synthesis.cache import build_cache

    spec = params.dataset(dataset)
    sp = params.section("synthesis", "cache", SynthesisParams)
    data = category_data(params, dataset, category, layout)
    build_cache([s.path for s in data.train], out_dir or layout.synth(dataset, category), n=sp.n, seed=params.seed,
                image_size=sp.image_size, kinds=sp.kinds,
                object_kind="texture" if category in spec.texture_categories else "object",
                dtd_dir=Path(sp.dtd_dir) if sp.dtd_dir else None, params=sp.options)
    return {"n": sp.n, "image_size": sp.image_size}


def synthesize_dataset(params: Params, dataset: str, layout: Layout = Layout(),
                       each: Callable[[str, Path, dict], None] | None = None) -> dict:
    """The `synthesize` stage: every category of ``run.categories`` into ``data/synth/<ds>/``
    (replaced as a whole). Seeded per category, so an unchanged category gets identical files and
    DVC does not rerun the `train` stages reading it."""
    out = {}
    with atomic_dir(layout.root / "data" / "synth" / dataset) as tmp:
        for category in params.run.categories:
            out[category] = synthesize(params, dataset, category, layout, out_dir=tmp / category)
            if each is not None:
                each(category, tmp / category, out[category])
    return out


# ---------------------------------------------------------------------------------------------
# pretrain / fit
# ---------------------------------------------------------------------------------------------
def load_method_config(params: Params, method: str):
    from defectlab.methods import get_method

    cls = get_method(method)
    return cls, params.method(method, cls.Config)


def pretrain(params: Params, method: str, dataset: str, layout: Layout = Layout(), progress: bool = True) -> dict:
    from defectlab.backbones import resolve_device
    from defectlab.methods.base import PretrainContext

    cls, cfg = load_method_config(params, method)
    spec = params.dataset(dataset)
    out = layout.pretrain(method, dataset)
    t0 = time.perf_counter()
    with atomic_dir(out) as tmp:
        ctx = PretrainContext(dataset=dataset, data_root=layout.prepared(dataset), categories=spec.categories,
                              out_dir=tmp, image_size=spec.image_size, seed=params.seed,
                              device=resolve_device(params.device), progress=progress,
                              work_dir=layout.root / "work" / method / dataset / "pretrain")
        seed_everything(params.seed)
        # the shared backbone's own training runs in the `backbone` stage; here it is only frozen
        stats = (cls.freeze_backbone(cfg, ctx) if cls.shared_backbone else cls.pretrain(cfg, ctx)) or {}
        stats["pretrain_seconds"] = time.perf_counter() - t0
        write_json(tmp / "pretrain.json", {"method": method, "dataset": dataset, "stats": stats})
    return stats


def train_backbone(params: Params, dataset: str, layout: Layout = Layout(), progress: bool = True) -> dict:
    """The `backbone` stage: DS2 dense self-supervised pretraining on the dataset's normal training
    images (params ``backbone.ds2``), the checkpoint behind ``weights: ds2`` for every method."""
    from defectlab.backbones import resolve_device
    from defectlab.methods import get_method
    from defectlab.methods.base import PretrainContext

    cls = get_method("ds2")
    cfg = params.section("backbone", "ds2", cls.Config)
    spec = params.dataset(dataset)
    t0 = time.perf_counter()
    with atomic_dir(layout.backbone(dataset)) as tmp:
        ctx = PretrainContext(dataset=dataset, data_root=layout.prepared(dataset), categories=spec.categories,
                              out_dir=tmp, image_size=spec.image_size, seed=params.seed,
                              device=resolve_device(params.device), progress=progress,
                              work_dir=layout.root / "work" / "backbone" / dataset / "ds2")
        seed_everything(params.seed)
        stats = cls.pretrain(cfg, ctx) or {}
        stats["pretrain_seconds"] = time.perf_counter() - t0
        write_json(tmp / "pretrain.json", {"method": "ds2", "dataset": dataset, "stats": stats})
    return stats


def seed_everything(seed: int) -> None:
    import random

    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def fit_context(params: Params, method: str, dataset: str, category: str, layout: Layout = Layout(),
                progress: bool = True):
    """The FitContext of one category (shared by the `train` and `fit` stages)."""
    from defectlab.backbones import resolve_device
    from defectlab.methods.base import FitContext

    spec = params.dataset(dataset)
    pre = layout.pretrain(method, dataset)
    synth = layout.synth(dataset, category)
    trained = layout.trained(method, dataset, category)
    return FitContext(dataset=dataset, category=category, data=category_data(params, dataset, category, layout),
                      image_size=spec.image_size, seed=params.seed, device=resolve_device(params.device),
                      pretrain_dir=pre if pre.exists() else None, synth_dir=synth if synth.exists() else None,
                      progress=progress, work_dir=layout.root / "work" / method / dataset / category,
                      extra={"object_kind": "texture" if category in spec.texture_categories else "object"},
                      train_dir=trained if trained.exists() else None)


def write_phase_configs(params: Params, layout: Layout = Layout()) -> dict:
    """The `config` stage: for every method of ``run.methods``, the resolved config fields its
    ``pretrain`` and ``train`` phases read, as ``configs/<method>/{pretrain,train}.json``.

    The pretrain and train stages depend on these files instead of on all of ``methods.<m>``:
    the stage reruns whenever params.yaml changes, but rewrites identical bytes unless a field the
    phase reads changed, so DVC does not rerun a network's training for a fit-only setting."""
    out = {}
    with atomic_dir(layout.configs()) as tmp:
        for method in params.run.methods:
            cls, cfg = load_method_config(params, method)
            for phase in ("pretrain", "train"):
                fields = cls.phase_config(cfg, phase)
                write_json(tmp / method / f"{phase}.json", {"method": method, "phase": phase, "config": fields})
                out[f"{method}_{phase}_fields"] = len(fields)
    return out


def train(params: Params, method: str, dataset: str, category: str, layout: Layout = Layout(),
          progress: bool = True) -> dict:
    """The `train` stage of a training method on one category: train its network and save it
    (``trained.safetensors`` + ``trained.json``) atomically to ``checkpoints/<m>/<ds>/train/<cat>``."""
    from defectlab.errors import ConfigError

    cls, cfg = load_method_config(params, method)
    if not cls.trains_per_category:
        raise ConfigError(f"method {method!r} has no per-category training; remove it from run.train_methods")
    ctx = fit_context(params, method, dataset, category, layout, progress)
    seed_everything(params.seed)
    model = cls(cfg, ctx.device)
    t0 = time.perf_counter()
    with atomic_dir(layout.trained(method, dataset, category)) as tmp:
        stats = model.train(ctx) or {}
        stats["train_seconds"] = time.perf_counter() - t0
        stats["peak_rss_mb_train"] = peak_rss_mb()
        model.meta["train"] = stats
        model.save_trained(tmp)
    return stats


def train_and_fit(cls, cfg, ctx, train_dir: Path, device=None):
    """Outside DVC (tests, `defectlab benchmark`): a training method's ``train`` (saved to
    ``train_dir`` exactly as the `train` stage saves it) then ``fit`` on a fresh instance reading
    it back; other methods just ``fit``. Returns (fitted model, stats)."""
    import dataclasses

    device = device or ctx.device
    stats: dict = {}
    if cls.trains_per_category:
        trainer = cls(cfg, device)
        stats.update(trainer.train(ctx) or {})
        trainer.meta["train"] = dict(stats)
        trainer.save_trained(train_dir)
        ctx = dataclasses.replace(ctx, train_dir=Path(train_dir))
    model = cls(cfg, device)
    stats.update(model.fit(ctx) or {})
    return model, stats


def fit(params: Params, method: str, dataset: str, category: str, layout: Layout = Layout(), progress: bool = True,
        out_dir: Path | None = None):
    """Fit one method on one category; returns (method instance, fit stats). Saves the model atomically
    to ``out_dir`` (default ``layout.model(...)``). A training method reads its `train` stage output
    (``ctx.train_dir``)."""
    cls, cfg = load_method_config(params, method)
    ctx = fit_context(params, method, dataset, category, layout, progress)
    seed_everything(params.seed)
    model = cls(cfg, ctx.device)
    t0 = time.perf_counter()
    stats = model.fit(ctx) or {}
    stats["fit_seconds"] = time.perf_counter() - t0
    stats["peak_rss_mb_fit"] = peak_rss_mb()
    model.meta["fit"] = stats
    model.save(out_dir or layout.model(method, dataset, category))
    return model, stats


def fit_dataset(params: Params, method: str, dataset: str, layout: Layout = Layout(), progress: bool = True,
                each: Callable[[str, Path, dict], None] | None = None) -> dict:
    """The `fit` stage: fit ``method`` on every category of ``run.categories``; ``models/<m>/<ds>/``
    is replaced as a whole at the end (an interrupted fit leaves the previous models). ``each(category,
    model_dir, stats)`` runs after each category (the stage logs it to MLflow)."""
    out = {}
    with atomic_dir(layout.models(method, dataset)) as tmp:
        for category in params.run.categories:
            _, stats = fit(params, method, dataset, category, layout, progress, out_dir=tmp / category)
            if each is not None:
                each(category, tmp / category, stats)
            out[category] = stats
    return out


# ---------------------------------------------------------------------------------------------
# evaluate
# ---------------------------------------------------------------------------------------------
def eval_samples(model, data) -> list:
    """The category's test samples minus any the method trained on (``meta['exclude_from_eval']``,
    e.g. APC's few labelled anomalies), so evaluation never sees training anomalies."""
    excluded = {Path(p).name + "|" + Path(p).parent.name for p in model.meta.get("exclude_from_eval", [])}
    return [s for s in data.test if f"{s.path.name}|{s.path.parent.name}" not in excluded]


def score_category(model, data, image_size: int, batch_size: int, progress: bool = False) -> tuple[dict, float]:
    """Run the model over the category's evaluation samples; returns (outputs, seconds of inference)."""
    from defectlab.methods.base import make_loader

    loader = make_loader(eval_samples(model, data), image_size, batch_size)
    t0 = time.perf_counter()
    out = model.predict_loader(loader, progress=progress, desc="evaluate")
    return out, time.perf_counter() - t0


def defects_for_spro(samples, size: int) -> list[list[tuple[np.ndarray, float]]]:
    """Per test image, its annotated defects as (mask at ``size``, saturation area in pixels):
    MVTec LOCO's per-defect masks with the saturation thresholds of its defects_config.json;
    elsewhere each defect's saturation area is its own area (sPRO then reduces to a per-defect PRO)."""
    from defectlab.data import load_defect_masks, load_defects_config

    configs: dict[Path, dict] = {}
    out = []
    for s in samples:
        if s.mask_paths:
            cat_dir = s.path.parent.parent.parent          # <cat>/test/<defect>/<image>
            if cat_dir not in configs:
                configs[cat_dir] = load_defects_config(cat_dir)
            out.append(load_defect_masks(s, configs[cat_dir], size))
        else:
            out.append([])
    return out


def metrics_for(out: dict, ev: EvalParams, samples=None, size: int | None = None) -> tuple[dict, dict]:
    """All metrics (overall and per defect kind) and the curves for plots."""
    from defectlab.metrics import compute_all, curves, spro

    labels, scores, masks, maps = out["labels"], out["scores"], out["masks"], out["maps"]
    metrics = compute_all(labels, scores, masks, maps, max_fpr_pro=ev.max_fpr_pro)
    if samples is not None and metrics.get("pixel_auroc") is not None:
        defects = defects_for_spro(samples, size or maps.shape[-1])
        metrics["spro"] = spro(defects, maps, max_fpr=ev.max_fpr_spro)
        kinds_ = np.asarray(out["kinds"])
        for kind in sorted(set(kinds_) - {"good"}):
            sel = [i for i, k in enumerate(kinds_) if k in ("good", kind)]
            metrics[f"spro_{kind}"] = spro([defects[i] for i in sel], maps[sel], max_fpr=ev.max_fpr_spro)
    kinds = np.asarray(out["kinds"])
    for kind in sorted(set(kinds) - {"good"}):
        sel = (kinds == "good") | (kinds == kind)
        sub = compute_all(labels[sel], scores[sel], masks[sel], maps[sel], max_fpr_pro=ev.max_fpr_pro)
        for key in ("image_auroc", "pixel_auroc", "aupro"):
            metrics[f"{key}_{kind}"] = sub.get(key)
    return metrics, curves(labels, scores, masks, maps)


def evaluate(params: Params, method: str, dataset: str, category: str, layout: Layout = Layout(),
             progress: bool = True, model=None, dest: dict | None = None) -> dict:
    """Score one category; write its metrics, curves and overlays. ``dest`` redirects the output
    folders (keys ``metrics``, ``maps``, ``plots``: {curve: folder}); default: ``layout``'s."""
    from defectlab.backbones import resolve_device
    from defectlab.methods import get_method
    from defectlab.report import write_overlays

    ev = params.section("evaluation", "eval", EvalParams)
    spec = params.dataset(dataset)
    device = resolve_device(params.device)
    data = category_data(params, dataset, category, layout)
    model_dir = layout.model(method, dataset, category)
    if model is None:
        model = get_method(method).load(model_dir, device)
    out, seconds = score_category(model, data, spec.image_size, ev.batch_size, progress)
    metrics, curve_data = metrics_for(out, ev, eval_samples(model, data), spec.image_size)
    fit_stats = model.meta.get("fit", {})
    metrics.update({"fit_seconds": fit_stats.get("fit_seconds"),
                    "train_seconds": model.meta.get("train", {}).get("train_seconds", 0.0),   # train stage (0: none)
                    "inference_seconds": seconds,
                    "images_per_second": len(out["scores"]) / max(seconds, 1e-9), "peak_rss_mb": peak_rss_mb(),
                    "n_test": int(len(out["scores"])), "n_test_anomalous": int(out["labels"].sum())})
    dest = dest or eval_dest(layout, method, dataset)
    write_json(Path(dest["metrics"]) / f"{category}.json", metrics)
    for curve in CURVES:   # every curve file exists (empty when the curve is undefined, e.g. one class)
        write_json(Path(dest["plots"][curve]) / f"{category}.json", curve_data.get(curve, []))
    with atomic_dir(Path(dest["maps"]) / category) as tmp:
        write_overlays(out, tmp, n=ev.n_overlays, image_size=spec.image_size)
    return metrics


def eval_dest(layout: Layout, method: str, dataset: str) -> dict:
    """The evaluate stage's output folders of one method x dataset."""
    return {"metrics": layout.metrics(method, dataset, "x").parent, "maps": layout.maps(method, dataset, "x").parent,
            "plots": {c: layout.plot(c, method, dataset, "x").parent for c in CURVES}}


def evaluate_dataset(params: Params, method: str, dataset: str, layout: Layout = Layout(), progress: bool = True,
                     each: Callable[[str, dict, dict], None] | None = None) -> dict:
    """The `evaluate` stage: every category of ``run.categories``; its output folders (metrics,
    curves, overlays of this method x dataset) are each replaced as a whole at the end.
    ``each(category, metrics, dest)`` runs after each category (the stage logs it to MLflow)."""
    import contextlib

    final = eval_dest(layout, method, dataset)
    out = {}
    with contextlib.ExitStack() as stack:
        dest = {"metrics": stack.enter_context(atomic_dir(final["metrics"])),
                "maps": stack.enter_context(atomic_dir(final["maps"])),
                "plots": {c: stack.enter_context(atomic_dir(d)) for c, d in final["plots"].items()}}
        for category in params.run.categories:
            out[category] = evaluate(params, method, dataset, category, layout, progress, dest=dest)
            if each is not None:
                each(category, out[category], dest)
    return out


# ---------------------------------------------------------------------------------------------
# benchmark: one method on any MVTec-format folder, outside the DVC pipeline
# ---------------------------------------------------------------------------------------------
def benchmark(params: Params, method: str, root: Path, category: str, out_dir: Path, *,
              image_size: int | None = None, progress: bool = True) -> dict:
    """Fit + evaluate ``method`` on ``root/category``; write out_dir/metrics.json and out_dir/maps/."""
    from defectlab.backbones import resolve_device
    from defectlab.data import scan_category
    from defectlab.methods.base import FitContext, PretrainContext
    from defectlab.report import write_overlays

    cls, cfg = load_method_config(params, method)
    ev = params.section("evaluation", "eval", EvalParams)
    device = resolve_device(params.device)
    data = scan_category(root, category)
    size = image_size or 256
    seed_everything(params.seed)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        t0 = time.perf_counter()
        pre = tmp / "pretrain"
        pre.mkdir()
        cls.pretrain(cfg, PretrainContext(dataset=root.name, data_root=root, categories=[category], out_dir=pre,
                                          image_size=size, seed=params.seed, device=device, progress=progress))
        ctx = FitContext(dataset=root.name, category=category, data=data, image_size=size, seed=params.seed,
                         device=device, pretrain_dir=pre, progress=progress, work_dir=tmp)
        model, stats = train_and_fit(cls, cfg, ctx, tmp / "train")
        fit_seconds = time.perf_counter() - t0
        out, seconds = score_category(model, data, size, ev.batch_size, progress)
        metrics, curve_data = metrics_for(out, ev, eval_samples(model, data), size)
        metrics.update({"method": method, "category": category, "root": str(root), "image_size": size,
                        "fit_seconds": fit_seconds, "fit_stats": stats, "inference_seconds": seconds,
                        "images_per_second": len(out["scores"]) / max(seconds, 1e-9), "peak_rss_mb": peak_rss_mb(),
                        "device": str(device)})
        (tmp / "maps").mkdir()
        write_overlays(out, tmp / "maps", n=max(ev.n_overlays, 8), image_size=size)
        write_json(tmp / "curves.json", curve_data)
        write_json(tmp / "metrics.json", metrics)
        import shutil

        shutil.rmtree(pre)
        shutil.rmtree(tmp / "train", ignore_errors=True)
    return metrics
