"""VPDM: Vague Prototype-Oriented Diffusion Model for multi-class anomaly detection (ICML 2024).

A plain PyTorch library: no Ray, no MLflow. Distributed training and tracking live in ``tune/``
and ``jobs/``, which build on this package.
"""

from vpdm.errors import CheckpointError, ConfigError, DataError, VPDMError

__version__ = "0.1.0"

__all__ = ["VPDMError", "ConfigError", "DataError", "CheckpointError", "__version__"]
