"""U-Net builder (2D and 3D) returning float32 logits.

Ronneberger, Fischer & Brox, "U-Net: Convolutional Networks for Biomedical Image Segmentation",
MICCAI 2015, with 'same' padding. Two presets reproduce the segmentors of our papers:

- `PAPER_UNET_2D` — Chaitanya et al., "Semi-supervised task-driven data augmentation for medical
  image segmentation" (MedIA 2021): filters 16/32/64/128/256, 3×3 convs + batch norm (momentum
  0.99, ε 1e-3) + ReLU, 2×2 max pooling, bilinear ×2 up-sampling followed by a 2×2 conv + BN +
  ReLU (the reference code's `fs_de=2`), skip concatenation, 1×1 conv to K logits. (The
  reference code also stacks three extra 3×3 convs at full resolution and ends with a 3×3 conv;
  we keep the symmetric U-Net the paper describes.)
- `PAPER_UNET_3D` — Mondal, Dolz & Desrosiers, "Few-shot 3D multi-modal medical image
  segmentation using generative adversarial learning" (2018): filters 32/64/128/256, weight-
  normalised 3×3×3 convs + leaky ReLU 0.2, no batch norm, 2×2×2 average pooling, weight-
  normalised k2 s2 transposed convs up, skip concatenation, final 3×3×3 conv to K logits.

Layer names (stable; methods tap features by name). With L = len(filters) levels:
- input "image"; encoder blocks "enc0" … "enc{L-2}" (block outputs, the skip features), each
  followed by "pool{l}"; the deepest block "bottleneck"; decoder levels l = L-2 … 0: up-sampling
  "dec{l}_up_*" (…_resize, …_conv, …_norm, …_act), "dec{l}_concat", block "dec{l}"; final conv
  "final_conv"; output "logits" (a float32 linear Activation, so the model returns float32 logits
  under the `mixed_bfloat16` policy).
- Inside a block named B: "B_a_conv", "B_a_norm", "B_a_act", "B_b_conv", "B_b_norm", "B_b_act",
  and the block output "B". fm_gan's feature matching taps "bottleneck_a_act" (the first
  bottleneck conv, as the few-shot GAN reference did) or "bottleneck".

Biases: convolutions followed by batch/instance norm have none (the norm's β shifts anyway);
with norm "weight"/"none" every conv has a bias. The final conv always has a bias.
"""
from __future__ import annotations

import dataclasses

import keras

from tfseg.networks import blocks


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Architecture of a U-Net (see the module docstring for the layer names).

    Attributes:
        filters: channels per level, shallowest first; len(filters) − 1 poolings.
        norm: "batch" | "instance" | "weight" | "none".
        activation: "relu" | "leaky_relu" (slope 0.2).
        pooling: "max" | "average".
        upsampling: "bilinear" (linear ×2 — bilinear in 2D, trilinear in 3D — then a conv of
            `upsampling_kernel_size`) | "transpose" (k2 s2 transposed conv, weight-normalised when
            norm == "weight").
        upsampling_kernel_size: kernel of the conv after "bilinear" up-sampling (2 as in the
            task-driven reference code; 3 avoids its half-voxel shift). Unused for "transpose".
        final_kernel_size: kernel of the last conv to the K logits; None = 1 in 2D, 3 in 3D (the
            two papers' choices).
    """

    filters: tuple[int, ...] = (16, 32, 64, 128, 256)
    norm: str = "batch"
    activation: str = "relu"
    pooling: str = "max"
    upsampling: str = "bilinear"
    upsampling_kernel_size: int = 2
    final_kernel_size: int | None = None

    def __post_init__(self):
        filters = tuple(self.filters)
        if not filters or any(not isinstance(f, int) or f < 1 for f in filters):
            raise ValueError(f"UNetConfig.filters={self.filters!r}: expected a non-empty "
                             f"sequence of positive ints, e.g. (16, 32, 64, 128, 256).")
        object.__setattr__(self, "filters", filters)
        blocks.check_option(self.norm, blocks.NORMS, "UNetConfig.norm")
        blocks.check_option(self.activation, blocks.ACTIVATIONS, "UNetConfig.activation")
        blocks.check_option(self.pooling, blocks.POOLINGS, "UNetConfig.pooling")
        blocks.check_option(self.upsampling, blocks.UPSAMPLINGS, "UNetConfig.upsampling")
        for field in ("upsampling_kernel_size", "final_kernel_size"):
            value = getattr(self, field)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"UNetConfig.{field}={value!r}: expected a positive int.")


PAPER_UNET_2D = UNetConfig()
PAPER_UNET_3D = UNetConfig(filters=(32, 64, 128, 256), norm="weight", activation="leaky_relu",
                           pooling="average", upsampling="transpose", final_kernel_size=3)


def size_multiple(config: UNetConfig) -> int:
    """Every spatial size fed to the U-Net must be a multiple of this: 2**(levels − 1)."""
    return 2 ** (len(config.filters) - 1)


def _check_input_shape(input_shape, config: UNetConfig) -> tuple:
    input_shape = tuple(input_shape)
    if len(input_shape) not in (3, 4):
        raise ValueError(f"build_unet: input_shape={input_shape} must be (H, W, C) or "
                         f"(D, H, W, C), without the batch axis.")
    channels = input_shape[-1]
    if not isinstance(channels, int) or channels < 1:
        raise ValueError(f"build_unet: the channel count (last entry of input_shape="
                         f"{input_shape}) must be a known positive int.")
    multiple = size_multiple(config)
    for size in input_shape[:-1]:
        if size is not None and (not isinstance(size, int) or size < 1 or size % multiple):
            raise ValueError(
                f"build_unet: spatial size {size} in input_shape={input_shape} is not a "
                f"multiple of {multiple} (2**{len(config.filters) - 1} for "
                f"{len(config.filters)} levels). Crop/pad the input to a multiple of {multiple}, "
                f"use None for a size known only at run time, or use fewer levels.")
    return input_shape


def build_unet(input_shape, num_classes: int, config: UNetConfig = PAPER_UNET_2D,
               name: str = "unet") -> keras.Model:
    """Builds a 2D or 3D U-Net returning per-voxel logits.

    Args:
        input_shape: (H, W, C) or (D, H, W, C); spatial sizes may be None (then any multiple of
            `size_multiple(config)` works at run time).
        num_classes: number of output channels K (logits, no softmax).
        config: the architecture (`PAPER_UNET_2D` by default; `PAPER_UNET_3D` for the few-shot
            3D GAN; `dataclasses.replace(config, filters=(4, 8))` for tiny variants).
        name: model name.

    Returns:
        A functional keras.Model mapping (B, *S, C) to float32 logits (B, *S, K).

    Raises:
        ValueError: if input_shape has the wrong rank, an unknown channel count, or a spatial
            size that is not a multiple of `size_multiple(config)`, or num_classes < 1.
    """
    input_shape = _check_input_shape(input_shape, config)
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"build_unet: num_classes={num_classes!r} must be a positive int.")
    spatial_dims = len(input_shape) - 1
    style = dict(spatial_dims=spatial_dims, norm=config.norm, activation=config.activation)

    inputs = keras.Input(shape=input_shape, name="image")
    x = inputs
    skips = []
    for level, filters in enumerate(config.filters[:-1]):
        x = blocks.conv_block(x, filters, name=f"enc{level}", **style)      # (B, *S/2^l, f_l)
        skips.append(x)
        x = blocks.pooling_layer(config.pooling, spatial_dims, f"pool{level}")(x)
    x = blocks.conv_block(x, config.filters[-1], name="bottleneck", **style)

    for level in reversed(range(len(config.filters) - 1)):
        x = blocks.upsample(x, config.filters[level], upsampling=config.upsampling,
                            kernel_size=config.upsampling_kernel_size,
                            name=f"dec{level}_up", **style)
        x = keras.layers.Concatenate(name=f"dec{level}_concat")([x, skips[level]])
        x = blocks.conv_block(x, config.filters[level], name=f"dec{level}", **style)

    final_kernel_size = config.final_kernel_size or (1 if spatial_dims == 2 else 3)
    x = blocks.conv_layer(spatial_dims, num_classes, final_kernel_size,
                          weight_norm=config.norm == "weight", use_bias=True,
                          name="final_conv")(x)
    # float32 output layer: logits stay float32 under mixed_bfloat16 (docs/performance.md).
    logits = keras.layers.Activation("linear", dtype="float32", name="logits")(x)
    return keras.Model(inputs, logits, name=name)
