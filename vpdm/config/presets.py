"""Named settings: the paper's literal method and its Table 3 ablations, defined once for the command, the
benchmark and the sweeps."""

from __future__ import annotations

from typing import Any

# The paper's literal method as overrides: whole-image prototypes matched by batch OT, eps-prediction
# with the plain eps-MSE, the chain from N(yhat, I), L2 over all standardised channels, max of the
# average-pooled map. The sampler is the accelerated one (DDIM, 3 trailing steps, which matched the
# 1000-step chain on the benchmark subset); Algorithm 2 itself is sampling.sampler=ddpm, num_steps=1000.
# Every key is set explicitly, so the preset stays the paper whatever the defaults become.
PAPER: dict[str, Any] = {
    "backbone.image_size": 224,
    "backbone.resize": "bilinear",
    "model.prototypes.level": "image",
    "model.prototypes.num_prototypes": 50,
    "model.prototypes.downsample": 4,
    "model.prototypes.ot_reg": 0.05,
    "model.prototypes.assignment": "ot",
    "model.prototypes.init": "samples",
    "model.prototypes.ot_scope": "batch",
    "model.prototypes.list_size": 0,
    "model.prototypes.per_class": False,
    "model.prototypes.route": 0,
    "model.ot_weight": 1.0,
    "model.diffusion.schedule": "linear",
    "model.diffusion.num_timesteps": 1000,
    "model.diffusion.beta_start": 1e-4,
    "model.diffusion.beta_end": 0.02,
    "model.diffusion.shift_to_condition": True,
    "model.diffusion.prediction": "eps",
    "model.loss_weighting": "none",
    "model.train_max_step": None,
    "model.input_copy": "none",
    "sampling.sampler": "ddim",
    "sampling.num_steps": 3,
    "sampling.spacing": "trailing",
    "sampling.start_step": None,
    "scoring.distance": "l2",
    "scoring.feature_space": "normalised",
    "scoring.image_score": "max_pool",
    "scoring.blur_sigma": 4.0,
    "scoring.pool_size": 16,
    "scoring.aggregate": 1,
    "scoring.pools": [1],
    "scoring.image_pools": None,
    "scoring.fine_pools": [],
    "scoring.fine_image_pools": None,
    "scoring.combine": "weighted",
    "model.fine.num_prototypes": 0,
    "model.fine.per_class": False,
    "model.fine.route": 0,
    "train.lr": 1e-3,
    "train.batch_size": 32,
    "train.prototype_lr_scale": 1.0,
}
PRESETS: dict[str, dict[str, Any]] = {"paper": PAPER}

# The paper's Table 3 ablations, each as what it pins on top of a model: name -> (description, overrides).
# The benchmark trains them on the paper's settings (``paper-<name>``), a sweep pins one (``--ablation``).
ABLATIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "full": ("the complete model (nothing pinned)", {}),
    "no-vague": ("no vague (low-pass) step: N = 1", {"model.prototypes.downsample": 1}),
    "nearest": ("prototypes without OT: nearest-prototype assignment", {"model.prototypes.assignment": "nearest"}),
    "no-ot-loss": ("OT assignment without the OT loss: lambda_OT = 0", {"model.ot_weight": 0.0}),
    "ddpm-start": (
        "standard DDPM start x_T ~ N(0, I), no shift towards the condition",
        {"model.diffusion.shift_to_condition": False},
    ),
}
