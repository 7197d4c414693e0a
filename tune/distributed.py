"""The VPDM training loop inside Ray Train workers (TorchTrainer, DDP over gloo on CPU, NCCL on GPU).

Each worker receives the dataset's :class:`~tune.features.DatasetBundle` through the Ray object
store (an ``ObjectRef`` in its config), builds the same model from the same seed (DDP also
broadcasts rank 0's weights), and trains on its shard of the training features:

* :class:`StratifiedShardSampler` deals every training image to exactly one worker per epoch
  (none dropped, none repeated) and spreads every class evenly over the workers; all workers get
  the same number of batches, which DDP requires (an extra batch on one rank would hang the
  gradient all-reduce).
* ``train.batch_size`` is the *global* batch: each of W workers takes ``batch_size / W`` images
  per step (at least 2: Sinkhorn over one image is degenerate), so 1 and W workers make the same
  number of optimizer steps per epoch.
* After every epoch the workers all-reduce the training losses, compute the validation metrics on
  their share of the held-out images (see :mod:`tune.features`), and all call ``ray.train.report``
  with the same metrics; rank 0 attaches a ``ray.train.Checkpoint`` holding a regular vpdm
  ``model.pt`` (weights, config, optimizer state, epoch). A restarted worker group
  (``FailureConfig``) resumes from ``ray.train.get_checkpoint()``.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from vpdm.errors import ConfigError

__all__ = ["StratifiedShardSampler", "per_worker_batch_size", "train_worker", "validation_metrics", "CHECKPOINT_FILE"]

CHECKPOINT_FILE = "model.pt"


def per_worker_batch_size(global_batch: int, workers: int) -> int:
    return max(2, int(round(global_batch / max(1, workers))))


class StratifiedShardSampler(torch.utils.data.Sampler[list[int]]):
    """Batch sampler of one rank's class-stratified shard of the training set.

    Each epoch: shuffle within every class (seeded by ``seed`` and the epoch), lay the classes end
    to end and deal the sequence round-robin over the ranks (the starting rank rotates with the
    epoch, so no rank always gets the extra image). Every image goes to exactly one rank, and a
    class of ``n_c`` images gives each rank ``floor(n_c / W)`` or ``ceil(n_c / W)`` of them. A
    rank then shuffles its share and splits it into :meth:`num_batches` batches of near-equal size
    (the same count on every rank; sizes differ by at most one, never a batch of one).
    """

    def __init__(
        self,
        class_index: Sequence[int] | np.ndarray | Tensor,
        *,
        num_replicas: int,
        rank: int,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        self.class_index = np.asarray(class_index, dtype=np.int64).reshape(-1)
        n = len(self.class_index)
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ConfigError(f"rank {rank} is not in 0..{num_replicas - 1}")
        if batch_size < 2:
            raise ConfigError(f"per-worker batch size must be >= 2 (Sinkhorn needs two images), got {batch_size}")
        if n < 2 * num_replicas:
            raise ConfigError(
                f"{n} training images cannot be split over {num_replicas} workers (each needs at least 2 per step); "
                "use fewer workers"
            )
        self.num_replicas, self.rank, self.batch_size = num_replicas, rank, batch_size
        self.seed, self.shuffle = seed, shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def shard(self, epoch: int | None = None) -> np.ndarray:
        """The indices this rank trains on in ``epoch`` (default: the current one), in batch order."""
        epoch = self.epoch if epoch is None else int(epoch)
        rng = np.random.default_rng([self.seed, epoch])
        runs = []
        for c in np.unique(self.class_index):
            idx = np.flatnonzero(self.class_index == c)
            runs.append(rng.permutation(idx) if self.shuffle else idx)
        order = np.concatenate(runs)
        owner = (np.arange(len(order)) + epoch) % self.num_replicas
        mine = order[owner == self.rank]
        if self.shuffle:  # mix the classes inside the rank's batches (OT wants every class in a batch)
            mine = np.random.default_rng([self.seed, epoch, self.rank + 1]).permutation(mine)
        return mine

    def num_batches(self) -> int:
        n = len(self.class_index)
        smallest = n // self.num_replicas
        batches = math.ceil(math.ceil(n / self.num_replicas) / self.batch_size)
        if smallest // batches < 2:  # would leave a batch of one on the smallest shard
            batches = max(1, smallest // 2)
        return batches

    def __iter__(self):
        for chunk in np.array_split(self.shard(), self.num_batches()):
            yield chunk.tolist()

    def __len__(self) -> int:
        return self.num_batches()


# -- validation --------------------------------------------------------------------------------------


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


@torch.no_grad()
def _val_losses(model: Any, features: Tensor, t_uniform: Tensor, noise: Tensor) -> Tensor:
    """Per-image eps-MSE + lambda * OT with fixed t and noise (as in VPDM.forward, without batch coupling)."""
    if len(features) == 0:
        return torch.zeros(0)
    x0 = model.normalise(features)
    cond = model.prototypes(x0)  # eval mode: each image assigned on its own
    yhat = cond["yhat"]
    steps = (
        model.diffusion.num_timesteps
        if hasattr(model.diffusion, "num_timesteps")
        else model.config.diffusion.num_timesteps
    )
    t = (t_uniform * steps).long().clamp_(0, steps - 1)
    x_t = model.diffusion.q_sample(x0, yhat, t, noise)
    eps = model.predict_noise(x_t, yhat, t, copy=model.inference_copy(x0))
    mse = (eps - noise).pow(2).flatten(1).mean(dim=1)
    ot = model.config.ot_weight * cond["ot_loss"]
    return (mse + ot).cpu()


@torch.no_grad()
def _val_scores(model: Any, features: Tensor, config: Any, batch_size: int) -> Tensor:
    """Image scores of the inference path (VPDM.detect: the reconstruction's and the fine prototypes' terms,
    combined and post-processed as ``config.scoring`` says, at the map size inference uses)."""
    size = config.scoring.map_size or config.backbone.image_size
    out = []
    for start in range(0, len(features), batch_size):
        out.append(model.detect(features[start : start + batch_size], config.sampling, config.scoring, size)[0].cpu())
    return torch.cat(out) if out else torch.zeros(0)


def validation_metrics(
    model: torch.nn.Module,
    bundle: Any,
    config: Any,
    *,
    rank: int = 0,
    world: int = 1,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """``val_loss``, ``val_pseudo_auroc`` and ``val_same_class_auroc`` over the held-out images, sharded over
    ``world`` ranks.

    Every rank must call it (it all-gathers when ``world > 1``); all get the same numbers, which do
    not depend on ``world`` (per-image timesteps, noise and sampling seeds are fixed).
    """
    from tune.features import as_tensor

    m = _unwrap(model)
    was_training = m.training
    m.eval()
    try:
        idx = np.arange(len(bundle.val_features))[rank::world]
        feats = as_tensor(bundle.val_features)[idx].to(device)
        losses = _val_losses(
            m,
            feats,
            torch.from_numpy(bundle.val_t_uniform[idx]).to(device),
            as_tensor(bundle.val_noise)[idx].to(device),
        )
        bs = max(2, config.train.batch_size)
        good = _val_scores(m, feats, config, bs)
        bad = _val_scores(m, as_tensor(bundle.val_anomalous)[idx].to(device), config, bs)
        same = getattr(bundle, "val_same_class", None)
        bad_same = (
            _val_scores(m, as_tensor(same)[idx].to(device), config, bs)
            if same is not None
            else torch.full((len(idx),), float("nan"))
        )
    finally:
        m.train(was_training)
    parts = [(idx.tolist(), losses.tolist(), good.tolist(), bad.tolist(), bad_same.tolist())]
    if world > 1:
        import torch.distributed as dist

        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, parts[0])
        parts = gathered
    order, loss_all, good_all, bad_all, same_all = [], [], [], [], []
    for i, lo, g, b, sb in parts:
        order += i
        loss_all += lo
        good_all += g
        bad_all += b
        same_all += sb
    perm = np.argsort(order)
    good_arr, bad_arr = np.asarray(good_all)[perm], np.asarray(bad_all)[perm]
    auroc = _pseudo_auroc(good_arr, bad_arr)
    same_arr = np.asarray(same_all, dtype=float)[perm]
    same_auroc = _pseudo_auroc(good_arr, same_arr) if same is not None else float("nan")
    loss = float(np.mean(loss_all)) if loss_all else float("nan")
    return {
        "val_loss": loss if math.isfinite(loss) else 1e9,
        "val_pseudo_auroc": auroc,
        "val_same_class_auroc": same_auroc,
    }


def _pseudo_auroc(good: np.ndarray, bad: np.ndarray) -> float:
    """Image AUROC of held-out normal images against their pseudo-anomalous copies; 0 for non-finite scores
    (a diverged model is the worst possible detector, not an error in the sweep)."""
    from vpdm.evaluation.metrics import image_auroc

    scores = np.r_[good, bad]
    if not np.all(np.isfinite(scores)):
        return 0.0
    return float(image_auroc(np.r_[np.zeros(len(good)), np.ones(len(bad))], scores))


# -- the Ray Train worker ----------------------------------------------------------------------------


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.cpu().tolist()


def _all_reduce_max(value: float, device: torch.device) -> float:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def train_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train per-worker function (``TorchTrainer(train_worker, train_loop_config=...)``).

    ``loop_config`` keys: ``bundle`` (ObjectRef of a DatasetBundle), ``vpdm_config`` (to_dict of a
    VPDMConfig), ``threads`` (torch intra-op threads per worker), ``trial`` (name, for the
    checkpoint's ``extra``).
    """
    import ray
    import ray.train
    import ray.train.torch
    import ray.util

    from tune.features import as_tensor
    from vpdm.config.schema import saved_config
    from vpdm.features import backbone as vpdm_backbone
    from vpdm.inference.checkpoint import read_checkpoint, save_checkpoint
    from vpdm.training import engine

    threads = int(loop_config.get("threads") or 1)
    torch.set_num_threads(threads)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    config = saved_config(loop_config["vpdm_config"])
    bundle = loop_config["bundle"]
    if isinstance(bundle, ray.ObjectRef):
        bundle = ray.get(bundle)
    device = ray.train.torch.get_device()

    train_x = as_tensor(bundle.train_features)
    train_class = torch.as_tensor(np.asarray(bundle.train_class), dtype=torch.long)
    # same seed on every rank -> the same start
    model = engine.build_model(
        config, train_x, class_index=train_class, statistics=False
    )  # fitted after each epoch (on_epoch)
    # Frozen prototypes: every image's condition is assigned once (as engine.fit does), on every rank alike.
    condition = model.training_condition(train_x) if model.condition_is_fixed else None
    start_epoch, optimizer_state = 0, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # a restarted worker group resumes where the last report left off
        with checkpoint.as_directory() as directory:
            payload = read_checkpoint(Path(directory) / CHECKPOINT_FILE)
        model.load_state_dict(payload["state_dict"])
        optimizer_state = payload.get("optimizer")
        start_epoch = int(payload.get("epoch") or 0)
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": False})
    optimizer = engine.make_optimizer(model, config.train)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)

    sampler = StratifiedShardSampler(
        bundle.train_class,
        num_replicas=world,
        rank=rank,
        batch_size=per_worker_batch_size(config.train.batch_size, world),
        seed=config.train.seed,
    )
    dataset = (
        engine.ConditionedFeatures(train_x, condition)
        if condition is not None
        else torch.utils.data.TensorDataset(train_x)
    )
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler)
    total_epochs = config.train.epochs

    def on_epoch(epoch: int, m: dict[str, float]) -> None:
        n = m["images"]
        loss, eps, ot, images, forwards = _all_reduce_sum(
            [m["loss"] * n, m["eps_mse"] * n, m["ot_loss"] * n, float(n), float(vpdm_backbone.total_images_seen())],
            device,
        )
        seconds = _all_reduce_max(m["seconds"], device)
        start = time.perf_counter()
        # every rank alike (same images, same weights): the normal statistics the scores are standardised with
        engine.fit_statistics(_unwrap(model), config, train_x, train_class)
        val = validation_metrics(model, bundle, config, rank=rank, world=world, device=device)
        metrics = {
            "epoch": epoch + 1,
            "loss": loss / images,
            "eps_mse": eps / images,
            "ot_loss": ot / images,
            **val,
            "images": int(images),
            "epoch_seconds": seconds,
            "images_per_s": images / max(seconds, 1e-9),
            "val_seconds": time.perf_counter() - start,
            "workers": world,
            "threads_per_worker": threads,
            # backbone forwards in all worker processes together: 0, the features come from the object store
            "worker_backbone_forwards": int(forwards),
            "resumed_from_epoch": resumed_from,
            # lets the sweep driver release the workers' resources if Tune kills this trial (ASHA)
            "placement_group_id": placement_group_id,
        }
        with tempfile.TemporaryDirectory(prefix="vpdm-ckpt-") as directory:
            checkpoint = None
            if rank == 0:
                save_checkpoint(
                    Path(directory) / CHECKPOINT_FILE,
                    _unwrap(model),
                    config,
                    categories=bundle.categories,
                    extra={"trial": loop_config.get("trial"), "dataset": bundle.name, "metrics": metrics},
                    optimizer=optimizer,
                    epoch=epoch + 1,
                )
                checkpoint = ray.train.Checkpoint.from_directory(directory)
            ray.train.report(metrics, checkpoint=checkpoint)
        _maybe_pause(epoch + 1, rank, loop_config.get("trial"))
        _maybe_inject_fault(epoch + 1, rank, loop_config.get("trial"))

    resumed_from = start_epoch
    current_group = ray.util.get_current_placement_group()
    placement_group_id = current_group.id.hex() if current_group is not None else ""
    if start_epoch > 0:
        print(
            f"[{loop_config.get('trial')}] rank {rank}: resuming from the checkpoint of epoch {start_epoch} "
            f"(epochs {start_epoch + 1}..{total_epochs} to go)",
            flush=True,
        )
    if start_epoch >= total_epochs:
        return

    def before_epoch(epoch: int) -> None:
        sampler.set_epoch(epoch)
        _maybe_inject_nan(epoch + 1, rank, loop_config.get("trial"), model)

    try:
        engine.train_loop(
            model,
            loader,
            config.train,
            optimizer=optimizer,
            start_epoch=start_epoch,
            callback=on_epoch,
            device=device,
            progress=False,
            before_epoch=before_epoch,
            all_finite=_collective_finite(device) if world > 1 else None,
        )
    except engine.TrainingDiverged as exc:
        # Reported, not raised: a raised error would make Ray Train restart the worker group from the
        # last checkpoint (FailureConfig), which diverges again. The trial turns this into its status.
        # Train's Result only carries the metrics of the last *checkpoint*, so the trial learns about the
        # divergence from a note in the run's (shared) storage folder; Tune and MLflow see the report.
        note = loop_config.get("diverged_note")
        if rank == 0 and note:
            from vpdm.io import atomic_write_text

            atomic_write_text(
                note, json.dumps({"epoch": exc.epoch, "step": exc.step, "error": str(exc)}), what="divergence note"
            )
        worst = {
            "val_loss": 1e9,
            "val_pseudo_auroc": 0.0,
            "val_same_class_auroc": 0.0,
        }  # the convention of validation_metrics
        ray.train.report(
            {
                "epoch": exc.epoch,
                "diverged": 1,
                "diverged_step": exc.step,
                "error": str(exc),
                **worst,
                "placement_group_id": placement_group_id,
                "mlflow_run_id": loop_config.get("mlflow_run_id") or "",
            }
        )


def _fault_targets(trial: Any, variable: str, kind: str) -> bool:
    """Fault injection only for the trials ``variable`` lists by arrival order (``"1,3"``: the first
    and third trial to reach the fault point; unset = every trial). Trials run one at a time in the
    tests, so the order is the trial order; the order is kept in marker files under VPDM_FAULT_MARKER_DIR."""
    wanted = {int(w) for w in os.environ.get(variable, "").split(",") if w.strip()}
    if not wanted:
        return True
    folder = Path(os.environ["VPDM_FAULT_MARKER_DIR"]) / f"{kind}-order"
    folder.mkdir(parents=True, exist_ok=True)
    for existing in folder.iterdir():
        if existing.read_text() == str(trial):
            return int(existing.name) in wanted
    n = 1
    while True:
        try:
            fd = os.open(folder / str(n), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            n += 1
            continue
        os.write(fd, str(trial).encode())
        os.close(fd)
        return n in wanted


def _collective_finite(device: torch.device):
    """Every rank learns whether *any* rank's loss is non-finite, so all stop at the same step."""
    import torch.distributed as dist

    def all_finite(loss: Tensor) -> bool:
        flag = torch.tensor([1.0 if bool(torch.isfinite(loss)) else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item() > 0)

    return all_finite


def _maybe_inject_nan(epoch: int, rank: int, trial: Any, model: torch.nn.Module) -> None:
    """Fault-injection testing: with VPDM_FAULT_NAN_AT_EPOCH=N and VPDM_FAULT_MARKER_DIR=DIR set, the first
    trial to reach epoch N (of those VPDM_FAULT_NAN_TRIALS numbers; one marker file, created exclusively) gets NaN weights on rank 0 at its start,
    so its next loss is really NaN on that rank (the other ranks' losses stay finite)."""
    at, folder = os.environ.get("VPDM_FAULT_NAN_AT_EPOCH"), os.environ.get("VPDM_FAULT_MARKER_DIR")
    if (
        rank != 0
        or not at
        or not folder
        or epoch != int(at)
        or not _fault_targets(trial, "VPDM_FAULT_NAN_TRIALS", "nan")
    ):
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(Path(folder) / "nan-injected", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.write(fd, str(trial).encode())
    os.close(fd)
    with torch.no_grad():
        for p in _unwrap(model).parameters():
            p.fill_(float("nan"))


def _maybe_pause(epoch: int, rank: int, trial: Any) -> None:
    """Fault-injection testing: with VPDM_FAULT_PAUSE_AFTER_EPOCH=N and VPDM_FAULT_MARKER_DIR=DIR set, rank 0 of
    every trial (or those VPDM_FAULT_PAUSE_TRIALS numbers) stops once after reporting epoch N: it writes
    DIR/<trial>.paused and waits until DIR/release exists (at most VPDM_FAULT_PAUSE_TIMEOUT_S, default 1800 s).
    A test then acts at a known point of training (kill a server, kill the driver) instead of racing it."""
    after, folder = os.environ.get("VPDM_FAULT_PAUSE_AFTER_EPOCH"), os.environ.get("VPDM_FAULT_MARKER_DIR")
    if (
        rank != 0
        or not after
        or not folder
        or epoch != int(after)
        or not _fault_targets(trial, "VPDM_FAULT_PAUSE_TRIALS", "pause")
    ):
        return
    marker = Path(folder) / f"{trial}.paused"
    if marker.exists():  # once per trial: a resumed trial does not stop again
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(str(epoch))
    deadline = time.monotonic() + float(os.environ.get("VPDM_FAULT_PAUSE_TIMEOUT_S", "1800"))
    while not (Path(folder) / "release").exists() and time.monotonic() < deadline:
        time.sleep(0.2)


def _maybe_inject_fault(epoch: int, rank: int, trial: Any) -> None:
    """Fault-tolerance testing: with VPDM_FAULT_AFTER_EPOCH=N and VPDM_FAULT_MARKER_DIR=DIR set, rank 0 of
    every trial (or those VPDM_FAULT_TRIALS numbers) dies once, right after reporting epoch N (its checkpoint is
    then registered), so the worker group restarts (FailureConfig) and resumes from ``ray.train.get_checkpoint()``."""
    after, folder = os.environ.get("VPDM_FAULT_AFTER_EPOCH"), os.environ.get("VPDM_FAULT_MARKER_DIR")
    if (
        rank != 0
        or not after
        or not folder
        or epoch != int(after)
        or not _fault_targets(trial, "VPDM_FAULT_TRIALS", "crash")
    ):
        return
    marker = Path(folder) / f"{trial}.crashed"
    if marker.exists():
        return
    import ray.train

    # Die only once the controller has registered the epoch's checkpoint (reports are processed
    # asynchronously; a worker that dies right after report() can lose its last report).
    ray.train.get_all_reported_checkpoints(timeout_s=900)  # generous: a loaded machine is slow, not broken
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(str(epoch))
    os._exit(3)


def visible_threads() -> int:
    """CPU threads this process may use (affinity-aware)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1
