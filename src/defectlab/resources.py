"""The external resources a run needs, and what happens when one is missing.

Every resource the configured run reads from outside the project (ImageNet weights in the torch
hub cache, a MoCo v3 checkpoint, an ImageNet-like folder for DSR's stage 1, the DTD textures, the
raw dataset trees) is listed by ``needed(params, configs)`` with what it is, why it is needed
(method, stage, paper section), where it goes (file or params key) and how to get it. Checks are
file-existence only (no torch).

The rule (``check``): a substitute is either an error or recorded in the results.

* A resource the run cannot do without (a configured path that does not exist, a registry dataset
  that is not there, the paper profile's ImageNet weights) is an error in every profile.
* A resource with a documented substitute (``general_images: null`` -> the dataset's own images
  + procedural textures, ``dtd_dir: null`` -> procedural textures, weights other than the
  paper's initialisation) is an error in the ``paper`` profile unless ``allow_substitutes: true``;
  otherwise the substitution is recorded: in each category's metrics JSON (``substitutions``),
  the results table and the MLflow tag ``substituted`` of the stage runs.

All errors of one check come as ONE ``ResourceMissingError`` listing every missing resource: the
first stage DVC runs stops at once (``stagekit.run_stage``).

Fallbacks decided while running (SLSG without a GPT-Net encoder, the foreground heuristic finding
no object) go through ``substitute``: an error under ``strict()`` (the paper profile without
``allow_substitutes``), else a warning and a record the caller stores with its outputs.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Mapping

from defectlab.config import Params
from defectlab.errors import ResourceMissingError

log = logging.getLogger(__name__)

#: the file torchvision's ``<Arch>_Weights.DEFAULT`` downloads into ``<torch hub dir>/checkpoints``
#: (tests/test_resources.py checks these against torchvision)
IMAGENET_FILES = {
    "resnet18": "resnet18-f37072fd.pth",
    "resnet50": "resnet50-11ad3fa6.pth",
    "wide_resnet50_2": "wide_resnet50_2-9ba9bcbe.pth",
    "vgg16": "vgg16-397923af.pth",
}
IMAGENET_URL = "https://download.pytorch.org/models/{}"
#: the official MoCo v3 release (facebookresearch/moco-v3, CONFIG.md): ResNet-50, 1000 epochs
MOCO_V3_URL = "https://dl.fbaipublicfiles.com/moco-v3/r-50-1000ep/r-50-1000ep.pth.tar"
IMAGENET_HOME = "https://image-net.org/download.php"

#: the initialisation each method's paper starts from: (weights, the paper's words)
PAPER_INIT = {
    "patchcore": ("imagenet", "PatchCore (Roth et al., CVPR 2022) uses an ImageNet-pretrained backbone"),
    "padim": ("imagenet", "PaDiM (Defard et al., ICPR 2021) uses an ImageNet-pretrained backbone"),
    "msp_svdd": ("imagenet", "MSP-SVDD (Tsai et al., WACV 2022), Sec. 3.1: VGG16 encoders pretrained on ImageNet"),
    "apc": ("moco_v3", "APC (Koshil et al., 2024), Sec. 4.3.1: ResNet-50 with MoCo v3 initialisation"),
}
#: methods whose backbone architecture is fixed (not a ``backbone`` field)
FIXED_ARCH = {"msp_svdd": "vgg16"}
#: methods that read the synthesis cache (data/synth) of the `synthesize` stage
READS_SYNTHESIS = ("slsg",)


#: the defaults of the method config fields read here, for a params section that leaves them out
#: (the stages pass the raw ``methods.<m>`` sections: no method module, no torch import; tests check
#: these against the methods' Config classes)
FIELD_DEFAULTS = {"weights": "random", "backbone": "resnet18", "general_images": None}
METHOD_FIELD_DEFAULTS = {"ds2": {"weights": "ds2"}}


def config_default(method: str, name: str):
    return METHOD_FIELD_DEFAULTS.get(method, {}).get(name, FIELD_DEFAULTS[name])


def _field(cfg: Any, method: str, name: str):
    """``name`` of a method config: a validated Config (attribute) or its raw params section (key)."""
    if isinstance(cfg, Mapping):
        return cfg.get(name, config_default(method, name))
    return getattr(cfg, name, config_default(method, name))


def torch_hub_dir() -> Path:
    """``torch.hub.get_dir()`` without importing torch: $TORCH_HOME/hub, else
    $XDG_CACHE_HOME/torch/hub, else ~/.cache/torch/hub."""
    home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "torch")
    return Path(os.path.expanduser(home)) / "hub"


def imagenet_weights_path(arch: str) -> Path:
    return torch_hub_dir() / "checkpoints" / IMAGENET_FILES[arch]


@dataclass(frozen=True)
class Resource:
    """One external resource. ``substitute``: what runs without it (None: nothing can)."""

    key: str                 # short id, also the MLflow tag entry: dsr.general_images, synthesis.dtd_dir, ...
    what: str
    why: str                 # method / stage / paper section
    where: str               # the file or params key
    how: str                 # how to get it
    present: bool
    substitute: str | None = None
    methods: tuple[str, ...] = ()   # the methods whose results depend on it (empty: the whole run)
    stages: tuple[str, ...] = ()    # stages that read it besides the methods' own

    def describe(self) -> str:
        return f"{self.key}: {self.what} — needed by {self.why}; {self.where}; get it: {self.how}"

    def record(self) -> str:
        return f"{self.key}: {self.substitute}"


@dataclass
class Check:
    """What ``check`` found: ``missing`` (errors) and ``substituted`` (records)."""

    missing: list[Resource] = field(default_factory=list)
    substituted: list[Resource] = field(default_factory=list)

    def records(self, method: str | None = None, stage: str | None = None) -> list[str]:
        """The substitution records that concern ``method`` (and/or ``stage``); all when both None."""
        return [r.record() for r in self.substituted
                if (method is None and stage is None) or not (r.methods or r.stages)
                or method in r.methods or stage in r.stages]


def _has_images(folder: Path) -> bool:
    from defectlab.synthesis.textures import IMAGE_SUFFIXES

    return folder.is_dir() and any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.rglob("*"))


def _weights_resources(method: str, cfg: Any, profile: str) -> list[Resource]:
    weights = str(_field(cfg, method, "weights"))
    arch = FIXED_ARCH.get(method) or _field(cfg, method, "backbone")
    key = f"{method}.weights"
    out = []
    paper_init, paper_words = PAPER_INIT.get(method, (None, ""))
    if weights == "imagenet" and arch in IMAGENET_FILES and profile == "paper":
        path = imagenet_weights_path(arch)
        out.append(Resource(
            f"imagenet.{arch}", f"ImageNet weights of {arch} ({path.name})",
            f"{method} (weights: imagenet)", f"put the file at {path} (torch hub cache; TORCH_HOME moves it)",
            f"{IMAGENET_URL.format(path.name)} (torchvision downloads it there on first use when online)",
            path.is_file(), None, (method,)))
    elif weights not in ("random", "imagenet", "ds2") and not weights.startswith("ds2:"):
        path = Path(weights)
        out.append(Resource(key, f"{method} initial weights file {path}", f"{method} (methods.{method}.weights)",
                            f"methods.{method}.{profile}.weights points at it", "the file named by the key",
                            path.is_file(), None, (method,)))
    if paper_init is None:
        return out
    matches = (weights == "imagenet") if paper_init == "imagenet" else (
        weights not in ("random", "imagenet", "ds2") and not weights.startswith("ds2:"))
    if not matches:
        if paper_init == "moco_v3":
            what = "MoCo v3 ResNet-50 weights"
            how = (f"{MOCO_V3_URL} (official MoCo v3 release; the file is read as released, its base "
                   "encoder taken without the projection head)")
            where = f"set methods.apc.{profile}.weights: /path/to/r-50-1000ep.pth.tar"
        else:
            what = "ImageNet initialisation"
            how = "the torchvision ImageNet weights (see imagenet.<arch>)"
            where = f"set methods.{method}.{profile}.weights: imagenet"
        out.append(Resource(key, what, paper_words, where, how, False, f"{weights} weights instead of {paper_init}",
                            (method,)))
    return out


def needed(params: Params, configs: Mapping[str, Any], methods=None, datasets=None) -> list[Resource]:
    """Every external resource of the run ``params`` describes (``run.datasets`` x ``run.methods``, or
    the ``methods`` / ``datasets`` given); ``configs``: each of those methods -> its validated config
    (``pipeline.load_method_config``) or its raw ``methods.<m>`` section (``params.profiled``)."""
    from defectlab.config import SynthesisParams
    from defectlab.synthesis.textures import DTD_URL

    methods = list(params.run.methods if methods is None else methods)
    out: list[Resource] = []
    root = Path(params.path).parent if params.path else Path(".")
    for name in (params.run.datasets if datasets is None else datasets):
        spec = params.dataset(name)
        if spec.source == "demo":
            continue
        prepared = (root / "data" / "prepared" / name / "manifest.csv").is_file()
        if spec.source == "folder":
            folder = root / spec.root
            out.append(Resource(f"dataset.{name}", f"dataset folder {folder}", f"datasets.{name} (source: folder)",
                                f"datasets.{name}.root", "an MVTec-format tree (<category>/train/good, test/<kind>, "
                                "ground_truth/<kind>)", folder.is_dir() or prepared))
            continue
        raw = root / (spec.root or f"data/raw/{spec.source}")
        present = spec.download or prepared or (raw.is_dir() and any(raw.iterdir()))
        try:
            from defectlab.data.registry import get_spec

            reg = get_spec(spec.source)
            how = "; ".join(f"{a.url} ({a.filename}; license: {reg.license})" for a in reg.archives) + \
                f", or `defectlab download {spec.source} --raw-dir {raw}`, or datasets.{name}.download: true"
        except Exception:  # noqa: BLE001 - an unknown source is the prepare stage's error
            how = f"see defectlab.data.registry for {spec.source!r}"
        out.append(Resource(f"dataset.{name}", f"dataset {spec.source} (archive or unpacked tree)",
                            f"datasets.{name} (the prepare stage)", f"put it under {raw} (datasets.{name}.root)",
                            how, present))
    for method in methods:
        cfg = configs[method]
        out += _weights_resources(method, cfg, params.profile)
        if method == "dsr":
            gi = _field(cfg, method, "general_images")
            why = "DSR stage 1 (Zavrtanik et al., ECCV 2022, Sec. 3.7 / 4.1: the general appearance decoder trains on ImageNet)"
            where = f"set methods.dsr.{params.profile}.general_images: /path/to/imagenet/train"
            if gi is None:
                out.append(Resource("dsr.general_images", "ImageNet train images (any ImageNet-like image folder)", why,
                                    where, IMAGENET_HOME, False,
                                    "the dataset's own normal train images + procedural textures (not ImageNet)",
                                    ("dsr",)))
            else:
                out.append(Resource("dsr.general_images", f"image folder {gi}", why, where, IMAGENET_HOME,
                                    _has_images(Path(gi)), None, ("dsr",)))
    synth_users = tuple(m for m in methods if m in READS_SYNTHESIS)
    if synth_users:
        sp = params.section("synthesis", "cache", SynthesisParams)
        why = ("anomaly simulation of " + ", ".join(synth_users) +
               " (DRAEM-style textures from the Describable Textures Dataset; SLSG, Yang et al. 2024, Sec. 3.2)")
        where = f"set synthesis.cache.{params.profile}.dtd_dir: /path/to/dtd/images"
        how = f"{DTD_URL} (extract; point dtd_dir at dtd/images)"
        if sp.dtd_dir is None:
            out.append(Resource("synthesis.dtd_dir", "DTD texture images", why, where, how, False,
                                "procedural textures instead of DTD", synth_users, ("synthesize",)))
        else:
            out.append(Resource("synthesis.dtd_dir", f"DTD texture folder {sp.dtd_dir}", why, where, how,
                                _has_images(Path(sp.dtd_dir)), None, synth_users, ("synthesize",)))
    return _merge_same(out)


def _merge_same(resources: list[Resource]) -> list[Resource]:
    """One entry per key (e.g. one WRN-50 file for PatchCore and PaDiM), naming every method."""
    by_key: dict[str, Resource] = {}
    for r in resources:
        if r.key in by_key:
            old = by_key[r.key]
            r = replace(old, why=f"{old.why}; {r.why}", methods=old.methods + r.methods)
        by_key[r.key] = r
    return list(by_key.values())


def is_strict(params: Params) -> bool:
    """The paper profile without ``allow_substitutes``: every missing resource is an error."""
    return params.profile == "paper" and not params.allow_substitutes


def check(params: Params, configs: Mapping[str, Any], methods=None, datasets=None) -> Check:
    """Sort ``needed`` into errors and recorded substitutions (module docstring); raise ONE
    ResourceMissingError listing every error."""
    result = Check()
    strict_paper = is_strict(params)
    for r in needed(params, configs, methods, datasets):
        if r.present:
            continue
        if r.substitute is None or strict_paper:
            result.missing.append(r)
        else:
            result.substituted.append(r)
    if result.missing:
        lines = [f"  - {r.describe()}" for r in result.missing]
        tail = ""
        if strict_paper and any(r.substitute for r in result.missing):
            tail = ("\nthe paper profile does not substitute; with allow_substitutes: true in params.yaml the ones "
                    "with a substitute run with it, recorded in metrics/*.json, reports/results.md and the MLflow tag "
                    "'substituted'")
        raise ResourceMissingError(f"{len(result.missing)} external resource(s) missing for profile "
                                   f"{params.profile!r}:\n" + "\n".join(lines) + tail)
    return result


# ---------------------------------------------------------------------------------------------
# fallbacks decided while running
# ---------------------------------------------------------------------------------------------
_STRICT: contextvars.ContextVar[bool] = contextvars.ContextVar("defectlab_resources_strict", default=False)


@contextlib.contextmanager
def strict(on: bool = True) -> Iterator[None]:
    """Inside the block ``substitute`` raises instead of recording (the paper profile without
    ``allow_substitutes``; ``stagekit.run_stage`` sets it)."""
    token = _STRICT.set(on)
    try:
        yield
    finally:
        _STRICT.reset(token)


def substitute(key: str, instead: str, provide: str) -> str:
    """A fallback about to happen: ``key`` (what is missing), ``instead`` (what runs instead),
    ``provide`` (what to provide, and where, to avoid it). Raises ResourceMissingError under
    ``strict()``; else logs a warning and returns the record (``"<key>: <instead>"``) for the
    caller to store with its outputs (e.g. ``meta["substitutions"]``)."""
    if _STRICT.get():
        raise ResourceMissingError(f"{key}: missing: {provide} (the paper profile does not substitute {instead}; "
                                   f"allow_substitutes: true runs with it, recorded)")
    return record(key, instead, provide)


def record(key: str, instead: str, provide: str) -> str:
    """A substitution that is never an error here (the pre-flight ``check`` decides, or it depends on
    the data, like the foreground heuristic): a warning, and the record to store with the outputs."""
    log.warning("substituted %s: %s (provide %s)", key, instead, provide)
    return f"{key}: {instead}"


def synthesis_records(synth_dir: str | Path | None) -> list[str]:
    """The substitutions a synthesis cache recorded in its params.json (per category: the foreground
    heuristic falling back to the whole image)."""
    if synth_dir is None:
        return []
    path = Path(synth_dir) / "params.json"
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    return list(info.get("substitutions", []))


def merge(*records) -> list[str]:
    """Records of several sources, each once, in first-seen order."""
    out: list[str] = []
    for rs in records:
        for r in rs or []:
            if r not in out:
                out.append(r)
    return out


def tag_value(records) -> str:
    """The MLflow tag ``substituted``: the records' keys, comma-separated."""
    return ",".join(merge([r.split(":", 1)[0].strip() for r in records]))
