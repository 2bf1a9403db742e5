"""tfseg.train / tfseg.callbacks / tfseg.distribute on tiny hand-made records (no preprocessing).

The records are written with `schema.encode_example` and a manifest dict, so these tests do not
depend on the preprocessing stage: 16×16 slices (2D) or 16³ volumes (3D) of a few patients with
two foreground shapes of distinct intensities, learnable by a 2-level network in tens of steps.
"""
from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest

from tfseg.data import schema

# Tiny supervised network and schedule for every run below.
TINY = ("filters=4,8", "batch_size=4", "norm=none")


def _volume(rng, shape_zyx, labeled):
    """(image (Z, H, W, 1), label (Z, H, W)): a bright square (class 1) and a dim bar (class 2)."""
    label = np.zeros(shape_zyx, np.uint8)
    z, h, w = shape_zyx
    for k in range(z):
        y, x = rng.integers(1, h - 7, size=2)
        label[k, y:y + 5, x:x + 5] = 1
        y2 = rng.integers(0, h - 2)
        label[k, y2:y2 + 2, 1:w - 1] = np.where(label[k, y2:y2 + 2, 1:w - 1] == 0, 2, 1)
    intensity = np.array([0.0, 1.0, 0.5], np.float32)[label]
    image = intensity + rng.normal(0, 0.1, shape_zyx).astype(np.float32)
    return image[..., None], (label if labeled else None)


def write_tiny_records(folder, spatial_dims=2, num_labeled=6, num_unlabeled=2, size=16,
                       dataset="synthetic_cardiac", seed=0):
    """Writes shards + manifest.json of a tiny dataset; returns the folder.

    Patients "p00".. are labeled, "u00".. unlabeled. 2D: 4 slices of size² per subject, one
    example per slice; 3D: one example per subject with patch corners on a stride-4 grid.
    """
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    subjects = {}
    ids = [(f"p{i:02d}", True) for i in range(num_labeled)]
    ids += [(f"u{i:02d}", False) for i in range(num_unlabeled)]
    shape = (4, size, size) if spatial_dims == 2 else (size, size, size)
    patch = [size // 2] * 3
    for patient, labeled in ids:
        image, label = _volume(rng, shape, labeled)
        shard = f"{patient}.tfrecord"
        import tensorflow as tf
        with tf.io.TFRecordWriter(os.path.join(folder, shard)) as writer:
            if spatial_dims == 2:
                for k in range(shape[0]):
                    writer.write(schema.encode_example(
                        image[k], None if label is None else label[k], patient, index=k))
            else:
                corners = np.array([(z, y, x) for z in range(0, size - patch[0] + 1, 4)
                                    for y in range(0, size - patch[1] + 1, 4)
                                    for x in range(0, size - patch[2] + 1, 4)])
                writer.write(schema.encode_example(image, label, patient, patch_corners=corners))
        subjects[patient] = {
            "patient_id": patient, "labeled": labeled, "image_paths": [], "label_path": None,
            "shard": shard, "sha256": "", "num_examples": shape[0] if spatial_dims == 2 else 1,
            "shape_zyx": list(shape), "original": {}, "geometry": {}, "extra": {}}
    manifest = {"schema_version": schema.SCHEMA_VERSION, "dataset": dataset,
                "dataset_options": {}, "fingerprint": "tiny", "spatial_dims": spatial_dims,
                "settings": {"patch_size_zyx": patch if spatial_dims == 3 else None},
                "modalities": ["mr"], "class_names": ["background", "square", "bar"],
                "label_values": [0, 1, 2], "subjects": subjects, "skipped": {}}
    with open(os.path.join(folder, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    return folder


def tiny_split_file(folder, labeled=("p00", "p01", "p02"), val=("p03",), test=("p04", "p05"),
                    unlabeled=("u00", "u01"), name="tiny"):
    path = os.path.join(folder, f"{name}_split.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"name": name, "labeled": list(labeled), "unlabeled": list(unlabeled),
                   "val": list(val), "test": list(test), "seed": None}, f)
    return path


def train_config(tmp_path, records, **kwargs):
    from tfseg.train import TrainConfig

    if "split" not in kwargs:
        kwargs["split"] = tiny_split_file(str(tmp_path))
    defaults = dict(method="supervised", dataset="synthetic_cardiac", records_dir=records,
                    records_root=str(tmp_path / "records_root"),
                    run_dir=str(tmp_path / "run"), steps=8, validation_every=4,
                    overrides=TINY, evaluate=False, export=False,
                    verbose=0, summary_every=2)
    defaults.update(kwargs)
    return TrainConfig(**defaults)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return write_tiny_records(str(tmp_path_factory.mktemp("records")))


def _log_rows(run_dir):
    with open(os.path.join(run_dir, "train_log.csv"), newline="") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------- pieces
def test_plan_stages_lays_stages_on_one_axis():
    from tfseg.callbacks import plan_stages
    from tfseg.methods.base import Stage

    plans = plan_stages([Stage("pre", 6), Stage("skip", 0), Stage("main", 20)], 10)
    assert [(p.key, p.steps_per_epoch, p.epoch_offset, p.end_epoch, p.step_offset)
            for p in plans] == [("0_pre", 6, 0, 1, 0), ("2_main", 10, 1, 3, 6)]
    assert plans[1].global_step(1) == 16 and plans[1].global_step(2, batch=3) == 20
    with pytest.raises(ValueError, match=r"25 steps is not a multiple of validation_every=10.*"
                                         r"--steps=30"):
        plan_stages([Stage("train", 25)], 10)


def test_validation_and_evaluation_share_one_dice_golden_values():
    from tfseg.metrics.volume import dice_scores

    truth = np.array([[0, 1, 1, 2], [0, 0, 1, 2]])
    pred = np.array([[0, 1, 0, 2], [0, 1, 1, 0]])
    # class 0: |P|=4 |T|=3 overlap 2 -> 4/7; class 1: |P|=3 |T|=3 overlap 2 -> 4/6;
    # class 2: |P|=1 |T|=2 overlap 1 -> 2/3; class 3 absent from both -> 1 (docs/evaluation.md).
    masks = lambda a: np.stack([a == k for k in range(4)], -1)  # noqa: E731
    np.testing.assert_allclose(dice_scores(masks(pred), masks(truth)), [4 / 7, 4 / 6, 2 / 3, 1.0])
    # evaluation's per-mask metrics use the same function
    from tfseg.metrics.volume import binary_metrics
    assert binary_metrics(pred == 1, truth == 1, (1.0, 1.0))["dice"] == pytest.approx(4 / 6)


def test_train_log_keeps_union_of_columns_and_truncates(tmp_path):
    from tfseg.callbacks import TrainLog

    path = str(tmp_path / "train_log.csv")
    log = TrainLog(path)
    log.append({"stage": "pre", "step": 4, "loss": 0.5})
    log.append({"stage": "main", "step": 8, "loss": 0.25, "disc_loss": 1.0})
    rows = TrainLog(path).rows
    assert [r["step"] for r in rows] == ["4", "8"] and rows[0]["disc_loss"] == ""
    again = TrainLog(path)
    again.truncate(4)
    again.append({"stage": "main", "step": 8, "loss": 0.125})
    assert [(r["step"], r["loss"]) for r in TrainLog(path).rows] == [("4", "0.5"), ("8", "0.125")]
    assert os.listdir(tmp_path) == ["train_log.csv"]  # no temporary left behind


def test_training_state_restores_weights_optimizer_and_falls_back(tmp_path):
    """Round trip of every network and optimizer; a corrupt latest round falls back to the
    previous one; half-written (.tmp) rounds are ignored."""
    from tfseg.callbacks import StagePlan, TrainingState
    from tfseg.methods import supervised
    from tfseg.methods.base import DataSpec, Stage

    spec = DataSpec(2, 1, 3, ("bg", "a", "b"), (16, 16))
    config = supervised.Config(filters=(4, 8), batch_size=2, norm="none")

    def fresh():
        method = supervised.build(config, spec)
        method.compile()
        return method

    method = fresh()
    element = {"labeled": {"image": np.random.rand(2, 16, 16, 1).astype(np.float32),
                           "label": np.random.randint(0, 3, (2, 16, 16)).astype(np.int32)},
               "unlabeled": {"image": np.zeros((1, 16, 16, 1), np.float32)}}
    import tensorflow as tf
    method.fit(tf.data.Dataset.from_tensors(element).repeat(), steps_per_epoch=3, epochs=1,
               verbose=0)
    plan = StagePlan(0, Stage("train", 6), 3, 0, 0)
    state = TrainingState(str(tmp_path), str(tmp_path), keep=2)
    state.save(method, plan, {"epoch": 1, "step": 3})
    expected = [w.numpy().copy() for w in method.weights]
    expected_slots = [v.numpy().copy() for v in method.seg_optimizer.variables]
    method.fit(tf.data.Dataset.from_tensors(element).repeat(), steps_per_epoch=3, epochs=1,
               verbose=0)
    state.save(method, plan, {"epoch": 2, "step": 6})
    os.makedirs(tmp_path / "0_train" / "round_000000009.tmp")  # a kill mid-write
    restored = fresh()
    assert state.restore(restored, plan)["step"] == 6
    assert int(restored.seg_optimizer.iterations) == 6
    with open(tmp_path / "0_train" / "round_000000006" / "method.weights.h5", "wb") as f:
        f.write(b"truncated")
    restored = fresh()
    assert state.restore(restored, plan) == {"epoch": 1, "step": 3}
    assert int(restored.seg_optimizer.iterations) == 3
    for a, b in zip(expected, restored.weights):
        np.testing.assert_array_equal(a, b.numpy())
    for a, b in zip(expected_slots, restored.seg_optimizer.variables):
        np.testing.assert_array_equal(a, b.numpy())
    state.clear(plan)
    assert state.restore(fresh(), plan) is None


# --------------------------------------------------------------------------- run_training
def _tensorboard_tags(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for name in os.listdir(folder):
        events = EventAccumulator(os.path.join(folder, name), size_guidance={"tensors": 0})
        events.Reload()
        tags.update(events.Tags()["tensors"])
    return tags


def test_run_training_writes_the_run_folder_and_reruns_are_idempotent(tmp_path, records):
    from tfseg.methods import supervised
    from tfseg.methods.base import DataSpec
    from tfseg.train import run_training

    config = train_config(tmp_path, records)
    summary = run_training(config)
    run = config.run_dir
    assert summary["run_dir"] == run and summary["checkpoint_policy"] == "best_val"
    assert summary["steps"] == 8 and summary["best_step"] in (4, 8)
    with open(os.path.join(run, "config.json")) as f:
        saved = json.load(f)
    assert saved["method"] == "supervised" and saved["dataset"] == "synthetic_cardiac"
    assert saved["method_config"]["filters"] == [4, 8]
    assert saved["method_config"]["norm"] == "none"
    assert saved["method_config"]["learning_rate"] == 1e-3  # resolved 2D default
    assert saved["split"]["val"] == ["p03"] and saved["split"]["test"] == ["p04", "p05"]
    assert saved["data_spec"]["example_shape"] == [16, 16]
    assert saved["train"]["steps"] == 8 and saved["size_multiple"] == 2
    assert saved["schema_version"] == schema.SCHEMA_VERSION and saved["git_commit"]
    assert saved["checkpoint_policy"] == "best_val"
    rows = _log_rows(run)
    assert [int(r["step"]) for r in rows] == [4, 8]
    assert {"loss", "seg_grad_norm", "lr_seg_optimizer", "val_mean_dice", "val_dice_square",
            "val_dice_bar"} <= set(rows[0])
    best_row = max(rows, key=lambda r: float(r["val_mean_dice"]))
    assert summary["best_val_mean_dice"] == pytest.approx(float(best_row["val_mean_dice"]),
                                                          rel=1e-5)
    assert int(best_row["step"]) == summary["best_step"]
    # The selected checkpoint: the whole method, and the predictor alone, agree.
    spec = DataSpec.from_dict(saved["data_spec"])
    method = supervised.build(supervised.resolve(
        supervised.Config(filters=(4, 8), norm="none", batch_size=4), spec), spec)
    method.compile()
    method.load_weights(os.path.join(run, "checkpoints", "best.weights.h5"))
    predictor = supervised.build_predictor(supervised.Config(filters=(4, 8), norm="none"), spec)
    predictor.load_weights(os.path.join(run, "checkpoints", "predictor.weights.h5"))
    assert len(predictor.weights) == len(method.segmentor.weights)
    for a, b in zip(method.segmentor.weights, predictor.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert not os.listdir(os.path.join(run, "checkpoints", "backup"))  # cleared when done
    assert {"train/loss", "train/seg_grad_norm", "learning_rate/seg_optimizer"} <= \
        _tensorboard_tags(os.path.join(run, "tensorboard", "train"))
    assert {"val/mean_dice", "val/dice_square", "val/dice_bar",
            "val/input_truth_prediction"} <= \
        _tensorboard_tags(os.path.join(run, "tensorboard", "validation"))
    assert os.path.isfile(os.path.join(str(tmp_path / "records_root"), "synthetic_cardiac",
                                       "splits", "tiny.json"))

    # The same command again: nothing is retrained, the selection is kept.
    again = run_training(config)
    assert again["best_step"] == summary["best_step"]
    assert again["best_val_mean_dice"] == summary["best_val_mean_dice"]
    assert _log_rows(run) == rows

    # Other settings in the same folder are refused.
    import dataclasses
    with pytest.raises(ValueError, match=r"already holds a run with other settings \(differs "
                                         r"in: method_config\)"):
        run_training(dataclasses.replace(config, overrides=TINY + ("learning_rate=0.01",)))


def test_non_finite_loss_stops_before_any_checkpoint(tmp_path):
    from tfseg.train import run_training

    records = write_tiny_records(str(tmp_path / "records"))
    # Corrupt one labeled patient's slices with NaN (every training batch meets it quickly).
    import tensorflow as tf
    shard = os.path.join(records, "p00.tfrecord")
    examples = [schema.decode_example_numpy(b) for b in
                tf.data.TFRecordDataset(shard).as_numpy_iterator()]
    with tf.io.TFRecordWriter(shard) as writer:
        for e in examples:
            writer.write(schema.encode_example(np.full_like(e["image"], np.nan), e["label"],
                                               "p00", index=e["index"]))
    config = train_config(tmp_path, records, split=tiny_split_file(
        str(tmp_path), labeled=("p00",), name="nan"))
    with pytest.raises(FloatingPointError, match=r"loss term \w+ became nan at step 1\b"):
        run_training(config)
    checkpoints = os.path.join(config.run_dir, "checkpoints")
    assert not os.path.exists(os.path.join(checkpoints, "best.weights.h5"))
    assert not os.path.exists(os.path.join(checkpoints, "predictor.weights.h5"))
    assert not os.path.exists(os.path.join(config.run_dir, "train_log.csv"))


def test_3d_drawn_split_bf16_default_run_dir(tmp_path, monkeypatch):
    import keras
    from tfseg.train import run_training

    records = write_tiny_records(str(tmp_path / "records3d"), spatial_dims=3, num_labeled=5)
    monkeypatch.chdir(tmp_path)
    config = train_config(tmp_path, records, split=None, labeled=2, split_seed=1, num_val=1,
                          num_test=1, run_dir=None, mixed_precision="bf16", steps=4,
                          validation_every=2, overrides=("filters=4,8", "batch_size=4"))
    summary = run_training(config)
    assert summary["run_dir"] == os.path.join("runs", "synthetic_cardiac", "labeled2_seed1",
                                              "supervised", "seed1")
    assert keras.mixed_precision.global_policy().name == "float32"  # restored
    rows = _log_rows(summary["run_dir"])
    assert [int(r["step"]) for r in rows] == [2, 4]
    assert all(np.isfinite(float(r["loss"])) for r in rows)
    assert 0.0 <= float(rows[-1]["val_mean_dice"]) <= 1.0
    with open(os.path.join(summary["run_dir"], "config.json")) as f:
        saved = json.load(f)
    assert saved["data_spec"]["example_shape"] == [8, 8, 8]
    assert saved["method_config"]["norm"] == "weight"  # the 3D paper default
    assert saved["split"]["name"] == "labeled2_seed1" and len(saved["split"]["labeled"]) == 2
    assert os.path.isfile(os.path.join(str(tmp_path / "records_root"), "synthetic_cardiac",
                                       "splits", "labeled2_seed1.json"))


def test_bad_records_or_split_are_refused(tmp_path, records):
    from tfseg.train import run_training

    with pytest.raises(ValueError, match=r"are of dataset 'synthetic_cardiac', not 'acdc'"):
        run_training(train_config(tmp_path, records, dataset="acdc"))
    with pytest.raises(ValueError, match=r"either --split=.*tiny_split.json or --labeled=2"):
        run_training(train_config(tmp_path, records, labeled=2))
    with pytest.raises(ValueError, match=r"unknown patient id\(s\) p99"):
        run_training(train_config(tmp_path, records, split=tiny_split_file(
            str(tmp_path), labeled=("p99",), name="bad")))


def test_multi_stage_methods_run_each_stage_once(tmp_path, records, monkeypatch):
    """A two-stage schedule: one fit() per stage on one step axis; the stage without selection
    keeps its last weights; a re-run skips finished stages."""
    import types

    import tfseg.train as train_lib
    from tfseg.methods import supervised
    from tfseg.methods.base import Stage

    began = []

    class TwoStage(supervised.Supervised):
        def stages(self):
            return [Stage("warmup", 4, "no selection", select_best=False),
                    Stage("main", 8, "selected on validation")]

        def begin_stage(self, stage):
            began.append(stage.name)

    module = types.SimpleNamespace(
        Config=supervised.Config, PRESETS=supervised.PRESETS,
        build=lambda config, spec: TwoStage(config, spec, name="two_stage"))
    monkeypatch.setattr(train_lib, "get_method_module", lambda name: module)
    config = train_config(tmp_path, records, steps=None)
    summary = train_lib.run_training(config)
    assert began == ["warmup", "main"] and summary["steps"] == 12
    rows = _log_rows(config.run_dir)
    assert [(r["stage"], int(r["step"])) for r in rows] == [
        ("warmup", 4), ("main", 8), ("main", 12)]
    assert summary["best_step"] in (8, 12)  # selection within the last stage only
    stages = os.path.join(config.run_dir, "checkpoints", "stages")
    assert sorted(os.listdir(stages)) == ["0_warmup.weights.h5", "1_main.weights.h5"]
    began.clear()
    train_lib.run_training(config)
    assert began == [] and _log_rows(config.run_dir) == rows


def test_same_seed_gives_the_same_training_run(tmp_path, records):
    # Paired studies and reproductions rely on it: same split, weights, batches and draws.
    from tfseg.train import run_training

    losses = []
    for name in ("first", "second"):
        config = train_config(tmp_path, records, run_dir=str(tmp_path / name),
                              overrides=TINY + ("augment=affine",))
        run_training(config)
        losses.append([row["loss"] for row in _log_rows(str(tmp_path / name))])
    assert losses[0] == losses[1] and len(losses[0]) == 2


def test_deterministic_runs_are_identical_end_to_end(tmp_path, records):
    """--deterministic: two whole runs (own processes: op determinism is process-wide) give
    bit-identical weights and the same logged losses and validation Dice (these records have no
    raw label files to test on; tests/test_synthetic_tumor.py runs the test metrics)."""
    import hashlib
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    results = []
    for name in ("first", "second"):
        run_dir = tmp_path / name
        argv = [sys.executable, "-m", "launch.train", "--method=supervised",
                "--dataset=synthetic_cardiac", f"--records_dir={records}",
                f"--run_dir={run_dir}", "--split=" + str(tmp_path / "split.json"),
                "--steps=6", "--validation_every=3", "--deterministic", "--noexport",
                "--noevaluate",
                "--set=filters=4,8", "--set=batch_size=2", "--set=augment=affine"]
        if name == "first":
            from tfseg.data.splits import Split, save_split
            save_split(Split("t", labeled=("p00", "p01"), unlabeled=("u00",), val=("p02",),
                             test=("p03", "p04")), str(tmp_path / "split.json"))
        env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2")
        done = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        with open(run_dir / "config.json") as f:
            assert json.load(f)["train"]["deterministic"] is True
        with open(run_dir / "checkpoints" / "predictor.weights.h5", "rb") as f:
            weights = hashlib.sha256(f.read()).hexdigest()
        rows = [{k: v for k, v in row.items() if k != "elapsed_s"}
                for row in _log_rows(str(run_dir))]
        results.append((weights, rows))
    assert results[0] == results[1] and len(results[0][1]) == 2
