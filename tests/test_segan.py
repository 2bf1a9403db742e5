"""segan: the multi-scale L1 loss (hand-computed), the networks, the variants' critics and maps,
weight clipping, the direction of each step, the U-Net comparator as `supervised` settings, and
an end-to-end launch.train run on data in the BraTS 2018 layout."""
from __future__ import annotations

import dataclasses
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfseg.data.spec import DataSpec
from tfseg.losses import segmentation as losses
from tfseg.methods import resolve_config, segan, self_training, supervised
from tfseg.networks import segan_nets

# BraTS-like regions over classes 1 necrotic, 2 oedema, 3 enhancing; three input channels.
REGIONS = DataSpec(2, 3, 4, ("background", "necrotic_core", "oedema", "enhancing"), (16, 16),
                   region_names=("whole_tumour", "tumour_core", "enhancing_tumour"),
                   region_classes=((1, 2, 3), (1, 3), (3,)), region_paint=(2, 1, 3))
CLASSES = DataSpec(2, 1, 3, ("background", "a", "b"), (16, 16))
TINY = dict(filters=(4, 8, 8, 8), batch_size=2, learning_rate=1e-3)


def _config(**changes):
    return dataclasses.replace(segan.Config(), **{**TINY, **changes})


def _batch(spec, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, spec.num_classes, (batch, *spec.example_shape)).astype(np.int32)
    images = (labels[..., None] / spec.num_classes + 0.5
              + rng.normal(0, 0.1, (batch, *spec.example_shape, spec.num_channels)))
    return {"labeled": {"image": images.astype(np.float32), "label": labels}}


# --------------------------------------------------------------------------- the loss
def test_multiscale_l1_hand_computed():
    # two examples; layer 0 (B, 2), layer 1 (B, 1, 1, 2)
    fake = [tf.constant([[1.0, 3.0], [0.0, 0.0]]), tf.constant([[[[2.0, 2.0]]], [[[1.0, -1.0]]]])]
    real = [tf.constant([[0.0, 0.0], [0.0, 4.0]]), tf.constant([[[[0.0, 2.0]]], [[[1.0, 1.0]]]])]
    # per layer, mean |fake - real|: example 0: 2 and 1; example 1: 2 and 1 -> means 1.5, 1.5
    value = segan.multiscale_l1(fake, real).numpy()
    np.testing.assert_allclose(value, [(2.0 + 1.0) / 2, (2.0 + 1.0) / 2], rtol=1e-6)
    fake[1] = tf.constant([[[[2.0, 2.0]]], [[[1.0, 5.0]]]])   # example 1, layer 1: 2 -> 2.0
    np.testing.assert_allclose(segan.multiscale_l1(fake, real).numpy(), [1.5, 2.0], rtol=1e-6)
    with pytest.raises(ValueError, match="same non-zero number"):
        segan.multiscale_l1(fake, real[:1])


def test_adversarial_loss_is_the_mean_over_critics_of_multiscale_l1():
    method = segan.build(_config(variant="S3-3C"), REGIONS)
    data = _batch(REGIONS)
    images = tf.constant(data["labeled"]["image"])
    real = method.label_maps(method.targets(data["labeled"]["label"]))
    fake = tf.random.stateless_uniform(real.shape, (1, 2))
    expected = []
    for m, critic in enumerate(method.critics):
        x_fake, x_real = images * fake[..., m:m + 1], images * real[..., m:m + 1]
        features = critic(tf.concat([x_fake, x_real], 0), training=True)
        per_layer = [np.abs(x_fake - x_real).mean(axis=(1, 2, 3))]
        per_layer += [np.abs(f[:2] - f[2:]).mean(axis=(1, 2, 3)) for f in features]
        expected.append(np.mean(per_layer, axis=0))
    np.testing.assert_allclose(method.adversarial_loss(images, fake, real).numpy(),
                               np.mean(expected, axis=0), rtol=1e-5)
    # a prediction equal to the ground truth gives 0
    np.testing.assert_allclose(method.adversarial_loss(images, real, real).numpy(), [0, 0],
                               atol=1e-7)


# --------------------------------------------------------------------------- networks
def test_segmentor_shapes_layers_and_gradient_flow():
    net = segan_nets.build_segmentor((None, None, 3), 3, (4, 8, 16, 32))
    x = tf.random.normal((2, 32, 48, 3))
    with tf.GradientTape() as tape:
        logits = net(x, training=True)
        loss = tf.reduce_sum(logits)
    assert tuple(logits.shape) == (2, 32, 48, 3) and logits.dtype == tf.float32
    grads = tape.gradient(loss, net.trainable_variables)
    assert all(g is not None and float(tf.reduce_sum(tf.abs(g))) > 0 for g in grads)
    convs = [net.get_layer(f"enc{level}_conv") for level in range(4)]
    assert [(c.filters, c.kernel_size, c.strides) for c in convs] == [
        (f, (4, 4), (2, 2)) for f in (4, 8, 16, 32)]
    names = {layer.name for layer in net.layers}
    assert "enc0_norm" not in names and {"enc1_norm", "enc2_norm", "enc3_norm"} <= names
    assert isinstance(net.get_layer("enc0_act"), keras.layers.LeakyReLU)
    assert net.get_layer("dec0_conv").kernel_size == (3, 3)
    # skip connections: the decoder at H/8 concatenates the encoder feature of that size
    assert [tuple(t.shape[1:]) for t in net.get_layer("dec2_concat").input] == [
        (None, None, 16), (None, None, 16)]
    assert segan_nets.size_multiple((4, 8, 16, 32)) == 16
    with pytest.raises(ValueError, match="not a multiple of 16"):
        segan_nets.build_segmentor((40, 40, 3), 3, (4, 8, 16, 32))


def test_critic_returns_every_layer():
    critic = segan_nets.build_critic((None, None, 6), (4, 8, 16, 32))
    features = critic(tf.zeros((2, 32, 32, 6)), training=False)
    assert [tuple(f.shape) for f in features] == [
        (2, 16, 16, 4), (2, 8, 8, 8), (2, 4, 4, 16), (2, 2, 2, 32)]


# --------------------------------------------------------------------------- variants
@pytest.mark.parametrize("variant, critics, channels, maps", [
    ("S1-1C", 1, 3, 1), ("S3-1C", 1, 9, 3), ("S3-3C", 3, 3, 3)])
def test_variants_build_their_critics(variant, critics, channels, maps):
    method = segan.build(_config(variant=variant), REGIONS)
    assert len(method.critics) == critics and method.num_maps == maps
    assert all(c.input_shape[-1] == channels for c in method.critics)
    method.compile()
    assert method.optimizer_networks["critic_optimizer"] == tuple(method.critics)
    assert method.optimizer_networks["seg_optimizer"] == (method.segmentor,)


def test_map_matrices_select_what_the_variants_claim():
    # S1-1C on BraTS regions: the whole tumour (the union of the others), or a named region
    np.testing.assert_array_equal(segan.map_matrix(_config(variant="S1-1C"), REGIONS),
                                  [[1], [0], [0]])
    np.testing.assert_array_equal(
        segan.map_matrix(_config(variant="S1-1C", s1_map="tumour_core"), REGIONS),
        [[0], [1], [0]])
    np.testing.assert_array_equal(segan.map_matrix(_config(variant="S3-1C"), REGIONS),
                                  np.eye(3))
    # classes: the union is 1 - p(background); S3 maps are the foreground classes
    np.testing.assert_array_equal(segan.map_matrix(_config(variant="S1-1C"), CLASSES),
                                  [[0], [1], [1]])
    np.testing.assert_array_equal(segan.map_matrix(_config(variant="S3-3C"), CLASSES),
                                  [[0, 0], [1, 0], [0, 1]])
    method = segan.build(_config(variant="S1-1C"), CLASSES)
    probs = tf.constant([[[[0.7, 0.2, 0.1]]]])
    np.testing.assert_allclose(method.label_maps(probs).numpy(), [[[[0.3]]]], rtol=1e-6)
    with pytest.raises(ValueError, match=r"s1_map='oedema'.*whole_tumour"):
        segan.map_matrix(_config(variant="S1-1C", s1_map="oedema"), REGIONS)
    disjoint = dataclasses.replace(REGIONS, region_classes=((1,), (2,), (3,)),
                                   region_paint=(1, 2, 3))
    with pytest.raises(ValueError, match="set --set=s1_map=<region name>"):
        segan.map_matrix(_config(variant="S1-1C"), disjoint)


@pytest.mark.parametrize("variant", segan.VARIANTS)
@pytest.mark.parametrize("clip", [0.01, 0.05])
def test_critic_weights_stay_clipped_after_a_step(variant, clip):
    method = segan.build(_config(variant=variant, clip_value=clip), REGIONS)
    method.compile()
    segmentor_before = [w.numpy().copy() for w in method.segmentor.trainable_weights]
    logs = method.train_step(_batch(REGIONS))
    assert all(np.isfinite(float(v)) for v in logs.values())
    for critic in method.critics:
        for weight in critic.trainable_weights:
            assert np.max(np.abs(weight.numpy())) <= clip + 1e-8, weight.path
    # the He-initialised kernels exceeded c, so the clip is what bounds them
    assert any(np.max(np.abs(w.numpy())) == pytest.approx(clip)
               for c in method.critics for w in c.trainable_weights)
    assert any(not np.array_equal(b, w.numpy())
               for b, w in zip(segmentor_before, method.segmentor.trainable_weights))


def test_critic_step_raises_the_loss_and_segmentor_step_lowers_it():
    method = segan.build(_config(variant="S3-1C", clip_value=10.0, learning_rate=1e-3), REGIONS)
    method.compile()
    data = _batch(REGIONS)
    images = tf.constant(data["labeled"]["image"])
    real = method.label_maps(method.targets(data["labeled"]["label"]))
    fake = method.label_maps(tf.sigmoid(method.segmentor(images, training=True)))
    before = float(tf.reduce_mean(method.adversarial_loss(images, fake, real)))
    terms = method.critic_step(images, fake, real)
    after = float(tf.reduce_mean(method.adversarial_loss(images, fake, real)))
    assert float(terms["critic_ms_l1"]) == pytest.approx(before, rel=1e-5) and after > before
    # a train step: its tracked ms_l1 is L against the updated critic; the segmentor's update
    # then lowers L for the same (now fixed) critic
    logs = method.train_step(data)
    critic_weights = [w.numpy().copy() for c in method.critics for w in c.trainable_weights]
    fake = method.label_maps(tf.sigmoid(method.segmentor(images, training=True)))
    lowered = float(tf.reduce_mean(method.adversarial_loss(images, fake, real)))
    assert lowered < float(logs["ms_l1"])
    assert all(np.array_equal(a, w.numpy()) for a, w in zip(
        critic_weights, [w for c in method.critics for w in c.trainable_weights]))


def test_dice_weight_adds_the_soft_dice_and_the_step_is_traced_once():
    method = segan.build(_config(dice_weight=0.5, learning_rate=1e-9), REGIONS)
    method.compile()
    data = _batch(REGIONS)
    traces = []
    step = method.train_step
    method.train_step = lambda d: traces.append(1) or step(d)
    dataset = tf.data.Dataset.from_tensors(data).repeat()
    history = method.fit(dataset, steps_per_epoch=1, epochs=2, verbose=0).history
    h = {k: v[-1] for k, v in history.items()}
    assert h["loss"] == pytest.approx(h["ms_l1"] + 0.5 * h["dice_loss"], rel=1e-5)
    assert 0.0 < h["dice_loss"] < 1.0
    assert set(h) == set(method.loss_names) and len(traces) == 1


@pytest.mark.parametrize("changes, message", [
    ({"variant": "S2-2C"}, r"variant='S2-2C'; choose one of \['S1-1C', 'S3-1C', 'S3-3C'\]"),
    ({"clip_value": 0.0}, "clip_value must be > 0"),
    ({"dice_weight": -1.0}, "dice_weight must be >= 0"),
    ({"learning_rate": 0.0}, "learning_rate and critic_learning_rate must be > 0"),
    ({"batch_size": 0}, "batch_size must be >= 1"),
    ({"filters": (4, 8, 8, 8, 8)}, r"not multiples of 32"),
])
def test_bad_settings_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        segan.resolve(_config(**changes), REGIONS)


def test_3d_data_is_refused():
    spec = DataSpec(3, 1, 2, ("background", "fg"), (16, 16, 16))
    with pytest.raises(ValueError, match="segan is a 2D method"):
        segan.build(_config(), spec)


def test_presets_resolve():
    paper = segan.resolve(resolve_config(segan, "paper"), REGIONS)
    assert (paper.variant, paper.filters, paper.critic_filters, paper.clip_value,
            paper.learning_rate, paper.critic_learning_rate, paper.batch_size,
            paper.dice_weight) == ("S3-3C", (64, 128, 256, 512), (64, 128, 256, 512), 0.01,
                                   2e-5, 2e-5, 64, 0.0)
    quick = resolve_config(segan, "quick", ["variant=S1-1C", "clip_value=0.05"])
    assert quick.variant == "S1-1C" and quick.clip_value == 0.05


# --------------------------------------------------------------------------- U-Net comparator
def test_supervised_network_segan_is_the_comparator():
    config = supervised.resolve(supervised.Config(network="segan"), REGIONS)
    assert config.filters == (64, 128, 256, 512) and config.loss == "ce"  # per-region BCE
    method = supervised.build(dataclasses.replace(
        config, filters=(4, 8, 8, 8), batch_size=2), REGIONS)
    assert method.size_multiple == 16
    assert method.segmentor.get_layer("enc0_conv").kernel_size == (4, 4)
    reference = segan_nets.build_segmentor((None, None, 3), 3, (4, 8, 8, 8))
    assert method.segmentor.count_params() == reference.count_params()
    predictor = supervised.build_predictor(
        supervised.Config(network="segan", filters=(4, 8, 8, 8)), REGIONS)
    assert predictor.count_params() == reference.count_params()
    method.compile()
    logs = method.train_step(_batch(REGIONS))
    targets = method.targets(_batch(REGIONS)["labeled"]["label"])
    assert np.isfinite(float(logs["loss"])) and targets.shape[-1] == 3
    # the default (U-Net) is unchanged
    assert supervised.build_segmentor(supervised.Config(filters=(4, 8)), REGIONS).get_layer(
        "enc0_a_conv").kernel_size == (3, 3)


def test_network_segan_refused_where_it_does_not_apply():
    with pytest.raises(ValueError, match=r"network='vnet'; choose one of \['unet', 'segan'\]"):
        supervised.resolve(supervised.Config(network="vnet"), REGIONS)
    with pytest.raises(ValueError, match="network=segan is a setting of --method=supervised"):
        supervised.resolve(supervised.Config(network="segan"),
                           DataSpec(3, 1, 2, ("background", "fg"), (16, 16, 16)))
    with pytest.raises(ValueError, match="network=segan is a setting of --method=supervised"):
        self_training.resolve(self_training.Config(network="segan"), REGIONS)


# --------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("method, sets", [
    ("segan", ["variant=S3-3C", "filters=4,8,8,8", "batch_size=4"]),
    ("supervised", ["network=segan", "filters=4,8,8,8", "batch_size=4", "augment=none"]),
])
def test_launch_train_on_brats_layout_then_load_run(tmp_path, method, sets):
    from launch import train as train_cli
    from test_regions import write_brats2018
    from tfseg.run import load_run

    data = str(tmp_path / "MICCAI_BraTS_2018_Data_Training")
    write_brats2018(data, num_hgg=4, num_lgg_unlabeled=0, shape_zyx=(3, 32, 32))
    run = str(tmp_path / "run")
    argv = ["launch.train", f"--method={method}", "--dataset=brats", f"--data_dir={data}",
            "--dataset_option=modalities=t1ce,t2,flair", f"--records_root={tmp_path / 'rec'}",
            f"--run_dir={run}", "--labeled=2", "--num_val=1", "--num_test=1", "--steps=4",
            "--validation_every=2", "--non4", "--noexport"] + [f"--set={s}" for s in sets]
    assert train_cli.main(argv) == 0
    with open(os.path.join(run, "summary.json")) as f:
        summary = json.load(f)
    assert list(summary["classes"]) == ["whole_tumour", "tumour_core", "enhancing_tumour"]
    for stats in summary["classes"].values():
        assert {"dice", "precision", "recall"} <= set(stats)
    with open(os.path.join(run, "train_log.csv")) as f:
        header = f.readline().strip().split(",")
    assert "val_dice_enhancing_tumour" in header
    if method == "segan":
        assert {"ms_l1", "critic_ms_l1", "critic_grad_norm"} <= set(header)
    info = load_run(run)                 # rebuilds the predictor from the run's config
    assert info.data_spec.num_channels == 3 and info.size_multiple == 16
    assert info.predictor.get_layer("segmentor").get_layer("enc0_conv").kernel_size == (4, 4)


def test_segan_on_the_paper_protocol_trains_on_160_crops_and_scores_whole_volumes(tmp_path):
    """--dataset_option=protocol=segan: T1c/T2/FLAIR at 1 mm, 180 x 180 centre crop, random
    160 x 160 training crops; evaluation predicts whole volumes on the original grid."""
    from launch import train as train_cli
    from test_regions import write_brats2018

    data = str(tmp_path / "MICCAI_BraTS_2018_Data_Training")
    write_brats2018(data, num_hgg=4, num_lgg_unlabeled=0, shape_zyx=(3, 40, 48))
    run = str(tmp_path / "run")
    argv = ["launch.train", "--method=segan", "--dataset=brats", f"--data_dir={data}",
            "--dataset_option=protocol=segan", f"--records_root={tmp_path / 'rec'}",
            f"--run_dir={run}", "--labeled=2", "--num_val=1", "--num_test=1", "--steps=2",
            "--validation_every=2", "--non4", "--noexport", "--set=filters=4,8,8,8",
            "--set=batch_size=2"]
    assert train_cli.main(argv) == 0
    with open(os.path.join(run, "config.json")) as f:
        config = json.load(f)
    assert config["data_spec"]["example_shape"] == [160, 160]
    assert config["data_spec"]["num_channels"] == 3          # t1ce, t2, flair
    with open(os.path.join(run, "summary.json")) as f:
        summary = json.load(f)
    assert summary["num_subjects"] == 1
    assert {"dice", "precision", "recall"} <= set(summary["classes"]["tumour_core"])
    subject = summary["subjects"]
    assert len(subject) == 1
    import SimpleITK as sitk

    name = next(iter(subject))
    written = sitk.ReadImage(os.path.join(run, "predictions", f"{name}_seg.nii.gz"))
    assert written.GetSize() == (48, 40, 3)                   # the original grid (x, y, z)
