"""Whole-volume prediction: slice-wise for 2D networks, Gaussian-blended sliding window for 3D.

Both paths average class *probabilities* (softmax of the logits), never class indices, so that
overlapping tiles and flip test-time augmentation blend smoothly.

- 2D: the slices of the volume are the batch; `tile_batch` slices per network call, each padded
  at the far end to a multiple of `size_multiple` and cropped back.
- Padding (2D sizes, 3D volumes smaller than a tile) uses each channel's minimum, the background
  level, as preprocessing does when it pads, so the network sees no artificial edge.
- 3D: tiles of `patch_size_zyx` voxels on a regular grid with the requested overlap; each tile's
  probabilities are weighted by a Gaussian importance map (sigma = 1/8 of the tile size per axis,
  computed once per call) and accumulated in place with the weights, then divided by the
  summed weights. The networks are fully convolutional, so the tile may be larger than the
  training patch: fewer, larger tiles cut the overlap overhead. Memory used by the network is
  bounded by `tile_batch` tiles; the accumulators are the size of the output.
- The forward pass is a `tf.function` over a fixed tile shape (traced once per shape) and is
  cached per segmentor, so repeated calls (validation rounds, test subjects) do not retrace.
"""
from __future__ import annotations

import itertools
import weakref
from typing import Any, Callable, Sequence

import keras
import numpy as np
import tensorflow as tf

__all__ = ["predict_volume", "gaussian_importance_map", "tile_starts", "infer_size_multiple",
           "default_tile_size", "dynamic_shape_model", "suggest_tile_size",
           "DEFAULT_TILE_VOXELS"]

# Default voxel budget of one 3D inference tile. With the few-shot GAN U-Net (32-256 filters)
# a 128^3 tile peaks at about 2.6 GB of RAM and cuts a 2x144x192x256 volume's inference from
# 108 s (32^3 tiles) to 63 s on 2 cores; a whole-volume tile is faster still but needs 6 GB.
DEFAULT_TILE_VOXELS = 128 ** 3

# segmentor -> {(outputs, flip_tta): tf.function}; weak keys so a cache entry dies with its model.
_FORWARD_CACHE: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def predict_volume(segmentor: Callable[..., Any], image_zyxc: np.ndarray, spatial_dims: int, *,
                   patch_size_zyx: Sequence[int] | None = None, overlap: float = 0.5,
                   tile_batch: int = 4, flip_tta: bool = False, size_multiple: int = 16,
                   outputs: str = "logits") -> np.ndarray:
    """Predicts class probabilities for a whole preprocessed volume.

    Args:
      segmentor: a `keras.Model` (called with `training=False`) or any callable mapping a float32
        batch `(B, *S, C)` to `(B, *S, K)`; e.g. a wrapped SavedModel serving signature.
      image_zyxc: (Z, H, W, C) float32 preprocessed image.
      spatial_dims: 2 (slice-wise network over (H, W)) or 3 (volumetric network).
      patch_size_zyx: 3D only: the sliding-window tile (D, H, W); each entry a multiple of
        `size_multiple`. Entries larger than the (rounded-up) volume are shrunk to it. None: the
        whole volume in one tile (memory grows with the volume). Ignored for 2D.
      overlap: fraction of the tile shared by neighbouring tiles, in [0, 1).
      tile_batch: slices (2D) or tiles (3D) per network call.
      flip_tta: average the probabilities over the 4 flips of the in-plane axes (H, W): identity,
        H, W, H+W, each flipped back before averaging.
      size_multiple: spatial sizes the network accepts are multiples of this (2**levels).
      outputs: "logits" (softmax is applied) or "probabilities" (used as they are).

    Returns:
      (Z, H, W, K) float32 class probabilities on the input grid.

    Raises:
      ValueError: for a wrong image rank, dims, tile size, overlap, batch or `outputs` value.
    """
    image = np.asarray(image_zyxc, dtype=np.float32)
    if image.ndim != 4:
        raise ValueError(f"predict_volume expects a (Z, H, W, C) image, got shape {image.shape}; "
                         "add a trailing channel axis for single-modality images.")
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}.")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap!r}.")
    if tile_batch < 1:
        raise ValueError(f"tile_batch must be at least 1, got {tile_batch!r}.")
    if size_multiple < 1:
        raise ValueError(f"size_multiple must be at least 1, got {size_multiple!r}.")
    if outputs not in ("logits", "probabilities"):
        raise ValueError(f"outputs must be 'logits' or 'probabilities', got {outputs!r}.")
    if not np.all(np.isfinite(image)):
        raise ValueError("The image holds NaN or Inf voxels; check the preprocessing of this "
                         "scan (a corrupt file or a constant image).")
    forward = _forward_function(segmentor, outputs, flip_tta)
    if spatial_dims == 2:
        return _predict_slices(forward, image, tile_batch, size_multiple)
    shape_zyx = image.shape[:3]
    if patch_size_zyx is None:
        tile = tuple(_round_up(s, size_multiple) for s in shape_zyx)
    else:
        tile = tuple(int(t) for t in patch_size_zyx)
        if len(tile) != 3 or any(t <= 0 or t % size_multiple for t in tile):
            raise ValueError(f"patch_size_zyx must be 3 positive multiples of {size_multiple}, "
                             f"got {tuple(patch_size_zyx)}.")
        # A tile larger than the volume would only process padding.
        tile = tuple(min(t, _round_up(s, size_multiple)) for t, s in zip(tile, shape_zyx))
    return _predict_sliding_window(forward, image, tile, overlap, tile_batch)


def default_tile_size(patch_size_zyx: Sequence[int], size_multiple: int = 1
                      ) -> tuple[int, int, int]:
    """The default 3D sliding-window tile: the training patch (rounded up to the size multiple).

    Larger tiles (`suggest_tile_size`) are 3-4x faster but change the answer: a network trained
    only on patches has zero padding near every voxel at its coarse levels, and on a large tile
    most voxels lack that context. On synthetic_brain, 32^3 tiles at overlap 0.5 scored higher
    than whole-volume tiles on all 12 test subjects of three runs (e.g. mean Dice 0.675 vs
    0.534; docs/performance.md), so evaluation, export and validation use the patch.
    """
    return tuple(_round_up(int(p), size_multiple) for p in patch_size_zyx)


def suggest_tile_size(patch_size_zyx: Sequence[int], size_multiple: int = 1,
                      max_voxels: int = DEFAULT_TILE_VOXELS) -> tuple[int, int, int]:
    """The training patch scaled by the largest integer factor that fits `max_voxels` (a fast
    tile, opt-in with --tile_size; not the default, see `default_tile_size`).

    Inference cost is about proportional to the voxels the tiles cover, and with 50 % overlap
    small tiles cover the volume many times over; a fully convolutional network accepts larger
    tiles, so the default 3D tile is the patch grown while the tile stays within the budget
    (never smaller than the patch). `predict_volume` shrinks it further to the volume.

    Example: a 32^3 patch gives 128^3; 64^3 gives 128^3; 96x96x64 stays 96x96x64.
    """
    patch = tuple(int(p) for p in patch_size_zyx)

    def tile(factor):
        return tuple(_round_up(factor * p, size_multiple) for p in patch)

    factor = 1
    while int(np.prod(tile(factor + 1))) <= max_voxels:
        factor += 1
    return tile(factor)


def gaussian_importance_map(tile_shape: Sequence[int], sigma_fraction: float = 0.125
                            ) -> np.ndarray:
    """Separable Gaussian weights for blending tiles, peak 1 at the tile centre.

    Args:
      tile_shape: the tile's spatial shape.
      sigma_fraction: sigma per axis as a fraction of the tile size (1/8, as in nnU-Net).

    Returns:
      float32 array of `tile_shape`, symmetric under flips, strictly positive (clamped at 1e-6 so
      that voxels covered only by tile corners keep a well-conditioned weight sum).
    """
    weights = np.ones((), np.float64)
    for size in tile_shape:
        centre = (size - 1) / 2.0
        sigma = max(size * sigma_fraction, 1e-6)
        axis = np.exp(-0.5 * ((np.arange(size) - centre) / sigma) ** 2)
        weights = np.multiply.outer(weights, axis)
    weights = weights / weights.max()
    return np.maximum(weights, 1e-6).astype(np.float32)


def tile_starts(size: int, tile: int, overlap: float) -> list[int]:
    """Start offsets of tiles along one axis covering [0, size), spread evenly.

    The stride is at most `tile * (1 - overlap)`; the first tile starts at 0 and the last ends
    at `size` exactly. `size <= tile` gives one tile at 0.
    """
    if size <= tile:
        return [0]
    step = max(tile * (1.0 - overlap), 1.0)
    count = int(np.ceil((size - tile) / step)) + 1
    return sorted(set(int(round(v)) for v in np.linspace(0, size - tile, count)))


def infer_size_multiple(model: keras.Model) -> int:
    """The spatial size multiple a network needs: the product of its down-sampling strides.

    Counts every pooling layer and every strided (non-transposed) convolution, in nested models
    too. For an encoder-decoder with one down-sampling path (the U-Nets of `tfseg.networks`:
    2**(levels - 1)) this is exact; for parallel down-sampling branches it is a safe multiple.
    """
    factor = 1
    stack = list(getattr(model, "layers", []))
    while stack:
        layer = stack.pop()
        if hasattr(layer, "layers"):
            stack.extend(layer.layers)
            continue
        name = type(layer).__name__
        strides = getattr(layer, "strides", None)
        if strides is None or "Transpose" in name or "Global" in name:
            continue
        if "Pool" in name or "Conv" in name:
            factor *= int(max(np.atleast_1d(strides)))
    return factor


def _background(image: np.ndarray) -> np.ndarray:
    """Per-channel minimum of a (Z, H, W, C) image: the value padding takes."""
    return image.min(axis=(0, 1, 2))


def _round_up(value: int, multiple: int) -> int:
    return -(-int(value) // multiple) * multiple


def _forward_function(segmentor: Callable[..., Any], outputs: str, flip_tta: bool):
    """Returns a cached `tf.function`: (B, *S, C) float32 -> (B, *S, K) float32 probabilities."""
    key = (outputs, bool(flip_tta))
    is_layer = isinstance(segmentor, keras.Layer)
    try:
        per_model = _FORWARD_CACHE.setdefault(segmentor, {})
    except TypeError:  # not weak-referenceable: build an uncached function
        network = dynamic_shape_model(segmentor) if is_layer else segmentor
        return _build_forward(lambda: network, is_layer, *key)
    if key not in per_model:
        twin = dynamic_shape_model(segmentor) if is_layer else segmentor
        # Never close over the model itself: the cache must not keep its own key alive.
        get = (lambda: twin) if twin is not segmentor else weakref.ref(segmentor)
        per_model[key] = _build_forward(get, is_layer, *key)
    return per_model[key]


def dynamic_shape_model(model: keras.Model) -> keras.Model:
    """A functional model built for a fixed input size, rewired to accept any spatial size.

    Keras checks a functional model's input shape, so a U-Net built on `keras.Input((32, 32,
    32, 2))` refuses a 96^3 tile although every layer is convolutional. The twin reuses the
    same layers (and so the same variables: later training is seen) on a `(None, ..., C)` input.
    Models without a single static-shape input are returned unchanged.
    """
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        return model
    if not inputs or len(inputs) != 1:
        return model
    shape = tuple(inputs[0].shape)
    if len(shape) < 3 or all(d is None for d in shape[1:-1]):
        return model
    dynamic_input = keras.Input(shape=(None,) * (len(shape) - 2) + (shape[-1],),
                                dtype=inputs[0].dtype)
    return keras.models.clone_model(model, input_tensors=dynamic_input,
                                    clone_function=lambda layer: layer)


def _build_forward(get_segmentor, is_layer: bool, outputs: str, flip_tta: bool):
    def probabilities(x):
        model = get_segmentor()
        y = model(x, training=False) if is_layer else model(x)
        y = tf.cast(y, tf.float32)  # mixed-precision networks may return bfloat16
        return tf.nn.softmax(y, axis=-1) if outputs == "logits" else y

    # No reduce_retracing: a generalised (None-sized) trace would break layers that need static
    # sizes in graph mode (Keras' bilinear UpSampling2D); one trace per tile shape is cheap.
    @tf.function
    def forward(x):
        if not flip_tta:
            return probabilities(x)
        rank = x.shape.rank  # 4: (B, H, W, C); 5: (B, D, H, W, C)
        rows, cols = rank - 3, rank - 2
        total = None
        for axes in ((), (rows,), (cols,), (rows, cols)):
            flipped = tf.reverse(x, axes) if axes else x
            p = probabilities(flipped)
            p = tf.reverse(p, axes) if axes else p
            total = p if total is None else total + p
        return total / 4.0

    return forward


def _predict_slices(forward, image: np.ndarray, tile_batch: int, size_multiple: int
                    ) -> np.ndarray:
    depth, height, width, channels = image.shape
    batch_size = min(tile_batch, depth)
    # One fixed (batch, H', W', C) shape so the forward pass traces once; the padding keeps the
    # background level.
    batch = np.empty((batch_size, _round_up(height, size_multiple),
                      _round_up(width, size_multiple), channels), np.float32)
    batch[...] = _background(image)
    result = None
    for start in range(0, depth, batch_size):
        count = min(batch_size, depth - start)
        batch[:count, :height, :width] = image[start:start + count]
        probs = forward(tf.constant(batch)).numpy()  # (batch, H', W', K)
        if result is None:
            result = np.empty((depth, height, width, probs.shape[-1]), np.float32)
        result[start:start + count] = probs[:count, :height, :width]
    return result


def _predict_sliding_window(forward, image: np.ndarray, tile: tuple[int, int, int],
                            overlap: float, tile_batch: int) -> np.ndarray:
    shape = image.shape[:3]
    padded_shape = tuple(max(s, t) for s, t in zip(shape, tile))
    if padded_shape != shape:
        padded = np.empty(padded_shape + image.shape[-1:], np.float32)
        padded[...] = _background(image)
        padded[:shape[0], :shape[1], :shape[2]] = image
        image = padded
    corners = list(itertools.product(
        *(tile_starts(s, t, overlap) for s, t in zip(padded_shape, tile))))
    weights = gaussian_importance_map(tile)  # (D, H, W)
    weights_k = weights[..., None]
    batch_size = min(tile_batch, len(corners))
    batch = np.zeros((batch_size, *tile, image.shape[-1]), np.float32)
    accumulated = None
    weight_sum = np.zeros(padded_shape, np.float32)
    for first in range(0, len(corners), batch_size):
        group = corners[first:first + batch_size]
        for i, (z, y, x) in enumerate(group):
            batch[i] = image[z:z + tile[0], y:y + tile[1], x:x + tile[2]]
        probs = forward(tf.constant(batch)).numpy()  # (batch, D, H, W, K)
        if accumulated is None:
            accumulated = np.zeros((*padded_shape, probs.shape[-1]), np.float32)
        for i, (z, y, x) in enumerate(group):
            window = (slice(z, z + tile[0]), slice(y, y + tile[1]), slice(x, x + tile[2]))
            accumulated[window] += probs[i] * weights_k
            weight_sum[window] += weights
    accumulated /= weight_sum[..., None]
    return np.ascontiguousarray(accumulated[:shape[0], :shape[1], :shape[2]])
