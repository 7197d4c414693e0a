"""One ONNX graph from images to decisions: backbone, vague step, assignment, DDIM chain, post-processing.

``vpdm export`` writes it as a ``.onnx`` (ONNX Runtime) or converted by OpenVINO (``.xml`` + ``.bin``).

A deployment that cannot run Python (C++, Java, C# through ONNX Runtime, or an inference server)
gets the whole :class:`vpdm.inference.detector.Detector` as one graph. :class:`ExportableDetector` is a torch
module that does what ``Detector.analyse`` does, written so that ``torch.onnx.export`` can trace
it; three things differ in form, none in value:

* **the noise is baked in**: ``Detector`` seeds one generator per image with ``sampling.seed``, so
  every image gets the same noise stream. That stream is drawn once here (on the CPU, in the order
  the sampler draws it) and stored as buffers; the graph adds them and contains no random op.
* **the reverse chain is unrolled**: one copy of the denoiser call per step, with the step's
  coefficients as constants (``sampling.num_steps`` at most :data:`MAX_EXPORT_STEPS`).
* **the class of an image** is the calibrated class whose mean assignment histogram is nearest by
  cosine (:func:`vpdm.decision.postprocess.nearest_class`), computed in the graph; its thresholds come from
  per-class tables. ``pred_score``, ``pred_label`` and ``pred_mask`` are computed in float64 from the
  float32 score and map, as :class:`vpdm.decision.postprocess.PostProcessor` does.

``backbone.resize="area"`` is done as two matrix products (the averaging of
``F.adaptive_avg_pool2d`` is linear and separable), because ONNX has no adaptive pooling whose
bins do not divide the input.

The graph has one input, ``images`` (batch x 3 x S x S float32, ImageNet-normalised like
``Detector.score_tensor`` takes them; the batch axis is dynamic), and the outputs of
:data:`OUTPUT_NAMES`. Facts the inferencer needs (class names, thresholds, settings) are stored in
the model's metadata (:data:`METADATA_PREFIX` keys).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vpdm.deploy.format import (
    METADATA_PREFIX,
    ONNX_FORMAT,
    ONNX_FORMAT_VERSION,
    OUTPUT_NAMES,
    RAW_OUTPUT_NAMES,
    require_package,
)
from vpdm.errors import CheckpointError, ConfigError, VPDMError

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


def _area_matrix(n_in: int, n_out: int) -> Tensor:
    """``n_out x n_in`` matrix of 1-D adaptive average pooling (PyTorch's bins: floor/ceil of i * n_in / n_out)."""
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        start = (i * n_in) // n_out
        end = -((-(i + 1) * n_in) // n_out)
        m[i, start:end] = 1.0 / (end - start)
    return m.float()


@dataclass
class _Tables:
    """Per-class decision tables, in the order of ``names`` (float64, as PostProcessor computes)."""

    names: list[str]
    image_threshold: list[float]
    pixel_threshold: list[float]
    scale: list[float]  # the divisor of vpdm.decision.postprocess.normalise for each class
    # How the graph picks an image's class: "histogram" (nearest_class), "single" (the one calibrated
    # class), "most_conservative" (no histograms, several classes: the largest image threshold, as
    # PostProcessor does for an unknown class) or "none" (no calibration; both thresholds given).
    rule: str
    fixed_index: int  # the class every image gets when rule is not "histogram"


def _decision_tables(post: Any) -> _Tables:
    """What :class:`vpdm.decision.postprocess.PostProcessor` would use for each class, as tables."""
    calibration = post.calibration
    if calibration is None:  # both thresholds given: one pseudo-class "", scale |threshold| (normalise's fallback)
        it, pt = post.image_override, post.pixel_override
        return _Tables([""], [it], [pt], [abs(it) or 1.0], "none", 0)
    names = list(calibration.classes)
    image_t, pixel_t, scale = [], [], []
    for name in names:
        t = calibration.classes[name]
        i = post.image_override if post.image_override is not None else t.image_threshold
        p = post.pixel_override if post.pixel_override is not None else t.pixel_threshold
        s = float(t.image_max) - float(t.image_min)
        if not (s > 0 and math.isfinite(s)):
            s = abs(float(i)) or 1.0
        image_t.append(float(i))
        pixel_t.append(float(p))
        scale.append(s)
    if calibration.histograms:
        missing = [n for n in names if n not in calibration.histograms]
        if missing:
            raise CheckpointError(
                f"the calibration has no assignment histogram for class(es) {', '.join(missing)}; "
                "re-run 'vpdm calibrate' on this checkpoint"
            )
        return _Tables(names, image_t, pixel_t, scale, "histogram", 0)
    if len(names) == 1:
        return _Tables(names, image_t, pixel_t, scale, "single", 0)
    # PostProcessor._class(""): the class with the largest calibrated image threshold, for both thresholds.
    worst = max(range(len(names)), key=lambda k: calibration.classes[names[k]].image_threshold)
    return _Tables(names, image_t, pixel_t, scale, "most_conservative", worst)


class ExportableDetector(nn.Module):
    """``Detector.analyse`` as a traceable module: images -> score, map (and decisions when thresholds exist).

    ``postprocessor``: the thresholds (``detector.postprocessor(...)``); None or one that is not ready
    gives a graph with the raw outputs (:data:`RAW_OUTPUT_NAMES`) only. The module runs on the CPU.
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
        diffusion = self.model.diffusion
        self.chain = sampling.build(diffusion)
        self.timesteps: list[int] = self.chain.set_timesteps(sampling.num_steps, sampling.spacing, sampling.start_step)
        self.from_image = sampling.start_step is not None and sampling.start_step < diffusion.num_timesteps
        # The noise stream of every image (VPDM.reconstruct: one generator per image, seeded alike).
        shape = (self.model.channels, self.model.feature_size, self.model.feature_size)
        generator = torch.Generator(device=cpu).manual_seed(sampling.seed)
        draws = [torch.randn(shape, generator=generator, dtype=torch.float32)]
        self.step_noise: list[bool] = []
        for i in range(len(self.timesteps)):
            t_prev = self.timesteps[i + 1] if i + 1 < len(self.timesteps) else -1
            noisy = t_prev >= 0 and self.chain.stochastic
            self.step_noise.append(noisy)
            if noisy:
                draws.append(torch.randn(shape, generator=generator, dtype=torch.float32))
        self.register_buffer("noise", torch.stack(draws).unsqueeze(1))  # draws x 1 x C x S x S
        # Timesteps as 1-element tensors: the coefficients broadcast over the batch.
        self.register_buffer("steps", torch.tensor(self.timesteps, dtype=torch.long).view(-1, 1))
        # backbone.resize="area": adaptive average pooling as matrices, one per stage size that needs it
        # (made here: traced, the making of a matrix would become graph nodes, and in-place ones at that)
        s = self.config.backbone.feature_size
        self.area_sizes: set[int] = set()
        if self.config.backbone.resize == "area":
            with torch.no_grad():
                shapes = [
                    tuple(m.shape[-2:])
                    for m in self.extractor.backbone(torch.zeros(1, 3, self.image_size, self.image_size))
                ]
            for h, w in shapes:
                if h > s and w > s:
                    for n in {h, w}:
                        if n not in self.area_sizes:
                            self.register_buffer(f"area_{n}", _area_matrix(n, s))
                            self.area_sizes.add(n)
        # postprocess_maps's upsampling-and-blur matrix, made here: traced, its making would become graph nodes
        from vpdm.model.scoring import _upsample_blur_matrix

        self.register_buffer(
            "upsample",
            _upsample_blur_matrix(
                self.model.feature_size, self.map_size, float(self.config.scoring.blur_sigma), "cpu", torch.float32
            ).clone(),
        )
        # decisions
        self.tables: _Tables | None = None
        if postprocessor is not None and postprocessor.ready:
            self.tables = _decision_tables(postprocessor)
            self.register_buffer("image_threshold", torch.tensor(self.tables.image_threshold, dtype=torch.float64))
            self.register_buffer("pixel_threshold", torch.tensor(self.tables.pixel_threshold, dtype=torch.float64))
            self.register_buffer("scale", torch.tensor(self.tables.scale, dtype=torch.float64))
            if self.tables.rule == "histogram":
                hist = postprocessor.calibration.histograms
                self.register_buffer("class_histograms", torch.stack([hist[n].float() for n in self.tables.names]))

    @property
    def output_names(self) -> tuple[str, ...]:
        return OUTPUT_NAMES if self.tables is not None else RAW_OUTPUT_NAMES

    # -- pieces --------------------------------------------------------------------------------
    def features(self, images: Tensor) -> Tensor:
        """FeatureExtractor.forward without its bookkeeping; "area" downsampling as matrix products."""
        ex = self.extractor
        x = images
        if ex._renormalise:
            x = x * ex._scale + ex._shift
        s = self.config.backbone.feature_size
        out = []
        for m in ex.backbone(x):
            h, w = m.shape[-2], m.shape[-1]
            if (h, w) == (s, s):
                out.append(m)
            elif self.config.backbone.resize == "area" and h > s and w > s:
                rows = self._area(h)
                cols = rows if w == h else self._area(w)
                out.append(rows @ m @ cols.T)
            else:
                out.append(F.interpolate(m, size=(s, s), mode="bilinear", align_corners=False))
        return torch.cat(out, dim=1).float()

    def _area(self, n_in: int) -> Tensor:
        return getattr(self, f"area_{n_in}")

    def reconstruct(self, features: Tensor, yhat: Tensor) -> Tensor:
        """VPDM.reconstruct with the noise stream from the buffers (same order of draws)."""
        diffusion, model = self.model.diffusion, self.model
        shift = diffusion._shift(yhat)
        x0 = model.normalise(features)
        if self.from_image:
            t0 = self.timesteps[0]
            a = float(diffusion.sqrt_alphas_cumprod[t0])
            b = float(diffusion.sqrt_one_minus_alphas_cumprod[t0])
            a_t = torch.tensor(a, dtype=torch.float32)  # q_sample casts its table to float32 before the product
            b_t = torch.tensor(b, dtype=torch.float32)
            x = a_t * x0 + diffusion._shift_scale * (1.0 - a_t) * yhat + b_t * self.noise[0]
        else:
            x = shift + self.noise[0]
        copy = model.inference_copy(x0)
        draw = 1
        for i, t in enumerate(self.timesteps):
            t_prev = self.timesteps[i + 1] if i + 1 < len(self.timesteps) else -1
            output = model.denoise(x, yhat, self.steps[i], copy=copy)
            noise = None
            if self.step_noise[i]:
                noise = self.noise[draw]
                draw += 1
            x = self.chain.step(output, t, x, yhat, noise=noise, t_prev=t_prev).prev_sample
        return x

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        features = self.features(images)
        protos = self.model.prototypes
        histogram = self.tables is not None and self.tables.rule == "histogram"
        assigned = protos(self.model.normalise(features), with_loss=False, histogram=histogram)
        yhat = assigned["yhat"]
        reconstruction = self.reconstruct(features, yhat)
        fine, classes = self.model.fine_condition(features)  # short lists in their masked dense form when traced
        # vpdm.model.scoring.postprocess_maps (square maps) as the precomputed matrix products
        scores, maps = self.model.scores_and_maps(
            features,
            reconstruction,
            self.config.scoring,
            self.map_size,
            postprocess=lambda raw: self.upsample @ raw @ self.upsample.T,
            fine=fine,
            classes=classes,
        )
        if self.tables is None:
            return scores, maps
        if self.tables.rule == "histogram":  # vpdm.decision.calibration.assignment_histograms + nearest_class
            hist = assigned["histogram"].float()
            sims = F.cosine_similarity(hist.unsqueeze(1), self.class_histograms.unsqueeze(0), dim=-1)
            index = sims.argmax(dim=1)
        else:
            index = torch.zeros_like(scores, dtype=torch.long) + self.tables.fixed_index
        s = scores.double()
        image_t = self.image_threshold[index]
        pred_score = ((s - image_t) / self.scale[index] + 0.5).clamp(0.0, 1.0)
        pred_label = (s > image_t).long()
        pred_mask = maps.double() > self.pixel_threshold[index].view(-1, 1, 1)
        return scores, maps, pred_score, pred_label, pred_mask, index

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
        if self.tables is not None:
            data.update(
                classes=self.tables.names,
                class_rule=self.tables.rule,
                fixed_class=self.tables.fixed_index,
                image_threshold=self.tables.image_threshold,
                pixel_threshold=self.tables.pixel_threshold,
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
