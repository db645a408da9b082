"""PatchCore fit time and peak memory against the number of patch features, exact greedy coreset
against the chunked one (``coreset: greedy | chunked``), and their AUROC side by side.

Scaling (``--sizes``): real patch features of ResNet-18 (random init, seed 0, layers 2+3, 3×3
aggregation, 384-D) on 256² images, each image a seeded random 256² crop of a 2×2 mosaic of
realdev training photographs (all categories), flipped / rotated, as many as it takes to reach N
patches (1 024 per image). For each N the feature pass (PatchCore's ``_stream_features``: forward,
aggregation, FeatureStore, projection to 128-D) runs once and is timed; then for each coreset
ratio each selection (PatchCore's ``_select``) and the bank read-back are timed on those features,
with the peak RSS of each step (the kernel's high-water mark, reset before each step). A fit is
feature pass + selection + read-back, exactly ``PatchCore.build_bank``. Exact greedy is skipped
where its time, extrapolated quadratically from the previous size, would pass ``--exact-limit``
seconds; the table then shows the extrapolation, marked as such.

Accuracy (``--auroc-seeds``): image and pixel AUROC of PatchCore with exact greedy and with the
chunked coreset, same seeds, on the realdev categories (192², 60 training images = 34 560
patches; ``--auroc-chunk`` rows per chunk, so the chunked selection really splits there) and on
generated demo data at 256² (``--demo-train`` images, default chunk size).

Writes ``--out`` (JSON), a markdown table beside it (.md) and a log-log plot (.png).

    nice python scripts/bench_coreset_scaling.py --device cpu --out reports/coreset_scaling.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
REALDEV = Path("/work/shared/realdev")
PATCHES_PER_IMAGE = 1024           # 256² input, layer2 stride 8: 32 × 32


def rss_now_mb() -> tuple[float, float]:
    """(VmRSS, VmHWM) of this process in MB."""
    vals = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS", "VmHWM")):
            vals[line.split(":")[0]] = int(line.split()[1]) / 1024
    return vals["VmRSS"], vals["VmHWM"]


def reset_peak() -> None:
    """Reset the kernel's RSS high-water mark (VmHWM) to the current RSS."""
    Path("/proc/self/clear_refs").write_text("5")


class MosaicImages:
    """Batches of ``n`` 256² images, each a seeded random crop of a 2×2 mosaic of real photographs
    (``pool``: (P, 3, 192, 192), normalised), under one of the 8 flips / quarter turns."""

    def __init__(self, pool: torch.Tensor, n: int, batch: int, seed: int = 0):
        self.pool, self.n, self.batch, self.seed = pool, n, batch, seed

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed)
        size = self.pool.shape[-1]
        for start in range(0, self.n, self.batch):
            out = []
            for _ in range(min(self.batch, self.n - start)):
                tiles = self.pool[torch.randint(len(self.pool), (4,), generator=gen)]
                mosaic = torch.cat([torch.cat([tiles[0], tiles[1]], 2), torch.cat([tiles[2], tiles[3]], 2)], 1)
                y, x = torch.randint(2 * size - 256 + 1, (2,), generator=gen).tolist()
                im = mosaic[:, y:y + 256, x:x + 256]
                t = int(torch.randint(8, (1,), generator=gen))
                im = torch.rot90(im, t % 4, (1, 2))
                out.append(im.flip(2) if t >= 4 else im)
            yield {"image": torch.stack(out)}


def realdev_pool() -> torch.Tensor:
    from defectlab.data import scan_category
    from defectlab.methods.base import make_loader

    samples = [s for c in ("moon", "tissue", "print") for s in scan_category(REALDEV, c).train]
    return torch.cat([b["image"] for b in make_loader(samples, 192, 32)])


def patchcore_model(dev, cfg_kw: dict):
    from defectlab.backbones import FeatureExtractor, build_backbone
    from defectlab.methods.patchcore import PatchCore, PatchCoreConfig

    model = PatchCore(PatchCoreConfig(backbone="resnet18", layers=["layer2", "layer3"], **cfg_kw), dev)
    model.set_extractor(FeatureExtractor(build_backbone("resnet18", "random", seed=0), ["layer2", "layer3"]))
    return model


def sync(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def scaling(dev, sizes, ratios, chunk: int, exact_limit: float, batch: int, log, save,
            methods=("auto", "greedy")) -> list[dict]:
    pool = realdev_pool()
    rows, last_exact = [], {}                                 # ratio -> (N, seconds)
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as work:
        for n_target in sizes:
            n_images = math.ceil(n_target / PATCHES_PER_IMAGE)
            model = patchcore_model(dev, {"coreset_chunk": chunk, "batch_size": batch})
            reset_peak()
            t0, c0 = time.perf_counter(), time.process_time()
            store, x, _ = model._stream_features(MosaicImages(pool, n_images, batch), 0, False, work)
            sync(dev)
            t_feat, c_feat = time.perf_counter() - t0, time.process_time() - c0
            feat_peak = rss_now_mb()[1]
            n = x.shape[0]
            log(f"N={n}: feature pass {t_feat:.1f} s, peak RSS {feat_peak:.0f} MB, spilled={store.spilled}")
            for ratio in ratios:
                k = max(1, int(round(ratio * n)))
                for method in methods:
                    row = {"n_patches": n, "ratio": ratio, "bank": k, "method": method, "feature_seconds": t_feat,
                           "feature_cpu_seconds": c_feat,
                           "feature_peak_rss_mb": feat_peak, "spilled": store.spilled}
                    if method in ("greedy", "anomalib") and (method, ratio) in last_exact:
                        n0, t0_ = last_exact[(method, ratio)]
                        guess = t0_ * (n / n0) ** 2
                        if guess > exact_limit:
                            row.update(measured=False, select_seconds=guess, gather_seconds=None,
                                       fit_seconds=t_feat + guess, fit_over_features=(t_feat + guess) / t_feat,
                                       note=f"extrapolated (×(N/{n0})² from {t0_:.1f} s at N={n0})")
                            rows.append(row)
                            log(f"  {ratio:.0%} greedy: ~{guess:.0f} s (extrapolated)")
                            continue
                    if method == "anomalib":          # anomalib's KCenterGreedy on the full features
                        from anomalib.models.components.sampling import KCenterGreedy

                        full = store.gather(torch.arange(n)).to(dev)
                        reset_peak()
                        t0, c0 = time.perf_counter(), time.process_time()
                        idx = torch.as_tensor(KCenterGreedy(full, ratio).select_coreset_idxs())
                        del full
                    else:
                        model.config = model.config.model_copy(update={
                            "coreset": method.split("-")[0],
                            "coreset_partition": "random" if method.endswith("-random") else "kmeans"})
                        reset_peak()
                        t0, c0 = time.perf_counter(), time.process_time()
                        idx = model._select(x, k, 0)
                    sync(dev)
                    t_sel, c_sel = time.perf_counter() - t0, time.process_time() - c0
                    t0 = time.perf_counter()
                    bank = store.gather(idx).to(dev)
                    sync(dev)
                    t_gather = time.perf_counter() - t0
                    del bank
                    fit = t_feat + t_sel + t_gather
                    row.update(measured=True, select_seconds=t_sel, gather_seconds=t_gather, fit_seconds=fit,
                               fit_over_features=fit / t_feat, select_cpu_seconds=c_sel,
                               cpu_fit_over_features=(c_feat + c_sel) / c_feat, select_peak_rss_mb=rss_now_mb()[1],
                               fit_peak_rss_mb=max(feat_peak, rss_now_mb()[1]))
                    if method in ("greedy", "anomalib"):
                        last_exact[(method, ratio)] = (n, t_sel)
                    rows.append(row)
                    save(rows)
                    log(f"  {ratio:.0%} {method}: select {t_sel:.1f} s, gather {t_gather:.1f} s, "
                        f"fit/features {fit / t_feat:.2f}, peak RSS {row['fit_peak_rss_mb']:.0f} MB")
            store.close()
            del x, store, model
    return rows


def accuracy(dev, seeds: int, auroc_chunk: int, demo_train: int, log) -> list[dict]:
    """Image / pixel AUROC of exact greedy and chunked, same seeds, per data set."""
    from defectlab.bench import demo_data
    from defectlab.data import load_mask, scan_category
    from defectlab.methods.base import make_loader
    from defectlab.metrics import image_metrics, pixel_metrics
    from defectlab.memory import min_sq_dists
    from defectlab.methods.patchcore import PatchCore, PatchCoreConfig

    sets = [(f"realdev/{c}", scan_category(REALDEV, c), 192, auroc_chunk) for c in ("moon", "tissue", "print")]
    tmp = tempfile.TemporaryDirectory()
    if demo_train:
        sets.append(("demo/grain", demo_data(Path(tmp.name), 256, demo_train), 256, None))
    out = []
    for name, data, size, chunk in sets:
        train = make_loader(data.train, size, 16)
        test = torch.cat([b["image"] for b in make_loader(data.test, size, 16)])
        labels = np.array([s.label for s in data.test])
        masks = np.stack([load_mask(s.mask_paths, size) if s.mask_paths else np.zeros((size, size), bool)
                          for s in data.test])
        extractor = None
        res = {"greedy": [], "chunked": [], "chunked-random": []}
        for seed in range(seeds):
            for method in res:
                kw = {"coreset": method.split("-")[0], "batch_size": 16,
                      "coreset_partition": "random" if method == "chunked-random" else "kmeans"}
                if chunk:
                    kw["coreset_chunk"] = chunk
                model = PatchCore(PatchCoreConfig(**kw), dev)
                if extractor is None:
                    from defectlab.backbones import FeatureExtractor, build_backbone
                    extractor = FeatureExtractor(build_backbone("resnet18", "random", seed=0), ["layer2", "layer3"])
                model.set_extractor(extractor)
                info = model.build_bank(train, seed=seed)
                with torch.no_grad():       # the k-center radius: farthest training patch from the bank
                    feats = torch.cat([model.embed(b["image"].to(dev)).reshape(-1, model.bank.shape[1])
                                       for b in train]).float()
                radius = float(min_sq_dists(feats, (feats * feats).sum(1), model.bank.float()).max().sqrt())
                scores, maps = [], []
                for i in range(0, len(test), 16):
                    s, m = model.predict(test[i:i + 16].to(dev))
                    scores.append(s.cpu())
                    maps.append(m.cpu())
                scores, maps = torch.cat(scores).numpy(), torch.cat(maps).numpy()
                res[method].append({"image_auroc": image_metrics(labels, scores)["image_auroc"],
                                    "pixel_auroc": pixel_metrics(masks, maps)["pixel_auroc"],
                                    "coreset_seconds": info["coreset_seconds"], "n_patches": info["n_patches"],
                                    "radius": radius})
        row = {"data": name, "image_size": size, "n_patches": res["greedy"][0]["n_patches"],
               "chunk": chunk or PatchCoreConfig().coreset_chunk, "seeds": seeds}
        row["chunks"] = math.ceil(row["n_patches"] / row["chunk"])
        for method in res:
            for key in ("image_auroc", "pixel_auroc", "coreset_seconds", "radius"):
                row[f"{key}_{method}"] = float(np.mean([r[key] for r in res[method]]))
        for method in ("chunked", "chunked-random"):
            suffix = "" if method == "chunked" else "_random"
            row[f"image_points{suffix}"] = 100 * (row[f"image_auroc_{method}"] - row["image_auroc_greedy"])
            row[f"pixel_points{suffix}"] = 100 * (row[f"pixel_auroc_{method}"] - row["pixel_auroc_greedy"])
        out.append(row)
        log(f"{name}: {row['chunks']} chunks, image AUROC {row['image_auroc_greedy']:.4f} greedy / "
            f"{row['image_auroc_chunked']:.4f} chunked ({row['image_points']:+.2f} points), pixel "
            f"{row['pixel_auroc_greedy']:.4f} / {row['pixel_auroc_chunked']:.4f} ({row['pixel_points']:+.2f})")
    tmp.cleanup()
    return out


def table(result: dict) -> str:
    lines = [f"# Coreset scaling ({result['device']}, {result['cpu_threads']} threads)", "",
             f"`{result['command']}`", "",
             "| N patches | coreset | selection | select s | fit s | fit ÷ feature pass | same, CPU time | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["scaling"]:
        sel = f"{r['select_seconds']:.1f}" + ("" if r["measured"] else " (extrapolated)")
        rss = f"{r['fit_peak_rss_mb']:.0f}" if r["measured"] else "—"
        cpu = f"{r['cpu_fit_over_features']:.2f}" if r["measured"] else "—"
        lines.append(f"| {r['n_patches']:,} | {r['ratio']:.0%} | {r['method']} | {sel} | {r['fit_seconds']:.1f} | "
                     f"{r['fit_over_features']:.2f} | {cpu} | {rss} |")
    if result.get("accuracy"):
        lines += ["", "| data | patches | chunks | image AUROC greedy / k-means chunks (points) / random chunks (points) "
                      "| pixel AUROC greedy / k-means chunks / random chunks | k-center radius greedy / k-means / random |",
                  "|---|---|---|---|---|---|"]
        for a in result["accuracy"]:
            rnd_i = (f" / {a['image_auroc_chunked-random']:.4f} ({a['image_points_random']:+.2f})"
                     if "image_points_random" in a else "")
            rnd_p = (f" / {a['pixel_auroc_chunked-random']:.4f} ({a['pixel_points_random']:+.2f})"
                     if "pixel_points_random" in a else "")
            lines.append(f"| {a['data']} ({a['image_size']}², {a['seeds']} seeds) | {a['n_patches']:,} | {a['chunks']} | "
                         f"{a['image_auroc_greedy']:.4f} / {a['image_auroc_chunked']:.4f} ({a['image_points']:+.2f}){rnd_i} | "
                         f"{a['pixel_auroc_greedy']:.4f} / {a['pixel_auroc_chunked']:.4f} ({a['pixel_points']:+.2f}){rnd_p} | "
                         + (" / ".join(f"{a[f'radius_{m}']:.3f}" for m in ("greedy", "chunked", "chunked-random"))
                            if "radius_greedy" in a else "–") + " |")
    return "\n".join(lines) + "\n"


#: legend names of the selections (``auto`` / ``auto-random`` rows were measured above the former
#: 65 536-patch threshold of ``auto``, i.e. as chunked)
LABELS = {"greedy": "exact greedy", "auto": "k-means chunks", "auto-random": "random chunks",
          "chunked": "k-means chunks", "chunked-random": "random chunks", "anomalib": "anomalib KCenterGreedy"}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    rows = result["scaling"]
    ns = sorted({r["n_patches"] for r in rows})
    ax.plot(ns, [next(r["feature_seconds"] for r in rows if r["n_patches"] == n) for n in ns], "k--",
            label="feature pass")
    for ratio, color in zip(sorted({r["ratio"] for r in rows}, reverse=True), ("C0", "C1", "C2")):
        for method, style in (("greedy", "o-"), ("auto", "s-"), ("auto-random", "^:"), ("chunked", "s-"),
                              ("chunked-random", "^:"), ("anomalib", "d--")):
            pts = [r for r in rows if r["ratio"] == ratio and r["method"] == method]
            if not pts:
                continue
            meas = [r for r in pts if r["measured"]]
            ax.plot([r["n_patches"] for r in meas], [r["fit_seconds"] for r in meas], style, color=color,
                    mfc=color if method == "greedy" else "white", label=f"fit, {LABELS[method]}, {ratio:.0%}")
            ext = [r for r in pts if not r["measured"]]
            if ext and meas:
                ax.plot([meas[-1]["n_patches"]] + [r["n_patches"] for r in ext],
                        [meas[-1]["fit_seconds"]] + [r["fit_seconds"] for r in ext], ":", color=color)
                ax.plot([r["n_patches"] for r in ext], [r["fit_seconds"] for r in ext], "x", color=color)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("patch features N")
    ax.set_ylabel("seconds")
    measured = "anomalib KCenterGreedy" if any(r["method"] == "anomalib" for r in rows) else "anomalib not measured"
    ax.set_title(f"PatchCore fit vs N ({result['device']}; dotted/x: extrapolated; {measured})",
                 fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="reports/coreset_scaling.json")
    ap.add_argument("--sizes", default="60000,250000,1000000,4000000")
    ap.add_argument("--ratios", default="0.1,0.01")
    ap.add_argument("--chunk", type=int, default=None, help="coreset_chunk (default: PatchCoreConfig's)")
    ap.add_argument("--exact-limit", type=float, default=600, help="skip exact greedy predicted above this (s)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--methods", default="auto,chunked,greedy",
                    help="selections to time (coreset: auto | chunked | greedy); a -random suffix sets "
                         "coreset_partition: random, e.g. chunked-random; anomalib: anomalib's KCenterGreedy on "
                         "the full features (run with an interpreter that has anomalib)")
    ap.add_argument("--auroc-seeds", type=int, default=3)
    ap.add_argument("--auroc-chunk", type=int, default=8192)
    ap.add_argument("--accuracy-from", help="take the accuracy rows from this earlier JSON (--auroc-seeds 0)")
    ap.add_argument("--demo-train", type=int, default=100, help="0: no demo-data accuracy row")
    args = ap.parse_args()
    from defectlab.backbones import resolve_device
    from defectlab.methods.patchcore import PatchCoreConfig

    dev = resolve_device(args.device)
    chunk = args.chunk or PatchCoreConfig().coreset_chunk
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    result = {"command": "python scripts/bench_coreset_scaling.py " + " ".join(sys.argv[1:]), "device": str(dev),
              "cpu_threads": torch.get_num_threads(), "machine": platform.machine(), "chunk": chunk,
              "features": "ResNet-18 random init, layers 2+3, 3x3 aggregation, 384-D, 256² realdev mosaics"}
    if args.accuracy_from:
        result["accuracy_command"] = json.loads(Path(args.accuracy_from).read_text())["command"]
    result["accuracy"] = json.loads(Path(args.accuracy_from).read_text())["accuracy"] if args.accuracy_from else \
        accuracy(dev, args.auroc_seeds, args.auroc_chunk, args.demo_train, log) if args.auroc_seeds else []

    def save(rows):
        result["scaling"] = rows
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(out)

    sizes = [int(s) for s in args.sizes.split(",") if s]
    save(scaling(dev, sizes, [float(r) for r in args.ratios.split(",")], chunk, args.exact_limit, args.batch, log, save,
                 methods=args.methods.split(",")) if sizes else [])
    out.with_suffix(".md").write_text(table(result))
    if result["scaling"]:
        plot(result, out.with_suffix(".png"))
    print(table(result))


if __name__ == "__main__":
    main()
