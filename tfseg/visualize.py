"""Overlay montages: see where a segmentation is right and where it is wrong (numpy + matplotlib
Agg, no network).

One PNG per subject: evenly spaced slices along the slice axis (the axis the 2D networks slice,
`geometry["slice_axis_zyx"]`, or z for 3D), each slice drawn as

- the image in grey, with ONE intensity window for the whole subject (1st-99th percentile of the
  volume), so slices compare;
- one fixed colour per class or region (`colour`), the same in every picture of every run;
- the prediction's contour SOLID on the inner edge of the predicted mask, the ground truth's
  contour DOTTED on the outer edge of the true mask: both stay visible where they agree;
- square physical pixels: each panel is resampled (nearest neighbour, so voxels stay visible) to
  the in-plane spacing, so anisotropic slices are not squashed.

The slices are spread evenly between the first and the last slice holding a predicted or true
mask (all slices when both are empty). Orientation: volumes are shown in the canonical voxel order
preprocessing uses (`preprocessing.transforms.canonical_transform`: x to the patient's left, y to
posterior, z to superior, the 2D slice axis last), so brain slices are axial in the radiological
view (anterior up, the patient's left on the right) whatever the file's own axis order; records
written before that order existed are shown as stored, sliced along their slice axis. The montage is composed as a pixel array and placed unscaled in the
PNG, so `Montage.panel_boxes` says exactly where each slice is in the PNG; matplotlib draws only
the title (subject id, Dice per class) and the legend around it.
"""
from __future__ import annotations

import dataclasses
import glob
import os
import re
import textwrap
import time
from typing import Callable, Sequence

import numpy as np
from absl import logging
from scipy import ndimage

from tfseg._files import atomic_path

__all__ = ["COLOURS", "Montage", "colour", "intensity_window", "choose_slices", "compose_montage",
           "write_montage", "write_subject_overlay", "overlay_name", "find_overlay",
           "evaluation_overlays", "write_prediction_overlay", "display_channel",
           "canonical_view", "OVERLAYS_DIR"]

OVERLAYS_DIR = "overlays"
# Okabe-Ito colours (distinguishable with the common colour-vision deficiencies), then more.
COLOURS = ((230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66), (0, 114, 178),
           (213, 94, 0), (204, 121, 167), (255, 0, 255), (0, 255, 0), (255, 0, 0))
BACKGROUND = (255, 255, 255)  # the figure around the panels
_DPI = 100
_GAP = 6            # pixels between panels
_TITLE_HEIGHT = 54  # pixels above the panels (three lines of text)
_MIN_WIDTH = 560    # room for the title and the legend


def colour(index: int) -> tuple[int, int, int]:
    """The fixed RGB colour (0-255) of reported class / region number `index` (0 = the first
    foreground class or the first region)."""
    return COLOURS[index % len(COLOURS)]


@dataclasses.dataclass(frozen=True)
class Montage:
    """What `compose_montage` drew and where.

    Attributes:
      pixels: (height, width, 3) uint8, the panels on the figure background.
      slice_indices: the slices shown, in panel order (row-major).
      panel_boxes: per panel (top, left, height, width) in `pixels` (and in the written PNG, whose
        title band is added above: see `write_montage`).
      window: the intensity window (low, high) of the subject.
    """

    pixels: np.ndarray
    slice_indices: tuple[int, ...]
    panel_boxes: tuple[tuple[int, int, int, int], ...]
    window: tuple[float, float]


def intensity_window(volume: np.ndarray, percentiles: tuple[float, float] = (1.0, 99.0)
                     ) -> tuple[float, float]:
    """(low, high) grey window of a whole volume: its percentiles (finite voxels)."""
    values = np.asarray(volume, dtype=np.float32)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 1.0
    # A strided sample keeps this cheap on big volumes; percentiles barely move.
    step = max(1, values.size // 2_000_000)
    low, high = (float(v) for v in np.percentile(values[::step], percentiles))
    return (low, high) if high > low else (low, low + 1.0)


def choose_slices(masks: Sequence[np.ndarray], depth: int, num_slices: int) -> list[int]:
    """Up to `num_slices` slice indices spread evenly from the first to the last slice where any
    of `masks` ((depth, ...) bool) is set; over all `depth` slices when every mask is empty."""
    present = np.zeros(depth, bool)
    for mask in masks:
        present |= np.asarray(mask).reshape(depth, -1).any(axis=1)
    first, last = (int(np.argmax(present)), int(depth - 1 - np.argmax(present[::-1]))) \
        if present.any() else (0, depth - 1)
    count = min(num_slices, last - first + 1)
    return sorted({int(round(v)) for v in np.linspace(first, last, count)})


def _resample_indices(size: int, spacing: float, pixel_mm: float) -> np.ndarray:
    """Nearest-neighbour source index of each output pixel along one axis."""
    out = max(1, int(round(size * spacing / pixel_mm)))
    return np.minimum(((np.arange(out) + 0.5) * size / out).astype(np.int64), size - 1)


def _edges(mask: np.ndarray, width: int, outer: bool) -> np.ndarray:
    """The band of `width` pixels just inside (outer=False) or just outside a mask."""
    if not mask.any():
        return mask
    if outer:
        return ndimage.binary_dilation(mask, iterations=width) & ~mask
    return mask & ~ndimage.binary_erosion(mask, iterations=width, border_value=0)


def compose_montage(image: np.ndarray, spacing_zyx: Sequence[float],
                    prediction_masks: np.ndarray | None, truth_masks: np.ndarray | None = None,
                    *, slice_axis: int = 0, num_slices: int = 8, columns: int = 4,
                    panel_size: int = 256, window: tuple[float, float] | None = None
                    ) -> Montage:
    """Draws the slices of one subject with its contours into a pixel array.

    Args:
      image: (z, y, x) or (y, x) intensities on the original grid.
      spacing_zyx: voxel size in mm, same axis order as `image`.
      prediction_masks: (*image.shape, N) bool, one mask per reported class / region, or None.
      truth_masks: the same for the ground truth, or None (prediction only).
      slice_axis: the axis of `image` along which the slices are taken.
      num_slices: at most this many slices.
      columns: panels per row.
      panel_size: pixels of the longer physical side of a panel.
      window: grey window (low, high); default `intensity_window(image)`.

    Returns:
      The `Montage`.

    Raises:
      ValueError: if a mask's shape does not match the image.
    """
    image = np.asarray(image)
    spacing = tuple(float(s) for s in spacing_zyx)
    if image.ndim == 2:  # a single 2D image: one slice
        image, spacing, slice_axis = image[None], (1.0, *spacing[-2:]), 0
    if image.ndim != 3 or len(spacing) != 3:
        raise ValueError(f"Overlay: expected a (z, y, x) image with 3 spacings, got shape "
                         f"{image.shape} and spacing {spacing_zyx}.")
    layers = []  # (masks (Z, Y, X, N), outer edge?)
    for masks, outer in ((truth_masks, True), (prediction_masks, False)):
        if masks is None:
            continue
        masks = np.asarray(masks, dtype=bool).reshape(image.shape + (-1,))
        layers.append((np.moveaxis(masks, slice_axis, 0), outer))
    volume = np.moveaxis(image, slice_axis, 0)
    row_mm, col_mm = (s for a, s in enumerate(spacing) if a != slice_axis)
    low, high = window or intensity_window(volume)
    depth, rows, cols = volume.shape
    slices = choose_slices([m for m, _ in layers], depth, num_slices)

    pixel_mm = max(rows * row_mm, cols * col_mm) / panel_size
    row_index = _resample_indices(rows, row_mm, pixel_mm)
    col_index = _resample_indices(cols, col_mm, pixel_mm)
    height, width = len(row_index), len(col_index)
    line = max(1, int(round(panel_size / 128)))
    yy, xx = np.mgrid[:height, :width]
    dots = ((yy // 3 + xx // 3) % 2) == 0  # the dotted pattern of the truth's contours

    columns = max(1, min(columns, len(slices)))
    grid_rows = -(-len(slices) // columns)
    canvas_width = max(_MIN_WIDTH, columns * (width + _GAP) + _GAP)
    canvas = np.empty((grid_rows * (height + _GAP) + _GAP, canvas_width, 3), np.uint8)
    canvas[:] = BACKGROUND
    left0 = (canvas_width - (columns * (width + _GAP) - _GAP)) // 2
    boxes = []
    for n, index in enumerate(slices):
        grey = np.clip((volume[index][np.ix_(row_index, col_index)] - low) / (high - low), 0, 1)
        panel = np.repeat((grey * 255 + 0.5).astype(np.uint8)[..., None], 3, axis=-1)
        for masks, outer in layers:  # truth first (outside), prediction on top (inside)
            shown = masks[index][np.ix_(row_index, col_index)]  # (height, width, N)
            for c in range(shown.shape[-1]):
                band = _edges(shown[..., c], line, outer)
                panel[band & dots if outer else band] = colour(c)
        top = _GAP + (n // columns) * (height + _GAP)
        left = left0 + (n % columns) * (width + _GAP)
        canvas[top:top + height, left:left + width] = panel
        boxes.append((top, left, height, width))
    return Montage(canvas, tuple(slices), tuple(boxes), (float(low), float(high)))


def subject_title(subject_id: str, names: Sequence[str], dice: Sequence[float] | None,
                  note: str = "") -> str:
    """"<subject>  mean Dice 0.812" then "name 0.901 · ..." (or "prediction only")."""
    if dice is None:
        lines = [f"{subject_id}  (prediction; no ground truth)"]
    else:
        lines = [f"{subject_id}  mean Dice {float(np.mean(dice)):.3f}",
                 "Dice: " + " · ".join(f"{n} {d:.3f}" for n, d in zip(names, dice))]
    return "\n".join(lines + ([note] if note else []))


def write_montage(path: str, montage: Montage, names: Sequence[str], title: str,
                  with_truth: bool = True) -> tuple[int, int]:
    """Writes the montage as a PNG (atomic) with the title band above and the legend below.

    The panels are placed unscaled: a pixel (r, c) of `montage.pixels` is at (r + top, c) of the
    PNG, where top = `title_band_height(title, width)`.

    Returns:
      (height, width) of the PNG.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from PIL import Image  # matplotlib's own dependency

    body_height, width = montage.pixels.shape[:2]
    chars = max(20, width // 7)
    text = "\n".join(textwrap.fill(line, chars) for line in title.split("\n"))
    title_height = title_band_height(title, width)
    entries = len(names) + 1 + with_truth
    per_row = max(1, min(entries, width // 150))
    legend_height = 12 + 20 * (-(-entries // per_row))
    height = title_height + body_height + legend_height
    figure = Figure(figsize=(width / _DPI, height / _DPI), dpi=_DPI, facecolor="white")
    canvas = FigureCanvasAgg(figure)
    figure.text(0.5, 1 - 4 / height, text, ha="center", va="top", fontsize=9)
    handles = [Line2D([], [], color=np.array(colour(c)) / 255, lw=3, label=name)
               for c, name in enumerate(names)]
    handles.append(Line2D([], [], color="black", lw=2, label="prediction (solid, inner edge)"))
    if with_truth:
        handles.append(Line2D([], [], color="black", lw=2, ls=":",
                              label="ground truth (dotted, outer edge)"))
    figure.legend(handles=handles, loc="lower center", ncol=per_row, frameon=False,
                  fontsize=8, bbox_to_anchor=(0.5, 0.0))
    canvas.draw()  # the text only; the panels are pasted in unscaled (no resampling)
    pixels = np.array(canvas.buffer_rgba())[..., :3]
    if pixels.shape[:2] != (height, width):
        raise RuntimeError(f"matplotlib drew {pixels.shape[:2]} pixels, expected "
                           f"{(height, width)}.")
    pixels[title_height:title_height + body_height] = montage.pixels
    with atomic_path(path, ".png") as temporary:
        Image.fromarray(pixels).save(temporary, format="PNG")
    return height, width


def title_band_height(title: str, width: int) -> int:
    """Pixels above the panels in the PNG of `write_montage`."""
    chars = max(20, width // 7)
    lines = sum(len(textwrap.wrap(line, chars)) or 1 for line in title.split("\n"))
    return max(_TITLE_HEIGHT, 10 + 16 * lines)


# --------------------------------------------------------------------------- file names
def overlay_name(subject_id: str, mean_dice: float | None) -> str:
    """`dice0.734_<subject>.png`: names sort worst subject first; `<subject>.png` without truth."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", subject_id)
    return f"{safe}.png" if mean_dice is None else f"dice{mean_dice:.3f}_{safe}.png"


def find_overlay(folder: str, subject_id: str) -> str | None:
    """The overlay of a subject in `folder` (any Dice prefix), or None."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", subject_id)
    found = sorted(glob.glob(os.path.join(glob.escape(folder), f"dice?.???_{glob.escape(safe)}"
                                                                ".png")))
    if found:
        return found[-1]
    plain = os.path.join(folder, f"{safe}.png")
    return plain if os.path.isfile(plain) else None


def write_subject_overlay(folder: str, subject_id: str, image: np.ndarray,
                          spacing_zyx: Sequence[float], names: Sequence[str],
                          prediction_masks: np.ndarray, truth_masks: np.ndarray | None = None,
                          dice: Sequence[float] | None = None, *, slice_axis: int = 0,
                          note: str = "", **montage_options) -> str:
    """Composes and writes one subject's montage into `folder`; replaces its earlier overlay.

    Args:
      folder: the overlays folder (created).
      subject_id: names the file (`overlay_name`) and heads the title.
      image, spacing_zyx, prediction_masks, truth_masks, slice_axis: see `compose_montage`.
      names: the reported classes / regions, in mask order.
      dice: per name, the subject's Dice (with the truth), for the title and the file name.
      note: an extra title line (e.g. which modality is shown).
      **montage_options: num_slices, columns, panel_size, window.

    Returns:
      The written path.
    """
    montage = compose_montage(image, spacing_zyx, prediction_masks, truth_masks,
                              slice_axis=slice_axis, **montage_options)
    mean = float(np.mean(dice)) if dice is not None and len(dice) else None
    path = os.path.join(folder, overlay_name(subject_id, mean))
    old = find_overlay(folder, subject_id)
    write_montage(path, montage, names, subject_title(subject_id, names, dice, note),
                  with_truth=truth_masks is not None)
    if old and os.path.abspath(old) != os.path.abspath(path):
        os.remove(old)
    return path


# --------------------------------------------------------------------------- evaluation / prediction
def display_channel(modalities: Sequence[str]) -> int:
    """The modality drawn under the contours: FLAIR when there is one (tumour and oedema show
    best), else the first."""
    lowered = [str(m).lower() for m in modalities]
    return lowered.index("flair") if "flair" in lowered else 0


def evaluation_overlays(folder: str, manifest: dict, names: Sequence[str], **montage_options
                        ) -> Callable[..., None]:
    """The `on_subject` callback of `tfseg.evaluate.evaluate_volumes` that writes each subject's
    montage into `folder`: its original image (`display_channel` of the manifest's modalities),
    on its own grid, sliced along the records' slice axis.

    A subject whose image cannot be read (moved data folder) gets a warning, no montage. The
    folder's earlier montages (`dice*_*.png`) are removed first: like summary.json, the
    folder then shows one evaluation. The callback records the seconds it took in
    `record["overlay_seconds"]`.
    """
    from tfseg.io import read_channels

    for stale in glob.glob(os.path.join(glob.escape(folder), "dice?.???_*.png")):
        os.remove(stale)

    modalities = manifest.get("modalities") or ["image"]
    channel = display_channel(modalities)

    def write(subject, prediction_masks, truth_masks, record) -> None:
        started = time.perf_counter()
        entry = manifest["subjects"][subject.subject_id]
        indices = entry.get("channel_indices")
        try:
            image, meta = read_channels([entry["image_paths"][channel]],
                                        [indices[channel]] if indices else None)[0]
        except ValueError as error:  # a picture is not worth losing the evaluation for
            logging.warning("No overlay for %s: %s", subject.subject_id, error)
            return
        geometry = entry.get("geometry") or {}
        (image, prediction_masks, truth_masks), spacing, slice_axis = canonical_view(
            [image, prediction_masks, truth_masks], meta, geometry.get("reorient"),
            int(geometry.get("slice_axis_zyx", 0)))
        dice = [record[name]["dice"] for name in names]
        write_subject_overlay(folder, subject.subject_id, image, spacing, names,
                              prediction_masks, truth_masks, dice, slice_axis=slice_axis,
                              note=f"image: {modalities[channel]}", **montage_options)
        record["overlay_seconds"] = round(time.perf_counter() - started, 2)

    return write


def canonical_view(arrays: Sequence[np.ndarray | None], meta, transform: dict | None,
                   slice_axis_zyx: int = 0) -> tuple[list, tuple[float, ...], int]:
    """Arrays (z, y, x[, ...]) on one original grid (`meta`: its `ImageMeta`) in the display
    order: `preprocessing.transforms.reorient` with the recorded `transform` (the records'
    geometry "reorient"), sliced along z; without a transform, as stored, sliced along
    `slice_axis_zyx`.

    Returns:
      (arrays (None stays None), spacing_zyx of the shown order, the slice axis).
    """
    if not transform or meta.ndim != 3:
        return list(arrays), meta.spacing_zyx, slice_axis_zyx
    from preprocessing.transforms import reorient

    shown = [None if a is None else reorient(np.asarray(a), meta, transform)[0] for a in arrays]
    return shown, reorient(np.zeros((0, 0, 0)), meta, transform)[1].spacing_zyx, 0


def write_prediction_overlay(path: str, subject_id: str, image: np.ndarray, meta,
                             names: Sequence[str], prediction_masks: np.ndarray, *,
                             transform: dict | None = None, note: str = "",
                             **montage_options) -> str:
    """The montage of a prediction without ground truth (`launch.predict --overlays`), written
    to `path`. `meta`: the scan's `ImageMeta`; `transform`: its canonical orientation
    (`canonical_view`); other arguments as `write_subject_overlay`. Returns `path`."""
    (image, prediction_masks), spacing, slice_axis = canonical_view(
        [image, prediction_masks], meta, transform)
    montage = compose_montage(image, spacing, prediction_masks, None,
                              slice_axis=slice_axis, **montage_options)
    write_montage(path, montage, names, subject_title(subject_id, names, None, note),
                  with_truth=False)
    return path
