"""The VPDM model on backbone features: vague prototypes + shifted conditional diffusion.

Works on feature maps (B x C x S x S), not images: the frozen backbone lives in ``backbone`` and
the whole image-to-score path in ``pipeline``. ``forward`` returns the training losses so the
model can be wrapped in DistributedDataParallel as it is.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vpdm.errors import ConfigError
from vpdm.model.config import ModelConfig, SamplingConfig
from vpdm.model.denoiser import Denoiser
from vpdm.model.diffusion import NoiseSource, SharedNoise, ShiftedDiffusion
from vpdm.model.scoring import (
    DISTANCES,
    FEATURE_SPACES,
    STAT_POOLS,
    ScoringConfig,
    TermMaps,
    distance_map,
    scores_and_maps,
)
from vpdm.model.vpot import VaguePrototypes, unvague
from vpdm.runtime.precision import autocast

# Buffers added after the first checkpoints: a checkpoint without them gets these (a model saved before
# had no short lists, no fine prototypes, no term statistics and no map weights).
ADDED_BUFFERS: tuple[str, ...] = (
    "prototypes.list_centroids",
    "prototypes.list_offsets",
    "prototypes.list_of",
    "prototypes.owner",
    "term_mean",
    "term_std",
    "term_settings",
    "map_weight",
)
# The training images' fit of the term statistics, kept beside the statistics a calibration moved
# (:meth:`VPDM.refit_statistics`); a checkpoint written before it had only the one fit: the statistics themselves.
TRAINING_FIT_BUFFERS: dict[str, str] = {"train_term_mean": "term_mean", "train_term_std": "term_std"}


class VPDM(nn.Module):
    def __init__(
        self,
        channels: int,
        feature_size: int,
        config: ModelConfig | None = None,
    ):
        super().__init__()
        config = config or ModelConfig()
        config.validate(feature_size)
        self.config = config
        self.channels = channels
        self.feature_size = feature_size
        self.prototypes = VaguePrototypes(config.prototypes, channels, feature_size)
        # Fine prototypes (model.fine): every position matched on its own, compared with the features
        # directly; never trained (chosen from the training positions, then fixed).
        self.fine: VaguePrototypes | None = None
        if config.fine.num_prototypes:
            self.fine = VaguePrototypes(config.fine.prototypes_config(), channels, feature_size)
            self.fine.prototypes.requires_grad_(False)
        self.denoiser = Denoiser(channels, config.denoiser, extra_inputs=int(config.input_copy != "none"))
        self.diffusion = ShiftedDiffusion(config.diffusion)
        self.register_buffer("feature_mean", torch.zeros(1, channels, 1, 1))
        self.register_buffer("feature_std", torch.ones(1, channels, 1, 1))
        # Normal statistics of every score term (scoring.combine=standardised): mean and std of the term's
        # values on normal training images, one row per class (one row when the model cannot tell classes
        # apart), a column per (branch, block side) of ``stat_terms``; no rows until fitted.
        self.stat_terms: list[tuple[str, int]] = [
            (branch, p)
            for branch in ("coarse", "fine")
            if branch == "coarse" or self.fine is not None
            for p in STAT_POOLS
            if feature_size % p == 0
        ]
        self.register_buffer("term_mean", torch.zeros(0, len(self.stat_terms)))
        self.register_buffer("term_std", torch.ones(0, len(self.stat_terms)))
        # The same statistics as fitted on the training images, from which a calibration on unseen normal images
        # moves them (:meth:`refit_statistics`; a second calibration starts again from here).
        self.register_buffer("train_term_mean", torch.zeros(0, len(self.stat_terms)))
        self.register_buffer("train_term_std", torch.ones(0, len(self.stat_terms)))
        # The scoring settings the statistics hold for: distance, 0 (the retired scoring.per_stage's place),
        # feature_space, aggregate.
        self.register_buffer("term_settings", torch.zeros(4, dtype=torch.long))
        # The weight of the reconstruction's (coarse) terms in the map, per row of the term statistics, the fine
        # terms taking the rest: map = w * mean(coarse z) + (1 - w) * mean(fine z). Empty (the default) = the
        # plain mean of all map terms. Chosen per class on labelled defects (`vpdm calibrate --val-data` with
        # calibration.choose_map_weights): a class's real defects say which term finds them (EXPERIMENTS #136).
        self.register_buffer("map_weight", torch.zeros(0))

    # -- set-up from training data -------------------------------------------------------------
    @torch.no_grad()
    def fit_normalisation(self, features: Tensor) -> None:
        """Per-channel mean/std of the training features (see ``ModelConfig.feature_norm``)."""
        if self.config.feature_norm == "channel":
            self.feature_mean.copy_(features.mean(dim=(0, 2, 3), keepdim=True))
            self.feature_std.copy_(features.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6))

    @torch.no_grad()
    def init_prototypes(
        self, features: Tensor, generator: torch.Generator | None = None, class_index: Tensor | None = None
    ) -> None:
        """Prototypes from the training features; ``class_index`` (one class per image) also tells the fine
        prototypes which class each stands for, so that an image's class can be told from its matches."""
        coarse_classes = class_index if self.prototypes.config.by_class else None  # its budget is per class
        self.prototypes.init_from(features, generator, coarse_classes, transform=self.normalise)
        if self.fine is not None:
            self.fine.init_from(features, generator, class_index, transform=self.normalise)

    def resize_statistics(self, classes: int) -> None:
        """Make room for the term statistics of ``classes`` rows (before fitting or loading them)."""
        self.term_mean = self.term_mean.new_zeros(classes, len(self.stat_terms))
        self.term_std = self.term_std.new_ones(classes, len(self.stat_terms))
        self.train_term_mean = self.term_mean.clone()
        self.train_term_std = self.term_std.clone()

    @staticmethod
    def _settings_key(scoring: ScoringConfig) -> list[int]:
        return [
            DISTANCES.index(scoring.distance),
            0,
            FEATURE_SPACES.index(scoring.feature_space),
            int(scoring.aggregate),
        ]

    @property
    def statistics_by_class(self) -> bool:
        """Whether the term statistics have a row per class: only when the fine prototypes know the classes (an
        image's class is told by its matches), else one row for all."""
        return self.fine is not None and bool((self.fine.owner >= 0).any())

    @torch.no_grad()
    def fit_statistics(
        self,
        features: Tensor,
        class_index: Tensor,
        sampling: SamplingConfig,
        scoring: ScoringConfig,
        per_class: int = 64,
        batch_size: int = 32,
    ) -> None:
        """Mean and std of every score term (:attr:`stat_terms`) over all positions of up to ``per_class``
        normal training images of each class (evenly spaced in the class's list), for
        ``scoring.combine=standardised``. One row per class when the fine prototypes know the classes,
        else one row for all. Also kept as the training fit that :meth:`refit_statistics` starts from."""
        by_class = self.statistics_by_class
        classes = int(class_index.max()) + 1 if by_class else 1
        self.resize_statistics(classes)
        for c in range(classes):
            members = torch.nonzero(class_index == c).flatten() if by_class else torch.arange(len(features))
            if members.numel() == 0:
                continue
            self.term_mean[c], self.term_std[c] = self._term_moments(
                features, members, sampling, scoring, per_class, batch_size
            )
        self.train_term_mean.copy_(self.term_mean)
        self.train_term_std.copy_(self.term_std)
        self.term_settings.copy_(torch.tensor(self._settings_key(scoring)))
        self.map_weight = self.map_weight.new_zeros(0)  # weights chosen on other statistics no longer hold

    @torch.no_grad()
    def refit_statistics(
        self,
        features: Tensor,
        rows: Tensor,
        sampling: SamplingConfig,
        scoring: ScoringConfig,
        weight: float,
        per_class: int = 64,
        batch_size: int = 32,
    ) -> list[int]:
        """Move each row's term statistics ``weight`` of the way from the training images' fit to that of these
        normal images the model never saw (``rows``: the statistics row of each image, -1 for none), mean and std
        alike; rows without images keep theirs. Returns the rows moved.

        On unseen normal images the terms do not spread as on the training images (the coarse term 1.2-1.9x
        wider, the fine one 0.7-1.0x), so the map weighs its terms otherwise than the statistics meant
        (EXPERIMENTS #148); halfway (0.5) shrinks a small calibration set's noise towards the training fit
        (#149). Always from the training fit: calibrating again on the same images gives the same statistics.
        """
        if not 0 <= weight <= 1:
            raise ConfigError(f"the statistics' weight must lie in [0, 1], got {weight!r}")
        if self.term_mean.shape[0] == 0:
            raise ConfigError("this model has no term statistics to refit (it scores with scoring.combine=weighted)")
        self._statistics(None, scoring)  # the settings they were fitted with: named if they differ
        if len(rows) != len(features):
            raise ConfigError(f"{len(features)} images but {len(rows)} statistics rows")
        moved = [int(r) for r in torch.unique(rows) if 0 <= int(r) < self.term_mean.shape[0]]
        for r in moved:
            if weight == 0:  # the training fit, without a pass over the images
                self.term_mean[r], self.term_std[r] = self.train_term_mean[r], self.train_term_std[r]
                continue
            members = torch.nonzero(rows == r).flatten()
            mean, std = self._term_moments(features, members, sampling, scoring, per_class, batch_size)
            self.term_mean[r] = (1 - weight) * self.train_term_mean[r] + weight * mean
            self.term_std[r] = (1 - weight) * self.train_term_std[r] + weight * std
        return moved

    def _term_moments(
        self,
        features: Tensor,
        members: Tensor,
        sampling: SamplingConfig,
        scoring: ScoringConfig,
        per_class: int,
        batch_size: int,
    ) -> tuple[Tensor, Tensor]:
        """Mean and std of every term over all positions of up to ``per_class`` of the images ``members``
        (evenly spaced in their list)."""
        device = self.feature_mean.device
        pick = members[torch.linspace(0, members.numel() - 1, min(per_class, members.numel())).round().long()]
        total = torch.zeros(len(self.stat_terms), dtype=torch.float64, device=device)
        squares = torch.zeros_like(total)
        count = 0
        for s in range(0, len(pick), batch_size):
            f = features[pick[s : s + batch_size]].to(device)
            fine = self.fine_condition(f, with_class=False)[0]
            terms = self._term_maps(f, self.reconstruct(f, sampling), fine, scoring)
            stacked = torch.stack(terms, dim=1).double()  # B x terms x H x W
            total += stacked.sum(dim=(0, 2, 3))
            squares += stacked.pow(2).sum(dim=(0, 2, 3))
            count += stacked.shape[0] * stacked.shape[2] * stacked.shape[3]
        mean = total / count
        std = (squares / count - mean.pow(2)).clamp_min(0).sqrt().clamp_min(1e-6)
        return mean.float(), std.float()

    def set_map_weights(self, weights: Tensor | None) -> None:
        """The coarse terms' weight in the map for each row of the term statistics (None: back to the plain
        mean of the map terms); see :attr:`map_weight`."""
        if weights is None:
            self.map_weight = self.map_weight.new_zeros(0)
            return
        rows = self.term_mean.shape[0]
        weights = torch.as_tensor(weights, dtype=torch.float32).flatten()
        if rows == 0 or weights.numel() != rows:
            raise ConfigError(
                f"map weights: expected one per row of the term statistics ({rows}: one per class the model was "
                f"trained on), got {weights.numel()}"
            )
        if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()) or bool((weights > 1).any()):
            raise ConfigError(f"map weights must lie in [0, 1], got {weights.tolist()}")
        self.map_weight = weights.to(self.term_mean.device)

    def _map_weights(self, classes: Tensor | None) -> Tensor | None:
        """Each image's coarse weight in the map (its class's row), or None when none were chosen."""
        if self.map_weight.numel() == 0:
            return None
        return self.map_weight[self._rows(classes, self.map_weight)]

    @staticmethod
    def _rows(classes: Tensor | None, per_class: Tensor) -> Tensor:
        """Which row of a per-class buffer each image reads: its class's, or the one row for all."""
        if classes is not None and per_class.shape[0] > 1:
            return classes
        return torch.zeros(1, dtype=torch.long, device=per_class.device)

    def _term_maps(
        self, features: Tensor, reconstruction: Tensor, fine: Tensor | None, scoring: ScoringConfig
    ) -> list[Tensor]:
        """Every term of :attr:`stat_terms` for raw ``features`` (feature resolution)."""
        a, b = self._compared(features, reconstruction, scoring)
        terms = TermMaps(a, b, self._compared_fine(fine, scoring), scoring)
        return [terms(branch, p) for branch, p in self.stat_terms]

    def _statistics(self, classes: Tensor | None, scoring: ScoringConfig):
        """``statistics(branch, p)`` for :func:`vpdm.model.scoring.scores_and_maps`: each image's row of the term
        statistics (its class's, or the one row); None when they were never fitted."""
        if self.term_mean.shape[0] == 0:
            return None
        fitted = self.term_settings.tolist()
        if fitted != self._settings_key(scoring):
            names = ("distance", "feature_space", "aggregate")
            values = (DISTANCES[fitted[0]], FEATURE_SPACES[fitted[2]], fitted[3])
            raise ConfigError(
                "scoring.combine=standardised: this model's term statistics were fitted with "
                + ", ".join(f"scoring.{n}={v}" for n, v in zip(names, values))
                + "; score with those, or use scoring.combine=weighted"
            )

        def statistics(branch: str, p: int) -> tuple[Tensor, Tensor]:
            if (branch, p) not in self.stat_terms:
                raise ConfigError(
                    f"scoring: block side {p} has no normal statistics (standardised scores keep them "
                    f"for {[q for b, q in self.stat_terms if b == branch]})"
                )
            i = self.stat_terms.index((branch, p))
            rows = self._rows(classes, self.term_mean)
            return self.term_mean[rows, i], self.term_std[rows, i]

        return statistics

    def complete_state(self, state: dict) -> None:
        """Add to ``state`` (after :meth:`take_sizes`) the buffers a checkpoint written before them lacks: the
        training fit of the term statistics is the statistics themselves (there was only the one fit); the
        others of :data:`ADDED_BUFFERS` take this model's defaults."""
        for name, source in TRAINING_FIT_BUFFERS.items():
            if name not in state and isinstance(state.get(source), Tensor):
                state[name] = state[source].clone()
        for name, value in self.state_dict().items():
            if name not in state and name in ADDED_BUFFERS:
                state[name] = value

    def take_sizes(self, state: dict) -> None:
        """The sizes that follow the data (term statistics per class, prototypes per class) from a state dict,
        before it is compared with this model or loaded."""
        self._take_statistics_rows(state)
        self.prototypes.take_sizes(state, "prototypes.")
        if self.fine is not None:
            self.fine.take_sizes(state, "fine.")

    def _take_statistics_rows(self, state: dict, prefix: str = "") -> None:
        """The term statistics have one row per class the model was trained on: take the saved number of rows
        (the terms, columns, stay the model's: a saved tensor of other terms is named when compared or loaded)."""
        saved = state.get(prefix + "term_mean")
        if isinstance(saved, Tensor) and saved.ndim == 2:
            self.resize_statistics(saved.shape[0])
        weights = state.get(prefix + "map_weight")
        if isinstance(weights, Tensor) and weights.ndim == 1:
            self.map_weight = self.map_weight.new_zeros(weights.shape[0])

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        self._take_statistics_rows(state_dict, prefix)  # the prototypes' modules take their own sizes
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    @property
    def condition_is_fixed(self) -> bool:
        """Whether each training image's condition is the same in every epoch: frozen prototypes
        (``train.prototype_lr_scale=0``) whose assignment ignores the batch."""
        return not self.prototypes.prototypes.requires_grad and self.prototypes.batch_independent

    @torch.no_grad()
    def training_condition(self, features: Tensor, batch_size: int = 64) -> tuple[Tensor, Tensor]:
        """Every training image's condition (before T_up) and OT-loss term, computed once
        (:meth:`VaguePrototypes.training_condition`); ``forward(..., condition=...)`` takes a batch of them."""
        if not self.condition_is_fixed:
            raise RuntimeError("the condition changes during training (trained prototypes or balanced OT)")
        device = self.feature_mean.device
        parts = [
            self.prototypes.training_condition(self.normalise(features[s : s + batch_size].to(device)))
            for s in range(0, features.shape[0], batch_size)
        ]
        return torch.cat([p[0] for p in parts]).cpu(), torch.cat([p[1] for p in parts]).cpu()

    def normalise(self, features: Tensor) -> Tensor:
        return (features - self.feature_mean) / self.feature_std

    # -- the image's own features beside yhat (model.input_copy) -------------------------------------
    def inference_copy(self, x0: Tensor) -> Tensor | None:
        """What the denoiser receives of the image at scoring time: its clean standardised features, or
        nothing (``model.input_copy='none'``, the paper)."""
        return None if self.config.input_copy == "none" else x0

    def training_copy(self, x0: Tensor, generator: torch.Generator | None = None) -> Tensor | None:
        """The perturbed copy the denoiser is trained with: dropout (each value zeroed with probability
        p, the rest scaled by 1/(1-p), so its mean is x0's) or additive Gaussian jitter of std s."""
        kind, strength = self.config.input_copy, float(self.config.input_copy_strength)
        if kind == "none":
            return None
        if kind == "dropout":
            keep = torch.rand(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype) >= strength
            return x0 * keep / (1.0 - strength)
        return x0 + strength * torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)

    # -- training -------------------------------------------------------------------------------
    def forward(
        self, features: Tensor, generator: torch.Generator | None = None, condition: tuple[Tensor, Tensor] | None = None
    ) -> dict[str, Tensor]:
        """Training losses for a batch of raw backbone features (Algorithm 1 + Eq. 17), with the
        diffusion term in the configured parameterisation and weighting (eps, unweighted: the paper).

        ``condition``: the batch's rows of :meth:`training_condition` (frozen prototypes only), instead of
        assigning every vague block to every prototype again."""
        x0 = self.normalise(features)
        if condition is not None:
            vague, terms = condition
            cond = {
                "yhat": unvague(vague.to(x0), self.feature_size),
                "ot_loss": self.prototypes.ot_loss_of_terms(terms.to(x0)),
            }
        else:
            cond = self.prototypes(x0)
        yhat = cond["yhat"]
        t = self.diffusion.sample_timesteps(
            x0.shape[0], generator=generator, device=x0.device, max_step=self.config.train_max_step
        )
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t = self.diffusion.q_sample(x0, yhat, t, noise)
        output = self.denoise(x_t, yhat, t, copy=self.training_copy(x0, generator))
        target = self.diffusion.target(x0, yhat, t, noise)
        weights = self.diffusion.loss_weights(t, x0, self.config.loss_weighting, self.config.min_snr_gamma)
        diffusion_loss = (weights * (output - target).pow(2)).mean()
        with torch.no_grad():
            eps = self.diffusion.predicted_noise(output, x_t, yhat, t)
            eps_mse = (eps - noise).pow(2).mean()
        loss = diffusion_loss + self.config.ot_weight * cond["ot_loss"]
        return {
            "loss": loss,
            "diffusion_loss": diffusion_loss.detach(),
            "eps_mse": eps_mse,
            "ot_loss": cond["ot_loss"].detach(),
        }

    def denoise(
        self, x_t: Tensor, yhat: Tensor, t: Tensor, precision: str = "fp32", copy: Tensor | None = None
    ) -> Tensor:
        """The network's prediction in the configured parameterisation (``model.diffusion.prediction``):
        ``c_skip(t) * z_t + denoiser(x_t, yhat, t)`` with ``z_t = x_t - yhat``.

        ``c_skip`` is the best linear guess of the target for unit-variance data
        (:meth:`ShiftedDiffusion.skip_scale`); the network learns what is left. For eps without it the
        network must carry all C independent noise channels through its narrower width, which it
        cannot: the noise estimate near t = T stays poor and ``x0_hat = (...) / sqrt(abar_t)`` blows it
        up ~150x. Preconditioning in the spirit of EDM's ``c_skip``.

        ``precision`` (``inference.precision``, scoring only) runs the network under autocast; its output
        is cast back to float32 before the skip term, so only the network itself loses precision.
        ``copy``: the image's own standardised features (:meth:`inference_copy`, :meth:`training_copy`),
        required exactly when ``model.input_copy`` is set.
        """
        z_t = x_t - yhat if self.config.diffusion.shift_to_condition else x_t
        with autocast(precision, x_t.device):
            out = self.denoiser(x_t, yhat, t, copy)
        return self.diffusion.skip_scale(t, x_t) * z_t + out.float()

    def predict_noise(self, x_t: Tensor, yhat: Tensor, t: Tensor, copy: Tensor | None = None) -> Tensor:
        """eps_theta(x_t, yhat, t), whatever the parameterisation."""
        return self.diffusion.predicted_noise(self.denoise(x_t, yhat, t, copy=copy), x_t, yhat, t)

    def predict_x0(self, x_t: Tensor, yhat: Tensor, t: Tensor, copy: Tensor | None = None) -> Tensor:
        """x0_hat(x_t, yhat, t) in normalised feature space, whatever the parameterisation."""
        return self.diffusion.split(self.denoise(x_t, yhat, t, copy=copy), x_t, yhat, t)[0]

    # -- inference ------------------------------------------------------------------------------
    @torch.no_grad()
    def condition(self, features: Tensor) -> Tensor:
        """The vague condition yhat of each image, assigned per image (batch-independent)."""
        was_training = self.prototypes.training
        self.prototypes.eval()
        try:
            return self.prototypes(self.normalise(features), with_loss=False)["yhat"]
        finally:
            self.prototypes.train(was_training)

    @torch.no_grad()
    def fine_condition(self, features: Tensor, with_class: bool = True) -> tuple[Tensor | None, Tensor | None]:
        """The fine prototypes' condition (B x C x S x S, normalised space) and each image's class (B,): the
        class whose fine prototypes hold most of its assignment weight (None with ``with_class=False``, which
        skips that sum); (None, None) without fine prototypes."""
        if self.fine is None:
            return None, None
        classes = self.term_mean.shape[0] if with_class and self.term_mean.shape[0] > 1 else 0
        was_training = self.fine.training
        self.fine.eval()
        try:
            out = self.fine(self.normalise(features), with_loss=False, num_classes=classes)
        finally:
            self.fine.train(was_training)
        return out["yhat"], (out["class_mass"].argmax(dim=1) if classes else None)

    @torch.no_grad()
    def reconstruct(
        self,
        features: Tensor,
        sampling: SamplingConfig | None = None,
        progress: bool = False,
        precision: str = "fp32",
        *,
        yhat: Tensor | None = None,
        noise: NoiseSource | None = None,
    ) -> Tensor:
        """Algorithm 2: start at N(yhat, I) and denoise back to x0; returns the reconstruction in
        normalised feature space. The image enters only through yhat, unless ``sampling.start_step``
        is below T: then the chain starts from the image's own features noised to that step, or
        ``model.input_copy`` is set: then every step also sees the clean features.
        ``precision``: the denoiser's autocast (:meth:`denoise`). ``yhat``: the condition, if the caller
        has it (:meth:`condition`). ``noise``: the chain's draws (default: the same draws for every image, from a
        generator seeded ``sampling.seed`` (:class:`SharedNoise`), so an image's result never depends on its
        batch; the export replays them)."""
        sampling = sampling or SamplingConfig()
        if yhat is None:
            yhat = self.condition(features)
        # the image's own features enter the chain only with an input copy or a start below T
        uses_image = self.config.input_copy != "none" or sampling.start_step is not None
        x0 = self.normalise(features) if uses_image else None
        copy = self.inference_copy(x0) if uses_image else None
        if noise is None:
            noise = SharedNoise(sampling.seed, features.device)
        return self.diffusion.sample(
            lambda x_t, y, t: self.denoise(x_t, y, t, precision, copy=copy),
            yhat,
            num_steps=sampling.num_steps,
            sampler=sampling.build(self.diffusion),
            noise=noise,
            progress=progress,
            spacing=sampling.spacing,
            x0=x0,
            start_step=sampling.start_step,
        )

    def denormalise(self, x: Tensor) -> Tensor:
        return x * self.feature_std + self.feature_mean

    @torch.no_grad()
    def anomaly_maps(
        self, features: Tensor, sampling: SamplingConfig | None = None, scoring: ScoringConfig | None = None
    ) -> Tensor:
        """Feature-resolution anomaly maps (B x S x S): the distance between the features and their
        reconstruction, by default ||x0 - x0_rec||_2 over the standardised channels (the paper)."""
        return self.distance_maps(features, self.reconstruct(features, sampling), scoring)

    def _compared(self, features: Tensor, reconstruction: Tensor, scoring: ScoringConfig):
        """The two tensors the distance compares (the configured feature space)."""
        if scoring.feature_space == "raw":
            return features, self.denormalise(reconstruction)
        return self.normalise(features), reconstruction

    def _compared_fine(self, fine: Tensor | None, scoring: ScoringConfig) -> Tensor | None:
        """The fine prototypes' condition in the configured feature space (what :meth:`_compared` gives the
        reconstruction)."""
        if fine is None:
            return None
        return self.denormalise(fine) if scoring.feature_space == "raw" else fine

    def distance_maps(self, features: Tensor, reconstruction: Tensor, scoring: ScoringConfig | None = None) -> Tensor:
        """The configured distance between raw ``features`` and a reconstruction in normalised space."""
        scoring = scoring or ScoringConfig()
        a, b = self._compared(features, reconstruction, scoring)
        return distance_map(a, b, scoring)

    def scores_and_maps(
        self,
        features: Tensor,
        reconstruction: Tensor,
        scoring: ScoringConfig,
        map_size: int,
        fine: Tensor | None = None,
        classes: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Image scores and post-processed maps (``map_size`` square) of ``features`` against a reconstruction
        and the fine condition with each image's class (:meth:`fine_condition`); see
        :func:`vpdm.model.scoring.scores_and_maps`."""
        a, b = self._compared(features, reconstruction, scoring)
        standardised = scoring.combine == "standardised"
        statistics = self._statistics(classes, scoring) if standardised else None
        return scores_and_maps(
            a,
            b,
            scoring,
            map_size,
            fine=self._compared_fine(fine, scoring),
            statistics=statistics,
            map_weights=self._map_weights(classes) if standardised else None,
        )

    @torch.no_grad()
    def detect(
        self,
        features: Tensor,
        sampling: SamplingConfig | None,
        scoring: ScoringConfig,
        map_size: int,
        precision: str = "fp32",
        *,
        yhat: Tensor | None = None,
        noise: NoiseSource | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Inference: image scores (B,) and anomaly maps (B x map_size x map_size) of raw features;
        ``precision`` (``inference.precision``) is the denoiser's autocast; ``yhat`` and ``noise`` as
        :meth:`reconstruct`. The torch Detector and the exported graph both run this."""
        reconstruction = self.reconstruct(features, sampling, precision=precision, yhat=yhat, noise=noise)
        fine, classes = self.fine_condition(features)
        return self.scores_and_maps(features, reconstruction, scoring, map_size, fine=fine, classes=classes)
