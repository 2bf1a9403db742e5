"""launch.benchmark / tfseg.benchmark: the JSON it prints, on tiny networks, plus the pieces that
need no training.

3D: the real synthetic_brain (generated into the shared cache, preprocessed without N4 into a
temporary records_root on first use, as tests/test_train_cli.py does). 2D: the tiny hand-made
records of tests/test_train.py via --records_dir and a split file (16×16 slices, cheap), while
the preprocessing timing reads the real synthetic_cardiac scans (the manifest names no data_dir).

Speed is never asserted (docs/performance.md): only that every figure is there, positive, and consistent.
"""
from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from launch import benchmark as benchmark_cli
from tfseg import benchmark
from tfseg.io import ImageMeta
from test_train import tiny_split_file, write_tiny_records

# Tiny network, 2 timed steps, 1 subject, a light N4 (1 level × 3 iterations) on a small crop.
TINY_ARGS = ("--set=filters=4,8", "--steps=2", "--warmup=1", "--pipeline_batches=4",
             "--pipeline_warmup=1", "--inference_repeats=2", "--n4_subjects=1", "--n4_levels=1",
             "--n4_iterations=3", "--n4_compare=crop", "--n4_compare_max_voxels=40000", "--non4",
             "--peak_size=256")
POSITIVE = ("train_examples_per_s", "train_step_s_median", "pipeline_examples_per_s",
            "pipeline_to_train_ratio", "inference_s_per_volume", "preprocess_s_per_subject",
            "preprocess_s_per_subject_no_n4", "n4_speedup", "peak_rss_mb")


def _run(tmp_path, capsys, dataset, *extra):
    output = tmp_path / "bench.json"
    argv = ["launch.benchmark", "--method=supervised", f"--dataset={dataset}",
            f"--records_root={tmp_path / 'records_root'}", f"--output={output}", *TINY_ARGS,
            *extra]
    assert benchmark_cli.main(argv) == 0
    out = capsys.readouterr().out.strip()
    assert len(out.splitlines()) == 1, "stdout must hold exactly one JSON object"
    result = json.loads(out)
    with open(output, encoding="utf-8") as f:
        assert json.load(f) == result
    return result


def _check_common(result):
    missing = [k for k in benchmark.REQUIRED_KEYS if k not in result]
    assert not missing, missing
    for key in POSITIVE:
        assert isinstance(result[key], float) and math.isfinite(result[key]) and result[key] > 0, \
            (key, result[key])
    # Consistent: ratio = pipeline / train, train = examples per step / median step time.
    assert result["pipeline_to_train_ratio"] == pytest.approx(
        result["pipeline_examples_per_s"] / result["train_examples_per_s"], rel=1e-3)
    assert result["train_examples_per_s"] == pytest.approx(
        result["examples_per_step"] / result["train_step_s_median"], rel=1e-3)
    assert result["train_step_s_min"] <= result["train_step_s_median"] <= \
        result["train_first_step_s"] + result["train_step_s_median"]
    assert result["train_step_cpu_s_median"] > 0 and result["inference_cpu_s_per_volume"] > 0
    assert result["inference_repeats"] == 2
    assert 0 < result["inference_s_min"] <= result["inference_s_per_volume"]
    assert -1.0 <= result["n4_field_correlation"] <= 1.0 and result["n4_note"] is None
    assert result["n4_seconds_full"] > 0 and result["n4_seconds_shrunk"] > 0
    assert result["n4_compare_mode"] == "crop"
    assert int(np.prod(result["n4_compare_shape_zyx"])) <= 40000
    assert result["preprocess_subjects"] and len(result["preprocess_subjects"]) == 1
    assert result["peak_rss_mb"] > 100  # TensorFlow alone takes more
    assert isinstance(result["params"], int) and result["params"] > 0
    assert result["params_per_network"] == {"segmentor": result["params"]}
    assert result["labeled_batch_size"] == result["examples_per_step"]
    assert result["unlabeled_batch_size"] == 0  # supervised: no unlabeled stream is consumed
    # The default precision is auto: bf16 where the CPU has native bf16, float32 elsewhere.
    from tfseg import hardware
    assert result["num_replicas"] == 1 and result["mixed_precision_requested"] == "auto"
    assert result["mixed_precision"] == hardware.resolve_mixed_precision("auto").resolved
    assert re.fullmatch(r"2\.\d+\.\d+", result["tensorflow_version"])
    assert re.fullmatch(r"3\.\d+\.\d+", result["keras_version"])
    assert result["cpu_count"] >= 1
    assert result["method"] == "supervised" and result["method_config"]["filters"] == [4, 8]
    # FLOPs: the step is 3x the forward of its one network call (the segmentor on the batch).
    main = result["stages"][result["main_stage"]]
    [call] = main["network_calls"]
    assert call["network"] == "segmentor" and call["training"] is True
    assert call["input_shapes"] == [[result["labeled_batch_size"], *result["input_shape"]]]
    assert result["train_step_flops"] == 3 * main["forward_flops"] > 0
    # The traced step computes both conv gradients, even the unused one of the first layer.
    assert main["train_step_graph_flops"] >= result["train_step_flops"]
    assert result["train_flops_per_s"] == pytest.approx(
        result["train_step_flops"] / result["train_step_s_median"], rel=1e-3)
    peaks = result["peak_flops_per_s"]
    assert set(peaks) == {"float32", "bfloat16"} and min(peaks.values()) > 0
    assert result["fraction_of_peak_train"] == pytest.approx(
        result["train_flops_per_s"] / peaks[result["peak_dtype"]], rel=1e-3)
    assert result["inference_flops_per_s"] == pytest.approx(
        result["inference_flops_per_volume"] / result["inference_s_per_volume"], rel=1e-3)
    assert result["fraction_of_peak_inference"] > 0
    # Overhead: the step against the reference, timed in turns.
    assert result["overhead_ratio"] == pytest.approx(
        result["train_step_s_median"] / result["reference_step_s_median"], rel=1e-3)
    assert main["overhead_ratio_constant_input"] > 0 and main["overhead_ratio_min"] > 0


def test_2d_synthetic_cardiac_with_two_stages(tmp_path, capsys, monkeypatch):
    """The 2D paper U-Net's settings with tiny filters; the method gets a two-stage schedule so
    the per-stage measurement (begin_stage, fresh train function) is exercised."""
    from tfseg.methods import supervised
    from tfseg.methods.base import Stage

    begun = []
    monkeypatch.setattr(supervised.Supervised, "stages", lambda self: [
        Stage("pretrain", 50), Stage("skipped", 0), Stage("train", 100)])
    monkeypatch.setattr(supervised.Supervised, "begin_stage",
                        lambda self, stage: begun.append(stage.name))
    from tfseg import hardware

    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx2"}))
    records = write_tiny_records(str(tmp_path / "records"))
    result = _run(tmp_path, capsys, "synthetic_cardiac", "--batch_size=3",
                  f"--records_dir={records}", f"--split={tiny_split_file(str(tmp_path))}",
                  "--mixed_precision=auto", "--compare_precision")
    _check_common(result)
    assert result["mixed_precision_requested"] == "auto"  # resolved "none": no bf16 flag
    assert "none of avx512_bf16" in result["mixed_precision_reason"]
    assert result["peak_dtype"] == "float32"
    steps = result["precision_step_s_median"]
    assert set(steps) == {"none", "bf16"} and min(steps.values()) > 0
    assert result["bf16_speedup"] == pytest.approx(steps["none"] / steps["bf16"], rel=1e-3)
    assert "tile_compare" not in result  # 2D: slices, no tiles
    # Each measured stage, then the main stage again for the precision comparison (on this
    # method and on its bf16 twin).
    assert begun == ["pretrain", "train", "train", "train"]
    assert set(result["stages"]) == {"pretrain", "train"} and result["main_stage"] == "train"
    main = result["stages"]["train"]
    for key in ("train_step_s_median", "train_examples_per_s", "pipeline_examples_per_s",
                "pipeline_to_train_ratio"):
        assert result[key] == main[key]
        assert result["stages"]["pretrain"][key] > 0
    assert main["steps_in_schedule"] == 100
    assert result["spatial_dims"] == 2 and result["input_shape"] == [16, 16, 1]
    assert result["labeled_batch_size"] == 3 and result["method_config"]["batch_size"] == 3
    assert result["method_config"]["norm"] == "batch"  # the task-driven paper's 2D U-Net
    assert result["inference_tile_zyx"] is None
    assert result["inference_subject"] == "p03"  # the validation patient
    assert result["inference_volume_shape"] == [4, 16, 16, 1]
    assert result["split"] == "tiny" and result["records_dir"] == records
    assert result["preprocess_subjects"] == ["patient001_ES"]  # the real scans, timed


def test_3d_synthetic_brain(tmp_path, capsys):
    result = _run(tmp_path, capsys, "synthetic_brain", "--set=batch_size=2")
    _check_common(result)
    assert result["records_dir"].startswith(str(tmp_path / "records_root" / "synthetic_brain"))
    assert result["split"] == "fewshot_n1"  # the dataset's default split, as launch.train
    assert list(result["stages"]) == ["train"] and result["main_stage"] == "train"
    assert result["spatial_dims"] == 3 and result["input_shape"] == [32, 32, 32, 2]
    assert result["method_config"]["norm"] == "weight"  # the few-shot GAN paper's U-Net
    # Evaluation's default tile: the 32³ training patch.
    assert result["inference_volume_shape"] == [64, 80, 64, 2]
    assert result["inference_tile_zyx"] == [32, 32, 32]
    # Large tiles against 32³ tiles at overlap 0.5 on the same (test) subjects.
    assert result["tile_compare_subjects"] == 2
    large, small = result["tile_compare"]["large"], result["tile_compare"]["small"]
    assert large["tile_zyx"] == [128, 128, 128] and small["tile_zyx"] == [32, 32, 32]
    assert small["overlap"] == 0.5
    for figures in (large, small):
        assert len(figures["mean_dice"]) == 2 and all(0 <= d <= 1 for d in figures["mean_dice"])
        assert figures["s_per_volume"] > 0
    assert 0.5 < result["tile_compare_voxel_agreement"] <= 1.0
    assert 0 <= result["tile_compare_max_probability_difference"] < 1.0


@pytest.mark.parametrize("argv, message", [
    (["--method=nope", "--dataset=synthetic_cardiac"],
     r"unknown --method=nope\. Available: .*supervised"),
    (["--method=supervised", "--dataset=nope"], r"unknown --dataset=nope\. Available: "),
    (["--dataset=synthetic_cardiac"], r"--method is required"),
    (["--method=supervised", "--dataset=synthetic_cardiac", "--set=filterz=4"],
     r"has no field 'filterz'"),
    (["--method=supervised", "--dataset=synthetic_cardiac", "--n4_compare=maybe"],
     r"n4_compare='maybe'; choose one of \['auto', 'full', 'crop', 'none'\]"),
    (["--method=supervised", "--dataset=synthetic_cardiac", "--steps=0"], r"steps must be >= 1"),
])
def test_bad_flags_exit_2_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        benchmark_cli.main(["launch.benchmark", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("launch.benchmark: error: ")
    assert re.search(message, err), err


def test_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        benchmark_cli.main(["launch.benchmark", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in ("method", "dataset", "data_dir", "batch_size", "preset", "set", "steps",
                 "warmup", "mixed_precision", "n4_subjects", "n4_compare", "records_root",
                 "inference_repeats", "output", "overhead", "tile_compare_subjects",
                 "peak_size", "compare_precision"):
        assert re.search(rf"--(\[no\])?{name}: ", out), name


# --------------------------------------------------------------------------- pieces
def test_n4_comparison_volume_crops_to_the_budget_and_moves_the_origin():
    volume = np.arange(10 * 100 * 120, dtype=np.float32).reshape(10, 100, 120)
    meta = ImageMeta((1.5, 2.0, 8.0), (10.0, 20.0, 30.0), tuple(np.eye(3).ravel()), (120, 100, 10))
    same, same_meta, mode = benchmark.n4_comparison_volume(volume, meta, "auto", 10 ** 6)
    assert mode == "full" and same is volume and same_meta == meta
    crop, crop_meta, mode = benchmark.n4_comparison_volume(volume, meta, "auto", 30000)
    assert mode == "crop"
    # z (10 slices) is kept whole; y and x shrink by the same factor: sqrt(30000/120000) = 1/2.
    assert crop.shape == (10, 50, 60) and crop_meta.size_xyz == (60, 50, 10)
    assert crop[0, 0, 0] == volume[0, 25, 30]  # centre crop
    assert crop_meta.origin_xyz == pytest.approx((10.0 + 30 * 1.5, 20.0 + 25 * 2.0, 30.0))
    assert crop_meta.spacing_xyz == meta.spacing_xyz
    full, _, mode = benchmark.n4_comparison_volume(volume, meta, "full", 10)
    assert mode == "full" and full is volume


def test_ct_dataset_reports_null_n4_figures_with_a_reason(monkeypatch):
    """A dataset without N4 (CT): one timing, no N4 comparison, a reason instead."""
    import preprocessing.config
    from tfseg.datasets import get_dataset

    monkeypatch.setattr(preprocessing.config, "dataset_uses_n4", lambda dataset: False)
    config = benchmark.BenchmarkConfig(method="supervised", dataset="synthetic_brain",
                                       n4_subjects=1)
    out = benchmark._measure_preprocessing(config, get_dataset("synthetic_brain"), {})
    assert out["n4_speedup"] is None and out["n4_field_correlation"] is None
    assert out["preprocess_n4_s_per_subject"] is None
    assert "not MR" in out["n4_note"]
    assert out["preprocess_s_per_subject"] == out["preprocess_s_per_subject_no_n4"] > 0


def test_network_parameters_lists_every_network():
    import keras

    class Two(keras.Model):
        def __init__(self):
            super().__init__()
            self.segmentor = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
            self.teacher = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4)])
            self.optimizer_networks = {"seg_optimizer": (self.segmentor,)}
            # A view of the segmentor's weights (like fm_gan's feature extractor): not counted.
            self.features = keras.Model(self.segmentor.inputs, self.segmentor.outputs)

    assert benchmark.network_parameters(Two()) == {"segmentor": 8, "teacher": 16}


# --------------------------------------------------------------------------- FLOPs, overhead
def _tiny_network():
    import keras

    return keras.Sequential([keras.Input((8, 8, 2)), keras.layers.Conv2D(5, 3, padding="same"),
                             keras.layers.Conv2DTranspose(3, 2, strides=2),
                             keras.layers.Flatten(), keras.layers.Dense(7)])


def test_flops_are_counted_from_the_layer_shapes():
    import keras
    import tensorflow as tf
    from tfseg import flops

    model = _tiny_network()
    conv = 8 * 8 * 5 * (3 * 3 * 2)          # output positions x channels x kernel x inputs
    transposed = 8 * 8 * 5 * (2 * 2 * 3)    # input positions x in channels x kernel x out
    dense = (16 * 16 * 3) * 7
    assert flops.forward_flops(model, (1, 8, 8, 2)) == 2 * (conv + transposed + dense)
    assert flops.forward_flops(model, (4, 8, 8, 2)) == 4 * 2 * (conv + transposed + dense)

    def step(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(model(x, training=True))
        return tape.gradient(loss, model.trainable_variables)

    counted = flops.count_function_flops(step, tf.TensorSpec((1, 8, 8, 2)))
    assert counted["unknown"] == 0
    # Forward, gradient to each layer's input (TF emits it for the first conv too) and to
    # each layer's weights: 3x the forward.
    assert counted["by_op"] == {"Conv2D": 2 * (conv + transposed),
                                "Conv2DBackpropInput": 2 * (transposed + conv),
                                "Conv2DBackpropFilter": 2 * (conv + transposed),
                                "MatMul": 3 * 2 * dense}
    assert counted["flops"] == 3 * flops.forward_flops(model, (1, 8, 8, 2))
    volume = keras.Sequential([keras.Input((4, 4, 4, 1)), keras.layers.Conv3D(2, 3,
                                                                               padding="same")])
    assert flops.forward_flops(volume, (1, 4, 4, 4, 1)) == 2 * 64 * 2 * 27


def test_matmul_peak_is_measured_in_both_dtypes():
    from tfseg import flops

    for dtype in ("float32", "bfloat16"):
        peak = flops.matmul_peak(dtype, size=128, repeats=2, min_seconds=0.01)
        assert peak["dtype"] == dtype and peak["flops_per_s"] >= peak["flops_per_s_median"] > 0


def test_inference_voxels_follow_predict_volumes_batches_and_tiles():
    from tfseg import benchmark_inference as inference

    # 2D: 10 slices in batches of 4 (the last one padded), 20x30 padded to 32x32.
    assert inference.inference_voxels((10, 20, 30), 2, None, 0.5, 4, 16) == 12 * 32 * 32
    # 3D: 40³ with 32³ tiles at overlap 0.5: starts 0 and 8 per axis, 8 tiles in 2 batches of 4.
    assert inference.inference_voxels((40, 40, 40), 3, (32, 32, 32), 0.5, 4, 16) == 8 * 32 ** 3
    # A tile larger than the volume shrinks to it (rounded up to the multiple): one tile.
    assert inference.inference_voxels((20, 40, 40), 3, (128, 128, 128), 0.5, 4, 16) == \
        32 * 48 * 48
    assert inference.effective_tile((128, 128, 128), (20, 40, 40), 16) == [32, 48, 48]


def _tiny_supervised(batch=2):
    import tensorflow as tf
    from tfseg.methods import DataSpec, get_method_module, resolve_config

    spec = DataSpec(2, 1, 3, ("bg", "a", "b"), (16, 16))
    module = get_method_module("supervised")
    method = module.build(resolve_config(module, None, ["filters=4,8", f"batch_size={batch}"]),
                          spec)
    method.compile()
    rng = np.random.default_rng(0)
    batch_data = {"labeled": {"image": tf.constant(rng.normal(size=(batch, 16, 16, 1)),
                                                   tf.float32),
                              "label": tf.constant(rng.integers(0, 3, (batch, 16, 16)),
                                                   tf.int32)},
                  "unlabeled": {"image": tf.zeros((1, 16, 16, 1))}}
    return method, batch_data


def test_the_reference_step_makes_the_recorded_calls_and_trains_only_their_networks():
    import keras
    from tfseg import overhead

    method, batch = _tiny_supervised()
    before = [w.numpy().copy() for w in method.segmentor.trainable_weights]
    iterations = int(method.seg_optimizer.iterations.numpy())
    calls, concrete = overhead.record_network_calls(method, batch)
    assert [(c.network, c.input_shapes, c.training) for c in calls] == [
        (method.segmentor, [[2, 16, 16, 1]], True)]
    assert concrete.graph.get_operations()  # the traced step
    # Tracing ran nothing.
    assert all(np.array_equal(a, w.numpy()) for a, w in
               zip(before, method.segmentor.trainable_weights))
    # The reference's loss (returned before its update) is the class-weighted cross-entropy
    # of the segmentor on the step's own batch.
    import tensorflow as tf
    logits = method.segmentor(batch["labeled"]["image"], training=True)
    labels = batch["labeled"]["label"]
    weights = tf.gather(tf.constant(method.config.class_weights, tf.float32), labels)
    expected = float(tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels, logits) * weights))
    step = overhead.reference_step(method, calls, method.config.class_weights, batch)
    assert float(step()) == pytest.approx(expected, rel=1e-5)
    changed = [not np.array_equal(a, w.numpy()) for a, w in
               zip(before, method.segmentor.trainable_weights)]
    assert all(changed)
    assert int(method.seg_optimizer.iterations.numpy()) == iterations  # its own optimizer
    assert keras.layers.Layer.__call__.__name__ == "__call__"  # the recorder is removed
    timed = overhead.time_interleaved({"a": step, "b": lambda: None}, steps=2, warmup=1)
    assert set(timed) == {"a", "b"} and timed["a"]["min_s"] <= timed["a"]["median_s"]


def test_only_top_level_network_calls_are_recorded():
    """A network calling another inside its own call counts once; two calls of the same
    network (e.g. a discriminator on real and fake) count twice."""
    import keras
    import tensorflow as tf
    from tfseg import overhead

    inner = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4)], name="inner")
    outer_in = keras.Input((4,))
    outer = keras.Model(outer_in, keras.layers.Dense(3)(inner(outer_in)), name="outer")
    critic = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)], name="critic")

    class Toy(keras.Model):
        def __init__(self):
            super().__init__()
            self.outer, self.critic = outer, critic

        def train_step(self, data):
            fake = self.outer(data["x"], training=True)
            return {"loss": tf.reduce_mean(self.critic(fake, training=False))
                    + tf.reduce_mean(self.critic(data["y"], training=True))}

    toy = Toy()
    calls, _ = overhead.record_network_calls(
        toy, {"x": tf.zeros((5, 4)), "y": tf.zeros((6, 3))})
    assert [(c.network.name, c.input_shapes, c.training) for c in calls] == [
        ("outer", [[5, 4]], True), ("critic", [[5, 3]], False), ("critic", [[6, 3]], True)]


def test_inference_run_dir_uses_the_runs_predictor_and_test_subjects(tmp_path, monkeypatch):
    """--inference_run_dir: inference and the 3D tile comparison use the run's (trained)
    predictor, records and held-back subjects instead of the benchmark's own."""
    import types

    import tfseg.run
    from tfseg.data import pipeline, splits
    from tfseg.methods import get_method_module, resolve_config

    records = write_tiny_records(str(tmp_path / "records"), spatial_dims=3, num_labeled=6)
    manifest = pipeline.load_manifest(records)
    spec = pipeline.dataset_facts(manifest)
    module = get_method_module("supervised")
    method_config = resolve_config(module, None, ["filters=4,8", "batch_size=2"])
    method = module.build(method_config, spec)
    trained = module.build_predictor(method_config, spec)
    run = types.SimpleNamespace(predictor=trained, size_multiple=method.size_multiple,
                                data_spec=spec, records_dir=records, manifest=manifest,
                                split={"val": ["p05"], "test": ["p04"]})
    loaded = []
    monkeypatch.setattr(tfseg.run, "load_run", lambda path: loaded.append(path) or run)
    split = splits.load_split(tiny_split_file(str(tmp_path)))  # val p03, test p04 p05
    config = benchmark.BenchmarkConfig(method="supervised", dataset="synthetic_brain",
                                       inference_run_dir="some/run", inference_repeats=1,
                                       tile_compare_subjects=5)
    result = benchmark._measure_inference(config, method, records, manifest, split, spec)
    assert loaded == ["some/run"] and result["inference_run_dir"] == "some/run"
    assert result["inference_subject"] == "p05"  # the run's validation subject, not p03
    assert result["tile_compare_subjects"] == 2  # the run's test + val subjects (p04, p05)
    # Both settings cover the 16³ volume with one tile: the same answer.
    assert result["tile_compare_voxel_agreement"] == 1.0
    assert result["tile_compare"]["large"]["mean_dice"] == \
        result["tile_compare"]["small"]["mean_dice"]


def _stage_cases():
    from test_methods import _method_cases
    return list(_method_cases())


@pytest.mark.parametrize("name, spatial_dims", _stage_cases())
def test_the_reference_step_does_the_convolution_work_of_every_methods_step(name, spatial_dims):
    """For every method and stage (quick preset, tiny shapes), the reference built from the
    traced step asks for the same gradients and does exactly the same convolution and matmul
    work as the step itself (FLOPs counted in both traced graphs: the same forward calls and,
    per gradient, the same backward passes), so `overhead_ratio` measures only what the step
    does besides its networks' passes. Nothing runs: both are traced."""
    import tensorflow as tf
    from tfseg import flops as flops_lib
    from tfseg import overhead
    from tfseg.methods import get_method_module, resolve_config
    from test_methods import _fake_batches, _spec

    module = get_method_module(name)
    spec = _spec(spatial_dims, num_channels=2 if spatial_dims == 3 else 1,
                 size=max(16, getattr(module, "MIN_EXAMPLE_SIZE", 16)))
    method = module.build(resolve_config(module, "quick"), spec)
    method.compile()
    batch = next(iter(_fake_batches(spec, method.labeled_batch_size,
                                    method.unlabeled_batch_size)))
    for stage in method.stages():
        method.begin_stage(stage)
        trace = overhead.record_step(method, batch)
        assert trace.calls and trace.gradients, stage.name
        assert all(g.calls for g in trace.gradients), stage.name
        reference = overhead.reference_step(method, trace, None, batch)
        step_flops = flops_lib.count_graph_flops(trace.concrete.graph)
        reference_flops = flops_lib.count_graph_flops(
            reference.get_concrete_function().graph)
        assert step_flops["unknown"] == 0, stage.name
        assert reference_flops["by_op"] == step_flops["by_op"], stage.name
    assert tf.GradientTape.gradient.__name__ == "gradient"  # the recorder is removed


def test_the_reference_follows_the_data_flow_between_networks():
    """A generator feeding a segmentor and a critic, three optimizers: the trace links the
    calls, each gradient names the calls its loss depends on (a stop_gradient cuts the link),
    and the reference back-propagates each loss exactly as far as the step does."""
    import keras
    import tensorflow as tf
    from tfseg import flops as flops_lib
    from tfseg import overhead

    def dense(name, units, inputs):
        x = keras.Input((inputs,))
        return keras.Model(x, keras.layers.Dense(units)(x), name=name)

    class Toy(keras.Model):
        def __init__(self):
            super().__init__()
            self.gen, self.seg, self.critic = dense("gen", 6, 6), dense("seg", 3, 6), \
                dense("critic", 1, 6)
            self.segmentor = self.seg
            self.opts = [keras.optimizers.SGD(0.1) for _ in range(3)]
            for opt, net in zip(self.opts, (self.seg, self.critic, self.gen)):
                opt.build(net.trainable_variables)

        def train_step(self, data):
            x = data["x"]
            with tf.GradientTape(persistent=True) as tape:
                fake = self.gen(x, training=True)
                seg_loss = tf.reduce_mean(self.seg(fake, training=True) ** 2)
                critic_loss = tf.reduce_mean(self.critic(tf.stop_gradient(fake), training=True))
                gen_loss = seg_loss + tf.reduce_mean(self.critic(fake, training=True))
            for opt, net, loss in zip(self.opts, (self.seg, self.critic, self.gen),
                                      (seg_loss, critic_loss, gen_loss)):
                grads = tape.gradient(loss, net.trainable_variables)
                opt.apply_gradients(zip(grads, net.trainable_variables))
            return {"loss": seg_loss}

    toy = Toy()
    batch = {"x": tf.ones((5, 6))}
    trace = overhead.record_step(toy, batch)
    assert [(c.network.name, c.inputs_from) for c in trace.calls] == [
        ("gen", []), ("seg", [0]), ("critic", []), ("critic", [0])]
    assert [g.calls for g in trace.gradients] == [[0, 1], [2], [0, 1, 3]]
    assert [len(g.variables) for g in trace.gradients] == [2, 2, 2]
    reference = overhead.reference_step(toy, trace, None, batch)
    step_flops = flops_lib.count_graph_flops(trace.concrete.graph)["by_op"]
    assert flops_lib.count_graph_flops(reference.get_concrete_function().graph)["by_op"] == \
        step_flops
    # The coarser reference (every call, one loss, one backward pass) does less: it never
    # back-propagates the generator's loss through the segmentor and the critic.
    coarse = overhead.reference_step(toy, trace.calls, None, batch)
    assert flops_lib.count_graph_flops(coarse.get_concrete_function().graph)["by_op"][
        "MatMul"] < step_flops["MatMul"]
    before = [w.numpy().copy() for w in toy.gen.trainable_weights]
    reference()
    assert all(not np.array_equal(b, w.numpy()) for b, w in zip(before,
                                                                toy.gen.trainable_weights))
