#!/usr/bin/env bash
# Peak RSS of fitting PatchCore on 1000 training images of 256x256 (WideResNet-50 layers 2+3,
# 1024-D patches, 1 % coreset: the PatchCore paper's setting; random weights offline).
# Usage: scripts/rss_1000.sh [workdir] [n_train] [image_size]   (defaults /tmp/defectlab-rss1000,
# 1000, 256: ~13 min on 2 CPU cores; a few images at 64 px make a quick check). Prints the metrics
# table and /usr/bin/time's "Maximum resident set size"; writes <workdir>/out/metrics.json.
set -euo pipefail
work=${1:-/tmp/defectlab-rss1000}
n_train=${2:-1000}
size=${3:-256}
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$work"
python - "$work" "$n_train" "$size" "$root/params.yaml" <<'PY'
import sys
from pathlib import Path

import yaml

from defectlab.data.demo import generate_demo

work, n_train, size = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
generate_demo(work / "data", image_size=size, n_train=n_train, n_test_good=10, n_test_per_defect=3, categories=["grain"])
p = yaml.safe_load(open(sys.argv[4]))
p["methods"]["patchcore"]["smoke"] = {"backbone": "wide_resnet50_2", "weights": "random", "layers": ["layer2", "layer3"],
                                      "embed_dim": 1024, "coreset_ratio": 0.01, "batch_size": 16}
yaml.safe_dump(p, open(work / "params.yaml", "w"), sort_keys=False)
PY
/usr/bin/time -v defectlab benchmark --method patchcore --root "$work/data" --category grain --out "$work/out" \
    --params "$work/params.yaml" --profile smoke --image-size "$size" 2>&1 | grep -v "it/s\]" | grep -E "│|Maximum resident|Elapsed|wrote"
