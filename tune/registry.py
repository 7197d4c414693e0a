"""Safe promotion in the MLflow model registry: a sweep proposes, ``@champion`` moves only on evidence.

Every sweep registers the best trial of each dataset as a new version with the alias ``challenger``.
The alias ``champion`` (what ``models:/NAME@champion`` serves) then moves to it only when

* the registered model has no champion yet (``first version``), or
* the challenger beats the current champion on the sweep's validation metric, both computed here,
  by the same function (:func:`tune.distributed.validation_metrics`), on the same data: *this*
  sweep's held-out validation images (``promoted``; a tie keeps the champion), or
* the user asks for it (``--promote``: ``forced``).

Otherwise the champion stays (``kept champion vN``). When the champion cannot be scored on this
sweep's data (its backbone makes other features, its checkpoint is missing or broken, ...) it stays
too, and the reason says so and that ``--promote`` forces the move. Nothing is deleted: every
version stays in the registry. The decision, the metric, both values and the reason are tags
(``promotion.*``) of the challenger's version, so the registry itself tells why ``@champion`` is where
it is.

Names: by default one registered model per dataset, ``vpdm-<dataset>`` (the dataset's slug, e.g.
``vpdm-mvtec-bottle``, or the ``NAME`` of ``--data NAME=SPEC``), so two products never share a name and
never compete for one champion. ``--model-name`` overrides it (a prefix when a sweep has several
datasets).

Re-running a decision is safe: a version already registered for the same run is reused, and a
decision already recorded in its tags is finished (the alias moved) rather than made again, so a
resumed sweep or a replay (``python -m tune.recover``) never registers or decides twice.
"""

from __future__ import annotations

import logging
import math
import re
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vpdm.errors import ConfigError, VPDMError

logger = logging.getLogger("tune.registry")

__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "Promotion",
    "Unscoreable",
    "ValidationData",
    "beats",
    "decide",
    "default_model_name",
    "download_checkpoint",
    "register_challenger",
    "registered_name",
    "score_checkpoint",
]

CHAMPION = "champion"
CHALLENGER = "challenger"
DEFAULT_PREFIX = "vpdm"
FIRST, PROMOTED, FORCED, KEPT = "first version", "promoted", "forced", "kept champion"
TAG = "promotion."  # prefix of the decision's tags on the challenger's version


class Unscoreable(VPDMError):
    """A registered version cannot be scored on this sweep's validation data (and why)."""


def default_model_name(dataset: str) -> str:
    """The registered name of a dataset's models when the user gives none: ``vpdm-<dataset>``."""
    return f"{DEFAULT_PREFIX}-{dataset}"


def registered_name(model_name: str | None, dataset: str, num_datasets: int) -> str:
    """The registered model name of ``dataset``: ``vpdm-<dataset>`` by default; ``model_name`` itself for a
    sweep of one dataset; ``<model_name>-<dataset>`` for several. Raises ConfigError for a name MLflow
    cannot put in a ``models:/`` URI."""
    from mlflow.exceptions import MlflowException

    if model_name is None:
        name = default_model_name(dataset)
    elif num_datasets == 1:
        name = model_name
    else:
        name = f"{model_name}-{dataset}"
    try:
        return _check_name(name)
    except MlflowException as exc:
        raise ConfigError(
            f"--model-name {model_name!r} gives dataset {dataset!r} the name {name!r}: {exc.message}"
        ) from None


def beats(challenger: float, champion: float, mode: str) -> bool:
    """Strictly better in the metric's direction (``max`` or ``min``); a tie keeps the champion."""
    if mode not in ("max", "min"):
        raise ConfigError(f"metric mode must be 'max' or 'min', got {mode!r}")
    if not (math.isfinite(challenger) and math.isfinite(champion)):
        return False
    return challenger > champion if mode == "max" else challenger < champion


@dataclass
class ValidationData:
    """What a comparison scores on: a sweep's held-out validation images and how they were chosen.

    ``bundle`` is called at most once, and only when there is a champion to compare with (the replay
    of a registration rebuilds the features then, from the feature cache when it is warm).
    """

    data_spec: str
    backbone: dict[str, Any]  # to_dict of the BackboneConfig the features were made with
    seed: int
    val_fraction: float
    bundle: Callable[[], Any]  # -> tune.features.DatasetBundle
    _built: list[Any] = field(default_factory=list, init=False, repr=False, compare=False)

    @property
    def split(self) -> str:
        return f"seed={self.seed} val_fraction={self.val_fraction:g}"

    def get(self) -> Any:
        """The bundle, built on first use."""
        if not self._built:
            self._built.append(self.bundle())
        return self._built[0]


@dataclass
class Promotion:
    """The registry's answer for one dataset of a sweep (also what the summary prints)."""

    model_name: str
    version: str  # the challenger: this sweep's best trial
    decision: str  # first version | promoted | kept champion vN | forced
    champion: str  # the version that holds @champion after the decision
    previous_champion: str | None
    metric: str
    challenger_value: float | None
    champion_value: float | None  # the previous champion, re-scored on this sweep's validation data
    reason: str

    @property
    def promoted(self) -> bool:
        return self.champion == self.version

    def line(self) -> str:
        return f"{self.model_name} v{self.version} @{CHAMPION if self.promoted else CHALLENGER}: {self.decision}: {self.reason}"

    def tags(self, sweep: str, data_spec: str, split: str) -> dict[str, str]:
        values = {
            "sweep": sweep,
            "data_spec": data_spec,
            "split": split,
            "metric": self.metric,
            "challenger_value": _num(self.challenger_value),
            "champion_value": _num(self.champion_value),
            "previous_champion": self.previous_champion or "",
            "decision": self.decision,
            "reason": self.reason,
        }
        return {f"{TAG}{k}": v for k, v in values.items()}

    @classmethod
    def from_tags(cls, model_name: str, version: Any, champion: str | None) -> Promotion:
        tags = dict(version.tags or {})

        def number(key: str) -> float | None:
            raw = tags.get(f"{TAG}{key}", "")
            try:
                return float(raw) if raw else None
            except ValueError:
                return None

        return cls(
            model_name,
            str(version.version),
            tags.get(f"{TAG}decision", ""),
            champion or "",
            tags.get(f"{TAG}previous_champion") or None,
            tags.get(f"{TAG}metric", ""),
            number("challenger_value"),
            number("champion_value"),
            tags.get(f"{TAG}reason", ""),
        )


def _num(value: float | None) -> str:
    return "" if value is None else repr(float(value))


# -- scoring ------------------------------------------------------------------------------------------


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def score_checkpoint(path: str | Path, validation: ValidationData, metric: str) -> float:
    """``metric`` of the checkpoint at ``path`` on ``validation``'s held-out images, computed as the
    sweep's trials compute it (:func:`tune.distributed.validation_metrics`, the model's own sampling and
    scoring settings). Raises :class:`Unscoreable` saying why when that is not possible."""
    from tune.distributed import validation_metrics
    from vpdm.config.values import to_dict
    from vpdm.errors import CheckpointError
    from vpdm.inference.checkpoint import load_checkpoint

    try:
        model, config, payload = load_checkpoint(path, map_location=_device())
    except CheckpointError as exc:
        raise Unscoreable(f"its checkpoint does not load: {exc}") from None
    mine = to_dict(config.backbone)
    different = sorted(k for k in set(mine) | set(validation.backbone) if mine.get(k) != validation.backbone.get(k))
    if different:
        shown = ", ".join(
            f"backbone.{k}={mine.get(k)!r} (this sweep: {validation.backbone.get(k)!r})" for k in different
        )
        raise Unscoreable(f"it was trained on other features: {shown}")
    try:
        bundle = validation.get()
    except Exception as exc:  # noqa: BLE001 - a replay whose data is gone: nothing to compare on
        raise Unscoreable(
            f"this sweep's validation data ({validation.data_spec}) cannot be built: {_first_line(exc)}"
        ) from None
    channels, side, _ = bundle.feature_shape
    if (int(payload["channels"]), int(payload["feature_size"])) != (channels, side):
        raise Unscoreable(
            f"it expects {payload['channels']} x {payload['feature_size']}^2 features; this sweep's are "
            f"{channels} x {side}^2"
        )
    try:
        value = float(validation_metrics(model, bundle, config, device=_device())[metric])
    except KeyError:
        raise Unscoreable(f"the validation metrics have no {metric!r}") from None
    if not math.isfinite(value):
        raise Unscoreable(f"its {metric} on this data is {value}")
    return value


def download_checkpoint(name: str, version: str, folder: Path) -> Path:
    """Download the VPDM checkpoint of version ``version`` of ``name`` (its MLmodel and that one artifact)."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.models import Model

    root = MlflowClient().get_model_version_download_uri(name, version).rstrip("/")
    spec = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{root}/MLmodel", dst_path=str(folder / "spec")))
    try:
        relative = Model.load(str(spec)).flavors["python_function"]["artifacts"]["checkpoint"]["path"]
    except (KeyError, TypeError) as exc:
        raise Unscoreable(f"v{version} is not a VPDM pyfunc model with a checkpoint artifact (no {exc})") from None
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{root}/{relative}", dst_path=str(folder)))
    except Exception as exc:  # noqa: BLE001 - deleted from the artifact store, ...
        raise Unscoreable(
            f"v{version}'s checkpoint artifact {relative} cannot be downloaded: {_first_line(exc)}"
        ) from None


def _score_version(name: str, version: str, validation: ValidationData, metric: str) -> float:
    with tempfile.TemporaryDirectory(prefix="vpdm-promotion-") as folder:
        try:
            path = download_checkpoint(name, version, Path(folder))
        except Unscoreable:
            raise
        except Exception as exc:  # noqa: BLE001 - any download failure: this version cannot be scored now
            raise Unscoreable(f"v{version} cannot be downloaded: {_first_line(exc)}") from None
        try:
            return score_checkpoint(path, validation, metric)
        except Unscoreable:
            raise
        except Exception as exc:  # noqa: BLE001 - a model that fails on this data is not comparable
            raise Unscoreable(f"scoring it failed: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


# -- the decision -------------------------------------------------------------------------------------


def _version_of_run(client: Any, name: str, run_id: str) -> Any | None:
    """The newest version of ``name`` registered from ``run_id`` (a resumed sweep or a replay), or None."""
    if not client.search_registered_models(filter_string=f"name = '{name}'"):
        return None
    found = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    return max(found, key=lambda v: int(v.version)) if found else None


def _alias(client: Any, name: str, alias: str) -> str | None:
    aliases = client.get_registered_model(name).aliases or {}
    version = aliases.get(alias)
    return str(version) if version is not None else None


def decide(
    name: str,
    version: str,
    *,
    champion: str | None,
    metric: str,
    mode: str,
    validation: ValidationData | None,
    force: bool = False,
    trial_value: float | None = None,
) -> Promotion:
    """Whether version ``version`` of ``name`` takes ``@champion`` from ``champion`` (see the module doc)."""

    def promotion(
        decision: str, new_champion: str, reason: str, chal: float | None = None, champ: float | None = None
    ) -> Promotion:
        return Promotion(name, version, decision, new_champion, champion, metric, chal, champ, reason)

    if champion is None:
        return promotion(FIRST, version, f"{name} had no champion", trial_value)
    if champion == version:
        return promotion(PROMOTED, version, "it already holds @champion", trial_value)
    hint = "pass --promote to make it champion anyway"
    if validation is None:
        why = "no validation data to re-score the champion on"
        if force:
            return promotion(FORCED, version, f"asked with --promote ({why})", trial_value)
        return promotion(f"{KEPT} v{champion}", champion, f"{why}; {hint}", trial_value)
    values: dict[str, float] = {}
    problems: dict[str, str] = {}
    for who, v in (("champion", champion), ("challenger", version)):
        try:
            values[who] = _score_version(name, v, validation, metric)
        except Unscoreable as exc:
            problems[who] = f"{who} v{v} cannot be scored on this sweep's validation data: {exc}"
    chal, champ = values.get("challenger"), values.get("champion")
    compared = (
        (
            f"{metric} {chal:.4f} vs champion v{champion}'s {champ:.4f}, both scored on this sweep's validation "
            f"data ({validation.data_spec}, {validation.split})"
        )
        if chal is not None and champ is not None
        else ""
    )
    if force:
        return promotion(FORCED, version, "asked with --promote" + (f" ({compared})" if compared else ""), chal, champ)
    if problems:
        return promotion(f"{KEPT} v{champion}", champion, "; ".join(problems.values()) + f"; {hint}", chal, champ)
    assert chal is not None and champ is not None
    if beats(chal, champ, mode):
        return promotion(PROMOTED, version, f"better: {compared}", chal, champ)
    word = "a tie" if chal == champ else "not better"
    return promotion(f"{KEPT} v{champion}", champion, f"{word}: {compared}; {hint}", chal, champ)


def _with_split_note(p: Promotion, client: Any, name: str, validation: ValidationData | None) -> Promotion:
    """Say so when the champion was trained on another split: it may have seen some of these validation
    images, which favours it (the check then errs on the side of keeping it)."""
    if validation is None or p.previous_champion is None or p.champion_value is None:
        return p
    tags = client.get_model_version(name, p.previous_champion).tags or {}
    theirs = (tags.get(f"{TAG}data_spec") or tags.get("data_spec"), tags.get(f"{TAG}split"))
    if theirs != (validation.data_spec, validation.split):
        p.reason += (
            f"; note: champion v{p.previous_champion} was trained on {theirs[0] or 'unknown data'} "
            f"({theirs[1] or 'unknown split'}), so it may have seen some of these validation images"
        )
    return p


def register_challenger(
    run_id: str,
    *,
    model_name: str,
    metric: str,
    mode: str,
    sweep: str,
    data_spec: str,
    validation: ValidationData | None,
    force: bool = False,
    trial_value: float | None = None,
    tags: Mapping[str, Any] | None = None,
) -> Promotion:
    """Register run ``run_id``'s model as a new version of ``model_name`` with the alias ``challenger``,
    decide whether it becomes ``champion`` (:func:`decide`), tag the decision on it and move the alias.

    Uses the registry of ``mlflow.get_tracking_uri()``. Idempotent per run: a version already
    registered from ``run_id`` is reused, and a decision already recorded in its tags is only finished.
    """
    from mlflow import MlflowClient

    client = MlflowClient()
    existing = _version_of_run(client, model_name, run_id)
    if existing is not None and existing.tags.get(f"{TAG}decision"):
        return _finish(client, model_name, existing)
    if existing is None:
        version = str(register_champion(run_id, model_name=model_name, alias=CHALLENGER, tags=tags).version)
    else:  # registered before a crash, not yet decided
        version = str(existing.version)
        logger.info("%s v%s already holds run %s; deciding its promotion", model_name, version, run_id)
        if int(_alias(client, model_name, CHALLENGER) or 0) < int(version):  # unless a later sweep's took it
            client.set_registered_model_alias(model_name, CHALLENGER, version)
    p = decide(
        model_name,
        version,
        champion=_alias(client, model_name, CHAMPION),
        metric=metric,
        mode=mode,
        validation=validation,
        force=force,
        trial_value=trial_value,
    )
    p = _with_split_note(p, client, model_name, validation)
    # The decision is written first, the alias moved second: a crash in between is finished by the next call.
    split = validation.split if validation is not None else ""
    for key, value in p.tags(sweep, data_spec, split).items():
        client.set_model_version_tag(model_name, version, key, value)
    if p.promoted:
        client.set_registered_model_alias(model_name, CHAMPION, version)
    unscored = not p.promoted and p.champion_value is None  # kept because the champion could not be scored
    (logger.warning if unscored else logger.info)("%s", p.line())
    return p


def _finish(client: Any, name: str, version: Any) -> Promotion:
    """A decision recorded on ``version`` earlier: move @champion if that was decided and nothing else moved it
    since (the champion is still the one the decision replaced)."""
    current = _alias(client, name, CHAMPION)
    p = Promotion.from_tags(name, version, current)
    p.champion = current or ""
    if p.decision in (FIRST, PROMOTED, FORCED) and current != p.version and current == p.previous_champion:
        client.set_registered_model_alias(name, CHAMPION, p.version)
        p.champion = p.version
    logger.info("%s v%s: promotion already decided: %s", name, p.version, p.decision)
    return p


# -- registering a logged model ---------------------------------------------------------------


_NAME_RE = re.compile(r"^[^/:@\s][^/:@]*$")  # usable in a models:/ URI


def _check_name(model_name: Any) -> str:
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    if not isinstance(model_name, str) or not model_name.strip():
        raise MlflowException(
            f"registered model name must be a non-empty string, got {model_name!r}", error_code=INVALID_PARAMETER_VALUE
        )
    if not _NAME_RE.match(model_name) or model_name != model_name.strip():
        raise MlflowException(
            f"registered model name {model_name!r} is not usable in a models:/ URI: no '/', ':', '@' and no "
            "leading/trailing spaces",
            error_code=INVALID_PARAMETER_VALUE,
        )
    return model_name


def _check_alias(alias: Any) -> str:
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    if (
        not isinstance(alias, str)
        or not re.fullmatch(r"[A-Za-z0-9_\-]+", alias)
        or alias.lower() == "latest"
        or re.fullmatch(r"[vV]\d+", alias)
    ):
        raise MlflowException(
            f"alias {alias!r} is invalid: expected letters, digits, '_' or '-', not 'latest' nor 'v<number>'",
            error_code=INVALID_PARAMETER_VALUE,
        )
    return alias


def _flatten_tags(tags: Mapping[str, Any] | None, prefix: str = "") -> dict[str, str]:
    """Nested mappings become dotted keys ({"metrics": {"auroc": 0.9}} -> {"metrics.auroc": "0.9"})."""
    flat: dict[str, str] = {}
    for key, value in (tags or {}).items():
        full = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten_tags(value, f"{full}."))
        else:
            flat[full] = value if isinstance(value, str) else repr(value) if isinstance(value, float) else str(value)
    return flat


def _logged_model_id(client: Any, run_id: str, artifact_path: str) -> str:
    """The id of the model logged as ``artifact_path`` by run ``run_id`` (the last one if logged twice).

    MLflow 3 stores models outside the run's artifacts; ``runs:/<run>/<name>`` still resolves, with a
    warning, so the model is looked up here and registered as ``models:/<model_id>``.
    """
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, RESOURCE_DOES_NOT_EXIST

    if not isinstance(run_id, str) or not run_id:
        raise MlflowException(f"run_id must be a non-empty string, got {run_id!r}", error_code=INVALID_PARAMETER_VALUE)
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        raise MlflowException(
            f"run {run_id!r} not found in tracking store {mlflow.get_tracking_uri()!r}",
            error_code=RESOURCE_DOES_NOT_EXIST,
        ) from exc
    steps = {o.model_id: o.step for o in (run.outputs.model_outputs if run.outputs else [])}
    found, token = [], None
    while True:
        page = client.search_logged_models(
            experiment_ids=[run.info.experiment_id], filter_string=f"name = '{artifact_path}'", page_token=token
        )
        found.extend(m for m in page if m.source_run_id == run_id)
        token = page.token
        if not token:
            break
    if not found:
        raise MlflowException(
            f"run {run_id!r} has no model logged as {artifact_path!r} (log it with log_pyfunc_model inside that run)",
            error_code=RESOURCE_DOES_NOT_EXIST,
        )
    return max(found, key=lambda m: (steps.get(m.model_id, 0), m.creation_timestamp)).model_id


def register_champion(
    run_id: str,
    *,
    model_name: str,
    artifact_path: str = "model",
    alias: str = "champion",
    tags: Mapping[str, Any] | None = None,
) -> Any:
    """Register the model logged as ``artifact_path`` in run ``run_id`` and point ``alias`` at it.

    Creates the registered model on first use; every call adds a new version (nothing is deleted)
    and moves the alias from whichever version held it. ``tags`` (nested mappings flattened to dotted
    keys, values stringified) are set on the new version. Returns its ``ModelVersion``, re-read
    so that ``aliases`` and ``tags`` are current.
    """
    import mlflow
    from mlflow import MlflowClient

    from tune.mlflow_model import check_artifact_path

    model_name = _check_name(model_name)
    alias = _check_alias(alias)
    check_artifact_path(artifact_path)
    client = MlflowClient()
    model_id = _logged_model_id(client, run_id, artifact_path)
    version = mlflow.register_model(f"models:/{model_id}", model_name)
    for key, value in _flatten_tags(tags).items():
        client.set_model_version_tag(model_name, version.version, key, value)
    client.set_registered_model_alias(model_name, alias, version.version)
    return client.get_model_version(model_name, version.version)
