"""Losses of the K+1-class semi-supervised GAN (Salimans et al. 2016; Mondal, Dolz & Desrosiers
2018, "Few-shot 3D multi-modal medical image segmentation using generative adversarial learning").

The segmentor outputs K logits lₖ per voxel; the fake class has the implicit logit 0, so with
Z = Σₖ exp(lₖ) and LSE = log Z:

    p(fake | x)   = 1 / (Z + 1)   = sigmoid(−LSE)
    p(real | x)   = Z / (Z + 1)   = sigmoid(LSE)

Per voxel (the functions below return the mean over voxels, per example):

- unlabeled (real) loss  −log(Z / (Z + 1)) = −LSE + softplus(LSE)
- fake loss             −log(1 / (Z + 1)) = softplus(LSE)
- non-saturating generator loss on generated patches: −log p(real | G(z)) = −LSE + softplus(LSE)
  (the unlabeled loss applied to fakes).

LSE comes from `tf.reduce_logsumexp` and softplus from `tf.nn.softplus`, so logits of ±1000 give
finite values and gradients (the naive log(Z / (Z + 1)) overflows at l ≈ 89 in float32).

Feature matching (Salimans et al., eq. 11 of the few-shot paper): the distance between the batch
means of an intermediate segmentor feature on real and on generated patches. The mean is over the
batch axis only (the feature keeps its spatial layout, as the reference code did); the distance is
then reduced over the feature's n elements by `reduction`: "mean" (the default here and the
reference code's: its scale does not depend on the feature size) or "sum" (the paper's ‖·‖²₂,
n times the mean; with it, the feature term and the summed entropy term below are reduced the
same way, as eq. 12 of the few-shot paper adds them).

The variational entropy term of the bad GAN (Dai et al., "Good Semi-supervised Learning that
Requires a Bad GAN", NeurIPS 2017): −log q(z | x) for a diagonal Gaussian q with mean μ and
log-standard-deviation log σ predicted by an encoder from the generated x, summed over the latent
dimensions: Σ_d [½((z_d − μ_d) / σ_d)² + log σ_d + ½ log 2π].

Binary (sigmoid) discriminator, as in task_aug's D_V and D_I: one logit l per example (or per
patch), D(x) = sigmoid(l), real images labelled 1 and generated ones 0. Per example (the mean over
the logits of each example, which is the logit itself for a (B, 1) output):

- discriminator loss on real images      −log D(x)         = softplus(−l)
- discriminator loss on generated images −log(1 − D(G(z))) = softplus(l)
- non-saturating generator loss          −log D(G(z))      = softplus(−l)
  (the real-image loss applied to generated images; Goodfellow et al. 2014)

computed by `tf.nn.sigmoid_cross_entropy_with_logits` (max(l, 0) − l·y + log(1 + e^−|l|)), so a
logit of ±1000 gives a finite loss and gradient.
"""
from __future__ import annotations

import math
from typing import Sequence

import tensorflow as tf

from tfseg.losses.segmentation import cross_entropy

FEATURE_NORMS = ("squared_l2", "l2", "l1")
FEATURE_REDUCTIONS = ("mean", "sum")


def _spatial_axes(tensor: tf.Tensor) -> list[int]:
    return list(range(1, tensor.shape.rank))


def logsumexp(logits) -> tf.Tensor:
    """LSE = log Σₖ exp(lₖ) over the class axis: (B, *S, K) -> (B, *S) float32."""
    return tf.reduce_logsumexp(tf.cast(logits, tf.float32), axis=-1)


def fake_probability(logits) -> tf.Tensor:
    """p(fake | x) = 1 / (Z + 1) = sigmoid(−LSE) per voxel: (B, *S, K) -> (B, *S)."""
    return tf.sigmoid(-logsumexp(logits))


def labeled_loss(y_true, logits, class_weights: Sequence[float] | None = None) -> tf.Tensor:
    """Class-weighted cross-entropy over the K real classes, mean over voxels: (B,).

    Conditioned on "real", the K+1-class softmax is the K-class softmax, so this is the ordinary
    (weighted) cross-entropy (`tfseg.losses.segmentation.cross_entropy`).
    """
    return cross_entropy(y_true, tf.cast(logits, tf.float32), class_weights=class_weights)


def unlabeled_loss(logits) -> tf.Tensor:
    """−log p(real | x) = −LSE + softplus(LSE), mean over voxels: (B, *S, K) -> (B,)."""
    lse = logsumexp(logits)
    return tf.reduce_mean(-lse + tf.nn.softplus(lse), axis=_spatial_axes(lse))


def fake_loss(logits) -> tf.Tensor:
    """−log p(fake | x) = softplus(LSE), mean over voxels: (B, *S, K) -> (B,)."""
    lse = logsumexp(logits)
    return tf.reduce_mean(tf.nn.softplus(lse), axis=_spatial_axes(lse))


def generator_nonsaturating_loss(fake_logits) -> tf.Tensor:
    """−log p(real | G(z)) on generated patches, mean over voxels: (B,) (`gan_loss=standard`)."""
    return unlabeled_loss(fake_logits)


def sigmoid_cross_entropy(y_true, logits) -> tf.Tensor:
    """Binary cross-entropy of a sigmoid discriminator, mean over all but the batch axis.

    Args:
      y_true: target probabilities of "real" (1 real, 0 generated), broadcastable to `logits`.
      logits: (B, ...) discriminator logits (typically (B, 1)).

    Returns:
      (B,) float32: −y log sigmoid(l) − (1 − y) log(1 − sigmoid(l)), averaged per example.
    """
    logits = tf.cast(logits, tf.float32)
    y_true = tf.cast(tf.broadcast_to(y_true, tf.shape(logits)), tf.float32)
    loss = tf.nn.sigmoid_cross_entropy_with_logits(labels=y_true, logits=logits)
    return tf.reduce_mean(loss, axis=_spatial_axes(loss))


def discriminator_real_loss(real_logits) -> tf.Tensor:
    """−log D(x) on real images: (B, ...) logits -> (B,)."""
    return sigmoid_cross_entropy(tf.ones_like(real_logits), real_logits)


def discriminator_fake_loss(fake_logits) -> tf.Tensor:
    """−log(1 − D(G(z))) on generated images: (B, ...) logits -> (B,)."""
    return sigmoid_cross_entropy(tf.zeros_like(fake_logits), fake_logits)


def generator_adversarial_loss(fake_logits) -> tf.Tensor:
    """Non-saturating generator loss −log D(G(z)): (B, ...) logits of generated images -> (B,)."""
    return discriminator_real_loss(fake_logits)


def discriminator_probability(logits) -> tf.Tensor:
    """D(x) = sigmoid(l), the discriminator's probability of "real": (B, ...) -> (B,)."""
    probability = tf.sigmoid(tf.cast(logits, tf.float32))
    return tf.reduce_mean(probability, axis=_spatial_axes(probability))


def feature_matching(real_features, fake_features, norm: str = "squared_l2",
                     reduction: str = "mean") -> tf.Tensor:
    """Distance between the batch means of a feature on real and on generated examples.

    Args:
      real_features: (B, ...) features of real (unlabeled) examples.
      fake_features: (B', ...) the same feature of generated examples.
      norm: "squared_l2" (squared differences; the paper's eq. 11), "l2" (root of the squared
        distance) or "l1" (absolute differences, what the reference code used).
      reduction: over the n feature elements: "mean" (reference code) or "sum" (the paper's
        ‖·‖²₂ for "squared_l2", ‖·‖₂ for "l2", ‖·‖₁ for "l1"; n times "mean" except for "l2",
        √n times).

    Returns:
      A float32 scalar.

    Raises:
      ValueError: for an unknown norm or reduction, or mismatched feature shapes.
    """
    if norm not in FEATURE_NORMS:
        raise ValueError(f"feature_matching: norm={norm!r}; choose one of {list(FEATURE_NORMS)}.")
    if reduction not in FEATURE_REDUCTIONS:
        raise ValueError(f"feature_matching: reduction={reduction!r}; choose one of "
                         f"{list(FEATURE_REDUCTIONS)}.")
    real = tf.reduce_mean(tf.cast(real_features, tf.float32), axis=0)
    fake = tf.reduce_mean(tf.cast(fake_features, tf.float32), axis=0)
    if real.shape.is_fully_defined() and fake.shape.is_fully_defined() \
            and real.shape != fake.shape:
        raise ValueError(f"feature_matching: real features {real_features.shape} and fake "
                         f"features {fake_features.shape} differ beyond the batch axis.")
    difference = real - fake
    reduce = tf.reduce_sum if reduction == "sum" else tf.reduce_mean
    if norm == "l1":
        return reduce(tf.abs(difference))
    squared = reduce(tf.square(difference))
    if norm == "l2":
        return tf.sqrt(squared + 1e-12)
    return squared


def gaussian_nll(z, mu, log_sigma) -> tf.Tensor:
    """−log q(z | x) of a diagonal Gaussian, summed over the latent axis: (B, D) -> (B,).

    Args:
      z: (B, D) the latent codes the examples were generated from.
      mu: (B, D) predicted means.
      log_sigma: (B, D) predicted log standard deviations (bounded by the encoder).
    """
    z, mu, log_sigma = (tf.cast(t, tf.float32) for t in (z, mu, log_sigma))
    scaled = (z - mu) * tf.exp(-log_sigma)
    per_dim = 0.5 * tf.square(scaled) + log_sigma + 0.5 * math.log(2.0 * math.pi)
    return tf.reduce_sum(per_dim, axis=-1)
