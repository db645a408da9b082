"""DSR stage 1 codebook health: the profile's stage-1 settings trained on the demo data with and
without dead-code restarts (``dead_code_threshold``), reporting per codebook the share of codes
used and the perplexity (last 10 % of the steps, and on 64 general images after training), the
share of live codes Sec. 3.6 may sample (``live_code_share``), and the share of Sec. 3.6 draws
that are dead codes when every code may be drawn (originals drawn by stage-1 usage, λ_s = 0.05).

    OMP_NUM_THREADS=1 python scripts/dsr_codebooks.py --profile smoke          # ~2 x 1 min on one core
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from defectlab.bench import parse_overrides
from defectlab.config import Params, validate
from defectlab.data.demo import CATEGORIES, generate_demo
from defectlab.methods.base import PretrainContext
from defectlab.methods.dsr import DSR, DSRConfig, codebook_neighbours, live_codes, sample_near_codes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=Path("/tmp/dsr_codebooks_demo"), help="demo data (generated if missing)")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--profile", default="smoke")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-train", type=int, default=40, help="normal images per category of the generated demo")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override methods.dsr")
    args = ap.parse_args()

    if not args.root.exists():
        generate_demo(args.root, seed=0, image_size=args.image_size, n_train=args.n_train, n_test_good=2,
                      n_test_per_defect=1)
    raw = Params.load(args.params, profile=args.profile).profiled("methods", "dsr")
    base = validate(DSRConfig, {**raw, **parse_overrides(args.set)}, f"{args.params}: methods.dsr ({args.profile})")
    rows = {}
    for name, threshold in ((f"restarts ({base.dead_code_threshold})", base.dead_code_threshold),
                            ("no restarts (Eq. 2 only)", 0.0)):
        cfg = base.model_copy(update={"dead_code_threshold": threshold})
        with tempfile.TemporaryDirectory() as out:
            stats = DSR.pretrain(cfg, PretrainContext(dataset="demo", data_root=args.root, categories=list(CATEGORIES),
                                                      out_dir=Path(out), image_size=args.image_size, seed=args.seed,
                                                      device=torch.device("cpu"), progress=False))
            tensors = load_file(str(Path(out) / "vq.safetensors"))
        row = {}
        for level in ("lo", "hi"):
            row[f"batch usage {level}"] = stats[f"stage1_usage_{level}"]
            row[f"batch perplexity {level}"] = stats[f"stage1_perplexity_{level}"]
            row[f"eval usage {level}"] = stats[f"codebook_usage_{level}"]
            row[f"eval perplexity {level}"] = stats[f"codebook_perplexity_{level}"]
            usage, codebook = tensors[f"vq_{level}.usage"], tensors[f"vq_{level}.codebook"]
            live = live_codes(usage, cfg.live_code_share)
            row[f"live {level}"] = float(live.float().mean())
            originals = torch.multinomial(usage / usage.sum(), 64 * 16 * 16, replacement=True,
                                          generator=torch.Generator().manual_seed(0)).view(64, 16, 16)
            drawn, _, _ = sample_near_codes(originals, codebook_neighbours(codebook), cfg.lambda_s,
                                            torch.Generator().manual_seed(1))
            row[f"dead draws {level} (all codes)"] = float((~live[drawn]).float().mean())
        rows[name] = row
        print(name, json.dumps({k: round(v, 3) for k, v in row.items()}), flush=True)
    keys = list(next(iter(rows.values())))
    print(f"\nK = {base.codebook_size}, codebook_update: {base.codebook_update}, live_code_share: {base.live_code_share}\n")
    print("| stage 1 | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(f"{row[k]:.3g}" for k in keys) + " |")


if __name__ == "__main__":
    main()
