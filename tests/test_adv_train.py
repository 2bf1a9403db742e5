"""adv_train ("Adv tr", virtual adversarial training): the KL term hand-computed, the perturbation
(size, direction), the loss it minimises, optimizer isolation, settings, and a tiny end-to-end
`launch.train --method=adv_train` run."""
from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import keras
import tensorflow as tf

from tfseg.methods import DataSpec, adv_train, apply_overrides, supervised

SPEC = DataSpec(2, 1, 3, ("background", "a", "b"), (16, 16))
TINY = ("filters=4,8", "batch_size=4", "unlabeled_batch_size=2")


def _method(*overrides, compile=True):
    method = adv_train.build(apply_overrides(adv_train.Config(), None, TINY + overrides), SPEC)
    if compile:
        method.compile()
    return method


def _batch(seed=0, batch=4, unlabeled=2):
    rng = np.random.default_rng(seed)
    label = np.zeros((batch, 16, 16), np.int32)
    label[:, 3:11, 4:12] = 1
    label[:, 6:9, 6:10] = 2
    image = (label * 0.4 + 0.1 * rng.standard_normal(label.shape)).astype(np.float32)[..., None]
    real = rng.uniform(size=(unlabeled, 16, 16, 1)).astype(np.float32)
    return {"labeled": {"image": tf.constant(image), "label": tf.constant(label)},
            "unlabeled": {"image": tf.constant(real)}}


def test_kl_divergence_hand_computed():
    # example 0: voxel 1 p = (0.5, 0.5), q = (0.25, 0.75); voxel 2 p = q = (0.2, 0.8)
    # example 1: voxel 1 p = (1, 0), q = (0.5, 0.5) [0 log 0 = 0]; voxel 2 p = (0, 1), q = (0.5, 0.5)
    p = np.array([[[0.5, 0.5], [0.2, 0.8]], [[1.0, 0.0], [0.0, 1.0]]], np.float32)  # (2, 2, 2)
    q = np.array([[[0.25, 0.75], [0.2, 0.8]], [[0.5, 0.5], [0.5, 0.5]]], np.float32)
    logits = np.log(q) + 3.0                       # softmax is shift-invariant
    kl = adv_train.kl_divergence(tf.constant(p), tf.constant(logits)).numpy()
    first = (0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75) + 0.0) / 2
    second = (math.log(2.0) + math.log(2.0)) / 2
    np.testing.assert_allclose(kl, [first, second], rtol=1e-5)
    same = adv_train.kl_divergence(tf.constant(p[:1]), tf.constant(np.log(p[:1])))
    np.testing.assert_allclose(same.numpy(), [0.0], atol=1e-6)


def test_unit_rms_per_example():
    direction = tf.constant([[[3.0, 4.0]], [[0.0, 0.0]], [[-1e-30, 1e-30]]])   # (3, 1, 2)
    unit = adv_train.unit_rms(direction).numpy()
    np.testing.assert_allclose(unit[0, 0], np.array([3.0, 4.0]) / math.sqrt(12.5), rtol=1e-6)
    np.testing.assert_array_equal(unit[1], 0.0)                         # zero stays zero
    np.testing.assert_allclose(unit[2, 0], [-1.0, 1.0], rtol=1e-5)      # no underflow


def test_perturbation_has_size_epsilon_and_beats_random_directions():
    keras.utils.set_random_seed(0)
    method = _method("vat_epsilon=0.01", compile=False)   # small: the linear regime
    images = _batch()["labeled"]["image"]
    probabilities = tf.nn.softmax(method.segmentor(images, training=True))
    r_adv = method.adversarial_perturbation(images, probabilities)
    rms = tf.sqrt(tf.reduce_mean(tf.square(r_adv), axis=[1, 2, 3])).numpy()
    np.testing.assert_allclose(rms, 0.01, rtol=1e-4)

    def kl(r):
        return float(tf.reduce_mean(adv_train.kl_divergence(
            probabilities, method.segmentor(images + r, training=True))))

    random_kl = [kl(0.01 * adv_train.unit_rms(tf.random.stateless_normal(images.shape, [s, 1])))
                 for s in range(3)]
    assert kl(r_adv) > 2 * max(random_kl)


def test_loss_is_supervised_plus_weighted_kl():
    """loss = L_sup + α·KL, with the tracked parts; α = 0 and no unlabeled images: exactly the
    supervised step (same initial weights, same batch -> same new weights)."""
    method = _method("vat_weight=0.5")
    logs = method.train_step(_batch())
    np.testing.assert_allclose(float(logs["loss"]),
                               float(logs["seg_loss"]) + 0.5 * float(logs["vat_loss"]),
                               rtol=1e-6)
    assert float(logs["vat_loss"]) > 0
    plain = _method("vat_weight=0", "use_unlabeled=false")
    assert plain.unlabeled_batch_size == 0
    reference = supervised.build(apply_overrides(supervised.Config(), None, TINY[:2]), SPEC)
    reference.compile()
    reference.segmentor.set_weights(plain.segmentor.get_weights())
    data = _batch()
    plain.train_step(data)
    reference.train_step({"labeled": data["labeled"]})
    for a, b in zip(plain.segmentor.trainable_variables, reference.segmentor.trainable_variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6)


def test_vat_term_changes_the_update():
    """The KL term has a gradient: with α > 0 the new weights differ from α = 0's."""
    with_vat, without = _method("vat_weight=1"), _method("vat_weight=0")
    without.set_weights(with_vat.get_weights())
    tf.random.set_seed(0)
    with_vat.train_step(_batch())
    without.train_step(_batch())
    assert any(not np.allclose(a.numpy(), b.numpy()) for a, b in
               zip(with_vat.segmentor.trainable_variables, without.segmentor.trainable_variables))


@pytest.mark.parametrize("override, message", [
    ("vat_weight=-1", r"vat_weight=-1.0 must be >= 0"),
    ("vat_epsilon=0", r"vat_epsilon=0.0 and vat_xi=0.001 must be > 0"),
    ("power_iterations=0", r"power_iterations=0 must be >= 1"),
    ("unlabeled_batch_size=0", r"unlabeled_batch_size=0 must be >= 1 \(or set use_unlabeled"),
])
def test_bad_settings_are_refused(override, message):
    with pytest.raises(ValueError, match=message):
        _method(override, compile=False)


def test_presets():
    quick = apply_overrides(adv_train.Config(), adv_train.PRESETS["quick"], ())
    base = apply_overrides(supervised.Config(), supervised.PRESETS["quick"], ())
    for field in ("filters", "batch_size", "steps", "validation_every", "augment"):
        assert getattr(quick, field) == getattr(base, field), field  # the Aff arm's budget
    paper = adv_train.resolve(apply_overrides(adv_train.Config(), adv_train.PRESETS["paper"], ()),
                              DataSpec(2, 1, 4, ("background", "rv", "myo", "lv"), (224, 224)))
    assert (paper.learning_rate, paper.batch_size, paper.augment) == (1e-3, 20, "affine")
    assert paper.unlabeled_batch_size == 20 and paper.power_iterations == 1


def test_launch_train_adv_train_tiny(tmp_path, capsys):
    from launch import train as train_cli
    from test_train import tiny_split_file, write_tiny_records

    records = write_tiny_records(str(tmp_path / "records"), size=16)
    run_dir = tmp_path / "run"
    argv = ["launch.train", "--method=adv_train", "--dataset=synthetic_cardiac",
            f"--records_dir={records}", f"--split={tiny_split_file(str(tmp_path))}",
            "--validation_every=2", "--steps=2", *[f"--set={s}" for s in TINY],
            "--noevaluate", "--noexport", f"--run_dir={run_dir}",
            f"--records_root={tmp_path / 'records_root'}"]
    assert train_cli.main(argv) == 0
    out = capsys.readouterr().out
    assert re.search(r"Best validation mean Dice \d\.\d{4} at step 2", out), out
    with open(run_dir / "config.json", encoding="utf-8") as f:
        config = json.load(f)
    assert config["method"] == "adv_train"
    assert config["method_config"]["vat_epsilon"] == 0.05
    assert config["pipeline"]["unlabeled_batch_size"] == 2
    with open(run_dir / "train_log.csv", encoding="utf-8") as f:
        header = f.readline()
    assert "vat_loss" in header and "seg_loss" in header
