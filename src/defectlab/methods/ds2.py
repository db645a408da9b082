"""DS2 (He, Erfani, Gong, Ke, "Learning Transferable Representations for Image Anomaly
Localization Using Dense Pretraining", WACV 2024): dense self-supervised pretraining of a
ResNet-18, evaluated by a Gaussian density estimator (GDE) on image patches.

Pretraining (``DS2.pretrain``, dataset level, Sec. 3 and Algorithm 1)
--------------------------------------------------------------------
Every normal training image x gives two views t(x), t'(x): random resized crops (whose boxes in
x are recorded, so each feature cell's centre is known in x's coordinates), horizontal flips
and colour augmentation per ``color_aug``: ``full`` is PixPro/BYOL's set (colour jitter,
grayscale, blur, solarize); ``jitter`` keeps colour jitter only — Sec. 4.4(c): "color jitter is
essential for good performance, and in general, using fewer color augmentation gives better
result" (the per-combination table is in the supplementary, not in the paper); ``none`` is
geometric augmentation only (``true`` / ``false`` mean ``full`` / ``none``). Two branches see the
views:

* online:   backbone f -> per-scale projector g_s (1x1 conv, BN, ReLU, 1x1 conv) -> the pixel
            propagation module PPM (self-attention over the projected map, shared by the scales:
            y_i = sum_j max(cos(x_i, x_j), 0)^gamma * T(x_j), PixPro Eq. 2-3),
* momentum: f', g'_s, exponential moving averages of f, g_s (no gradients; m rises from
            ``momentum`` to 1 on a cosine schedule as in PixPro/BYOL).

Scales are ``scales`` = conv4 and conv5 (torchvision ``layer3``, ``layer4``; Sec. 3.3). For each
scale s and each direction (view a online, view b momentum; symmetrised over a<->b as in PixPro)
the positive pairs are (Eq. 2)

    p+ = {(i, j) | dist(i, j) < delta}  ∪  {argmax_(i,j) cos(p_i, p'_j)}

where dist is the distance of the two cells' centres in the original image divided by the
larger of the two cells' diagonals (PixPro's normalisation; delta = ``pos_threshold`` = 0.1 in
DS2 vs 0.7 in PixPro, Sec. 3.1), and the second term is the single most similar pair of
*backbone* feature vectors p_i in Θ_a = f(view a), p'_j in Θ'_b = f'(view b) (Sec. 3.2,
``feature_pair``; off = PixPro). The loss is the negative cosine similarity of the online output
y_i and the momentum output z_j over each image's positive pairs, summed over the two directions
and averaged over the scales (Eq. 3's 1/2 for two scales). Eq. 1 and 3 *sum* over the positive
pairs (``pair_weighting: sum``, the paper profile); ``mean`` averages them per image, as PixPro's
implementation does, which gives the single top-1 feature pair far more weight when a scale has
few geometric positives (c5 at delta = 0.1). With LARS (the paper's optimiser) the overall scale of
the loss does not matter, only this relative weighting of pairs, images and scales.

The online backbone is saved with ``defectlab.backbones.save_backbone`` as
``backbone.safetensors`` (one-for-all, the paper's setting) so that ``build_backbone(arch,
"ds2", dataset=...)`` gives it to every other method; ``per_category: true`` instead trains one
model per category into ``<category>/backbone.safetensors``.

Evaluation (``fit`` / ``predict``, Sec. 4.1, following Sohn et al. and CutPaste)
------------------------------------------------------------------------------
Each image is cut into ``patch_size`` patches at ``patch_stride`` (32 / 4 on 256 px images in
the paper: a 57x57 grid). Each patch goes through the frozen backbone on its own; its embedding
is the global average of the ``gde_layers`` outputs (L2-normalised). One Gaussian N(mu, Sigma)
is fitted on all normal training patches, Sigma with Ledoit-Wolf shrinkage (or a fixed
shrinkage). A test patch's score is its Mahalanobis distance; the patch grid is upsampled to
pixels by receptive-field Gaussian upsampling (each patch spreads its score over its own pixels
with a Gaussian of std ``sigma`` around its centre; overlapping patches are averaged with those
weights). The image score is the maximum of the map.
``weights: random`` evaluates the same GDE on a randomly initialised backbone (no checkpoint).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import field_validator
from torch import nn

from defectlab.backbones import (FeatureExtractor, build_backbone, extractor_from_state, extractor_state,
                                 save_backbone)
from defectlab.config import StrictModel
from defectlab.errors import ResourceMissingError
from defectlab.methods.base import AnomalyMethod, FitContext, PretrainContext, make_loader
from defectlab.resume import Checkpoint, image_files
from defectlab.steplog import log_step

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DS2Config(StrictModel):
    backbone: Literal["resnet18", "resnet50"] = "resnet18"
    # ---- pretraining ----
    per_category: bool = False            # paper: one model for all categories ("one-for-all")
    scales: list[Literal["layer2", "layer3", "layer4"]] = ["layer3", "layer4"]   # c4, c5
    feature_pair: bool = True             # Sec. 3.2 top-1 similar pair; False = PixPro
    pos_threshold: float = 0.1            # delta, in units of the larger feature-cell diagonal
    pair_weighting: Literal["mean", "sum"] = "mean"   # sum: Eq. 1/3 as written; mean: per image (PixPro code)
    proj_hidden: int = 4096
    proj_dim: int = 256
    ppm_gamma: float = 2.0
    ppm_layers: Literal[1, 2] = 1
    momentum: float = 0.99                # base EMA momentum, cosine-increased to 1
    epochs: int = 400
    max_steps: int | None = None          # cap on optimiser steps (None: epochs decide)
    batch_size: int = 64
    optimizer: Literal["lars", "sgd", "adamw"] = "lars"
    lr: float = 1.0                       # base LR for batch 256 (scaled by batch_size / 256)
    weight_decay: float = 1e-5
    warmup_epochs: float = 5.0
    load_size: int | None = None          # images are resized to this before cropping (None: image_size)
    crop_size: int = 224
    min_scale: float = 0.08
    #: full: jitter + grayscale + blur + solarize (PixPro/BYOL); jitter: colour jitter only (Sec. 4.4(c):
    #: fewer colour augmentations work better, jitter is essential); none: crop + flip only
    color_aug: Literal["full", "jitter", "none"] = "full"
    jitter: list[float] = [0.4, 0.4, 0.2, 0.1]   # brightness, contrast, saturation, hue
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: list[float] = [1.0, 0.1]      # per view (BYOL asymmetry)
    solarize_p: list[float] = [0.0, 0.2]
    checkpoint_every: int = 0             # steps between resumable checkpoints in ctx.work_dir (0: off)
    # ---- GDE evaluation ----
    weights: str = "ds2"                  # ds2 (the pretrain output) | random | imagenet | a path
    gde_layers: list[str] = ["layer4"]
    patch_size: int = 32
    patch_stride: int = 4
    l2_normalize: bool = True
    shrinkage: Literal["ledoit_wolf"] | float = "ledoit_wolf"
    sigma: float = 4.0
    fit_batch_size: int = 8
    patch_batch: int = 512
    max_fit_patches: int | None = None    # random subset of training patches for the Gaussian (None: all)

    @field_validator("color_aug", mode="before")
    @classmethod
    def _color_aug_bool(cls, value):
        """``true`` / ``false`` (the earlier boolean form) mean ``full`` / ``none``."""
        return {True: "full", False: "none"}.get(value, value) if isinstance(value, bool) else value


# =============================================================================================
# augmentation with known geometry
# =============================================================================================
def sample_boxes(n: int, gen: torch.Generator, min_scale: float, max_scale: float = 1.0,
                 ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """Random-resized-crop boxes (n, 4) = (x0, y0, x1, y1) in normalised [0, 1] image coordinates."""
    area = torch.empty(n).uniform_(min_scale, max_scale, generator=gen)
    log_r = torch.empty(n).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=gen)
    r = log_r.exp()
    w = (area * r).sqrt().clamp(max=1.0)
    h = (area / r).sqrt().clamp(max=1.0)
    x0 = torch.rand(n, generator=gen) * (1 - w)
    y0 = torch.rand(n, generator=gen) * (1 - h)
    return torch.stack([x0, y0, x0 + w, y0 + h], 1)


def crop_views(images: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, size: int) -> torch.Tensor:
    """Crop ``boxes`` (normalised) out of ``images`` (B, 3, H, W), resize to ``size`` (bilinear,
    averaging 2x2 samples per output pixel), and mirror where ``flips``."""
    from torchvision.ops import roi_align

    b, _, h, w = images.shape
    scale = torch.tensor([w, h, w, h], dtype=images.dtype, device=images.device)
    rois = torch.cat([torch.arange(b, device=images.device, dtype=images.dtype)[:, None],
                      boxes.to(images) * scale], 1)
    out = roi_align(images, rois, output_size=size, spatial_scale=1.0, sampling_ratio=2, aligned=True)
    return torch.where(flips.to(images.device)[:, None, None, None], out.flip(-1), out)


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def color_augment(x: torch.Tensor, gen: torch.Generator, cfg: DS2Config, view: int) -> torch.Tensor:
    """Photometric augmentation of a batch in [0, 1] (per-sample random factors): colour jitter,
    then, with ``color_aug: full``, BYOL/PixPro's grayscale, blur and solarize."""
    import torchvision.transforms.v2.functional as TF

    b = x.shape[0]
    dev = x.device

    def u(lo, hi):
        return torch.empty(b).uniform_(lo, hi, generator=gen).to(dev)[:, None, None, None]

    def coin(p):
        return (torch.rand(b, generator=gen) < p).to(dev)[:, None, None, None]

    br, co, sa, hu = cfg.jitter
    jit = coin(cfg.jitter_p)
    y = x * u(1 - br, 1 + br)
    y = (y - _gray(y).mean((2, 3), keepdim=True)) * u(1 - co, 1 + co) + _gray(y).mean((2, 3), keepdim=True)
    y = y.clamp(0, 1)
    y = (y - _gray(y)) * u(1 - sa, 1 + sa) + _gray(y)
    y = y.clamp(0, 1)
    if hu > 0:
        hue = torch.empty(b).uniform_(-hu, hu, generator=gen)
        y = torch.stack([TF.adjust_hue(y[i], float(hue[i])) for i in range(b)])
    x = torch.where(jit, y, x)
    if cfg.color_aug == "jitter":
        return x.clamp(0, 1)
    x = torch.where(coin(cfg.grayscale_p), _gray(x).expand_as(x), x)
    blur = torch.rand(b, generator=gen) < cfg.blur_p[view]
    sig = torch.empty(b).uniform_(0.1, 2.0, generator=gen)
    k = max(3, int(0.1 * x.shape[-1]) // 2 * 2 + 1)
    if blur.any():
        x = torch.stack([TF.gaussian_blur(x[i], [k, k], [float(sig[i])] * 2) if blur[i] else x[i] for i in range(b)])
    x = torch.where(coin(cfg.solarize_p[view]) & (x >= 0.5), 1 - x, x)
    return x.clamp(0, 1)


def normalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype)[:, None, None]
    std = torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype)[:, None, None]
    return (x - mean) / std


# =============================================================================================
# positive pairs and loss
# =============================================================================================
def cell_centres(boxes: torch.Tensor, flips: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Centres (B, h*w, 2) of an (h, w) feature grid of each view in original-image coordinates,
    row-major over the (possibly mirrored) view."""
    dev = boxes.device
    u = (torch.arange(w, device=dev, dtype=boxes.dtype) + 0.5) / w          # in view, left to right
    v = (torch.arange(h, device=dev, dtype=boxes.dtype) + 0.5) / h
    u = torch.where(flips.to(dev)[:, None], 1 - u[None], u[None])             # mirrored view
    x = boxes[:, 0:1] + u * (boxes[:, 2:3] - boxes[:, 0:1])                  # B, w
    y = boxes[:, 1:2] + v[None] * (boxes[:, 3:4] - boxes[:, 1:2])            # B, h
    xx = x[:, None, :].expand(-1, h, -1)
    yy = y[:, :, None].expand(-1, -1, w)
    return torch.stack([xx, yy], -1).reshape(boxes.shape[0], h * w, 2)


def geometric_positives(boxes_a, flips_a, boxes_b, flips_b, h: int, w: int, threshold: float,
                        image_hw: tuple[int, int] = (1, 1)) -> torch.Tensor:
    """(B, hw, hw) mask of cell pairs whose centres are closer than ``threshold`` times the larger
    of the two views' cell diagonals (PixPro's normalised distance)."""
    sy, sx = image_hw
    scale = torch.tensor([sx, sy], dtype=boxes_a.dtype, device=boxes_a.device)
    ca = cell_centres(boxes_a, flips_a, h, w) * scale
    cb = cell_centres(boxes_b, flips_b, h, w) * scale

    def diag(boxes):
        return torch.sqrt(((boxes[:, 2] - boxes[:, 0]) * sx / w) ** 2 + ((boxes[:, 3] - boxes[:, 1]) * sy / h) ** 2)

    norm = torch.maximum(diag(boxes_a), diag(boxes_b))[:, None, None]
    return torch.cdist(ca, cb) / norm < threshold


def feature_top1_positive(feat_a: torch.Tensor, feat_b: torch.Tensor) -> torch.Tensor:
    """(B, hw, hw) one-hot mask of the single most cosine-similar pair between backbone maps
    feat_a (B, C, h, w) and feat_b (Sec. 3.2)."""
    a = F.normalize(feat_a.flatten(2), dim=1)
    b = F.normalize(feat_b.flatten(2), dim=1)
    sim = torch.einsum("bci,bcj->bij", a, b)
    flat = sim.flatten(1).argmax(1)
    mask = torch.zeros_like(sim, dtype=torch.bool).flatten(1)
    mask[torch.arange(sim.shape[0], device=sim.device), flat] = True
    return mask.view_as(sim)


def pair_loss(y: torch.Tensor, z: torch.Tensor, positives: torch.Tensor, weighting: str = "mean") -> torch.Tensor:
    """Negative cosine similarity of online y (B, C, h, w) and momentum z over the positive pairs of
    each image, summed (``weighting="sum"``: Eq. 1) or averaged (``"mean"``) over them, then
    averaged over the batch."""
    cos = torch.einsum("bci,bcj->bij", F.normalize(y.flatten(2), dim=1), F.normalize(z.flatten(2), dim=1))
    pos = positives.to(cos.dtype)
    per_image = -(cos * pos).sum((1, 2))
    if weighting == "mean":
        per_image = per_image / (pos.sum((1, 2)) + 1e-6)
    return per_image.mean()


# =============================================================================================
# networks
# =============================================================================================
def projector(in_dim: int, hidden: int, out: int) -> nn.Module:
    """Two 1x1 convolutions with BN and ReLU in between (Sec. 3)."""
    return nn.Sequential(nn.Conv2d(in_dim, hidden, 1), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
                         nn.Conv2d(hidden, out, 1))


class PPM(nn.Module):
    """Pixel-propagation module (PixPro Eq. 2-3): y_i = sum_j max(cos(x_i, x_j), 0)^gamma T(x_j)."""

    def __init__(self, dim: int, gamma: float = 2.0, layers: int = 1):
        super().__init__()
        self.gamma = gamma
        if layers == 1:
            self.transform = nn.Conv2d(dim, dim, 1)
        else:
            self.transform = nn.Sequential(nn.Conv2d(dim, dim, 1), nn.BatchNorm2d(dim), nn.ReLU(inplace=True),
                                           nn.Conv2d(dim, dim, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        xn = F.normalize(x.flatten(2), dim=1)
        sim = torch.einsum("bci,bcj->bij", xn, xn).clamp_min(0).pow(self.gamma)
        t = self.transform(x).flatten(2)
        return torch.bmm(t, sim.transpose(1, 2)).view(b, c, h, w)


_CHANNELS = {"resnet18": {"layer2": 128, "layer3": 256, "layer4": 512},
             "resnet50": {"layer2": 512, "layer3": 1024, "layer4": 2048}}


def resnet_stages(model: nn.Module, x: torch.Tensor, scales: list[str]) -> dict[str, torch.Tensor]:
    """Run a torchvision ResNet up to the deepest of ``scales``; return those stage outputs."""
    out = {}
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    for name in ("layer1", "layer2", "layer3", "layer4"):
        x = getattr(model, name)(x)
        if name in scales:
            out[name] = x
        if len(out) == len(scales):
            break
    return out


class DS2Net(nn.Module):
    """Online (backbone, projectors, PPM) and momentum (backbone', projectors') branches."""

    def __init__(self, cfg: DS2Config, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        self.scales = [s for s in ("layer2", "layer3", "layer4") if s in cfg.scales]
        self.backbone = build_backbone(cfg.backbone, "random", seed=seed).train()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            self.projectors = nn.ModuleDict({s: projector(_CHANNELS[cfg.backbone][s], cfg.proj_hidden, cfg.proj_dim)
                                             for s in self.scales})
            self.ppm = PPM(cfg.proj_dim, cfg.ppm_gamma, cfg.ppm_layers)
        self.backbone_m = copy.deepcopy(self.backbone)
        self.projectors_m = copy.deepcopy(self.projectors)
        for p in list(self.backbone_m.parameters()) + list(self.projectors_m.parameters()):
            p.requires_grad_(False)

    def online_parameters(self):
        return [p for m in (self.backbone, self.projectors, self.ppm) for p in m.parameters()]

    @torch.no_grad()
    def momentum_update(self, m: float) -> None:
        """EMA: theta' <- m theta' + (1 - m) theta for backbone and projectors."""
        for online, target in ((self.backbone, self.backbone_m), (self.projectors, self.projectors_m)):
            for po, pm in zip(online.parameters(), target.parameters()):
                pm.mul_(m).add_(po.detach(), alpha=1 - m)

    def forward(self, v1, v2, geo1, geo2, image_hw=(1, 1)) -> tuple[torch.Tensor, dict]:
        """DS2 loss (Eq. 3) for views v1, v2 with geometry geo = (boxes, flips)."""
        cfg = self.cfg
        both = torch.cat([v1, v2])
        on = resnet_stages(self.backbone, both, self.scales)
        with torch.no_grad():
            mo = resnet_stages(self.backbone_m, both, self.scales)
        total = 0.0
        stats = {}
        b = v1.shape[0]
        for s in self.scales:
            y = self.ppm(self.projectors[s](on[s]))
            with torch.no_grad():
                z = self.projectors_m[s](mo[s])
            h, w = on[s].shape[-2:]
            loss_s = 0.0
            n_pos = 0.0
            for a, bb in ((0, 1), (1, 0)):            # online view a vs momentum view b, symmetrised
                ga, gb = (geo1, geo2) if a == 0 else (geo2, geo1)
                pos = geometric_positives(ga[0], ga[1], gb[0], gb[1], h, w, cfg.pos_threshold, image_hw)
                if cfg.feature_pair:
                    pos = pos | feature_top1_positive(on[s][a * b:(a + 1) * b].detach(), mo[s][bb * b:(bb + 1) * b])
                loss_s = loss_s + pair_loss(y[a * b:(a + 1) * b], z[bb * b:(bb + 1) * b], pos, cfg.pair_weighting)
                n_pos += float(pos.sum()) / (2 * b)
            total = total + loss_s / len(self.scales)
            stats[f"loss_{s}"] = float(loss_s.detach())
            stats[f"positives_{s}"] = n_pos
        return total, stats


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al. 2017), as used by
    PixPro/BYOL; biases and BN parameters (1-D) get neither weight decay nor adaptation."""

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.001):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if p.ndim > 1:
                    d = d.add(p, alpha=group["weight_decay"])
                    pn, dn = torch.norm(p), torch.norm(d)
                    trust = torch.where((pn > 0) & (dn > 0), group["eta"] * pn / dn, torch.ones_like(pn))
                    d = d.mul(trust)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"].mul_(group["momentum"]).add_(d)
                p.add_(mu, alpha=-group["lr"])


def lr_at(step: int, total: int, warmup: int, base: float) -> float:
    """Linear warm-up then cosine decay to 0."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def momentum_at(step: int, total: int, base: float) -> float:
    """BYOL/PixPro schedule: m = 1 - (1 - base) (cos(pi k / K) + 1) / 2."""
    return 1 - (1 - base) * (math.cos(math.pi * step / max(1, total)) + 1) / 2


def _load_images(paths, size: int) -> torch.Tensor:
    from defectlab.data.mvtec import load_image

    return torch.stack([torch.from_numpy((load_image(p, size) * 255).round().astype(np.uint8)).permute(2, 0, 1)
                        for p in paths])


def make_batch_views(images: torch.Tensor, gen: torch.Generator, cfg: DS2Config):
    """Two augmented, normalised views of ``images`` (B, 3, H, W) in [0, 1] with their geometry."""
    b = images.shape[0]
    views, geos = [], []
    for view in (0, 1):
        boxes = sample_boxes(b, gen, cfg.min_scale)
        flips = torch.rand(b, generator=gen) < 0.5
        x = crop_views(images, boxes, flips, cfg.crop_size)
        if cfg.color_aug != "none":
            x = color_augment(x, gen, cfg, view)
        views.append(normalize(x))
        geos.append((boxes.to(images.device), flips.to(images.device)))
    return views, geos


def train_ds2(cfg: DS2Config, paths: list, *, image_size: int | tuple[int, int], seed: int, device: torch.device,
              work_dir: Path | None = None, progress: bool = False, desc: str = "ds2",
              curve: str = "loss/ds2") -> tuple[DS2Net, dict]:
    """Pretrain a DS2Net on the images at ``paths``; returns the network and training statistics.
    With ``work_dir`` and ``cfg.checkpoint_every``, resumable from a checkpoint of the same inputs.
    Each step's loss goes to ``steplog`` as curve ``curve``."""
    from tqdm.auto import tqdm

    from defectlab.data.transform import hw

    size = cfg.load_size or image_size
    images = _load_images(paths, size)                     # uint8 on CPU
    n = len(images)
    bs = min(cfg.batch_size, n)
    steps_per_epoch = max(1, n // bs)
    total = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    net = DS2Net(cfg, seed).to(device)
    net.train()
    params = net.online_parameters()
    base_lr = cfg.lr * bs / 256 if cfg.optimizer == "lars" else cfg.lr
    if cfg.optimizer == "lars":
        opt = LARS(params, lr=base_lr, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=base_lr, momentum=0.9, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=base_lr, weight_decay=cfg.weight_decay)
    start, losses = 0, []
    checkpoint = Checkpoint(work_dir, desc.replace(" ", "-"), cfg.model_dump(mode="json", exclude={"checkpoint_every"}),
                            image_files(paths), image_size, seed)
    state = checkpoint.load(device)
    if state is not None:
        net.load_state_dict(state["net"])
        opt.load_state_dict(state["opt"])
        start, losses = int(state["step"]), state["losses"].tolist()
    bar = tqdm(range(start, total), desc=desc, disable=not progress, leave=False)
    stats: dict = {}
    for step in bar:
        epoch, k = divmod(step, steps_per_epoch)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        idx = order[k * bs:(k + 1) * bs]
        gen = torch.Generator().manual_seed(seed * 1_000_003 + 7919 * (step + 1))
        batch = images[idx].to(device).float() / 255
        (v1, v2), (g1, g2) = make_batch_views(batch, gen, cfg)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, warmup, base_lr)
        loss, stats = net(v1, v2, g1, g2, hw(size))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        net.momentum_update(momentum_at(step, total, cfg.momentum))
        losses.append(float(loss.detach()))
        log_step(curve, losses[-1], step, total)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < total:
            checkpoint.save({"net": net.state_dict(), "opt": opt.state_dict(), "step": torch.tensor(step + 1),
                             "losses": torch.tensor(losses)})
    checkpoint.remove()
    net.eval()
    k = max(1, min(10, len(losses) // 4))
    out = {"steps": float(total), "images": float(n), "loss_first": float(np.mean(losses[:k])) if losses else float("nan"),
           "loss_last": float(np.mean(losses[-k:])) if losses else float("nan"), **{k2: float(v) for k2, v in stats.items()}}
    return net, out


# =============================================================================================
# GDE head
# =============================================================================================
def ledoit_wolf(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mean, Ledoit-Wolf shrunk covariance and the shrinkage of samples x (n, p) (float64)."""
    x = x.double()
    n, p = x.shape
    mean = x.mean(0)
    xc = x - mean
    s = xc.T @ xc / n
    mu = torch.trace(s) / p
    delta = ((s - mu * torch.eye(p, dtype=s.dtype, device=s.device)) ** 2).sum() / p
    beta = ((xc * xc).sum(1) ** 2).sum() / n - (s * s).sum()
    beta = torch.clamp(beta / (n * p), max=delta)
    shrink = float(beta / delta) if delta > 0 else 0.0
    return mean, (1 - shrink) * s + shrink * mu * torch.eye(p, dtype=s.dtype, device=s.device), shrink


def gaussian_kernel(size: int, sigma: float, device=None) -> torch.Tensor:
    c = (size - 1) / 2
    r = torch.arange(size, dtype=torch.float32, device=device) - c
    g = torch.exp(-(r ** 2) / (2 * sigma ** 2)) if sigma > 0 else torch.ones(size, device=device)
    return g[:, None] * g[None, :]


def receptive_field_upsample(scores: torch.Tensor, patch: int, stride: int, sigma: float) -> torch.Tensor:
    """(B, gh, gw) patch scores -> (B, (gh-1)*stride+patch, ...) pixel map: each pixel is the
    Gaussian-weighted average of the scores of the patches covering it."""
    k = gaussian_kernel(patch, sigma, scores.device)[None, None]
    num = F.conv_transpose2d(scores[:, None].float(), k, stride=stride)
    den = F.conv_transpose2d(torch.ones_like(scores[:1, None]).float(), k, stride=stride)
    return (num / den.clamp_min(1e-12))[:, 0]


class DS2(AnomalyMethod):
    name = "ds2"
    Config = DS2Config
    trains_in_pretrain = True
    #: the DVC `backbone` stage runs ``pretrain`` once per dataset (params ``backbone.ds2``); the ds2
    #: method's own pretrain stage then freezes that checkpoint like every other method's.
    shared_backbone = True

    def __init__(self, config: DS2Config, device="cpu"):
        super().__init__(config, device)
        self.extractor: FeatureExtractor | None = None
        self.mean: torch.Tensor | None = None
        self.inv_cov: torch.Tensor | None = None

    # ---- pretraining --------------------------------------------------------------------
    @classmethod
    def pretrain(cls, config: DS2Config, ctx: PretrainContext) -> dict:
        groups = {c: ctx.train_images(c) for c in ctx.categories}
        if not config.per_category:
            groups = {None: [p for c in ctx.categories for p in groups[c]]}
        stats: dict = {}
        for cat, paths in groups.items():
            out = ctx.out_dir if cat is None else ctx.out_dir / cat
            out.mkdir(parents=True, exist_ok=True)
            net, st = train_ds2(config, paths, image_size=ctx.image_size, seed=ctx.seed, device=ctx.device,
                                work_dir=ctx.work_dir, progress=ctx.progress, desc=f"ds2 {ctx.dataset} {cat or 'all'}",
                                curve="loss/ds2" if cat is None else f"loss/ds2/{cat}")
            meta = {"weights": "ds2", "dataset": ctx.dataset, "categories": ctx.categories if cat is None else [cat],
                    "config": config.model_dump(mode="json"), "stats": st}
            save_backbone(net.backbone, out / "backbone.safetensors", config.backbone, meta)
            from safetensors.torch import save_file

            heads = {f"projectors.{k}": v for k, v in net.projectors.state_dict().items()}
            heads.update({f"ppm.{k}": v for k, v in net.ppm.state_dict().items()})
            save_file({k: v.detach().cpu().contiguous() for k, v in heads.items()}, str(out / "heads.safetensors"))
            (out / "ds2.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
            stats.update({(f"{cat}/" if cat else "") + k: v for k, v in st.items()})
        return stats

    # ---- GDE ----------------------------------------------------------------------------
    def _backbone(self, ctx: FitContext) -> tuple[nn.Module, str]:
        cfg = self.config
        if cfg.weights != "ds2":
            return build_backbone(cfg.backbone, cfg.weights, seed=ctx.seed, dataset=ctx.dataset), cfg.weights
        if ctx.pretrain_dir is not None:
            folder = Path(ctx.pretrain_dir) / ctx.category if cfg.per_category else Path(ctx.pretrain_dir)
            path = folder / "backbone.safetensors"
            if not path.exists():
                raise ResourceMissingError(f"{path}: no DS2 backbone; run the ds2 pretrain stage")
            # every backbone key must be in the checkpoint (only a classification head may be absent)
            return build_backbone(cfg.backbone, str(path), seed=ctx.seed), str(path)
        return build_backbone(cfg.backbone, "ds2", seed=ctx.seed, dataset=ctx.dataset), "ds2"

    def _pad(self, images: torch.Tensor) -> torch.Tensor:
        p, s = self.config.patch_size, self.config.patch_stride
        h, w = images.shape[-2:]
        ph = (s - (h - p) % s) % s if h >= p else p - h
        pw = (s - (w - p) % s) % s if w >= p else p - w
        return F.pad(images, (0, pw, 0, ph), mode="replicate") if ph or pw else images

    def _crops(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, gh, gw, 3, p, p): the grid of patches, each embedded on its own."""
        cfg = self.config
        x = self._pad(images.to(self.device))
        patches = x.unfold(2, cfg.patch_size, cfg.patch_stride).unfold(3, cfg.patch_size, cfg.patch_stride)
        return patches.permute(0, 2, 3, 1, 4, 5)

    @torch.no_grad()
    def floor_forward(self, images: torch.Tensor) -> None:
        """The backbone over every crop of the grid (the paper's protocol: no shared image forward)."""
        for chunk in self._crops(images).flatten(0, 2).split(self.config.patch_batch):
            self.extractor(chunk)

    @torch.no_grad()
    def patch_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, gh, gw, D) embeddings of the patch grid."""
        cfg = self.config
        patches = self._crops(images)
        b, gh, gw = patches.shape[:3]
        out = []
        for chunk in patches.flatten(0, 2).split(cfg.patch_batch):
            feats = self.extractor(chunk)
            e = torch.cat([feats[layer].mean((2, 3)) for layer in cfg.gde_layers], 1)
            out.append(F.normalize(e, dim=1) if cfg.l2_normalize else e)
        return torch.cat(out).view(b, gh, gw, -1)

    def fit(self, ctx: FitContext) -> dict:
        from tqdm.auto import tqdm

        cfg = self.config
        model, source = self._backbone(ctx)
        self.extractor = FeatureExtractor(model, cfg.gde_layers).to(self.device).eval()
        embs = []
        for batch in tqdm(make_loader(ctx.data.train, ctx.image_size, cfg.fit_batch_size), desc="ds2 gde",
                          disable=not ctx.progress, leave=False):
            embs.append(self.patch_embeddings(batch["image"]).flatten(0, 2))
        x = torch.cat(embs)
        if cfg.max_fit_patches is not None and x.shape[0] > cfg.max_fit_patches:
            gen = torch.Generator().manual_seed(ctx.seed)
            x = x[torch.randperm(x.shape[0], generator=gen)[:cfg.max_fit_patches].to(x.device)]
        if cfg.shrinkage == "ledoit_wolf":
            mean, cov, shrink = ledoit_wolf(x)
        else:
            xd = x.double()
            mean = xd.mean(0)
            cov = torch.cov(xd.T, correction=1)
            shrink = float(cfg.shrinkage)
            mu = torch.trace(cov) / cov.shape[0]
            cov = (1 - shrink) * cov + shrink * mu * torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
        self.mean = mean.float()
        self.inv_cov = torch.linalg.inv(cov).float()
        self.meta.update({"image_size": ctx.image_size, "backbone_source": source})
        return {"n_train_patches": float(x.shape[0]), "embedding_dim": float(x.shape[1]), "shrinkage": shrink}

    @torch.no_grad()
    def patch_scores(self, images: torch.Tensor) -> torch.Tensor:
        """Mahalanobis distance of each patch embedding to the normal Gaussian, (B, gh, gw)."""
        e = self.patch_embeddings(images)
        d = e - self.mean
        m2 = ((d @ self.inv_cov) * d).sum(-1).clamp_min(0)
        return m2.sqrt()

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        h, w = images.shape[-2:]
        maps = receptive_field_upsample(self.patch_scores(images), cfg.patch_size, cfg.patch_stride, cfg.sigma)
        maps = maps[:, :h, :w]
        return maps.flatten(1).max(1).values, maps

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean, "inv_cov": self.inv_cov, **extractor_state(self.extractor)}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.mean = tensors["mean"].to(self.device)
        self.inv_cov = tensors["inv_cov"].to(self.device)
        self.extractor = extractor_from_state(self.config.backbone, self.config.gde_layers, tensors).to(self.device)
