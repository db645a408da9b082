"""SLSG (Yang et al., "SLSG: Industrial Image Anomaly Detection with Improved Feature Embeddings
and One-Class Classification", Pattern Recognition 2024; paper text in shared/papers/slsg.txt).

Two networks share one ResNet-18 encoder (Sec. 4.2):

1. **GPT-Net** (generative pre-training, Sec. 3.1), trained in ``pretrain`` on the normal
   training images of *every* category of the dataset: a U-Net (ResNet-18 encoder, a decoder of
   four up-sampling blocks + conv blocks with skip connections) inpaints images whose grid
   patches are masked with probability p: Sec. 4.4 "uses patches of size 8×8 to randomly mask 80 % of
   the area (8-80 %)", and Tab. 4 compares patch sizes 4, 8 and 16 at 256 px, so the patch is 8×8
   *pixels* (32×32 patches at 256 px, ``grid_cell: 8``); ``grid_cell: null`` cuts the image into
   ``grid`` × ``grid`` cells instead (Sec. 4.2's "grids of 8×8" read as 8 cells per side: 32-px cells at
   256 px, the smoke profile's setting). On top, large rectangles (40–150 px
   at 256 px) are masked too, so the encoder must learn short- and long-range (positional,
   logical) relations of normal images. An auxiliary head reconstructs the image straight from
   the bottleneck (ℓ2, ``L_aux^R``) so the deep encoder layers are not bypassed by the skips; a
   PatchGAN ("Markov") discriminator D-Net adds a least-squares GAN loss for sharpness
   (Eq. 8, 9). Generator objective Eq. 10: L_R = α1·L_G + α2·ℓ1 + α3·L_aux^R (1, 0.8, 1).
   Only the encoder is kept (``backbone.safetensors``, torchvision layout); the whole GPT-Net
   and D-Net are written too (``gptnet.safetensors``).

2. **SegNet** (Sec. 3.2–3.4), trained per category in ``train``: the pre-trained encoder, the
   **SG block** on its deepest map, and a decoder of the same shape as GPT-Net's that outputs a
   one-channel anomaly logit map. Batches hold ``n_normal`` normal images (empty masks) and
   ``n_anomalous`` simulated anomalies from the shared synthesis cache (structural: Perlin ∧
   foreground masks filled from textures or the image's own permuted patches; logical: another
   normal image, rotated, through concentrated masks; transparency δ, Eq. 1 — see
   ``defectlab.synthesis``). ``synthesis: online`` (default and paper profiles) simulates every
   draw anew with the cache's settings (draw d is the synthesizer's sample d: 3 500 × 4 = 14 000
   distinct images in the paper's schedule, where a 1 000-image cache repeated each ~14 times;
   Sec. 3.2 asks for simulated anomalies "with a wider distribution"); ``cache`` draws with
   replacement from the cache (smoke: 200 × 2 draws from 32 images). Objective Eq. 11:
   L_S = α4·focal(γ=4) + α5·ℓ1 + α6·L_aux^S (0.4, 0.6, 0.3), SGD lr 0.04. ``L_aux^S`` (the paper names it without a formula): ℓ2 between
   the sigmoid of a 1×1 head on the SG block output and the mask area-averaged to that
   resolution, mirroring ``L_aux^R``. Engineering options for short (smoke) trainings, not in the
   paper: ``freeze_encoder`` (train only SG block + decoder: half the step time, and a few hundred
   steps of fine-tuning on batches of 4 wreck the encoder) and ``recalibrate_bn`` (the GPT-Net
   encoder's batch-norm statistics are those of 80 %-masked inputs; re-estimate them on the
   category's normal images first).

The SG block (Sec. 3.3, Fig. 4) on the encoder output X (N = h·w nodes):

* dense branch, Eq. 2–3: W_d = softmax(f(X) g(X)ᵀ / √d), Z = W_d h(X) (f, g, h: 1×1 convs);
* sparse branch (the part that targets logical anomalies): the graph's edges join each node to the K (= 9) nodes with the largest
  W_s = CosSim(f(X), g(X)ᵀ) − W_p (Eq. 5), where W_p = CosSim(P, Pᵀ) (Eq. 4) is the cosine
  similarity of 2-D sine-cosine position encodings: nodes similar only because they are
  spatial neighbours are demoted, so the graph links *distant* semantically alike parts
  (:func:`sparse_neighbours`). Aggregation by max-relative graph convolution, Eq. 6:
  v_i' = max_j (v_j − v_i) (:func:`max_relative_aggregate`);
* fusion, Eq. 7: X' = u([Z', V'']) with u a 1×1 conv (+ BN, ReLU). X' is the decoder input and
  is also fed, projected and upsampled, into every decoder block ("skip connections" of X').

Scoring (Sec. 4.2): the pixel map is the sigmoid of SegNet's output at input resolution; the
image score is the mean of its ``top_k`` (100) highest pixels.

Training randomness is drawn per step from generators seeded by (seed, stage, step), and both
trainings checkpoint into ``work_dir`` every ``checkpoint_every`` steps and resume from there,
so a resumed run equals an uninterrupted one.

DVC stages:

* ``pretrain`` (per dataset): GPT-Net + D-Net (:meth:`SLSG.pretrain`) ->
  ``checkpoints/slsg/<ds>/pretrain/`` (``backbone.safetensors`` = the encoder SegNet starts from);
* ``train`` (per category, ``trains_per_category``): SegNet on normal images + the category's
  synthesis cache (``data/synth/<ds>/<cat>``) (:meth:`SLSG.train`) ->
  ``checkpoints/slsg/<ds>/train/<cat>/trained.{safetensors,json}``;
* ``fit`` (per category): only loads that SegNet (:meth:`SLSG.fit`; SLSG has no bank or
  calibration step) and saves it as the fitted model ``models/slsg/<ds>/<cat>/``;
* ``evaluate``: :meth:`SLSG.predict` — sigmoid map and top-k image score.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from defectlab.backbones import backbone_for_fit, build_backbone, load_state_dict, save_backbone
from defectlab.resume import Checkpoint, image_files
from defectlab.config import StrictModel
from defectlab.data import ImageDataset
from defectlab.data.mvtec import Sample
from defectlab.errors import ConfigError
from defectlab.io import write_json
from defectlab.losses import focal_loss
from defectlab.resources import merge, substitute, synthesis_records
from defectlab.steplog import log_step
from defectlab.methods.base import AnomalyMethod, FitContext, PretrainContext

log = logging.getLogger(__name__)

#: channels of the ResNet-18 stages: stem (1/2), layer1 (1/4), layer2 (1/8), layer3 (1/16), layer4 (1/32)
ENCODER_CHANNELS = {"resnet18": (64, 64, 128, 256, 512)}
GPT_STAGE, SEG_STAGE = 1, 2


class SLSGConfig(StrictModel):
    # -- networks (Sec. 4.2) ----------------------------------------------------------------------
    backbone: str = Field("resnet18", description="encoder architecture (the paper: resnet18)")
    weights: str = Field("random", description="encoder weights before GPT-Net pretraining (random | imagenet | path)")
    decoder_channels: list[int] = Field([256, 128, 64, 64], min_length=4, max_length=4,
                                        description="output channels of the four decoder blocks (1/16 .. 1/2)")
    head_channels: int = Field(32, ge=4, description="channels of the full-resolution output block")
    # -- GPT-Net (Sec. 3.1, 3.4, 4.2) -----------------------------------------------------------
    grid_cell: int | None = Field(8, ge=1, description="side of a grid patch in pixels (Sec. 4.4: 8x8 patches, "
                                                         "8-80 %); null: use `grid` cells per side")
    grid: int = Field(8, ge=2, description="S: cells per side when grid_cell is null")
    grid_mask_ratio: float = Field(0.8, ge=0, le=1, description="p: share of grid cells masked")
    large_masks: int = Field(1, ge=0, description="large random rectangles masked on top of the grid mask")
    large_mask_frac: tuple[float, float] = Field((40 / 256, 150 / 256),
                                                 description="side of a large mask / image size (40-150 px at 256)")
    disc_width: int = Field(64, ge=4, description="D-Net first conv group channels")
    gpt_epochs: int = Field(40, ge=1)
    gpt_max_iters: int | None = Field(None, ge=1, description="cap on GPT-Net steps (None: gpt_epochs epochs)")
    gpt_batch: int = Field(6, ge=1)
    gpt_lr: float = Field(1e-3, gt=0, description="Adam lr of the generator (GPT-Net)")
    disc_lr: float = Field(6e-4, gt=0, description="Adam lr of the discriminator (D-Net)")
    alpha_adv: float = Field(1.0, ge=0, description="α1, LSGAN generator loss weight (Eq. 10)")
    alpha_rec: float = Field(0.8, ge=0, description="α2, ℓ1 reconstruction weight (Eq. 10)")
    alpha_aux_r: float = Field(1.0, ge=0, description="α3, bottleneck ℓ2 reconstruction weight (Eq. 10)")
    # -- SG block (Sec. 3.3) --------------------------------------------------------------------
    sg_block: bool = Field(True, description="False: SegNet without the SG block (ablation, Sec. 4.6)")
    knn: int = Field(9, ge=1, description="K, neighbours per node of the sparse graph")
    attn_reduction: int = Field(8, ge=1, description="z: f(X), g(X) have C_in / z channels")
    pos_dim: int = Field(64, ge=4, description="C_p, 2-D sine-cosine position encoding size (multiple of 4)")
    pos_temperature: float = Field(10000.0, gt=1)
    sg_skip_channels: int = Field(32, ge=0, description="channels of X' fed into every decoder block (0: off)")
    # -- SegNet training (Sec. 3.4, 4.2) ---------------------------------------------------------
    seg_iters: int = Field(3500, ge=1)
    n_normal: int = Field(4, ge=0, description="normal images per batch")
    n_anomalous: int = Field(4, ge=1, description="simulated anomalous images per batch")
    optimizer: Literal["sgd", "adam"] = Field("sgd", description="sgd as the paper; adam converges in fewer steps (smoke)")
    seg_lr: float = Field(0.04, gt=0, description="learning rate (the paper: SGD, 0.04)")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum (not given in the paper)")
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float | None = Field(None, gt=0, description="clip the gradient norm (None: off, as the paper)")
    freeze_encoder: bool = Field(False, description="keep the GPT-Net encoder fixed while training SegNet")
    recalibrate_bn: bool = Field(False, description="re-estimate the encoder's batch-norm statistics on the "
                                 "category's normal images before SegNet training (GPT-Net's are those of "
                                 "80 %-masked inputs; matters with freeze_encoder)")
    focal_gamma: float = Field(4.0, ge=0)
    alpha_focal: float = Field(0.4, ge=0, description="α4 (Eq. 11)")
    alpha_l1: float = Field(0.6, ge=0, description="α5 (Eq. 11)")
    alpha_aux_s: float = Field(0.3, ge=0, description="α6 (Eq. 11)")
    # -- simulated anomalies (Sec. 3.2) ---------------------------------------------------------
    synthesis: Literal["cache", "online"] = Field(
        "cache", description="cache: draw (with replacement) from the synthesize stage's cache; online: simulate "
                             "every draw anew with the cache's settings, so no simulated image repeats")
    synth_workers: int = Field(0, ge=0, description="DataLoader workers simulating the online draws ahead of the "
                                                    "training step (0: in the training loop)")
    # -- synthesis fallback (when the pipeline gives no synthesis cache) ------------------------
    synth_n: int = Field(64, ge=2, description="anomalies simulated in a temp cache when ctx.synth_dir is None")
    synth_structural: float = Field(0.5, ge=0, le=1, description="share of structural (vs logical) simulations")
    # -- scoring & engineering -------------------------------------------------------------------
    top_k: int = Field(100, ge=1, description="image score = mean of the top_k pixel scores")
    batch_size: int = Field(8, ge=1, description="prediction batch size")
    checkpoint_every: int = Field(500, ge=1)


# =============================================================================================
# SG block (Sec. 3.3)
# =============================================================================================
def sincos_position_encoding(h: int, w: int, dim: int, temperature: float = 10000.0,
                             device: torch.device | str | None = None) -> torch.Tensor:
    """2-D sine-cosine position encoding (MAE style): (h·w, dim), rows in raster order.

    Half the channels encode the row, half the column, each as sin/cos at ``dim/4`` frequencies
    ω_k = temperature^(-k / (dim/4)).
    """
    if dim % 4:
        raise ConfigError(f"pos_dim must be a multiple of 4, got {dim}")
    q = dim // 4
    omega = 1.0 / temperature ** (torch.arange(q, dtype=torch.float32, device=device) / q)
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32, device=device),
                            torch.arange(w, dtype=torch.float32, device=device), indexing="ij")
    ay = ys.reshape(-1, 1) * omega
    ax = xs.reshape(-1, 1) * omega
    return torch.cat([ay.sin(), ay.cos(), ax.sin(), ax.cos()], dim=1)


def positional_similarity(h: int, w: int, dim: int, temperature: float = 10000.0,
                          device: torch.device | str | None = None) -> torch.Tensor:
    """W_p = CosSim(P, Pᵀ) (Eq. 4): (N, N), 1 on the diagonal, high for spatial neighbours."""
    p = F.normalize(sincos_position_encoding(h, w, dim, temperature, device), dim=1)
    return p @ p.T


def sparse_neighbours(query: torch.Tensor, key: torch.Tensor, pos_sim: torch.Tensor | None, k: int) -> torch.Tensor:
    """Edges of the sparse graph: for every node the ``k`` nodes with the largest
    W_s = CosSim(query, keyᵀ) − W_p (Eq. 5).

    ``query``, ``key``: (B, N, C) node features (f(X), g(X)); ``pos_sim``: (N, N) W_p, or None for
    the purely semantic graph (what the paper argues against). Returns (B, N, k) node indices.
    """
    sim = F.normalize(query, dim=-1) @ F.normalize(key, dim=-1).transpose(1, 2)
    if pos_sim is not None:
        sim = sim - pos_sim
    return sim.topk(min(k, sim.shape[-1]), dim=-1).indices


def max_relative_aggregate(nodes: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
    """Max-relative graph convolution, Eq. 6: v_i' = max_j (v_j − v_i) over the node's neighbours.

    ``nodes`` (B, N, C), ``neighbours`` (B, N, K) -> (B, N, C).
    """
    b, n, c = nodes.shape
    k = neighbours.shape[-1]
    gathered = torch.gather(nodes, 1, neighbours.reshape(b, n * k, 1).expand(-1, -1, c)).reshape(b, n, k, c)
    return (gathered - nodes.unsqueeze(2)).amax(dim=2)


class SGBlock(nn.Module):
    """Self-attention-based graph convolution block (Fig. 4): dense + sparse branches, fused."""

    def __init__(self, channels: int, *, knn: int = 9, reduction: int = 8, pos_dim: int = 64,
                 pos_temperature: float = 10000.0):
        super().__init__()
        inner = max(1, channels // reduction)
        self.f = nn.Conv2d(channels, inner, 1)     # query
        self.g = nn.Conv2d(channels, inner, 1)     # key
        self.h = nn.Conv2d(channels, channels, 1)  # value (C_out = C_in)
        self.u = nn.Sequential(nn.Conv2d(2 * channels, channels, 1, bias=False), nn.BatchNorm2d(channels),
                               nn.ReLU(inplace=True))
        self.knn, self.pos_dim, self.pos_temperature = knn, pos_dim, pos_temperature
        self.scale = 1.0 / math.sqrt(inner)
        self.last_neighbours: torch.Tensor | None = None   # (B, N, K) of the last forward, for inspection

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        q = self.f(x).flatten(2).transpose(1, 2)           # (B, N, C/z)
        kk = self.g(x).flatten(2).transpose(1, 2)          # (B, N, C/z)
        v = self.h(x).flatten(2).transpose(1, 2)           # (B, N, C)
        w_d = torch.softmax(q @ kk.transpose(1, 2) * self.scale, dim=-1)   # Eq. 2
        z = (w_d @ v).transpose(1, 2).reshape(b, c, hh, ww)                # Eq. 3 -> Z'
        pos = positional_similarity(hh, ww, self.pos_dim, self.pos_temperature, x.device)
        idx = sparse_neighbours(q, kk, pos, self.knn)                       # Eq. 4, 5
        self.last_neighbours = idx.detach()
        nodes = x.flatten(2).transpose(1, 2)
        v2 = max_relative_aggregate(nodes, idx).transpose(1, 2).reshape(b, c, hh, ww)  # Eq. 6 -> V''
        return self.u(torch.cat([z, v2], dim=1))                           # Eq. 7


# =============================================================================================
# Networks
# =============================================================================================
def conv_group(cin: int, cout: int) -> nn.Sequential:
    """Convolution group of Sec. 4.2: 3x3 conv, batch norm, ReLU."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Encoder(nn.Module):
    """ResNet-18 trunk returning the five stage outputs (1/2 .. 1/32); torchvision parameter names."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.conv1, self.bn1, self.relu, self.maxpool = model.conv1, model.bn1, model.relu, model.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = model.layer1, model.layer2, model.layer3, model.layer4

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        s0 = self.relu(self.bn1(self.conv1(x)))
        s1 = self.layer1(self.maxpool(s0))
        s2 = self.layer2(s1)
        s3 = self.layer3(s2)
        return [s0, s1, s2, s3, self.layer4(s3)]


class Decoder(nn.Module):
    """Four (up-sampling block + conv block) stages with U-Net skips, then a full-resolution head.

    Up-sampling block: bilinear x2 + conv group; conv block: two conv groups on [up, skip, extra]
    where ``extra`` is the SG block output X' (projected to ``extra_channels``) for SegNet.
    """

    def __init__(self, enc: tuple[int, ...], channels: list[int], head: int, out_channels: int, extra_channels: int = 0):
        super().__init__()
        self.up, self.conv = nn.ModuleList(), nn.ModuleList()
        cin = enc[4]
        for skip, cout in zip(reversed(enc[:4]), channels):
            self.up.append(conv_group(cin, cout))
            self.conv.append(nn.Sequential(conv_group(cout + skip + extra_channels, cout), conv_group(cout, cout)))
            cin = cout
        self.head = nn.Sequential(conv_group(cin, head), nn.Conv2d(head, out_channels, 3, padding=1))

    def forward(self, feats: list[torch.Tensor], bottleneck: torch.Tensor, extra: torch.Tensor | None = None):
        x = bottleneck
        for i, skip in enumerate(reversed(feats[:4])):
            x = self.up[i](F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False))
            parts = [x, skip]
            if extra is not None:
                parts.append(F.interpolate(extra, size=skip.shape[-2:], mode="bilinear", align_corners=False))
            x = self.conv[i](torch.cat(parts, dim=1))
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        return self.head(x)


class GPTNet(nn.Module):
    """Inpainting U-Net (the generator): masked image -> (reconstruction, bottleneck reconstruction)."""

    def __init__(self, cfg: SLSGConfig, encoder_model: nn.Module):
        super().__init__()
        enc = ENCODER_CHANNELS[cfg.backbone]
        self.encoder = Encoder(encoder_model)
        self.decoder = Decoder(enc, cfg.decoder_channels, cfg.head_channels, 3)
        self.aux = nn.Conv2d(enc[4], 3, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.encoder(x)
        out = self.decoder(feats, feats[4])
        aux = F.interpolate(self.aux(feats[4]), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return out, aux


class Discriminator(nn.Module):
    """D-Net: PatchGAN (Markov) discriminator, four conv groups then a one-channel map (Sec. 4.2)."""

    def __init__(self, width: int = 64):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(3, w, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(w, 2 * w, 4, 2, 1, bias=False), nn.BatchNorm2d(2 * w), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(2 * w, 4 * w, 4, 2, 1, bias=False), nn.BatchNorm2d(4 * w), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(4 * w, 8 * w, 3, 1, 1, bias=False), nn.BatchNorm2d(8 * w), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(8 * w, 1, 3, 1, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class SegNet(nn.Module):
    """Encoder -> SG block -> decoder (X' also fed to every decoder block) -> anomaly logits."""

    def __init__(self, cfg: SLSGConfig, encoder_model: nn.Module):
        super().__init__()
        enc = ENCODER_CHANNELS[cfg.backbone]
        self.encoder = Encoder(encoder_model)
        self.sg = SGBlock(enc[4], knn=cfg.knn, reduction=cfg.attn_reduction, pos_dim=cfg.pos_dim,
                          pos_temperature=cfg.pos_temperature) if cfg.sg_block else nn.Identity()
        extra = cfg.sg_skip_channels
        self.sg_skip = conv_group(enc[4], extra) if extra else None
        self.decoder = Decoder(enc, cfg.decoder_channels, cfg.head_channels, 1, extra_channels=extra)
        self.aux = nn.Conv2d(enc[4], 1, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (logits (B, 1, H, W), bottleneck logits (B, 1, H/32, W/32))."""
        feats = self.encoder(x)
        xp = self.sg(feats[4])
        extra = self.sg_skip(xp) if self.sg_skip is not None else None
        return self.decoder(feats, xp, extra), self.aux(xp)


# =============================================================================================
# Losses and masks
# =============================================================================================
def inpainting_mask(b: int, size: int, cfg: SLSGConfig, gen: torch.Generator) -> torch.Tensor:
    """(B, 1, size, size) float mask, 1 = hidden: grid patches (``grid_cell`` px, or ``grid`` per side)
    hidden with prob. p, plus large rectangles."""
    n = -(-size // cfg.grid_cell) if cfg.grid_cell else cfg.grid
    cells = (torch.rand(b, 1, n, n, generator=gen) < cfg.grid_mask_ratio).float()
    if cfg.grid_cell:   # whole patches of grid_cell px (the last row / column cut at the border)
        mask = cells.repeat_interleave(cfg.grid_cell, 2).repeat_interleave(cfg.grid_cell, 3)[..., :size, :size]
    else:
        mask = F.interpolate(cells, size=(size, size), mode="nearest")
    lo, hi = cfg.large_mask_frac
    for i in range(b):
        for _ in range(cfg.large_masks):
            rh, rw = (torch.rand(2, generator=gen) * (hi - lo) + lo).mul(size).round().clamp(1, size).long().tolist()
            top = int(torch.randint(0, size - rh + 1, (1,), generator=gen))
            left = int(torch.randint(0, size - rw + 1, (1,), generator=gen))
            mask[i, :, top:top + rh, left:left + rw] = 1.0
    return mask


def lsgan_generator_loss(d_fake: torch.Tensor) -> torch.Tensor:
    """Eq. 8: L_G = ½ (D(G(x_m)) − 1)²."""
    return 0.5 * (d_fake - 1).pow(2).mean()


def lsgan_discriminator_loss(d_fake: torch.Tensor, d_real: torch.Tensor) -> torch.Tensor:
    """Eq. 9: L_D = ½ D(G(x_m))² + ½ (D(x) − 1)²."""
    return 0.5 * d_fake.pow(2).mean() + 0.5 * (d_real - 1).pow(2).mean()


def segnet_losses(logits: torch.Tensor, aux_logits: torch.Tensor, mask: torch.Tensor, cfg: SLSGConfig) -> dict[str, torch.Tensor]:
    """Eq. 11 terms: focal (γ), ℓ1 between probability map and mask, bottleneck ℓ2; and their weighted sum."""
    focal = focal_loss(logits, mask, gamma=cfg.focal_gamma)
    l1 = (torch.sigmoid(logits) - mask).abs().mean()
    small = F.adaptive_avg_pool2d(mask, aux_logits.shape[-2:])
    aux = F.mse_loss(torch.sigmoid(aux_logits), small)
    total = cfg.alpha_focal * focal + cfg.alpha_l1 * l1 + cfg.alpha_aux_s * aux
    return {"loss": total, "focal": focal, "l1": l1, "aux": aux}


def top_k_score(maps: torch.Tensor, k: int) -> torch.Tensor:
    """Image score: mean of the k highest pixel scores of each (B, H, W) map."""
    flat = maps.flatten(1)
    return flat.topk(min(k, flat.shape[1]), dim=1).values.mean(1)


# =============================================================================================
# Helpers
# =============================================================================================
def _stack(dataset, indices) -> dict[str, torch.Tensor]:
    items = [dataset[int(i)] for i in indices]
    return {"image": torch.stack([it["image"] for it in items]), "mask": torch.stack([it["mask"] for it in items])}


def _thin(values: list[float], n: int = 500) -> list[float]:
    """At most ``n`` evenly spaced entries (loss curves stored in JSON)."""
    idx = np.unique(np.linspace(0, len(values) - 1, min(n, len(values))).round().astype(int)) if values else []
    return [round(float(values[i]), 6) for i in idx]


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


class SLSG(AnomalyMethod):
    name = "slsg"
    Config = SLSGConfig
    trains_in_pretrain = True
    trains_per_category = True

    def __init__(self, config: SLSGConfig, device="cpu"):
        super().__init__(config, device)
        if config.backbone not in ENCODER_CHANNELS:
            raise ConfigError(f"slsg.backbone: {config.backbone!r} not supported; valid: {', '.join(ENCODER_CHANNELS)}")
        self.net: SegNet | None = None

    # -- GPT-Net pretraining (Sec. 3.1) -------------------------------------------------------
    @classmethod
    def pretrain(cls, config: SLSGConfig, ctx: PretrainContext) -> dict:
        from tqdm.auto import tqdm

        cfg, device = config, ctx.device
        if cfg.backbone not in ENCODER_CHANNELS:
            raise ConfigError(f"slsg.backbone: {cfg.backbone!r} not supported; valid: {', '.join(ENCODER_CHANNELS)}")
        samples = [Sample(p, 0, "good") for cat in ctx.categories for p in ctx.train_images(cat)]
        data = ImageDataset(samples, ctx.image_size)
        steps_per_epoch = math.ceil(len(data) / cfg.gpt_batch)
        total = cfg.gpt_epochs * steps_per_epoch
        if cfg.gpt_max_iters is not None:
            total = min(total, cfg.gpt_max_iters)

        torch.manual_seed(ctx.seed)
        encoder_model = build_backbone(cfg.backbone, cfg.weights, seed=ctx.seed, dataset=ctx.dataset)
        gen_net, disc = GPTNet(cfg, encoder_model).to(device), Discriminator(cfg.disc_width).to(device)
        opt_g = torch.optim.Adam(gen_net.parameters(), lr=cfg.gpt_lr)
        opt_d = torch.optim.Adam(disc.parameters(), lr=cfg.disc_lr)
        ckpt = Checkpoint(ctx.work_dir, "slsg-gptnet", cls.phase_config(cfg, "pretrain"), ctx.seed, ctx.image_size,
                          image_files(samples), gen_net, disc)
        history: dict[str, list[float]] = {"loss": [], "l1": [], "adv": [], "aux": [], "disc": []}
        start = 0
        state = ckpt.load()
        if state is not None:
            gen_net.load_state_dict(state["gen"])
            disc.load_state_dict(state["disc"])
            opt_g.load_state_dict(state["opt_g"])
            opt_d.load_state_dict(state["opt_d"])
            history = {k: list(v) for k, v in state["history"].items()}
            start = int(state["step"])
            log.info("slsg: GPT-Net resumes at step %d / %d", start, total)
        gen_net.train()
        disc.train()
        t0 = time.perf_counter()
        for step in tqdm(range(start, total), desc="slsg gpt-net", disable=not ctx.progress, initial=start, total=total):
            epoch, pos = divmod(step, steps_per_epoch)
            order = np.random.default_rng([ctx.seed, GPT_STAGE, epoch]).permutation(len(data))
            batch = _stack(data, order[pos * cfg.gpt_batch:(pos + 1) * cfg.gpt_batch])
            x = batch["image"].to(device)
            gen = torch.Generator().manual_seed(int(np.random.default_rng([ctx.seed, GPT_STAGE, step]).integers(2**62)))
            hidden = inpainting_mask(x.shape[0], x.shape[-1], cfg, gen).to(device)
            x_masked = x * (1 - hidden)   # hidden pixels = 0 = the ImageNet mean colour
            recon, aux = gen_net(x_masked)

            # discriminator step (Eq. 9)
            opt_d.zero_grad(set_to_none=True)
            loss_d = lsgan_discriminator_loss(disc(recon.detach()), disc(x))
            loss_d.backward()
            opt_d.step()

            # generator step (Eq. 8, 10)
            opt_g.zero_grad(set_to_none=True)
            adv = lsgan_generator_loss(disc(recon))
            l1 = (recon - x).abs().mean()
            aux_loss = F.mse_loss(aux, x)
            loss = cfg.alpha_adv * adv + cfg.alpha_rec * l1 + cfg.alpha_aux_r * aux_loss
            loss.backward()
            opt_g.step()
            for k, v in (("loss", loss), ("l1", l1), ("adv", adv), ("aux", aux_loss), ("disc", loss_d)):
                history[k].append(float(v.detach()))
            log_step("loss/slsg_gptnet", history["loss"][-1], step, total)
            log_step("loss/slsg_disc", history["disc"][-1], step, total)
            if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < total:
                ckpt.save({"gen": gen_net.state_dict(), "disc": disc.state_dict(), "opt_g": opt_g.state_dict(),
                           "opt_d": opt_d.state_dict(), "step": step + 1, "history": history})
        seconds = time.perf_counter() - t0

        # outputs: the encoder as a torchvision backbone (read by fit through backbone_for_fit),
        # and the whole GPT-Net + D-Net for inspection / reuse
        from safetensors.torch import save_file

        enc_model = build_backbone(cfg.backbone, "random", seed=ctx.seed)
        missing, unexpected = enc_model.load_state_dict(gen_net.encoder.state_dict(), strict=False)
        assert not unexpected and all(k.startswith("fc.") for k in missing), (missing, unexpected)
        save_backbone(enc_model, ctx.out_dir / "backbone.safetensors", cfg.backbone, {"weights": "slsg-gptnet"})
        tensors = {f"gen.{k}": v.detach().cpu().contiguous() for k, v in gen_net.state_dict().items()}
        tensors.update({f"disc.{k}": v.detach().cpu().contiguous() for k, v in disc.state_dict().items()})
        save_file(tensors, str(ctx.out_dir / "gptnet.safetensors"))
        tenth = max(1, len(history["loss"]) // 10)
        stats = {
            "gpt_steps": float(total), "gpt_images": float(len(data)), "gpt_seconds": seconds,
            "gpt_loss_first": _mean(history["loss"][:tenth]), "gpt_loss_last": _mean(history["loss"][-tenth:]),
            "gpt_l1_first": _mean(history["l1"][:tenth]), "gpt_l1_last": _mean(history["l1"][-tenth:]),
            "gpt_aux_last": _mean(history["aux"][-tenth:]), "gpt_disc_last": _mean(history["disc"][-tenth:]),
        }
        write_json(ctx.out_dir / "gptnet.json", {"stats": stats, "history": {k: _thin(v) for k, v in history.items()}})
        ckpt.remove()
        return stats

    # -- SegNet training (Sec. 3.2-3.4) -------------------------------------------------------
    def _build(self, encoder_model: nn.Module) -> None:
        self.net = SegNet(self.config, encoder_model).to(self.device)

    def train(self, ctx: FitContext) -> dict:
        """The `train` stage: SegNet on the category's normal images + the simulated anomalies of
        ``ctx.synth_dir`` (a small temporary cache is simulated when there is none), starting from
        the GPT-Net encoder of ``ctx.pretrain_dir``."""
        from tqdm.auto import tqdm

        from defectlab.synthesis.cache import OnlineSynthDataset, SynthDataset, Synthesizer, build_cache

        cfg, device = self.config, ctx.device
        self.device = torch.device(device)
        pretrained = ctx.pretrain_dir is not None and (Path(ctx.pretrain_dir) / "backbone.safetensors").exists()
        if not pretrained:       # an error in the paper profile; else recorded with the model
            self.meta["substitutions"] = merge(self.meta.get("substitutions"), [substitute(
                "slsg.gptnet", f"SegNet encoder from {cfg.weights} weights instead of the GPT-Net encoder",
                f"the GPT-Net checkpoint backbone.safetensors in {ctx.pretrain_dir} (run the pretrain stage: "
                f"dvc repro pretrain@slsg-{ctx.dataset})")])
        torch.manual_seed(ctx.seed)
        encoder_model = backbone_for_fit(cfg.backbone, cfg.weights, ctx.pretrain_dir, seed=ctx.seed, dataset=ctx.dataset)
        self._build(encoder_model)
        self.meta.update({"encoder": "gptnet" if pretrained else cfg.weights, "image_size": ctx.image_size})

        tmp_dir = None
        synth_dir = ctx.synth_dir
        train_paths = [s.path for s in ctx.data.train]
        kinds = {"structural": cfg.synth_structural, "logical": 1 - cfg.synth_structural}
        fallback = dict(seed=ctx.seed, image_size=ctx.image_size, kinds={k: v for k, v in kinds.items() if v > 0},
                        object_kind=ctx.extra.get("object_kind", "object"))
        if synth_dir is None and cfg.synthesis == "cache":   # no cache from the synthesize stage: simulate one now
            tmp_dir = tempfile.TemporaryDirectory(prefix="slsg-synth-")
            synth_dir = Path(tmp_dir.name) / "cache"
            build_cache(train_paths, synth_dir, n=cfg.synth_n, **fallback)
        try:
            normal = ImageDataset(ctx.data.train, ctx.image_size)
            if cfg.synthesis == "online":   # the synthesize stage's settings (or the fallback's), every draw new
                simulator = (Synthesizer.like_cache(synth_dir, train_paths) if synth_dir is not None
                             else Synthesizer(train_paths, **fallback))
                synth = OnlineSynthDataset(simulator, ctx.image_size, n=cfg.seg_iters * cfg.n_anomalous)
                records = simulator.substitutions(ctx.category)
            else:
                synth = SynthDataset(synth_dir, ctx.image_size)
                records = synthesis_records(synth_dir)
            # procedural textures / whole-image foregrounds of the samples it trains on
            self.meta["substitutions"] = merge(self.meta.get("substitutions"), records)
            if len(synth) == 0:
                raise ConfigError(f"{synth_dir}: synthesis cache is empty")
            if cfg.recalibrate_bn:
                self._recalibrate_encoder_bn(normal)
            stats = self._train_segnet(normal, synth, ctx, tqdm)
        finally:
            if tmp_dir is not None:
                tmp_dir.cleanup()
        self.net.eval()
        return stats

    @torch.no_grad()
    def _recalibrate_encoder_bn(self, normal, batch: int = 8) -> None:
        """Batch-norm running statistics of the encoder from the normal training images (cumulative
        average over one pass); the encoder's weights are unchanged."""
        enc = self.net.encoder
        bns = [m for m in enc.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        momenta = [m.momentum for m in bns]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
        enc.train()
        for i in range(0, len(normal), batch):
            enc(_stack(normal, range(i, min(i + batch, len(normal))))["image"].to(self.device))
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        enc.eval()

    def trained_tensors(self) -> dict[str, torch.Tensor]:
        if self.net is None:
            raise RuntimeError("slsg: trained_tensors before train")
        return {f"segnet.{k}": v for k, v in self.net.state_dict().items()}

    def load_trained_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.load_tensors(tensors)

    #: config fields only ``predict`` reads: changing them needs no retraining
    PREDICT_ONLY_FIELDS = frozenset({"top_k", "batch_size"})
    TRAIN_IGNORES = PREDICT_ONLY_FIELDS
    #: GPT-Net pretraining does not read the SG block, SegNet training, synthesis or scoring settings
    PRETRAIN_IGNORES = frozenset({"sg_block", "knn", "attn_reduction", "pos_dim", "pos_temperature",
                                  "sg_skip_channels", "seg_iters", "n_normal", "n_anomalous", "optimizer", "seg_lr",
                                  "momentum", "weight_decay", "grad_clip", "freeze_encoder", "recalibrate_bn",
                                  "focal_gamma", "alpha_focal", "alpha_l1", "alpha_aux_s", "synth_n",
                                  "synth_structural", "synthesis"}) | PREDICT_ONLY_FIELDS
    RESULT_NEUTRAL = frozenset({"checkpoint_every", "synth_workers"})

    def fit(self, ctx: FitContext) -> dict:
        """The `fit` stage: load the SegNet the `train` stage wrote (``ctx.train_dir``); SLSG has no
        further fitting step (its scores come straight from SegNet), so nothing is trained here."""
        self.device = torch.device(ctx.device)
        self.load_trained(ctx.train_dir)
        size = self.meta.get("image_size")
        if size is not None and int(size) != int(ctx.image_size):
            raise ConfigError(f"{ctx.train_dir}: SegNet was trained at {size} px, the fit asks for {ctx.image_size} px; "
                              f"rerun the train stage")
        self.meta["image_size"] = ctx.image_size
        train_stats = self.meta.get("train", {})
        return {"seg_steps": float(train_stats.get("seg_steps", self.config.seg_iters)),
                "loss_last": float(train_stats.get("loss_last", float("nan")))}

    def _train_segnet(self, normal, synth, ctx: FitContext, tqdm) -> dict:
        cfg, net, device = self.config, self.net, self.device
        if cfg.freeze_encoder:
            for p in net.encoder.parameters():
                p.requires_grad_(False)
        params = [p for p in net.parameters() if p.requires_grad]
        if cfg.optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=cfg.seg_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        else:
            opt = torch.optim.Adam(params, lr=cfg.seg_lr, weight_decay=cfg.weight_decay)
        online = cfg.synthesis == "online"
        synth_inputs = synth.synth.settings() if online else image_files(r["image"] for r in synth.rows)
        ckpt = Checkpoint(ctx.work_dir, f"slsg-segnet-{ctx.category}", self.phase_config(cfg, "train"), ctx.seed,
                          ctx.image_size, image_files(ctx.data.train), synth_inputs, net)
        if not online and cfg.seg_iters * cfg.n_anomalous > len(synth):
            log.info("slsg: %d simulated-image draws from a cache of %d: images repeat (synthesis: online avoids it)",
                     cfg.seg_iters * cfg.n_anomalous, len(synth))
        drawn: set[int] = set()
        n_anom = cfg.n_anomalous
        history: dict[str, list[float]] = {"loss": [], "focal": [], "l1": [], "aux": []}
        start = 0
        state = ckpt.load(device)
        if state is not None:
            net.load_state_dict(state["net"])
            opt.load_state_dict(state["opt"])
            history = {k: list(v) for k, v in state["history"].items()}
            start = int(state["step"])
        online_batches = iter(torch.utils.data.DataLoader(   # step i's draws, simulated ahead by synth_workers
            synth, batch_sampler=[list(range(i * n_anom, (i + 1) * n_anom)) for i in range(start, cfg.seg_iters)],
            num_workers=cfg.synth_workers)) if online else None
        net.train()
        if cfg.freeze_encoder:
            net.encoder.eval()
        t0 = time.perf_counter()
        for step in tqdm(range(start, cfg.seg_iters), desc=f"slsg segnet {ctx.category}", disable=not ctx.progress,
                         initial=start, total=cfg.seg_iters):
            rng = np.random.default_rng([ctx.seed, SEG_STAGE, step])
            parts = []
            if cfg.n_normal:
                parts.append(_stack(normal, rng.integers(len(normal), size=cfg.n_normal)))
            # online: draw d = step·n_anomalous + j is simulated sample d, never repeated; cache: with replacement
            if online:
                drawn.update(range(step * n_anom, (step + 1) * n_anom))
                parts.append(next(online_batches))
            else:
                picks = rng.integers(len(synth), size=n_anom)
                drawn.update(int(i) for i in picks)
                parts.append(_stack(synth, picks))
            x = torch.cat([p["image"] for p in parts]).to(device)
            mask = torch.cat([p["mask"] for p in parts]).to(device)
            logits, aux = net(x)
            losses = segnet_losses(logits, aux, mask, cfg)
            opt.zero_grad(set_to_none=True)
            losses["loss"].backward()
            if cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            for k, v in losses.items():
                history[k].append(float(v.detach()))
            log_step("loss/slsg_segnet", history["loss"][-1], step, cfg.seg_iters)
            if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.seg_iters:
                ckpt.save({"net": net.state_dict(), "opt": opt.state_dict(), "step": step + 1, "history": history})
        ckpt.remove()
        tenth = max(1, len(history["loss"]) // 10)
        self.meta["loss_history"] = _thin(history["loss"])
        return {
            "seg_steps": float(cfg.seg_iters), "seg_seconds": time.perf_counter() - t0,
            "synthetic_images": float(len(synth)), "normal_images": float(len(normal)),
            # draws this run made and how many distinct simulated images they were (equal: no repeats)
            "synthetic_draws": float((cfg.seg_iters - start) * cfg.n_anomalous), "synthetic_distinct": float(len(drawn)),
            **{f"{k}_first": _mean(v[:tenth]) for k, v in history.items()},
            **{f"{k}_last": _mean(v[-tenth:]) for k, v in history.items()},
        }

    # -- scoring ------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.net is None:
            raise RuntimeError("slsg: predict before fit / load")
        self.net.eval()
        logits, _ = self.net(images.to(self.device))
        maps = torch.sigmoid(logits[:, 0])
        if maps.shape[-2:] != images.shape[-2:]:
            maps = F.interpolate(maps[:, None], size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        return top_k_score(maps, self.config.top_k), maps

    # -- persistence --------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {f"segnet.{k}": v for k, v in self.net.state_dict().items()}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self._build(build_backbone(self.config.backbone, "random"))
        self.net.load_state_dict({k[len("segnet."):]: v for k, v in tensors.items() if k.startswith("segnet.")})
        self.net.eval()


def load_gptnet(config: SLSGConfig, pretrain_dir: str | Path, device: torch.device | str = "cpu") -> GPTNet:
    """The trained GPT-Net (generator) from a pretrain directory, e.g. to look at its inpaintings."""
    tensors = load_state_dict(Path(pretrain_dir) / "gptnet.safetensors")
    net = GPTNet(config, build_backbone(config.backbone, "random"))
    net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("gen.")})
    return net.to(device).eval()


__all__ = ["SLSG", "SLSGConfig", "SGBlock", "GPTNet", "SegNet", "Discriminator", "sparse_neighbours",
                      "max_relative_aggregate", "positional_similarity", "sincos_position_encoding",
                      "inpainting_mask", "segnet_losses", "top_k_score", "load_gptnet"]
