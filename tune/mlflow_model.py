"""VPDM as an MLflow pyfunc model: log it, register it under an alias, load it back, serve it.

The model's contract (what ``mlflow models serve`` and ``mlflow.pyfunc.load_model`` expose):

* input: a ``pandas.DataFrame`` with a string column ``"image"`` holding each image *file*
  (PNG, JPEG, BMP or TIFF bytes) base64-encoded; any other column (e.g. ``"path"``) is ignored.
  Grayscale, RGBA and 16-bit images are converted to 8-bit RGB; images under 8 px a side or over
  PIL's pixel limit are refused per item (conversions and refusals: ``tune/SERVING.md``);
  An optional string column ``"category"`` names an item's class (its calibrated thresholds);
  missing or null: the class is picked per image (:mod:`vpdm.decision.postprocess`);
* output: a ``pandas.DataFrame`` with the input's index and the columns ``"score"`` (float, the raw
  score, NaN when the item could not be scored), ``"pred_score"`` (float in [0, 1], the score
  normalised so that the image threshold is 0.5), ``"pred_label"`` (1 anomalous, 0 normal),
  ``"pred_mask"`` (the pixels above the pixel threshold, in the format of ``anomaly_map``),
  ``"category"`` (the class whose thresholds were used), ``"anomaly_map"`` (what the ``anomaly_map``
  parameter asks for, None when the item failed) and ``"error"`` (None, or why the item failed).
  The decision columns are NaN/None when the item failed, or when the model has no calibrated
  thresholds and the request gives none;
* params (MLflow ``params``, the signature's ``ParamSchema``): ``anomaly_map`` = ``"small"``
  (default: the map averaged down to ``map_side`` x ``map_side``, 16), ``"none"`` (score only),
  ``"full"`` (``map_size`` x ``map_size``) or ``"png"`` (base64 8-bit grayscale PNG of the full map,
  scaled by ``png_vmax``, or by the map's own maximum when it is 0). The full float map is about
  2 MB of JSON per 320 px image (the default map size), so it is not the default. ``image_threshold`` / ``pixel_threshold``
  (raw score / map value, finite and >= 0; default null: the calibrated ones) override the
  thresholds of every class for this call.

An empty frame gives an empty result, with or without an ``image`` column (``{"dataframe_records": []}``):
the signature therefore declares no input schema, and :func:`predict_frame` checks the input itself
(a frame with rows but without an ``image`` column is refused with an error naming it).

One bad item never fails the batch: it gets its ``error`` and the others are scored. Scores are
those of :meth:`vpdm.inference.detector.Detector.predict_files` for the same files (same decoding, resize
and normalisation; VPDM scores each image on its own terms, so batching does not change them).

The logged model carries the checkpoint (artifact ``checkpoint``) and the ``vpdm`` source it was
trained with (``code_paths``), so it loads in any environment with the pinned requirements.
Inference settings ``device`` and ``batch_size`` can be overridden at load time:
``mlflow.pyfunc.load_model(uri, model_config={"device": "cuda"})``, or for a server the
``MLFLOW_PYFUNC_INFERENCE_CONFIG='{"device": "cuda"}'`` environment variable.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import tempfile
import warnings
from collections.abc import Iterable, Mapping, Sequence
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, RESOURCE_DOES_NOT_EXIST

__all__ = [
    "DEFAULT_PARAMS",
    "IMAGE_COLUMN",
    "MAP_FORMATS",
    "OUTPUT_COLUMNS",
    "VPDMPyfuncModel",
    "decode_image_bytes",
    "images_to_frame",
    "load_detector_model",
    "log_pyfunc_model",
    "predict_frame",
]

IMAGE_COLUMN = "image"
OUTPUT_COLUMNS = ("score", "pred_score", "pred_label", "pred_mask", "category", "anomaly_map", "error")
CATEGORY_COLUMN = "category"
# What a caller may ask for per request (MLflow `params`); the defaults keep a 100-image answer small.
MAP_FORMATS = ("small", "none", "full", "png")
DEFAULT_PARAMS: dict[str, Any] = {
    "anomaly_map": "small",
    "map_side": 16,
    "png_vmax": 0.0,
    "image_threshold": None,
    "pixel_threshold": None,
}
THRESHOLD_PARAMS = ("image_threshold", "pixel_threshold")  # double, default None: the calibrated thresholds
# Formats the library reads from disk (vpdm.data.images.IMAGE_EXTENSIONS). Restricting PIL's plugins keeps
# exotic decoders (EPS via ghostscript, ...) away from untrusted request bytes.
ALLOWED_FORMATS = ("PNG", "JPEG", "BMP", "TIFF")
MAX_IMAGE_BYTES = 64 * 1024 * 1024  # per item, decoded; a request that large is a mistake or an attack
DEFAULT_MODEL_CONFIG = {"device": "cpu", "batch_size": 16}

_REQUIREMENTS = ("torch", "torchvision", "timm", "numpy", "pillow", "pandas", "mlflow", "cloudpickle")


# --------------------------------------------------------------------------------------------
# decoding
# --------------------------------------------------------------------------------------------


def decode_image_bytes(data: bytes, image_size: int, *, name: str = "image") -> np.ndarray:
    """Image-file bytes -> uint8 ``image_size`` x ``image_size`` x 3 RGB (bicubic), like the library.

    Same conversions as :class:`vpdm.data.dataset.AnomalyDataset` (:func:`vpdm.data.images.image_to_rgb`:
    grayscale replicated, alpha dropped, 16-bit scaled to 8-bit). Raises
    :class:`vpdm.errors.DataError` naming ``name`` for anything that is not a complete
    PNG/JPEG/BMP/TIFF of at least ``MIN_IMAGE_SIDE`` pixels a side within PIL's
    decompression-bomb pixel limit (checked on the header, before decoding).
    """
    from PIL import Image, UnidentifiedImageError

    from vpdm.data.images import image_to_rgb
    from vpdm.errors import DataError

    if len(data) == 0:
        raise DataError(f"{name}: empty payload (expected the bytes of a PNG, JPEG, BMP or TIFF file)")
    if len(data) > MAX_IMAGE_BYTES:
        raise DataError(f"{name}: {len(data)} bytes is over the {MAX_IMAGE_BYTES}-byte limit per image")
    try:
        with warnings.catch_warnings():
            # PIL warns above MAX_IMAGE_PIXELS and raises only above twice that; refuse both.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as im:
                # Explicit too: the warnings filter above is process-wide state, not thread-safe.
                limit = Image.MAX_IMAGE_PIXELS
                if limit is not None and im.width * im.height > limit:
                    raise Image.DecompressionBombError(
                        f"{im.width}x{im.height} = {im.width * im.height} pixels exceeds the limit of {limit}"
                    )
                im.load()
                return image_to_rgb(im, image_size, name)
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataError(f"{name}: refused, image too large ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise DataError(f"{name}: not a PNG, JPEG, BMP or TIFF image file") from exc
    except Exception as exc:  # truncated/corrupt data: OSError, SyntaxError, ValueError, zlib.error, ...
        raise DataError(f"{name}: cannot decode image: {exc} (expected a valid, complete image file)") from exc


def _normalise(rgb: np.ndarray) -> Any:
    import torch

    from vpdm.features.backbone import imagenet_normalise

    return imagenet_normalise(torch.from_numpy(rgb).permute(2, 0, 1).float().div_(255.0)).contiguous()


def _b64decode(value: Any, name: str) -> bytes:
    from vpdm.errors import DataError

    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("ascii", errors="replace")
    if not isinstance(value, str):
        kind = "missing" if value is None or (isinstance(value, float) and np.isnan(value)) else type(value).__name__
        raise DataError(f"{name}: expected a base64 string of an image file, got {kind}")
    if len(value) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise DataError(f"{name}: payload is over the {MAX_IMAGE_BYTES}-byte limit per image")
    try:
        return base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise DataError(f"{name}: not valid base64 ({exc})") from exc


# --------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------


def _empty_result(index: Any = None) -> pd.DataFrame:
    frame = pd.DataFrame(
        {c: pd.Series(dtype="float64" if c in ("score", "pred_score") else "object") for c in OUTPUT_COLUMNS}
    )
    if index is not None:
        frame.index = index
    return frame


def _check_params(params: Mapping[str, Any] | None) -> dict[str, Any]:
    """The request's params over the defaults; INVALID_PARAMETER_VALUE (HTTP 400) naming a bad one."""
    import math

    unknown = sorted(set(params or {}) - set(DEFAULT_PARAMS))
    if unknown:
        raise MlflowException(
            f"unknown parameter(s) {unknown}; known: {sorted(DEFAULT_PARAMS)}", error_code=INVALID_PARAMETER_VALUE
        )
    out = {**DEFAULT_PARAMS, **{k: v for k, v in (params or {}).items() if v is not None}}
    if out["anomaly_map"] not in MAP_FORMATS:
        raise MlflowException(
            f"parameter anomaly_map={out['anomaly_map']!r}: expected one of {', '.join(MAP_FORMATS)}",
            error_code=INVALID_PARAMETER_VALUE,
        )
    side = out["map_side"]
    if isinstance(side, bool) or not isinstance(side, (int, np.integer)) or side < 1:
        raise MlflowException(
            f"parameter map_side={side!r}: expected an integer >= 1", error_code=INVALID_PARAMETER_VALUE
        )
    vmax = out["png_vmax"]
    if isinstance(vmax, bool) or not isinstance(vmax, (int, float)) or not math.isfinite(vmax) or vmax < 0:
        raise MlflowException(
            f"parameter png_vmax={vmax!r}: expected a finite number >= 0 (0: each map's maximum)",
            error_code=INVALID_PARAMETER_VALUE,
        )
    from vpdm.decision.postprocess import check_threshold
    from vpdm.errors import ConfigError

    for name in THRESHOLD_PARAMS:
        try:
            out[name] = check_threshold(out[name], f"parameter {name}")
        except ConfigError as exc:
            raise MlflowException(
                f"{exc} (null: the calibrated threshold)", error_code=INVALID_PARAMETER_VALUE
            ) from None
    return {**out, "map_side": int(side), "png_vmax": float(vmax)}


def _map_payloads(maps: Any, params: Mapping[str, Any]) -> list[Any]:
    """B x M x M float maps -> what ``params["anomaly_map"]`` asks for, one item per map."""
    import torch.nn.functional as F

    kind = params["anomaly_map"]
    if kind == "none":
        return [None] * len(maps)
    if kind == "small" and params["map_side"] < maps.shape[-1]:
        maps = F.adaptive_avg_pool2d(maps[:, None], params["map_side"])[:, 0]  # block means: a hot spot stays hot
    if kind in ("small", "full"):
        return [m.double().numpy().tolist() for m in maps]
    from PIL import Image

    out = []
    for m in maps.double().numpy():
        scale = params["png_vmax"] or float(m.max())
        gray = np.clip(np.rint(255.0 * m / scale), 0, 255) if scale > 0 else np.zeros_like(m)
        buf = io.BytesIO()
        Image.fromarray(gray.astype(np.uint8)).save(buf, format="PNG")
        out.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    return out


def _mask_payloads(masks: Any, params: Mapping[str, Any]) -> list[Any]:
    """B x M x M bool masks -> the format ``params["anomaly_map"]`` asks for: 0/1 lists (``small``: a
    block is 1 when any of its pixels is), a base64 PNG of 0/255, or None (``none``)."""
    import torch
    import torch.nn.functional as F

    kind = params["anomaly_map"]
    if kind == "none":
        return [None] * len(masks)
    masks = torch.as_tensor(np.asarray(masks)).float()
    if kind == "small" and params["map_side"] < masks.shape[-1]:
        masks = F.adaptive_max_pool2d(masks[:, None], params["map_side"])[:, 0]
    if kind in ("small", "full"):
        return [m.to(torch.int64).numpy().tolist() for m in masks]
    from PIL import Image

    out = []
    for m in masks.numpy():
        buf = io.BytesIO()
        Image.fromarray((m > 0).astype(np.uint8) * 255).save(buf, format="PNG")
        out.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    return out


def _categories(
    model_input: pd.DataFrame, known: Sequence[str], errors: list[str | None], kind: str = "calibrated"
) -> list[str | None]:
    """The optional ``category`` column: None where missing; an unknown class (not in ``known``, the classes the
    model was ``kind`` for) is that item's error."""
    if CATEGORY_COLUMN not in model_input.columns:
        return [None] * len(model_input)
    out: list[str | None] = []
    for i, value in enumerate(model_input[CATEGORY_COLUMN].tolist()):
        if value is None or (isinstance(value, float) and np.isnan(value)) or value == "":
            out.append(None)
        elif not isinstance(value, str) or (known and value not in known):
            errors[i] = (
                f"row {i}: category {value!r} is not one the model was {kind} for ({', '.join(known) or 'none'})"
            )
            out.append(None)
        else:
            out.append(value)
    return out


def predict_frame(
    detector: Any, model_input: Any, batch_size: int = 16, params: Mapping[str, Any] | None = None
) -> pd.DataFrame:
    """Score a frame of base64 images with a :class:`vpdm.inference.detector.Detector` (the model's predict).

    ``params``: ``anomaly_map`` (``small``, ``none``, ``full``, ``png``), ``map_side``, ``png_vmax``;
    see the module docstring. An empty frame gives an empty result, whatever its columns.
    """
    import torch

    from vpdm.errors import VPDMError

    params = _check_params(params)
    if isinstance(model_input, Mapping):
        model_input = pd.DataFrame(dict(model_input))
    if not isinstance(model_input, pd.DataFrame):
        raise MlflowException(
            f"expected a pandas DataFrame with a string column {IMAGE_COLUMN!r} of base64-encoded image files, "
            f"got {type(model_input).__name__}",
            error_code=INVALID_PARAMETER_VALUE,
        )
    n = len(model_input)
    if n == 0:  # {"dataframe_records": []} has no columns at all: still an empty request, not a bad one
        return _empty_result(model_input.index)
    if IMAGE_COLUMN not in model_input.columns:
        raise MlflowException(
            f"input has no {IMAGE_COLUMN!r} column (columns: {list(map(str, model_input.columns))}); expected a "
            f"DataFrame with a string column {IMAGE_COLUMN!r} of base64-encoded image files",
            error_code=INVALID_PARAMETER_VALUE,
        )

    size = detector.config.backbone.image_size
    scores = np.full(n, np.nan, dtype=np.float64)
    pred_scores = np.full(n, np.nan, dtype=np.float64)
    maps: list[Any] = [None] * n
    labels: list[Any] = [None] * n
    masks: list[Any] = [None] * n
    used: list[Any] = [None] * n
    errors: list[str | None] = [None] * n
    from vpdm.errors import ConfigError

    try:  # one threshold alone on an uncalibrated model decides nothing: a bad request, not a silent one
        post = detector.postprocessor(params["image_threshold"], params["pixel_threshold"])
    except ConfigError as exc:
        raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from None
    calibration = getattr(detector, "calibration", None)
    known = list(calibration.classes) if calibration else list(getattr(detector, "categories", None) or [])
    given = _categories(model_input, known, errors, "calibrated" if calibration else "trained")
    values = model_input[IMAGE_COLUMN].tolist()
    batch_size = max(1, int(batch_size))
    for start in range(0, n, batch_size):
        tensors, rows = [], []
        for i in range(start, min(start + batch_size, n)):
            if errors[i] is not None:
                continue
            try:
                rgb = decode_image_bytes(_b64decode(values[i], f"row {i}"), size, name=f"row {i}")
                tensors.append(_normalise(rgb))
                rows.append(i)
            except VPDMError as exc:
                errors[i] = str(exc)
        if tensors:
            found = detector.analyse(torch.stack(tensors), [given[i] for i in rows], postprocessor=post)
            for j, (i, payload) in enumerate(zip(rows, _map_payloads(found.maps, params))):
                scores[i] = float(found.scores[j])
                maps[i] = payload
            d = found.decisions
            if d is not None:
                for j, (i, mask) in enumerate(zip(rows, _mask_payloads(d.pred_mask, params))):
                    pred_scores[i], labels[i] = float(d.pred_score[j]), int(d.pred_label[j])
                    masks[i], used[i] = mask, d.category[j]
    # object dtype keeps None as None (pandas 3 would infer a string column with NaN for missing).
    columns = {
        "score": scores,
        "pred_score": pred_scores,
        "pred_label": labels,
        "pred_mask": masks,
        "category": used,
        "anomaly_map": maps,
        "error": errors,
    }
    return pd.DataFrame(
        {
            c: pd.Series(
                columns[c], dtype="float64" if c in ("score", "pred_score") else "object", index=model_input.index
            )
            for c in OUTPUT_COLUMNS
        }
    )


class VPDMPyfuncModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper around :class:`vpdm.inference.detector.Detector`; see the module docstring for the contract."""

    def load_context(self, context: Any) -> None:
        from vpdm.inference.detector import Detector
        from vpdm.runtime.allocator import keep_large_buffers

        keep_large_buffers()  # the serving process scores batch after batch: keep the backbone's work buffers
        config = {**DEFAULT_MODEL_CONFIG, **(getattr(context, "model_config", None) or {})}
        self.batch_size = int(config["batch_size"])
        self.detector = Detector.from_checkpoint(context.artifacts["checkpoint"], device=config["device"])
        if self.detector.calibration is None:
            warnings.warn(
                "this VPDM model has no calibrated thresholds: pred_score, pred_label and pred_mask stay "
                "empty unless a request passes image_threshold and pixel_threshold; calibrate the "
                "checkpoint with 'vpdm calibrate' and log it again",
                stacklevel=2,
            )

    # model_input is typed pd.DataFrame (a hint MLflow derives no schema from): the logged
    # signature is what validates requests.
    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        return predict_frame(self.detector, model_input, self.batch_size, params)


# --------------------------------------------------------------------------------------------
# logging, registering, loading
# --------------------------------------------------------------------------------------------


def _encode_file(path: str | Path) -> str:
    from vpdm.errors import DataError

    try:
        return base64.b64encode(Path(path).read_bytes()).decode("ascii")
    except OSError as exc:
        raise DataError(f"cannot read image file {str(path)!r}: {exc}") from exc


def images_to_frame(paths: Iterable[str | Path]) -> pd.DataFrame:
    """The model's input for image files: column ``"image"`` = base64 of each file's bytes, in order."""
    return pd.DataFrame({IMAGE_COLUMN: pd.Series([_encode_file(p) for p in paths], dtype="object")})


def _example_image(example_images: Sequence[str | Path] | None, size: int) -> str:
    """One small PNG, base64: the first example image at the model's input size, or a synthetic one."""
    from PIL import Image

    if example_images:
        first = Path(example_images[0])
        try:
            data = first.read_bytes()
        except OSError as exc:
            from vpdm.errors import DataError

            raise DataError(f"cannot read example image {str(first)!r}: {exc}") from exc
        rgb = decode_image_bytes(data, size, name=str(first))
    else:
        yy, xx = np.mgrid[0:size, 0:size]
        rgb = np.stack(
            [(xx * 255 // max(size - 1, 1)), (yy * 255 // max(size - 1, 1)), np.full_like(xx, 128)], axis=-1
        ).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _pip_requirements() -> list[str]:
    """Pins of what is installed: the model's direct imports plus vpdm's own dependencies."""
    names = list(_REQUIREMENTS)
    try:
        from packaging.requirements import Requirement

        for line in importlib_metadata.requires("vpdm") or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                names.append(req.name)
    except importlib_metadata.PackageNotFoundError:
        pass
    pins, seen = [], set()
    for name in names:
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        seen.add(key)
        try:
            version = importlib_metadata.version(name).split("+")[0]  # drop local labels (+cu130)
        except importlib_metadata.PackageNotFoundError:
            continue
        pins.append(f"{name}=={version}")
    return pins


MODEL_CODE_FILE = "vpdm_pyfunc.py"
_MODEL_CODE = '''"""MLflow models-from-code entry point of a VPDM model (the code travels in code/)."""
import mlflow

from tune.mlflow_model import VPDMPyfuncModel

mlflow.models.set_model(VPDMPyfuncModel())
'''


def log_pyfunc_model(
    checkpoint_path: str | Path,
    *,
    artifact_path: str = "model",
    example_images: Sequence[str | Path] | None = None,
) -> mlflow.models.model.ModelInfo:
    """Log a checkpoint as a VPDM pyfunc model in the active run (MLflow 3 ``name=artifact_path``).

    The signature is inferred from a one-image input example and the model's output on it; the
    model carries the checkpoint, the ``vpdm`` and ``tune/mlflow_model.py`` source, and pins of the
    installed requirements. Returns MLflow's ``ModelInfo`` (``model_uri`` is ``models:/<model_id>``;
    ``runs:/<run_id>/<artifact_path>`` resolves to it too).
    """
    from vpdm.inference.detector import Detector

    if mlflow.active_run() is None:
        raise MlflowException(
            "log_pyfunc_model needs an active run: call it inside `with mlflow.start_run():`",
            error_code=INVALID_PARAMETER_VALUE,
        )
    check_artifact_path(artifact_path)
    checkpoint_path = Path(checkpoint_path)
    detector = Detector.from_checkpoint(checkpoint_path)  # raises CheckpointError for a bad file
    example = pd.DataFrame({IMAGE_COLUMN: [_example_image(example_images, detector.config.backbone.image_size)]})
    output = predict_frame(detector, example)
    if output["error"].iloc[0] is not None:
        raise MlflowException(f"the input example could not be scored: {output['error'].iloc[0]}")
    typed = {k: v for k, v in DEFAULT_PARAMS.items() if k not in THRESHOLD_PARAMS}
    inferred = mlflow.models.infer_signature(example, output, params=typed)
    from mlflow.types.schema import ParamSchema, ParamSpec

    # Thresholds: doubles whose default null means "the calibrated ones" (infer_signature cannot type a None).
    params_schema = ParamSchema(list(inferred.params.params) + [ParamSpec(k, "double", None) for k in THRESHOLD_PARAMS])
    # No input schema: MLflow would refuse {"dataframe_records": []} (no columns) before predict could answer
    # it; predict_frame checks the input itself. The params schema makes MLflow pass and type-check `params`.
    signature = mlflow.models.ModelSignature(inputs=None, outputs=inferred.outputs, params=params_schema)
    import vpdm

    with tempfile.TemporaryDirectory(prefix="vpdm_code_") as staging:
        # tune/ holds sweep code too; ship only this module (as tune.mlflow_model, the name the
        # model code imports) next to the library.
        tune_dir = Path(staging) / "tune"
        tune_dir.mkdir()
        (tune_dir / "__init__.py").write_text('"""VPDM MLflow model code."""\n')
        (tune_dir / "mlflow_model.py").write_text(Path(__file__).read_text())
        # Models from code: the model is this small script, not a pickled object, so loading a
        # registered model unpickles nothing (the weights load with weights_only=True).
        entry = Path(staging) / MODEL_CODE_FILE
        entry.write_text(_MODEL_CODE)
        return mlflow.pyfunc.log_model(
            name=artifact_path,
            python_model=str(entry),
            artifacts={"checkpoint": str(checkpoint_path)},
            code_paths=[str(Path(vpdm.__file__).parent), str(tune_dir)],
            signature=signature,
            input_example=example,
            pip_requirements=_pip_requirements(),
            model_config=dict(DEFAULT_MODEL_CONFIG),
            metadata={
                "vpdm_version": getattr(vpdm, "__version__", "unknown"),
                "image_size": int(detector.config.backbone.image_size),
                "map_size": int(detector.map_size),
                "categories": list(detector.categories),
            },
        )


def check_artifact_path(artifact_path: Any) -> str:
    if not isinstance(artifact_path, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]+", artifact_path):
        raise MlflowException(
            f"artifact_path must be a non-empty name of letters, digits, '_', '-', '.', got {artifact_path!r}",
            error_code=INVALID_PARAMETER_VALUE,
        )
    return artifact_path


_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>[^/]+))?/?$")


def _check_registered(model_uri: str) -> None:
    """For ``models:/NAME@alias`` and ``models:/NAME/version``: a clear error when either does not exist."""
    from mlflow import MlflowClient

    match = _MODELS_URI.match(model_uri)
    if not match or (match["alias"] is None and match["version"] is None):
        return  # models:/<model_id>, runs:/..., paths: MLflow's own errors are clear enough
    name, alias, version = match["name"], match["alias"], match["version"]
    client = MlflowClient()
    where = f"in the model registry at {mlflow.get_registry_uri()!r}"
    try:
        registered = client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise MlflowException(
            f"no registered model named {name!r} {where} (from {model_uri!r})", error_code=RESOURCE_DOES_NOT_EXIST
        ) from exc
    if alias is not None and alias not in (registered.aliases or {}):
        known = ", ".join(f"@{a} -> v{v}" for a, v in sorted((registered.aliases or {}).items())) or "none"
        raise MlflowException(
            f"registered model {name!r} has no alias {alias!r} {where} (aliases: {known})",
            error_code=RESOURCE_DOES_NOT_EXIST,
        )
    if version is not None and version != "latest":
        try:
            client.get_model_version(name, version)
        except MlflowException as exc:
            raise MlflowException(
                f"registered model {name!r} has no version {version!r} {where}", error_code=RESOURCE_DOES_NOT_EXIST
            ) from exc


def load_detector_model(model_uri: str, *, model_config: Mapping[str, Any] | None = None) -> Any:
    """``mlflow.pyfunc.load_model`` for ``models:/NAME@alias``, ``models:/NAME/3``, ``runs:/...``, ...

    A missing registered model, alias or version is an ``MlflowException`` naming it.
    ``model_config`` overrides ``device`` / ``batch_size``.
    """
    if not isinstance(model_uri, str) or not model_uri.strip():
        raise MlflowException(
            f"model URI must be a non-empty string, got {model_uri!r}", error_code=INVALID_PARAMETER_VALUE
        )
    _check_registered(model_uri)
    return mlflow.pyfunc.load_model(model_uri, model_config=dict(model_config) if model_config else None)
