"""defectlab vs anomalib 2.x: PatchCore and PaDiM side by side on one MVTec-format folder.

anomalib is not a dependency of defectlab; it lives in its own venv, with defectlab installed
into it (torch / torchvision pinned to the pair defectlab's pyproject.toml pins: the machine's
pip config otherwise offers a local CPU torch wheel with no matching torchvision)::

    python3 -m venv /work/anomalib-venv
    /work/anomalib-venv/bin/pip install "torch==2.14.1" "torchvision==0.29.1" "anomalib==2.7.0" -e /work/main
    /work/anomalib-venv/bin/python -c "import torch, torchvision, torchvision.ops, anomalib; print(anomalib.__version__)"
    # resolved with it: lightning 2.6.6, timm 1.0.31, torchmetrics 1.9.0, kornia 0.9.0 (no extra needed:
    # anomalib[cpu] only adds torch / torchvision / torchcodec, which are pinned above or not used)

Run (the quick check on a generated demo category, then a real folder)::

    OMP_NUM_THREADS=1 /work/anomalib-venv/bin/python scripts/compare_anomalib.py --demo --image-size 64 \\
        --out /tmp/compare_demo.json
    OMP_NUM_THREADS=1 /work/anomalib-venv/bin/python scripts/compare_anomalib.py --root /work/shared/realdev \\
        --category moon,tissue,print --image-size 192 --out reports/compare_anomalib_realdev.json

Each tool x method x category runs in its own subprocess (``--worker``), so ``peak_rss_mb`` is that
run's own peak (``ru_maxrss`` of the worker, read right after inference, before any metric is
computed; it includes the interpreter and the tool's imports: ``import_rss_mb`` says how much).
The worker hands its raw image scores and anomaly maps (at ``--image-size``, the resolution both
tools produce them at) back to the parent, which computes every metric with defectlab's own
``defectlab.metrics.compute_all`` against the same ground truth (masks resized to
``--image-size`` with nearest neighbour by defectlab's loader), so the metrics are identical code.

What each timing covers (``device`` = CPU: wall clock; CUDA: synchronised):

* ``fit_s``, defectlab: ``method.fit(FitContext)`` — building the backbone (~0.1 s for
  ResNet-18), decoding the train PNGs (PIL, resize, normalise; ``make_loader``, 0 workers), the
  forward pass, and the coreset + bank (PatchCore) or the per-position covariances and their
  inverses (PaDiM).
* ``fit_s``, anomalib: ``Engine.fit(model, datamodule=MVTecAD(...))`` — the datamodule's setup
  (folder scan into a DataFrame), Lightning's trainer setup, the one training epoch (decoding the
  PNGs via PIL, collating, the model's ``PreProcessor`` resize + normalise per batch, forward,
  embedding store), then ``MemoryBankMixin.fit`` (coreset / Gaussian) at epoch end. The model's
  construction (backbone creation) happens before and is not timed. The Engine runs
  ``barebones=True`` (no checkpoint file, logger or progress bar: defectlab's fit writes nothing
  either), ``limit_val_batches=0`` and ``val_split_mode="none"``: no validation pass over the
  test images inside ``fit``.
* ``infer_s`` / ``images_per_s``: one pass over the whole test set from disk: defectlab
  ``predict_loader(make_loader(test))`` (decode images + masks, predict); anomalib
  ``Engine.predict(model, datamodule)`` (trainer setup, decode images + masks, PreProcessor,
  predict). Both include the first-call costs of their process (defectlab builds its kNN index
  lazily on the first batch). ``images_per_s = n_test / infer_s``.
* ``decode_train_s`` / ``decode_test_s``: each tool's own loader iterated alone over the same
  images (timed after the runs above, same batch size, 0 workers): the share of ``fit_s`` /
  ``infer_s`` that is PNG decoding (anomalib's resize happens in the model's PreProcessor and is
  not in it; at the native image size it is a no-op anyway).

Both tools read the same files from disk with the same batch size and no loader workers (the
parent reads every file once first, so both find them in the page cache). These machines are
noisy: repeat a run before reading much into a 10 % timing difference.

What is compared, and what differs (also written into the Markdown report, ``NOTES``):

* Backbone: random initialisation for both (no ImageNet weights offline). With
  ``--anomalib-backbone shared`` (default) anomalib gets the very same torchvision network
  defectlab builds (``defectlab.backbones.build_backbone(arch, "random", seed)``), passed as an
  ``nn.Module`` to anomalib's own ``TimmFeatureExtractor`` and swapped into the model after its
  construction (``Patchcore`` / ``Padim`` take only a timm name); with ``timm`` anomalib builds
  its own timm network with ``pre_trained=False`` (other random weights, so figures then differ
  by the draw of the weights as much as by the method).
* PatchCore features: both average 3x3 neighbourhoods of layer2 and layer3, upsample layer3
  bilinearly to layer2's grid and concatenate: 128 + 256 = 384 channels for ResNet-18. defectlab
  then pools channels to ``--embed-dim`` only when that is *smaller* than the concatenation
  (default 1024: a no-op for ResNet-18, so both banks are 384-d); anomalib has no such pooling,
  so with ``--embed-dim`` < 384 or a wider backbone (WRN-50: 1536) the banks differ in width.
  At the border anomalib's ``AvgPool2d(3, 1, 1)`` counts the zero padding, defectlab's does not.
* PatchCore coreset (same ratio): anomalib ``KCenterGreedy``: sparse random projection with
  eps = 0.9 (Johnson-Lindenstrauss dimension ~24.7 ln N, ~260 for 35k patches), one-at-a-time
  greedy from a random start, floor(ratio * N) points. defectlab: Gaussian projection to 128
  dims, batched greedy that makes the one-at-a-time picks, seeded start, round(ratio * N) points.
* PatchCore search: anomalib's is brute force; defectlab's is exact too with ``--defectlab-knn
  exact`` (default), or its own ``knn_approx: auto`` (an inverted file, memory.GemmIVF, once the bank exceeds
  ``memory.AUTO_EXACT_MAX_ROWS`` rows on CPU; ``knn_approximate`` in the JSON says which ran).
* PatchCore scores: both nearest-bank distance per patch; image score = the largest, reweighted
  by the paper's Eq. 7 with ``num_neighbors`` = 9 in both. Maps: anomalib upsamples the patch
  scores with *nearest-neighbour* interpolation, defectlab bilinearly; both then blur with a
  Gaussian sigma = 4 (radius 4 sigma, reflect padding).
* PaDiM: layers ``--padim-layers`` (default layer1-3, PaDiM's and both tools' default), a random
  subset of ``--padim-features`` (100) channels. In ``shared`` mode anomalib also gets defectlab's
  channel subset (the seeded ``randperm`` of ``PaDiM.fit``, reproduced here and written into
  anomalib's ``idx`` buffer), so both build identical embeddings; Sigma + 0.01 I in both
  (defectlab inverts via Cholesky / Woodbury, anomalib ``torch.linalg.inv``); maps bilinear +
  sigma = 4, image score = map maximum, in both. PaDiM's figures should therefore agree to float
  precision: a check of this harness.
* Pre-processing: defectlab resizes the uint8 image with PIL bilinear, anomalib the float tensor
  with torchvision ``Resize(antialias=True)``; both ImageNet-normalise. At the native size
  nothing is resized. Grayscale PNGs become RGB in both (PIL ``convert("RGB")`` / replication).
* anomalib's PostProcessor (min-max normalisation, thresholds), Evaluator and Visualizer are
  off (``False``): its raw scores and maps are evaluated, as defectlab's are.
* anomalib's train loader shuffles (seeded by ``lightning.seed_everything(--seed)``); its coreset
  start and projection draw from the same seeded torch RNG.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TOOLS = ("defectlab", "anomalib")
METHODS = ("patchcore", "padim")
#: the figures per run, in table order: (key, header, format)
COLUMNS = (
    ("fit_s", "fit s", "{:.2f}"),
    ("decode_train_s", "of which decode s", "{:.2f}"),
    ("images_per_s", "infer img/s", "{:.1f}"),
    ("peak_rss_mb", "peak RSS MB", "{:.0f}"),
    ("import_rss_mb", "of which imports MB", "{:.0f}"),
    ("image_auroc", "image AUROC", "{:.4f}"),
    ("pixel_auroc", "pixel AUROC", "{:.4f}"),
    ("aupro", "AUPRO", "{:.4f}"),
)
NOTES = [
    "Backbone: random init for both; `shared` = anomalib runs on the very same torchvision weights as defectlab "
    "(passed to anomalib's TimmFeatureExtractor as an nn.Module); `timm` = anomalib's own timm net, pre_trained=False.",
    "PatchCore: both 3x3-averaged layer2+layer3 features, layer3 bilinearly upsampled, concatenated (384-d for "
    "ResNet-18). defectlab pools channels to embed_dim only when embed_dim is smaller (1024: no-op here); anomalib "
    "never pools. Both average the zero padding at the border into the 3x3 means (anomalib's AvgPool2d; "
    "defectlab's pool_include_pad, its default).",
    "PatchCore coreset, same ratio: anomalib = sparse random projection (eps 0.9, JL dim ~24.7 ln N), one-at-a-time "
    "greedy, random start, floor(ratio*N); defectlab = Gaussian projection to 128 dims, batched greedy with the same "
    "picks as one-at-a-time, seeded start, round(ratio*N).",
    "PatchCore scoring: both nearest-bank distance (anomalib brute force; defectlab exact unless --defectlab-knn "
    "auto), image score reweighted by Eq. 7 with num_neighbors=9. Maps: "
    "anomalib upsamples patch scores by nearest neighbour, defectlab bilinearly; both Gaussian sigma=4.",
    "PaDiM (shared mode): same weights, same random channel subset (defectlab's seeded randperm written into "
    "anomalib's idx), Sigma + 0.01 I, bilinear maps + sigma=4, image score = map max in both: should agree to float "
    "precision.",
    "anomalib's PostProcessor / Evaluator / Visualizer off: raw scores and maps of both tools go through "
    "defectlab.metrics (same masks, at the image size). Engine: barebones=True (no checkpoint), no validation pass.",
    "fit s: defectlab = method.fit(FitContext) incl. backbone build + PNG decoding; anomalib = Engine.fit incl. "
    "datamodule setup, Lightning setup and its own decoding (model construction not timed). 'of which decode s' = "
    "the tool's own loader over the train images alone. infer img/s = test images / one predict pass from disk "
    "(decode + masks + scoring; anomalib via Engine.predict). Peak RSS = the run's own subprocess (incl. imports).",
]


# --------------------------------------------------------------------------------------- worker
def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, device: str):
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t0


def _loader_seconds(loader) -> float:
    t0 = time.perf_counter()
    for _ in loader:
        pass
    return time.perf_counter() - t0


def padim_channels(backbone: str, layers: list[str], n_features: int, seed: int):
    """The channel subset defectlab's ``PaDiM.fit`` draws (kept in step with it by hand: a
    change there shows up as the two tools' PaDiM figures parting)."""
    import torch

    from defectlab.backbones import feature_extractor

    with torch.no_grad():
        probe = feature_extractor(backbone, layers)(torch.zeros(1, 3, 64, 64))
    total = sum(probe[layer].shape[1] for layer in layers)
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(total, generator=gen)[:min(n_features, total)].sort().values


def run_defectlab(spec: dict) -> tuple[dict, np.ndarray, np.ndarray, list[str]]:
    from defectlab.backbones import resolve_device
    from defectlab.data import scan_category
    from defectlab.methods.base import FitContext, make_loader

    dev = resolve_device(spec["device"])
    size, batch = spec["image_size"], spec["batch_size"]
    data = scan_category(spec["root"], spec["category"])
    if spec["method"] == "patchcore":
        from defectlab.methods.patchcore import PatchCore, PatchCoreConfig

        cfg = {"backbone": spec["backbone"], "weights": "random", "layers": spec["layers"],
               "embed_dim": spec["embed_dim"], "coreset_ratio": spec["coreset_ratio"],
               "num_neighbors": spec["num_neighbors"], "batch_size": batch}
        if "knn_approx" in PatchCoreConfig.model_fields:      # exact search, as anomalib's; or defectlab's auto
            cfg["knn_approx"] = None if spec["defectlab_knn"] == "exact" else spec["defectlab_knn"]
        model = PatchCore(PatchCoreConfig(**cfg), dev)
    else:
        from defectlab.methods.padim import PaDiM, PaDiMConfig

        model = PaDiM(PaDiMConfig(backbone=spec["backbone"], weights="random", layers=spec["padim_layers"],
                                  n_features=spec["padim_features"], batch_size=batch), dev)
    ctx = FitContext(dataset="compare", category=spec["category"], data=data, image_size=size, seed=spec["seed"],
                     device=dev, progress=False)
    info, fit_s = _timed(lambda: model.fit(ctx), spec["device"])
    out, infer_s = _timed(lambda: model.predict_loader(make_loader(data.test, size, batch)), spec["device"])
    extra = {"n_train": len(data.train), "n_test": len(data.test)}
    if spec["method"] == "patchcore":
        extra.update({"bank_size": int(model.bank.shape[0]), "feature_dim": int(model.bank.shape[1]),
                      "n_patches": info.get("n_patches"), "knn_approximate": bool(model.index.approximate)
                      if hasattr(model.index, "approximate") else False})
    else:
        extra.update({"feature_dim": int(model.mean.shape[1]), "n_positions": int(model.mean.shape[0])})
    res = {"fit_s": fit_s, "infer_s": infer_s, **extra}
    res["peak_rss_mb_at_predict"] = _rss()
    res["decode_train_s"] = _loader_seconds(make_loader(data.train, size, batch))
    res["decode_test_s"] = _loader_seconds(make_loader(data.test, size, batch))
    return res, out["scores"], out["maps"], list(out["paths"])


def run_anomalib(spec: dict) -> tuple[dict, np.ndarray, np.ndarray, list[str]]:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("anomalib").setLevel(logging.ERROR)
    import torch
    from anomalib.data import MVTecAD
    from anomalib.engine import Engine
    from anomalib.models import Padim, Patchcore
    from anomalib.models.components.feature_extractors import TimmFeatureExtractor
    from anomalib.pre_processing import PreProcessor
    from lightning.pytorch import seed_everything
    from torchvision.transforms.v2 import Compose, Normalize, Resize

    from defectlab.data.transform import IMAGENET_MEAN, IMAGENET_STD

    size, batch, seed = spec["image_size"], spec["batch_size"], spec["seed"]
    seed_everything(seed, verbose=False)
    pre = PreProcessor(transform=Compose([Resize((size, size), antialias=True),
                                          Normalize(mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))]))
    common = {"backbone": spec["backbone"], "pre_trained": False, "pre_processor": pre, "post_processor": False,
              "evaluator": False, "visualizer": False}
    if spec["method"] == "patchcore":
        layers = spec["layers"]
        model = Patchcore(layers=layers, coreset_sampling_ratio=spec["coreset_ratio"],
                          num_neighbors=spec["num_neighbors"], **common)
    else:
        layers = spec["padim_layers"]
        model = Padim(layers=layers, n_features=spec["padim_features"], **common)
    if spec["anomalib_backbone"] == "shared":
        from defectlab.backbones import build_backbone

        net = build_backbone(spec["backbone"], "random", seed=seed)
        model.model.feature_extractor = TimmFeatureExtractor(backbone=net, layers=list(layers)).eval()
        if spec["method"] == "padim":
            model.model.idx = padim_channels(spec["backbone"], list(layers), spec["padim_features"], seed)
    dm = MVTecAD(root=spec["root"], category=spec["category"], train_batch_size=batch, eval_batch_size=batch,
                 num_workers=0, val_split_mode="none", seed=seed)
    accelerator = "gpu" if spec["device"].startswith("cuda") else "cpu"
    engine = Engine(accelerator=accelerator, devices=1, default_root_dir=spec["work_dir"], barebones=True,
                    limit_val_batches=0)
    _, fit_s = _timed(lambda: engine.fit(model=model, datamodule=dm), spec["device"])
    preds, infer_s = _timed(lambda: engine.predict(model=model, datamodule=dm), spec["device"])
    scores = torch.cat([b.pred_score.reshape(-1).float().cpu() for b in preds]).numpy()
    maps = torch.cat([b.anomaly_map.reshape(-1, *b.anomaly_map.shape[-2:]).float().cpu() for b in preds]).numpy()
    paths = [str(p) for b in preds for p in b.image_path]
    res = {"fit_s": fit_s, "infer_s": infer_s, "n_train": len(dm.train_data), "n_test": len(paths)}
    if spec["method"] == "patchcore":
        bank = model.model.memory_bank
        res.update({"bank_size": int(bank.shape[0]), "feature_dim": int(bank.shape[1])})
    else:
        res.update({"feature_dim": int(model.model.gaussian.mean.shape[0]),
                    "n_positions": int(model.model.gaussian.mean.shape[1])})
    res["peak_rss_mb_at_predict"] = _rss()
    res["decode_train_s"] = _loader_seconds(dm.train_dataloader())
    res["decode_test_s"] = _loader_seconds(dm.test_dataloader())
    return res, scores, maps, paths


def _rss() -> float:
    from defectlab.pipeline import peak_rss_mb

    return peak_rss_mb()


def worker(spec_path: Path) -> None:
    spec = json.loads(spec_path.read_text())
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    if spec["tool"] == "anomalib":      # what run_anomalib imports: its cost belongs to import_rss_mb
        import anomalib.data, anomalib.engine, anomalib.models, lightning  # noqa: E401, F401
    else:
        import defectlab.methods.padim, defectlab.methods.patchcore  # noqa: E401, F401
    import_rss = _rss()
    run = run_defectlab if spec["tool"] == "defectlab" else run_anomalib
    res, scores, maps, paths = run(spec)
    res.update({"peak_rss_mb": res.pop("peak_rss_mb_at_predict"), "import_rss_mb": import_rss,
                "torch_threads": torch.get_num_threads()})
    if spec["device"].startswith("cuda"):
        res["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if spec["tool"] == "anomalib":
        import anomalib

        res["anomalib_version"] = anomalib.__version__
    res["torch_version"] = torch.__version__
    out = Path(spec["work_dir"])
    np.savez(out / "outputs.npz", scores=np.asarray(scores, np.float32), maps=np.asarray(maps, np.float32),
             paths=np.asarray(paths))
    (out / "result.json").write_text(json.dumps(res))


# --------------------------------------------------------------------------------------- parent
def ground_truth(data, size: int):
    from defectlab.data import load_mask

    labels = np.array([s.label for s in data.test])
    masks = np.stack([load_mask(s.mask_paths, size) if s.mask_paths else np.zeros((size, size), bool)
                      for s in data.test])
    return labels, masks


def run_one(args, tool: str, method: str, category: str, root: Path, work_root: Path, data) -> dict:
    from defectlab.metrics import compute_all

    work = Path(tempfile.mkdtemp(prefix=f"{tool}-{method}-{category}-", dir=work_root))
    spec = {"tool": tool, "method": method, "category": category, "root": str(root), "work_dir": str(work),
            "image_size": args.image_size, "backbone": args.backbone, "layers": args.layers,
            "padim_layers": args.padim_layers, "padim_features": args.padim_features,
            "coreset_ratio": args.coreset_ratio, "embed_dim": args.embed_dim, "num_neighbors": args.num_neighbors,
            "batch_size": args.batch_size, "seed": args.seed, "device": args.device, "threads": args.threads,
            "anomalib_backbone": args.anomalib_backbone, "defectlab_knn": args.defectlab_knn}
    (work / "spec.json").write_text(json.dumps(spec))
    python = args.anomalib_python if tool == "anomalib" else args.defectlab_python
    row = {"category": category, "tool": tool, "method": method}
    t0 = time.perf_counter()
    with open(work / "log.txt", "w") as log:
        proc = subprocess.run([python, str(Path(__file__).resolve()), "--worker", str(work / "spec.json")],
                              stdout=log, stderr=subprocess.STDOUT)
    row["process_s"] = time.perf_counter() - t0
    if proc.returncode != 0 or not (work / "result.json").exists():
        tail = (work / "log.txt").read_text()[-3000:]
        row["error"] = f"worker exited {proc.returncode}: {tail}"
        return row
    row.update(json.loads((work / "result.json").read_text()))
    out = np.load(work / "outputs.npz")
    order = {os.path.realpath(p): i for i, p in enumerate(out["paths"])}
    want = [os.path.realpath(s.path) for s in data.test]
    missing = [p for p in want if p not in order]
    if missing or len(order) != len(want):
        row["error"] = f"test images differ between tools: {len(missing)} of ours missing, {len(order)} returned"
        return row
    idx = np.array([order[p] for p in want])
    scores, maps = out["scores"][idx], out["maps"][idx]
    if maps.shape[1:] != (args.image_size, args.image_size):
        row["error"] = f"maps are {maps.shape[1:]}, not {args.image_size} px"
        return row
    labels, masks = ground_truth(data, args.image_size)
    metrics = compute_all(labels, scores, masks, maps)
    row.update({k: metrics[k] for k in ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "pixel_f1_max")})
    row["images_per_s"] = row["n_test"] / row["infer_s"]
    (work / "outputs.npz").unlink()
    return row


def summarise(rows: list[dict]) -> list[dict]:
    """Per tool x method: the mean over categories of each figure (peak RSS: the largest)."""
    out = []
    for method in METHODS:
        for tool in TOOLS:
            sel = [r for r in rows if r["tool"] == tool and r["method"] == method and "error" not in r]
            if not sel:
                continue
            m = {"category": "mean", "tool": tool, "method": method, "n_categories": len(sel)}
            for key, _, _ in COLUMNS:
                vals = [r[key] for r in sel if r.get(key) is not None]
                if vals:
                    m[key] = float(max(vals) if key.endswith("rss_mb") else np.mean(vals))
            out.append(m)
    return out


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [f"# defectlab vs anomalib {result['versions'].get('anomalib', '?')}: PatchCore and PaDiM", "",
             f"Data: `{s['root']}`, categories {', '.join(s['categories'])}; {s['image_size']} px; backbone "
             f"{s['backbone']} (random init, anomalib backbone: `{s['anomalib_backbone']}`); PatchCore layers "
             f"{','.join(s['layers'])}, coreset {s['coreset_ratio']}, embed_dim {s['embed_dim']}, "
             f"num_neighbors {s['num_neighbors']}; PaDiM layers {','.join(s['padim_layers'])}, "
             f"{s['padim_features']} features; defectlab kNN {s['defectlab_knn']}; batch {s['batch_size']}; seed {s['seed']}; device {s['device']}; "
             f"torch threads {s.get('torch_threads')}; torch {result['versions'].get('torch')}.", "",
             f"Command: `{result['command']}` ({result['total_seconds']:.0f} s in all)", "",
             "| category | tool | method | " + " | ".join(h for _, h, _ in COLUMNS) + " |",
             "|---|---|---|" + "---:|" * len(COLUMNS)]

    def cell(row, key, fmt):
        v = row.get(key)
        return "–" if v is None else fmt.format(v)

    for row in [*result["runs"], *result["means"]]:
        if "error" in row:
            lines.append(f"| {row['category']} | {row['tool']} | {row['method']} | error: "
                         f"{row['error'].splitlines()[-1][:200] if row['error'].strip() else row['error']} |"
                         + " |" * (len(COLUMNS) - 1))
            continue
        cat = f"**{row['category']}**" if row["category"] == "mean" else row["category"]
        lines.append(f"| {cat} | {row['tool']} | {row['method']} | "
                     + " | ".join(cell(row, k, f) for k, _, f in COLUMNS) + " |")
    lines += ["", "Means are over categories (peak RSS: the largest). Notes:", ""]
    lines += [f"* {n}" for n in NOTES]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--root", type=Path, help="MVTec-format folder (one sub-folder per category)")
    p.add_argument("--category", default=None, help="category, or a comma-separated list (default: all in --root)")
    p.add_argument("--demo", action="store_true", help="generate a small demo category (defectlab.bench.demo_data) "
                                                      "at --image-size into a temporary folder instead of --root")
    p.add_argument("--demo-train", type=int, default=20, help="training images of the --demo category")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--backbone", default="resnet18", help="a torchvision name that timm also knows (resnet18, "
                                                          "wide_resnet50_2)")
    p.add_argument("--layers", default="layer2,layer3", help="PatchCore's layers")
    p.add_argument("--padim-layers", default="layer1,layer2,layer3", help="PaDiM's layers")
    p.add_argument("--padim-features", type=int, default=100, help="PaDiM's random channel subset size")
    p.add_argument("--coreset-ratio", type=float, default=0.1)
    p.add_argument("--embed-dim", type=int, default=1024,
                   help="defectlab PatchCore's channel pooling target; used only when smaller than the "
                        "concatenated layers (384 for resnet18 layer2+3); anomalib has no such pooling")
    p.add_argument("--num-neighbors", type=int, default=9, help="PatchCore's Eq. 7 reweighting neighbours (both)")
    p.add_argument("--batch-size", type=int, default=16, help="train and test batch size (both)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in each run (default: torch's, "
                                                              "which follows OMP_NUM_THREADS)")
    p.add_argument("--anomalib-backbone", default="shared", choices=["shared", "timm"],
                   help="shared: anomalib runs on defectlab's exact random weights; timm: its own timm random init")
    p.add_argument("--defectlab-knn", default="exact", choices=["exact", "auto"],
                   help="defectlab PatchCore's kNN search: exact (brute force, as anomalib's) or its knn_approx "
                        "auto (an inverted file, memory.GemmIVF, for banks over memory.AUTO_EXACT_MAX_ROWS rows on CPU)")
    p.add_argument("--tools", default=",".join(TOOLS))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--anomalib-python", default=sys.executable, help="interpreter with anomalib (and defectlab)")
    p.add_argument("--defectlab-python", default=sys.executable, help="interpreter for the defectlab runs")
    p.add_argument("--out", type=Path, default=Path("reports/compare_anomalib.json"),
                   help="JSON report; the Markdown table goes beside it (.md)")
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for key in ("layers", "padim_layers", "tools", "methods"):
        setattr(args, key, [x.strip() for x in getattr(args, key).split(",") if x.strip()])
    if not args.worker and not args.demo and args.root is None:
        p.error("give --root (an MVTec-format folder) or --demo")
    if not args.worker and "anomalib" in args.tools:
        probe = subprocess.run([args.anomalib_python, "-c", "import anomalib"], capture_output=True, text=True)
        if probe.returncode != 0:
            p.error(f"--anomalib-python {args.anomalib_python}: cannot import anomalib "
                    f"({(probe.stderr.strip().splitlines() or ['no output'])[-1]}); install it in its own venv "
                    "(see this script's docstring) and pass that interpreter, or run only our side with "
                    "--tools defectlab")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args.worker)
        return 0
    from defectlab.data import list_categories, scan_category

    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="compare-anomalib-") as tmp:
        tmp = Path(tmp)
        if args.demo:
            from defectlab.bench import demo_data

            root = tmp / "demo"
            demo_data(root, args.image_size, args.demo_train, n_test_good=10, n_test_per_defect=4)
        else:
            root = args.root.resolve()
        categories = args.category.split(",") if args.category else list_categories(root)
        rows = []
        for category in categories:
            data = scan_category(root, category)
            for s in [*data.train, *data.test]:                   # page cache warm for every run
                Path(s.path).read_bytes()
                for m in s.mask_paths:
                    Path(m).read_bytes()
            for method in args.methods:
                for tool in args.tools:
                    row = run_one(args, tool, method, category, root, tmp, data)
                    rows.append(row)
                    if "error" in row:
                        print(f"{category:>10} {tool:>9} {method:>9}  ERROR {row['error'][-600:]}", flush=True)
                    else:
                        print(f"{category:>10} {tool:>9} {method:>9}  fit {row['fit_s']:6.2f} s  "
                              f"{row['images_per_s']:6.1f} img/s  {row['peak_rss_mb']:5.0f} MB  "
                              f"img {row['image_auroc']:.4f}  pix {row['pixel_auroc']:.4f}  "
                              f"pro {row['aupro']:.4f}", flush=True)
    versions = {}
    for r in rows:
        versions.setdefault("torch", r.get("torch_version"))
        if r.get("anomalib_version"):
            versions["anomalib"] = r["anomalib_version"]
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "worker"}
    settings.update({"root": "demo (generated)" if args.demo else str(root), "categories": categories,
                     "torch_threads": next((r["torch_threads"] for r in rows if "torch_threads" in r), None)})
    result = {"settings": settings, "versions": versions,
              "command": " ".join(["python", "scripts/compare_anomalib.py", *(argv or sys.argv[1:])]),
              "total_seconds": time.perf_counter() - t_start, "runs": rows, "means": summarise(rows),
              "notes": NOTES}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(f"wrote {args.out} and {args.out.with_suffix('.md')} ({result['total_seconds']:.0f} s)")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
