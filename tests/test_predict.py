"""Tests for tfseg.predict / launch.predict: exported model on new scans, native geometry out."""
import os
import re

import numpy as np
import pytest

from test_evaluate import DIRECTION, LABEL_VALUES, build_tiny_run
from tfseg.io import ImageMeta, read_label, write_image


@pytest.fixture(scope="module")
def exported_run(tmp_path_factory):
    """A 2D run (resampled to 1 mm, cropped to 32x32), evaluated and exported."""
    from tfseg.evaluate import evaluate_run
    from tfseg.export import export_run

    run = build_tiny_run(tmp_path_factory.mktemp("predict"), spatial_dims=2)
    evaluate_run(run["run_dir"], tile_batch=2)
    run["export"] = export_run(run["run_dir"])
    return run


def _predict(argv):
    from launch import predict as launcher

    return launcher.main(["launch.predict", *argv])


def _assert_same_geometry(meta, expected):
    assert meta.size_xyz == expected.size_xyz
    np.testing.assert_allclose(meta.spacing_xyz, expected.spacing_xyz, rtol=1e-6)
    np.testing.assert_allclose(meta.origin_xyz, expected.origin_xyz, atol=1e-5)
    np.testing.assert_allclose(meta.direction, expected.direction, atol=1e-6)


def test_prediction_of_a_training_scan_matches_evaluation(exported_run, tmp_path):
    # Raw files -> saved preprocessing -> SavedModel -> original grid must give what evaluation
    # (records -> Keras segmentor -> original grid) wrote for the same case.
    images = os.path.join(exported_run["data_dir"], "imagesTr")
    inputs = ",".join(os.path.join(images, f"case1_000{c}.nii.gz") for c in (0, 1))
    assert _predict([f"--model={exported_run['export']}", f"--input={inputs}",
                     f"--output={tmp_path}"]) == 0
    predicted, meta = read_label(str(tmp_path / "case1_seg.nii.gz"))
    evaluated, evaluated_meta = read_label(os.path.join(exported_run["run_dir"], "predictions",
                                                        "case1_seg.nii.gz"))
    _assert_same_geometry(meta, evaluated_meta)
    np.testing.assert_array_equal(predicted, evaluated)


def test_new_multichannel_scan_keeps_its_exact_geometry(exported_run, tmp_path):
    # An MSD-style 4D NIfTI (both modalities in one file) with its own size, spacing, origin and
    # direction, none of which the training data had.
    rng = np.random.default_rng(7)
    shape = (2, 45, 31)
    direction = (0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    meta = ImageMeta(spacing_xyz=(0.8, 1.3, 4.0), origin_xyz=(-3.0, 4.5, 100.0),
                     direction=direction, size_xyz=tuple(reversed(shape)), num_channels=2)
    scan = rng.normal(50, 20, size=shape + (2,)).astype(np.float32)
    path = str(tmp_path / "patient_0000.nii.gz")
    write_image(scan, meta, path)
    out = tmp_path / "out"
    assert _predict([f"--model={exported_run['export']}", f"--input={path}",
                     f"--output={out}", "--flip_tta"]) == 0
    predicted, predicted_meta = read_label(str(out / "patient_seg.nii.gz"))  # _0000 stripped
    assert predicted.shape == shape
    _assert_same_geometry(predicted_meta, ImageMeta(meta.spacing_xyz, meta.origin_xyz, direction,
                                                    meta.size_xyz))
    assert set(np.unique(predicted)) <= set(LABEL_VALUES)


def test_folder_input_predicts_every_subject(exported_run, tmp_path):
    assert _predict([f"--model={os.path.dirname(exported_run['export'])}",  # highest version
                     f"--input={exported_run['data_dir']}", "--dataset=folder",
                     f"--output={tmp_path}"]) == 0
    names = sorted(os.listdir(tmp_path))
    assert names == ["case1_seg.nii.gz", "case2_seg.nii.gz", "case9_seg.nii.gz"]  # case9 unlabeled
    _, meta = read_label(str(tmp_path / "case9_seg.nii.gz"))
    np.testing.assert_allclose(meta.direction, DIRECTION, atol=1e-6)


def test_one_broken_scan_does_not_stop_the_others(exported_run, tmp_path, capsys):
    import shutil

    data_dir = str(tmp_path / "raw")
    shutil.copytree(exported_run["data_dir"], data_dir)
    broken = os.path.join(data_dir, "imagesTs", "case9_0001.nii.gz")
    with open(broken, "r+b") as f:
        f.truncate(200)  # a truncated download
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        _predict([f"--model={exported_run['export']}", f"--input={data_dir}",
                  "--dataset=folder", f"--output={out}"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "1 of 3 scans failed" in error and "case9" in error and "case9_0001.nii.gz" in error
    assert sorted(os.listdir(out)) == ["case1_seg.nii.gz", "case2_seg.nii.gz"]


@pytest.mark.parametrize("make_input, message", [
    (lambda run, tmp: os.path.join(run["data_dir"], "imagesTr", "case1_0000.nii.gz"),
     r"The model expects 2 modalities \(T1, T2\), got 1 from .*case1_0000.nii.gz"),
    (lambda run, tmp: _garbage(tmp), r"broken.nii.gz"),
    (lambda run, tmp: str(tmp / "missing.nii.gz"), r"Input .*missing.nii.gz does not exist"),
])
def test_bad_inputs_exit_2_with_one_line(exported_run, tmp_path, capsys, make_input, message):
    scan = make_input(exported_run, tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        _predict([f"--model={exported_run['export']}", f"--input={scan}",
                  f"--output={tmp_path / 'out'}"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("launch.predict: error: ") and "\n" not in error
    assert re.search(message, error), error
    assert not os.path.exists(tmp_path / "out")


def _garbage(tmp_path):
    path = str(tmp_path / "broken.nii.gz")
    with open(path, "wb") as f:
        f.write(b"\x1f\x8b this is not a gzip stream")
    return path


def test_model_folder_without_export_is_rejected(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _predict([f"--model={tmp_path}", "--input=x.nii.gz", f"--output={tmp_path}"])
    assert "holds no saved_model.pb" in capsys.readouterr().err


def test_wrong_dimensionality_is_rejected(tmp_path):
    from tfseg.predict import ExportedModel, Scan, read_scan

    model = ExportedModel(path="m", probabilities=None, config=None, dataset=None,
                          assets={"spatial_dims": 3, "modalities": ["CT"]})
    meta = ImageMeta((1.0, 1.0), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0), (9, 7))
    path = str(tmp_path / "slice.nii.gz")
    write_image(np.zeros((7, 9), np.float32), meta, path)
    with pytest.raises(ValueError, match=r"slice.nii.gz is a 2D image; this 3D model needs 3D"):
        read_scan(Scan("slice", (path,)), model)


def test_unwritable_output_is_refused_before_inference(tmp_path, capsys):
    from launch import predict as predict_cli

    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SystemExit) as exit_info:
        predict_cli.main(["launch.predict", "--model=/nonexistent/model",
                          "--input=/nonexistent/scan.nii.gz", f"--output={blocker / 'out'}"])
    assert exit_info.value.code == 2
    assert re.search(r"output folder .*file/out is not writable.*--output",
                     capsys.readouterr().err)


def test_a_4d_file_names_the_frame_flag_and_the_frame_is_read(tmp_path):
    import dataclasses as dc

    from tfseg.predict import ExportedModel, Scan, read_scan

    model = ExportedModel(path="m", probabilities=None, config=None, dataset=None,
                          assets={"spatial_dims": 2, "modalities": ["cine"]})
    meta = ImageMeta((1.5, 1.5, 8.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()), (6, 5, 3),
                     num_channels=4)
    frames = np.stack([np.full((3, 5, 6), float(t), np.float32) for t in range(4)], -1)
    path = str(tmp_path / "patient001_4d.nii.gz")
    write_image(frames, meta, path)
    with pytest.raises(ValueError, match=r"holds 4 frames .*--frame=K \(0..3\)"):
        read_scan(Scan("patient001", (path,)), model)
    arrays, metas, _ = read_scan(dc.replace(Scan("patient001", (path,)), channel_indices=(2,)),
                                 model)
    assert len(arrays) == 1 and np.all(arrays[0] == 2.0) and metas[0].num_channels == 1
