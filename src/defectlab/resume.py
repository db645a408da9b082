"""Resumable training checkpoints: scratch files in a stage's ``work_dir``.

A long training saves its state every few steps so that an interrupted stage picks up where it
stopped. A checkpoint must only ever be resumed by a run with the *same inputs*: its file name
carries a fingerprint of them (the training config, seed, image size, the training images, the
initial weights), so a changed setting, new images or a retrained backbone start over instead of
silently continuing another run. Checkpoints of other fingerprints under the same name are
removed on the first save, and the checkpoint itself once the training completes.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

log = logging.getLogger(__name__)


def fingerprint(*parts: Any) -> str:
    """A stable hash of configs (pydantic models), tensors and arrays, modules (their state),
    paths, numbers, strings and nested lists / dicts of them; anything else is refused."""
    h = hashlib.sha256()

    def feed(obj: Any) -> None:
        if isinstance(obj, torch.nn.Module):
            obj = obj.state_dict()
        if isinstance(obj, np.ndarray):
            obj = torch.from_numpy(obj)
        if isinstance(obj, torch.Tensor):
            t = obj.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif hasattr(obj, "model_dump"):
            feed(obj.model_dump(mode="json"))
        elif isinstance(obj, dict):
            h.update(b"{")
            for k in sorted(obj, key=str):
                h.update(json.dumps(str(k)).encode())
                feed(obj[k])
            h.update(b"}")
        elif isinstance(obj, (list, tuple)):
            h.update(b"[")
            for v in obj:
                feed(v)
            h.update(b"]")
        elif isinstance(obj, (int, float, str, bool, type(None), Path)):
            h.update(json.dumps(str(obj) if isinstance(obj, Path) else obj).encode())
        else:   # an arbitrary object's repr may hold its address: the key would change every run
            raise TypeError(f"fingerprint: cannot hash a {type(obj).__name__}")

    for part in parts:
        feed(part)
    return h.hexdigest()[:16]


def image_files(samples_or_paths: Iterable) -> list[list]:
    """The training images as (path, size in bytes): a changed, added or removed image changes it."""
    out = []
    for s in samples_or_paths:
        p = Path(getattr(s, "path", s))
        out.append([str(p), p.stat().st_size if p.exists() else -1])
    return sorted(out)


class Checkpoint:
    """``<work_dir>/<name>-<fingerprint(inputs)>.ckpt.pt``; everything a no-op without a work dir."""

    def __init__(self, work_dir: str | Path | None, name: str, *inputs: Any):
        self.name = name
        self.path = Path(work_dir) / f"{name}-{fingerprint(*inputs)}.ckpt.pt" if work_dir is not None else None

    def load(self, map_location: torch.device | str = "cpu") -> dict | None:
        """The saved state of a run with the same inputs, or None (none, or unreadable: start over)."""
        if self.path is None or not self.path.exists():
            return None
        try:
            state = torch.load(self.path, map_location=map_location, weights_only=True)
        except Exception as err:  # corrupt / truncated / foreign file
            log.warning("%s: ignoring unreadable checkpoint (%s: %s)", self.path, type(err).__name__, err)
            return None
        log.info("%s: resuming from %s", self.name, self.path)
        return state

    def save(self, state: dict) -> None:
        """Write atomically (a crash mid-write leaves the previous checkpoint); drop stale siblings."""
        if self.path is None:
            return
        from defectlab.io import atomic_path

        self.path.parent.mkdir(parents=True, exist_ok=True)
        for other in self.path.parent.glob(f"{self.name}-*.ckpt.pt"):
            if other != self.path and len(other.name) == len(self.path.name):
                other.unlink(missing_ok=True)          # another run's inputs: can never be resumed
        with atomic_path(self.path) as tmp:
            torch.save(state, tmp)

    def remove(self) -> None:
        """Training completed: the next run with these inputs must train, not resume a finished run."""
        if self.path is not None:
            self.path.unlink(missing_ok=True)
