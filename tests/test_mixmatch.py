"""mixmatch: sharpening, the MixUp λ rule, mixing and the loss against hand-computed values; the
label guess's spatial inversion; the train step (ramp-up, which batch is the unlabeled one with
and without adaptation); settings errors; `--adapt` on the command line; and a two-domain run
(CycleGAN stage then MixMatch) killed inside the GAN stage and resumed with its image pools."""
from __future__ import annotations

import csv
import json
import math
import os
import types

import numpy as np
import pytest
import tensorflow as tf
from scipy import integrate, stats

from test_domains import two_domains  # noqa: F401  (fixture: tiny BraTS source + target)
from tfseg import callbacks as cb
from tfseg.data import augment as augment_lib
from tfseg.losses import segmentation as losses
from tfseg.methods import DataSpec, mixmatch, resolve_config

SPEC = DataSpec(2, 1, 2, ("background", "tumour"), (16, 16))
TINY = ("filters=4,8", "batch_size=2", "unlabeled_batch_size=2", "generator_filters=4",
        "discriminator_filters=4", "residual_blocks=1", "gan_batch_size=2", "crop_size=16",
        "gan_steps=4", "steps=4", "validation_every=2")


# --------------------------------------------------------------------------- hand-computed
def test_sharpen_softmax_and_binary_forms():
    p = tf.constant([[0.6, 0.4], [0.5, 0.5]])
    # T = 0.5: p^2 / sum p^2 = 0.36 / 0.52, 0.16 / 0.52
    np.testing.assert_allclose(mixmatch.sharpen(p, 0.5).numpy(),
                               [[0.36 / 0.52, 0.16 / 0.52], [0.5, 0.5]], rtol=1e-5)
    three = tf.constant([[0.5, 0.3, 0.2]])
    np.testing.assert_allclose(mixmatch.sharpen(three, 0.5).numpy(),
                               [[0.25 / 0.38, 0.09 / 0.38, 0.04 / 0.38]], rtol=1e-5)
    # binary (sigmoid) form per channel: p^2 / (p^2 + (1 - p)^2); two channels independent
    binary = tf.constant([[0.6, 0.9]])
    np.testing.assert_allclose(mixmatch.sharpen(binary, 0.5, "sigmoid").numpy(),
                               [[0.36 / 0.52, 0.81 / 0.82]], rtol=1e-5)
    # T = 1 leaves probabilities unchanged; two classes: both forms agree
    np.testing.assert_allclose(mixmatch.sharpen(p, 1.0).numpy(), p.numpy(), rtol=1e-5)
    np.testing.assert_allclose(mixmatch.sharpen(p[:, :1], 0.5, "sigmoid").numpy(),
                               mixmatch.sharpen(p, 0.5).numpy()[:, :1], rtol=1e-5)


def _expected_max(a, b):
    """E[max(X, 1 - X)] for X ~ Beta(a, b), by quadrature."""
    return integrate.quad(lambda x: max(x, 1 - x) * stats.beta.pdf(x, a, b), 0, 1,
                          points=[0.5])[0]


def test_mixup_lambda_is_the_larger_of_a_beta_draw_and_its_complement():
    seed = tf.constant([3, 4])
    lam = mixmatch.mixup_lambda(20000, 0.75, seed).numpy()
    draws = augment_lib.sample_beta(tf.constant([20000]), 0.75, seed).numpy()
    np.testing.assert_allclose(lam, np.maximum(draws, 1 - draws))   # the same Beta(α, α) draw
    assert lam.min() >= 0.5 and lam.max() <= 1.0
    assert lam.mean() == pytest.approx(_expected_max(0.75, 0.75), abs=0.01)
    paper = mixmatch.mixup_lambda(20000, 0.75, seed, "paper").numpy()   # Beta(γ, 1 − γ)
    assert paper.min() >= 0.5
    assert paper.mean() == pytest.approx(_expected_max(0.75, 0.25), abs=0.01)
    assert abs(paper.mean() - lam.mean()) > 0.03                        # they are different


def test_mix_by_hand():
    images = tf.constant([[0.0], [4.0]])
    targets = tf.constant([[1.0, 0.0], [0.0, 1.0]])
    mixed_images, mixed_targets = mixmatch.mix(images, targets, tf.constant([0.75, 0.5]),
                                               tf.constant([1, 0]))
    np.testing.assert_allclose(mixed_images.numpy(), [[1.0], [2.0]])
    np.testing.assert_allclose(mixed_targets.numpy(), [[0.75, 0.25], [0.5, 0.5]])


def test_loss_by_hand():
    # one labeled pixel, soft (mixed) target (0.75, 0.25), logits (0, ln 3): softmax (.25, .75)
    labeled_targets = tf.constant([[[[0.75, 0.25]]]])
    labeled_logits = tf.constant([[[[0.0, math.log(3.0)]]]])
    ce = -(0.75 * math.log(0.25) + 0.25 * math.log(0.75))
    labeled = losses.cross_entropy(labeled_targets, labeled_logits)
    # two unlabeled examples of one pixel: q = (1, 0) vs p = (.5, .5): mean sq. 0.25;
    # q = (0.25, 0.75) vs p = (.25, .75): 0
    unlabeled_targets = tf.constant([[[[1.0, 0.0]]], [[[0.25, 0.75]]]])
    unlabeled_logits = tf.constant([[[[0.0, 0.0]]], [[[0.0, math.log(3.0)]]]])
    total, lx, lu = mixmatch.mixmatch_loss(labeled, unlabeled_targets, unlabeled_logits, 2.0)
    np.testing.assert_allclose(lx.numpy(), [ce], rtol=1e-5)
    np.testing.assert_allclose(lu.numpy(), [0.25, 0.0], atol=1e-6)
    assert float(total) == pytest.approx(ce + 2.0 * 0.125, rel=1e-5)
    # sigmoid outputs (regions): MSE of sigmoid probabilities, per channel
    sig = mixmatch.unlabeled_mse(tf.constant([[[[1.0, 0.0]]]]), tf.constant([[[[0.0, 0.0]]]]),
                                 "sigmoid")
    np.testing.assert_allclose(sig.numpy(), [0.25])


# --------------------------------------------------------------------------- label guess
def test_flipped_guess_flipped_back_equals_the_unflipped_prediction():
    rng = np.random.default_rng(1)
    images = tf.constant(rng.normal(size=(3, 6, 5, 1)), tf.float32)   # not symmetric

    def predict(x):   # per-pixel, hence flip-equivariant: f(flip(x)) = flip(f(x))
        return tf.nn.softmax(tf.concat([x, -2.0 * x], -1))

    seeds = [tf.constant([s, 0]) for s in range(6)]
    guess, views, flips = mixmatch.guess_labels(predict, images, seeds, "flip")
    np.testing.assert_allclose(guess.numpy(), predict(images).numpy(), atol=1e-6)
    flips = np.stack([f.numpy() for f in flips])
    assert flips.any() and not flips.all()                   # some views flipped, some not
    for view, flip in zip(views, flips):
        # each view's target frame: the guess flipped like the view is its own prediction
        np.testing.assert_allclose(mixmatch.apply_flips(guess, flip).numpy(),
                                   predict(view).numpy(), atol=1e-6)
    # without the inversion the average would differ (the test can fail)
    naive = np.mean([predict(v).numpy() for v in views], axis=0)
    assert np.abs(naive - predict(images).numpy()).max() > 1e-2
    # apply_flips is its own inverse; rows then columns
    x = tf.reshape(tf.range(6.0), (1, 2, 3, 1))
    both = mixmatch.apply_flips(x, tf.constant([[True, True]]))
    np.testing.assert_array_equal(both.numpy()[0, ..., 0], [[5, 4, 3], [2, 1, 0]])
    np.testing.assert_array_equal(mixmatch.apply_flips(both, tf.constant([[True, True]])), x)


def test_intensity_views_average_their_predictions():
    images = tf.ones((2, 4, 4, 1))
    guess, views, _ = mixmatch.guess_labels(lambda x: tf.concat([x, x], -1), images,
                                            [tf.constant([1, 2]), tf.constant([3, 4])],
                                            "intensity")
    expected = 0.5 * (views[0] + views[1])
    np.testing.assert_allclose(guess.numpy(), tf.concat([expected, expected], -1).numpy(),
                               rtol=1e-6)
    assert not np.allclose(views[0].numpy(), views[1].numpy())


# --------------------------------------------------------------------------- the method
def _batch(spec=SPEC, batch=2, target=(20, 20)):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, spec.num_classes, (batch, 16, 16)).astype(np.int32)
    return {"labeled": {"image": rng.random((batch, 16, 16, 1), np.float32), "label": labels},
            "unlabeled": {"image": rng.random((batch, 16, 16, 1), np.float32)},
            "target": {"image": rng.random((batch, *target, 1), np.float32)}}


def test_stages_and_unlabeled_batch_per_adaptation():
    method = mixmatch.build(resolve_config(mixmatch, None, TINY + ("rampup_steps=4",)), SPEC)
    method.compile()
    assert [s.name for s in method.stages()] == ["cyclegan", "mixmatch"]
    assert not method.stages()[0].trains_segmentor
    data = _batch()
    method.begin_stage(method.stages()[1])
    translated = method.unlabeled_images(data)
    np.testing.assert_allclose(translated.numpy(),
                               method.translate_to_source(data["target"]["image"]).numpy())
    generator = [w.numpy().copy() for w in method.gen_target_to_source.weights]
    weights = []
    for _ in range(2):
        for tracker in method.metrics:
            tracker.reset_state()  # one step's values, not the running means
        logs = method.train_step(data)
        weights.append(float(logs["unlabeled_weight"]))
        assert float(logs["loss"]) == pytest.approx(
            float(logs["labeled_loss"]) + weights[-1] * float(logs["unlabeled_loss"]), rel=1e-4)
    assert weights == [0.0, 0.25]                                      # linear ramp over 4 steps
    assert all(np.array_equal(a, b.numpy())                            # frozen in stage 2
               for a, b in zip(generator, method.gen_target_to_source.weights))
    plain = mixmatch.build(resolve_config(mixmatch, None, TINY + ("adapt=none",)), SPEC)
    assert [s.name for s in plain.stages()] == ["mixmatch"]
    assert not hasattr(plain, "gen_target_to_source")
    assert plain.summary_images() == {}                      # no translators, no panels
    assert set(method.summary_images()) == {"cyclegan/target_source_target",
                                            "cyclegan/source_target_source"}
    np.testing.assert_array_equal(plain.unlabeled_images(data).numpy(),
                                  data["target"]["image"][:, 2:18, 2:18])   # centre crop
    one_domain = {k: v for k, v in data.items() if k != "target"}
    np.testing.assert_array_equal(plain.unlabeled_images(one_domain),
                                  data["unlabeled"]["image"])


def test_regions_train_with_sigmoid_sharpening():
    spec = DataSpec(2, 1, 3, ("background", "a", "b"), (16, 16), region_names=("ab", "b"),
                    region_classes=((1, 2), (2,)), region_paint=(1, 2))
    method = mixmatch.build(resolve_config(mixmatch, None, TINY + ("adapt=none",)), spec)
    method.compile()
    logs = method.train_step(_batch(spec))
    assert all(np.isfinite(float(v)) for v in logs.values())


@pytest.mark.parametrize("override, message", [
    ("adapt=yes", "adapt='yes'"), ("mixup_beta=uniform", "mixup_beta"),
    ("augment=flip+mixup", "must not contain mixup"), ("guess_augment=affine", "guess_augment"),
    ("temperature=0", "temperature"), ("gan_steps=0", "gan_steps"),
])
def test_bad_settings_name_the_field(override, message):
    with pytest.raises(ValueError, match=message):
        mixmatch.build(resolve_config(mixmatch, None, TINY + (override,)), SPEC)
    with pytest.raises(ValueError, match="mixup_alpha"):
        mixmatch.build(resolve_config(mixmatch, None, ("mixup_beta=paper", "mixup_alpha=1.5")),
                       SPEC)


# --------------------------------------------------------------------------- end to end
def test_adapt_flag_is_set_sugar(capsys):
    from launch import train as train_cli

    with pytest.raises(SystemExit) as exit_info:
        train_cli.main(["launch.train", "--method=supervised", "--dataset=synthetic_cardiac",
                        "--adapt=cyclegan"])
    assert exit_info.value.code == 2
    assert "adapt" in capsys.readouterr().err


@pytest.mark.slow
def test_two_domain_run_killed_in_the_gan_stage_resumes_with_its_pools(two_domains,
                                                                        monkeypatch, caplog):
    from tfseg.train import TrainConfig, run_training

    root, source, target = two_domains
    config = TrainConfig(
        method="mixmatch", dataset="brats", data_dir=source, records_root=str(root / "records"),
        run_dir=str(root / "run"), labeled=2, num_val=1, num_test=1, n4=False, verbose=0,
        target_dataset="brats", target_data_dir=target, export=False,
        overrides=TINY + ("adapt=cyclegan", "filters=4,8", "batch_size=2"))
    original = cb.RoundEnd.on_epoch_end

    def killed_after_first_gan_round(self, epoch, logs=None):
        original(self, epoch, logs)
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(cb.RoundEnd, "on_epoch_end", killed_after_first_gan_round)
    with pytest.raises(KeyboardInterrupt):
        run_training(config)
    monkeypatch.setattr(cb.RoundEnd, "on_epoch_end", original)
    caplog.set_level("INFO")
    summary = run_training(config)
    assert "Resuming stage cyclegan at step 2" in caplog.text
    run_dir = summary["run_dir"]
    with open(os.path.join(run_dir, "train_log.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["stage"], r["step"]) for r in rows] == [("cyclegan", "2"), ("cyclegan", "4"),
                                                        ("mixmatch", "6"), ("mixmatch", "8")]
    assert rows[0]["cycle_loss"] and not rows[0]["val_mean_dice"] and rows[2]["val_mean_dice"]
    # The pools survived the kill: 4 GAN steps x 2 images each, not 2 x 2 after the resume.
    with open(os.path.join(run_dir, "config.json")) as f:
        run_config = json.load(f)
    spec = DataSpec.from_dict(run_config["data_spec"])
    fresh = mixmatch.build(resolve_config(mixmatch, None, TINY + ("filters=4,8",)), spec)
    fresh.compile()
    fresh.load_weights(os.path.join(run_dir, "checkpoints", "stages", "0_cyclegan.weights.h5"))
    assert float(fresh.pool_count_source.numpy()) == 8.0
    assert float(fresh.pool_count_target.numpy()) == 8.0
    # Both domains evaluated; the target with its own subjects.
    assert summary["test"]["domain"] == "source" and summary["test_target"]["domain"] == "target"
    assert list(summary["test_target"]["subjects"]) == run_config["target"]["split"]["test"]


# --------------------------------------------------------------------------- two layouts
def test_domains_match_modalities_and_classes_by_name():
    from tfseg.data import domains

    match = domains.match_domains(("FLAIR", "T1Gd"), ("Background", "Tumor"),
                                  ("t1", "t1ce", "t2", "flair"), ("background", "tumour"))
    assert match.target_modalities == ("flair", "t1ce") and match.class_map == (0, 1)
    assert match.classes_identity
    swapped = domains.match_domains(("t1",), ("background", "oedema", "necrotic_core"),
                                    ("T1w",), ("background", "necrosis", "edema"))
    assert swapped.class_map == (0, 2, 1) and not swapped.classes_identity
    with pytest.raises(ValueError, match=r"lacks the src modalities t1ce \(it has t1, flair\)"):
        domains.match_domains(("t1", "t1ce"), (), ("t1", "flair"), source="src")
    with pytest.raises(ValueError, match="classes enhancing cannot be matched by name"):
        domains.match_domains(("t1",), ("background", "tumour"), ("t1",),
                              ("background", "enhancing"))


def test_target_options_pick_the_source_modalities_in_order():
    from tfseg.data import domains
    from tfseg.datasets import get_dataset

    brats = get_dataset("brats")
    options = domains.align_target_options(("FLAIR", "T2"), brats, {"target": "binary"})
    assert options == {"target": "binary", "modalities": "flair,t2"}
    assert domains.align_target_options(brats.modalities, brats, {}) == {}
    fixed = types.SimpleNamespace(modalities=("t1", "flair"), options=dict)   # no option
    assert domains.align_target_options(("T1", "FLAIR"), fixed, {}) == {}
    with pytest.raises(ValueError, match="no modalities option"):
        domains.align_target_options(("flair", "t1"), fixed, {})
