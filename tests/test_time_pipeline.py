"""scripts/time_pipeline.py: per-stage wall time from DVC's output lines."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_stage_times_come_from_dvc_lines(tmp_path):
    fake_dvc = ("import time\n"
                "print(\"Stage 'prepare@demo' didn't change, skipping\", flush=True)\n"
                "print(\"Running stage 'fit@padim-demo':\", flush=True); time.sleep(0.6)\n"
                "print('> python stages/fit.py', flush=True); time.sleep(0.6)\n"
                "print(\"Running stage 'report':\", flush=True); time.sleep(0.1)\n")
    out = tmp_path / "t.json"
    subprocess.run([sys.executable, str(ROOT / "scripts/time_pipeline.py"), "--out", str(out), "--startup-repeat", "0",
                    "--", sys.executable, "-c", fake_dvc], check=True, capture_output=True, text=True)
    res = json.loads(out.read_text())
    rows = {r["stage"]: r for r in res["stages"]}
    assert rows["prepare@demo"]["status"] != "ran" and res["stages_run"] == 2
    # the fit stage spans both sleeps (1.2 s), up to the next stage line; report only its own tail
    assert 1.1 < rows["fit@padim-demo"]["seconds"] < 2.5
    assert rows["report"]["seconds"] < 1.0
    assert "| fit | 1 |" in out.with_suffix(".md").read_text()


def test_a_failing_command_writes_nothing(tmp_path):
    out = tmp_path / "t.json"
    r = subprocess.run([sys.executable, str(ROOT / "scripts/time_pipeline.py"), "--out", str(out), "--startup-repeat",
                        "0", "--", sys.executable, "-c", "raise SystemExit(3)"], capture_output=True, text=True)
    assert r.returncode == 3 and not out.exists()
