"""MLflow plumbing for sweeps: tracking-URI checks, the sweep's experiment, and fault-tolerant logging.

* The tracking URI is resolved (``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else
  ``sqlite:///mlflow.db`` in the working directory; relative sqlite paths are made absolute, since
  trials run in other processes and working directories) and probed *before* anything starts.
* The experiment is created by the sweep driver only: concurrent creation from trials races on
  sqlite. Local stores get an absolute artifact location next to the database, so artifacts
  outlive a ``ray job submit`` working directory.
* Trials log with :class:`RunLogger`: every call retries a few times and then only warns, so a
  transient tracking failure (a locked sqlite file, a restarting server) never kills training;
  what could not be logged is kept in the trial's folder and replayed by ``python -m tune.recover``.
"""

from __future__ import annotations

import logging
import math
import os
import random
import re
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
        except (TimeoutError, urllib.error.URLError, ConnectionError, OSError) as exc:
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
            "pass another --experiment, omit it for a timestamped name, or add --resume to continue that sweep"
        )


def find_experiment(uri: str, name: str) -> str:
    """Id of the active experiment ``name`` (a sweep to resume), else :class:`TrackingError`."""
    from mlflow import MlflowClient

    experiment = MlflowClient(tracking_uri=uri).get_experiment_by_name(name)
    if experiment is None or experiment.lifecycle_stage != "active":
        state = "no experiment" if experiment is None else "only a deleted experiment"
        raise TrackingError(
            f"--resume: MLflow at {uri} has {state} named {name!r}; nothing to resume "
            "(check --experiment and --tracking-uri)"
        )
    return experiment.experiment_id


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
                logger.warning(
                    "MLflow: %s failed after %d attempts: %s", what, attempts, str(exc).splitlines()[0][:300]
                )
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


PENDING_DIR = "mlflow-pending"  # in a trial's (or the sweep's) folder: what could not be logged
PENDING_PREFIX = "pending-"  # run id of a run that could not even be created yet


def quick_http_env() -> None:
    """Trials must not hang for minutes on an unreachable server (MLflow retries HTTP 7 times with
    backoff by default): a few short retries, then the call is spooled. Users' settings win."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")


def _looks_unreachable(uri: str, exc: BaseException | None) -> bool:
    """A failure that means "the server is gone" (go offline a while), not "this call was wrong"
    (a rejected value) and not a local store (sqlite/file: retry every call on its own)."""
    if not uri.startswith(("http://", "https://")) or exc is None:
        return False
    code = getattr(exc, "error_code", None)
    return code not in ("INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST", "BAD_REQUEST")


_METRIC_NAME = re.compile(r"[^A-Za-z0-9_\-. :/]")


def metric_name(name: str) -> str:
    """MLflow accepts letters, digits and ``_-. :/`` in metric names: anything else becomes ``_``
    (class names like ``demo/grid#2`` from a union of datasets)."""
    return _METRIC_NAME.sub("_", name)[:250]


class RunLogger:
    """Fault-tolerant logging into one MLflow run by id (no global active run needed).

    Every call retries with backoff and then gives up with a warning, so tracking never stops
    training. With ``spool_dir`` set, a call that gave up is not lost: it is appended to
    ``spool_dir/mlflow-pending/<name>.jsonl`` (artifacts copied next to it) and
    ``python -m tune.recover`` replays it later. After a failure the logger stays *offline* for
    ``offline_seconds``: calls go straight to the spool instead of retrying against a dead server.
    A run that cannot be created gets a ``pending-...`` id that the replay maps to the real one.
    """

    attempts = 5  # per call, with backoff (about 6 s in all) before giving up with a warning
    offline_seconds = 30.0

    def __init__(self, tracking_uri: str, run_id: str | None, spool_dir: str | Path | None = None, name: str = "run"):
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.spool_dir = Path(spool_dir) if spool_dir is not None else None
        self.name = f"{_safe_name(name)}-{os.getpid()}"
        self.failures = 0  # calls that could not be logged (spooled when spool_dir is set)
        self.resumed = False  # reopened by resume_or_start: its params were logged by the first attempt
        self._offline_until = 0.0
        self._client = None

    @property
    def enabled(self) -> bool:
        return self.run_id is not None

    @property
    def pending(self) -> bool:
        """The run itself does not exist in MLflow yet (its creation was spooled)."""
        return bool(self.run_id) and self.run_id.startswith(PENDING_PREFIX)

    @property
    def spool_file(self) -> Path | None:
        return None if self.spool_dir is None else self.spool_dir / PENDING_DIR / f"{self.name}.jsonl"

    @property
    def client(self):
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    @classmethod
    def start(
        cls,
        tracking_uri: str,
        experiment_id: str,
        run_name: str,
        tags: Mapping[str, Any],
        spool_dir: str | Path | None = None,
    ) -> RunLogger:
        logger_ = cls(tracking_uri, None, spool_dir, name=run_name)
        str_tags = {k: str(v) for k, v in tags.items()}
        run = retrying(
            lambda: logger_.client.create_run(experiment_id, run_name=run_name, tags=str_tags),
            what=f"creating run {run_name!r}",
            attempts=cls.attempts,
        )
        if run is not None:
            logger_.run_id = run.info.run_id
        elif logger_.spool_dir is not None:
            import uuid

            logger_.run_id = PENDING_PREFIX + uuid.uuid4().hex
            logger_.failures += 1
            logger_._spool({"op": "create_run", "experiment_id": experiment_id, "run_name": run_name, "tags": str_tags})
            logger_._offline_until = time.monotonic() + cls.offline_seconds
        return logger_

    @classmethod
    def resume_or_start(
        cls,
        tracking_uri: str,
        experiment_id: str,
        run_name: str,
        tags: Mapping[str, Any],
        match: Mapping[str, str],
        spool_dir: str | Path | None = None,
    ) -> RunLogger:
        """Reopen the run whose tags equal ``match`` (a trial restarted after a driver crash), else start one:
        a resumed sweep must not leave two runs for one trial."""
        filters = " and ".join(f"tags.`{k}` = '{v}'" for k, v in match.items())
        found = retrying(
            lambda: list(iter_runs(tracking_uri, experiment_id, filters)), what=f"looking up run {run_name!r}"
        )
        if found:
            logger_ = cls(tracking_uri, found[0].info.run_id, spool_dir, name=run_name)
            logger_.resumed = True
            retrying(logger_.client.update_run, logger_.run_id, "RUNNING", what="reopening the run")
            logger_.set_tags({"vpdm.resumed": "true"})
            logger.info("reusing MLflow run %s for %s", logger_.run_id, run_name)
            return logger_
        return cls.start(tracking_uri, experiment_id, run_name, tags, spool_dir)

    # -- calls -------------------------------------------------------------------------------
    def _spool(self, record: dict[str, Any]) -> None:
        import json

        if self.spool_file is None:
            return
        try:
            self.spool_file.parent.mkdir(parents=True, exist_ok=True)
            with open(self.spool_file, "a") as fh:
                fh.write(
                    json.dumps(
                        {"run_id": self.run_id, "tracking_uri": self.tracking_uri, "time": time.time(), **record}
                    )
                    + "\n"
                )
        except OSError as exc:
            logger.warning("MLflow: cannot keep the unlogged %s in %s: %s", record.get("op"), self.spool_file, exc)

    def _call(
        self, record: dict[str, Any] | Callable[[], dict[str, Any]], fn: Callable[..., Any], *args: Any, what: str
    ) -> bool:
        """Run one MLflow call; on failure spool ``record`` (or what it returns; when there is a spool)
        and go offline a while."""
        if not self.enabled:
            return False
        if not self.pending and time.monotonic() >= self._offline_until:
            ok: list[Any] = [False, None]

            def attempt() -> None:
                try:
                    fn(*args)
                except Exception as exc:
                    ok[1] = exc
                    raise
                ok[0] = True

            retrying(attempt, what=what, attempts=self.attempts)
            if ok[0]:
                return True
            if _looks_unreachable(self.tracking_uri, ok[1]):
                self._offline_until = time.monotonic() + self.offline_seconds
        self.failures += 1
        if self.spool_file is not None:
            self._spool(record() if callable(record) else record)
        if self.failures == 1 and self.spool_file is not None:
            logger.warning(
                "MLflow unreachable: keeping what could not be logged in %s (replay: python -m tune.recover %s)",
                self.spool_file,
                self.spool_dir,
            )
        return False

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = {k[:250]: str(v)[:6000] for k, v in params.items()}
        if self.resumed and not self.pending:
            items = self._params_not_yet_logged(items)
        keys = list(items)
        for start in range(0, len(keys), 100):  # MLflow's per-batch limit
            chunk = {k: items[k] for k in keys[start : start + 100]}
            self._call(
                {"op": "params", "params": chunk},
                lambda c=chunk: self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in c.items()]),
                what="logging params",
            )

    def _params_not_yet_logged(self, items: dict[str, str]) -> dict[str, str]:
        """MLflow refuses to change a logged param, and a resumed run logged them all before: keep the new keys
        only, and say in a tag (``vpdm.resumed.changed_params``) which values the resumed attempt has
        differently (the driver's batch counts, a concurrency fitted to the cluster it came back on)."""
        run = retrying(lambda: self.client.get_run(self.run_id), what="reading the resumed run's params")
        if run is None:
            return items  # unreadable now: logged as usual (the calls fail or spool as any other)
        logged = run.data.params
        changed = {k: (logged[k], v) for k, v in items.items() if k in logged and logged[k] != v}
        if changed:
            note = "; ".join(f"{k}: {old} -> {new}" for k, (old, new) in sorted(changed.items()))
            logger.info("MLflow run %s resumed with other values of %d param(s): %s", self.run_id, len(changed), note)
            self.set_tags({"vpdm.resumed.changed_params": note})
        return {k: v for k, v in items.items() if k not in logged}

    def log_metrics(self, metrics: Mapping[str, Any], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        values = {metric_name(k): v for k, v in numeric_metrics(metrics).items()}
        keys = list(values)
        for start in range(0, len(keys), 1000):
            chunk = {k: values[k] for k in keys[start : start + 1000]}
            self._call(
                {"op": "metrics", "metrics": chunk, "step": step, "timestamp": now},
                lambda c=chunk: self.client.log_batch(
                    self.run_id, metrics=[Metric(k, v, now, step) for k, v in c.items()]
                ),
                what="logging metrics",
            )

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = {k: str(v)[:5000] for k, v in tags.items()}
        self._call(
            {"op": "tags", "tags": items},
            lambda: self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in items.items()]),
            what="setting tags",
        )

    def _keep_files(self, source: Path) -> str | None:
        """Copy a file or folder into the spool (the original is often a temporary folder)."""
        import shutil
        import uuid

        if self.spool_file is None:
            return None
        target = self.spool_file.parent / "files" / uuid.uuid4().hex / source.name
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            if source.is_dir():
                shutil.copytree(source, target)
            else:
                shutil.copy2(source, target)
        except OSError as exc:
            logger.warning("MLflow: cannot keep %s in the spool: %s", source, exc)
            return None
        return str(target.relative_to(self.spool_file.parent))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._artifacts("artifact", Path(path), artifact_path, self.client.log_artifact if self.enabled else None)

    def log_artifacts(self, folder: str | Path, artifact_path: str | None = None) -> None:
        self._artifacts("artifacts", Path(folder), artifact_path, self.client.log_artifacts if self.enabled else None)

    def _artifacts(self, op: str, path: Path, artifact_path: str | None, fn: Callable[..., Any] | None) -> None:
        if fn is not None:  # the files are copied into the spool only if the call fails
            self._call(
                lambda: {"op": op, "path": self._keep_files(path), "artifact_path": artifact_path},
                fn,
                self.run_id,
                str(path),
                artifact_path,
                what=f"logging {path.name}",
            )

    def keep_record(self, record: dict[str, Any]) -> None:
        """Keep a call made elsewhere (e.g. a registration) that failed, for the replay."""
        self.failures += 1
        self._spool(record)

    def keep_model(self, checkpoint: str | Path, example_images: list[str] | None = None) -> None:
        """The pyfunc model could not be logged: keep its checkpoint so the replay can log it."""
        if self.enabled and self.spool_file is not None:
            self.failures += 1
            self._spool(
                {
                    "op": "model",
                    "checkpoint": self._keep_files(Path(checkpoint)),
                    "example_images": [str(p) for p in example_images or []],
                }
            )

    def finish(self, status: str = "FINISHED") -> None:
        self._call(
            {"op": "finish", "status": status},
            lambda: self.client.set_terminated(self.run_id, status),
            what=f"closing the run as {status}",
        )


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
