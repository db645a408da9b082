"""APC — AnomalousPatchCore (Koshil, Wegener, Mentrup, Frintrop, Wilms, "AnomalousPatchCore:
Exploring the Use of Anomalous Samples in Industrial Anomaly Detection", 2024).

PatchCore (``defectlab.methods.patchcore``) on a backbone that was first *fine-tuned* with the
category's normal training images and a few (N = 10 in the paper) labelled anomalous images.

1. **Labelled anomalies** (Sec. 5, following [28]): N anomalous images with their masks are
   drawn, seeded, uniformly per defect type, from a labelled pool: ``labelled_dir`` (MVTec
   layout, its ``test/<defect>`` folders) when set, otherwise the category's own test
   anomalies — the only labelled pool offline. Drawn images that belong to the evaluation set
   are listed in ``meta['exclude_from_eval']`` (``pipeline.eval_samples`` drops them), all
   drawn images in ``meta['labelled_anomalies']``; both are saved in ``trained.json`` by the
   `train` stage, merged into the model's meta by ``fit`` and so saved in ``model.json``.
2. **Fine-tuning network** (Sec. 4.1, 4.3, Fig. 3): the ResNet encoder (stem, layer1..layer4)
   is extended into a U-Net with two skip connections, from layer3 and layer2 — the layers
   PatchCore reads (U-Net2; the paper's "stage 3 and 4" of ResNet-50):
   ``Tconv1`` (layer4 → 1/16, + layer3 skip), ``Tconv2`` (→ 1/8, + layer2 skip),
   ``Tconv3`` (→ 1/4, shared by the two pixel heads). Three heads:

   * classification on the ``Tconv2`` output (so it shapes every feature PatchCore later
     uses): 3 × (conv, ReLU, max-pool), global max-pool, two fully-connected layers;
     L_cls = BCE(image label),
   * segmentation: transposed conv, Gaussian smoothing, conv → per-pixel logit (sigmoid);
     L_segm = pixel-wise BCE against the ground-truth mask, itself Gaussian-smoothed with
     ``mask_sigma``,
   * reconstruction: transposed conv, then twice (Gaussian smoothing, conv, LeakyReLU);
     L_recon = MSE between the input image (in [0, 1]) and its reconstruction.

   The pixel heads work at 1/2 resolution; their outputs are bilinearly upsampled to the input size.
   Loss (Eq. 1): L = 10·L_cls + L_segm + L_recon (``cls_weight``, ``seg_weight``,
   ``recon_weight``; ``heads`` switches tasks off for the ablation of Tab. 3).
   Optimiser AdamW [18], ``epochs`` passes over the normal training images (50 in the paper).
3. **Data imbalance** (Sec. 4.3.2): balanced sampling — every batch holds as many anomalous as
   normal images, the few labelled anomalies being over-sampled — and CutPaste of real anomaly
   regions: with probability ``cutpaste_prob`` an anomalous sample is a normal training image
   with the masked region of a labelled anomaly pasted at a random place and angle
   (``synthesis.paste_region``), the pasted pixels colour-jittered (PRNet-style saturation /
   brightness change). Basic augmentation: brightness/contrast jitter on every sample, random
   flips for texture categories only (an object's layout is part of normality).
4. **Detection** (Sec. 4.2): the decoder is dropped; the fine-tuned encoder becomes
   PatchCore's feature extractor and everything else *is* ``PatchCore`` (this class subclasses
   it): 3×3 local aggregation of layer2+layer3, coreset-subsampled memory bank of normal
   training patches, nearest-neighbour patch scores, Gaussian-smoothed upsampled maps. Image
   score (``score``): ``max``, the plain maximum of the patch scores, as APC's text states
   (Sec. 3: "the overall image score is the maximum anomaly score among the patches"; Sec. 4.2:
   inference "analogous to PatchCore"), or ``reweighted``, PatchCore's Eq. 7 reweighting of that
   maximum (the smoke/default profiles, and the Config default so models saved before the
   option score as before).

Initialisation: ``weights`` (random | imagenet | ds2 | a file) — MoCo v3 in the paper (a file:
the converted official checkpoint, README "Paper profile: external resources"); anything else is
a substitute (``defectlab.resources``): an error in the paper profile unless
``allow_substitutes: true``, recorded in the results otherwise.

Pipeline stages (``trains_per_category = True``):

* `pretrain` (per dataset): the default ``AnomalyMethod.pretrain`` freezes that initial backbone.
* `train` (per category, the expensive step): ``train`` draws the labelled anomalies (1) and
  fine-tunes a copy of the initial backbone (2, 3), resumable from a per-epoch checkpoint
  ``apc-finetune-<category>-<inputs hash>.ckpt.pt`` in ``ctx.work_dir``. ``trained_tensors`` is the fine-tuned encoder only,
  truncated after the deepest layer PatchCore reads (the decoder and heads are dropped: only
  the bank needs the encoder); ``trained.json`` carries the labelled-anomaly lists.
* `fit` (per category, cheap): ``load_trained(ctx.train_dir)`` puts the fine-tuned weights into
  a backbone and merges the labelled-anomaly meta, then ``PatchCore.fit`` builds the bank (4).
  Nothing is retrained.
* `evaluate`: ``model.json`` / ``model.safetensors`` hold the bank, the fine-tuned encoder and
  ``exclude_from_eval``, so evaluation never scores a labelled anomaly.
"""

from __future__ import annotations

import math
import time
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from defectlab.backbones import FeatureExtractor, backbone_for_fit, extractor_from_state, extractor_state
from defectlab.resume import Checkpoint, image_files
from defectlab.steplog import log_step
from defectlab.data.mvtec import IMAGENET_MEAN, IMAGENET_STD, load_image, load_mask
from defectlab.errors import ConfigError
from defectlab.memory import gaussian_blur, patch_scores_to_maps
from defectlab.methods.base import FitContext
from defectlab.methods.patchcore import PatchCore, PatchCoreConfig
from defectlab.synthesis import paste_region

Head = Literal["classification", "segmentation", "reconstruction"]
HEADS: tuple[str, ...] = ("classification", "segmentation", "reconstruction")


class APCConfig(PatchCoreConfig):
    """PatchCore's fields (backbone, weights, layers, embed_dim, coreset, ...) plus fine-tuning."""

    # labelled anomalies
    n_labelled: int = Field(10, ge=1, description="N labelled anomalous images (paper: 10 per category)")
    labelled_dir: str | None = Field(None, description="MVTec-layout root of a separate labelled pool; "
                                                       "None: the category's test anomalies (then excluded from eval)")
    # auxiliary tasks, Eq. 1
    heads: list[Head] = list(HEADS)
    cls_weight: float = Field(10.0, ge=0)
    seg_weight: float = Field(1.0, ge=0)
    recon_weight: float = Field(1.0, ge=0)
    mask_sigma: float = Field(1.0, ge=0, description="Gaussian σ (px) smoothing the segmentation targets")
    head_sigma: float = Field(1.0, ge=0, description="σ of the Gaussian-smoothing layers inside the pixel heads")
    head_channels: int = Field(32, ge=1, description="width of the pixel heads")
    cls_channels: int = Field(128, ge=1, description="width of the classification head")
    # optimisation
    epochs: int = Field(50, ge=0, description="passes over the normal training images (paper: 50)")
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(1e-2, ge=0)
    finetune_batch_size: int = Field(16, ge=2, description="half normal, half anomalous")
    # data imbalance / augmentation
    cutpaste_prob: float = Field(0.5, ge=0, le=1, description="share of anomalous samples made by pasting a "
                                                              "real anomaly region onto a normal image")
    jitter: float = Field(0.1, ge=0, le=1, description="brightness/contrast jitter; also the pasted-region colour jitter")
    flip_textures: bool = True
    # scoring (Sec. 3 / 4.2)
    score: Literal["max", "reweighted"] = Field(
        "reweighted", description="image score: max = the largest patch score (APC's text, Sec. 3); "
                                  "reweighted = PatchCore's Eq. 7 weight times it")


# ---------------------------------------------------------------------------------------------
# network
# ---------------------------------------------------------------------------------------------
class GaussianSmoothing(nn.Module):
    """Fixed (not learned) per-channel Gaussian smoothing, as in the paper's pixel heads.

    A separable depthwise convolution with reflect padding (kernel radius 4σ, as
    ``memory.gaussian_blur``), written as one grouped conv per axis so its backward pass is
    cheap on CPU.
    """

    def __init__(self, sigma: float, channels: int):
        super().__init__()
        self.sigma, self.radius = sigma, int(4 * sigma + 0.5)
        x = torch.arange(-self.radius, self.radius + 1, dtype=torch.float32)
        k = torch.exp(-(x**2) / (2 * max(sigma, 1e-6) ** 2))
        self.register_buffer("kernel", (k / k.sum()).repeat(channels, 1, 1, 1), persistent=False)  # (C, 1, 1, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sigma <= 0:
            return x
        r, c = self.radius, x.shape[1]
        x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), self.kernel, groups=c)
        return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), self.kernel.transpose(2, 3), groups=c)


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class UpBlock(nn.Module):
    """Transposed conv ×2 (+ BN, ReLU), then optionally concatenate an encoder skip and fuse (3×3 conv)."""

    def __init__(self, cin: int, cout: int, skip: int = 0):
        super().__init__()
        self.up = nn.Sequential(nn.ConvTranspose2d(cin, cout, 2, stride=2, bias=False), nn.BatchNorm2d(cout),
                                nn.ReLU(inplace=True))
        self.fuse = _conv_bn_relu(cout + skip, cout) if skip else None

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        x = self.up(x)
        if self.fuse is None:
            return x
        if x.shape[-2:] != skip.shape[-2:]:
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.fuse(torch.cat([x, skip], 1))


class APCNet(nn.Module):
    """ResNet encoder + U-Net2 decoder + classification / segmentation / reconstruction heads (Fig. 3).

    ``backbone`` is a torchvision ResNet (its own modules are trained in place, so the
    fine-tuned weights are the backbone's). Outputs: ``cls`` (B,) logits, ``seg`` (B, 1, H, W)
    logits, ``recon`` (B, 3, H, W) image in [0, 1] units.
    """

    def __init__(self, backbone: nn.Module, cfg: APCConfig):
        super().__init__()
        if not all(hasattr(backbone, n) for n in ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")):
            raise ConfigError(f"methods.apc.backbone: {cfg.backbone!r} is not a ResNet; APC's U-Net needs "
                              f"resnet18 / resnet50 / wide_resnet50_2")
        self.backbone = backbone
        self.heads = set(cfg.heads)
        with torch.no_grad():
            c1, c2, c3, c4 = (f.shape[1] for f in self.encode(torch.zeros(1, 3, 64, 64)))
        self.tconv1 = UpBlock(c4, c3, skip=c3)      # 1/32 -> 1/16, + layer3
        self.tconv2 = UpBlock(c3, c2, skip=c2)      # 1/16 -> 1/8,  + layer2
        self.tconv3 = UpBlock(c2, c1)               # 1/8  -> 1/4, shared by the pixel heads
        h, k = cfg.cls_channels, cfg.head_channels
        layers = []
        for cin in (c2, h, h):
            layers += [nn.Conv2d(cin, h, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2, ceil_mode=True)]
        self.cls_head = nn.Sequential(*layers, nn.AdaptiveMaxPool2d(1), nn.Flatten(),
                                      nn.Linear(h, h), nn.ReLU(inplace=True), nn.Linear(h, 1))
        self.seg_up = nn.Sequential(nn.ConvTranspose2d(c1, k, 2, stride=2), nn.ReLU(inplace=True))
        self.seg_out = nn.Sequential(GaussianSmoothing(cfg.head_sigma, k), nn.Conv2d(k, 1, 3, padding=1))
        self.rec_up = nn.ConvTranspose2d(c1, k, 2, stride=2)
        self.rec_out = nn.Sequential(GaussianSmoothing(cfg.head_sigma, k), nn.Conv2d(k, k, 3, padding=1),
                                     nn.LeakyReLU(0.01, inplace=True),
                                     GaussianSmoothing(cfg.head_sigma, k), nn.Conv2d(k, 3, 3, padding=1),
                                     nn.LeakyReLU(0.01, inplace=True))

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        b = self.backbone
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        f1 = b.layer1(x)
        f2 = b.layer2(f1)
        f3 = b.layer3(f2)
        return [f1, f2, f3, b.layer4(f3)]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        size = x.shape[-2:]
        _, f2, f3, f4 = self.encode(x)
        d2 = self.tconv2(self.tconv1(f4, f3), f2)
        out: dict[str, torch.Tensor] = {}
        if "classification" in self.heads:
            out["cls"] = self.cls_head(d2)[:, 0]
        if self.heads & {"segmentation", "reconstruction"}:
            d3 = self.tconv3(d2)
            if "segmentation" in self.heads:
                out["seg"] = F.interpolate(self.seg_out(self.seg_up(d3)), size=size, mode="bilinear",
                                           align_corners=False)
            if "reconstruction" in self.heads:
                out["recon"] = F.interpolate(self.rec_out(self.rec_up(d3)), size=size, mode="bilinear",
                                             align_corners=False)
        return out


def apc_losses(out: dict[str, torch.Tensor], images01: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor,
               cfg: APCConfig) -> dict[str, torch.Tensor]:
    """Eq. 1: ``total`` = cls_weight·L_cls + seg_weight·L_segm + recon_weight·L_recon over the heads present.

    ``images01`` (B, 3, H, W) in [0, 1] (the reconstruction target), ``masks`` (B, H, W) in
    {0, 1}, ``labels`` (B,) in {0, 1}. Returns each term (unweighted) and ``total``.
    """
    terms: dict[str, torch.Tensor] = {}
    total = images01.new_zeros(())
    if "cls" in out:
        terms["cls"] = F.binary_cross_entropy_with_logits(out["cls"], labels.float())
        total = total + cfg.cls_weight * terms["cls"]
    if "seg" in out:
        target = gaussian_blur(masks.float(), cfg.mask_sigma).clamp(0, 1) if cfg.mask_sigma > 0 else masks.float()
        terms["seg"] = F.binary_cross_entropy_with_logits(out["seg"][:, 0], target)
        total = total + cfg.seg_weight * terms["seg"]
    if "recon" in out:
        terms["recon"] = F.mse_loss(out["recon"], images01)
        total = total + cfg.recon_weight * terms["recon"]
    terms["total"] = total
    return terms


# ---------------------------------------------------------------------------------------------
# labelled anomalies and balanced, augmented batches
# ---------------------------------------------------------------------------------------------
def draw_labelled(pool: list, n: int, rng: np.random.Generator) -> list:
    """N anomalous samples drawn uniformly per defect type (round robin over the types, each
    type's images in random order), as in the paper's protocol (Sec. 5, [28])."""
    by_type: dict[str, list] = {}
    for s in sorted(pool, key=lambda s: (s.defect_type, str(s.path))):
        by_type.setdefault(s.defect_type, []).append(s)
    queues = [[group[i] for i in rng.permutation(len(group))] for group in by_type.values()]
    order = [queues[i] for i in rng.permutation(len(queues))]
    chosen: list = []
    while len(chosen) < n and any(order):
        for q in order:
            if q and len(chosen) < n:
                chosen.append(q.pop(0))
    return chosen


_MEAN = np.asarray(IMAGENET_MEAN, dtype=np.float32)
_STD = np.asarray(IMAGENET_STD, dtype=np.float32)


class BalancedBatches:
    """Yields (images01 (B,3,H,W), masks (B,H,W), labels (B,)) batches: half normal, half anomalous.

    Anomalous samples are the labelled anomalies, over-sampled, or (probability
    ``cutpaste_prob``) a normal image with a labelled anomaly's masked region pasted on it.
    """

    def __init__(self, normals: list[np.ndarray], anomalies: list[tuple[np.ndarray, np.ndarray]], cfg: APCConfig,
                 rng: np.random.Generator, texture: bool):
        self.normals, self.anomalies, self.cfg, self.rng = normals, anomalies, cfg, rng
        self.flip = texture and cfg.flip_textures
        self.half = cfg.finetune_batch_size // 2
        self.pasteable = [i for i, (_, m) in enumerate(anomalies) if m.any()]

    def __len__(self) -> int:
        return math.ceil(len(self.normals) / self.half)

    def _augment(self, img: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rng, j = self.rng, self.cfg.jitter
        if self.flip:
            if rng.random() < 0.5:
                img, mask = img[:, ::-1], mask[:, ::-1]
            if rng.random() < 0.5:
                img, mask = img[::-1], mask[::-1]
        if j > 0:
            mean = img.mean()
            img = (img - mean) * rng.uniform(1 - j, 1 + j) + mean + rng.uniform(-j, j) * 0.5
        return np.clip(img, 0, 1), mask

    def _pasted(self) -> tuple[np.ndarray, np.ndarray]:
        rng, j = self.rng, self.cfg.jitter
        src, src_mask = self.anomalies[self.pasteable[rng.integers(len(self.pasteable))]]
        if j > 0:  # saturation / brightness change of the pasted region (PRNet's CutPaste)
            grey = src.mean(axis=2, keepdims=True)
            src = np.clip(grey + (src - grey) * rng.uniform(1 - 2 * j, 1 + 2 * j) + rng.uniform(-j, j), 0, 1)
        dst = self.normals[rng.integers(len(self.normals))]
        img, mask = paste_region(dst, src.astype(np.float32), src_mask, rng)
        return img, mask

    def __iter__(self):
        rng = self.rng
        order = rng.permutation(len(self.normals))
        for start in range(0, len(order), self.half):
            imgs, masks, labels = [], [], []
            idx = order[start:start + self.half]
            for i in idx:
                img, m = self._augment(self.normals[i], np.zeros(self.normals[i].shape[:2], bool))
                imgs.append(img), masks.append(m), labels.append(0)
            for _ in range(len(idx)):  # balanced: as many anomalous samples as normal ones
                if self.pasteable and rng.random() < self.cfg.cutpaste_prob:
                    img, m = self._pasted()
                    if not m.any():
                        img, m = self.anomalies[self.pasteable[0]]
                else:
                    img, m = self.anomalies[rng.integers(len(self.anomalies))]
                img, m = self._augment(img, m)
                imgs.append(img), masks.append(m), labels.append(1)
            x = torch.from_numpy(np.ascontiguousarray(np.stack(imgs), dtype=np.float32)).permute(0, 3, 1, 2)
            y = torch.from_numpy(np.ascontiguousarray(np.stack(masks), dtype=np.float32))
            yield x, y, torch.tensor(labels)


def normalize(images01: torch.Tensor) -> torch.Tensor:
    """[0, 1] images -> the ImageNet-normalised input every backbone in the project sees."""
    mean = torch.as_tensor(_MEAN, device=images01.device)[:, None, None]
    std = torch.as_tensor(_STD, device=images01.device)[:, None, None]
    return (images01 - mean) / std


# ---------------------------------------------------------------------------------------------
# the method
# ---------------------------------------------------------------------------------------------
class APC(PatchCore):
    name = "apc"
    Config = APCConfig
    trains_per_category = True
    #: fine-tuning does not read PatchCore's patch-aggregation, coreset, bank and scoring settings
    TRAIN_IGNORES = frozenset({"patch_size", "pool_include_pad", "embed_dim", "coreset_ratio", "coreset",
                               "coreset_chunk", "coreset_proj_dim", "coreset_batch", "coreset_precision",
                               "max_bank_ram_mb", "num_neighbors", "sigma", "batch_size", "knn_backend", "knn_approx",
                               "knn_rescore", "score"})

    # -- labelled pool ---------------------------------------------------------------------
    def labelled_anomalies(self, ctx: FitContext) -> list:
        """Draw the N labelled anomalies; record them (and those to drop from evaluation) in meta."""
        cfg = self.config
        if cfg.labelled_dir:
            from defectlab.data import scan_category

            pool = [s for s in scan_category(cfg.labelled_dir, ctx.category).test if s.label == 1]
            where = f"{cfg.labelled_dir}/{ctx.category}/test"
        else:
            pool = [s for s in ctx.data.test if s.label == 1]
            where = f"{ctx.category}'s test anomalies"
        if not pool:
            raise ConfigError(f"methods.apc: no labelled anomalies in {where}")
        chosen = draw_labelled(pool, cfg.n_labelled, np.random.default_rng([ctx.seed, 9]))
        test_paths = {s.path.resolve() for s in ctx.data.test}
        self.meta["labelled_anomalies"] = [str(s.path) for s in chosen]
        self.meta["exclude_from_eval"] = [str(s.path) for s in chosen if s.path.resolve() in test_paths]
        self.meta["labelled_pool_size"] = len(pool)
        return chosen

    # -- fine-tuning -----------------------------------------------------------------------
    def finetune(self, backbone: nn.Module, ctx: FitContext, labelled: list) -> dict:
        """Train ``backbone`` (in place) through the U-Net heads on balanced batches; returns loss stats."""
        from tqdm.auto import tqdm

        cfg = self.config
        size = ctx.image_size
        normals = [load_image(s.path, size) for s in ctx.data.train]
        anomalies = [(load_image(s.path, size), load_mask(s.mask_paths, size)) for s in labelled]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ctx.seed)
            net = APCNet(backbone, cfg)
        net = net.to(self.device).train()
        opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        texture = ctx.extra.get("object_kind") == "texture"
        batches = BalancedBatches(normals, anomalies, cfg, np.random.default_rng([ctx.seed, 90]), texture)
        history: list[dict[str, float]] = []
        # resumable: one checkpoint per epoch in ctx.work_dir, for these inputs only (defectlab.resume)
        ckpt = Checkpoint(ctx.work_dir, f"apc-finetune-{ctx.category}", self.phase_config(cfg, "train"), ctx.seed,
                          size, backbone, image_files(ctx.data.train), image_files(labelled))
        start = 0
        state = ckpt.load(self.device)
        if state is not None:
            net.load_state_dict(state["net"])
            opt.load_state_dict(state["opt"])
            history, start = state["history"], int(state["epoch"])
        bar = tqdm(range(start, cfg.epochs), desc=f"apc fine-tune {ctx.category}", disable=not ctx.progress,
                   leave=False)
        for epoch in bar:
            batches.rng = np.random.default_rng([ctx.seed, 90, epoch])     # per epoch: resumes identically
            torch.manual_seed(ctx.seed * 1000 + epoch)
            sums: dict[str, float] = {}
            for i, (x01, m, y) in enumerate(batches):
                x01, m, y = x01.to(self.device), m.to(self.device), y.to(self.device)
                terms = apc_losses(net(normalize(x01)), x01, m, y, cfg)
                opt.zero_grad(set_to_none=True)
                terms["total"].backward()
                opt.step()
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach())
                log_step("loss/apc", float(terms["total"].detach()), epoch * len(batches) + i, cfg.epochs * len(batches))
            history.append({k: v / len(batches) for k, v in sums.items()})
            bar.set_postfix(loss=f"{history[-1]['total']:.4f}")
            ckpt.save({"epoch": epoch + 1, "history": history, "net": net.state_dict(), "opt": opt.state_dict()})
        ckpt.remove()
        backbone.eval()
        self.meta["loss_history"] = history
        stats = {"finetune_epochs": float(cfg.epochs), "n_labelled": float(len(labelled)),
                 "n_excluded_from_eval": float(len(self.meta.get("exclude_from_eval", [])))}
        if history:
            stats.update({f"loss_{k}_first": v for k, v in history[0].items()})
            stats.update({f"loss_{k}_last": v for k, v in history[-1].items()})
        return stats

    # -- train (`train` stage): draw the labelled anomalies, fine-tune the backbone ----------
    def train(self, ctx: FitContext) -> dict:
        """Draw the labelled anomalies (recorded in meta, ``exclude_from_eval`` included) and
        fine-tune the initial backbone through the U-Net heads; the fine-tuned encoder becomes
        this instance's PatchCore extractor (``trained_tensors``). No memory bank here."""
        cfg = self.config
        labelled = self.labelled_anomalies(ctx)
        backbone = backbone_for_fit(cfg.backbone, cfg.weights, ctx.pretrain_dir, seed=ctx.seed, dataset=ctx.dataset)
        t0 = time.perf_counter()
        stats = self.finetune(backbone, ctx, labelled)
        stats["finetune_seconds"] = time.perf_counter() - t0
        for p in backbone.parameters():
            p.requires_grad_(False)
        self.set_extractor(FeatureExtractor(backbone, cfg.layers))
        return stats

    def trained_tensors(self) -> dict[str, torch.Tensor]:
        """The fine-tuned encoder up to the deepest layer PatchCore reads (no decoder, no heads)."""
        if self.extractor is None:
            raise RuntimeError("apc: train() has not run; no fine-tuned backbone to save")
        return extractor_state(self.extractor)

    def load_trained_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.set_extractor(extractor_from_state(self.config.backbone, self.config.layers, tensors))

    # -- fit (`fit` stage): PatchCore's memory bank on the fine-tuned encoder ---------------
    def fit(self, ctx: FitContext) -> dict:
        """Load the `train` stage's fine-tuned encoder (and its meta: the labelled anomalies and
        ``exclude_from_eval``), then build PatchCore's bank of the *normal training* patches."""
        self.load_trained(ctx.train_dir)
        return super().fit(ctx)   # PatchCore.fit: the extractor is set, so only the bank is built

    # -- scoring ----------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """PatchCore's maps; the image score per ``score``: the largest patch score (``max``,
        APC Sec. 3) or PatchCore's Eq. 7 reweighting of it (``reweighted``)."""
        if self.config.score == "reweighted":
            return super().predict(images)
        scores, _ = self.patch_scores(images)
        maps = patch_scores_to_maps(scores, tuple(images.shape[-2:]), self.config.sigma)
        return scores.flatten(1).amax(1), maps
