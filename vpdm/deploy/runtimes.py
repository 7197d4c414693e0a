"""Inferencers of a ``vpdm export`` graph, with the torch :class:`vpdm.inference.detector.Detector`'s fields.

:class:`OnnxDetector` (ONNX Runtime, a ``.onnx``) and :class:`OpenVinoDetector` (OpenVINO, a
``.xml`` with its ``.bin``) run the graph that :func:`vpdm.deploy.export.export_onnx` wrote and hand back the
same :class:`vpdm.inference.detector.Analysis` / :class:`vpdm.inference.detector.Prediction` objects as ``Detector``:
raw scores and maps, and (when the export holds thresholds) the class, ``pred_score``,
``pred_label`` and ``pred_mask`` that the graph computed. A caller who knows an image's class
passes it as ``categories``; the decisions for that class are then made here from the thresholds
stored in the file's metadata, by :class:`vpdm.decision.postprocess.PostProcessor` as the torch path does.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from vpdm.decision.postprocess import Calibration, Decisions, PostProcessor
from vpdm.deploy.format import METADATA_PREFIX, ONNX_FORMAT, ONNX_FORMAT_VERSION, OUTPUT_NAMES, require_package
from vpdm.errors import CheckpointError, ConfigError
from vpdm.inference.detector import Analysis, Prediction, check_images, predict_files

__all__ = ["ExportedDetector", "OnnxDetector", "OpenVinoDetector"]


class ExportedDetector:
    """What both inferencers share: the metadata, the input check, the decisions. Subclasses load the
    graph (``_load``: its output names and the metadata strings) and run it (``_run``)."""

    kind = "exported model"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(
                f"{self.kind} {str(self.path)!r} does not exist or is not a file "
                "(expected one written by 'vpdm export')"
            )
        outputs, meta = self._load()
        self.metadata: dict[str, Any] = {
            k[len(METADATA_PREFIX) :]: json.loads(v) for k, v in meta.items() if k.startswith(METADATA_PREFIX)
        }
        if self.metadata.get("format") != ONNX_FORMAT:
            raise CheckpointError(
                f"{str(self.path)!r} is an {self.kind} but not one written by 'vpdm export' "
                f"(no {METADATA_PREFIX}format={ONNX_FORMAT!r} metadata)"
            )
        if self.metadata.get("format_version") != ONNX_FORMAT_VERSION:
            raise CheckpointError(
                f"{str(self.path)!r} has vpdm ONNX format version "
                f"{self.metadata.get('format_version')!r}; this vpdm reads version {ONNX_FORMAT_VERSION}"
            )
        self.image_size = int(self.metadata["image_size"])
        self.map_size = int(self.metadata["map_size"])
        self.outputs: list[str] = outputs
        self.has_decisions = self.outputs == list(OUTPUT_NAMES)
        self.classes: list[str] = list(self.metadata.get("classes") or [])
        self.class_rule: str = self.metadata.get("class_rule", "none")
        self.postprocessor: PostProcessor | None = None
        if self.has_decisions:
            data = self.metadata.get("calibration")
            calibration = Calibration.from_payload(data, where=repr(str(self.path))) if data else None
            self.postprocessor = PostProcessor(
                calibration,
                image_threshold=self.metadata.get("image_threshold_override"),
                pixel_threshold=self.metadata.get("pixel_threshold_override"),
                checkpoint=str(self.path),
            )

    def _load(self) -> tuple[list[str], dict[str, str]]:
        raise NotImplementedError

    def _run(self, images: np.ndarray) -> list[np.ndarray]:
        raise NotImplementedError

    @property
    def config(self) -> dict[str, Any]:
        """The settings the graph was exported with (a plain dict, as ``vpdm config`` prints them)."""
        return self.metadata["config"]

    def run(self, images: Tensor | np.ndarray) -> dict[str, np.ndarray]:
        """The graph's raw outputs by name for checked images (see :func:`vpdm.inference.detector.check_images`)."""
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(images)
        images = check_images(images, self.image_size)
        if images.shape[0] == 0:
            raise ConfigError("an empty batch has nothing to score")
        return dict(zip(self.outputs, self._run(np.ascontiguousarray(images.numpy()))))

    def score_tensor(self, images: Tensor | np.ndarray) -> tuple[Tensor, Tensor]:
        """Images (as ``Detector.score_tensor`` takes them) -> (scores (B,), maps B x M x M) as torch tensors."""
        if len(images) == 0:
            return torch.empty(0), torch.empty(0, self.map_size, self.map_size)
        out = self.run(images)
        return torch.from_numpy(out["score"]), torch.from_numpy(out["anomaly_map"])

    def analyse(self, images: Tensor | np.ndarray, categories: list[str | None] | None = None) -> Analysis:
        """Scores, maps and decisions, as ``Detector.analyse``: the graph's class for images whose
        ``categories`` entry is None (or no ``categories``), the given class otherwise."""
        n = len(images)
        if n == 0:
            return Analysis(torch.empty(0), torch.empty(0, self.map_size, self.map_size), None)
        out = self.run(images)
        scores, maps = torch.from_numpy(out["score"]), torch.from_numpy(out["anomaly_map"])
        if not self.has_decisions:
            return Analysis(scores, maps, None)
        # None, "" and NaN (a missing value in a pandas column) mean "not given", as in PostProcessor.category
        given = [
            None if c is None or c == "" or (isinstance(c, float) and math.isnan(c)) else c
            for c in (categories if categories is not None else [None] * n)
        ]
        if len(given) != n:
            raise ConfigError(f"{len(given)} categories for {n} images; expected one per image (None: the graph's)")
        named = self._graph_categories(out["class_index"])
        if all(c is None for c in given):
            index = out["class_index"]
            image_t = np.asarray(self.metadata["image_threshold"], dtype=np.float64)[index]
            pixel_t = np.asarray(self.metadata["pixel_threshold"], dtype=np.float64)[index]
            return Analysis(
                scores, maps, Decisions(named, out["pred_score"], out["pred_label"], out["pred_mask"], image_t, pixel_t)
            )
        post = self.postprocessor
        for c in {c for c in given if c is not None}:
            post.category(None, [c], 1)  # an unknown class: ConfigError naming it and the calibrated ones
        cats = [g if c is None else c for c, g in zip(given, named)]
        return Analysis(scores, maps, post.decide(out["score"], out["anomaly_map"], cats))

    def _graph_categories(self, index: np.ndarray) -> list[str]:
        """Class names of the graph's class indices, as ``Detector`` names them ("" where it has no class)."""
        if self.class_rule in ("histogram", "single"):
            return [self.classes[int(i)] for i in index]
        return [""] * len(index)

    def predict_files(
        self, paths: list[Path], batch_size: int = 16, progress: bool = True, category: str | None = None
    ) -> list[Prediction]:
        """Score image files as ``Detector.predict_files`` does (same decoding and resizing)."""
        return predict_files(
            self.analyse,
            paths,
            image_size=self.image_size,
            map_size=self.map_size,
            batch_size=batch_size,
            progress=progress,
            category=category,
        )


class OnnxDetector(ExportedDetector):
    """Scores images with ONNX Runtime from a ``.onnx`` written by ``vpdm export``.

    ``providers``: ONNX Runtime execution providers (default: the CPU); ``threads``: intra-op threads
    (0: ONNX Runtime's default).
    """

    kind = "ONNX model"

    def __init__(self, path: str | Path, *, providers: list[str] | None = None, threads: int = 0) -> None:
        self.providers = providers or ["CPUExecutionProvider"]
        self.threads = int(threads)
        super().__init__(path)

    def _load(self) -> tuple[list[str], dict[str, str]]:
        ort = require_package("onnxruntime")
        options = ort.SessionOptions()
        if self.threads:
            options.intra_op_num_threads = self.threads
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=options, providers=self.providers)
        except Exception as exc:  # onnxruntime raises its own exception types for unreadable models
            raise CheckpointError(
                f"ONNX Runtime cannot load {str(self.path)!r}: {str(exc).splitlines()[0][:300]}"
            ) from None
        return [o.name for o in self.session.get_outputs()], dict(self.session.get_modelmeta().custom_metadata_map)

    def _run(self, images: np.ndarray) -> list[np.ndarray]:
        return self.session.run(None, {"images": images})


class OpenVinoDetector(ExportedDetector):
    """Scores images with OpenVINO from a ``.xml`` (and the ``.bin`` beside it) written by
    ``vpdm export --format openvino``.

    Compiled for ``device`` (default the CPU) at float32 (``INFERENCE_PRECISION_HINT``: without it a
    CPU with bfloat16 units would compute in bfloat16); ``threads``: inference threads (0: OpenVINO's default).
    """

    kind = "OpenVINO model"

    def __init__(self, path: str | Path, *, device: str = "CPU", threads: int = 0) -> None:
        self.device = device
        self.threads = int(threads)
        super().__init__(path)

    def _load(self) -> tuple[list[str], dict[str, str]]:
        ov = require_package("openvino")
        core = ov.Core()
        try:
            model = core.read_model(str(self.path))
        except Exception as exc:  # OpenVINO raises RuntimeError and its own types for unreadable models
            raise CheckpointError(
                f"OpenVINO cannot load {str(self.path)!r}: {str(exc).splitlines()[0][:300]}"
            ) from None
        meta: dict[str, str] = {}
        if model.has_rt_info(["vpdm", "metadata"]):
            meta = json.loads(model.get_rt_info(["vpdm", "metadata"]).astype(str))
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32"}
        if self.threads:
            config["INFERENCE_NUM_THREADS"] = self.threads
        self.compiled = core.compile_model(model, self.device, config)
        known = set(OUTPUT_NAMES)
        # An output tensor may carry several names; ours is the one the export gave it.
        self._ports = list(self.compiled.outputs)
        names = [next(iter(sorted(port.get_names() & known)), port.get_any_name()) for port in self._ports]
        return names, meta

    def _run(self, images: np.ndarray) -> list[np.ndarray]:
        result = self.compiled(images)
        return [result[port] for port in self._ports]
