"""Evaluating on a target domain whose label map is the source's in another form: classes in
another index order, or a region of BraTS chosen as the binary foreground."""
import json
import os

import numpy as np
import pytest

from tfseg.data import domains
from tfseg.datasets import get_dataset
from tfseg.run import target_labels


def test_target_class_map_by_name_in_any_order_and_binary_by_position():
    assert domains.target_class_map(("background", "oedema", "necrotic_core"),
                                    ("Background", "necrosis", "Edema")) == (0, 2, 1)
    assert domains.target_class_map(("background", "tumour"),
                                    ("background", "tumour_core")) == (0, 1)
    with pytest.raises(ValueError, match=r"has 4 classes .* the src 2 .*target=tumour_core"):
        domains.target_class_map(("background", "tumour"),
                                 ("background", "necrotic_core", "oedema", "enhancing"),
                                 source="src")
    with pytest.raises(ValueError, match="classes liver cannot be matched by name"):
        domains.target_class_map(("background", "oedema", "enhancing"),
                                 ("background", "liver", "enhancing"))
    with pytest.raises(ValueError, match="match one .* class"):
        domains.target_class_map(("background", "tumour", "oedema"),
                                 ("background", "tumor", "tumour"))


def test_target_labels_read_and_write_the_target_values_as_source_classes():
    # Target files: 0 background, 5 oedema, 7 necrosis; the source's classes are ordered
    # (background, necrotic_core, oedema).
    manifest = {"dataset": "t", "class_names": ["background", "oedema", "necrosis"],
                "label_values": [0, 5, 7]}
    label_values, raw_to_class = target_labels(("background", "necrotic_core", "oedema"),
                                               manifest)
    assert raw_to_class == {0: 0, 5: 2, 7: 1}
    assert label_values == (0, 7, 5)  # source class 1 (necrotic) is written as the target's 7
    # A target whose label file values are remapped in preprocessing (raw_to_class recorded).
    manifest = {"dataset": "b", "class_names": ["background", "tumour_core"],
                "label_values": [0, 1], "raw_to_class": {"0": 0, "1": 1, "2": 0, "4": 1}}
    assert target_labels(("background", "tumour"), manifest) == (
        (0, 1), {0: 0, 1: 1, 2: 0, 4: 1})


def test_brats_region_targets_are_binary_tasks_of_the_release_labels():
    core = get_dataset("brats", target="tumour_core")
    assert core.class_names == ("background", "tumour_core") and core.regions == ()
    assert core.label_map == {0: 0, 1: 1, 2: 0, 4: 1}
    assert get_dataset("brats", target="tumour_core", release="2015").label_map == {
        0: 0, 1: 1, 2: 0, 3: 1, 4: 1}
    assert get_dataset("brats", target="enhancing_tumour").label_map == {0: 0, 1: 0, 2: 0, 4: 1}
    whole = get_dataset("synthetic_tumor", domain="target", target="whole_tumour")
    assert whole.class_names == ("background", "whole_tumour")
    with pytest.raises(ValueError, match="Unknown BraTS target 'core'"):
        get_dataset("brats", target="core")


SMALL = {"num_training": 3, "num_testing": 1, "target_counts": "1,1,1"}


@pytest.fixture(scope="module")
def tumour_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("tumour") / "synthetic_tumor")
    get_dataset("synthetic_tumor", **SMALL).prepare(root)
    return root


def _argv(root, tmp_path, source_target, target_target):
    options = [f"--dataset_option={k}={v}" for k, v in SMALL.items()]
    return ["launch.train", "--method=supervised", "--dataset=synthetic_tumor",
            f"--data_dir={root}", *options, f"--dataset_option=target={source_target}",
            "--target_dataset=synthetic_tumor", f"--target_data_dir={root}",
            "--target_option=domain=target", f"--target_option=target={target_target}",
            *[o.replace("--dataset_option", "--target_option") for o in options],
            f"--records_root={tmp_path / 'records'}", f"--run_dir={tmp_path / 'run'}",
            "--labeled=1", "--num_val=1", "--num_test=1", "--steps=2", "--validation_every=2",
            "--non4", "--set=filters=4,8", "--set=batch_size=2", "--noexport"]


def test_binary_source_evaluated_on_a_brats_region_of_the_target(tumour_root, tmp_path):
    """A binary 'tumour' source against the target's tumour core (labels 1 and 4): trained,
    then scored on the target's core, its predictions written in the target's values."""
    from launch import train as train_cli
    import SimpleITK as sitk

    assert train_cli.main(_argv(tumour_root, tmp_path, "binary", "tumour_core")) == 0
    with open(tmp_path / "run" / "target" / "summary.json") as f:
        summary = json.load(f)
    assert summary["domain"] == "target" and list(summary["classes"]) == ["tumour"]
    subject = summary["subjects"]
    assert len(subject) == 1
    name = next(iter(subject))
    written = sitk.GetArrayFromImage(sitk.ReadImage(
        os.path.join(tmp_path, "run", "target", "predictions", f"{name}_seg.nii.gz")))
    assert set(np.unique(written).tolist()) <= {0, 1}


def test_regions_source_against_a_binary_target_is_refused_before_training(tumour_root,
                                                                            tmp_path, capsys):
    from launch import train as train_cli

    with pytest.raises(SystemExit) as exit_info:
        train_cli.main(_argv(tumour_root, tmp_path, "regions", "tumour_core"))
    assert exit_info.value.code != 0
    error = capsys.readouterr().err
    assert "has 2 classes (background, tumour_core)" in error and "target=binary" in error
    assert not os.path.exists(tmp_path / "run" / "checkpoints")
