"""ONNX export benchmark: file size, onnxruntime vs torch throughput on CPU, and parity.

Generates one demo category, fits PatchCore and PaDiM with the ``smoke`` profile's settings from
params.yaml, exports each with ``defectlab.export.export_onnx`` and, in this one process, times
scoring the category's test images with onnxruntime (CPUExecutionProvider) and with torch
(``method.predict`` after the same normalisation): same images, same batch size, same thread
count (onnxruntime's idle threads set not to spin, so it does not slow torch down in between);
one warm-up pass each is excluded, then ``--repeats`` passes alternating which engine goes first,
and the median pass time gives images/s. Parity: ``export.verify_onnx`` on all test images
(max relative differences of scores and maps). Writes ``--out`` atomically.

    OMP_NUM_THREADS=2 python scripts/bench_export.py --out reports/bench_export.json
    python scripts/bench_export.py --out /tmp/b.json --image-size 128 --n 40 --batch 8 --repeats 7
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from defectlab import export as ex
from defectlab.config import Params
from defectlab.data import load_image, scan_category
from defectlab.data.demo import generate_demo
from defectlab.io import write_json
from defectlab.methods import get_method
from defectlab.methods.base import FitContext

METHODS = ("patchcore", "padim")


def passes(fn, images: np.ndarray, batch: int) -> float:
    """Seconds for one pass of ``fn`` over ``images`` in batches of ``batch``."""
    t0 = time.perf_counter()
    for i in range(0, len(images), batch):
        fn(images[i:i + batch])
    return time.perf_counter() - t0


def bench_method(name: str, params: Params, data, work: Path, images: np.ndarray, args) -> dict:
    cls = get_method(name)
    cfg = params.method(name, cls.Config)
    model = cls(cfg, "cpu")
    t0 = time.perf_counter()
    model.fit(FitContext(dataset="demo", category=args.category, data=data, image_size=args.image_size,
                         seed=params.seed, device=torch.device("cpu"), progress=False))
    fit_s = time.perf_counter() - t0
    model.save(work / name)
    facts = ex.export_onnx(work / name, work / f"{name}.onnx")
    parity = ex.verify_onnx(work / name, work / f"{name}.onnx", images)

    pre = ex.resolve_preprocess(ex.read_model_json(work / name)[0])
    # no thread spinning: onnxruntime's busy-waiting threads would otherwise slow the torch pass
    # that follows (measured: torch PatchCore passes 0.4 s alone, up to 2.8 s right after ORT)
    sess = ex.onnx_session(work / f"{name}.onnx", threads=args.threads, spinning=False)
    method = ex.load_method(work / name)
    engines = {
        "onnxruntime": lambda x: sess.run(ex.OUTPUT_NAMES, {"image": x}),
        "torch": lambda x: ex.torch_predict(method, x, pre),
    }
    for fn in engines.values():                       # warm-up (allocations, oneDNN/MLAS kernels)
        passes(fn, images, args.batch)
    times: dict[str, list[float]] = {k: [] for k in engines}
    for r in range(args.repeats):                     # interleaved, alternating who goes first
        order = list(engines) if r % 2 == 0 else list(engines)[::-1]
        for k in order:
            times[k].append(passes(engines[k], images, args.batch))
    ips = {k: len(images) / statistics.median(v) for k, v in times.items()}
    state = model.state_tensors()
    return {
        "config": cfg.model_dump(mode="json"),
        "fit_seconds": fit_s,
        "export_seconds": facts["seconds"],
        "onnx_mb": facts["bytes"] / 1e6,
        "onnx_mib": facts["bytes"] / 2**20,
        "model_safetensors_mb": (work / name / "model.safetensors").stat().st_size / 1e6,
        "bank_or_gaussians": {k: list(v.shape) for k, v in state.items() if not k.startswith("backbone.")},
        "images_per_s": {"onnxruntime": ips["onnxruntime"], "torch": ips["torch"]},
        "ratio_ort_over_torch": ips["onnxruntime"] / ips["torch"],
        "pass_seconds": times,
        "parity": {"score_rel_diff": parity["score_rel_diff"], "map_rel_diff": parity["map_rel_diff"],
                   "score_abs_diff": parity["score_abs_diff"], "map_abs_diff": parity["map_abs_diff"],
                   "n_images": parity["n_images"]},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--n", type=int, default=40, help="normal training images of the demo category")
    ap.add_argument("--category", default="weave")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--batch", type=int, default=8, help="batch size of both engines")
    ap.add_argument("--repeats", type=int, default=5, help="timed passes per engine (after one warm-up)")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads of both engines (default: torch's, i.e. OMP_NUM_THREADS or the cores)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()

    import onnx
    import onnxruntime

    params = Params.load(args.params, profile="smoke")
    with tempfile.TemporaryDirectory(prefix="bench_export.") as tmp:
        work = Path(tmp)
        generate_demo(work / "demo", seed=params.seed, image_size=args.image_size, n_train=args.n,
                      categories=[args.category])
        data = scan_category(work / "demo", args.category)
        images = np.stack([load_image(s.path, args.image_size) for s in data.test]).transpose(0, 3, 1, 2).copy()
        results = {name: bench_method(name, params, data, work, images, args) for name in METHODS}
    report = {
        "what": "ONNX export (defectlab.export) vs torch on CPU: size, throughput, parity",
        "profile": "smoke", "category": args.category, "image_size": args.image_size, "n_train": args.n,
        "n_test_images": int(len(images)), "batch": args.batch, "repeats": args.repeats, "threads": args.threads,
        "timing": "median of interleaved full passes over the test images, one warm-up pass excluded; "
                  "onnxruntime intra-op spinning off",
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
                     "python": platform.python_version()},
        "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine()},
        "methods": results,
    }
    write_json(args.out, report)
    for name, r in results.items():
        print(f"{name}: {r['onnx_mb']:.1f} MB, ort {r['images_per_s']['onnxruntime']:.1f} img/s, "
              f"torch {r['images_per_s']['torch']:.1f} img/s, ratio {r['ratio_ort_over_torch']:.2f}, "
              f"parity score {r['parity']['score_rel_diff']:.1e} map {r['parity']['map_rel_diff']:.1e}")


if __name__ == "__main__":
    main()
