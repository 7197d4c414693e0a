"""One ONNX graph from images to decisions: backbone, vague step, assignment, DDIM chain, post-processing.

``vpdm export`` writes it as a ``.onnx`` (ONNX Runtime) or converted by OpenVINO (``.xml`` + ``.bin``).

A deployment that cannot run Python (C++, Java, C# through ONNX Runtime, or an inference server)
gets the whole :class:`vpdm.inference.detector.Detector` as one graph. :class:`ExportableDetector`
traces the Detector's own modules; nothing here restates the model. What the trace fixes:

* **the noise is baked in**: ``Detector`` gives every image the same noise stream, from a generator
  seeded ``sampling.seed`` (:class:`vpdm.model.diffusion.SharedNoise`). That stream is drawn once (on
  the CPU, in the order the sampler draws it) and stored as a buffer that the chain replays
  (:class:`vpdm.model.diffusion.StoredNoise`); the graph contains no random op.
* **the reverse chain is unrolled**: one copy of the denoiser call per step, with the step's
  coefficients as constants (``sampling.num_steps`` at most :data:`MAX_EXPORT_STEPS`).
* **the class of an image** is the calibrated class whose mean assignment histogram is nearest by
  cosine, computed in the graph by the postprocessor's :class:`vpdm.decision.postprocess.DecisionTables`,
  whose per-class thresholds are buffers; ``pred_score``, ``pred_label`` and ``pred_mask`` are
  computed in float64 from the float32 score and map, as ``PostProcessor.decide`` does.
* **matrices made from shapes** (``backbone.resize="area"`` as two matrix products, for ONNX has no
  adaptive pooling whose bins do not divide the input; the maps' upsampling and blur) are constants
  of the graph (:func:`vpdm.runtime.tracing.untraced`).

The graph has one input, ``images`` (batch x 3 x S x S float32, ImageNet-normalised like
``Detector.score_tensor`` takes them; the batch axis is dynamic), and the outputs of
:data:`OUTPUT_NAMES`. Facts the inferencer needs (class names, thresholds, settings) are stored in
the model's metadata (:data:`METADATA_PREFIX` keys).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vpdm.decision.postprocess import DecisionTables
from vpdm.deploy.format import (
    METADATA_PREFIX,
    ONNX_FORMAT,
    ONNX_FORMAT_VERSION,
    OUTPUT_NAMES,
    RAW_OUTPUT_NAMES,
    require_package,
)
from vpdm.errors import ConfigError, VPDMError
from vpdm.model.diffusion import StoredNoise

__all__ = [
    "FORMATS",
    "ExportableDetector",
    "ExportResult",
    "MAX_EXPORT_STEPS",
    "METADATA_PREFIX",
    "ONNX_FORMAT",
    "OPSET",
    "OUTPUT_NAMES",
    "PARITY_TOLERANCE",
    "RAW_OUTPUT_NAMES",
    "check_with_onnxruntime",
    "check_with_openvino",
    "export_onnx",
    "onnx_model",
    "relative_difference",
    "require_package",
    "unsupported_settings",
]

OPSET = 17
# Each step is one more copy of the denoiser in the graph (and, for ddpm or eta > 0, one more noise
# map of C x S x S floats in the file): past this the file and the export time grow without purpose.
MAX_EXPORT_STEPS = 100
# ONNX Runtime / OpenVINO against torch: the largest difference of scores and maps, relative to the range of the
# torch maps (max - min). Float32 kernels that sum in another order differ by ~1e-6 of it.
PARITY_TOLERANCE = 1e-4


def unsupported_settings(config: Any) -> list[str]:
    """Settings of ``config`` the ONNX path cannot do, each as ``"section.key=value: why"``; [] if none."""
    problems = []
    steps = config.sampling.num_steps
    if steps > MAX_EXPORT_STEPS:
        problems.append(
            f"sampling.num_steps={steps}: the ONNX graph unrolls the reverse chain, one denoiser call per step "
            f"(and one stored noise map per step for ddpm or eta > 0); export supports at most "
            f"{MAX_EXPORT_STEPS} steps. Export with fewer (--set sampling.num_steps=N); thresholds hold for the "
            f"steps they were calibrated with, so for decisions that fit, train with that setting"
        )
    precision = getattr(getattr(config, "inference", None), "precision", "fp32")
    if precision != "fp32":
        problems.append(
            f"inference.precision={precision}: the graph is exported in float32 (reduced precision is the "
            "runtime's choice, not an autocast baked into the graph); export with --set inference.precision=fp32"
        )
    return problems


class ExportableDetector(nn.Module):
    """``Detector.analyse`` as a traceable module: images -> score, map (and decisions when thresholds exist).

    It runs the Detector's own modules: the extractor, :meth:`VPDM.detect` with the noise replayed from a
    buffer (:class:`~vpdm.model.diffusion.StoredNoise`), and the postprocessor's
    :class:`~vpdm.decision.postprocess.DecisionTables`. ``postprocessor``: the thresholds
    (``detector.postprocessor(...)``); None or one that is not ready gives a graph with the raw outputs
    (:data:`RAW_OUTPUT_NAMES`) only. The module runs on the CPU.
    """

    def __init__(self, detector: Any, postprocessor: Any = None) -> None:
        super().__init__()
        problems = unsupported_settings(detector.config)
        if problems:
            raise ConfigError("the ONNX export cannot do " + "; ".join(problems))
        cpu = torch.device("cpu")
        if detector.device != cpu:
            raise ConfigError(f"export a detector on the CPU (the baked-in noise is the CPU's), not {detector.device}")
        self.config = detector.config
        self.extractor = detector.extractor.eval()
        self.model = detector.model.eval()
        self.map_size = int(detector.map_size)
        self.image_size = int(self.config.backbone.image_size)
        sampling = self.config.sampling
        chain = sampling.build(self.model.diffusion)
        chain.set_timesteps(sampling.num_steps, sampling.spacing, sampling.start_step)
        # The noise stream every image gets in torch (SharedNoise: one stream, seeded alike), drawn once.
        shape = (self.model.channels, self.model.feature_size, self.model.feature_size)
        self.register_buffer("noise", StoredNoise.record(shape, chain.noise_draws(), sampling.seed))
        self.decisions: DecisionTables | None = None
        if postprocessor is not None and postprocessor.ready:
            self.decisions = postprocessor.tables()

    @property
    def output_names(self) -> tuple[str, ...]:
        return OUTPUT_NAMES if self.decisions is not None else RAW_OUTPUT_NAMES

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        features = self.extractor(images)
        decisions = self.decisions
        yhat = histograms = None
        if decisions is not None and decisions.rule == "histogram":  # the condition and the class from one pass
            assigned = self.model.prototypes(self.model.normalise(features), with_loss=False, histogram=True)
            yhat, histograms = assigned["yhat"], assigned["histogram"]
        scores, maps = self.model.detect(
            features, self.config.sampling, self.config.scoring, self.map_size, yhat=yhat, noise=StoredNoise(self.noise)
        )
        if decisions is None:
            return scores, maps
        index = decisions.class_index(histograms, scores)
        return (scores, maps, *decisions(scores, maps, index), index)

    # -- metadata ------------------------------------------------------------------------------
    def metadata(self, postprocessor: Any = None, source: str = "") -> dict[str, str]:
        """Everything the inferencer needs beside the graph, as string metadata."""
        from vpdm.config.values import to_dict

        data: dict[str, Any] = {
            "format": ONNX_FORMAT,
            "format_version": ONNX_FORMAT_VERSION,
            "image_size": self.image_size,
            "map_size": self.map_size,
            "outputs": list(self.output_names),
            "config": to_dict(self.config),
            "source": source,
            "noise": f"baked in: {len(self.noise)} draw(s) of the CPU generator seeded {self.config.sampling.seed}",
        }
        if self.decisions is not None:
            data.update(
                classes=self.decisions.names,
                class_rule=self.decisions.rule,
                fixed_class=self.decisions.fixed_index,
                image_threshold=self.decisions.image_threshold.tolist(),
                pixel_threshold=self.decisions.pixel_threshold.tolist(),
            )
            calibration = postprocessor.calibration if postprocessor is not None else None
            if calibration is not None:
                payload = calibration.to_payload()
                payload.pop("histograms")  # in the graph; the inferencer's own decisions need the thresholds only
                data["calibration"] = payload
            data["image_threshold_override"] = postprocessor.image_override if postprocessor is not None else None
            data["pixel_threshold_override"] = postprocessor.pixel_override if postprocessor is not None else None
        return {METADATA_PREFIX + k: json.dumps(v) for k, v in data.items()}


@dataclass
class ExportResult:
    path: Path  # the .onnx file, or the OpenVINO .xml (its weights are the .bin beside it)
    outputs: tuple[str, ...]
    opset: int
    bytes: int  # of every file written
    # The export's own check (None when skipped or the runtime is not installed): the runtime against
    # torch on seeded random images, largest difference of scores and maps relative to the torch maps' range.
    parity: float | None = None
    format: str = "onnx"
    files: tuple[Path, ...] = ()


FORMATS: tuple[str, ...] = ("onnx", "openvino")


def relative_difference(reference: tuple[Tensor, Tensor], other: tuple[Any, Any]) -> float:
    """Largest |difference| of scores and maps over the reference maps' range (max - min; 1 if flat)."""
    scores, maps = (torch.as_tensor(v).double() for v in reference)
    o_scores, o_maps = (torch.as_tensor(v).double() for v in other)
    span = float(maps.max() - maps.min()) or 1.0
    return max(float((scores - o_scores).abs().max()), float((maps - o_maps).abs().max())) / span


def _check_images(detector: Any, images: int = 2, seed: int = 0) -> Tensor:
    size = detector.config.backbone.image_size
    return torch.randn(images, 3, size, size, generator=torch.Generator().manual_seed(seed))


def check_with_onnxruntime(path: str | Path, detector: Any) -> float | None:
    """ONNX Runtime on ``path`` against ``detector`` on two seeded N(0, 1) images: :func:`relative_difference`
    (None when onnxruntime is not installed)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    x = _check_images(detector)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    score, anomaly_map = session.run(["score", "anomaly_map"], {"images": x.numpy()})
    return relative_difference(detector.score_tensor(x), (score, anomaly_map))


def check_with_openvino(path: str | Path, detector: Any) -> float:
    """OpenVINO (CPU, float32) on the ``.xml`` at ``path`` against ``detector``, as :func:`check_with_onnxruntime`."""
    from vpdm.deploy.runtimes import OpenVinoDetector

    x = _check_images(detector)
    return relative_difference(detector.score_tensor(x), OpenVinoDetector(path).score_tensor(x))


def onnx_model(detector: Any, postprocessor: Any = None, *, source: str = "", opset: int = OPSET) -> Any:
    """The ``onnx.ModelProto`` of ``detector`` (with ``postprocessor``'s thresholds, if ready), metadata
    included and checked by ``onnx.checker``. Unsupported settings fail before tracing."""
    import warnings

    onnx = require_package("onnx")
    wrapper = ExportableDetector(detector, postprocessor).eval()
    size = wrapper.image_size
    example = torch.zeros(2, 3, size, size)  # batch 2: the batch axis is traced as a dimension, not folded to 1
    names = wrapper.output_names
    axes = {"images": {0: "batch"}, **{n: {0: "batch"} for n in names}}
    with tempfile.TemporaryDirectory(prefix="vpdm-onnx-") as tmp:
        traced = Path(tmp) / "model.onnx"
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter(
                    "ignore"
                )  # the tracer's notes on constants: the unrolled chain is constant by design
                torch.onnx.export(
                    wrapper,
                    (example,),
                    str(traced),
                    input_names=["images"],
                    output_names=list(names),
                    dynamic_axes=axes,
                    opset_version=opset,
                    dynamo=False,
                    do_constant_folding=True,
                )
        except (RuntimeError, TypeError, ValueError, NotImplementedError, torch.onnx.errors.OnnxExporterError) as exc:
            raise ConfigError(
                f"torch.onnx cannot export this model (backbone.name={detector.config.backbone.name!r}, "
                f"opset {opset}): {str(exc).splitlines()[0][:300]}"
            ) from None
        model = onnx.load(str(traced))
    for key, value in wrapper.metadata(postprocessor, source).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    model.doc_string = "vpdm detector: images (batch x 3 x S x S, ImageNet-normalised) -> " + ", ".join(names)
    onnx.checker.check_model(model)
    return model


def _targets(path: Path, fmt: str) -> list[Path]:
    """The files an export writes: the .onnx, or OpenVINO's .xml and the .bin of its weights."""
    return [path] if fmt == "onnx" else [path, path.with_suffix(".bin")]


def _refuse_existing(targets: list[Path], overwrite: bool) -> None:
    if not overwrite:
        existing = [str(t) for t in targets if t.exists()]
        if existing:
            raise VPDMError(
                f"{', '.join(map(repr, existing))} exist{'s' if len(existing) == 1 else ''}; "
                "pass --overwrite (overwrite=True) to replace"
            )


def _place(prepared: list[tuple[Path, Path]], overwrite: bool) -> None:
    """Rename complete temporary files to their targets; without ``overwrite`` a target that appeared
    meanwhile is left as it is (and the files already placed by this call are taken back)."""
    from vpdm.io import output_error

    placed: list[Path] = []
    for tmp, target in prepared:
        try:
            if overwrite:
                os.replace(tmp, target)
            else:
                os.link(tmp, target)
                placed.append(target)
        except FileExistsError:
            for done in placed:
                done.unlink(missing_ok=True)
            raise VPDMError(
                f"{str(target)!r} appeared while exporting; it was left as it is (pass --overwrite to replace it)"
            ) from None
        except OSError as exc:
            raise output_error(exc, target, "exported model") from exc


def export_onnx(
    detector: Any,
    path: str | Path,
    *,
    postprocessor: Any = None,
    overwrite: bool = False,
    source: str = "",
    opset: int = OPSET,
    check: bool = True,
    fmt: str = "onnx",
) -> ExportResult:
    """Write ``detector`` (with ``postprocessor``'s thresholds, if ready) as one graph at ``path``.

    ``fmt="onnx"``: one ``.onnx`` file. ``fmt="openvino"``: the same graph converted by OpenVINO,
    ``path`` (``.xml``) and its weights beside it (``.bin``), float32 (not compressed to float16).
    Existing files are refused unless ``overwrite``; they appear complete or not at all (written
    beside the target, checked, then renamed): with ``check`` and the runtime installed, the graph is
    run against torch on seeded random images and more than :data:`PARITY_TOLERANCE` apart is an error.
    """
    from vpdm.io import prepare_write, writable_file, writing

    if fmt not in FORMATS:
        raise ConfigError(f"export format {fmt!r} is unknown; expected one of {list(FORMATS)}")
    path = Path(path)
    if fmt == "openvino" and path.suffix.lower() != ".xml":
        raise ConfigError(f"an OpenVINO export is an .xml file (and a .bin beside it); got {str(path)!r}")
    targets = _targets(path, fmt)
    _refuse_existing(targets, overwrite)
    require_package("onnx")
    ov = require_package("openvino") if fmt == "openvino" else None
    writable_file(path, "exported model")
    model = onnx_model(detector, postprocessor, source=source, opset=opset)
    names = tuple(o.name for o in model.graph.output)
    prepared: list[tuple[Path, Path]] = []
    scratch: Path | None = None
    try:
        if fmt == "onnx":
            data = model.SerializeToString()
            prepared.append((prepare_write(path, lambda f: f.write(data), "ONNX model"), path))
            parity = check_with_onnxruntime(prepared[0][0], detector) if check else None
        else:
            with writing(path, "OpenVINO model"):
                scratch = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
            prepared = _openvino_files(ov, model, scratch, path)
            parity = check_with_openvino(scratch / "model.xml", detector) if check else None
        if parity is not None and not parity <= PARITY_TOLERANCE:
            raise VPDMError(
                f"the exported graph disagrees with torch: its scores and maps differ by {parity:.2e} "
                f"of the map range on random images (tolerance {PARITY_TOLERANCE:g}); nothing was "
                f"written to {str(path)!r}"
            )
        size = sum(tmp.stat().st_size for tmp, _ in prepared)
        _place(prepared, overwrite)
    finally:
        for tmp, _ in prepared:
            tmp.unlink(missing_ok=True)
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    return ExportResult(path, names, opset, size, parity, fmt, tuple(targets))


def _openvino_files(ov: Any, model: Any, scratch: Path, path: Path) -> list[tuple[Path, Path]]:
    """OpenVINO's float32 .xml/.bin of the ONNX ``model`` (its metadata under rt_info ``vpdm/metadata``),
    written into ``scratch``; (file, target) pairs, the weights first."""
    from vpdm.io import writing

    with writing(path, "OpenVINO model"):
        source = scratch / "model.onnx"
        source.write_bytes(model.SerializeToString())
        converted = ov.convert_model(str(source))
        converted.set_rt_info(json.dumps({e.key: e.value for e in model.metadata_props}), ["vpdm", "metadata"])
        ov.save_model(converted, str(scratch / "model.xml"), compress_to_fp16=False)
    return [(scratch / "model.bin", path.with_suffix(".bin")), (scratch / "model.xml", path)]
