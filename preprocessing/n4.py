"""N4 bias-field correction fitted on a shrunk image, and the foreground masks it relies on.

N4 (Tustison et al., IEEE TMI 2010) models the slowly varying MR intensity bias as a B-spline
field in log space. The field is smooth, so fitting it on an image shrunk by 4 (3D) gives the same
field at a fraction of the cost (docs/performance.md: 107× faster, same correlation with the true
bias); `GetLogBiasFieldAsImage(full_image)` evaluates the fitted B-spline on the full grid, and the
corrected image is `image / exp(log_bias)`.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import SimpleITK as sitk

from tfseg.io import ImageMeta, array_to_sitk

# Each shrunk axis keeps at least this many voxels: N4's B-spline fit on a handful of voxels
# per axis is ill-posed.
_MIN_SHRUNK_VOXELS = 8
# Fewer masked voxels than this in the shrunk image is an empty or broken channel.
_MIN_MASK_VOXELS = 64


def _scalar_meta(meta: ImageMeta) -> ImageMeta:
    return dataclasses.replace(meta, num_channels=1)


def otsu_mask(volume: np.ndarray) -> np.ndarray:
    """Otsu foreground (above the threshold) of a scalar volume, as a bool array."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(volume, dtype=np.float32))
    # OtsuThreshold(image, insideValue, outsideValue, bins): voxels above the threshold are
    # "outside", so outsideValue=1 marks the bright foreground.
    mask = sitk.OtsuThreshold(image, 0, 1, 200)
    return sitk.GetArrayViewFromImage(mask).astype(bool)


def foreground_mask(volume: np.ndarray) -> np.ndarray:
    """Otsu foreground with enclosed holes filled (3D): the head/body of one subject.

    Filling keeps dark structures enclosed by tissue (ventricles, CSF inside a skull-stripped
    brain) inside the mask.
    """
    mask = sitk.GetImageFromArray(otsu_mask(volume).astype(np.uint8))
    filled = sitk.BinaryFillhole(mask, fullyConnected=False, foregroundValue=1)
    return sitk.GetArrayViewFromImage(filled).astype(bool)


def shrink_factors(size_xyz: tuple[int, ...], shrink: int, in_plane_only: bool
                   ) -> tuple[int, ...]:
    """Per-axis shrink factors (x, y, z): `shrink`, capped so each axis keeps 8 voxels.

    Args:
      size_xyz: the image size.
      shrink: the requested factor.
      in_plane_only: True for stacks of thick slices (2D datasets): z is not shrunk, since
        neighbouring slices there are centimetres apart.
    """
    factors = [max(1, min(shrink, size // _MIN_SHRUNK_VOXELS)) for size in size_xyz]
    if in_plane_only and len(factors) == 3:
        factors[2] = 1
    return tuple(factors)


def _n4_mask(volume: np.ndarray) -> np.ndarray:
    # N4 works on log intensities: non-positive voxels cannot be part of the fit.
    return otsu_mask(volume) & (volume > 0)


def fit_log_bias(volume: np.ndarray, meta: ImageMeta, shrink_xyz: tuple[int, ...],
                 levels: int = 4, iterations: int = 50, threshold: float = 1e-3,
                 mask: np.ndarray | None = None) -> np.ndarray:
    """Fits N4 on a shrunk copy of `volume` and returns the log bias field at full resolution.

    Args:
      volume: (z, y, x) intensities (MR, non-negative).
      meta: its geometry (the B-spline lives in physical space, so spacing matters).
      shrink_xyz: shrink factor per axis (x, y, z); all ones = full-resolution fit.
      levels: number of fitting levels (the control grid doubles at each level).
      iterations: maximum iterations per level.
      threshold: convergence threshold.
      mask: voxels to fit on; default: Otsu foreground of `volume` with positive intensity.

    Returns:
      (z, y, x) float32 log bias field; the corrected image is `volume / exp(log_bias)`.

    Raises:
      ValueError: if the mask holds too few voxels to fit (blank or constant channel).
    """
    image = sitk.Cast(array_to_sitk(np.asarray(volume, np.float32), _scalar_meta(meta)),
                      sitk.sitkFloat32)
    if mask is None:
        mask = _n4_mask(np.asarray(volume))
    mask_image = array_to_sitk(mask.astype(np.uint8), _scalar_meta(meta))
    shrink = [int(f) for f in shrink_xyz]
    small = sitk.Shrink(image, shrink) if max(shrink) > 1 else image
    small_mask = sitk.Shrink(mask_image, shrink) if max(shrink) > 1 else mask_image
    masked = int(np.count_nonzero(sitk.GetArrayViewFromImage(small_mask)))
    if masked < _MIN_MASK_VOXELS:
        raise ValueError(f"N4 found only {masked} foreground voxels to fit the bias field on "
                         f"(image size {meta.size_xyz}, shrink {tuple(shrink)}); expected an MR "
                         "image with tissue. Check the image is not blank, or run with "
                         "--n4=false.")
    corrector = sitk.N4BiasFieldCorrectionImageFilter()
    corrector.SetMaximumNumberOfIterations([int(iterations)] * int(levels))
    corrector.SetConvergenceThreshold(float(threshold))
    corrector.Execute(small, small_mask)
    log_bias = corrector.GetLogBiasFieldAsImage(image)
    return sitk.GetArrayFromImage(log_bias).astype(np.float32)


def n4_correct(volume: np.ndarray, meta: ImageMeta, shrink_xyz: tuple[int, ...],
               levels: int = 4, iterations: int = 50, threshold: float = 1e-3) -> np.ndarray:
    """Bias-corrected copy of `volume` (z, y, x) float32; see `fit_log_bias` for the arguments.

    Raises:
      ValueError: as `fit_log_bias`.
    """
    log_bias = fit_log_bias(volume, meta, shrink_xyz, levels, iterations, threshold)
    return (np.asarray(volume, np.float32) / np.exp(log_bias)).astype(np.float32)


def compare_n4_shrink(volume: np.ndarray, meta: ImageMeta | None = None, shrink: int = 4,
                      levels: int = 4, iterations: int = 50, threshold: float = 1e-3
                      ) -> dict[str, float]:
    """Times N4 at full resolution and shrunk, and compares the two bias fields.

    Used by the benchmark to check that the shrunk fit is as good as the full one
    (docs/performance.md: at least 5× faster, bias-field correlation ≥ 0.98).
    Full resolution is slow (minutes for 144×192×256): pass a smaller volume for a quick check.

    Args:
      volume: (z, y, x) MR intensities.
      meta: its geometry (default: 1 mm isotropic, identity direction).
      shrink: shrink factor of the fast fit (capped per axis as in `shrink_factors`).
      levels / iterations / threshold: N4 settings, the same for both fits.

    Returns:
      {"seconds_full", "seconds_shrunk", "speedup", "correlation"}: the correlation is the
      Pearson correlation of the two log bias fields inside the fitting mask.
    """
    volume = np.asarray(volume, np.float32)
    if meta is None:
        meta = ImageMeta((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()),
                         tuple(reversed(volume.shape)))
    mask = _n4_mask(volume)
    start = time.perf_counter()
    full = fit_log_bias(volume, meta, (1,) * meta.ndim, levels, iterations, threshold, mask)
    seconds_full = time.perf_counter() - start
    start = time.perf_counter()
    factors = shrink_factors(meta.size_xyz, shrink, in_plane_only=False)
    shrunk = fit_log_bias(volume, meta, factors, levels, iterations, threshold, mask)
    seconds_shrunk = time.perf_counter() - start
    correlation = float(np.corrcoef(full[mask], shrunk[mask])[0, 1])
    return {"seconds_full": seconds_full, "seconds_shrunk": seconds_shrunk,
            "speedup": seconds_full / max(seconds_shrunk, 1e-9), "correlation": correlation}
