"""Weight-normalised convolution, transposed convolution and dense layers.

Weight normalisation (Salimans & Kingma, "Weight Normalization: A Simple Reparameterization to
Accelerate Training of Deep Neural Networks", NeurIPS 2016) writes every output filter's weight
vector as w = g · v / ‖v‖, with a learned direction v and a learned scalar gain g per filter. The
few-shot 3D GAN of Mondal, Dolz & Desrosiers ("Few-shot 3D multi-modal medical image segmentation
using generative adversarial learning", 2018) uses it in place of batch norm in its segmentor /
discriminator and in the generator's last layer.

Choices made here (tensorflow-addons' WeightNormalization is unusable with Keras 3,
docs/performance.md):
- No data-dependent initialisation. g starts at ‖v‖, so at initialisation the layer computes
  exactly what the plain layer with kernel v would compute.
- ‖v‖ is taken over every kernel axis except the output-filter axis: the last axis of a
  convolution / dense kernel (…, in, filters), axis −2 of a transposed-convolution kernel
  (…, filters, in), the Keras layouts.
- v, g and the bias are float32 variables that are **not** autocast: the norm is computed in
  float32 and only the normalised kernel is cast to the compute dtype, so the layers are exact
  under the `mixed_bfloat16` policy too.
- Only `channels_last` data (the project-wide layout).

Variables, in saving order: `v` (kernel direction), `g` (gain, shape (filters,)), `bias` (when
`use_bias`). The effective kernel is available as the `kernel` property.
"""
from __future__ import annotations

import keras
from keras import ops

# Guards the division for an all-zero direction vector (the gradient of g·v/‖v‖ is undefined
# there anyway); far below any ‖v‖² a trained or initialised kernel has.
_MIN_SQUARED_NORM = 1e-12


def _as_tuple(value, spatial_dims: int, name: str) -> tuple[int, ...]:
    """Expands an int or a sequence to a `spatial_dims`-tuple of positive ints."""
    values = (value,) * spatial_dims if isinstance(value, int) else tuple(value)
    if len(values) != spatial_dims or any(not isinstance(v, int) or v < 1 for v in values):
        raise ValueError(
            f"{name}={value!r}: expected a positive int or {spatial_dims} positive ints "
            f"(one per spatial axis). Pass e.g. {name}=3.")
    return values


def _check_spatial_dims(spatial_dims: int) -> int:
    if spatial_dims not in (1, 2, 3):
        raise ValueError(f"spatial_dims={spatial_dims!r}: expected 1, 2 or 3.")
    return spatial_dims


def _check_padding(padding: str) -> str:
    if padding not in ("same", "valid"):
        raise ValueError(f"padding={padding!r}: expected 'same' or 'valid'.")
    return padding


class _WeightNormBase(keras.layers.Layer):
    """Shared machinery: variables v, g, bias and the normalised kernel w = g·v/‖v‖."""

    # Index of the output-filter axis in the kernel; the norm runs over all other axes.
    _filter_axis = -1

    def __init__(self, units: int, activation=None, use_bias: bool = True,
                 kernel_initializer="glorot_uniform", bias_initializer="zeros", **kwargs):
        super().__init__(**kwargs)
        if not isinstance(units, int) or units < 1:
            raise ValueError(f"{type(self).__name__}: the number of filters/units must be a "
                             f"positive int, got {units!r}.")
        self._units = units
        self.activation = keras.activations.get(activation)
        self.use_bias = bool(use_bias)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)

    def _kernel_shape(self, input_channels: int) -> tuple[int, ...]:
        raise NotImplementedError

    def _norm_axes(self, kernel_rank: int) -> tuple[int, ...]:
        filter_axis = self._filter_axis % kernel_rank
        return tuple(a for a in range(kernel_rank) if a != filter_axis)

    def _reshape_to_kernel(self, per_filter, kernel_rank: int):
        """(filters,) -> a shape that broadcasts against the kernel along the filter axis."""
        shape = [1] * kernel_rank
        shape[self._filter_axis % kernel_rank] = self._units
        return ops.reshape(per_filter, shape)

    def build(self, input_shape):
        input_channels = input_shape[-1]
        if input_channels is None:
            raise ValueError(f"{type(self).__name__} '{self.name}': the channel (last) axis "
                             f"of the input must be known, got input shape {input_shape}.")
        kernel_shape = self._kernel_shape(int(input_channels))
        axes = self._norm_axes(len(kernel_shape))
        self.v = self.add_weight(name="v", shape=kernel_shape,
                                 initializer=self.kernel_initializer, autocast=False)

        def initial_gain(shape, dtype=None):
            # g = ‖v‖ makes the initial output identical to the plain layer with kernel v.
            return ops.cast(ops.sqrt(ops.sum(ops.square(self.v), axis=axes)), dtype or "float32")

        self.g = self.add_weight(name="g", shape=(self._units,), initializer=initial_gain,
                                 autocast=False)
        self.bias = (self.add_weight(name="bias", shape=(self._units,),
                                     initializer=self.bias_initializer, autocast=False)
                     if self.use_bias else None)

    @property
    def kernel(self):
        """The effective float32 kernel w = g·v/‖v‖ (same shape as v)."""
        v = ops.convert_to_tensor(self.v)
        rank = len(v.shape)
        squared_norm = ops.sum(ops.square(v), axis=self._norm_axes(rank))      # (filters,)
        scale = self.g / ops.sqrt(ops.maximum(squared_norm, _MIN_SQUARED_NORM))
        return v * self._reshape_to_kernel(scale, rank)

    def _finish(self, outputs):
        """Adds the bias and applies the activation (in the compute dtype)."""
        if self.bias is not None:
            outputs = outputs + ops.cast(self.bias, outputs.dtype)
        if self.activation is not None:
            outputs = self.activation(outputs)
        return outputs

    def save_own_variables(self, store):
        # Explicit order v, g, bias: Keras' Conv/Dense overrides would drop g.
        if not self.built:
            return
        for index, variable in enumerate(self._saved_variables()):
            store[str(index)] = variable

    def load_own_variables(self, store):
        if not self.built:
            return
        variables = self._saved_variables()
        if len(store.keys()) != len(variables):
            raise ValueError(
                f"{type(self).__name__} '{self.name}' holds {len(variables)} variables "
                f"(v, g{', bias' if self.use_bias else ''}) but the saved file has "
                f"{len(store.keys())} for it. The file was written by a different layer "
                f"configuration (use_bias or a non-weight-normalised layer); rebuild the model "
                f"with the configuration it was saved with.")
        for index, variable in enumerate(variables):
            variable.assign(store[str(index)])

    def _saved_variables(self):
        return [self.v, self.g] + ([self.bias] if self.bias is not None else [])

    def get_config(self):
        config = super().get_config()
        config.update({
            "activation": keras.activations.serialize(self.activation),
            "use_bias": self.use_bias,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "bias_initializer": keras.initializers.serialize(self.bias_initializer),
        })
        return config


@keras.saving.register_keras_serializable(package="tfseg")
class WeightNormConv(_WeightNormBase):
    """Weight-normalised N-D convolution (channels_last), w = g·v/‖v‖ per output filter.

    Args:
        spatial_dims: 1, 2 or 3.
        filters: number of output channels.
        kernel_size: int or one int per spatial axis.
        strides: int or one int per spatial axis.
        padding: "same" or "valid".
        dilation_rate: int or one int per spatial axis.
        activation: Keras activation name or callable, applied after the bias.
        use_bias: whether to add a bias (not weight-normalised).
        kernel_initializer: initialiser of the direction v.
        bias_initializer: initialiser of the bias.
        **kwargs: `keras.layers.Layer` arguments (name, dtype, trainable).

    Raises:
        ValueError: on an invalid spatial_dims, filters, kernel_size, strides or padding.
    """

    _filter_axis = -1   # kernel (*kernel_size, in, filters)

    def __init__(self, spatial_dims: int, filters: int, kernel_size, strides=1,
                 padding: str = "same", dilation_rate=1, **kwargs):
        super().__init__(filters, **kwargs)
        self.spatial_dims = _check_spatial_dims(spatial_dims)
        self.filters = filters
        self.kernel_size = _as_tuple(kernel_size, spatial_dims, "kernel_size")
        self.strides = _as_tuple(strides, spatial_dims, "strides")
        self.padding = _check_padding(padding)
        self.dilation_rate = _as_tuple(dilation_rate, spatial_dims, "dilation_rate")
        self.input_spec = keras.layers.InputSpec(ndim=spatial_dims + 2)

    def _kernel_shape(self, input_channels):
        return self.kernel_size + (input_channels, self.filters)

    def call(self, inputs):
        kernel = ops.cast(self.kernel, self.compute_dtype)
        outputs = ops.conv(inputs, kernel, strides=self.strides, padding=self.padding,
                           dilation_rate=self.dilation_rate, data_format="channels_last")
        return self._finish(outputs)

    def get_config(self):
        config = super().get_config()
        config.update({"spatial_dims": self.spatial_dims, "filters": self.filters,
                       "kernel_size": self.kernel_size, "strides": self.strides,
                       "padding": self.padding, "dilation_rate": self.dilation_rate})
        return config


@keras.saving.register_keras_serializable(package="tfseg")
class WeightNormConvTranspose(_WeightNormBase):
    """Weight-normalised N-D transposed convolution (channels_last), w = g·v/‖v‖ per filter.

    The Keras transposed-convolution kernel is (*kernel_size, filters, in): the norm is taken over
    every axis but −2. With kernel_size = strides = 2 and padding "same" it doubles each spatial
    size (the few-shot GAN's up-sampling and generator layers).

    Args:
        spatial_dims: 1, 2 or 3.
        filters: number of output channels.
        kernel_size: int or one int per spatial axis.
        strides: int or one int per spatial axis.
        padding: "same" or "valid".
        **kwargs: activation, use_bias, kernel_initializer, bias_initializer and
            `keras.layers.Layer` arguments, as for `WeightNormConv`.

    Raises:
        ValueError: on an invalid spatial_dims, filters, kernel_size, strides or padding.
    """

    _filter_axis = -2   # kernel (*kernel_size, filters, in)

    def __init__(self, spatial_dims: int, filters: int, kernel_size, strides=1,
                 padding: str = "same", **kwargs):
        super().__init__(filters, **kwargs)
        self.spatial_dims = _check_spatial_dims(spatial_dims)
        self.filters = filters
        self.kernel_size = _as_tuple(kernel_size, spatial_dims, "kernel_size")
        self.strides = _as_tuple(strides, spatial_dims, "strides")
        self.padding = _check_padding(padding)
        self.input_spec = keras.layers.InputSpec(ndim=spatial_dims + 2)

    def _kernel_shape(self, input_channels):
        return self.kernel_size + (self.filters, input_channels)

    def call(self, inputs):
        kernel = ops.cast(self.kernel, self.compute_dtype)
        outputs = ops.conv_transpose(inputs, kernel, strides=self.strides, padding=self.padding,
                                     data_format="channels_last")
        return self._finish(outputs)

    def get_config(self):
        config = super().get_config()
        config.update({"spatial_dims": self.spatial_dims, "filters": self.filters,
                       "kernel_size": self.kernel_size, "strides": self.strides,
                       "padding": self.padding})
        return config


@keras.saving.register_keras_serializable(package="tfseg")
class WeightNormDense(_WeightNormBase):
    """Weight-normalised dense layer, w = g·v/‖v‖ per output unit (norm over the input axis).

    Args:
        units: number of output units.
        **kwargs: activation, use_bias, kernel_initializer, bias_initializer and
            `keras.layers.Layer` arguments, as for `WeightNormConv`.

    Raises:
        ValueError: if units is not a positive int.
    """

    _filter_axis = -1   # kernel (in, units)

    def __init__(self, units: int, **kwargs):
        super().__init__(units, **kwargs)
        self.units = units
        self.input_spec = keras.layers.InputSpec(min_ndim=2)

    def _kernel_shape(self, input_channels):
        return (input_channels, self.units)

    def call(self, inputs):
        outputs = ops.matmul(inputs, ops.cast(self.kernel, self.compute_dtype))
        return self._finish(outputs)

    def get_config(self):
        config = super().get_config()
        config.update({"units": self.units})
        return config
