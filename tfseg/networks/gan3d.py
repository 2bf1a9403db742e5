"""3D generator and bad-GAN encoder of the few-shot 3D GAN (Mondal, Dolz & Desrosiers, "Few-shot
3D multi-modal medical image segmentation using generative adversarial learning", 2018).

- Generator (3D-GAN style, Wu et al. 2016): z ∈ U(−1, 1)^200 → dense → (S/16)³×512 → batch norm +
  ReLU → transposed convs k2 s2 to 256, 128, 64 channels (batch norm + ReLU each) → weight-
  normalised transposed conv k2 s2 to C channels → tanh → affine map onto `output_range`. For the
  paper's 32³ patches the dense layer gives 2³×512 and the path is 4³×256, 8³×128, 16³×64, 32³×C.
  The output size follows the training patch: the dense layer's grid is the patch shape divided
  by 2**len(filters), which must be exact.
- Encoder (bad GAN, Dai et al. 2017): three 5³ stride-2 convs 128/256/512 + batch norm + ReLU →
  flatten → dense to (μ, log σ) of z, log σ bounded to `log_sigma_range` by a scaled sigmoid (so the
  Gaussian NLL stays finite and its gradient never vanishes at a hard clip).

Layer names: generator "z", "gen_dense", "gen_dense_norm", "gen_dense_act", "gen_reshape",
"gen_up{i}" (+ "_norm", "_act"), "gen_out" (the weight-normalised transposed conv), "gen_tanh",
output "generated"; encoder "enc_conv{i}" (+ "_norm", "_act"), "enc_flatten", "enc_dense",
outputs "mu" and "log_sigma".
"""
from __future__ import annotations

from typing import Sequence

import keras

from tfseg.layers.weight_norm import WeightNormConvTranspose

PAPER_GENERATOR_FILTERS = (512, 256, 128, 64)
PAPER_ENCODER_FILTERS = (128, 256, 512)
PAPER_LATENT_DIM = 200


def _check_positive_int(value, name: str, builder: str) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{builder}: {name}={value!r} must be a positive int.")


def _check_range(pair: Sequence[float], name: str, builder: str) -> tuple[float, float]:
    """(low, high) as floats; ValueError unless low < high."""
    low, high = (float(v) for v in pair)
    if not low < high:
        raise ValueError(f"{builder}: {name}={pair} must be (low, high) with low < high.")
    return low, high


def _check_filters(filters: Sequence[int], name: str) -> tuple[int, ...]:
    filters = tuple(filters)
    if not filters or any(not isinstance(f, int) or f < 1 for f in filters):
        raise ValueError(f"{name}={filters!r}: expected a non-empty sequence of positive ints.")
    return filters


def generator_size_multiple(filters: Sequence[int]) -> int:
    """Every spatial size of the generated patch must be a multiple of 2**len(filters)."""
    return 2 ** len(tuple(filters))


def build_generator(output_shape: Sequence[int], num_channels: int,
                    latent_dim: int = PAPER_LATENT_DIM,
                    filters: Sequence[int] = PAPER_GENERATOR_FILTERS,
                    output_range: tuple[float, float] = (-1.0, 1.0),
                    name: str = "generator") -> keras.Model:
    """Builds the 3D generator z (B, latent_dim) -> patch (B, D, H, W, C) float32.

    Args:
      output_shape: the generated patch's spatial shape (D, H, W), e.g. the training patch
        `data_spec.example_shape`; each size a multiple of 2**len(filters).
      num_channels: C, the number of modalities.
      latent_dim: size of z.
      filters: channels of the dense grid and of every up-sampling level but the last (which
        outputs C); the paper's (512, 256, 128, 64).
      output_range: (low, high): tanh's [−1, 1] is mapped affinely onto it, so generated
        intensities cover the range of the normalised data.

    Returns:
      A functional keras.Model named `name`.

    Raises:
      ValueError: for a bad shape, channel count, latent size, filters or range.
    """
    filters = _check_filters(filters, "generator filters")
    output_shape = tuple(output_shape)
    multiple = generator_size_multiple(filters)
    if len(output_shape) != 3 or any(not isinstance(s, int) or s < multiple or s % multiple
                                     for s in output_shape):
        raise ValueError(f"build_generator: output_shape={output_shape} must be three sizes, each "
                         f"a multiple of {multiple} (2**{len(filters)} for {len(filters)} "
                         "generator levels); use a patch size such as 32 or fewer generator "
                         "filters.")
    _check_positive_int(num_channels, "num_channels", "build_generator")
    _check_positive_int(latent_dim, "latent_dim", "build_generator")
    low, high = _check_range(output_range, "output_range", "build_generator")
    grid = tuple(s // multiple for s in output_shape)

    z = keras.Input(shape=(latent_dim,), name="z")
    x = keras.layers.Dense(grid[0] * grid[1] * grid[2] * filters[0], use_bias=False,
                           name="gen_dense")(z)
    x = keras.layers.Reshape((*grid, filters[0]), name="gen_reshape")(x)   # (B, S/16, 512)
    x = keras.layers.BatchNormalization(name="gen_dense_norm")(x)
    x = keras.layers.ReLU(name="gen_dense_act")(x)
    for index, width in enumerate(filters[1:]):                           # ×2 per level
        x = keras.layers.Conv3DTranspose(width, 2, strides=2, padding="same", use_bias=False,
                                         name=f"gen_up{index}")(x)
        x = keras.layers.BatchNormalization(name=f"gen_up{index}_norm")(x)
        x = keras.layers.ReLU(name=f"gen_up{index}_act")(x)
    x = WeightNormConvTranspose(3, num_channels, 2, strides=2, name="gen_out")(x)  # (B, *S, C)
    x = keras.layers.Activation("tanh", dtype="float32", name="gen_tanh")(x)
    # [−1, 1] -> [low, high]
    x = keras.layers.Rescaling(scale=(high - low) / 2.0, offset=(high + low) / 2.0,
                               dtype="float32", name="generated")(x)
    return keras.Model(z, x, name=name)


def build_encoder(input_shape: Sequence[int], latent_dim: int = PAPER_LATENT_DIM,
                  filters: Sequence[int] = PAPER_ENCODER_FILTERS, kernel_size: int = 5,
                  log_sigma_range: tuple[float, float] = (-5.0, 2.0),
                  name: str = "encoder") -> keras.Model:
    """Builds the bad-GAN encoder x (B, D, H, W, C) -> [μ (B, latent), log σ (B, latent)].

    Args:
      input_shape: (D, H, W, C) of the generated patches (fully known: the encoder ends with a
        dense layer).
      latent_dim: size of z.
      filters: channels of the stride-2 convolutions (paper 128, 256, 512).
      kernel_size: their kernel size (paper 5).
      log_sigma_range: (low, high) bounds of log σ.

    Raises:
      ValueError: for an unknown or bad shape, filters, kernel size or bounds.
    """
    filters = _check_filters(filters, "encoder filters")
    input_shape = tuple(input_shape)
    if len(input_shape) != 4 or any(not isinstance(s, int) or s < 1 for s in input_shape):
        raise ValueError(f"build_encoder: input_shape={input_shape} must be four known positive "
                         "sizes (D, H, W, C).")
    _check_positive_int(kernel_size, "kernel_size", "build_encoder")
    low, high = _check_range(log_sigma_range, "log_sigma_range", "build_encoder")

    x_in = keras.Input(shape=input_shape, name="image")
    x = x_in
    for index, width in enumerate(filters):
        x = keras.layers.Conv3D(width, kernel_size, strides=2, padding="same", use_bias=False,
                                name=f"enc_conv{index}")(x)
        x = keras.layers.BatchNormalization(name=f"enc_conv{index}_norm")(x)
        x = keras.layers.ReLU(name=f"enc_conv{index}_act")(x)
    x = keras.layers.Flatten(name="enc_flatten")(x)
    x = keras.layers.Dense(2 * latent_dim, dtype="float32", name="enc_dense")(x)
    mu = keras.layers.Lambda(lambda t: t[:, :latent_dim], name="mu")(x)
    # Bounded log σ: low + (high − low)·sigmoid(raw).
    log_sigma = keras.layers.Lambda(
        lambda t: low + (high - low) * keras.ops.sigmoid(t[:, latent_dim:]),
        name="log_sigma")(x)
    return keras.Model(x_in, [mu, log_sigma], name=name)
