"""A folder of scored images (``vpdm predict``, ``jobs/score.py``): ``scores.csv``, ``overlays/``, ``masks/``.

Written as the images are scored, one row at a time, so that memory holds one batch whatever the number
of images: each row goes to ``scores.csv`` as soon as its image is scored (after its overlay and mask,
whose failure is written into the row instead of losing it). Everything is written into temporaries
beside the targets and takes its place at the end, together (:func:`vpdm.io.staged_outputs`): the folder
never holds the files of two runs, and an existing ``scores.csv``, ``overlays/`` or ``masks/`` is replaced
only with ``--overwrite``. Overlays share one colour scale fixed before the first image
(:func:`calibrated_overlay_scale`, or a first pass over the maps), never one that needs every map at once.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np

from vpdm.errors import OutputError
from vpdm.io import Output, output_error

__all__ = ["SCORE_COLUMNS", "ScoredFolder", "calibrated_overlay_scale", "scored_outputs"]

SCORE_COLUMNS: tuple[str, ...] = (
    "path",
    "category",
    "score",
    "pred_score",
    "pred_label",
    "pred_mask",
    "overlay",
    "error",
)


def scored_outputs(out: str | Path, *, overlays: bool, masks: bool) -> list[Output]:
    """The outputs of a scored folder; the ones not written this time still leave with a previous run."""
    out = Path(out)
    return [
        Output(out / "scores.csv", "scores"),
        Output(out / "overlays", "overlays folder", folder=True, written=overlays),
        Output(out / "masks", "masks folder", folder=True, written=masks),
    ]


def calibrated_overlay_scale(calibration: Any) -> float | None:
    """The overlays' colour scale from a calibration: 0 to the highest map value of its (normal) calibration
    images, so full red means above anything a normal image reached. None without a calibration."""
    if calibration is None or not calibration.classes:
        return None
    top = max(float(t.pixel_max) for t in calibration.classes.values())
    return top if top > 0 else None


def _cell(value: Any, digits: bool = False) -> str:
    if value is None:
        return ""
    return f"{value:.6f}" if digits else str(value)


class ScoredFolder:
    """Rows, overlays and masks written into the temporaries of :func:`vpdm.io.staged_outputs`.

    ``staged``: {final path: temporary} for ``out / "scores.csv"`` and, when written, ``out / "overlays"``
    and ``out / "masks"``. Links in the CSV name the final paths (``overlays/a__x.png``).
    """

    def __init__(self, out: str | Path, staged: dict[Path, Path], *, vmax: float | None) -> None:
        from vpdm.inference.detector import overlay_name

        self.out = Path(out)
        self.overlays = staged.get(self.out / "overlays")
        self.masks = staged.get(self.out / "masks")
        self.vmax = vmax
        self._name = overlay_name
        self._used: set[str] = set()
        self._used_masks: set[str] = set()
        self._csv_path = staged[self.out / "scores.csv"]
        self._file: IO[str] = open(self._csv_path, "w", newline="", encoding="utf-8")  # noqa: SIM115 (closed in close)
        self._writer = csv.writer(self._file)
        self._write_row(SCORE_COLUMNS)
        self.rows = self.scored = self.failed = self.skipped = self.flagged = 0
        self.output_failure: str | None = None  # the first overlay or mask that could not be written

    def _write_row(self, row: Any) -> None:
        try:
            self._writer.writerow(row)
            self._file.flush()
        except OSError as exc:
            raise output_error(exc, self.out / "scores.csv", "scores") from exc

    def _picture(
        self, folder: Path, final: str, rel: Path, used: set[str], what: str, draw: Callable[[], np.ndarray]
    ) -> str:
        """Write one PNG into the temporary ``folder`` (``final``: its name when in place); the link for the CSV,
        or '' when it cannot be written (the first failure is kept; later pictures are not tried)."""
        from PIL import Image

        if self.output_failure is not None:
            return ""
        name = self._name(rel, used)
        try:
            pixels = draw()
            try:
                Image.fromarray(pixels).save(folder / name, format="PNG")
            except OSError as exc:
                raise output_error(exc, self.out / final / name, what) from exc
        except OutputError as exc:
            self.output_failure = str(exc)
            return ""
        return f"{final}/{name}"

    def add(
        self,
        path: str,
        rel: Path,
        *,
        score: float | None = None,
        anomaly_map: np.ndarray | None = None,
        rgb: Callable[[], np.ndarray] | None = None,
        category: str | None = None,
        pred_score: float | None = None,
        pred_label: int | None = None,
        pred_mask: np.ndarray | None = None,
        error: str | None = None,
        skipped: bool = False,
    ) -> None:
        """One image's row (``rel``: its path relative to the scanned folder, which names its overlay and mask)."""
        from vpdm.evaluation.plots import overlay_array

        overlay = mask = ""
        notes = [error] if error else []
        if score is not None:
            if self.overlays is not None and anomaly_map is not None and rgb is not None:
                overlay = self._picture(
                    self.overlays,
                    "overlays",
                    rel,
                    self._used,
                    "overlay",
                    lambda: overlay_array(rgb(), anomaly_map, vmax=self.vmax),
                )
                if not overlay and self.output_failure:
                    notes.append(f"scored; overlay not written ({self.output_failure})")
            if self.masks is not None and pred_mask is not None:
                mask = self._picture(
                    self.masks,
                    "masks",
                    rel,
                    self._used_masks,
                    "mask",
                    lambda: np.asarray(pred_mask, dtype=np.uint8) * np.uint8(255),
                )
                if not mask and self.output_failure and not notes:
                    notes.append(f"scored; mask not written ({self.output_failure})")
        self._write_row(
            [
                path,
                category or "",
                _cell(score, True),
                _cell(pred_score, True),
                _cell(pred_label),
                mask,
                overlay,
                "; ".join(notes),
            ]
        )
        self.rows += 1
        if skipped:
            self.skipped += 1
        elif score is None:
            self.failed += 1
        else:
            self.scored += 1
            self.flagged += int(pred_label == 1)

    def close(self) -> None:
        """Complete ``scores.csv`` on disk (flushed and fsynced) before the outputs take their names."""
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as exc:
            raise output_error(exc, self.out / "scores.csv", "scores") from exc
        finally:
            self._file.close()

    def abort(self) -> None:
        self._file.close()
