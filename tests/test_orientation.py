"""Orientation does not change the answer: the same scan stored as LPS, RAS, LPI or with permuted
axes is processed into the same slices, and a prediction maps back onto each copy's own grid."""
import dataclasses

import numpy as np
import pytest
import SimpleITK as sitk

from preprocessing import PreprocessConfig
from preprocessing.transforms import (canonical_transform, preprocess_volume, reorient,
                                      restore_geometry, undo_reorient)
from tests.test_preprocessing import TinyDataset
from tfseg.io.image import meta_from_sitk

NO_N4 = PreprocessConfig(n4=False)


def _scan(spacing_xyz, size_xyz=(14, 12, 6), seed=0):
    """An asymmetric phantom (nothing is mirror- or rotation-symmetric) and its label, as one
    SimpleITK image pair in LPS with an oblique-free identity direction."""
    rng = np.random.default_rng(seed)
    nx, ny, nz = size_xyz
    z, y, x = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    label = np.zeros((nz, ny, nx), np.int16)
    label[(x > 2) & (x < 8) & (y > 1) & (y < 5)] = 10          # a box near one corner
    label[(x - 10) ** 2 + (y - 8) ** 2 < 5] = 150               # a disc elsewhere
    label[z == nz - 1] = 0                                      # not on the last slice
    image = (100.0 + 30.0 * (label > 0) + 50.0 * (label == 150) + 3.0 * x + 2.0 * y + 5.0 * z
             + rng.normal(0, 1.0, label.shape)).astype(np.float32)
    pair = []
    for array in (image, label):
        item = sitk.GetImageFromArray(array)
        item.SetSpacing(spacing_xyz)
        item.SetOrigin((10.0, -20.0, 30.0))
        pair.append(item)
    return pair


def _copies(pair):
    """The same physical scan in other voxel orders."""
    image, label = pair
    yield "LPS", image, label
    for code in ("RAS", "LPI", "RPI", "ASL"):
        yield code, sitk.DICOMOrient(image, code), sitk.DICOMOrient(label, code)
    for order in ((2, 0, 1), (1, 2, 0), (0, 2, 1)):
        yield f"permuted {order}", sitk.PermuteAxes(image, order), sitk.PermuteAxes(label, order)


def _process(image, label, dataset):
    meta = meta_from_sitk(image)
    array = sitk.GetArrayFromImage(image)
    raw_label = sitk.GetArrayFromImage(label)
    return preprocess_volume([array, array * 0.5 + 7.0], [meta, meta], raw_label, dataset,
                             NO_N4), meta, raw_label


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 4.0), (1.0, 1.0, 1.0)])
def test_every_voxel_order_gives_the_same_slices_and_maps_back(spacing):
    dataset = dataclasses.replace(TinyDataset(), target_spacing_xy=None, crop_size_yx=None)
    reference = None
    for name, image, label in _copies(_scan(spacing)):
        processed, meta, raw_label = _process(image, label, dataset)
        if reference is None:
            reference = processed
            assert processed.image.shape[0] == 6, "the slices must be the 6 axial planes"
        else:
            np.testing.assert_allclose(processed.image, reference.image, atol=1e-5,
                                       err_msg=name)
            np.testing.assert_array_equal(processed.label, reference.label, err_msg=name)
        # A prediction (here: the processed label itself) goes back to the copy's own grid.
        restored = restore_geometry(processed.label, processed.geometry, meta,
                                    is_probability=False)
        expected = np.vectorize({0: 0, 10: 1, 150: 2}.get)(raw_label)
        np.testing.assert_array_equal(restored, expected, err_msg=name)
        probabilities = np.eye(3, dtype=np.float32)[processed.label]
        restored = restore_geometry(probabilities, processed.geometry, meta, is_probability=True)
        np.testing.assert_array_equal(restored.argmax(-1), expected, err_msg=name)


def test_the_thick_axis_is_the_slice_axis_even_when_it_is_stored_first():
    """A cardiac-like stack (1.5 mm in-plane, 8 mm apart) written with the slices along x."""
    image, _ = _scan((1.5, 1.5, 8.0))
    permuted = sitk.PermuteAxes(image, (2, 0, 1))              # slices now along index x
    transform = canonical_transform(meta_from_sitk(permuted), spatial_dims=2)
    assert transform["axes"][2] == 0                           # index x becomes the slice axis
    array, meta = reorient(sitk.GetArrayFromImage(permuted), meta_from_sitk(permuted),
                           transform)
    assert meta.spacing_xyz[2] == 8.0 and array.shape[0] == 6
    np.testing.assert_array_equal(undo_reorient(array, transform),
                                  sitk.GetArrayFromImage(permuted))


def test_reorient_keeps_every_voxel_at_its_physical_position():
    image, _ = _scan((0.9, 1.1, 3.0))
    flipped = sitk.DICOMOrient(sitk.PermuteAxes(image, (1, 2, 0)), "RAI")
    meta = meta_from_sitk(flipped)
    array = sitk.GetArrayFromImage(flipped)
    out, new_meta = reorient(array, meta, canonical_transform(meta, spatial_dims=3))
    assert np.allclose(np.asarray(new_meta.direction).reshape(3, 3), np.eye(3))
    rebuilt = sitk.GetImageFromArray(out)
    rebuilt.SetSpacing(new_meta.spacing_xyz)
    rebuilt.SetOrigin(new_meta.origin_xyz)
    rebuilt.SetDirection(new_meta.direction)
    for index in ((0, 0, 0), (3, 5, 2), (13, 11, 5)):
        point = image.TransformIndexToPhysicalPoint(index)
        assert rebuilt[rebuilt.TransformPhysicalPointToIndex(point)] == pytest.approx(image[index])


def test_unreliable_headers_are_never_flipped():
    image, _ = _scan((1.0, 1.0, 1.0))
    meta = meta_from_sitk(sitk.DICOMOrient(image, "RAS"))
    assert canonical_transform(meta, 3, reliable=False) == {"axes": [0, 1, 2],
                                                            "flip": [False, False, False]}
