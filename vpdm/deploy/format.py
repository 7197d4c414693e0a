"""What an exported graph promises its runtimes: the format name and version in its metadata, the metadata
keys' prefix and the output names. Shared by the exporter (:mod:`vpdm.deploy.export`) and the inferencers that read
its files (:mod:`vpdm.deploy.runtimes`), so neither imports the other for them."""

from __future__ import annotations

from typing import Any

from vpdm.errors import VPDMError

ONNX_FORMAT = "vpdm.onnx"
ONNX_FORMAT_VERSION = 1
METADATA_PREFIX = "vpdm."
RAW_OUTPUT_NAMES: tuple[str, ...] = ("score", "anomaly_map")
OUTPUT_NAMES: tuple[str, ...] = ("score", "anomaly_map", "pred_score", "pred_label", "pred_mask", "class_index")


def require_package(module: str, extra: str = "export") -> Any:
    """Import ``module`` or say which extra installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise VPDMError(
            f"the export needs the package {module!r}, which is not installed: pip install 'vpdm[{extra}]'"
        ) from None
