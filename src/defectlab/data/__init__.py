"""Data layer: MVTec-format reader, dataset registry, downloads, the embedded demo dataset.

* ``mvtec``: the reader (``scan_category``, ``load_image``, ``load_mask``, ``ImageDataset``,
  LOCO ``load_defects_config`` / ``load_defect_masks``) and its bad-input behaviour table.
* ``registry``: the public datasets (URL, checksum, license) and ``prepare_dataset``.
* ``download``: resumable verified downloads and ``safe_extract``.
* ``convert``: per-dataset converters to MVTec layout.
* ``demo``: the generated offline dataset.
"""

from defectlab.data.mvtec import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CategoryData,
    DefectConfig,
    ImageDataset,
    Sample,
    list_categories,
    load_defect_masks,
    load_defects_config,
    load_image,
    load_mask,
    probe_image,
    scan_category,
    verify_samples,
)

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "CategoryData", "DefectConfig", "ImageDataset", "Sample",
           "list_categories", "load_defect_masks", "load_defects_config", "load_image", "load_mask",
           "probe_image", "scan_category", "verify_samples"]
