"""preprocessing/: config, transforms (golden values, round trips), N4, writer and runner."""
from __future__ import annotations

import dataclasses
import json
import os
import re

import numpy as np
import pytest
import SimpleITK as sitk

from preprocessing import (PreprocessConfig, SubjectsSkippedError, fingerprint, records_dir,
                           resolve_config, restore_geometry, run_preprocessing)
from preprocessing import n4, runner, transforms, writer
from preprocessing.transforms import preprocess_volume
from tfseg.data.schema import decode_example_numpy
from tfseg.datasets.base import Dataset, Subject
from tfseg.io import ImageMeta

EYE3 = tuple(np.eye(3).ravel())


@dataclasses.dataclass(frozen=True)
class TinyDataset(Dataset):
    """Test layout: <data_dir>/<subject>/{image_0.nii.gz, image_1.nii.gz, [label.nii.gz]}."""

    name: str = "tiny"
    modalities: tuple = ("t1", "t2")
    class_names: tuple = ("background", "outer", "inner")
    label_values: tuple = (0, 10, 150)
    spatial_dims: int = 2
    n4_shrink: int = 2
    extension: str = ".nii.gz"

    def list_subjects(self, data_dir, **options):
        if not os.path.isdir(data_dir) or not os.listdir(data_dir):
            raise ValueError(f"{data_dir} does not look like the tiny dataset: expected "
                             "<subject>/image_0.nii.gz. Point --data_dir at it.")
        subjects = []
        for sid in sorted(os.listdir(data_dir)):
            folder = os.path.join(data_dir, sid)
            label = os.path.join(folder, "label" + self.extension)
            subjects.append(Subject(
                sid, sid, tuple(os.path.join(folder, f"image_{c}{self.extension}")
                                for c in range(2)),
                label if os.path.exists(label) else None))
        return subjects


def meta_for(shape_zyx, spacing_xyz=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)):
    return ImageMeta(tuple(spacing_xyz), tuple(origin), EYE3, tuple(reversed(shape_zyx)))


def phantom(shape_zyx, seed=0, spacing_xyz=(1.0, 1.0, 1.0)):
    """Two nested discs per slice (labels 10 and 150), body intensity, zero background."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.arange(s, dtype=float) for s in shape_zyx], indexing="ij")
    cy, cx = (shape_zyx[1] - 1) / 2, (shape_zyx[2] - 1) / 2
    r_mm = np.hypot((y - cy) * spacing_xyz[1], (x - cx) * spacing_xyz[0])
    extent = min(shape_zyx[1] * spacing_xyz[1], shape_zyx[2] * spacing_xyz[0]) / 2
    label = np.where(r_mm < 0.3 * extent, 150, np.where(r_mm < 0.6 * extent, 10, 0))
    body = r_mm < 0.9 * extent
    images = [((100 + (40 + 10 * c) * (label > 0) + 30 * (label == 150)
                + rng.normal(0, 3, shape_zyx)) * body).astype(np.float32) for c in range(2)]
    return images, label.astype(np.int16)


def write(path, array, spacing_xyz=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing_xyz)
    image.SetOrigin(origin)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sitk.WriteImage(image, path)


def make_tiny(root, count=3, shape=(4, 20, 18), spacing=(1.0, 1.0, 5.0), labeled=True,
              extension=".nii.gz"):
    for index in range(count):
        images, label = phantom(shape, seed=index, spacing_xyz=spacing)
        folder = os.path.join(root, f"s{index}")
        for c, image in enumerate(images):
            write(os.path.join(folder, f"image_{c}{extension}"), image, spacing)
        if labeled:
            write(os.path.join(folder, "label" + extension), label, spacing)
    return root


def dice(a, b):
    return 2 * np.sum(a & b) / (np.sum(a) + np.sum(b))


NO_N4 = PreprocessConfig(n4=False)

# ----------------------------------------------------------------------------------- config


def test_resolve_config_takes_dataset_defaults():
    two_d = TinyDataset(target_spacing_xy=(1.2, 1.2), crop_size_yx=(16, 16))
    resolved = resolve_config(PreprocessConfig(), two_d)
    assert (resolved.n4, resolved.n4_shrink) == (True, 2)
    assert resolved.target_spacing_xy == (1.2, 1.2) and resolved.crop_size_yx == (16, 16)
    assert resolved.patch_size_zyx is None
    assert resolve_config(resolved, two_d) == resolved  # idempotent
    three_d = TinyDataset(spatial_dims=3, n4_shrink=4, min_foreground_fraction=0.1)
    resolved = resolve_config(PreprocessConfig(n4_shrink=3), three_d)
    assert resolved.n4_shrink == 3 and resolved.patch_size_zyx == (32, 32, 32)
    assert resolved.patch_stride_zyx == (8, 8, 8) and resolved.min_foreground_fraction == 0.1
    # CT: a window (or n4_default=False) turns N4 off whatever the config says.
    assert not resolve_config(PreprocessConfig(n4=True),
                              TinyDataset(intensity_window=(-100.0, 240.0))).n4
    assert not resolve_config(PreprocessConfig(n4=True), TinyDataset(n4_default=False)).n4


@pytest.mark.parametrize("config, dataset, message", [
    (PreprocessConfig(percentiles=(98.0, 2.0)), TinyDataset(), "percentiles"),
    (PreprocessConfig(n4_shrink=0), TinyDataset(), "n4_shrink"),
    (PreprocessConfig(crop_size_yx=(16, 0)), TinyDataset(), "crop_size_yx must be positive"),
    (PreprocessConfig(patch_size_zyx=(8, 8, 8)), TinyDataset(), "2D slices"),
    (PreprocessConfig(crop_size_yx=(16, 16)), TinyDataset(spatial_dims=3), "3D volumes"),
    (PreprocessConfig(min_foreground_fraction=1.5), TinyDataset(spatial_dims=3), "[0, 1)"),
])
def test_resolve_config_rejects_bad_settings(config, dataset, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace(")", r"\)")):
        resolve_config(config, dataset)


def test_fingerprint_tracks_settings_options_and_facts():
    dataset = TinyDataset()
    base = fingerprint(dataset, {}, PreprocessConfig())
    assert len(base) == 12 and int(base, 16) >= 0
    assert fingerprint(dataset, {}, PreprocessConfig()) == base
    # Spelling out a default does not change it; changing a setting, option or fact does.
    assert fingerprint(dataset, {}, PreprocessConfig(n4_shrink=2)) == base
    assert fingerprint(dataset, {}, NO_N4) != base
    assert fingerprint(dataset, {"phase": "ED"}, PreprocessConfig()) != base
    assert fingerprint(dataclasses.replace(dataset, label_values=(0, 1, 2)), {},
                       PreprocessConfig()) != base
    # A new generator version of a synthetic dataset never reuses older records.
    assert fingerprint(dataclasses.replace(dataset, content_version=2), {},
                       PreprocessConfig()) != base
    assert records_dir("records", "tiny", base) == os.path.join("records", "tiny", base)

# ------------------------------------------------------------------------------- transforms


def test_remap_label_iseg_values():
    raw = np.array([[0, 10], [150, 250]])
    mapped = transforms.remap_label(raw, {0: 0, 10: 1, 150: 2, 250: 3})
    np.testing.assert_array_equal(mapped, [[0, 1], [2, 3]])
    assert mapped.dtype == np.uint8


def test_remap_label_lists_unknown_values():
    with pytest.raises(ValueError, match=r"/data/lab.nii.gz holds values \[7, 300\]"):
        transforms.remap_label(np.array([0, 7, 10, 300]), {0: 0, 10: 1}, "/data/lab.nii.gz")


@pytest.mark.parametrize("change, problem", [
    (dict(size_xyz=(8, 8, 5)), "size"),
    (dict(spacing_xyz=(1.0, 1.01, 1.0)), "spacing"),
    (dict(origin_xyz=(0.0, 0.05, 0.0)), "origin"),
    (dict(direction=(0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)), "direction"),
])
def test_check_geometry_names_files_and_difference(change, problem):
    reference = meta_for((4, 8, 8))
    other = dataclasses.replace(reference, **change)
    with pytest.raises(ValueError, match=rf"b.nii does not share the voxel grid of a.nii: "
                                         rf"{problem}"):
        transforms.check_geometry([reference, other], ["a.nii", "b.nii"])
    if problem == "direction":  # Analyze: direction cosines are not trusted
        transforms.check_geometry([reference, other], ["a", "b"], orientation_reliable=False)


def test_check_geometry_accepts_header_rounding():
    reference = meta_for((4, 8, 8), (0.9375, 0.9375, 3.0), (10.0, -5.0, 2.0))
    close = meta_for((4, 8, 8), (0.9375004, 0.9375, 3.0001), (10.004, -5.0, 2.0))
    transforms.check_geometry([reference, close])


def test_normalise_intensity_golden_values():
    volume = np.arange(101, dtype=np.float32)  # foreground 0..100 -> p2 = 2, p98 = 98
    mask = np.ones(101, bool)
    out, low, high = transforms.normalise_intensity(volume, mask, (2.0, 98.0))
    assert (low, high) == (2.0, 98.0)
    np.testing.assert_allclose(out[[2, 50, 98, 100]], [0.0, 0.5, 1.0, 98 / 96], rtol=1e-6)
    # Percentiles come from the masked voxels only.
    volume = np.concatenate([np.zeros(1000, np.float32), np.arange(101, dtype=np.float32)])
    out, low, high = transforms.normalise_intensity(volume, volume > 0, (0.0, 100.0), (0.0, 1.0))
    assert (low, high) == (1.0, 100.0) and out.min() == 0.0 and out.max() == 1.0
    with pytest.raises(ValueError, match="t1.nii is constant over its foreground"):
        transforms.normalise_intensity(np.full(10, 3.0), np.ones(10, bool), (2.0, 98.0),
                                       source="t1.nii")


def test_2d_crop_pad_round_trip_is_exact():
    # Rows 21 > crop 16 (cropped), cols 13 < 16 (padded); spacing already at the target.
    images, raw = phantom((3, 21, 13), spacing_xyz=(1.5, 1.5, 8.0))
    meta = meta_for((3, 21, 13), (1.5, 1.5, 8.0))
    dataset = TinyDataset(target_spacing_xy=(1.5, 1.5), crop_size_yx=(16, 16))
    out = preprocess_volume(images, [meta] * 2, raw, dataset, NO_N4)
    assert out.image.shape == (3, 16, 16, 2) and out.image.dtype == np.float32
    assert out.label.shape == (3, 16, 16) and set(np.unique(out.label)) == {0, 1, 2}
    assert out.geometry["offset_zyx"] == [0, 2, -2] and out.geometry["resampled_spacing_xyz"] is None
    # Padded columns hold each channel's minimum normalised value (its background level).
    np.testing.assert_array_equal(out.image[:, :, :2, 0], out.stats["pad_value"][0])
    assert out.stats["pad_value"][0] == pytest.approx(out.image[..., 0].min())
    mapped = transforms.remap_label(raw, TinyDataset().raw_to_class())
    np.testing.assert_array_equal(out.label[:, :, 2:15], mapped[:, 2:18, :])
    restored = restore_geometry(out.label, json.loads(json.dumps(out.geometry)), meta, False)
    assert restored.shape == meta.shape_zyx
    # Rows cropped away (2 top, 3 bottom) come back as background; the rest is exact.
    np.testing.assert_array_equal(restored[:, 2:18], mapped[:, 2:18])
    assert not restored[:, :2].any() and not restored[:, 18:].any()


def test_2d_resampling_round_trip_dice_and_probabilities():
    shape, spacing = (2, 64, 60), (1.5, 1.5, 8.0)
    images, raw = phantom(shape, spacing_xyz=spacing)
    meta = meta_for(shape, spacing, origin=(-40.0, 12.5, 3.0))
    dataset = TinyDataset(target_spacing_xy=(1.37, 1.37), crop_size_yx=(80, 80))
    out = preprocess_volume(images, [meta] * 2, raw, dataset, NO_N4)
    assert out.geometry["resampled_shape_zyx"] == [2, 70, 66]  # round(64 * 1.5 / 1.37) = 70
    assert out.image.shape == (2, 80, 80, 2)
    mapped = transforms.remap_label(raw, dataset.raw_to_class())
    restored = restore_geometry(out.label, out.geometry, meta, is_probability=False)
    assert restored.shape == shape
    for cls in (1, 2):
        assert dice(restored == cls, mapped == cls) > 0.95
    probabilities = np.eye(3, dtype=np.float32)[out.label]  # (Z, H, W, 3)
    restored = restore_geometry(probabilities, out.geometry, meta, is_probability=True)
    assert restored.shape == shape + (3,) and restored.dtype == np.float32
    np.testing.assert_allclose(restored.sum(-1), 1.0, atol=1e-5)
    for cls in (1, 2):
        assert dice(restored.argmax(-1) == cls, mapped == cls) > 0.95


def test_2d_file_input_restores_to_2d():
    images, raw = phantom((1, 20, 20))
    meta2d = ImageMeta((1.0, 1.0), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0), (20, 20))
    dataset = TinyDataset(crop_size_yx=(24, 24))
    out = preprocess_volume([i[0] for i in images], [meta2d] * 2, raw[0], dataset, NO_N4)
    assert out.image.shape == (1, 24, 24, 2)
    restored = restore_geometry(out.label, out.geometry, meta2d, False)
    np.testing.assert_array_equal(restored, transforms.remap_label(raw[0], dataset.raw_to_class()))


def brute_force_corners(label, patch, stride, fraction):
    corners = []
    for z in range(0, label.shape[0] - patch[0] + 1, stride[0]):
        for y in range(0, label.shape[1] - patch[1] + 1, stride[1]):
            for x in range(0, label.shape[2] - patch[2] + 1, stride[2]):
                block = label[z:z + patch[0], y:y + patch[1], x:x + patch[2]]
                if (block > 0).mean() > fraction:
                    corners.append((z, y, x))
    return np.asarray(corners, np.int64).reshape(-1, 3)


def test_labeled_patch_corners_match_brute_force():
    label = np.zeros((14, 17, 20), np.uint8)
    label[3:9, 5:14, 2:11] = 1
    label[10, 15, 18] = 2
    for fraction in (0.0, 0.1, 0.4):
        expected = brute_force_corners(label, (6, 5, 4), (2, 3, 2), fraction)
        got = transforms.labeled_patch_corners(label, (6, 5, 4), (2, 3, 2), fraction)
        np.testing.assert_array_equal(got, expected)
    assert len(got) > 0


def test_3d_volume_padded_to_patch_and_restored_exactly():
    shape = (10, 40, 36)  # z smaller than the 16-voxel patch
    images, raw = phantom(shape)
    meta = meta_for(shape)
    dataset = TinyDataset(spatial_dims=3, patch_size_zyx=(16, 16, 16),
                          patch_stride_zyx=(4, 8, 8), min_foreground_fraction=0.2)
    out = preprocess_volume(images, [meta] * 2, raw, dataset, NO_N4)
    assert out.image.shape == (16, 40, 36, 2) and out.geometry["offset_zyx"] == [-3, 0, 0]
    np.testing.assert_array_equal(out.label, transforms._window(  # pylint: disable=protected-access
        transforms.remap_label(raw, dataset.raw_to_class()), [-3, 0, 0], [16, 40, 36], 0))
    np.testing.assert_array_equal(out.patch_corners,
                                  brute_force_corners(out.label, (16, 16, 16), (4, 8, 8), 0.2))
    assert out.stats["patch_rule"] == "foreground_fraction"
    restored = restore_geometry(out.label, out.geometry, meta, False)
    np.testing.assert_array_equal(restored, transforms.remap_label(raw, dataset.raw_to_class()))


def test_unlabeled_corners_have_centres_in_the_head_mask():
    shape = (24, 32, 32)
    images, _ = phantom(shape)
    dataset = TinyDataset(spatial_dims=3, patch_size_zyx=(8, 8, 8), patch_stride_zyx=(4, 4, 4))
    out = preprocess_volume(images, [meta_for(shape)] * 2, None, dataset, NO_N4)
    assert out.label is None and out.stats["patch_rule"] == "head_mask"
    head = images[0] > 0  # the body; Otsu separates it from the zero background
    grid = np.stack(np.meshgrid(np.arange(0, 17, 4), np.arange(0, 25, 4), np.arange(0, 25, 4),
                                indexing="ij"), -1).reshape(-1, 3)
    expected = np.asarray([c for c in grid if head[tuple(c + 4)]])
    assert 0 < len(expected) < len(grid)  # some, not all, grid corners
    np.testing.assert_array_equal(out.patch_corners, expected)


def test_labeled_corners_fall_back_to_head_mask_when_no_patch_passes():
    shape = (16, 24, 24)
    images, _ = phantom(shape)
    label = np.zeros(shape, np.int16)
    label[8, 12, 12] = 10  # one voxel: no patch has 50 % foreground
    dataset = TinyDataset(spatial_dims=3, patch_size_zyx=(8, 8, 8), patch_stride_zyx=(4, 4, 4),
                          min_foreground_fraction=0.5)
    out = preprocess_volume(images, [meta_for(shape)] * 2, label, dataset, NO_N4)
    assert out.stats["patch_rule"].startswith("head_mask") and len(out.patch_corners) > 0


def test_ct_window_is_applied_before_percentiles_and_n4_is_off():
    shape = (2, 16, 16)
    ct = np.full(shape, -1000.0, np.float32)
    ct[:, 4:12, 4:12] = np.linspace(-300, 700, 64).reshape(8, 8)
    dataset = TinyDataset(modalities=("ct",), intensity_window=(-100.0, 240.0),
                          crop_size_yx=(16, 16))
    out = preprocess_volume([ct], [meta_for(shape)], None, dataset, PreprocessConfig(n4=True))
    assert out.stats["n4"] is False
    assert -100.0 <= out.stats["percentile_low"][0] < out.stats["percentile_high"][0] <= 240.0
    # Air (-1000 HU) was clipped to the window's low end first.
    expected = (-100.0 - out.stats["percentile_low"][0]) / (
        out.stats["percentile_high"][0] - out.stats["percentile_low"][0])
    assert out.image[0, 0, 0, 0] == pytest.approx(expected)


def test_non_finite_and_wrong_inputs_are_rejected():
    images, raw = phantom((2, 12, 12))
    meta = meta_for((2, 12, 12))
    dataset = TinyDataset(crop_size_yx=(12, 12))
    images[1][0, 3, 3] = np.nan
    with pytest.raises(ValueError, match="t2.nii has NaN or infinite voxels"):
        preprocess_volume(images, [meta] * 2, raw, dataset, NO_N4, sources=["t1.nii", "t2.nii"])
    with pytest.raises(ValueError, match="2 modalities"):
        preprocess_volume(images[:1], [meta], raw, dataset, NO_N4)
    images, _ = phantom((2, 12, 12))
    out = preprocess_volume(images, [meta] * 2, raw, dataset, NO_N4)
    with pytest.raises(ValueError, match="does not match the one this geometry"):
        restore_geometry(out.label, out.geometry, meta_for((2, 12, 14)), False)

# --------------------------------------------------------------------------------------- N4


def biased_phantom(shape=(20, 28, 28)):
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    radius = np.sqrt(x ** 2 + y ** 2 + z ** 2)
    tissue = np.where(radius < 0.8, 100.0, 0.0)
    bias = np.exp(0.3 * x + 0.2 * y - 0.2 * z)
    noise = np.random.default_rng(0).normal(0, 1.0, shape)
    return np.clip(tissue * bias + noise, 0, None).astype(np.float32), radius < 0.75, bias


def test_n4_flattens_a_known_bias():
    volume, inside, bias = biased_phantom()
    meta = meta_for(volume.shape)
    log_bias = n4.fit_log_bias(volume, meta, (2, 2, 2))
    assert np.corrcoef(log_bias[inside], np.log(bias)[inside])[0, 1] > 0.95
    corrected = n4.n4_correct(volume, meta, (2, 2, 2))

    def variation(v):
        return v[inside].std() / v[inside].mean()
    assert variation(corrected) < 0.4 * variation(volume)


def test_n4_shrunk_fit_matches_full_resolution():
    volume, _, _ = biased_phantom((24, 32, 32))
    result = n4.compare_n4_shrink(volume, shrink=4)
    assert result["correlation"] >= 0.9
    assert result["seconds_full"] > 0 and result["seconds_shrunk"] > 0


def test_n4_rejects_a_blank_image_and_caps_shrink():
    with pytest.raises(ValueError, match="foreground voxels"):
        n4.fit_log_bias(np.zeros((16, 16, 16), np.float32), meta_for((16, 16, 16)), (2, 2, 2))
    assert n4.shrink_factors((144, 192, 256), 4, in_plane_only=False) == (4, 4, 4)
    assert n4.shrink_factors((224, 224, 10), 2, in_plane_only=True) == (2, 2, 1)
    assert n4.shrink_factors((20, 12, 9), 4, in_plane_only=False) == (2, 1, 1)

# ----------------------------------------------------------------------------------- writer


def test_write_shard_is_atomic(tmp_path):
    def failing():
        yield b"first"
        raise RuntimeError("killed")
    with pytest.raises(RuntimeError):
        writer.write_shard(str(tmp_path), "s1", failing())
    assert os.listdir(tmp_path) == []
    info = writer.write_shard(str(tmp_path), "s1", [b"a", b"bc"])
    assert info["num_examples"] == 2 and info["shard"] == "s1.tfrecord"
    assert info["sha256"] == writer.sha256_file(str(tmp_path / "s1.tfrecord"))
    assert writer.shard_is_intact(str(tmp_path), info)
    with open(tmp_path / "s1.tfrecord", "r+b") as stream:
        stream.seek(20)
        stream.write(b"X")
    assert not writer.shard_is_intact(str(tmp_path), info)


def test_remove_stale_temporaries_touches_only_given_subjects(tmp_path):
    for name in (".s1.tfrecord.tmp-host-1", ".s10.tfrecord.tmp-host-2", "s1.tfrecord",
                 ".manifest.json.tmp-host-1"):
        (tmp_path / name).write_bytes(b"x")
    assert writer.remove_stale_temporaries(str(tmp_path), ["s1.tfrecord", "manifest.json"]) == [
        ".manifest.json.tmp-host-1", ".s1.tfrecord.tmp-host-1"]
    assert sorted(os.listdir(tmp_path)) == [".s10.tfrecord.tmp-host-2", "s1.tfrecord"]


def test_merge_manifests_needs_every_finished_part(tmp_path):
    part = {"fingerprint": "abc", "complete": True, "subjects": {"a": {"x": 1}},
            "skipped": {}, "shard_index": 0}
    writer.write_manifest(str(tmp_path / writer.manifest_name(2, 0)), part)
    assert writer.merge_manifests(str(tmp_path), 2, require_all=False) is None
    with pytest.raises(ValueError, match="manifest-00001-of-00002.json is missing"):
        writer.merge_manifests(str(tmp_path), 2)
    writer.write_manifest(str(tmp_path / writer.manifest_name(2, 1)),
                          {**part, "subjects": {"b": {}}, "skipped": {"c": "bad"}})
    merged = json.loads(open(writer.merge_manifests(str(tmp_path), 2)).read())
    assert list(merged["subjects"]) == ["a", "b"] and merged["skipped"] == {"c": "bad"}
    assert "shard_index" not in merged and merged["complete"]

# ----------------------------------------------------------------------------------- runner


def test_run_writes_shards_and_manifest(tmp_path):
    data = make_tiny(str(tmp_path / "data"), count=2, spacing=(1.5, 1.5, 5.0))
    dataset = TinyDataset(target_spacing_xy=(1.5, 1.5), crop_size_yx=(16, 16))
    out = str(tmp_path / "out")
    summary = run_preprocessing(dataset, data, out, NO_N4)
    assert summary.written == ("s0", "s1") and summary.num_examples == 8
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert manifest["fingerprint"] == fingerprint(dataset, {}, NO_N4)
    assert manifest["complete"] and manifest["skipped"] == {}
    assert manifest["class_names"] == list(dataset.class_names)
    entry = manifest["subjects"]["s1"]
    assert entry["num_examples"] == 4 and entry["shape_zyx"] == [4, 16, 16]
    assert entry["sha256"] == writer.sha256_file(os.path.join(out, "s1.tfrecord"))
    # The shard holds exactly what preprocess_volume gives, slice by slice.
    import tensorflow as tf
    records = [decode_example_numpy(r.numpy())
               for r in tf.data.TFRecordDataset(os.path.join(out, "s1.tfrecord"))]
    images, raw = phantom((4, 20, 18), seed=1, spacing_xyz=(1.5, 1.5, 5.0))
    meta = ImageMeta.from_dict(entry["original"])
    expected = preprocess_volume(images, [meta] * 2, raw, dataset, NO_N4)
    assert [r["index"] for r in records] == [0, 1, 2, 3]
    np.testing.assert_allclose(np.stack([r["image"] for r in records]), expected.image,
                               atol=1e-4)  # the NIfTI round trip stores float32 exactly
    labels = np.stack([r["label"] for r in records])
    restored = restore_geometry(labels, entry["geometry"], meta, False)
    mapped = transforms.remap_label(raw, dataset.raw_to_class())
    np.testing.assert_array_equal(restored[:, 2:18, 1:17], mapped[:, 2:18, 1:17])


def test_resume_skips_intact_redoes_corrupt_and_removes_temporaries(tmp_path):
    data = make_tiny(str(tmp_path / "data"), count=3)
    dataset = TinyDataset(crop_size_yx=(16, 16))
    out = str(tmp_path / "out")
    first = run_preprocessing(dataset, data, out, NO_N4)
    digests = {s: writer.sha256_file(os.path.join(out, f"{s}.tfrecord")) for s in first.written}
    again = run_preprocessing(dataset, data, out, NO_N4)
    assert again.written == () and again.already_done == ("s0", "s1", "s2")
    with open(os.path.join(out, "s1.tfrecord"), "r+b") as stream:
        stream.truncate(100)  # a damaged shard
    os.remove(os.path.join(out, "s2.tfrecord"))
    (tmp_path / "out" / ".s0.tfrecord.tmp-host-99").write_bytes(b"half")
    (tmp_path / "out" / ".manifest.json.tmp-host-99").write_bytes(b"{")
    third = run_preprocessing(dataset, data, out, NO_N4)
    assert third.written == ("s1", "s2") and third.already_done == ("s0",)
    assert sorted(os.listdir(out)) == ["manifest.json", "s0.tfrecord", "s1.tfrecord",
                                       "s2.tfrecord"]
    assert {s: writer.sha256_file(os.path.join(out, f"{s}.tfrecord")) for s in digests} == digests
    with pytest.raises(ValueError, match="other settings"):
        run_preprocessing(dataset, data, out, PreprocessConfig(n4=False, percentiles=(1, 99)))


def test_shards_over_machines_merge_to_the_single_run(tmp_path):
    data = make_tiny(str(tmp_path / "data"), count=3)
    dataset = TinyDataset(crop_size_yx=(16, 16))
    single, split = str(tmp_path / "single"), str(tmp_path / "split")
    run_preprocessing(dataset, data, single, NO_N4)
    first = run_preprocessing(dataset, data, split, NO_N4, num_shards=2, shard_index=0)
    assert first.written == ("s0", "s2")
    assert not os.path.exists(os.path.join(split, "manifest.json"))  # shard 1 not done yet
    second = run_preprocessing(dataset, data, split, NO_N4, num_shards=2, shard_index=1)
    assert second.written == ("s1",)
    merged = json.load(open(os.path.join(split, "manifest.json")))
    reference = json.load(open(os.path.join(single, "manifest.json")))
    assert merged["fingerprint"] == reference["fingerprint"]
    assert {s: e["sha256"] for s, e in merged["subjects"].items()} == {
        s: e["sha256"] for s, e in reference["subjects"].items()}


def test_3d_run_stores_volume_and_patch_corners(tmp_path):
    data = make_tiny(str(tmp_path / "data"), count=1, shape=(12, 20, 18), labeled=False)
    dataset = TinyDataset(spatial_dims=3, patch_size_zyx=(8, 8, 8), patch_stride_zyx=(4, 4, 4))
    out = str(tmp_path / "out")
    run_preprocessing(dataset, data, out, PreprocessConfig())  # with N4 (shrink 2)
    entry = json.load(open(os.path.join(out, "manifest.json")))["subjects"]["s0"]
    assert entry["intensity"]["n4"] and entry["num_examples"] == 1 and not entry["labeled"]
    import tensorflow as tf
    (record,) = [decode_example_numpy(r.numpy())
                 for r in tf.data.TFRecordDataset(os.path.join(out, "s0.tfrecord"))]
    assert record["image"].shape == (12, 20, 18, 2) and record["label"] is None
    assert len(record["patch_corners"]) == entry["num_patch_corners"] > 0


def _truncate(path):
    with open(path, "rb") as stream:
        payload = stream.read()
    with open(path, "wb") as stream:
        stream.write(payload[: len(payload) // 2])


def _shift_origin(path):
    image = sitk.ReadImage(path)
    image.SetOrigin((0.0, 3.0, 0.0))
    sitk.WriteImage(image, path)


def _edit_voxels(path, index, values):
    image = sitk.ReadImage(path)
    array = sitk.GetArrayFromImage(image)
    array[index] = values
    edited = sitk.GetImageFromArray(array)
    edited.CopyInformation(image)
    sitk.WriteImage(edited, path)


def _bad_label(path):
    _edit_voxels(path, (0, 0, slice(0, 3)), [7, 7, 99])


def _nan(path):
    _edit_voxels(path, (1, 5, 5), np.inf)


# ITK's NIfTI reader silently turns NaN/Inf into 0; tfseg.io scans the raw NIfTI data to catch
# them, MetaImage keeps them.
@pytest.mark.parametrize("damage, target, message", [
    (_truncate, "image_1.nii.gz", "truncated|gzip|incomplete|ended"),
    (os.remove, "image_1.nii.gz", "does not exist"),
    (_shift_origin, "label.nii.gz", "does not share the voxel grid"),
    (_bad_label, "label.nii.gz", r"holds values \[7, 99\]"),
    (_nan, "image_0.mha", "NaN or infinite"),
    (_nan, "image_0.nii.gz", "NaN or infinite"),
])
def test_bad_subject_is_skipped_with_a_reason(tmp_path, damage, target, message):
    extension = ".mha" if target.endswith(".mha") else ".nii.gz"
    data = make_tiny(str(tmp_path / "data"), count=2, extension=extension)
    path = os.path.join(data, "s1", target)
    damage(path)
    dataset = TinyDataset(crop_size_yx=(16, 16), extension=extension)
    out = str(tmp_path / "out")
    with pytest.raises(SubjectsSkippedError) as raised:
        run_preprocessing(dataset, data, out, NO_N4)
    reason = raised.value.summary.skipped["s1"]
    assert path in reason and re.search(message, reason), reason
    assert raised.value.summary.written == ("s0",)
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert list(manifest["subjects"]) == ["s0"] and list(manifest["skipped"]) == ["s1"]
    summary = run_preprocessing(dataset, data, out, NO_N4, allow_skips=True)
    assert summary.already_done == ("s0",) and list(summary.skipped) == ["s1"]


def test_worker_processes_run_simpleitk_single_threaded():
    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    try:
        runner._init_worker()  # pylint: disable=protected-access
        assert sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == 1
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before)


def test_empty_folder_fails_up_front(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="does not look like the tiny dataset"):
        run_preprocessing(TinyDataset(), str(tmp_path / "empty"), str(tmp_path / "out"), NO_N4)
    assert not (tmp_path / "out").exists()
