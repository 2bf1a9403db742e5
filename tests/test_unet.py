"""Tests of tfseg.networks: U-Net shapes, options, dtypes, names, parameter counts, saving."""
import dataclasses

import numpy as np
import pytest
import keras
import tensorflow as tf
from scipy import ndimage

from tfseg.layers import WeightNormConv, WeightNormConvTranspose
from tfseg.networks import (PAPER_UNET_2D, PAPER_UNET_3D, LinearUpsampling, UNetConfig,
                            build_unet, size_multiple)

TINY = UNetConfig(filters=(4, 8, 8))          # 3 levels: sizes must be multiples of 4


@pytest.fixture
def bf16_policy():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy("float32")


OPTION_VARIANTS = [
    {},
    {"norm": "instance"},
    {"norm": "weight", "activation": "leaky_relu"},
    {"norm": "none"},
    {"pooling": "average"},
    {"upsampling": "transpose"},
    {"upsampling": "transpose", "norm": "weight"},
    {"upsampling_kernel_size": 3, "final_kernel_size": 3},
]


@pytest.mark.parametrize("options", OPTION_VARIANTS, ids=lambda o: ",".join(o) or "default")
@pytest.mark.parametrize("input_shape", [(8, 12, 2), (8, 4, 8, 1)], ids=["2d", "3d"])
def test_output_shape_for_every_option(input_shape, options):
    config = dataclasses.replace(TINY, **options)
    model = build_unet(input_shape, 3, config)
    x = np.random.default_rng(0).normal(size=(2,) + input_shape).astype("float32")
    logits = model(x, training=False)
    assert logits.shape == (2,) + input_shape[:-1] + (3,)
    assert logits.dtype == "float32"
    assert np.all(np.isfinite(logits))


def test_norm_option_selects_the_layers():
    names = lambda m: {type(layer).__name__ for layer in m.layers}
    batch = build_unet((8, 8, 1), 2, TINY)
    assert "BatchNormalization" in names(batch) and "WeightNormConv" not in names(batch)
    bn = batch.get_layer("enc0_a_norm")
    assert (bn.momentum, bn.epsilon) == (0.99, 1e-3)
    assert not batch.get_layer("enc0_a_conv").use_bias          # BN supplies the shift
    instance = build_unet((8, 8, 1), 2, dataclasses.replace(TINY, norm="instance"))
    assert instance.get_layer("enc0_a_norm").groups == 4     # groups=-1 -> one per channel
    weight = build_unet((8, 8, 8, 1), 2, PAPER_UNET_3D)
    assert not {"BatchNormalization", "GroupNormalization"} & names(weight)
    assert isinstance(weight.get_layer("enc0_a_conv"), WeightNormConv)
    assert isinstance(weight.get_layer("dec0_up_conv"), WeightNormConvTranspose)
    assert isinstance(weight.get_layer("final_conv"), WeightNormConv)
    assert weight.get_layer("final_conv").kernel_size == (3, 3, 3)
    assert weight.get_layer("enc0_a_act").negative_slope == pytest.approx(0.2)
    assert type(weight.get_layer("pool0")).__name__ == "AveragePooling3D"
    assert build_unet((8, 8, 1), 2, TINY).get_layer("final_conv").kernel_size == (1, 1)


def test_named_intermediate_layers():
    model = build_unet((16, 16, 1), 2, TINY)
    # (name, spatial size, channels) of the documented taps; 3 levels -> 2 poolings.
    expected = [("enc0", 16, 4), ("enc1", 8, 8), ("bottleneck_a_act", 4, 8),
                ("bottleneck", 4, 8), ("dec1_up_act", 8, 8), ("dec1_concat", 8, 16),
                ("dec1", 8, 8), ("dec0", 16, 4), ("logits", 16, 2)]
    for name, size, channels in expected:
        assert model.get_layer(name).output.shape == (None, size, size, channels), name
    tap = keras.Model(model.input, model.get_layer("bottleneck").output)
    assert tap(np.zeros((1, 16, 16, 1), "float32")).shape == (1, 4, 4, 8)


def test_logits_are_float32_under_mixed_bfloat16(bf16_policy):
    for input_shape, config in [((8, 8, 1), TINY),
                                ((8, 8, 8, 2), dataclasses.replace(PAPER_UNET_3D,
                                                                   filters=(4, 8, 8)))]:
        model = build_unet(input_shape, 3, config)
        assert model.get_layer("dec0").output.dtype == "bfloat16"
        logits = model(np.ones((1,) + input_shape, "float32"))
        assert logits.dtype == "float32"


def test_dynamic_spatial_sizes_at_multiples_of_size_multiple():
    assert size_multiple(TINY) == 4
    assert size_multiple(PAPER_UNET_2D) == 16 and size_multiple(PAPER_UNET_3D) == 8
    model = build_unet((None, None, 1), 2, TINY)
    predict = tf.function(model, input_signature=[tf.TensorSpec((None, None, None, 1))])
    for shape in [(1, 8, 12, 1), (2, 20, 4, 1)]:
        assert predict(np.zeros(shape, "float32")).shape == shape[:-1] + (2,)
    model_3d = build_unet((None, None, None, 1), 2,
                          dataclasses.replace(TINY, upsampling="bilinear", norm="weight"))
    assert model_3d(np.zeros((1, 4, 8, 12, 1), "float32")).shape == (1, 4, 8, 12, 2)


def test_invalid_inputs_are_rejected():
    with pytest.raises(ValueError, match="not a multiple of 4"):
        build_unet((10, 8, 1), 2, TINY)
    with pytest.raises(ValueError, match="must be \\(H, W, C\\) or \\(D, H, W, C\\)"):
        build_unet((8, 1), 2, TINY)
    with pytest.raises(ValueError, match="channel count"):
        build_unet((8, 8, None), 2, TINY)
    with pytest.raises(ValueError, match="num_classes"):
        build_unet((8, 8, 1), 0, TINY)
    with pytest.raises(ValueError, match="UNetConfig.norm='layer'"):
        UNetConfig(norm="layer")
    with pytest.raises(ValueError, match="UNetConfig.filters"):
        UNetConfig(filters=())
    assert UNetConfig(filters=[4, 8]).filters == (4, 8)          # stored as a tuple (hashable)


def test_paper_2d_parameter_count():
    """Hand count of PAPER_UNET_2D with 1 input channel and 4 classes (ACDC).

    BN layers hold 4 numbers per channel (γ, β, moving mean, moving variance); convs before BN
    have no bias. Encoder level (c_in -> f): 9·c_in·f + 4f + 9·f·f + 4f. Decoder level l:
    2×2 conv after bilinear ×2: 4·f_{l+1}·f_l + 4f_l; two 3×3 convs on the concatenation:
    9·2f_l·f_l + 4f_l + 9·f_l·f_l + 4f_l. Final 1×1 conv: f_0·K + K.
    """
    filters, channels, classes = (16, 32, 64, 128, 256), 1, 4
    expected = 0
    c_in = channels
    for f in filters:
        expected += 9 * c_in * f + 4 * f + 9 * f * f + 4 * f
        c_in = f
    for lower, upper in zip(filters[:-1], filters[1:]):
        expected += 4 * upper * lower + 4 * lower
        expected += 9 * 2 * lower * lower + 4 * lower + 9 * lower * lower + 4 * lower
    expected += filters[0] * classes + classes
    model = build_unet((224, 224, channels), classes, PAPER_UNET_2D)
    print(f"PAPER_UNET_2D (1 channel, 4 classes): {model.count_params():,} parameters")
    assert expected == 1_946_004
    assert model.count_params() == expected


def test_paper_3d_parameter_count():
    """PAPER_UNET_3D with 2 modalities and 4 classes: weight-normalised convs hold v, g, bias.

    3×3×3 conv c_in -> f: 27·c_in·f + 2f. Transposed k2 conv f_{l+1} -> f_l: 8·f_{l+1}·f_l +
    2f_l. Final 3×3×3 conv to K: 27·f_0·K + 2K.
    """
    filters, channels, classes = (32, 64, 128, 256), 2, 4
    expected = 0
    c_in = channels
    for f in filters:
        expected += 27 * c_in * f + 2 * f + 27 * f * f + 2 * f
        c_in = f
    for lower, upper in zip(filters[:-1], filters[1:]):
        expected += 8 * upper * lower + 2 * lower
        expected += 27 * 2 * lower * lower + 2 * lower + 27 * lower * lower + 2 * lower
    expected += 27 * filters[0] * classes + 2 * classes
    model = build_unet((32, 32, 32, channels), classes, PAPER_UNET_3D)
    print(f"PAPER_UNET_3D (2 channels, 4 classes): {model.count_params():,} parameters")
    assert model.count_params() == expected


def test_linear_upsampling_matches_bilinear_resize_in_2d():
    x = np.random.default_rng(1).normal(size=(2, 5, 7, 3)).astype("float32")
    expected = keras.layers.UpSampling2D(2, interpolation="bilinear")(x)
    np.testing.assert_allclose(LinearUpsampling()(x), expected, atol=1e-6)


def test_linear_upsampling_is_trilinear_in_3d():
    x = np.random.default_rng(2).normal(size=(1, 3, 4, 5, 2)).astype("float32")
    out = LinearUpsampling()(x).numpy()
    assert out.shape == (1, 6, 8, 10, 2)
    # Output voxel j sits at input coordinate (j + 0.5)/2 − 0.5 (half-pixel centres), clamped.
    coords = np.meshgrid(*[(np.arange(2 * n) + 0.5) / 2 - 0.5 for n in x.shape[1:4]],
                         indexing="ij")
    for c in range(2):
        expected = ndimage.map_coordinates(x[0, ..., c], coords, order=1, mode="nearest")
        np.testing.assert_allclose(out[0, ..., c], expected, atol=1e-5)


def test_keras_file_round_trip_of_a_3d_weight_norm_unet(tmp_path):
    config = dataclasses.replace(PAPER_UNET_3D, filters=(4, 8), upsampling="bilinear")
    model = build_unet((None, None, None, 2), 3, config)
    x = np.random.default_rng(3).normal(size=(1, 4, 4, 8, 2)).astype("float32")
    for variable in model.weights:                 # move g, bias away from their initial values
        variable.assign(variable + 0.1)
    path = tmp_path / "unet3d.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(model(x), loaded(x))
