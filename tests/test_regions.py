"""Region targets (overlapping regions, one sigmoid each) end to end.

Hand-computed metrics and label-map painting on a two-region case; the region loss; and the
whole path on data written in the BraTS 2018 layout: preprocessing -> training with per-region
BCE -> validation -> evaluation per region on the original geometry -> export (probabilities,
painted label map) -> launch.predict writing the label map in BraTS label values.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from tfseg.data.spec import DataSpec, default_paint, resolve_regions
from tfseg.evaluate import EvalSubject, evaluate_volumes
from tfseg.io import ImageMeta, read_label, write_image
from tfseg.losses import segmentation as losses

# Two nested regions over classes 1 (value 1) and 2 (value 2): outer = {1, 2}, inner = {2}.
TWO = DataSpec(3, 1, 3, ("background", "ring", "centre"), (4, 4, 4),
               region_names=("outer", "inner"), region_classes=((1, 2), (2,)),
               region_paint=(1, 2))


def _meta(shape_zyx, spacing_xyz=(1.0, 1.0, 2.0)):
    return ImageMeta(spacing_xyz=spacing_xyz, origin_xyz=(0.0, 0.0, 0.0),
                     direction=(1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0),
                     size_xyz=tuple(reversed(shape_zyx)))


def test_region_masks_painting_and_table():
    labels = np.array([0, 1, 2])
    np.testing.assert_array_equal(TWO.target_masks(labels), [[0, 0], [1, 0], [1, 1]])
    np.testing.assert_array_equal(TWO.region_table(), [[0, 0], [1, 0], [1, 1]])
    probs = np.array([[0.2, 0.9], [0.7, 0.1], [0.5, 0.5], [0.49, 0.2]])
    # region r predicted where p >= 0.5; painted outer (class 1) then inner (class 2)
    np.testing.assert_array_equal(TWO.prediction_masks(probs),
                                  [[0, 1], [1, 0], [1, 1], [0, 0]])
    np.testing.assert_array_equal(TWO.label_map(probs), [2, 1, 2, 0])
    assert TWO.targets == "regions" and TWO.activation == "sigmoid" and TWO.num_outputs == 2
    assert TWO.reported_names == ("outer", "inner")
    with pytest.raises(ValueError, match="2 output channels"):
        TWO.label_map(np.zeros((2, 3)))


def test_region_definitions_are_checked_and_painted_innermost_last():
    brats = (("wt", (1, 2, 4)), ("tc", (1, 4)), ("et", (4,)))
    assert default_paint(brats) == (2, 1, 4)
    resolved = resolve_regions(brats, None, (0, 1, 2, 4), "brats")
    assert [r["paint"] for r in resolved] == [2, 1, 4]
    with pytest.raises(ValueError, match="foreground label values"):
        resolve_regions((("wt", (0, 1)),), None, (0, 1), "x")        # background in a region
    with pytest.raises(ValueError, match="foreground label values"):
        resolve_regions((("wt", (3,)),), None, (0, 1), "x")          # unknown value
    with pytest.raises(ValueError, match="no label value outside"):
        default_paint((("a", (1,)), ("b", (1,))))
    with pytest.raises(ValueError, match="paints 9"):
        resolve_regions((("wt", (1,)),), (9,), (0, 1), "x")


def test_region_losses_hand_computed():
    # one example, two voxels, two regions; logits 0 -> p = 0.5 everywhere
    logits = tf.zeros((1, 2, 2))
    targets = tf.constant([[[1.0, 0.0], [1.0, 1.0]]])
    bce = losses.cross_entropy(targets, logits, activation="sigmoid")
    np.testing.assert_allclose(bce.numpy(), [np.log(2.0)], rtol=1e-6)
    weighted = losses.cross_entropy(targets, logits, class_weights=(1.0, 3.0),
                                    activation="sigmoid")
    np.testing.assert_allclose(weighted.numpy(), [2.0 * np.log(2.0)], rtol=1e-6)
    # soft Dice per region: outer 2*(0.5+0.5)/(1+2), inner 2*0.5/(1+1); loss 1 - mean
    dice = losses.soft_dice_loss(targets, logits, smooth=0.0, activation="sigmoid")
    np.testing.assert_allclose(dice.numpy(), [1 - (2 / 3 + 0.5) / 2], rtol=1e-6)


def test_evaluate_volumes_scores_each_region_hand_computed(tmp_path):
    # raw values: 0 background, 5 ring, 9 centre (classes 0, 1, 2)
    label = np.zeros((2, 6, 6), np.uint8)
    label[:, 1:5, 1:5] = 5
    label[:, 2:4, 2:4] = 9                      # outer truth: 2*16 = 32 voxels, inner 2*4 = 8
    path = str(tmp_path / "label.nii.gz")
    meta = _meta(label.shape)
    write_image(label, meta, path)
    probs = np.zeros((2, 6, 6, 2), np.float32)
    probs[:, 1:5, 1:4, 0] = 0.9                 # outer predicted: 2*12 = 24 voxels, all inside
    probs[:, 2:4, 2:5, 1] = 0.8                 # inner predicted: 2*6 = 12, overlap 2*4 = 8
    rows, per_subject = evaluate_volumes(
        [EvalSubject("s0", path, meta)], lambda s: probs, data_spec=TWO,
        label_values=(0, 5, 9), raw_to_class={0: 0, 5: 1, 9: 2},
        predictions_dir=str(tmp_path / "pred"))
    by = {r["class"]: r for r in rows}
    assert list(by) == ["outer", "inner"]
    assert by["outer"]["dice"] == pytest.approx(2 * 24 / (24 + 32))
    assert by["outer"]["precision"] == pytest.approx(1.0)
    assert by["outer"]["recall"] == pytest.approx(24 / 32)
    assert by["inner"]["dice"] == pytest.approx(2 * 8 / (12 + 8))
    assert by["inner"]["iou"] == pytest.approx(8 / 12)
    assert by["inner"]["precision"] == pytest.approx(8 / 12) and by["inner"]["recall"] == 1.0
    # two-class mIoU per region over 72 voxels: outer (24/32 + 40/48) / 2, inner
    # (8/12 + 60/64) / 2 (complements: truth 40 vs prediction 48, truth 64 vs prediction 60)
    outer, inner = (24 / 32 + 40 / 48) / 2, (8 / 12 + 60 / 64) / 2
    assert by["outer"]["miou"] == pytest.approx(outer) and by["inner"]["miou"] == pytest.approx(inner)
    assert per_subject["s0"]["miou"] == pytest.approx((outer + inner) / 2)
    written, _ = read_label(str(tmp_path / "pred" / "s0_seg.nii.gz"))
    expected = np.zeros_like(label)
    expected[:, 1:5, 1:4] = 5                     # outer painted with the ring value
    expected[:, 2:4, 2:5] = 9                     # then inner with the centre value
    np.testing.assert_array_equal(written, expected)


# --------------------------------------------------------------------------- BraTS 2018 layout
def write_brats2018(root, num_hgg=5, num_lgg_unlabeled=1, shape_zyx=(4, 40, 40), seed=0):
    """A tiny release in the BraTS 2018 layout: labels 0/1/2/4 nested (oedema around a core
    around an enhancing rim), four modalities whose intensities depend on the tissue."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.meshgrid(*[np.arange(s) for s in shape_zyx], indexing="ij")
    cases = []
    for index in range(num_hgg + num_lgg_unlabeled):
        grade = "HGG" if index < num_hgg else "LGG"
        case = f"Brats18_TCIA0{index}_{100 + index}_1"
        folder = os.path.join(root, grade, case)
        os.makedirs(folder)
        cy, cx = rng.integers(14, 26, size=2)
        r = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
        label = np.zeros(shape_zyx, np.uint8)
        label[r < 10] = 2
        label[r < 6] = 1
        label[(r < 6) & (r >= 4)] = 4
        meta = _meta(shape_zyx, (1.0, 1.0, 1.0))
        brain = (np.abs(yy - 20) < 18) & (np.abs(xx - 20) < 18)
        for offset, modality in enumerate(("t1", "t1ce", "t2", "flair")):
            image = np.where(brain, 100.0, 0.0) + 40.0 * (label == 2) * (offset + 1) \
                + 80.0 * (label == 4) + 30.0 * (label == 1) + rng.normal(0, 3, shape_zyx)
            write_image(image.astype(np.float32), meta,
                        os.path.join(folder, f"{case}_{modality}.nii.gz"))
        if grade == "HGG":
            write_image(label, meta, os.path.join(folder, f"{case}_seg.nii.gz"))
        cases.append(case)
    del zz
    return cases


@pytest.fixture(scope="module")
def brats_run(tmp_path_factory):
    from launch import train as train_cli

    root = tmp_path_factory.mktemp("brats")
    data = str(root / "MICCAI_BraTS_2018_Data_Training")
    cases = write_brats2018(data)
    argv = ["launch.train", "--method=supervised", "--dataset=brats", f"--data_dir={data}",
            f"--records_root={root / 'records'}", f"--run_dir={root / 'run'}", "--labeled=2",
            "--num_val=1", "--num_test=2", "--steps=6", "--validation_every=3", "--non4",
            "--set=filters=4,8", "--set=batch_size=4", "--set=augment=none"]
    assert train_cli.main(argv) == 0
    return {"root": root, "data": data, "cases": cases, "run": str(root / "run")}


def test_brats_2018_regions_train_evaluate_export_predict(brats_run):
    from launch import predict as predict_cli

    run = brats_run["run"]
    with open(os.path.join(run, "config.json")) as f:
        config = json.load(f)
    spec = DataSpec.from_dict(config["data_spec"])
    assert spec.region_names == ("whole_tumour", "tumour_core", "enhancing_tumour")
    assert spec.region_classes == ((1, 2, 3), (1, 3), (3,)) and spec.region_paint == (2, 1, 3)
    assert config["method_config"]["loss"] == "ce"          # per-region BCE for regions
    with open(os.path.join(run, "train_log.csv")) as f:
        header = f.readline().strip().split(",")
    assert {"val_dice_whole_tumour", "val_dice_tumour_core",
            "val_dice_enhancing_tumour"} <= set(header)
    with open(os.path.join(run, "summary.json")) as f:
        summary = json.load(f)
    assert list(summary["classes"]) == ["whole_tumour", "tumour_core", "enhancing_tumour"]
    assert summary["targets"] == "regions" and summary["num_subjects"] == 2
    for stats in summary["classes"].values():
        assert {"dice", "iou", "precision", "recall", "hd95_mm", "asd_mm"} <= set(stats)
    # The predictions are painted label maps in BraTS values, on the original 40x40 grid.
    test_case = sorted(summary["subjects"])[0]
    evaluated, meta = read_label(os.path.join(run, "predictions", f"{test_case}_seg.nii.gz"))
    assert evaluated.shape == (4, 40, 40) and set(np.unique(evaluated)) <= {0, 1, 2, 4}
    # launch.predict on the exported model writes the same label map for the same case.
    export = os.path.join(run, "export", "brats_supervised", "1")
    with open(os.path.join(export, "assets", "preprocessing.json")) as f:
        assets = json.load(f)
    assert assets["targets"] == "regions" and assets["label_values"] == [0, 1, 2, 4]
    grade = "HGG"
    folder = os.path.join(brats_run["data"], grade, test_case)
    files = ",".join(os.path.join(folder, f"{test_case}_{m}.nii.gz")
                     for m in ("t1", "t1ce", "t2", "flair"))
    out = str(brats_run["root"] / "predicted")
    assert predict_cli.main(["launch.predict", f"--model={export}", f"--input={files}",
                             f"--output={out}"]) == 0
    written = [n for n in os.listdir(out) if n.endswith("_seg.nii.gz")]
    assert len(written) == 1
    predicted, _ = read_label(os.path.join(out, written[0]))
    np.testing.assert_array_equal(predicted, evaluated)
    # The served label_map is the painted label map in BraTS values.
    serve = tf.saved_model.load(export).signatures["serving_default"]
    from tfseg.data.pipeline import load_subject
    image, _ = load_subject(config["records_dir"], test_case)
    outputs = serve(image=tf.constant(image[:2]))
    classes = spec.label_map(outputs["probabilities"].numpy())
    np.testing.assert_array_equal(outputs["labels"].numpy(), classes)
    np.testing.assert_array_equal(outputs["label_map"].numpy(),
                                  np.array([0, 1, 2, 4])[classes])


def test_brats_layout_lists_unlabeled_cases_and_binary_target(brats_run):
    from tfseg.datasets import get_dataset

    subjects = get_dataset("brats").list_subjects(brats_run["data"])
    assert [s.subject_id for s in subjects] == brats_run["cases"]
    assert [s.labeled for s in subjects] == [True] * 5 + [False]
    assert subjects[-1].extra["grade"] == "LGG"
    three = get_dataset("brats", modalities="t1ce,t2,flair").list_subjects(brats_run["data"])
    assert [os.path.basename(p).rsplit("_", 1)[1] for p in three[0].image_paths] == [
        "t1ce.nii.gz", "t2.nii.gz", "flair.nii.gz"]
    binary = get_dataset("brats", target="binary")
    assert binary.regions == () and binary.raw_to_class() == {0: 0, 1: 1, 2: 1, 4: 1}
    with pytest.raises(ValueError, match="choose distinct names"):
        get_dataset("brats", modalities="t1,dwi")
    with pytest.raises(ValueError, match="no folder holds"):
        get_dataset("brats").list_subjects(str(brats_run["root"] / "records"))


def test_supervised_resolves_batch_dice_for_regions_only():
    from tfseg.methods import supervised

    classes = DataSpec(spatial_dims=2, num_channels=1, num_classes=3,
                       class_names=("bg", "a", "b"), example_shape=(16, 16))
    assert supervised.resolve(supervised.Config(loss="dice_ce"), TWO).batch_dice is True
    assert supervised.resolve(supervised.Config(loss="dice_ce"), classes).batch_dice is False
    explicit = supervised.Config(loss="dice", batch_dice=False)
    assert supervised.resolve(explicit, TWO).batch_dice is False
