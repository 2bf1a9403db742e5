"""Dense bilinear (2D) / trilinear (3D) warping by gather, with dynamic shapes.

`warp(image, flow)` resamples `image` at every voxel p at the displaced position p + flow(p):

    out[b, p, c] = image[b, p + flow[b, p], c]      (linear interpolation between voxels)

- The flow is a displacement in **voxels** (pixels), not a normalised coordinate, and its last
  axis follows the array axis order: (dy, dx) in 2D, (dz, dy, dx) in 3D. flow[..., 0] = +1
  therefore reads the value one row further down.
- Positions outside the image are clamped to the edge (constant extrapolation of the border
  voxels), which equals `scipy.ndimage.map_coordinates(order=1, mode="nearest")` and TFA's
  `dense_image_warp`.
- Every shape may be unknown until run time (None spatial sizes inside a `tf.function`), unlike
  `keras.ops.image.map_coordinates`. The gather version is also about 9x
  faster than map_coordinates in graph mode; callers may wrap it in
  `tf.function(jit_compile=True)` as an XLA island, measured to help further (docs/performance.md).
- Differentiable with respect to the image and the flow (the interpolation weights carry the
  flow gradient; the integer corner indices do not). Where the sampling position is clamped at
  the border the flow gradient along that axis is zero.

Used by task_aug (Chaitanya et al., "Semi-supervised task-driven data augmentation for medical
image segmentation", MedIA 2021) to warp images and one-hot labels with the generated flow.
"""
from __future__ import annotations

import itertools

import keras
import tensorflow as tf


def warp(image, flow):
    """Warps `image` with a dense displacement field by linear interpolation.

    Args:
        image: (B, H, W, C) or (B, D, H, W, C) floating tensor.
        flow: (B, H, W, 2) displacements (dy, dx) or (B, D, H, W, 3) displacements
            (dz, dy, dx), in voxels, with the same batch and spatial sizes as `image`.

    Returns:
        The warped image, same shape and dtype as `image`. The interpolation runs in float32
        (float64 for float64 images).

    Raises:
        ValueError: if the ranks do not match, the flow's last axis is not the number of
            spatial axes, or the image is not floating point.
    """
    image = tf.convert_to_tensor(image)
    flow = tf.convert_to_tensor(flow)
    rank = image.shape.rank
    if rank not in (4, 5):
        raise ValueError(f"warp: image must be (B, H, W, C) or (B, D, H, W, C), got shape "
                         f"{image.shape}. Add the batch/channel axes with [None] / [..., None].")
    spatial_dims = rank - 2
    if flow.shape.rank != rank or flow.shape[-1] != spatial_dims:
        raise ValueError(
            f"warp: flow must have shape (B, *spatial, {spatial_dims}) for an image of shape "
            f"{image.shape}, got {flow.shape}. The flow holds one displacement per spatial "
            f"axis, in array order ({'dz, ' if spatial_dims == 3 else ''}dy, dx).")
    if not image.dtype.is_floating:
        raise ValueError(f"warp: image must be floating point, got {image.dtype.name}. Cast "
                         f"labels to one-hot float first (warping class indices mixes classes).")

    work_dtype = tf.float64 if image.dtype == tf.float64 else tf.float32
    values = tf.cast(image, work_dtype)
    flow = tf.cast(flow, work_dtype)
    shape = tf.shape(values)
    batch, channels = shape[0], shape[-1]
    sizes = [shape[1 + axis] for axis in range(spatial_dims)]
    tf.debugging.assert_equal(
        tf.shape(flow)[:-1], shape[:-1],
        message="warp: flow and image must have the same batch and spatial sizes")

    # Sampling positions per axis, clamped to [0, size - 1] (edge clamp).   each (B, *S)
    grid = tf.meshgrid(*[tf.range(size, dtype=work_dtype) for size in sizes], indexing="ij")
    low_index, high_index, low_weight, high_weight = [], [], [], []
    for axis in range(spatial_dims):
        last = tf.cast(sizes[axis] - 1, work_dtype)
        position = tf.clip_by_value(grid[axis][None] + flow[..., axis], 0.0, last)
        floor = tf.stop_gradient(tf.floor(position))
        fraction = position - floor                      # in [0, 1); carries the flow gradient
        low = tf.cast(floor, tf.int32)
        low_index.append(low)
        high_index.append(tf.minimum(low + 1, sizes[axis] - 1))
        low_weight.append(1.0 - fraction)
        high_weight.append(fraction)

    # Gather C-vectors from the flattened (B·ΠS, C) image at the 2^N corners of each cell.
    flat = tf.reshape(values, [-1, channels])
    batch_index = tf.reshape(tf.range(batch), [-1] + [1] * spatial_dims)        # (B, 1, ...)
    output = None
    for corner in itertools.product((False, True), repeat=spatial_dims):
        index = batch_index
        weight = None
        for axis, use_high in enumerate(corner):
            index = index * sizes[axis] + (high_index[axis] if use_high else low_index[axis])
            axis_weight = high_weight[axis] if use_high else low_weight[axis]
            weight = axis_weight if weight is None else weight * axis_weight
        contribution = weight[..., None] * tf.gather(flat, index)              # (B, *S, C)
        output = contribution if output is None else output + contribution
    return tf.cast(output, image.dtype)


@keras.saving.register_keras_serializable(package="tfseg")
class Warp(keras.layers.Layer):
    """Keras layer for `warp`: `Warp()(image, flow)`.

    The layer does not autocast its inputs by default, so under a mixed-precision policy the flow
    keeps its float32 precision (bfloat16 has only 8 significant bits, i.e. a displacement of 100
    voxels would be off by up to 0.5 voxel); the output has the image's dtype.
    """

    def __init__(self, **kwargs):
        kwargs.setdefault("autocast", False)
        super().__init__(**kwargs)

    def call(self, image, flow):
        return warp(image, flow)
