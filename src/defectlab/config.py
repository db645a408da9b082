"""params.yaml loading and validation.

params.yaml holds every knob. Sections that differ between profiles have the shape::

    methods:
      patchcore:
        common: {...}        # shared by every profile
        smoke: {...}         # overrides for the smoke profile
        default: {...}
        paper: {...}         # the paper's settings

and the top-level key ``profile`` selects which override is merged over ``common``.
Each method validates its merged section with its own pydantic model, so a malformed value
fails with an error naming the key (``methods.patchcore.coreset_ratio: ...``).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import (model_validator, BaseModel, ConfigDict, Field, StrictBool, ValidationError, ValidationInfo,
                      field_validator)

from defectlab.errors import ConfigError
from defectlab.io import load_yaml

PROFILES = ("smoke", "default", "paper")
M = TypeVar("M", bound=BaseModel)


class StrictModel(BaseModel):
    """Base for every params model: unknown keys are errors (typos must not pass silently)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


ImageSize = int | tuple[int, int]
RESIZE = Literal["squash", "shorter_side_crop", "resize_crop", "pad"]
RESIZE_HELP = ("squash: plain resize; shorter_side_crop: scaled to cover image_size, centre crop; resize_crop: "
               "PatchCore/PaDiM's Resize(256) + CenterCrop(224) (shorter side to image_size x 256/224, centre crop); "
               "pad: scaled to fit, padded with the ImageNet mean colour")


def _check_image_size(size):
    """An int (square) or [h, w]; each side 16..2048."""
    sides = (size,) if isinstance(size, int) else size
    if any(not 16 <= v <= 2048 for v in sides):
        raise ValueError(f"each side must be between 16 and 2048 (got {size})")
    if not isinstance(size, int) and size[0] == size[1]:
        return size[0]                    # [n, n] is the square n
    return size


class Preprocess(StrictModel):
    """One method's input size and resizing on one dataset (``datasets.<ds>.preprocess``)."""

    image_size: ImageSize
    resize: RESIZE = "squash"

    _sides = field_validator("image_size")(classmethod(lambda cls, v: _check_image_size(v)))


class DatasetParams(StrictModel):
    """``datasets.<name>`` in params.yaml: where a dataset comes from and how its images are read.

    ``source``: ``demo`` (generated), ``folder`` (any MVTec-format tree at ``root``, linked into
    data/prepared/<name>, see defectlab.data.folder) or a registry name such as ``mvtec_ad``
    (downloaded / converted, see defectlab.data.registry). ``resize``: how a non-square image
    becomes ``image_size`` x ``image_size`` (defectlab.data.transform). ``validation_fraction`` /
    ``min_validation``: the normal images held out of ``train/good`` when a category has no
    ``validation/good`` (defectlab.data.split). ``masks: optional`` accepts defective test images
    without a ground-truth mask (their category's pixel metrics are then null).
    """

    source: str = Field(description="'demo' (generated), 'folder' (an MVTec-format tree at root) or a "
                                    "registry name such as 'mvtec_ad'")
    root: str | None = Field(None, validate_default=True,
                             description="folder with the raw/extracted dataset (registry sources) or the "
                                         "MVTec-format tree itself (source: folder)")
    categories: list[str]
    texture_categories: list[str] = Field(default_factory=list, description="no foreground: whole image is texture")
    image_size: ImageSize = Field(128, description="model input: an int (square) or [h, w]")
    resize: RESIZE = Field("squash", description=RESIZE_HELP)
    preprocess: dict[str, dict[str, Preprocess]] = Field(
        default_factory=dict, description="per profile, per method: {image_size, resize} overriding the two "
                                          "above (the papers' own preprocessing in the paper profile)")
    validation_fraction: float = Field(0.15, ge=0, lt=1, description="share of train/good held out for "
                                                                     "validation when validation/good is absent")
    min_validation: int = Field(4, ge=0, description="at least this many held out (fraction > 0)")
    masks: Literal["required", "optional"] = Field(
        "required", description="optional: a defective test image may have no mask (pixel metrics null)")
    generator: dict[str, Any] = Field(default_factory=dict)
    download: bool = False
    insecure_skip_checksum: bool = Field(False, description="accept an archive that has no published checksum")

    _sides = field_validator("image_size")(classmethod(lambda cls, v: _check_image_size(v)))

    @field_validator("preprocess")
    @classmethod
    def _known_profiles(cls, value):
        unknown = sorted(set(value) - set(PROFILES))
        if unknown:
            raise ValueError(f"keys are profiles ({', '.join(PROFILES)}); got {unknown}")
        return value

    def for_method(self, method: str, profile: str) -> Preprocess:
        """The input size and resize mode ``method`` uses on this dataset under ``profile``."""
        return (self.preprocess.get(profile) or {}).get(method) or Preprocess(image_size=self.image_size,
                                                                             resize=self.resize)

    @field_validator("root")
    @classmethod
    def _folder_needs_root(cls, root, info: ValidationInfo):
        if info.data.get("source") == "folder" and not root:
            raise ValueError("required for source 'folder': the MVTec-format folder to prepare "
                             "(<root>/<category>/train/good, test/<kind>, ground_truth/<kind>)")
        return root


class SynthesisParams(StrictModel):
    n: int = Field(64, ge=1)
    image_size: int = Field(128, ge=16, le=2048)
    kinds: dict[str, float] = Field(default_factory=lambda: {"structural": 0.5, "logical": 0.5})
    dtd_dir: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)


class EvalParams(StrictModel):
    batch_size: int = Field(8, ge=1)
    max_fpr_pro: float = Field(0.3, gt=0, le=1)
    max_fpr_spro: float = Field(0.05, gt=0, le=1)
    n_overlays: int = Field(8, ge=0)


class CalibrationParams(StrictModel):
    """``calibration`` in params.yaml: how `fit` picks the model's threshold on validation images
    (defectlab.calibration)."""

    rule: Literal["auto", "f1_max", "fpr"] = "auto"
    target_fpr: float = Field(0.01, ge=0, lt=1, description="share of normal validation images flagged (rule fpr)")
    pixel_target_fpr: float = Field(0.001, gt=0, lt=1, description="share of normal validation pixels flagged")


class RunParams(StrictModel):
    datasets: list[str]
    categories: list[str]
    methods: list[str]
    #: the methods of ``methods`` that train a network per category (``trains_per_category``): the
    #: `train` stage's matrix. DVC cannot compute it, so it is listed; `fit` says when one is missing.
    train_methods: list[str] = []

    @model_validator(mode="after")
    def _train_subset(self):
        extra = [m for m in self.train_methods if m not in self.methods]
        if extra:
            raise ValueError(f"train_methods {extra} are not in methods {self.methods}")
        return self


class TopLevelParams(StrictModel):
    allow_substitutes: StrictBool = Field(False, description="paper profile: run with the documented substitute of "
                                                              "a missing external resource (recorded) instead of "
                                                              "stopping")


def deep_merge(base: dict, override: dict) -> dict:
    """Recursively merge ``override`` into a copy of ``base`` (dicts merge, everything else replaces)."""
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _format_validation(prefix: str, err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in (prefix, *e["loc"]) if x != "")
        parts.append(f"{loc}: {e['msg']} (got {e.get('input')!r})")
    return "; ".join(parts)


def validate(model: type[M], data: dict, where: str) -> M:
    """Validate ``data`` with ``model``; raise ConfigError naming the key path on failure."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"invalid params: {_format_validation(where, err)}") from None


class Params:
    """The parsed params.yaml with profile resolution."""

    def __init__(self, raw: dict, path: Path | None = None):
        self.raw = raw
        self.path = path
        where = str(path or "params")
        profile = raw.get("profile", "smoke")
        if profile not in PROFILES:
            raise ConfigError(f"{where}: profile: must be one of {', '.join(PROFILES)} (got {profile!r})")
        self.profile: str = profile
        seed = raw.get("seed", 0)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ConfigError(f"{where}: seed: must be an integer (got {seed!r})")
        self.seed: int = seed
        seeds = raw.get("seeds")
        if seeds is None:
            seeds = [seed]
        if not isinstance(seeds, list) or not seeds or \
                any(not isinstance(s, int) or isinstance(s, bool) for s in seeds) or len(set(seeds)) != len(seeds):
            raise ConfigError(f"{where}: seeds: must be a list of distinct integers, e.g. [0, 1, 2] (got {seeds!r})")
        if seed not in seeds:
            raise ConfigError(f"{where}: seeds: must contain seed ({seed}), the run that is deployed; got {seeds}")
        #: the seeds the results table reports mean ± std over: ``seed`` (the pipeline's models) and
        #: the extra ones, which the `seeds` stage runs from scratch (pipeline.extra_seeds)
        self.seeds: list[int] = list(seeds)
        device = raw.get("device", "auto")
        if not (device in ("auto", "cpu", "cuda") or str(device).startswith("cuda:")):
            raise ConfigError(f"{where}: device: must be auto, cpu, cuda or cuda:N (got {device!r})")
        self.device: str = device
        #: the paper profile refuses every substitute (a missing external resource is an error) unless
        #: this is true; then each substitution is recorded in the results (defectlab.resources)
        self.allow_substitutes: bool = validate(TopLevelParams, {"allow_substitutes": raw.get("allow_substitutes", False)},
                                                "").allow_substitutes
        self.run = validate(RunParams, raw.get("run", {}), "run")
        self.tracking: dict = raw.get("tracking", {}) or {}
        self.calibration = validate(CalibrationParams, raw.get("calibration", {}) or {}, "calibration")

    @classmethod
    def load(cls, path: str | Path = "params.yaml", profile: str | None = None) -> "Params":
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"{path}: params file not found")
        try:
            raw = load_yaml(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
        if profile is not None:
            raw["profile"] = profile
        return cls(raw, path)

    def profiled(self, section: str, name: str) -> dict:
        """Merge ``<section>.<name>.common`` with ``<section>.<name>.<profile>``."""
        block = (self.raw.get(section) or {}).get(name)
        if block is None:
            valid = ", ".join(sorted(self.raw.get(section) or {})) or "none"
            raise ConfigError(f"params: {section}.{name}: not defined (defined: {valid})")
        return deep_merge(block.get("common", {}) or {}, block.get(self.profile, {}) or {})

    def dataset(self, name: str) -> DatasetParams:
        datasets = self.raw.get("datasets") or {}
        if name not in datasets:
            raise ConfigError(f"unknown dataset {name!r}; defined in params: {', '.join(sorted(datasets))}")
        return validate(DatasetParams, datasets[name], f"datasets.{name}")

    def method(self, name: str, model: type[M]) -> M:
        return validate(model, self.profiled("methods", name), f"methods.{name}")

    def section(self, section: str, name: str, model: type[M]) -> M:
        return validate(model, self.profiled(section, name), f"{section}.{name}")


Device = Literal["auto", "cpu", "cuda"]
