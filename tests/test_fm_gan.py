"""fm_gan: paper defaults, networks, the discriminator loss against hand computation, each
optimizer changing only its own networks, TensorBoard images and end-to-end CLI runs."""
from __future__ import annotations

import dataclasses
import glob
import json
import math

import numpy as np
import pytest
import tensorflow as tf

from launch import train as train_cli
from tfseg.losses import gan as gan_losses
from tfseg.methods import DataSpec, fm_gan, resolve_config, supervised
from tfseg.networks import gan3d
from test_train import tiny_split_file, write_tiny_records

BRAIN = ("background", "csf", "gm", "wm")
# Tiny networks for 16³ patches (generator: 1³ grid -> 16³ in 4 levels).
TINY = ("filters=4,8", "generator_filters=8,8,4,4", "encoder_filters=4,4,8", "latent_dim=8",
        "batch_size=2", "unlabeled_batch_size=3", "image_summaries=2")


def _spec(size=16, channels=2):
    return DataSpec(3, channels, 4, BRAIN, (size,) * 3)


def _build(*overrides, spec=None, preset=None):
    config = resolve_config(fm_gan, preset, [*TINY, *overrides])
    method = fm_gan.build(config, spec or _spec())
    method.compile()
    return method


def _batch(spec, labeled=2, unlabeled=3, seed=0):
    rng = np.random.default_rng(seed)
    shape = spec.example_shape
    labels = rng.integers(0, spec.num_classes, (labeled, *shape)).astype(np.int32)
    images = (labels[..., None] / spec.num_classes
              + rng.normal(0, 0.1, (labeled, *shape, spec.num_channels))).astype(np.float32)
    unl = rng.normal(0.3, 0.5, (unlabeled, *shape, spec.num_channels)).astype(np.float32)
    return {"labeled": {"image": tf.constant(images), "label": tf.constant(labels)},
            "unlabeled": {"image": tf.constant(unl)}}


def _snapshot(network):
    return [w.numpy().copy() for w in network.trainable_weights]


def _changed(before, network):
    return [not np.array_equal(b, w.numpy()) for b, w in zip(before, network.trainable_weights)]


# --------------------------------------------------------------------------- configuration
def test_config_defaults_are_the_papers():
    c = fm_gan.Config()
    assert c.filters == (32, 64, 128, 256) and c.norm == "weight"
    assert (c.activation, c.pooling, c.upsampling) == ("leaky_relu", "average", "transpose")
    assert (c.learning_rate, c.beta_1) == (1e-4, 0.5)
    assert (c.batch_size, c.unlabeled_batch_size) == (30, 30)
    # eqs. 4-5: the three terms summed with weight 1, plain mean cross-entropy
    assert (c.unlabeled_weight, c.fake_weight, c.vi_weight) == (1.0, 1.0, 0.01)
    assert c.class_weighting == "none" and c.class_weights is None
    # eq. 11: ||.||_2^2 = the sum of the squared differences over the feature's elements
    assert c.gan_loss == "feature_matching"
    assert (c.feature_norm, c.feature_reduction) == ("squared_l2", "sum")
    assert c.feature_layer == "bottleneck_a_act" and c.rampup_steps == 0
    assert c.latent_dim == 200 and c.generator_filters == (512, 256, 128, 64)
    assert c.encoder_filters == (128, 256, 512) and c.encoder_kernel_size == 5
    resolved = fm_gan.resolve(c, DataSpec(3, 2, 4, BRAIN, (32, 32, 32)))
    assert resolved.class_weights == (1.0, 1.0, 1.0, 1.0)
    assert fm_gan.SPATIAL_DIMS == (3,)


def test_presets_select_what_they_claim():
    spec = DataSpec(3, 2, 4, BRAIN, (32, 32, 32))
    paper = resolve_config(fm_gan, "paper")
    assert paper == fm_gan.Config()
    reference = resolve_config(fm_gan, "reference")
    changed = {f.name for f in dataclasses.fields(fm_gan.Config)
               if getattr(reference, f.name) != getattr(paper, f.name)}
    assert changed == {"unlabeled_weight", "fake_weight", "class_weighting", "feature_norm",
                       "feature_reduction"}
    assert (reference.unlabeled_weight, reference.fake_weight) == (0.5, 0.5)
    assert (reference.feature_norm, reference.feature_reduction) == ("l1", "mean")
    assert fm_gan.resolve(reference, spec).class_weights == (0.33, 1.5, 0.83, 1.33)
    # an explicit class_weights wins over class_weighting
    explicit = resolve_config(fm_gan, "reference", ["class_weights=1,2,3,4"])
    assert fm_gan.resolve(explicit, spec).class_weights == (1.0, 2.0, 3.0, 4.0)
    # quick: the paper's structure (depth, stage order, batch composition, every loss setting)
    # shrunk in widths, batch size (labeled = unlabeled = fake) and steps only
    quick = resolve_config(fm_gan, "quick")
    changed = {f.name for f in dataclasses.fields(fm_gan.Config)
               if getattr(quick, f.name) != getattr(paper, f.name)}
    assert changed <= {"filters", "generator_filters", "encoder_filters", "batch_size",
                       "unlabeled_batch_size", "steps", "validation_every"}
    assert len(quick.filters) == len(paper.filters)
    assert len(quick.generator_filters) == len(paper.generator_filters)
    assert len(quick.encoder_filters) == len(paper.encoder_filters)
    assert quick.batch_size == quick.unlabeled_batch_size


def test_segmentor_is_the_supervised_3d_unet_with_the_same_options():
    spec = _spec()
    overrides = ["filters=4,8,16"]
    gan_method = fm_gan.build(resolve_config(fm_gan, None, overrides), spec)
    sup_method = supervised.build(resolve_config(supervised, None, overrides), spec)
    assert sup_method.config.norm == gan_method.config.norm == "weight"

    def layout(model):
        return [(w.path.split("/", 1)[1], tuple(w.shape)) for w in model.segmentor.weights]

    assert layout(gan_method) == layout(sup_method)


@pytest.mark.parametrize("overrides, spec, message", [
    ((), DataSpec(2, 1, 4, BRAIN, (16, 16)), r"fm_gan works on 3D patches"),
    (("gan_loss=wgan",), None, r"gan_loss='wgan'; choose one of"),
    (("feature_norm=l3",), None, r"feature_norm='l3'"),
    (("feature_layer=nope",), None, r"feature_layer='nope' is not a layer"),
    (("generator_filters=8,8,8,8,8",), None, r"not a multiple of 32 .*generator_filters"),
    (("class_weights=1,2",), None, r"class_weights=\(1.0, 2.0\) needs one weight per class"),
    (("rampup_steps=-1",), None, r"rampup_steps must be >= 0"),
    (("class_weighting=balanced",), None, r"class_weighting='balanced'; choose one of"),
    (("feature_reduction=max",), None, r"feature_reduction='max'; choose one of"),
])
def test_bad_settings_are_named(overrides, spec, message):
    config = resolve_config(fm_gan, None, [*TINY, *overrides])
    with pytest.raises(ValueError, match=message):
        fm_gan.build(config, spec or _spec())


# --------------------------------------------------------------------------- networks
def test_paper_generator_layer_shapes_and_range():
    generator = gan3d.build_generator((32, 32, 32), 2, output_range=(-1.5, 2.0))
    shapes = {name: generator.get_layer(name).output.shape[1:]
              for name in ("gen_dense_act", "gen_up0_act", "gen_up1_act", "gen_up2_act",
                           "generated")}
    assert shapes == {"gen_dense_act": (2, 2, 2, 512), "gen_up0_act": (4, 4, 4, 256),
                      "gen_up1_act": (8, 8, 8, 128), "gen_up2_act": (16, 16, 16, 64),
                      "generated": (32, 32, 32, 2)}
    z = tf.random.uniform((2, 200), -1, 1, seed=1) * 50.0    # saturate the tanh
    out = generator(z, training=True).numpy()
    assert out.dtype == np.float32 and out.min() >= -1.5 and out.max() <= 2.0
    assert out.min() < -1.0 and out.max() > 1.0              # the affine map is applied


def test_generator_follows_the_patch_shape_and_rejects_bad_ones():
    generator = gan3d.build_generator((16, 32, 48), 3, latent_dim=4, filters=(8, 4, 4, 4))
    assert tuple(generator.output.shape) == (None, 16, 32, 48, 3)
    with pytest.raises(ValueError, match=r"output_shape=\(16, 24, 16\).*multiple of 16"):
        gan3d.build_generator((16, 24, 16), 1, filters=(8, 4, 4, 4))
    with pytest.raises(ValueError, match=r"output_range"):
        gan3d.build_generator((16, 16, 16), 1, filters=(8, 4, 4, 4), output_range=(1.0, 0.0))


def test_encoder_shapes_and_bounded_log_sigma():
    encoder = gan3d.build_encoder((32, 32, 32, 2), latent_dim=200, filters=(8, 8, 8),
                                  log_sigma_range=(-5.0, 2.0))
    assert [encoder.get_layer(f"enc_conv{i}_act").output.shape[1:4] for i in range(3)] == [
        (16, 16, 16), (8, 8, 8), (4, 4, 4)]
    assert encoder.get_layer("enc_conv0").kernel.shape[:3] == (5, 5, 5)
    mu, log_sigma = encoder(tf.random.normal((2, 32, 32, 32, 2)) * 1e4, training=True)
    assert mu.shape == log_sigma.shape == (2, 200)
    assert float(tf.reduce_min(log_sigma)) >= -5.0 and float(tf.reduce_max(log_sigma)) <= 2.0


# --------------------------------------------------------------------------- the step
@pytest.mark.parametrize("preset", ["paper", "reference"])
def test_discriminator_loss_matches_hand_computation(preset):
    method = _build(preset=preset)
    spec = method.data_spec
    data = _batch(spec)
    z = tf.random.uniform((3, 8), -1, 1, seed=3)
    fake = method.generator(z, training=True)
    images = tf.concat([data["labeled"]["image"], data["unlabeled"]["image"], fake], 0)
    logits = method.segmentor(images, training=True).numpy().astype(np.float64)
    terms = method.discriminator_step(data["labeled"]["image"], data["labeled"]["label"],
                                      data["unlabeled"]["image"], z)
    lse = np.log(np.exp(logits).sum(-1))                                     # (7, *S)
    log_softmax = logits - lse[..., None]
    labels = data["labeled"]["label"].numpy()
    class_weights = [0.33, 1.5, 0.83, 1.33] if preset == "reference" else [1.0] * 4
    w = 0.5 if preset == "reference" else 1.0
    weights = np.array(class_weights)[labels]
    ce = -np.take_along_axis(log_softmax[:2], labels[..., None], -1)[..., 0]
    labeled = np.mean(weights * ce)
    unlabeled = w * np.mean(-lse[2:5] + np.log1p(np.exp(lse[2:5])))
    fake_term = w * np.mean(np.log1p(np.exp(lse[5:])))
    assert float(terms["labeled_loss"]) == pytest.approx(labeled, rel=1e-4)
    assert float(terms["unlabeled_loss"]) == pytest.approx(unlabeled, rel=1e-4)
    assert float(terms["fake_loss"]) == pytest.approx(fake_term, rel=1e-4)
    assert float(terms["loss"]) == pytest.approx(labeled + unlabeled + fake_term, rel=1e-4)
    assert float(terms["p_fake_on_fake"]) == pytest.approx(np.mean(1 / (1 + np.exp(lse[5:]))),
                                                           rel=1e-4)


def test_paper_and_reference_weighting_on_hand_made_logits():
    """Two labeled voxels, one unlabeled and one fake voxel, K = 4 (bg, CSF, GM, WM).

    Labeled voxel 1: logits 0 -> p = 1/4 for its class (bg): CE ln 4. Voxel 2: logits
    (ln 3, 0, 0, 0), class CSF: p = 1/6, CE ln 6. Unlabeled and fake voxels: logits 0, Z = 4:
    −log p(real) = ln(5/4), −log p(fake) = ln 5.
    paper (eqs. 4-5):  (ln 4 + ln 6)/2 + ln(5/4) + ln 5
    reference:         (0.33 ln 4 + 1.5 ln 6)/2 + 0.5 ln(5/4) + 0.5 ln 5
    """
    y = tf.constant(np.eye(4, dtype=np.float32)[[0, 1]].reshape(1, 1, 1, 2, 4))
    logits_l = tf.constant(np.array([[0, 0, 0, 0], [math.log(3), 0, 0, 0]],
                                    np.float32).reshape(1, 1, 1, 2, 4))
    zeros = tf.zeros((1, 1, 1, 1, 4))
    expected = {
        "paper": ((math.log(4) + math.log(6)) / 2, math.log(5 / 4), math.log(5)),
        "reference": ((0.33 * math.log(4) + 1.5 * math.log(6)) / 2, 0.5 * math.log(5 / 4),
                      0.5 * math.log(5)),
    }
    for preset, values in expected.items():
        method = _build(preset=preset)
        terms = method.discriminator_terms(y, logits_l, zeros, zeros)
        for term, value in zip(terms, values):
            assert term.shape == (1,)
            assert float(term[0]) == pytest.approx(value, rel=1e-5), preset


def test_rampup_scales_the_unlabeled_and_fake_terms():
    method = _build("rampup_steps=4")
    spec = method.data_spec
    data = _batch(spec)
    z = tf.random.uniform((3, 8), -1, 1, seed=3)
    args = (data["labeled"]["image"], data["labeled"]["label"], data["unlabeled"]["image"], z)
    plain = _build()
    plain.segmentor.set_weights(method.segmentor.get_weights())
    plain.generator.set_weights(method.generator.get_weights())
    reference = plain.discriminator_step(*args)      # w_u, w_f unscaled, same weights
    for step, factor in ((0, np.exp(-5.0)), (2, np.exp(-1.25)), (4, 1.0), (9, 1.0)):
        method.seg_optimizer.iterations.assign(step)
        assert float(method.rampup()) == pytest.approx(factor, rel=1e-6)
        before = method.segmentor.get_weights()
        terms = method.discriminator_step(*args)
        method.segmentor.set_weights(before)
        for name in ("unlabeled_loss", "fake_loss"):
            assert float(terms[name]) == pytest.approx(factor * float(reference[name]),
                                                       rel=1e-4), (step, name)
        assert float(terms["labeled_loss"]) == pytest.approx(float(reference["labeled_loss"]),
                                                             rel=1e-4)
    assert float(plain.rampup()) == 1.0


@pytest.mark.parametrize("gan_loss", ["feature_matching", "standard", "bad"])
def test_each_optimizer_changes_only_its_own_networks(gan_loss):
    method = _build(f"gan_loss={gan_loss}")
    data = _batch(method.data_spec)
    generator_side = [method.generator] + ([method.encoder] if gan_loss == "bad" else [])
    assert method.optimizer_networks == {"seg_optimizer": (method.segmentor,),
                                         "gen_optimizer": tuple(generator_side)}
    z = tf.random.uniform((3, 8), -1, 1, seed=5)
    seg_before = _snapshot(method.segmentor)
    gen_before = [_snapshot(n) for n in generator_side]
    method.discriminator_step(data["labeled"]["image"], data["labeled"]["label"],
                              data["unlabeled"]["image"], z)
    assert any(_changed(seg_before, method.segmentor))
    for before, network in zip(gen_before, generator_side):
        assert not any(_changed(before, network)), f"D step changed {network.name}"
    seg_before = _snapshot(method.segmentor)
    terms = method.generator_step(data["unlabeled"]["image"], z)
    assert not any(_changed(seg_before, method.segmentor)), "G step changed the segmentor"
    for before, network in zip(gen_before, generator_side):
        assert any(_changed(before, network)), f"G step did not change {network.name}"
    assert np.isfinite(float(terms["gen_loss"])) and float(terms["gen_grad_norm"]) > 0
    assert int(method.seg_optimizer.iterations) == int(method.gen_optimizer.iterations) == 1


@pytest.mark.parametrize("preset, distance", [
    ("paper", lambda d: np.sum(d ** 2)),            # ||.||_2^2 (eq. 11)
    ("reference", lambda d: np.mean(np.abs(d))),    # the reference code's mean |.|
])
def test_feature_matching_generator_loss_is_the_distance_of_segmentor_features(preset, distance):
    method = _build(preset=preset)
    data = _batch(method.data_spec)
    z = tf.random.uniform((3, 8), -1, 1, seed=7)
    terms = method.generator_loss(data["unlabeled"]["image"], z)
    real = method.feature_extractor(data["unlabeled"]["image"]).numpy().astype(np.float64)
    fake = method.feature_extractor(method.generator(z, training=True)).numpy()
    assert real.shape[1:] == (8, 8, 8, 8)          # bottleneck_a_act of a 2-level U-Net on 16³
    expected = distance(real.mean(0) - fake.mean(0))
    assert float(terms["gen_loss"]) == pytest.approx(expected, rel=1e-4)


def test_bad_gan_reductions_by_hand():
    """Feature term: batch means (2, 3) and (0, 1), difference (2, 2): sum of squares 8 (paper),
    mean 4, mean |.| 2 (reference), sum |.| 4. Entropy term: z = (0, 1), μ = 0, log σ = (0, ln 2):
    per dimension ½((z−μ)/σ)² + log σ + ½ log 2π = ½ log 2π and ⅛ + ln 2 + ½ log 2π, summed over
    the latent dimensions (a log-density of the vector z), then averaged over the batch."""
    real = tf.constant([[1.0, 2.0], [3.0, 4.0]])
    fake = tf.constant([[0.0, 0.0], [0.0, 2.0]])
    assert float(gan_losses.feature_matching(real, fake, "squared_l2", "sum")) == \
        pytest.approx(8.0)
    assert float(gan_losses.feature_matching(real, fake, "squared_l2", "mean")) == \
        pytest.approx(4.0)
    assert float(gan_losses.feature_matching(real, fake, "l1", "mean")) == pytest.approx(2.0)
    assert float(gan_losses.feature_matching(real, fake, "l1", "sum")) == pytest.approx(4.0)
    assert float(gan_losses.feature_matching(real, fake, "l2", "sum")) == \
        pytest.approx(math.sqrt(8.0))
    assert float(gan_losses.feature_matching(real, fake)) == pytest.approx(4.0)  # old default
    with pytest.raises(ValueError, match=r"reduction='max'"):
        gan_losses.feature_matching(real, fake, "l1", "max")
    z = tf.constant([[0.0, 1.0], [0.0, 1.0]])
    mu = tf.zeros((2, 2))
    log_sigma = tf.constant([[0.0, math.log(2.0)]] * 2)
    nll = gan_losses.gaussian_nll(z, mu, log_sigma).numpy()
    expected = 0.125 + math.log(2.0) + math.log(2 * math.pi)
    np.testing.assert_allclose(nll, [expected, expected], rtol=1e-6)


@pytest.mark.parametrize("preset", ["paper", "reference"])
def test_bad_gan_loss_adds_the_weighted_entropy_term(preset):
    method = _build("gan_loss=bad", "vi_weight=0.5", preset=preset)
    data = _batch(method.data_spec)
    z = tf.random.uniform((3, 8), -1, 1, seed=9)
    terms = method.generator_loss(data["unlabeled"]["image"], z)
    fake = method.generator(z, training=True)
    real_features = method.feature_extractor(data["unlabeled"]["image"]).numpy()
    difference = real_features.mean(0) - method.feature_extractor(fake).numpy().mean(0)
    # paper: both terms summed (over feature elements / latent dimensions); reference: the
    # feature term averaged over its 8·8·8·8 = 4096 elements, the entropy term summed
    fm_value = (np.sum(difference ** 2) if preset == "paper"
                else np.mean(np.abs(difference)))
    mu, log_sigma = (t.numpy().astype(np.float64) for t in method.encoder(fake, training=True))
    z64 = z.numpy().astype(np.float64)
    vi = np.mean(np.sum(0.5 * ((z64 - mu) / np.exp(log_sigma)) ** 2 + log_sigma
                        + 0.5 * math.log(2 * math.pi), axis=-1))
    assert float(terms["vi_loss"]) == pytest.approx(vi, rel=1e-4)
    assert float(terms["gen_loss"]) == pytest.approx(fm_value + 0.5 * vi, rel=1e-4)


# feature_matching through fit() is covered by test_methods (quick preset) and the CLI test below.
@pytest.mark.parametrize("gan_loss", ["standard", "bad"])
def test_fit_tracks_every_term_finitely(gan_loss):
    method = _build(f"gan_loss={gan_loss}")
    element = _batch(method.data_spec)
    dataset = tf.data.Dataset.from_tensors(element).repeat()
    history = method.fit(dataset, steps_per_epoch=2, epochs=1, verbose=0).history
    expected = {"loss", "labeled_loss", "unlabeled_loss", "fake_loss", "gen_loss", "fm_distance",
                "p_fake_on_fake", "p_fake_on_unlabeled", "seg_grad_norm", "gen_grad_norm"}
    expected |= {"vi_loss"} if gan_loss == "bad" else set()
    assert set(history) == expected
    for name, values in history.items():
        assert math.isfinite(values[-1]), name
    assert 0 < history["p_fake_on_fake"][-1] < 1
    assert int(method.seg_optimizer.iterations) == int(method.gen_optimizer.iterations) == 2


def test_summary_images_and_weights_round_trip(tmp_path):
    method = _build("gan_loss=bad")
    images = method.summary_images()
    assert set(images) == {"generated"}
    assert images["generated"].shape == (2, 16, 32, 1)     # 2 patches, 2 channels side by side
    assert images["generated"].min() >= 0 and images["generated"].max() <= 1
    path = str(tmp_path / "m.weights.h5")
    method.save_weights(path)
    other = _build("gan_loss=bad")
    other.load_weights(path)
    for a, b in zip(method.generator.weights + method.encoder.weights,
                    other.generator.weights + other.encoder.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


# --------------------------------------------------------------------------- end to end
def test_cli_tiny_records_trains_validates_and_logs_generated_images(tmp_path, capsys):
    records = write_tiny_records(str(tmp_path / "records"), spatial_dims=3, size=16,
                                 dataset="synthetic_brain")
    run_dir = tmp_path / "run"
    argv = ["launch.train", "--method=fm_gan", "--dataset=synthetic_brain",
            f"--records_dir={records}", f"--split={tiny_split_file(str(tmp_path))}",
            "--steps=4", "--validation_every=2", "--summary_every=2",
            "--set=filters=4,8", "--set=generator_filters=8,4,4", "--set=latent_dim=8",
            "--set=batch_size=2", "--set=unlabeled_batch_size=2", "--set=image_summaries=1",
            "--noevaluate", "--noexport", f"--run_dir={run_dir}",
            f"--records_root={tmp_path / 'records_root'}"]
    assert train_cli.main(argv) == 0
    assert "Best validation mean Dice" in capsys.readouterr().out
    with open(run_dir / "config.json", encoding="utf-8") as f:
        config = json.load(f)
    assert config["pipeline"]["unlabeled_batch_size"] == 2
    assert config["method_config"]["gan_loss"] == "feature_matching"
    rows = open(run_dir / "train_log.csv", encoding="utf-8").read().splitlines()
    assert "fm_distance" in rows[0] and "p_fake_on_fake" in rows[0] and len(rows) == 3
    tags = set()
    for path in glob.glob(str(run_dir / "tensorboard" / "train" / "events.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            tags |= {v.tag for v in event.summary.value}
    assert {"train/generated", "train/gen_loss", "train/p_fake_on_unlabeled"} <= tags


@pytest.mark.slow
def test_synthetic_brain_end_to_end(tmp_path, capsys):
    """Generation (cached), preprocessing (N4 off), training, validation, test evaluation in the
    original geometry and export of fm_gan with the quick preset shrunk."""
    run_dir = tmp_path / "run"
    argv = ["launch.train", "--method=fm_gan", "--dataset=synthetic_brain", "--preset=quick",
            "--labeled=1", "--num_val=1", "--num_test=2", "--steps=2", "--validation_every=1",
            "--set=filters=4,8", "--set=generator_filters=8,4,4,4", "--set=batch_size=2",
            "--set=unlabeled_batch_size=2", "--non4", f"--records_root={tmp_path / 'records'}",
            f"--run_dir={run_dir}"]
    assert train_cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "Test mean Dice" in out and "over 2 subjects (csf" in out
    with open(run_dir / "summary.json", encoding="utf-8") as f:
        summary = json.load(f)
    assert summary["num_subjects"] == 2 and summary["checkpoint"] == "best_val"
    assert len(glob.glob(str(run_dir / "predictions" / "*_seg.nii.gz"))) == 2
    assert (run_dir / "export" / "synthetic_brain_fm_gan" / "1" / "saved_model.pb").is_file()
