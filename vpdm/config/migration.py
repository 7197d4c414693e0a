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
    "model.diffusion.prediction": "eps",
    "model.loss_weighting": "none",
    "model.min_snr_gamma": 5.0,
    "model.train_max_step": None,
    "model.input_copy": "none",
    "model.input_copy_strength": 0.2,
    "sampling.start_step": None,
    "scoring.distance": "l2",
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
    "train.calibration_fraction": 0.0,  # trained on every train/good image: no held-out calibration images
    "model.prototypes.per_class": False,  # one K shared by every class
    "model.prototypes.route": 0,
    "model.fine.per_class": False,
    "model.fine.route": 0,
}


# Settings retired because no measurement showed where they win (the record stays in
# benchmarks/EXPERIMENTS.md), with the one value the code still has. A saved config (an older checkpoint, a
# logged run) or a written one may name a retired setting at that value, and it is dropped; any other value
# is refused, naming the setting, for the code that gave it a meaning is gone. ANY: dropped at any value, for
# it only meant something beside another retired setting's value that is refused.
ANY = object()
RETIRED: dict[str, tuple[Any, str]] = {
    "model.feature_jitter": (
        0.0,
        "Gaussian jitter of the training features, never screened ahead of the default (EXPERIMENTS section 6)",
    ),
    "train.lr_schedule": (
        "constant",
        "cosine learning-rate decay; EXPERIMENTS #73-#75: +0.13 image AUROC over three seeds, one seed worse, "
        "inside the seed spread",
    ),
    "train.warmup_fraction": (0.0, "linear learning-rate warm-up, measured with the cosine decay (#73)"),
    "train.ema_decay": (0.0, "an exponential moving average of the weights; EXPERIMENTS #77: +0.1 / 0.0 / 0.0"),
    "model.prototypes.potential_lr": (ANY, "the potential step of ot_scope=dataset, retired with it"),
    "scoring.per_stage": (
        False,
        "the distance within each backbone stage, averaged; EXPERIMENTS #3 and #76: 4-8 image AUROC points lost",
    ),
}
# Values retired from a setting that stays: refused by name, as above.
RETIRED_VALUES: dict[str, tuple[tuple[Any, ...], str]] = {
    "model.prototypes.ot_scope": (
        ("dataset",),
        "semi-discrete OT against the whole training set; EXPERIMENTS #27-#29: 92.9 against 93.7 without a "
        "balancing potential (ot_scope=none, the default) and the paper's batch OT stays",
    ),
}


def _refused(key: str, value: Any, kept: str, why: str) -> ConfigError:
    return ConfigError(
        f"{key}={value!r}: this setting was retired ({why}); this vpdm only has {kept}. "
        "Train the model again without it, or score it with the vpdm version that wrote it"
    )


def drop_retired(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` (a nested config mapping) without its retired settings at their remaining value; a retired
    setting or value at another value is a :class:`ConfigError`."""
    import copy

    data = copy.deepcopy(data)

    def parent(key: str) -> tuple[Any, str]:
        *sections, name = key.split(".")
        node = data
        for section in sections:
            node = node.get(section) if isinstance(node, dict) else None
        return node, name

    for key, (values, why) in RETIRED_VALUES.items():
        node, name = parent(key)
        if isinstance(node, dict) and node.get(name) in values:
            raise _refused(key, node[name], f"{key} other than {', '.join(map(repr, values))}", why)
    for key, (kept, why) in RETIRED.items():
        node, name = parent(key)
        if isinstance(node, dict) and name in node:
            if kept is not ANY and node[name] != kept:
                raise _refused(key, node[name], f"{key}={kept!r}", why)
            del node[name]
    return data
