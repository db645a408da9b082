"""Speed and memory figures of the memory-bank path, as ratios to the backbone's own forward time.

``defectlab bench`` runs this. Everything is timed in one process on preloaded image tensors, so
the ratios compare like with like (these machines are noisy; absolute seconds are not the point):

* ``forward_seconds``: the backbone's forward pass over the training images (the physical floor);
* ``fit_seconds``: PatchCore's whole fit — forward + patch aggregation + coreset + bank build;
  ``fit_ratio = fit_seconds / forward_seconds`` (target ≤ 1.5); ``*_bf16``: the same fit with
  ``coreset_precision: bfloat16`` (and the share of its bank shared with the float32 one);
* the same fit with *exact* greedy coreset selection (no random projection), and the image AUROC
  of both on the test set (target: within 0.5 points);
* ``score_ratio``: per-image inference time / per-image forward time (the kNN scoring overhead);
* optional ``--bank N``: an approximate faiss index over a random bank of N × D float vectors:
  recall@1 against exact search, bytes per vector, query time.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from defectlab.pipeline import peak_rss_mb


def _stack(samples, size: int) -> torch.Tensor:
    from defectlab.methods.base import make_loader

    return torch.cat([b["image"] for b in make_loader(samples, size, 16)])


@torch.no_grad()
def _timed_forward(extractor, images: torch.Tensor, batch: int, device) -> float:
    t0 = time.perf_counter()
    for i in range(0, len(images), batch):
        extractor(images[i:i + batch].to(device))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def bench_patchcore(data, *, image_size: int, backbone: str = "resnet18", weights: str = "random",
                    layers=("layer2", "layer3"), embed_dim: int = 1024, coreset_ratio: float = 0.1,
                    batch_size: int = 16, device: str = "cpu", exact: bool = True, seed: int = 0) -> dict:
    """Fit PatchCore on ``data.train`` and score ``data.test``; return timings, ratios and AUROCs."""
    from defectlab.backbones import FeatureExtractor, build_backbone, resolve_device
    from defectlab.memory import greedy_coreset
    from defectlab.methods.patchcore import PatchCore, PatchCoreConfig
    from defectlab.metrics import image_metrics

    dev = resolve_device(device)
    train = _stack(data.train, image_size)
    test = _stack(data.test, image_size)
    labels = np.array([s.label for s in data.test])
    extractor = FeatureExtractor(build_backbone(backbone, weights, seed=seed), list(layers)).to(dev).eval()
    _timed_forward(extractor, train[:batch_size], batch_size, dev)               # warm-up
    t_fwd = min(_timed_forward(extractor, train, batch_size, dev) for _ in range(2))

    loader = torch.utils.data.DataLoader([{"image": im} for im in train], batch_size=batch_size)

    def fit(proj_dim, batch=64, precision="float32"):
        """PatchCore's own fit path (streamed patch features, then coreset) on preloaded tensors."""
        model = PatchCore(PatchCoreConfig(backbone=backbone, layers=list(layers), embed_dim=embed_dim,
                                          coreset_ratio=coreset_ratio, coreset_proj_dim=proj_dim,
                                          batch_size=batch_size), dev)
        model.set_extractor(extractor)
        t0 = time.perf_counter()
        bank = model.collect_patches(loader).to(dev)
        t_feat = time.perf_counter() - t0
        idx = greedy_coreset(bank, max(1, int(round(coreset_ratio * len(bank)))), proj_dim=proj_dim, seed=seed,
                             batch=batch, precision=precision)
        model.bank = bank[idx.to(bank.device)].contiguous()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return model, time.perf_counter() - t0, t_feat, len(bank)

    def score(model):
        t0 = time.perf_counter()
        scores = []
        with torch.no_grad():
            for i in range(0, len(test), batch_size):
                s, _ = model.predict(test[i:i + batch_size].to(dev))
                scores.append(s.cpu())
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return torch.cat(scores).numpy(), time.perf_counter() - t0

    model, t_fit, t_feat, n_patches = fit(128)
    scores, t_score = score(model)
    t_fwd_test = _timed_forward(extractor, test, batch_size, dev)
    out = {
        "device": str(dev), "backbone": backbone, "layers": list(layers), "image_size": image_size,
        "n_train": len(train), "n_test": len(test), "n_patches": n_patches, "bank_size": int(model.bank.shape[0]),
        "forward_seconds": t_fwd, "fit_seconds": t_fit, "feature_seconds": t_feat,
        "coreset_seconds": t_fit - t_feat, "fit_ratio": t_fit / t_fwd,
        "score_seconds_per_image": t_score / len(test), "forward_seconds_per_image_test": t_fwd_test / len(test),
        "score_ratio": t_score / t_fwd_test, "images_per_second": len(test) / t_score,
        "image_auroc": image_metrics(labels, scores)["image_auroc"],
    }
    model_b, t_fit_b, t_feat_b, _ = fit(128, precision="bfloat16")      # coreset_precision: bfloat16
    scores_b, _ = score(model_b)
    out.update({"fit_seconds_bf16": t_fit_b, "coreset_seconds_bf16": t_fit_b - t_feat_b, "fit_ratio_bf16": t_fit_b / t_fwd,
                "image_auroc_bf16": image_metrics(labels, scores_b)["image_auroc"],
                "bank_overlap_bf16": len(set(map(tuple, model_b.bank.cpu().tolist())) & set(map(tuple, model.bank.cpu().tolist())))
                / max(1, len(model.bank))})
    if exact:
        model_e, t_fit_e, _, _ = fit(None, batch=1)
        scores_e, _ = score(model_e)
        out.update({"fit_seconds_exact_coreset": t_fit_e,
                    "image_auroc_exact_coreset": image_metrics(labels, scores_e)["image_auroc"]})
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def bench_large_bank(n: int, dim: int, *, index: str = "IVF1024,SQfp16", n_queries: int = 2000, seed: int = 0,
                     nprobe: int = 64, chunk: int = 65536) -> dict:
    """Approximate faiss search on an N × D bank (clustered random data, like patch features):
    recall@1 against exact search, memory per vector, query time of both. The bank is generated
    chunk by chunk (twice: once for the exact answers, once to fill the index), so peak memory is
    the compressed index plus one chunk, as it would be for a bank streamed from disk."""
    import faiss

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((256, dim)).astype(np.float32)

    def chunks():
        for k, s in enumerate(range(0, n, chunk)):
            r = np.random.default_rng([seed, k])
            m = min(chunk, n - s)
            yield s, centres[r.integers(0, 256, m)] + 0.5 * r.standard_normal((m, dim), dtype=np.float32)

    queries = centres[rng.integers(0, 256, n_queries)] + 0.5 * rng.standard_normal((n_queries, dim), dtype=np.float32)
    best_d = np.full(n_queries, np.inf, np.float32)
    truth = np.zeros(n_queries, np.int64)
    t0 = time.perf_counter()
    for s, x in chunks():                            # exact search, chunk by chunk
        d, i = faiss.knn(queries, x, 1)
        better = d[:, 0] < best_d
        best_d[better], truth[better] = d[better, 0], i[better, 0] + s
    t_exact = time.perf_counter() - t0
    approx = faiss.index_factory(dim, index)
    t0 = time.perf_counter()
    train = np.concatenate([x for _, x in zip(range(max(1, 200_000 // chunk)), (x for _, x in chunks()))])
    approx.train(train)
    del train
    for _, x in chunks():
        approx.add(x)
    t_build = time.perf_counter() - t0
    if hasattr(approx, "nprobe"):
        approx.nprobe = nprobe
    t0 = time.perf_counter()
    _, found = approx.search(queries, 1)
    t_approx = time.perf_counter() - t0
    code_size = getattr(approx, "code_size", dim * 4)
    return {"bank": [n, dim], "index": index, "nprobe": nprobe, "recall_at_1": float((found[:, 0] == truth).mean()),
            "bytes_per_vector": int(code_size), "index_gb": n * code_size / 2**30, "build_seconds": t_build,
            "query_ms_exact": 1e3 * t_exact / n_queries, "query_ms_approx": 1e3 * t_approx / n_queries,
            "peak_rss_mb": peak_rss_mb()}


def format_table(result: dict) -> str:
    lines = ["| figure | value |", "|---|---|"]
    for k, v in result.items():
        lines.append(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |")
    return "\n".join(lines)


def demo_data(out: Path, image_size: int, n_train: int, category: str = "grain", seed: int = 0):
    from defectlab.data import scan_category
    from defectlab.data.demo import generate_demo

    generate_demo(out, seed=seed, image_size=image_size, n_train=n_train, n_test_good=10, n_test_per_defect=4,
                  categories=[category])
    return scan_category(out, category)
