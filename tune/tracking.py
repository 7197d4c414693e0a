"""MLflow plumbing for sweeps: tracking-URI checks, the sweep's experiment, and fault-tolerant logging.

* The tracking URI is resolved (``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else
  ``sqlite:///mlflow.db`` in the working directory; relative sqlite paths are made absolute, since
  trials run in other processes and working directories) and probed *before* anything starts.
* The experiment is created by the sweep driver only: concurrent creation from trials races on
  sqlite. Local stores get an absolute artifact location next to the database, so artifacts
  outlive a ``ray job submit`` working directory.
* Trials log with :class:`RunLogger`: every call retries a few times and then only warns, so a
  transient tracking failure (a locked sqlite file, a restarting server) never kills training.
"""

from __future__ import annotations

import logging
import math
import os
import random
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from vpdm.errors import VPDMError

logger = logging.getLogger("tune.tracking")

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
T = TypeVar("T")


class TrackingError(VPDMError):
    """The MLflow tracking store cannot be used (unreachable, unwritable, name taken)."""


def resolve_tracking_uri(uri: str | None = None, cwd: str | Path | None = None) -> str:
    """The URI a sweep logs to, with relative local paths made absolute."""
    uri = (uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI).strip()
    base = Path(cwd or os.getcwd())
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///") :]
        if not path.startswith("/"):
            path = str((base / path).resolve())
        return "sqlite:///" + path  # absolute: sqlite:////abs/path/mlflow.db
    if uri.startswith("file:"):
        return uri
    if "://" not in uri and not uri.startswith(("databricks", "uc:")):
        return Path(base / uri).resolve().as_uri()  # a bare folder is a file store
    return uri


def sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None


def local_store_dir(uri: str) -> Path | None:
    """Folder of a local store (the sqlite file's folder, or the file store), else None."""
    db = sqlite_path(uri)
    if db is not None:
        return db.parent
    if uri.startswith("file:"):
        return Path(urllib.parse.urlparse(uri).path)
    return None


@contextmanager
def _quick_http_failures(timeout: float):
    """MLflow retries HTTP requests for minutes by default; a probe must fail fast."""
    keys = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(int(max(1, timeout)))}
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update(keys)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def check_tracking_uri(uri: str, timeout: float = 10.0) -> None:
    """Raise :class:`TrackingError` unless the store at ``uri`` answers (or, for sqlite, can be created)."""
    db = sqlite_path(uri)
    if db is not None:
        if not db.parent.is_dir():
            raise TrackingError(f"MLflow tracking URI {uri!r}: folder {str(db.parent)!r} does not exist")
        if not os.access(db.parent, os.W_OK):
            raise TrackingError(f"MLflow tracking URI {uri!r}: folder {str(db.parent)!r} is not writable")
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme in ("http", "https"):
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
        except urllib.error.HTTPError:
            pass  # it answered: a server without /health (or behind auth) is still reachable
        except (urllib.error.URLError, socket.timeout, ConnectionError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TrackingError(
                f"MLflow tracking server {uri!r} is unreachable ({reason}); start it (e.g. `mlflow server "
                "--backend-store-uri sqlite:///mlflow.db`), fix --tracking-uri / MLFLOW_TRACKING_URI, or omit both "
                f"to use {DEFAULT_TRACKING_URI}"
            ) from None
    from mlflow import MlflowClient

    try:
        with _quick_http_failures(timeout):
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as exc:  # any failure here means the sweep could not log
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TrackingError(f"MLflow tracking store {uri!r} cannot be used: {first[:300]}") from None


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "experiment"


def check_experiment_free(uri: str, name: str) -> None:
    """One experiment per sweep: refuse a name that exists (also deleted ones, which MLflow keeps)."""
    from mlflow import MlflowClient

    from mlflow.entities import ViewType

    client = MlflowClient(tracking_uri=uri)
    found = client.search_experiments(view_type=ViewType.ALL, filter_string=f"name = '{name}'")
    if found:
        state = "a deleted experiment" if found[0].lifecycle_stage == "deleted" else "an experiment"
        raise TrackingError(
            f"MLflow already has {state} named {name!r} (each sweep gets its own experiment); "
            "pass another --experiment or omit it for a timestamped name"
        )


def create_experiment(uri: str, name: str, tags: Mapping[str, Any] | None = None) -> str:
    """Create the sweep's experiment (driver only); local stores get an absolute artifact folder."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    store = local_store_dir(uri)
    location = None
    if store is not None:
        location = (store / "mlartifacts" / _safe_name(name)).resolve().as_uri()
    return client.create_experiment(name, artifact_location=location, tags={k: str(v) for k, v in (tags or {}).items()})


def retrying(fn: Callable[..., T], *args: Any, what: str, attempts: int = 5, **kwargs: Any) -> T | None:
    """Call ``fn``; on failure retry with backoff, then log a warning and return None (never raise)."""
    for attempt in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - tracking must not kill training
            if attempt == attempts - 1:
                logger.warning("MLflow: %s failed after %d attempts: %s", what, attempts, str(exc).splitlines()[0][:300])
                return None
            time.sleep(0.2 * 2**attempt + random.random() * 0.2)
    return None


def numeric_metrics(values: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of ``values`` (bools and strings dropped), as floats."""
    out = {}
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(float(value)):
            out[key] = float(value)
    return out


class RunLogger:
    """Fault-tolerant logging into one MLflow run by id (no global active run needed)."""

    attempts = 5  # per call, with backoff (about 6 s in all) before giving up with a warning

    def __init__(self, tracking_uri: str, run_id: str | None):
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self._client = None

    @property
    def enabled(self) -> bool:
        return self.run_id is not None

    @property
    def client(self):
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    @classmethod
    def start(cls, tracking_uri: str, experiment_id: str, run_name: str, tags: Mapping[str, Any]) -> RunLogger:
        logger_ = cls(tracking_uri, None)
        run = retrying(
            lambda: logger_.client.create_run(experiment_id, run_name=run_name, tags={k: str(v) for k, v in tags.items()}),
            what=f"creating run {run_name!r}",
        )
        logger_.run_id = run.info.run_id if run is not None else None
        return logger_

    def log_params(self, params: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Param

        items = [Param(k[:250], str(v)[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow's per-batch limit
            retrying(self.client.log_batch, self.run_id, params=items[start : start + 100], what="logging params", attempts=self.attempts)

    def log_metrics(self, metrics: Mapping[str, Any], step: int = 0) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, v, now, step) for k, v in numeric_metrics(metrics).items()]
        for start in range(0, len(items), 1000):
            retrying(self.client.log_batch, self.run_id, metrics=items[start : start + 1000], what="logging metrics", attempts=self.attempts)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)[:5000]) for k, v in tags.items()]
        retrying(self.client.log_batch, self.run_id, tags=items, what="setting tags", attempts=self.attempts)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.enabled:
            retrying(self.client.log_artifact, self.run_id, str(path), artifact_path, what=f"logging {Path(path).name}", attempts=self.attempts)

    def log_artifacts(self, folder: str | Path, artifact_path: str | None = None) -> None:
        if self.enabled:
            retrying(self.client.log_artifacts, self.run_id, str(folder), artifact_path, what=f"logging {folder}", attempts=self.attempts)

    def finish(self, status: str = "FINISHED") -> None:
        if self.enabled:
            retrying(self.client.set_terminated, self.run_id, status, what=f"closing the run as {status}", attempts=self.attempts)


def iter_runs(uri: str, experiment_id: str, filter_string: str = "") -> Iterable[Any]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    token = None
    while True:
        page = client.search_runs([experiment_id], filter_string=filter_string, max_results=1000, page_token=token)
        yield from page
        token = page.token
        if not token:
            break


def ui_command(uri: str) -> str:
    """How a person browses the sweep."""
    if uri.startswith(("http://", "https://")):
        return f"open {uri} in a browser"
    return f"mlflow ui --backend-store-uri {uri}"
