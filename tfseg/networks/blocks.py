"""Small building blocks shared by the network builders (2D and 3D, channels_last).

Every helper takes the Keras tensor, builds named layers and returns the output tensor, so the
builders stay short and every layer has a stable, documented name (methods tap intermediate
features by name, e.g. fm_gan's feature matching).

Options understood everywhere:
- norm: "batch" (BatchNormalization, momentum 0.99, epsilon 1e-3: Keras' defaults and the
  task-driven reference code's values), "instance" (GroupNormalization(groups=-1), exact instance
  norm, docs/performance.md), "weight" (weight-normalised convolutions, no normalisation layer:
  the few-shot 3D GAN), "none".
- activation: "relu" or "leaky_relu" (negative slope 0.2, the few-shot GAN's value).
"""
from __future__ import annotations

import keras
import tensorflow as tf

from tfseg.layers.weight_norm import WeightNormConv, WeightNormConvTranspose

NORMS = ("batch", "instance", "weight", "none")
ACTIVATIONS = ("relu", "leaky_relu")
POOLINGS = ("max", "average")
UPSAMPLINGS = ("bilinear", "transpose")

LEAKY_RELU_SLOPE = 0.2
# He initialisation suits ReLU-family activations (the task-driven reference code used it too).
KERNEL_INITIALIZER = "he_normal"


def check_option(value: str, allowed: tuple[str, ...], name: str) -> str:
    """Returns `value` if it is one of `allowed`, else raises a ValueError naming the choices."""
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {list(allowed)}.")
    return value


def conv_layer(spatial_dims: int, filters: int, kernel_size: int, *, weight_norm: bool,
               use_bias: bool, name: str, strides: int = 1) -> keras.layers.Layer:
    """A 'same'-padded convolution, weight-normalised when `weight_norm`.

    Args:
        spatial_dims: 2 or 3.
        filters: output channels.
        kernel_size: kernel size along every spatial axis.
        weight_norm: build a `WeightNormConv` instead of a plain Keras convolution.
        use_bias: add a bias (pointless before batch or instance norm, which shift anyway).
        name: layer name.
        strides: stride along every spatial axis.

    Returns:
        The layer (not yet called).
    """
    if weight_norm:
        return WeightNormConv(spatial_dims, filters, kernel_size, strides=strides,
                              use_bias=use_bias, kernel_initializer=KERNEL_INITIALIZER, name=name)
    conv_class = {2: keras.layers.Conv2D, 3: keras.layers.Conv3D}[spatial_dims]
    return conv_class(filters, kernel_size, strides=strides, padding="same", use_bias=use_bias,
                      kernel_initializer=KERNEL_INITIALIZER, name=name)


def norm_layer(norm: str, name: str) -> keras.layers.Layer | None:
    """The normalisation layer for `norm` ("weight" and "none" have none)."""
    if norm == "batch":
        return keras.layers.BatchNormalization(momentum=0.99, epsilon=1e-3, name=name)
    if norm == "instance":
        return keras.layers.GroupNormalization(groups=-1, name=name)
    return None


def activation_layer(activation: str, name: str) -> keras.layers.Layer:
    """ReLU or leaky ReLU (slope 0.2)."""
    if activation == "leaky_relu":
        return keras.layers.LeakyReLU(negative_slope=LEAKY_RELU_SLOPE, name=name)
    return keras.layers.ReLU(name=name)


def conv_norm_act(x, filters: int, kernel_size: int, *, spatial_dims: int, norm: str,
                  activation: str, name: str):
    """Convolution → normalisation → activation; layers `{name}_conv`, `{name}_norm`,
    `{name}_act` (no `_norm` layer for norm "weight"/"none")."""
    x = conv_layer(spatial_dims, filters, kernel_size, weight_norm=norm == "weight",
                   use_bias=norm in ("weight", "none"), name=f"{name}_conv")(x)
    normalisation = norm_layer(norm, f"{name}_norm")
    if normalisation is not None:
        x = normalisation(x)
    return activation_layer(activation, f"{name}_act")(x)


def conv_block(x, filters: int, *, spatial_dims: int, norm: str, activation: str, name: str):
    """Two 3×3(×3) conv-norm-act units; the output is the Identity layer named `name`.

    Layer names: `{name}_a_conv`, `{name}_a_norm`, `{name}_a_act`, `{name}_b_conv`, …, `{name}`.
    """
    for unit in ("a", "b"):
        x = conv_norm_act(x, filters, 3, spatial_dims=spatial_dims, norm=norm,
                          activation=activation, name=f"{name}_{unit}")
    return keras.layers.Identity(name=name)(x)


def pooling_layer(pooling: str, spatial_dims: int, name: str) -> keras.layers.Layer:
    """2×2(×2) max or average pooling with stride 2."""
    if pooling == "max":
        pool_class = {2: keras.layers.MaxPooling2D, 3: keras.layers.MaxPooling3D}[spatial_dims]
    else:
        pool_class = {2: keras.layers.AveragePooling2D,
                      3: keras.layers.AveragePooling3D}[spatial_dims]
    return pool_class(pool_size=2, strides=2, name=name)


def upsample(x, filters: int, *, spatial_dims: int, upsampling: str, kernel_size: int, norm: str,
             activation: str, name: str):
    """×2 up-sampling to `filters` channels, then norm and activation.

    "transpose": a k2 s2 transposed convolution (weight-normalised for norm "weight"), layer
    `{name}_conv`. "bilinear": linear interpolation ×2 (`{name}_resize`: bilinear in 2D,
    trilinear in 3D, half-pixel centres, edge clamp) followed by a `kernel_size` convolution
    `{name}_conv`. Then `{name}_norm` (if any) and `{name}_act`.
    """
    weight_norm = norm == "weight"
    use_bias = norm in ("weight", "none")
    if upsampling == "transpose":
        if weight_norm:
            x = WeightNormConvTranspose(spatial_dims, filters, 2, strides=2, use_bias=use_bias,
                                        kernel_initializer=KERNEL_INITIALIZER,
                                        name=f"{name}_conv")(x)
        else:
            transpose_class = {2: keras.layers.Conv2DTranspose,
                               3: keras.layers.Conv3DTranspose}[spatial_dims]
            x = transpose_class(filters, 2, strides=2, padding="same", use_bias=use_bias,
                                kernel_initializer=KERNEL_INITIALIZER, name=f"{name}_conv")(x)
    else:
        # Not keras.layers.UpSampling2D(interpolation="bilinear"): it fails inside a
        # tf.function whose spatial sizes are unknown (a serving signature), and UpSampling3D
        # only repeats voxels. LinearUpsampling gives the same values and is dynamic-shape safe.
        x = LinearUpsampling(name=f"{name}_resize")(x)
        x = conv_layer(spatial_dims, filters, kernel_size, weight_norm=weight_norm,
                       use_bias=use_bias, name=f"{name}_conv")(x)
    normalisation = norm_layer(norm, f"{name}_norm")
    if normalisation is not None:
        x = normalisation(x)
    return activation_layer(activation, f"{name}_act")(x)


@keras.saving.register_keras_serializable(package="tfseg")
class LinearUpsampling(keras.layers.Layer):
    """×2 linear up-sampling along every spatial axis of a (B, *S, C) tensor (any number of axes).

    Uses half-pixel centres with edge clamping, i.e. the same result as
    `tf.image.resize(..., method="bilinear")` / `keras.layers.UpSampling2D(interpolation=
    "bilinear")` in 2D, and its trilinear analogue in 3D. Separable: along each axis the output
    samples sit at ±1/4 voxel around each input voxel, so
        out[2i]   = 0.75·x[i] + 0.25·x[i−1],   out[2i+1] = 0.75·x[i] + 0.25·x[i+1]
    with x[−1] = x[0] and x[n] = x[n−1]. Works with unknown (None) spatial sizes.
    """

    def call(self, inputs):
        x = inputs
        for axis in range(1, len(inputs.shape) - 1):
            x = self._upsample_axis(x, axis)
        return x

    @staticmethod
    def _upsample_axis(x, axis: int):
        def take(start, stop):                      # x[..., start:stop, ...] along `axis`
            return x[(slice(None),) * axis + (slice(start, stop),)]

        previous = tf.concat([take(0, 1), take(None, -1)], axis=axis)     # x[i-1], clamped
        following = tf.concat([take(1, None), take(-1, None)], axis=axis)  # x[i+1], clamped
        even = 0.75 * x + 0.25 * previous
        odd = 0.75 * x + 0.25 * following
        interleaved = tf.stack([even, odd], axis=axis + 1)        # (..., n, 2, ...)
        shape = tf.shape(x)
        new_shape = tf.concat([shape[:axis], [2 * shape[axis]], shape[axis + 1:]], axis=0)
        output = tf.reshape(interleaved, new_shape)
        # Keep the static shape information the reshape loses.
        static = list(x.shape)
        static[axis] = None if static[axis] is None else 2 * static[axis]
        output.set_shape(static)
        return output

    def compute_output_shape(self, input_shape):
        return (input_shape[0],) + tuple(None if s is None else 2 * s
                                         for s in input_shape[1:-1]) + (input_shape[-1],)
