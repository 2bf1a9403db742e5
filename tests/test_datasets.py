"""Real-dataset modules: listing subjects from tiny fake copies of each public layout."""
import json
import os

import numpy as np
import pytest

from tfseg.datasets import acdc, folder, get_dataset, iseg2017, mrbrains13, msd_pancreas
from tfseg.datasets import msd_prostate
from tfseg.datasets.base import Dataset
from tfseg.io import ImageMeta, read_channels, read_label, write_image

INFO_CFG = "ED: 1\nES: 12\nGroup: DCM\nHeight: 184.0\nNbFrame: 30\nWeight: 95.0\n"


def _image(path, shape_zyx=(3, 8, 10), spacing_xyz=(1.0, 1.0, 1.0), channels=1, value=0.0,
           dtype=np.float32):
    """Writes a tiny constant image (the listing never reads voxels, but the files are real)."""
    meta = ImageMeta(spacing_xyz, (0.0,) * 3, (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0),
                     tuple(reversed(shape_zyx)), channels)
    shape = shape_zyx + ((channels,) if channels > 1 else ())
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_image(np.full(shape, value, dtype), meta, str(path))


def _ids(subjects):
    return [s.subject_id for s in subjects]


# ----------------------------------------------------------------------------------------- ACDC


def _acdc_patient(part_dir, number, info=INFO_CFG, gt=True, frames=(1, 12)):
    patient = f"patient{number:03d}"
    patient_dir = part_dir / patient
    patient_dir.mkdir(parents=True)
    (patient_dir / "Info.cfg").write_text(info)
    for frame in frames:
        _image(patient_dir / f"{patient}_frame{frame:02d}.nii.gz")
        if gt:
            _image(patient_dir / f"{patient}_frame{frame:02d}_gt.nii.gz", dtype=np.uint8)
    return patient_dir


@pytest.fixture
def acdc_dir(tmp_path):
    _acdc_patient(tmp_path / "training", 1)
    _acdc_patient(tmp_path / "training", 2, info=INFO_CFG.replace("ES: 12", "ES: 9")
                  .replace("DCM", "NOR"), frames=(1, 9))
    _acdc_patient(tmp_path / "testing", 101, gt=False)
    _acdc_patient(tmp_path / "testing", 102)
    return tmp_path


def test_acdc_es_subjects(acdc_dir):
    subjects = acdc.make_dataset().list_subjects(str(acdc_dir))
    assert _ids(subjects) == ["patient001_ES", "patient002_ES", "patient101_ES", "patient102_ES"]
    first = subjects[0]
    assert first.patient_id == "patient001"
    assert first.image_paths == (str(acdc_dir / "training/patient001/patient001_frame12.nii.gz"),)
    assert first.label_path == str(acdc_dir / "training/patient001/patient001_frame12_gt.nii.gz")
    assert dict(first.extra) == {"phase": "ES", "frame": 12, "group": "DCM"}
    assert subjects[1].extra["frame"] == 9 and subjects[1].extra["group"] == "NOR"
    # Testing patients are labeled only when their gt exists.
    assert [s.labeled for s in subjects] == [True, True, False, True]
    # The listed files are real images.
    assert read_label(first.label_path)[0].shape == (3, 8, 10)


def test_acdc_phase_option(acdc_dir):
    ed = acdc.make_dataset(phase="ED").list_subjects(str(acdc_dir))
    assert _ids(ed)[0] == "patient001_ED" and ed[0].image_paths[0].endswith("frame01.nii.gz")
    both = get_dataset("acdc", phase="both").list_subjects(str(acdc_dir))
    assert _ids(both)[:4] == ["patient001_ED", "patient001_ES", "patient002_ED", "patient002_ES"]
    assert {s.patient_id for s in both[:2]} == {"patient001"}
    assert acdc.make_dataset(phase="both").options() == {"phase": "both"}
    # The call-time option overrides the dataset's phase.
    assert _ids(acdc.make_dataset().list_subjects(str(acdc_dir), phase="ED"))[0] == "patient001_ED"
    with pytest.raises(ValueError, match="Unknown ACDC phase 'EF'"):
        acdc.make_dataset(phase="EF")
    with pytest.raises(ValueError, match=r"unknown options \['slices'\]"):
        acdc.make_dataset().list_subjects(str(acdc_dir), slices=3)


def test_acdc_alternative_roots(acdc_dir, tmp_path_factory):
    # --data_dir pointing at training/ itself.
    assert _ids(acdc.make_dataset().list_subjects(str(acdc_dir / "training"))) == [
        "patient001_ES", "patient002_ES"]
    # The re-release nests the folders under database/.
    nested = tmp_path_factory.mktemp("acdc_release")
    _acdc_patient(nested / "database" / "training", 5)
    assert _ids(acdc.make_dataset().list_subjects(str(nested))) == ["patient005_ES"]


def test_acdc_missing_files_are_listed_with_expected_paths(tmp_path):
    patient_dir = _acdc_patient(tmp_path / "training", 3, frames=(1,))  # no frame12 files
    (subject,) = acdc.make_dataset().list_subjects(str(tmp_path))
    assert subject.image_paths == (str(patient_dir / "patient003_frame12.nii.gz"),)
    assert subject.label_path == str(patient_dir / "patient003_frame12_gt.nii.gz")
    assert not os.path.exists(subject.image_paths[0])


def test_acdc_bad_info_cfg(tmp_path):
    _acdc_patient(tmp_path / "training", 4, info="ED: 1\nGroup: DCM\n")
    with pytest.raises(ValueError, match="no valid 'ES: <frame number>' line") as info:
        acdc.make_dataset().list_subjects(str(tmp_path))
    assert str(tmp_path / "training/patient004/Info.cfg") in str(info.value)
    os.remove(tmp_path / "training/patient004/Info.cfg")
    with pytest.raises(ValueError, match="Missing .*patient004/Info.cfg"):
        acdc.make_dataset().list_subjects(str(tmp_path))


def test_acdc_facts_and_published_splits():
    dataset = acdc.make_dataset()
    assert dataset.phase == "ES" and dataset.spatial_dims == 2
    assert dataset.class_names == ("background", "rv", "myocardium", "lv")
    assert dataset.raw_to_class() == {0: 0, 1: 1, 2: 2, 3: 3}
    assert dataset.target_spacing_xy == (1.367516, 1.367516) and dataset.crop_size_yx == (224, 224)
    splits = dataset.published_splits
    assert sorted(splits) == sorted([f"tr{n}_c{c}" for n in (1, 3) for c in range(1, 6)])
    assert splits["tr1_c1"]["labeled"] == ["patient002"]
    assert splits["tr1_c4"]["labeled"] == ["patient062"]
    assert splits["tr1_c5"]["labeled"] == ["patient095"]
    assert splits["tr3_c2"]["labeled"] == ["patient042", "patient062", "patient082"]
    assert splits["tr3_c5"]["labeled"] == ["patient002", "patient042", "patient095"]
    split = splits["tr3_c3"]
    assert split["val"] == ["patient011", "patient071"]
    assert len(split["unlabeled"]) == 25 and split["unlabeled"][:2] == ["patient016", "patient017"]
    assert "patient080" in split["unlabeled"] and "patient081" not in split["unlabeled"]
    assert len(split["test"]) == 20 and split["test"][0] == "patient007"
    assert split["test"][-1] == "patient090"
    for split in splits.values():  # no patient in two roles
        groups = [set(split[k]) for k in ("labeled", "unlabeled", "val", "test")]
        assert sum(map(len, groups)) == len(set().union(*groups))


# -------------------------------------------------------------------------------------- iSEG


def _iseg_subject(part_dir, number, label=True):
    for kind in ("T1", "T2") + (("label",) if label else ()):
        _image(part_dir / f"subject-{number}-{kind}.hdr", dtype=np.uint8 if kind == "label"
               else np.float32)


@pytest.fixture
def iseg_dir(tmp_path):
    for number in (1, 2, 10):
        _iseg_subject(tmp_path / "iSeg-2017-Training", number)
    _iseg_subject(tmp_path / "iSeg-2017-Testing", 11, label=False)
    return tmp_path


def test_iseg_subjects(iseg_dir):
    subjects = iseg2017.DATASET.list_subjects(str(iseg_dir))
    assert _ids(subjects) == ["subject-1", "subject-2", "subject-10", "subject-11"]
    assert [s.labeled for s in subjects] == [True, True, True, False]
    training = iseg_dir / "iSeg-2017-Training"
    assert subjects[0].image_paths == (str(training / "subject-1-T1.hdr"),
                                       str(training / "subject-1-T2.hdr"))
    assert subjects[0].label_path == str(training / "subject-1-label.hdr")
    assert subjects[0].patient_id == "subject-1"
    # Either folder alone is accepted.
    direct = iseg2017.DATASET.list_subjects(str(iseg_dir / "iSeg-2017-Testing"))
    assert _ids(direct) == ["subject-11"] and not direct[0].labeled


def test_iseg_missing_modality_is_listed(iseg_dir):
    training = iseg_dir / "iSeg-2017-Training"
    for ext in (".hdr", ".img"):
        os.remove(training / f"subject-2-T2{ext}")
        os.remove(training / f"subject-2-label{ext}")
    subject = iseg2017.DATASET.list_subjects(str(iseg_dir))[1]
    assert subject.image_paths[1] == str(training / "subject-2-T2.hdr")
    assert subject.label_path == str(training / "subject-2-label.hdr")  # still expected


def test_iseg_facts_and_published_splits():
    dataset = get_dataset("iseg2017")
    assert dataset.raw_to_class() == {0: 0, 10: 1, 150: 2, 250: 3}
    assert dataset.modalities == ("T1", "T2") and dataset.spatial_dims == 3
    assert dataset.patch_size_zyx == (32, 32, 32) and dataset.patch_stride_zyx == (8, 8, 8)
    assert dataset.min_foreground_fraction == pytest.approx(6000 / 32768)
    assert not dataset.orientation_reliable and dataset.n4_shrink == 4
    one = dataset.published_splits["fewshot_n1"]
    assert one["labeled"] == ["subject-1"] and one["val"] == ["subject-2"]
    assert one["test"] == [f"subject-{n}" for n in range(3, 10)]
    assert one["unlabeled"] == [f"subject-{n}" for n in range(11, 24)]
    two = dataset.published_splits["fewshot_n2"]
    assert two["labeled"] == ["subject-1", "subject-2"] and two["val"] == ["subject-3"]
    assert two["test"] == [f"subject-{n}" for n in range(4, 11)]


# --------------------------------------------------------------------------------- MRBrainS13


def test_mrbrains_subjects_mixed_formats(tmp_path):
    for stem in ("T1", "T1_IR", "T2_FLAIR", "T1_1mm", "LabelsForTesting"):
        _image(tmp_path / "TrainingData/1" / f"{stem}.nii")
    for stem in ("T1", "T2_FLAIR", "LabelsForTesting"):  # T1_IR missing
        _image(tmp_path / "TrainingData/2" / f"{stem}.mhd")
    for stem in ("T1", "T1_IR", "T2_FLAIR"):
        _image(tmp_path / "TestData/1" / f"{stem}.nii")
    subjects = mrbrains13.DATASET.list_subjects(str(tmp_path))
    assert _ids(subjects) == ["train-1", "train-2", "test-1"]
    assert [s.labeled for s in subjects] == [True, True, False]
    assert subjects[0].image_paths == tuple(str(tmp_path / "TrainingData/1" / f"{m}.nii")
                                            for m in ("T1", "T1_IR", "T2_FLAIR"))
    assert subjects[0].label_path == str(tmp_path / "TrainingData/1/LabelsForTesting.nii")
    # The missing scan is expected with its siblings' extension.
    assert subjects[1].image_paths[1] == str(tmp_path / "TrainingData/2/T1_IR.mhd")
    dataset = get_dataset("mrbrains13")
    assert dataset.raw_to_class() == {0: 0, 1: 1, 2: 2, 3: 3} and not dataset.n4_default
    split = dataset.published_splits["fewshot"]
    assert split["labeled"] == ["train-1"] and split["val"] == ["train-2"]
    assert split["test"] == ["train-3", "train-4", "train-5"]
    assert split["unlabeled"][0] == "test-1" and len(split["unlabeled"]) == 15


# -------------------------------------------------------------------------------------- MSD


@pytest.fixture
def prostate_dir(tmp_path):
    task = tmp_path / "Task05_Prostate"
    (task / "dataset.json").parent.mkdir(parents=True)
    (task / "dataset.json").write_text(json.dumps({"name": "PROSTATE"}))
    _image(task / "imagesTr/prostate_00.nii.gz", channels=2)
    _image(task / "imagesTr/prostate_02.nii.gz", channels=2)
    (task / "imagesTr/._prostate_00.nii.gz").write_bytes(b"\0\5\26\7AppleDouble")
    _image(task / "labelsTr/prostate_00.nii.gz", dtype=np.uint8)
    _image(task / "imagesTs/prostate_03.nii.gz", channels=2)
    return tmp_path


def test_msd_prostate_subjects_and_channels(prostate_dir):
    task = prostate_dir / "Task05_Prostate"
    for data_dir in (prostate_dir, task):  # parent or the task folder
        subjects = msd_prostate.make_dataset().list_subjects(str(data_dir))
        assert _ids(subjects) == ["prostate_00", "prostate_02", "prostate_03"]
    assert [s.labeled for s in subjects] == [True, True, False]
    assert subjects[1].label_path == str(task / "labelsTr/prostate_02.nii.gz")  # missing: listed
    assert subjects[0].channel_indices == (0,)
    assert subjects[0].image_paths == (str(task / "imagesTr/prostate_00.nii.gz"),)
    both = get_dataset("msd_prostate", use_adc=True)
    assert both.modalities == ("T2", "ADC") and both.options() == {"use_adc": True}
    subject = both.list_subjects(str(prostate_dir))[0]
    assert subject.channel_indices == (0, 1) and len(set(subject.image_paths)) == 1
    channels = read_channels(subject.image_paths, subject.channel_indices)
    assert [array.shape for array, _ in channels] == [(3, 8, 10), (3, 8, 10)]
    facts = msd_prostate.make_dataset()
    assert facts.class_names == ("background", "pz", "tz") and facts.spatial_dims == 2
    assert facts.target_spacing_xy == (0.6, 0.6) and facts.crop_size_yx == (224, 224)


def test_msd_pancreas_subjects_and_merged_labels(tmp_path):
    task = tmp_path / "Task07_Pancreas"
    _image(task / "imagesTr/pancreas_001.nii.gz", dtype=np.int16)
    _image(task / "labelsTr/pancreas_001.nii.gz", dtype=np.uint8)
    _image(task / "imagesTs/pancreas_010.nii.gz", dtype=np.int16)
    subjects = get_dataset("msd_pancreas").list_subjects(str(tmp_path))
    assert _ids(subjects) == ["pancreas_001", "pancreas_010"]
    assert subjects[0].channel_indices is None and not subjects[1].labeled
    dataset = msd_pancreas.DATASET
    assert dataset.raw_to_class() == {0: 0, 1: 1, 2: 1} and dataset.label_values == (0, 1)
    assert dataset.intensity_window == (-100.0, 240.0) and not dataset.n4_default
    assert dataset.target_spacing_xy == (0.8, 0.8) and dataset.crop_size_yx == (320, 320)
    # A prostate folder is not a pancreas folder.
    _image(tmp_path / "other/Task05_Prostate/imagesTr/prostate_00.nii.gz")
    with pytest.raises(ValueError, match="imagesTr/ holds no pancreas_NN.nii.gz") as info:
        dataset.list_subjects(str(tmp_path / "other/Task05_Prostate"))
    assert str(tmp_path / "other/Task05_Prostate") in str(info.value)


# ------------------------------------------------------------------------------------ folder


def _folder_layout(root, dataset_json):
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps(dataset_json))
    # case_a: spacing (1, 2) mm, 10 × 8 voxels in-plane; case_b: (3, 2) mm, 20 × 8 voxels.
    _image(root / "imagesTr/case_a_0000.nii.gz", (3, 8, 10), (1.0, 2.0, 5.0))
    _image(root / "imagesTr/case_a_0001.nii.gz", (3, 8, 10), (1.0, 2.0, 5.0))
    _image(root / "labelsTr/case_a.nii.gz", (3, 8, 10), (1.0, 2.0, 5.0), dtype=np.uint8)
    _image(root / "imagesTr/case_b_0000.nii.gz", (3, 8, 20), (3.0, 2.0, 5.0))  # no _0001
    _image(root / "labelsTr/case_b.nii.gz", (3, 8, 20), (3.0, 2.0, 5.0), dtype=np.uint8)
    _image(root / "imagesUnl/case_c_0000.nii.gz")
    _image(root / "imagesUnl/case_c_0001.nii.gz")
    _image(root / "imagesTs/case_d_0000.nii.gz")
    _image(root / "imagesTs/case_d_0001.nii.gz")


NNUNET_JSON = {"channel_names": {"0": "T2", "1": "ADC"},
               "labels": {"background": 0, "tz": 2, "pz": 1}, "numTraining": 2,
               "file_ending": ".nii.gz"}


def test_folder_subjects(tmp_path):
    _folder_layout(tmp_path, NNUNET_JSON)
    subjects = folder.make_dataset().list_subjects(str(tmp_path))
    assert _ids(subjects) == ["case_a", "case_b", "case_d", "case_c"]  # Tr, then Ts, then Unl
    assert [s.labeled for s in subjects] == [True, True, False, False]
    assert subjects[1].image_paths == (str(tmp_path / "imagesTr/case_b_0000.nii.gz"),
                                       str(tmp_path / "imagesTr/case_b_0001.nii.gz"))  # expected
    assert subjects[0].label_path == str(tmp_path / "labelsTr/case_a.nii.gz")
    assert subjects[3].extra["source"] == "imagesUnl"


def test_folder_resolve_reads_facts_and_default_geometry(tmp_path):
    _folder_layout(tmp_path, NNUNET_JSON)
    unresolved = get_dataset("folder")
    assert unresolved.modalities == () and unresolved.spatial_dims == 2
    dataset = unresolved.resolve(str(tmp_path))
    assert dataset.modalities == ("T2", "ADC")
    assert dataset.class_names == ("background", "pz", "tz") and dataset.label_values == (0, 1, 2)
    assert dataset.n4_default
    # Median spacing of (1, 2) and (3, 2) is (2, 2); median extent x = (10 + 60) / 2 = 35 mm,
    # y = 16 mm -> 17.5 and 8 pixels at 2 mm -> rounded up to 16: crop (rows, cols) = (16, 32).
    assert dataset.target_spacing_xy == (2.0, 2.0)
    assert dataset.crop_size_yx == (16, 32)
    assert dataset.options()["target_spacing_xy"] == [2.0, 2.0]
    # Explicit options win; a 3D folder needs no plane geometry.
    fixed = folder.make_dataset(target_spacing_xy=(0.5, 0.5), crop_size_yx=(64, 64))
    assert fixed.resolve(str(tmp_path)).crop_size_yx == (64, 64)
    three = folder.make_dataset(spatial_dims=3).resolve(str(tmp_path))
    assert three.patch_size_zyx == (32, 32, 32) and three.target_spacing_xy is None


def test_folder_v1_json_and_ct(tmp_path):
    _folder_layout(tmp_path, {"modality": {"0": "CT", "1": "CT"},
                              "labels": {"0": "background", "1": "liver"}})
    dataset = folder.make_dataset(intensity_window=(-100, 200)).resolve(str(tmp_path))
    assert dataset.modalities == ("CT", "CT") and dataset.class_names == ("background", "liver")
    assert not dataset.n4_default and dataset.intensity_window == (-100.0, 200.0)


def test_folder_errors(tmp_path):
    _folder_layout(tmp_path / "dup", NNUNET_JSON)
    _image(tmp_path / "dup/imagesTs/case_a_0000.nii.gz")
    with pytest.raises(ValueError, match="Case 'case_a' is in both imagesTr/ and imagesTs/"):
        folder.make_dataset().list_subjects(str(tmp_path / "dup"))
    _folder_layout(tmp_path / "bad_name", NNUNET_JSON)
    _image(tmp_path / "bad_name/imagesTr/case_e.nii.gz")
    with pytest.raises(ValueError, match=r"case_e.nii.gz is not named \{case\}_\{XXXX\}"):
        folder.make_dataset().list_subjects(str(tmp_path / "bad_name"))
    _folder_layout(tmp_path / "extra_channel", NNUNET_JSON)
    _image(tmp_path / "extra_channel/imagesTr/case_a_0002.nii.gz")
    with pytest.raises(ValueError, match="channel 0002 is not declared"):
        folder.make_dataset().list_subjects(str(tmp_path / "extra_channel"))
    regions = dict(NNUNET_JSON, labels={"background": 0, "whole": [1, 2]})
    _folder_layout(tmp_path / "regions", regions)
    with pytest.raises(ValueError, match="region-based labels"):
        folder.make_dataset().resolve(str(tmp_path / "regions"))
    (tmp_path / "no_json").mkdir()
    _image(tmp_path / "no_json/imagesTr/case_a_0000.nii.gz")
    with pytest.raises(ValueError, match="dataset.json is missing") as info:
        folder.make_dataset().resolve(str(tmp_path / "no_json"))
    assert str(tmp_path / "no_json") in str(info.value)
    with pytest.raises(ValueError, match="patch_size_zyx do not apply to spatial_dims=2"):
        folder.make_dataset(patch_size_zyx=(16, 16, 16))
    with pytest.raises(ValueError, match="spatial_dims must be 2 or 3"):
        get_dataset("folder", spatial_dims=4)


# --------------------------------------------------------------------------- common behaviour

ALL_REAL = [acdc.make_dataset(), iseg2017.DATASET, mrbrains13.DATASET, msd_prostate.make_dataset(),
            msd_pancreas.DATASET, folder.make_dataset()]


@pytest.mark.parametrize("dataset", ALL_REAL, ids=lambda d: d.name)
def test_empty_folder_is_an_error_naming_it(tmp_path, dataset):
    with pytest.raises(ValueError, match="the folder is empty") as info:
        dataset.list_subjects(str(tmp_path))
    message = str(info.value)
    assert str(tmp_path) in message and "expected" in message and "--data_dir" in message
    with pytest.raises(ValueError, match="does not exist"):
        dataset.list_subjects(str(tmp_path / "nowhere"))


@pytest.mark.parametrize("dataset", ALL_REAL, ids=lambda d: d.name)
def test_wrong_layout_is_an_error_naming_it(tmp_path, dataset):
    # Another dataset's layout (MRBrainS13's for all but MRBrainS13, which gets ACDC's).
    if dataset.name == "mrbrains13":
        _acdc_patient(tmp_path / "training", 1, frames=(1,))
    else:
        _image(tmp_path / "TrainingData/1/T1.nii")
    with pytest.raises(ValueError, match=f"does not look like the {dataset.name} dataset") as info:
        dataset.list_subjects(str(tmp_path))
    assert str(tmp_path) in str(info.value)


def test_get_dataset_unknown_name_lists_available():
    with pytest.raises(ValueError, match="Unknown dataset 'acdcx'. Available: .*acdc.*folder"):
        get_dataset("acdcx")
    with pytest.raises(ValueError, match="takes no options"):
        get_dataset("iseg2017", phase="ES")


def test_resolve_default_returns_the_dataset_itself(tmp_path):
    assert acdc.make_dataset().resolve(str(tmp_path)) == acdc.make_dataset()
    assert Dataset.resolve(iseg2017.DATASET, "anywhere") is iseg2017.DATASET
