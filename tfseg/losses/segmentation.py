"""Segmentation losses: stateless functions (y_true, logits) -> per-example loss (B,).

Conventions shared by every function here:
- `y_true` holds class probabilities (B, *S, K): one-hot labels, or soft labels after mixup or
  bilinear warping of one-hot maps (task_aug). `logits` are the raw network outputs (B, *S, K).
  *S is any number of spatial axes (2D slices, 3D patches).
- Everything is computed in float32 whatever the input dtypes (bf16 logits under
  `mixed_bfloat16` included), with log-softmax for numerical stability: logits of ±1e4 give finite
  losses and gradients.
- `activation` says what the logits mean: "softmax" (default) for exclusive classes, "sigmoid"
  for overlapping regions (one independent sigmoid per channel; `y_true` holds region masks,
  and every channel is foreground).
- The result is one value per example; the caller reduces (under a distribution strategy, with
  the global batch size: docs/performance.md).
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import tensorflow as tf

LOSS_NAMES = ("ce", "weighted_ce", "dice", "dice_ce")
ACTIVATIONS = ("softmax", "sigmoid")


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r}; choose one of {list(ACTIVATIONS)}.")


def probabilities_of(logits, activation: str = "softmax"):
    """Softmax over the class axis, or an element-wise sigmoid (regions); float32."""
    _check_activation(activation)
    logits = tf.cast(logits, tf.float32)
    return tf.nn.softmax(logits, axis=-1) if activation == "softmax" else tf.sigmoid(logits)


def _prepare(y_true, logits):
    """Casts to float32 and checks that the shapes agree. Returns (y_true, logits, spatial axes)."""
    y_true = tf.cast(y_true, tf.float32)
    logits = tf.cast(logits, tf.float32)
    if y_true.shape.rank is not None and y_true.shape.rank < 3:
        raise ValueError(f"segmentation loss: expected y_true of shape (B, *spatial, K) with at "
                         f"least one spatial axis, got {y_true.shape}.")
    if not y_true.shape.is_compatible_with(logits.shape):
        raise ValueError(
            f"segmentation loss: y_true {y_true.shape} and logits {logits.shape} differ. y_true "
            f"must be class probabilities with the logits' shape; convert integer labels with "
            f"tf.one_hot(labels, num_classes).")
    spatial_axes = list(range(1, logits.shape.rank - 1))
    return y_true, logits, spatial_axes


def _class_weight_vector(class_weights, num_classes):
    weights = tf.constant(class_weights, tf.float32)
    if weights.shape.rank != 1 or (num_classes is not None and weights.shape[0] != num_classes):
        raise ValueError(f"class_weights={list(class_weights)} must hold one weight per class "
                         f"({num_classes} classes).")
    return weights


def task_driven_class_weights(num_classes: int) -> tuple[float, ...]:
    """Class weights of the task-driven augmentation paper: background 0.1, 0.9 split equally.

    Chaitanya et al., MedIA 2021: weighted cross-entropy with background weight 0.1 and the
    remaining 0.9 shared by the foreground classes (ACDC, 4 classes: 0.1, 0.3, 0.3, 0.3).

    Args:
        num_classes: K ≥ 2, background included.

    Returns:
        (0.1, 0.9/(K−1), …, 0.9/(K−1)).

    Raises:
        ValueError: if num_classes < 2.
    """
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"task_driven_class_weights: num_classes={num_classes!r} must be an "
                         f"int >= 2 (background plus at least one foreground class).")
    return (0.1,) + (0.9 / (num_classes - 1),) * (num_classes - 1)


def cross_entropy(y_true, logits, class_weights: Sequence[float] | None = None,
                  activation: str = "softmax"):
    """(Class-weighted) softmax cross-entropy, averaged over voxels, per example.

    With `activation="sigmoid"` (regions) it is the binary cross-entropy of each region,
    averaged over voxels and regions; `class_weights` then weigh the regions (per voxel
    w = mean over regions of wᵣ·BCEᵣ, not renormalised).

    Per voxel: CE = −Σₖ yₖ·log softmax(logits)ₖ and, with class weights, the voxel weight
    w = Σₖ wₖ·yₖ (the weight of its class for one-hot labels; the probability-weighted mix for soft
    labels). The loss of an example is the plain mean over its N voxels of w·CE — not divided by
    Σw — as in the task-driven reference code; so the weights scale the loss as well as
    rebalance it (with weights (0.1, 0.3, 0.3, 0.3) the loss is smaller than the unweighted one).

    Args:
        y_true: (B, *S, K) class probabilities.
        logits: (B, *S, K).
        class_weights: None (unweighted) or K weights, e.g. `task_driven_class_weights(K)`.
        activation: "softmax" (classes) or "sigmoid" (regions).

    Returns:
        (B,) float32.

    Raises:
        ValueError: on mismatched shapes or a class_weights length other than K.
    """
    _check_activation(activation)
    y_true, logits, spatial_axes = _prepare(y_true, logits)
    if activation == "sigmoid":
        voxel_bce = tf.nn.sigmoid_cross_entropy_with_logits(labels=y_true, logits=logits)
        if class_weights is not None:
            voxel_bce = voxel_bce * _class_weight_vector(class_weights, logits.shape[-1])
        return tf.reduce_mean(voxel_bce, axis=spatial_axes + [logits.shape.rank - 1])
    voxel_ce = -tf.reduce_sum(y_true * tf.nn.log_softmax(logits, axis=-1), axis=-1)   # (B, *S)
    if class_weights is not None:
        weights = _class_weight_vector(class_weights, logits.shape[-1])
        voxel_ce = voxel_ce * tf.reduce_sum(y_true * weights, axis=-1)
    return tf.reduce_mean(voxel_ce, axis=spatial_axes)


def soft_dice_loss(y_true, logits, smooth: float = 1e-5, include_background: bool = False,
                   activation: str = "softmax", batch: bool = False):
    """Soft Dice loss per example: 1 − mean over classes of (2Σp·y + s) / (Σp + Σy + s).

    p = softmax(logits); sums run over the spatial axes of each example and class separately
    (Milletari et al., V-Net, 2016, with the linear denominator). A class absent from both the
    label and the prediction scores ≈ 1 thanks to `smooth`; a class absent from the label but
    predicted with mass Σp scores s/(Σp + s) ≈ 0.

    Args:
        y_true: (B, *S, K) class probabilities.
        logits: (B, *S, K).
        smooth: s, added to numerator and denominator.
        include_background: average over all K classes instead of classes 1 … K−1.
        activation: "softmax" (classes) or "sigmoid" (regions: p = sigmoid(logits), every
            region is averaged; `include_background` does not apply).
        batch: "batch Dice" (as nnU-Net trains 2D models): the sums also run over the batch,
            so the one value (repeated per example) weighs every voxel of the batch equally. On
            slices, many examples hold no foreground at all; per example, their term is ≈ 1
            for any predicted mass and drives every prediction towards zero.

    Returns:
        (B,) float32 in [0, 1].

    Raises:
        ValueError: on mismatched shapes, or K = 1 without include_background.
    """
    y_true, logits, spatial_axes = _prepare(y_true, logits)
    probabilities = probabilities_of(logits, activation)
    if activation == "softmax" and not include_background:
        if logits.shape[-1] is not None and logits.shape[-1] < 2:
            raise ValueError("soft_dice_loss: include_background=False needs at least 2 classes.")
        probabilities, y_true = probabilities[..., 1:], y_true[..., 1:]
    axes = [0, *spatial_axes] if batch else spatial_axes
    intersection = tf.reduce_sum(probabilities * y_true, axis=axes, keepdims=batch)   # (B|1, K')
    total = tf.reduce_sum(probabilities + y_true, axis=axes, keepdims=batch)
    dice = (2.0 * intersection + smooth) / (total + smooth)
    loss = 1.0 - tf.reduce_mean(dice, axis=-1)
    if batch:
        loss = tf.broadcast_to(tf.reshape(loss, [1]), tf.shape(logits)[:1])
    return loss


def dice_ce_loss(y_true, logits, dice_weight: float = 1.0, ce_weight: float = 1.0,
                 class_weights: Sequence[float] | None = None, activation: str = "softmax",
                 batch_dice: bool = False):
    """dice_weight · soft_dice_loss (foreground classes) + ce_weight · cross_entropy.

    Args:
        y_true: (B, *S, K) class probabilities.
        logits: (B, *S, K).
        dice_weight: factor of the soft Dice term.
        ce_weight: factor of the cross-entropy term.
        class_weights: optional class weights of the cross-entropy term.
        activation: "softmax" (classes) or "sigmoid" (regions).
        batch_dice: the Dice term as batch Dice (`soft_dice_loss(batch=True)`).

    Returns:
        (B,) float32.

    Raises:
        ValueError: as `cross_entropy` and `soft_dice_loss`.
    """
    return (dice_weight * soft_dice_loss(y_true, logits, activation=activation, batch=batch_dice)
            + ce_weight * cross_entropy(y_true, logits, class_weights=class_weights,
                                        activation=activation))


def get_loss(name: str, num_classes: int | None = None,
             class_weights: Sequence[float] | None = None) -> Callable:
    """Returns a loss function (y_true, logits) -> (B,) by name.

    Args:
        name: "ce" (unweighted cross-entropy), "weighted_ce" (cross-entropy with `class_weights`,
            by default `task_driven_class_weights(num_classes)`), "dice" (soft Dice over the
            foreground classes) or "dice_ce" (their sum; CE weighted if `class_weights` given).
        num_classes: K, needed by "weighted_ce" when class_weights is None.
        class_weights: explicit class weights for "weighted_ce" / "dice_ce".

    Returns:
        The loss function.

    Raises:
        ValueError: for an unknown name, or "weighted_ce" with neither num_classes nor weights.
    """
    if name == "ce":
        return cross_entropy
    if name == "weighted_ce":
        if class_weights is None:
            if num_classes is None:
                raise ValueError("get_loss('weighted_ce') needs num_classes (for the task-driven "
                                 "default weights) or explicit class_weights.")
            class_weights = task_driven_class_weights(num_classes)
        return functools.partial(cross_entropy, class_weights=tuple(class_weights))
    if name == "dice":
        return soft_dice_loss
    if name == "dice_ce":
        return functools.partial(dice_ce_loss, class_weights=class_weights)
    raise ValueError(f"Unknown loss {name!r}; choose one of {list(LOSS_NAMES)}.")
