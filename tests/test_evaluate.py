"""Tests for tfseg.evaluate: metrics in original geometry, aggregation, reports, predictions.

`build_tiny_run` (also used by test_export / test_predict) makes a real run folder: an nnU-Net
style raw folder with non-trivial geometry and iSEG-like label values 0/10/150/250, records from
the real preprocessing, and a tiny supervised U-Net's weights.
"""
import csv
import dataclasses
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk

from tfseg.evaluate import (EvalSubject, evaluate_volumes, summarize, summary_markdown,
                            write_label_map, write_reports)
from tfseg.data.spec import DataSpec
from tfseg.io import ImageMeta, read_label, write_image

LABEL_VALUES = (0, 10, 150, 250)
CLASS_NAMES = ("background", "csf", "gm", "wm")
# A rotation about z plus an axis flip: direction cosines that are not the identity.
DIRECTION = (0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)


def _meta(shape_zyx, spacing_xyz=(0.9, 1.1, 2.0), origin_xyz=(12.5, -30.0, 7.0)):
    return ImageMeta(spacing_xyz=spacing_xyz, origin_xyz=origin_xyz, direction=DIRECTION,
                     size_xyz=tuple(reversed(shape_zyx)))


def _tissue(shape_zyx, seed):
    """Label values 0/10/150/250 in nested boxes, shifted a little per case."""
    rng = np.random.default_rng(seed)
    z, y, x = shape_zyx
    label = np.zeros(shape_zyx, np.uint8)
    dz, dy, dx = rng.integers(0, 2, size=3)
    label[1 + dz:z - 1, 2 + dy:y - 2, 2 + dx:x - 2] = 10
    label[1 + dz:z - 1, 4 + dy:y - 4, 4 + dx:x - 5] = 150
    label[2 + dz:z - 2, 7 + dy:y - 7, 6 + dx:x - 7] = 250
    return label


def _images(label, seed):
    rng = np.random.default_rng(seed)
    level1 = {0: 5.0, 10: 40.0, 150: 80.0, 250: 120.0}
    level2 = {0: 3.0, 10: 110.0, 150: 70.0, 250: 30.0}
    t1 = np.vectorize(level1.get)(label).astype(np.float32) + rng.normal(0, 3, label.shape)
    t2 = np.vectorize(level2.get)(label).astype(np.float32) + rng.normal(0, 3, label.shape)
    return t1.astype(np.float32), t2.astype(np.float32)


def write_raw_folder(folder, shape_zyx, cases=("case1", "case2"), unlabeled=("case9",)):
    """nnU-Net v2 raw layout: dataset.json, imagesTr/, labelsTr/, imagesTs/."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "dataset.json"), "w") as f:
        json.dump({"channel_names": {"0": "T1", "1": "T2"},
                   "labels": dict(zip(CLASS_NAMES, LABEL_VALUES)), "file_ending": ".nii.gz"}, f)
    for index, case in enumerate(cases + unlabeled):
        label = _tissue(shape_zyx, index)
        meta = _meta(shape_zyx)
        source = "imagesTr" if case in cases else "imagesTs"
        for channel, image in enumerate(_images(label, 100 + index)):
            write_image(image, meta, os.path.join(folder, source, f"{case}_{channel:04d}.nii.gz"))
        if case in cases:
            write_image(label, meta, os.path.join(folder, "labelsTr", f"{case}.nii.gz"))


def build_tiny_run(root, spatial_dims=3, upsampling="transpose"):
    """A run folder with real records and a tiny supervised U-Net (random weights).

    3D: volumes (10, 22, 19) — smaller than the 16^3 patch along z, so preprocessing pads.
    2D: (3, 40, 34) at 1.1 x 0.9 mm in-plane, resampled to 1 mm and cropped to 32 x 32.
    """
    import keras

    from preprocessing import PreprocessConfig, run_preprocessing
    from tfseg.datasets import get_dataset
    from tfseg.run import PREDICTOR_WEIGHTS, build_predictor
    from tfseg.methods import DataSpec
    from tfseg.methods.supervised import Config

    root = str(root)
    data_dir, records_dir = os.path.join(root, "raw"), os.path.join(root, "records")
    run_dir = os.path.join(root, "run")
    if spatial_dims == 3:
        write_raw_folder(data_dir, (10, 22, 19))
        dataset = get_dataset("folder", spatial_dims=3, patch_size_zyx=(16, 16, 16),
                              patch_stride_zyx=(8, 8, 8))
        example_shape = (16, 16, 16)
    else:
        write_raw_folder(data_dir, (3, 40, 34))
        dataset = get_dataset("folder", spatial_dims=2, target_spacing_xy=(1.0, 1.0),
                              crop_size_yx=(32, 32))
        example_shape = (32, 32)
    run_preprocessing(dataset, data_dir, records_dir, PreprocessConfig(n4=False),
                      dataset_options=dataset.options())
    method_config = dataclasses.asdict(Config(filters=(4, 8), upsampling=upsampling,
                                              batch_size=1, steps=1))
    data_spec = dataclasses.asdict(DataSpec(spatial_dims, 2, 4, CLASS_NAMES, example_shape))
    config = {"method": "supervised", "method_config": method_config, "data_spec": data_spec,
              "dataset": "folder", "dataset_options": dataset.options(), "data_dir": data_dir,
              "records_dir": records_dir, "checkpoint_policy": "best_val",
              "split": {"name": "tiny", "labeled": ["case1"], "unlabeled": ["case9"],
                        "val": ["case1"], "test": ["case1", "case2"], "seed": 0}}
    os.makedirs(os.path.join(run_dir, "checkpoints"))
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump(config, f)
    keras.utils.set_random_seed(0)
    predictor, _ = build_predictor(config)
    predictor.save_weights(os.path.join(run_dir, PREDICTOR_WEIGHTS))
    return {"run_dir": run_dir, "data_dir": data_dir, "records_dir": records_dir,
            "config": config}


# ----------------------------------------------------------------- evaluate_volumes (no network)

def _subjects(tmp_path, labels):
    subjects = []
    for index, label in enumerate(labels):
        meta = _meta(label.shape, origin_xyz=(1.0 * index, 2.0, 3.0))
        path = os.path.join(tmp_path, f"s{index}_label.nii.gz")
        write_image(label, meta, path)
        subjects.append(EvalSubject(f"s{index}", path, meta))
    return subjects


def _one_hot(classes, k=4):
    return np.eye(k, dtype=np.float32)[classes]


RAW_TO_CLASS = {v: i for i, v in enumerate(LABEL_VALUES)}


def _spec(class_names, **regions):
    from tfseg.data.spec import DataSpec

    return DataSpec(3, 1, len(class_names), tuple(class_names), (8, 8, 8), **regions)


def test_oracle_prediction_scores_perfectly_and_writes_raw_values(tmp_path):
    label = _tissue((8, 20, 18), 0)
    subjects = _subjects(tmp_path, [label])
    truth = np.vectorize(RAW_TO_CLASS.get)(label)
    rows, per_subject = evaluate_volumes(
        subjects, lambda s: _one_hot(truth), data_spec=_spec(CLASS_NAMES), label_values=LABEL_VALUES,
        raw_to_class=RAW_TO_CLASS, predictions_dir=str(tmp_path / "pred"))
    assert [r["class"] for r in rows] == ["csf", "gm", "wm"]
    for row in rows:
        assert row["dice"] == 1.0 and row["iou"] == 1.0 and row["precision"] == 1.0
        assert row["recall"] == 1.0 and row["hd95_mm"] == 0.0 and row["asd_mm"] == 0.0
    assert per_subject["s0"]["gm"]["dice"] == 1.0 and per_subject["s0"]["seconds"] >= 0
    assert per_subject["s0"]["miou"] == 1.0 and per_subject["s0"]["auc"] == 1.0
    assert all(row["miou"] == 1.0 and row["auc"] == 1.0 for row in rows)  # per class too
    written, meta = read_label(str(tmp_path / "pred" / "s0_seg.nii.gz"))
    np.testing.assert_array_equal(written, label)  # the dataset's raw values 0/10/150/250
    assert written.dtype == np.uint8
    assert meta.size_xyz == subjects[0].original.size_xyz
    np.testing.assert_allclose(meta.spacing_xyz, subjects[0].original.spacing_xyz)
    np.testing.assert_allclose(meta.origin_xyz, subjects[0].original.origin_xyz)
    np.testing.assert_allclose(meta.direction, DIRECTION, atol=1e-6)


def test_shifted_prediction_gives_hand_computed_scores(tmp_path):
    label = np.zeros((6, 12, 12), np.uint8)
    label[1:5, 2:6, 2:6] = 150  # a 4x4x4 cube of gm; csf and wm absent
    subjects = _subjects(tmp_path, [label])
    shifted = np.zeros(label.shape, np.int32)
    shifted[1:5, 2:6, 3:7] = 2   # the cube moved one voxel along x
    shifted[0, 0, 0] = 3         # one false wm voxel where the truth has none
    rows, _ = evaluate_volumes(subjects, lambda s: shifted, data_spec=_spec(CLASS_NAMES),
                               label_values=LABEL_VALUES, raw_to_class=RAW_TO_CLASS)
    by_class = {r["class"]: r for r in rows}
    # overlap 4*4*3 = 48 of 64 + 64 voxels
    assert by_class["gm"]["dice"] == pytest.approx(2 * 48 / 128)
    assert by_class["gm"]["iou"] == pytest.approx(48 / 80)
    assert by_class["gm"]["precision"] == pytest.approx(0.75)
    assert by_class["gm"]["recall"] == pytest.approx(0.75)
    # csf empty in both: perfect by the empty-mask policy, never NaN.
    assert by_class["csf"]["dice"] == 1.0 and by_class["csf"]["hd95_mm"] == 0.0
    # wm predicted but absent: Dice 0, distances = field-of-view diagonal in mm.
    diagonal = np.sqrt((12 * 0.9) ** 2 + (12 * 1.1) ** 2 + (6 * 2.0) ** 2)
    assert by_class["wm"]["dice"] == 0.0
    assert by_class["wm"]["hd95_mm"] == pytest.approx(diagonal)


def test_binary_task_reports_auc_and_miou(tmp_path):
    label = np.zeros((4, 10, 10), np.uint8)
    label[1:3, 2:6, 2:6] = 1
    subjects = _subjects(tmp_path, [label])
    score = np.where(label == 1, 0.8, 0.3).astype(np.float32)
    score[0, 0, 0] = 0.9  # one background voxel outranks every foreground voxel
    probs = np.stack([1 - score, score], axis=-1)
    rows, per_subject = evaluate_volumes(subjects, lambda s: probs,
                                         data_spec=_spec(("background", "tumour")),
                                         label_values=(0, 1), raw_to_class={0: 0, 1: 1})
    positives, negatives = 32, 400 - 32
    assert per_subject["s0"]["auc"] == pytest.approx(1 - positives / (positives * negatives))
    # prediction: the 32 tumour voxels + the false one; background IoU 367/368, tumour 32/33.
    assert per_subject["s0"]["miou"] == pytest.approx((367 / 368 + 32 / 33) / 2)
    summary = summarize(rows, per_subject, ("tumour",), split="test")
    assert summary["overall"]["auc"]["mean"] == pytest.approx(per_subject["s0"]["auc"])


def test_summary_aggregates_mean_std_median_over_subjects(tmp_path):
    rows = [{"subject": s, "class": c, "dice": d, "iou": d / 2, "hd95_mm": h, "asd_mm": 1.0,
             "precision": 1.0, "recall": d}
            for s, c, d, h in [("a", "csf", 1.0, 0.0), ("a", "gm", 0.5, 2.0),
                               ("b", "csf", 0.5, 4.0), ("b", "gm", 0.0, 6.0),
                               ("c", "csf", 0.9, 8.0), ("c", "gm", 0.7, 10.0)]]
    per_subject = {s: {"seconds": 1.0} for s in "abc"}
    summary = summarize(rows, per_subject, ("csf", "gm"), split="test",
                        extra={"checkpoint": "best_val", "flip_tta": False})
    assert summary["num_subjects"] == 3 and summary["split"] == "test"
    csf = summary["classes"]["csf"]["dice"]
    assert csf["mean"] == pytest.approx(0.8) and csf["median"] == pytest.approx(0.9)
    assert csf["std"] == pytest.approx(np.std([1.0, 0.5, 0.9]))
    assert summary["classes"]["gm"]["hd95_mm"]["mean"] == pytest.approx(6.0)
    # mean Dice over foreground classes and subjects: (0.75 + 0.25 + 0.8) / 3
    assert summary["mean_dice"] == pytest.approx(0.6)
    assert summary["overall"]["dice"]["median"] == pytest.approx(0.75)
    assert "empty" in summary["empty_mask_policy"].lower()
    assert summary["checkpoint"] == "best_val"


def test_reports_are_written_and_readable(tmp_path):
    rows = [{"subject": "a", "class": "csf", "dice": 0.8, "iou": 0.6, "hd95_mm": 1.5,
             "asd_mm": 0.5, "precision": 0.9, "recall": 0.7}]
    summary = summarize(rows, {"a": {"csf": dict(rows[0]), "seconds": 2.0}},
                        ("csf",), split="test",
                        extra={"dataset": "iseg2017", "method": "fm_gan", "checkpoint": "last"})
    write_reports(str(tmp_path), rows, summary)
    with open(tmp_path / "metrics.csv", encoding="utf-8") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["subject", "class", "dice", "iou", "hd95_mm", "asd_mm",
                              "precision", "recall", "miou", "auc"]
    assert float(table[0]["dice"]) == pytest.approx(0.8)
    with open(tmp_path / "summary.json", encoding="utf-8") as f:
        loaded = json.load(f)
    assert loaded["classes"]["csf"]["dice"]["mean"] == pytest.approx(0.8)
    markdown = (tmp_path / "summary.md").read_text()
    assert "| Class | Dice | IoU | HD95 (mm) | ASD (mm) | Precision | Recall |" in markdown
    assert "| csf | 0.800 ± 0.000 (0.800) |" in markdown
    assert "iseg2017 / fm_gan" in markdown and "**0.800**" in markdown
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no temporaries left
    assert summary_markdown(summary) == markdown


def test_label_values_outside_the_map_are_rejected(tmp_path):
    label = _tissue((6, 14, 14), 1)
    label[0, 0, 0] = 77
    subjects = _subjects(tmp_path, [label])
    with pytest.raises(ValueError, match=r"s0_label.nii.gz holds values \[77\]"):
        evaluate_volumes(subjects, lambda s: np.zeros(label.shape, np.int32),
                         data_spec=_spec(CLASS_NAMES), label_values=LABEL_VALUES,
                         raw_to_class=RAW_TO_CLASS)


def test_prediction_on_the_wrong_grid_is_rejected(tmp_path):
    subjects = _subjects(tmp_path, [_tissue((6, 14, 14), 1)])
    with pytest.raises(ValueError, match="expected the original grid"):
        evaluate_volumes(subjects, lambda s: np.zeros((6, 14, 13, 4)), data_spec=_spec(CLASS_NAMES),
                         label_values=LABEL_VALUES, raw_to_class=RAW_TO_CLASS)


def test_write_label_map_picks_a_wide_enough_type(tmp_path):
    meta = _meta((2, 3, 4))
    classes = np.array([[[0, 1, 2, 1]] * 3] * 2)
    write_label_map(classes, meta, (0, 500, 1000), str(tmp_path / "wide.nii.gz"))
    written, _ = read_label(str(tmp_path / "wide.nii.gz"))
    assert written.max() == 1000 and sorted(np.unique(written)) == [0, 500, 1000]
    image = sitk.ReadImage(str(tmp_path / "wide.nii.gz"))
    assert image.GetPixelID() == sitk.sitkUInt16


# ------------------------------------------------------------------ evaluate_run (end to end)

@pytest.mark.parametrize("spatial_dims", [3, 2])
def test_evaluate_run_end_to_end(tmp_path, spatial_dims):
    from launch import evaluate as launcher
    from tfseg.metrics.volume import volume_metrics

    run = build_tiny_run(tmp_path, spatial_dims=spatial_dims)
    # 3D: tiles of the training patch, so the sliding window really slides (the default tile
    # would cover these small volumes at once).
    tiles = ["--tile_size=16,16,16"] if spatial_dims == 3 else []
    assert launcher.main(["launch.evaluate", f"--run_dir={run['run_dir']}", "--tile_batch=2",
                          *tiles]) == 0
    run_dir = run["run_dir"]
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    assert summary["num_subjects"] == 2 and summary["split"] == "test"
    assert set(summary["classes"]) == {"csf", "gm", "wm"}
    assert set(summary["classes"]["gm"]) == {"dice", "iou", "hd95_mm", "asd_mm", "precision",
                                             "recall", "miou", "auc"}
    assert summary["checkpoint"] == "best_val" and summary["flip_tta"] is False
    assert summary["tile_size_zyx"] == ([16, 16, 16] if spatial_dims == 3 else None)
    assert set(summary["subjects"]) == {"case1", "case2"}
    with open(os.path.join(run_dir, "metrics.csv")) as f:
        table = list(csv.DictReader(f))
    assert len(table) == 6  # 2 subjects x 3 foreground classes
    for case in ("case1", "case2"):
        truth_raw, truth_meta = read_label(os.path.join(run["data_dir"], "labelsTr",
                                                        f"{case}.nii.gz"))
        predicted, meta = read_label(os.path.join(run_dir, "predictions", f"{case}_seg.nii.gz"))
        assert predicted.shape == truth_raw.shape and meta.size_xyz == truth_meta.size_xyz
        np.testing.assert_allclose(meta.spacing_xyz, truth_meta.spacing_xyz)
        np.testing.assert_allclose(meta.origin_xyz, truth_meta.origin_xyz)
        np.testing.assert_allclose(meta.direction, truth_meta.direction, atol=1e-6)
        assert set(np.unique(predicted)) <= set(LABEL_VALUES)
        # The CSV holds the metrics of exactly the written prediction.
        to_class = np.vectorize(RAW_TO_CLASS.get)
        scores = volume_metrics(to_class(predicted), to_class(truth_raw), meta.spacing_zyx, 4)
        for row in (r for r in table if r["subject"] == case):
            index = CLASS_NAMES.index(row["class"])
            assert float(row["dice"]) == pytest.approx(scores[index]["dice"], abs=1e-6)
            assert float(row["hd95_mm"]) == pytest.approx(scores[index]["hd95_mm"], abs=1e-5)
    # metrics.csv holds 6 decimals: its mean matches to rounding
    assert summary["mean_dice"] == pytest.approx(np.mean([float(r["dice"]) for r in table]),
                                                 abs=1e-6)


def test_evaluate_run_reports_missing_weights_and_unknown_split(tmp_path, capsys):
    from launch import evaluate as launcher
    from tfseg.evaluate import evaluate_run

    run = build_tiny_run(tmp_path, spatial_dims=3)
    with pytest.raises(ValueError, match="no list 'unlabeled_test'"):
        evaluate_run(run["run_dir"], split="unlabeled_test")
    with pytest.raises(ValueError, match="has no target domain"):
        evaluate_run(run["run_dir"], domain="target")
    os.remove(os.path.join(run["run_dir"], "checkpoints", "predictor.weights.h5"))
    with pytest.raises(SystemExit) as exit_info:
        launcher.main(["launch.evaluate", f"--run_dir={run['run_dir']}"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("launch.evaluate: error: No predictor weights at")
    assert "\n" not in error


def test_per_region_miou_and_auc_are_hand_computed(tmp_path):
    """Regions: per-region two-class mIoU and one-against-rest AUC, by hand on 1 x 2 x 4 voxels."""
    from tfseg.evaluate import EvalSubject
    from tfseg.io import ImageMeta, write_image

    raw = np.array([[[0, 1, 1, 2], [2, 2, 0, 0]]], np.uint8)       # region A = {1, 2}, B = {2}
    meta = _meta(raw.shape)
    path = str(tmp_path / "lab.nii.gz")
    write_image(raw, meta, path)
    spec = DataSpec(spatial_dims=2, num_channels=1, num_classes=3,
                    class_names=("background", "one", "two"), example_shape=(2, 4),
                    region_names=("A", "B"), region_classes=((1, 2), (2,)), region_paint=(1, 2))
    probs = np.zeros(raw.shape + (2,), np.float32)
    # A: predicted on voxels (0,0,1),(0,0,2),(0,1,0) -> 3 of the 5 true ones, 0 false positives.
    probs[0, 0, :, 0] = [0.1, 0.9, 0.8, 0.4]
    probs[0, 1, :, 0] = [0.7, 0.3, 0.2, 0.0]
    # B (truth (0,0,3),(0,1,0),(0,1,1)): predicted on (0,0,3) and (0,1,2) (a false positive).
    probs[0, 0, :, 1] = [0.0, 0.1, 0.2, 0.6]
    probs[0, 1, :, 1] = [0.3, 0.4, 0.9, 0.1]
    rows, per_subject = evaluate_volumes(
        [EvalSubject("s", path, meta)], lambda s: probs, data_spec=spec, label_values=(0, 1, 2),
        raw_to_class={0: 0, 1: 1, 2: 2})
    a, b = per_subject["s"]["A"], per_subject["s"]["B"]
    # A: IoU(A) = 3/5; complement: truth {(0,0,0),(0,1,2),(0,1,3)}, prediction adds 2 -> 3/5.
    assert a["miou"] == pytest.approx((3 / 5 + 3 / 5) / 2)
    # A's AUC: positives scores .9 .8 .4 .7 .3, negatives .1 .2 .0 -> every pair ordered: 1.
    assert a["auc"] == pytest.approx(1.0)
    # B: IoU(B) = 1/4; complement: truth 5 voxels, predicted 6 -> intersection 4, union 6... by
    # enumeration: rest-truth {000,001,002,012,013}, rest-pred {000,001,002,010,011,013}: 4 / 7.
    assert b["miou"] == pytest.approx((1 / 4 + 4 / 7) / 2)
    # B AUC: positives .6 .3 .4; negatives .0 .1 .2 .9 .1: each wins 4 of 5 pairs: 12 of 15.
    assert b["auc"] == pytest.approx(12 / 15)
    assert per_subject["s"]["miou"] == pytest.approx((a["miou"] + b["miou"]) / 2)
    assert per_subject["s"]["auc"] == pytest.approx((1.0 + 12 / 15) / 2)
    summary = summarize(rows, per_subject, spec.reported_names, split="test")
    assert summary["classes"]["B"]["auc"]["mean"] == pytest.approx(12 / 15)
    assert "mIoU" in summary_markdown(summary)


def test_auc_is_missing_not_zero_when_a_region_is_absent(tmp_path):
    from tfseg.evaluate import EvalSubject
    from tfseg.io import ImageMeta, write_image

    raw = np.zeros((1, 2, 2), np.uint8)
    meta = _meta(raw.shape)
    path = str(tmp_path / "lab.nii.gz")
    write_image(raw, meta, path)
    spec = DataSpec(spatial_dims=2, num_channels=1, num_classes=2, class_names=("bg", "t"),
                    example_shape=(2, 2))
    probs = np.stack([np.full((1, 2, 2), 0.9), np.full((1, 2, 2), 0.1)], -1)
    rows, per_subject = evaluate_volumes([EvalSubject("s", path, meta)], lambda s: probs,
                                         data_spec=spec, label_values=(0, 1),
                                         raw_to_class={0: 0, 1: 1})
    assert rows[0]["auc"] is None and per_subject["s"]["auc"] is None
    assert rows[0]["miou"] == 1.0  # both empty: class and complement agree everywhere
    write_reports(str(tmp_path / "out"), rows, summarize(rows, per_subject, ["t"], split="test"))
    with open(tmp_path / "out" / "metrics.csv") as f:
        header, line = f.read().splitlines()
    assert header.endswith("miou,auc") and line.endswith(",")
