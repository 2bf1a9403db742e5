"""The embedded synthetic datasets: determinism, public layout, geometry, atomic generation and
that intensity alone does not solve them."""
import json
import os
import socket

import numpy as np
import pytest
import SimpleITK as sitk

from tfseg.datasets import _synthetic, get_dataset
from tfseg.datasets import synthetic_brain, synthetic_cardiac
from tfseg.datasets.acdc import make_dataset as make_acdc
from tfseg.datasets.iseg2017 import DATASET as ISEG

SMALL_CARDIAC = dict(num_training=2, num_testing=1)
SMALL_BRAIN = dict(num_training=2, num_testing=1)


def _read(path):
    image = sitk.ReadImage(path)
    return sitk.GetArrayFromImage(image), image.GetSpacing()


def _all_files(folder):
    return sorted(os.path.relpath(os.path.join(root, name), folder)
                  for root, _, names in os.walk(folder) for name in names)


@pytest.fixture(scope="module")
def cardiac_dir(tmp_path_factory):
    dataset = synthetic_cardiac.SyntheticCardiacDataset(**SMALL_CARDIAC)
    return dataset.prepare(str(tmp_path_factory.mktemp("cardiac") / "data"))


@pytest.fixture(scope="module")
def brain_dir(tmp_path_factory):
    dataset = synthetic_brain.SyntheticBrainDataset(**SMALL_BRAIN)
    return dataset.prepare(str(tmp_path_factory.mktemp("brain") / "data"))


def _oracle_dice(features, labels, num_classes, bins):
    """Per-class Dice of the best intensity-only classifier: every intensity bin (over all
    volumes, after percentile scaling) takes its majority class. Mean over volumes."""
    def scaled(volume):
        low, high = np.percentile(volume, (2, 98))
        v = (volume - low) / (high - low)
        return np.clip(((v + 0.25) * bins / 1.5).astype(int), 0, bins - 1)

    keys = [np.ravel_multi_index([scaled(c) for c in channels], (bins,) * len(channels))
            for channels in features]
    counts = np.zeros((bins ** len(features[0]), num_classes))
    for key, label in zip(keys, labels):
        np.add.at(counts, (key.ravel(), label.ravel()), 1)
    table = counts.argmax(axis=1)
    dice = []
    for key, label in zip(keys, labels):
        pred = table[key]
        dice.append([2 * np.sum((pred == c) & (label == c)) / max(np.sum(pred == c)
                                                                  + np.sum(label == c), 1)
                     for c in range(1, num_classes)])
    return np.mean(dice, axis=0)


# --- determinism -------------------------------------------------------------------------------

def test_cardiac_generation_is_byte_identical(cardiac_dir, tmp_path):
    synthetic_cardiac.generate(str(tmp_path), **SMALL_CARDIAC)
    files = [f for f in _all_files(cardiac_dir) if f != _synthetic.MARKER_NAME]
    assert files == _all_files(str(tmp_path))
    for name in files:
        with open(os.path.join(cardiac_dir, name), "rb") as a, \
                open(os.path.join(tmp_path, name), "rb") as b:
            assert a.read() == b.read(), name


def test_brain_generation_is_byte_identical_and_per_subject(brain_dir, tmp_path):
    # Subject 2 alone, in a dataset of another size, is the same subject: seeds are per subject.
    synthetic_brain.write_subject(str(tmp_path), 2, labeled=True)
    for kind in ("T1", "T2", "label"):
        for ext in (".hdr", ".img"):
            name = f"subject-2-{kind}{ext}"
            with open(os.path.join(brain_dir, "iSeg-2017-Training", name), "rb") as a, \
                    open(os.path.join(tmp_path, name), "rb") as b:
                assert a.read() == b.read(), name


# --- layout: the real readers read it ----------------------------------------------------------

def test_cardiac_layout_read_by_acdc_reader(cardiac_dir):
    subjects = make_acdc(phase="both").list_subjects(cardiac_dir)
    assert [s.subject_id for s in subjects] == [
        "patient001_ED", "patient001_ES", "patient002_ED", "patient002_ES",
        "patient003_ED", "patient003_ES"]
    assert [s.labeled for s in subjects] == [True] * 4 + [False] * 2
    assert not any(name.endswith("_gt.nii.gz")
                   for name in os.listdir(os.path.join(cardiac_dir, "testing", "patient003")))
    with open(os.path.join(cardiac_dir, "training", "patient001", "Info.cfg")) as f:
        keys = [line.split(":")[0] for line in f.read().splitlines()]
    assert keys == ["ED", "ES", "Group", "Height", "NbFrame", "Weight"]
    for subject in subjects:
        if subject.extra["phase"] == "ED":
            assert subject.extra["frame"] == 1
        else:
            assert subject.extra["frame"] > 1
        image, _ = _read(subject.image_paths[0])
        assert image.dtype == np.int16 and image.min() >= 0
        if subject.labeled:
            label, _ = _read(subject.label_path)
            assert label.shape == image.shape
            assert set(np.unique(label)) == {0, 1, 2, 3}
    # ED and ES differ: the LV cavity contracts.
    ed, es = (_read(s.label_path)[0] for s in subjects[:2])
    assert np.sum(es == 3) < 0.8 * np.sum(ed == 3)


def test_brain_layout_read_by_iseg_reader(brain_dir):
    subjects = ISEG.list_subjects(brain_dir)
    assert [s.subject_id for s in subjects] == ["subject-1", "subject-2", "subject-3"]
    assert [s.labeled for s in subjects] == [True, True, False]
    for subject in subjects:
        t1, spacing = _read(subject.image_paths[0])
        t2, _ = _read(subject.image_paths[1])
        assert t1.shape == t2.shape == tuple(reversed(synthetic_brain.SIZE_XYZ))
        assert spacing == (1.0, 1.0, 1.0)
        # Skull-stripped like iSEG: both modalities are zero on the same outside region.
        np.testing.assert_array_equal(t1 == 0, t2 == 0)
        if subject.labeled:
            label, _ = _read(subject.label_path)
            assert set(np.unique(label)) == {0, 10, 150, 250}
            assert np.all(label[t1 == 0] == 0)
    with open(subjects[0].image_paths[0], "rb") as f:
        header = f.read()
    assert len(header) == 348 and header[344:348] == b"\0\0\0\0"  # Analyze 7.5, not NIfTI


def test_datasets_are_registered_with_their_defaults():
    cardiac = get_dataset("synthetic_cardiac", phase="ED")
    assert (cardiac.name, cardiac.phase, cardiac.spatial_dims) == ("synthetic_cardiac", "ED", 2)
    assert cardiac.target_spacing_xy == (1.8, 1.8) and cardiac.crop_size_yx == (96, 96)
    assert cardiac.label_values == (0, 1, 2, 3)
    brain = get_dataset("synthetic_brain")
    assert brain.raw_to_class() == {0: 0, 10: 1, 150: 2, 250: 3}
    assert brain.patch_size_zyx == (32, 32, 32) and brain.patch_stride_zyx == (8, 8, 8)
    assert min(synthetic_brain.SIZE_XYZ) >= 48
    assert brain.published_splits["fewshot_n1"] == {
        "labeled": ["subject-1"], "val": ["subject-2"],
        "test": [f"subject-{n}" for n in range(3, 10)],
        "unlabeled": [f"subject-{n}" for n in range(11, 17)]}
    split = cardiac.published_splits[cardiac.default_split]
    training = [f"patient{n:03d}" for n in range(1, synthetic_cardiac.NUM_TRAINING + 1)]
    assert set(split["labeled"] + split["val"] + split["test"]) <= set(training)
    # Validation on 8 patients covering every group (2 made checkpoint selection a coin toss).
    assert len(split["val"]) == 8
    assert {synthetic_cardiac.GROUPS[(int(p[-3:]) - 1) % 5] for p in split["val"]} == set(
        synthetic_cardiac.GROUPS)
    assert set(split["unlabeled"]).isdisjoint(split["val"] + split["test"] + split["labeled"])


# --- geometry -----------------------------------------------------------------------------------

def test_cardiac_spacing_varies_and_heart_fits_the_default_crop(cardiac_dir):
    dataset = synthetic_cardiac.SyntheticCardiacDataset()
    crop_half_mm = np.array(dataset.crop_size_yx) * np.array(dataset.target_spacing_xy) / 2
    spacings = set()
    for subject in make_acdc(phase="both").list_subjects(cardiac_dir):
        if not subject.labeled:
            continue
        label, spacing = _read(subject.label_path)
        spacings.add(spacing)
        assert 1.5 <= spacing[0] == spacing[1] <= 1.8 and 8.0 <= spacing[2] <= 10.0
        assert 128 <= label.shape[1] <= 160 and 128 <= label.shape[2] <= 160
        _, rows, cols = np.nonzero(label)
        centre = (np.array(label.shape[1:]) - 1) / 2
        # Farthest labeled voxel edge from the image centre, in mm, per axis (y, x).
        reach = np.array([np.abs(rows - centre[0]).max(), np.abs(cols - centre[1]).max()])
        reach = (reach + 0.5) * spacing[0]
        assert np.all(reach < crop_half_mm - 10.0), (subject.subject_id, reach)
    assert len(spacings) == 2  # two patients, two geometries


@pytest.mark.slow
def test_every_default_cardiac_patient_fits_the_default_crop():
    crop_half_mm = 96 * 1.8 / 2
    for number in range(1, synthetic_cardiac.NUM_TRAINING + synthetic_cardiac.NUM_TESTING + 1):
        rng = _synthetic.subject_rng(synthetic_cardiac._SEED, number)
        params = synthetic_cardiac.draw_patient(
            rng, synthetic_cardiac.GROUPS[(number - 1) % len(synthetic_cardiac.GROUPS)])
        for _, label in synthetic_cardiac.render_patient(rng, params).values():
            _, rows, cols = np.nonzero(label)
            centre = (np.array(label.shape[1:]) - 1) / 2
            reach = (max(np.abs(rows - centre[0]).max(), np.abs(cols - centre[1]).max()) + 0.5)
            assert reach * params["spacing_xy"] < crop_half_mm - 10.0, number


# --- prepare(): atomic, idempotent, resumable ---------------------------------------------------

def test_prepare_is_idempotent_and_writes_a_marker(cardiac_dir, monkeypatch):
    with open(os.path.join(cardiac_dir, _synthetic.MARKER_NAME)) as f:
        marker = json.load(f)
    assert marker["version"] == synthetic_cardiac.GENERATOR_VERSION
    assert marker["counts"] == {"training": 2, "testing": 1}
    assert len(marker["files"]) == 2 * 5 + 3  # Info.cfg + 2 frames + 2 gt; testing: no gt

    def fail(*args, **kwargs):
        raise AssertionError("a complete folder must not be regenerated")

    monkeypatch.setattr(synthetic_cardiac.SyntheticCardiacDataset, "generate_files",
                        staticmethod(fail))
    dataset = synthetic_cardiac.SyntheticCardiacDataset(**SMALL_CARDIAC)
    assert dataset.prepare(cardiac_dir) == cardiac_dir


def test_prepare_regenerates_an_old_or_damaged_generation(tmp_path):
    dataset = synthetic_cardiac.SyntheticCardiacDataset(num_training=1, num_testing=0)
    folder = dataset.prepare(str(tmp_path / "data"))
    marker_path = os.path.join(folder, _synthetic.MARKER_NAME)
    with open(marker_path, encoding="utf-8") as f:
        marker = json.load(f)
    marker["version"] = 0
    with open(marker_path, "w", encoding="utf-8") as f:
        json.dump(marker, f)
    image = os.path.join(folder, "training", "patient001", "patient001_frame01.nii.gz")
    with open(image, "wb") as f:
        f.write(b"truncated")
    assert dataset.prepare(folder) == folder
    assert _synthetic.is_complete(folder, "tfseg.datasets.synthetic_cardiac",
                                  synthetic_cardiac.GENERATOR_VERSION, {"training": 1,
                                                                        "testing": 0})
    assert _read(image)[0].shape[0] >= 8
    assert sorted(os.listdir(tmp_path)) == ["data"]  # no temporary or old folder left


def test_prepare_resumes_after_an_interrupted_generation(tmp_path, monkeypatch):
    dataset = synthetic_cardiac.SyntheticCardiacDataset(num_training=1, num_testing=0)
    # 1. A crash mid-generation leaves neither the target nor a temporary folder behind.
    def crash(folder, *args):
        synthetic_cardiac.write_patient(os.path.join(folder), 1, labeled=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic_cardiac.SyntheticCardiacDataset, "generate_files",
                        staticmethod(crash))
    with pytest.raises(KeyboardInterrupt):
        dataset.prepare(str(tmp_path / "data"))
    assert os.listdir(tmp_path) == []
    # 2. A killed process (no cleanup) leaves its temporary folder: the next run removes it.
    dead_pid = 2**22 + 12345  # above the default pid_max: never a live process
    stale = tmp_path / f".data.tmp-{socket.gethostname()}-{dead_pid}-deadbeef"
    (stale / "training").mkdir(parents=True)
    (stale / "training" / "half-written.nii.gz").write_bytes(b"\x1f\x8b")
    monkeypatch.undo()
    folder = dataset.prepare(str(tmp_path / "data"))
    assert sorted(os.listdir(tmp_path)) == ["data"]
    assert sorted(os.listdir(os.path.join(folder, "training"))) == ["patient001"]


def test_prepare_refuses_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "training").mkdir()
    (tmp_path / "training" / "mine.nii.gz").write_bytes(b"user data")
    with pytest.raises(ValueError, match=r"not empty and holds no \.tfseg_synthetic\.json"):
        synthetic_brain.SyntheticBrainDataset(**SMALL_BRAIN).prepare(str(tmp_path))
    assert (tmp_path / "training" / "mine.nii.gz").read_bytes() == b"user data"


def test_prepare_defaults_to_the_cache_under_home_at_call_time(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    folder = synthetic_cardiac.SyntheticCardiacDataset(num_training=1, num_testing=0).prepare(None)
    assert folder == str(tmp_path / ".cache" / "tfseg" / "synthetic_cardiac")
    assert os.path.isfile(os.path.join(folder, _synthetic.MARKER_NAME))


def test_bad_counts_are_rejected():
    with pytest.raises(ValueError, match="num_training >= 1"):
        synthetic_brain.SyntheticBrainDataset(num_training=0)
    with pytest.raises(ValueError, match="Unknown ACDC phase"):
        synthetic_cardiac.make_dataset(phase="systole")


# --- not trivial --------------------------------------------------------------------------------

def test_intensity_alone_does_not_segment_the_heart(cardiac_dir):
    features, labels = [], []
    for subject in make_acdc(phase="both").list_subjects(cardiac_dir):
        if subject.labeled:
            features.append([_read(subject.image_paths[0])[0].astype(np.float32)])
            labels.append(_read(subject.label_path)[0])
    dice = _oracle_dice(features, labels, num_classes=4, bins=128)  # RV, Myo, LV
    assert dice.mean() < 0.3, dice


def test_intensity_alone_does_not_segment_the_brain(brain_dir):
    features, labels = [], []
    for subject in ISEG.list_subjects(brain_dir):
        if subject.labeled:
            features.append([_read(p)[0].astype(np.float32) for p in subject.image_paths])
            labels.append(np.searchsorted([0, 10, 150, 250], _read(subject.label_path)[0]))
    dice = _oracle_dice(features, labels, num_classes=4, bins=64)  # CSF, GM, WM
    assert dice.mean() < 0.8 and dice[2] < 0.75, dice
    assert dice.min() > 0.3, dice  # ...but the contrast is there: CSF, GM and WM are seen


# --- building blocks ----------------------------------------------------------------------------

def test_soft_inside_is_the_exact_partial_volume_of_a_flat_edge():
    np.testing.assert_allclose(
        _synthetic.soft_inside(np.array([-1.0, -0.25, 0.0, 0.25, 1.0]), voxel_mm=1.0),
        [0.0, 0.25, 0.5, 0.75, 1.0])


def test_composite_fractions_sum_to_one_and_follow_painter_order():
    top = np.array([1.0, 0.5, 0.0], np.float32)
    bottom = np.array([1.0, 1.0, 0.25], np.float32)
    image, fractions = _synthetic.composite([(top, 2.0, 1), (bottom, 4.0, 2)], num_classes=3)
    np.testing.assert_allclose(fractions.sum(axis=0), 1.0)
    np.testing.assert_allclose(fractions[1], [1.0, 0.5, 0.0])
    np.testing.assert_allclose(fractions[2], [0.0, 0.5, 0.25])
    np.testing.assert_allclose(image, [2.0, 3.0, 1.0])
    np.testing.assert_array_equal(_synthetic.majority_label(fractions), [1, 1, 0])


def test_rician_noise_has_the_rician_mean():
    rng = np.random.default_rng(0)
    # Zero signal: magnitude of complex Gaussian noise is Rayleigh, mean sigma * sqrt(pi / 2).
    noise = _synthetic.rician_noise(rng, np.zeros(200_000, np.float32), sigma=2.0)
    assert noise.min() >= 0 and abs(noise.mean() - 2.0 * np.sqrt(np.pi / 2)) < 0.02
