"""Training and evaluation loops, usable on one machine or inside a distributed worker.

Nothing here knows about Ray or MLflow: a distributed worker passes its own (sharded) data
loader, wraps the model in DDP, and receives per-epoch metrics through ``callback``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from vpdm.config.schema import TrainConfig, VPDMConfig, default_cache_dir
from vpdm.data.dataset import AnomalyDataset
from vpdm.data.layouts import Sample
from vpdm.errors import VPDMError
from vpdm.features.backbone import FeatureExtractor
from vpdm.features.cache import extract_features
from vpdm.model.vpdm_model import VPDM
from vpdm.runtime.device import select_device

EpochCallback = Callable[[int, dict[str, float]], None]


class TrainingDiverged(VPDMError):
    """The loss became NaN or infinite; training stops instead of writing a broken model."""

    def __init__(self, message: str, epoch: int = 0, step: int = 0):
        super().__init__(message)
        self.epoch, self.step = epoch, step

    def __reduce__(self):  # keep epoch/step across process boundaries (Ray pickles errors)
        return (type(self), (str(self), self.epoch, self.step))


def seed_everything(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    return torch.Generator().manual_seed(seed)


# -- data ----------------------------------------------------------------------------------------


@dataclass
class SplitFeatures:
    """Backbone features of one split with everything needed to score and evaluate them."""

    features: Tensor  # N x C x S x S
    dataset: AnomalyDataset
    cache_hit: bool
    cache_path: str | None = None
    extract_seconds: float = 0.0
    class_index: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))


def load_split(
    config: VPDMConfig,
    split: str,
    extractor: FeatureExtractor | None = None,
    progress: bool = True,
    samples: list[Sample] | None = None,
    device: torch.device | str | None = None,
) -> SplitFeatures:
    """List and validate the split's files (unless ``samples`` were listed already), then extract (or load
    cached) backbone features with ``train.threads`` threads.

    Without ``extractor`` one is built at ``inference.precision`` on ``device`` (default: ``train.device``,
    i.e. cuda when there is one); the features come back on the CPU either way (the cache and the
    training loader hold them there)."""
    from vpdm.training.preflight import apply_threads, list_splits

    apply_threads(config)
    if samples is None:
        samples = list_splits(config, (split,))[split]  # validates paths, masks and sizes before any long work
    dataset = AnomalyDataset(samples, image_size=config.backbone.image_size, mask_size=config.scoring.map_size)
    if extractor is None:
        extractor = FeatureExtractor(config.backbone, precision=config.inference.precision)
        extractor = extractor.to(
            select_device(device if device is not None else config.train.device, precision=config.inference.precision)
        )
    start = time.perf_counter()
    features, info = extract_features(
        extractor,
        dataset,
        batch_size=config.data.extract_batch_size,
        cache_dir=Path(config.data.cache_dir or default_cache_dir()),
        progress=progress,
        return_info=True,
    )
    class_index = torch.tensor([dataset.categories.index(s.category) for s in samples], dtype=torch.long)
    return SplitFeatures(
        features=features,
        dataset=dataset,
        cache_hit=bool(info.get("cache_hit")),
        cache_path=str(info.get("path")) if info.get("path") else None,
        extract_seconds=time.perf_counter() - start,
        class_index=class_index,
    )


# -- training ------------------------------------------------------------------------------------


def build_model(
    config: VPDMConfig,
    train_features: Tensor,
    seed: int | None = None,
    class_index: Tensor | None = None,
    statistics: bool = True,
) -> VPDM:
    """A fresh model fitted to the training data's scale, with prototypes started from it (``class_index``,
    one class per image: which class each fine prototype stands for), and normal statistics of its score
    terms, so that even an untrained model scores. ``statistics=False``: without them, for a caller that
    trains and fits them afterwards (:func:`fit`)."""
    channels, feature_size = train_features.shape[1], train_features.shape[-1]
    seed = config.train.seed if seed is None else seed
    generator = seed_everything(seed)
    model = VPDM(channels, feature_size, config.model)
    model.fit_normalisation(train_features)
    model.init_prototypes(train_features, generator, class_index=_class_index_of(train_features, class_index))
    # Frozen before any wrapper (DDP) registers which parameters expect gradients.
    model.prototypes.prototypes.requires_grad_(config.train.prototype_lr_scale > 0)
    if statistics:
        with torch.random.fork_rng(devices=[]):  # training draws the same random numbers as without them
            fit_statistics(model, config, train_features, class_index)
    return model.train()


def _class_index_of(features: Tensor, class_index: Tensor | None) -> Tensor:
    """One class per image: the given one, or class 0 for every image when none is known (one class)."""
    if class_index is None or class_index.numel() != features.shape[0]:
        return torch.zeros(features.shape[0], dtype=torch.long)
    return class_index


def fit_statistics(model: VPDM, config: VPDMConfig, features: Tensor, class_index: Tensor | None) -> None:
    """The normal statistics of every score term (scoring.combine=standardised), once the model is trained."""
    model.eval()
    model.fit_statistics(
        features,
        _class_index_of(features, class_index),
        config.sampling,
        config.scoring,
        batch_size=config.train.batch_size,
    )


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """Adam (the paper's); the prototypes get ``prototype_lr_scale`` times the learning rate."""
    inner = model.module if hasattr(model, "module") else model
    named = [(n, p) for n, p in inner.named_parameters() if p.requires_grad]  # frozen ones: see build_model
    groups = [{"params": [p for n, p in named if not n.startswith("prototypes.")]}]
    protos = [p for n, p in named if n.startswith("prototypes.")]
    if protos:
        groups.append({"params": protos, "lr": config.lr * config.prototype_lr_scale})
    return torch.optim.Adam(groups, lr=config.lr, weight_decay=config.weight_decay)


def train_loop(
    model: nn.Module,
    loader: Iterable[Any],
    config: TrainConfig,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    start_epoch: int = 0,
    callback: EpochCallback | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
    before_epoch: Callable[[int], None] | None = None,
    all_finite: Callable[[Tensor], bool] | None = None,
    end_of_epoch: Callable[[int, list[dict[str, float]], torch.optim.Optimizer], None] | None = None,
) -> list[dict[str, float]]:
    """Run epochs ``start_epoch .. config.epochs - 1``; returns the per-epoch metrics.

    ``model`` is a :class:`VPDM` or a DDP wrapper of one; ``loader`` yields feature batches
    (a tensor, or a tuple/list whose first item is the features, or a dict with ``features``).
    ``before_epoch(epoch)`` lets a distributed sampler reshuffle. A NaN/inf loss raises
    :class:`TrainingDiverged` before the optimizer step, so no broken weights are written.
    ``all_finite(loss)`` replaces the local finiteness test; data-parallel workers pass a collective
    one so that every rank stops at the same step instead of the others waiting in an all-reduce.
    ``end_of_epoch(epoch, history, optimizer)`` sees each epoch's end (a resumable state is written there).
    """
    optimizer = optimizer or make_optimizer(model, config)
    finite = all_finite or (lambda value: bool(torch.isfinite(value)))
    history: list[dict[str, float]] = []
    model.train()
    for epoch in range(start_epoch, config.epochs):
        if before_epoch is not None:
            before_epoch(epoch)
        totals = {"loss": 0.0, "eps_mse": 0.0, "ot_loss": 0.0}
        seen, start = 0, time.perf_counter()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False, disable=not progress, unit="batch")
        for step, batch in enumerate(bar):
            features = _features_of(batch).to(device, non_blocking=True)
            if isinstance(batch, dict) and "vague" in batch:
                losses = model(features, condition=(batch["vague"].to(device), batch["terms"].to(device)))
            else:
                losses = model(features)
            loss = losses["loss"]
            if not finite(loss.detach()):
                raise TrainingDiverged(
                    f"loss became {loss.item()} at epoch {epoch + 1}, step {step + 1} "
                    f"(eps-MSE {losses['eps_mse'].item():.4g}, OT {losses['ot_loss'].item():.4g}); "
                    f"try a lower train.lr (now {config.lr})",
                    epoch=epoch + 1,
                    step=step + 1,
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            n = features.shape[0]
            seen += n
            for key in totals:
                totals[key] += float(losses[key].detach()) * n
            bar.set_postfix(loss=f"{totals['loss'] / seen:.4f}")
        if seen == 0:
            raise VPDMError("the training loader yielded no batches; is the training split empty?")
        metrics = {key: value / seen for key, value in totals.items()}
        metrics.update(
            epoch=epoch + 1, images=seen, seconds=time.perf_counter() - start, lr=optimizer.param_groups[0]["lr"]
        )
        history.append(metrics)
        if end_of_epoch is not None:
            end_of_epoch(epoch, history, optimizer)
        if callback is not None:
            callback(epoch, metrics)
    return history


def _features_of(batch: Any) -> Tensor:
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, dict):
        return batch["features"]
    return batch[0]


class ConditionedFeatures(torch.utils.data.Dataset):
    """Features with their precomputed training condition (:meth:`VPDM.training_condition`)."""

    def __init__(self, features: Tensor, condition: tuple[Tensor, Tensor]) -> None:
        self.features, (self.vague, self.terms) = features, condition

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"features": self.features[i], "vague": self.vague[i], "terms": self.terms[i]}


def feature_loader(
    features: Tensor,
    batch_size: int,
    seed: int,
    class_index: Tensor | None = None,
    condition: tuple[Tensor, Tensor] | None = None,
) -> torch.utils.data.DataLoader:
    """Shuffled loader over cached features; drops a last batch of 1 (Sinkhorn over one image is degenerate).
    With ``condition`` (frozen prototypes: :meth:`VPDM.training_condition`) each batch is a dict that also
    holds its images' conditions."""
    if condition is not None:
        dataset: torch.utils.data.Dataset = ConditionedFeatures(features, condition)
    else:
        tensors = [features] + ([class_index] if class_index is not None else [])
        dataset = torch.utils.data.TensorDataset(*tensors)
    drop_last = len(dataset) % batch_size == 1 and len(dataset) > batch_size
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=True, drop_last=drop_last, generator=torch.Generator().manual_seed(seed)
    )


def fit(
    config: VPDMConfig,
    train: SplitFeatures,
    *,
    callback: EpochCallback | None = None,
    progress: bool = True,
    resume: dict[str, Any] | None = None,
    save_state: Callable[..., None] | None = None,
) -> tuple[VPDM, list[dict[str, float]]]:
    """Train one unified model on all classes of ``train`` (single process).

    ``save_state(epoch=, model=, optimizer=, generator=, history=)`` is called after every
    ``train.checkpoint_every``-th epoch but the last (``vpdm.training.resume`` writes it); ``resume``, such a state
    read back, continues that run exactly: the model is built as a fresh run builds it, then loaded.
    """
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    device = select_device(config.train.device)
    model = build_model(config, train.features, class_index=train.class_index, statistics=False).to(
        device
    )  # fitted after training
    # Frozen prototypes give every image the same condition in every epoch: assign once, not once per epoch.
    condition = model.training_condition(train.features) if model.condition_is_fixed else None
    loader = feature_loader(train.features, config.train.batch_size, config.train.seed, condition=condition)
    optimizer = make_optimizer(model, config.train)
    start, done = 0, []
    if resume is not None:
        from vpdm.training.resume import restore

        start, done = restore(resume, model=model, optimizer=optimizer, generator=loader.generator)
    every, hook = config.train.checkpoint_every, None
    if save_state is not None and every:

        def hook(epoch: int, history: list[dict[str, float]], opt: torch.optim.Optimizer) -> None:
            if (epoch + 1) % every == 0 and epoch + 1 < config.train.epochs:
                save_state(
                    epoch=epoch + 1,
                    model=model,
                    optimizer=opt,
                    generator=loader.generator,
                    history=done + history,
                )

    history = train_loop(
        model,
        loader,
        config.train,
        optimizer=optimizer,
        start_epoch=start,
        callback=callback,
        device=device,
        progress=progress,
        end_of_epoch=hook,
    )
    fit_statistics(model, config, train.features, train.class_index)
    return model.eval(), done + history
