"""DSR (Zavrtanik, Kristan, Skočaj, "DSR – A dual subspace re-projection network for surface
anomaly detection", ECCV 2022).

An image is encoded into two quantized feature maps (Sec. 3.1, Fig. 3): ``Q_lo`` at 1/8 of the
image resolution (low-resolution codebook K_lo) and ``Q_hi`` at 1/4 (high-resolution codebook
K_hi, computed from the encoder's 1/4 features concatenated with the upsampled ``Q_lo``). Two
decoders read them: the *general appearance decoder* (Sec. 3.2) reconstructs any natural image
(``I_gen``); the *object-specific decoder* (Sec. 3.3) first pushes each map through a
*subspace restriction module* (an encoder-decoder) and re-quantizes it with the same codebooks,
so only configurations seen on normal images of the object survive, then decodes ``I_spc``.
The *anomaly detection module* (Sec. 3.4), a U-Net on [I_spc, I_gen], outputs the anomaly
mask ``M`` at feature resolution; the *upsampling module* (Sec. 3.5), a U-Net on [I, up(M)],
refines it to the full-resolution mask ``M_r``.

Training has three stages (Sec. 3.7), one per DVC stage:

1. ``pretrain`` (DVC `pretrain`, dataset-level, shared by all categories): the encoder, both
   codebooks and the general decoder learn to reconstruct a *general* image set (ImageNet in
   the paper; here any image folder, by default every category's normal training images plus
   procedural textures) with the VQ-VAE loss of Eq. 2: reconstruction + codebook +
   λ1·commitment, with straight-through gradients. The codebooks are updated by that loss
   (``codebook_update: loss``, as Eq. 2 says) or by exponential moving averages (``ema``, as
   the authors' code). Each step logs, per codebook, the share of codes the batch uses and the
   perplexity of its assignments (:func:`code_statistics`). Output: ``vq.safetensors`` (with
   each code's usage, a moving average of assignments per step) + ``vq.json``.
2. ``train`` (DVC `train`, per category), stage 2: with stage 1 frozen (read from
   ``ctx.pretrain_dir``), anomalies are generated *in feature space* (Sec. 3.6): inside a
   Perlin mask the quantized features are replaced by codebook vectors near, but not at, the
   original (:func:`sample_near_codes`), drawn among the codes stage 1 left live
   (``live_code_share``: a dead code lies outside the learnt subspace, so drawing it would not
   make a near-in-distribution anomaly; the paper leaves this open, the authors' release samples
   every code). Restriction modules, object decoder and detection
   module are trained with Eq. 3: focal(M_gt, M) + λ2·L2(F̃, Q) + λ3·L2(I, I_spc), with Q and I
   the anomaly-free features and image. ``trained_tensors`` = the frozen stage-1 weights it was
   trained on plus the stage-2 modules (everything but the upsampling module), so stage 3
   needs nothing else; the stage output is ``checkpoints/dsr/<ds>/train/<cat>/``.
3. ``fit`` (DVC `fit`, per category), stage 3: ``load_trained(ctx.train_dir)`` restores stages
   1-2 (stage 2 is never retrained here), then the upsampling module is trained with focal loss
   on images with pasted *smudges* (Perlin-shaped patches of a random colour, partly
   transparent), whose full-resolution masks are known, through the frozen stage 1 and 2
   networks. The fitted model (all modules) goes to ``models/dsr/<ds>/<cat>/``.

``evaluate`` (DVC `evaluate`) loads that model and calls ``predict``.

Scoring (Sec. 3.4): the image score is the maximum of ``M`` (upsampled to the image) smoothed
by a 21×21 mean filter; the pixel map is ``M_r``.

Choices the paper leaves open (the authors' code may differ): the detection module sees I_spc
detached, so the object decoder is trained by the two reconstruction terms of Eq. 3 only; the
subspace restriction modules have three conv blocks (two poolings), which needs the image side
to be a multiple of 32 and at least 64; ``upsampling_residual`` (off in ``paper``) lets a
short stage 3 start from M instead of from an untrained network.

There is no cache of its own: each stage's output is a DVC output, cached by DVC. ``fit``
accepts a train output whose config differs from its own only in stage-3 and scoring settings
(``same_training_config``), so outside DVC such a change needs no new stage 2. Each stage
also writes a resumable checkpoint (weights + optimiser) every ``checkpoint_every`` steps into
``ctx.work_dir``, named by a hash of its inputs, resumes from it and removes it once done. Every step's randomness is
drawn from a generator seeded by (seed, stage, step), so a resumed run is identical to an
uninterrupted one.

Optional supervision (Sec. 4.2, "Extension to supervised learning"): with ``n_supervised`` = N
> 0, N annotated anomalous *training* images are drawn by ``train`` from the category's
``labelled/`` split (KolektorSDD2's 246 defective training images, Table 2: N = 0, 16, 53, 126,
246; never from the test split) and used in stage 2 next to the generated anomalies (their masks
supervise the detection module; they take no part in the reconstruction losses, which need an
anomaly-free target). They are listed in ``meta['supervised_images']``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from defectlab.config import StrictModel
from defectlab.data import load_image
from defectlab.data.mvtec import IMAGE_EXTS, IMAGENET_MEAN, IMAGENET_STD
from defectlab.data.transform import hw
from defectlab.errors import ConfigError, ResourceMissingError
from defectlab.io import sha256_file, write_json
from defectlab.losses import focal_loss
from defectlab.memory import knn
from defectlab.methods.base import AnomalyMethod, FitContext, PretrainContext, make_loader
from defectlab.resume import Checkpoint, image_files
from defectlab.steplog import log_step
from defectlab.resources import substitute
from defectlab.synthesis import blend, perlin_mask, procedural_texture

log = logging.getLogger(__name__)

STAGE1, STAGE2, STAGE3 = 1, 2, 3


class DSRConfig(StrictModel):
    # -- stage 1: quantized latent space encoder, codebooks, general decoder (Sec. 3.1, 3.2) ----
    general_images: str | None = Field(
        None, description="folder of general images for stage 1 (ImageNet in the paper); None: every "
                          "category's normal train images + procedural textures")
    n_procedural_textures: int = Field(256, ge=0, description="procedural textures in the default general set")
    hidden: int = Field(128, ge=8, description="encoder / general decoder channels")
    residual_hidden: int = Field(64, ge=4)
    residual_layers: int = Field(2, ge=0)
    embedding_dim: int = Field(128, ge=4, description="d, codebook vector size")
    codebook_size: int = Field(4096, ge=8, description="K, vectors per codebook (K_lo and K_hi)")
    commitment: float = Field(0.25, ge=0, description="λ1 in Eq. 2 (the VQ-VAE commitment weight β)")
    codebook_update: Literal["loss", "ema"] = "loss"
    ema_decay: float = Field(0.99, gt=0, lt=1, description="decay of the codebook moving averages (usage, EMA updates)")
    dead_code_threshold: float = Field(0.0, ge=0, description="restart codes used less often (assignments per step); 0: off")
    stage1_iters: int = Field(200_000, ge=1)
    stage1_batch: int = Field(32, ge=1)
    stage1_lr: float = Field(2e-4, gt=0)
    # -- stage 2: object-specific decoder and anomaly detection module (Sec. 3.3, 3.4, 3.6) ------
    restriction_width: int = Field(128, ge=4, description="subspace restriction module base width")
    decoder_width: int = Field(512, ge=8, description="object-specific decoder first block width")
    detection_width: int = Field(64, ge=4, description="anomaly detection U-Net base width")
    stage2_iters: int = Field(100_000, ge=1)
    stage2_batch: int = Field(8, ge=1)
    stage2_lr: float = Field(2e-4, gt=0)
    stage2_lr_drop_at: int = Field(80_000, ge=0, description="iteration after which the lr is divided by 10")
    lambda_s: float = Field(0.05, ge=0, lt=1, description="similarity bound: the λ_s·K nearest codes are never sampled")
    live_code_share: float = Field(
        0.01, ge=0, lt=1, description="Sec. 3.6 samples replacement codes among live codes only: codes whose stage-1 "
                                      "usage (moving average of assignments per step) is at least this share of a "
                                      "uniform code's; 0: every code, dead ones included")
    lambda_feat: float = Field(1.0, ge=0, description="λ2 in Eq. 3")
    lambda_img: float = Field(10.0, ge=0, description="λ3 in Eq. 3")
    focal_gamma: float = Field(2.0, ge=0)
    anomaly_prob: float = Field(0.5, ge=0, le=1, description="share of training images given an anomaly (stages 2, 3)")
    # -- stage 3: upsampling module (Sec. 3.5) -------------------------------------------------
    upsampling_width: int = Field(64, ge=4)
    upsampling_residual: bool = Field(
        False, description="add logit(M) to the upsampling module's anomaly logit, its last layer zero-initialised, "
                           "so M_r starts as the bilinearly upsampled M and stage 3 learns a refinement; not in the "
                           "paper (which trains 20k iterations), for short stage-3 budgets")
    stage3_iters: int = Field(20_000, ge=1)
    stage3_batch: int = Field(8, ge=1)
    stage3_lr: float = Field(2e-4, gt=0)
    smudge_max_beta: float = Field(0.8, ge=0, lt=1, description="smudge transparency β ~ U[0, max)")
    # -- scoring and supervision --------------------------------------------------------------
    score_filter: int = Field(21, ge=1, description="mean filter size for the image score (Sec. 3.4)")
    score_map: Literal["coarse", "refined"] = Field(
        "coarse", description="map the image score is read from: M (coarse, the paper) or M_r (refined)")
    n_supervised: int = Field(0, ge=0, description="annotated real anomalies used in stage 2 (Sec. 4.2); 0: unsupervised")
    supervised_prob: float = Field(0.5, ge=0, le=1, description="chance a stage-2 batch slot holds a real anomaly")
    # -- engineering ----------------------------------------------------------------------------
    checkpoint_every: int = Field(1000, ge=1)
    num_workers: int = Field(0, ge=0, description="DataLoader workers for the stage-1 general images")


STAGE1_KEYS = ("general_images", "n_procedural_textures", "hidden", "residual_hidden", "residual_layers",
               "embedding_dim", "codebook_size", "commitment", "codebook_update", "ema_decay", "dead_code_threshold",
               "stage1_iters", "stage1_batch", "stage1_lr")
ARCH_KEYS = ("hidden", "residual_hidden", "residual_layers", "embedding_dim", "codebook_size", "codebook_update")
STAGE3_KEYS = ("upsampling_width", "upsampling_residual", "stage3_iters", "stage3_batch", "stage3_lr", "smudge_max_beta")
NOT_TRAINING_KEYS = ("score_filter", "score_map", "checkpoint_every", "num_workers")


# =============================================================================================
# Vector quantization (Eq. 1, Eq. 2) and feature-space anomaly sampling (Sec. 3.6)
# =============================================================================================
class VQOutput(NamedTuple):
    quantized: torch.Tensor        # (B, d, h, w); forward value = codes, gradient = identity to the input
    indices: torch.Tensor          # (B, h, w) code indices
    codebook_loss: torch.Tensor    # L2(sg[F], Q), Eq. 2 second term (0 with EMA updates)
    commitment_loss: torch.Tensor  # L2(F, sg[Q]), Eq. 2 third term (weighted by λ1 by the caller)


class VectorQuantizer(nn.Module):
    """Eq. 1: replace each feature vector by its nearest codebook vector, with a straight-through
    gradient (van den Oord et al. 2017).

    ``ema`` False: the codebook is a parameter learnt from the codebook loss of Eq. 2; True: each
    code follows the exponential moving average (``decay``) of the features assigned to it, as
    in the authors' code. ``usage`` tracks the moving average of each code's assignments per
    step; with ``dead_threshold`` > 0, codes used less than that (and not at all in the current
    batch) are restarted at the batch features worst served by the codebook (largest
    quantization error) — a standard remedy for codebook collapse in short trainings, not part of
    the paper (``dead_threshold: 0`` in the ``paper`` profile).
    """

    def __init__(self, size: int, dim: int, *, ema: bool = False, decay: float = 0.99, dead_threshold: float = 0.0):
        super().__init__()
        self.ema, self.decay, self.dead_threshold = ema, decay, dead_threshold
        self.codebook = nn.Parameter(torch.empty(size, dim).uniform_(-1 / size, 1 / size), requires_grad=not ema)
        self.register_buffer("usage", torch.zeros(size))
        if ema:
            self.register_buffer("ema_sum", torch.zeros(size, dim))

    def forward(self, features: torch.Tensor) -> VQOutput:
        b, d, h, w = features.shape
        flat = features.permute(0, 2, 3, 1).reshape(-1, d)
        _, nearest = knn(flat.detach(), self.codebook.detach(), k=1)
        indices = nearest[:, 0].to(flat.device)
        if self.training:
            self._update(flat.detach(), indices)
        codes = self.codebook[indices]
        codebook_loss = flat.new_zeros(()) if self.ema else F.mse_loss(codes, flat.detach())
        commitment_loss = F.mse_loss(flat, codes.detach())
        quantized = flat + (codes - flat).detach()
        return VQOutput(quantized.reshape(b, h, w, d).permute(0, 3, 1, 2), indices.reshape(b, h, w),
                        codebook_loss, commitment_loss)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, h, w) indices -> (B, d, h, w) codebook vectors."""
        return self.codebook[indices].permute(0, 3, 1, 2)

    @torch.no_grad()
    def _update(self, flat: torch.Tensor, indices: torch.Tensor) -> None:
        counts = torch.bincount(indices, minlength=self.codebook.shape[0]).to(flat.dtype)
        self.usage.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        if self.ema:
            sums = torch.zeros_like(self.ema_sum).index_add_(0, indices, flat)
            self.ema_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
            used = self.usage > 0
            self.codebook[used] = self.ema_sum[used] / self.usage[used, None]
        if self.dead_threshold > 0:
            dead = torch.nonzero((self.usage < self.dead_threshold) & (counts == 0))[:, 0][:flat.shape[0]]
            if dead.numel():
                error = (flat - self.codebook[indices]).pow(2).sum(1)
                worst = flat[error.topk(dead.numel()).indices]
                self.codebook[dead] = worst
                self.usage[dead] = self.dead_threshold
                if self.ema:
                    self.ema_sum[dead] = worst * self.dead_threshold


def codebook_neighbours(codebook: torch.Tensor, live: torch.Tensor | None = None) -> torch.Tensor:
    """(K, L) int32 table: row i lists the L live code indices (all K when ``live`` is None) by
    increasing distance from code i.

    A live code i is always at rank 0 of its own row (its own distance is forced below every
    other, so duplicated codebook vectors cannot push it out of rank 0): ``sample_near_codes``
    relies on that to exclude the original code. A dead code's row holds live codes only (its
    rank 0 is its nearest live code, which the similarity bound excludes as well), so no row
    ever offers a dead code."""
    cb = codebook.detach().float()
    sq = (cb * cb).sum(1)
    d = (sq[:, None] - 2 * cb @ cb.T + sq[None]).clamp_min_(0)
    d.fill_diagonal_(-1.0)
    if live is None:
        return torch.argsort(d, dim=1, stable=True).to(torch.int32)
    live = live.to(d.device)
    d[:, ~live] = float("inf")
    return torch.argsort(d, dim=1, stable=True)[:, :int(live.sum())].to(torch.int32)


def live_codes(usage: torch.Tensor, share: float) -> torch.Tensor:
    """(K,) bool: codes whose usage (a codebook's moving average of assignments per step) is at
    least ``share`` of a uniform code's (``usage.sum() / K``); all True when ``share`` is 0."""
    if share <= 0:
        return torch.ones_like(usage, dtype=torch.bool)
    return usage >= share * usage.sum() / usage.numel()


def code_statistics(indices: torch.Tensor, size: int) -> tuple[float, float]:
    """(usage, perplexity) of a batch of code assignments: the share of the ``size`` codes used at
    least once, and exp(entropy) of the assignment frequencies (the authors' release reports the
    latter per batch: 1 when one code takes everything, ``size`` when all are used equally)."""
    counts = torch.bincount(indices.reshape(-1), minlength=size).float()
    p = counts / counts.sum().clamp_min(1.0)
    entropy = -(p * torch.log(p.clamp_min(1e-30))).sum()
    return float((counts > 0).float().mean()), float(entropy.exp())


def sample_near_codes(indices: torch.Tensor, neighbours: torch.Tensor, lambda_s: float,
                      generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sec. 3.6: replacement codes for feature-space anomalies.

    Per image a similarity bound n ~ U[λ_s·K, K]; per feature a neighbour rank k ~ U[λ_s·K, n)
    among the codebook vectors ordered by distance to the feature's own code (rank 0 = the code
    itself). So the ⌈λ_s·K⌉ nearest vectors (at least the code itself) are never drawn — they
    would make invisible "anomalies" — and ranks close to the code are preferred, giving
    near-in-distribution anomalies. K is the number of codes a row of ``neighbours`` offers:
    with a table restricted to live codes (:func:`codebook_neighbours`), dead codes are never
    drawn. Returns (new indices (B, h, w), ranks (B, h, w), n (B,)).
    """
    b, h, w = indices.shape
    size = neighbours.shape[1]          # N_K: the codes a row offers (the live ones)
    low = max(1, math.ceil(lambda_s * size))
    if low >= size:
        raise ConfigError(f"lambda_s={lambda_s} leaves no codebook vector to sample from {size}")
    bound = torch.randint(low + 1, size + 1, (b,), generator=generator)
    u = torch.rand(b, h, w, generator=generator)
    ranks = low + (u * (bound - low).view(b, 1, 1)).long()
    ranks = ranks.to(indices.device)
    new = neighbours.to(indices.device)[indices.reshape(-1), ranks.reshape(-1)].long().reshape(b, h, w)
    return new, ranks, bound


# =============================================================================================
# Networks
# =============================================================================================
class Residual(nn.Module):
    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.block = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, hidden, 3, padding=1, bias=False),
                                   nn.ReLU(), nn.Conv2d(hidden, channels, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


def residual_stack(channels: int, hidden: int, layers: int) -> nn.Sequential:
    return nn.Sequential(*[Residual(channels, hidden) for _ in range(layers)], nn.ReLU())


class Encoding(NamedTuple):
    features_hi: torch.Tensor  # encoder output at 1/4 resolution (input to the K_hi branch)
    lo: VQOutput               # Q_lo, 1/8 resolution
    hi: VQOutput               # Q_hi, 1/4 resolution


class QuantizedAutoencoder(nn.Module):
    """Stage 1: the quantized latent space encoder (Fig. 3) and the general appearance decoder
    (Sec. 3.2). Images in [0, 1]; side divisible by 32 (see ``check_image_size``)."""

    def __init__(self, hidden: int, residual_hidden: int, residual_layers: int, dim: int, codebook_size: int,
                 **vq_options: Any):
        super().__init__()
        self.encoder_hi = nn.Sequential(
            nn.Conv2d(3, hidden // 2, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(hidden // 2, hidden, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, padding=1), residual_stack(hidden, residual_hidden, residual_layers))
        self.encoder_lo = nn.Sequential(
            nn.Conv2d(hidden, hidden, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, padding=1), residual_stack(hidden, residual_hidden, residual_layers))
        self.to_lo = nn.Conv2d(hidden, dim, 1)
        self.vq_lo = VectorQuantizer(codebook_size, dim, **vq_options)
        self.upsample_lo = nn.ConvTranspose2d(dim, dim, 4, stride=2, padding=1)
        self.to_hi = nn.Conv2d(hidden + dim, dim, 1)
        self.vq_hi = VectorQuantizer(codebook_size, dim, **vq_options)
        self.decoder = nn.Sequential(
            nn.Conv2d(2 * dim, hidden, 3, padding=1), residual_stack(hidden, residual_hidden, residual_layers),
            nn.ConvTranspose2d(hidden, hidden // 2, 4, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(hidden // 2, 3, 4, stride=2, padding=1))

    def encode(self, images: torch.Tensor) -> Encoding:
        features_hi = self.encoder_hi(images)
        lo = self.vq_lo(self.to_lo(self.encoder_lo(features_hi)))
        return Encoding(features_hi, lo, self.quantize_hi(features_hi, lo.quantized))

    def quantize_hi(self, features_hi: torch.Tensor, q_lo: torch.Tensor) -> VQOutput:
        """F_hi = conv(encoder features ‖ upsampled Q_lo), quantized by K_hi (Fig. 3)."""
        return self.vq_hi(self.to_hi(torch.cat([features_hi, self.upsample_lo(q_lo)], 1)))

    def join(self, q_lo: torch.Tensor, q_hi: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.upsample_lo(q_lo), q_hi], 1)

    def decode(self, q_lo: torch.Tensor, q_hi: torch.Tensor) -> torch.Tensor:
        """The general appearance decoder: I_gen from (Q_lo, Q_hi)."""
        return self.decoder(self.join(q_lo, q_hi))

    def loss(self, images: torch.Tensor, commitment: float) -> tuple[torch.Tensor, dict[str, float]]:
        """Eq. 2 summed over both levels: L2(I, I_gen) + L2(sg[F], Q) + λ1·L2(F, sg[Q])."""
        enc = self.encode(images)
        recon = F.mse_loss(self.decode(enc.lo.quantized, enc.hi.quantized), images)
        codebook = enc.lo.codebook_loss + enc.hi.codebook_loss
        commit = enc.lo.commitment_loss + enc.hi.commitment_loss
        logs = {"recon": recon.item(), "commit": commit.item()}
        for level, out in (("lo", enc.lo), ("hi", enc.hi)):
            logs[f"usage_{level}"], logs[f"perplexity_{level}"] = code_statistics(out.indices, self.vq_lo.codebook.shape[0])
        return recon + codebook + commitment * commit, logs


def build_vq(cfg: DSRConfig) -> QuantizedAutoencoder:
    return QuantizedAutoencoder(cfg.hidden, cfg.residual_hidden, cfg.residual_layers, cfg.embedding_dim,
                                cfg.codebook_size, ema=cfg.codebook_update == "ema", decay=cfg.ema_decay,
                                dead_threshold=cfg.dead_code_threshold)


def conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.InstanceNorm2d(cout), nn.ReLU(),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.InstanceNorm2d(cout), nn.ReLU())


class EncoderDecoder(nn.Module):
    """Convolutional encoder-decoder: ``depth`` max-pool downsamplings (widths w, 2w, 4w, 4w, ...),
    bilinear upsampling back to level ``out_level`` (0 = input resolution), U-Net skip
    connections when ``skips``. Without skips it is the subspace restriction module (Sec. 3.3):
    everything passes the bottleneck, so the output is a re-projection, not a copy."""

    def __init__(self, cin: int, cout: int, width: int, depth: int, *, skips: bool, out_level: int = 0):
        super().__init__()
        widths = [width * min(2 ** i, 4) for i in range(depth + 1)]
        self.skips = skips
        self.down = nn.ModuleList([conv_block(cin, widths[0])] +
                                  [conv_block(widths[i - 1], widths[i]) for i in range(1, depth + 1)])
        levels = range(depth - 1, out_level - 1, -1)
        self.up = nn.ModuleList([nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                                               nn.Conv2d(widths[i + 1], widths[i], 3, padding=1),
                                               nn.InstanceNorm2d(widths[i]), nn.ReLU()) for i in levels])
        self.merge = nn.ModuleList([conv_block(widths[i] * (2 if skips else 1), widths[i]) for i in levels])
        self.out = nn.Conv2d(widths[out_level], cout, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = []
        for i, block in enumerate(self.down):
            x = block(F.max_pool2d(x, 2) if i else x)
            feats.append(x)
        for up, merge, skip in zip(self.up, self.merge, reversed(feats[:-1])):
            x = up(x)
            x = merge(torch.cat([x, skip], 1) if self.skips else x)
        return self.out(x)


class ObjectDecoder(nn.Module):
    """The object-specific image reconstruction network (Sec. 3.3): two downsampling conv blocks,
    then four transposed-convolution upsamplings from 1/16 to the input resolution."""

    def __init__(self, cin: int, width: int, hidden: int, residual_hidden: int, residual_layers: int):
        super().__init__()
        bottleneck = max(hidden // 2, 4)
        self.down = nn.Sequential(conv_block(cin, width), nn.MaxPool2d(2), conv_block(width, 2 * width),
                                  nn.MaxPool2d(2), nn.Conv2d(2 * width, bottleneck, 1))
        self.up = nn.Sequential(
            nn.ConvTranspose2d(bottleneck, bottleneck, 4, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(bottleneck, bottleneck, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(bottleneck, hidden, 3, padding=1), residual_stack(hidden, residual_hidden, residual_layers),
            nn.ConvTranspose2d(hidden, hidden // 2, 4, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(hidden // 2, 3, 4, stride=2, padding=1))

    def forward(self, joined: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(joined))


class DSRNet(nn.Module):
    """All DSR modules; ``vq`` is stage 1, ``object_modules`` stage 2, ``upsampler`` stage 3."""

    def __init__(self, cfg: DSRConfig, upsampler: bool = True):
        """``upsampler=False`` (stage 2) leaves the stage-3 module out: stage 2 then reads none of
        the stage-3 settings, so its `train` stage need not rerun when they change."""
        super().__init__()
        d = cfg.embedding_dim
        self.vq = build_vq(cfg)
        self.restrict_lo = EncoderDecoder(d, d, cfg.restriction_width, depth=2, skips=False)
        self.restrict_hi = EncoderDecoder(d, d, cfg.restriction_width, depth=2, skips=False)
        self.object_decoder = ObjectDecoder(2 * d, cfg.decoder_width, cfg.hidden, cfg.residual_hidden,
                                            cfg.residual_layers)
        self.detector = EncoderDecoder(6, 2, cfg.detection_width, depth=4, skips=True, out_level=2)
        self.upsampler, self.upsampling_residual = None, False
        if not upsampler:
            return
        self.upsampler = EncoderDecoder(4, 2, cfg.upsampling_width, depth=3, skips=True)
        self.upsampling_residual = cfg.upsampling_residual
        if cfg.upsampling_residual:
            nn.init.zeros_(self.upsampler.out.weight)
            nn.init.zeros_(self.upsampler.out.bias)

    def object_modules(self) -> nn.ModuleDict:
        return nn.ModuleDict({"restrict_lo": self.restrict_lo, "restrict_hi": self.restrict_hi,
                              "object_decoder": self.object_decoder, "detector": self.detector})

    def object_specific(self, q_lo: torch.Tensor, q_hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fig. 4: F̃ = restriction(Q), Q̃ = VQ(F̃) with the frozen codebooks, I_spc = decoder(Q̃).
        Returns (F̃_lo, F̃_hi, I_spc)."""
        f_lo, f_hi = self.restrict_lo(q_lo), self.restrict_hi(q_hi)
        q_lo_r, q_hi_r = self.vq.vq_lo(f_lo).quantized, self.vq.vq_hi(f_hi).quantized
        return f_lo, f_hi, self.object_decoder(self.vq.join(q_lo_r, q_hi_r))

    def detect(self, specific: torch.Tensor, general: torch.Tensor) -> torch.Tensor:
        """Sec. 3.4: mask logits (B, 2, H/4, W/4) from the two reconstructions."""
        return self.detector(torch.cat([specific, general], 1))

    def anomaly_mask(self, images: torch.Tensor) -> torch.Tensor:
        """M: anomaly probability (B, 1, H, W), bilinearly upsampled from feature resolution."""
        enc = self.vq.encode(images)
        general = self.vq.decode(enc.lo.quantized, enc.hi.quantized)
        _, _, specific = self.object_specific(enc.lo.quantized, enc.hi.quantized)
        m = torch.softmax(self.detect(specific, general), 1)[:, 1:]
        return F.interpolate(m, size=images.shape[-2:], mode="bilinear", align_corners=False)

    def refine(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Sec. 3.5: full-resolution mask logits (B, 2, H, W) from [I, up(M)] (``mask`` is M
        already bilinearly upsampled to the image). With ``upsampling_residual`` the anomaly
        logit is offset by logit(M), so softmax gives M itself while the module outputs zeros."""
        logits = self.upsampler(torch.cat([images, mask], 1))
        if self.upsampling_residual:
            m = mask.clamp(1e-4, 1 - 1e-4)
            logits = logits + torch.cat([torch.zeros_like(m), torch.log(m) - torch.log1p(-m)], 1)
        return logits


# =============================================================================================
# Training plumbing: per-step randomness, resumable loops, image sets
# =============================================================================================
def step_rng(seed: int, stage: int, step: int) -> tuple[np.random.Generator, torch.Generator]:
    """The randomness of one training step, a pure function of (seed, stage, step)."""
    rng = np.random.default_rng([seed, stage, step])
    return rng, torch.Generator().manual_seed(int(rng.integers(2**62)))


def train_loop(module: nn.Module, params: Iterable[nn.Parameter], step_loss: Callable[[int, Any], tuple[torch.Tensor, dict]],
               batches: Callable[[int], Iterator], *, iters: int, lr_at: Callable[[int], float],
               checkpoint: Checkpoint, every: int, desc: str, progress: bool, curve: str | None = None) -> dict[str, float]:
    """Adam on ``step_loss(step, batch)`` for steps [start, iters), where ``batches(start)``
    yields one batch per step. Every ``every`` steps ``module``'s state and the optimiser state
    go to ``checkpoint`` (``defectlab.resume``: named by a fingerprint of the training's inputs);
    an existing one is resumed from, and removed once training completes. Returns the mean of each logged term
    over the last 10 % of the steps run (``<desc>_<term>``) and over the first 10 %
    (``<desc>_<term>_start``), so a caller can see the loss fall. Each step's loss goes to
    ``steplog`` as curve ``curve`` (default ``loss/dsr_<desc>``)."""
    from tqdm.auto import tqdm

    device = next(module.parameters()).device
    optim = torch.optim.Adam(params, lr=lr_at(0))
    start = 0
    state = checkpoint.load(device)
    if state is not None:
        module.load_state_dict(state["model"])
        optim.load_state_dict(state["optim"])
        start = int(state["step"])
        log.info("%s: resuming at step %d", desc, start)
    history: list[dict[str, float]] = []
    bar = tqdm(zip(range(start, iters), batches(start)), total=iters - start, desc=desc, disable=not progress,
               leave=False)
    for step, batch in bar:
        for group in optim.param_groups:
            group["lr"] = lr_at(step)
        loss, logs = step_loss(step, batch)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        history.append({"loss": loss.item(), **logs})
        log_step(curve or f"loss/dsr_{desc}", history[-1]["loss"], step, iters)
        bar.set_postfix(loss=f"{history[-1]['loss']:.4f}")
        if (step + 1) % every == 0 and step + 1 < iters:
            checkpoint.save({"step": step + 1, "model": module.state_dict(), "optim": optim.state_dict()})
    checkpoint.remove()
    n = max(1, len(history) // 10)
    head, tail = history[:n], history[-n:]
    stats = {f"{desc}_{k}": float(np.mean([h[k] for h in tail])) for k in (tail[0] if tail else {})}
    stats.update({f"{desc}_{k}_start": float(np.mean([h[k] for h in head])) for k in (head[0] if head else {})})
    return stats


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalised images -> [0, 1] (DSR reconstructs and compares in image space)."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return images * std + mean


class GeneralImages(Dataset):
    """Stage-1 training images, float32 (3, S, S) in [0, 1]: files (read on access) and arrays."""

    def __init__(self, files: list[Path], arrays: list[np.ndarray], size: int):
        self.files, self.arrays, self.size = files, arrays, size

    def __len__(self) -> int:
        return len(self.files) + len(self.arrays)

    def __getitem__(self, i: int) -> torch.Tensor:
        image = load_image(self.files[i], self.size) if i < len(self.files) else self.arrays[i - len(self.files)]
        return torch.from_numpy(image).permute(2, 0, 1)


class StepBatches(Sampler):
    """Batch indices for steps [start, iters), each drawn from the step's own generator."""

    def __init__(self, n: int, batch: int, seed: int, start: int, iters: int):
        self.n, self.batch, self.seed, self.start, self.iters = n, batch, seed, start, iters

    def __len__(self) -> int:
        return self.iters - self.start

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.iters):
            _, gen = step_rng(self.seed, STAGE1, step)
            yield torch.randint(self.n, (self.batch,), generator=gen).tolist()


def general_image_set(cfg: DSRConfig, ctx: PretrainContext) -> tuple[GeneralImages, str]:
    """The stage-1 image set and a description of it for the logs."""
    if cfg.general_images is not None:
        root = Path(cfg.general_images)
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS) if root.is_dir() else []
        if not files:
            raise ResourceMissingError(f"{root}: general_images holds no images ({', '.join(sorted(IMAGE_EXTS))}); "
                                       "point it at an image folder (e.g. ImageNet train) or set it to null")
        return GeneralImages(files, [], ctx.image_size), f"general_images folder {root} ({len(files)} images)"
    substitute("dsr.general_images", "the dataset's own normal train images + procedural textures (not ImageNet)",
               "ImageNet train images for stage 1 (methods.dsr.<profile>.general_images)")
    files = [p for cat in ctx.categories for p in ctx.train_images(cat)]
    arrays = [procedural_texture(hw(ctx.image_size), np.random.default_rng([ctx.seed, i]))
              for i in range(cfg.n_procedural_textures)]
    desc = (f"default general set: {len(files)} normal train images of {ctx.dataset} "
            f"({', '.join(ctx.categories)}) + {len(arrays)} procedural textures")
    return GeneralImages(files, arrays, ctx.image_size), desc


def check_image_size(size: int | tuple[int, int]) -> None:
    """Each side (an int: square, or [h, w]) a multiple of 32, at least 64."""
    if any(side % 32 or side < 64 for side in hw(size)):
        raise ConfigError(f"image_size: DSR needs a multiple of 32, at least 64 (the subspace restriction module "
                          f"pools the 1/8 code map twice and instance-normalises it); got {size}")


@dataclass
class Stage2Batch:
    images: torch.Tensor      # (B, 3, H, W) in [0, 1]
    masks: torch.Tensor       # (B, 1, H, W) Perlin masks (zero for anomaly-free slots) or real masks
    level: torch.Tensor       # (B,) 0: both levels, 1: Q_lo only, 2: Q_hi only
    real: torch.Tensor        # (B,) True where the slot holds a real annotated anomaly
    generator: torch.Generator


# =============================================================================================
# The method
# =============================================================================================
class DSR(AnomalyMethod):
    name = "dsr"
    Config = DSRConfig
    trains_in_pretrain = True          # stage 1
    trains_per_category = True         # stage 2
    #: stage 1 reads its own settings (which include the codebook architecture) only
    PRETRAIN_READS = frozenset(STAGE1_KEYS)
    #: stage 2 does not read the stage-3 and scoring settings: a change there keeps it valid
    TRAIN_IGNORES = frozenset(STAGE3_KEYS) | frozenset(NOT_TRAINING_KEYS)
    RESULT_NEUTRAL = frozenset({"checkpoint_every", "num_workers"})

    def __init__(self, config: DSRConfig, device: torch.device | str = "cpu"):
        super().__init__(config, device)
        self.net: DSRNet | None = None

    # -- stage 1 ----------------------------------------------------------------------------
    @classmethod
    def pretrain(cls, config: DSRConfig, ctx: PretrainContext) -> dict:
        """Stage 1 (Sec. 3.7): train encoder, codebooks and general decoder with Eq. 2; write
        ``vq.safetensors`` + ``vq.json`` into ``ctx.out_dir``."""
        from safetensors.torch import save_file

        cfg = config
        check_image_size(ctx.image_size)
        images, source = general_image_set(cfg, ctx)
        log.warning("DSR stage 1 trains on the %s", source)
        torch.manual_seed(ctx.seed)
        vq = build_vq(cfg).to(ctx.device).train()
        settings = {k: getattr(cfg, k) for k in STAGE1_KEYS}
        checkpoint = Checkpoint(ctx.work_dir, "dsr-stage1", settings, ctx.seed,
                                ctx.image_size, source, image_files(images.files), vq)

        def batches(start: int) -> Iterator[torch.Tensor]:
            sampler = StepBatches(len(images), cfg.stage1_batch, ctx.seed, start, cfg.stage1_iters)
            return iter(DataLoader(images, batch_sampler=sampler, num_workers=cfg.num_workers))

        def step_loss(step: int, batch: torch.Tensor) -> tuple[torch.Tensor, dict]:
            loss, logs = vq.loss(batch.to(ctx.device), cfg.commitment)
            for key in ("usage_lo", "usage_hi", "perplexity_lo", "perplexity_hi"):   # per-batch codebook health
                log_step(f"codebook/dsr_stage1_{key}", logs[key], step, cfg.stage1_iters)
            return loss, logs

        t0 = time.perf_counter()
        stats = train_loop(vq, [p for p in vq.parameters() if p.requires_grad], step_loss, batches,
                           iters=cfg.stage1_iters, lr_at=lambda step: cfg.stage1_lr, checkpoint=checkpoint,
                           every=cfg.checkpoint_every, desc="stage1", progress=ctx.progress)
        vq.eval()
        stats.update(codebook_usage(vq, images, ctx.device))
        stats.update({"general_images": source, "n_general_images": len(images),
                      "stage1_seconds": time.perf_counter() - t0})
        save_file({k: v.detach().cpu().contiguous() for k, v in vq.state_dict().items()}, str(ctx.out_dir / "vq.safetensors"))
        write_json(ctx.out_dir / "vq.json", {"architecture": {k: getattr(cfg, k) for k in ARCH_KEYS},
                                             "settings": settings, "image_size": ctx.image_size, "stats": stats})
        return stats

    # -- stage 2 (the `train` stage) ----------------------------------------------------------
    def train(self, ctx: FitContext) -> dict:
        """Stage 2 on the category (Sec. 3.7, Eq. 3), stage 1 frozen from ``ctx.pretrain_dir``.
        What it trained is ``trained_tensors``; ``fit`` adds stage 3 on top."""
        stats = self.train_stage2(ctx)
        self.net.eval()
        self.meta.update({"image_size": ctx.image_size, "n_train_images": len(ctx.data.train)})
        return stats

    def trained_tensors(self) -> dict[str, torch.Tensor]:
        """Stage 1 (as frozen during stage 2) and the stage-2 modules: all but the upsampler."""
        if self.net is None:
            raise RuntimeError("DSR.trained_tensors: nothing trained yet (call train first)")
        return {k: v for k, v in self.net.state_dict().items() if not k.startswith("upsampler.")}

    def load_trained_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.net = DSRNet(self.config).to(self.device)
        missing, unexpected = self.net.load_state_dict(tensors, strict=False)
        wrong = [k for k in missing if not k.startswith("upsampler.")] + list(unexpected)
        if wrong:
            raise ConfigError(f"DSR train output does not match the network (missing/unexpected: {wrong[:5]}); "
                              "rerun the train stage")
        self.net.vq.eval().requires_grad_(False)
        self.net.object_modules().eval().requires_grad_(False)

    # -- stage 3 (the `fit` stage) ------------------------------------------------------------
    def fit(self, ctx: FitContext) -> dict:
        """Stage 3 on top of the `train` stage's output (``ctx.train_dir``); stage 2 is not rerun."""
        torch.manual_seed(ctx.seed)           # the upsampling module's initial weights
        self.load_trained(ctx.train_dir)
        self._check_trained(ctx)
        self.meta["stage2_sha256"] = sha256_file(Path(ctx.train_dir) / "trained.safetensors")
        stats = self.train_stage3(ctx)
        self.net.eval()
        return stats

    def _check_trained(self, ctx: FitContext) -> None:
        """The train output must match this category's image size and the current stage 1."""
        check_image_size(ctx.image_size)
        if self.meta.get("image_size") is None or hw(self.meta["image_size"]) != hw(ctx.image_size):
            raise ConfigError(f"{ctx.train_dir}: stage 2 was trained at {self.meta.get('image_size')} px, "
                              f"the fit runs at {ctx.image_size} px; rerun the train stage")
        vq_file = Path(ctx.pretrain_dir) / "vq.safetensors" if ctx.pretrain_dir is not None else None
        if vq_file is not None and vq_file.exists() and sha256_file(vq_file) != self.meta.get("stage1_sha256"):
            raise ConfigError(f"{ctx.train_dir}: stage 2 was trained on another stage-1 model than "
                              f"{vq_file}; rerun the train stage")

    def _setup(self, ctx: FitContext) -> None:
        """Build the network and load the frozen stage-1 weights from the pretrain directory."""
        from safetensors.torch import load_file

        check_image_size(ctx.image_size)
        if self.net is not None:
            return
        if ctx.pretrain_dir is None or not (Path(ctx.pretrain_dir) / "vq.safetensors").exists():
            raise ResourceMissingError(f"{ctx.pretrain_dir}: no DSR stage-1 model (vq.safetensors); run the pretrain stage")
        info = json.loads((Path(ctx.pretrain_dir) / "vq.json").read_text())
        wanted = {k: getattr(self.config, k) for k in ARCH_KEYS}
        if info["architecture"] != wanted:
            raise ConfigError(f"{ctx.pretrain_dir}: stage-1 model has architecture {info['architecture']}, "
                              f"methods.dsr asks for {wanted}; rerun the pretrain stage")
        torch.manual_seed(ctx.seed)
        self.net = DSRNet(self.config, upsampler=False).to(self.device)
        self.net.vq.load_state_dict({k: v.to(self.device) for k, v in
                                     load_file(str(Path(ctx.pretrain_dir) / "vq.safetensors")).items()})
        self.net.vq.eval().requires_grad_(False)
        self.meta["stage1_sha256"] = sha256_file(Path(ctx.pretrain_dir) / "vq.safetensors")

    def stage2_checkpoint(self, ctx: FitContext) -> Checkpoint:
        """Stage 2's resumable checkpoint: for everything stage 2 depends on."""
        cfg = self.config.model_dump(mode="json", exclude=set(STAGE3_KEYS) | set(NOT_TRAINING_KEYS))
        return Checkpoint(ctx.work_dir, f"dsr-stage2-{ctx.category}", cfg, self.meta["stage1_sha256"], ctx.seed,
                          ctx.image_size, image_files(ctx.data.train), self.meta.get("supervised_images", []),
                          self.net.object_modules())

    def train_stage2(self, ctx: FitContext) -> dict:
        """Stage 2 (Sec. 3.7, Eq. 3): restriction modules, object decoder and detection module,
        resuming from its checkpoint in ``ctx.work_dir`` if one is there."""
        self._setup(ctx)
        real_images, real_masks = self._supervised_examples(ctx)
        modules = self.net.object_modules()
        cfg = self.config
        images = load_train_images(ctx)
        neighbours, code_stats = self.sampling_tables(images, Path(ctx.pretrain_dir) / "vq.safetensors")
        n_real = 0 if real_images is None else real_images.shape[0]

        def batches(start: int) -> Iterator[Stage2Batch]:
            for step in range(start, cfg.stage2_iters):
                rng, gen = step_rng(ctx.seed, STAGE2, step)
                idx = torch.from_numpy(rng.integers(len(images), size=cfg.stage2_batch))
                batch_images = images[idx.to(images.device)]
                masks = perlin_masks(rng, cfg.stage2_batch, tuple(images.shape[-2:]), cfg.anomaly_prob).to(self.device)
                real = torch.from_numpy(rng.random(cfg.stage2_batch) < cfg.supervised_prob).to(self.device)
                real &= n_real > 0
                if real.any():
                    pick = torch.from_numpy(rng.integers(n_real, size=int(real.sum()))).to(self.device)
                    batch_images[real] = real_images[pick]
                    masks[real] = real_masks[pick]
                level = torch.from_numpy(rng.choice(3, size=cfg.stage2_batch, p=[0.5, 0.25, 0.25]))
                yield Stage2Batch(batch_images, masks, level.to(self.device), real, gen)

        def step_loss(step: int, batch: Stage2Batch) -> tuple[torch.Tensor, dict]:
            return self.stage2_loss(batch, neighbours)

        checkpoint = self.stage2_checkpoint(ctx)
        modules.train()
        stats = train_loop(modules, modules.parameters(), step_loss, batches, iters=cfg.stage2_iters,
                           lr_at=lambda step: cfg.stage2_lr * (0.1 if step >= cfg.stage2_lr_drop_at else 1.0),
                           checkpoint=checkpoint, every=cfg.checkpoint_every, desc="stage2", progress=ctx.progress)
        modules.eval()
        return {**stats, **code_stats}

    @torch.no_grad()
    def sampling_tables(self, images: torch.Tensor, source: Any = None) -> tuple[dict[str, torch.Tensor], dict]:
        """Sec. 3.6's neighbour tables over the live codes of each frozen codebook
        (:func:`live_codes`: a code the stage-1 training stopped assigning lies outside the learnt
        subspace of natural images, so drawing it would make an out-of-distribution anomaly),
        and the codebook statistics stage 2 reports: the share of live codes and the usage and
        perplexity of the codes the category's training images (``images``) are assigned.
        Raises ConfigError when a codebook has too few live codes to sample from (collapse)."""
        cfg, vq = self.config, self.net.vq
        neighbours, stats = {}, {}
        enc = [vq.encode(chunk) for chunk in images.split(16)]
        for level, layer in (("lo", vq.vq_lo), ("hi", vq.vq_hi)):
            size = layer.codebook.shape[0]
            if cfg.live_code_share > 0 and not float(layer.usage.sum()) > 0:
                raise ConfigError(f"{source}: the K_{level} codebook records no usage (all-zero `usage` buffer); "
                                  "rerun the pretrain stage or set methods.dsr.live_code_share: 0")
            live = live_codes(layer.usage, cfg.live_code_share)
            n_live = int(live.sum())
            if n_live - max(1, math.ceil(cfg.lambda_s * n_live)) < 1:
                raise ConfigError(f"{source}: codebook K_{level} has collapsed: {n_live} of {size} codes are live "
                                  f"(live_code_share={cfg.live_code_share}), too few to sample feature-space anomalies "
                                  f"beyond the λ_s bound; retrain stage 1 with dead_code_threshold > 0 or "
                                  "codebook_update: ema")
            neighbours[level] = codebook_neighbours(layer.codebook, None if n_live == size else live)
            used = torch.cat([getattr(e, level).indices.reshape(-1) for e in enc])
            usage, perplexity = code_statistics(used, size)
            stats.update({f"stage2_live_codes_{level}": n_live / size, f"stage2_codebook_usage_{level}": usage,
                          f"stage2_perplexity_{level}": perplexity})
        return neighbours, stats

    @torch.no_grad()
    def feature_anomalies(self, batch: Stage2Batch, neighbours: dict[str, torch.Tensor]
                          ) -> tuple[Encoding, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sec. 3.6: anomaly-augmented quantized maps (Q_a,lo, Q_a,hi) and the target mask M_gt.

        Per slot (``batch.level``) the anomaly goes into Q_lo and Q_hi together (Q_hi is then
        re-quantized from the encoder features and the altered Q_lo inside the altered region,
        before its own codes there are replaced), into Q_lo only or into Q_hi only. Replacement
        codes come from :func:`sample_near_codes`. M_gt is the Perlin mask max-pooled to the
        altered level's grid, given at the Q_hi (1/4) resolution the detection module outputs;
        outside M_gt the maps equal Q exactly. Slots holding real anomalies (``batch.real``)
        keep Q and use their annotated mask. Returns (encoding of the clean images, Q_a,lo,
        Q_a,hi, M_gt (B, 1, H/4, W/4))."""
        cfg, vq, x = self.config, self.net.vq, batch.images
        enc = vq.encode(x)
        q_lo, q_hi = enc.lo.quantized, enc.hi.quantized
        mask_lo = F.max_pool2d(batch.masks, x.shape[-1] // q_lo.shape[-1])
        mask_hi = F.max_pool2d(batch.masks, x.shape[-1] // q_hi.shape[-1])
        up_lo = F.interpolate(mask_lo, size=mask_hi.shape[-2:], mode="nearest")
        new_lo, _, _ = sample_near_codes(enc.lo.indices, neighbours["lo"], cfg.lambda_s, batch.generator)
        qa_lo = torch.where(mask_lo > 0, vq.vq_lo.lookup(new_lo), q_lo)
        hi_after_lo = vq.quantize_hi(enc.features_hi, qa_lo)
        new_hi, _, _ = sample_near_codes(hi_after_lo.indices, neighbours["hi"], cfg.lambda_s, batch.generator)
        qa_hi_both = torch.where(mask_hi > 0, vq.vq_hi.lookup(new_hi),
                                 torch.where(up_lo > 0, hi_after_lo.quantized, q_hi))
        new_hi_only, _, _ = sample_near_codes(enc.hi.indices, neighbours["hi"], cfg.lambda_s, batch.generator)
        qa_hi_only = torch.where(mask_hi > 0, vq.vq_hi.lookup(new_hi_only), q_hi)
        level = batch.level.view(-1, 1, 1, 1)
        synthetic = (~batch.real).view(-1, 1, 1, 1)
        qa_lo = torch.where((level != 2) & synthetic, qa_lo, q_lo)
        qa_hi = torch.where(synthetic, torch.where(level == 0, qa_hi_both,
                                                   torch.where(level == 1, q_hi, qa_hi_only)), q_hi)
        target = torch.where(batch.real.view(-1, 1, 1, 1), mask_hi, torch.where(level == 2, mask_hi, up_lo))
        return enc, qa_lo, qa_hi, target

    def stage2_loss(self, batch: Stage2Batch, neighbours: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        """One stage-2 step, Eq. 3: focal(M_gt, M) + λ2·L2(F̃, Q) + λ3·L2(I, I_spc).

        F̃ and I_spc are computed from the anomaly-augmented Q_a; Q and I are the anomaly-free
        targets, so the object-specific decoder learns to *restore* normal appearance. The
        detection module sees I_spc detached (its focal loss trains the detection module only;
        the object decoder is trained by the two reconstruction terms). Real anomalies
        (supervised mode) only enter the focal term."""
        cfg, x = self.config, batch.images
        enc, qa_lo, qa_hi, target = self.feature_anomalies(batch, neighbours)
        with torch.no_grad():
            general = self.net.vq.decode(qa_lo, qa_hi)
        f_lo, f_hi, specific = self.net.object_specific(qa_lo, qa_hi)
        logits = self.net.detect(specific.detach(), general)
        seg = focal_loss(logits, target[:, 0], gamma=cfg.focal_gamma)
        clean = (~batch.real).float()
        feat = (per_image_mse(f_lo, enc.lo.quantized) + per_image_mse(f_hi, enc.hi.quantized)) * clean
        img = per_image_mse(specific, x) * clean
        denom = clean.sum().clamp_min(1.0)
        loss = seg + cfg.lambda_feat * feat.sum() / denom + cfg.lambda_img * img.sum() / denom
        return loss, {"focal": seg.item(), "feat": (feat.sum() / denom).item(), "img": (img.sum() / denom).item()}

    def train_stage3(self, ctx: FitContext) -> dict:
        """Stage 3 (Sec. 3.7): the upsampling module on smudged images, stages 1-2 frozen,
        resuming from its checkpoint in ``ctx.work_dir`` if one is there."""
        cfg = self.config
        self.net.object_modules().eval().requires_grad_(False)
        self.net.upsampler.train()
        images = load_train_images(ctx)
        checkpoint = Checkpoint(ctx.work_dir, f"dsr-stage3-{ctx.category}", self.meta.get("stage2_sha256"), ctx.seed,
                                ctx.image_size, image_files(ctx.data.train), {k: getattr(cfg, k) for k in STAGE3_KEYS},
                                self.net.upsampler)

        def batches(start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            for step in range(start, cfg.stage3_iters):
                rng, _ = step_rng(ctx.seed, STAGE3, step)
                idx = rng.integers(len(images), size=cfg.stage3_batch)
                pairs = [smudge(images[i].permute(1, 2, 0).cpu().numpy(), rng, max_beta=cfg.smudge_max_beta)
                         if rng.random() < cfg.anomaly_prob else
                         (images[i].permute(1, 2, 0).cpu().numpy(), np.zeros(images.shape[-2:], bool)) for i in idx]
                x = torch.from_numpy(np.stack([p[0] for p in pairs])).permute(0, 3, 1, 2).to(self.device)
                m = torch.from_numpy(np.stack([p[1] for p in pairs])).long().to(self.device)
                yield x, m

        def step_loss(step: int, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict]:
            x, target = batch
            with torch.no_grad():
                mask = self.net.anomaly_mask(x)
            loss = focal_loss(self.net.refine(x, mask), target, gamma=cfg.focal_gamma)
            return loss, {}

        stats = train_loop(self.net.upsampler, self.net.upsampler.parameters(), step_loss, batches,
                           iters=cfg.stage3_iters, lr_at=lambda step: cfg.stage3_lr, checkpoint=checkpoint,
                           every=cfg.checkpoint_every, desc="stage3", progress=ctx.progress,
                           curve=f"loss/dsr_stage3/{ctx.category}")   # the fit stage's run covers every category
        self.net.upsampler.eval()
        return stats

    def _supervised_examples(self, ctx: FitContext) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """N annotated anomalous training images (Sec. 4.2) from the category's ``labelled/`` split
        (never the test split), recorded in ``meta['supervised_images']``."""
        n = self.config.n_supervised
        if n == 0:
            return None, None
        candidates = sorted((s for s in getattr(ctx.data, "labelled", []) if s.label == 1 and s.mask_paths),
                            key=lambda s: str(s.path))
        if len(candidates) < n:
            raise ConfigError(f"methods.dsr.n_supervised: {n} requested, {ctx.category} has {len(candidates)} "
                              f"annotated anomalous training images ({ctx.category}/labelled/<kind>/ with masks in "
                              "labelled_ground_truth/; test images are never used for training)")
        pick = np.random.default_rng([ctx.seed, 4242]).choice(len(candidates), size=n, replace=False)
        chosen = [candidates[i] for i in sorted(pick)]
        self.meta["supervised_images"] = [str(s.path) for s in chosen]
        images, masks = [], []
        for batch in make_loader(chosen, ctx.image_size, batch_size=16):
            images.append(to_unit_range(batch["image"]))
            masks.append((batch["mask"][:, :1] > 0.5).float())
        return torch.cat(images).to(self.device), torch.cat(masks).to(self.device)

    # -- inference --------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image score: max of the 21×21 mean-filtered M (Sec. 3.4; M_r with ``score_map:
        refined``); pixel map: M_r (Sec. 3.5)."""
        x = to_unit_range(images.to(self.device))
        mask = self.net.anomaly_mask(x)
        refined = torch.softmax(self.net.refine(x, mask), 1)[:, 1:]
        source = mask if self.config.score_map == "coarse" else refined
        k = self.config.score_filter
        scores = F.avg_pool2d(source, k, stride=1, padding=k // 2, count_include_pad=False).amax(dim=(1, 2, 3))
        return scores, refined[:, 0]

    # -- state ------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.net.state_dict())

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.net = DSRNet(self.config).to(self.device)
        self.net.load_state_dict(tensors)
        self.net.eval().requires_grad_(False)


# =============================================================================================
# Helpers
# =============================================================================================
def load_train_images(ctx: FitContext) -> torch.Tensor:
    """The category's normal training images as one (N, 3, S, S) tensor in [0, 1] on the device."""
    chunks = [to_unit_range(b["image"]) for b in make_loader(ctx.data.train, ctx.image_size, batch_size=16)]
    return torch.cat(chunks).to(ctx.device)


def perlin_masks(rng: np.random.Generator, n: int, size: int | tuple[int, int], anomaly_prob: float) -> torch.Tensor:
    """(n, 1, h, w) Perlin anomaly masks (DRAEM-style, shared synthesis code; ``size``: int for a
    square, or (h, w)); each slot is left anomaly-free with probability 1 - ``anomaly_prob``."""
    shape = hw(size)
    masks = [perlin_mask(shape, rng) if rng.random() < anomaly_prob else np.zeros(shape, bool)
             for _ in range(n)]
    return torch.from_numpy(np.stack(masks)[:, None].astype(np.float32))


def smudge(image: np.ndarray, rng: np.random.Generator, *, max_beta: float = 0.8) -> tuple[np.ndarray, np.ndarray]:
    """Stage-3 training anomaly (Sec. 3.7): a Perlin-shaped patch of one random colour pasted
    with transparency β ~ U[0, max_beta) — I' = (1-M)·I + M·(β·I + (1-β)·c). Returns (image, mask)."""
    mask = perlin_mask(image.shape[:2], rng)
    colour = np.broadcast_to(rng.random(3).astype(np.float32), image.shape)
    beta = float(rng.uniform(0.0, max_beta))
    return blend(image, colour, mask, delta=1.0 - beta), mask


def per_image_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).pow(2).flatten(1).mean(1)


@torch.no_grad()
def codebook_usage(vq: QuantizedAutoencoder, images: GeneralImages, device: torch.device, n: int = 64) -> dict:
    """Share of each codebook's vectors used on (up to) ``n`` images, the perplexity of those
    assignments, and the images' reconstruction MSE."""
    idx = np.linspace(0, len(images) - 1, num=min(n, len(images))).astype(int)
    x = torch.stack([images[int(i)] for i in idx]).to(device)
    enc = vq.encode(x)
    size = vq.vq_lo.codebook.shape[0]
    recon = F.mse_loss(vq.decode(enc.lo.quantized, enc.hi.quantized), x).item()
    stats = {"stage1_eval_mse": recon}
    for level, out in (("lo", enc.lo), ("hi", enc.hi)):
        stats[f"codebook_usage_{level}"], stats[f"codebook_perplexity_{level}"] = code_statistics(out.indices, size)
    return stats
