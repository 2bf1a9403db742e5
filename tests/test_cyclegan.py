"""cyclegan: networks (reflect padding, shapes, gradient flow, block rule), LSGAN / L1 losses and
the learning-rate schedule against hand-computed values, the image pool's semantics, the GAN step
(which networks move; the pool fills), the panels, the settings' errors, and a cyclegan run's
evaluate/export refusal."""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from tfseg.methods import DataSpec, cyclegan, resolve_config
from tfseg.networks import cyclegan_nets

SPEC = DataSpec(2, 2, 2, ("background", "tumour"), (16, 16))
TINY = ("generator_filters=4", "discriminator_filters=4", "residual_blocks=1",
        "gan_batch_size=2", "pool_size=3", "steps=4", "validation_every=2")


def _method(*overrides, spec=SPEC):
    method = cyclegan.build(resolve_config(cyclegan, None, TINY + overrides), spec)
    method.compile()
    return method


# --------------------------------------------------------------------------- networks
def test_reflect_padding_matches_numpy():
    x = np.arange(2 * 4 * 5 * 3, dtype=np.float32).reshape(2, 4, 5, 3)
    padded = cyclegan_nets.ReflectPadding2D(2)(x).numpy()
    np.testing.assert_array_equal(padded, np.pad(x, [(0, 0), (2, 2), (2, 2), (0, 0)],
                                                 mode="reflect"))
    layer = cyclegan_nets.ReflectPadding2D.from_config(
        cyclegan_nets.ReflectPadding2D(3).get_config())
    assert layer.padding == 3


def test_generator_and_discriminator_shapes_range_and_gradients():
    gen = cyclegan_nets.build_resnet_generator(2, filters=4, residual_blocks=2)
    disc = cyclegan_nets.build_patch_discriminator(2, filters=4)
    x = tf.random.normal((2, 24, 32, 2)) * 5.0
    with tf.GradientTape(persistent=True) as tape:
        y = gen(x, training=True)
        score = disc(y, training=True)
        loss = tf.reduce_mean(score)
    assert y.shape == (2, 24, 32, 2) and float(tf.reduce_max(tf.abs(y))) <= 1.0
    assert score.shape == (2, 3, 4, 1)                       # H/8 x W/8 patch scores
    for net in (gen, disc):
        grads = tape.gradient(loss, net.trainable_variables)
        assert all(g is not None and float(tf.reduce_sum(tf.abs(g))) > 0 for g in grads), \
            net.name
    # Instance norm = GroupNormalization with one group per channel; 2 residual blocks.
    norms = [l for l in gen.layers if isinstance(l, tf.keras.layers.GroupNormalization)]
    assert norms and all(l.groups == l.gamma.shape[0] for l in norms)  # one per channel
    assert sum(l.name.startswith("res") and l.name[3:].isdigit() for l in gen.layers) == 2


def test_residual_blocks_rule_and_settings_errors():
    assert cyclegan_nets.default_residual_blocks((256, 256)) == 9
    assert cyclegan_nets.default_residual_blocks((128, 96)) == 6
    config = resolve_config(cyclegan, None)
    assert cyclegan.check_translation(config, DataSpec(2, 1, 2, ("b", "t"), (192, 192)), "x") == 9
    assert cyclegan.check_translation(resolve_config(cyclegan, "quick"),
                                      DataSpec(2, 1, 2, ("b", "t"), (192, 192)), "x") == 3
    with pytest.raises(ValueError, match="CycleGAN translates 2D slices"):
        cyclegan.build(config, DataSpec(3, 1, 2, ("b", "t"), (16, 16, 16)))
    with pytest.raises(ValueError, match="multiples of 4"):
        cyclegan.build(resolve_config(cyclegan, None, ("crop_size=10",)), SPEC)
    with pytest.raises(ValueError, match="intensity_range"):
        cyclegan.build(resolve_config(cyclegan, None, ("intensity_range=1,0",)), SPEC)


# --------------------------------------------------------------------------- losses, schedule
def test_lsgan_and_l1_losses_by_hand():
    scores = tf.constant([[[[0.5]], [[1.5]]], [[[1.0]], [[0.0]]]])     # (2, 2, 1, 1)
    # real: mean of (D - 1)^2 per example: (0.25 + 0.25) / 2, (0 + 1) / 2
    np.testing.assert_allclose(cyclegan.lsgan_real_loss(scores).numpy(), [0.25, 0.5])
    # fake: mean of D^2: (0.25 + 2.25) / 2, (1 + 0) / 2
    np.testing.assert_allclose(cyclegan.lsgan_fake_loss(scores).numpy(), [1.25, 0.5])
    a = tf.constant([[[[1.0], [-1.0]]]])                                  # (1, 1, 2, 1)
    b = tf.constant([[[[0.5], [0.0]]]])
    np.testing.assert_allclose(cyclegan.l1_loss(a, b).numpy(), [0.75])


def test_learning_rate_constant_then_linear_to_zero():
    schedule = cyclegan.LinearDecaySecondHalf(2e-4, 10)
    values = [float(schedule(step)) for step in (0, 4, 5, 6, 8, 10, 12)]
    np.testing.assert_allclose(values, [2e-4, 2e-4, 2e-4, 1.6e-4, 0.8e-4, 0.0, 0.0], atol=1e-12)
    again = cyclegan.LinearDecaySecondHalf.from_config(schedule.get_config())
    assert float(again(7)) == pytest.approx(1.2e-4)
    method = _method()
    assert float(method.gen_optimizer.learning_rate) == pytest.approx(2e-4)
    assert method.gen_optimizer.beta_1 == 0.5 and method.disc_optimizer.beta_1 == 0.5


# --------------------------------------------------------------------------- image pool
def test_image_pool_fills_then_swaps_half_the_time():
    pool = tf.Variable(tf.zeros((3, 1, 1, 1)))
    count = tf.Variable(0.0)
    first = tf.reshape(tf.constant([1.0, 2.0]), (2, 1, 1, 1))
    out = cyclegan.query_pool(pool, count, first, tf.constant([1, 2]))
    np.testing.assert_array_equal(out.numpy().ravel(), [1.0, 2.0])   # not full: returned as is
    assert float(count.numpy()) == 2.0
    np.testing.assert_array_equal(pool.numpy().ravel(), [1.0, 2.0, 0.0])
    swapped = 0
    for step in range(40):
        before = pool.numpy().ravel().copy()
        new = tf.fill((1, 1, 1, 1), 10.0 + step)
        out = float(cyclegan.query_pool(pool, count, new, tf.constant([7, step])).numpy().item())
        after = pool.numpy().ravel()
        if step == 0:  # the third image fills the pool and is returned
            assert out == 10.0 and list(after) == [1.0, 2.0, 10.0]
            continue
        if out == 10.0 + step:     # kept: the pool is unchanged
            np.testing.assert_array_equal(after, before)
        else:                      # an old image is returned and replaced by the new one
            swapped += 1
            assert out in before
            changed = np.flatnonzero(after != before)
            assert len(changed) == 1 and before[changed[0]] == out and \
                after[changed[0]] == 10.0 + step
    assert 8 <= swapped <= 31 and float(count.numpy()) == 3.0


# --------------------------------------------------------------------------- the GAN step
def _batch(method, target_shape=(20, 20)):
    rng = np.random.default_rng(0)
    b = method.config.gan_batch_size
    return {"labeled": {"image": rng.random((b, 16, 16, 2), np.float32),
                        "label": np.zeros((b, 16, 16), np.int32)},
            "unlabeled": {"image": rng.random((b, 16, 16, 2), np.float32)},
            "target": {"image": rng.random((b, *target_shape, 2), np.float32)}}


def test_gan_step_trains_translators_fills_pools_and_draws_panels():
    method = _method()
    data = _batch(method)
    segmentor = [w.numpy().copy() for w in method.segmentor.weights]
    gens = [w.numpy().copy() for w in method.gen_target_to_source.weights]
    logs = method.train_step(data)   # eager; a target of another size is cropped to 16 x 16
    assert set(logs) == set(cyclegan.GAN_LOSS_NAMES)
    assert all(np.isfinite(float(v)) for v in logs.values())
    # identity weight 0.5 x 10: the total is adv + 10 cycle + 5 identity
    total = float(logs["gen_adv"]) + 10 * float(logs["cycle_loss"]) \
        + 5 * float(logs["identity_loss"])
    assert float(logs["loss"]) == pytest.approx(total, rel=1e-5)
    assert all(np.array_equal(a, b.numpy()) for a, b in zip(segmentor, method.segmentor.weights))
    assert any(not np.array_equal(a, b.numpy())
               for a, b in zip(gens, method.gen_target_to_source.weights))
    assert float(method.pool_count_source.numpy()) == 2.0
    assert float(np.abs(method.pool_fake_target.numpy()[:2]).sum()) > 0
    panels = method.summary_images()
    assert set(panels) == {"cyclegan/target_source_target", "cyclegan/source_target_source"}
    for image in panels.values():
        assert image.shape == (1, 16, 48, 1) and 0.0 <= image.min() and image.max() <= 1.0
    translated = method.translate_to_source(data["target"]["image"])
    assert translated.shape == (2, 16, 16, 2)
    assert -1.0 <= float(tf.reduce_min(translated)) and float(tf.reduce_max(translated)) <= 2.0
    # The default range keeps a normalised background (a negative constant) representable.
    values = tf.constant([[-0.9, 0.0, 0.5, 1.4]])
    np.testing.assert_allclose(method.from_gan_range(method.to_gan_range(values)).numpy(),
                               values.numpy(), atol=1e-6)
    np.testing.assert_allclose(method.to_gan_range(tf.constant([[-3.0, 5.0]])).numpy(),
                               [[-1.0, 1.0]])          # clipped beyond the range


def test_a_cyclegan_run_has_no_segmentation_to_evaluate():
    method = _method()
    stage, = method.stages()
    assert not stage.trains_segmentor and "seg_optimizer" not in method.optimizers()
    with pytest.raises(ValueError, match="launch.translate"):
        cyclegan.build_predictor(method.config, SPEC)


_POOL_MIRRORED_SCRIPT = """
import json
import numpy as np
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from tfseg import distribute
from tfseg.methods import DataSpec, cyclegan, resolve_config
spec = DataSpec(2, 2, 2, ("background", "tumour"), (16, 16))
tiny = ("generator_filters=4", "discriminator_filters=4", "residual_blocks=1",
        "gan_batch_size=4", "pool_size=3", "steps=4", "validation_every=2")
strategy = distribute.make_strategy("mirrored")
def build():
    with strategy.scope():
        method = cyclegan.build(resolve_config(cyclegan, None, tiny), spec)
        method.compile()
    return method
method = build()
rng = np.random.default_rng(0)
data = tf.data.Dataset.from_tensors({
    "labeled": {"image": rng.random((4, 16, 16, 2), np.float32),
                "label": np.zeros((4, 16, 16), np.int32)},
    "unlabeled": {"image": rng.random((4, 16, 16, 2), np.float32)},
    "target": {"image": rng.random((4, 16, 16, 2), np.float32)}}).repeat()
method.fit(data, steps_per_epoch=2, epochs=1, verbose=0)
def copies(variable):
    return [v.numpy() for v in strategy.experimental_local_results(variable.value)]
pool = copies(method.pool_fake_source)
path = __import__("sys").argv[1]
method.save_weights(path)
fresh = build()
fresh.load_weights(path)
print(json.dumps({
    "replicas": strategy.num_replicas_in_sync,
    "count": [float(c) for c in copies(method.pool_count_source)],
    "filled": [float(np.abs(p).sum()) for p in pool[0]],
    "replica_diff": max(float(np.abs(p - pool[0]).max()) for p in pool),
    "restored_diff": max(float(np.abs(p - pool[0]).max()) for p in copies(fresh.pool_fake_source)),
}))
"""


def test_image_pools_stay_one_pool_under_mirrored_strategy(tmp_path):
    """Two replicas (two logical CPUs): each replica's assignments to the pool keep one value on
    both copies, the pool fills, and a checkpoint restores it onto both replicas."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run([sys.executable, "-c", _POOL_MIRRORED_SCRIPT,
                             str(tmp_path / "pools.weights.h5")], cwd=root, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["replicas"] == 2 and out["count"] == [3.0, 3.0]
    assert all(total > 0 for total in out["filled"])       # every slot holds a fake
    assert out["replica_diff"] == 0.0 and out["restored_diff"] == 0.0
