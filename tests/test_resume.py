"""Resumable training checkpoints: resumed only by a run with the same inputs."""

import logging

import pytest
import torch

from defectlab.config import StrictModel
from defectlab.resume import Checkpoint, fingerprint, image_files


class Cfg(StrictModel):
    lr: float = 1e-3
    iters: int = 10


def test_fingerprint_is_stable_and_sees_every_input(tmp_path):
    net = torch.nn.Linear(3, 2)
    img = tmp_path / "a.png"
    img.write_bytes(b"12345")
    base = (Cfg(), 0, 64, image_files([img]), net, {"b": [1, 2.5], "a": None})
    assert fingerprint(*base) == fingerprint(*base)
    assert fingerprint({"x": 1, "y": 2}) == fingerprint({"y": 2, "x": 1})           # key order is not an input
    changed = [
        (Cfg(lr=2e-3), *base[1:]),                                  # a setting
        (base[0], 1, *base[2:]),                                    # the seed
        (*base[:4], torch.nn.Linear(3, 2), base[5]),                # other initial weights
        (*base[:5], {"b": [1, 2.5], "a": 0}),                       # None vs 0
    ]
    assert len({fingerprint(*c) for c in changed} | {fingerprint(*base)}) == len(changed) + 1
    img.write_bytes(b"123456")                                      # the same image file, new content size
    assert fingerprint(*base[:3], image_files([img]), *base[4:]) != fingerprint(*base)
    assert fingerprint(torch.zeros(2, 2)) != fingerprint(torch.zeros(4)) != fingerprint(torch.zeros(4, dtype=torch.int32))
    with pytest.raises(TypeError, match="cannot hash a object"):
        fingerprint(object())                                       # a repr with an address is not stable


def test_checkpoint_round_trip_stale_siblings_and_removal(tmp_path, caplog):
    ck = Checkpoint(tmp_path, "train-x", Cfg(), 0)
    assert ck.load() is None
    ck.save({"step": 3, "w": torch.ones(2)})
    state = ck.load()
    assert state["step"] == 3 and torch.equal(state["w"], torch.ones(2))
    assert Checkpoint(tmp_path, "train-x", Cfg(lr=0.5), 0).load() is None             # other inputs: not resumed
    other = Checkpoint(tmp_path, "train-x", Cfg(lr=0.5), 0)
    other.save({"step": 1})
    assert [p.name for p in tmp_path.glob("*.ckpt.pt")] == [other.path.name]       # the stale one is gone
    keep = Checkpoint(tmp_path, "train-y", Cfg(), 0)                                # another training: kept
    keep.save({"step": 2})
    assert keep.path.exists() and other.path.exists()
    other.path.write_bytes(b"truncated")
    with caplog.at_level(logging.WARNING):
        assert other.load() is None
    assert "unreadable checkpoint" in caplog.text
    other.remove()
    keep.remove()
    assert not list(tmp_path.iterdir())


def test_without_a_work_dir_nothing_is_written(tmp_path):
    ck = Checkpoint(None, "train-x", Cfg())
    ck.save({"step": 1})
    assert ck.load() is None and ck.path is None
    ck.remove()
