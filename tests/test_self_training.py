"""self_training: the pseudo-label loss (hand-computed), the stages, the frozen teacher, and a
tiny run through tfseg.train on hand-made records."""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from tfseg.methods import resolve_config, supervised
from tfseg.methods import self_training
from tfseg.methods.base import DataSpec, Stage

SPEC = DataSpec(2, 1, 3, ("background", "a", "b"), (16, 16))
TINY = dict(filters=(4, 8), norm="none", batch_size=4, unlabeled_batch_size=2, steps=4,
            round_steps=4, validation_every=2, learning_rate=1e-2)


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _batches(seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, (4, 16, 16)).astype(np.int32)
    images = (labels[..., None] / 3 + rng.normal(0, 0.1, (4, 16, 16, 1))).astype(np.float32)
    unlabeled = rng.normal(0.3, 0.3, (2, 16, 16, 1)).astype(np.float32)
    return tf.data.Dataset.from_tensors(
        {"labeled": {"image": images, "label": labels},
         "unlabeled": {"image": unlabeled}}).repeat()


def _method(**changes):
    config = dataclasses.replace(self_training.Config(), **{**TINY, **changes})
    method = self_training.build(config, SPEC)
    method.compile()
    return method


# --------------------------------------------------------------------------- the loss
def test_pseudo_label_loss_masks_low_confidence_voxels_golden():
    # 4 voxels, 2 classes. Teacher probabilities of class 0: 0.9, 0.6, 0.2, 0.45.
    p0 = np.array([0.9, 0.6, 0.2, 0.45])
    teacher = np.stack([np.log(p0), np.log(1 - p0)], -1).reshape(1, 2, 2, 2)
    student = np.array([[2.0, -1.0], [0.5, 0.5], [-0.3, 1.2], [1.0, 0.0]]).reshape(1, 2, 2, 2)
    labels = np.array([0, 0, 1, 1])                           # argmax of the teacher
    ce = -_log_softmax(student.reshape(4, 2))[np.arange(4), labels]
    # threshold 0.7 keeps voxels 0 (p 0.9) and 2 (p 0.8): mean over all 4 voxels, masked = 0.
    loss, kept = self_training.pseudo_label_loss(tf.constant(teacher, tf.float32),
                                                 tf.constant(student, tf.float32), 0.7)
    assert loss.numpy()[0] == pytest.approx((ce[0] + ce[2]) / 4, rel=1e-5)
    assert kept.numpy()[0] == pytest.approx(0.5)
    # class weights: the pseudo-label's class weight multiplies its voxel.
    loss, _ = self_training.pseudo_label_loss(tf.constant(teacher, tf.float32),
                                              tf.constant(student, tf.float32), 0.7, (0.2, 1.0))
    assert loss.numpy()[0] == pytest.approx((0.2 * ce[0] + 1.0 * ce[2]) / 4, rel=1e-5)
    # threshold 0 keeps everything.
    loss, kept = self_training.pseudo_label_loss(tf.constant(teacher, tf.float32),
                                                 tf.constant(student, tf.float32), 0.0)
    assert loss.numpy()[0] == pytest.approx(ce.mean(), rel=1e-5)
    assert kept.numpy()[0] == 1.0


def test_pseudo_label_loss_sends_no_gradient_to_the_teacher():
    teacher = tf.Variable(tf.random.normal((2, 4, 4, 3), seed=1))
    student = tf.Variable(tf.random.normal((2, 4, 4, 3), seed=2))
    with tf.GradientTape() as tape:
        loss, _ = self_training.pseudo_label_loss(teacher, student, 0.0)
        total = tf.reduce_sum(loss)
    grad_teacher, grad_student = tape.gradient(total, [teacher, student])
    assert grad_teacher is None and grad_student is not None


# --------------------------------------------------------------------------- config and stages
def test_rounds_produce_the_expected_stages():
    method = self_training.build(dataclasses.replace(
        self_training.Config(), **{**TINY, "rounds": 3, "round_steps": 6}), SPEC)
    assert [(s.name, s.steps, s.select_best) for s in method.stages()] == [
        ("supervised", 4, True), ("round1", 6, True), ("round2", 6, True), ("round3", 6, True)]
    none = self_training.build(dataclasses.replace(
        self_training.Config(), **{**TINY, "rounds": 0}), SPEC)
    assert [s.name for s in none.stages()] == ["supervised"]


def test_defaults_share_the_supervised_network_fields():
    config = self_training.resolve(resolve_config(self_training, None, ["filters=8,16"]), SPEC)
    reference = supervised.resolve(resolve_config(supervised, None, ["filters=8,16"]), SPEC)
    for field in dataclasses.fields(supervised.Config):
        assert getattr(config, field.name) == getattr(reference, field.name), field.name
    assert config.round_steps == config.steps and config.unlabeled_batch_size == 20
    assert "quick" in self_training.PRESETS


@pytest.mark.parametrize("item, message", [
    ("rounds=-1", "rounds must be >= 0"),
    ("confidence_threshold=1.5", r"confidence_threshold must be in \[0, 1\]"),
    ("pseudo_label_weight=-1", "pseudo_label_weight must be >= 0"),
    ("round_steps=0", "round_steps and unlabeled_batch_size must be >= 1"),
])
def test_bad_round_settings_are_refused(item, message):
    with pytest.raises(ValueError, match=message):
        self_training.resolve(resolve_config(self_training, None, [item]), SPEC)


# --------------------------------------------------------------------------- the teacher
def test_teacher_is_frozen_during_a_round_and_renewed_at_the_next():
    method = _method(confidence_threshold=0.0)
    assert all(method.teacher not in nets for nets in method.optimizer_networks.values())
    data = _batches()
    history = method.fit(data, steps_per_epoch=2, epochs=1, verbose=0).history  # stage 0
    assert "pseudo_loss" not in history and "pseudo_kept" not in history  # no round yet
    method.begin_stage(Stage("round1", 4))
    method.make_train_function(force=True)
    teacher = [w.copy() for w in method.teacher.get_weights()]
    for t, s in zip(teacher, method.segmentor.get_weights()):
        np.testing.assert_array_equal(t, s)                        # a copy of the segmentor
    history = method.fit(data, steps_per_epoch=3, epochs=1, verbose=0).history
    for before, after in zip(teacher, method.teacher.get_weights()):
        np.testing.assert_array_equal(before, after)               # frozen during the round
    assert any(not np.array_equal(t, s) for t, s in zip(teacher, method.segmentor.get_weights()))
    assert history["pseudo_loss"][-1] > 0 and history["pseudo_kept"][-1] == pytest.approx(1.0)
    method.begin_stage(Stage("round2", 4))                         # next round: new teacher
    for t, s in zip(method.teacher.get_weights(), method.segmentor.get_weights()):
        np.testing.assert_array_equal(t, s)


def test_reinitialize_student_starts_each_round_afresh():
    method = _method(reinitialize_student=True)
    method.fit(_batches(), steps_per_epoch=2, epochs=1, verbose=0)
    trained = [w.copy() for w in method.segmentor.get_weights()]
    method.begin_stage(Stage("round1", 4))
    for t, s in zip(method.teacher.get_weights(), trained):
        np.testing.assert_array_equal(t, s)                        # teacher = trained network
    assert any(not np.array_equal(a, b) for a, b in zip(trained, method.segmentor.get_weights()))


def test_threshold_one_masks_every_voxel_so_the_round_is_supervised():
    method = _method(confidence_threshold=1.0)
    method.begin_stage(Stage("round1", 4))
    history = method.fit(_batches(), steps_per_epoch=2, epochs=1, verbose=0).history
    assert history["pseudo_loss"][-1] == 0.0 and history["pseudo_kept"][-1] == 0.0


# --------------------------------------------------------------------------- end to end
def test_stage_0_is_the_supervised_baseline():
    """Same initial weights as `supervised` under the same seed, and no unlabeled stream in
    stage 0 (so the pipeline is configured as the baseline's); the rounds get one."""
    import keras

    keras.utils.set_random_seed(3)
    ours = self_training.build(dataclasses.replace(self_training.Config(), **TINY), SPEC)
    keras.utils.set_random_seed(3)
    theirs = supervised.build(supervised.Config(
        **{k: v for k, v in TINY.items() if k in supervised.Config.__dataclass_fields__}), SPEC)
    for a, b in zip(ours.segmentor.get_weights(), theirs.segmentor.get_weights()):
        np.testing.assert_array_equal(a, b)
    ours.begin_stage(Stage("supervised", 4))
    assert ours.unlabeled_batch_size == 0
    ours.begin_stage(Stage("round1", 4))
    assert ours.unlabeled_batch_size == 2


def test_tiny_run_through_train(tmp_path):
    from test_train import train_config, write_tiny_records
    from tfseg.train import run_training

    records = write_tiny_records(str(tmp_path / "records"))
    config = train_config(tmp_path, records, method="self_training", steps=None,
                          validation_every=None,
                          overrides=("filters=4,8", "batch_size=4", "norm=none", "steps=4",
                                     "round_steps=2", "validation_every=2", "rounds=2",
                                     "unlabeled_batch_size=2"))
    summary = run_training(config)
    assert summary["steps"] == 8
    with open(os.path.join(config.run_dir, "config.json"), encoding="utf-8") as f:
        stages = [(s["name"], s["steps"]) for s in json.load(f)["stages"]]
    assert stages == [("supervised", 4), ("round1", 2), ("round2", 2)]
    with open(os.path.join(config.run_dir, "train_log.csv"), encoding="utf-8") as f:
        rows = f.read().splitlines()
    header = rows[0].split(",")
    assert "pseudo_loss" in header and len(rows) == 1 + 4
    kept = [r.split(",")[header.index("pseudo_kept")] for r in rows[1:]]
    assert kept[:2] == ["", ""] and all(float(k) == 1.0 for k in kept[2:])  # blank: no round
    assert sorted(os.listdir(os.path.join(config.run_dir, "checkpoints", "stages"))) == [
        "0_supervised.weights.h5", "1_round1.weights.h5", "2_round2.weights.h5"]
