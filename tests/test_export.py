"""Tests for tfseg.export: served output equals the Keras output, TF Serving layout, checks,
atomic writes, and export_run on a real run folder."""
import dataclasses
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfseg.data.spec import DataSpec
from tfseg.export import PREPROCESSING_ASSET, export_predictor
from tfseg.methods.base import probability_model
from tfseg.networks.unet import UNetConfig, build_unet

TINY_2D = UNetConfig(filters=(4, 8, 8), upsampling="transpose")


def _pad_with_background(x, multiple):
    """What the signature does: pad at the far end with each example's channel minimum."""
    background = x.min(axis=tuple(range(1, x.ndim - 1)), keepdims=True)
    for axis in range(1, x.ndim - 1):
        amount = (-x.shape[axis]) % multiple
        shape = list(x.shape)
        shape[axis] = amount
        x = np.concatenate([x, np.broadcast_to(background, shape)], axis=axis)
    return x


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def export_segmentor(model, path, preprocessing, spatial_dims, size_multiple, regions=None,
                     **kwargs):
    """Exports a logits network as the default predictor (softmax, or sigmoids for regions)."""
    channels, outputs = model.inputs[0].shape[-1], model.outputs[0].shape[-1]
    if regions is None:
        spec = DataSpec(spatial_dims, channels, outputs, tuple(f"c{i}" for i in range(outputs)),
                        (8,) * spatial_dims)
    else:
        spec = DataSpec(spatial_dims, channels, **regions, example_shape=(8,) * spatial_dims)
    return export_predictor(probability_model(model, spec), path, preprocessing, spec,
                            size_multiple, **kwargs)


@pytest.fixture(scope="module")
def exported_2d(tmp_path_factory):
    keras.utils.set_random_seed(3)
    model = build_unet((None, None, 2), 3, TINY_2D)
    path = str(tmp_path_factory.mktemp("export") / "tiny_unet" / "1")
    export_segmentor(model, path, {"modalities": ["T1", "T2"], "label_values": [0, 1, 2]},
                     spatial_dims=2, size_multiple=4)
    return model, path, tf.saved_model.load(path).signatures["serving_default"]


def test_served_output_equals_keras_on_odd_sizes(exported_2d):
    model, _, serve = exported_2d
    x = np.random.default_rng(0).normal(size=(2, 37, 29, 2)).astype(np.float32)
    out = serve(image=tf.constant(x))
    assert out["probabilities"].shape == (2, 37, 29, 3) and out["labels"].shape == (2, 37, 29)
    assert out["labels"].dtype == tf.int32
    expected = _softmax(np.asarray(model(_pad_with_background(x, 4))))[:, :37, :29]
    np.testing.assert_allclose(out["probabilities"].numpy(), expected, atol=1e-6)
    np.testing.assert_array_equal(out["labels"].numpy(), expected.argmax(-1))
    # label_map: the labels in the dataset's label values (here 0, 1, 2: the same numbers).
    np.testing.assert_array_equal(out["label_map"].numpy(), expected.argmax(-1))
    one = serve(image=tf.constant(x[:1, :5, :3]))["probabilities"]  # tiny, still padded
    assert one.shape == (1, 5, 3, 3)


def test_tf_serving_layout_and_preprocessing_asset(exported_2d):
    _, path, _ = exported_2d
    assert {"saved_model.pb", "variables", "assets"} <= set(os.listdir(path))
    assert os.listdir(os.path.join(path, "variables"))
    with open(os.path.join(path, PREPROCESSING_ASSET)) as f:
        assert json.load(f)["modalities"] == ["T1", "T2"]
    assert not [n for n in os.listdir(os.path.dirname(path)) if n.startswith(".")]


def test_saved_model_cli_lists_the_signature(exported_2d):
    _, path, _ = exported_2d
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    result = subprocess.run([cli, "show", "--dir", path, "--tag_set", "serve",
                             "--signature_def", "serving_default"],
                            capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "inputs['image']" in text and "shape: (-1, -1, -1, 2)" in text
    assert "outputs['probabilities']" in text and "shape: (-1, -1, -1, 3)" in text
    assert "outputs['labels']" in text and "DT_INT32" in text


# The wrapper's shape check, the binding (in Python) or the graph's own rank check: each names the
# shapes or the rank, never the channel count.
WRONG_RANK = (r"image must have rank 4|Can not cast TensorSpec|"
              r"is not compatible with expected shape \[\?,\?,\?,2\]")


@pytest.mark.parametrize("image, message", [
    (np.zeros((1, 8, 8, 3), np.float32), r"must have 2 channel\(s\) \(T1, T2\)"),
    # In Python the signature's binding refuses a wrong rank with the shapes (TypeError); a
    # server runs the graph, whose first check names the rank.
    (np.zeros((8, 8, 2), np.float32), WRONG_RANK),
    (np.zeros((8, 2), np.float32), WRONG_RANK),
    (np.full((1, 8, 8, 2), np.nan, np.float32), "NaN or infinite"),
    (np.zeros((1, 8, 8, 2), np.float64), "float tensor but is a double"),
    (np.zeros((1, 0, 8, 2), np.float32), "non-empty"),
])
def test_signature_rejects_wrong_channels_rank_dtype_and_empty_input(exported_2d, image,
                                                                     message):
    _, _, serve = exported_2d
    with pytest.raises((tf.errors.InvalidArgumentError, TypeError), match=message):
        serve(image=tf.constant(image))


def test_3d_export_matches_keras(tmp_path):
    keras.utils.set_random_seed(4)
    config = dataclasses.replace(TINY_2D, norm="weight", activation="leaky_relu",
                                 pooling="average", final_kernel_size=3)
    model = build_unet((None, None, None, 1), 2, config)
    path = export_segmentor(model, str(tmp_path / "m3d" / "7"), {}, spatial_dims=3,
                            size_multiple=4)
    serve = tf.saved_model.load(path).signatures["serving_default"]
    x = np.random.default_rng(1).normal(size=(1, 13, 18, 11, 1)).astype(np.float32)
    out = serve(image=tf.constant(x))["probabilities"].numpy()
    expected = _softmax(np.asarray(model(_pad_with_background(x, 4))))[:, :13, :18, :11]
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_export_is_atomic_and_does_not_clobber(tmp_path, monkeypatch):
    keras.utils.set_random_seed(5)
    model = build_unet((None, None, 1), 2, UNetConfig(filters=(4, 8), upsampling="transpose"))
    target = str(tmp_path / "name" / "1")

    def broken_write_out(self, filepath, **kwargs):
        os.makedirs(os.path.join(filepath, "variables"))
        with open(os.path.join(filepath, "saved_model.pb"), "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        # ExportArchive() builds the backend's class: patch that one.
        patch.setattr(type(keras.export.ExportArchive()), "write_out", broken_write_out)
        with pytest.raises(OSError, match="disk full"):
            export_segmentor(model, target, {}, spatial_dims=2, size_multiple=2)
    assert os.listdir(tmp_path / "name") == []  # neither the version nor a temporary folder

    export_segmentor(model, target, {"v": 1}, spatial_dims=2, size_multiple=2)
    with pytest.raises(ValueError, match="already exists"):
        export_segmentor(model, target, {"v": 2}, spatial_dims=2, size_multiple=2)
    export_segmentor(model, target, {"v": 2}, spatial_dims=2, size_multiple=2, overwrite=True)
    with open(os.path.join(target, PREPROCESSING_ASSET)) as f:
        assert json.load(f) == {"v": 2}
    assert os.listdir(tmp_path / "name") == ["1"]


def test_export_run_writes_the_run_export_with_preprocessing_facts(tmp_path, capsys):
    from test_evaluate import build_tiny_run

    from launch import export as launcher
    from tfseg.data.pipeline import load_subject
    from tfseg.export import load_run

    run = build_tiny_run(tmp_path, spatial_dims=3)
    assert launcher.main(["launch.export", f"--run_dir={run['run_dir']}", "--version=3"]) == 0
    path = os.path.join(run["run_dir"], "export", "folder_supervised", "3")
    assert f"Exported: {path}" in capsys.readouterr().out
    with open(os.path.join(path, PREPROCESSING_ASSET)) as f:
        assets = json.load(f)
    assert assets["modalities"] == ["T1", "T2"] and assets["spatial_dims"] == 3
    assert assets["label_values"] == [0, 10, 150, 250]
    assert assets["class_names"] == ["background", "csf", "gm", "wm"]
    assert assets["size_multiple"] == 2 and assets["patch_size_zyx"] == [16, 16, 16]
    assert assets["tile_size_zyx"] == [16, 16, 16]  # the training patch (default_tile_size)
    assert assets["settings"]["n4"] is False and assets["settings"]["percentiles"] == [2.0, 98.0]
    assert assets["dataset_facts"]["modalities"] == ["T1", "T2"]
    assert assets["raw_to_class"] == [[0, 0], [10, 1], [150, 2], [250, 3]]
    # The served network is the run's segmentor with its checkpoint weights.
    image, _ = load_subject(run["records_dir"], "case1")  # 3D, padded in z, canonical order
    served = tf.saved_model.load(path).signatures["serving_default"](
        image=tf.constant(image[None]))["probabilities"].numpy()[0]
    predictor = load_run(run["run_dir"]).predictor
    padded = _pad_with_background(image[None], 2)
    expected = np.asarray(predictor(padded))[0, :, :image.shape[1], :image.shape[2]]
    np.testing.assert_allclose(served, expected, atol=1e-5)


def test_region_export_paints_nested_regions_into_label_values(tmp_path):
    """Three BraTS-like regions over classes 1 (necrosis, value 1), 2 (oedema, value 2) and
    3 (enhancing, value 4): the served label map paints whole tumour, then core, then enhancing."""
    inputs = keras.Input((None, None, 3))
    model = keras.Model(inputs, inputs)  # logits = the image: we choose the probabilities
    regions = dict(num_classes=4, class_names=("background", "necrosis", "oedema", "enhancing"),
                   region_names=("whole_tumour", "tumour_core", "enhancing_tumour"),
                   region_classes=((1, 2, 3), (1, 3), (3,)), region_paint=(2, 1, 3))
    path = export_segmentor(model, str(tmp_path / "regions" / "1"),
                            {"label_values": [0, 1, 2, 4]}, spatial_dims=2, size_multiple=1,
                            regions=regions)
    serve = tf.saved_model.load(path).signatures["serving_default"]
    big, small = 4.0, -4.0  # sigmoid(±4): 0.982 / 0.018
    logits = np.array([[[small, small, small],    # nothing -> 0
                        [big, small, small],      # whole tumour only -> oedema (2)
                        [big, big, small],        # + core -> necrosis (1)
                        [big, big, big],          # + enhancing -> 4
                        [small, small, big]]],    # enhancing alone (inconsistent) -> still 4
                      np.float32)[None]  # (1, 1, 5, 3)
    out = serve(image=tf.constant(logits))
    np.testing.assert_allclose(out["probabilities"].numpy(), 1 / (1 + np.exp(-logits)), atol=1e-6)
    assert out["labels"].numpy().ravel().tolist() == [0, 2, 1, 3, 3]
    assert out["label_map"].numpy().ravel().tolist() == [0, 2, 1, 4, 4]


def test_a_killed_export_leaves_nothing_behind_after_the_next_run(tmp_path):
    """kill -9 during the write leaves its temporary folder; the next export removes it (and
    keeps the temporary of an export still running in another process)."""
    import socket
    import subprocess
    import sys

    keras.utils.set_random_seed(6)
    model = build_unet((None, None, 1), 2, UNetConfig(filters=(4, 8), upsampling="transpose"))
    parent = tmp_path / "name"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    host = socket.gethostname()
    stale = parent / f".1.tmp-{host}-{dead}-0123456789abcdef"
    alive = parent / f".1.tmp-{host}-{os.getpid()}-fedcba9876543210"
    for folder in (stale, alive):
        os.makedirs(folder / "variables")
    export_segmentor(model, str(parent / "1"), {}, spatial_dims=2, size_multiple=2)
    assert sorted(os.listdir(parent)) == sorted(["1", alive.name])
