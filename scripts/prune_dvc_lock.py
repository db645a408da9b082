"""Drop dvc.lock entries of stages that no longer exist in dvc.yaml.

DVC keeps a lock entry until its stage runs again, so renamed or regrouped stages (e.g. the old
per-category `fit@<m>-<ds>-<cat>`) stay in dvc.lock forever, and every `dvc repro` / `dvc status`
parses them: 60 stale entries of 102 made the no-op `dvc repro` ~1 s slower. Run from the project
root after changing the stage layout: `python scripts/prune_dvc_lock.py` (or `--root PROJECT`).
"""

import argparse
import contextlib
from pathlib import Path

from dvc.repo import Repo
from ruamel.yaml import YAML


def main(root: Path = Path(".")) -> list[str]:
    root = root.resolve()
    with contextlib.chdir(root), Repo(str(root)) as repo:    # addressing is relative to the cwd
        stages = {s.addressing for s in repo.index.stages}
    yaml = YAML()                     # round trip: keeps DVC's layout of the remaining entries
    lock_path = root / "dvc.lock"
    lock = yaml.load(lock_path.read_text())
    stale = [name for name in lock["stages"] if name not in stages]
    for name in stale:
        del lock["stages"][name]
    tmp = lock_path.with_suffix(".lock.tmp")
    with tmp.open("w") as f:
        yaml.dump(lock, f)
    tmp.replace(lock_path)
    return stale


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=Path("."), help="DVC project holding dvc.yaml and dvc.lock")
    args = ap.parse_args()
    if not (args.root / "dvc.lock").is_file():
        ap.error(f"{args.root / 'dvc.lock'}: no such file")
    removed = main(args.root)
    print(f"removed {len(removed)} stale dvc.lock entries" + (f": {', '.join(removed)}" if removed else ""))
