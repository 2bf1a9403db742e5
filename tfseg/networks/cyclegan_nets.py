"""CycleGAN networks (Zhu, Park, Isola & Efros, "Unpaired image-to-image translation using
cycle-consistent adversarial networks", ICCV 2017), 2D, channels_last.

- `build_resnet_generator`: Johnson et al.'s ResNet translator as CycleGAN uses it:
  c7s1-f (reflect pad 3, 7×7 conv, instance norm, ReLU), two ×½ down-samplings (3×3 stride 2,
  2f and 4f), `residual_blocks` residual blocks at 4f (reflect pad 1, 3×3 conv, IN, ReLU, reflect
  pad 1, 3×3 conv, IN, + skip), two ×2 up-samplings (3×3 stride-2 transposed convs), and c7s1-C
  with tanh. CycleGAN uses 9 blocks for 256² images and 6 for 128² (`default_residual_blocks`).
  Spatial sizes must be multiples of 4.
- `build_patch_discriminator`: the 70×70 PatchGAN: C64 (4×4 stride 2, no norm, leaky ReLU 0.2),
  C128, C256 (stride 2, IN), C512 (stride 1, IN), then a 4×4 conv to one logit per patch. "Same"
  padding (the reference pads 1 pixel and convolves "valid"): the interior receptive field is
  still 70×70, and inputs as small as 16² keep a non-empty output (H/8 × W/8).

Instance norm is `keras.layers.GroupNormalization(groups=-1)` (one group per channel).
Both builders return logits-free functional models: the generator outputs images in [−1, 1],
the discriminator unbounded scores (LSGAN: no sigmoid).
"""
from __future__ import annotations

import keras
import tensorflow as tf

_INIT = keras.initializers.RandomNormal(0.0, 0.02)   # CycleGAN's N(0, 0.02) weight init


@keras.saving.register_keras_serializable(package="tfseg")
class ReflectPadding2D(keras.layers.Layer):
    """Reflection padding of `padding` pixels on each side of H and W (no edge repetition)."""

    def __init__(self, padding: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.padding = int(padding)

    def call(self, inputs):
        p = self.padding
        return tf.pad(inputs, [[0, 0], [p, p], [p, p], [0, 0]], mode="REFLECT")

    def compute_output_shape(self, input_shape):
        batch, height, width, channels = input_shape
        grow = 2 * self.padding
        return (batch, None if height is None else height + grow,
                None if width is None else width + grow, channels)

    def get_config(self):
        return {**super().get_config(), "padding": self.padding}


def _instance_norm(name: str) -> keras.layers.Layer:
    return keras.layers.GroupNormalization(groups=-1, epsilon=1e-5, name=name)


def _conv(filters, kernel, strides, name, padding="valid", use_bias=True):
    return keras.layers.Conv2D(filters, kernel, strides=strides, padding=padding,
                               use_bias=use_bias, kernel_initializer=_INIT, name=name)


def default_residual_blocks(example_shape) -> int:
    """CycleGAN's choice: 6 residual blocks for images up to 128², 9 above."""
    return 6 if max(int(s) for s in example_shape) <= 128 else 9


def build_resnet_generator(num_channels: int, *, filters: int = 64, residual_blocks: int = 9,
                           name: str = "generator") -> keras.Model:
    """ResNet generator: (B, H, W, C) in [−1, 1] -> (B, H, W, C) tanh; H, W multiples of 4.

    Args:
      num_channels: image channels (in and out).
      filters: f, channels of the first layer (64 in CycleGAN); 2f, 4f after the down-samplings.
      residual_blocks: residual blocks at 4f (9 at 256², 6 at ≤128²).
      name: model name.
    """
    if residual_blocks < 0 or filters < 1:
        raise ValueError(f"build_resnet_generator: filters={filters} must be >= 1 and "
                         f"residual_blocks={residual_blocks} >= 0.")
    inputs = keras.Input((None, None, num_channels), name="image")
    x = ReflectPadding2D(3, name="c7_pad")(inputs)
    x = _conv(filters, 7, 1, "c7_conv", use_bias=False)(x)
    x = keras.layers.ReLU(name="c7_act")(_instance_norm("c7_norm")(x))
    for level, width in enumerate((2 * filters, 4 * filters)):
        x = _conv(width, 3, 2, f"down{level}_conv", padding="same", use_bias=False)(x)
        x = keras.layers.ReLU(name=f"down{level}_act")(_instance_norm(f"down{level}_norm")(x))
    for block in range(residual_blocks):
        skip = x
        for unit in ("a", "b"):
            x = ReflectPadding2D(1, name=f"res{block}_{unit}_pad")(x)
            x = _conv(4 * filters, 3, 1, f"res{block}_{unit}_conv", use_bias=False)(x)
            x = _instance_norm(f"res{block}_{unit}_norm")(x)
            if unit == "a":
                x = keras.layers.ReLU(name=f"res{block}_a_act")(x)
        x = keras.layers.Add(name=f"res{block}")([skip, x])
    for level, width in enumerate((2 * filters, filters)):
        x = keras.layers.Conv2DTranspose(width, 3, strides=2, padding="same", use_bias=False,
                                         kernel_initializer=_INIT, name=f"up{level}_conv")(x)
        x = keras.layers.ReLU(name=f"up{level}_act")(_instance_norm(f"up{level}_norm")(x))
    x = ReflectPadding2D(3, name="out_pad")(x)
    x = _conv(num_channels, 7, 1, "out_conv")(x)
    outputs = keras.layers.Activation("tanh", dtype="float32", name="translated")(x)
    return keras.Model(inputs, outputs, name=name)


def build_patch_discriminator(num_channels: int, *, filters: int = 64,
                              name: str = "discriminator") -> keras.Model:
    """70×70 PatchGAN: (B, H, W, C) -> (B, H/8, W/8, 1) real/fake scores (no sigmoid)."""
    if filters < 1:
        raise ValueError(f"build_patch_discriminator: filters={filters} must be >= 1.")
    inputs = keras.Input((None, None, num_channels), name="image")
    x = inputs
    for index, (multiple, stride) in enumerate(((1, 2), (2, 2), (4, 2), (8, 1))):
        x = _conv(filters * multiple, 4, stride, f"c{index}_conv", padding="same",
                  use_bias=index == 0)(x)
        if index:
            x = _instance_norm(f"c{index}_norm")(x)
        x = keras.layers.LeakyReLU(negative_slope=0.2, name=f"c{index}_act")(x)
    outputs = keras.layers.Activation("linear", dtype="float32", name="score")(
        _conv(1, 4, 1, "score_conv", padding="same")(x))
    return keras.Model(inputs, outputs, name=name)
