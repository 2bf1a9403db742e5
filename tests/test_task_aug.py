"""task_aug: generator/discriminator shapes, soft-label warping, the task-driven gradient,
optimizer isolation, the stage schedule (fresh segmentor), ablation settings, and a tiny
end-to-end `launch.train --method=task_aug` run."""
from __future__ import annotations

import dataclasses
import json
import os
import re

import numpy as np
import pytest
import tensorflow as tf

from tfseg.methods import DataSpec, apply_overrides
from tfseg.methods import task_aug
from tfseg.networks import task_aug_nets

SPEC = DataSpec(2, 1, 3, ("background", "a", "b"), (32, 32))
TINY = ("filters=4,8", "batch_size=4", "unlabeled_batch_size=2", "gen_filters=4",
        "gen_z_filters=8,8,4,4,4", "disc_filters=4,4,8,8,8", "z_dim=8")


def _method(*overrides, spec=SPEC, compile=True):
    config = apply_overrides(task_aug.Config(), None, TINY + tuple(overrides))
    method = task_aug.build(config, spec)
    if compile:
        method.compile()
    return method


def _batch(seed=0, size=32, batch=4, unlabeled=2):
    rng = np.random.default_rng(seed)
    label = np.zeros((batch, size, size), np.int32)
    label[:, 8:20, 10:22] = 1
    label[:, 12:16, 12:18] = 2
    image = (label * 0.4 + 0.05 * rng.standard_normal(label.shape)).astype(np.float32)[..., None]
    real = rng.uniform(size=(unlabeled, size, size, 1)).astype(np.float32)
    return {"labeled": {"image": tf.constant(image), "label": tf.constant(label)},
            "unlabeled": {"image": tf.constant(real)}}


# --------------------------------------------------------------------------- networks
def test_generator_and_discriminator_shapes():
    z = tf.random.normal((3, 8))
    x = tf.random.uniform((3, 64, 32, 1))
    g_v = task_aug_nets.build_generator((64, 32), 1, "deformation", z_dim=8,
                                        z_filters=(8, 8, 4, 4, 4), filters=4)
    g_i = task_aug_nets.build_generator((64, 32), 1, "intensity", z_dim=8,
                                        z_filters=(8, 8, 4, 4, 4), filters=4)
    d = task_aug_nets.build_discriminator((64, 32), 1, (4, 4, 8, 8, 8), dense_units=8)
    assert g_v([x, z]).shape == (3, 64, 32, 2)
    delta = g_i([x, z])
    assert delta.shape == (3, 64, 32, 1)
    assert float(tf.reduce_max(tf.abs(delta))) < 1.0                       # tanh
    assert g_i.get_layer("delta_i").use_bias is False
    assert g_i.get_layer("delta_i").kernel_size == (1, 1)
    assert g_v.get_layer("z_dense").units == (64 // 32) * (32 // 32) * 128
    assert d(x).shape == (3, 1)
    strides = [d.get_layer(f"conv{k}").strides for k in range(5)]
    assert strides == [(2, 2)] * 5 and d.get_layer("conv0").kernel_size == (5, 5)


@pytest.mark.parametrize("shape", [(48, 64), (96, 100), (16, 16)])
def test_sizes_not_divisible_by_32_are_refused(shape):
    with pytest.raises(ValueError, match=r"multiple of 32"):
        task_aug_nets.build_generator(shape)
    with pytest.raises(ValueError, match=r"multiple of 32"):
        _method(spec=DataSpec(2, 1, 3, ("background", "a", "b"), shape), compile=False)


def _randomize_output_layers(method, scale=1.0):
    """The generators' last layers start at zero (identity transform); give them random weights."""
    rng = np.random.default_rng(3)
    for layer in (method.gen_v.get_layer("flow"), method.gen_i.get_layer("delta_i")):
        layer.kernel.assign(scale * rng.standard_normal(layer.kernel.shape).astype(np.float32))


def test_generators_start_at_the_identity():
    method = _method(compile=False)
    data = _batch()
    x = data["labeled"]["image"]
    targets = method.one_hot(data["labeled"]["label"])
    flow, warped, soft = method.deform(x, targets, tf.random.normal((4, 8)), training=False)
    delta, shifted = method.intensity(x, tf.random.normal((4, 8)), training=False)
    assert float(tf.reduce_max(tf.abs(flow))) == 0 and float(tf.reduce_max(tf.abs(delta))) == 0
    np.testing.assert_allclose(warped.numpy(), x.numpy(), atol=1e-6)
    np.testing.assert_allclose(soft.numpy(), targets.numpy(), atol=1e-6)


def test_warped_one_hot_labels_stay_a_distribution():
    method = _method(compile=False)
    data = _batch()
    targets = method.one_hot(data["labeled"]["label"])
    z = tf.random.normal((4, 8))
    _randomize_output_layers(method, scale=100.0)   # a large flow
    flow, warped, soft = method.deform(data["labeled"]["image"], targets, z, training=False)
    assert float(tf.reduce_mean(tf.abs(flow))) > 0.5
    np.testing.assert_allclose(tf.reduce_sum(soft, -1).numpy(), 1.0, atol=1e-5)
    assert float(tf.reduce_min(soft)) >= 0.0
    fractional = np.mean((soft.numpy() > 1e-3) & (soft.numpy() < 1 - 1e-3))
    assert fractional > 0  # soft labels at the moved boundaries, not nearest-neighbour
    assert warped.shape == data["labeled"]["image"].shape


# --------------------------------------------------------------------------- objective
def _generator_gradients(method, kind):
    data = _batch()
    targets = method.one_hot(data["labeled"]["label"])
    z = tf.random.stateless_normal((4, 8), [1, 2])
    generator = method.gen_v if kind == "deformation" else method.gen_i
    with tf.GradientTape(persistent=True) as tape:
        terms = method.generator_terms(kind, data["labeled"]["image"], targets, z,
                                       data["unlabeled"]["image"], training=False)
    gen_loss = tape.gradient(terms["gen_loss"], generator.trainable_variables)
    seg_only = tape.gradient(terms["gen_seg"], generator.trainable_variables)
    return terms, gen_loss, seg_only


@pytest.mark.parametrize("kind", ["deformation", "intensity"])
def test_segmentation_loss_back_propagates_into_the_generator(kind):
    """The task-driven claim: L_seg(S(G(x))) has a gradient w.r.t. G, and switching the term on
    (joint) changes G's gradient by exactly that amount."""
    joint = _method("joint=true", compile=False)
    independent = _method("joint=false", compile=False)
    _randomize_output_layers(joint)
    independent.set_weights(joint.get_weights())
    terms, g_joint, seg_only = _generator_gradients(joint, kind)
    _, g_indep, _ = _generator_gradients(independent, kind)
    seg_norm = float(tf.linalg.global_norm(seg_only))
    assert seg_norm > 1e-6, "the segmentation loss does not reach the generator"
    difference = [a - b for a, b in zip(g_joint, g_indep)]
    assert float(tf.linalg.global_norm(difference)) > 1e-6
    for d, s in zip(difference, seg_only):
        np.testing.assert_allclose(d.numpy(), s.numpy(), rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("kind", ["deformation", "intensity"])
def test_segmentor_sees_generated_and_original_slices_in_one_batch(kind):
    """Stages 2–3: S runs once on [generated; originals] (one batch-norm batch), not twice."""
    method = _method(compile=False)
    _randomize_output_layers(method)
    data = _batch()
    images, labels = data["labeled"]["image"], data["labeled"]["label"]
    targets = method.one_hot(labels)
    z = tf.random.stateless_normal((2, 8), [3, 4])
    terms = method.generator_terms(kind, images[2:], targets[2:], z, data["unlabeled"]["image"],
                                   training=True, originals=images[:2],
                                   original_targets=targets[:2])
    both = method.segmentor(tf.concat([terms["generated"], images[:2]], 0), training=True)
    expected_real = tf.reduce_mean(method.seg_loss(targets[:2], both[2:]))
    np.testing.assert_allclose(float(terms["seg_loss_real"]), float(expected_real), rtol=1e-4)
    alone = tf.reduce_mean(method.seg_loss(targets[:2],
                                           method.segmentor(images[:2], training=True)))
    assert abs(float(alone) - float(expected_real)) > 1e-4 * abs(float(expected_real))
    if kind == "intensity":   # labels unchanged: the generated half's loss is checkable too
        expected_gen = tf.reduce_mean(method.seg_loss(targets[2:], both[:2]))
        np.testing.assert_allclose(float(terms["gen_seg"]), float(expected_gen), rtol=1e-4)


def test_generator_objective_signs_and_weights():
    """gen_loss = [L_seg] + λ_adv·(−log D(x_G)) − λ_LD·mean|field| (hand-combined)."""
    method = _method("adversarial_weight=0.5", "large_deviation_weight=0.25", compile=False)
    _randomize_output_layers(method)
    data = _batch()
    targets = method.one_hot(data["labeled"]["label"])
    terms = method.generator_terms("deformation", data["labeled"]["image"], targets,
                                   tf.random.normal((4, 8)), data["unlabeled"]["image"],
                                   training=False)
    expected = terms["gen_seg"] + 0.5 * terms["gen_adv"] - 0.25 * terms["gen_large_dev"]
    np.testing.assert_allclose(float(terms["gen_loss"]), float(expected), rtol=1e-6)
    np.testing.assert_allclose(float(terms["gen_large_dev"]),
                               float(tf.reduce_mean(tf.abs(terms["field"]))), rtol=1e-6)
    np.testing.assert_allclose(float(terms["gen_adv"]),
                               -np.log(float(terms["d_fake_prob"])), rtol=1e-2)
    off = _method("joint=false", "adversarial_weight=0", compile=False)
    off.set_weights(method.get_weights())
    terms = off.generator_terms("deformation", data["labeled"]["image"], targets,
                                tf.random.normal((4, 8)), data["unlabeled"]["image"],
                                training=False)
    np.testing.assert_allclose(float(terms["gen_loss"]), -1e-3 * float(terms["gen_large_dev"]),
                               rtol=1e-6)


# --------------------------------------------------------------------------- optimizers, stages
def _trainable_snapshot(method):
    return {name: [v.numpy().copy() for v in getattr(method, name).trainable_variables]
            for name in ("segmentor", "gen_v", "gen_i", "disc_v", "disc_i")}


def _changed(before, after):
    return {name for name in before
            if any(not np.array_equal(a, b) for a, b in zip(before[name], after[name]))}


def test_each_stage_updates_only_its_networks():
    method = _method()
    assert {k: [n.name for n in v] for k, v in method.optimizer_networks.items()} == {
        "seg_optimizer": ["segmentor"], "gen_v_optimizer": ["gen_v"],
        "disc_v_optimizer": ["disc_v"], "gen_i_optimizer": ["gen_i"],
        "disc_i_optimizer": ["disc_i"]}
    expected = {"pretrain": {"segmentor"}, "deformation": {"segmentor", "gen_v", "disc_v"},
                "intensity": {"segmentor", "gen_i", "disc_i"}, "final": {"segmentor"}}
    seg = {"loss", "seg_loss_real", "seg_grad_norm"}
    gan = seg | {"seg_loss_gen", "gen_loss", "gen_seg", "gen_adv", "gen_large_dev", "disc_loss",
                 "d_real_prob", "d_fake_prob", "gen_grad_norm", "disc_grad_norm"}
    stage_terms = {"pretrain": seg, "deformation": gan | {"mean_abs_flow"},
                   "intensity": gan | {"mean_abs_delta_i"},
                   "final": seg | {"seg_loss_gen", "mean_abs_flow", "mean_abs_delta_i"}}
    assert set().union(*stage_terms.values()) == set(task_aug.LOSS_NAMES)
    data = _batch()
    for stage in method.stages():
        method.begin_stage(stage)
        before = _trainable_snapshot(method)
        logs = method.train_step(data)  # eager: tracing four step graphs is slower here
        assert _changed(before, _trainable_snapshot(method)) == expected[stage.name], stage.name
        assert all(np.isfinite(float(v)) for v in logs.values())
        assert set(logs) == stage_terms[stage.name], stage.name
    images = method.summary_images()
    assert set(images) == {"task_aug/input_generated", "task_aug/flow_dy_dx",
                           "task_aug/delta_i"}
    for panel in images.values():
        assert panel.ndim == 4 and panel.shape[-1] == 3
        assert 0.0 <= panel.min() and panel.max() <= 1.0


@pytest.mark.parametrize("real_affine", [True, False])
def test_discriminator_real_images_get_the_affine_augmentation(real_affine, monkeypatch):
    method = _method(f"real_affine={real_affine}")
    method.begin_stage(method.stages()[1])                   # "deformation"
    data = _batch(unlabeled=4)
    seen = {}

    def record(kind, originals, original_targets, sources, source_targets, unlabeled):
        seen["unlabeled"] = unlabeled.numpy()
        return {}

    monkeypatch.setattr(method, "_generator_step", record)
    method.train_step(data)
    raw = data["unlabeled"]["image"].numpy()
    changed = [not np.allclose(a, b) for a, b in zip(seen["unlabeled"], raw)]
    if real_affine:   # each image is transformed with probability 0.8
        assert sum(changed) >= 2
    else:
        assert not any(changed)


@pytest.mark.parametrize("use, names", [
    ("both", ["pretrain", "deformation", "intensity", "final"]),
    ("deformation", ["pretrain", "deformation", "final"]),
    ("intensity", ["pretrain", "intensity", "final"]),
])
def test_stage_schedule(use, names):
    method = _method(f"use={use}", "pretrain_steps=3", "deformation_steps=4",
                     "intensity_steps=5", "steps=6", compile=False)
    stages = method.stages()
    assert [s.name for s in stages] == names
    steps = {"pretrain": 3, "deformation": 4, "intensity": 5, "final": 6}
    assert [s.steps for s in stages] == [steps[n] for n in names]
    assert all(s.select_best for s in stages)


def test_final_stage_starts_from_a_fresh_segmentor():
    method = _method()
    data = _batch()
    for stage in method.stages()[:-1]:
        method.begin_stage(stage)
        method.train_step(data)
    trained = [v.numpy().copy() for v in method.segmentor.weights]
    generators = [v.numpy().copy() for v in method.gen_v.weights + method.gen_i.weights]
    assert int(method.seg_optimizer.iterations.numpy()) == 3
    method.begin_stage(method.stages()[-1])
    fresh = [v.numpy() for v in method.segmentor.weights]
    kernels = [i for i, v in enumerate(method.segmentor.weights) if "kernel" in v.path]
    assert kernels and all(not np.allclose(trained[i], fresh[i]) for i in kernels)
    # BN moving statistics back to their initial values (mean 0, variance 1)
    for v, value in zip(method.segmentor.weights, fresh):
        if "moving_mean" in v.path:
            assert np.all(value == 0)
        if "moving_variance" in v.path:
            assert np.all(value == 1)
    assert int(method.seg_optimizer.iterations.numpy()) == 0
    lr = method.seg_optimizer.learning_rate
    assert float(lr) == pytest.approx(method.config.learning_rate)  # lr kept, moments zeroed
    assert all(float(np.abs(v.numpy()).sum()) == 0 for v in method.seg_optimizer.variables
               if v is not method.seg_optimizer._learning_rate)
    for before, v in zip(generators, method.gen_v.weights + method.gen_i.weights):
        np.testing.assert_array_equal(before, v.numpy())  # the generators are kept


# --------------------------------------------------------------------------- presets, D batch
def _adam_settings(method):
    return {name: tuple(round(float(v), 9) for v in (opt.learning_rate, opt.beta_1, opt.beta_2))
            for name, opt in method.optimizers().items()}


@pytest.mark.parametrize("preset", [None, "paper", "reference", "quick"])
def test_every_network_gets_the_papers_adam(preset):
    """Paper: Adam 1e-3 with default betas for S, G_V, D_V, G_I and D_I (also the published
    training script's setting); every preset keeps it."""
    config = apply_overrides(task_aug.Config(), task_aug.PRESETS.get(preset), TINY)
    method = task_aug.build(config, SPEC)
    method.compile()
    assert _adam_settings(method) == {name: (1e-3, 0.9, 0.999) for name in (
        "seg_optimizer", "gen_v_optimizer", "disc_v_optimizer", "gen_i_optimizer",
        "disc_i_optimizer")}
    old = _method("gen_learning_rate=1e-4", "disc_learning_rate=2e-4", "gan_beta_1=0.5")
    settings = _adam_settings(old)
    assert settings["seg_optimizer"] == (1e-3, 0.9, 0.999)
    assert settings["gen_v_optimizer"] == settings["gen_i_optimizer"] == (1e-4, 0.5, 0.999)
    assert settings["disc_v_optimizer"] == settings["disc_i_optimizer"] == (2e-4, 0.5, 0.999)


def test_presets_paper_reference_quick():
    paper = apply_overrides(task_aug.Config(), task_aug.PRESETS["paper"], ())
    assert paper == task_aug.Config()            # the default config is the paper's
    assert (paper.batch_size, paper.unlabeled_batch_size, paper.disc_batch) == (20, 20, "joint")
    reference = apply_overrides(task_aug.Config(), task_aug.PRESETS["reference"], ())
    assert dataclasses.replace(reference, joint=True) == paper and not reference.joint
    quick = apply_overrides(task_aug.Config(), task_aug.PRESETS["quick"], ())
    # the paper's structure: depth, stage order, batch composition, optimisers, loss weights
    assert len(quick.filters) == len(paper.filters) == 5
    assert len(quick.gen_z_filters) == len(quick.disc_filters) == 5
    assert quick.batch_size == quick.unlabeled_batch_size
    same = ("learning_rate", "beta_1", "gen_learning_rate", "disc_learning_rate", "gan_beta_1",
            "disc_batch", "adversarial_weight", "large_deviation_weight", "joint", "use",
            "mixup", "real_affine", "z_dim")
    assert {f: getattr(quick, f) for f in same} == {f: getattr(paper, f) for f in same}
    assert quick.pretrain_steps > 0 and quick.deformation_steps > 0 and quick.intensity_steps > 0


@pytest.mark.parametrize("disc_batch", ["joint", "separate"])
def test_discriminator_batch_joint_or_separate(disc_batch):
    """joint: one D pass over [generated; real] (shared batch-norm statistics, as the reference
    code); separate: one pass each. Checked against D called by hand in training mode."""
    method = _method(f"disc_batch={disc_batch}", compile=False)
    _randomize_output_layers(method)
    data = _batch(unlabeled=3)
    images = data["labeled"]["image"]
    targets = method.one_hot(data["labeled"]["label"])
    z = tf.random.normal((4, 8))
    terms = method.generator_terms("intensity", images, targets, z, data["unlabeled"]["image"],
                                   training=True)
    generated, real = terms["generated"], data["unlabeled"]["image"]
    joint = tf.sigmoid(method.disc_i(tf.concat([generated, real], 0), training=True))
    separate_fake = tf.sigmoid(method.disc_i(generated, training=True))
    separate_real = tf.sigmoid(method.disc_i(real, training=True))
    fake, true = ((joint[:4], joint[4:]) if disc_batch == "joint"
                  else (separate_fake, separate_real))
    np.testing.assert_allclose(float(terms["d_fake_prob"]), float(tf.reduce_mean(fake)),
                               rtol=1e-4)
    np.testing.assert_allclose(float(terms["d_real_prob"]), float(tf.reduce_mean(true)),
                               rtol=1e-4)
    # the two settings really differ (batch statistics of one batch vs two)
    assert abs(float(tf.reduce_mean(joint[:4])) - float(tf.reduce_mean(separate_fake))) > 1e-4


# --------------------------------------------------------------------------- settings
@pytest.mark.parametrize("override, message", [
    ("use=random", r"use='random'; choose one of \['deformation', 'intensity', 'both'\]"),
    ("batch_size=3", r"batch_size=3 must be even"),
    ("adversarial_weight=-1", r"adversarial_weight=-1.0 must be >= 0"),
    ("large_deviation_weight=-0.1", r"large_deviation_weight=-0.1 must be >= 0"),
    ("mixup_alpha=0", r"mixup_alpha must be > 0"),
    ("deformation_steps=0", r"needs deformation_steps >= 1"),
    ("class_weights=1,1", r"needs one weight per class"),
    ("disc_batch=mixed", r"disc_batch='mixed'; choose one of \['joint', 'separate'\]"),
])
def test_bad_settings_are_refused(override, message):
    with pytest.raises(ValueError, match=message):
        _method(override, compile=False)


def test_ablation_settings_parse():
    config = apply_overrides(task_aug.Config(), task_aug.PRESETS["quick"],
                             ["joint=false", "use=intensity", "mixup=true",
                              "adversarial_weight=0", "large_deviation_weight=0"])
    assert (config.joint, config.use, config.mixup) == (False, "intensity", True)
    assert config.adversarial_weight == 0 and config.large_deviation_weight == 0
    with pytest.raises(ValueError, match="joint: expected true/false"):
        apply_overrides(task_aug.Config(), None, ["joint=maybe"])
    defaults = task_aug.Config()
    assert (defaults.adversarial_weight, defaults.large_deviation_weight) == (1.0, 1e-3)
    assert defaults.filters == (16, 32, 64, 128, 256) and defaults.z_dim == 100
    resolved = task_aug.resolve(task_aug.Config(), DataSpec(
        2, 1, 4, ("background", "rv", "myo", "lv"), (224, 224)))
    np.testing.assert_allclose(resolved.class_weights, (0.1, 0.3, 0.3, 0.3))
    with pytest.raises(ValueError, match="2D method"):
        task_aug.resolve(task_aug.Config(), DataSpec(3, 1, 3, ("b", "x", "y"), (32, 32, 32)))


# --------------------------------------------------------------------------- end to end
@pytest.mark.slow  # ~2 min on a loaded 2-core machine: four stages, each traced anew
def test_launch_train_task_aug_tiny(tmp_path, capsys):
    """All four stages in one `launch.train` run (one step each): stage bookkeeping, the train
    log, TensorBoard scalars and image panels. (The tiny records have no source files, so the
    test evaluation in the original geometry is exercised by the quick preset instead.)"""
    from launch import train as train_cli
    from test_train import tiny_split_file, write_tiny_records

    records = write_tiny_records(str(tmp_path / "records"), size=32)
    run_dir = tmp_path / "run"
    argv = ["launch.train", "--method=task_aug", "--dataset=synthetic_cardiac",
            f"--records_dir={records}", f"--split={tiny_split_file(str(tmp_path))}",
            "--validation_every=1", "--steps=1", *[f"--set={s}" for s in TINY],
            "--set=pretrain_steps=1", "--set=deformation_steps=1", "--set=intensity_steps=1",
            "--noevaluate", "--noexport", "--summary_every=1",
            f"--run_dir={run_dir}",
            f"--records_root={tmp_path / 'records_root'}"]
    assert train_cli.main(argv) == 0
    out = capsys.readouterr().out
    assert re.search(r"Best validation mean Dice \d\.\d{4} at step 4", out), out
    with open(run_dir / "config.json", encoding="utf-8") as f:
        config = json.load(f)
    assert [s["name"] for s in config["stages"]] == ["pretrain", "deformation", "intensity",
                                                     "final"]
    with open(run_dir / "checkpoints" / "progress.json", encoding="utf-8") as f:
        progress = json.load(f)
    assert progress["completed"] == ["0_pretrain", "1_deformation", "2_intensity", "3_final"]
    with open(run_dir / "train_log.csv", encoding="utf-8") as f:
        rows = f.read().splitlines()
    assert "mean_abs_flow" in rows[0] and "d_fake_prob" in rows[0]
    assert len(rows) == 1 + 4
    events = [os.path.join(dp, n) for dp, _, names in os.walk(run_dir / "tensorboard" / "train")
              for n in names]
    tags = set()
    for path in events:
        for event in tf.compat.v1.train.summary_iterator(path):
            tags.update(v.tag for v in event.summary.value)
    assert {"train/task_aug/flow_dy_dx", "train/task_aug/delta_i",
            "train/mean_abs_flow"} <= tags
