"""Loading configs written by earlier versions: settings they predate, settings since retired."""

from __future__ import annotations

from typing import Any

from vpdm.errors import ConfigError

# Settings added after vpdm 0.1.0, with the value that reproduces how a model saved before they
# existed was built and scored. A saved config that lacks one of them gets this value, never the new
# default (which would rebuild a different model from the same weights).
LEGACY_VALUES: dict[str, Any] = {
    "backbone.resize": "bilinear",
    "model.prototypes.level": "image",
    "model.prototypes.init": "samples",
    "model.prototypes.kmeans_iters": 20,
    "model.prototypes.ot_scope": "batch",
    "model.prototypes.potential_lr": 0.1,
    "model.diffusion.prediction": "eps",
    "model.loss_weighting": "none",
    "model.min_snr_gamma": 5.0,
    "model.train_max_step": None,
    "model.input_copy": "none",
    "model.input_copy_strength": 0.2,
    "sampling.start_step": None,
    "scoring.distance": "l2",
    "scoring.per_stage": False,
    "scoring.feature_space": "normalised",
    "scoring.image_score": "max_pool",
    "scoring.top_k_percent": 1.0,
    "scoring.aggregate": 1,
    "scoring.pools": [1],
    "scoring.image_pools": None,
    "scoring.fine_pools": [],
    "scoring.fine_image_pools": None,
    "scoring.combine": "weighted",
    "model.fine": {"num_prototypes": 0},
    "model.prototypes.list_size": 0,
    "train.prototype_lr_scale": 1.0,
    "train.lr_schedule": "constant",
    "train.warmup_fraction": 0.0,
    "train.ema_decay": 0.0,
    "train.calibration_fraction": 0.0,  # trained on every train/good image: no held-out calibration images
}


# Settings retired because no measurement showed where they win (the record stays in
# benchmarks/EXPERIMENTS.md), with the one value the code still has. A saved config (an older checkpoint, a
# logged run) or a written one may name a retired setting at that value, and it is dropped; any other value
# is refused, naming the setting, for the code that gave it a meaning is gone.
RETIRED: dict[str, tuple[Any, str]] = {
    "model.feature_jitter": (
        0.0,
        "Gaussian jitter of the training features, never screened ahead of the default (EXPERIMENTS section 6)",
    ),
}


def drop_retired(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` (a nested config mapping) without its retired settings at their remaining value; a retired
    setting at another value is a :class:`ConfigError`."""
    import copy

    data = copy.deepcopy(data)
    for key, (kept, why) in RETIRED.items():
        *sections, name = key.split(".")
        node = data
        for section in sections:
            node = node.get(section) if isinstance(node, dict) else None
        if isinstance(node, dict) and name in node:
            if node[name] != kept:
                raise ConfigError(
                    f"{key}={node[name]!r}: this setting was retired ({why}); this vpdm only has {key}={kept!r}. "
                    "Train the model again without it, or score it with the vpdm version that wrote it"
                )
            del node[name]
    return data
