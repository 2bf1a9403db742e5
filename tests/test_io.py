"""tfseg.io: round trips for every format, multi-channel layouts, and the integrity checks."""
import os
import re

import numpy as np
import pytest
import SimpleITK as sitk

from tfseg.io import (ImageMeta, ImageReadError, check_finite, read_channels, read_image,
                      read_label, write_image)
from tfseg.io import image as image_module

# A non-trivial geometry: anisotropic spacing, off-origin, axes permuted and one flipped.
META = ImageMeta(spacing_xyz=(0.5, 0.7, 2.5), origin_xyz=(10.0, -20.0, 30.5),
                 direction=(0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, -1.0), size_xyz=(8, 10, 3))
FILE_FORMATS = [".nii", ".nii.gz", ".hdr", ".img", ".mha", ".mhd", ".nrrd", ".nhdr"]


def _float_volume():
    rng = np.random.default_rng(0)
    return rng.normal(100.0, 30.0, size=META.shape_zyx).astype(np.float32)  # (3, 10, 8)


def _assert_geometry(meta, expected):
    assert meta.size_xyz == expected.size_xyz
    assert meta.num_channels == expected.num_channels
    # NIfTI stores spacing as float32: 0.7 comes back as 0.699999988.
    np.testing.assert_allclose(meta.spacing_xyz, expected.spacing_xyz, rtol=1e-6)
    np.testing.assert_allclose(meta.origin_xyz, expected.origin_xyz, atol=1e-4)
    np.testing.assert_allclose(meta.direction, expected.direction, atol=1e-6)


def _truncate(path, num_bytes):
    with open(path, "r+b") as stream:
        stream.seek(0, os.SEEK_END)
        stream.truncate(stream.tell() - num_bytes)


@pytest.mark.parametrize("ext", FILE_FORMATS)
def test_float_round_trip_is_exact(tmp_path, ext):
    volume = _float_volume()
    path = str(tmp_path / f"scan{ext}")
    write_image(volume, META, path)
    array, meta = read_image(path)
    assert array.dtype == np.float32 and array.shape == (3, 10, 8)
    np.testing.assert_array_equal(array, volume)
    _assert_geometry(meta, META)
    # Nothing but the image files is left behind (the temporary folder is gone).
    assert all(not name.startswith(".tmp-") for name in os.listdir(tmp_path))


@pytest.mark.parametrize("ext", FILE_FORMATS)
def test_integer_label_round_trip_is_exact(tmp_path, ext):
    labels = (np.arange(240).reshape(3, 10, 8) % 4 * 50).astype(np.int16)  # values 0..150
    path = str(tmp_path / f"label{ext}")
    write_image(labels, META, path)
    array, meta = read_label(path)
    assert np.issubdtype(array.dtype, np.integer)
    np.testing.assert_array_equal(array, labels)
    _assert_geometry(meta, META)
    # read_image gives the same values as float32.
    np.testing.assert_array_equal(read_image(path)[0], labels.astype(np.float32))


def test_pairs_have_their_final_names(tmp_path):
    write_image(_float_volume(), META, str(tmp_path / "a.hdr"))
    write_image(_float_volume(), META, str(tmp_path / "b.mhd"))
    write_image(_float_volume(), META, str(tmp_path / "c.nhdr"))
    assert sorted(os.listdir(tmp_path)) == ["a.hdr", "a.img", "b.mhd", "b.raw", "c.nhdr", "c.raw"]
    # The .mhd header references its data file by its final name.
    assert "ElementDataFile = b.raw" in (tmp_path / "b.mhd").read_text()
    # The .hdr/.img pair reads from either member.
    np.testing.assert_array_equal(read_image(str(tmp_path / "a.img"))[0], _float_volume())


def test_analyze_75_without_nifti_magic_is_read(tmp_path):
    # iSEG ships plain Analyze 7.5: the same 348-byte header without the "ni1" magic.
    path = str(tmp_path / "subject-1-T1.hdr")
    write_image(_float_volume(), META, path)
    header = bytearray((tmp_path / "subject-1-T1.hdr").read_bytes())
    assert header[344:347] == b"ni1"
    header[344:348] = b"\0\0\0\0"
    (tmp_path / "subject-1-T1.hdr").write_bytes(bytes(header))
    array, meta = read_image(path)
    np.testing.assert_array_equal(array, _float_volume())
    np.testing.assert_allclose(meta.spacing_xyz, META.spacing_xyz, rtol=1e-6)


def test_two_dimensional_file_reads_as_yx(tmp_path):
    meta = ImageMeta((0.8, 0.9), (1.0, 2.0), (1.0, 0.0, 0.0, 1.0), (8, 6))
    image = np.arange(48, dtype=np.float32).reshape(6, 8)
    write_image(image, meta, str(tmp_path / "slice.nii.gz"))
    array, read_meta = read_image(str(tmp_path / "slice.nii.gz"))
    assert array.shape == (6, 8)
    np.testing.assert_array_equal(array, image)
    _assert_geometry(read_meta, meta)


def test_msd_style_4d_nifti_round_trip(tmp_path):
    volumes = np.stack([_float_volume(), -_float_volume()], axis=-1)  # (z, y, x, c) = (3,10,8,2)
    meta = ImageMeta(META.spacing_xyz, META.origin_xyz, META.direction, META.size_xyz, 2)
    path = str(tmp_path / "prostate_00.nii.gz")
    write_image(volumes, meta, path)
    on_disk = sitk.ReadImage(path)  # stored as MSD does: a 4D scalar image, channels last in xyz t
    assert on_disk.GetDimension() == 4 and on_disk.GetSize() == (8, 10, 3, 2)
    array, read_meta = read_image(path)
    assert array.shape == (3, 10, 8, 2)
    np.testing.assert_array_equal(array, volumes)
    _assert_geometry(read_meta, meta)
    # read_channels picks a channel, reading the file once for both.
    (t2, t2_meta), (adc, _) = read_channels([path, path], [0, 1])
    np.testing.assert_array_equal(t2, _float_volume())
    np.testing.assert_array_equal(adc, -_float_volume())
    assert t2_meta.num_channels == 1 and t2_meta.size_xyz == META.size_xyz


@pytest.mark.parametrize("ext", [".mha", ".nrrd"])
def test_vector_image_round_trip(tmp_path, ext):
    volumes = np.stack([_float_volume(), _float_volume() * 2, _float_volume() + 1], axis=-1)
    meta = ImageMeta(META.spacing_xyz, META.origin_xyz, META.direction, META.size_xyz, 3)
    path = str(tmp_path / f"rgb{ext}")
    write_image(volumes, meta, path)
    assert sitk.ReadImage(path).GetNumberOfComponentsPerPixel() == 3
    array, read_meta = read_image(path)
    np.testing.assert_array_equal(array, volumes)
    _assert_geometry(read_meta, meta)


def _write_dicom_series(folder, volume, meta, series_uid):
    """Per-slice int16 DICOM files with the tags a series reader needs (position, orientation)."""
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing(meta.spacing_xyz)
    image.SetOrigin(meta.origin_xyz)
    image.SetDirection(meta.direction)
    d = meta.direction
    orientation = "\\".join(str(v) for v in (d[0], d[3], d[6], d[1], d[4], d[7]))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    os.makedirs(folder, exist_ok=True)
    for k in range(volume.shape[0]):
        slice_image = image[:, :, k]
        position = "\\".join(str(v) for v in image.TransformIndexToPhysicalPoint((0, 0, k)))
        for tag, value in (("0008|0060", "MR"), ("0020|000d", series_uid + ".0"),
                           ("0020|000e", series_uid), ("0008|0018", f"{series_uid}.{k + 1}"),
                           ("0020|0037", orientation), ("0020|0032", position),
                           ("0020|0013", str(k + 1)), ("0018|0050", str(meta.spacing_xyz[2]))):
            slice_image.SetMetaData(tag, value)
        writer.SetFileName(os.path.join(folder, f"{series_uid[-3:]}_{k:03d}.dcm"))
        writer.Execute(slice_image)


def test_dicom_series_folder_round_trip(tmp_path):
    meta = ImageMeta((0.5, 0.7, 2.5), (10.0, -20.0, 30.5), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0),
                     (8, 10, 4))
    volume = (np.arange(320).reshape(4, 10, 8) * 3 - 100).astype(np.int16)
    folder = str(tmp_path / "series")
    _write_dicom_series(folder, volume, meta, "1.2.826.0.1.3680043.2.1125.7.101")
    # A second, shorter series in the same folder (a localiser) must not be chosen.
    short = ImageMeta(meta.spacing_xyz, meta.origin_xyz, meta.direction, (8, 10, 2))
    _write_dicom_series(folder, np.ones((2, 10, 8), np.int16), short,
                        "1.2.826.0.1.3680043.2.1125.7.202")
    array, read_meta = read_image(folder)
    assert array.dtype == np.float32
    np.testing.assert_array_equal(array, volume.astype(np.float32))
    _assert_geometry(read_meta, meta)
    np.testing.assert_array_equal(read_label(folder)[0], volume)


def test_empty_folder_is_not_a_dicom_series(tmp_path):
    with pytest.raises(ImageReadError, match="holds no DICOM series") as info:
        read_image(str(tmp_path))
    assert str(tmp_path) in str(info.value)


@pytest.mark.parametrize("ext,damaged,cut", [
    (".nii.gz", "scan.nii.gz", 10), (".nii", "scan.nii", 4), (".hdr", "scan.img", 4),
    (".img", "scan.img", 4), (".mha", "scan.mha", 4), (".mhd", "scan.raw", 4),
    (".nrrd", "scan.nrrd", 4), (".nhdr", "scan.raw", 4)])
def test_truncated_files_are_rejected(tmp_path, ext, damaged, cut):
    path = str(tmp_path / f"scan{ext}")
    write_image(_float_volume(), META, path)
    _truncate(str(tmp_path / damaged), cut)
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    message = str(info.value)
    assert "scan" in message and str(tmp_path) in message
    assert "Re-download or re-extract" in message
    if ext != ".nrrd" and ext != ".nhdr":  # ITK's own NRRD message reports the short read
        assert "truncated" in message and damaged in message


def test_gzip_crc_mismatch_is_rejected(tmp_path):
    path = str(tmp_path / "scan.nii.gz")
    write_image(_float_volume(), META, path)
    data = bytearray(open(path, "rb").read())
    data[-8] ^= 0xFF  # first byte of the CRC32 trailer
    open(path, "wb").write(bytes(data))
    with pytest.raises(ImageReadError, match="gzip data is corrupt"):
        read_image(path)


def test_truncated_gzip_of_a_complete_looking_nifti_header(tmp_path):
    # The gzip stream is complete, but the NIfTI inside lost its last voxels before compression.
    import gzip
    nii = str(tmp_path / "scan.nii")
    write_image(_float_volume(), META, nii)
    raw = open(nii, "rb").read()[:-16]
    with gzip.open(str(tmp_path / "short.nii.gz"), "wb") as stream:
        stream.write(raw)
    with pytest.raises(ImageReadError, match="header declares"):
        read_image(str(tmp_path / "short.nii.gz"))


def test_missing_empty_and_unpaired_files(tmp_path):
    with pytest.raises(ImageReadError, match="does not exist") as info:
        read_image(str(tmp_path / "absent.nii.gz"))
    assert "absent.nii.gz" in str(info.value)
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    with pytest.raises(ImageReadError, match=r"empty \(0 bytes\)"):
        read_image(str(tmp_path / "empty.nii.gz"))
    write_image(_float_volume(), META, str(tmp_path / "pair.hdr"))
    os.remove(tmp_path / "pair.img")
    with pytest.raises(ImageReadError, match="pair.img is missing"):
        read_image(str(tmp_path / "pair.hdr"))
    write_image(_float_volume(), META, str(tmp_path / "meta.mhd"))
    os.remove(tmp_path / "meta.raw")
    with pytest.raises(ImageReadError, match="meta.raw is missing"):
        read_image(str(tmp_path / "meta.mhd"))
    (tmp_path / "junk.nii").write_bytes(b"not an image" * 40)
    with pytest.raises(ImageReadError, match="ITK could not read it") as info:
        read_image(str(tmp_path / "junk.nii"))
    assert "junk.nii" in str(info.value)


def test_read_label_rejects_non_integer_values(tmp_path):
    path = str(tmp_path / "probabilities.nii.gz")
    write_image(np.full(META.shape_zyx, 0.25, np.float32), META, path)
    with pytest.raises(ValueError, match="non-integer values") as info:
        read_label(path)
    assert "probabilities.nii.gz" in str(info.value)
    # Float storage holding whole numbers is accepted and returned as int32.
    whole = str(tmp_path / "whole.nii.gz")
    write_image(np.full(META.shape_zyx, 2.0, np.float32), META, whole)
    labels, _ = read_label(whole)
    assert labels.dtype == np.int32 and np.all(labels == 2)


def test_read_label_rejects_multichannel(tmp_path):
    meta = ImageMeta(META.spacing_xyz, META.origin_xyz, META.direction, META.size_xyz, 2)
    path = str(tmp_path / "two.nii.gz")
    write_image(np.zeros(META.shape_zyx + (2,), np.uint8), meta, path)
    with pytest.raises(ValueError, match="has 2 channels"):
        read_label(path)


def test_check_finite():
    check_finite(np.zeros((2, 3)), "fine.nii")
    volume = np.zeros((2, 3, 4), np.float32)
    volume[0, 1, 2] = np.nan
    volume[1, 0, 0] = np.inf
    with pytest.raises(ValueError, match=r"scan.nii has 2 NaN or infinite voxels out of 24"):
        check_finite(volume, "scan.nii")


@pytest.mark.parametrize("extension", [".nii", ".nii.gz", ".hdr", ".mha", ".nrrd"])
def test_non_finite_voxels_are_reported_for_every_float_format(tmp_path, extension):
    # ITK's NIfTI/Analyze reader would hand back 0 for these voxels without a word.
    volume = np.ones((3, 4, 5), np.float32)
    volume[1, 2, 3] = np.nan
    volume[0, 0, 0] = -np.inf
    path = str(tmp_path / f"scan{extension}")
    sitk.WriteImage(sitk.GetImageFromArray(volume), path)
    if extension in (".mha", ".nrrd"):  # kept by the reader: check_finite catches them
        array, _ = read_image(path)
        with pytest.raises(ValueError, match="has 2 NaN or infinite voxels"):
            check_finite(array, path)
    else:
        with pytest.raises(ValueError, match=rf"scan{re.escape(extension)} has 2 NaN or infinite"):
            read_image(path)
    # Finite float and integer files of the same formats read fine.
    sitk.WriteImage(sitk.GetImageFromArray(np.nan_to_num(volume, posinf=0, neginf=0)), path)
    assert read_image(path)[0].shape == (3, 4, 5)


def test_read_channels_errors(tmp_path):
    meta = ImageMeta(META.spacing_xyz, META.origin_xyz, META.direction, META.size_xyz, 2)
    four_d = str(tmp_path / "4d.nii.gz")
    write_image(np.zeros(META.shape_zyx + (2,), np.float32), meta, four_d)
    with pytest.raises(ValueError, match=r"has 2 channels; expected a channel index in \[0, 1\]"):
        read_channels([four_d], [2])
    with pytest.raises(ValueError, match="got None"):
        read_channels([four_d])
    scalar = str(tmp_path / "t1.nii.gz")
    write_image(_float_volume(), META, scalar)
    assert read_channels([scalar], [0])[0][0].shape == (3, 10, 8)
    with pytest.raises(ValueError, match="single channel; channel 1"):
        read_channels([scalar], [1])


def test_write_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match=r"does not match the geometry: expected \(3, 10, 8\)"):
        write_image(np.zeros((3, 8, 10), np.float32), META, str(tmp_path / "x.nii.gz"))
    with pytest.raises(ValueError, match="unsupported extension '.png'"):
        write_image(_float_volume(), META, str(tmp_path / "x.png"))


def test_write_is_atomic_when_the_writer_fails(tmp_path, monkeypatch):
    path = tmp_path / "scan.nii.gz"
    write_image(_float_volume(), META, str(path))
    before = path.read_bytes()

    def failing_write(image, file_name, *args, **kwargs):
        with open(file_name, "wb") as stream:  # a partial file, then the crash
            stream.write(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(image_module.sitk, "WriteImage", failing_write)
    with pytest.raises(RuntimeError, match="disk full"):
        write_image(np.zeros(META.shape_zyx, np.float32), META, str(path))
    assert path.read_bytes() == before  # the previous complete file is untouched
    assert os.listdir(tmp_path) == ["scan.nii.gz"]  # no temporary leftovers
