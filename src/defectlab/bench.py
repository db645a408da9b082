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


def _timer(dev):
    """``timed(fn)``: seconds ``fn()`` takes on ``dev`` (waiting for CUDA's queue)."""
    def timed(fn) -> float:
        t0 = time.perf_counter()
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0
    return timed


def bench_patchcore(data, *, image_size: int, backbone: str = "resnet18", weights: str = "random",
                    layers=("layer2", "layer3"), embed_dim: int = 1024, coreset_ratio: float = 0.1,
                    batch_size: int = 16, device: str = "cpu", exact: bool = True, seed: int = 0,
                    repeat: int = 3, auroc_seeds: int = 5) -> dict:
    """Fit PatchCore on ``data.train`` and score ``data.test``; return timings, ratios and AUROCs.

    The forward pass and the float32 / bfloat16 fits are timed ``repeat`` times, interleaved (each
    fit's ratio is taken to the forward time measured just before it); ``fit_ratio`` is the median,
    ``fit_ratio_range`` the smallest and largest.

    Image AUROCs are means over ``auroc_seeds`` coreset seeds (the seed sets the random projection
    and the greedy's start point; exact greedy's AUROC itself moves by ~2 points with its start
    point on small test sets, so one seed cannot resolve a 0.5-point difference). "Exact" picks
    are made on the unprojected features by the batched greedy, which makes the one-at-a-time
    greedy's picks (tested); the one-at-a-time loop itself is timed once."""
    from defectlab.backbones import FeatureExtractor, build_backbone, resolve_device
    from defectlab.methods.patchcore import PatchCore, PatchCoreConfig
    from defectlab.metrics import image_metrics

    dev = resolve_device(device)
    train = _stack(data.train, image_size)
    test = _stack(data.test, image_size)
    labels = np.array([s.label for s in data.test])
    extractor = FeatureExtractor(build_backbone(backbone, weights, seed=seed), list(layers)).to(dev).eval()
    _timed_forward(extractor, train[:batch_size], batch_size, dev)               # warm-up

    loader = torch.utils.data.DataLoader([{"image": im} for im in train], batch_size=batch_size)

    def fit(proj_dim, batch=64, precision="float32", seed=seed):
        """PatchCore's own fit path (``build_bank``: streamed patch features, coreset, bank)."""
        model = PatchCore(PatchCoreConfig(backbone=backbone, layers=list(layers), embed_dim=embed_dim,
                                          coreset_ratio=coreset_ratio, coreset_proj_dim=proj_dim,
                                          coreset_batch=batch, coreset_precision=precision,
                                          batch_size=batch_size), dev)
        model.set_extractor(extractor)
        t0 = time.perf_counter()
        info = model.build_bank(loader, seed=seed)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return model, time.perf_counter() - t0, info["feature_seconds"], info["n_patches"]

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

    runs = []                                   # (forward, fit f32, features f32, fit bf16, features bf16)
    for _ in range(max(1, repeat)):
        t_fwd = _timed_forward(extractor, train, batch_size, dev)
        model, t_fit, t_feat, n_patches = fit(128)
        model_b, t_fit_b, t_feat_b, _ = fit(128, precision="bfloat16")      # coreset_precision: bfloat16
        runs.append((t_fwd, t_fit, t_feat, t_fit_b, t_feat_b))
    r = np.array(runs)
    ratio, ratio_b = r[:, 1] / r[:, 0], r[:, 3] / r[:, 0]
    med = np.median(r, axis=0)
    _, t_score = score(model)
    t_fwd_test = _timed_forward(extractor, test, batch_size, dev)
    auroc = {"float32": [], "bfloat16": [], "exact": []}
    for s in range(seed, seed + max(1, auroc_seeds)):
        for key, args in (("float32", (128,)), ("bfloat16", (128, 64, "bfloat16")), ("exact", (None,))):
            auroc[key].append(image_metrics(labels, score(fit(*args, seed=s)[0])[0])["image_auroc"])
    mean = {k: float(np.mean(v)) for k, v in auroc.items()}
    out = {
        "device": str(dev), "backbone": backbone, "layers": list(layers), "image_size": image_size,
        "n_train": len(train), "n_test": len(test), "n_patches": n_patches, "bank_size": int(model.bank.shape[0]),
        "repeat": len(runs), "forward_seconds": float(med[0]), "fit_seconds": float(med[1]),
        "feature_seconds": float(med[2]), "coreset_seconds": float(np.median(r[:, 1] - r[:, 2])),
        "fit_ratio": float(np.median(ratio)), "fit_ratio_range": [float(ratio.min()), float(ratio.max())],
        "score_seconds_per_image": t_score / len(test), "forward_seconds_per_image_test": t_fwd_test / len(test),
        "score_ratio": t_score / t_fwd_test, "images_per_second": len(test) / t_score,
        "auroc_seeds": len(auroc["float32"]),
        "image_auroc": mean["float32"], "image_auroc_exact_coreset": mean["exact"],
        "auroc_points_vs_exact": 100 * (mean["float32"] - mean["exact"]),
        "fit_seconds_bf16": float(med[3]), "coreset_seconds_bf16": float(np.median(r[:, 3] - r[:, 4])),
        "fit_ratio_bf16": float(np.median(ratio_b)), "fit_ratio_bf16_range": [float(ratio_b.min()), float(ratio_b.max())],
        "image_auroc_bf16": mean["bfloat16"], "auroc_points_vs_exact_bf16": 100 * (mean["bfloat16"] - mean["exact"]),
        "bank_overlap_bf16": len(set(map(tuple, model_b.bank.cpu().tolist())) & set(map(tuple, model.bank.cpu().tolist())))
        / max(1, len(model.bank)),
    }
    if exact:
        out["fit_seconds_exact_coreset"] = fit(None, batch=1)[1]
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def bench_fit(method: str, data, params, *, image_size: int, device: str = "cpu", repeat: int = 3, seed: int = 0,
              overrides: dict | None = None) -> dict:
    """Any method's ``fit`` (per category, as the `fit` stage runs it) timed against its floor:
    the forward pass of the frozen network its fit embeds the training images with
    (``AnomalyMethod.floor_forward``: the backbone over whole images for PatchCore / PaDiM / APC,
    over every crop for DS2-GDE, every scale's encoder over the grid patches for MSP-SVDD).

    ``fit`` also decodes the training images (PNG → resized, normalised tensors) once; that is
    timed on its own (``load_seconds``, the same loader over the same images) and taken out:
    ``fit_ratio = (fit − load) / floor`` — the floor is timed on preloaded tensors, as in the
    PatchCore bench. ``fit_ratio_with_loading`` keeps it in.

    The method's config comes from ``params`` (its profile) with ``overrides`` on top (the bench
    uses random backbone weights: timing does not depend on them, and ImageNet / DS2 weights may
    not be on the machine). A method that trains per category is trained once first; its
    ``train_seconds`` is reported but not part of the ratio. ``fit`` runs ``repeat`` + 1 times (the
    first one warms up), each against the floor and the loading timed just before it (these
    machines are noisy: a floor timed minutes apart moves by 20 %); medians are reported. Methods with no frozen embedding network (DSR,
    SLSG) have no such floor and are refused before anything runs."""
    import tempfile

    from defectlab.backbones import resolve_device
    from defectlab.errors import ConfigError
    from defectlab.methods.base import AnomalyMethod, make_loader

    if method in ("dsr", "slsg"):
        raise ConfigError(f"bench --method {method}: its fit runs no frozen embedding network, so there is no "
                          f"forward-pass floor to compare with (methods with one: patchcore, padim, ds2, apc, msp_svdd)")
    dev = resolve_device(device)
    timed = _timer(dev)

    with tempfile.TemporaryDirectory(prefix="defectlab-bench-fit-") as tmp:
        cls, cfg, model, ctx, t_train = _fit_for_bench(method, data, params, image_size=image_size, dev=dev,
                                                       seed=seed, overrides=overrides, tmp=Path(tmp))  # + warm-up
        batch = getattr(cfg, "fit_batch_size", None) or getattr(cfg, "batch_size", None) or 16
        out: dict = {"method": method, "profile": params.profile, "device": str(dev), "image_size": image_size,
                     "n_train": len(data.train), "backbone": getattr(cfg, "backbone", None)}
        if t_train is not None:
            out["train_seconds"] = t_train
        images = _stack(data.train, image_size).to(dev)

        def over_images(fn):
            return lambda: [fn(images[i:i + batch]) for i in range(0, len(images), batch)]

        model.floor_forward(images[:batch])                                          # warm-up
        runs = []                                               # (floor, load, fit), interleaved
        for _ in range(max(1, repeat)):
            floor = timed(over_images(model.floor_forward))
            load = timed(lambda: [b for b in make_loader(data.train, image_size, batch)])
            model = cls(cfg, dev)
            runs.append((floor, load, timed(lambda: model.fit(ctx))))
        if type(model).floor_forward is not AnomalyMethod.floor_forward and getattr(model, "extractor", None):
            # the floor is not one backbone forward per image: the image forward too, for reference
            whole = [timed(over_images(model.extractor)) for _ in range(max(1, repeat))]
            out["image_forward_seconds"] = float(np.median(whole))
    r = np.array(runs)
    ratio = (r[:, 2] - r[:, 1]) / r[:, 0]                  # each fit against the floor timed just before it
    floor_s, load_s, fit_s = (float(v) for v in np.median(r, axis=0))
    out.update({"layers": getattr(getattr(model, "extractor", None), "layers", None), "repeat": len(runs),
                "forward_seconds": floor_s, "load_seconds": load_s, "fit_seconds": fit_s,
                "fit_ratio": float(np.median(ratio)), "fit_ratio_range": [float(ratio.min()), float(ratio.max())],
                "fit_ratio_with_loading": float(np.median(r[:, 2] / r[:, 0])), "peak_rss_mb": peak_rss_mb()})
    if "image_forward_seconds" in out:
        out["fit_ratio_to_image_forward"] = (fit_s - load_s) / out["image_forward_seconds"]
    return out


def _fit_for_bench(method: str, data, params, *, image_size: int, dev, seed: int, overrides: dict | None, tmp: Path):
    """(config class, config, fitted model, FitContext, train seconds or None): ``method`` trained
    (if it trains per category) and fitted as the `train` / `fit` stages would, in ``tmp``."""
    from defectlab.methods.base import FitContext, PretrainContext
    from defectlab.pipeline import load_method_config

    cls, cfg = load_method_config(params, method)
    known = {k: v for k, v in (overrides or {}).items() if k in cls.Config.model_fields}
    cfg = cls.Config.model_validate({**cfg.model_dump(), **known})
    pre = tmp / "pretrain"
    pre.mkdir(exist_ok=True)
    pctx = PretrainContext(dataset="bench", data_root=data.root, categories=[data.category], out_dir=pre,
                           image_size=image_size, seed=seed, device=dev, progress=False)
    (cls.freeze_backbone if cls.shared_backbone else cls.pretrain)(cfg, pctx)
    ctx = FitContext(dataset="bench", category=data.category, data=data, image_size=image_size, seed=seed,
                     device=dev, pretrain_dir=pre, progress=False)
    t_train = None
    if cls.trains_per_category:
        t0 = time.perf_counter()
        trainer = cls(cfg, dev)
        trainer.train(ctx)
        trainer.save_trained(tmp / "train")
        t_train = time.perf_counter() - t0
        ctx.train_dir = tmp / "train"
    model = cls(cfg, dev)
    model.fit(ctx)
    return cls, cfg, model, ctx, t_train


def bench_inference(method: str, data, params, *, image_size: int, device: str = "cpu", repeat: int = 3,
                    seed: int = 0, batch: int = 8, overrides: dict | None = None) -> dict:
    """A fitted method's inference (``predict`` over the test images, preloaded) against its floor.

    The floor is the forward pass ``predict`` cannot skip: ``floor_forward`` over the same test
    images in the same batches (the backbone for PatchCore / PaDiM / APC, every crop for DS2, every
    scale's encoder over the grid for MSP-SVDD). DSR and SLSG are their networks' forward, so they
    get images/s and no ratio. Floor and ``predict`` are timed ``repeat`` times, interleaved, after a
    warm-up that also builds any search index (``first_pass_seconds``); ratios are medians.

    Methods that search a memory bank (``knn_approx``) are scored twice on the same fitted model,
    with the configured search and with exact search, so ``*_points_vs_exact`` is the accuracy the
    search itself costs (no seed noise: same bank, same features)."""
    import tempfile

    from defectlab.backbones import resolve_device
    from defectlab.errors import ConfigError
    from defectlab.methods.base import make_loader
    from defectlab.metrics import image_metrics, pixel_metrics

    dev = resolve_device(device)
    timed = _timer(dev)
    test = [b for b in make_loader(data.test, image_size, batch)]
    images = [b["image"].to(dev) for b in test]
    labels = np.concatenate([b["label"].numpy() for b in test])
    masks = np.concatenate([b["mask"][:, 0].numpy() > 0.5 for b in test])
    with tempfile.TemporaryDirectory(prefix="defectlab-bench-inference-") as tmp:
        cls, cfg, model, _, t_train = _fit_for_bench(method, data, params, image_size=image_size, dev=dev,
                                                     seed=seed, overrides=overrides, tmp=Path(tmp))

    def predict_all(m):
        with torch.no_grad():
            out = [m.predict(x) for x in images]
        return out

    t0 = time.perf_counter()
    out = predict_all(model)                                     # warm-up, builds the index
    t_first = time.perf_counter() - t0
    try:
        with torch.no_grad():
            model.floor_forward(images[0])
        has_floor = True
    except ConfigError:
        has_floor = False
    runs = []
    for _ in range(max(1, repeat)):
        with torch.no_grad():
            floor = timed(lambda: [model.floor_forward(x) for x in images]) if has_floor else float("nan")
        runs.append((floor, timed(lambda: predict_all(model))))
    r = np.array(runs)
    n = len(labels)

    def accuracy(outputs):
        scores = torch.cat([s.float().cpu() for s, _ in outputs]).numpy()
        maps = torch.cat([m.float().cpu() for _, m in outputs]).numpy()
        return image_metrics(labels, scores)["image_auroc"], pixel_metrics(masks, maps)["pixel_auroc"]

    img, pix = accuracy(out)
    res = {"method": method, "profile": params.profile, "device": str(dev), "image_size": image_size,
           "n_test": n, "batch": batch, "backbone": getattr(cfg, "backbone", None), "repeat": len(runs),
           "train_seconds": t_train, "first_pass_seconds": float(t_first),
           "floor_seconds": float(np.median(r[:, 0])) if has_floor else None,
           "predict_seconds": float(np.median(r[:, 1])), "images_per_second": n / float(np.median(r[:, 1])),
           "ratio": float(np.median(r[:, 1] / r[:, 0])) if has_floor else None,
           "ratio_range": [float((r[:, 1] / r[:, 0]).min()), float((r[:, 1] / r[:, 0]).max())] if has_floor else None,
           "image_auroc": img, "pixel_auroc": pix}
    if getattr(cfg, "knn_approx", None) not in (None, "exact"):
        exact = cls(cfg.model_copy(update={"knn_approx": None}), dev)
        exact.load_tensors(model.state_tensors())
        exact.meta = dict(model.meta)
        t0 = time.perf_counter()
        out_exact = predict_all(exact)                           # timed and scored in one pass
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t_exact = time.perf_counter() - t0
        img_e, pix_e = accuracy(out_exact)
        indexes = [model.index] if not callable(getattr(model, "index", None)) else \
            [model.index(p) for p in getattr(cfg, "scales", [])]
        res.update({"knn_approx": cfg.knn_approx, "index": [i.factory or "exact" for i in indexes],
                    "bank_rows": [int(i.bank.shape[0]) for i in indexes],
                    "exact_predict_seconds": t_exact, "speedup_vs_exact": t_exact / res["predict_seconds"],
                    "image_auroc_exact": img_e, "pixel_auroc_exact": pix_e,
                    "image_auroc_points_vs_exact": 100 * (img - img_e), "pixel_auroc_points_vs_exact": 100 * (pix - pix_e)})
    res["peak_rss_mb"] = peak_rss_mb()
    return res


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


def inference_table(results: dict) -> str:
    """One row per method of ``bench_inference`` results."""
    def f(v, spec):
        return "–" if v is None else format(v, spec)

    lines = ["| method | images/s | predict ÷ floor | search | image AUROC (exact) | pixel AUROC (exact) |",
             "|---|---|---|---|---|---|"]
    for name, r in results.items():
        search = ", ".join(r["index"]) if "index" in r else "–"
        img = f(r["image_auroc"], ".4f") + (f" ({r['image_auroc_exact']:.4f})" if "index" in r else "")
        pix = f(r["pixel_auroc"], ".4f") + (f" ({r['pixel_auroc_exact']:.4f})" if "index" in r else "")
        lines.append(f"| {name} | {r['images_per_second']:.1f} | {f(r['ratio'], '.2f')} | {search} | {img} | {pix} |")
    return "\n".join(lines)


def format_table(result: dict) -> str:
    lines = ["| figure | value |", "|---|---|"]
    for k, v in result.items():
        if isinstance(v, (list, tuple)) and v and all(isinstance(x, float) for x in v):
            v = "–".join(f"{x:.4g}" for x in v)
        lines.append(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |")
    return "\n".join(lines)


def subset(data, max_train: int | None = None, max_test: int | None = None):
    """``data`` with its first ``max_train`` training images and ``max_test`` test images taken
    evenly across the test list (which is grouped by kind, so each kind keeps its share)."""
    import dataclasses

    from defectlab.errors import ConfigError

    for name, v in (("--max-train", max_train), ("--max-test", max_test)):
        if v is not None and v < 1:
            raise ConfigError(f"bench {name} must be at least 1, got {v}")
    test = data.test
    if max_test is not None and max_test < len(test):
        test = [test[int(i)] for i in np.linspace(0, len(test) - 1, max_test).round()]
    train = data.train[:max_train] if max_train is not None else data.train
    return dataclasses.replace(data, train=train, test=test)


def parse_overrides(items: list[str], methods: list[str] | None = None) -> dict:
    """``--set KEY=VALUE`` items as a dict (values parsed as YAML: 1, 0.5, true, [a, b]); with
    ``methods``, a key none of their configs has is an error."""
    import yaml

    from defectlab.errors import ConfigError

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        out[key.strip()] = yaml.safe_load(value)
    if methods:
        from defectlab.methods import get_method

        fields = set().union(*(get_method(m).Config.model_fields for m in methods))
        unknown = sorted(set(out) - fields)
        if unknown:
            raise ConfigError(f"--set {', '.join(unknown)}: no such config key in {', '.join(methods)}")
    return out


def demo_data(out: Path, image_size: int, n_train: int, category: str = "grain", seed: int = 0,
              n_test_good: int = 30, n_test_per_defect: int = 10):
    """Generated demo data; the test set is large enough (30 good, 10 per defect type: > 1 000
    good/defective pairs) that image AUROC resolves differences well below 0.5 points."""
    from defectlab.data import scan_category
    from defectlab.data.demo import generate_demo

    generate_demo(out, seed=seed, image_size=image_size, n_train=n_train, n_test_good=n_test_good,
                  n_test_per_defect=n_test_per_defect,
                  categories=[category])
    return scan_category(out, category)
