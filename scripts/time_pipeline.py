"""Where the pipeline's wall time goes: run `dvc repro` (or any command printing DVC's stage lines),
time every stage from DVC's own output, and set the per-process start-up cost beside it.

    python scripts/time_pipeline.py --out reports/pipeline_time.json            # runs `dvc repro`
    python scripts/time_pipeline.py --out /tmp/t.json -- dvc repro --force report   # another command

A stage's time runs from DVC's ``Running stage '<name>':`` line to the next stage line (or the
command's end), so it includes DVC's own bookkeeping (hashing and caching the outputs). The
start-up cost is measured once, in fresh interpreters, as the import of what every stage process
imports before it works (torch + torchvision, MLflow, defectlab.pipeline); ``startup_share`` is
that cost times the number of stages run, over the total. Writes the JSON and a Markdown table
beside it (stages grouped by kind: prepare, train, fit, ...), and prints the table.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

STAGE_LINE = re.compile(r"^(Running stage|Stage) '([^']+)'(.*)$")
STARTUP_IMPORTS = "import torch, torchvision, mlflow, defectlab.pipeline"


def startup_seconds(python: str, repeat: int = 3) -> float:
    """Median wall time of a fresh interpreter importing what a stage process imports."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run([python, "-c", STARTUP_IMPORTS], check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def parse(lines: list[tuple[float, str]], end: float) -> list[dict]:
    """``(timestamp, line)`` pairs of DVC's output -> one row per stage DVC ran or skipped."""
    events = []
    for t, line in lines:
        m = STAGE_LINE.match(line.strip())
        if m:
            ran = m.group(1) == "Running stage"
            events.append({"stage": m.group(2), "ran": ran, "t": t,
                           "status": "ran" if ran else m.group(3).strip(" .-:") or "skipped"})
    rows = []
    for i, ev in enumerate(events):
        nxt = events[i + 1]["t"] if i + 1 < len(events) else end
        rows.append({"stage": ev["stage"], "status": ev["status"], "seconds": round(nxt - ev["t"], 2)})
    return rows


def table(result: dict) -> str:
    by_kind: dict[str, list[float]] = defaultdict(list)
    for r in result["stages"]:
        if r["status"] == "ran":
            by_kind[r["stage"].split("@")[0]].append(r["seconds"])
    out = [f"`{result['command']}`: {result['total_seconds']:.0f} s, {result['stages_run']} stages run; "
           f"start-up per stage process (`{STARTUP_IMPORTS}`, fresh interpreter) "
           f"{result['startup_seconds']:.1f} s, x {result['stages_run']} = "
           f"{100 * result['startup_share']:.0f} % of the total", "",
           "| stage kind | stages | seconds | share | slowest |", "|---|---:|---:|---:|---|"]
    total = result["total_seconds"] or 1.0
    slow = {}
    for r in result["stages"]:
        k = r["stage"].split("@")[0]
        if r["status"] == "ran" and r["seconds"] >= slow.get(k, {"seconds": -1})["seconds"]:
            slow[k] = r
    for kind, secs in sorted(by_kind.items(), key=lambda kv: -sum(kv[1])):
        out.append(f"| {kind} | {len(secs)} | {sum(secs):.0f} | {100 * sum(secs) / total:.0f} % | "
                   f"{slow[kind]['stage']} ({slow[kind]['seconds']:.0f} s) |")
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("reports/pipeline_time.json"))
    ap.add_argument("--python", default=sys.executable, help="interpreter the stages run with (start-up timing)")
    ap.add_argument("--startup-repeat", type=int, default=3, help="fresh interpreters timed for the start-up "
                    "cost (0: not measured)")
    ap.add_argument("command", nargs="*", default=["dvc", "repro"])
    args = ap.parse_args()

    t0 = time.perf_counter()
    lines: list[tuple[float, str]] = []
    proc = subprocess.Popen(args.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    for line in proc.stdout:
        lines.append((time.perf_counter() - t0, line))
        sys.stdout.write(line)
    rc = proc.wait()
    end = time.perf_counter() - t0
    if rc != 0:
        print(f"time_pipeline: {' '.join(args.command)} failed with exit status {rc}", file=sys.stderr)
        return rc
    stages = parse(lines, end)
    n_run = sum(r["status"] == "ran" for r in stages)
    startup = startup_seconds(args.python, args.startup_repeat) if args.startup_repeat > 0 else 0.0
    result = {"command": " ".join(args.command), "total_seconds": round(end, 1), "stages_run": n_run,
              "startup_seconds": round(startup, 2), "startup_share": round(startup * n_run / end, 3) if end else 0.0,
              "stages": stages}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(args.out)
    md = table(result)
    args.out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
