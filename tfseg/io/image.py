"""Reading and writing medical images with SimpleITK, with the integrity checks it lacks.

Arrays are numpy (z, y, x[, c]); geometry is an `ImageMeta` whose names carry (x, y, z) order.
Formats: NIfTI (.nii, .nii.gz), Analyze 7.5 / NIfTI pairs (.hdr/.img), MetaImage (.mha, .mhd +
.raw), NRRD (.nrrd, .nhdr) and DICOM series (a folder). Multi-channel data (MSD 4D NIfTI, whose
4th axis holds the modalities, or vector-pixel images) is returned as (z, y, x, c).

Why the extra checks: SimpleITK 2.5.7 reads a truncated .nii.gz, .nii or Analyze .img without
any error and fills the missing voxels with zeros. So every gzip stream is decompressed to its end
(trailer CRC and length checked) and, for NIfTI/Analyze and MetaImage, the data size on disk is
compared with what the header declares (SimpleITK's ReadImageInformation gives the header without
reading the data). NRRD already fails on short data inside ITK (verified); its errors, like every
ITK error, are re-raised as `ImageReadError`s naming the path and the fix.
"""
from __future__ import annotations

import contextlib
import gzip
import math
import os
import shutil
import tempfile
import zlib
from typing import Iterator, Sequence

import numpy as np
import SimpleITK as sitk

from tfseg.io.meta import ImageMeta

_REDOWNLOAD = "Re-download or re-extract the file."
# Extensions the writer accepts; the NIfTI family stores channels as a 4th axis (MSD style),
# the others as vector pixels.
_NIFTI_FAMILY = (".nii", ".nii.gz", ".hdr", ".img")
_WRITE_EXTENSIONS = _NIFTI_FAMILY + (".mha", ".mhd", ".nrrd", ".nhdr")
_HEADER_EXTENSIONS = (".hdr", ".mhd", ".nhdr")  # moved last, so a header never precedes its data


class ImageReadError(ValueError):
    """An image file is missing, unreadable or incomplete; the message names the path and fix."""


def _extension(path: str) -> str:
    lower = path.lower()
    for double in (".nii.gz", ".img.gz", ".hdr.gz"):
        if lower.endswith(double):
            return double
    return os.path.splitext(lower)[1]


def _read_error(path: str, problem: str, fix: str = _REDOWNLOAD) -> ImageReadError:
    return ImageReadError(f"Cannot read image {path}: {problem}. {fix}")


def _itk_reason(error: Exception) -> str:
    """The informative lines of an ITK exception (drops the C++ source location line)."""
    lines = [line.strip() for line in str(error).splitlines()[1:] if line.strip()]
    cleaned = []
    for line in lines or [str(error).strip()]:
        for marker in ("ITK ERROR:", "sitk::ERROR:"):
            if marker in line:
                line = line.split(marker, 1)[1]
                line = line.split("): ", 1)[1] if "(0x" in line.split(":")[0] else line
        cleaned.append(line.strip())
    return " ".join(cleaned)


@contextlib.contextmanager
def _quiet_itk() -> Iterator[None]:
    """Silences ITK warnings (Analyze deprecation, "No Series were found") for one call."""
    previous = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(previous)


# ---------------------------------------------------------------------------------- integrity


def _gzip_payload_size(path: str) -> int:
    """Decompresses `path` to its end (streaming) and returns the uncompressed size.

    Raises:
      ImageReadError: if the stream stops early or its CRC/length trailer does not match.
    """
    total = 0
    try:
        with gzip.open(path, "rb") as stream:
            while chunk := stream.read(1 << 22):
                total += len(chunk)
    except EOFError:
        raise _read_error(path, "the gzip stream ends early (the file is truncated)") from None
    except (OSError, zlib.error) as error:  # gzip.BadGzipFile is an OSError: bad CRC / header
        raise _read_error(path, f"the gzip data is corrupt ({error})") from None
    return total


def _data_size_on_disk(path: str, known: dict[str, int]) -> int:
    if path not in known:
        known[path] = (_gzip_payload_size(path) if path.lower().endswith(".gz")
                       else os.path.getsize(path))
    return known[path]


def _nifti_pair(path: str) -> tuple[str, str]:
    """(header, data) paths of an Analyze / NIfTI pair given either member."""
    ext = _extension(path)
    stem = path[: -len(ext)]
    gz = ".gz" if ext.endswith(".gz") else ""
    candidates = {"hdr": [stem + ".hdr" + gz, stem + ".hdr", stem + ".hdr.gz"],
                  "img": [stem + ".img" + gz, stem + ".img", stem + ".img.gz"]}
    found = {}
    for kind, names in candidates.items():
        found[kind] = next((n for n in names if os.path.isfile(n)), names[0])
        if not os.path.isfile(found[kind]):
            raise _read_error(path, f"its companion file {found[kind]} is missing (an Analyze "
                              "image is a .hdr header plus a .img data file)",
                              "Copy both files of the pair into the same folder.")
    return found["hdr"], found["img"]


def _check_nifti_data_size(path: str, reader: sitk.ImageFileReader, known: dict[str, int]
                           ) -> None:
    """Compares the bytes on disk with vox_offset + prod(dim) * bitpix / 8 from the header.

    `known` caches uncompressed sizes already measured (a .gz is decompressed only once here).
    """
    keys = set(reader.GetMetaDataKeys())
    if not {"dim[0]", "bitpix", "vox_offset"} <= keys:
        return
    ndim = int(reader.GetMetaData("dim[0]"))
    dims = [int(reader.GetMetaData(f"dim[{i}]")) for i in range(1, ndim + 1)]
    data_bytes = math.prod(dims) * int(reader.GetMetaData("bitpix")) // 8
    # A single-file NIfTI holds header and data; a pair keeps the data in the .img (offset
    # usually 0 there).
    data_file = path if _extension(path) in (".nii", ".nii.gz") else _nifti_pair(path)[1]
    offset = int(float(reader.GetMetaData("vox_offset")))
    actual = _data_size_on_disk(data_file, known)
    if actual < offset + data_bytes:
        raise _read_error(data_file, f"it holds {actual} bytes but its header declares "
                          f"{offset + data_bytes} (size {dims}, {reader.GetMetaData('bitpix')} "
                          "bits per voxel): the file is truncated")


_NIFTI_FLOAT_TYPES = {16: "f4", 64: "f8", 32: "f4", 1792: "f8"}  # float32/64, complex64/128


def _nifti_non_finite_count(path: str, reader: sitk.ImageFileReader) -> int:
    """Counts NaN/Inf values in the raw data of a floating-point NIfTI / Analyze file.

    ITK's NIfTI reader replaces NaN and Inf by 0 without a word, so a corrupted scan would pass
    for a valid one; this reads the stored values (decompressing a .gz once more) to tell.
    Returns 0 for integer data, which cannot hold non-finite values.
    """
    keys = set(reader.GetMetaDataKeys())
    if not {"datatype", "vox_offset"} <= keys:
        return 0
    kind = _NIFTI_FLOAT_TYPES.get(int(reader.GetMetaData("datatype")))
    if kind is None:
        return 0
    if _extension(path) in (".nii", ".nii.gz"):
        header = data_file = path
    else:
        header, data_file = _nifti_pair(path)
    opener = gzip.open if header.lower().endswith(".gz") else open
    with opener(header, "rb") as stream:
        sizeof_hdr = stream.read(4)
    little = int.from_bytes(sizeof_hdr, "little") in (348, 540)
    dtype = np.dtype(("<" if little else ">") + kind)
    offset = int(float(reader.GetMetaData("vox_offset")))
    opener = gzip.open if data_file.lower().endswith(".gz") else open
    count = 0
    chunk_bytes = dtype.itemsize * (1 << 20)
    with opener(data_file, "rb") as stream:
        stream.seek(offset)
        while chunk := stream.read(chunk_bytes):
            usable = len(chunk) - len(chunk) % dtype.itemsize
            values = np.frombuffer(chunk[:usable], dtype=dtype)
            count += int(values.size - np.count_nonzero(np.isfinite(values)))
    return count


def _check_metaimage_data_size(path: str, reader: sitk.ImageFileReader) -> None:
    """MetaImage: checks the data file holds what DimSize × ElementType declare.

    ITK also fails on short MetaImage data, but its message blames a missing file; this one says
    the data is truncated. Data split over several files (LIST, patterns) is left to ITK.
    """
    fields, header_bytes = {}, 0
    with open(path, "rb") as stream:
        for line in stream:  # text "Key = Value" lines up to ElementDataFile
            header_bytes += len(line)
            key, _, value = line.decode("latin-1").partition("=")
            fields[key.strip()] = value.strip()
            if key.strip() == "ElementDataFile" or header_bytes > 1 << 16:
                break
    data_name = fields.get("ElementDataFile", "")
    if not data_name or data_name.upper() == "LIST" or "%" in data_name or " " in data_name:
        return
    if fields.get("CompressedData", "False").lower() == "true":
        declared = int(fields.get("CompressedDataSize", "0") or 0)
    else:
        component = sitk.Image([1] * reader.GetDimension(), reader.GetPixelID(),
                               reader.GetNumberOfComponents()).GetSizeOfPixelComponent()
        declared = math.prod(reader.GetSize()) * reader.GetNumberOfComponents() * component
    if data_name.upper() == "LOCAL":
        data_file, offset = path, header_bytes
    else:
        data_file = os.path.join(os.path.dirname(path), data_name)
        offset = max(int(fields.get("HeaderSize", "0") or 0), 0)
        if not os.path.isfile(data_file):
            raise _read_error(path, f"its data file {data_file} is missing",
                              "Copy the .mhd header and its data file into the same folder.")
    actual = os.path.getsize(data_file)
    if actual < offset + declared:
        raise _read_error(data_file, f"it holds {actual} bytes but its header declares "
                          f"{offset + declared}: the file is truncated")


# ------------------------------------------------------------------------------------ reading


def _floats(values) -> tuple[float, ...]:
    return tuple(float(v) + 0.0 for v in values)  # + 0.0 turns ITK's -0.0 into 0.0


def meta_from_sitk(image: sitk.Image) -> ImageMeta:
    """Geometry of a 2D/3D SimpleITK image, or of the first three axes of a 4D one.

    num_channels is the 4th size of a 4D image (its axis holds channels), else the number of
    components per pixel.
    """
    dim = image.GetDimension()
    if dim == 4:
        direction = np.asarray(image.GetDirection()).reshape(4, 4)[:3, :3]
        return ImageMeta(spacing_xyz=_floats(image.GetSpacing()[:3]),
                         origin_xyz=_floats(image.GetOrigin()[:3]),
                         direction=_floats(direction.ravel()),
                         size_xyz=tuple(int(v) for v in image.GetSize()[:3]),
                         num_channels=int(image.GetSize()[3]))
    return ImageMeta(spacing_xyz=_floats(image.GetSpacing()),
                     origin_xyz=_floats(image.GetOrigin()),
                     direction=_floats(image.GetDirection()),
                     size_xyz=tuple(int(v) for v in image.GetSize()),
                     num_channels=image.GetNumberOfComponentsPerPixel())


def _read_dicom_series(folder: str) -> sitk.Image:
    with _quiet_itk():
        series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder)
    if not series_ids:
        raise _read_error(folder, "the folder holds no DICOM series",
                          "Point at the folder that contains the series' DICOM files "
                          "(one series per folder is safest).")
    # The series with the most slices is the volume; ties go to the smallest UID (deterministic).
    files = max((sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, sid) for sid in
                 sorted(series_ids)), key=len)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    return reader.Execute()


def _read_sitk(path: str) -> sitk.Image:
    """Reads `path` (a file or a DICOM folder) after the integrity checks."""
    path = os.fspath(path)
    if os.path.isdir(path):
        try:
            return _read_dicom_series(path)
        except RuntimeError as error:
            raise _read_error(path, f"ITK could not read the DICOM series ({_itk_reason(error)})"
                              ) from None
    if not os.path.exists(path):
        raise _read_error(path, "the file does not exist",
                          "Check the path and that the dataset is fully downloaded and extracted.")
    if not os.access(path, os.R_OK):
        raise _read_error(path, "permission denied", "Make the file readable (chmod/chown).")
    if os.path.getsize(path) == 0:
        raise _read_error(path, "the file is empty (0 bytes)")
    ext = _extension(path)
    if ext in (".hdr", ".img", ".hdr.gz", ".img.gz"):
        _nifti_pair(path)
    known_sizes: dict[str, int] = {}
    if ext.endswith(".gz"):
        known_sizes[path] = _gzip_payload_size(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        with _quiet_itk():
            reader.ReadImageInformation()
            if ext in (".mha", ".mhd"):
                _check_metaimage_data_size(path, reader)
            elif ext in _NIFTI_FAMILY + (".hdr.gz", ".img.gz"):
                _check_nifti_data_size(path, reader, known_sizes)
                non_finite = _nifti_non_finite_count(path, reader)
                if non_finite:
                    raise ValueError(
                        f"Image {path} has {non_finite} NaN or infinite voxels; expected finite "
                        "intensities. Re-export the scan or fix those voxels (e.g. set them to "
                        "the background value).")
            return reader.Execute()
    except RuntimeError as error:
        raise _read_error(path, f"ITK could not read it ({_itk_reason(error)})") from None


def _to_array(image: sitk.Image, path: str) -> tuple[np.ndarray, ImageMeta]:
    """(z, y, x) for scalar images, (z, y, x, c) for 4D or vector images with c > 1."""
    if image.GetDimension() == 4 and image.GetNumberOfComponentsPerPixel() != 1:
        raise _read_error(path, "it is a 4D image with vector pixels (unsupported)",
                          "Store the channels on the 4th axis or as vector pixels, not both.")
    array = sitk.GetArrayFromImage(image)
    if image.GetDimension() == 4:
        array = np.moveaxis(array, 0, -1)  # (t, z, y, x) -> (z, y, x, t)
    meta = meta_from_sitk(image)
    if meta.num_channels == 1 and array.ndim == meta.ndim + 1:
        array = array[..., 0]  # a single-volume 4D file is a scalar image
    return array, meta


def read_image(path: str) -> tuple[np.ndarray, ImageMeta]:
    """Reads an image file or DICOM series folder as float32.

    Args:
      path: a .nii/.nii.gz/.hdr/.img/.mha/.mhd/.nrrd/.nhdr file or a DICOM series folder.

    Returns:
      (array, meta): array (z, y, x) float32 — (y, x) for a 2D file — or (z, y, x, c) when the
      file holds c > 1 channels (4D NIfTI or vector pixels); meta describes the spatial geometry
      and `meta.num_channels` = c. The array has a channel axis if and only if c > 1.

    Raises:
      ImageReadError: (a ValueError) naming the path: missing, empty, unreadable, truncated gzip
        stream, or less data on disk than the header declares.
    """
    array, meta = _to_array(_read_sitk(path), path)
    return array.astype(np.float32, copy=False), meta


def read_label(path: str) -> tuple[np.ndarray, ImageMeta]:
    """Reads a label map; integer-typed on disk, or float holding whole numbers only.

    Returns:
      (array, meta): integer array (z, y, x) in the file's integer type (int32 if stored as
      float) and its geometry.

    Raises:
      ImageReadError: as `read_image`.
      ValueError: naming the path if the label has several channels or non-integer values.
    """
    array, meta = _to_array(_read_sitk(path), path)
    if meta.num_channels != 1:
        raise ValueError(f"Label {path} has {meta.num_channels} channels; a label map must be "
                         "a scalar image. Point the label path at the segmentation file.")
    if np.issubdtype(array.dtype, np.integer):
        return array, meta
    if not np.all(np.isfinite(array)) or np.any(array != np.round(array)):
        bad = array[~np.isfinite(array) | (array != np.round(array))]
        raise ValueError(f"Label {path} holds non-integer values (e.g. {bad[:3].tolist()}); "
                         "expected a segmentation with integer class values. Check that the "
                         "label path does not point at an image.")
    return array.astype(np.int32), meta


def check_finite(array: np.ndarray, path: str) -> None:
    """Raises a ValueError naming `path` if `array` holds NaN or infinite voxels."""
    finite = np.isfinite(array)
    if not finite.all():
        count = int(finite.size - np.count_nonzero(finite))
        raise ValueError(f"Image {path} has {count} NaN or infinite voxels out of {array.size}; "
                         "expected finite intensities. Re-export the scan or fix those voxels "
                         "(e.g. set them to the background value).")


def read_channels(paths: Sequence[str], channel_indices: Sequence[int | None] | None = None
                  ) -> list[tuple[np.ndarray, ImageMeta]]:
    """Reads one (z, y, x) float32 array per modality, each file read once.

    Args:
      paths: one path per modality (a multi-channel file may repeat, as in `Subject`).
      channel_indices: per modality, the channel of a multi-channel file to take; None for
        scalar files. A scalar file accepts index 0 (it is its own channel 0).

    Returns:
      A list of (array (z, y, x), meta with num_channels=1), in `paths` order.

    Raises:
      ImageReadError: as `read_image`.
      ValueError: naming the file if a channel is not chosen or out of range.
    """
    indices = list(channel_indices) if channel_indices is not None else [None] * len(paths)
    if len(indices) != len(paths):
        raise ValueError(f"Got {len(paths)} paths but {len(indices)} channel indices.")
    cache: dict[str, tuple[np.ndarray, ImageMeta]] = {}
    result = []
    for path, index in zip(paths, indices):
        if path not in cache:
            cache[path] = read_image(path)
        array, meta = cache[path]
        if meta.num_channels == 1:
            if index not in (None, 0):
                raise ValueError(f"Image {path} has a single channel; channel {index} was asked "
                                 "for. Check the dataset's channel_indices.")
            result.append((array, meta))
            continue
        if index is None or not 0 <= index < meta.num_channels:
            raise ValueError(f"Image {path} has {meta.num_channels} channels; expected a channel "
                             f"index in [0, {meta.num_channels - 1}], got {index}. Set the "
                             "dataset's channel_indices.")
        channel = np.ascontiguousarray(array[..., index])
        result.append((channel, ImageMeta(meta.spacing_xyz, meta.origin_xyz, meta.direction,
                                          meta.size_xyz, num_channels=1)))
    return result


# ------------------------------------------------------------------------------------ writing


def array_to_sitk(array: np.ndarray, meta: ImageMeta, channels_as_4d: bool = False
                  ) -> sitk.Image:
    """Builds a SimpleITK image with `meta`'s geometry.

    Args:
      array: (z, y, x) or (y, x) scalar; or the same with a trailing channel axis of size
        `meta.num_channels` > 1.
      meta: the geometry.
      channels_as_4d: multi-channel only: a 4D scalar image (MSD NIfTI) instead of vector pixels.

    Raises:
      ValueError: if the array shape does not match `meta`.
    """
    array = np.asarray(array)
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    elif array.dtype == np.float16:
        array = array.astype(np.float32)
    channels = meta.num_channels
    expected = meta.shape_zyx + ((channels,) if channels > 1 else ())
    if array.shape != expected:
        raise ValueError(f"Array shape {array.shape} does not match the geometry: expected "
                         f"{expected} (meta.shape_zyx + channels). Pass the meta of this array.")
    if channels > 1 and channels_as_4d:
        if meta.ndim != 3:
            raise ValueError("Only 3D multi-channel images can be stored as 4D.")
        image = sitk.GetImageFromArray(np.moveaxis(array, -1, 0), isVector=False)
        direction = np.eye(4)
        direction[:3, :3] = np.asarray(meta.direction).reshape(3, 3)
        image.SetSpacing(tuple(meta.spacing_xyz) + (1.0,))
        image.SetOrigin(tuple(meta.origin_xyz) + (0.0,))
        image.SetDirection(tuple(direction.ravel()))
        return image
    image = sitk.GetImageFromArray(array, isVector=channels > 1)
    image.SetSpacing(meta.spacing_xyz)
    image.SetOrigin(meta.origin_xyz)
    image.SetDirection(meta.direction)
    return image


def write_image(array: np.ndarray, meta: ImageMeta, path: str) -> None:
    """Writes `array` with `meta`'s geometry, atomically (temporary folder, then rename).

    Multi-channel arrays (z, y, x, c) become 4D NIfTI / Analyze images (channels on the 4th
    axis, as MSD ships them) or vector-pixel MetaImage / NRRD images. The array's dtype is kept.
    Files are written into a hidden temporary folder beside `path` under their final names (so
    .hdr/.img, .mhd/.raw and .nhdr pairs reference each other correctly), then renamed into
    place, data file first and header last.

    Raises:
      ValueError: for an unsupported extension or an array that does not match `meta`.
    """
    path = os.fspath(path)
    ext = _extension(path)
    if ext not in _WRITE_EXTENSIONS:
        raise ValueError(f"Cannot write {path}: unsupported extension {ext!r}; expected one of "
                         f"{', '.join(_WRITE_EXTENSIONS)}.")
    # 2D multi-channel NIfTI falls back to vector pixels (a 4D layout needs 3 spatial axes).
    image = array_to_sitk(array, meta, channels_as_4d=ext in _NIFTI_FAMILY and meta.ndim == 3)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    temporary = tempfile.mkdtemp(prefix=f".tmp-{os.getpid()}-", dir=folder)
    try:
        sitk.WriteImage(image, os.path.join(temporary, os.path.basename(path)))
        written = sorted(os.listdir(temporary), key=lambda n: _extension(n) in _HEADER_EXTENSIONS)
        for name in written:
            os.replace(os.path.join(temporary, name), os.path.join(folder, name))
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
