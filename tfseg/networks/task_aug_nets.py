"""Generators and discriminators of task-driven data augmentation (Chaitanya et al.).

Chaitanya, Karani, Baumgartner, Erdil, Becker, Donati & Konukoglu, "Semi-supervised task-driven
data augmentation for medical image segmentation", Medical Image Analysis 68 (2021).

- `build_generator(kind="deformation")` = G_V(x, z): a dense deformation field v (B, H, W, 2) in
  pixels, (dy, dx) as `tfseg.layers.warp` expects;
  `build_generator(kind="intensity")` = G_I(x, z): an additive intensity field ΔI (B, H, W, 1)
  in (−1, 1) (tanh, no bias).
  Shared trunk: z ~ N(0, 1)^100 → dense → (H/32, W/32, 128) → five × (bilinear ×2, 2×2 conv,
  BN, ReLU) to (H, W, 16); image branch: two 3×3 convs of 16 (BN, ReLU); concatenation → two
  3×3 convs of 16 (BN, ReLU) → last layer (G_V: 3×3 conv to 2 channels; G_I: 1×1 conv to 1
  channel, no bias, tanh).
- `build_discriminator()` = D_V / D_I (DCGAN-like): five 5×5 stride-2 convs (16, 32, 64, 128,
  128) + BN + leaky ReLU 0.2 → dense 128 → dense 128 → 1 logit (real = unlabeled image).

Channels of the five up-sampling convs of the z branch (`z_filters`, default 128, 64, 32, 16, 16)
are not given in the paper beyond "to H×W×16"; halving from the dense layer's 128 is our choice.
Batch norm everywhere uses Keras defaults (momentum 0.99, ε 1e-3), as the segmentor. The
generators' last layer is zero-initialised (our choice; the paper does not say), so they start at
the identity transformation (v = 0, ΔI = 0).
"""
from __future__ import annotations

from typing import Sequence

import keras

GENERATOR_KINDS = ("deformation", "intensity")
SIZE_MULTIPLE = 32  # five ×2 up-samplings / five stride-2 convs


def check_size(example_shape: Sequence[int], what: str = "task_aug") -> tuple[int, int]:
    """Returns (H, W); raises a ValueError unless both are known multiples of 32.

    Raises:
      ValueError: for a non-2D shape or sizes not divisible by 32, naming the fix.
    """
    shape = tuple(example_shape)
    if len(shape) != 2:
        raise ValueError(f"{what}: the generators and discriminators are 2D; got example shape "
                         f"{shape}. Use a 2D dataset (slices).")
    if not all(isinstance(s, int) and s >= SIZE_MULTIPLE and s % SIZE_MULTIPLE == 0
               for s in shape):
        suggestion = tuple(max(1, round(s / SIZE_MULTIPLE)) * SIZE_MULTIPLE
                           if isinstance(s, int) else SIZE_MULTIPLE for s in shape)
        raise ValueError(
            f"{what}: slice size {shape} must be a multiple of {SIZE_MULTIPLE} in both axes "
            f"(the generators start from (H/32, W/32) and the discriminators halve the size five "
            f"times). Preprocess with a crop that is a multiple of {SIZE_MULTIPLE}, e.g. "
            f"{suggestion}.")
    return shape[0], shape[1]


def _conv_bn_relu(x, filters: int, kernel: int, name: str):
    x = keras.layers.Conv2D(filters, kernel, padding="same", use_bias=False,
                            name=f"{name}_conv")(x)
    x = keras.layers.BatchNormalization(name=f"{name}_norm")(x)
    return keras.layers.ReLU(name=f"{name}_act")(x)


def build_generator(example_shape: Sequence[int], num_channels: int = 1, kind: str = "deformation",
                    z_dim: int = 100, z_filters: Sequence[int] = (128, 64, 32, 16, 16),
                    filters: int = 16, name: str | None = None) -> keras.Model:
    """Builds G_V (kind="deformation") or G_I (kind="intensity").

    Args:
      example_shape: (H, W), both multiples of 32.
      num_channels: image channels C.
      kind: "deformation" (output (B, H, W, 2) flow in pixels) or "intensity" (output
        (B, H, W, 1) additive field in (−1, 1)).
      z_dim: length of the noise vector z.
      z_filters: channels of the five up-sampling convs of the z branch (the last one sets the
        branch's output channels).
      filters: channels of the image branch and of the two convs after the concatenation.
      name: model name (default "gen_v" / "gen_i").

    Returns:
      A functional keras.Model [x (B, H, W, C), z (B, z_dim)] -> field, float32.

    Raises:
      ValueError: for an unknown kind, a bad size or five z_filters not given.
    """
    if kind not in GENERATOR_KINDS:
        raise ValueError(f"build_generator: kind={kind!r}; choose one of {list(GENERATOR_KINDS)}.")
    height, width = check_size(example_shape, f"build_generator({kind})")
    if len(tuple(z_filters)) != 5:
        raise ValueError(f"build_generator: z_filters={tuple(z_filters)} must have 5 entries "
                         "(one per ×2 up-sampling from H/32 to H).")
    name = name or ("gen_v" if kind == "deformation" else "gen_i")
    image = keras.Input((height, width, num_channels), name="image")
    z = keras.Input((z_dim,), name="z")

    # 1. noise branch: z -> (H/32, W/32, 128) -> five ×2 up-samplings -> (H, W, z_filters[-1])
    h0, w0 = height // SIZE_MULTIPLE, width // SIZE_MULTIPLE
    n = keras.layers.Dense(h0 * w0 * 128, name="z_dense")(z)
    n = keras.layers.Reshape((h0, w0, 128), name="z_reshape")(n)
    for level, f in enumerate(z_filters):
        n = keras.layers.UpSampling2D(2, interpolation="bilinear", name=f"z_up{level}")(n)
        n = _conv_bn_relu(n, int(f), 2, f"z_up{level}")
    # 2. image branch: two 3×3 convs
    x = _conv_bn_relu(image, filters, 3, "image_a")
    x = _conv_bn_relu(x, filters, 3, "image_b")
    # 3. joint trunk
    h = keras.layers.Concatenate(name="concat")([n, x])
    h = _conv_bn_relu(h, filters, 3, "joint_a")
    h = _conv_bn_relu(h, filters, 3, "joint_b")
    # 4. output
    # Zero-initialised last layer: the generator starts at the identity transformation (v = 0,
    # ΔI = 0) and grows from there; a random last layer starts at ~0.5 px / ΔI ~0.5 noise,
    # which in a short schedule wrecks the segmentor's batch statistics before the adversary
    # has learned anything. Gradients still reach the layer (its input is non-zero).
    if kind == "deformation":
        out = keras.layers.Conv2D(2, 3, padding="same", kernel_initializer="zeros",
                                  name="flow")(h)                                   # (B,H,W,2)
    else:
        out = keras.layers.Conv2D(1, 1, use_bias=False, activation="tanh",
                                  kernel_initializer="zeros", name="delta_i")(h)    # (B,H,W,1)
    out = keras.layers.Activation("linear", dtype="float32", name="field")(out)
    return keras.Model([image, z], out, name=name)


def build_discriminator(example_shape: Sequence[int], num_channels: int = 1,
                        filters: Sequence[int] = (16, 32, 64, 128, 128), dense_units: int = 128,
                        name: str = "disc") -> keras.Model:
    """Builds a DCGAN-like discriminator returning one real/fake logit per image.

    Args:
      example_shape: (H, W), both multiples of 32.
      num_channels: image channels C.
      filters: channels of the five 5×5 stride-2 convs.
      dense_units: units of the two dense layers before the logit.
      name: model name.

    Returns:
      A functional keras.Model (B, H, W, C) -> (B, 1) float32 logits.
    """
    height, width = check_size(example_shape, "build_discriminator")
    if len(tuple(filters)) != 5:
        raise ValueError(f"build_discriminator: filters={tuple(filters)} must have 5 entries.")
    image = keras.Input((height, width, num_channels), name="image")
    x = image
    for level, f in enumerate(filters):
        x = keras.layers.Conv2D(int(f), 5, strides=2, padding="same", use_bias=False,
                                name=f"conv{level}")(x)
        x = keras.layers.BatchNormalization(name=f"conv{level}_norm")(x)
        x = keras.layers.LeakyReLU(0.2, name=f"conv{level}_act")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    for level in range(2):
        x = keras.layers.Dense(dense_units, name=f"dense{level}")(x)
        x = keras.layers.LeakyReLU(0.2, name=f"dense{level}_act")(x)
    logit = keras.layers.Dense(1, name="logit_dense")(x)
    logit = keras.layers.Activation("linear", dtype="float32", name="logit")(logit)
    return keras.Model(image, logit, name=name)
