"""Shared test fixtures.

The real images live outside the project (non-commercial licence): by default in ``../shared/data``
next to the repository, or wherever ``VPDM_TEST_DATA`` points.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_root() -> Path:
    return Path(os.environ.get("VPDM_TEST_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    root = shared_data_root()
    if not (root / "mvtec_ad" / "bottle").is_dir():
        pytest.skip(f"real test data not found at {root}; set VPDM_TEST_DATA")
    return root


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory) -> Path:
    """A tiny synthetic set (2 classes, 8 train / 6 test images each, 64 px) for end-to-end tests. Read-only."""
    from vpdm.data import make_demo_dataset

    root = tmp_path_factory.mktemp("tiny-demo")
    make_demo_dataset(root, classes=2, train_per_class=8, test_good_per_class=3, test_defect_per_class=3, size=64)
    return root
