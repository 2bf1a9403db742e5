"""tfseg.losses.gan: golden values against hand computation, large logits, gradients."""
from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf

from tfseg.losses import gan


def _logits(*voxels):
    """(1, N, K) logits from N voxel logit vectors."""
    return tf.constant([voxels], tf.float32)


def test_k_plus_one_terms_golden_values():
    # Z = 3 (all logits 0): p(real) = 3/4, p(fake) = 1/4.
    logits = _logits([0.0, 0.0, 0.0])
    assert float(gan.unlabeled_loss(logits)[0]) == pytest.approx(math.log(4 / 3), rel=1e-6)
    assert float(gan.fake_loss(logits)[0]) == pytest.approx(math.log(4), rel=1e-6)
    assert float(gan.fake_probability(logits)[0, 0]) == pytest.approx(0.25, rel=1e-6)
    assert float(gan.generator_nonsaturating_loss(logits)[0]) == pytest.approx(math.log(4 / 3))
    # Mean over voxels: second voxel Z = e^1 + 2.
    logits = _logits([0.0, 0.0, 0.0], [1.0, 0.0, 0.0])
    z2 = math.e + 2
    assert float(gan.unlabeled_loss(logits)[0]) == pytest.approx(
        (math.log(4 / 3) - math.log(z2 / (z2 + 1))) / 2, rel=1e-6)
    assert float(gan.fake_loss(logits)[0]) == pytest.approx(
        (math.log(4) + math.log(z2 + 1)) / 2, rel=1e-6)


def test_per_example_reduction_over_3d_voxels():
    logits = tf.zeros((2, 2, 3, 4, 5))            # (B, D, H, W, K): Z = 5 everywhere
    np.testing.assert_allclose(gan.unlabeled_loss(logits).numpy(), [math.log(6 / 5)] * 2,
                               rtol=1e-6)
    np.testing.assert_allclose(gan.fake_loss(logits).numpy(), [math.log(6)] * 2, rtol=1e-6)


@pytest.mark.parametrize("value", [1000.0, -1000.0])
def test_large_logits_no_overflow_and_finite_gradients(value):
    logits = tf.Variable(_logits([value, 0.0 if value > 0 else value, value]))
    with tf.GradientTape(persistent=True) as tape:
        unlabeled = gan.unlabeled_loss(logits)[0]
        fake = gan.fake_loss(logits)[0]
    if value > 0:   # LSE ≈ 1000 + log 2: p(real) = 1, p(fake) = e^-1000
        assert float(unlabeled) == pytest.approx(0.0, abs=1e-6)
        assert float(fake) == pytest.approx(1000 + math.log(2), rel=1e-6)
    else:           # LSE = −1000 + log 3: −log p(real) ≈ 1000 − log 3, −log p(fake) ≈ 0
        assert float(unlabeled) == pytest.approx(1000 - math.log(3), rel=1e-6)
        assert float(fake) == pytest.approx(0.0, abs=1e-6)
    for loss in (unlabeled, fake):
        gradient = tape.gradient(loss, logits).numpy()
        assert np.all(np.isfinite(gradient))
    # d fake / d l = softmax · sigmoid(LSE): sums to p(real) over the classes.
    assert float(tf.reduce_sum(tape.gradient(fake, logits))) == pytest.approx(
        1.0 if value > 0 else 0.0, abs=1e-6)


def test_labeled_loss_is_class_weighted_cross_entropy():
    weights = (0.33, 1.5, 0.83, 1.33)
    logits = _logits([2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1000.0])
    y = tf.one_hot([[0, 1]], 4)
    expected = (0.33 * math.log(1 + 3 * math.exp(-2)) + 1.5 * 1000.0) / 2
    assert float(gan.labeled_loss(y, logits, weights)[0]) == pytest.approx(expected, rel=1e-6)
    assert float(gan.labeled_loss(y, logits)[0]) == pytest.approx(
        (math.log(1 + 3 * math.exp(-2)) + 1000.0) / 2, rel=1e-6)


def test_feature_matching_norms_golden_values():
    real = tf.constant([[[1.0, 2.0]], [[3.0, 4.0]]])   # batch mean [[2, 3]]
    fake = tf.constant([[[0.0, 0.0]]])                 # batch mean [[0, 0]]
    assert float(gan.feature_matching(real, fake)) == pytest.approx(6.5)
    assert float(gan.feature_matching(real, fake, "squared_l2")) == pytest.approx(6.5)
    assert float(gan.feature_matching(real, fake, "l1")) == pytest.approx(2.5)
    assert float(gan.feature_matching(real, fake, "l2")) == pytest.approx(math.sqrt(6.5))
    assert float(gan.feature_matching(real, real)) == 0.0
    with pytest.raises(ValueError, match=r"norm='l3'.*squared_l2"):
        gan.feature_matching(real, fake, "l3")
    with pytest.raises(ValueError, match=r"differ beyond the batch axis"):
        gan.feature_matching(real, tf.zeros((1, 2, 2)))


def test_feature_matching_gradient_flows_to_fake_only_through_the_batch_mean():
    real = tf.constant([[1.0, 2.0], [3.0, 4.0]])
    fake = tf.Variable([[0.0, 0.0], [0.0, 2.0]])       # mean [0, 1]; diff [2, 2]
    with tf.GradientTape() as tape:
        loss = gan.feature_matching(real, fake)        # mean(diff²) = 4
    assert float(loss) == pytest.approx(4.0)
    # d/d fake_ij of (1/n)·Σ_j (r̄_j − f̄_j)² = −(2/n)·(r̄_j − f̄_j)·(1/B) = −(2/2)·2·(1/2) = −1.
    np.testing.assert_allclose(tape.gradient(loss, fake).numpy(), [[-1.0, -1.0], [-1.0, -1.0]])


def test_gaussian_nll_golden_value():
    z = tf.constant([[0.0, 1.0]])
    mu = tf.constant([[0.0, 0.0]])
    log_sigma = tf.constant([[0.0, math.log(2.0)]])
    c = 0.5 * math.log(2 * math.pi)
    expected = c + (0.5 * 0.25 + math.log(2.0) + c)
    assert float(gan.gaussian_nll(z, mu, log_sigma)[0]) == pytest.approx(expected, rel=1e-6)
    # Per example, summed over the latent axis.
    assert gan.gaussian_nll(tf.zeros((3, 5)), tf.zeros((3, 5)), tf.zeros((3, 5))).shape == (3,)


# --------------------------------------------------------------------------- binary discriminator
def test_binary_discriminator_terms_at_logit_zero_are_log_2():
    logits = tf.zeros((3, 1))                          # D(x) = 1/2
    for loss in (gan.discriminator_real_loss, gan.discriminator_fake_loss,
                 gan.generator_adversarial_loss):
        np.testing.assert_allclose(loss(logits).numpy(), [math.log(2)] * 3, rtol=1e-6)
    np.testing.assert_allclose(gan.discriminator_probability(logits).numpy(), [0.5] * 3)


def test_binary_discriminator_terms_golden_values():
    logits = tf.constant([[2.0], [-1.0]])              # (B, 1): one logit per example
    real = [math.log(1 + math.exp(-2)), math.log(1 + math.exp(1))]    # −log sigmoid(l)
    fake = [math.log(1 + math.exp(2)), math.log(1 + math.exp(-1))]    # −log(1 − sigmoid(l))
    np.testing.assert_allclose(gan.discriminator_real_loss(logits).numpy(), real, rtol=1e-6)
    np.testing.assert_allclose(gan.discriminator_fake_loss(logits).numpy(), fake, rtol=1e-6)
    # Non-saturating: the generator wants its fakes called real.
    np.testing.assert_allclose(gan.generator_adversarial_loss(logits).numpy(), real, rtol=1e-6)
    np.testing.assert_allclose(gan.discriminator_probability(logits).numpy(),
                               [1 / (1 + math.exp(-2)), 1 / (1 + math.exp(1))], rtol=1e-6)
    # Soft targets: y = 1/4 mixes the two terms.
    np.testing.assert_allclose(gan.sigmoid_cross_entropy(0.25, logits).numpy(),
                               [0.25 * r + 0.75 * f for r, f in zip(real, fake)], rtol=1e-6)


def test_binary_discriminator_terms_average_patch_logits_per_example():
    logits = tf.constant([[[0.0, 2.0], [-1.0, 0.0]]])  # (1, 2, 2): a patch discriminator
    expected = (2 * math.log(2) + math.log(1 + math.exp(-2)) + math.log(1 + math.exp(1))) / 4
    assert gan.discriminator_real_loss(logits).shape == (1,)
    assert float(gan.discriminator_real_loss(logits)[0]) == pytest.approx(expected, rel=1e-6)
    assert gan.discriminator_real_loss(tf.zeros((4,))).shape == (4,)   # (B,) logits as they are


@pytest.mark.parametrize("value", [1000.0, -1000.0])
def test_binary_discriminator_terms_large_logits_stay_finite(value):
    logits = tf.Variable([[value]])
    with tf.GradientTape(persistent=True) as tape:
        real = gan.discriminator_real_loss(logits)[0]
        fake = gan.discriminator_fake_loss(logits)[0]
    # softplus(−l) and softplus(l): 0 on the right side, |l| on the wrong one (no inf, no NaN).
    assert float(real) == pytest.approx(0.0 if value > 0 else 1000.0, abs=1e-6)
    assert float(fake) == pytest.approx(1000.0 if value > 0 else 0.0, abs=1e-6)
    # d real / d l = sigmoid(l) − 1, d fake / d l = sigmoid(l).
    sigmoid = 1.0 if value > 0 else 0.0
    assert float(tape.gradient(real, logits)[0, 0]) == pytest.approx(sigmoid - 1.0, abs=1e-6)
    assert float(tape.gradient(fake, logits)[0, 0]) == pytest.approx(sigmoid, abs=1e-6)
    assert float(gan.discriminator_probability(logits)[0]) == pytest.approx(sigmoid, abs=1e-6)
