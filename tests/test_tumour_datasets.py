"""The tumour datasets read as downloaded: BraTS 2013/2015 (.mha) and 2017-2021 (NIfTI) with
release detection, slice protocols and bad-input messages; KiTS19 with its slice-first axis order.

Every layout is a tiny fake download written in the exact public naming.
"""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest

from preprocessing import PreprocessConfig, preprocess_volume, restore_geometry
from preprocessing.runner import SubjectsSkippedError, read_subject, run_preprocessing
from tfseg.datasets import brats, get_dataset, kits19
from tfseg.io import ImageMeta, read_label, write_image

SHAPE = (3, 16, 16)                      # (z, y, x)
NO_N4 = PreprocessConfig(n4=False, target_spacing_xy=(1.0, 1.0), crop_size_yx=(16, 16))
VSD_IDS = {"Flair": 54512, "T1": 54513, "T1c": 54514, "T2": 54515}


def _meta(shape_zyx=SHAPE, spacing_xyz=(1.0, 1.0, 1.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)):
    return ImageMeta(spacing_xyz=tuple(map(float, spacing_xyz)), origin_xyz=(0.0, 0.0, 0.0),
                     direction=tuple(map(float, direction)), size_xyz=tuple(reversed(shape_zyx)))


def _tumour_label(values=(2, 3, 1, 4)):
    """Nested discs: outer value, then ring, centre, and a 1-voxel-wide inner ring."""
    _, yy, xx = np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij")
    r = np.hypot(yy - 8, xx - 8)
    label = np.zeros(SHAPE, np.int16)
    for value, radius in zip(values, (6, 4.5, 3, 1.5)):
        label[r < radius] = value
    return label


def _image(label, modality_index):
    rng = np.random.default_rng(modality_index)
    return (100.0 + 20.0 * (modality_index + 1) * label + rng.normal(0, 2, SHAPE)).astype(np.int16)


def _vsd_case(grade_dir, case, ot_more=3, ot=True, skip=(), numbered=True, values=(2, 3, 1, 4)):
    """A BRATS 2013/2015 case: one folder per scan, each holding one .mha."""
    label = _tumour_label(values)
    case_dir = os.path.join(grade_dir, case)
    for index, (token, number) in enumerate(VSD_IDS.items()):
        if token in skip:
            continue
        name = f"VSD.Brain.XX.O.MR_{token}"
        folder = f"{name}.{number}" if numbered else name
        write_image(_image(label, index), _meta(),
                    os.path.join(case_dir, folder, f"{name}.{number}.mha"))
    if ot:
        name = f"VSD.Brain_{ot_more}more.XX.{'O' if numbered else 'XX'}.OT"
        folder = f"{name}.54517" if numbered else name
        write_image(label, _meta(), os.path.join(case_dir, folder, f"{name}.54517.mha"))
    return case_dir


def write_brats2015(root, more_hgg=0):
    """BRATS2015_Training/{HGG,LGG} (labeled) and BRATS2015_Testing/HGG_LGG (no OT)."""
    training = os.path.join(root, "BRATS2015_Training")
    for case in ("brats_2013_pat0001_1", "brats_tcia_pat153_0002", "brats_tcia_pat153_0109",
                 *[f"brats_tcia_pat{200 + n}_0001" for n in range(more_hgg)]):
        _vsd_case(os.path.join(training, "HGG"), case)
    _vsd_case(os.path.join(training, "LGG"), "brats_2013_pat0001_1", ot_more=2)  # same name
    _vsd_case(os.path.join(root, "BRATS2015_Testing", "HGG_LGG"), "brats_2013_pat0103_1",
              ot=False)
    return root


def _nifti_case(parent, case, seg=True, ext=".nii.gz", seg_name=None, modalities=brats.MODALITIES,
                values=(2, 1, 1, 4)):
    """A BraTS 2017-2021 case folder: <case>/<case>_<modality>.nii.gz (+ _seg)."""
    label = _tumour_label(values)
    case_dir = os.path.join(parent, case)
    for index, modality in enumerate(modalities):
        write_image(_image(label, index), _meta(), os.path.join(case_dir, f"{case}_{modality}{ext}"))
    if seg:
        write_image(label.astype(np.uint8), _meta(),
                    os.path.join(case_dir, seg_name or f"{case}_seg{ext}"))
    return case_dir


def _ids(subjects):
    return [s.subject_id for s in subjects]


def _resolved(name, data_dir, **options):
    dataset = get_dataset(name, **options).resolve(data_dir)
    return dataset, dataset.list_subjects(data_dir)


# --------------------------------------------------------------------------- BraTS 2013/2015


def test_brats2015_layout_release_facts_and_ids(tmp_path):
    data = write_brats2015(str(tmp_path / "BRATS2015"))
    unresolved = get_dataset("brats")
    dataset, subjects = _resolved("brats", data)
    assert unresolved.release == "auto" and unresolved.label_values == (0, 1, 2, 4)
    assert dataset.release == "2015" and dataset.label_values == (0, 1, 2, 3, 4)
    assert dataset.class_names == ("background", "necrosis", "oedema", "non_enhancing",
                                   "enhancing")
    assert dataset.regions == (("whole_tumour", (1, 2, 3, 4)), ("tumour_core", (1, 3, 4)),
                               ("enhancing_tumour", (4,)))
    assert dataset.options() == {"target": "regions", "modalities": "t1,t1ce,t2,flair",
                                 "release": "2015"}
    # Options round-trip (export and predict rebuild the dataset from the manifest's options).
    assert get_dataset("brats", **dataset.options()).label_values == dataset.label_values
    # In path order: BRATS2015_Testing/ before BRATS2015_Training/.
    assert _ids(subjects) == ["brats_2013_pat0103_1", "HGG_brats_2013_pat0001_1",
                              "HGG_brats_tcia_pat153_0002", "HGG_brats_tcia_pat153_0109",
                              "LGG_brats_2013_pat0001_1"]
    assert [s.patient_id for s in subjects] == [
        "brats_2013_pat0103", "HGG_brats_2013_pat0001", "HGG_brats_tcia_pat153",
        "HGG_brats_tcia_pat153", "LGG_brats_2013_pat0001"]        # longitudinal scans together
    assert [s.labeled for s in subjects] == [False] + [True] * 4
    subjects = subjects[1:] + subjects[:1]
    first = subjects[0]
    assert [os.path.relpath(p, data) for p in first.image_paths] == [
        f"BRATS2015_Training/HGG/brats_2013_pat0001_1/VSD.Brain.XX.O.MR_{t}.{n}/"
        f"VSD.Brain.XX.O.MR_{t}.{n}.mha"
        for t, n in (("T1", 54513), ("T1c", 54514), ("T2", 54515), ("Flair", 54512))]
    assert first.label_path.endswith("VSD.Brain_3more.XX.O.OT.54517/VSD.Brain_3more.XX.O.OT."
                                     "54517.mha")
    assert subjects[3].label_path.endswith("VSD.Brain_2more.XX.O.OT.54517.mha")
    assert first.extra == {"grade": "HGG", "release": "2015"}
    # The modality option uses the 2018 names for every release, in the order given.
    _, three = _resolved("brats", data, modalities="t1ce,t2,flair")
    assert [p.rsplit("/", 1)[1].split(".")[4] for p in three[1].image_paths] == [
        "MR_T1c", "MR_T2", "MR_Flair"]
    # --data_dir may also point at one grade folder.
    assert _ids(get_dataset("brats").list_subjects(os.path.join(data, "BRATS2015_Training",
                                                                "LGG"))) == ["LGG_brats_2013_pat0001_1"]


def test_brats2015_binary_target_and_preprocessing_maps_value_3(tmp_path):
    data = write_brats2015(str(tmp_path / "BRATS2015"))
    dataset, subjects = _resolved("brats", data)
    images, metas, label, _ = read_subject(subjects[1], dataset)
    processed = preprocess_volume(images, metas, label, dataset, NO_N4)
    raw = _tumour_label()
    # 2015 values are class indices 0..4: value 3 (non-enhancing) is class 3.
    np.testing.assert_array_equal(processed.label, raw)
    assert dataset.class_names[int(processed.label[1, 8, 12])] == "non_enhancing"
    binary, _ = _resolved("brats", data, target="binary")
    assert binary.raw_to_class() == {0: 0, 1: 1, 2: 1, 3: 1, 4: 1} and binary.regions == ()
    processed = preprocess_volume(images, metas, label, binary, NO_N4)
    np.testing.assert_array_equal(processed.label, (raw > 0).astype(np.uint8))
    # The records record the release's facts (and so another fingerprint than a 2018 reading).
    summary = run_preprocessing(get_dataset("brats"), data, str(tmp_path / "records"), NO_N4)
    manifest = json.load(open(summary.manifest_path))
    assert len(summary.written) == 5 and manifest["label_values"] == [0, 1, 2, 3, 4]
    assert manifest["dataset_options"]["release"] == "2015"
    assert [r["paint"] for r in manifest["regions"]] == [2, 1, 4]
    assert manifest["regions"][1]["label_values"] == [1, 3, 4]
    assert not manifest["subjects"]["brats_2013_pat0103_1"]["labeled"]


def test_brats2013_layout_without_scan_ids(tmp_path):
    root = tmp_path / "BRATS_2013_Training" / "Image_Data"
    _vsd_case(str(root / "HG"), "0001", numbered=False)
    _vsd_case(str(root / "LG"), "0001", ot_more=2, numbered=False)
    dataset, subjects = _resolved("brats", str(tmp_path / "BRATS_2013_Training"))
    assert dataset.release == "2015" and _ids(subjects) == ["HG_0001", "LG_0001"]
    assert subjects[0].image_paths[0].endswith("0001/VSD.Brain.XX.O.MR_T1/VSD.Brain.XX.O.MR_T1."
                                               "54513.mha")
    assert subjects[1].label_path.endswith("VSD.Brain_2more.XX.XX.OT/VSD.Brain_2more.XX.XX.OT."
                                           "54517.mha")


def test_brats2015_missing_scan_and_missing_ot_are_reported_by_path(tmp_path, caplog):
    data = str(tmp_path / "BRATS2015")
    hgg = os.path.join(data, "BRATS2015_Training", "HGG")
    _vsd_case(hgg, "brats_2013_pat0001_1")
    _vsd_case(hgg, "brats_2013_pat0002_1", skip=("T2",))        # a missing modality
    _vsd_case(hgg, "brats_2013_pat0003_1", ot=False)            # OT missing among labeled cases
    subjects = get_dataset("brats").resolve(data).list_subjects(data)
    assert subjects[1].image_paths[2].endswith(
        "brats_2013_pat0002_1/VSD.Brain.XX.O.MR_T2.<id>/VSD.Brain.XX.O.MR_T2.<id>.mha")
    assert subjects[2].label_path.endswith(
        "brats_2013_pat0003_1/VSD.Brain_3more.XX.O.OT.<id>/VSD.Brain_3more.XX.O.OT.<id>.mha")
    assert "brats_2013_pat0003_1 has no ground truth" in caplog.text
    with pytest.raises(SubjectsSkippedError) as info:
        run_preprocessing(get_dataset("brats"), data, str(tmp_path / "records"), NO_N4)
    skipped = info.value.summary.skipped
    assert sorted(skipped) == ["HGG_brats_2013_pat0002_1", "HGG_brats_2013_pat0003_1"]
    assert "VSD.Brain.XX.O.MR_T2.<id>.mha: the file does not exist" in skipped[
        "HGG_brats_2013_pat0002_1"]
    assert "VSD.Brain_3more.XX.O.OT.<id>.mha: the file does not exist" in skipped[
        "HGG_brats_2013_pat0003_1"]
    assert "HGG_brats_2013_pat0002_1" in str(info.value) and "--allow_skips" in str(info.value)


def test_brats2015_duplicate_scan_folders_are_an_error(tmp_path):
    case = _vsd_case(str(tmp_path / "HGG"), "brats_2013_pat0001_1")
    write_image(_tumour_label(), _meta(), os.path.join(
        case, "VSD.Brain.XX.O.MR_T1.99999", "VSD.Brain.XX.O.MR_T1.99999.mha"))
    with pytest.raises(ValueError, match="holds 2 T1 scans .*Remove the extra copy") as info:
        get_dataset("brats").list_subjects(str(tmp_path))
    assert case in str(info.value)


# --------------------------------------------------------------------------- BraTS 2017-2021


@pytest.mark.parametrize("parents, case, ext", [
    (("HGG", "LGG"), "Brats18_TCIA01_131_1", ".nii.gz"),                   # 2018
    (("HGG",), "BraTS19_CBICA_AAB_1", ".nii.gz"),                          # 2019
    (("",), "BraTS20_Training_001", ".nii"),                               # 2020 (Kaggle copy)
    (("",), "BraTS2021_00000", ".nii.gz"),                                 # 2021
], ids=["2018", "2019", "2020", "2021"])
def test_brats_nifti_releases(tmp_path, parents, case, ext):
    data = str(tmp_path / "download")
    for parent in parents:
        _nifti_case(os.path.join(data, parent), "Brats18_TCIA09_462_1" if parent == "LGG"
                    else case, ext=ext)
    dataset, subjects = _resolved("brats", data)
    assert dataset.release == "2018" and dataset.label_values == (0, 1, 2, 4)
    assert dataset.options() == {"target": "regions", "modalities": "t1,t1ce,t2,flair"}
    assert subjects[0].subject_id == subjects[0].patient_id == case
    assert [os.path.basename(p) for p in subjects[0].image_paths] == [
        f"{case}_{m}{ext}" for m in brats.MODALITIES]
    assert os.path.basename(subjects[0].label_path) == f"{case}_seg{ext}"
    assert subjects[0].extra == {"grade": parents[0], "release": "2018"}


def test_brats_validation_download_is_unlabeled_and_odd_seg_name_is_found(tmp_path):
    validation = str(tmp_path / "MICCAI_BraTS2020_ValidationData")
    for number in (1, 2):
        _nifti_case(validation, f"BraTS20_Validation_{number:03d}", seg=False)
    dataset, subjects = _resolved("brats", validation)
    assert dataset.release == "2018" and [s.labeled for s in subjects] == [False, False]
    # BraTS 2020 training case 355 ships its seg as W39_1998.09.19_Segm.nii.
    training = str(tmp_path / "MICCAI_BraTS2020_TrainingData")
    _nifti_case(training, "BraTS20_Training_354", ext=".nii")
    _nifti_case(training, "BraTS20_Training_355", ext=".nii", seg_name="W39_1998.09.19_Segm.nii")
    subjects = get_dataset("brats").list_subjects(training)
    assert os.path.basename(subjects[1].label_path) == "W39_1998.09.19_Segm.nii"


def test_brats_protocols_and_explicit_overrides():
    segan = get_dataset("brats", protocol="segan")
    assert (segan.target, segan.modalities, segan.crop_size_yx, segan.train_crop_yx,
            segan.train_slices, segan.target_spacing_xy) == (
        "regions", ("t1ce", "t2", "flair"), (180, 180), (160, 160), 128, (1.0, 1.0))
    dmnet = get_dataset("brats", protocol="dmnet")
    assert (dmnet.target, dmnet.modalities, dmnet.crop_size_yx, dmnet.labeled_slices_per_subject,
            dmnet.unlabeled_slices_per_subject, dmnet.regions) == (
        "binary", ("t1", "t1ce", "t2"), (240, 240), 1, 2, ())
    assert dmnet.options() == {"target": "binary", "modalities": "t1,t1ce,t2",
                               "protocol": "dmnet"}
    default = get_dataset("brats")
    assert (default.crop_size_yx, default.train_crop_yx, default.train_slices,
            default.labeled_slices_per_subject) == ((192, 192), None, None, None)
    mixed = get_dataset("brats", protocol="dmnet", target="regions", modalities="flair,t2")
    assert mixed.target == "regions" and mixed.modalities == ("flair", "t2")
    assert mixed.crop_size_yx == (240, 240) and mixed.labeled_slices_per_subject == 1
    assert get_dataset("brats", release="2020").release == "2018"
    assert get_dataset("brats", release="2013").label_values == (0, 1, 2, 3, 4)
    for options, message in [({"protocol": "segnet"}, "Unknown BraTS protocol 'segnet'"),
                             ({"release": "2016"}, "Unknown BraTS release '2016'"),
                             ({"target": "core"}, "Unknown BraTS target 'core'")]:
        with pytest.raises(ValueError, match=message):
            get_dataset("brats", **options)


def test_brats_errors_name_the_file_or_folder(tmp_path):
    # Empty folder, a folder of neither layout, both layouts mixed.
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty.*the folder is empty.*VSD.Brain"):
        get_dataset("brats").resolve(str(tmp_path / "empty"))
    write_image(_tumour_label(), _meta(), str(tmp_path / "other" / "case1" / "image.nii.gz"))
    with pytest.raises(ValueError, match="other does not look like the brats dataset"):
        get_dataset("brats").resolve(str(tmp_path / "other"))
    mixed = str(tmp_path / "mixed")
    _vsd_case(os.path.join(mixed, "BRATS2015_Training", "HGG"), "brats_2013_pat0001_1")
    _nifti_case(os.path.join(mixed, "MICCAI_BraTS_2018_Data_Training", "HGG"), "Brats18_X_1_1")
    with pytest.raises(ValueError, match="mixes two BraTS releases.*brats_2013_pat0001_1.*"
                                         "Brats18_X_1_1.*one release"):
        get_dataset("brats").resolve(mixed)


def test_brats2018_bad_label_geometry_and_missing_modality_reach_the_user(tmp_path, caplog):
    data = str(tmp_path / "MICCAI_BraTS_2018_Data_Training")
    hgg = os.path.join(data, "HGG")
    _nifti_case(hgg, "Brats18_A_1_1")
    _nifti_case(hgg, "Brats18_B_2_1", values=(2, 3, 1, 4))              # value 3 in a 2018 seg
    shifted = _nifti_case(hgg, "Brats18_C_3_1")
    write_image(_image(_tumour_label(), 0), _meta(spacing_xyz=(1.0, 1.0, 2.0)),
                os.path.join(shifted, "Brats18_C_3_1_t2.nii.gz"))       # another grid
    _nifti_case(hgg, "Brats18_D_4_1", modalities=("t1", "t1ce", "flair"))  # no t2
    _nifti_case(hgg, "Brats18_E_5_1", seg=False)                        # seg missing
    subjects = get_dataset("brats").list_subjects(data)
    assert _ids(subjects) == ["Brats18_A_1_1", "Brats18_B_2_1", "Brats18_C_3_1",
                              "Brats18_D_4_1", "Brats18_E_5_1"]
    assert subjects[4].label_path.endswith("Brats18_E_5_1/Brats18_E_5_1_seg.nii.gz")
    with pytest.raises(SubjectsSkippedError) as info:
        run_preprocessing(get_dataset("brats"), data, str(tmp_path / "records"), NO_N4)
    skipped = info.value.summary.skipped
    assert sorted(skipped) == ["Brats18_B_2_1", "Brats18_C_3_1", "Brats18_D_4_1",
                               "Brats18_E_5_1"]
    assert "Brats18_B_2_1_seg.nii.gz holds values [3]" in skipped["Brats18_B_2_1"]
    assert "[0, 1, 2, 4]" in skipped["Brats18_B_2_1"]
    assert ("Brats18_C_3_1_t2.nii.gz does not share the voxel grid of" in skipped["Brats18_C_3_1"]
            and "spacing" in skipped["Brats18_C_3_1"])
    assert "Brats18_D_4_1_t2.nii.gz: the file does not exist" in skipped["Brats18_D_4_1"]
    assert "Brats18_E_5_1_seg.nii.gz: the file does not exist" in skipped["Brats18_E_5_1"]
    for line in str(info.value).splitlines()[1:-1]:
        assert os.sep in line                                            # each names its file


# --------------------------------------------------------------------------- KiTS19


def write_kits19(root, labeled=(0, 1), unlabeled=(210,), slices=4, size=12):
    """The kits19 repository: data/case_NNNNN/{imaging,segmentation}.nii.gz, stored as the
    release does: (slices, rows, cols) in NIfTI voxel order, i.e. SimpleITK (z, y, x) arrays
    whose x axis holds the slices; direction of the corrected affine (slices along -z)."""
    data = os.path.join(root, "data")
    volumes = {}
    direction = (0, 0, 1, 0, 1, 0, -1, 0, 0)           # voxel i -> -z, j -> y, k -> x (LPS)
    meta = _meta(shape_zyx=(size, size, slices), spacing_xyz=(3.0, 0.8, 0.8),
                 direction=direction)
    for number in labeled + unlabeled:
        rows, cols = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
        axial = np.zeros((slices, size, size), np.uint8)    # (slice, row, col)
        axial[1:, (rows > 2) & (rows < 9) & (cols > 1) & (cols < 5)] = 1          # kidney
        axial[2:, (rows > 4) & (rows < 7) & (cols > 2) & (cols < 4)] = 2          # tumour
        ct = np.where(axial > 0, 150.0 + 40.0 * axial, -60.0) + 5.0 * (number % 5)
        case_dir = os.path.join(data, f"case_{number:05d}")
        write_image(np.transpose(ct, (2, 1, 0)).astype(np.float32), meta,
                    os.path.join(case_dir, "imaging.nii.gz"))
        if number in labeled:
            write_image(np.transpose(axial, (2, 1, 0)), meta,
                        os.path.join(case_dir, "segmentation.nii.gz"))
        volumes[f"case_{number:05d}"] = axial
    with open(os.path.join(data, "kits.json"), "w") as stream:
        json.dump([], stream)
    return root, volumes


def test_kits19_layout_targets_and_facts(tmp_path, caplog):
    root, _ = write_kits19(str(tmp_path / "kits19"), labeled=(0, 1), unlabeled=(5, 210))
    for data_dir in (root, os.path.join(root, "data")):
        dataset, subjects = _resolved("kits19", data_dir)
        assert _ids(subjects) == ["case_00000", "case_00001", "case_00005", "case_00210"]
        assert [s.labeled for s in subjects] == [True, True, False, False]
        assert subjects[0].image_paths == (os.path.join(root, "data", "case_00000",
                                                        "imaging.nii.gz"),)
        assert subjects[0].label_path.endswith("case_00000/segmentation.nii.gz")
    assert "case_00005 has no segmentation.nii.gz" in caplog.text
    assert "case_00210" not in caplog.text                      # a test case: unlabeled
    assert (dataset.modalities, dataset.intensity_window, dataset.n4_default,
            dataset.slice_axis_zyx) == (("CT",), (-79.0, 304.0), False, 2)
    assert dataset.raw_to_class() == {0: 0, 1: 1, 2: 1} and dataset.label_values == (0, 1)
    tumour = get_dataset("kits19", target="tumour")
    assert tumour.raw_to_class() == {0: 0, 1: 0, 2: 1} and tumour.label_values == (0, 2)
    assert get_dataset("kits19", target="classes").raw_to_class() == {0: 0, 1: 1, 2: 2}
    dmnet = get_dataset("kits19", protocol="dmnet")
    assert (dmnet.crop_size_yx, dmnet.labeled_slices_per_subject,
            dmnet.unlabeled_slices_per_subject) == ((224, 224), 1, 2)
    assert dmnet.options() == {"target": "kidney", "protocol": "dmnet"}
    assert get_dataset("kits19").crop_size_yx == (384, 384)
    with pytest.raises(ValueError, match="Unknown KiTS19 target 'liver'"):
        get_dataset("kits19", target="liver")
    with pytest.raises(ValueError, match="Unknown KiTS19 protocol 'segan'"):
        get_dataset("kits19", protocol="segan")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="the folder is empty"):
        get_dataset("kits19").list_subjects(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="does not look like the kits19 dataset.*case_NNNNN"):
        get_dataset("kits19").list_subjects(str(tmp_path / "kits19" / "data" / "case_00000"))


def test_kits19_slices_are_axial_and_predictions_keep_the_file_order(tmp_path):
    root, volumes = write_kits19(str(tmp_path / "kits19"), labeled=(0,), unlabeled=())
    config = PreprocessConfig(n4=False, target_spacing_xy=(0.8, 0.8), crop_size_yx=(12, 12))
    for target, expected in (("kidney", volumes["case_00000"] > 0),
                             ("tumour", volumes["case_00000"] == 2)):
        dataset, subjects = _resolved("kits19", root, target=target)
        images, metas, label, _ = read_subject(subjects[0], dataset)
        assert images[0].shape == (12, 12, 4)                  # as stored: x holds the slices
        processed = preprocess_volume(images, metas, label, dataset, config)
        assert processed.image.shape == (4, 12, 12, 1)         # axial slices first
        # Canonical orientation (x left, y posterior, z superior): the files' slice index runs
        # towards -z (their direction), so the processed slices come in the reverse order.
        np.testing.assert_array_equal(processed.label, expected[::-1].astype(np.uint8))
        assert processed.geometry["slice_axis_zyx"] == 2
        # HU window: -60 (inside [-79, 304]) stays the lowest value, tumour 230 the highest.
        assert processed.image[0, 0, 0, 0] == processed.image.min()
        # A prediction goes back in the file's voxel order, equal to the file's labels.
        restored = restore_geometry(processed.label, processed.geometry, metas[0],
                                    is_probability=False)
        raw, _ = read_label(subjects[0].label_path)
        assert restored.shape == raw.shape == (12, 12, 4)
        np.testing.assert_array_equal(restored, np.isin(raw, [1, 2] if target == "kidney"
                                                        else [2]).astype(np.uint8))
    # Resampled in-plane (0.8 -> 0.4 mm) the slice count stays 4 and rows/cols double.
    finer = preprocess_volume(images, metas, label, dataset, dataclasses.replace(
        config, target_spacing_xy=(0.4, 0.4), crop_size_yx=(24, 24)))
    assert finer.image.shape == (4, 24, 24, 1)
    probabilities = np.stack([1.0 - finer.label, finer.label], axis=-1).astype(np.float32)
    back = restore_geometry(probabilities, finer.geometry, metas[0], is_probability=True)
    assert back.shape == (12, 12, 4, 2)
    np.testing.assert_array_equal(np.argmax(back, -1), (raw == 2).astype(np.int64))


# --------------------------------------------------------------------------- end to end


def test_brats2015_supervised_train_end_to_end(tmp_path):
    from launch import train as train_cli
    from tfseg.data.spec import DataSpec

    data = write_brats2015(str(tmp_path / "BRATS2015"), more_hgg=2)   # 5 labeled patients
    run = str(tmp_path / "run")
    argv = ["launch.train", "--method=supervised", "--dataset=brats", f"--data_dir={data}",
            f"--records_root={tmp_path / 'records'}", f"--run_dir={run}", "--labeled=2",
            "--num_val=1", "--num_test=1", "--steps=4", "--validation_every=2", "--non4",
            "--set=filters=4,8", "--set=batch_size=4", "--set=augment=none"]
    assert train_cli.main(argv) == 0
    with open(os.path.join(run, "config.json")) as stream:
        config = json.load(stream)
    spec = DataSpec.from_dict(config["data_spec"])
    assert spec.class_names == brats.CLASS_NAMES_2015
    assert spec.region_classes == ((1, 2, 3, 4), (1, 3, 4), (4,)) and spec.region_paint == (2, 1, 4)
    with open(os.path.join(run, "summary.json")) as stream:
        summary = json.load(stream)
    # Evaluated per region on the held-out patient, back on the original grid.
    assert list(summary["classes"]) == ["whole_tumour", "tumour_core", "enhancing_tumour"]
    assert summary["targets"] == "regions" and summary["num_subjects"] == 1
    assert 0.0 <= summary["mean_dice"] <= 1.0
