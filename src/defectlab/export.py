"""ONNX export of fitted models, and a check of the exported graph against torch.

``export_onnx(model_dir, out)`` reads a fitted model folder (``model.json`` + ``model.safetensors``,
as ``AnomalyMethod.save`` writes it) and writes one self-contained ``.onnx`` file that scores raw
images the way ``method.predict`` does. ``verify_onnx(model_dir, onnx_path, images)`` runs the
file with onnxruntime and the model with torch on the same images and reports how far they differ.

The graph
---------
* input ``image``: float32 (B, 3, H, W), RGB in [0, 1], **not** normalised, at the model's image
  size (``model.json["preprocess"]["image_size"]``, else the ``image_size`` the caller passes,
  else the size the model was fitted at, ``meta["image_size"]``). B is dynamic unless
  ``dynamic_batch=False`` (then B = 1). Resizing to S x S is the caller's, with the geometry
  ``preprocess.resize`` names (``defectlab.data.transform.resize_image``; it is in the metadata).
* the graph normalises itself: (image - mean) / std with ImageNet's mean/std
  (``defectlab.data.IMAGENET_MEAN/STD``), or ``model.json["preprocess"]["mean"/"std"]``;
* outputs ``score`` (B,) and ``map`` (B, H, W): the raw (uncalibrated) image scores and anomaly
  maps ``method.predict(normalised images)`` returns. Thresholds / score normalisation are not
  applied; they travel as metadata (below) for the runtime to apply.

Per method (everything fitted is a constant of the graph: weights, bank, Gaussians):

* ``patchcore`` and ``apc`` (APC's fitted model *is* a PatchCore — the bank built on the
  fine-tuned encoder, stored the same way: ``bank`` + ``backbone.*`` tensors):
  backbone layers → 3×3 average pooling (``pool_include_pad``), deeper layers resized
  bilinearly to the first layer's grid, concatenated, channel-pooled to ``embed_dim`` (a reshape +
  mean when the channel count divides, else a fixed (C, D) averaging matrix: the same bins as
  ``adaptive_avg_pool1d``, which ONNX has no operator for) → kNN against the bank as tensor ops:
  ``|b|² - 2 q·bᵀ`` (one MatMul), min over the bank, ``+ |q|²``, clamp, sqrt (the order
  ``memory.NearestNeighbourIndex`` uses) → image score = max patch score × Eq. 7 weight, all
  inside the graph: the arg-max patch, its nearest bank entry m*, TopK of m*'s distances to the
  bank (its ``num_neighbors`` neighbours, m* first), w = 1 - softmax(‖test − neighbours‖)[0]
  (``PatchCore._reweight``) → map = patch scores resized bilinearly to (H, W) and Gaussian-smoothed
  (reflect padding + two 1-D convolutions with a fixed kernel, ``memory.gaussian_blur``).
* ``padim``: backbone layers, the fitted random channel subset (Gather with constant indices),
  deeper layers resized (nearest) to the first grid → per-position Mahalanobis distance as one
  batched MatMul with the P inverse covariances ((P, B, d) @ (P, d, d), then · delta, sum) →
  the same resize + smoothing → image score = map maximum.

No data-dependent Python runs in these graphs (no faiss, no chunking loops): the (B·h·w, N)
distance matrix is formed whole, which is what an inference runtime wants and bounds memory by
batch size × bank size (1024 patches × 16 k bank × 4 B = 64 MB per 256 px image).

The other methods
-----------------
``slsg`` and ``dsr`` are exported generically: ``method.predict`` itself is traced (its networks
registered as submodules, so their weights become initializers), with the same ``Normalise``
in front. Their predict is a plain network forward pass (SLSG: SegNet, sigmoid, top-k mean; DSR:
VQ-VAE, subspace restriction, decoders, anomaly module, mean filter, max), with no Python
control flow on data once ``memory.NearestNeighbourIndex`` (DSR's vector quantisers) is made to
search in one chunk while tracing (``unchunked_knn``). A generic export is kept only if
onnxruntime then reproduces torch on seeded random images at batch sizes other than the traced
one (relative difference <= ``GENERIC_TOLERANCE``), so a batch size baked into the trace is
caught; else ConfigError.
Measured on small models of each at B = 1, 3, 28: scores within 3e-6 of torch, SLSG's maps
within 1e-6, DSR's within 4e-4 (its map is that ill-conditioned in float32: torch float32 is
2.4e-4 away from the same network in float64).

Refused (``UNSUPPORTED``, checked before anything is loaded):

* ``ds2``: ``DS2.patch_embeddings`` runs the backbone over the patch crops in Python chunks of
  ``patch_batch`` (``split`` in a loop), so the trace hard-codes the chunk sizes of the traced
  batch; onnxruntime fails at any other batch size ("Split size 512 exceeds the remaining size").
  Needs a chunk-free ``patch_embeddings`` graph (as PaDiM's, plus the crop grid) to be exported.
* ``msp_svdd``: ``embed_grid`` loops over the batch one image at a time in Python and the bank
  search (``memory.NearestNeighbourIndex``) chunks queries by 4096 rows, so the trace fixes the
  batch size (onnxruntime: Gather out of bounds at B = 1, wrong shapes at B = 3); it also uses a
  faiss index when configured. Needs the batched crop embedding + one-matmul kNN of PatchCore's
  graph, per scale, to be exported.

Metadata
--------
``metadata_props`` of the ONNX model: ``defectlab.model_json`` = the full ``model.json`` text,
``defectlab.method``, ``defectlab.image_size``, ``defectlab.preprocess_resolved`` (the image
size, mean and std the graph was built with), and one ``defectlab.<block>`` (JSON) for each of
the ``preprocess``, ``threshold``, ``normalization``, ``data`` and ``versions`` blocks present
in ``model.json`` (``methods.base.CARD_KEYS``), so a runtime reads the threshold from the .onnx
file alone.

Files
-----
The export is written to a temporary folder next to ``out`` and renamed over ``out`` only once it
is complete: a failed export leaves no file behind and keeps an existing ``out``. Graphs whose
constants exceed protobuf's 2 GB limit are saved with ONNX external data: the tensors go to
``<out name>.<token>.data`` beside it (a new name per export, renamed into place before the
.onnx, so the old .onnx never points at new data; the previous export's data file is removed
afterwards).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from defectlab.errors import ConfigError, ResourceMissingError

#: methods with a hand-written scoring graph, and those exported by tracing their ``predict``
SUPPORTED = ("patchcore", "padim", "apc")
GENERIC = ("slsg", "dsr")

#: methods whose export is refused, and why (found by trying the generic export; module docstring)
UNSUPPORTED: dict[str, str] = {
    "ds2": "its predict embeds the patch crops in Python chunks of patch_batch (a split loop), so the traced "
           "graph hard-codes the traced batch's chunk sizes and fails at any other batch size",
    "msp_svdd": "its predict embeds the batch one image at a time in a Python loop and searches the banks in "
                "chunks of 4096 queries, so the traced graph only works at the traced batch size",
}

#: largest relative difference onnxruntime vs torch a generic (traced ``predict``) export may show
#: on its check images; float32 reordering gives ~1e-5, a wrong trace gives O(1) or an error
GENERIC_TOLERANCE = 1e-3

#: model.json blocks copied into the ONNX metadata (each as ``defectlab.<block>``)
METADATA_BLOCKS = ("preprocess", "threshold", "normalization", "data", "versions")

INPUT_NAMES = ["image"]
OUTPUT_NAMES = ["score", "map"]

#: protobuf cannot serialise a message above 2 GiB; above this the tensors go to external data
PROTOBUF_LIMIT = 2**31 - 2**24


# =============================================================================================
# reading the model folder
# =============================================================================================
def _require(module: str):
    """Import onnx / onnxruntime, or say how to get them (they are optional dependencies)."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ResourceMissingError(f"{module} is not installed; ONNX export needs `pip install onnx onnxruntime`") from None


def read_model_json(model_dir: str | Path) -> tuple[dict, str]:
    """The parsed ``model.json`` of a fitted model folder and its text."""
    path = Path(model_dir) / "model.json"
    if not path.exists():
        raise ResourceMissingError(f"{model_dir}: no fitted model here (model.json missing); run the fit stage")
    text = path.read_text()
    try:
        info = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(info, dict) or "method" not in info:
        raise ConfigError(f"{path}: has no 'method' key; not a defectlab model.json")
    return info, text


def resolve_preprocess(info: dict, image_size: int | None = None) -> dict:
    """The image size and normalisation the graph bakes in: ``preprocess`` block first, then the
    caller's ``image_size``, then the size the model was fitted at (``meta.image_size``)."""
    from defectlab.data import IMAGENET_MEAN, IMAGENET_STD

    pre = info.get("preprocess") or {}
    if not isinstance(pre, dict):
        raise ConfigError(f"model.json: preprocess must be a mapping (got {type(pre).__name__})")
    size = pre.get("image_size")
    if size is not None and image_size is not None and int(size) != int(image_size):
        raise ConfigError(f"image_size {image_size} given, but model.json's preprocess.image_size is {size}; "
                          f"the model scores images of {size} px")
    size = size if size is not None else image_size
    if size is None:
        size = (info.get("meta") or {}).get("image_size")
    if size is None:
        raise ConfigError(f"{info.get('method')}: the image size is unknown (model.json has no "
                          f"preprocess.image_size and no meta.image_size); pass image_size")
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise ConfigError(f"model.json: preprocess.image_size {size} is not square; only S x S inputs are exported")
        size = size[0]
    mean = [float(v) for v in pre.get("mean", IMAGENET_MEAN)]
    std = [float(v) for v in pre.get("std", IMAGENET_STD)]
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ConfigError(f"model.json: preprocess mean/std must be 3 values each, std > 0 (got {mean}, {std})")
    return {"image_size": int(size), "mean": mean, "std": std}


def load_method(model_dir: str | Path, info: dict | None = None):
    """The fitted method, on CPU, searching its bank exactly: the graph's kNN is one exact matrix
    product, so the torch reference it is checked against must be exact too (``knn_approx: auto``
    picks an inverted-file index for large banks on the CPU; an ONNX model always scores exactly)."""
    from defectlab.methods import get_method

    info = info if info is not None else read_model_json(model_dir)[0]
    method = get_method(info["method"]).load(model_dir, "cpu")
    if getattr(method.config, "knn_approx", None) in ("auto", "exact"):
        method.config = method.config.model_copy(update={"knn_approx": None})
    return method


# =============================================================================================
# graph pieces
# =============================================================================================
class Normalise(nn.Module):
    """(image - mean) / std per channel, as ``ImageDataset`` does (same float32 constants)."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32)[:, None, None])
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32)[:, None, None])

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return (image - self.mean) / self.std


class SmoothedMap(nn.Module):
    """(B, h, w) patch scores -> (B, H, W): bilinear resize, then the Gaussian of
    ``memory.gaussian_blur`` (radius 4σ, reflect padding) as two convolutions with a fixed kernel."""

    def __init__(self, size: int, sigma: float):
        super().__init__()
        self.size, self.sigma = size, sigma
        self.radius = int(4 * sigma + 0.5) if sigma > 0 else 0
        x = torch.arange(-self.radius, self.radius + 1, dtype=torch.float32)
        k = torch.exp(-(x**2) / (2 * sigma**2)) if sigma > 0 else torch.ones(1)
        self.register_buffer("kernel", (k / k.sum()).view(1, 1, 1, -1))

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        m = F.interpolate(scores[:, None], size=(self.size, self.size), mode="bilinear", align_corners=False)
        if self.sigma > 0:
            r = self.radius
            m = F.conv2d(F.pad(m, (r, r, 0, 0), mode="reflect"), self.kernel)
            m = F.conv2d(F.pad(m, (0, 0, r, r), mode="reflect"), self.kernel.transpose(2, 3))
        return m[:, 0]


class ChannelPool(nn.Module):
    """``F.adaptive_avg_pool1d`` over the last (channel) axis, C -> D, in ONNX-exportable ops."""

    def __init__(self, c: int, d: int):
        super().__init__()
        self.c, self.d = c, d
        self.divides = c % d == 0
        if not self.divides:       # bin i averages channels floor(i·C/D) .. ceil((i+1)·C/D) - 1
            w = torch.zeros(c, d)
            for i in range(d):
                lo, hi = (i * c) // d, -(-((i + 1) * c) // d)
                w[lo:hi, i] = 1.0 / (hi - lo)
            self.register_buffer("weight", w)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        if self.divides:
            return f.reshape(*f.shape[:-1], self.d, self.c // self.d).mean(-1)
        return f @ self.weight


def _grid_shapes(body: nn.Module, layers: list[str], size: int) -> dict[str, tuple[int, int, int]]:
    """(C, h, w) of each layer's feature map for a size x size input (a probe run)."""
    with torch.no_grad():
        feats = body(torch.zeros(1, 3, size, size))
    return {layer: tuple(feats[layer].shape[1:]) for layer in layers}


class _BackboneGraph(nn.Module):
    """What both memory-bank graphs start with: normalisation, the frozen backbone body, its
    layers and the patch grid (h, w) of the first layer at the export size."""

    def __init__(self, method, pre: dict):
        super().__init__()
        cfg = method.config
        self.normalise = Normalise(pre["mean"], pre["std"])
        self.body = method.extractor.body
        self.layers = list(cfg.layers)
        self.shapes = _grid_shapes(self.body, self.layers, pre["image_size"])
        _, self.h, self.w = self.shapes[self.layers[0]]


# =============================================================================================
# PatchCore / APC
# =============================================================================================
class PatchCoreGraph(_BackboneGraph):
    """PatchCore's ``predict`` (``methods.patchcore``) as one static graph; APC uses it unchanged."""

    def __init__(self, method, pre: dict):
        super().__init__(method, pre)
        cfg = method.config
        size = pre["image_size"]
        self.patch_size = cfg.patch_size
        self.include_pad = cfg.pool_include_pad
        c = sum(s[0] for s in self.shapes.values())
        self.pool = ChannelPool(c, cfg.embed_dim) if cfg.embed_dim is not None and cfg.embed_dim < c else None
        bank = method.bank.detach().float().cpu().contiguous()
        # one copy of the bank, transposed for the MatMuls (a ``bank.T`` in the graph would be
        # constant-folded into a second copy); bank rows are gathered as its columns
        self.register_buffer("bank_t", bank.T.contiguous())      # (D, N)
        self.register_buffer("bank_sq", (bank * bank).sum(1))    # (N,)
        self.k = min(cfg.num_neighbors, bank.shape[0])
        self.reweighted = getattr(cfg, "score", "reweighted") == "reweighted"   # APC's ``score: max`` skips Eq. 7
        self.smooth = SmoothedMap(size, cfg.sigma)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """``memory.local_patch_features``: (B, 3, H, W) -> (B, h·w, D)."""
        feats = self.body(x)
        p = self.patch_size
        parts = []
        for layer in self.layers:
            f = feats[layer]
            if p > 1:
                f = F.avg_pool2d(f, p, stride=1, padding=p // 2, count_include_pad=self.include_pad)
            if tuple(f.shape[-2:]) != (self.h, self.w):
                f = F.interpolate(f, size=(self.h, self.w), mode="bilinear", align_corners=False)
            parts.append(f.permute(0, 2, 3, 1))
        f = torch.cat(parts, -1)                                 # B, h, w, C
        if self.pool is not None:
            f = self.pool(f)
        return f.reshape(f.shape[0], self.h * self.w, f.shape[-1])

    def reweight(self, test_patch: torch.Tensor, nearest: torch.Tensor) -> torch.Tensor:
        """Eq. 7 (``PatchCore._reweight``): w = 1 - softmax over m*'s k bank neighbours (m* first)
        of ‖test - m‖, at m*."""
        if self.k < 2:
            return torch.ones_like(test_patch[:, 0])
        m_star = self.bank_t.index_select(1, nearest).T                          # B, D
        part = self.bank_sq[None] - 2 * (m_star @ self.bank_t)                   # B, N
        support = torch.topk(part, self.k, dim=1, largest=False).indices         # B, k
        neighbours = self.bank_t[:, support].permute(1, 2, 0)                    # B, k, D
        d = torch.linalg.vector_norm(neighbours - test_patch[:, None], dim=-1)
        return 1 - torch.softmax(d, dim=1)[:, 0]

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.embed(self.normalise(image))                                   # B, P, D
        part = self.bank_sq - 2 * (q @ self.bank_t)                              # B, P, N
        best_part, nn_idx = part.min(dim=-1)                                     # B, P
        scores = (best_part + (q * q).sum(-1)).clamp_min(0).sqrt()               # B, P
        best = scores.argmax(dim=1, keepdim=True)                                # B, 1
        s_star = scores.gather(1, best)[:, 0]
        test_patch = q.gather(1, best[:, :, None].expand(-1, 1, q.shape[-1]))[:, 0]
        nearest = nn_idx.gather(1, best)[:, 0]
        image_score = s_star * self.reweight(test_patch, nearest) if self.reweighted else s_star
        maps = self.smooth(scores.reshape(-1, self.h, self.w))
        return image_score, maps


# =============================================================================================
# PaDiM
# =============================================================================================
class PaDiMGraph(_BackboneGraph):
    """PaDiM's ``predict`` (``methods.padim``) as one static graph."""

    def __init__(self, method, pre: dict):
        super().__init__(method, pre)
        cfg = method.config
        size = pre["image_size"]
        shapes = self.shapes
        if [self.h, self.w] != list(method.grid or [self.h, self.w]):
            raise ConfigError(f"padim: fitted on a {tuple(method.grid)} patch grid, but {size} px images give "
                              f"({self.h}, {self.w}); export at the fitted image size")
        # the fitted channel subset, split per layer (``PaDiM._embed``)
        channels, start = method.channels.cpu(), 0
        for i, layer in enumerate(self.layers):
            c = shapes[layer][0]
            self.register_buffer(f"idx{i}", channels[(channels >= start) & (channels < start + c)] - start)
            start += c
        self.register_buffer("mean", method.mean.detach().float().cpu().contiguous())        # P, d
        self.epsilon = float(cfg.epsilon)
        self.low_rank = method.factor is not None
        form = method.factor if self.low_rank else method.inv_cov
        self.register_buffer("inv_cov", form.detach().float().cpu().contiguous())  # P, d, d, or Z: P, n, d
        self.smooth = SmoothedMap(size, cfg.sigma)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.body(self.normalise(image))
        parts = []
        for i, layer in enumerate(self.layers):
            f = feats[layer].index_select(1, getattr(self, f"idx{i}"))
            if tuple(f.shape[-2:]) != (self.h, self.w):
                f = F.interpolate(f, size=(self.h, self.w), mode="nearest")
            parts.append(f)
        e = torch.cat(parts, 1)                                                  # B, d, h, w
        p, d = self.mean.shape
        delta = e.permute(2, 3, 0, 1).reshape(p, -1, d) - self.mean[:, None]     # P, B, d
        if self.low_rank:                                                        # (|δ|² − |Zδ|²)/ε
            zd = torch.matmul(delta, self.inv_cov.transpose(1, 2))
            m2 = ((delta * delta).sum(-1) - (zd * zd).sum(-1)).div(self.epsilon).clamp_min(0)
        else:
            m2 = (torch.matmul(delta, self.inv_cov) * delta).sum(-1).clamp_min(0)    # P, B
        scores = m2.sqrt().T.reshape(-1, self.h, self.w)
        maps = self.smooth(scores)
        return maps.flatten(1).max(1).values, maps


# =============================================================================================
# generic: ``method.predict`` traced as it is
# =============================================================================================
@contextlib.contextmanager
def unchunked_knn():
    """While tracing a ``predict``: ``memory.NearestNeighbourIndex.search`` takes all queries in one
    chunk (one MatMul + TopK). Its 4096-query chunking loop would otherwise be traced as fixed slices,
    and the graph fail once batch x patches exceeds what the traced batch had (DSR's vector
    quantisers: at B = 20 on 64 px images). Same arithmetic per query, so the same results."""
    from defectlab.memory import NearestNeighbourIndex

    original = NearestNeighbourIndex.search

    def search(self, query, k=1):
        self.chunk = max(self.chunk, 2**62)
        return original(self, query, k)

    NearestNeighbourIndex.search = search
    try:
        yield
    finally:
        NearestNeighbourIndex.search = original


class PredictGraph(nn.Module):
    """``Normalise`` followed by ``method.predict``; the method's networks are registered as
    submodules (frozen, eval mode) so the exporter stores their weights as initializers."""

    def __init__(self, method, pre: dict):
        super().__init__()
        self.normalise = Normalise(pre["mean"], pre["std"])
        self.method = method
        for key, value in vars(method).items():
            if isinstance(value, nn.Module):
                self.add_module(f"net_{key}", value.eval().requires_grad_(False))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.method.predict(self.normalise(image))


GRAPHS = {"patchcore": PatchCoreGraph, "apc": PatchCoreGraph, "padim": PaDiMGraph,
          "slsg": PredictGraph, "dsr": PredictGraph}


def scoring_graph(method, pre: dict) -> nn.Module:
    """The torch module the export traces: raw [0, 1] images -> (score, map)."""
    name = method.name
    if name in UNSUPPORTED:
        raise ConfigError(f"{name}: ONNX export not supported: {UNSUPPORTED[name]}")
    if name not in GRAPHS:
        raise ConfigError(f"{name}: ONNX export not supported: no scoring graph for this method "
                          f"(supported: {', '.join(SUPPORTED + GENERIC)})")
    if getattr(method.config, "knn_approx", None) not in (None, "auto", "exact"):
        raise ConfigError(f"{name}: ONNX export not supported: knn_approx={method.config.knn_approx!r} scores with "
                          f"an approximate faiss index; the graph's exact kNN would not match it")
    return GRAPHS[name](method, pre).eval()


# =============================================================================================
# export
# =============================================================================================
def _to_onnx(graph: nn.Module, size: int, opset: int, dynamic_batch: bool, folder: Path) -> Path:
    """Trace ``graph`` with torch's TorchScript-based exporter into ``folder`` (which writes external
    data there by itself when the graph is over 2 GB); returns the file.

    Why that exporter: it emits the requested opset natively (17 by default), where the
    torch.export-based one (``dynamo=True``, needs onnxscript) implements opset >= 18 only and
    silently keeps 18 when asked for 17 (its down-conversion has no adapter for Pad); it also
    exports these graphs 3-4x faster. Both give the same outputs here."""
    path = folder / "graph.onnx"
    example = torch.rand(2 if dynamic_batch else 1, 3, size, size, generator=torch.Generator().manual_seed(0))
    dyn = {"image": {0: "batch"}, "score": {0: "batch"}, "map": {0: "batch"}} if dynamic_batch else None
    whole_knn = unchunked_knn() if isinstance(graph, PredictGraph) else contextlib.nullcontext()
    with warnings.catch_warnings(), torch.no_grad(), whole_knn:
        warnings.simplefilter("ignore")          # the exporter's deprecation notice and tracer warnings
        torch.onnx.export(graph, (example,), str(path), dynamo=False, input_names=INPUT_NAMES,
                          output_names=OUTPUT_NAMES, opset_version=opset, dynamic_axes=dyn,
                          do_constant_folding=True)
    return path


def _check_generic(method, path: Path, pre: dict, dynamic_batch: bool) -> None:
    """A traced ``predict`` is kept only if onnxruntime reproduces torch on seeded random images,
    at batch sizes other than the traced one when the batch is dynamic."""
    size = pre["image_size"]
    gen = torch.Generator().manual_seed(1)
    try:
        sess = onnx_session(path)
        for b in ((1, 3) if dynamic_batch else (1,)):
            x = torch.rand(b, 3, size, size, generator=gen).numpy()
            o_score, o_map = sess.run(OUTPUT_NAMES, {"image": x})
            t_score, t_map = torch_predict(method, x, pre)
            diff = max(_rel(o_score, t_score), _rel(o_map, t_map))
            if not diff <= GENERIC_TOLERANCE:
                raise ConfigError(f"{method.name}: ONNX export not supported: the traced predict does not "
                                  f"reproduce torch at batch size {b} (relative difference {diff:.2e} > "
                                  f"{GENERIC_TOLERANCE:g})")
    except ConfigError:
        raise
    except Exception as err:         # onnxruntime refusing the graph, shape errors at another batch size
        msg = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise ConfigError(f"{method.name}: ONNX export not supported: the traced predict fails in onnxruntime "
                          f"({type(err).__name__}: {msg})") from None


def _metadata(info: dict, text: str, pre: dict) -> dict[str, str]:
    meta = {"defectlab.model_json": text, "defectlab.method": str(info["method"]),
            "defectlab.image_size": str(pre["image_size"]),
            "defectlab.preprocess_resolved": json.dumps(pre, sort_keys=True)}
    for name in METADATA_BLOCKS:
        block = info.get(name)
        if block is not None:
            meta[f"defectlab.{name}"] = json.dumps(block, sort_keys=True)
    return meta


def _set_metadata(model, meta: dict[str, str]) -> None:
    import onnx

    keep = [p for p in model.metadata_props if p.key not in meta]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for k, v in meta.items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))


def _tensor_bytes(model) -> int:
    """Bytes of the graph's constants (initializers and Constant nodes)."""
    total = sum(len(t.raw_data) or t.ByteSize() for t in model.graph.initializer)
    for node in model.graph.node:
        if node.op_type == "Constant":
            total += sum(len(a.t.raw_data) for a in node.attribute if a.type == a.TENSOR)
    return total


def _save(model, tmp: Path, out: Path) -> tuple[str | None, int]:
    """Write ``model`` to ``tmp/out.name`` (external data beside it when over the protobuf limit),
    rename into ``out``'s folder; returns (external data file name or None, bytes written)."""
    import onnx

    target = tmp / out.name
    data_name = None
    if _tensor_bytes(model) > PROTOBUF_LIMIT:
        data_name = f"{out.name}.{secrets.token_hex(4)}.data"
        onnx.save_model(model, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
        os.replace(tmp / data_name, out.parent / data_name)
    else:
        target.write_bytes(model.SerializeToString())
    nbytes = target.stat().st_size + ((out.parent / data_name).stat().st_size if data_name else 0)
    os.replace(target, out)
    for old in out.parent.glob(f"{out.name}.*.data"):      # the previous export's external data
        if old.name != data_name:
            old.unlink(missing_ok=True)
    return data_name, nbytes


def export_onnx(model_dir: str | Path, out: str | Path, *, opset: int = 17, dynamic_batch: bool = True,
                image_size: int | None = None) -> dict:
    """Export the fitted model in ``model_dir`` to the ONNX file ``out`` (atomically).

    ``image_size``: needed only when model.json has no ``preprocess.image_size`` and no
    ``meta.image_size``. Returns facts about the file: path, bytes, opset, input/output names and
    shapes, method, image size, external data file (or None), export seconds.
    """
    from defectlab.io import clean_stale

    onnx = _require("onnx")

    t0 = time.perf_counter()
    model_dir, out = Path(model_dir), Path(out)
    info, text = read_model_json(model_dir)
    name = info["method"]
    if name in UNSUPPORTED:             # before loading: the refusal costs nothing
        raise ConfigError(f"{name}: ONNX export not supported: {UNSUPPORTED[name]}")
    pre = resolve_preprocess(info, image_size)
    method = load_method(model_dir, info)
    graph = scoring_graph(method, pre)

    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.", suffix=".tmp", dir=out.parent))
    try:
        try:
            traced = _to_onnx(graph, pre["image_size"], opset, dynamic_batch, tmp)
        except Exception as err:
            if not isinstance(graph, PredictGraph):
                raise
            msg = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
            raise ConfigError(f"{name}: ONNX export not supported: tracing its predict failed "
                              f"({type(err).__name__}: {msg})") from None
        if isinstance(graph, PredictGraph):
            _check_generic(method, traced, pre, dynamic_batch)
        model = onnx.load(str(traced))                    # (loads external data too)
        _set_metadata(model, _metadata(info, text, pre))
        model.doc_string = (f"defectlab {name}: image (B, 3, {pre['image_size']}, {pre['image_size']}) RGB in "
                            f"[0, 1] -> score (B,), map (B, H, W) (raw; threshold in metadata)")
        data_name, nbytes = _save(model, tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    b = "batch" if dynamic_batch else 1
    s = pre["image_size"]
    return {"path": str(out), "bytes": nbytes, "mib": nbytes / 2**20, "opset": opset, "method": name,
            "image_size": s, "inputs": {"image": [b, 3, s, s]}, "outputs": {"score": [b], "map": [b, s, s]},
            "input_names": list(INPUT_NAMES), "output_names": list(OUTPUT_NAMES),
            "dynamic_batch": dynamic_batch, "external_data": data_name, "seconds": time.perf_counter() - t0}


# =============================================================================================
# verification
# =============================================================================================
def read_metadata(onnx_path: str | Path) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file (without loading external tensor data)."""
    onnx = _require("onnx")

    model = onnx.load(str(onnx_path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


def onnx_session(onnx_path: str | Path, threads: int | None = None, spinning: bool = True):
    """An onnxruntime CPU session (``threads``: intra-op threads, default onnxruntime's choice;
    ``spinning=False``: its idle threads sleep instead of busy-waiting, which they otherwise do for
    a while after each run, taking the cores from anything else in the process, e.g. torch)."""
    ort = _require("onnxruntime")

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])


def _as_nchw(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images, dtype=np.float32)
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4:
        raise ConfigError(f"images: expected (B, 3, H, W) or (B, H, W, 3), got shape {images.shape}")
    if images.shape[1] != 3 and images.shape[-1] == 3:
        images = images.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(images)


def torch_predict(method, images01: np.ndarray, pre: dict) -> tuple[np.ndarray, np.ndarray]:
    """``method.predict`` on [0, 1] images normalised as ``ImageDataset`` does."""
    x = torch.from_numpy(_as_nchw(images01))
    mean = torch.tensor(pre["mean"], dtype=torch.float32)[:, None, None]
    std = torch.tensor(pre["std"], dtype=torch.float32)[:, None, None]
    with torch.no_grad():
        s, m = method.predict((x - mean) / std)
    return s.float().cpu().numpy(), m.float().cpu().numpy()


def _rel(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(a - ref).max() / max(float(np.abs(ref).max()), 1e-12))


def verify_onnx(model_dir: str | Path, onnx_path: str | Path, images: np.ndarray, *,
                image_size: int | None = None) -> dict:
    """Score ``images`` ([0, 1] RGB, (B, 3, H, W) or (B, H, W, 3)) with onnxruntime (CPU) and with
    torch; return the largest differences relative to the largest absolute torch value
    (``score_rel_diff``, ``map_rel_diff``) and both outputs."""
    info, _ = read_model_json(model_dir)
    pre = resolve_preprocess(info, image_size)
    x = _as_nchw(images)
    sess = onnx_session(onnx_path)
    o_score, o_map = sess.run(OUTPUT_NAMES, {"image": x})
    t_score, t_map = torch_predict(load_method(model_dir, info), x, pre)
    return {"n_images": int(x.shape[0]), "score_rel_diff": _rel(o_score, t_score), "map_rel_diff": _rel(o_map, t_map),
            "score_abs_diff": float(np.abs(o_score - t_score).max()),
            "map_abs_diff": float(np.abs(o_map - t_map).max()),
            "onnx": {"score": o_score, "map": o_map}, "torch": {"score": t_score, "map": t_map}}
