"""Data layer: MVTec-format reader, dataset registry, downloads, the embedded demo dataset."""

from defectlab.data.mvtec import CategoryData, ImageDataset, Sample, list_categories, load_image, load_mask, scan_category

__all__ = ["CategoryData", "ImageDataset", "Sample", "list_categories", "load_image", "load_mask", "scan_category"]
