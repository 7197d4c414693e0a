"""VPDM: Vague Prototype-Oriented Diffusion Model for multi-class anomaly detection (ICML 2024).

A plain PyTorch library: no Ray, no MLflow. Distributed training and tracking live in ``tune/``
and ``jobs/``, which build on this package. The packages, from the bottom up: ``runtime`` (devices,
precision), ``features`` (backbone, weights, cache), ``data``, ``model`` (VPOT, diffusion, denoiser,
scoring), ``config``, ``training``, ``evaluation``, ``decision`` (thresholds, calibration),
``inference`` (the Detector, checkpoints), ``deploy`` (ONNX / OpenVINO), ``cli`` and ``bench``.

The public API below is importable from ``vpdm`` itself; each name is loaded on first use, so
``import vpdm`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

from vpdm.errors import CheckpointError, ConfigError, DataError, VPDMError

__version__ = "0.1.0"

# name -> the module that defines it
_PUBLIC: dict[str, str] = {
    "VPDMConfig": "vpdm.config.schema",
    "load_config": "vpdm.config.schema",
    "save_config": "vpdm.config.schema",
    "PRESETS": "vpdm.config.presets",
    "AnomalyDataset": "vpdm.data.dataset",
    "list_samples": "vpdm.data.layouts",
    "make_demo_dataset": "vpdm.data.demo",
    "FeatureExtractor": "vpdm.features.backbone",
    "extract_features": "vpdm.features.cache",
    "VPDM": "vpdm.model.vpdm_model",
    "load_split": "vpdm.training.engine",
    "fit": "vpdm.training.engine",
    "evaluate": "vpdm.evaluation.evaluator",
    "format_metrics": "vpdm.evaluation.evaluator",
    "compute_metrics": "vpdm.evaluation.metrics",
    "PostProcessor": "vpdm.decision.postprocess",
    "Calibration": "vpdm.decision.postprocess",
    "calibrate": "vpdm.decision.calibration",
    "Detector": "vpdm.inference.detector",
    "load_checkpoint": "vpdm.inference.checkpoint",
    "save_checkpoint": "vpdm.inference.checkpoint",
    "export_onnx": "vpdm.deploy.export",
    "OnnxDetector": "vpdm.deploy.runtimes",
    "OpenVinoDetector": "vpdm.deploy.runtimes",
}

__all__ = ["VPDMError", "ConfigError", "DataError", "CheckpointError", "__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'vpdm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
