"""Data layer: MVTec-format reader, dataset registry, downloads, the embedded demo dataset.

* ``mvtec``: the reader (``scan_category``, ``load_image``, ``load_mask``, ``ImageDataset``,
  LOCO ``load_defects_config`` / ``load_defect_masks``) and its bad-input behaviour table.
* ``transform``: resize modes (squash | shorter_side_crop | pad), ``resize_mode`` and the map
  back to the original image (``map_to_original``).
* ``split``: the validation images held out of ``train/good`` (``hold_out_validation``).
* ``folder``: ``source: folder``, a user's MVTec-format tree validated then hard-linked / copied.
* ``registry``: the public datasets (URL, checksum, license) and ``prepare_dataset``.
* ``download``: resumable verified downloads and ``safe_extract``.
* ``convert``: per-dataset converters to MVTec layout.
* ``demo``: the generated offline dataset.

The reader's names are importable from here (``from defectlab.data import scan_category``); they
are loaded on first use, so ``import defectlab.data.transform`` (the pipeline module does) does
not import torch.
"""

import importlib

_EXPORTS = {
    "mvtec": ("CategoryData", "DefectConfig", "ImageDataset", "Sample", "list_categories", "load_defect_masks",
              "load_defects_config", "load_image", "load_mask", "probe_image", "require_categories",
              "scan_category", "verify_samples"),
    "transform": ("IMAGENET_MEAN", "IMAGENET_STD", "map_to_original", "resize_image", "resize_mask", "resize_mode"),
    "split": ("hold_out_validation", "extend_split"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name in _MODULE_OF:
        value = getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
