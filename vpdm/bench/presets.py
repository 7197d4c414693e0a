"""Named model settings the benchmark trains side by side.

``default`` is the library's defaults; ``paper`` is the paper's literal method
(:data:`vpdm.config.PAPER`), and the ``paper-*`` presets are the paper's Table 3 ablations of it.
"""

from __future__ import annotations

from typing import Any

from vpdm.config import PAPER

PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "paper": dict(PAPER),
    "paper-no-vague": {**PAPER, "model.prototypes.downsample": 1},
    "paper-no-ot": {**PAPER, "model.prototypes.assignment": "nearest"},
    "paper-no-ot-loss": {**PAPER, "model.ot_weight": 0.0},
    "paper-ddpm-start": {**PAPER, "model.diffusion.shift_to_condition": False},
}
PRESET_DESCRIPTIONS = {
    "default": "this library's defaults",
    "paper": "the paper's literal method (whole-image prototypes, eps, N(yhat, I) start, L2 over all channels)",
    "paper-no-vague": "paper without the vague step (N=1: prototypes of the raw features)",
    "paper-no-ot": "paper with prototypes without OT (nearest prototype)",
    "paper-no-ot-loss": "paper with the OT assignment but no OT loss (lambda_OT=0)",
    "paper-ddpm-start": "paper with the standard DDPM start N(0, I) instead of N(yhat, I)",
}
# The presets --ablations trains: the paper and its Table 3 ablations.
ABLATIONS = ("paper", "paper-no-vague", "paper-no-ot", "paper-no-ot-loss", "paper-ddpm-start")
# MVTec-AD (15 classes) image / pixel AUROC of the paper's Table 3 rows these presets correspond to;
# for orientation only (other data, other backbone).
PAPER_TABLE3 = {
    "paper": (98.4, 97.8),
    "paper-no-vague": (96.5, 96.8),
    "paper-no-ot": (93.5, 94.1),
    "paper-no-ot-loss": (97.1, 96.9),
    "paper-ddpm-start": (76.7, 80.1),
}

