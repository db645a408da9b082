"""The project's working state as DVC describes it, saved before a retrain touches it and put back
byte-identical when the challenger is refused or the retrain dies half-way.

What a retrain can change: ``dvc.lock``, every cached stage output (restored by ``dvc checkout``
from the DVC cache, which still holds the champion's files), the outputs DVC does not cache
(``metrics/``, ``plots/``, ``reports/results.*``: copied into the snapshot), the accepted-images
archive ``<accepted_dir>/<ds>/<cat>/`` (the new batch is moved out of it) and the registry (a
refused or orphaned version keeps its files and gets a ``decision`` tag; the ``champion`` alias
only ever moves after a finished decision).

A retrain keeps a **journal** (``.dvc/tmp/defectlab-retrain/<ds>/journal.json``, written
atomically) of the step it reached, the batch and the snapshot. A retrain that starts and finds a
journal finishes or undoes the interrupted one first (``recover`` in pipelines/retrain.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from defectlab.io import write_json
from pipelines.common import in_dir, run_dvc


def journal_dir(root: Path, dataset: str) -> Path:
    return Path(root) / ".dvc" / "tmp" / "defectlab-retrain" / dataset


def read_journal(root: Path, dataset: str) -> dict | None:
    path = journal_dir(root, dataset) / "journal.json"
    return json.loads(path.read_text()) if path.exists() else None


def write_journal(root: Path, dataset: str, journal: dict) -> None:
    write_json(journal_dir(root, dataset) / "journal.json", journal)


def clear_journal(root: Path, dataset: str) -> None:
    shutil.rmtree(journal_dir(root, dataset), ignore_errors=True)


def uncached_outputs(root: Path) -> list[Path]:
    """Outputs, metrics and plots declared ``cache: false`` (dvc checkout cannot restore them)."""
    from dvc.repo import Repo

    with in_dir(Path(root)), Repo(str(root)) as repo:
        return sorted({Path(out.fs_path).relative_to(Path(root).resolve()) for stage in repo.index.stages
                       for out in stage.outs if not out.use_cache})


def _copy(src: Path, dst: Path) -> None:
    if src.is_dir():
        shutil.copytree(src, dst, symlinks=True)
    elif src.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)


def snapshot(root: Path, dataset: str) -> Path:
    """Save dvc.lock and the uncached outputs under the journal folder; returns the snapshot folder.
    Built in a temporary folder and renamed, so a half-written snapshot is never used."""
    root = Path(root)
    snap = journal_dir(root, dataset) / "snapshot"
    tmp = snap.with_name(".snapshot.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _copy(root / "dvc.lock", tmp / "dvc.lock")
    listed = []
    for rel in uncached_outputs(root):
        if (root / rel).exists():
            _copy(root / rel, tmp / "outs" / rel)
        listed.append(str(rel))
    write_json(tmp / "uncached.json", listed)
    shutil.rmtree(snap, ignore_errors=True)
    tmp.rename(snap)
    return snap


def restore(root: Path, dataset: str) -> str:
    """Put dvc.lock, every cached output and the uncached outputs back as the snapshot has them."""
    root = Path(root)
    snap = journal_dir(root, dataset) / "snapshot"
    shutil.copy2(snap / "dvc.lock", root / "dvc.lock")
    out = run_dvc(["checkout", "--force", "--relink"], root)
    for rel in json.loads((snap / "uncached.json").read_text()):
        target, saved = root / rel, snap / "outs" / rel
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        _copy(saved, target)
    return out
