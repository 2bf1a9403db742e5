"""Joint image/label augmentation in TF ops with stateless seeds.

Every transform draws its parameters from a shape-[2] integer `seed` with the stateless random
ops, so the same seed gives the same draw eagerly, inside `tf.data.Dataset.map` and inside a
traced train step, and image and label always get the same draw.

Pipeline operations (`spec` is "none" or a "+"-joined subset, applied in this fixed order):
  affine     2D only. Per example, with probability 0.8 one of {rotation U(-15°, 15°),
             scale U(0.9, 1.1), left-right flip, rotation by k·45° with k ∈ {0..7}}, else the
             identity (task-driven augmentation paper; k ranges over 0..7 as in its published
             code, so k = 0 is an identity draw).
  elastic    2D only. A 3×3 grid of N(0, σ = 10 px) displacements per axis, upsampled bicubically
             to a dense field.
  flip       2D and 3D. Left-right flip (last spatial axis, x) with probability 0.5.
  intensity  2D and 3D. Contrast c ~ U(0.8, 1.2) about the per-example, per-channel spatial mean
             (the slice mean in 2D, the patch mean in 3D) and brightness b ~ U(-0.1, 0.1), in the
             units of the percentile-normalised image ((x - p2) / (p98 - p2), so 0.1 is a tenth of
             the p2..p98 range). One (c, b) per example, shared by its channels. No gamma: the
             normalised intensities can be negative, where a power law is undefined.

  half       not an operation but a modifier: the other operations touch only every second
             example (odd batch positions 1, 3, 5, ...), the even positions get the spec's affine
             alone (or nothing without affine) — the task-driven paper's random-augmentation
             baselines, whose batches are half affine-only and half with the named augmentation.
             Alternate positions, not the second half of the batch, so that every replica's share
             of a distributed batch is half and half too. The two halves get their own draws
             (`split_half`).

Resampling: affine and elastic are composed into one sampling grid, so an image is interpolated
once. Images are sampled bilinearly with zero fill outside the image (the percentile-normalised
background level); labels are sampled with nearest neighbour and filled with class 0, so they stay
valid class indices. `mixup` is not a pipeline operation (it produces soft labels);
methods call `mixup` in their train step.
"""
from __future__ import annotations

import math
from typing import Sequence

import tensorflow as tf

PIPELINE_OPS = ("affine", "elastic", "flip", "intensity")  # also the order of application
HALF = "half"  # spec modifier: the non-affine operations touch odd batch positions only
_SPATIAL_ONLY_2D = ("affine", "elastic")


def parse_spec(spec: str, spatial_dims: int | None = None) -> tuple[str, ...]:
    """Checks an augmentation spec and returns its operations in application order.

    Args:
      spec: "none" (or "") or a "+"-joined subset of `PIPELINE_OPS`, e.g. "affine+intensity",
        optionally with the modifier "half" (`is_half`).
      spatial_dims: 2 or 3 to also check that every operation supports that dimensionality.

    Returns:
      The operations, ordered as applied (affine, elastic, flip, intensity); "half" is not one.

    Raises:
      ValueError: for an unknown or repeated operation, mixup, or a 2D-only operation with 3D.
    """
    text = (spec or "").strip().lower()
    if text in ("", "none"):
        return ()
    names = [part.strip() for part in text.split("+") if part.strip() != HALF]
    for name in names:
        if name == "mixup":
            raise ValueError(f"Augmentation spec {spec!r}: mixup produces soft labels, so it is not "
                             "a pipeline operation; methods apply tfseg.data.augment.mixup in "
                             "their train step. Remove 'mixup' from the pipeline spec.")
        if name not in PIPELINE_OPS:
            raise ValueError(f"Augmentation spec {spec!r}: unknown operation {name!r}. Use 'none' "
                             f"or a '+'-joined subset of {', '.join(PIPELINE_OPS)}.")
    if len(set(names)) != len(names):
        raise ValueError(f"Augmentation spec {spec!r} repeats an operation; list each once.")
    if spatial_dims == 3:
        bad = [n for n in names if n in _SPATIAL_ONLY_2D]
        if bad:
            raise ValueError(f"Augmentation spec {spec!r}: {', '.join(bad)} are implemented for 2D "
                             "slices only; for 3D patches use 'flip' and/or 'intensity'.")
    return tuple(op for op in PIPELINE_OPS if op in names)


def is_half(spec: str) -> bool:
    """True when `spec` carries the "half" modifier (see the module docstring)."""
    return HALF in [part.strip() for part in (spec or "").strip().lower().split("+")]


def split_half(tensor: tf.Tensor):
    """(even positions 0, 2, ..., odd positions 1, 3, ...) of a batch, and their indices."""
    index = tf.range(tf.shape(tensor)[0])
    even, odd = index[0::2], index[1::2]
    return tf.gather(tensor, even), tf.gather(tensor, odd), (even, odd)


def merge_half(even_part: tf.Tensor, odd_part: tf.Tensor, indices) -> tf.Tensor:
    """Inverse of `split_half`: the batch with the two parts back at their positions."""
    return tf.dynamic_stitch(list(indices), [even_part, odd_part])


def _as_seed(seed) -> tf.Tensor:
    seed = tf.convert_to_tensor(seed)
    if seed.dtype not in (tf.int32, tf.int64):
        seed = tf.cast(seed, tf.int64)
    return tf.ensure_shape(seed, [2])


def _split(seed, num: int) -> list[tf.Tensor]:
    return tf.unstack(tf.random.experimental.stateless_split(_as_seed(seed), num))


def _pixel_grid(height, width) -> tf.Tensor:
    """(H, W, 2) float32 pixel coordinates (y, x)."""
    ys = tf.range(tf.cast(height, tf.float32))
    xs = tf.range(tf.cast(width, tf.float32))
    grid_y, grid_x = tf.meshgrid(ys, xs, indexing="ij")
    return tf.stack([grid_y, grid_x], axis=-1)


def _flat_gather(image: tf.Tensor, y: tf.Tensor, x: tf.Tensor) -> tf.Tensor:
    """image (B, H, W, ...) at integer in-bounds (y, x) of shape (B, Ho, Wo) -> (B, Ho, Wo, ...)."""
    shape = tf.shape(image)
    batch, height, width = shape[0], shape[1], shape[2]
    flat = tf.reshape(image, tf.concat([[batch * height * width], shape[3:]], axis=0))
    offsets = tf.reshape(tf.range(batch) * height * width, [-1, 1, 1])
    return tf.gather(flat, offsets + y * width + x)


def sample_bilinear(image: tf.Tensor, coords: tf.Tensor, fill: str = "zero") -> tf.Tensor:
    """Samples a batch of images at fractional pixel coordinates (gather based, any shape).

    Args:
      image: (B, H, W, C) float.
      coords: (B, Ho, Wo, 2) float pixel coordinates (y, x) into `image`; pixel centres are at
        integer coordinates.
      fill: "zero": points outside the image read 0 (bilinear weights of outside neighbours are
        dropped, so edges fade to 0 over one pixel); "edge": coordinates are clamped to the image.

    Returns:
      (B, Ho, Wo, C) with the dtype of `image`. Integer coordinates reproduce pixels exactly.

    Raises:
      ValueError: for an unknown `fill`.
    """
    if fill not in ("zero", "edge"):
        raise ValueError(f"fill must be 'zero' or 'edge', got {fill!r}.")
    dtype = image.dtype
    image = tf.cast(image, tf.float32)
    coords = tf.cast(coords, tf.float32)
    height, width = tf.shape(image)[1], tf.shape(image)[2]
    y, x = coords[..., 0], coords[..., 1]
    if fill == "edge":
        y = tf.clip_by_value(y, 0.0, tf.cast(height - 1, tf.float32))
        x = tf.clip_by_value(x, 0.0, tf.cast(width - 1, tf.float32))
    y0f, x0f = tf.floor(y), tf.floor(x)
    wy, wx = y - y0f, x - x0f  # (B, Ho, Wo)
    y0, x0 = tf.cast(y0f, tf.int32), tf.cast(x0f, tf.int32)
    result = tf.zeros(tf.concat([tf.shape(coords)[:-1], tf.shape(image)[3:]], 0), tf.float32)
    for dy, weight_y in ((0, 1.0 - wy), (1, wy)):
        for dx, weight_x in ((0, 1.0 - wx), (1, wx)):
            yi, xi = y0 + dy, x0 + dx
            weight = weight_y * weight_x
            if fill == "zero":
                inside = (yi >= 0) & (yi < height) & (xi >= 0) & (xi < width)
                weight = weight * tf.cast(inside, tf.float32)
            values = _flat_gather(image, tf.clip_by_value(yi, 0, height - 1),
                                  tf.clip_by_value(xi, 0, width - 1))
            result += weight[..., None] * values
    return tf.cast(result, dtype)


def warp_nearest(labels: tf.Tensor, coords: tf.Tensor, fill_value: int = 0) -> tf.Tensor:
    """Samples label maps at the nearest pixel of fractional coordinates.

    Args:
      labels: (B, H, W) or (B, H, W, C) of any dtype (class indices, masks).
      coords: (B, Ho, Wo, 2) float pixel coordinates (y, x).
      fill_value: the value of points outside the image (class 0 = background by default).

    Returns:
      (B, Ho, Wo[, C]) with the dtype of `labels`; only values present in `labels` or
      `fill_value` occur.
    """
    height, width = tf.shape(labels)[1], tf.shape(labels)[2]
    rounded = tf.cast(tf.floor(tf.cast(coords, tf.float32) + 0.5), tf.int32)
    yi, xi = rounded[..., 0], rounded[..., 1]
    inside = (yi >= 0) & (yi < height) & (xi >= 0) & (xi < width)  # (B, Ho, Wo)
    values = _flat_gather(labels, tf.clip_by_value(yi, 0, height - 1),
                          tf.clip_by_value(xi, 0, width - 1))
    inside = tf.reshape(inside, tf.concat([tf.shape(inside), tf.ones_like(tf.shape(values)[3:])],
                                          0))
    return tf.where(inside, values, tf.cast(fill_value, labels.dtype))


def _warp_pair(images, labels, coords):
    images = sample_bilinear(images, coords, fill="zero")
    if labels is not None:
        labels = warp_nearest(labels, coords, fill_value=0)
    return images, labels


def affine_matrices(batch_size, seed, probability: float = 0.8, max_rotation_deg: float = 15.0,
                    scale_range: Sequence[float] = (0.9, 1.1)) -> tf.Tensor:
    """Draws the task-driven paper's per-example affine transforms as (B, 2, 2) matrices.

    The matrix maps output offsets from the image centre to input offsets, in (y, x) order.

    Args:
      batch_size: number of examples (int or scalar tensor).
      seed: shape-[2] int seed.
      probability: chance that an example is transformed at all.
      max_rotation_deg: small rotations are U(-max, max) degrees.
      scale_range: (low, high) of the zoom factor (>1 magnifies).

    Returns:
      (B, 2, 2) float32.
    """
    s_apply, s_choice, s_angle, s_scale, s_k = _split(seed, 5)
    shape = tf.reshape(tf.cast(batch_size, tf.int32), [1])
    apply = tf.random.stateless_uniform(shape, s_apply) < probability
    choice = tf.random.stateless_uniform(shape, s_choice, minval=0, maxval=4, dtype=tf.int32)
    choice = tf.where(apply, choice, 4)  # 4 = identity
    limit = max_rotation_deg * math.pi / 180.0
    angle = tf.random.stateless_uniform(shape, s_angle, -limit, limit)
    scale = tf.random.stateless_uniform(shape, s_scale, scale_range[0], scale_range[1])
    k = tf.random.stateless_uniform(shape, s_k, minval=0, maxval=8, dtype=tf.int32)
    angle45 = tf.cast(k, tf.float32) * (math.pi / 4.0)

    def rotation(theta):  # (B, 2, 2)
        c, s = tf.cos(theta), tf.sin(theta)
        return tf.stack([tf.stack([c, -s], -1), tf.stack([s, c], -1)], -2)

    ones, zeros = tf.ones_like(scale), tf.zeros_like(scale)
    inverse_scale = tf.stack([tf.stack([1.0 / scale, zeros], -1),
                              tf.stack([zeros, 1.0 / scale], -1)], -2)
    flip = tf.stack([tf.stack([ones, zeros], -1), tf.stack([zeros, -ones], -1)], -2)
    identity = tf.stack([tf.stack([ones, zeros], -1), tf.stack([zeros, ones], -1)], -2)
    candidates = tf.stack([rotation(angle), inverse_scale, flip, rotation(angle45), identity],
                          axis=1)  # (B, 5, 2, 2)
    return tf.gather(candidates, choice, batch_dims=1)


def _apply_affine(coords, matrices, height, width):
    """Maps (B, H, W, 2) sampling points through (B, 2, 2) matrices about the image centre."""
    centre = tf.stack([tf.cast(height - 1, tf.float32), tf.cast(width - 1, tf.float32)]) / 2.0
    return tf.einsum("bij,bhwj->bhwi", matrices, coords - centre) + centre


def _projective_transform(images, matrices, interpolation):
    """`_apply_affine` sampling with TF's fused ImageProjectiveTransformV3 kernel (~4× faster than
    the gather sampler; same pixel-centre convention and zero fill, checked by a test)."""
    height, width = tf.shape(images)[1], tf.shape(images)[2]
    cy, cx = tf.cast(height - 1, tf.float32) / 2.0, tf.cast(width - 1, tf.float32) / 2.0
    m00, m01, m10, m11 = matrices[:, 0, 0], matrices[:, 0, 1], matrices[:, 1, 0], matrices[:, 1, 1]
    zeros = tf.zeros_like(m00)
    # the kernel maps output (x, y) to input x = a0 x + a1 y + a2, y = b0 x + b1 y + b2
    transforms = tf.stack([m11, m10, cx - m11 * cx - m10 * cy,
                           m01, m00, cy - m00 * cy - m01 * cx, zeros, zeros], axis=1)
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images, transforms=transforms, output_shape=tf.stack([height, width]),
        fill_value=0.0, interpolation=interpolation, fill_mode="CONSTANT")


def random_affine(images, labels, seed, probability: float = 0.8, max_rotation_deg: float = 15.0,
                  scale_range: Sequence[float] = (0.9, 1.1)):
    """Applies `affine_matrices` about the image centre: images (B, H, W, C) bilinear, labels
    (B, H, W) nearest, both zero/background filled."""
    matrices = affine_matrices(tf.shape(images)[0], seed, probability, max_rotation_deg,
                               scale_range)
    dtype = images.dtype
    images = tf.cast(_projective_transform(tf.cast(images, tf.float32), matrices, "BILINEAR"),
                     dtype)
    if labels is not None:  # class indices are exact in float32 (< 2**24)
        warped = _projective_transform(tf.cast(labels[..., None], tf.float32), matrices,
                                       "NEAREST")
        labels = tf.cast(tf.round(warped[..., 0]), labels.dtype)
    return images, labels


def elastic_field(batch_size, height, width, seed, sigma: float = 10.0,
                  grid_size: int = 3) -> tf.Tensor:
    """A smooth random displacement field: (B, grid, grid, 2) N(0, sigma) px, bicubic upsampled.

    Returns:
      (B, H, W, 2) float32 displacements (dy, dx) in pixels. The control values sit at the centres
      of a grid_size × grid_size tiling of the image (bicubic resize uses half-pixel centres) and
      are reproduced exactly there.
    """
    shape = tf.stack([tf.cast(batch_size, tf.int32), grid_size, grid_size, 2])
    control = tf.random.stateless_normal(shape, _as_seed(seed), stddev=sigma)
    return tf.image.resize(control, tf.stack([height, width]), method="bicubic")


def random_elastic(images, labels, seed, sigma: float = 10.0, grid_size: int = 3):
    """Elastic deformation of images (B, H, W, C) bilinear and labels (B, H, W) nearest."""
    shape = tf.shape(images)
    field = elastic_field(shape[0], shape[1], shape[2], seed, sigma, grid_size)
    coords = _pixel_grid(shape[1], shape[2])[None] + field
    return _warp_pair(images, labels, coords)


def random_flip(images, labels, seed, probability: float = 0.5):
    """Left-right flip (last spatial axis) per example. Works for 2D and 3D batches."""
    rank = images.shape.rank
    flip = tf.random.stateless_uniform(tf.shape(images)[:1], _as_seed(seed)) < probability
    x_axis = rank - 2
    images = tf.where(tf.reshape(flip, [-1] + [1] * (rank - 1)),
                      tf.reverse(images, [x_axis]), images)
    if labels is not None:
        labels = tf.where(tf.reshape(flip, [-1] + [1] * (labels.shape.rank - 1)),
                          tf.reverse(labels, [x_axis]), labels)
    return images, labels


def random_intensity(images, seed, contrast_range: Sequence[float] = (0.8, 1.2),
                     brightness_range: Sequence[float] = (-0.1, 0.1)):
    """x -> (x - mean) * c + mean + b per example; mean over the spatial axes per channel."""
    rank = images.shape.rank
    s_contrast, s_brightness = _split(seed, 2)
    shape = tf.concat([tf.shape(images)[:1], tf.ones([rank - 1], tf.int32)], 0)  # (B, 1, .., 1)
    contrast = tf.random.stateless_uniform(shape, s_contrast, contrast_range[0],
                                           contrast_range[1], dtype=images.dtype)
    brightness = tf.random.stateless_uniform(shape, s_brightness, brightness_range[0],
                                             brightness_range[1], dtype=images.dtype)
    mean = tf.reduce_mean(images, axis=list(range(1, rank - 1)), keepdims=True)
    return (images - mean) * contrast + mean + brightness


def augment(images: tf.Tensor, labels: tf.Tensor | None, spec: str, seed):
    """Applies the operations of `spec` to a batch, image and label with the same draw.

    Args:
      images: (B, H, W, C) or (B, D, H, W, C) float32.
      labels: (B, H, W) or (B, D, H, W) integer class indices, or None (images only).
      spec: "none" or a "+"-joined subset of "affine", "elastic", "flip", "intensity", optionally
        with "half" (the non-affine operations on odd batch positions only).
      seed: shape-[2] int32/int64 seed. Each operation uses its own sub-seed (fixed by its name),
        so adding an operation to the spec does not change the draws of the others (within a
        spec without "half"; with it each half draws from its own split of the seed).

    Returns:
      (images, labels) with unchanged shapes and dtypes (labels None if given None).

    Raises:
      ValueError: for a bad spec or an operation that does not support the input rank.
    """
    rank = images.shape.rank
    if rank not in (4, 5):
        raise ValueError(f"augment expects (B, H, W, C) or (B, D, H, W, C) images, got shape "
                         f"{images.shape}.")
    ops = parse_spec(spec, spatial_dims=rank - 2)
    if not ops:
        return images, labels
    if is_half(spec) and set(ops) - {"affine"}:
        return _augment_half(images, labels, ops, seed)
    seeds = dict(zip(PIPELINE_OPS, _split(seed, len(PIPELINE_OPS))))
    if ops[0] == "affine" and "elastic" not in ops:
        images, labels = random_affine(images, labels, seeds["affine"])
    elif "elastic" in ops:
        # affine then elastic as ONE resampling: output p reads the source at
        # A·(p + field(p) - centre) + centre, so the image is interpolated once, not twice.
        shape = tf.shape(images)
        coords = tf.broadcast_to(_pixel_grid(shape[1], shape[2]),
                                 tf.stack([shape[0], shape[1], shape[2], 2]))
        coords += elastic_field(shape[0], shape[1], shape[2], seeds["elastic"])
        if "affine" in ops:
            coords = _apply_affine(coords, affine_matrices(shape[0], seeds["affine"]),
                                   shape[1], shape[2])
        images, labels = _warp_pair(images, labels, coords)
    if "flip" in ops:
        images, labels = random_flip(images, labels, seeds["flip"])
    if "intensity" in ops:
        images = random_intensity(images, seeds["intensity"])
    return images, labels


def _augment_half(images, labels, ops, seed):
    """Even batch positions: the affine of `ops` only; odd positions: all of `ops`. Each half is
    augmented as a batch of its own with its own seed (split of `seed`: 0 even, 1 odd)."""
    seed_even, seed_odd = _split(seed, 2)
    base = "+".join(op for op in ops if op == "affine") or "none"
    even_images, odd_images, indices = split_half(images)
    even_labels = odd_labels = None
    if labels is not None:
        even_labels, odd_labels, _ = split_half(labels)
    even_images, even_labels = augment(even_images, even_labels, base, seed_even)
    odd_images, odd_labels = augment(odd_images, odd_labels, "+".join(ops), seed_odd)
    images = merge_half(even_images, odd_images, indices)
    if labels is not None:
        labels = merge_half(even_labels, odd_labels, indices)
    return images, labels


def sample_beta(shape, alpha: float, seed) -> tf.Tensor:
    """Beta(alpha, alpha) draws as G1 / (G1 + G2) of two stateless gammas (float64 inside, so
    small alphas do not underflow to 0/0). Returns float32 values in [0, 1]."""
    s1, s2 = _split(seed, 2)
    g1 = tf.random.stateless_gamma(shape, s1, alpha=alpha, dtype=tf.float64)
    g2 = tf.random.stateless_gamma(shape, s2, alpha=alpha, dtype=tf.float64)
    total = g1 + g2
    lam = tf.where(total > 0, g1 / tf.where(total > 0, total, 1.0), 0.5)
    return tf.cast(lam, tf.float32)


def mixup(images: tf.Tensor, label_probs: tf.Tensor, alpha: float, seed,
          dominant_first: bool = False):
    """Mixup within a batch: x = λ·x + (1-λ)·x[perm], y likewise, λ ~ Beta(α, α) per example.

    Args:
      images: (B, *S, C) float.
      label_probs: (B, *S, K) float class probabilities (one-hot or soft).
      alpha: Beta parameter (> 0); the task-driven paper uses 0.2.
      seed: shape-[2] int seed.
      dominant_first: use λ = max(λ, 1-λ) so each output stays closest to its own example
        (MixMatch's variant).

    Returns:
      (images, label_probs) mixed; label probabilities still sum to 1 per pixel.

    Raises:
      ValueError: if alpha <= 0.
    """
    if not alpha > 0:
        raise ValueError(f"mixup alpha must be > 0, got {alpha}.")
    s_lambda, s_perm = _split(seed, 2)
    batch = tf.shape(images)[:1]
    lam = sample_beta(batch, alpha, s_lambda)  # (B,)
    if dominant_first:
        lam = tf.maximum(lam, 1.0 - lam)
    perm = tf.argsort(tf.random.stateless_uniform(batch, s_perm))
    lam_x = tf.cast(tf.reshape(lam, [-1] + [1] * (images.shape.rank - 1)), images.dtype)
    lam_y = tf.cast(tf.reshape(lam, [-1] + [1] * (label_probs.shape.rank - 1)), label_probs.dtype)
    mixed_images = lam_x * images + (1 - lam_x) * tf.gather(images, perm)
    mixed_labels = lam_y * label_probs + (1 - lam_y) * tf.gather(label_probs, perm)
    return mixed_images, mixed_labels


def mixup_half(images: tf.Tensor, label_probs: tf.Tensor, alpha: float, seed):
    """`mixup` on odd batch positions only (partners drawn from the whole batch); even positions
    are returned unchanged — the task-driven paper's Mixup baseline (half the batch mixed)."""
    mixed_images, mixed_labels = mixup(images, label_probs, alpha, seed)
    odd = tf.math.floormod(tf.range(tf.shape(images)[0]), 2) == 1            # (B,)

    def pick(mixed, original):
        mask = tf.reshape(odd, [-1] + [1] * (original.shape.rank - 1))
        return tf.where(mask, mixed, original)

    return pick(mixed_images, images), pick(mixed_labels, label_probs)
