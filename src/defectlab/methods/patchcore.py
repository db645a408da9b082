"""PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022).

Locally aware patch features from two mid-level backbone layers (3×3 neighbourhood average,
deeper layer upsampled, channel-pooled to ``embed_dim``) form a memory bank of the normal
training patches, subsampled by greedy k-center coreset selection on randomly projected
features. A test patch's score is its distance to the nearest bank entry; the image score is
the largest patch score, reweighted as in the paper (Eq. 7): w = 1 - softmax of the test patch's
distances to the ``num_neighbors`` bank neighbours of its nearest bank entry. Pixel maps are the
patch scores upsampled bilinearly and smoothed by a Gaussian (σ = 4).

The bank can be built on any feature extractor (``FeatureExtractor``); APC reuses this class on
its fine-tuned backbone.
"""

from __future__ import annotations

import time
from typing import Literal

import torch
from pydantic import Field

from defectlab.backbones import FeatureExtractor, backbone_for_fit, extractor_from_state, extractor_state
from defectlab.config import StrictModel
from defectlab.memory import (CORESET_CHUNK, CORESET_EXACT_MAX, FeatureStore, NearestNeighbourIndex, chunked_coreset, greedy_coreset,
                              local_patch_features, patch_scores_to_maps, random_projection, rescore_top)
from defectlab.methods.base import AnomalyMethod, FitContext, make_loader


class PatchCoreConfig(StrictModel):
    backbone: str = "resnet18"
    weights: str = "random"
    layers: list[str] = ["layer2", "layer3"]
    patch_size: int = 3
    #: border patches' neighbourhood average counts the zero padding (the reference implementation,
    #: amazon-science/patchcore-inspection, and anomalib do); false: only cells inside the map
    pool_include_pad: bool = True
    embed_dim: int = 1024
    coreset_ratio: float = 0.1
    #: greedy: exact greedy over all patches (cost quadratic in the number of patches at a fixed
    #: ratio: 8x the feature pass at 1M patches, 10 %); chunked: greedy per k-means cell of at most
    #: ``coreset_chunk`` patches, merged (memory.chunked_coreset), so the cost grows linearly (1.8x
    #: at 1M and 4M) within 0.5 AUROC points of greedy (scripts/bench_coreset_scaling.py);
    #: auto: greedy up to memory.CORESET_EXACT_MAX patches, chunked above
    coreset: Literal["auto", "greedy", "chunked"] = "auto"
    coreset_chunk: int = Field(CORESET_CHUNK, ge=256)
    #: chunked / auto above CORESET_EXACT_MAX: kmeans: chunks are k-means cells of the projected
    #: features and their picks are merged by greedy radius (memory.chunked_coreset); random: shuffled
    #: chunks, each with a share proportional to its size (larger k-center radius, see docs/performance.md)
    coreset_partition: Literal["kmeans", "random"] = "kmeans"
    coreset_proj_dim: int | None = 128
    coreset_batch: int = 64       # points per greedy round (1 = one-at-a-time greedy; see memory.greedy_coreset)
    #: float32: the exact greedy picks; bfloat16: faster distance updates, approximate picks that cost
    #: image AUROC (1-5 points in `defectlab bench`), so not recommended
    coreset_precision: Literal["float32", "bfloat16"] = "float32"
    max_bank_ram_mb: float = 1024  # patch features beyond this go to a temp file while the coreset is chosen
    num_neighbors: int = 9
    sigma: float = 4.0
    batch_size: int = 8
    knn_backend: Literal["torch", "faiss"] = "torch"
    #: auto: exact search on CUDA and for banks up to memory.AUTO_EXACT_MAX_ROWS rows, else an
    #: inverted file sized to the bank, searched by grouped matrix products (memory.auto_index_factory,
    #: memory.GemmIVF); exact / null: always exact; gemm-IVF<lists>; or any faiss index-factory
    #: string, e.g. "IVF1024,SQfp16" for banks of millions of rows
    knn_approx: str | None = "auto"
    #: with an approximate index, each image's this many largest patch distances are re-searched
    #: exactly (memory.rescore_top): the image score is the exact search's
    knn_rescore: int = 16
    #: new normal images of a category (a retrain) extend the fitted bank instead of re-embedding
    #: every image: the greedy coreset continues from the bank over the new patches only (``extend``)
    incremental: bool = True


class PatchCore(AnomalyMethod):
    name = "patchcore"
    Config = PatchCoreConfig
    #: models saved before ``pool_include_pad`` existed averaged the border over image pixels only;
    #: before ``coreset_partition``, a chunked coreset (a retrain's extension) used shuffled chunks
    SAVED_BEFORE_DEFAULTS = {"pool_include_pad": False, "coreset_partition": "random"}

    def __init__(self, config: PatchCoreConfig, device="cpu"):
        super().__init__(config, device)
        self.extractor: FeatureExtractor | None = None
        self.bank: torch.Tensor | None = None
        self._index: NearestNeighbourIndex | None = None

    # -- features -------------------------------------------------------------------------
    def set_extractor(self, extractor: FeatureExtractor) -> None:
        self.extractor = extractor.to(self.device).eval()


    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, h, w, D) locally aware patch features."""
        feats = self.extractor(images.to(self.device))
        return local_patch_features([feats[layer] for layer in self.config.layers],
                                    patch_size=self.config.patch_size, out_dim=self.config.embed_dim,
                                    include_pad=self.config.pool_include_pad)

    # -- fit ------------------------------------------------------------------------------
    def fit(self, ctx: FitContext) -> dict:
        if self.extractor is None:
            cfg = self.config
            model = backbone_for_fit(cfg.backbone, cfg.weights, ctx.pretrain_dir, seed=ctx.seed, dataset=ctx.dataset)
            self.set_extractor(FeatureExtractor(model, cfg.layers))
        loader = make_loader(ctx.data.train, ctx.image_size, self.config.batch_size)
        return self.build_bank(loader, seed=ctx.seed, progress=ctx.progress,
                               work_dir=str(ctx.work_dir) if ctx.work_dir else None)

    @torch.no_grad()
    def build_bank(self, loader, *, seed: int = 0, progress: bool = False, work_dir: str | None = None) -> dict:
        """Stream patch features into the coreset memory bank with bounded memory.

        Each batch's features go to a FeatureStore (RAM up to ``max_bank_ram_mb``, then a temp
        file) and, randomly projected to ``coreset_proj_dim``, to the tensor the coreset selection
        runs on; only the selected rows are read back. Peak memory is the projected features
        (N × 128 floats) plus the bank, not N × D."""
        t0 = time.perf_counter()
        store, x, proj = self._stream_features(loader, seed, progress, work_dir)
        t_feat = time.perf_counter() - t0
        n_patches = x.shape[0]
        n = max(1, int(round(self.config.coreset_ratio * n_patches)))
        t0 = time.perf_counter()
        idx = self._select(x, n, seed) if n < n_patches else torch.arange(n_patches)
        del x
        self.bank = store.gather(idx).to(self.device)
        spilled = store.spilled
        store.close()
        t_core = time.perf_counter() - t0
        self._index = None
        self.meta.update({"image_size": loader.dataset.size if hasattr(loader.dataset, "size") else None,
                          "n_train_images": len(loader.dataset), "n_patches": int(n_patches)})
        return {"n_patches": int(n_patches), "bank_size": int(self.bank.shape[0]), "bank_spilled_to_disk": spilled,
                "feature_seconds": t_feat, "coreset_seconds": t_core}

    def _select(self, x: torch.Tensor, n: int, seed: int, covered: torch.Tensor | None = None) -> torch.Tensor:
        """The ``coreset`` selection of ``n`` rows of the projected patch features ``x``."""
        cfg = self.config
        kw = dict(proj_dim=None, seed=seed, batch=cfg.coreset_batch, precision=cfg.coreset_precision, covered=covered)
        if cfg.coreset == "chunked" or (cfg.coreset == "auto" and len(x) > CORESET_EXACT_MAX):
            return chunked_coreset(x, n, chunk=cfg.coreset_chunk, partition=cfg.coreset_partition, **kw)
        return greedy_coreset(x, n, **kw)

    def _stream_features(self, loader, seed: int, progress: bool, work_dir: str | None):
        """Every patch feature of the loader into a FeatureStore, and their random projection to
        ``coreset_proj_dim`` (seeded: the same matrix for the same feature size and seed)."""
        from tqdm.auto import tqdm

        cfg = self.config
        store, projected, proj = None, [], None
        for batch in tqdm(loader, desc="patch features", disable=not progress, leave=False):
            f = self.embed(batch["image"])
            f = f.reshape(-1, f.shape[-1])
            if store is None:
                store = FeatureStore(f.shape[1], cfg.max_bank_ram_mb, work_dir)
                if cfg.coreset_proj_dim is not None and cfg.coreset_proj_dim < f.shape[1]:
                    proj = random_projection(f.shape[1], cfg.coreset_proj_dim, seed).to(f.device)
            store.append(f)
            projected.append(f @ proj if proj is not None else f)
        return store, torch.cat(projected), proj

    @torch.no_grad()
    def extend(self, ctx: FitContext, new_samples: list, *, seed: int = 0) -> dict:
        """Add new normal images to the fitted bank without re-embedding the old ones.

        The bank is a greedy k-center coreset of the old patches; here the greedy selection goes
        on from the bank over the new images' patches only (``greedy_coreset(covered=bank)``) until
        the bank holds ``coreset_ratio`` of all patches, old and new, as a refit would. Every new
        patch then lies within the new coverage radius, exactly as greedy over the union would put
        it; the old patches that the bank left out stay within the radius they had (greedy on the
        union could pick one of them instead of a new patch). ``scripts/bench_retrain.py`` measures
        the difference against a refit. With the chunked selection (``coreset``: chunked, or auto
        over more than CORESET_EXACT_MAX new patches) each chunk of new patches continues from the
        bank in the same way."""
        cfg = self.config
        n_old = int(self.meta.get("n_patches") or 0)
        if not n_old:
            raise ValueError("model has no n_patches in its meta (fitted before incremental fits): refit it")
        t0 = time.perf_counter()
        loader = make_loader(new_samples, ctx.image_size, cfg.batch_size)
        store, x, proj = self._stream_features(loader, seed, ctx.progress, str(ctx.work_dir) if ctx.work_dir else None)
        t_feat = time.perf_counter() - t0
        n_total = n_old + x.shape[0]
        k = min(x.shape[0], max(0, int(round(cfg.coreset_ratio * n_total)) - self.bank.shape[0]))
        t0 = time.perf_counter()
        if k:
            bank = self.bank.to(x.device)
            idx = self._select(x, k, seed, covered=bank @ proj if proj is not None else bank)
            self.bank = torch.cat([self.bank, store.gather(idx).to(self.device)])
        store.close()
        self._index = None
        self.meta.update({"n_train_images": int(self.meta.get("n_train_images", 0)) + len(new_samples),
                          "n_patches": int(n_total)})
        return {"n_patches": int(n_total), "bank_size": int(self.bank.shape[0]), "incremental": 1,
                "n_new_images": len(new_samples), "feature_seconds": t_feat,
                "coreset_seconds": time.perf_counter() - t0}

    @torch.no_grad()
    def collect_patches(self, loader, progress: bool = False) -> torch.Tensor:
        """Stream the loader through the extractor into one preallocated (N·h·w, D) tensor."""
        from tqdm.auto import tqdm

        out, filled = None, 0
        total = len(loader.dataset)
        for batch in tqdm(loader, desc="patch features", disable=not progress, leave=False):
            f = self.embed(batch["image"])
            b, h, w, d = f.shape
            if out is None:
                out = torch.empty(total * h * w, d, dtype=torch.float32)
            out[filled:filled + b * h * w] = f.reshape(-1, d).cpu()
            filled += b * h * w
        return out[:filled]

    # -- predict --------------------------------------------------------------------------
    @property
    def index(self) -> NearestNeighbourIndex:
        if self._index is None:
            self._index = NearestNeighbourIndex(self.bank, backend=self.config.knn_backend, approx=self.config.knn_approx)
        return self._index

    @torch.no_grad()
    def patch_scores(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest-bank distances (B, h, w) and the patch features (B, h·w, D)."""
        f = self.embed(images)
        b, h, w, d = f.shape
        f = f.reshape(b, h * w, d)
        dist = self.index.nearest(f.reshape(-1, d)).reshape(b, h * w).to(self.device)
        rescore_top(dist, f, self.index, self.config.knn_rescore)
        return dist.reshape(b, h, w), f

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores, feats = self.patch_scores(images)
        b = scores.shape[0]
        flat = scores.reshape(b, -1)
        best = flat.argmax(1)
        s_star = flat[torch.arange(b), best]
        test_patch = feats[torch.arange(b), best]
        _, nearest = self.index.exact_search(test_patch, 1)            # m*, the bank entry s* is measured to
        image_scores = s_star * self._reweight(test_patch, nearest[:, 0])
        maps = patch_scores_to_maps(scores, tuple(images.shape[-2:]), self.config.sigma)
        return image_scores, maps

    def _reweight(self, test_patch: torch.Tensor, nearest: torch.Tensor) -> torch.Tensor:
        """Paper Eq. 7: w = 1 - exp(‖m_test - m*‖) / Σ_{m ∈ N_b(m*)} exp(‖m_test - m‖)."""
        k = min(self.config.num_neighbors, self.bank.shape[0])
        if k < 2:
            return torch.ones(test_patch.shape[0], device=self.device)
        m_star = self.bank[nearest.to(self.bank.device)]
        _, support = self.index.search(m_star, k=k)          # N_b(m*), m* itself first
        support_feats = self.bank[support.to(self.bank.device)]  # (B, k, D)
        d = torch.linalg.vector_norm(support_feats - test_patch.to(self.bank.device)[:, None], dim=-1)
        return (1 - torch.softmax(d, dim=1)[:, 0]).to(self.device)

    # -- state ----------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"bank": self.bank, **extractor_state(self.extractor)}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.bank = tensors["bank"]
        self.set_extractor(extractor_from_state(self.config.backbone, self.config.layers, tensors))
