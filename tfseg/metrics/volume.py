"""Per-subject volume metrics in physical units: Dice, IoU, HD95, ASD (mm), precision, recall, AUC.

Inputs are label maps on the subject's original grid, numpy (z, y, x) for volumes or (y, x) for
single slices, with the spacing in the same axis order (`spacing_zyx`, mm).

Definitions (per class c, P = {pred == c}, T = {truth == c}):
- Dice = 2|P∩T| / (|P| + |T|); IoU (Jaccard) = |P∩T| / |P∪T|; precision = |P∩T| / |P|;
  recall (sensitivity) = |P∩T| / |T|.
- Surfaces: the voxels of a mask with at least one face-neighbour outside it (SimpleITK
  `LabelContour`, fullyConnected=False; outside the image counts as background). Distance from a
  voxel to a surface: Euclidean distance in mm between voxel centres to the nearest surface voxel
  (SimpleITK `SignedMaurerDistanceMap` with useImageSpacing=True on the other mask's surface).
- The symmetric surface distances are pooled: the distances of every P-surface voxel to the
  T-surface together with those of every T-surface voxel to the P-surface.
  **hd95_mm** = 95th percentile of the pooled distances (linear interpolation, numpy's default),
  as MedPy's `hd95`. (MONAI's `compute_hausdorff_distance(percentile=95)` instead takes the larger
  of the two directed 95th percentiles, which is ≥ ours.) **hd_mm** = the maximum of the pooled
  distances, the classical Hausdorff distance. **asd_mm** = mean of the pooled distances: the
  average symmetric surface distance (ASSD), as MONAI's `symmetric=True`; MedPy's `assd` instead
  averages the two directed means, which differs when the surfaces have different sizes.
- Empty masks (docs/evaluation.md), never NaN: P and T both empty → Dice = IoU = precision = recall
  = 1 and distances 0; exactly one empty → Dice = IoU = precision = recall = 0 and every distance
  = the diagonal of the image's field of view in mm, sqrt(Σ (nᵢ·spacingᵢ)²), a bound on any
  distance inside the image.
- Distances in voxels (for tables that report voxels): pass spacing_zyx = (1, 1, 1).

For speed, the distance maps are computed on the bounding box of P∪T plus a one-voxel background
margin, which leaves every distance unchanged.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk
from scipy import stats

METRIC_NAMES = ("dice", "iou", "precision", "recall", "hd95_mm", "hd_mm", "asd_mm")


def _check_label_map(array, name: str, num_classes: int) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype == bool:
        array = array.astype(np.uint8)
    if not np.issubdtype(array.dtype, np.integer):
        if not np.issubdtype(array.dtype, np.floating) or not np.all(np.isfinite(array)) \
                or not np.array_equal(array, np.round(array)):
            raise ValueError(f"volume_metrics: {name} must be an integer label map, got dtype "
                             f"{array.dtype} with non-integer values. Pass argmax class indices.")
        array = array.astype(np.int64)
    if array.size and (array.min() < 0 or array.max() >= num_classes):
        raise ValueError(f"volume_metrics: {name} has labels in [{array.min()}, {array.max()}] "
                         f"but num_classes={num_classes} allows 0 … {num_classes - 1}. Map the "
                         f"dataset's label values to class indices first.")
    return array


def _check_inputs(pred, truth, spacing_zyx, num_classes):
    if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"volume_metrics: num_classes={num_classes!r} must be a positive int.")
    pred = _check_label_map(pred, "pred", num_classes)
    truth = _check_label_map(truth, "truth", num_classes)
    if pred.shape != truth.shape:
        raise ValueError(f"volume_metrics: pred {pred.shape} and truth {truth.shape} differ; "
                         f"resample the prediction to the label's grid first.")
    if pred.ndim not in (2, 3):
        raise ValueError(f"volume_metrics: expected (z, y, x) or (y, x) label maps, got shape "
                         f"{pred.shape}.")
    spacing = tuple(float(s) for s in spacing_zyx)
    if len(spacing) != pred.ndim or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"volume_metrics: spacing_zyx={tuple(spacing_zyx)} must hold "
                         f"{pred.ndim} positive spacings (mm) in array axis order for label "
                         f"maps of shape {pred.shape}.")
    return pred, truth, spacing


def field_of_view_diagonal(shape, spacing_zyx) -> float:
    """sqrt(Σ (nᵢ·spacingᵢ)²) in mm: the distance reported when exactly one mask is empty."""
    return float(math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing_zyx))))


def _to_image(mask: np.ndarray, spacing_zyx) -> sitk.Image:
    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    image.SetSpacing(tuple(reversed(spacing_zyx)))              # SimpleITK wants x, y, z
    return image


def _surface(mask: np.ndarray, spacing_zyx) -> np.ndarray:
    """Boolean surface (face-connected contour) of a non-empty mask with a background margin."""
    contour = sitk.LabelContour(_to_image(mask, spacing_zyx), fullyConnected=False,
                                backgroundValue=0)
    return sitk.GetArrayFromImage(contour) > 0


def _distance_to(surface: np.ndarray, spacing_zyx) -> np.ndarray:
    """Distance in mm from every voxel centre to the nearest voxel of `surface` (0 on it)."""
    distance = sitk.SignedMaurerDistanceMap(_to_image(surface, spacing_zyx),
                                            insideIsPositive=False, squaredDistance=False,
                                            useImageSpacing=True)
    # Outside the surface set the signed map is the positive distance to its nearest voxel;
    # on it the value is <= 0.
    return np.maximum(sitk.GetArrayFromImage(distance), 0.0)


def surface_distances(pred_mask, truth_mask, spacing_zyx) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances (mm) between two non-empty binary masks.

    Args:
        pred_mask: boolean (z, y, x) or (y, x) array, not empty.
        truth_mask: boolean array of the same shape, not empty.
        spacing_zyx: voxel spacing in mm, array axis order.

    Returns:
        (distances of each pred-surface voxel to the truth surface,
         distances of each truth-surface voxel to the pred surface), float64 1-D arrays.

    Raises:
        ValueError: if a mask is empty (the distance is undefined; see the empty-mask policy).
    """
    pred_mask = np.asarray(pred_mask, bool)
    truth_mask = np.asarray(truth_mask, bool)
    if not pred_mask.any() or not truth_mask.any():
        raise ValueError("surface_distances: both masks must be non-empty; volume_metrics "
                         "applies the empty-mask policy before calling it.")
    # Bounding box of the union plus a one-voxel background margin (exact, and much faster).
    union = np.nonzero(pred_mask | truth_mask)
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in union)
    pred_box = np.pad(pred_mask[box], 1)
    truth_box = np.pad(truth_mask[box], 1)
    pred_surface = _surface(pred_box, spacing_zyx)
    truth_surface = _surface(truth_box, spacing_zyx)
    pred_to_truth = _distance_to(truth_surface, spacing_zyx)[pred_surface]
    truth_to_pred = _distance_to(pred_surface, spacing_zyx)[truth_surface]
    return pred_to_truth.astype(np.float64), truth_to_pred.astype(np.float64)


def dice(pred_mask, truth_mask) -> float:
    """Voxel Dice 2|P∩T| / (|P| + |T|) of two boolean masks; 1 when both are empty (the
    empty-mask policy). The one Dice of tfseg: validation and evaluation both use it."""
    pred_mask = np.asarray(pred_mask, bool)
    truth_mask = np.asarray(truth_mask, bool)
    total = int(pred_mask.sum()) + int(truth_mask.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(pred_mask, truth_mask).sum()) / total


def dice_scores(pred_masks, truth_masks) -> np.ndarray:
    """`dice` per channel of (..., N) boolean masks: (N,) float64."""
    pred_masks, truth_masks = np.asarray(pred_masks), np.asarray(truth_masks)
    if pred_masks.shape != truth_masks.shape:
        raise ValueError(f"dice_scores: masks {pred_masks.shape} and {truth_masks.shape} differ.")
    return np.array([dice(pred_masks[..., n], truth_masks[..., n])
                     for n in range(pred_masks.shape[-1])], np.float64)


def binary_metrics(pred_mask, truth_mask, spacing_zyx) -> dict[str, float]:
    """All of `METRIC_NAMES` for one pair of binary masks, with the empty-mask policy.

    Args:
        pred_mask: boolean (z, y, x) or (y, x) array.
        truth_mask: boolean array of the same shape.
        spacing_zyx: voxel spacing in mm, array axis order.

    Returns:
        {"dice", "iou", "precision", "recall", "hd95_mm", "hd_mm", "asd_mm"} as floats.
    """
    pred_mask = np.asarray(pred_mask, bool)
    truth_mask = np.asarray(truth_mask, bool)
    pred_count = int(pred_mask.sum())
    truth_count = int(truth_mask.sum())
    if pred_count == 0 and truth_count == 0:
        return {"dice": 1.0, "iou": 1.0, "precision": 1.0, "recall": 1.0,
                "hd95_mm": 0.0, "hd_mm": 0.0, "asd_mm": 0.0}
    if pred_count == 0 or truth_count == 0:
        diagonal = field_of_view_diagonal(pred_mask.shape, spacing_zyx)
        return {"dice": 0.0, "iou": 0.0, "precision": 0.0, "recall": 0.0,
                "hd95_mm": diagonal, "hd_mm": diagonal, "asd_mm": diagonal}
    overlap = int(np.logical_and(pred_mask, truth_mask).sum())
    pred_to_truth, truth_to_pred = surface_distances(pred_mask, truth_mask, spacing_zyx)
    pooled = np.concatenate([pred_to_truth, truth_to_pred])
    return {
        "dice": dice(pred_mask, truth_mask),
        "iou": overlap / (pred_count + truth_count - overlap),
        "precision": overlap / pred_count,
        "recall": overlap / truth_count,
        "hd95_mm": float(np.percentile(pooled, 95)),
        "hd_mm": float(pooled.max()),
        "asd_mm": float(pooled.mean()),
    }


def volume_metrics(pred, truth, spacing_zyx: Sequence[float], num_classes: int,
                   include_background: bool = False) -> dict[int, dict[str, float]]:
    """Per-class metrics of a predicted label map against the reference, in mm.

    Args:
        pred: predicted class indices, (z, y, x) or (y, x), integer valued in [0, num_classes).
        truth: reference class indices, same shape.
        spacing_zyx: voxel spacing in mm in array axis order (2 values for a slice).
        num_classes: K, background (class 0) included.
        include_background: also report class 0.

    Returns:
        {class_index: {"dice", "iou", "precision", "recall", "hd95_mm", "hd_mm", "asd_mm"}} for
        classes 1 … K−1 (0 … K−1 with include_background). Never NaN (empty-mask policy in the
        module docstring).

    Raises:
        ValueError: on shape mismatch, a rank other than 2/3, a wrong number of spacings,
            non-integer labels or labels outside [0, num_classes).
    """
    pred, truth, spacing = _check_inputs(pred, truth, spacing_zyx, num_classes)
    first = 0 if include_background else 1
    return {c: binary_metrics(pred == c, truth == c, spacing) for c in range(first, num_classes)}


def mean_iou(pred, truth, num_classes: int, include_background: bool = True) -> float:
    """Mean over classes of the per-class IoU of one subject (the semantic-segmentation mIoU).

    The DMNet paper (Fang & Li, MICCAI 2020) reports mIoU; we use the usual semantic-segmentation
    definition, the unweighted mean of the K per-class IoUs with the background included. A class
    absent from both maps counts as IoU 1 (empty-mask policy).

    Args:
        pred: predicted class indices, (z, y, x) or (y, x).
        truth: reference class indices, same shape.
        num_classes: K.
        include_background: average over all K classes (default) or over 1 … K−1.

    Returns:
        The mean IoU in [0, 1].

    Raises:
        ValueError: as `volume_metrics`.
    """
    pred, truth, _ = _check_inputs(pred, truth, (1.0,) * np.ndim(pred), num_classes)
    ious = []
    for c in range(0 if include_background else 1, num_classes):
        pred_mask, truth_mask = pred == c, truth == c
        union = int(np.logical_or(pred_mask, truth_mask).sum())
        ious.append(1.0 if union == 0 else
                    int(np.logical_and(pred_mask, truth_mask).sum()) / union)
    if not ious:
        raise ValueError("mean_iou: no class to average (num_classes=1 without background).")
    return float(np.mean(ious))


def binary_mean_iou(pred_mask, truth_mask) -> float:
    """Two-class mIoU of one mask: (IoU of the mask + IoU of its complement) / 2.

    What DMNet's binary tables report as mIoU (tumour and background); for a class of a
    multi-class map, the class against everything else. Empty-mask policy: a class (or
    complement) absent from both masks has IoU 1.
    """
    pred_mask, truth_mask = np.asarray(pred_mask, bool), np.asarray(truth_mask, bool)
    if pred_mask.shape != truth_mask.shape:
        raise ValueError(f"binary_mean_iou: shapes {pred_mask.shape} and {truth_mask.shape} "
                         "differ.")
    ious = []
    for p, t in ((pred_mask, truth_mask), (~pred_mask, ~truth_mask)):
        union = int(np.logical_or(p, t).sum())
        ious.append(1.0 if union == 0 else int(np.logical_and(p, t).sum()) / union)
    return float(np.mean(ious))


def auc(probs, truth) -> float:
    """Area under the ROC curve of foreground probabilities against a binary reference.

    Computed exactly as the Mann–Whitney statistic over all voxels: the probability that a random
    foreground voxel gets a higher score than a random background voxel, ties counting ½.

    Args:
        probs: foreground probability (or any score) per voxel.
        truth: binary reference (bool or 0/1) of the same shape.

    Returns:
        The AUC in [0, 1], or NaN when `truth` is all foreground or all background (undefined:
        report it as missing, do not average it).

    Raises:
        ValueError: on a shape mismatch, non-finite scores or a non-binary reference.
    """
    scores = np.asarray(probs, np.float64).ravel()
    truth = np.asarray(truth)
    if truth.shape != np.shape(probs):
        raise ValueError(f"auc: probs {np.shape(probs)} and truth {truth.shape} differ.")
    if not np.all(np.isfinite(scores)):
        raise ValueError("auc: probs contain NaN or Inf.")
    if not np.all((truth == 0) | (truth == 1)):
        raise ValueError("auc: truth must be binary (0/1 or bool); for a multi-class map pass "
                         "truth == class_index.")
    positive = truth.ravel().astype(bool)
    num_positive = int(positive.sum())
    num_negative = positive.size - num_positive
    if num_positive == 0 or num_negative == 0:
        return math.nan
    ranks = stats.rankdata(scores)                     # average ranks for ties
    rank_sum = float(ranks[positive].sum())
    return (rank_sum - num_positive * (num_positive + 1) / 2.0) / (num_positive * num_negative)
