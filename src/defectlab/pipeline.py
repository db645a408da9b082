"""The pipeline's steps as library functions; ``stages/*.py`` are thin wrappers around them.

Paths (relative to the repository root, see docs/architecture.md):

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
import json
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from defectlab.config import EvalParams, Params, SynthesisParams
from defectlab.data.transform import resize_mode
from defectlab.io import atomic_dir, atomic_path, fault_point, sha256_file, write_json
from defectlab.report import KEPT


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
    """Identity of a fitted model: its tensors, config, preprocessing and threshold (not the run's
    timings in the meta, not the library versions)."""
    import hashlib
    import json

    info = json.loads((Path(model_dir) / "model.json").read_text())
    key = {"method": info.get("method"), "config": info.get("config"),
           "tensors": sha256_file(Path(model_dir) / "model.safetensors"),
           **{k: info[k] for k in ("preprocess", "threshold", "normalization") if k in info}}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def card_tags(model_dir: Path) -> dict:
    """model.json's threshold and data version as registry tags (what the MLflow UI shows)."""
    import json

    info = json.loads((Path(model_dir) / "model.json").read_text())
    thr, data = info.get("threshold") or {}, info.get("data") or {}
    tags = {"threshold": thr.get("image"), "threshold.rule": thr.get("rule"), "threshold.source": thr.get("source"),
            "data.manifest_sha256": data.get("manifest_sha256"), "data.n_train": data.get("n_train")}
    return {k: str(v) for k, v in tags.items() if v is not None}


def peak_rss_mb() -> float:
    """Peak resident set size of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ---------------------------------------------------------------------------------------------
# prepare
# ---------------------------------------------------------------------------------------------
def prepare(params: Params, dataset: str, layout: Layout = Layout()) -> dict:
    """Materialise a dataset in MVTec layout under data/prepared/<ds> and validate every category.

    Sources (``datasets.<ds>.source``): ``demo`` (generated), ``folder`` (the listed categories of
    ``root`` validated, then hard-linked or copied: ``defectlab.data.folder``) or a registry name
    (fetched and converted, only the listed categories: ``defectlab.data.registry``). Everything
    is built in a temporary folder next to data/prepared/<ds> and renamed into place only after
    every file of every listed category passed ``scan_category`` + ``verify_samples`` (each
    image decoded once); a bad file leaves the previous version as it was.

    Writes ``manifest.csv`` (every file: category, split = train | validation | test | labelled, path,
    label, defect_type, kind, masks, sha256) and the same rows per category in
    ``<cat>/manifest.csv``: the per-category stages depend on ``data/prepared/<ds>/<cat>`` only,
    and a change in one category's files leaves every other category's folder byte-identical.
    ``validation`` rows are ``validation/good`` or the images ``data.split`` holds out of
    ``train/good``; ``labelled`` rows are annotated anomalous training images (``labelled/<kind>/``,
    e.g. KolektorSDD2's, for DSR's ``n_supervised``). Returns per category: ``train`` (files in train/good), ``validation``,
    ``test`` and ``link_mode`` (hardlink | copy | hardlink+copy | generated).
    """
    from defectlab.data import scan_category, verify_samples
    from defectlab.data.split import hold_out_validation

    spec = params.dataset(dataset)
    out = layout.prepared(dataset)
    masks_optional = spec.masks == "optional"
    with atomic_dir(out) as tmp:
        verified: set[Path] = set()        # files already decoded (source: folder validates its root first)
        if spec.source == "demo":
            from defectlab.data.demo import generate_demo

            generate_demo(tmp, seed=params.seed, categories=spec.categories, **spec.generator)
            modes = dict.fromkeys(spec.categories, "generated")
        elif spec.source == "folder":
            from defectlab.data.folder import import_folder
            from defectlab.errors import ConfigError

            root = layout.root / spec.root
            if root.resolve().is_relative_to(out.resolve()):
                raise ConfigError(f"datasets.{dataset}.root: {root} is inside the prepared output {out}")
            report = import_folder(root, tmp, spec.categories, masks_optional=masks_optional)
            modes = {cat: r["link_mode"] for cat, r in report.items()}
            verified = {p for r in report.values() for p in r["placed"]}
            write_json(tmp / "SOURCE.json", {"source": "folder", "root": str(root.resolve()), "link_mode": modes})
        else:
            from defectlab.data.registry import prepare_dataset

            prepare_dataset(spec.source, layout.root / (spec.root or f"data/raw/{spec.source}"), tmp,
                            download=spec.download, categories=spec.categories,
                            insecure_skip_checksum=spec.insecure_skip_checksum)
            modes = {cat: _link_mode_of(tmp / cat) for cat in spec.categories}
        merge_accepted(params, dataset, spec.categories, tmp, layout)
        rows, summary = [], {}
        for cat in spec.categories:
            data = scan_category(tmp, cat, masks_optional=masks_optional)
            samples = [*data.train, *data.validation, *data.test, *data.labelled]
            verify_samples([s for s in samples if not {s.path, *s.mask_paths} <= verified])   # fail here, not later
            split = hold_out_validation(data, spec.validation_fraction, spec.min_validation, params.seed)
            cat_rows = _manifest_rows(tmp, cat, split)
            _write_manifest(tmp / cat / "manifest.csv", cat_rows)
            rows += cat_rows
            summary[cat] = {"train": len(data.train), "validation": len(split.validation), "test": len(data.test),
                            "link_mode": modes[cat], **({"labelled": len(data.labelled)} if data.labelled else {})}
        _write_manifest(tmp / "manifest.csv", rows)
        _write_manifest(tmp / PRETRAIN_MANIFEST, [r for r in rows if r["split"] == "train"])
    return summary


MANIFEST_FIELDS = ("category", "split", "path", "label", "defect_type", "kind", "masks", "sha256")


def _manifest_rows(root: Path, category: str, split) -> list[dict]:
    return [{"category": category, "split": name, "path": s.path.relative_to(root).as_posix(),
             "label": s.label, "defect_type": s.defect_type, "kind": s.kind,
             "masks": ";".join(m.relative_to(root).as_posix() for m in s.mask_paths), "sha256": sha256_file(s.path)}
            for name, part in (("train", split.train), ("test", split.test), ("validation", split.validation),
                               ("labelled", split.labelled))
            for s in part]


def _write_manifest(path: Path, rows: list[dict]) -> None:
    # replaced, never written through: the DVC cache may hold the old file as a link
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=MANIFEST_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def update_manifests(params: Params, dataset: str, category: str, layout: Layout = Layout()) -> int:
    """Rewrite one category's rows of the prepared manifests (``<cat>/manifest.csv`` and the
    dataset's ``manifest.csv``) after its files changed in place (the retrain flow adding or
    removing training images), with the same validation split ``category_data`` computes.
    Returns the number of rows written for the category."""
    root = layout.prepared(dataset)
    rows = _manifest_rows(root, category, category_data(params, dataset, category, layout))
    _write_manifest(root / category / "manifest.csv", rows)
    with open(root / "manifest.csv", newline="") as f:
        others = [r for r in csv.DictReader(f) if r["category"] != category]
    order = {c: i for i, c in enumerate(params.dataset(dataset).categories)}
    _write_manifest(root / "manifest.csv", sorted(others + rows, key=lambda r: order.get(r["category"], len(order))))
    return len(rows)


#: The normal training images the dataset-level stages (``backbone``, ``pretrain``) read, written by
#: ``prepare`` and left alone when the retrain flow adds images to one category: those stages depend
#: on this file, not on ``data/prepared/<ds>``, so a one-category retrain does not retrain the shared
#: backbone. A full ``prepare`` (``dvc repro --force prepare@<ds>``) or a retrain with
#: ``flows.retrain.retrain_backbone: true`` refreshes it from the current training sets.
PRETRAIN_MANIFEST = "pretrain_manifest.csv"


def refresh_pretrain_manifest(dataset: str, layout: Layout = Layout()) -> int:
    """Pin the current training images of every category (the train rows of ``manifest.csv``) as
    the dataset-level training set; returns their number."""
    root = layout.prepared(dataset)
    with open(root / "manifest.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "train"]
    _write_manifest(root / PRETRAIN_MANIFEST, rows)
    return len(rows)


def pretrain_images(dataset: str, categories, layout: Layout = Layout()) -> dict[str, list[Path]]:
    """The pinned dataset-level training images per category, each checked against its recorded
    sha256 (the stages depend on the manifest, so a file changed under it is an error, not used)."""
    from defectlab.errors import DatasetError

    root = layout.prepared(dataset)
    path = root / PRETRAIN_MANIFEST
    if not path.exists():
        raise DatasetError(path, f"missing; prepared by an older version: run `dvc repro --force prepare@{dataset}`")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    images: dict[str, list[Path]] = {c: [] for c in categories}
    for r in rows:
        if r["category"] in images:
            p = root / r["path"]
            if not p.exists() or sha256_file(p) != r["sha256"]:
                raise DatasetError(p, f"{'changed' if p.exists() else 'missing'} since {path} pinned it; "
                                      f"run `dvc repro --force prepare@{dataset}` to rebuild the dataset")
            images[r["category"]].append(p)
    return images


def _link_mode_of(folder: Path) -> str:
    """How a converter placed a category's images: hardlink (shared with data/raw), copy, or both."""
    from defectlab.data.folder import link_mode

    return link_mode({"hardlink" if p.stat().st_nlink > 1 else "copy" for p in folder.rglob("*") if p.is_file()
                      and p.suffix.lower() != ".json"})



def accepted_dir(params: Params, layout: Layout = Layout()) -> Path:
    """Where the retrain flow archives the new normal images it accepted (``flows.retrain.accepted_dir``)."""
    rel = ((params.raw.get("flows") or {}).get("retrain") or {}).get("accepted_dir") or "data/accepted"
    return layout.root / rel


def merge_accepted(params: Params, dataset: str, categories, out: Path, layout: Layout = Layout()) -> int:
    """Add the images the retrain flow accepted (``<accepted_dir>/<ds>/<cat>/``) to the prepared
    training sets, so a rerun of `prepare` keeps every data version the flow recorded. A file of
    the same name is replaced, never written through: it may be a hard link to the user's folder."""
    from defectlab.data.convert import place

    n = 0
    for cat in categories:
        src = accepted_dir(params, layout) / dataset / cat
        if src.is_dir():
            for p in sorted(src.iterdir()):
                if p.is_file() and not p.name.startswith("."):
                    dst = out / cat / "train" / "good" / p.name
                    dst.unlink(missing_ok=True)
                    place(p, dst)
                    n += 1
    return n



def category_data(params: Params, dataset: str, category: str, layout: Layout = Layout()):
    """The prepared category as the stages see it: ``masks: optional`` applied, and, when it has no
    ``validation/good``, the validation images held out of ``train/good`` (``data.split``, with
    ``datasets.<ds>.validation_fraction`` / ``min_validation`` and the params seed), so fitting
    never sees them: the split recorded in the category's manifest, with images added since (the
    retrain flow's) placed by ``data.split.extend_split``."""
    from defectlab.data import scan_category
    from defectlab.data.split import extend_split

    spec = params.dataset(dataset)
    if category not in spec.categories:
        from defectlab.errors import ConfigError

        raise ConfigError(f"unknown category {category!r} for dataset {dataset!r}; valid: {', '.join(spec.categories)}")
    root = layout.prepared(dataset)
    data = scan_category(root, category, masks_optional=spec.masks == "optional")
    assigned = {}
    if (root / category / "manifest.csv").exists():
        with open(root / category / "manifest.csv", newline="") as f:
            assigned = {root / r["path"]: r["split"] for r in csv.DictReader(f) if r["split"] in ("train", "validation")}
    return extend_split(data, assigned, spec.validation_fraction, spec.min_validation, params.seed)


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
    inp = input_spec(params, method, dataset)
    out = layout.pretrain(method, dataset)
    t0 = time.perf_counter()
    with atomic_dir(out) as tmp:
        ctx = PretrainContext(dataset=dataset, data_root=layout.prepared(dataset), categories=spec.categories,
                              out_dir=tmp, image_size=inp.image_size, seed=params.seed,
                              device=resolve_device(params.device), progress=progress,
                              images=pretrain_images(dataset, spec.categories, layout),
                              work_dir=layout.root / "work" / method / dataset / "pretrain")
        seed_everything(params.seed)
        # the shared backbone's own training runs in the `backbone` stage; here it is only frozen
        with resize_mode(inp.resize):
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
                              images=pretrain_images(dataset, spec.categories, layout),
                              work_dir=layout.root / "work" / "backbone" / dataset / "ds2")
        seed_everything(params.seed)
        with resize_mode(spec.resize):
            stats = cls.pretrain(cfg, ctx) or {}
        stats["pretrain_seconds"] = time.perf_counter() - t0
        write_json(tmp / "pretrain.json", {"method": "ds2", "dataset": dataset, "stats": stats})
    return stats


#: the methods that take a non-square input (``datasets.<ds>.image_size: [h, w]``): fully
#: convolutional, maps brought to the input's (h, w). The others assume a square input (square
#: patch grids, square synthesis and pretext crops) and refuse one.
NON_SQUARE_METHODS = ("patchcore", "padim", "dsr")


def square_input(size, who: str, key: str) -> None:
    """ConfigError naming ``who`` and ``key`` when ``size`` is a non-square (h, w)."""
    if not isinstance(size, int):
        from defectlab.errors import ConfigError

        raise ConfigError(f"{key}: {who} takes square inputs only, got [h, w] = {list(size)} (use an int "
                          f"image_size, e.g. in datasets.<ds>.preprocess.<profile>.<method>; non-square: "
                          f"{', '.join(NON_SQUARE_METHODS)})")


def input_spec(params: Params, method: str, dataset: str):
    """The input size and resize mode of ``method`` on ``dataset`` under the active profile
    (``datasets.<ds>.preprocess.<profile>.<method>``, else the dataset's ``image_size`` / ``resize``);
    a non-square size for a method outside ``NON_SQUARE_METHODS`` is a ConfigError naming both."""
    spec = params.dataset(dataset)
    inp = spec.for_method(method, params.profile)
    if method not in NON_SQUARE_METHODS:
        override = method in (spec.preprocess.get(params.profile) or {})
        key = (f"datasets.{dataset}.preprocess.{params.profile}.{method}.image_size" if override
               else f"datasets.{dataset}.image_size")
        square_input(inp.image_size, f"method {method}", key)
    return inp


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
    inp = input_spec(params, method, dataset)
    pre = layout.pretrain(method, dataset)
    synth = layout.synth(dataset, category)
    trained = layout.trained(method, dataset, category)
    return FitContext(dataset=dataset, category=category, data=category_data(params, dataset, category, layout),
                      image_size=inp.image_size, seed=params.seed, device=resolve_device(params.device),
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
    with atomic_dir(layout.trained(method, dataset, category)) as tmp, \
            resize_mode(input_spec(params, method, dataset).resize):
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
        out_dir: Path | None = None, inputs_sha256: str | None = None, extend_from: Path | None = None,
        new_images: list | None = None):
    """Fit one method on one category; returns (method instance, fit stats). Saves the model atomically
    to ``out_dir`` (default ``layout.model(...)``). A training method reads its `train` stage output
    (``ctx.train_dir``). ``extend_from``: the model folder to extend with ``new_images`` instead
    (``method.extend``; see ``fit_dataset``); calibration is redone either way."""
    cls, cfg = load_method_config(params, method)
    ctx = fit_context(params, method, dataset, category, layout, progress)
    seed_everything(params.seed)
    t0 = time.perf_counter()
    with resize_mode(input_spec(params, method, dataset).resize):
        if extend_from is not None:
            model = cls.load(extend_from, ctx.device)
            stats = model.extend(ctx, new_images, seed=params.seed)
            stats["extended_from"] = (_fitted_data(extend_from) or {}).get("fit_inputs_sha256")
        else:
            model = cls(cfg, ctx.device)
            stats = model.fit(ctx) or {}
        stats["fit_seconds"] = time.perf_counter() - t0
        stats["peak_rss_mb_fit"] = peak_rss_mb()
        model.meta["fit"] = stats
        model.meta["substitutions"] = substitutions(params, method, cfg, ctx, model.meta.get("substitutions"))
        model.card = model_card(params, model, dataset, category, ctx.data, layout)
        model.card["data"]["fit_inputs_sha256"] = inputs_sha256 or fit_inputs_sha256(params, method, dataset,
                                                                                        category, layout)
        model.card["data"]["fit_base_sha256"] = fit_inputs_sha256(params, method, dataset, category, layout,
                                                                  with_data=False)
    out_dir = out_dir or layout.model(method, dataset, category)
    model.save(out_dir)
    _write_train_images(out_dir, ctx.data)
    return model, stats


def substitutions(params: Params, method: str, cfg, ctx, recorded=None) -> list[str]:
    """What stood in for a missing external resource in this category's model (``defectlab.resources``):
    the method's documented substitutes under ``params``, the synthesis cache's records (methods
    reading it) and those the method recorded while training (``recorded``)."""
    from defectlab import resources

    found = resources.check(params, {method: cfg}, methods=[method], datasets=[])   # a dataset has no substitute
    cache = resources.synthesis_records(ctx.synth_dir) if method in resources.READS_SYNTHESIS else []
    return resources.merge(found.records(method=method), cache, recorded)


def model_card(params: Params, model, dataset: str, category: str, data, layout: Layout = Layout()) -> dict:
    """model.json's deployment blocks (``methods.base.CARD_KEYS``): preprocessing, the threshold and
    score normalisation chosen on the category's validation images (never test), the data version
    the model was fitted on and the library versions. What `defectlab predict`, the MLflow pyfunc
    model and the ONNX export read instead of params.yaml."""
    import hashlib

    from defectlab.calibration import calibrate
    from defectlab.data import IMAGENET_MEAN, IMAGENET_STD
    from defectlab.methods.base import make_loader
    from defectlab.tracking import versions

    inp = input_spec(params, model.name, dataset)
    cal = params.calibration
    card = {"preprocess": {"image_size": inp.image_size, "resize": inp.resize,
                           "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "channels": "RGB"},
            "versions": versions()}
    rows = []
    manifest = layout.prepared(dataset) / "manifest.csv"
    if manifest.exists():
        with open(manifest, newline="") as f:
            rows = [f"{r['split']}|{r['path']}|{r['sha256']}" for r in csv.DictReader(f) if r["category"] == category]
    card["data"] = {"dataset": dataset, "category": category, "n_train": len(data.train),
                    "n_validation": len(data.validation),
                    "manifest_sha256": hashlib.sha256("\n".join(sorted(rows)).encode()).hexdigest() if rows else None}
    if not data.validation:
        card["threshold"] = {"image": None, "pixel": None, "source": None,
                             "reason": "no validation images (validation/good is absent and "
                                       f"datasets.{dataset}.validation_fraction is 0)"}
        return card
    ev = params.section("evaluation", "eval", EvalParams)
    out = model.predict_loader(make_loader(data.validation, inp.image_size, ev.batch_size))
    card.update(calibrate(out["scores"], out["labels"], out["maps"], rule=cal.rule, target_fpr=cal.target_fpr,
                          pixel_target_fpr=cal.pixel_target_fpr, source="validation"))
    return card


def _tree_sha256(folder: Path) -> str | None:
    """Digest of a folder's files (relative paths and contents), or of one file; None when absent."""
    import hashlib

    if not folder.exists():
        return None
    if folder.is_file():
        return sha256_file(folder)
    h = hashlib.sha256()
    for p in sorted(q for q in folder.rglob("*") if q.is_file()):
        h.update(f"{p.relative_to(folder).as_posix()}\0{sha256_file(p)}\n".encode())
    return h.hexdigest()


def fit_inputs_sha256(params: Params, method: str, dataset: str, category: str, layout: Layout = Layout(),
                      with_data: bool = True) -> str:
    """Digest of everything fitting one category reads: the method's resolved config, the dataset
    spec, seed / device / profile, calibration, the category's manifest (every image by sha256),
    the method's pretrain + train checkpoints of this category, the dataset's backbone, the
    package's source and the library versions. Equal digests mean the fit would be redone from the
    same inputs: the `fit` stage reuses the model instead (``fit_dataset``). ``with_data=False``:
    the same without the category's manifest (equal: only the images changed, so a method with
    ``extend`` may add the new ones to the old fit)."""
    ev = params.section("evaluation", "eval", EvalParams)
    return _inputs_sha256(params, method, dataset, category, layout, with_data, eval_batch_size=ev.batch_size,
                          pretrain=_tree_sha256(layout.pretrain(method, dataset)),
                          train=_tree_sha256(layout.trained(method, dataset, category)),
                          backbone=_tree_sha256(layout.backbone(dataset)))


def _inputs_sha256(params: Params, method: str, dataset: str, category: str, layout: Layout,
                   with_data: bool = True, **more) -> str:
    """Digest of what fitting one category reads from the params, the category's manifest
    (``with_data``), the package's source and the library versions, with ``more``."""
    from defectlab.tracking import versions

    _, cfg = load_method_config(params, method)
    key = {"method": method, "config": cfg.model_dump(mode="json"),
           "dataset": params.dataset(dataset).model_dump(mode="json"), "seed": params.seed,
           "device": params.device, "profile": params.profile, "calibration": params.calibration.model_dump(mode="json"),
           "manifest": _tree_sha256(layout.prepared(dataset) / category / "manifest.csv") if with_data else None,
           "code": _code_sha256(), "versions": versions(), **more}
    return _digest(key)


def _digest(key: dict) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def _code_sha256() -> str:
    """Digest of the package's source files (any change: nothing is reused)."""
    import hashlib

    import defectlab

    src = Path(defectlab.__file__).parent
    return hashlib.sha256("".join(f"{p.relative_to(src)}:{sha256_file(p)}" for p in sorted(src.rglob("*.py")))
                          .encode()).hexdigest()


def _fitted_data(model_dir: Path) -> dict | None:
    """model.json's ``data`` block of a complete model folder, else None."""
    try:
        info = json.loads((model_dir / "model.json").read_text())
    except (OSError, ValueError):
        return None
    return (info.get("data") or {}) if (model_dir / "model.safetensors").exists() else None


#: the sha256 and path of every training image a model was fitted on (``extend`` needs the old set)
TRAIN_IMAGES = "train_images.txt"


def _write_train_images(model_dir: Path, data) -> None:
    with atomic_path(model_dir / TRAIN_IMAGES) as tmp:
        tmp.write_text("".join(f"{sha256_file(s.path)} {s.path.name}\n" for s in data.train))


def _new_images(params: Params, method: str, dataset: str, category: str, layout: Layout, old: Path):
    """The training images to add to the model in ``old`` when it can be extended instead of refitted:
    the method has ``extend`` and its config says ``incremental``, everything but the category's
    images is unchanged (``fit_inputs_sha256(with_data=False)``), every image it was fitted on is
    still a training image, and there are new ones. None otherwise (refit)."""
    cls, cfg = load_method_config(params, method)
    fitted = _fitted_data(old)
    if not (hasattr(cls, "extend") and getattr(cfg, "incremental", False) and fitted
            and (old / TRAIN_IMAGES).exists()
            and fitted.get("fit_base_sha256") == fit_inputs_sha256(params, method, dataset, category, layout,
                                                                    with_data=False)):
        return None
    from collections import Counter

    before = Counter(line.split(" ", 1)[0] for line in (old / TRAIN_IMAGES).read_text().splitlines() if line)
    now = [(sha256_file(s.path), s) for s in category_data(params, dataset, category, layout).train]
    left = Counter(before)
    new = []
    for digest, sample in now:
        if left[digest] > 0:
            left[digest] -= 1
        else:
            new.append(sample)
    return new if new and not +left else None


def fit_dataset(params: Params, method: str, dataset: str, layout: Layout = Layout(), progress: bool = True,
                each: Callable[[str, Path, dict], None] | None = None) -> dict:
    """The `fit` stage: fit ``method`` on every category of ``run.categories``; ``models/<m>/<ds>/``
    is replaced as a whole at the end (an interrupted fit leaves the previous models). A category
    whose fit inputs are unchanged (``fit_inputs_sha256`` equals the one in its model.json: e.g.
    the other categories when a retrain added images to one) keeps its model, copied byte for byte,
    and its stats say ``reused: 1``. A category that only gained training images is extended
    instead of refitted when the method can (``_new_images``: PatchCore / APC banks with
    ``incremental: true``); its stats say ``incremental: 1``. ``each(category, model_dir, stats)`` runs after each category
    that was fitted (the stage logs and registers it)."""
    out = {}
    with atomic_dir(layout.models(method, dataset)) as tmp:
        for category in params.run.categories:
            inputs = fit_inputs_sha256(params, method, dataset, category, layout)
            old = layout.model(method, dataset, category)
            if (_fitted_data(old) or {}).get("fit_inputs_sha256") == inputs:
                shutil.copytree(old, tmp / category)
                out[category] = {"reused": 1}
                continue
            new = _new_images(params, method, dataset, category, layout, old)
            _, stats = fit(params, method, dataset, category, layout, progress, out_dir=tmp / category,
                           inputs_sha256=inputs, extend_from=old if new else None, new_images=new)
            if each is not None:
                each(category, tmp / category, stats)
            out[category] = stats
        fault_point("fit:write")
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


def defects_for_spro(samples, size: int | None = None, config_required: bool = False
                     ) -> list[list[tuple[np.ndarray, float]]]:
    """Per test image, its annotated defects as (mask, saturation area in pixels), at the ground
    truth's own resolution (``size`` None) or resized to ``size``: MVTec LOCO's per-defect masks
    with the saturation thresholds of its defects_config.json; elsewhere each defect's saturation
    area is its own area (sPRO then reduces to a per-defect PRO).
    ``config_required`` (an MVTec LOCO dataset): a category without defects_config.json is an
    error, not a silent per-defect PRO reported as sPRO."""
    configs: dict = {}                                   # one defects_config.json read per category
    return [_defects_of(s, configs, size, config_required) for s in samples]


def _defects_of(sample, configs: dict, size: int | None, config_required: bool) -> list[tuple[np.ndarray, float]]:
    from defectlab.data import load_defect_masks, load_defects_config
    from defectlab.errors import DatasetError

    if not sample.mask_paths:
        return []
    cat_dir = sample.path.parent.parent.parent          # <cat>/test/<defect>/<image>
    if cat_dir not in configs:
        configs[cat_dir] = load_defects_config(cat_dir)
        if config_required and not configs[cat_dir]:
            raise DatasetError(cat_dir / "defects_config.json",
                               "missing: MVTec LOCO's sPRO needs the saturation thresholds it lists (it "
                               "comes with the dataset archive: `defectlab download mvtec_loco --raw-dir "
                               "DIR --out DIR` restores it)")
    return load_defect_masks(sample, configs[cat_dir], size)


def region_metrics_at_gt(out: dict, samples, subsets: dict[str, np.ndarray], ev: EvalParams,
                         spro_names, config_required: bool = False) -> tuple[dict, dict]:
    """AUPRO and sPRO as the official MVTec AD / LOCO evaluations compute them: each anomaly map
    is brought back to its ground truth's resolution (``transform.map_to_original``: bilinear,
    through the dataset's resize mode) and the regions / defects are taken from the full-size
    masks, so a defect a few pixels wide counts even where shrinking the mask to the model's
    input would erase it. ``subsets``: name -> boolean selection of the scored images (the overall
    metric under name ""). Returns ({"aupro[_name]": v, "spro[_name]": v}, {"pro": curve points});
    spro only for "" and ``spro_names``. One pass over the images; the maps are not all held."""
    from defectlab.data import load_mask, probe_image
    from defectlab.data.transform import current_mode, map_to_original
    from defectlab.metrics import OverlapCurve, _thin, regions

    mode = current_mode()
    maps = out["maps"]
    sizes = []
    for s in samples:
        w, h, _ = probe_image(s.path)
        sizes.append((h, w))
    areas = np.array([h * w for h, w in sizes], dtype=np.int64)
    pro_acc = {n: OverlapCurve(ev.max_fpr_pro, int(areas[sel].sum())) for n, sel in subsets.items()}
    spro_acc = {n: OverlapCurve(ev.max_fpr_spro, int(areas[sel].sum())) for n, sel in subsets.items()
                if n == "" or n in spro_names}
    configs: dict = {}
    for i, s in enumerate(samples):
        h, w = sizes[i]
        full = map_to_original(maps[i], h, w, mode)
        comps = regions(load_mask(s.mask_paths)) if s.mask_paths else []
        defects = _defects_of(s, configs, None, config_required)
        for name, sel in subsets.items():
            if not sel[i]:
                continue
            pro_acc[name].add(full, comps)
            if name in spro_acc:
                spro_acc[name].add(full, defects)
    values = {}
    for name, acc in pro_acc.items():
        values["aupro" + (f"_{name}" if name else "")] = acc.area()
    for name, acc in spro_acc.items():
        values["spro" + (f"_{name}" if name else "")] = acc.area()
    if "" not in pro_acc:
        return values, {}
    fpr, pro = pro_acc[""].curve()
    keep = fpr <= ev.max_fpr_pro
    return values, {"pro": _thin([{"fpr": float(a), "pro": float(b)} for a, b in zip(fpr[keep], pro[keep])])}


def metrics_for(out: dict, ev: EvalParams, samples=None, size: int | None = None,
                spro_config_required: bool = False) -> tuple[dict, dict]:
    """All metrics and the curves for plots: overall, per defect type (``<metric>_<type>``, the
    test/<type> folder name) and per defect kind from defects.json (``<metric>_structural``,
    ``_logical``; a type defects.json does not list has kind ``unknown``, which gets no keys of
    its own), each on the good images plus that subset's anomalies.

    With ``samples`` (the scored images, in order) AUPRO and sPRO are computed at each ground
    truth's resolution (``region_metrics_at_gt``); without, AUPRO is computed on the masks at the
    maps' size and there is no sPRO. ``size`` is not used (kept for callers).

    Pixel metrics need the ground truth of every anomalous image: with ``masks: optional`` an
    anomalous image without a mask (``out["has_mask"]``, else its Sample in ``samples``) makes
    the pixel metrics (pixel_*, aupro, spro) of every subset holding it ``None``, with the reason
    in ``warnings``; the image metrics are computed as usual."""
    from defectlab.metrics import compute_all, curves

    labels, scores, masks, maps = out["labels"], out["scores"], out["masks"], out["maps"]
    has_mask = _mask_available(out, samples)
    metrics = compute_all(labels, scores, masks, maps, max_fpr_pro=ev.max_fpr_pro, has_mask=has_mask)
    kinds = np.asarray(out["kinds"])
    types = np.asarray(out.get("defect_types", out["kinds"]))
    subsets = {t: (types == "good") | (types == t) for t in sorted(set(types) - {"good"})}
    subsets.update({k: (kinds == "good") | (kinds == k) for k in sorted(set(kinds) - {"good", "unknown"})})
    region_sets = {"": np.ones(len(labels), dtype=bool)} if metrics.get("pixel_auroc") is not None else {}
    for name, sel in subsets.items():
        sub = compute_all(labels[sel], scores[sel], masks[sel], maps[sel], max_fpr_pro=ev.max_fpr_pro,
                          has_mask=None if has_mask is None else has_mask[sel])
        for key in ("image_auroc", "pixel_auroc", "aupro"):
            metrics[f"{key}_{name}"] = sub.get(key)
        if sub.get("pixel_auroc") is not None:
            region_sets[name] = sel
        if samples is not None and name in kinds:
            metrics[f"spro_{name}"] = None
    curve_data = curves(labels, scores, masks, maps, has_mask=has_mask)
    if samples is not None:
        metrics["spro"] = None
        if region_sets:
            values, gt_curves = region_metrics_at_gt(out, samples, region_sets, ev, set(kinds.tolist()) - {"good"},
                                                     spro_config_required)
            metrics.update(values)
            if "pro" in curve_data:
                curve_data.update(gt_curves)
    return metrics, curve_data


def _mask_available(out: dict, samples) -> np.ndarray | None:
    """Per scored image: False for an anomalous image without ground truth (``masks: optional``),
    from ``out["has_mask"]`` or else the matching Sample (by path); None when unknown (all have)."""
    labels = np.asarray(out["labels"]).astype(int)
    if "has_mask" in out:
        has = np.asarray(out["has_mask"], dtype=bool)
    elif samples is not None:
        by_path = {str(s.path): bool(s.mask_paths) for s in samples}
        paths = out.get("paths")
        paths = [str(s.path) for s in samples] if paths is None else paths
        has = np.array([by_path.get(str(p), True) for p in paths], dtype=bool)
    else:
        return None
    return has | (labels == 0)


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
    inp = input_spec(params, method, dataset)
    with resize_mode(inp.resize):
        out, seconds = score_category(model, data, inp.image_size, ev.batch_size, progress)
        metrics, curve_data = metrics_for(out, ev, eval_samples(model, data), inp.image_size,
                                          spro_config_required=spec.source == "mvtec_loco")
    fit_stats = model.meta.get("fit", {})
    metrics.update({"seed": params.seed, "fit_seconds": fit_stats.get("fit_seconds"),
                    "train_seconds": model.meta.get("train", {}).get("train_seconds", 0.0),   # train stage (0: none)
                    "inference_seconds": seconds,
                    "images_per_second": len(out["scores"]) / max(seconds, 1e-9), "peak_rss_mb": peak_rss_mb(),
                    "n_test": int(len(out["scores"])), "n_test_anomalous": int(out["labels"].sum()),
                    # labelled anomalous training images (DSR's n_supervised): which paper figure applies
                    "n_supervised": len(model.meta.get("supervised_images", [])),
                    # what stood in for a missing external resource (recorded by fit; defectlab.resources)
                    "substitutions": list(model.meta.get("substitutions", []))})
    dest = dest or eval_dest(layout, method, dataset)
    with atomic_dir(Path(dest["maps"]) / category) as tmp, resize_mode(inp.resize):
        write_overlays(out, tmp, n=ev.n_overlays, image_size=inp.image_size)
        # metrics and curves live in the (DVC-cached) overlay folder: what a later run keeps when
        # nothing changed; every curve file exists (empty when undefined, e.g. one class)
        write_json(tmp / KEPT / "metrics.json", metrics)
        for curve in CURVES:
            write_json(tmp / KEPT / f"{curve}.json", curve_data.get(curve, []))
    _publish_results(Path(dest["maps"]) / category / KEPT, dest, category)
    return metrics


def eval_dest(layout: Layout, method: str, dataset: str) -> dict:
    """The evaluate stage's output folders of one method x dataset."""
    return {"metrics": layout.metrics(method, dataset, "x").parent, "maps": layout.maps(method, dataset, "x").parent,
            "plots": {c: layout.plot(c, method, dataset, "x").parent for c in CURVES}}


def evaluate_dataset(params: Params, method: str, dataset: str, layout: Layout = Layout(), progress: bool = True,
                     each: Callable[[str, dict, dict], None] | None = None) -> dict:
    """The `evaluate` stage: every category of ``run.categories``; its output folders (metrics,
    curves, overlays of this method x dataset) are each replaced as a whole at the end. A category
    whose inputs are unchanged (``eval_inputs_sha256``, kept next to its overlays) keeps its
    previous outputs, copied, instead of being scored again.
    ``each(category, metrics, dest)`` runs after each category (the stage logs it to MLflow)."""
    import contextlib

    final = eval_dest(layout, method, dataset)
    out = {}
    with contextlib.ExitStack() as stack:
        dest = {"metrics": stack.enter_context(atomic_dir(final["metrics"])),
                "maps": stack.enter_context(atomic_dir(final["maps"])),
                "plots": {c: stack.enter_context(atomic_dir(d)) for c, d in final["plots"].items()}}
        for category in params.run.categories:
            key = eval_inputs_sha256(params, method, dataset, category, layout)
            if not _reuse_evaluation(final, dest, category, key):
                evaluate(params, method, dataset, category, layout, progress, dest=dest)
                (Path(dest["maps"]) / category / EVAL_INPUTS).write_text(key + "\n")
            out[category] = json.loads((Path(dest["metrics"]) / f"{category}.json").read_text())
            if each is not None:
                each(category, out[category], dest)
    return out


#: in reports/maps/<m>/<ds>/<cat>/: the digest of what the category's evaluation read
EVAL_INPUTS = "eval_inputs.sha256"


def eval_inputs_sha256(params: Params, method: str, dataset: str, category: str, layout: Layout = Layout()) -> str:
    """Digest of everything evaluating one category reads: the model folder, the category's
    manifest, the evaluation and dataset params, device, the package's source, library versions."""
    from defectlab.tracking import versions

    return _digest({"model": _tree_sha256(layout.model(method, dataset, category)),
                    "manifest": _tree_sha256(layout.prepared(dataset) / category / "manifest.csv"),
                    "evaluation": params.section("evaluation", "eval", EvalParams).model_dump(mode="json"),
                    "dataset": params.dataset(dataset).model_dump(mode="json"), "device": params.device,
                    "code": _code_sha256(), "versions": versions()})


def _reuse_evaluation(final: dict, dest: dict, category: str, key: str) -> bool:
    """Copy the category's previous metrics, curves and overlays into ``dest`` when they were made
    from the same inputs (``eval_inputs_sha256``); False (evaluate it) otherwise. Read from the
    overlay folder (its ``results/`` copy), which the stage restores from the DVC cache."""
    before = Path(final["maps"]) / category
    stamp, kept = before / EVAL_INPUTS, before / KEPT
    if not (stamp.exists() and stamp.read_text().strip() == key
            and all((kept / f"{name}.json").exists() for name in ("metrics", *CURVES))):
        return False
    shutil.copytree(before, Path(dest["maps"]) / category)
    _publish_results(kept, dest, category)
    return True


def _publish_results(kept: Path, dest: dict, category: str) -> None:
    """The category's metrics and curves from its overlay folder's ``results/`` copy to the stage's
    metrics/ and plots/ outputs (``dest``)."""
    for src, folder in (("metrics", dest["metrics"]), *((curve, d) for curve, d in dest["plots"].items())):
        Path(folder).mkdir(parents=True, exist_ok=True)
        shutil.copy2(kept / f"{src}.json", Path(folder) / f"{category}.json")


# ---------------------------------------------------------------------------------------------
# seeds: the extra seeds of ``seeds`` (mean ± std in the results table)
# ---------------------------------------------------------------------------------------------
def seeds_dir(dataset: str, layout: Layout = Layout()) -> Path:
    """The `seeds` stage's output: ``metrics/seeds/<ds>/<method>/<category>/seed-<s>.json``."""
    return layout.root / "metrics" / "seeds" / dataset


def seed_inputs_sha256(params: Params, method: str, dataset: str, category: str, layout: Layout = Layout()) -> str:
    """Digest of everything one extra-seed run of a category reads: the fit's inputs without the
    checkpoints (the run trains its own), the evaluation params."""
    return _inputs_sha256(params, method, dataset, category, layout,
                          evaluation=params.section("evaluation", "eval", EvalParams).model_dump(mode="json"),
                          backbone=params.raw.get("backbone"), synthesis=params.raw.get("synthesis"),
                          pretrain_manifest=_tree_sha256(layout.prepared(dataset) / "pretrain_manifest.csv"))


def extra_seeds(params: Params, dataset: str, layout: Layout = Layout(), progress: bool = True,
                each: Callable[[str, str, int, dict], None] | None = None) -> dict:
    """The `seeds` stage: for every seed of ``seeds`` other than ``seed``, every method of
    ``run.methods`` on every category of ``run.categories``, from scratch as the pipeline runs it
    (synthesis, the DS2 backbone when a method reads it, pretraining, per-category training, fit,
    evaluation), in a scratch folder under ``work/`` on the same prepared data and split; nothing
    is deployed or registered. Each run's test metrics go to ``seeds_dir(dataset)/<m>/<cat>/seed-<s>.json``
    (with the digest of its inputs beside it: a later stage run keeps a result whose inputs did
    not change instead of training again). ``report`` turns them into mean ± std columns.
    ``seeds`` absent or ``[seed]``: writes only ``seeds.json``."""
    import tempfile

    from defectlab.methods import get_method

    extra = [s for s in params.seeds if s != params.seed]
    final = seeds_dir(dataset, layout)
    out: dict = {}
    with atomic_dir(final) as tmp:
        write_json(tmp / "seeds.json", {"seed": params.seed, "seeds": params.seeds, "extra": extra,
                                        "methods": params.run.methods, "categories": params.run.categories})
        for s in extra:
            p = with_seed(params, s)
            todo = []
            for method in params.run.methods:
                for category in params.run.categories:
                    rel = Path(method) / category / f"seed-{s}"
                    key = seed_inputs_sha256(p, method, dataset, category, layout)
                    old, stamp = final / rel.with_suffix(".json"), final / rel.with_suffix(".sha256")
                    if old.exists() and stamp.exists() and stamp.read_text().strip() == key:
                        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                        for suffix in (".json", ".sha256"):
                            shutil.copy2(final / rel.with_suffix(suffix), tmp / rel.with_suffix(suffix))
                        out.setdefault(method, {})[f"{category}/seed-{s}"] = json.loads(old.read_text())
                    else:
                        todo.append((method, category, rel, key))
            if not todo:
                continue
            (layout.root / "work").mkdir(exist_ok=True)
            scratch = Path(tempfile.mkdtemp(prefix=f"seeds-{dataset}-{s}-", dir=layout.root / "work"))
            try:
                lay = Layout(root=scratch)
                lay.prepared(dataset).parent.mkdir(parents=True)
                lay.prepared(dataset).symlink_to(layout.prepared(dataset).resolve(), target_is_directory=True)
                synthesize_dataset(p, dataset, lay)
                methods = list(dict.fromkeys(m for m, *_ in todo))
                configs = {m: load_method_config(p, m) for m in methods}
                if any(cls.shared_backbone or getattr(cfg, "weights", None) == "ds2" for cls, cfg in configs.values()):
                    train_backbone(p, dataset, lay, progress)
                for method in methods:
                    pretrain(p, method, dataset, lay, progress)
                for method, category, rel, key in todo:
                    if get_method(method).trains_per_category:
                        train(p, method, dataset, category, lay, progress)
                    fit(p, method, dataset, category, lay, progress)
                    metrics = evaluate(p, method, dataset, category, lay, progress)
                    (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                    write_json(tmp / rel.with_suffix(".json"), {**metrics, "seed": s})
                    (tmp / rel.with_suffix(".sha256")).write_text(key + "\n")
                    out.setdefault(method, {})[f"{category}/seed-{s}"] = metrics
                    if each is not None:
                        each(method, category, s, metrics)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
    return out


# ---------------------------------------------------------------------------------------------
# benchmark: one method on any MVTec-format folder, outside the DVC pipeline
# ---------------------------------------------------------------------------------------------
def with_seed(params: Params, seed: int) -> Params:
    """``params`` with its top-level ``seed`` replaced (profile and every other key as they are) and
    ``seeds`` dropped: a run of one seed."""
    return Params({**{k: v for k, v in params.raw.items() if k != "seeds"}, "seed": seed}, params.path)


def parse_seeds(text: str, where: str = "--seeds") -> list[int]:
    """"0,1,2" -> [0, 1, 2]; a ConfigError naming ``where`` for anything else (empty, not an
    integer, a seed twice)."""
    from defectlab.errors import ConfigError

    parts = [p.strip() for p in str(text).split(",")]
    try:
        seeds = [int(p) for p in parts]
    except ValueError:
        raise ConfigError(f"{where}: a comma-separated list of integers, e.g. 0,1,2 (got {text!r})") from None
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"{where}: seed listed twice (got {text!r})")
    return seeds


def benchmark(params: Params, method: str, root: Path, category: str, out_dir: Path, *,
              image_size: int | None = None, resize: str = "squash", masks_optional: bool = False,
              progress: bool = True, seeds: list[int] | None = None) -> dict:
    """Fit + evaluate ``method`` on ``root/category``; write out_dir/metrics.json and out_dir/maps/.
    ``resize``: how non-square images become image_size x image_size (data.transform);
    ``masks_optional``: accept defective test images without a mask (their pixel metrics: null).

    ``seeds``: run once per seed (params' ``seed`` replaced: pretraining, training, coreset picks,
    synthesis), each into ``out_dir/seed-<s>/`` (metrics.json, maps/, curves.json as for one run);
    ``out_dir/metrics.json`` then holds ``{"seeds", "n_seeds", "method", ..., "metrics": {metric:
    {"mean", "std", "n", "values"}}}`` (report.seed_summary), which is returned. ``None`` or one
    seed: one run straight into ``out_dir``, as without the option."""
    from defectlab.report import seed_summary

    kwargs = dict(image_size=image_size, resize=resize, masks_optional=masks_optional, progress=progress)
    if not seeds or len(seeds) == 1:
        return _benchmark_once(with_seed(params, seeds[0]) if seeds else params, method, root, category, out_dir,
                               **kwargs)
    with atomic_dir(Path(out_dir)) as tmp:
        per_seed = {s: _benchmark_once(with_seed(params, s), method, root, category, tmp / f"seed-{s}", **kwargs)
                    for s in seeds}
        first = per_seed[seeds[0]]
        summary = {**{k: first.get(k) for k in ("method", "category", "root", "image_size", "resize", "device")},
                   "profile": params.profile, "seeds": list(seeds), "n_seeds": len(seeds),
                   "metrics": seed_summary(per_seed)}
        write_json(tmp / "metrics.json", summary)
    return summary


def _benchmark_once(params: Params, method: str, root: Path, category: str, out_dir: Path, *,
                    image_size: int | None = None, resize: str = "squash", masks_optional: bool = False,
                    progress: bool = True) -> dict:
    """One run of ``benchmark`` at ``params.seed``."""
    from defectlab.backbones import resolve_device
    from defectlab.data import scan_category
    from defectlab.methods.base import FitContext, PretrainContext
    from defectlab.report import write_overlays

    cls, cfg = load_method_config(params, method)
    ev = params.section("evaluation", "eval", EvalParams)
    device = resolve_device(params.device)
    data = scan_category(root, category, masks_optional=masks_optional)
    size = image_size or 256
    seed_everything(params.seed)
    out_dir = Path(out_dir)
    with resize_mode(resize), atomic_dir(out_dir) as tmp:
        t0 = time.perf_counter()
        pre = tmp / "pretrain"
        pre.mkdir()
        pctx = PretrainContext(dataset=root.name, data_root=root, categories=[category], out_dir=pre,
                               image_size=size, seed=params.seed, device=device, progress=progress)
        if cls.shared_backbone:   # DS2: what the `backbone` stage trains, at the profile's backbone.ds2 settings
            cls.pretrain(params.section("backbone", "ds2", cls.Config), pctx)
        else:
            cls.pretrain(cfg, pctx)
        ctx = FitContext(dataset=root.name, category=category, data=data, image_size=size, seed=params.seed,
                         device=device, pretrain_dir=pre, progress=progress, work_dir=tmp)
        model, stats = train_and_fit(cls, cfg, ctx, tmp / "train")
        fit_seconds = time.perf_counter() - t0
        out, seconds = score_category(model, data, size, ev.batch_size, progress)
        metrics, curve_data = metrics_for(out, ev, eval_samples(model, data), size)
        metrics.update({"method": method, "category": category, "root": str(root), "seed": params.seed,
                        "image_size": size, "resize": resize, "fit_seconds": fit_seconds, "fit_stats": stats,
                        "inference_seconds": seconds, "images_per_second": len(out["scores"]) / max(seconds, 1e-9),
                        "peak_rss_mb": peak_rss_mb(), "device": str(device)})
        (tmp / "maps").mkdir()
        write_overlays(out, tmp / "maps", n=max(ev.n_overlays, 8), image_size=size)
        write_json(tmp / "curves.json", curve_data)
        write_json(tmp / "metrics.json", metrics)
        import shutil

        shutil.rmtree(pre)
        shutil.rmtree(tmp / "train", ignore_errors=True)
    return metrics
