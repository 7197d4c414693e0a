"""Images in, anomaly scores and maps out: frozen backbone + trained VPDM + post-processing.

This is what a deployment holds. Each image is scored on its own terms (per-image prototype
assignment, per-image noise stream), so the answer for an image never depends on its batch.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from vpdm.config.schema import VPDMConfig
from vpdm.data.dataset import AnomalyDataset
from vpdm.data.images import IMAGE_EXTENSIONS
from vpdm.data.layouts import Sample
from vpdm.decision.postprocess import Calibration, Decisions, PostProcessor
from vpdm.errors import DataError, VPDMError
from vpdm.features.backbone import FeatureExtractor
from vpdm.inference.checkpoint import load_checkpoint
from vpdm.model.vpdm_model import VPDM


@dataclass
class Prediction:
    path: str
    score: float | None  # None when the image could not be scored
    anomaly_map: np.ndarray | None  # map_size x map_size float32
    error: str | None = None
    # Decisions (vpdm.decision.postprocess): None when the image failed or the model has no thresholds.
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

    def __init__(
        self,
        model: VPDM,
        config: VPDMConfig,
        categories: list[str] | None = None,
        device: str | torch.device = "cpu",
        calibration: Calibration | None = None,
        checkpoint: str = "checkpoint",
    ):
        from vpdm.runtime.device import select_device
        from vpdm.training.preflight import apply_threads

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
    def from_checkpoint(
        cls, path: str | Path, device: str | torch.device = "cpu", overrides: list[str] | None = None
    ) -> Detector:
        from vpdm.config.schema import inference_overrides
        from vpdm.inference.checkpoint import checkpoint_calibration

        model, config, payload = load_checkpoint(path)
        if overrides:  # the CLI's policy: sampling, scoring, data, inference may change; backbone.* and model.* not
            config = inference_overrides(config, overrides, "Detector.from_checkpoint").validate()
        return cls(
            model,
            config,
            payload.get("categories"),
            device,
            calibration=checkpoint_calibration(payload, path),
            checkpoint=str(path),
        )

    def postprocessor(
        self, image_threshold: float | None = None, pixel_threshold: float | None = None
    ) -> PostProcessor:
        """The thresholds and normalisation of this model, with optional overrides (checked: finite, >= 0).

        Without a calibration, one threshold alone cannot decide anything: :class:`ConfigError` saying that
        both are needed (rather than no decisions without a word)."""
        post = PostProcessor(
            self.calibration,
            image_threshold=image_threshold,
            pixel_threshold=pixel_threshold,
            checkpoint=self.checkpoint,
            classes=self.categories,
        )
        post.require_complete()
        return post

    def iter_predictions(
        self,
        paths: list[Path],
        batch_size: int = 16,
        progress: bool = True,
        category: str | None = None,
        postprocessor: PostProcessor | None = None,
    ) -> Iterator[Prediction]:
        """:meth:`predict_files` one image at a time, in order: memory holds one batch, whatever the number of files."""
        return iter_predictions(
            lambda images, cats: self.analyse(images, cats, postprocessor=postprocessor),
            paths,
            image_size=self.config.backbone.image_size,
            map_size=self.map_size,
            batch_size=batch_size,
            progress=progress,
            category=category,
        )

    @torch.no_grad()
    def analyse(
        self, images: Tensor, categories: list[str | None] | None = None, *, postprocessor: PostProcessor | None = None
    ) -> Analysis:
        """Scores, maps and decisions of ImageNet-normalised images (as :meth:`score_tensor` takes them).

        ``categories``: each image's class if the caller knows it (None entries: picked by
        :func:`vpdm.decision.postprocess.nearest_class`). Decisions are None when the postprocessor is not
        ready (no calibration and not both thresholds given).
        """
        post = postprocessor or self.postprocessor()
        images = self._check_images(images)
        n = images.shape[0]
        if n == 0:
            return Analysis(torch.empty(0), torch.empty(0, self.map_size, self.map_size), None)
        features = self.extractor(images.to(self.device))
        scores, maps = self.model.detect(
            features, self.config.sampling, self.config.scoring, self.map_size, precision=self.precision
        )
        scores, maps = scores.cpu(), maps.cpu()
        if not post.ready:
            return Analysis(scores, maps, None)
        given = list(categories) if categories is not None else [None] * n
        histograms = None
        if any(c is None or c == "" for c in given) and self.calibration is not None and self.calibration.histograms:
            from vpdm.decision.calibration import assignment_histograms

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
        scores, maps = self.model.detect(
            features, self.config.sampling, self.config.scoring, self.map_size, precision=self.precision
        )
        return scores.cpu(), maps.cpu()

    def predict_files(
        self,
        paths: list[Path],
        batch_size: int = 16,
        progress: bool = True,
        category: str | None = None,
        postprocessor: PostProcessor | None = None,
    ) -> list[Prediction]:
        """Score image files; an unreadable file gets an error entry and the others are still scored.

        With thresholds (calibrated, or both given to ``postprocessor``) each prediction carries its
        decisions; ``category`` is the class of every image (None: picked per image).
        """
        return predict_files(
            lambda images, cats: self.analyse(images, cats, postprocessor=postprocessor),
            paths,
            image_size=self.config.backbone.image_size,
            map_size=self.map_size,
            batch_size=batch_size,
            progress=progress,
            category=category,
        )


def check_images(images: Tensor, size: int) -> Tensor:
    """The tensor a detector accepts (B x 3 x size x size float), as float32; a DataError saying what is wrong otherwise.

    Integer and bool tensors are refused rather than cast: uint8 0..255 pixels read as
    normalised values would score as nonsense without any error.
    """
    expected = (
        f"a float B x 3 x {size} x {size} tensor of ImageNet-normalised RGB images "
        "((x / 255 - IMAGENET_MEAN) / IMAGENET_STD, as vpdm.data.dataset.AnomalyDataset yields)"
    )
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


def iter_predictions(
    analyse: Callable[[Tensor, list[str | None]], Analysis],
    paths: list[Path],
    *,
    image_size: int,
    map_size: int,
    batch_size: int = 16,
    progress: bool = True,
    category: str | None = None,
) -> Iterator[Prediction]:
    """Score image files with ``analyse(images, categories)`` (a torch or an ONNX Runtime detector's), yielding
    one :class:`Prediction` per file in the order of ``paths`` as each batch is scored, so that memory holds one
    batch whatever the number of files. Same decoding and resizing for both; an unreadable file gets an error
    entry and the others are still scored."""
    from tqdm.auto import tqdm

    samples = [Sample(Path(p), None, 0, "predict", "unknown") for p in paths]
    dataset = AnomalyDataset(samples, image_size=image_size, mask_size=map_size) if samples else None
    for start in tqdm(range(0, len(samples), batch_size), desc="predict", disable=not progress, unit="batch"):
        images, index, out = [], [], {}
        for i in range(start, min(start + batch_size, len(samples))):
            try:
                images.append(dataset[i]["image"])
                index.append(i)
            except (DataError, OSError) as exc:
                out[i] = Prediction(str(samples[i].image_path), None, None, str(exc))
        if images:
            found = analyse(torch.stack(images), [category] * len(images))
            d = found.decisions
            for j, i in enumerate(index):
                p = Prediction(str(samples[i].image_path), float(found.scores[j]), found.maps[j].numpy())
                if d is not None:
                    p.category, p.pred_score = d.category[j], float(d.pred_score[j])
                    p.pred_label, p.pred_mask = int(d.pred_label[j]), d.pred_mask[j]
                out[i] = p
        for i in sorted(out):
            yield out[i]


def predict_files(
    analyse: Callable[[Tensor, list[str | None]], Analysis],
    paths: list[Path],
    *,
    image_size: int,
    map_size: int,
    batch_size: int = 16,
    progress: bool = True,
    category: str | None = None,
) -> list[Prediction]:
    """Every :func:`iter_predictions` at once (maps of all files in memory: for a few files)."""
    return list(
        iter_predictions(
            analyse,
            paths,
            image_size=image_size,
            map_size=map_size,
            batch_size=batch_size,
            progress=progress,
            category=category,
        )
    )


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


@dataclass
class ImageScan:
    """What a folder holds: the image files that will be scored, and every other entry with why it is not."""

    root: Path  # the folder (or the single file's folder): paths are named relative to it
    files: list[Path]
    skipped: list[tuple[Path, str]]  # (path, reason): other file types, broken links, folder loops


def scan_images(target: str | Path) -> ImageScan:
    """The images under ``target`` (a file, or a folder searched recursively), sorted, and everything else named.

    Followed: symbolic links to files and to folders (a folder reached again through a link, a loop, is
    listed once, by its first path). Scored: files with an extension of :data:`IMAGE_EXTENSIONS`
    (case-insensitive), hidden ones too. Every other file, a broken link or a loop is in ``skipped`` with
    the reason, so a caller can count and name it. A missing folder, or one without images, is an error.
    """
    target = Path(target)
    if not target.exists():
        raise DataError(
            f"image folder {str(target)!r} does not exist" + (" (a broken link)" if target.is_symlink() else "")
        )
    if target.is_file():
        return ImageScan(target.parent, [target], [])
    files: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    seen: dict[tuple[int, int], Path] = {}
    supported = ", ".join(sorted(IMAGE_EXTENSIONS))

    def unreadable(exc: OSError) -> None:
        skipped.append((Path(exc.filename or target), f"not scanned: cannot read the folder ({exc.strerror or exc})"))

    for folder, dirs, names in os.walk(target, followlinks=True, onerror=unreadable):
        here = Path(folder)
        st = here.stat()
        if (st.st_dev, st.st_ino) in seen:  # a link back to a folder already scanned: a loop, or the same folder twice
            first = str(seen[(st.st_dev, st.st_ino)])
            skipped.append((here, f"not scanned: a link to the folder {first!r}, already scanned"))
            dirs[:] = []
            continue
        seen[(st.st_dev, st.st_ino)] = here
        dirs.sort()
        for name in names:
            path = here / name
            if not path.exists():
                skipped.append((path, "not scored: a broken link (its target does not exist)"))
            elif not path.is_file():
                skipped.append((path, "not scored: not a regular file"))
            elif path.suffix.lower() in IMAGE_EXTENSIONS:
                files.append(path)
            else:
                kind = f"{path.suffix!r} files" if path.suffix else "files without an extension"
                skipped.append((path, f"not scored: {kind} are not read (image types read: {supported})"))
    files.sort()
    skipped.sort()
    if not files:
        others = (
            f" ({len(skipped)} other entr{'y' if len(skipped) == 1 else 'ies'}, e.g. {str(skipped[0][0])!r}: "
            f"{skipped[0][1]})"
            if skipped
            else ""
        )
        raise VPDMError(f"no images ({supported}) found under {str(target)!r}{others}")
    return ImageScan(target, files, skipped)


def image_files(folder: str | Path) -> list[Path]:
    """The images of a folder (recursively), sorted; a missing or empty folder is an error (:func:`scan_images`)."""
    return scan_images(folder).files
