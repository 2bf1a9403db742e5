"""Golden-value tests of tfseg.losses (every expected number is worked out in the comments)."""
import math

import numpy as np
import pytest
import tensorflow as tf

from tfseg.losses import (cross_entropy, dice_ce_loss, get_loss, soft_dice_loss,
                          task_driven_class_weights)

LOG2 = math.log(2.0)
LOG3 = math.log(3.0)


def _example():
    """One example of 1×2 voxels, K = 2: shape (B=1, H=1, W=2, K=2).

    voxel 1: logits (0, 0)      -> p = (0.5, 0.5);   label class 1
    voxel 2: logits (log 3, 0)  -> p = (0.75, 0.25); label class 0
    """
    logits = np.array([[[[0.0, 0.0], [LOG3, 0.0]]]], np.float32)
    y_true = np.array([[[[0.0, 1.0], [1.0, 0.0]]]], np.float32)
    return y_true, logits


def test_cross_entropy_golden_value():
    y_true, logits = _example()
    # voxel 1: −log 0.5 = 0.693147; voxel 2: −log 0.75 = 0.287682; mean = 0.490415
    expected = (LOG2 - math.log(0.75)) / 2
    loss = cross_entropy(y_true, logits)
    assert loss.shape == (1,) and loss.dtype == tf.float32
    np.testing.assert_allclose(loss, [expected], rtol=1e-6)
    np.testing.assert_allclose(expected, 0.490415, atol=1e-6)


def test_weighted_cross_entropy_golden_value():
    y_true, logits = _example()
    # weights (0.1, 0.9): voxel 1 (class 1) 0.9·0.693147 = 0.623832,
    # voxel 2 (class 0) 0.1·0.287682 = 0.028768; mean over the 2 voxels = 0.326300
    expected = (0.9 * LOG2 + 0.1 * -math.log(0.75)) / 2
    np.testing.assert_allclose(cross_entropy(y_true, logits, class_weights=(0.1, 0.9)),
                               [expected], rtol=1e-6)
    np.testing.assert_allclose(expected, 0.326300, atol=1e-6)


def test_cross_entropy_with_soft_labels():
    # y = (0.25, 0.75), logits (0, 0): CE = −(0.25 + 0.75)·log 0.5 = log 2;
    # voxel weight = 0.25·0.1 + 0.75·0.9 = 0.7 -> weighted CE = 0.7·log 2 = 0.485203
    y_true = np.array([[[[0.25, 0.75]]]], np.float32)
    logits = np.zeros((1, 1, 1, 2), np.float32)
    np.testing.assert_allclose(cross_entropy(y_true, logits), [LOG2], rtol=1e-6)
    np.testing.assert_allclose(cross_entropy(y_true, logits, class_weights=(0.1, 0.9)),
                               [0.7 * LOG2], rtol=1e-6)


def test_soft_dice_golden_values():
    y_true, logits = _example()
    # Foreground class 1: Σp·y = 0.5 (voxel 1), Σp = 0.5 + 0.25 = 0.75, Σy = 1
    #   Dice = (2·0.5 + s)/(0.75 + 1 + s) = 1/1.75 = 0.571429 -> loss 0.428571
    s = 1e-5
    dice_fg = (1.0 + s) / (1.75 + s)
    np.testing.assert_allclose(soft_dice_loss(y_true, logits), [1 - dice_fg], rtol=1e-6)
    # Background class 0: Σp·y = 0.75 (voxel 2), Σp = 0.5 + 0.75 = 1.25, Σy = 1
    #   Dice = 1.5/2.25 = 0.666667; mean with the foreground = 0.619048 -> loss 0.380952
    dice_bg = (1.5 + s) / (2.25 + s)
    np.testing.assert_allclose(soft_dice_loss(y_true, logits, include_background=True),
                               [1 - (dice_fg + dice_bg) / 2], rtol=1e-6)
    np.testing.assert_allclose(1 - (dice_fg + dice_bg) / 2, 0.380952, atol=1e-5)


def test_losses_are_per_example():
    y_true, logits = _example()
    # Example 2: perfect confident prediction -> CE ≈ 0, Dice ≈ 1.
    y_true2 = y_true.copy()
    logits2 = (y_true * 40.0 - 20.0).astype(np.float32)
    batch_y, batch_logits = np.concatenate([y_true, y_true2]), np.concatenate([logits, logits2])
    ce = cross_entropy(batch_y, batch_logits).numpy()
    dice = soft_dice_loss(batch_y, batch_logits).numpy()
    assert ce.shape == dice.shape == (2,)
    np.testing.assert_allclose(ce[0], cross_entropy(y_true, logits)[0], rtol=1e-6)
    assert ce[1] < 1e-15 and dice[1] < 1e-6


def test_absent_class_predicted_scores_zero_dice():
    # Class 2 absent from the label but predicted with mass Σp = 0.2 -> Dice = s/(0.2 + s) ≈ 0:
    # false positives of an absent class are penalised.
    y_true = np.array([[[[0, 1, 0]]]], np.float32)
    p = np.array([0.0, 0.8, 0.2])
    logits = np.log(p + 1e-30).astype(np.float32)[None, None, None]
    per_class_loss = soft_dice_loss(y_true, logits).numpy()[0]
    # class 1: 2·0.8/(0.8 + 1) = 0.888889; class 2: ≈ 5e-5 -> loss = 1 − (0.888889 + 0)/2
    np.testing.assert_allclose(per_class_loss, 1 - (1.6 / 1.8) / 2, atol=1e-4)


def test_dice_ce_combines_both_terms():
    y_true, logits = _example()
    expected = 2.0 * soft_dice_loss(y_true, logits) + 0.5 * cross_entropy(
        y_true, logits, class_weights=(0.1, 0.9))
    np.testing.assert_allclose(
        dice_ce_loss(y_true, logits, dice_weight=2.0, ce_weight=0.5, class_weights=(0.1, 0.9)),
        expected, rtol=1e-6)


def test_cross_entropy_gradient_is_softmax_minus_target_over_voxels():
    y_true, logits = _example()
    logits_t = tf.constant(logits)
    with tf.GradientTape() as tape:
        tape.watch(logits_t)
        loss = cross_entropy(y_true, logits_t)
    # d mean(CE)/d logits = (softmax − y)/N, N = 2 voxels:
    # voxel 1: (0.5 − 0, 0.5 − 1)/2 = (0.25, −0.25); voxel 2: (0.75 − 1, 0.25 − 0)/2
    expected = np.array([[[[0.25, -0.25], [-0.125, 0.125]]]])
    np.testing.assert_allclose(tape.gradient(loss, logits_t), expected, atol=1e-6)


@pytest.mark.parametrize("name", ["ce", "weighted_ce", "dice", "dice_ce"])
def test_extreme_logits_give_finite_losses_and_gradients(name):
    # 3D example (B, D, H, W, K) with confident right and wrong predictions of ±1e4.
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, (2, 2, 3, 3))
    y_true = tf.one_hot(labels, 3)
    logits = tf.constant(rng.choice([-1e4, 1e4], (2, 2, 3, 3, 3)), tf.float32)
    loss_fn = get_loss(name, num_classes=3)
    with tf.GradientTape() as tape:
        tape.watch(logits)
        loss = loss_fn(y_true, logits)
    grad = tape.gradient(loss, logits)
    assert loss.shape == (2,)
    assert np.all(np.isfinite(loss)) and np.all(np.isfinite(grad))
    if name == "ce":
        assert loss.numpy().max() > 1e3          # wrong confident voxels cost ~2e4 each


def test_bfloat16_logits_are_computed_in_float32():
    y_true, logits = _example()
    for fn in (cross_entropy, soft_dice_loss, dice_ce_loss):
        loss = fn(y_true, tf.cast(logits, tf.bfloat16))
        assert loss.dtype == tf.float32
        np.testing.assert_allclose(loss, fn(y_true, logits), rtol=1e-2)


def test_task_driven_class_weights():
    assert task_driven_class_weights(4) == pytest.approx((0.1, 0.3, 0.3, 0.3))
    assert task_driven_class_weights(2) == pytest.approx((0.1, 0.9))
    with pytest.raises(ValueError, match="num_classes=1"):
        task_driven_class_weights(1)


def test_get_loss_by_name():
    y_true, logits = _example()
    np.testing.assert_allclose(get_loss("weighted_ce", num_classes=2)(y_true, logits),
                               cross_entropy(y_true, logits, class_weights=(0.1, 0.9)))
    np.testing.assert_allclose(get_loss("weighted_ce", class_weights=(1.0, 3.0))(y_true, logits),
                               cross_entropy(y_true, logits, class_weights=(1.0, 3.0)))
    assert get_loss("ce") is cross_entropy and get_loss("dice") is soft_dice_loss
    with pytest.raises(ValueError, match="Unknown loss 'focal'.*'dice_ce'"):
        get_loss("focal")
    with pytest.raises(ValueError, match="needs num_classes"):
        get_loss("weighted_ce")


def test_bad_inputs_are_rejected():
    y_true, logits = _example()
    with pytest.raises(ValueError, match="tf.one_hot"):
        cross_entropy(np.zeros((1, 1, 2), np.float32), logits)
    with pytest.raises(ValueError, match="one weight per class"):
        cross_entropy(y_true, logits, class_weights=(0.1, 0.45, 0.45))


def test_batch_dice_pools_the_batch_hand_computed():
    """Two 1 x 2 examples, one region, p = sigmoid(0) = 0.5 everywhere: example 1 has truth
    [1, 0], example 2 none. Per example: 1 - (2 * 0.5) / (1 + 1) = 0.5 and 1 - 0 / 1 = 1 (the
    empty slice). Batch Dice: intersection 0.5, total 2 + 1 = 3: 1 - 1 / 3 for both."""
    import numpy as np
    import tensorflow as tf

    from tfseg.losses import segmentation as seg

    y_true = tf.constant([[[[1.0], [0.0]]], [[[0.0], [0.0]]]])       # (2, 1, 2, 1)
    logits = tf.zeros_like(y_true)
    per_example = seg.soft_dice_loss(y_true, logits, smooth=0.0 + 1e-12, activation="sigmoid")
    np.testing.assert_allclose(per_example.numpy(), [0.5, 1.0], atol=1e-6)
    pooled = seg.soft_dice_loss(y_true, logits, smooth=1e-12, activation="sigmoid", batch=True)
    np.testing.assert_allclose(pooled.numpy(), [2 / 3, 2 / 3], atol=1e-6)
    both = seg.dice_ce_loss(y_true, logits, activation="sigmoid", batch_dice=True)
    np.testing.assert_allclose(both.numpy(), 2 / 3 + np.log(2.0), atol=1e-5)
