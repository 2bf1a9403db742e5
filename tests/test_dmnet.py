"""dmnet: hand-computed losses, the networks (shapes, strides, gradient flow), the averaging
predictor (and `build_predictor` from saved weights), every variant, the optimisers, bad
settings, and a tiny `launch.train` run."""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import tensorflow as tf

from tfseg.methods import dmnet
from tfseg.methods.base import DataSpec
from tfseg.networks import dmnet_nets

SPEC = DataSpec(2, 2, 3, ("background", "a", "b"), (16, 16))
TINY_NETWORK = dict(stem_filters=4, widths=(4, 4, 4, 4), blocks=(1, 1, 1, 1), expansion=1,
                    unet_filters=(4, 4, 4, 4, 4), aspp_filters=4, aspp_rates=(1, 2, 3),
                    low_level_filters=4, deeplab_filters=4, disc_filters=(4, 4, 4))
TINY = dict(TINY_NETWORK, batch_size=2, unlabeled_batch_size=2, steps=10, validation_every=5)


def tiny_config(module, **changes):
    """The module's Config with the tiny network and batch (dmnet and adv_seg share them)."""
    return dataclasses.replace(module.Config(), **{**TINY, **changes})


def tiny_method(module, **changes):
    method = module.build(tiny_config(module, **changes), SPEC)
    method.compile()
    return method


def _config(**changes):
    return tiny_config(dmnet, **changes)


def _method(**changes):
    return tiny_method(dmnet, **changes)


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, (2, 16, 16)).astype(np.int32)
    images = (labels[..., None] / 3 + rng.normal(0, 0.1, (2, 16, 16, 2))).astype(np.float32)
    unlabeled = rng.normal(0.3, 0.3, (2, 16, 16, 2)).astype(np.float32)
    return {"labeled": {"image": tf.constant(images), "label": tf.constant(labels)},
            "unlabeled": {"image": tf.constant(unlabeled)}}


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _dice(a, b, smooth=1.0):
    """1 − mean_k (2Σab + s)/(Σa + Σb + s), per example, numpy."""
    axes = tuple(range(1, a.ndim - 1))
    inter = (a * b).sum(axes)
    return 1 - ((2 * inter + smooth) / (a.sum(axes) + b.sum(axes) + smooth)).mean(-1)


def _constant_discriminator(method, bias):
    """Zero every weight of D but the last bias: D(x) = bias everywhere."""
    for variable in method.discriminator.weights:
        variable.assign(tf.zeros_like(variable))
    method.discriminator.get_layer("up2_conv").bias.assign([bias])


def _softplus(x):
    return math.log1p(math.exp(x))


# --------------------------------------------------------------------------- losses
def test_sharpen_golden():
    logits = tf.constant(np.log([[[[0.6, 0.4]]]]), tf.float32)
    np.testing.assert_allclose(dmnet.sharpen(logits, 0.5).numpy().ravel(),
                               [0.36 / 0.52, 0.16 / 0.52], rtol=1e-5)
    np.testing.assert_allclose(dmnet.sharpen(logits, 1.0).numpy().ravel(), [0.6, 0.4], rtol=1e-5)


def test_semi_dice_loss_golden():
    # One slice of 2 pixels, K = 2. p¹ = (.6, .4), (.2, .8); p² = (.5, .5), (.9, .1).
    p1 = np.array([[[[0.6, 0.4], [0.2, 0.8]]]])
    p2 = np.array([[[[0.5, 0.5], [0.9, 0.1]]]])
    q1 = p1 ** 2 / (p1 ** 2).sum(-1, keepdims=True)        # sharpened, T = 0.5
    q2 = p2 ** 2 / (p2 ** 2).sum(-1, keepdims=True)
    loss = dmnet.semi_dice_loss(tf.constant(np.log(p1), tf.float32),
                                tf.constant(np.log(p2), tf.float32), 0.5, 1.0).numpy()
    np.testing.assert_allclose(loss, _dice(q1, q2), rtol=1e-5)
    assert loss[0] == pytest.approx(0.47985, abs=1e-4)     # worked by hand
    # T = 1 (no sharpening): the plain probabilities.
    plain = dmnet.semi_dice_loss(tf.constant(np.log(p1), tf.float32),
                                 tf.constant(np.log(p2), tf.float32), 1.0, 1.0).numpy()
    np.testing.assert_allclose(plain, _dice(p1, p2), rtol=1e-5)
    # Identical one-hot maps agree perfectly; gradients reach both branches.
    a = tf.Variable(np.log(p1), dtype=tf.float32)
    b = tf.Variable(np.log(p2), dtype=tf.float32)
    with tf.GradientTape() as tape:
        value = dmnet.semi_dice_loss(a, b, 0.5, 1.0)
    grads = tape.gradient(value, [a, b])
    assert all(g is not None and np.abs(g.numpy()).sum() > 0 for g in grads)


def test_dice_loss_includes_every_class_golden():
    y = np.array([[[[1.0, 0.0], [0.0, 1.0]]]])
    p = np.array([[[[0.7, 0.3], [0.4, 0.6]]]])
    loss = dmnet.dice_loss(tf.constant(y), tf.constant(np.log(p), tf.float32), 1.0).numpy()
    # class 0: (2·0.7 + 1)/(1 + 1.1 + 1); class 1: (2·0.6 + 1)/(1 + 0.9 + 1)
    expected = 1 - ((2.4 / 3.1) + (2.2 / 2.9)) / 2
    assert loss[0] == pytest.approx(expected, rel=1e-5)


def test_l2_penalty_and_poly_schedule():
    net = tf.keras.Sequential([tf.keras.Input((2,)), tf.keras.layers.Dense(1)])
    net.layers[0].kernel.assign([[1.0], [2.0]])
    net.layers[0].bias.assign([3.0])
    assert float(dmnet.l2_penalty([net], 0.1)) == pytest.approx(0.5 * 0.1 * 14.0)
    schedule = dmnet.poly_schedule(1e-4, 100, 0.9)
    assert float(schedule(0)) == pytest.approx(1e-4)
    assert float(schedule(50)) == pytest.approx(1e-4 * 0.5 ** 0.9, rel=1e-5)
    assert float(schedule(100)) == pytest.approx(0.0, abs=1e-12)
    assert dmnet.poly_schedule(1e-4, 100, 0.0) == 1e-4


# --------------------------------------------------------------------------- networks
def test_encoder_strides_and_branch_shapes():
    encoder = dmnet_nets.EncoderConfig(**{k: TINY_NETWORK[k] for k in
                                          ("stem_filters", "widths", "blocks", "expansion")})
    features = dmnet_nets.build_encoder((None, None, 2), encoder)(tf.zeros((1, 32, 48, 2)))
    assert [tuple(f.shape[1:3]) for f in features] == [(16, 24), (8, 12), (4, 6), (2, 3), (2, 3)]
    branches = dmnet_nets.build_two_branch((None, None, 2), 3, encoder,
                                           dmnet.branch_config(_config()))
    first, second = branches(tf.zeros((2, 32, 48, 2)))
    assert first.shape == second.shape == (2, 32, 48, 3) and first.dtype == tf.float32
    # ResNet-101 depth by default: 3 + 4 + 23 + 3 bottleneck blocks.
    paper = dmnet_nets.build_encoder((None, None, 1), dmnet.encoder_config(dmnet.Config()))
    assert sum(1 for layer in paper.layers if layer.name.endswith("_c_conv")) == 33


def test_discriminator_is_per_pixel_and_gradients_reach_every_weight():
    disc = dmnet_nets.build_discriminator(3, (4, 8, 8))
    x = tf.random.uniform((2, 24, 16, 3))
    with tf.GradientTape() as tape:
        out = disc(x)
        loss = tf.reduce_mean(out ** 2)
    assert out.shape == (2, 24, 16, 1)
    grads = tape.gradient(loss, disc.trainable_variables)
    assert all(g is not None and np.abs(g.numpy()).sum() > 0 for g in grads)
    assert len([l for l in disc.layers if l.name.startswith("down") and l.name.endswith("conv")]
               ) == 3


def test_segmentation_loss_reaches_both_decoders_and_the_encoder():
    method = _method()
    images = _batch()["labeled"]["image"]
    with tf.GradientTape() as tape:
        first, second = method.branches(images, training=True)
        loss = tf.reduce_mean(dmnet.semi_dice_loss(first, second, 0.5, 1.0))
    grads = tape.gradient(loss, method.branches.trainable_variables)
    names = [v.path for v, g in zip(method.branches.trainable_variables, grads)
             if g is None or not np.any(g.numpy())]
    assert not names, names


def test_predictor_is_the_average_of_both_branches_and_rebuilds_from_weights(tmp_path):
    for variant in ("full", "separate_encoders"):
        method = _method(variant=variant)
        x = _batch()["unlabeled"]["image"]
        first, second = method.branches(x, training=False)
        expected = (_softmax(first.numpy()) + _softmax(second.numpy())) / 2
        np.testing.assert_allclose(method.predictor(x).numpy(), expected, atol=1e-5)
        path = str(tmp_path / f"{variant}.weights.h5")
        method.predictor.save_weights(path)
        rebuilt = dmnet.build_predictor(_config(variant=variant), SPEC)
        rebuilt.load_weights(path)
        np.testing.assert_allclose(rebuilt(x).numpy(), expected, atol=1e-5)


# --------------------------------------------------------------------------- variants
EXPECTED_TERMS = {
    "full": {"dice_loss", "semi_loss", "adv_loss", "disc_loss"},
    "sup": {"dice_loss"},
    "sup_adv": {"dice_loss", "adv_loss", "disc_loss"},
    "separate_encoders": {"dice_loss", "semi_loss", "adv_loss", "disc_loss"},
    "no_sharpen": {"dice_loss", "semi_loss", "adv_loss", "disc_loss"},
    "no_adv": {"dice_loss", "semi_loss"},
    "no_adv_no_sharpen": {"dice_loss", "semi_loss"},
}


@pytest.mark.parametrize("variant", list(dmnet.VARIANTS))
def test_each_variant_does_what_it_says(variant):
    method = _method(variant=variant, learning_rate=1e-2, disc_learning_rate=1e-2)
    spec = dmnet.VARIANTS[variant]
    adversarial = {"adv_loss"} <= EXPECTED_TERMS[variant]
    assert (method.discriminator is not None) == adversarial
    assert ("disc_optimizer" in method.optimizer_networks) == adversarial
    assert method.unlabeled_batch_size == (2 if spec.semi else 0)
    assert method.temperature == (0.5 if spec.sharpen else 1.0)
    encoders = [l.name for l in method.branches.layers if l.name.startswith("encoder")]
    assert encoders == (["encoder_unet", "encoder_deeplab"] if spec.separate_encoders
                        else ["encoder"])
    before = {name: [w.numpy().copy() for net in nets for w in net.trainable_weights]
              for name, nets in method.optimizer_networks.items()}
    logs = method.train_step(_batch())
    terms = set(logs) - {"loss", "seg_grad_norm", "disc_grad_norm", "d_real_prob",
                         "d_fake_prob"}
    assert terms == EXPECTED_TERMS[variant]
    for name, nets in method.optimizer_networks.items():
        after = [w.numpy() for net in nets for w in net.trainable_weights]
        assert any(not np.array_equal(a, b) for a, b in zip(before[name], after)), name


def test_separate_encoders_hold_two_encoders_weights():
    shared = _method(variant="full")
    separate = _method(variant="separate_encoders")
    encoder = shared.branches.get_layer("encoder").count_params()
    assert separate.branches.count_params() == shared.branches.count_params() + encoder


def test_train_step_loss_is_the_papers_sum_golden():
    """lr 0 (nothing moves), no flip, D fixed to the constant logit b: the tracked terms are
    the hand-computable values and L_S = L_dice + 0.01·L_adv + 0.1·L_semi."""
    method = _method(learning_rate=0.0, disc_learning_rate=0.0, flip_probability=0.0)
    b = 0.5
    _constant_discriminator(method, b)
    data = _batch()
    logs = {k: float(v) for k, v in method.train_step(data).items()}
    inputs = tf.concat([data["labeled"]["image"], data["unlabeled"]["image"]], 0)
    first, second = (t.numpy() for t in method.branches(inputs, training=True))
    y = np.eye(3)[data["labeled"]["label"].numpy()]
    dice = _dice(y, _softmax(first[:2])) + _dice(y, _softmax(second[:2]))
    sharp = [_softmax(2 * t[2:]) for t in (first, second)]
    assert logs["dice_loss"] == pytest.approx(dice.mean(), rel=1e-4)
    assert logs["semi_loss"] == pytest.approx(_dice(*sharp).mean(), rel=1e-4)
    assert logs["adv_loss"] == pytest.approx(2 * _softplus(-b), rel=1e-5)
    assert logs["disc_loss"] == pytest.approx(2 * _softplus(b) + _softplus(-b), rel=1e-5)
    assert logs["loss"] == pytest.approx(
        logs["dice_loss"] + 0.01 * logs["adv_loss"] + 0.1 * logs["semi_loss"], rel=1e-5)


def test_stream_batches_sets_the_batch_norm_batches():
    """"joint": one call over [labeled; unlabeled] (batch statistics of both); "separate": the
    labeled logits are those of the labeled slices alone."""
    data = _batch()
    inputs = tf.concat([data["labeled"]["image"], data["unlabeled"]["image"]], 0)
    for mode in ("joint", "separate"):
        method = _method(stream_batches=mode)
        first, _ = method.forward(inputs, 2)
        alone, _ = method.branches(inputs[:2], training=True)
        together, _ = method.branches(inputs, training=True)
        np.testing.assert_allclose(first.numpy()[:2], (alone if mode == "separate"
                                                       else together).numpy()[:2], atol=1e-5)
        assert not np.allclose(alone.numpy(), together.numpy()[:2], atol=1e-3)


def test_weight_decay_modes_and_optimizers():
    l2 = _method()
    assert l2.seg_optimizer.weight_decay is None and l2.disc_optimizer.weight_decay is None
    decoupled = _method(weight_decay_mode="decoupled")
    assert decoupled.seg_optimizer.weight_decay == pytest.approx(5e-5)
    assert float(l2.seg_optimizer.learning_rate) == pytest.approx(1e-4)
    assert float(l2.disc_optimizer.learning_rate) == pytest.approx(1e-5)
    defaults = dmnet.Config()
    assert (defaults.temperature, defaults.adversarial_weight, defaults.semi_weight,
            defaults.weight_decay, defaults.poly_power) == (0.5, 0.01, 0.1, 5e-5, 0.9)
    assert dmnet.PRESETS["paper"]["blocks"] == (3, 4, 23, 3)
    # The paper's only augmentation is the in-step flip; `augment` adds pipeline augmentation.
    assert l2.pipeline_augment == "none"
    assert _method(augment="intensity").pipeline_augment == "intensity"


@pytest.mark.parametrize("change, spec, message", [
    ({"variant": "both"}, SPEC, r"variant='both'; choose one of \['full', 'sup'"),
    ({"weight_decay_mode": "adamw"}, SPEC, r"weight_decay_mode='adamw'"),
    ({"temperature": 0.0}, SPEC, r"temperature must be > 0"),
    ({"blocks": (1, 1)}, SPEC, r"blocks=\(1, 1\): expected four positive ints"),
    ({}, DataSpec(2, 1, 2, ("b", "t"), (24, 24)), r"slice size \(24, 24\) must be a multiple "
                                                  r"of 16"),
    ({}, DataSpec(3, 1, 2, ("b", "t"), (16, 16, 16)), r"dmnet is a 2D method"),
    ({"flip_probability": 2.0}, SPEC, r"flip_probability must be in \[0, 1\]"),
    ({"augment": "bogus"}, SPEC, r"augment='bogus': .*unknown operation 'bogus'"),
    ({"stream_batches": "mixed"}, SPEC, r"stream_batches='mixed'; choose one of"),
])
def test_bad_settings_are_refused(change, spec, message):
    with pytest.raises(ValueError, match=message):
        dmnet.build(_config(**change), spec)


# --------------------------------------------------------------------------- end to end
@pytest.mark.slow  # ~30 s on a lightly loaded 2-core machine: tracing train step + predictor
def test_launch_train_dmnet_tiny_and_load_run(tmp_path):
    """A 3-class (softmax over K) run through the CLI; the run folder's predictor (load_run,
    as evaluate/export/predict build it) is the averaging model with the selected weights."""
    from launch import train as train_cli
    from test_train import tiny_split_file, write_tiny_records
    from tfseg.run import load_run

    records = write_tiny_records(str(tmp_path / "records"), size=16)
    run_dir = tmp_path / "run"
    argv = ["launch.train", "--method=dmnet", "--dataset=synthetic_cardiac",
            f"--records_dir={records}", f"--split={tiny_split_file(str(tmp_path))}",
            "--steps=2", "--validation_every=1", "--noevaluate", "--noexport",
            *[f"--set={k}={','.join(map(str, v)) if isinstance(v, tuple) else v}"
              for k, v in TINY.items() if k not in ("steps", "validation_every")],
            f"--run_dir={run_dir}", f"--records_root={tmp_path / 'records_root'}"]
    assert train_cli.main(argv) == 0
    with open(run_dir / "config.json", encoding="utf-8") as f:
        config = json.load(f)
    assert config["method_config"]["variant"] == "full"
    with open(run_dir / "train_log.csv", encoding="utf-8") as f:
        header = f.readline()
    assert all(term in header for term in ("semi_loss", "adv_loss", "lr_disc_optimizer"))
    run = load_run(str(run_dir))
    x = tf.random.normal((1, 16, 16, 1))
    branches = run.predictor.get_layer("segmentor").get_layer("branches")
    first, second = branches(x, training=False)
    expected = (_softmax(first.numpy()) + _softmax(second.numpy())) / 2
    np.testing.assert_allclose(run.predictor(x).numpy(), expected, atol=1e-5)
    assert run.predictor(x).shape == (1, 16, 16, 3)
