"""SegAN's segmentor and critic (2D, channels_last).

Xue, Xu, Zhang, Long & Huang, "SegAN: Adversarial Network with Multi-scale L1 Loss for Medical
Image Segmentation", Neuroinformatics 16 (2018).

Both networks share one encoder shape (`encoder`): 4×4 convolutions with stride 2 and filters
64/128/256/512 (paper), leaky ReLU (slope 0.2), batch norm on every layer but the first (no bias
where batch norm follows). Each layer halves the spatial size, so sizes must be multiples of
`size_multiple(filters)` = 2**len(filters) (16 for the paper's four layers).

- Segmentor (`build_segmentor`): the encoder, then a decoder of blocks "×2 bilinear resize +
  3×3 conv + batch norm + ReLU", each followed by a skip connection (concatenation with the
  encoder feature of the same size), and a last ×2 resize + 3×3 conv to one logit per output
  (sigmoid per region, or softmax over classes, applied by the method).
- Critic (`build_critic`): the encoder alone, applied to the image multiplied channel-wise by a
  label map; it returns the output of every layer. The method adds the masked input itself as
  the first of the features the multi-scale L1 loss compares.

Layer names: encoder "{prefix}{l}_conv", "{prefix}{l}_norm" (l ≥ 1), "{prefix}{l}_act";
decoder "dec{l}_resize", "dec{l}_conv", "dec{l}_norm", "dec{l}_act", "dec{l}_concat"; then
"final_resize", "final_conv", "logits" (float32 even under mixed_bfloat16).
"""
from __future__ import annotations

from typing import Sequence

import keras

from tfseg.networks import blocks

PAPER_FILTERS = (64, 128, 256, 512)
KERNEL_SIZE = 4          # encoder convolutions (stride 2)
DECODER_KERNEL_SIZE = 3  # after each ×2 resize


def size_multiple(filters: Sequence[int]) -> int:
    """Spatial sizes the networks accept are multiples of 2**len(filters)."""
    return 2 ** len(tuple(filters))


def _check(input_shape, filters, builder: str) -> tuple[tuple, tuple[int, ...]]:
    input_shape, filters = tuple(input_shape), tuple(filters)
    if not filters or any(not isinstance(f, int) or f < 1 for f in filters):
        raise ValueError(f"{builder}: filters={filters!r}; expected a non-empty sequence of "
                         "positive ints, e.g. (64, 128, 256, 512).")
    if len(input_shape) != 3 or not isinstance(input_shape[-1], int) or input_shape[-1] < 1:
        raise ValueError(f"{builder}: input_shape={input_shape} must be (H, W, C) with a known "
                         "channel count (SegAN's networks are 2D).")
    multiple = size_multiple(filters)
    for size in input_shape[:2]:
        if size is not None and size % multiple:
            raise ValueError(f"{builder}: spatial size {size} in input_shape={input_shape} is not "
                             f"a multiple of {multiple} (2**{len(filters)} stride-2 layers); "
                             "crop or pad the slices, or use fewer filters.")
    return input_shape, filters


def encoder(x, filters: Sequence[int], prefix: str) -> list:
    """SegAN's encoder on a Keras tensor: one 4×4 stride-2 conv per entry of `filters`, batch
    norm on all but the first, leaky ReLU 0.2. Returns every layer's output, shallowest first
    ((B, H/2, W/2, f0), (B, H/4, W/4, f1), ...)."""
    features = []
    for level, width in enumerate(filters):
        first = level == 0
        x = keras.layers.Conv2D(width, KERNEL_SIZE, strides=2, padding="same", use_bias=first,
                                kernel_initializer=blocks.KERNEL_INITIALIZER,
                                name=f"{prefix}{level}_conv")(x)
        if not first:
            x = blocks.norm_layer("batch", f"{prefix}{level}_norm")(x)
        x = blocks.activation_layer("leaky_relu", f"{prefix}{level}_act")(x)
        features.append(x)
    return features


def _resize_conv(x, filters: int, name: str):
    """×2 bilinear resize then a 3×3 conv (`{name}_resize`, `{name}_conv`)."""
    x = blocks.LinearUpsampling(name=f"{name}_resize")(x)
    return keras.layers.Conv2D(filters, DECODER_KERNEL_SIZE, padding="same",
                               use_bias=name == "final",
                               kernel_initializer=blocks.KERNEL_INITIALIZER,
                               name=f"{name}_conv")(x)


def build_segmentor(input_shape, num_outputs: int, filters: Sequence[int] = PAPER_FILTERS,
                    name: str = "segmentor") -> keras.Model:
    """SegAN's segmentor: (B, H, W, C) -> logits (B, H, W, num_outputs), float32.

    Args:
        input_shape: (H, W, C); H and W may be None (any multiple of `size_multiple(filters)`
            at run time).
        num_outputs: output channels (regions or classes).
        filters: encoder widths, shallowest first; the decoder mirrors them.
        name: model name.

    Raises:
        ValueError: for bad filters, a non-2D input shape, a size that is not a multiple of
            `size_multiple(filters)`, or num_outputs < 1.
    """
    input_shape, filters = _check(input_shape, filters, "segan build_segmentor")
    if not isinstance(num_outputs, int) or num_outputs < 1:
        raise ValueError(f"segan build_segmentor: num_outputs={num_outputs!r} must be a "
                         "positive int.")
    inputs = keras.Input(input_shape, name="image")
    skips = encoder(inputs, filters, "enc")                  # H/2 … H/2**L
    x = skips[-1]
    for level in reversed(range(len(filters) - 1)):          # up to H/2**(level+1)
        x = _resize_conv(x, filters[level], f"dec{level}")
        x = blocks.norm_layer("batch", f"dec{level}_norm")(x)
        x = blocks.activation_layer("relu", f"dec{level}_act")(x)
        x = keras.layers.Concatenate(name=f"dec{level}_concat")([x, skips[level]])
    x = _resize_conv(x, num_outputs, "final")                # (B, H, W, num_outputs)
    logits = keras.layers.Activation("linear", dtype="float32", name="logits")(x)
    return keras.Model(inputs, logits, name=name)


def build_critic(input_shape, filters: Sequence[int] = PAPER_FILTERS,
                 name: str = "critic") -> keras.Model:
    """SegAN's critic: a masked image (B, H, W, C) -> the list of its encoder layers' outputs
    (float32), shallowest first. The masked input itself is not among them (the caller adds it).

    Raises:
        ValueError: as `build_segmentor`.
    """
    input_shape, filters = _check(input_shape, filters, "segan build_critic")
    inputs = keras.Input(input_shape, name="masked_image")
    features = [keras.layers.Activation("linear", dtype="float32", name=f"feature{level}")(f)
                for level, f in enumerate(encoder(inputs, filters, "critic"))]
    return keras.Model(inputs, features, name=name)
