"""Networks of DMNet (Fang & Li, MICCAI 2020) and of the pixel-level adversarial baseline (Hung et
al., BMVC 2018): a ResNet-style encoder, two decoders, and a fully convolutional discriminator.

Composable builders (2D, channels_last, float32 logits out even under `mixed_bfloat16`):

- `build_encoder`: ResNet with bottleneck blocks (He et al. 2016). Stem 7×7 stride-2 conv + BN +
  ReLU ("stem", 1/2) and 3×3 stride-2 max pooling, then four stages of `blocks[s]` bottleneck
  blocks (1×1 → 3×3 → 1×1 ×`expansion`, projection shortcut when the shape changes): "stage1"
  1/4, "stage2" 1/8, "stage3" 1/16, "stage4" 1/16 with dilation 2 instead of a stride (output
  stride 16, as DeepLabv3+). `EncoderConfig.paper()` is ResNet-101 (3, 4, 23, 3 blocks, widths
  64…512, expansion 4); the quick presets use one block per stage and a few filters. Outputs the
  five feature maps [stem, stage1, stage2, stage3, stage4] (the skips).
- `build_unet_decoder`: U-Net style, skip concatenation at every level: stage4 ⊕ stage3 at 1/16,
  then (bilinear ×2, 3×3 conv, BN, ReLU) ⊕ stage2 (1/8), ⊕ stage1 (1/4), ⊕ stem (1/2), ⊕ the
  input image (1/1), each followed by two 3×3 conv-BN-ReLU; 1×1 conv to K logits.
- `build_deeplab_decoder`: DeepLabv3+ style: ASPP on stage4 (1×1 conv, three 3×3 atrous convs at
  `aspp_rates`, image pooling; concatenated, 1×1 conv), ×4 bilinear up-sampling to 1/4,
  concatenated with the 1×1-reduced (48 channels) low-level stage1 features, two 3×3 convs, 1×1
  conv to K logits, ×4 bilinear up-sampling to the input size.
- `build_two_branch`: image → shared encoder (or one encoder per decoder) → [U-Net logits,
  DeepLab logits] (DMNet's two branches); `build_deeplab_segmentor`: image → encoder → DeepLab
  logits (adv_seg's segmentor).
- `build_average_segmentor`: image → log of the mean of the two branches' softmax probabilities,
  so that softmax of its output IS the average of the two branches' probabilities (DMNet's
  inference); `MeanProbabilityLogits` computes it stably as logsumexp of the log-softmaxes − log 2.
- `build_discriminator`: fully convolutional, per pixel: three 4×4 stride-2 convs + ReLU (DMNet;
  leaky ReLU 0.2 in Hung et al.), three (bilinear ×2, 3×3 conv) up-sampling layers back to the
  input size, the last one to one real/fake logit per pixel. Input: class probability maps
  (softmax of a segmentor, or one-hot labels). Filter counts (64, 128, 256) follow Hung et al.'s
  first three layers; the papers do not give the up-sampling layers' widths (we mirror the
  encoder: 128, 64, 1).

Every spatial size must be a multiple of `SIZE_MULTIPLE` (16: stem, pooling, stage2, stage3);
the discriminator needs multiples of 8.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import keras
import tensorflow as tf

from tfseg.networks import blocks

SIZE_MULTIPLE = 16       # output stride of the encoder
DISC_SIZE_MULTIPLE = 8   # three stride-2 convs
_INIT = blocks.KERNEL_INITIALIZER


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """ResNet-style encoder.

    Attributes:
      stem_filters: channels of the 7×7 stride-2 stem conv.
      widths: bottleneck width of each of the four stages.
      blocks: bottleneck blocks per stage ((3, 4, 23, 3) = ResNet-101, (3, 4, 6, 3) = ResNet-50).
      expansion: output channels of a block = width × expansion (4 in ResNet).
    """

    stem_filters: int = 64
    widths: tuple[int, ...] = (64, 128, 256, 512)
    blocks: tuple[int, ...] = (3, 4, 23, 3)
    expansion: int = 4

    def __post_init__(self):
        for name in ("widths", "blocks"):
            value = tuple(getattr(self, name))
            if len(value) != 4 or any(not isinstance(v, int) or v < 1 for v in value):
                raise ValueError(f"EncoderConfig.{name}={getattr(self, name)!r}: expected four "
                                 "positive ints (one per ResNet stage), e.g. (3, 4, 23, 3).")
            object.__setattr__(self, name, value)
        if self.stem_filters < 1 or self.expansion < 1:
            raise ValueError(f"EncoderConfig: stem_filters={self.stem_filters} and expansion="
                             f"{self.expansion} must be >= 1.")

    def channels(self) -> tuple[int, ...]:
        """Channels of the five outputs [stem, stage1 … stage4]."""
        return (self.stem_filters, *(w * self.expansion for w in self.widths))


def _conv(filters, kernel, name, strides=1, dilation=1, use_bias=False):
    return keras.layers.Conv2D(filters, kernel, strides=strides, dilation_rate=dilation,
                               padding="same", use_bias=use_bias, kernel_initializer=_INIT,
                               name=name)


def _bn(name):
    return keras.layers.BatchNormalization(momentum=0.99, epsilon=1e-3, name=name)


def _conv_bn_relu(x, filters, kernel, name, strides=1, dilation=1):
    x = _conv(filters, kernel, f"{name}_conv", strides, dilation)(x)
    x = _bn(f"{name}_norm")(x)
    return keras.layers.ReLU(name=f"{name}_act")(x)


def _bottleneck(x, width, expansion, strides, dilation, name):
    shortcut = x
    out_channels = width * expansion
    if strides != 1 or x.shape[-1] != out_channels:
        shortcut = _conv(out_channels, 1, f"{name}_proj_conv", strides)(x)
        shortcut = _bn(f"{name}_proj_norm")(shortcut)
    y = _conv_bn_relu(x, width, 1, f"{name}_a")
    y = _conv_bn_relu(y, width, 3, f"{name}_b", strides=strides, dilation=dilation)
    y = _conv(out_channels, 1, f"{name}_c_conv")(y)
    y = _bn(f"{name}_c_norm")(y)
    y = keras.layers.Add(name=f"{name}_add")([y, shortcut])
    return keras.layers.ReLU(name=name)(y)


def check_size(example_shape: Sequence[int], what: str) -> None:
    """Raises a ValueError unless the slice sides are multiples of SIZE_MULTIPLE (16)."""
    shape = tuple(example_shape)
    if len(shape) != 2:
        raise ValueError(f"{what} is a 2D method; the data has example shape {shape}. Use a 2D "
                         "dataset (slices), e.g. synthetic_tumor, brats, synthetic_cardiac.")
    if not all(isinstance(s, int) and s >= SIZE_MULTIPLE and s % SIZE_MULTIPLE == 0
               for s in shape):
        raise ValueError(f"{what}: slice size {shape} must be a multiple of {SIZE_MULTIPLE} in "
                         f"both axes (the encoder's output stride). Preprocess with such a crop.")


def build_encoder(input_shape, config: EncoderConfig = EncoderConfig(),
                  name: str = "encoder") -> keras.Model:
    """ResNet-style encoder: image (B, H, W, C) -> [stem 1/2, stage1 1/4, stage2 1/8, stage3 1/16,
    stage4 1/16 (dilated)]."""
    inputs = keras.Input(tuple(input_shape), name="image")
    stem = _conv_bn_relu(inputs, config.stem_filters, 7, "stem", strides=2)     # (B, H/2, W/2)
    x = keras.layers.MaxPooling2D(3, strides=2, padding="same", name="stem_pool")(stem)
    outputs = [stem]
    for stage, (width, count) in enumerate(zip(config.widths, config.blocks), start=1):
        strides = 2 if stage in (2, 3) else 1
        dilation = 2 if stage == 4 else 1
        for index in range(count):
            x = _bottleneck(x, width, config.expansion, strides if index == 0 else 1, dilation,
                            f"stage{stage}_block{index}")
        x = keras.layers.Identity(name=f"stage{stage}")(x)
        outputs.append(x)
    return keras.Model(inputs, outputs, name=name)


def _feature_inputs(channels: Sequence[int]) -> list:
    names = ("stem", "stage1", "stage2", "stage3", "stage4")
    return [keras.Input((None, None, c), name=n) for n, c in zip(names, channels)]


def _logits(x, num_classes, name="logits"):
    x = _conv(num_classes, 1, "final_conv", use_bias=True)(x)
    return keras.layers.Activation("linear", dtype="float32", name=name)(x)


def build_unet_decoder(feature_channels: Sequence[int], image_channels: int, num_classes: int,
                       filters: Sequence[int] = (256, 128, 64, 32, 16),
                       name: str = "unet_decoder") -> keras.Model:
    """U-Net-style decoder: [stem, stage1..4, image] -> logits (B, H, W, K).

    Args:
      feature_channels: the encoder's five output channel counts.
      image_channels: C of the input image (the 1/1 skip).
      num_classes: K.
      filters: channels of the five levels 1/16, 1/8, 1/4, 1/2, 1/1.
      name: model name.
    """
    if len(tuple(filters)) != 5:
        raise ValueError(f"build_unet_decoder: filters={tuple(filters)} needs five entries "
                         "(levels 1/16, 1/8, 1/4, 1/2, 1/1).")
    features = _feature_inputs(feature_channels)
    image = keras.Input((None, None, image_channels), name="image")
    style = dict(spatial_dims=2, norm="batch", activation="relu")
    stem, stage1, stage2, stage3, stage4 = features
    x = keras.layers.Concatenate(name="level0_concat")([stage4, stage3])            # 1/16
    x = blocks.conv_block(x, filters[0], name="level0", **style)
    for level, skip in enumerate((stage2, stage1, stem, image), start=1):           # 1/8 … 1/1
        x = blocks.upsample(x, filters[level], upsampling="bilinear", kernel_size=3,
                            name=f"level{level}_up", **style)
        x = keras.layers.Concatenate(name=f"level{level}_concat")([x, skip])
        x = blocks.conv_block(x, filters[level], name=f"level{level}", **style)
    return keras.Model([*features, image], _logits(x, num_classes), name=name)


@keras.saving.register_keras_serializable(package="tfseg")
class SpatialBroadcast(keras.layers.Layer):
    """[pooled (B, 1, 1, F), like (B, H, W, C)] -> pooled repeated to (B, H, W, F) (ASPP's image
    pooling branch; works with unknown H, W)."""

    def call(self, inputs):
        pooled, like = inputs
        return pooled * tf.ones_like(like[..., :1], dtype=pooled.dtype)

    def compute_output_shape(self, input_shapes):
        pooled, like = input_shapes
        return (like[0], like[1], like[2], pooled[-1])


def build_deeplab_decoder(feature_channels: Sequence[int], num_classes: int,
                          aspp_filters: int = 256, aspp_rates: Sequence[int] = (6, 12, 18),
                          low_level_filters: int = 48, filters: int = 256,
                          name: str = "deeplab_decoder") -> keras.Model:
    """DeepLabv3+-style decoder: [stem, stage1..4] -> logits (B, H, W, K) (uses stage1, stage4).

    Args:
      feature_channels: the encoder's five output channel counts.
      num_classes: K.
      aspp_filters: channels of every ASPP branch and of its projection.
      aspp_rates: dilation rates of the three 3×3 ASPP convs (6, 12, 18 at output stride 16).
      low_level_filters: channels of the 1×1-reduced stage1 skip (48 in DeepLabv3+).
      filters: channels of the two 3×3 convs after the concatenation.
      name: model name.
    """
    if len(tuple(aspp_rates)) != 3:
        raise ValueError(f"build_deeplab_decoder: aspp_rates={tuple(aspp_rates)} needs three "
                         "dilation rates, e.g. (6, 12, 18).")
    features = _feature_inputs(feature_channels)
    stage1, stage4 = features[1], features[4]
    branches = [_conv_bn_relu(stage4, aspp_filters, 1, "aspp_1x1")]
    for index, rate in enumerate(aspp_rates):
        branches.append(_conv_bn_relu(stage4, aspp_filters, 3, f"aspp_rate{index}",
                                      dilation=int(rate)))
    pooled = keras.layers.GlobalAveragePooling2D(keepdims=True, name="aspp_pool")(stage4)
    pooled = _conv(aspp_filters, 1, "aspp_pool_conv", use_bias=True)(pooled)
    pooled = keras.layers.ReLU(name="aspp_pool_act")(pooled)
    branches.append(SpatialBroadcast(name="aspp_pool_broadcast")([pooled, stage4]))
    x = keras.layers.Concatenate(name="aspp_concat")(branches)
    x = _conv_bn_relu(x, aspp_filters, 1, "aspp_project")                           # 1/16
    x = blocks.LinearUpsampling(name="up4_a")(x)
    x = blocks.LinearUpsampling(name="up4_b")(x)                                     # 1/4
    low = _conv_bn_relu(stage1, low_level_filters, 1, "low_level")
    x = keras.layers.Concatenate(name="decoder_concat")([x, low])
    x = _conv_bn_relu(x, filters, 3, "decoder_a")
    x = _conv_bn_relu(x, filters, 3, "decoder_b")
    x = _conv(num_classes, 1, "final_conv", use_bias=True)(x)
    x = blocks.LinearUpsampling(name="out_up_a")(x)
    x = blocks.LinearUpsampling(name="out_up_b")(x)                                  # 1/1
    logits = keras.layers.Activation("linear", dtype="float32", name="logits")(x)
    return keras.Model(features, logits, name=name)


@dataclasses.dataclass(frozen=True)
class BranchConfig:
    """Both decoders' settings (see the builders)."""

    unet_filters: tuple[int, ...] = (256, 128, 64, 32, 16)
    aspp_filters: int = 256
    aspp_rates: tuple[int, ...] = (6, 12, 18)
    low_level_filters: int = 48
    deeplab_filters: int = 256


def _deeplab(channels, num_classes, branch: BranchConfig, name="deeplab_decoder"):
    return build_deeplab_decoder(channels, num_classes, branch.aspp_filters, branch.aspp_rates,
                                 branch.low_level_filters, branch.deeplab_filters, name=name)


def build_two_branch(input_shape, num_classes: int, encoder: EncoderConfig, branch: BranchConfig,
                     separate_encoders: bool = False, name: str = "branches") -> keras.Model:
    """DMNet's two branches: image -> [U-Net logits, DeepLab logits], each (B, H, W, K).

    One shared encoder, or (`separate_encoders`) one encoder per decoder ("encoder_unet",
    "encoder_deeplab": the paper's ablation).
    """
    image = keras.Input(tuple(input_shape), name="image")
    channels = encoder.channels()
    unet = build_unet_decoder(channels, input_shape[-1], num_classes, branch.unet_filters)
    deeplab = _deeplab(channels, num_classes, branch)
    if separate_encoders:
        unet_features = build_encoder(input_shape, encoder, name="encoder_unet")(image)
        deeplab_features = build_encoder(input_shape, encoder, name="encoder_deeplab")(image)
    else:
        unet_features = deeplab_features = build_encoder(input_shape, encoder)(image)
    outputs = [unet([*unet_features, image]), deeplab(deeplab_features)]
    return keras.Model(image, outputs, name=name)


def build_deeplab_segmentor(input_shape, num_classes: int, encoder: EncoderConfig,
                            branch: BranchConfig, name: str = "segmentor") -> keras.Model:
    """One branch: image -> encoder -> DeepLabv3+ decoder -> logits (adv_seg's segmentor)."""
    image = keras.Input(tuple(input_shape), name="image")
    features = build_encoder(input_shape, encoder)(image)
    logits = _deeplab(encoder.channels(), num_classes, branch)(features)
    return keras.Model(image, logits, name=name)


@keras.saving.register_keras_serializable(package="tfseg")
class MeanProbabilityLogits(keras.layers.Layer):
    """[logits₁, logits₂] -> log((softmax(logits₁) + softmax(logits₂)) / 2), float32.

    softmax of the result is the mean of the two probability maps (they sum to 1 per pixel, so
    the log is already normalised); computed as logsumexp of the two log-softmaxes − log 2.
    """

    def __init__(self, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)

    def call(self, inputs):
        first, second = (tf.nn.log_softmax(tf.cast(t, tf.float32), axis=-1) for t in inputs)
        return tf.reduce_logsumexp(tf.stack([first, second], 0), axis=0) - tf.math.log(2.0)

    def compute_output_shape(self, input_shapes):
        return input_shapes[0]


def build_average_segmentor(branches: keras.Model, input_shape,
                            name: str = "segmentor") -> keras.Model:
    """image -> log of the mean of the two branches' probabilities (shares `branches`' layers)."""
    image = keras.Input(tuple(input_shape), name="image")
    first, second = branches(image)
    return keras.Model(image, MeanProbabilityLogits(name="logits")([first, second]), name=name)


def build_discriminator(num_classes: int, filters: Sequence[int] = (64, 128, 256),
                        activation: str = "relu", name: str = "discriminator") -> keras.Model:
    """Per-pixel real/fake FCN: probability maps (B, H, W, K) -> logits (B, H, W, 1).

    Args:
      num_classes: K (input channels).
      filters: channels of the three 4×4 stride-2 convs; the up-sampling convs use the first two
        in reverse, then 1.
      activation: "relu" (DMNet) or "leaky_relu" (slope 0.2, Hung et al.).
      name: model name.
    """
    filters = tuple(filters)
    if len(filters) != 3 or any(f < 1 for f in filters):
        raise ValueError(f"build_discriminator: filters={filters} needs three positive ints.")
    blocks.check_option(activation, blocks.ACTIVATIONS, "discriminator activation")
    inputs = keras.Input((None, None, num_classes), name="probabilities")
    x = inputs
    for index, f in enumerate(filters):
        x = keras.layers.Conv2D(f, 4, strides=2, padding="same", kernel_initializer=_INIT,
                                name=f"down{index}_conv")(x)
        x = blocks.activation_layer(activation, f"down{index}_act")(x)
    for index, f in enumerate((filters[1], filters[0], 1)):
        x = blocks.LinearUpsampling(name=f"up{index}_resize")(x)
        x = keras.layers.Conv2D(f, 3, padding="same", kernel_initializer=_INIT,
                                name=f"up{index}_conv")(x)
        if index < 2:
            x = blocks.activation_layer(activation, f"up{index}_act")(x)
    logits = keras.layers.Activation("linear", dtype="float32", name="logits")(x)
    return keras.Model(inputs, logits, name=name)
