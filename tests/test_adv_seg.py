"""adv_seg: the confidence-masked self-training loss (hand-computed), the semi-start switch, the
loss composition, optimisers, the predictor, bad settings and a tiny `launch.train` run."""
from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf

from tfseg.methods import adv_seg
from tfseg.methods.base import DataSpec

from test_dmnet import (SPEC, TINY, _batch, _constant_discriminator, _softmax, tiny_config,
                        tiny_method)


def _config(**changes):
    return tiny_config(adv_seg, **changes)


def _method(**changes):
    return tiny_method(adv_seg, **changes)


def _softplus(x):
    return math.log1p(math.exp(x))


def test_confident_self_training_loss_golden():
    # One slice of 4 pixels, K = 2; D's confidence sigmoid(c): 0.9, 0.1, 0.5, 0.25.
    logits = np.array([[2.0, 0.0], [0.0, 1.0], [0.5, 1.5], [1.0, -1.0]]).reshape(1, 2, 2, 2)
    confidence = np.log(np.array([0.9, 0.1, 0.5, 0.25]) / (1 - np.array([0.9, 0.1, 0.5, 0.25])))
    p = _softmax(logits.reshape(4, 2))
    ce = -np.log(p.max(-1))                                  # CE against its own argmax
    loss = adv_seg.confident_self_training_loss(
        tf.constant(logits, tf.float32), tf.constant(confidence.reshape(1, 2, 2, 1), tf.float32),
        0.2).numpy()
    # threshold 0.2 keeps pixels 0, 2, 3 (confidence 0.9, 0.5, 0.25): mean over those three.
    assert loss[0] == pytest.approx((ce[0] + ce[2] + ce[3]) / 3, rel=1e-5)
    none_kept = adv_seg.confident_self_training_loss(
        tf.constant(logits, tf.float32), tf.constant(confidence.reshape(1, 2, 2, 1), tf.float32),
        0.95).numpy()
    assert none_kept[0] == 0.0
    # The pseudo-label and the confidence are constants: the gradient is the CE's.
    variable = tf.Variable(logits, dtype=tf.float32)
    with tf.GradientTape() as tape:
        value = adv_seg.confident_self_training_loss(
            variable, tf.constant(confidence.reshape(1, 2, 2, 1), tf.float32), 0.2)
    grad = tape.gradient(value, variable).numpy().reshape(4, 2)
    assert np.all(grad[1] == 0) and np.abs(grad[0]).sum() > 0


@pytest.mark.parametrize("semi_start, bias, semi_active", [(5, 0.5, False), (0, 0.5, True),
                                                           (0, -2.0, False)])
def test_train_step_loss_composition_and_semi_start(semi_start, bias, semi_active):
    """lr 0, no flip, D = constant logit b: L = CE + 0.01·adv + 0.001·adv_u + 0.1·semi, the semi
    term off before `semi_start` and zero when no pixel is confident (sigmoid(−2) < 0.2)."""
    method = _method(semi_start=semi_start, learning_rate=0.0, disc_learning_rate=0.0,
                     weight_decay=0.0, flip_probability=0.0)
    _constant_discriminator(method, bias)
    data = _batch()
    logs = {k: float(v) for k, v in method.train_step(data).items()}
    inputs = tf.concat([data["labeled"]["image"], data["unlabeled"]["image"]], 0)
    logits = method.segmentor(inputs, training=True).numpy()
    y = np.eye(3)[data["labeled"]["label"].numpy()]
    ce = -(y * np.log(_softmax(logits[:2]))).sum(-1).mean()
    assert logs["seg_loss"] == pytest.approx(ce, rel=1e-4)
    assert logs["adv_loss"] == pytest.approx(_softplus(-bias), rel=1e-5)
    assert logs["adv_unlabeled_loss"] == pytest.approx(_softplus(-bias), rel=1e-5)
    assert logs["disc_loss"] == pytest.approx(2 * _softplus(bias) + _softplus(-bias), rel=1e-5)
    unlabeled = _softmax(logits[2:])
    self_ce = -np.log(unlabeled.max(-1)).mean() if semi_active else 0.0
    assert logs["semi_loss"] == pytest.approx(self_ce, rel=1e-4, abs=1e-7)
    assert (logs["semi_loss"] > 0) == semi_active
    assert logs["loss"] == pytest.approx(
        logs["seg_loss"] + 0.01 * logs["adv_loss"] + 0.001 * logs["adv_unlabeled_loss"]
        + 0.1 * logs["semi_loss"], rel=1e-5)


def test_optimisers_defaults_and_predictor(tmp_path):
    sgd = _method()
    assert sgd.seg_optimizer.name == "seg_sgd" and sgd.seg_optimizer.momentum == 0.9
    assert float(sgd.seg_optimizer.learning_rate) == pytest.approx(2.5e-4)
    assert float(sgd.disc_optimizer.learning_rate) == pytest.approx(1e-4)
    adam = _method(optimizer="adam")
    assert adam.seg_optimizer.name == "seg_adam"
    defaults = adv_seg.Config()
    assert (defaults.adversarial_weight, defaults.unlabeled_adversarial_weight,
            defaults.semi_weight, defaults.semi_threshold, defaults.semi_start) == (
        0.01, 0.001, 0.1, 0.2, 5000)
    # The segmentor is dmnet's DeepLab branch; the predictor its softmax, rebuilt from weights.
    assert sgd.segmentor.get_layer("deeplab_decoder") is not None
    x = _batch()["unlabeled"]["image"]
    expected = _softmax(sgd.segmentor(x, training=False).numpy())
    np.testing.assert_allclose(sgd.predictor(x).numpy(), expected, atol=1e-5)
    path = str(tmp_path / "p.weights.h5")
    sgd.predictor.save_weights(path)
    rebuilt = adv_seg.build_predictor(_config(), SPEC)
    rebuilt.load_weights(path)
    np.testing.assert_allclose(rebuilt(x).numpy(), expected, atol=1e-5)


def test_stream_batches_separate_forwards_each_stream_alone():
    data = _batch()
    labeled, unlabeled = data["labeled"]["image"], data["unlabeled"]["image"]
    for mode in ("joint", "separate"):
        method = _method(stream_batches=mode)
        logits = method.forward(labeled, unlabeled).numpy()
        alone = method.segmentor(labeled, training=True).numpy()
        together = method.segmentor(tf.concat([labeled, unlabeled], 0), training=True).numpy()
        np.testing.assert_allclose(logits[:2], alone if mode == "separate" else together[:2],
                                   atol=1e-5)
        assert not np.allclose(alone, together[:2], atol=1e-3)


def test_training_changes_segmentor_and_discriminator():
    method = _method(optimizer="adam", learning_rate=1e-2, disc_learning_rate=1e-2,
                     semi_start=0)
    before = {n: [w.numpy().copy() for w in getattr(method, n).trainable_weights]
              for n in ("segmentor", "discriminator")}
    logs = method.train_step(_batch())
    assert all(np.isfinite(float(v)) for v in logs.values())
    for name, weights in before.items():
        after = getattr(method, name).trainable_weights
        assert any(not np.array_equal(b, a.numpy()) for b, a in zip(weights, after)), name


@pytest.mark.parametrize("change, message", [
    ({"optimizer": "rmsprop"}, r"optimizer='rmsprop'; choose one of \['sgd', 'adam'\]"),
    ({"seg_loss": "focal"}, r"seg_loss='focal'"),
    ({"semi_threshold": 1.5}, r"semi_threshold must be in \[0, 1\]"),
    ({"semi_start": -1}, r"semi_start must be >= 0"),
    ({"disc_activation": "tanh"}, r"disc_activation='tanh'"),
])
def test_bad_settings_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        adv_seg.build(_config(**change), SPEC)
    with pytest.raises(ValueError, match="regions"):
        adv_seg.build(_config(), DataSpec(2, 1, 3, ("b", "x", "y"), (16, 16),
                                          region_names=("r",), region_classes=((1, 2),),
                                          region_paint=(1,)))


def test_launch_train_adv_seg_tiny(tmp_path):
    from launch import train as train_cli
    from test_train import tiny_split_file, write_tiny_records

    records = write_tiny_records(str(tmp_path / "records"), size=16)
    sets = [f"--set={k}={','.join(map(str, v)) if isinstance(v, tuple) else v}"
            for k, v in TINY.items() if k not in ("steps", "validation_every")]
    argv = ["launch.train", "--method=adv_seg", "--dataset=synthetic_cardiac",
            f"--records_dir={records}", f"--split={tiny_split_file(str(tmp_path))}",
            "--steps=2", "--validation_every=1", "--noevaluate", "--noexport", *sets,
            "--set=semi_start=1", f"--run_dir={tmp_path / 'run'}",
            f"--records_root={tmp_path / 'records_root'}"]
    assert train_cli.main(argv) == 0
    with open(tmp_path / "run" / "train_log.csv", encoding="utf-8") as f:
        rows = f.read().splitlines()
    assert "semi_kept" in rows[0] and len(rows) == 3
