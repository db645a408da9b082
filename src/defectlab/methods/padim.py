"""PaDiM (Defard et al., "PaDiM: a Patch Distribution Modeling Framework for Anomaly Detection
and Localization", ICPR 2021).

Each patch position (i, j) of the first feature layer's grid gets a multivariate Gaussian
N(μ_ij, Σ_ij) fitted on the normal training images' embeddings, where an embedding is the
concatenation of layers 1–3 (deeper layers upsampled) reduced to a fixed random subset of ``d``
channels. Σ_ij is regularised by εI (ε = 0.01). A test patch's score is its Mahalanobis
distance to its position's Gaussian; the map is upsampled and Gaussian-smoothed (σ = 4), the
image score is the map's maximum.

With n < d training images, Σ_ij⁻¹ = (I − ZᵀZ)/ε exactly for an n × d matrix Z per position
(Woodbury), so the model keeps Z instead of the d × d inverse and scores a patch in n·d instead of
d² operations: (|δ|² − |Zδ|²)/ε.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from defectlab.backbones import FeatureExtractor, backbone_for_fit, extractor_from_state, extractor_state
from defectlab.config import StrictModel
from defectlab.memory import patch_scores_to_maps
from defectlab.methods.base import AnomalyMethod, FitContext, make_loader


def _nearest_source(n_in: int, n_out: int, device) -> torch.Tensor:
    """Index of the input cell each of ``n_out`` outputs reads in ``F.interpolate(mode="nearest")``."""
    ramp = torch.arange(n_in, dtype=torch.float32, device=device)[None, None, :, None]
    return F.interpolate(ramp, size=(n_out, 1), mode="nearest")[0, 0, :, 0].long()


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
    BUFFER_BYTES = 256 << 20      # embeddings gathered before each fold into the second moments
    #: n < d: keep all embeddings (P x n x d) and invert n x n, up to this many bytes; None: no cap
    #: beyond the streaming route's own P x d x d second moments, which are always larger
    WOODBURY_BYTES: int | None = None

    def __init__(self, config: PaDiMConfig, device="cpu"):
        super().__init__(config, device)
        self.extractor: FeatureExtractor | None = None
        self.channels: torch.Tensor | None = None
        self.mean: torch.Tensor | None = None       # (P, d)
        self.inv_cov: torch.Tensor | None = None    # (P, d, d), or None when ``factor`` holds Σ⁻¹
        self.factor: torch.Tensor | None = None     # (P, n, d): Σ⁻¹ = (I − ZᵀZ)/ε, when n < d
        self.grid: tuple[int, int] | None = None

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, d, h, w): the ``channels`` of the layers' concatenation, on the first layer's grid
        (nearest upsampling). Each layer's selected channels are taken before the deeper maps are
        upsampled (same result as selecting from the upsampled concatenation, without upsampling the
        channels never used). The result is a view of a position-major (h, w, B, d) tensor, the
        layout the fit and the Mahalanobis distances read (``permute(2, 3, 0, 1)`` is contiguous),
        written in one strided copy per layer."""
        feats = self.extractor(images.to(self.device))
        maps = [feats[layer] for layer in self.config.layers]
        b, (h, w) = maps[0].shape[0], maps[0].shape[-2:]
        out = torch.empty(h, w, b, len(self.channels), dtype=maps[0].dtype, device=maps[0].device)
        start = col = 0
        for m in maps:
            idx = self.channels[(self.channels >= start) & (self.channels < start + m.shape[1])] - start
            start += m.shape[1]
            src = m[:, idx.to(m.device)].permute(2, 3, 0, 1)              # h_l, w_l, B, c (a view)
            hl, wl = src.shape[:2]
            dst = out[..., col:col + len(idx)]
            col += len(idx)
            if (hl, wl) == (h, w):
                dst.copy_(src)
            elif h % hl == 0 and w % wl == 0:     # nearest by an integer factor: a broadcast copy
                dst.view(hl, h // hl, wl, w // wl, b, -1).copy_(src[:, None, :, None])
            else:                                 # the source cells F.interpolate(mode="nearest") reads
                rows, cols = (_nearest_source(n_in, n_out, m.device) for n_in, n_out in ((hl, h), (wl, w)))
                dst.copy_(src[rows[:, None], cols[None, :]])
        return out.permute(2, 3, 0, 1)

    def fit(self, ctx: FitContext) -> dict:
        cfg = self.config
        model = backbone_for_fit(cfg.backbone, cfg.weights, ctx.pretrain_dir, seed=ctx.seed, dataset=ctx.dataset)
        self.extractor = FeatureExtractor(model, cfg.layers).to(self.device).eval()
        with torch.no_grad():
            probe = self.extractor(torch.zeros(1, 3, 64, 64, device=self.device))   # channel counts only
        total = sum(probe[layer].shape[1] for layer in cfg.layers)
        gen = torch.Generator().manual_seed(ctx.seed)
        d = min(cfg.n_features, total)
        self.channels = torch.randperm(total, generator=gen)[:d].sort().values

        # Σ_ij⁻¹ for every position, from the embeddings shifted by the first batch's mean (so that
        # float32 loses nothing to cancellation, also for features far from 0; tested against float64
        # with a 1e3 offset). Two exact routes, chosen by the number of images n against d:
        #  * n < d (PaDiM's usual case: d = 550 for WRN-50, a few hundred images): keep them all, Y
        #    (n x d per position, centred, / √(n−1)), and use Σ⁻¹ = (εI + YᵀY)⁻¹ = (I − Yᵀ(εI + YYᵀ)⁻¹Y) / ε
        #    — an n x n Cholesky instead of a d x d inverse (2x faster at n = 60, d = 100 and at
        #    n = 200, d = 550; as accurate; batched LAPACK runs one small factorisation per matrix,
        #    ~6 GFLOP/s here, so the smaller one matters). The model keeps Z = L⁻¹Y (LLᵀ = εI + YYᵀ),
        #    so Σ⁻¹ = (I − ZᵀZ)/ε: n x d per position instead of d x d (less memory, and predict's
        #    cost per patch drops from d² to n·d; the file is larger than the stored triangle only
        #    for n > d/2, by at most 2x).
        #  * otherwise stream sufficient statistics: float32 second moments P x d x d (the size of the
        #    model: 4 096 x 550² = 5 GB for WRN-50 at 256 px), folded in from a buffer of up to
        #    BUFFER_BYTES with one batched matmul per fill, then the covariance formed and
        #    Cholesky-inverted in place, 256 positions at a time.
        from tqdm.auto import tqdm

        n_images = len(ctx.data.train)
        self.factor = self.inv_cov = None
        s1 = s2 = ref = buf = None
        n = k = 0
        woodbury = False

        def fold():
            c = buf[:, :k]
            s1.add_(c.sum(1))
            s2.baddbmm_(c.transpose(1, 2), c)

        for batch in tqdm(make_loader(ctx.data.train, ctx.image_size, cfg.batch_size), desc="padim",
                          disable=not ctx.progress, leave=False):
            with torch.no_grad():
                e = self._embed(batch["image"])                    # B, d, h, w
            b, _, h, w = e.shape
            if buf is None:
                p = h * w
                self.grid = (h, w)
                ref = e.mean(0).permute(1, 2, 0).reshape(p, 1, d)      # P, 1, d
                cap = 4 * p * d * d if self.WOODBURY_BYTES is None else self.WOODBURY_BYTES
                woodbury = n_images < d and 4 * p * n_images * d <= cap
                if woodbury:
                    buf = torch.empty(p, n_images, d, device=e.device)
                else:
                    s1 = torch.zeros(p, d, dtype=torch.float64, device=e.device)   # float32 within a fold
                    s2 = torch.zeros(p, d, d, dtype=torch.float32, device=e.device)
                    buf = torch.empty(p, max(b, self.BUFFER_BYTES // (4 * p * d)), d, device=e.device)
            if not woodbury and k + b > buf.shape[1]:
                fold()
                k = 0
            buf[:, k:k + b].copy_(e.permute(2, 3, 0, 1).reshape(h * w, b, d)).sub_(ref)
            k += b
            n += b
        if woodbury:
            mean_c = torch.empty(h * w, d, dtype=torch.float64, device=buf.device)   # of the shifted data
            self.factor = buf[:, :n]                                   # Z, filled in place of Y
            for i in range(0, h * w, 256):
                mean_c[i:i + 256] = buf[i:i + 256, :n].mean(1, dtype=torch.float64)
                y = buf[i:i + 256, :n].sub_(mean_c[i:i + 256, None].float()).div_(max(n - 1, 1) ** 0.5)
                g = y @ y.transpose(1, 2)                              # n x n
                g.diagonal(dim1=1, dim2=2).add_(cfg.epsilon)
                y.copy_(torch.linalg.solve_triangular(torch.linalg.cholesky(g), y, upper=False))   # Z = L⁻¹Y
        else:
            fold()
            mean_c = s1 / n                                            # of the shifted data, float64
            for i in range(0, h * w, 256):                             # s2 becomes Σ⁻¹, in place
                m = mean_c[i:i + 256, :, None].float()
                cov = s2[i:i + 256].baddbmm_(m, m.transpose(1, 2), alpha=-n).div_(max(n - 1, 1))
                cov.diagonal(dim1=1, dim2=2).add_(cfg.epsilon)
                cov.copy_(torch.cholesky_inverse(torch.linalg.cholesky(cov)))
            self.inv_cov = s2
        del buf
        self.mean = (ref[:, 0].double() + mean_c).float()
        self.meta.update({"image_size": ctx.image_size, "grid": list(self.grid), "n_train_images": n})
        return {"n_train_images": n, "n_positions": h * w, "n_features": d, "woodbury": float(woodbury),
                "low_rank": float(self.factor is not None)}

    def inverse_covariance(self) -> torch.Tensor:
        """Σ⁻¹ per position, (P, d, d), whichever form the model keeps."""
        if self.factor is None:
            return self.inv_cov
        d = self.factor.shape[-1]
        eye = torch.eye(d, dtype=self.factor.dtype, device=self.factor.device)
        return torch.baddbmm(eye.expand(len(self.factor), d, d), self.factor.transpose(1, 2), self.factor,
                             alpha=-1) / self.config.epsilon

    def squared_mahalanobis(self, delta: torch.Tensor) -> torch.Tensor:
        """δᵀΣ⁻¹δ for deviations ``delta`` (P, B, d) from each position's mean -> (P, B)."""
        if self.factor is None:
            return torch.einsum("pbi,pij,pbj->pb", delta, self.inv_cov, delta).clamp_min_(0)
        zd = torch.bmm(delta, self.factor.transpose(1, 2))                     # P, B, n
        return (delta.square().sum(-1) - zd.square().sum(-1)).div_(self.config.epsilon).clamp_min_(0)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e = self._embed(images)
        b, d, h, w = e.shape
        # P, B, d, contiguous (bmm copies each batch entry of a strided operand on its own)
        delta = e.permute(2, 3, 0, 1).reshape(h * w, b, d) - self.mean[:, None]
        scores = self.squared_mahalanobis(delta).sqrt().T.reshape(b, h, w)
        maps = patch_scores_to_maps(scores, tuple(images.shape[-2:]), self.config.sigma)
        return maps.flatten(1).max(1).values, maps

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The inverse covariances are symmetric: stored as their upper triangles (d(d+1)/2 values per
        position instead of d², exact), which halves the model file (5 → 2.5 GB per category for
        WRN-50 at 256 px, d = 550); a low-rank model stores its n x d factors."""
        if self.factor is not None:
            return {"channels": self.channels, "mean": self.mean, "factor": self.factor, **extractor_state(self.extractor)}
        iu = torch.triu_indices(*self.inv_cov.shape[1:], device=self.inv_cov.device)
        packed = torch.empty(self.inv_cov.shape[0], iu.shape[1], dtype=self.inv_cov.dtype, device=self.inv_cov.device)
        for i in range(0, len(packed), 256):          # by chunks: no second full-size temporary
            packed[i:i + 256] = self.inv_cov[i:i + 256, iu[0], iu[1]]
        return {"channels": self.channels, "mean": self.mean, "inv_cov_triu": packed, **extractor_state(self.extractor)}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.channels = tensors["channels"].cpu()
        self.mean = tensors["mean"]
        self.factor = self.inv_cov = None
        if "factor" in tensors:
            self.factor = tensors["factor"]
        elif "inv_cov" in tensors:                      # models saved before the packed format
            self.inv_cov = tensors["inv_cov"]
        else:
            packed, d = tensors["inv_cov_triu"], self.mean.shape[1]
            iu = torch.triu_indices(d, d, device=packed.device)
            self.inv_cov = torch.empty(len(packed), d, d, dtype=packed.dtype, device=packed.device)
            for i in range(0, len(packed), 256):
                block = self.inv_cov[i:i + 256]
                block[:, iu[0], iu[1]] = packed[i:i + 256]
                block[:, iu[1], iu[0]] = packed[i:i + 256]
        self.grid = tuple(self.meta.get("grid", ()))
        self.extractor = extractor_from_state(self.config.backbone, self.config.layers, tensors).to(self.device)
