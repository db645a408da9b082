"""Scoring images with a fitted model: the one path behind `defectlab predict`, the `inspect`
flow, the MLflow pyfunc model (defectlab.serving) and the tests.

    import defectlab
    det = defectlab.load("models/patchcore/demo/weave")            # or "models:/patchcore-demo-weave@champion"
    out = det.predict(["a.png", "b.png"])                          # paths, PIL images, arrays or bytes
    out.scores, out.normalized, out.labels, out.maps               # maps at each image's original size

Everything comes from the model folder (``model.json`` + ``model.safetensors``), never from
params.yaml: the method, preprocessing (size, resize mode, mean / std), the image and pixel
thresholds and the score normalisation chosen on validation images (defectlab.calibration).
``predict_files`` streams: one batch of images is in memory at a time, and a file that cannot be
read is reported in its result (``error``) while the rest are scored.
"""

from __future__ import annotations

import io
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from defectlab.errors import DatasetError, ResourceMissingError

ANOMALOUS, NORMAL = "anomalous", "normal"


@dataclass
class Prediction:
    """One scored image. ``map`` is the raw anomaly map at the image's original size."""

    path: str | None
    score: float | None = None
    normalized_score: float | None = None
    label: str | None = None
    map: np.ndarray | None = None
    image: np.ndarray | None = None     # the decoded RGB uint8 image (for overlays), original size
    error: str | None = None

    def as_dict(self) -> dict:
        return {"path": self.path, "score": self.score, "normalized_score": self.normalized_score,
                "label": "error" if self.error else self.label, "error": self.error}


@dataclass
class Batch:
    scores: np.ndarray          # (N,) raw image scores
    normalized: np.ndarray | None   # (N,) in [0, 1], 0.5 = at threshold (None: model has no calibration)
    labels: list[str | None]    # anomalous | normal (None: model has no threshold)
    maps: list[np.ndarray]      # raw anomaly maps, each at its image's original size


def _decode(item) -> np.ndarray:
    """An image as RGB uint8 HxWx3: a path, encoded bytes, a PIL image or an array (uint8, or float in [0, 1])."""
    from defectlab.data import load_image
    from defectlab.data.mvtec import MAX_PIXELS, _to_rgb_uint8

    if isinstance(item, (str, Path)):
        return np.rint(load_image(item) * 255).astype(np.uint8)
    if isinstance(item, (bytes, bytearray)):
        try:
            with Image.open(io.BytesIO(item)) as im:
                if im.width * im.height > MAX_PIXELS:
                    raise DatasetError(Path("<bytes>"), f"image too large ({im.width}x{im.height})")
                im.load()
                return np.asarray(_to_rgb_uint8(im))
        except DatasetError:
            raise
        except Exception as err:
            raise DatasetError(Path("<bytes>"), f"not a readable image ({err})") from None
    if isinstance(item, Image.Image):
        return np.asarray(_to_rgb_uint8(item))
    arr = np.asarray(item)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise DatasetError(Path("<array>"), f"expected an HxWx3 RGB array, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        arr = np.rint(np.clip(arr.astype(np.float64), 0, 1) * 255).astype(np.uint8)
    return arr


class Detector:
    """A fitted model folder, ready to score images."""

    def __init__(self, model_dir: str | Path, device: str | torch.device = "auto"):
        from defectlab.backbones import resolve_device
        from defectlab.methods import get_method

        self.model_dir = Path(model_dir)
        info_path = self.model_dir / "model.json"
        if not info_path.exists():
            raise ResourceMissingError(f"{self.model_dir}: no fitted model here (model.json missing)")
        info = json.loads(info_path.read_text())
        self.device = resolve_device(str(device)) if not isinstance(device, torch.device) else device
        self.method = get_method(info["method"]).load(self.model_dir, self.device)
        card = self.method.card
        pre = card.get("preprocess") or {}
        if "image_size" not in pre:
            raise ResourceMissingError(f"{info_path}: no 'preprocess' block (a model fitted before model.json "
                                       f"format 2); refit it with `dvc repro` to deploy it")
        size = pre["image_size"]                            # an int (square) or [h, w]
        self.image_size: int | tuple[int, int] = int(size) if isinstance(size, (int, float)) else \
            (int(size[0]), int(size[1]))
        self.resize: str = pre.get("resize", "squash")
        self.mean = torch.tensor(pre.get("mean"), dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(pre.get("std"), dtype=torch.float32)[:, None, None]
        self.threshold: dict = card.get("threshold") or {}
        self.normalization: dict = card.get("normalization") or {}
        self.info = info

    @property
    def name(self) -> str:
        data = self.method.card.get("data") or {}
        return "-".join(x for x in (self.method.name, data.get("dataset"), data.get("category")) if x)

    # -- preprocessing ----------------------------------------------------------------------
    def to_tensor(self, rgb: np.ndarray) -> torch.Tensor:
        """RGB uint8 HxWx3 at any size -> the normalised (3, h, w) tensor the model was fitted on."""
        from defectlab.data.transform import resize_image

        im = resize_image(Image.fromarray(rgb), self.image_size, self.resize)
        x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (x - self.mean) / self.std

    def to_original(self, m: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        from defectlab.data.transform import map_to_original

        return map_to_original(m, shape[0], shape[1], self.resize)

    # -- decisions --------------------------------------------------------------------------
    def label(self, score: float) -> str | None:
        t = self.threshold.get("image")
        return None if t is None else (ANOMALOUS if score >= t else NORMAL)

    def normalize_score(self, scores):
        from defectlab.calibration import normalize

        block = self.normalization.get("image")
        return None if block is None else normalize(scores, block)

    def normalize_map(self, m: np.ndarray) -> np.ndarray:
        """Map in [0, 1] with the model's pixel threshold at 0.5: the same colours in every run."""
        from defectlab.calibration import normalize

        block = self.normalization.get("pixel")
        if block is None:
            raise ResourceMissingError(f"{self.model_dir}: model.json has no pixel normalisation (no validation "
                                       f"images at fit time)")
        return normalize(m, block).astype(np.float32)

    def defect_mask(self, m: np.ndarray) -> np.ndarray | None:
        """Binary defect mask: pixels at or above the model's pixel threshold."""
        p = self.threshold.get("pixel")
        return None if p is None else m >= p

    def overlay(self, rgb: np.ndarray, m: np.ndarray) -> np.ndarray:
        """[image | heatmap overlay] (uint8), coloured with the model's own normalisation."""
        from defectlab.report import overlay

        return overlay(rgb, self.normalize_map(m), self.defect_mask(m))

    # -- scoring ----------------------------------------------------------------------------
    @torch.no_grad()
    def _score(self, rgbs: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        x = torch.stack([self.to_tensor(r) for r in rgbs]).to(self.method.device)
        scores, maps = self.method.predict(x)
        scores = scores.float().cpu().numpy()
        maps = maps.float().cpu().numpy()
        return scores, [self.to_original(m, r.shape[:2]) for m, r in zip(maps, rgbs)]

    def predict(self, images: Sequence, batch_size: int = 8) -> Batch:
        """Score images (paths, encoded bytes, PIL images or RGB arrays). A bad image raises
        ``DatasetError`` naming it; use ``predict_files`` to report bad files and go on."""
        images = list(images)
        scores, maps = [], []
        for i in range(0, len(images), batch_size):
            s, m = self._score([_decode(x) for x in images[i:i + batch_size]])
            scores.append(s)
            maps += m
        scores = np.concatenate(scores) if scores else np.zeros(0, np.float32)
        norm = self.normalize_score(scores)
        return Batch(scores, None if norm is None else np.asarray(norm), [self.label(float(s)) for s in scores], maps)

    def predict_files(self, paths: Iterable[str | Path], batch_size: int = 8, keep_images: bool = False
                      ) -> Iterator[Prediction]:
        """Stream predictions over files in input order; unreadable files come back with ``error``
        set, in their place (a batch holds at most ``batch_size`` decoded images)."""
        pending: list[tuple[str, np.ndarray | None, str | None]] = []   # (path, image, error)

        def flush():
            images = [r for _, r, _ in pending if r is not None]
            scores, maps = self._score(images) if images else (np.zeros(0), [])
            norm = self.normalize_score(scores)
            j = 0
            for p, rgb, err in pending:
                if err is not None:
                    yield Prediction(p, error=err)
                    continue
                s = float(scores[j])
                yield Prediction(p, s, None if norm is None else float(norm[j]), self.label(s), maps[j],
                                 rgb if keep_images else None)
                j += 1
            pending.clear()

        n_images = 0
        for p in paths:
            try:
                pending.append((str(p), _decode(p), None))
                n_images += 1
            except DatasetError as err:
                pending.append((str(p), None, err.problem))
            except OSError as err:
                pending.append((str(p), None, str(err)))
            if n_images >= batch_size or len(pending) >= 4 * batch_size:
                yield from flush()
                n_images = 0
        if pending:
            yield from flush()


# ---------------------------------------------------------------------------------------------
# loading: a folder or a registry / run URI
# ---------------------------------------------------------------------------------------------
def find_model_dir(folder: Path) -> Path:
    """The folder holding model.json: ``folder`` itself, or the model folder inside an MLflow
    pyfunc model (``artifacts/<name>/``)."""
    folder = Path(folder)
    if (folder / "model.json").exists():
        return folder
    for cand in sorted(folder.glob("artifacts/*/model.json")) + sorted(folder.glob("*/model.json")):
        return cand.parent
    raise ResourceMissingError(f"{folder}: no model.json here or in its MLflow model artifacts")


def resolve(model: str | Path, cache_dir: str | Path | None = None) -> Path:
    """A local model folder for ``model``: a path, or an MLflow URI (``models:/name@alias``,
    ``models:/name/3``, ``runs:/<id>/model``) downloaded into ``cache_dir`` (default: a temp dir)."""
    text = str(model)
    if "://" not in text and not text.startswith(("models:/", "runs:/")):
        path = Path(text)
        if not path.exists():
            raise ResourceMissingError(f"{path}: no such model folder (or use a models:/<name>@<alias> URI)")
        return find_model_dir(path)
    import mlflow

    from defectlab import tracking

    tracking.setup({})
    dst = Path(cache_dir) if cache_dir else Path(tempfile.mkdtemp(prefix="defectlab-model-"))
    dst.mkdir(parents=True, exist_ok=True)
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=text, dst_path=str(dst))
    except Exception as err:  # MlflowException, RestException: one clear line
        raise ResourceMissingError(f"{text}: cannot download from the MLflow store {mlflow.get_tracking_uri()} "
                                   f"({str(err).splitlines()[0]})") from None
    return find_model_dir(Path(local))


def load(model: str | Path, device: str = "auto", cache_dir: str | Path | None = None) -> Detector:
    """A ``Detector`` for a model folder or an MLflow model URI (see ``resolve``)."""
    return Detector(resolve(model, cache_dir), device)


# ---------------------------------------------------------------------------------------------
# folders in, files out (`defectlab predict`, the inspect flow)
# ---------------------------------------------------------------------------------------------
def expand_inputs(inputs: Iterable[str | Path]) -> Iterator[Path]:
    """Files named by ``inputs``: files as given, every non-hidden file of a folder (sorted; other
    files than images are reported by the scorer, not skipped silently), glob patterns expanded.
    Lazy per input, so a folder of 100 000 images costs one sorted list of names, not of images."""
    import glob
    import os

    for item in inputs:
        text = str(item)
        path = Path(text)
        if path.is_dir():
            names = sorted(e.name for e in os.scandir(path) if e.is_file() and not e.name.startswith("."))
            yield from (path / n for n in names)
        elif any(c in text for c in "*?[") and not path.exists():
            yield from (Path(p) for p in sorted(glob.glob(text, recursive=True)) if Path(p).is_file())
        else:
            yield path            # a missing file is reported by the scorer


class OutputWriter:
    """Writes ``predictions.csv`` (one row per image, flushed as it goes), and per scored image
    ``heatmaps/<name>.png`` ([image | overlay] in the model's colours) and ``masks/<name>_mask.png``
    (binary defect mask at the original size), each file written atomically."""

    FIELDS = ["path", "score", "normalized_score", "label", "threshold", "error", "heatmap", "mask"]

    def __init__(self, out_dir: str | Path, detector: Detector, heatmaps: bool = True, masks: bool = True):
        import csv

        self.out, self.det = Path(out_dir), detector
        self.heatmaps, self.masks = heatmaps, masks
        for sub, on in (("heatmaps", heatmaps), ("masks", masks)):
            if on:
                (self.out / sub).mkdir(parents=True, exist_ok=True)
        self._names: set[str] = set()
        self._csv_file = open(self.out / "predictions.csv", "w", newline="")
        self._csv = csv.DictWriter(self._csv_file, fieldnames=self.FIELDS)
        self._csv.writeheader()
        self.counts = {ANOMALOUS: 0, NORMAL: 0, "unlabelled": 0, "error": 0}

    def _name(self, path: str) -> str:
        stem = Path(path).stem or "image"
        name, i = stem, 1
        while name in self._names:
            name, i = f"{stem}_{i}", i + 1
        self._names.add(name)
        return name

    @staticmethod
    def _save_png(arr: np.ndarray, path: Path) -> None:
        """Write atomically (temp name + rename). Not io.atomic_path: its stale-temp sweep lists the
        folder on every write, quadratic over a folder of 100 000 outputs."""
        import os

        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            Image.fromarray(arr).save(tmp, format="PNG")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def write(self, pred: Prediction) -> dict:
        row = {**pred.as_dict(), "threshold": self.det.threshold.get("image"), "heatmap": "", "mask": ""}
        if pred.error is None:
            name = self._name(pred.path or "image")
            if self.heatmaps and pred.image is not None and self.det.normalization.get("pixel"):
                self._save_png(self.det.overlay(pred.image, pred.map), self.out / "heatmaps" / f"{name}.png")
                row["heatmap"] = f"heatmaps/{name}.png"
            mask = self.det.defect_mask(pred.map) if self.masks else None
            if mask is not None:
                self._save_png(mask.astype(np.uint8) * 255, self.out / "masks" / f"{name}_mask.png")
                row["mask"] = f"masks/{name}_mask.png"
        key = "error" if pred.error else (pred.label or "unlabelled")
        self.counts[key] += 1
        self._csv.writerow(row)
        self._csv_file.flush()
        return row

    def close(self) -> None:
        self._csv_file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
