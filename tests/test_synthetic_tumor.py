"""synthetic_tumor: the embedded two-domain glioma dataset, read by the BraTS and folder readers."""
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk

from tfseg.datasets import get_dataset

SMALL = {"num_training": 3, "num_testing": 1, "target_counts": (1, 1, 1)}


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("tumour") / "synthetic_tumor")
    source = get_dataset("synthetic_tumor", **SMALL)
    return source.prepare(root), root


def _read(path):
    image = sitk.ReadImage(path)
    return sitk.GetArrayFromImage(image), image.GetSpacing()


def test_source_is_a_brats_2018_release(generated):
    source_dir, _ = generated
    dataset = get_dataset("synthetic_tumor", **SMALL)
    subjects = dataset.resolve(source_dir).list_subjects(source_dir)
    assert [s.subject_id for s in subjects] == ["Brats18_SYN_001_1", "Brats18_SYN_002_1",
                                                "Brats18_SYN_003_1", "Brats18_SYNV_004_1"]
    assert [s.labeled for s in subjects] == [True, True, True, False]   # validation: no seg
    assert [s.extra["grade"] for s in subjects[:3]] == ["HGG", "HGG", "LGG"]
    assert [os.path.basename(p) for p in subjects[0].image_paths] == [
        f"Brats18_SYN_001_1_{m}.nii.gz" for m in ("t1", "t1ce", "t2", "flair")]
    for subject in subjects[:3]:
        label, spacing = _read(subject.label_path)
        values = set(np.unique(label).tolist())
        assert values <= {0, 1, 2, 4} and {1, 2} <= values      # a lesion in every subject
        # high grade: an enhancing rim; low grade: none
        assert (4 in values) == (subject.extra["grade"] == "HGG")
        assert spacing == (2.0, 2.0, 2.5) and label.shape == (52, 88, 88)
        t1ce, _ = _read(subject.image_paths[1])
        brain = t1ce > 0
        assert not np.any(label[~brain])                          # skull-stripped, lesion inside
        if 4 in values:  # enhancement is bright in T1c: mean over the rim above normal tissue
            tissue = brain & (label == 0)
            assert t1ce[label == 4].mean() > 1.2 * t1ce[tissue].mean()


def test_target_domain_is_a_folder_dataset_on_another_scanner(generated):
    _, root = generated
    target = get_dataset("synthetic_tumor", domain="target", **SMALL)
    folder = target.prepare(root)
    assert folder == os.path.join(root, "target")
    with open(os.path.join(folder, "dataset.json")) as f:
        description = json.load(f)
    assert description["labels"] == {"background": 0, "necrotic_core": 1, "oedema": 2,
                                     "enhancing": 4}
    subjects = {s.subject_id: s for s in target.resolve(folder).list_subjects(folder)}
    assert {k: (s.extra["source"], s.labeled) for k, s in subjects.items()} == {
        "tumour_001": ("imagesTr", True), "tumour_002": ("imagesUnl", False),
        "tumour_003": ("imagesTs", True)}                     # imagesTs + labelsTs: evaluation
    assert subjects["tumour_003"].label_path.endswith("labelsTs/tumour_003.nii.gz")
    image, spacing = _read(subjects["tumour_001"].image_paths[0])
    assert spacing == pytest.approx((2.6, 2.6, 4.0)) and image.shape == (34, 68, 68)
    # same facts as the source, so the two domains share classes and regions
    source = get_dataset("synthetic_tumor")
    assert (target.class_names, target.label_values, target.regions) == (
        source.class_names, source.label_values, source.regions)
    picked = get_dataset("synthetic_tumor", domain="target", modalities="flair,t1ce", **SMALL)
    paths = picked.list_subjects(folder)[0].image_paths
    assert [p[-11:] for p in paths] == ["001_0003.nii.gz"[-11:], "001_0001.nii.gz"[-11:]]


def test_generation_is_deterministic_per_subject(generated, tmp_path):
    source_dir, _ = generated
    other = get_dataset("synthetic_tumor", num_training=1, num_testing=0,
                        target_counts=(1, 0, 0)).prepare(str(tmp_path / "again"))
    name = "HGG/Brats18_SYN_001_1/Brats18_SYN_001_1_seg.nii.gz"
    a, _ = _read(os.path.join(source_dir, name))
    b, _ = _read(os.path.join(other, name))
    np.testing.assert_array_equal(a, b)   # subject 1 does not depend on the counts


def test_options_and_errors():
    with pytest.raises(ValueError, match="Unknown synthetic_tumor domain"):
        get_dataset("synthetic_tumor", domain="middle")
    binary = get_dataset("synthetic_tumor", target="binary", modalities="t1,t1ce,t2")
    assert binary.class_names == ("background", "tumour") and binary.regions == ()
    assert binary.modalities == ("t1", "t1ce", "t2") and binary.crop_size_yx == (80, 80)
    target = get_dataset("synthetic_tumor", domain="target", target="binary")
    assert target.raw_to_class() == {0: 0, 1: 1, 2: 1, 4: 1}


def test_train_with_labeled_fraction_and_the_target_domain(generated, tmp_path):
    """End to end: the source at a labeled fraction (7:1:2 patient split) with the target domain
    as the second domain; evaluation on both."""
    from launch import train as train_cli

    _, root = generated
    options = [f"--dataset_option={k}={v}" for k, v in (("num_training", 3), ("num_testing", 1),
                                                          ("target_counts", "1,1,1"))]
    target_options = [o.replace("--dataset_option", "--target_option") for o in options]
    run_dir = str(tmp_path / "run")
    argv = ["launch.train", "--method=supervised", "--dataset=synthetic_tumor",
            f"--data_dir={root}", *options, "--target_dataset=synthetic_tumor",
            f"--target_data_dir={root}", "--target_option=domain=target", *target_options,
            f"--records_root={tmp_path / 'records'}", f"--run_dir={run_dir}",
            "--labeled_fraction=0.5", "--steps=3", "--validation_every=3", "--non4",
            "--set=filters=4,8", "--set=batch_size=2", "--noexport", "--test_seed=7"]
    assert train_cli.main(argv) == 0
    with open(os.path.join(run_dir, "config.json")) as f:
        config = json.load(f)
    split = config["split"]
    # --test_seed: test/val drawn with seed 7 (source and target), the labeled with split seed 0
    assert split["name"].endswith("_seed0_test7")
    assert config["target"]["split"]["name"] == "target_seed7"
    # 3 annotated patients: test 1, val 1 (at least one each), 1 training patient, labeled
    assert (len(split["test"]), len(split["val"]), len(split["labeled"])) == (1, 1, 1)
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    assert set(summary["classes"]) == {"whole_tumour", "tumour_core", "enhancing_tumour"}
    assert "miou" in summary["overall"]
    with open(os.path.join(run_dir, "target", "summary.json")) as f:
        target_summary = json.load(f)
    assert target_summary["domain"] == "target" and target_summary["num_subjects"] >= 1


def test_generator_version_enters_the_records_fingerprint():
    from preprocessing.config import dataset_facts
    from tfseg.datasets import synthetic_tumor

    for domain in ("source", "target"):
        facts = dataset_facts(get_dataset("synthetic_tumor", domain=domain, target="binary"))
        assert facts["content_version"] == synthetic_tumor.GENERATOR_VERSION
