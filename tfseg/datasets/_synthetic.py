"""Shared machinery of the embedded synthetic datasets: image formation and atomic generation.

The synthetic datasets (`synthetic_cardiac`, `synthetic_brain`) draw anatomy as soft masks
(signed distances in mm turned into partial-volume fractions), composite tissue intensities in
painter's order, then apply what an MR scanner adds: blur, texture, a smooth multiplicative bias
field and Rician noise. Labels are the majority tissue class of each voxel, so partial-volume
voxels carry the label a careful annotator would give them.

Generation is deterministic (every subject draws from its own `numpy.random.Generator` seeded by
the dataset seed and the subject index, so subject 3 is the same whether 5 or 30 are generated),
writes into a temporary sibling folder and renames it into place, and leaves a marker file
(`MARKER_NAME`) listing the generator version, the subject counts and every file with its size.
`prepare_folder` skips a folder whose marker matches and regenerates one whose marker is old.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
from typing import Callable, Mapping, Sequence

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from tfseg._files import make_temporary_dir, remove_stale_temporary_dirs

MARKER_NAME = ".tfseg_synthetic.json"


def default_cache_dir(name: str) -> str:
    """`~/.cache/tfseg/<name>`, resolved now (not at import) so a changed HOME is honoured."""
    return os.path.join(os.path.expanduser("~"), ".cache", "tfseg", name)


def subject_rng(dataset_seed: int, index: int) -> np.random.Generator:
    """An independent generator per subject: adding subjects never changes earlier ones."""
    return np.random.default_rng(np.random.SeedSequence([dataset_seed, index]))


# ---------------------------------------------------------------------------------------------
# Image formation
# ---------------------------------------------------------------------------------------------

def smooth_noise(rng: np.random.Generator, shape: Sequence[int],
                 sigma_vox: float | Sequence[float]) -> np.ndarray:
    """Gaussian random field with unit standard deviation, correlated over `sigma_vox` voxels."""
    field = ndimage.gaussian_filter(rng.standard_normal(tuple(shape)).astype(np.float32),
                                    sigma_vox, mode="reflect")
    return (field / max(float(field.std()), 1e-8)).astype(np.float32)


def soft_inside(signed_distance_mm: np.ndarray, voxel_mm: float) -> np.ndarray:
    """Fraction of a voxel inside a surface, from the signed distance (mm, positive inside).

    A voxel of width `voxel_mm` cut by a plane at distance d from its centre is
    clip(0.5 + d / voxel_mm, 0, 1) inside: the exact box-filtered partial volume of a flat edge,
    which is what an MR voxel integrates, without rendering at a higher resolution.
    """
    return np.clip(0.5 + signed_distance_mm / voxel_mm, 0.0, 1.0).astype(np.float32)


def ellipse_signed_distance(u: np.ndarray, v: np.ndarray, a: float | np.ndarray,
                            b: float | np.ndarray) -> np.ndarray:
    """Approximate signed distance (mm, positive inside) to the ellipse (u/a)² + (v/b)² = 1.

    First-order: (1 − ρ) / |∇ρ| with ρ the normalised radius; exact on circles and accurate near
    the boundary, which is the only place the partial-volume ramp uses it.
    """
    rho = np.sqrt((u / a) ** 2 + (v / b) ** 2) + 1e-6
    grad = np.sqrt((u / a ** 2) ** 2 + (v / b ** 2) ** 2) / rho + 1e-6
    return ((1.0 - rho) / grad).astype(np.float32)


def ellipsoid_signed_distance(x: np.ndarray, y: np.ndarray, z: np.ndarray,
                              axes: Sequence[float]) -> np.ndarray:
    """Approximate signed distance (mm, positive inside) to an axis-aligned ellipsoid."""
    ax, ay, az = axes
    rho = np.sqrt((x / ax) ** 2 + (y / ay) ** 2 + (z / az) ** 2) + 1e-6
    grad = np.sqrt((x / ax ** 2) ** 2 + (y / ay ** 2) ** 2 + (z / az ** 2) ** 2) / rho + 1e-6
    return ((1.0 - rho) / grad).astype(np.float32)


def composite(layers: Sequence[tuple[np.ndarray, float | np.ndarray, int]],
              num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Painter's-order compositing of soft tissue masks.

    Args:
      layers: (mask in [0, 1], intensity, class index) from the TOP layer down; whatever no
        layer covers is class 0 with intensity 0 (air / outside).
      num_classes: number of label classes.

    Returns:
      (intensity, class_fractions): intensity has the masks' shape; class_fractions is
      (num_classes, *shape) and sums to 1 over the first axis.
    """
    shape = layers[0][0].shape
    intensity = np.zeros(shape, np.float32)
    fractions = np.zeros((num_classes,) + shape, np.float32)
    remaining = np.ones(shape, np.float32)
    for mask, value, class_index in layers:
        weight = mask * remaining
        intensity += weight * value
        fractions[class_index] += weight
        remaining *= 1.0 - mask
    fractions[0] += remaining
    return intensity, fractions


def majority_label(fractions: np.ndarray) -> np.ndarray:
    """The class covering most of each voxel (ties go to the lower index)."""
    return np.argmax(fractions, axis=0).astype(np.uint8)


def bias_field(rng: np.random.Generator, coords_mm: Sequence[np.ndarray], extent_mm: float,
               log_std: float) -> np.ndarray:
    """Smooth multiplicative field exp(p(x)), p a random polynomial of degree 2.

    Args:
      rng: the subject's generator.
      coords_mm: broadcastable coordinate arrays, one per axis, centred on the field of view.
      extent_mm: the half-size used to normalise coordinates to about [−1, 1].
      log_std: standard deviation of each polynomial coefficient; the log field then spans
        roughly ±2·log_std over the field of view (receive-coil shading).

    Returns:
      The field, float32, broadcast to the coordinates' common shape.
    """
    normalised = [np.asarray(c, np.float32) / extent_mm for c in coords_mm]
    log_field = np.zeros(np.broadcast_shapes(*(c.shape for c in normalised)), np.float32)
    for i, ci in enumerate(normalised):
        log_field += rng.normal(0.0, log_std) * ci
        for cj in normalised[i:]:
            log_field += rng.normal(0.0, log_std / 2.0) * ci * cj
    return np.exp(log_field - log_field.mean()).astype(np.float32)


def rician_noise(rng: np.random.Generator, image: np.ndarray, sigma: float) -> np.ndarray:
    """Magnitude of the image plus complex Gaussian noise: the Rician statistics of MR."""
    real = image + rng.normal(0.0, sigma, image.shape).astype(np.float32)
    imag = rng.normal(0.0, sigma, image.shape).astype(np.float32)
    return np.sqrt(real * real + imag * imag).astype(np.float32)


def to_int16(image: np.ndarray) -> np.ndarray:
    """Rounds a non-negative float image to the int16 a scanner export would hold."""
    return np.clip(np.rint(image), 0, np.iinfo(np.int16).max).astype(np.int16)


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------

def write_nifti(array_zyx: np.ndarray, spacing_xyz: Sequence[float], path: str,
                origin_xyz: Sequence[float] = (0.0, 0.0, 0.0)) -> None:
    """Writes a 3D array as NIfTI (gzip when the name ends .nii.gz; the stream has no mtime,
    so equal arrays give equal bytes)."""
    image = sitk.GetImageFromArray(array_zyx)
    image.SetSpacing([float(s) for s in spacing_xyz])
    image.SetOrigin([float(o) for o in origin_xyz])
    sitk.WriteImage(image, path)


# Byte ranges of a NIfTI-1 header that Analyze 7.5 does not define (intent, slice timing, scaling,
# units, qform/sform, magic), cleared so the file is a plain Analyze 7.5 pair like iSEG's.
_NIFTI_ONLY_BYTES = ((56, 70), (74, 76), (112, 124), (132, 140), (252, 348))


def write_analyze(array_zyx: np.ndarray, spacing_xyz: Sequence[float], hdr_path: str) -> None:
    """Writes an Analyze 7.5 `.hdr`/`.img` pair (the iSEG-2017 format).

    SimpleITK writes a NIfTI-1 pair for `.hdr`; clearing the NIfTI-only header fields and the
    `ni1` magic leaves the 348-byte Analyze 7.5 header (orient 0 = transverse, unflipped), so
    readers take the same legacy-Analyze path as on the real challenge files.
    """
    if not hdr_path.endswith(".hdr"):
        raise ValueError(f"Analyze header path must end with .hdr, got {hdr_path!r}.")
    write_nifti(array_zyx, spacing_xyz, hdr_path)
    with open(hdr_path, "rb") as f:
        header = bytearray(f.read(348))
    if struct.unpack("<i", header[:4])[0] != 348 or header[344:347] != b"ni1":
        raise ValueError(f"{hdr_path}: SimpleITK did not write the expected NIfTI-1 pair header.")
    for start, stop in _NIFTI_ONLY_BYTES:
        header[start:stop] = bytes(stop - start)
    header[56:59] = b"mm\0"  # vox_units
    with open(hdr_path, "wb") as f:
        f.write(bytes(header))


# ---------------------------------------------------------------------------------------------
# Atomic, resumable generation
# ---------------------------------------------------------------------------------------------

def _read_marker(folder: str) -> dict | None:
    try:
        with open(os.path.join(folder, MARKER_NAME), encoding="utf-8") as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def is_complete(folder: str, generator: str, version: int, counts: Mapping[str, int]) -> bool:
    """True when `folder` holds a finished generation of this generator, version and counts,
    with every listed file present at its recorded size."""
    marker = _read_marker(folder)
    if (marker is None or marker.get("generator") != generator
            or marker.get("version") != version or marker.get("counts") != dict(counts)):
        return False
    files = marker.get("files")
    if not isinstance(files, dict) or not files:
        return False
    for relative, size in files.items():
        try:
            if os.path.getsize(os.path.join(folder, relative)) != size:
                return False
        except OSError:
            return False
    return True


def prepare_folder(data_dir: str | None, generator: str, version: int,
                   counts: Mapping[str, int], cache_name: str,
                   write_files: Callable[[str], None]) -> str:
    """Generates a synthetic dataset into `data_dir` unless it is already complete.

    Args:
      data_dir: target folder; None means `~/.cache/tfseg/<cache_name>`.
      generator: the generator's name, recorded in the marker (identifies our folders).
      version: the generator version; a folder from another version is regenerated.
      counts: subject counts, recorded in the marker; a mismatch regenerates.
      cache_name: folder name under the cache root.
      write_files: writes the whole dataset into the (empty, temporary) folder it is given.

    Returns:
      The absolute folder path.

    Raises:
      ValueError: if `data_dir` exists, is not empty and was not written by this generator
        (it is never deleted: it may be someone's data).
    """
    folder = os.path.abspath(os.path.expanduser(data_dir or default_cache_dir(cache_name)))
    if is_complete(folder, generator, version, counts):
        return folder
    if os.path.isdir(folder) and os.listdir(folder):
        marker = _read_marker(folder)
        if marker is None or marker.get("generator") != generator:
            raise ValueError(
                f"{folder} is not empty and holds no {MARKER_NAME} written by {generator}, so it "
                f"is not a synthetic dataset folder and will not be overwritten. Pass an empty or "
                f"new --data_dir (or none, to use {default_cache_dir(cache_name)}).")
    elif os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"{folder} exists and is not a folder: pass a folder path as --data_dir.")
    parent, base = os.path.split(folder)
    os.makedirs(parent, exist_ok=True)
    remove_stale_temporary_dirs(parent, base)
    temporary = make_temporary_dir(parent, base)
    tag = os.path.basename(temporary).rsplit(".tmp-", 1)[1]
    try:
        write_files(temporary)
        files = {}
        for root, _, names in os.walk(temporary):
            for name in names:
                path = os.path.join(root, name)
                files[os.path.relpath(path, temporary)] = os.path.getsize(path)
        marker = {"generator": generator, "version": version, "counts": dict(counts),
                  "files": dict(sorted(files.items()))}
        with open(os.path.join(temporary, MARKER_NAME), "w", encoding="utf-8") as f:
            json.dump(marker, f, indent=1)
        # Another process may have installed the same generation meanwhile: keep it, since
        # readers may already be using it.
        if not is_complete(folder, generator, version, counts):
            _install(temporary, folder, parent, base, tag)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    if not is_complete(folder, generator, version, counts):
        raise ValueError(f"{folder}: generation finished but the folder does not hold a complete "
                         f"{generator} v{version} dataset; another process may be writing it. "
                         "Re-run, or delete the folder.")
    return folder


class GeneratedDataset:
    """Mixin of the embedded datasets: the subject-count check and `prepare` (generation into a
    cache folder on first use, see `prepare_folder`).

    A subclass (placed before the reader's dataset class in the bases) sets `cache_name` (the
    module name under tfseg.datasets) and the static `generate_files(folder, num_training,
    num_testing)`, and has the dataclass fields `num_training`, `num_testing` and
    `content_version` (the generator's version, also part of the records fingerprint).
    """

    cache_name: str = ""
    generate_files: Callable[[str, int, int], None]

    def __post_init__(self) -> None:
        parent_check = getattr(super(), "__post_init__", None)
        if parent_check is not None:
            parent_check()
        if self.num_training < 1 or self.num_testing < 0:
            raise ValueError(f"{self.cache_name} needs num_training >= 1 and num_testing >= 0, "
                             f"got {self.num_training} and {self.num_testing}.")

    def prepare(self, data_dir: str | None) -> str:
        """Generates the subjects into `data_dir` (default `~/.cache/tfseg/<cache_name>`) unless a
        complete generation of this version is there; returns the folder.

        Raises:
          ValueError: if `data_dir` is a non-empty folder not written by this generator.
        """
        counts = {"training": self.num_training, "testing": self.num_testing}
        return prepare_folder(
            data_dir, generator=f"tfseg.datasets.{self.cache_name}",
            version=self.content_version, counts=counts, cache_name=self.cache_name,
            write_files=lambda folder: type(self).generate_files(
                folder, self.num_training, self.num_testing))


def _install(temporary: str, folder: str, parent: str, base: str, tag: str) -> None:
    """Moves the finished temporary folder into place (replacing our own older generation)."""
    if os.path.isdir(folder):
        if not os.listdir(folder):
            os.rmdir(folder)
        else:  # an older or incomplete generation of ours (checked by the caller)
            old = os.path.join(parent, f".{base}.old-{tag}")
            try:
                os.rename(folder, old)
            except FileNotFoundError:  # another process replaced it meanwhile
                old = None
            try:
                os.rename(temporary, folder)
            finally:
                if old:
                    shutil.rmtree(old, ignore_errors=True)
            return
    try:
        os.rename(temporary, folder)
    except OSError:
        # Another process installed its (identical, deterministic) generation first; the caller
        # checks the installed folder is complete.
        if not os.path.isdir(folder):
            raise
