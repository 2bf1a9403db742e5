"""Tests of tfseg.layers: weight-normalised layers against the formula, saving, and the warp."""
import numpy as np
import pytest
import keras
import tensorflow as tf
from scipy import ndimage

from tfseg.layers import Warp, WeightNormConv, WeightNormConvTranspose, WeightNormDense, warp


@pytest.fixture
def bf16_policy():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy("float32")


def _randomise(layer, seed=0):
    """Gives every variable random values (g and bias no longer at their initial values)."""
    rng = np.random.default_rng(seed)
    for variable in layer.weights:
        variable.assign(rng.uniform(0.5, 1.5, variable.shape).astype("float32")
                        * rng.choice([-1.0, 1.0], variable.shape).astype("float32"))


def _normalised(v, g, filter_axis):
    """Numpy w = g·v/‖v‖ with the norm over every axis except `filter_axis`."""
    axes = tuple(a for a in range(v.ndim) if a != filter_axis % v.ndim)
    norm = np.sqrt(np.sum(v.astype(np.float64) ** 2, axis=axes, keepdims=True))
    shape = [1] * v.ndim
    shape[filter_axis] = -1
    return (v / norm * g.reshape(shape)).astype(np.float32)


# ---------------------------------------------------------------- weight normalisation


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_weight_norm_conv_matches_formula(spatial_dims):
    x = np.random.default_rng(1).normal(size=(2,) + (6,) * spatial_dims + (3,)).astype("float32")
    layer = WeightNormConv(spatial_dims, 4, 3, strides=1)
    layer(x)
    _randomise(layer)
    kernel = _normalised(layer.v.numpy(), layer.g.numpy(), filter_axis=-1)
    plain = {2: keras.layers.Conv2D, 3: keras.layers.Conv3D}[spatial_dims](4, 3, padding="same")
    plain(x)
    plain.set_weights([kernel, layer.bias.numpy()])
    np.testing.assert_allclose(layer(x), plain(x), atol=1e-5)
    np.testing.assert_allclose(layer.kernel, kernel, rtol=1e-6)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_weight_norm_conv_transpose_matches_formula(spatial_dims):
    x = np.random.default_rng(2).normal(size=(2,) + (4,) * spatial_dims + (3,)).astype("float32")
    layer = WeightNormConvTranspose(spatial_dims, 5, 2, strides=2)
    y = layer(x)
    assert y.shape == (2,) + (8,) * spatial_dims + (5,)
    assert layer.v.shape == (2,) * spatial_dims + (5, 3)      # (*k, filters, in)
    assert layer.g.shape == (5,)
    _randomise(layer)
    kernel = _normalised(layer.v.numpy(), layer.g.numpy(), filter_axis=-2)
    plain_class = {2: keras.layers.Conv2DTranspose, 3: keras.layers.Conv3DTranspose}
    plain = plain_class[spatial_dims](5, 2, strides=2, padding="same")
    plain(x)
    plain.set_weights([kernel, layer.bias.numpy()])
    np.testing.assert_allclose(layer(x), plain(x), atol=1e-5)


def test_weight_norm_dense_matches_formula():
    x = np.random.default_rng(3).normal(size=(4, 7)).astype("float32")
    layer = WeightNormDense(3, activation="tanh")
    layer(x)
    _randomise(layer)
    kernel = _normalised(layer.v.numpy(), layer.g.numpy(), filter_axis=-1)
    expected = np.tanh(x @ kernel + layer.bias.numpy())
    np.testing.assert_allclose(layer(x), expected, atol=1e-5)


def test_initial_output_equals_plain_layer_with_kernel_v():
    # g is initialised to ‖v‖, so w = v at initialisation (no data-dependent init).
    x = np.random.default_rng(4).normal(size=(1, 5, 5, 2)).astype("float32")
    layer = WeightNormConv(2, 3, 3)
    y = layer(x)
    per_filter_norm = np.sqrt((layer.v.numpy() ** 2).sum(axis=(0, 1, 2)))
    np.testing.assert_allclose(layer.g.numpy(), per_filter_norm, rtol=1e-6)
    plain = keras.layers.Conv2D(3, 3, padding="same")
    plain(x)
    plain.set_weights([layer.v.numpy(), layer.bias.numpy()])
    np.testing.assert_allclose(y, plain(x), atol=1e-6)


def test_output_depends_only_on_direction_of_v():
    x = np.random.default_rng(5).normal(size=(1, 5, 5, 2)).astype("float32")
    layer = WeightNormConv(2, 3, 3)
    before = layer(x).numpy()
    layer.v.assign(layer.v * 7.5)
    np.testing.assert_allclose(layer(x), before, atol=1e-5)


def test_gradients_reach_v_g_and_bias():
    x = np.random.default_rng(6).normal(size=(2, 6, 6, 2)).astype("float32")
    layer = WeightNormConv(2, 3, 3)
    layer(x)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.square(layer(x)))
    grads = tape.gradient(loss, layer.trainable_weights)
    assert [w.name for w in layer.trainable_weights] == ["v", "g", "bias"]
    for grad in grads:
        assert grad is not None and np.all(np.isfinite(grad)) and np.any(grad != 0)


def _tiny_weight_norm_model():
    inputs = keras.Input((None, None, 2))
    x = WeightNormConv(2, 4, 3, activation="relu", name="wn_conv")(inputs)
    x = WeightNormConvTranspose(2, 3, 2, strides=2, name="wn_up")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = WeightNormDense(2, use_bias=False, name="wn_dense")(x)
    model = keras.Model(inputs, outputs)
    for layer in model.layers:
        if layer.weights:
            _randomise(layer, seed=len(layer.name))
    return model


def test_keras_file_round_trip_is_exact(tmp_path):
    model = _tiny_weight_norm_model()
    x = np.random.default_rng(7).normal(size=(2, 6, 6, 2)).astype("float32")
    path = tmp_path / "wn.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(model(x), loaded(x))
    for original, restored in zip(model.weights, loaded.weights):
        assert original.path == restored.path
        np.testing.assert_array_equal(original.numpy(), restored.numpy())
    assert isinstance(loaded.get_layer("wn_up"), WeightNormConvTranspose)


def test_weights_h5_round_trip_restores_g(tmp_path):
    model = _tiny_weight_norm_model()
    path = tmp_path / "wn.weights.h5"
    model.save_weights(path)
    fresh = _tiny_weight_norm_model()
    for layer in fresh.layers:       # different values everywhere, g included
        if layer.weights:
            _randomise(layer, seed=99)
    fresh.load_weights(path)
    for original, restored in zip(model.weights, fresh.weights):
        np.testing.assert_array_equal(original.numpy(), restored.numpy())


def test_loading_a_mismatched_store_names_the_layer():
    layer = WeightNormConv(2, 3, 3, name="seg_conv")
    layer(np.zeros((1, 4, 4, 2), "float32"))
    store = {"0": layer.v.numpy(), "1": layer.g.numpy()}      # bias missing
    with pytest.raises(ValueError, match="'seg_conv' holds 3 variables .* has 2"):
        layer.load_own_variables(store)


def test_get_config_round_trip():
    layer = WeightNormConv(3, 8, (3, 3, 1), strides=(1, 2, 2), padding="valid",
                           activation="relu", use_bias=False, name="c")
    clone = WeightNormConv.from_config(layer.get_config())
    assert (clone.spatial_dims, clone.filters, clone.kernel_size, clone.strides, clone.padding,
            clone.use_bias) == (3, 8, (3, 3, 1), (1, 2, 2), "valid", False)
    dense = WeightNormDense.from_config(WeightNormDense(5, activation="tanh").get_config())
    assert dense.units == 5 and dense.activation is keras.activations.tanh


def test_mixed_bfloat16_keeps_float32_variables(bf16_policy):
    x = np.random.default_rng(8).normal(size=(1, 6, 6, 2)).astype("float32")
    layer = WeightNormConv(2, 3, 3)
    y = layer(x)
    assert y.dtype == "bfloat16"
    assert all(w.dtype == "float32" for w in layer.weights)
    plain = keras.layers.Conv2D(3, 3, padding="same", dtype="float32")
    plain(x)
    plain.set_weights([layer.kernel.numpy(), layer.bias.numpy()])
    np.testing.assert_allclose(tf.cast(y, tf.float32), plain(x), atol=0.05, rtol=0.02)


def test_invalid_arguments_are_rejected():
    with pytest.raises(ValueError, match="spatial_dims=4"):
        WeightNormConv(4, 3, 3)
    with pytest.raises(ValueError, match="kernel_size=\\(3, 3\\)"):
        WeightNormConv(3, 3, (3, 3))
    with pytest.raises(ValueError, match="padding='causal'"):
        WeightNormConv(2, 3, 3, padding="causal")


# ---------------------------------------------------------------- warp


def _smooth_flow(rng, shape, amplitude):
    """Random smooth displacement field (B, *S, N) reaching about ±amplitude voxels."""
    batch, *spatial = shape
    fields = []
    for _ in range(batch):
        components = [ndimage.gaussian_filter(rng.normal(size=spatial), 2.0)
                      for _ in spatial]
        field = np.stack(components, axis=-1)
        fields.append(field / np.abs(field).max() * amplitude)
    return np.stack(fields).astype("float32")


def _scipy_warp(image, flow):
    """Reference: x_out(p) = x_in(p + flow(p)) with linear interpolation and edge clamp."""
    out = np.zeros_like(image)
    grid = np.meshgrid(*[np.arange(n) for n in image.shape[1:-1]], indexing="ij")
    for b in range(image.shape[0]):
        coords = [grid[a] + flow[b, ..., a] for a in range(len(grid))]
        for c in range(image.shape[-1]):
            out[b, ..., c] = ndimage.map_coordinates(image[b, ..., c], coords, order=1,
                                                     mode="nearest")
    return out


@pytest.mark.parametrize("shape", [(2, 7, 9, 3), (1, 5, 6, 7, 2)])
def test_zero_flow_is_identity(shape):
    image = np.random.default_rng(9).random(shape).astype("float32")
    flow = np.zeros(shape[:-1] + (len(shape) - 2,), "float32")
    np.testing.assert_array_equal(warp(image, flow), image)


def test_integer_shift_reads_neighbours_and_clamps_at_the_edge():
    image = np.random.default_rng(10).random((1, 6, 8, 2)).astype("float32")
    flow = np.zeros((1, 6, 8, 2), "float32")
    flow[..., 0] = 1.0     # dy: read one row down
    flow[..., 1] = -2.0    # dx: read two columns left
    out = warp(image, flow).numpy()
    np.testing.assert_array_equal(out[0, :-1, 2:], image[0, 1:, :-2])     # interior
    np.testing.assert_array_equal(out[0, -1, 2:], image[0, -1, :-2])      # last row clamped
    np.testing.assert_array_equal(out[0, :-1, :2], np.repeat(image[0, 1:, :1], 2, axis=1))


@pytest.mark.parametrize("shape,amplitude", [((2, 12, 10, 3), 4.0), ((2, 6, 8, 7, 2), 3.0)])
def test_warp_matches_scipy_map_coordinates(shape, amplitude):
    rng = np.random.default_rng(11)
    image = rng.random(shape).astype("float32")
    flow = _smooth_flow(rng, shape[:-1], amplitude)       # reaches outside the image too
    np.testing.assert_allclose(warp(image, flow), _scipy_warp(image, flow), atol=1e-5)


def test_warp_with_unknown_shapes_inside_tf_function():
    spec = [tf.TensorSpec((None, None, None, None), tf.float32),
            tf.TensorSpec((None, None, None, 2), tf.float32)]
    graph_warp = tf.function(warp, input_signature=spec)
    rng = np.random.default_rng(12)
    for shape in [(1, 5, 7, 1), (3, 9, 4, 2)]:
        image = rng.random(shape).astype("float32")
        flow = _smooth_flow(rng, shape[:-1], 2.0)
        np.testing.assert_allclose(graph_warp(image, flow), _scipy_warp(image, flow), atol=1e-5)
    assert graph_warp.experimental_get_tracing_count() == 1


@pytest.mark.parametrize("shape", [(1, 4, 5, 2), (1, 3, 4, 3, 1)])
def test_warp_gradients_match_finite_differences(shape):
    rng = np.random.default_rng(13)
    spatial_dims = len(shape) - 2
    image = rng.random(shape)
    # Fractional parts in [0.3, 0.7]: away from the kinks of linear interpolation at integers.
    flow_shape = shape[:-1] + (spatial_dims,)
    flow = rng.uniform(0.3, 0.7, flow_shape) * rng.choice([-1.0, 1.0], flow_shape)
    image_t, flow_t = tf.constant(image, tf.float64), tf.constant(flow, tf.float64)
    # tf.function: compute_gradient evaluates the warp hundreds of times.
    warp_flow = tf.function(lambda f: warp(image_t, f))
    warp_image = tf.function(lambda i: warp(i, flow_t))
    analytic, numeric = tf.test.compute_gradient(warp_flow, [flow_t])
    np.testing.assert_allclose(analytic[0], numeric[0], atol=1e-6)
    assert np.abs(analytic[0]).max() > 0.01           # the flow receives a gradient
    analytic, numeric = tf.test.compute_gradient(warp_image, [image_t])
    np.testing.assert_allclose(analytic[0], numeric[0], atol=1e-6)


def test_flow_gradient_is_nonzero_in_float32():
    rng = np.random.default_rng(14)
    image = tf.constant(rng.random((2, 8, 8, 3)), tf.float32)
    flow = tf.Variable(_smooth_flow(rng, (2, 8, 8), 1.5))
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(warp(image, flow) * tf.constant(rng.random((2, 8, 8, 3)),
                                                             tf.float32))
    grad = tape.gradient(loss, flow).numpy()
    assert np.all(np.isfinite(grad)) and np.count_nonzero(grad) > grad.size // 2


def test_warp_layer_in_functional_model_keeps_float32_flow(bf16_policy):
    image_in = keras.Input((None, None, 2))
    flow_in = keras.Input((None, None, 2))
    model = keras.Model([image_in, flow_in], Warp(name="warp")(image_in, flow_in))
    rng = np.random.default_rng(15)
    image = rng.random((1, 6, 6, 2)).astype("float32")
    flow = _smooth_flow(rng, (1, 6, 6), 2.0)
    out = model([image, flow])
    assert out.dtype == "float32"
    np.testing.assert_allclose(out, _scipy_warp(image, flow), atol=1e-5)
    assert isinstance(Warp.from_config(model.get_layer("warp").get_config()), Warp)


def test_warp_rejects_bad_inputs():
    image = np.zeros((1, 4, 4, 1), "float32")
    with pytest.raises(ValueError, match=r"flow must have shape \(B, \*spatial, 2\)"):
        warp(image, np.zeros((1, 4, 4, 3), "float32"))
    with pytest.raises(ValueError, match="must be floating point"):
        warp(np.zeros((1, 4, 4, 1), "int32"), np.zeros((1, 4, 4, 2), "float32"))
    with pytest.raises(ValueError, match="image must be"):
        warp(np.zeros((4, 4, 1), "float32"), np.zeros((4, 4, 2), "float32"))
