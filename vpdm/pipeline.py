"""Images in, anomaly scores and maps out: frozen backbone + trained VPDM + post-processing.

This is what a deployment holds. Each image is scored on its own terms (per-image prototype
assignment, per-image noise stream), so the answer for an image never depends on its batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from vpdm.backbone import FeatureExtractor
from vpdm.checkpoint import load_checkpoint
from vpdm.config import VPDMConfig
from vpdm.data import IMAGE_EXTENSIONS, AnomalyDataset, Sample
from vpdm.errors import DataError, VPDMError
from vpdm.model import VPDM
from vpdm.postprocess import Calibration, Decisions, PostProcessor


@dataclass
class Prediction:
    path: str
    score: float | None  # None when the image could not be scored
    anomaly_map: np.ndarray | None  # map_size x map_size float32
    error: str | None = None
    # Decisions (vpdm.postprocess): None when the image failed or the model has no thresholds.
    category: str | None = None  # the class whose thresholds were used
    pred_score: float | None = None  # score normalised so that the threshold is 0.5, in [0, 1]
    pred_label: int | None = None  # 1 = anomalous (score > image threshold)
    pred_mask: np.ndarray | None = None  # map_size x map_size bool: anomaly_map > pixel threshold


@dataclass
class Analysis:
    """Scores, maps and (when thresholds exist) decisions of a batch of images."""

    scores: Tensor  # (B,)
    maps: Tensor  # B x M x M
    decisions: Decisions | None


class Detector:
    """Backbone + model on one ``device`` ("cpu", "cuda", "cuda:N" or "auto": cuda when there is one),
    both networks at ``config.inference.precision``."""

    def __init__(self, model: VPDM, config: VPDMConfig, categories: list[str] | None = None,
                 device: str | torch.device = "cpu", calibration: Calibration | None = None,
                 checkpoint: str = "checkpoint"):
        from vpdm.engine import select_device
        from vpdm.preflight import apply_threads

        apply_threads(config)  # train.threads holds for prediction too: a shared machine is not taken over
        # cuda without CUDA, or an autocast torch would skip: a clear error, not torch's
        self.device = select_device(device, what="device", precision=config.inference.precision)
        self.precision = config.inference.precision
        self.model = model.to(self.device).eval()
        self.config = config
        self.categories = categories or []
        self.extractor = FeatureExtractor(config.backbone, precision=self.precision).to(self.device)
        self.map_size = config.scoring.map_size or config.backbone.image_size
        self.calibration = calibration
        self.checkpoint = str(checkpoint)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "cpu", overrides: list[str] | None = None) -> Detector:
        from vpdm.checkpoint import checkpoint_calibration

        model, config, payload = load_checkpoint(path)
        if overrides:
            config = config.with_overrides(overrides).validate()
        return cls(model, config, payload.get("categories"), device, calibration=checkpoint_calibration(payload, path),
                   checkpoint=str(path))

    def postprocessor(self, image_threshold: float | None = None, pixel_threshold: float | None = None) -> PostProcessor:
        """The thresholds and normalisation of this model, with optional overrides (checked: finite, >= 0)."""
        return PostProcessor(self.calibration, image_threshold=image_threshold, pixel_threshold=pixel_threshold,
                             checkpoint=self.checkpoint)

    @torch.no_grad()
    def analyse(self, images: Tensor, categories: list[str | None] | None = None, *,
                postprocessor: PostProcessor | None = None) -> Analysis:
        """Scores, maps and decisions of ImageNet-normalised images (as :meth:`score_tensor` takes them).

        ``categories``: each image's class if the caller knows it (None entries: picked by
        :func:`vpdm.postprocess.nearest_class`). Decisions are None when the postprocessor is not
        ready (no calibration and not both thresholds given).
        """
        post = postprocessor or self.postprocessor()
        images = self._check_images(images)
        n = images.shape[0]
        if n == 0:
            return Analysis(torch.empty(0), torch.empty(0, self.map_size, self.map_size), None)
        features = self.extractor(images.to(self.device))
        scores, maps = self.model.detect(features, self.config.sampling, self.config.scoring, self.map_size,
                                         precision=self.precision)
        scores, maps = scores.cpu(), maps.cpu()
        if not post.ready:
            return Analysis(scores, maps, None)
        given = list(categories) if categories is not None else [None] * n
        histograms = None
        if any(c is None or c == "" for c in given) and self.calibration is not None and self.calibration.histograms:
            from vpdm.calibration import assignment_histograms

            histograms = assignment_histograms(self.model, features)
        cats = post.category(histograms, given, n)
        return Analysis(scores, maps, post.decide(scores, maps, cats))

    def _check_images(self, images: Tensor) -> Tensor:
        return check_images(images, self.config.backbone.image_size)

    @torch.no_grad()
    def score_tensor(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """ImageNet-normalised B x 3 x S x S float images (S = backbone.image_size) -> (scores (B,), maps B x M x M).

        float16, bfloat16 and float64 are converted to float32; integer, bool and complex tensors,
        other shapes and non-finite values raise :class:`DataError`. An empty batch gives empty results.
        """
        images = self._check_images(images)
        if images.shape[0] == 0:
            return torch.empty(0), torch.empty(0, self.map_size, self.map_size)
        features = self.extractor(images.to(self.device))
        scores, maps = self.model.detect(features, self.config.sampling, self.config.scoring, self.map_size,
                                         precision=self.precision)
        return scores.cpu(), maps.cpu()

    def predict_files(self, paths: list[Path], batch_size: int = 16, progress: bool = True,
                      category: str | None = None, postprocessor: PostProcessor | None = None) -> list[Prediction]:
        """Score image files; an unreadable file gets an error entry and the others are still scored.

        With thresholds (calibrated, or both given to ``postprocessor``) each prediction carries its
        decisions; ``category`` is the class of every image (None: picked per image).
        """
        return predict_files(lambda images, cats: self.analyse(images, cats, postprocessor=postprocessor), paths,
                             image_size=self.config.backbone.image_size, map_size=self.map_size,
                             batch_size=batch_size, progress=progress, category=category)


def check_images(images: Tensor, size: int) -> Tensor:
    """The tensor a detector accepts (B x 3 x size x size float), as float32; a DataError saying what is wrong otherwise.

    Integer and bool tensors are refused rather than cast: uint8 0..255 pixels read as
    normalised values would score as nonsense without any error.
    """
    expected = (f"a float B x 3 x {size} x {size} tensor of ImageNet-normalised RGB images "
                "((x / 255 - IMAGENET_MEAN) / IMAGENET_STD, as vpdm.data.AnomalyDataset yields)")
    if not isinstance(images, Tensor):
        raise DataError(f"expected {expected}, got {type(images).__name__}")
    if not images.is_floating_point():
        hint = " (uint8 pixels: convert to float, divide by 255 and normalise)" if images.dtype == torch.uint8 else ""
        raise DataError(f"images have dtype {images.dtype}{hint}; expected {expected}")
    if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != (size, size):
        raise DataError(f"images have shape {tuple(images.shape)}; expected {expected}")
    images = images.float()  # float16 / bfloat16 / float64 -> float32, the backbone's dtype
    finite = torch.isfinite(images).flatten(1).all(dim=1)
    if not bool(finite.all()):
        bad = torch.nonzero(~finite).flatten().tolist()
        shown = ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else "")
        raise DataError(f"batch item(s) {shown} contain NaN or infinite values; expected {expected}")
    return images


def predict_files(analyse: Callable[[Tensor, list[str | None]], Analysis], paths: list[Path], *, image_size: int,
                  map_size: int, batch_size: int = 16, progress: bool = True,
                  category: str | None = None) -> list[Prediction]:
    """Score image files with ``analyse(images, categories)`` (a torch or an ONNX Runtime detector's):
    same decoding and resizing for both; an unreadable file gets an error entry and the others are still scored."""
    from tqdm.auto import tqdm

    samples = [Sample(Path(p), None, 0, "predict", "unknown") for p in paths]
    dataset = AnomalyDataset(samples, image_size=image_size, mask_size=map_size) if samples else None
    results: list[Prediction] = []
    for start in tqdm(range(0, len(samples), batch_size), desc="predict", disable=not progress, unit="batch"):
        images, index = [], []
        for i in range(start, min(start + batch_size, len(samples))):
            try:
                images.append(dataset[i]["image"])
                index.append(i)
            except (DataError, OSError) as exc:
                results.append(Prediction(str(samples[i].image_path), None, None, str(exc)))
        if images:
            found = analyse(torch.stack(images), [category] * len(images))
            d = found.decisions
            for j, i in enumerate(index):
                p = Prediction(str(samples[i].image_path), float(found.scores[j]), found.maps[j].numpy())
                if d is not None:
                    p.category, p.pred_score = d.category[j], float(d.pred_score[j])
                    p.pred_label, p.pred_mask = int(d.pred_label[j]), d.pred_mask[j]
                results.append(p)
    order = {str(s.image_path): k for k, s in enumerate(samples)}
    return sorted(results, key=lambda r: order[r.path])


def overlay_name(rel: Path, used: set[str]) -> str:
    """Overlay file name for an image at ``rel`` (relative to the scored folder), unique within ``used``.

    Sub-folders join with ``__`` (``a/x.png`` -> ``a__x.png``) because images are found recursively and
    two folders may hold the same file name; a name already taken gets ``_2``, ``_3``, ... Shared by
    ``vpdm predict`` and ``jobs/score.py`` so both name an image's overlay the same way.
    """
    base = "__".join(Path(rel).with_suffix("").parts) or "image"
    name, k = f"{base}.png", 1
    while name in used:
        k += 1
        name = f"{base}_{k}.png"
    used.add(name)
    return name


def image_files(folder: str | Path) -> list[Path]:
    """The images of a folder (recursively), sorted; a missing or empty folder is an error."""
    folder = Path(folder)
    if not folder.exists():
        raise DataError(f"image folder {folder} does not exist")
    if folder.is_file():
        return [folder]
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise VPDMError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found under {folder}")
    return files
