"""Tests for tfseg.inference: exact blending, crop-back shapes, flip TTA, single tracing."""
import itertools

import keras
import numpy as np
import pytest

from tfseg import inference
from tfseg.inference import (gaussian_importance_map, predict_volume, suggest_tile_size,
                             tile_starts)


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _constant_model(spatial_dims, channels, logits):
    conv = keras.layers.Conv2D if spatial_dims == 2 else keras.layers.Conv3D
    inputs = keras.Input((None,) * spatial_dims + (channels,))
    layer = conv(len(logits), 1, kernel_initializer="zeros",
                 bias_initializer=keras.initializers.Constant(np.asarray(logits)))
    return keras.Model(inputs, layer(inputs))


def _conv_model(spatial_dims, channels, classes, kernel_size, seed=0, input_size=None):
    keras.utils.set_random_seed(seed)
    conv = keras.layers.Conv2D if spatial_dims == 2 else keras.layers.Conv3D
    inputs = keras.Input((input_size,) * spatial_dims + (channels,))
    x = conv(4, kernel_size, padding="same", activation="tanh")(inputs)
    return keras.Model(inputs, conv(classes, 1)(x))


def _tiny_unet_2d(channels, classes):
    """Two poolings: sizes must be multiples of 4, or the skip concatenation fails."""
    keras.utils.set_random_seed(1)
    inputs = keras.Input((None, None, channels))
    e1 = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inputs)
    e2 = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(
        keras.layers.MaxPooling2D()(e1))
    b = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(
        keras.layers.MaxPooling2D()(e2))
    d2 = keras.layers.Concatenate()([keras.layers.UpSampling2D()(b), e2])
    d1 = keras.layers.Concatenate()([keras.layers.UpSampling2D()(d2), e1])
    return keras.Model(inputs, keras.layers.Conv2D(classes, 1)(d1))


def test_constant_logits_give_exact_softmax_2d_and_3d():
    logits = [1.0, -2.0, 0.5]
    expected = _softmax(np.asarray(logits))
    image2d = np.random.default_rng(0).normal(size=(5, 37, 29, 2)).astype(np.float32)
    probs = predict_volume(_constant_model(2, 2, logits), image2d, 2, tile_batch=2)
    assert probs.shape == (5, 37, 29, 3) and probs.dtype == np.float32
    np.testing.assert_allclose(probs, np.broadcast_to(expected, probs.shape), atol=1e-6)
    image3d = np.random.default_rng(1).normal(size=(11, 21, 18, 1)).astype(np.float32)
    probs = predict_volume(_constant_model(3, 1, logits), image3d, 3, patch_size_zyx=(8, 8, 8),
                           size_multiple=8, tile_batch=3)
    assert probs.shape == (11, 21, 18, 3)
    np.testing.assert_allclose(probs, np.broadcast_to(expected, probs.shape), atol=1e-6)


def test_blending_divides_out_the_gaussian_weights():
    # A "probability" callable returning 0.3 everywhere: any error in the weight sums (missing
    # tiles, double counting, padding) would move the result away from 0.3.
    def constant_probabilities(x):
        return 0.3 * keras.ops.ones_like(x[..., :1]) * keras.ops.ones((2,))

    image = np.zeros((19, 23, 40, 1), np.float32)
    probs = predict_volume(constant_probabilities, image, 3, patch_size_zyx=(16, 16, 16),
                           overlap=0.5, tile_batch=4, outputs="probabilities")
    assert probs.shape == (19, 23, 40, 2)
    np.testing.assert_allclose(probs, 0.3, rtol=1e-5)


def test_pointwise_model_stitched_equals_direct_everywhere():
    # A 1x1x1 network has no border effects, so every tile agrees with the full volume.
    model = _conv_model(3, 2, 3, kernel_size=1)
    image = np.random.default_rng(2).normal(size=(13, 30, 27, 2)).astype(np.float32)
    direct = _softmax(np.asarray(model(image[None]))[0])
    for tile, overlap in (((8, 8, 8), 0.5), ((16, 8, 24), 0.25), ((8, 16, 8), 0.0)):
        probs = predict_volume(model, image, 3, patch_size_zyx=tile, overlap=overlap,
                               tile_batch=5, size_multiple=8)
        np.testing.assert_allclose(probs, direct, atol=2e-6)


def test_sliding_window_equals_direct_away_from_tile_faces():
    # A 3x3x3 convolution only differs from the full-volume prediction on the one-voxel shell
    # of each tile face that lies inside the volume; everywhere else the blend must be exact.
    model = _conv_model(3, 1, 2, kernel_size=3)
    shape = (24, 20, 40)
    image = np.random.default_rng(3).normal(size=shape + (1,)).astype(np.float32)
    direct = _softmax(np.asarray(model(image[None]))[0])
    tile = (16, 16, 16)
    probs = predict_volume(model, image, 3, patch_size_zyx=tile, overlap=0.5, tile_batch=4)
    clean = np.ones(shape, bool)
    for axis, (size, t) in enumerate(zip(shape, tile)):
        for start in tile_starts(size, t, 0.5):
            for face in (start, start + t - 1):
                if 0 < face < size - 1:
                    index = [slice(None)] * 3
                    index[axis] = face
                    clean[tuple(index)] = False
    assert 0.3 < clean.mean() < 0.95  # the mask is neither trivial nor everything
    np.testing.assert_allclose(probs[clean], direct[clean], atol=2e-6)
    assert np.abs(probs - direct).max() > 1e-4  # tile faces do differ: the check is not vacuous


def test_whole_volume_tile_equals_direct_prediction_of_padded_volume():
    model = _conv_model(3, 1, 2, kernel_size=3)
    image = np.random.default_rng(4).normal(size=(9, 14, 16, 1)).astype(np.float32)
    # Padded to multiples of 16 with the background level (the minimum).
    padded = np.pad(image, [(0, 7), (0, 2), (0, 0), (0, 0)], constant_values=image.min())
    direct = _softmax(np.asarray(model(padded[None]))[0])[:9, :14, :16]
    probs = predict_volume(model, image, 3, patch_size_zyx=None)
    np.testing.assert_allclose(probs, direct, atol=2e-6)


def test_2d_odd_sizes_are_padded_and_cropped_back():
    model = _tiny_unet_2d(2, 3)
    image = np.random.default_rng(5).normal(size=(5, 37, 29, 2)).astype(np.float32)
    probs = predict_volume(model, image, 2, tile_batch=2, size_multiple=4)
    assert probs.shape == (5, 37, 29, 3)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    # Slice by slice, padded to 40x32 with each channel's volume minimum: the same numbers.
    for z in range(5):
        padded = np.stack([np.pad(image[z, ..., c], [(0, 3), (0, 3)],
                                  constant_values=image[..., c].min()) for c in range(2)], -1)
        expected = _softmax(np.asarray(model(padded[None]))[0])[:37, :29]
        np.testing.assert_allclose(probs[z], expected, atol=2e-6)


def test_flip_tta_of_flip_equivariant_model_equals_no_tta():
    keras.utils.set_random_seed(6)
    inputs = keras.Input((None, None, 1))
    # A kernel symmetric under both in-plane flips makes the network flip-equivariant.
    kernel = np.random.default_rng(6).normal(size=(3, 3, 1, 2)).astype(np.float32)
    kernel = (kernel + kernel[::-1] + kernel[:, ::-1] + kernel[::-1, ::-1]) / 4
    conv = keras.layers.Conv2D(2, 3, padding="same")
    model = keras.Model(inputs, conv(inputs))
    conv.set_weights([kernel, np.array([0.1, -0.1], np.float32)])
    image = np.random.default_rng(7).normal(size=(3, 16, 16, 1)).astype(np.float32)
    plain = predict_volume(model, image, 2)
    tta = predict_volume(model, image, 2, flip_tta=True)
    np.testing.assert_allclose(tta, plain, atol=2e-6)


def test_flip_tta_averages_the_unflipped_flips():
    model = _conv_model(3, 1, 2, kernel_size=3, seed=8)
    image = np.random.default_rng(8).normal(size=(16, 16, 16, 1)).astype(np.float32)
    expected = 0
    for axes in ((), (1,), (2,), (1, 2)):
        flipped = np.flip(image, axes) if axes else image
        probs = _softmax(np.asarray(model(flipped[None]))[0])
        expected = expected + (np.flip(probs, axes) if axes else probs)
    tta = predict_volume(model, image, 3, patch_size_zyx=(16, 16, 16), flip_tta=True)
    np.testing.assert_allclose(tta, expected / 4, atol=2e-6)
    plain = predict_volume(model, image, 3, patch_size_zyx=(16, 16, 16))
    assert np.abs(tta - plain).max() > 1e-3  # this model is not flip-equivariant


def test_forward_is_traced_once_across_calls_and_batches():
    model = _conv_model(2, 1, 2, kernel_size=3, seed=9)
    image = np.random.default_rng(9).normal(size=(7, 16, 16, 1)).astype(np.float32)
    for _ in range(3):
        predict_volume(model, image, 2, tile_batch=3)  # last batch of 1 reuses the padded shape
    forward = inference._forward_function(model, "logits", False)
    assert forward.experimental_get_tracing_count() == 1


def test_fixed_input_shape_network_runs_on_larger_tiles_and_sees_new_weights():
    # Built for 8^3 inputs only; pointwise, so each 8^3 block predicted directly is exact.
    model = _conv_model(3, 1, 2, kernel_size=1, seed=10, input_size=8)
    image = np.random.default_rng(10).normal(size=(16, 16, 16, 1)).astype(np.float32)

    def blockwise():
        out = np.zeros((16, 16, 16, 2), np.float32)
        for z, y, x in itertools.product((0, 8), repeat=3):
            block = image[None, z:z + 8, y:y + 8, x:x + 8]
            out[z:z + 8, y:y + 8, x:x + 8] = _softmax(np.asarray(model(block))[0])
        return out

    before = predict_volume(model, image, 3, patch_size_zyx=(16, 16, 16), size_multiple=8)
    np.testing.assert_allclose(before, blockwise(), atol=2e-6)
    last = model.layers[-1]
    last.kernel.assign(-last.kernel)  # training goes on: the cached forward must follow
    after = predict_volume(model, image, 3, patch_size_zyx=(16, 16, 16), size_multiple=8)
    np.testing.assert_allclose(after, blockwise(), atol=2e-6)
    assert np.abs(after - before).max() > 1e-3


def test_gaussian_importance_map_golden_values():
    weights = gaussian_importance_map((8,))
    # centre 3.5, sigma 1; the peak (indices 3 and 4, 0.5 sigma away) is scaled to 1.
    np.testing.assert_allclose(weights[0], np.exp(-0.5 * 3.5 ** 2 + 0.5 * 0.5 ** 2), rtol=1e-5)
    np.testing.assert_allclose(weights[3:5], 1.0)
    cube = gaussian_importance_map((16, 8, 32))  # sigmas 2, 1, 4; centres 7.5, 3.5, 15.5
    assert cube.shape == (16, 8, 32) and cube.dtype == np.float32
    np.testing.assert_array_equal(cube, cube[::-1, ::-1, ::-1])
    # (5, 2, 12) is (1.25, 1.5, 0.875) sigmas away; the peak (0.25, 0.5, 0.125).
    np.testing.assert_allclose(cube[5, 2, 12], np.exp(-0.5 * (4.578125 - 0.328125)), rtol=1e-5)
    assert cube[0, 0, 0] == pytest.approx(1e-6)  # exp(-20.3) clamped: weight sums stay > 0


def test_tile_starts_cover_the_axis():
    assert tile_starts(144, 32, 0.5) == list(range(0, 113, 16))
    assert tile_starts(40, 32, 0.5) == [0, 8]
    assert tile_starts(10, 32, 0.5) == [0]
    assert tile_starts(64, 32, 0.0) == [0, 32]
    for size, tile, overlap in itertools.product((33, 50, 97), (16, 32), (0.0, 0.5, 0.75)):
        starts = tile_starts(size, tile, overlap)
        assert starts[0] == 0 and starts[-1] == size - tile
        assert max(np.diff(starts)) <= tile * (1 - overlap) + 1e-9


def test_default_tile_is_the_training_patch_rounded_to_the_size_multiple():
    from tfseg.inference import default_tile_size

    assert default_tile_size((32, 32, 32)) == (32, 32, 32)
    assert default_tile_size((20, 30, 32), size_multiple=16) == (32, 32, 32)


def test_suggest_tile_size_grows_the_patch_within_the_budget():
    assert suggest_tile_size((32, 32, 32)) == (128, 128, 128)
    assert suggest_tile_size((64, 64, 64)) == (128, 128, 128)
    assert suggest_tile_size((96, 96, 64)) == (96, 96, 64)     # 2x would be 4.7M voxels
    assert suggest_tile_size((16, 24, 24), max_voxels=50 ** 3) == (32, 48, 48)
    assert suggest_tile_size((16, 24, 24), max_voxels=40 ** 3) == (16, 24, 24)  # never smaller
    assert suggest_tile_size((20, 20, 20), size_multiple=16, max_voxels=60 ** 3) == (48, 48, 48)


@pytest.mark.parametrize("kwargs, message", [
    (dict(image=np.zeros((4, 4, 4))), "(Z, H, W, C)"),
    (dict(spatial_dims=1), "spatial_dims"),
    (dict(patch_size_zyx=(16, 12, 16)), "multiples of 16"),
    (dict(overlap=1.0), "overlap"),
    (dict(tile_batch=0), "tile_batch"),
    (dict(image=np.full((4, 4, 4, 1), np.nan)), "NaN"),
])
def test_bad_arguments_raise_clear_errors(kwargs, message):
    model = _constant_model(3, 1, [0.0, 1.0])
    arguments = dict(image=np.zeros((4, 4, 4, 1)), spatial_dims=3, patch_size_zyx=(16, 16, 16))
    arguments.update(kwargs)
    image = arguments.pop("image")
    spatial_dims = arguments.pop("spatial_dims")
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        predict_volume(model, image, spatial_dims, **arguments)
