"""PaDiM (Defard et al., "PaDiM: a Patch Distribution Modeling Framework for Anomaly Detection
and Localization", ICPR 2021).

Each patch position (i, j) of the first feature layer's grid gets a multivariate Gaussian
N(μ_ij, Σ_ij) fitted on the normal training images' embeddings, where an embedding is the
concatenation of layers 1–3 (deeper layers upsampled) reduced to a fixed random subset of ``d``
channels. Σ_ij is regularised by εI (ε = 0.01). A test patch's score is its Mahalanobis
distance to its position's Gaussian; the map is upsampled and Gaussian-smoothed (σ = 4), the
image score is the map's maximum.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from defectlab.backbones import FeatureExtractor, backbone_for_fit, extractor_from_state, extractor_state
from defectlab.config import StrictModel
from defectlab.memory import patch_scores_to_maps
from defectlab.methods.base import AnomalyMethod, FitContext, make_loader


class PaDiMConfig(StrictModel):
    backbone: str = "resnet18"
    weights: str = "random"
    layers: list[str] = ["layer1", "layer2", "layer3"]
    n_features: int = 100        # paper: 100 for ResNet-18, 550 for WideResNet-50
    epsilon: float = 0.01
    sigma: float = 4.0
    batch_size: int = 8


class PaDiM(AnomalyMethod):
    name = "padim"
    Config = PaDiMConfig

    def __init__(self, config: PaDiMConfig, device="cpu"):
        super().__init__(config, device)
        self.extractor: FeatureExtractor | None = None
        self.channels: torch.Tensor | None = None
        self.mean: torch.Tensor | None = None       # (P, d)
        self.inv_cov: torch.Tensor | None = None    # (P, d, d)
        self.grid: tuple[int, int] | None = None

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        feats = self.extractor(images.to(self.device))
        maps = [feats[layer] for layer in self.config.layers]
        size = maps[0].shape[-2:]
        emb = torch.cat([m if m.shape[-2:] == size else F.interpolate(m, size=size, mode="nearest") for m in maps], 1)
        return emb[:, self.channels.to(emb.device)]   # (B, d, h, w)

    def fit(self, ctx: FitContext) -> dict:
        cfg = self.config
        model = backbone_for_fit(cfg.backbone, cfg.weights, ctx.pretrain_dir, seed=ctx.seed, dataset=ctx.dataset)
        self.extractor = FeatureExtractor(model, cfg.layers).to(self.device).eval()
        with torch.no_grad():
            probe = self.extractor(torch.zeros(1, 3, ctx.image_size, ctx.image_size, device=self.device))
        total = sum(probe[layer].shape[1] for layer in cfg.layers)
        gen = torch.Generator().manual_seed(ctx.seed)
        d = min(cfg.n_features, total)
        self.channels = torch.randperm(total, generator=gen)[:d].sort().values

        # Streaming sufficient statistics. The d x d second moments of every position are the size of
        # the model itself (P x d x d: 4 096 x 550² = 5 GB float32 for WRN-50 at 256 px), so they are
        # kept in float32 (float64 needed > 20 GB there), on data shifted by the first batch's mean
        # so that the E[x²] - E[x]² subtraction does not cancel; the covariance is then formed and
        # inverted a chunk of positions at a time, in place.
        s1 = s2 = ref = None
        n = 0
        from tqdm.auto import tqdm

        for batch in tqdm(make_loader(ctx.data.train, ctx.image_size, cfg.batch_size), desc="padim",
                          disable=not ctx.progress, leave=False):
            with torch.no_grad():
                e = self._embed(batch["image"])                    # B, d, h, w
            b, _, h, w = e.shape
            e = e.permute(2, 3, 0, 1).reshape(h * w, b, d)       # P, B, d
            if s1 is None:
                ref = e.mean(1, keepdim=True)                      # P, 1, d
                s1 = torch.zeros(h * w, d, dtype=torch.float64, device=e.device)
                s2 = torch.zeros(h * w, d, d, dtype=torch.float32, device=e.device)
                self.grid = (h, w)
            c = e - ref
            s1 += c.sum(1, dtype=torch.float64)
            s2.baddbmm_(c.transpose(1, 2), c)
            n += b
        mean_c = s1 / n                                            # mean of the shifted data, float64
        eye = cfg.epsilon * torch.eye(d, dtype=torch.float64, device=s2.device)
        for i in range(0, h * w, 256):                             # s2 becomes the inverse covariances
            m = mean_c[i:i + 256]
            cov = (s2[i:i + 256].double() - n * m[:, :, None] * m[:, None, :]) / max(n - 1, 1) + eye
            # symmetric positive definite (+ ε·I): a Cholesky inverse, in float32 (2x faster than
            # float64 LU; entries agree to ~1e-7 relative, tested against a float64 reference)
            s2[i:i + 256] = torch.cholesky_inverse(torch.linalg.cholesky(cov.float()))
        self.mean = (ref[:, 0].double() + mean_c).float()
        self.inv_cov = s2
        self.meta.update({"image_size": ctx.image_size, "grid": list(self.grid), "n_train_images": n})
        return {"n_train_images": n, "n_positions": h * w, "n_features": d}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e = self._embed(images)
        b, d, h, w = e.shape
        delta = e.permute(2, 3, 0, 1).reshape(h * w, b, d) - self.mean[:, None]  # P, B, d
        m2 = torch.einsum("pbi,pij,pbj->pb", delta, self.inv_cov, delta).clamp_min_(0)
        scores = m2.sqrt().T.reshape(b, h, w)
        maps = patch_scores_to_maps(scores, tuple(images.shape[-2:]), self.config.sigma)
        return maps.flatten(1).max(1).values, maps

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"channels": self.channels, "mean": self.mean, "inv_cov": self.inv_cov, **extractor_state(self.extractor)}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.channels = tensors["channels"].cpu()
        self.mean = tensors["mean"]
        self.inv_cov = tensors["inv_cov"]
        self.grid = tuple(self.meta.get("grid", ()))
        self.extractor = extractor_from_state(self.config.backbone, self.config.layers, tensors).to(self.device)
