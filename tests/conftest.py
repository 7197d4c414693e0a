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
    from vpdm.data.demo import make_demo_dataset

    root = tmp_path_factory.mktemp("tiny-demo")
    make_demo_dataset(root, classes=2, train_per_class=8, test_good_per_class=3, test_defect_per_class=3, size=64)
    return root


def sqlite_mlflow_store(root: Path, experiment: str):
    """Generator for a module fixture: a fresh sqlite tracking + registry store under ``root`` with its
    own artifact root and one experiment; yields {uri, experiment_id, root} and restores the old URIs."""
    import mlflow

    uri = f"sqlite:///{root / 'mlflow.db'}"
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.environ.pop("MLFLOW_REGISTRY_URI", None)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    experiment_id = mlflow.create_experiment(experiment, artifact_location=(root / "artifacts").as_uri())
    yield {"uri": uri, "experiment_id": experiment_id, "root": root}
    mlflow.set_tracking_uri(saved["MLFLOW_TRACKING_URI"])  # None: back to MLflow's default
    mlflow.set_registry_uri(saved["MLFLOW_REGISTRY_URI"])
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def train_checkpoint(data: Path, tmp_path_factory, settings: list[str], epochs: int = 1) -> Path:
    """``vpdm train`` on ``data`` (a demo folder) with its own run folder and feature cache; the model.pt."""
    from vpdm.cli.commands import main

    out = tmp_path_factory.mktemp("run")
    code = main(
        [
            "train",
            "--data",
            f"demo:{data}",
            "--output",
            str(out),
            "--epochs",
            str(epochs),
            "--no-progress",
            "--set",
            f"data.cache_dir={tmp_path_factory.mktemp('cache')}",
            *settings,
        ]
    )
    assert code == 0
    return out / "model.pt"
