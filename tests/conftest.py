"""Shared fixtures: a tiny demo dataset generated once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("DEFECTLAB_TRACKING", "off")   # unit tests don't write MLflow runs unless they opt in
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory) -> Path:
    """The demo dataset at 64 px with few images (all four categories)."""
    from defectlab.data.demo import generate_demo

    root = tmp_path_factory.mktemp("demo") / "demo"
    generate_demo(root, seed=0, image_size=64, n_train=16, n_test_good=6, n_test_per_defect=2)
    return root


@pytest.fixture(scope="session")
def small_demo(tmp_path_factory) -> Path:
    """The demo dataset at 96 px (more images): for detection-quality tests."""
    from defectlab.data.demo import generate_demo

    root = tmp_path_factory.mktemp("demo96") / "demo"
    generate_demo(root, seed=0, image_size=96, n_train=24, n_test_good=8, n_test_per_defect=3)
    return root
