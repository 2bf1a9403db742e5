"""Pure per-subject transforms, shared by preprocessing, evaluation and prediction.

`preprocess_volume` turns the modalities (and label) of one subject into the arrays the records
hold; `restore_geometry` maps a prediction on that processed grid back onto the original grid.

Choices (documented here because they decide what the network sees):
- Intensities: optional N4 per channel, CT window clip, then per channel (x − p_low) /
  (p_high − p_low) with the percentiles (2, 98 by default) taken over the subject's foreground
  mask: Otsu of the first modality (after N4 / windowing) with enclosed holes filled. Background
  is excluded because its share of the volume varies with the field of view, which would shift
  the percentiles between subjects. A mask under 0.1 % of the volume falls back to the whole
  volume (recorded in the stats).
- 2D datasets: resampled in-plane to the target spacing keeping the z grid, origin and direction
  (linear for images, nearest for labels; edge voxels extrapolate from the nearest voxel), then
  centre cropped/padded to the crop size. Image padding uses each channel's minimum normalised
  value (its background level), label padding 0.
- Orientation: every 3D scan is first permuted/flipped (exactly, no resampling) to one
  canonical voxel order, x → left, y → posterior, z → superior, with the 2D slice axis chosen
  from the geometry (see `canonical_transform`; `Dataset.slice_axis_zyx` fixes it for files
  whose headers misstate the axes, e.g. KiTS19); `restore_geometry` undoes it, so predictions
  are written on each input's own grid and voxel order. The same scan stored as RAS, LPS or
  with permuted axes gives the same segmentation.
- 3D datasets: the normalised volume as is, padded symmetrically (same pad values) only where it
  is smaller than the training patch. Patch corners lie on the stride grid 0, s, 2s, … ≤ D − P
  (as in the reference code); when (D − P) is not a multiple of s, the last (D − P) mod s voxels
  of an axis are in no grid patch (the pipeline may jitter corners to reach them).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

import numpy as np
import SimpleITK as sitk

from preprocessing import n4 as n4_lib
from preprocessing.config import PreprocessConfig, resolve_config
from tfseg.datasets.base import Dataset
from tfseg.io import ImageMeta, array_to_sitk

SPACING_RTOL = 1e-3        # relative
ORIGIN_ATOL_MM = 1e-2      # mm
DIRECTION_ATOL = 1e-3      # direction cosines
_MIN_MASK_FRACTION = 1e-3


@dataclasses.dataclass(frozen=True, eq=False)
class ProcessedVolume:
    """One subject after preprocessing.

    Attributes:
      image: (Z, H, W, C) float32 normalised intensities.
      label: (Z, H, W) uint8 class indices, or None.
      geometry: JSON-able dict for `restore_geometry`.
      patch_corners: 3D datasets: (N, 3) int64 patch start corners (z, y, x); None for 2D.
      stats: JSON-able facts: percentiles per channel, N4 use and seconds, mask fraction, pad
        values and the patch-corner rule.
    """

    image: np.ndarray
    label: np.ndarray | None
    geometry: dict[str, Any]
    patch_corners: np.ndarray | None
    stats: dict[str, Any]


def _name(sources: Sequence[str] | None, index: int, what: str = "image") -> str:
    return sources[index] if sources is not None else f"{what} {index}"


def check_geometry(metas: Sequence[ImageMeta], sources: Sequence[str] | None = None,
                   orientation_reliable: bool = True) -> None:
    """Checks that images (and label) share one voxel grid.

    Size must match exactly; spacing within 1e-3 relative; origin within 0.01 mm; direction
    within 1e-3, and only when the dataset's orientation headers are reliable.

    Raises:
      ValueError: naming both files, the differing values and the fix.
    """
    reference = metas[0]
    for index, meta in enumerate(metas[1:], start=1):
        problem = None
        if tuple(meta.size_xyz) != tuple(reference.size_xyz):
            problem = f"size (x, y, z) {meta.size_xyz} vs {reference.size_xyz}"
        elif not np.allclose(meta.spacing_xyz, reference.spacing_xyz, rtol=SPACING_RTOL, atol=0):
            problem = f"spacing (x, y, z) {meta.spacing_xyz} vs {reference.spacing_xyz}"
        elif not np.allclose(meta.origin_xyz, reference.origin_xyz, rtol=0, atol=ORIGIN_ATOL_MM):
            problem = f"origin {meta.origin_xyz} vs {reference.origin_xyz}"
        elif orientation_reliable and not np.allclose(meta.direction, reference.direction,
                                                      rtol=0, atol=DIRECTION_ATOL):
            problem = f"direction {meta.direction} vs {reference.direction}"
        if problem:
            raise ValueError(
                f"{_name(sources, index)} does not share the voxel grid of "
                f"{_name(sources, 0)}: {problem}. Expected every modality and the label of a "
                "subject on one grid; check the files belong to the same subject, or resample "
                "them onto one grid (e.g. onto the label) before preprocessing.")


def remap_label(label: np.ndarray, raw_to_class: dict[int, int], source: str = "label"
                ) -> np.ndarray:
    """Maps raw label values to class indices (e.g. iSEG 0/10/150/250 -> 0/1/2/3).

    Raises:
      ValueError: naming the file and listing the values absent from the map.
    """
    values = np.unique(label)
    bad = sorted(int(v) for v in values if int(v) not in raw_to_class)
    if bad:
        raise ValueError(f"Label {source} holds values {bad} that the dataset's label map "
                         f"{sorted(raw_to_class)} does not know. Check that --dataset matches "
                         "the data and that the file is this subject's label map.")
    lookup = np.zeros(int(values.max()) - int(values.min()) + 1, dtype=np.uint8)
    for raw, cls in raw_to_class.items():
        if values.min() <= raw <= values.max():
            lookup[int(raw) - int(values.min())] = cls
    return lookup[np.asarray(label, np.int64) - int(values.min())]


def normalise_intensity(volume: np.ndarray, mask: np.ndarray, percentiles: tuple[float, float],
                        clip_range: tuple[float, float] | None = None, source: str = "image"
                        ) -> tuple[np.ndarray, float, float]:
    """(x − p_low) / (p_high − p_low) with percentiles over `mask`, optionally clipped.

    Returns:
      (normalised float32 volume, p_low, p_high).

    Raises:
      ValueError: naming `source` when the masked intensities are constant.
    """
    low, high = np.percentile(volume[mask], percentiles)
    if not high - low > 1e-6 * max(abs(float(high)), 1.0):
        raise ValueError(f"{source} is constant over its foreground (percentiles {percentiles} "
                         f"both {float(low):g}); expected an image with contrast. Check the file "
                         "is not blank or corrupted.")
    normalised = (volume.astype(np.float32) - np.float32(low)) / np.float32(high - low)
    if clip_range is not None:
        normalised = np.clip(normalised, *clip_range)
    return normalised.astype(np.float32, copy=False), float(low), float(high)


def _resample(array: np.ndarray, meta: ImageMeta, size_xyz: Sequence[int],
              spacing_xyz: Sequence[float], is_label: bool) -> np.ndarray:
    """Resamples (z, y, x[, c]) onto a grid with `meta`'s origin and direction."""
    channels = array.shape[3] if array.ndim == 4 else 1
    image = array_to_sitk(array, dataclasses.replace(meta, num_channels=channels))
    interpolator = sitk.sitkNearestNeighbor if is_label else sitk.sitkLinear
    resampled = sitk.Resample(image, [int(s) for s in size_xyz], sitk.Transform(), interpolator,
                              meta.origin_xyz, [float(s) for s in spacing_xyz], meta.direction,
                              0.0, sitk.sitkUnknown, True)
    return sitk.GetArrayFromImage(resampled)


def _window(array: np.ndarray, offset_zyx: Sequence[int], shape_zyx: Sequence[int],
            fill) -> np.ndarray:
    """out[i] = array[i + offset] where defined, else `fill` (crop when offset ≥ 0, pad if < 0).

    `fill` is a scalar or one value per trailing channel.
    """
    out = np.empty(tuple(shape_zyx) + array.shape[3:], array.dtype)
    out[...] = fill
    src, dst = [], []
    for offset, size_in, size_out in zip(offset_zyx, array.shape[:3], shape_zyx):
        start, stop = max(0, offset), min(size_in, offset + size_out)
        src.append(slice(start, max(start, stop)))
        dst.append(slice(start - offset, max(start, stop) - offset))
    out[tuple(dst)] = array[tuple(src)]
    return out


def _grid(size: int, patch: int, stride: int) -> np.ndarray:
    return np.arange(0, size - patch + 1, stride)


def labeled_patch_corners(label: np.ndarray, patch_zyx: Sequence[int], stride_zyx: Sequence[int],
                          min_fraction: float) -> np.ndarray:
    """Stride-grid corners whose patch has a foreground (label > 0) fraction above `min_fraction`.

    Returns:
      (N, 3) int64 corners (z, y, x), in C order.
    """
    counts = np.zeros(tuple(s + 1 for s in label.shape), np.int32)  # summed-volume table
    counts[1:, 1:, 1:] = (label > 0).astype(np.int32).cumsum(0).cumsum(1).cumsum(2)
    z0, y0, x0 = np.ix_(*(_grid(s, p, t) for s, p, t in zip(label.shape, patch_zyx, stride_zyx)))
    z1, y1, x1 = z0 + patch_zyx[0], y0 + patch_zyx[1], x0 + patch_zyx[2]
    inside = (counts[z1, y1, x1] - counts[z0, y1, x1] - counts[z1, y0, x1] - counts[z1, y1, x0]
              + counts[z0, y0, x1] + counts[z0, y1, x0] + counts[z1, y0, x0] - counts[z0, y0, x0])
    keep = inside / float(np.prod(patch_zyx)) > min_fraction
    return _corners(label.shape, patch_zyx, stride_zyx, keep)


def mask_patch_corners(mask: np.ndarray, patch_zyx: Sequence[int], stride_zyx: Sequence[int]
                       ) -> np.ndarray:
    """Stride-grid corners whose patch centre lies inside `mask` (unlabeled subjects)."""
    centres = [_grid(s, p, t) + p // 2 for s, p, t in zip(mask.shape, patch_zyx, stride_zyx)]
    keep = mask[np.ix_(*centres)]
    return _corners(mask.shape, patch_zyx, stride_zyx, keep)


def _corners(shape, patch_zyx, stride_zyx, keep: np.ndarray) -> np.ndarray:
    grids = [_grid(s, p, t) for s, p, t in zip(shape, patch_zyx, stride_zyx)]
    corners = np.stack(np.meshgrid(*grids, indexing="ij"), axis=-1)  # (gz, gy, gx, 3)
    return corners[keep].astype(np.int64).reshape(-1, 3)


def _as_3d(array: np.ndarray, meta: ImageMeta) -> tuple[np.ndarray, ImageMeta]:
    """A 2D image (y, x) as a one-slice volume (1, y, x) with 1 mm z spacing."""
    if meta.ndim == 3:
        return array, meta
    direction = np.eye(3)
    direction[:2, :2] = np.asarray(meta.direction).reshape(2, 2)
    return array[None], ImageMeta(tuple(meta.spacing_xyz) + (1.0,), tuple(meta.origin_xyz) + (0.0,),
                                  tuple(direction.ravel()), tuple(meta.size_xyz) + (1,),
                                  meta.num_channels)


def swap_slice_axis(array: np.ndarray, meta: ImageMeta, axis: int
                    ) -> tuple[np.ndarray, ImageMeta]:
    """Swaps array axis `axis` of a (z, y, x[, c]) volume with z, and its geometry with it
    (a special case of `reorient`; kept for callers that only move the slice axis)."""
    if axis == 0:
        return array, meta
    if axis not in (1, 2) or meta.ndim != 3:
        raise ValueError(f"slice_axis_zyx must be 0, 1 or 2 for a 3D image; got {axis}.")
    index_axis = 2 - axis                      # numpy axis -> ITK index axis (x=0, y=1, z=2)
    order = [0, 1, 2]
    order[2], order[index_axis] = index_axis, 2
    return reorient(array, meta, {"axes": order, "flip": [False] * 3})


# ------------------------------------------------------------------ canonical orientation
# Every 3D scan is brought to one canonical voxel order before anything else: index axis x
# runs towards the patient's left, y towards posterior, z towards superior (ITK's LPS, the
# DICOM convention), by permuting and flipping array axes only (no resampling, so it is exact
# and undone exactly). For 2D processing the slice axis (z after reorientation) is chosen from
# the geometry first: the dataset's fixed axis if it declares one (`slice_axis_zyx`, for files
# whose headers misstate the axes), else the axis with clearly the largest spacing (the
# through-plane axis of 2D acquisitions: cardiac short-axis stacks, prostate), else the axis
# closest to the patient's head-foot axis (axial planes of isotropic volumes). The same scan
# stored as RAS, LPS, LPI or with permuted axes then gives the same processed slices.

ANISOTROPY_RATIO = 1.5     # largest spacing / second largest above this: the slice axis


def _permutations():
    return ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))


def canonical_transform(meta: ImageMeta, spatial_dims: int, slice_axis_zyx: int = 0,
                        reliable: bool = True) -> dict[str, Any]:
    """The axis permutation and flips that bring a 3D image to the canonical order.

    Returns:
      {"axes": [a_x, a_y, a_z], "flip": [f_x, f_y, f_z]}: new index axis i is old index axis
      axes[i] (ITK order, x = 0), reversed when flip[i].
    """
    identity = {"axes": [0, 1, 2], "flip": [False, False, False]}
    if meta.ndim != 3:
        return identity
    direction = np.asarray(meta.direction, np.float64).reshape(3, 3)  # columns: index axes
    forced = None
    if slice_axis_zyx:
        forced = 2 - int(slice_axis_zyx)
    elif spatial_dims == 2:
        spacing = np.asarray(meta.spacing_xyz, np.float64)
        order = np.argsort(spacing)
        if spacing[order[2]] > ANISOTROPY_RATIO * spacing[order[1]]:
            forced = int(order[2])
        elif reliable:
            forced = int(np.argmax(np.abs(direction[2])))   # most head-foot index axis
    if not reliable:  # misleading direction cosines: only move the slice axis, never flip
        if forced in (None, 2):
            return identity
        rest = [a for a in (0, 1, 2) if a != forced]
        return {"axes": [rest[0], rest[1], forced], "flip": [False] * 3}
    best, best_score = None, -1.0
    for axes in _permutations():
        if forced is not None and axes[2] != forced:
            continue
        score = sum(abs(direction[patient, axes[patient]]) for patient in range(3))
        if score > best_score + 1e-9:
            best, best_score = axes, score
    flips = [bool(direction[patient, best[patient]] < 0) for patient in range(3)]
    return {"axes": list(best), "flip": flips}


def is_identity(transform: dict[str, Any] | None) -> bool:
    return not transform or (list(transform["axes"]) == [0, 1, 2] and not any(transform["flip"]))


def reorient(array: np.ndarray, meta: ImageMeta, transform: dict[str, Any]
             ) -> tuple[np.ndarray, ImageMeta]:
    """Applies `canonical_transform`'s permutation and flips to a (z, y, x[, c]) array and its
    geometry; the result covers the same physical voxels (new origin = the voxel now first)."""
    axes, flips = list(transform["axes"]), list(transform["flip"])
    if is_identity(transform):
        return array, meta
    # numpy axis of ITK index axis a is 2 - a; new numpy axis j holds new index axis 2 - j.
    perm = [2 - axes[2 - j] for j in range(3)] + list(range(3, array.ndim))
    out = np.transpose(array, perm)
    for j in range(3):
        if flips[2 - j]:
            out = np.flip(out, axis=j)
    direction = np.asarray(meta.direction, np.float64).reshape(3, 3)
    spacing = np.asarray(meta.spacing_xyz, np.float64)
    size = np.asarray(meta.size_xyz)
    first = np.zeros(3)
    columns = []
    for new, old in enumerate(axes):
        if flips[new]:
            first[old] = size[old] - 1
        columns.append(direction[:, old] * (-1.0 if flips[new] else 1.0))
    origin = np.asarray(meta.origin_xyz, np.float64) + direction @ (first * spacing)
    new_meta = dataclasses.replace(
        meta, spacing_xyz=tuple(float(spacing[a]) for a in axes),
        size_xyz=tuple(int(size[a]) for a in axes), origin_xyz=tuple(float(v) for v in origin),
        direction=tuple(float(v) for v in np.stack(columns, axis=1).ravel()))
    return np.ascontiguousarray(out), new_meta


def undo_reorient(array: np.ndarray, transform: dict[str, Any] | None) -> np.ndarray:
    """The inverse of `reorient` on an array (z, y, x[, c]) in canonical order."""
    if is_identity(transform):
        return array
    axes, flips = list(transform["axes"]), list(transform["flip"])
    for j in range(3):
        if flips[2 - j]:
            array = np.flip(array, axis=j)
    perm = [2 - axes[2 - j] for j in range(3)]
    inverse = [perm.index(k) for k in range(3)] + list(range(3, array.ndim))
    return np.ascontiguousarray(np.transpose(array, inverse))


def preprocess_volume(images: Sequence[np.ndarray], metas: Sequence[ImageMeta],
                      label: np.ndarray | None, dataset: Dataset, config: PreprocessConfig,
                      *, sources: Sequence[str] | None = None, label_source: str | None = None
                      ) -> ProcessedVolume:
    """Normalises one subject and brings it to the dataset's processed geometry.

    Args:
      images: one (z, y, x) array per modality, in `dataset.modalities` order ((y, x) for 2D
        files); they must share one grid.
      metas: their geometries.
      label: raw label map (z, y, x) with the dataset's file values, or None.
      dataset: the dataset (label map, spatial dims, window, default sizes).
      config: preprocessing settings (resolved against `dataset` here).
      sources: file names of `images`, used in error messages.
      label_source: file name of `label`, used in error messages.

    Returns:
      A `ProcessedVolume`; 2D datasets give (Z, H, W, C) with (H, W) = the crop size.

    Raises:
      ValueError: wrong number of modalities, mismatched grids or shapes, label values outside
        the dataset's map, non-finite or constant intensities — naming the file.
    """
    config = resolve_config(config, dataset)
    if len(images) != dataset.num_channels or len(metas) != len(images):
        raise ValueError(f"Dataset {dataset.name!r} has {dataset.num_channels} modalities "
                         f"{dataset.modalities}; got {len(images)} images and {len(metas)} metas.")
    check_geometry(metas, sources, dataset.orientation_reliable)
    transform = canonical_transform(metas[0], dataset.spatial_dims,
                                    int(getattr(dataset, "slice_axis_zyx", 0) or 0),
                                    dataset.orientation_reliable)
    volumes, original = [], None
    for index, (array, meta) in enumerate(zip(images, metas)):
        array, meta_3d = _as_3d(np.asarray(array), meta)
        if array.shape != meta_3d.shape_zyx:
            raise ValueError(f"{_name(sources, index)}: array shape {array.shape} does not "
                             f"match its geometry {meta_3d.shape_zyx}; pass (z, y, x) arrays.")
        array, meta_3d = reorient(array, meta_3d, transform)
        if not np.all(np.isfinite(array)):
            raise ValueError(f"Image {_name(sources, index)} has NaN or infinite voxels; expected "
                             "finite intensities. Re-export the scan or fix those voxels.")
        volumes.append(array.astype(np.float32))
        if original is None:
            original = meta_3d
    stats: dict[str, Any] = {"n4": config.n4, "n4_seconds": 0.0}
    if dataset.intensity_window is not None:
        volumes = [np.clip(v, *dataset.intensity_window) for v in volumes]
    if config.n4:
        factors = n4_lib.shrink_factors(original.size_xyz, config.n4_shrink,
                                        in_plane_only=dataset.spatial_dims == 2)
        start = time.perf_counter()
        for index, volume in enumerate(volumes):
            try:
                volumes[index] = n4_lib.n4_correct(volume, original, factors, config.n4_levels,
                                                   config.n4_iterations, config.n4_threshold)
            except ValueError as error:
                raise ValueError(f"{_name(sources, index)}: {error}") from None
        stats.update(n4_seconds=time.perf_counter() - start, n4_shrink_xyz=list(factors))
    mask = n4_lib.foreground_mask(volumes[0])
    stats["foreground_fraction"] = float(mask.mean())
    stats["normalisation_region"] = "foreground"
    region = mask
    if mask.mean() < _MIN_MASK_FRACTION:
        region = np.ones_like(mask)
        stats["normalisation_region"] = "whole volume"
    lows, highs, pad_values = [], [], []
    for index, volume in enumerate(volumes):
        volumes[index], low, high = normalise_intensity(
            volume, region, config.percentiles, config.clip_range, _name(sources, index))
        lows.append(low)
        highs.append(high)
        pad_values.append(float(volumes[index].min()))
    stats.update(percentile_low=lows, percentile_high=highs, pad_value=pad_values)
    image = np.stack(volumes, axis=-1)  # (z, y, x, C)
    del volumes
    if label is not None:
        label, label_meta = _as_3d(np.asarray(label), metas[0])
        label, _ = reorient(label, label_meta, transform)
        if label.shape != image.shape[:3]:
            raise ValueError(f"Label {label_source or 'label'} has shape {label.shape}; expected "
                             f"the image shape {image.shape[:3]}.")
        label = remap_label(label, dataset.raw_to_class(), label_source or "label")
    geometry: dict[str, Any] = {"spatial_dims": dataset.spatial_dims, "input_ndim": metas[0].ndim,
                                "original_shape_zyx": list(original.shape_zyx),
                                "resampled_spacing_xyz": None}
    if not is_identity(transform):  # only then, so canonical scans keep their geometry
        geometry["reorient"] = transform
        # the files' numpy axis that holds the slices (montages, viewers)
        geometry["slice_axis_zyx"] = 2 - int(transform["axes"][2])
    pad = np.asarray(pad_values, np.float32)
    patch_corners = None
    if dataset.spatial_dims == 2:
        if config.target_spacing_xy is not None:
            spacing = (*config.target_spacing_xy, original.spacing_xyz[2])
            if not np.allclose(spacing, original.spacing_xyz, rtol=1e-6, atol=0):
                size = [max(1, int(round(n * s / t))) for n, s, t
                        in zip(original.size_xyz, original.spacing_xyz, spacing)]
                image = _resample(image if image.shape[-1] > 1 else image[..., 0], original,
                                  size, spacing, is_label=False).reshape(
                                      tuple(reversed(size)) + (image.shape[-1],))
                if label is not None:
                    label = _resample(label, original, size, spacing, is_label=True)
                geometry["resampled_spacing_xyz"] = [float(s) for s in spacing]
        resampled_shape = list(image.shape[:3])
        crop = config.crop_size_yx or tuple(resampled_shape[1:])
        offset = [0] + [(n - c) // 2 for n, c in zip(resampled_shape[1:], crop)]
        shape = [resampled_shape[0], *crop]
    else:
        resampled_shape = list(image.shape[:3])
        patch = config.patch_size_zyx
        offset = [min(0, (n - p) // 2) for n, p in zip(resampled_shape, patch)]
        shape = [max(n, p) for n, p in zip(resampled_shape, patch)]
    if offset != [0, 0, 0] or shape != resampled_shape:
        image = _window(image, offset, shape, pad)
        label = None if label is None else _window(label, offset, shape, 0)
        if dataset.spatial_dims == 3:
            mask = _window(mask, offset, shape, False)
    if dataset.spatial_dims == 3:
        patch, stride = config.patch_size_zyx, config.patch_stride_zyx
        rule = "foreground_fraction" if label is not None else "head_mask"
        patch_corners = (labeled_patch_corners(label, patch, stride, config.min_foreground_fraction)
                         if label is not None else mask_patch_corners(mask, patch, stride))
        if label is not None and len(patch_corners) == 0:
            # No patch has enough foreground (tiny structures): sample the head instead of
            # leaving the subject unusable.
            rule = "head_mask (no patch above the foreground fraction)"
            patch_corners = mask_patch_corners(mask, patch, stride)
        stats["patch_rule"] = rule
    geometry.update(resampled_shape_zyx=resampled_shape, offset_zyx=offset,
                    processed_shape_zyx=shape)
    return ProcessedVolume(image=np.ascontiguousarray(image, np.float32),
                           label=None if label is None else label.astype(np.uint8),
                           geometry=geometry, patch_corners=patch_corners, stats=stats)


def restore_geometry(array: np.ndarray, geometry: dict[str, Any], original: ImageMeta,
                     is_probability: bool, background: bool = True) -> np.ndarray:
    """Maps a prediction on the processed grid back onto the original image grid.

    Undoes the crop/pad (regions cropped away become background: label 0, or probability 1 for
    class 0), the in-plane resampling (nearest neighbour for labels, linear for
    probabilities) and the slice-axis swap (`geometry["slice_axis_zyx"]`, if any).

    Args:
      array: labels (Z, H, W) or probabilities (Z, H, W, K) on the processed grid.
      geometry: `ProcessedVolume.geometry` (as stored in the manifest).
      original: the original image's `ImageMeta`.
      is_probability: whether `array` holds per-class probabilities.
      background: probabilities only: channel 0 is the background class (exclusive classes;
        cropped-away voxels get probability 1 there). False for region probabilities (one
        sigmoid each): cropped-away voxels get 0 in every channel.

    Returns:
      An array of shape `original.shape_zyx` (+ (K,) for probabilities), labels in `array`'s
      dtype, probabilities float32.

    Raises:
      ValueError: if `array` or `original` does not match `geometry`.
    """
    array = np.asarray(array)
    expected = tuple(geometry["processed_shape_zyx"])
    if array.shape[:3] != expected or array.ndim != (4 if is_probability else 3):
        raise ValueError(f"Prediction shape {array.shape} does not match the processed grid "
                         f"{expected}{' + (K,)' if is_probability else ''}.")
    _, original_3d = _as_3d(np.zeros(original.shape_zyx, np.uint8), original)
    transform = geometry.get("reorient")
    if transform is None and geometry.get("slice_axis_zyx"):  # records before reorientation
        _, original_3d = swap_slice_axis(np.zeros((0, 0, 0)), original_3d,
                                         int(geometry["slice_axis_zyx"]))
        axis = 2 - int(geometry["slice_axis_zyx"])
        order = [0, 1, 2]
        order[2], order[axis] = axis, 2
        transform = {"axes": order, "flip": [False] * 3}
    else:
        _, original_3d = reorient(np.zeros((0, 0, 0)), original_3d, transform or
                                  {"axes": [0, 1, 2], "flip": [False] * 3})
    if list(original_3d.shape_zyx) != list(geometry["original_shape_zyx"]):
        raise ValueError(f"Original image shape {original.shape_zyx} does not match the one this "
                         f"geometry was computed for {geometry['original_shape_zyx']}; pass the "
                         "ImageMeta of the image that was preprocessed.")
    if is_probability:
        fill = np.zeros(array.shape[-1], np.float32)
        fill[0] = 1.0 if background else 0.0
        array = array.astype(np.float32)
    else:
        fill = 0
    restored = _window(array, [-o for o in geometry["offset_zyx"]],
                       geometry["resampled_shape_zyx"], fill)
    if geometry.get("resampled_spacing_xyz") is not None:
        resampled_meta = dataclasses.replace(
            original_3d, spacing_xyz=tuple(geometry["resampled_spacing_xyz"]),
            size_xyz=tuple(reversed(geometry["resampled_shape_zyx"])))
        dtype = restored.dtype
        if not is_probability:
            restored = restored.astype(np.int32)  # SimpleITK has no uint64/bool resampling
        squeeze = is_probability and restored.shape[-1] == 1
        restored = _resample(restored[..., 0] if squeeze else restored, resampled_meta,
                             original_3d.size_xyz, original_3d.spacing_xyz,
                             is_label=not is_probability).astype(dtype, copy=False)
        if squeeze:
            restored = restored[..., None]
    restored = undo_reorient(restored, transform)
    if geometry.get("input_ndim", 3) == 2:
        restored = restored[0]
    return restored
