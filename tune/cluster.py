"""The Ray cluster a sweep runs on: connect to one or start a local one, check that it fits a trial, where its logs are."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tune.plan import RAY_OUTPUT, SweepConfig, SweepError

# -- Ray -----------------------------------------------------------------------------------------------


def per_trial_cpus(sc: SweepConfig) -> int:
    return 1 + sc.workers * sc.threads_per_worker  # the trial (Train driver, then evaluation) + workers


def start_ray(sc: SweepConfig) -> tuple[bool, int | None]:
    """Connect to ``address`` / $RAY_ADDRESS, or start a local Ray. Returns (started_here, max_concurrent)."""
    import ray

    from tune.distributed import visible_threads

    # Worker processes import torch and a model; on a busy laptop the default 60 s start limit is tight.
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")
    if ray.is_initialized():
        return False, sc.max_concurrent
    address = sc.address or os.environ.get("RAY_ADDRESS")
    if address:
        try:
            ray.init(address=address, log_to_driver=sc.verbose >= RAY_OUTPUT)
        except Exception as exc:  # noqa: BLE001 - ConnectionError, ValueError, ...
            raise SweepError(f"cannot connect to the Ray cluster at {address!r}: {str(exc).splitlines()[0]}") from None
        return True, sc.max_concurrent
    per_trial = per_trial_cpus(sc)
    max_concurrent = sc.max_concurrent or max(1, visible_threads() // per_trial)
    num_cpus = sc.num_cpus or max(visible_threads(), max_concurrent * per_trial)
    # The dashboard (when ray[default] is installed) serves the State API that Ray Train's placement-group
    # cleaner uses after ASHA kills a trial; without it the cleaner actors only log warnings.
    kwargs: dict[str, Any] = {
        "num_cpus": num_cpus,
        "include_dashboard": sc.dashboard,
        "dashboard_host": "127.0.0.1",
        "log_to_driver": sc.verbose >= RAY_OUTPUT,
        "_node_ip_address": LOOPBACK,
    }
    if sc.ray_temp_dir:
        kwargs["_temp_dir"] = str(Path(sc.ray_temp_dir).resolve())
    with single_machine_ray():
        ray.init(**kwargs)
    return True, max_concurrent


LOOPBACK = "127.0.0.1"
# Ray's single-machine mode (its default on macOS and Windows): the node address is 127.0.0.1, and with
# it the GCS, raylet, object manager, dashboard and workers listen on loopback only.
SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextmanager
def single_machine_ray() -> Iterator[None]:
    """Start a local Ray bound to 127.0.0.1 instead of every interface.

    On Linux Ray replaces a node address of 127.0.0.1 by the machine's routable address unless its
    cluster mode is off (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, read by the processes ``ray.init``
    starts, and ``ray_constants.ENABLE_RAY_CLUSTER`` in this already imported driver). Both are set
    for the start only, so a later connection to a real cluster from this process is unaffected.
    """
    from ray._private import ray_constants

    old_env, old_flag = os.environ.get(SINGLE_MACHINE_ENV), getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    os.environ[SINGLE_MACHINE_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        if old_env is None:
            os.environ.pop(SINGLE_MACHINE_ENV, None)
        else:
            os.environ[SINGLE_MACHINE_ENV] = old_env
        if old_flag is not None:
            ray_constants.ENABLE_RAY_CLUSTER = old_flag


def check_cluster(sc: SweepConfig) -> tuple[bool, int]:
    """(use_gpu, max_concurrent) that the cluster can actually run; SweepError if not even one trial fits."""
    import ray

    res = ray.cluster_resources()
    cpus, gpus = float(res.get("CPU", 0)), float(res.get("GPU", 0))
    use_gpu = sc.use_gpu if sc.use_gpu is not None else gpus >= sc.workers
    if use_gpu and gpus < sc.workers:
        raise SweepError(f"use_gpu needs {sc.workers} GPU(s) (one per worker); the Ray cluster has {gpus:g}")
    need = per_trial_cpus(sc)
    if cpus < need:
        raise SweepError(
            f"one trial needs {need} CPUs (1 for the trial + {sc.workers} worker(s) x {sc.threads_per_worker} "
            f"thread(s)); the Ray cluster has {cpus:g}: use fewer --workers/--threads-per-worker"
        )
    fit = max(1, int(cpus // need))
    if use_gpu:
        fit = min(fit, max(1, int(gpus // sc.workers)))
    return use_gpu, fit


def driver_device(use_gpu: bool) -> Any:
    """Where the driver extracts features: cuda when the sweep runs on GPUs and this process sees one, else
    the CPU (the cluster's GPUs may all be on other nodes; the driver then extracts on its CPU)."""
    import torch

    return torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")


def ray_logs_dir() -> str:
    """Where Ray keeps the output of this driver's trials and Train workers: the session's ``logs`` folder
    (``worker-*.out/.err`` per process, ``train/ray-train-*.log``) on the node this driver runs on."""
    from ray._private import worker

    node = getattr(worker, "_global_node", None)
    try:
        return str(Path(node.get_logs_dir_path()).resolve()) if node is not None else ""
    except Exception:  # noqa: BLE001 - a Ray client connection (ray://) has no local node
        return ""
