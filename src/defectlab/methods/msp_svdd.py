"""Multi-scale patch SVDD (Tsai, Wu, Lai, "Multi-Scale Patch-Based Representation Learning for
Image Anomaly Detection and Segmentation", WACV 2022), an extension of Patch SVDD (Yi & Yoon,
ACCV 2020).

Mechanism
---------
One patch encoder ``Enc_θ`` per patch size θ (``scales``, 64/32/16 in the paper; ``[64]`` is the
paper's single-scale ablation, Table 6, i.e. Patch SVDD trained with the new losses). Each
encoder is the front of VGG16 (Sec. 3.1, Fig. 2), cut where a θ×θ patch has become an 8×8 map
(θ=16: conv1–conv2, θ=32: conv1–conv3, θ=64: conv1–conv4), followed by an 8×8 convolution to a
``embed_dim`` vector and tanh (as Patch SVDD's encoders). The encoders therefore have different
architectures but share the VGG16 initialisation. A classifier ``C_θ`` (MLP on the concatenated
embeddings of two patches) predicts their relative angle.

Training (per category, on the normal training images; Sec. 3.2, 3.3), for each θ:

* Eq. 1, SVDD loss: ‖Enc(P_i) − Enc(P_j)‖₂ for P_j a neighbour of a random P_i shifted by at
  most ±``jitters[θ]`` px (±4/±2/±1 for 64/32/16),
* Eq. 2, Cos loss: cos(Enc(P_i), Enc(P_k)) − cos(Enc(P_i), Enc(P_j)) with P_k farther from P_i
  (Chebyshev distance ≥ ``far_min``·θ, or the farthest of several draws when the image has no
  such position),
* Eq. 3, SSL loss: 12-way cross-entropy of C(Enc(P_m), Enc(P_n)) where P_n lies about one patch
  size from P_m at angle 30°·y (y = 0..11, ± ``ssl_jitter``·θ px of jitter),
* Eq. 4, K-means loss: min_k ‖Enc(P_r) − c_k‖₂ for random patches P_r; the centres c_k are
  recomputed by K-means on ``kmeans_samples`` random training patches every ``kmeans_every``
  epochs (5 in the paper), starting before the first epoch,
* Eq. 5: L = λ(L_SVDD + L_Cos) + L_SSL + L_Kmeans (λ = 1e-3).

Implementation choices the paper leaves open: losses are batch means (not sums; only the scale
of the learning rate changes); the anchors P_i of the SVDD/Cos triplets (uniform random
positions) double as the K-means patches P_r; an epoch gives every training image
``patches_per_image`` (100 in the paper) triplets and SSL pairs; ``n_clusters`` is not given in
the paper.

Inference (Sec. 3.4): every θ×θ patch on a grid of stride ``strides[θ]`` (16/4/4; the last row /
column is moved to the image border so every pixel is covered) is embedded; its score is the L2
distance to the nearest embedding of the training patches taken on the same grid (Eq. 6, memory
bank searched with ``defectlab.memory.NearestNeighbourIndex``). Overlapping patch scores are
averaged per pixel (Eq. 7), the per-scale maps summed (Eq. 8); the image score is the maximum
over 8×8 window means with stride 4 (Eq. 9).

Pipeline stages
---------------
* ``pretrain`` (per dataset): no training; only freezes the VGG16-style initial weights into its
  output directory (``vgg_init.safetensors``): torchvision's ImageNet VGG16 ``features`` when
  ``weights: imagenet`` (needs the cached weights file, offline), a state-dict path, or a seeded
  random initialisation (``weights: random``, the offline default). ``width`` < 1 thins every
  VGG16 layer (random initialisation only) so CPU smoke runs fit their time budget. A warning
  states which initialisation was used.
* ``train`` (per category, ``trains_per_category``; the paper trains per category): ``train``
  loads that initialisation and trains every Enc_θ and C_θ on ``ctx.data.train`` (losses above,
  K-means recomputations). The stage saves the encoders, the angle classifiers and the last
  K-means centres (``trained_tensors``) plus ``self.meta`` (initialisation source, per-epoch
  loss / SSL-accuracy history, K-means epochs; the stage adds the returned stats as
  ``meta['train']``) to ``checkpoints/msp_svdd/<ds>/train/<cat>/``. With ``ctx.work_dir`` set,
  training writes a resumable checkpoint every ``checkpoint_every`` epochs (deleted once
  training ends); every epoch's randomness comes from a generator seeded by (seed, epoch), so a
  resumed run equals an uninterrupted one.
* ``fit`` (per category, cheap): ``load_trained(ctx.train_dir)`` (fails clearly when the train
  stage has not run or ran with another config), then the memory banks T^θ (every training patch
  on the inference grid, embedded with the trained encoders). The fitted model
  (``state_tensors``: encoders + banks; ``meta``, training history included) is all that
  ``predict`` needs.
* ``evaluate``: ``predict`` as described under Inference.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from defectlab.config import StrictModel
from defectlab.errors import ConfigError, ResourceMissingError
from defectlab.memory import NearestNeighbourIndex, rescore_top
from defectlab.methods.base import AnomalyMethod, FitContext, PretrainContext, make_loader
from defectlab.resume import Checkpoint, image_files
from defectlab.steplog import log_step

log = logging.getLogger(__name__)

#: torchvision's VGG16 ``features`` layout (numbers: 3×3 conv + ReLU output channels, M: max-pool).
VGG16_CFG: list[int | str] = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
INIT_FILE = "vgg_init.safetensors"


class MSPSVDDConfig(StrictModel):
    # -- architecture ---------------------------------------------------------------------------
    scales: list[int] = Field([64, 32, 16], min_length=1, description="patch sizes θ; [64]: single-scale ablation")
    strides: dict[int, int] = Field({64: 16, 32: 4, 16: 4}, description="inference / bank patch stride d_θ per scale")
    jitters: dict[int, int] = Field({64: 4, 32: 2, 16: 1}, description="SVDD/Cos neighbour shift ± px per scale")
    weights: str = Field("random", description="VGG16 init: random | imagenet | path to a vgg16 state dict")
    width: float = Field(1.0, gt=0, le=1, description="VGG16 channel multiplier (1: VGG16; < 1 random init only)")
    embed_dim: int = Field(64, ge=2)
    # -- losses (Eq. 1-5) -----------------------------------------------------------------------
    lambda_svdd: float = Field(1e-3, ge=0, description="λ of Eq. 5 on SVDD + Cos")
    cos_weight: float = Field(1.0, ge=0, description="weight of L_Cos inside λ(...) (0: ablation w/o Cos)")
    ssl_weight: float = Field(1.0, ge=0, description="weight of L_SSL (0: ablation w/o SSL)")
    kmeans_weight: float = Field(1.0, ge=0, description="weight of L_Kmeans (0: ablation w/o Kmeans)")
    n_angles: int = Field(12, ge=2, description="relative-angle classes (12: 0°, 30°, ..., 330°)")
    ssl_jitter: float = Field(0.125, ge=0, lt=0.5, description="SSL partner jitter, fraction of θ")
    far_min: float = Field(0.5, ge=0, description="P_k at Chebyshev distance ≥ far_min·θ from P_i")
    n_clusters: int = Field(32, ge=1, description="K-means centres (not given in the paper)")
    kmeans_every: int = Field(5, ge=1, description="recompute centres every N epochs")
    kmeans_samples: int = Field(4096, ge=1, description="random training patches per K-means run")
    kmeans_iters: int = Field(30, ge=1)
    # -- optimisation ---------------------------------------------------------------------------
    epochs: int = Field(100, ge=1)
    patches_per_image: int = Field(100, ge=1, description="triplets and SSL pairs per image per epoch")
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-5, gt=0)
    checkpoint_every: int = Field(10, ge=1, description="epochs between resumable checkpoints (ctx.work_dir)")
    # -- inference ------------------------------------------------------------------------------
    embed_batch: int = Field(512, ge=1, description="patches per encoder call when embedding grids")
    score_window: int = Field(8, ge=1, description="image score window (Eq. 9)")
    score_stride: int = Field(4, ge=1)
    knn_backend: Literal["torch", "faiss"] = "torch"
    knn_approx: str | None = Field("auto", description="auto | exact | gemm-IVF<lists> | faiss index-factory string "
                                                         "(as PatchCore's: memory.auto_index_factory)")
    knn_rescore: int = Field(16, ge=0, description="per image, this many largest patch distances re-searched "
                                                   "exactly when the index is approximate (memory.rescore_top)")

    @model_validator(mode="after")
    def _check(self):
        for p in self.scales:
            if p < 8:
                raise ValueError(f"scales: patch size {p} < 8")
            if p % (2 ** (n_vgg_blocks(p) - 1)):
                raise ValueError(f"scales: patch size {p} must be a multiple of {2 ** (n_vgg_blocks(p) - 1)}")
            if p not in self.strides or p not in self.jitters:
                raise ValueError(f"scales: {p} needs an entry in strides and jitters")
            if self.strides[p] < 1 or self.jitters[p] < 1:
                raise ValueError(f"strides/jitters for {p} must be ≥ 1")
        if len(set(self.scales)) != len(self.scales):
            raise ValueError("scales: duplicates")
        return self


# =============================================================================================
# Encoders
# =============================================================================================
def n_vgg_blocks(patch: int) -> int:
    """VGG16 blocks an encoder for ``patch`` uses: enough pools to bring it to ≤ 8×8 (max 5)."""
    return int(min(5, max(1, math.floor(math.log2(patch / 8)) + 1)))


def vgg16_features(width: float = 1.0, n_blocks: int = 5) -> nn.Sequential:
    """VGG16's ``features`` (same module indices as torchvision) for the first ``n_blocks`` blocks,
    channels scaled by ``width``; the last block's max-pool is dropped."""
    layers: list[nn.Module] = []
    c_in, block = 3, 1
    for v in VGG16_CFG:
        if v == "M":
            if block == n_blocks:
                break
            layers.append(nn.MaxPool2d(2, 2))
            block += 1
        else:
            c_out = max(1, int(round(v * width)))
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(inplace=True)]
            c_in = c_out
    return nn.Sequential(*layers)


def init_features(weights: str, width: float, seed: int, dataset: str | None = None) -> tuple[dict, str]:
    """The initial VGG16 ``features`` state dict (all 5 blocks) and a sentence saying where it came from."""
    if weights != "random" and width != 1.0:
        raise ConfigError(f"methods.msp_svdd.width: {width} < 1 only works with weights: random "
                          f"(pretrained VGG16 weights have the full width)")
    if width == 1.0:
        from defectlab.backbones import build_backbone

        model = build_backbone("vgg16", weights, seed=seed, dataset=dataset)
        state = {k: v.detach().clone() for k, v in model.features.state_dict().items()}
        source = {"random": "random VGG16 initialisation (no ImageNet weights)",
                  "imagenet": "torchvision ImageNet VGG16 weights"}.get(weights, f"VGG16 weights from {weights}")
        return state, source
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        feats = vgg16_features(width)
        for m in feats.modules():   # torchvision's VGG initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
    return {k: v.detach().clone() for k, v in feats.state_dict().items()}, \
        f"random VGG16-style initialisation at width ×{width} (no ImageNet weights)"


class PatchEncoder(nn.Module):
    """Enc_θ: VGG16 front (cut at an 8×8 map for a θ×θ patch) -> 8×8 conv -> tanh -> (B, D).

    Runs channels-last (NHWC weights and inputs): oneDNN's convolutions and max pooling are faster
    on it on CPU (width 1/16, 64² patches: 2.5x in inference, 2.2x in a training step; full width:
    1.3-1.4x / 1.1x), and cuDNN's tensor-core kernels want it too. Loading a state dict copies into
    the channels-last tensors; saved states are made row-major by the callers that write files."""

    def __init__(self, patch: int, width: float, embed_dim: int):
        super().__init__()
        blocks = n_vgg_blocks(patch)
        self.body = vgg16_features(width, blocks)
        channels = [m for m in self.body if isinstance(m, nn.Conv2d)][-1].out_channels
        self.head = nn.Conv2d(channels, embed_dim, patch // 2 ** (blocks - 1))
        for m in self.modules():   # torchvision's VGG initialisation (the body is usually overwritten by load_init)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
        self.to(memory_format=torch.channels_last)

    def load_init(self, features_state: dict[str, torch.Tensor]) -> None:
        keys = self.body.state_dict().keys()
        self.body.load_state_dict({k: features_state[k] for k in keys})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.head(self.body(x.contiguous(memory_format=torch.channels_last)))).flatten(1)


class AngleClassifier(nn.Module):
    """C_θ: relative angle of P_n w.r.t. P_m from their two embeddings (n_angles classes)."""

    def __init__(self, embed_dim: int, n_angles: int, hidden: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2 * embed_dim, hidden), nn.LeakyReLU(0.1),
                                 nn.Linear(hidden, hidden), nn.LeakyReLU(0.1), nn.Linear(hidden, n_angles))

    def forward(self, e_m: torch.Tensor, e_n: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([e_m, e_n], dim=1))


# =============================================================================================
# Losses (Eq. 1-4)
# =============================================================================================
def svdd_loss(e_i: torch.Tensor, e_j: torch.Tensor) -> torch.Tensor:
    """Eq. 1: mean L2 distance between neighbouring patches' embeddings."""
    return (e_i - e_j).pow(2).sum(1).clamp_min(1e-12).sqrt().mean()


def cos_loss(e_i: torch.Tensor, e_j: torch.Tensor, e_k: torch.Tensor) -> torch.Tensor:
    """Eq. 2: mean cos(e_i, e_k) − cos(e_i, e_j); P_j is nearer to P_i than P_k is."""
    return (F.cosine_similarity(e_i, e_k, dim=1) - F.cosine_similarity(e_i, e_j, dim=1)).mean()


def ssl_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 3: cross-entropy of the relative-angle classifier; also returns its accuracy."""
    return F.cross_entropy(logits, labels), (logits.argmax(1) == labels).float().mean()


def kmeans_loss(e: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Eq. 4: mean L2 distance of each embedding to its nearest K-means centre."""
    d2 = (e[:, None, :] - centres[None]).pow(2).sum(-1)
    return d2.min(1).values.clamp_min(1e-12).sqrt().mean()


@torch.no_grad()
def kmeans(x: torch.Tensor, k: int, iters: int, gen: torch.Generator) -> torch.Tensor:
    """Lloyd's K-means with k-means++ seeding; ``gen`` is a CPU generator. Returns (k, D) centres."""
    n = x.shape[0]
    k = min(k, n)
    first = int(torch.randint(n, (1,), generator=gen))
    centres = [x[first]]
    d2 = (x - x[first]).pow(2).sum(1)
    for _ in range(k - 1):
        p = (d2 / d2.sum()).cpu() if float(d2.sum()) > 0 else torch.full((n,), 1.0 / n)
        idx = int(torch.multinomial(p, 1, generator=gen))
        centres.append(x[idx])
        d2 = torch.minimum(d2, (x - x[idx]).pow(2).sum(1))
    c = torch.stack(centres)
    for _ in range(iters):
        assign = torch.cdist(x, c).argmin(1)
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        new = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], c)
        if torch.allclose(new, c):
            break
        c = new
    return c


# =============================================================================================
# Patch sampling (Sec. 3.3)
# =============================================================================================
def _uniform_positions(n: int, hi_y: int, hi_x: int, gen: torch.Generator) -> torch.Tensor:
    """(n, 2) top-left (y, x) positions uniform in [0, hi_y] × [0, hi_x]."""
    return torch.stack([torch.randint(hi_y + 1, (n,), generator=gen), torch.randint(hi_x + 1, (n,), generator=gen)], 1)


def sample_triplets(n: int, size: tuple[int, int], patch: int, jitter: int, far_min: float,
                    gen: torch.Generator, n_candidates: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Positions of (P_i, P_j, P_k): P_i uniform, P_j = P_i shifted by (dy, dx) ∈ [-jitter, jitter]²
    \\ {(0, 0)} (mirrored at the border), P_k at Chebyshev distance ≥ max(jitter + 1, far_min·patch)
    from P_i (a random such draw among ``n_candidates``, else the farthest draw)."""
    hy, hx = size[0] - patch, size[1] - patch
    p_i = _uniform_positions(n, hy, hx, gen)
    shift = torch.randint(-jitter, jitter + 1, (n, 2), generator=gen)
    zero = (shift == 0).all(1)
    shift[zero, 1] = torch.where(torch.rand(int(zero.sum()), generator=gen) < 0.5, -1, 1).to(shift.dtype)
    hi = torch.tensor([hy, hx])
    shift = torch.where((p_i + shift < 0) | (p_i + shift > hi), -shift, shift)   # mirror at the border
    p_j = torch.minimum(torch.maximum(p_i + shift, torch.zeros(2, dtype=torch.long)), hi)
    cand = torch.stack([_uniform_positions(n, hy, hx, gen) for _ in range(n_candidates)], 1)   # n, C, 2
    dist = (cand - p_i[:, None]).abs().amax(2).float()                                       # n, C
    ok = dist >= max(jitter + 1, far_min * patch)
    key = torch.where(ok.any(1, keepdim=True), ok.float() + 0.5 * torch.rand(dist.shape, generator=gen), dist)
    p_k = cand[torch.arange(n), key.argmax(1)]
    return p_i, p_j, p_k


def sample_ssl_pairs(n: int, size: tuple[int, int], patch: int, n_angles: int, jitter: float,
                     gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Positions of (P_m, P_n) and the angle class y: P_n is about one patch size from P_m at angle
    360°·y/n_angles (counter-clockwise from +x, image y pointing down), ± jitter·patch px, clipped
    so both fit in the image."""
    hy, hx = size[0] - patch, size[1] - patch
    y = torch.randint(n_angles, (n,), generator=gen)
    angle = y.double() * (2 * math.pi / n_angles)
    j = int(round(jitter * patch))
    noise = torch.randint(-j, j + 1, (n, 2), generator=gen) if j > 0 else torch.zeros(n, 2, dtype=torch.long)
    dy = (-patch * torch.sin(angle)).round().long() + noise[:, 0]
    dx = (patch * torch.cos(angle)).round().long() + noise[:, 1]
    dy, dx = dy.clamp(-hy, hy), dx.clamp(-hx, hx)
    # P_m uniform over the positions that keep P_m + (dy, dx) inside the image
    lo_y, hi_y = (-dy).clamp_min(0), hy - dy.clamp_min(0)
    lo_x, hi_x = (-dx).clamp_min(0), hx - dx.clamp_min(0)
    u = torch.rand(n, 2, generator=gen, dtype=torch.float64)
    p_m = torch.stack([lo_y + (u[:, 0] * (hi_y - lo_y + 1)).long().clamp_max(hi_y - lo_y),
                       lo_x + (u[:, 1] * (hi_x - lo_x + 1)).long().clamp_max(hi_x - lo_x)], 1)
    return p_m, p_m + torch.stack([dy, dx], 1), y


def crop(images: torch.Tensor, img_idx: torch.Tensor, pos: torch.Tensor, patch: int) -> torch.Tensor:
    """Patches (n, C, patch, patch) of ``images`` (N, C, H, W) at top-left ``pos`` (n, 2), channels-
    last. Picked from the images' HWC sliding-window view in one copy, so each patch row is one
    run of patch·C contiguous values (channels-last images are viewed as HWC as they are, others
    are converted first); four broadcast index tensors over CHW images took a fifth of ``predict``,
    this is 4-10x faster."""
    dev = images.device
    win = images.permute(0, 2, 3, 1).contiguous().unfold(1, patch, 1).unfold(2, patch, 1)   # N, Y, X, C, p, p
    out = win.permute(0, 1, 2, 4, 5, 3)[img_idx.to(dev), pos[:, 0].to(dev), pos[:, 1].to(dev)]   # n, p, p, C
    return out.permute(0, 3, 1, 2)


def grid_starts(length: int, patch: int, stride: int) -> list[int]:
    """Top-left coordinates of a stride grid; the last one is moved to the border if needed."""
    starts = list(range(0, length - patch + 1, stride))
    if starts[-1] != length - patch:
        starts.append(length - patch)
    return starts


def coverage(starts: list[int], patch: int, length: int, device) -> torch.Tensor:
    """(length, n) indicator: pixel i is covered by the patch starting at starts[a]."""
    i = torch.arange(length, device=device)[:, None]
    s = torch.tensor(starts, device=device)[None]
    return ((i >= s) & (i < s + patch)).float()


# =============================================================================================
# The method
# =============================================================================================
class MultiScalePatchSVDD(AnomalyMethod):
    name = "msp_svdd"
    Config = MSPSVDDConfig
    trains_in_pretrain = False
    trains_per_category = True
    #: pretrain only freezes the VGG16-style initialisation
    PRETRAIN_READS = frozenset({"weights", "width"})
    #: the encoders' training does not read the bank grid or the scoring settings
    TRAIN_IGNORES = frozenset({"strides", "score_window", "score_stride", "knn_backend", "knn_approx",
                               "knn_rescore"})
    RESULT_NEUTRAL = frozenset({"checkpoint_every"})

    def __init__(self, config: MSPSVDDConfig, device="cpu"):
        super().__init__(config, device)
        self.encoders = nn.ModuleDict({str(p): PatchEncoder(p, config.width, config.embed_dim) for p in config.scales})
        self.encoders.to(self.device).eval()
        self.banks: dict[int, torch.Tensor] = {}
        self._index: dict[int, NearestNeighbourIndex] = {}
        self.history: list[dict] = []
        self.classifiers: nn.ModuleDict | None = None
        self.centres: dict[str, torch.Tensor] = {}

    # -- pretrain: freeze the VGG16-style initialisation ------------------------------------
    @classmethod
    def pretrain(cls, config: MSPSVDDConfig, ctx: PretrainContext) -> dict:
        """Writes ``vgg_init.safetensors`` (the encoders' shared initialisation); no training here:
        the paper trains the encoders per category, which ``train`` does."""
        from safetensors.torch import save_file

        state, source = init_features(config.weights, config.width, ctx.seed, ctx.dataset)
        log.warning("msp_svdd: encoders initialised from %s", source)
        save_file({k: v.contiguous() for k, v in state.items()}, str(ctx.out_dir / INIT_FILE),
                  metadata={"weights": config.weights, "width": str(config.width), "source": source})
        return {"init_weights": config.weights, "init_source": source, "width": config.width}

    def _load_init(self, ctx: FitContext) -> str:
        from safetensors import safe_open

        path = Path(ctx.pretrain_dir) / INIT_FILE if ctx.pretrain_dir else None
        if path is not None and path.exists():
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                if meta.get("weights") != self.config.weights or float(meta.get("width", "nan")) != self.config.width:
                    raise ResourceMissingError(f"{path}: written for weights={meta.get('weights')} width="
                                               f"{meta.get('width')}, config has {self.config.weights} / "
                                               f"{self.config.width}; rerun the pretrain stage")
                state = {k: f.get_tensor(k) for k in f.keys()}
            source = meta.get("source", "?") + f" (frozen in {path})"
        else:
            state, source = init_features(self.config.weights, self.config.width, ctx.seed, ctx.dataset)
        for enc in self.encoders.values():
            enc.load_init(state)
        log.warning("msp_svdd: encoders initialised from %s", source)
        return source

    # -- embedding ----------------------------------------------------------------------------
    def _encode(self, patch: int, patches: torch.Tensor) -> torch.Tensor:
        enc = self.encoders[str(patch)]
        return torch.cat([enc(patches[s:s + self.config.embed_batch])
                          for s in range(0, patches.shape[0], self.config.embed_batch)])

    @torch.no_grad()
    def embed_grid(self, images: torch.Tensor, patch: int) -> tuple[torch.Tensor, list[int], list[int]]:
        """Embeddings (B, ny, nx, D) of every patch on the ``strides[patch]`` grid, and the grid starts."""
        b, _, h, w = images.shape
        if h < patch or w < patch:
            raise ConfigError(f"methods.msp_svdd.scales: patch {patch} larger than the {h}×{w} images")
        ys, xs = grid_starts(h, patch, self.config.strides[patch]), grid_starts(w, patch, self.config.strides[patch])
        pos = torch.cartesian_prod(torch.tensor(ys), torch.tensor(xs))
        out = []
        for i in range(b):   # one image at a time bounds memory at 256 px
            patches = crop(images[i:i + 1], torch.zeros(len(pos), dtype=torch.long), pos, patch)
            out.append(self._encode(patch, patches).reshape(len(ys), len(xs), -1))
        return torch.stack(out), ys, xs

    # -- training ------------------------------------------------------------------------------
    def _losses(self, patch: int, classifier: AngleClassifier, images: torch.Tensor, img_idx: torch.Tensor,
                centres: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """All four loss terms of one scale on the images ``img_idx`` (one triplet and one SSL pair each)."""
        cfg = self.config
        n, size = len(img_idx), tuple(images.shape[-2:])
        p_i, p_j, p_k = sample_triplets(n, size, patch, cfg.jitters[patch], cfg.far_min, gen)
        p_m, p_n, y = sample_ssl_pairs(n, size, patch, cfg.n_angles, cfg.ssl_jitter, gen)
        batch = torch.cat([crop(images, img_idx, p, patch) for p in (p_i, p_j, p_k, p_m, p_n)])
        e_i, e_j, e_k, e_m, e_n = self.encoders[str(patch)](batch).split(n)
        l_ssl, acc = ssl_loss(classifier(e_m, e_n), y.to(e_m.device))
        return {"svdd": svdd_loss(e_i, e_j), "cos": cos_loss(e_i, e_j, e_k), "ssl": l_ssl,
                "kmeans": kmeans_loss(e_i, centres), "ssl_acc": acc.detach()}

    def total_loss(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        """Eq. 5: λ(L_SVDD + w_cos·L_Cos) + w_ssl·L_SSL + w_km·L_Kmeans."""
        c = self.config
        return (c.lambda_svdd * (terms["svdd"] + c.cos_weight * terms["cos"]) + c.ssl_weight * terms["ssl"]
                + c.kmeans_weight * terms["kmeans"])

    @torch.no_grad()
    def _kmeans_centres(self, patch: int, images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        cfg = self.config
        n = cfg.kmeans_samples
        idx = torch.randint(images.shape[0], (n,), generator=gen)
        pos = _uniform_positions(n, images.shape[-2] - patch, images.shape[-1] - patch, gen)
        enc = self.encoders[str(patch)].eval()
        emb = torch.cat([enc(crop(images, idx[s:s + cfg.embed_batch], pos[s:s + cfg.embed_batch], patch))
                         for s in range(0, n, cfg.embed_batch)])
        enc.train()
        return kmeans(emb, cfg.n_clusters, cfg.kmeans_iters, gen)

    def _checkpoint(self, ctx: FitContext) -> Checkpoint:
        """The resumable checkpoint of this training: same config, seed, size, images and initial encoders."""
        return Checkpoint(ctx.work_dir, f"msp_svdd-{ctx.category}", self.phase_config(self.config, "train"), ctx.seed,
                          ctx.image_size, image_files(ctx.data.train), self.encoders)

    def train_encoders(self, images: torch.Tensor, seed: int, progress: bool = False,
                       checkpoint: Checkpoint | None = None) -> list[dict]:
        """Train every Enc_θ and C_θ on normalised images (N, 3, H, W) already on ``self.device``.
        Returns the per-epoch history (mean loss terms per scale, K-means recomputations)."""
        from tqdm.auto import tqdm

        cfg = self.config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            classifiers = nn.ModuleDict({str(p): AngleClassifier(cfg.embed_dim, cfg.n_angles) for p in cfg.scales})
            for enc in self.encoders.values():   # the heads are not part of VGG16: seeded fresh init (on CPU)
                w = nn.init.kaiming_normal_(torch.empty(enc.head.weight.shape), mode="fan_out", nonlinearity="relu")
                with torch.no_grad():
                    enc.head.weight.copy_(w)
                    enc.head.bias.zero_()
        classifiers.to(self.device)
        self.encoders.train()
        opt = torch.optim.Adam([*self.encoders.parameters(), *classifiers.parameters()], lr=cfg.lr)
        centres: dict[str, torch.Tensor] = {}
        history: list[dict] = []
        start = 0
        ck = checkpoint.load(self.device) if checkpoint is not None else None
        if ck is not None:
            self.encoders.load_state_dict(ck["encoders"])
            classifiers.load_state_dict(ck["classifiers"])
            opt.load_state_dict(ck["optimizer"])
            centres = dict(ck["centres"])
            history = json.loads(ck["history"])
            start = int(ck["epoch"])
            log.info("msp_svdd: resuming at epoch %d", start)
        n_img = images.shape[0]
        per_epoch = math.ceil(n_img * cfg.patches_per_image / cfg.batch_size)   # optimiser steps per epoch
        for epoch in tqdm(range(start, cfg.epochs), desc="msp_svdd train", disable=not progress, leave=False):
            gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            record: dict = {"epoch": epoch}
            if epoch % cfg.kmeans_every == 0 or not centres:
                for p in cfg.scales:
                    centres[str(p)] = self._kmeans_centres(p, images, gen)
                record["kmeans_recomputed"] = True
            order = torch.arange(n_img).repeat(cfg.patches_per_image)[torch.randperm(n_img * cfg.patches_per_image,
                                                                                     generator=gen)]
            sums: dict[str, float] = {}
            steps = 0
            for s in range(0, len(order), cfg.batch_size):
                img_idx = order[s:s + cfg.batch_size]
                loss = 0.0
                for p in cfg.scales:
                    terms = self._losses(p, classifiers[str(p)], images, img_idx, centres[str(p)], gen)
                    total = self.total_loss(terms)
                    loss = loss + total
                    for k, v in {**terms, "total": total}.items():
                        sums[f"{k}_{p}"] = sums.get(f"{k}_{p}", 0.0) + float(v.detach())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                log_step("loss/msp_svdd", float(loss.detach()), epoch * per_epoch + steps, cfg.epochs * per_epoch)
                steps += 1
            record.update({k: v / steps for k, v in sums.items()})
            history.append(record)
            if checkpoint is not None and ((epoch + 1) % cfg.checkpoint_every == 0 and epoch + 1 < cfg.epochs):
                checkpoint.save({"encoders": self.encoders.state_dict(), "classifiers": classifiers.state_dict(),
                                 "optimizer": opt.state_dict(), "centres": centres, "history": json.dumps(history),
                                 "epoch": epoch + 1})
        self.encoders.eval()
        self.classifiers, self.centres = classifiers.eval(), centres
        return history

    @torch.no_grad()
    def ssl_accuracy(self, images: torch.Tensor, n: int = 512, seed: int = 12345) -> dict[int, float]:
        """Relative-angle accuracy of the trained C_θ on ``n`` fresh SSL pairs per scale (chance: 1/n_angles)."""
        gen = torch.Generator().manual_seed(seed)
        out = {}
        for p in self.config.scales:
            idx = torch.randint(images.shape[0], (n,), generator=gen)
            p_m, p_n, y = sample_ssl_pairs(n, tuple(images.shape[-2:]), p, self.config.n_angles,
                                           self.config.ssl_jitter, gen)
            e = self._encode(p, torch.cat([crop(images, idx, p_m, p), crop(images, idx, p_n, p)]))
            logits = self.classifiers[str(p)](*e.split(n))
            out[p] = float((logits.argmax(1).cpu() == y).float().mean())
        return out

    # -- train (the `train` stage) ----------------------------------------------------------------
    def _train_images(self, ctx: FitContext) -> torch.Tensor:
        """The category's normal training images (N, 3, H, W), normalised, on ``self.device``,
        channels-last (``crop`` views them as HWC)."""
        loader = make_loader(ctx.data.train, ctx.image_size, batch_size=16)
        return torch.cat([b["image"] for b in loader]).to(self.device).contiguous(memory_format=torch.channels_last)

    @staticmethod
    def _train_fingerprint(ctx: FitContext) -> str:
        """What the trained encoders depend on besides the config (seed, image size, training images)."""
        key = json.dumps({"seed": ctx.seed, "size": ctx.image_size,
                          "train": sorted(Path(s.path).name for s in ctx.data.train)}, sort_keys=True)
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    def train(self, ctx: FitContext) -> dict:
        """Train every Enc_θ and C_θ on the category's normal images (Sec. 3.2, 3.3): load the
        VGG16-style init, train with K-means recomputations, resumable via ``ctx.work_dir``.
        The encoders, classifiers and last K-means centres are what the `train` stage saves."""
        cfg = self.config
        source = self._load_init(ctx)
        images = self._train_images(ctx)
        t0 = time.perf_counter()
        checkpoint = self._checkpoint(ctx)
        self.history = self.train_encoders(images, ctx.seed, ctx.progress, checkpoint)
        t_train = time.perf_counter() - t0
        last = self.history[-1]
        self.meta.update({"init_source": source, "n_train_images": len(images), "train_image_size": ctx.image_size,
                          "train_fingerprint": self._train_fingerprint(ctx),
                          "kmeans_epochs": [h["epoch"] for h in self.history if h.get("kmeans_recomputed")],
                          "history": self.history})
        stats = {"train_seconds": t_train, "epochs": cfg.epochs, "init_weights": cfg.weights}
        stats.update({f"final_{k}": v for k, v in last.items() if k not in ("epoch", "kmeans_recomputed")})
        stats.update({f"first_{k}": v for k, v in self.history[0].items() if k.startswith(("total", "ssl_acc"))})
        checkpoint.remove()
        return stats

    def trained_tensors(self) -> dict[str, torch.Tensor]:
        if self.classifiers is None:
            raise ConfigError("msp_svdd: trained_tensors() before train()")
        out = {f"enc.{k}": v for k, v in self.encoders.state_dict().items()}
        out.update({f"cls.{k}": v for k, v in self.classifiers.state_dict().items()})
        out.update({f"centres.{p}": c for p, c in self.centres.items()})
        return out

    def load_trained_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        cfg = self.config
        self.encoders.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("enc.")})
        self.encoders.to(self.device).eval()
        self.classifiers = nn.ModuleDict({str(p): AngleClassifier(cfg.embed_dim, cfg.n_angles) for p in cfg.scales})
        self.classifiers.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("cls.")})
        self.classifiers.to(self.device).eval()
        self.centres = {k[8:]: v.to(self.device) for k, v in tensors.items() if k.startswith("centres.")}
        self.history = list(self.meta.get("history", []))

    # -- fit (the `fit` stage): memory banks on the trained encoders -------------------------------
    def fit(self, ctx: FitContext) -> dict:
        """Load the `train` stage's encoders (``ctx.train_dir``) and build the per-scale memory banks
        T^θ from every training patch on the inference grid (Eq. 6). No training here."""
        cfg = self.config
        self.load_trained(ctx.train_dir)
        if self.meta.get("train_fingerprint") not in (None, self._train_fingerprint(ctx)):
            log.warning("msp_svdd: %s: encoders were trained on other images / size / seed than this fit "
                        "uses (rerun the train stage)", ctx.train_dir)
        images = self._train_images(ctx)
        t0 = time.perf_counter()
        self.banks = {}
        for p in cfg.scales:   # T^θ: every training patch on the inference grid (Eq. 6)
            emb = torch.cat([self.embed_grid(images[i:i + 8], p)[0] for i in range(0, len(images), 8)])
            self.banks[p] = emb.reshape(-1, emb.shape[-1])
        self._index = {}
        t_bank = time.perf_counter() - t0
        self.meta.update({"image_size": ctx.image_size, "n_train_images": len(images)})
        return {"bank_seconds": t_bank, **{f"bank_size_{p}": int(b.shape[0]) for p, b in self.banks.items()}}

    @torch.no_grad()
    def floor_forward(self, images: torch.Tensor) -> None:
        """Every scale's encoder over the inference grid's patches (what the banks are built from)."""
        images = images.to(self.device).contiguous(memory_format=torch.channels_last)   # crop views it as HWC
        for p in self.config.scales:
            self.embed_grid(images, p)

    # -- predict ---------------------------------------------------------------------------------
    def index(self, patch: int) -> NearestNeighbourIndex:
        if patch not in self._index:
            self._index[patch] = NearestNeighbourIndex(self.banks[patch], backend=self.config.knn_backend,
                                                       approx=self.config.knn_approx)
        return self._index[patch]

    @torch.no_grad()
    def scale_map(self, images: torch.Tensor, patch: int) -> torch.Tensor:
        """AM_θ (Eq. 6, 7): nearest-bank distance of every grid patch, averaged over the patches covering each pixel."""
        emb, ys, xs = self.embed_grid(images, patch)
        b, ny, nx, d = emb.shape
        index = self.index(patch)
        dist = index.nearest(emb.reshape(-1, d)).reshape(b, ny * nx).to(self.device)
        rescore_top(dist, emb.reshape(b, ny * nx, d), index, self.config.knn_rescore)
        scores = dist.reshape(b, ny, nx)
        h, w = images.shape[-2:]
        ry, rx = coverage(ys, patch, h, self.device), coverage(xs, patch, w, self.device)
        total = torch.einsum("ya,bac,xc->byx", ry, scores, rx)
        count = ry.sum(1)[:, None] * rx.sum(1)[None, :]
        return total / count

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images = images.to(self.device).contiguous(memory_format=torch.channels_last)   # once for every scale
        am = sum(self.scale_map(images, p) for p in self.config.scales)          # Eq. 8
        win = min(self.config.score_window, *am.shape[-2:])
        local = F.avg_pool2d(am[:, None], win, stride=self.config.score_stride)  # Eq. 9
        return local.flatten(1).amax(1), am

    # -- state -----------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {f"enc.{k}": v for k, v in self.encoders.state_dict().items()}
        out.update({f"bank.{p}": b for p, b in self.banks.items()})
        return out

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.encoders.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("enc.")})
        self.encoders.to(self.device).eval()
        self.banks = {int(k[5:]): v.to(self.device) for k, v in tensors.items() if k.startswith("bank.")}
        self._index = {}
