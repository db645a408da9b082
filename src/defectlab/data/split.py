"""The validation split: normal images held out of fitting, for thresholds and calibration.

A category with a ``validation/good`` folder (MVTec LOCO, or a user's folder) keeps it. Otherwise
``hold_out_validation`` moves ``k = max(min_n, ceil(fraction * n))`` of the ``n`` images of
``train/good`` to ``validation`` (but leaves at least ``max(2, n // 2)`` for training; fraction 0
moves none). Which ones: the first ``k`` by ``sha256(f"{seed}:{file name}")``, so the split
depends only on the names (not on file order, platform or content) and adding one image to
``train/good`` changes at most one existing assignment besides the new image's own: k grows by
at most one, and the ranking of the existing names does not move.

Once a category is prepared its split is part of the data version (the ``split`` column of its
manifest): ``extend_split`` keeps every recorded assignment and only places the images added
since (a retrain's batch), filling the validation share from them. An image a model was fitted on
never moves to validation, so a memory bank can be extended without leaking into calibration.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from pathlib import Path

from defectlab.data.mvtec import CategoryData, Sample


def _rank(seed: int, sample: Sample) -> str:
    return hashlib.sha256(f"{seed}:{sample.path.name}".encode()).hexdigest()


def n_held_out(n: int, fraction: float, min_n: int) -> int:
    """How many of ``n`` training images go to validation."""
    if fraction <= 0 or n == 0:
        return 0
    return max(0, min(max(min_n, math.ceil(fraction * n)), n - max(2, n // 2)))


def hold_out_validation(data: CategoryData, fraction: float, min_n: int, seed: int) -> CategoryData:
    """``data`` with the held-out images moved from ``train`` to ``validation`` (both keep the
    file order); unchanged when ``data.validation`` is non-empty or nothing is held out."""
    if data.validation:
        return data
    k = n_held_out(len(data.train), fraction, min_n)
    if k == 0:
        return data
    held = set(sorted(data.train, key=lambda s: _rank(seed, s))[:k])
    return dataclasses.replace(data, train=[s for s in data.train if s not in held],
                               validation=[s for s in data.train if s in held])


def extend_split(data: CategoryData, assigned: dict[Path, str], fraction: float, min_n: int, seed: int) -> CategoryData:
    """``data`` split with the recorded ``assigned`` sides (path -> "train" | "validation") kept; the
    images of ``train/good`` not in it (new) go to validation, by the same ranking, until it holds
    ``n_held_out`` of all, and to train otherwise. When that share cannot be reached so (the
    fraction changed since the split was recorded), the split is made afresh
    (``hold_out_validation``). Unchanged when ``data.validation`` is non-empty."""
    if data.validation:
        return data
    new = [s for s in data.train if s.path not in assigned]
    n_val = sum(1 for s in data.train if assigned.get(s.path) == "validation")
    target = n_held_out(len(data.train), fraction, min_n)
    if not n_val <= target <= n_val + len(new):
        return hold_out_validation(data, fraction, min_n, seed)
    held = set(sorted(new, key=lambda s: _rank(seed, s))[:target - n_val])
    validation = [s for s in data.train if assigned.get(s.path) == "validation" or s in held]
    return dataclasses.replace(data, train=[s for s in data.train if s not in set(validation)], validation=validation)
