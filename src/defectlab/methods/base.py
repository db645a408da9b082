"""The contract every method implements, and the generic save / load / predict plumbing.

A method is one module in ``defectlab.methods`` holding one ``AnomalyMethod`` subclass with a
pydantic ``Config``. The pipeline calls, in order:

1. ``pretrain(config, ctx)`` once per dataset (classmethod; optional — the default freezes the
   configured backbone weights into the stage output so later stages are reproducible),
2. ``train(ctx)`` per category, only for methods with ``trains_per_category = True`` (a network
   trained on the category: MSP-SVDD's encoders, SLSG's SegNet, DSR's stage 2, APC's fine-tuning).
   The `train` stage saves ``trained_tensors()`` + ``self.meta`` into its own DVC output
   (``checkpoints/<method>/<ds>/train/<cat>/``), so it is cached per category by DVC,
3. ``fit(ctx)`` per category (memory bank, density, or the last, cheap step on top of the trained
   network); for a training method it starts with ``self.load_trained(ctx.train_dir)``,
4. ``predict(images)`` on batches of test images -> image scores and pixel maps.

Each phase's DVC stage depends only on the config fields that phase reads (``phase_config``; the
`config` stage writes them to ``configs/<method>/<phase>.json``), so changing a fit-only setting
(a coreset ratio, DSR's stage-3 iterations) does not retrain the network. A method declares the
fields its ``pretrain`` / ``train`` never read in ``PRETRAIN_IGNORES`` / ``TRAIN_IGNORES``
(conservative: a field left out only costs a rerun; the tests record which fields each phase
reads and check none of them is declared ignored).

Fitted and trained state is stored as ``*.safetensors`` (tensors) + ``*.json`` (config and
metadata): no pickles, so a model file from elsewhere cannot execute code when loaded.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch.utils.data import DataLoader

from defectlab.config import StrictModel
from defectlab.io import atomic_dir


#: model.json layout version (2: the deployment blocks below sit next to method/config/meta)
MODEL_FORMAT = 2
#: model.json's deployment blocks (see defectlab.inference): what scoring an image needs besides
#: the tensors. ``preprocess`` {image_size, resize, mean, std}; ``threshold`` / ``normalization``
#: (defectlab.calibration); ``data`` {dataset, category, manifest_sha256, n_train, n_validation};
#: ``versions`` (library versions at fit time).
CARD_KEYS = ("preprocess", "threshold", "normalization", "data", "versions")


@dataclass
class PretrainContext:
    """What a dataset-level pretraining sees."""

    dataset: str
    data_root: Path               # prepared dataset root (MVTec layout, one folder per category)
    categories: list[str]
    out_dir: Path                  # write checkpoints here (a temp dir renamed into place by the stage)
    image_size: int
    seed: int
    device: torch.device
    synth_root: Path | None = None  # data/synth/<dataset> (one folder per category)
    work_dir: Path | None = None    # scratch (checkpoints for resumable training)
    progress: bool = True
    #: the normal training images per category the pipeline pinned for dataset-level training
    #: (``data/prepared/<ds>/pretrain_manifest.csv``: validation images excluded, images a retrain
    #: added since left out); None: every ``train/good`` image under ``data_root`` (tests, benchmark)
    images: dict[str, list[Path]] | None = None

    def train_images(self, category: str) -> list[Path]:
        """The normal images of ``category`` a dataset-level training may read."""
        if self.images is not None:
            return list(self.images[category])
        from defectlab.data import scan_category

        return [s.path for s in scan_category(self.data_root, category).train]


@dataclass
class FitContext:
    """What a per-category fit sees."""

    dataset: str
    category: str
    data: Any                      # defectlab.data.CategoryData
    image_size: int
    seed: int
    device: torch.device
    pretrain_dir: Path | None = None
    synth_dir: Path | None = None
    work_dir: Path | None = None   # scratch (checkpoints for resumable training)
    progress: bool = True
    extra: dict = field(default_factory=dict)
    train_dir: Path | None = None  # fit: the category's `train` stage output (training methods only)


class AnomalyMethod(ABC):
    name: ClassVar[str]
    Config: ClassVar[type[StrictModel]]
    #: True when ``pretrain`` trains something (the pretrain stage is then the expensive one).
    trains_in_pretrain: ClassVar[bool] = False

    def __init__(self, config: StrictModel, device: torch.device | str = "cpu"):
        self.config = config
        self.device = torch.device(device)
        self.meta: dict[str, Any] = {}
        #: the deployment blocks of model.json (``CARD_KEYS``: preprocessing, threshold, score
        #: normalisation, data version, library versions), set by the pipeline's `fit`
        self.card: dict[str, Any] = {}

    #: config fields ``pretrain`` never reads (its stage does not rerun when they change); a method
    #: whose ``pretrain`` is the default (freeze the backbone) reads only ``backbone`` / ``weights``
    PRETRAIN_IGNORES: ClassVar[frozenset[str]] = frozenset()
    #: the fields ``pretrain`` reads, when that is shorter to say than what it ignores
    PRETRAIN_READS: ClassVar[frozenset[str] | None] = None
    #: config fields ``train`` never reads (scoring, bank and other fit-only settings)
    TRAIN_IGNORES: ClassVar[frozenset[str]] = frozenset()
    #: config fields whose default changed, with the value a model saved without the field used:
    #: ``load`` fills them in, so an existing model folder keeps scoring as it did when it was fitted
    SAVED_BEFORE_DEFAULTS: ClassVar[dict[str, Any]] = {}
    #: fields that change how a phase runs, not what it produces (checkpoint cadence, workers):
    #: they may be read by a phase that ignores them
    RESULT_NEUTRAL: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def phase_fields(cls, phase: str) -> list[str]:
        """The config fields the ``pretrain`` or ``train`` phase reads (its stage's inputs)."""
        fields = [f for f in cls.Config.model_fields if f not in cls.RESULT_NEUTRAL]
        if phase == "pretrain":
            if cls.shared_backbone or cls.pretrain.__func__ is AnomalyMethod.pretrain.__func__:
                return [f for f in fields if f in ("backbone", "weights")]      # freeze_backbone
            if cls.PRETRAIN_READS is not None:
                return [f for f in fields if f in cls.PRETRAIN_READS]
            return [f for f in fields if f not in cls.PRETRAIN_IGNORES]
        if phase == "train":
            return [f for f in fields if f not in cls.TRAIN_IGNORES] if cls.trains_per_category else []
        raise ValueError(f"phase must be pretrain or train, got {phase!r}")

    @classmethod
    def phase_config(cls, config: StrictModel, phase: str) -> dict:
        """The part of ``config`` the phase reads, as JSON-able data (``configs/<method>/<phase>.json``)."""
        return config.model_dump(mode="json", include=set(cls.phase_fields(phase)))

    # ---- pipeline hooks -------------------------------------------------------------------
    #: True for a method whose ``pretrain`` is the project's shared backbone training (DS2): the
    #: `backbone` stage runs it once per dataset; its own `pretrain` stage then only freezes it.
    shared_backbone: ClassVar[bool] = False

    @classmethod
    def pretrain(cls, config: StrictModel, ctx: PretrainContext) -> dict:
        """Dataset-level preparation. Default: freeze the backbone the config asks for."""
        return cls.freeze_backbone(config, ctx)

    @classmethod
    def freeze_backbone(cls, config: StrictModel, ctx: PretrainContext) -> dict:
        """Save the configured backbone weights into the stage output, so later stages read a fixed file."""
        backbone = getattr(config, "backbone", None)
        weights = getattr(config, "weights", "random")
        if backbone is None:
            return {"pretrain": "none"}
        from defectlab.backbones import build_backbone, save_backbone

        model = build_backbone(backbone, weights, seed=ctx.seed, dataset=ctx.dataset)
        save_backbone(model, ctx.out_dir / "backbone.safetensors", backbone, {"weights": weights})
        return {"backbone": backbone, "weights": weights}

    #: True for a method that trains a network per category: it implements ``train``,
    #: ``trained_tensors`` and ``load_trained_tensors``, and the pipeline runs a `train` stage for it.
    trains_per_category: ClassVar[bool] = False

    def train(self, ctx: FitContext) -> dict:
        """Per-category training (network weights only; banks etc. belong in ``fit``). Returns stats."""
        raise NotImplementedError(f"{self.name} has no per-category training step")

    def trained_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors ``train`` produced (what the `train` stage saves)."""
        raise NotImplementedError(f"{self.name} has no per-category training step")

    def load_trained_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore ``trained_tensors`` output (``self.meta`` already holds the train stage's meta)."""
        raise NotImplementedError(f"{self.name} has no per-category training step")

    def save_trained(self, out_dir: str | Path) -> None:
        """Write ``trained.safetensors`` + ``trained.json`` into ``out_dir`` (the stage makes it atomic)."""
        from safetensors.torch import save_file

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.trained_tensors().items()}
        save_file(tensors, str(out_dir / "trained.safetensors"))
        (out_dir / "trained.json").write_text(json.dumps(
            {"method": self.name, "config": self.config.model_dump(mode="json"), "meta": self.meta},
            indent=2, sort_keys=True) + "\n")

    def load_trained(self, train_dir: str | Path | None) -> None:
        """Load the `train` stage's output into this instance (merging its meta into ``self.meta``)."""
        from safetensors.torch import load_file

        from defectlab.errors import ConfigError, ResourceMissingError

        info_path = Path(train_dir) / "trained.json" if train_dir else None
        if info_path is None or not info_path.exists():
            raise ResourceMissingError(f"{train_dir}: no trained {self.name} network here (trained.json missing); "
                                       f"run the train stage first (dvc repro train@{self.name}-<dataset>-<category>)")
        info = json.loads(info_path.read_text())
        if info.get("method") != self.name:
            raise ResourceMissingError(f"{info_path}: holds a {info.get('method')!r} network, not {self.name!r}")
        trained_cfg = self.Config.model_validate(info["config"])
        if not self.same_training_config(trained_cfg):
            raise ConfigError(f"{info_path}: trained with a different {self.name} config than params.yaml's; "
                              f"rerun the train stage (dvc repro)")
        self.meta.update(info.get("meta", {}))
        self.load_trained_tensors({k: v.to(self.device) for k, v in
                                   load_file(str(Path(train_dir) / "trained.safetensors")).items()})

    def same_training_config(self, trained: StrictModel) -> bool:
        """Whether a network trained with config ``trained`` is valid for ``self.config``: the
        fields ``train`` reads are equal (``TRAIN_IGNORES`` may differ)."""
        return self.phase_config(trained, "train") == self.phase_config(self.config, "train")

    @abstractmethod
    def fit(self, ctx: FitContext) -> dict:
        """Fit on the category's normal training images; return statistics worth logging."""

    @abstractmethod
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Score a batch (B, 3, H, W) of normalised images -> (scores (B,), maps (B, H, W))."""

    @torch.no_grad()
    def floor_forward(self, images: torch.Tensor) -> None:
        """The network forward pass a fitted model's ``fit`` cannot do without, on a batch of
        normalised images: the floor ``defectlab bench --method`` times ``fit`` against. Default:
        the backbone feature extractor the fit built (``self.extractor``); methods that embed crops
        override it; methods with no frozen embedding network (DSR, SLSG) have no such floor."""
        from defectlab.errors import ConfigError

        extractor = getattr(self, "extractor", None)
        if extractor is None:
            raise ConfigError(f"{self.name}: its fit runs no frozen embedding network, so there is no forward-pass "
                              f"floor to time it against")
        extractor(images.to(self.device))

    @abstractmethod
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors that make up the fitted model (for safetensors)."""

    @abstractmethod
    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore from ``state_tensors`` output (``self.meta`` is already loaded)."""

    # ---- generic plumbing -----------------------------------------------------------------
    def save(self, out_dir: str | Path) -> None:
        from safetensors.torch import save_file

        out_dir = Path(out_dir)
        with atomic_dir(out_dir) as tmp:
            tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_tensors().items()}
            save_file(tensors, str(tmp / "model.safetensors"))
            (tmp / "model.json").write_text(json.dumps(
                {"format": MODEL_FORMAT, "method": self.name, "config": self.config.model_dump(mode="json"),
                 "meta": self.meta, **{k: v for k, v in self.card.items() if k in CARD_KEYS}},
                indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, model_dir: str | Path, device: torch.device | str = "cpu") -> "AnomalyMethod":
        from safetensors.torch import load_file

        from defectlab.errors import ResourceMissingError

        model_dir = Path(model_dir)
        info_path = model_dir / "model.json"
        if not info_path.exists():
            raise ResourceMissingError(f"{model_dir}: no fitted model here (model.json missing); run the fit stage")
        info = json.loads(info_path.read_text())
        if info.get("method") != cls.name:
            raise ResourceMissingError(f"{info_path}: holds a {info.get('method')!r} model, not {cls.name!r}")
        # a setting added after the model was saved scores as the code that saved it did
        config = {**cls.SAVED_BEFORE_DEFAULTS, **info["config"]}
        method = cls(cls.Config.model_validate(config), device)
        method.meta = info.get("meta", {})
        method.card = {k: info[k] for k in CARD_KEYS if k in info}
        method.load_tensors({k: v.to(device) for k, v in load_file(str(model_dir / "model.safetensors")).items()})
        return method

    @torch.no_grad()
    def predict_loader(self, loader: DataLoader, progress: bool = False, desc: str = "score") -> dict[str, np.ndarray | list]:
        """Run ``predict`` over a loader of ImageDataset items; gather scores, maps, labels, masks."""
        from tqdm.auto import tqdm

        scores, maps, labels, masks, paths, kinds, dtypes = [], [], [], [], [], [], []
        for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
            s, m = self.predict(batch["image"].to(self.device))
            scores.append(s.float().cpu().numpy())
            maps.append(m.float().cpu().numpy())
            labels.append(np.asarray(batch["label"]))
            masks.append(batch["mask"][:, 0].numpy() > 0.5)
            paths += list(batch["path"])
            kinds += list(batch["kind"])
            dtypes += list(batch["defect_type"])
        return {
            "scores": np.concatenate(scores), "maps": np.concatenate(maps), "labels": np.concatenate(labels),
            "masks": np.concatenate(masks), "paths": paths, "kinds": kinds, "defect_types": dtypes,
        }


def make_loader(samples, size: int, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                num_workers: int = 0) -> DataLoader:
    """A deterministic DataLoader over ``defectlab.data.ImageDataset``."""
    from defectlab.data import ImageDataset

    gen = torch.Generator().manual_seed(seed)
    return DataLoader(ImageDataset(samples, size), batch_size=batch_size, shuffle=shuffle, generator=gen,
                      num_workers=num_workers)
