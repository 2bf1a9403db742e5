"""The method contract (tfseg.methods) and the supervised baseline.

`test_every_method_fits` is parametrised over `available_methods()`, so every method module added
to tfseg/methods is built with its quick preset and trained for two steps here automatically.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
from typing import Optional

import numpy as np
import pytest
import tensorflow as tf

from tfseg.losses import segmentation as losses
from tfseg.methods import available_methods, get_method_module, resolve_config
from tfseg.methods import base
from tfseg.methods.base import DataSpec, Stage, apply_overrides, config_from_dict
from tfseg.methods import supervised


def _spec(spatial_dims, num_channels=1, num_classes=3, size=16):
    names = ("background", "a", "b", "c", "d")[:num_classes]
    return DataSpec(spatial_dims, num_channels, num_classes, names, (size,) * spatial_dims)


def _fake_batches(spec, labeled_batch, unlabeled_batch, seed=0):
    """A repeating dataset of the pipeline's element structure with learnable labels."""
    rng = np.random.default_rng(seed)
    shape = spec.example_shape
    labels = rng.integers(0, spec.num_classes, (labeled_batch, *shape)).astype(np.int32)
    images = (labels[..., None] / spec.num_classes
              + rng.normal(0, 0.1, (labeled_batch, *shape, spec.num_channels))).astype(np.float32)
    unlabeled = rng.normal(0, 1, (max(unlabeled_batch, 1), *shape, spec.num_channels))
    element = {"labeled": {"image": images, "label": labels},
               "unlabeled": {"image": unlabeled.astype(np.float32)}}
    return tf.data.Dataset.from_tensors(element).repeat()


# --------------------------------------------------------------------------- registry
def test_available_methods_lists_modules_not_base():
    names = available_methods()
    assert "supervised" in names
    assert "base" not in names and not any(n.startswith("_") for n in names)


def test_unknown_method_lists_available():
    with pytest.raises(ValueError, match=r"Unknown method 'nope'. Available: .*supervised"):
        get_method_module("nope")


def test_unknown_preset_lists_presets():
    with pytest.raises(ValueError, match=r"Unknown preset 'fast'.*Available: (.*, )?quick"):
        resolve_config(supervised, "fast")


# --------------------------------------------------------------------------- overrides
@dataclasses.dataclass(frozen=True)
class _Cfg:
    steps: int = 10
    rate: float = 0.1
    flag: bool = False
    name: str = "x"
    filters: tuple[int, ...] = (1, 2)
    pair: tuple[float, float] = (0.0, 1.0)
    maybe: Optional[int] = None
    weights: tuple[float, ...] | None = None


def test_apply_overrides_parses_each_type():
    cfg = apply_overrides(_Cfg(), {"steps": 5, "name": "preset"},
                          ["rate=1e-4", "flag=true", "filters=8,16,32", "pair=(0.5, 2)",
                           "maybe=3", "name=cli", "weights=[0.1,0.9]"])
    assert cfg == _Cfg(steps=5, rate=1e-4, flag=True, name="cli", filters=(8, 16, 32),
                       pair=(0.5, 2.0), maybe=3, weights=(0.1, 0.9))
    assert apply_overrides(cfg, None, ["maybe=none", "flag=0", "filters="]).maybe is None
    assert apply_overrides(cfg, None, ["weights=null"]).weights is None
    # A string field keeps "none" as a value (norm="none"); "null" restores its None default.
    assert apply_overrides(supervised.Config(), None, ["norm=none"]).norm == "none"
    assert apply_overrides(supervised.Config(norm="batch"), None, ["norm=null"]).norm is None
    assert apply_overrides(cfg, None, ["filters="]).filters == ()


@pytest.mark.parametrize("item, message", [
    ("stepz=3", r"_Cfg has no field 'stepz'. Fields: steps, rate, flag, name, filters"),
    ("steps", r"expected name=value"),
    ("steps=2.5", r"steps: expected an integer, got '2.5'"),
    ("flag=maybe", r"flag: expected true/false"),
    ("pair=1,2,3", r"pair: expected 2 comma-separated values"),
    ("maybe=x", r"maybe: expected an integer"),
])
def test_apply_overrides_errors(item, message):
    with pytest.raises(ValueError, match=message):
        apply_overrides(_Cfg(), None, [item])


def test_preset_with_unknown_field_is_an_error():
    with pytest.raises(ValueError, match="Preset sets unknown field 'nope'"):
        apply_overrides(_Cfg(), {"nope": 1})


def test_config_from_dict_round_trips_through_json():
    cfg = _Cfg(filters=(4, 8), pair=(1.0, 2.0), weights=(0.5,), maybe=2)
    again = config_from_dict(_Cfg, json.loads(json.dumps(dataclasses.asdict(cfg))))
    assert again == cfg and isinstance(again.filters, tuple)
    with pytest.raises(ValueError, match=r"no fields \['extra'\]"):
        config_from_dict(_Cfg, {"extra": 1})


def test_data_spec_checks_and_input_shape():
    spec = _spec(3, num_channels=2)
    assert spec.input_shape == (None, None, None, 2)
    assert DataSpec.from_dict(json.loads(json.dumps(dataclasses.asdict(spec)))) == spec
    with pytest.raises(ValueError, match="example_shape"):
        DataSpec(2, 1, 2, ("bg", "fg"), (16, 16, 16))
    with pytest.raises(ValueError, match="one name per class"):
        DataSpec(2, 1, 3, ("bg", "fg"), (16, 16))


# --------------------------------------------------------------------------- helpers
def test_global_mean_divides_by_global_batch():
    per_example = tf.constant([1.0, 2.0, 6.0])
    assert float(base.global_mean(per_example)) == pytest.approx(3.0)  # one replica


def test_check_finite_names_term_and_step():
    base.check_finite({"loss": 1.0, "seg_grad_norm": np.float32(2.0)}, step=3)
    with pytest.raises(FloatingPointError, match=r"loss term dice_loss became nan at step 17"):
        base.check_finite({"loss": 1.0, "dice_loss": float("nan")}, step=17)
    with pytest.raises(FloatingPointError, match=r"loss term loss became inf at step 2"):
        base.check_finite({"loss": tf.constant(math.inf)}, step=2)


# --------------------------------------------------------------------------- every method
def _method_cases():
    for name in available_methods():
        module = get_method_module(name)
        for dims in getattr(module, "SPATIAL_DIMS", (2, 3)):
            yield pytest.param(name, dims, id=f"{name}-{dims}d")


@pytest.mark.parametrize("name, spatial_dims", list(_method_cases()))
def test_every_method_fits(name, spatial_dims):
    """Quick preset, tiny shapes: 2 fit() steps per stage; finite tracked losses; every network
    trained by an optimizer changed; every optimizer stepped at least twice."""
    module = get_method_module(name)
    assert "quick" in module.PRESETS
    config = resolve_config(module, "quick")
    assert config.steps >= 1 and config.validation_every >= 1
    spec = _spec(spatial_dims, num_channels=2 if spatial_dims == 3 else 1,
                 size=max(16, getattr(module, "MIN_EXAMPLE_SIZE", 16)))
    method = module.build(config, spec)
    assert isinstance(method, base.SegMethod)
    method.compile()
    assert isinstance(method.stages()[0], Stage)
    x = tf.zeros((1, *spec.example_shape, spec.num_channels))
    assert tuple(method(x).shape) == (1, *spec.example_shape, spec.num_classes)
    before = {n: [w.numpy().copy() for w in net.trainable_weights]
              for opt in method.optimizer_networks.values() for net in opt for n in [net.name]}
    batches = _fake_batches(spec, method.labeled_batch_size, method.unlabeled_batch_size)
    # Every stage of the schedule, as tfseg.train runs it (one fit() per stage).
    for stage in method.stages():
        method.begin_stage(stage)
        method.make_train_function(force=True)
        history = method.fit(batches, steps_per_epoch=2, epochs=1, verbose=0)
        # Each stage reports the terms it computes (a subset of loss_names, always "loss").
        assert "loss" in history.history and set(history.history) <= set(method.loss_names)
        for term, values in history.history.items():
            assert np.isfinite(values[-1]), (stage.name, term)
    for opt_name, networks in method.optimizer_networks.items():
        assert int(getattr(method, opt_name).iterations) >= 2, opt_name
        for net in networks:
            changed = [not np.array_equal(b, w.numpy())
                       for b, w in zip(before[net.name], net.trainable_weights)]
            assert any(changed), f"{opt_name} did not change {net.name}"


def _recording_apply(name, original, owned, paths, calls):
    """Replaces an optimizer's `apply` (which `apply_gradients` calls): records the call and fails
    on the spot, naming the variables, when it is given a variable outside its own networks."""

    def apply(grads, trainable_variables=None):
        calls.add(name)
        if trainable_variables is not None:  # None: the variables it was built on, its own
            trainable_variables = list(trainable_variables)
            foreign = sorted(paths.get(id(v), v.path) for v in trainable_variables
                             if id(v) not in owned)
            assert not foreign, (f"{name} received gradients for {len(foreign)} variables of "
                                 f"other networks: {foreign[:4]}")
        return original(grads, trainable_variables)

    return apply


@pytest.mark.parametrize("name, spatial_dims", list(_method_cases()))
def test_every_optimizer_changes_only_its_own_networks(name, spatial_dims, monkeypatch):
    """For every stage, after one train step on tiny data: (a) the networks of different
    optimizers share no trainable variable; (b) every trainable variable that changed belongs to
    an optimizer that applied gradients in this step; (c) each optimizer received gradients only
    for its own networks' variables."""
    module = get_method_module(name)
    spec = _spec(spatial_dims, num_channels=2 if spatial_dims == 3 else 1,
                 size=max(16, getattr(module, "MIN_EXAMPLE_SIZE", 16)))
    method = module.build(resolve_config(module, "quick"), spec)
    method.compile()
    owned = {opt: {id(v) for net in networks for v in net.trainable_variables}
             for opt, networks in method.optimizer_networks.items()}
    variables = method.trainable_variables
    paths = {id(v): v.path for v in variables}            # named after their network if known
    paths.update({id(v): f"{net.name}/{v.path}" for networks in method.optimizer_networks.values()
                  for net in networks for v in net.trainable_variables})
    # (a) no variable is stepped by two optimizers
    for (first, mine), (second, theirs) in itertools.combinations(owned.items(), 2):
        shared = sorted(paths[i] for i in mine & theirs)
        assert not shared, f"{first} and {second} both update {len(shared)}: {shared[:4]}"
    # (c) checked inside every apply call
    calls: set[str] = set()
    for opt, optimizer in method.optimizers().items():
        monkeypatch.setattr(optimizer, "apply",
                            _recording_apply(opt, optimizer.apply, owned[opt], paths, calls))
    data = next(iter(_fake_batches(spec, method.labeled_batch_size,
                                   method.unlabeled_batch_size)))
    for stage in method.stages():
        method.begin_stage(stage)
        calls.clear()
        before = [v.numpy().copy() for v in variables]
        method.train_step(data)  # eager: tracing one step graph per stage is slower here
        assert calls, f"stage {stage.name}: no optimizer applied gradients"
        # (b) what changed was stepped by an optimizer of this step
        allowed = set().union(*(owned[opt] for opt in calls))
        stray = [paths[id(v)] for v, old in zip(variables, before)
                 if id(v) not in allowed and not np.array_equal(old, v.numpy())]
        assert not stray, (f"stage {stage.name}: {stray} changed, but only {sorted(calls)} "
                           "applied gradients")


# --------------------------------------------------------------------------- supervised
def test_supervised_defaults_follow_the_dimensionality():
    two = supervised.resolve(supervised.Config(), _spec(2, num_classes=4))
    assert (two.filters, two.norm, two.pooling, two.upsampling) == (
        (16, 32, 64, 128, 256), "batch", "max", "bilinear")
    assert (two.learning_rate, two.beta_1, two.batch_size) == (1e-3, 0.9, 20)
    assert two.class_weights == pytest.approx((0.1, 0.3, 0.3, 0.3))
    brain = DataSpec(3, 2, 4, ("background", "csf", "gm", "wm"), (32, 32, 32))
    three = supervised.resolve(supervised.Config(), brain)
    assert (three.filters, three.norm, three.activation, three.pooling, three.upsampling) == (
        (32, 64, 128, 256), "weight", "leaky_relu", "average", "transpose")
    assert (three.learning_rate, three.beta_1, three.batch_size) == (1e-4, 0.5, 30)
    assert three.class_weights == (0.33, 1.5, 0.83, 1.33)
    # Explicit settings win over the dimensionality defaults.
    mine = supervised.resolve(supervised.Config(norm="instance", learning_rate=5e-4), brain)
    assert (mine.norm, mine.learning_rate) == ("instance", 5e-4)
    # The paper preset's loss follows the paper of the dimensionality: the task-driven paper's
    # weighted CE in 2D, the few-shot GAN paper's plain CE (no class weights) in 3D.
    paper = base.apply_overrides(supervised.Config(), supervised.PRESETS["paper"], [])
    paper_2d = supervised.resolve(paper, _spec(2, num_classes=4))
    assert paper_2d.loss == "weighted_ce" and paper_2d.class_weights == pytest.approx(
        (0.1, 0.3, 0.3, 0.3))
    paper_3d = supervised.resolve(paper, brain)
    assert (paper_3d.loss, paper_3d.class_weights, paper_3d.augment, paper_3d.batch_size) == (
        "ce", None, "none", 30)


def test_supervised_rejects_bad_settings():
    with pytest.raises(ValueError, match="loss='focal'"):
        supervised.resolve(supervised.Config(loss="focal"), _spec(2))
    with pytest.raises(ValueError, match="one weight per class"):
        supervised.resolve(supervised.Config(class_weights=(1.0, 2.0)), _spec(2))
    with pytest.raises(ValueError, match="2D slices only"):
        supervised.resolve(supervised.Config(augment="elastic"), _spec(3))


def test_supervised_default_augmentation_follows_the_dimensionality():
    # The quick preset asks for "default": the task-driven paper's affine in 2D, none in 3D.
    assert supervised.resolve(supervised.Config(augment="default"), _spec(2)).augment == "affine"
    assert supervised.resolve(supervised.Config(augment="default"), _spec(3)).augment == "none"


def test_supervised_splits_pipeline_augmentation_from_mixup():
    method = supervised.build(dataclasses.replace(
        supervised.Config(), filters=(4, 8), augment="affine+mixup"), _spec(2))
    assert method.pipeline_augment == "affine" and method.use_mixup


def test_supervised_tracks_the_weighted_ce_it_minimises():
    """With lr 0 nothing moves, so the tracked loss must equal the hand-computed loss of the
    initial network on the batch; a second fit must not retrace the train step."""
    spec = _spec(2)
    config = dataclasses.replace(supervised.Config(), filters=(4, 8), norm="none",
                                 batch_size=3, learning_rate=0.0)
    method = supervised.build(config, spec)
    method.compile()
    batches = _fake_batches(spec, 3, 0)
    element = next(iter(batches))
    logits = method(element["labeled"]["image"])
    y = tf.one_hot(element["labeled"]["label"], 3)
    expected = float(tf.reduce_mean(losses.cross_entropy(y, logits, (0.1, 0.45, 0.45))))
    traces = []
    step = method.train_step
    method.train_step = lambda data: traces.append(1) or step(data)  # Python runs when tracing
    history = method.fit(batches, steps_per_epoch=2, epochs=2, verbose=0)
    assert history.history["loss"][-1] == pytest.approx(expected, rel=1e-5)
    assert len(traces) == 1


def test_supervised_dice_ce_tracks_both_terms():
    spec = _spec(2)
    config = dataclasses.replace(supervised.Config(), filters=(4, 8), batch_size=2,
                                 loss="dice_ce", augment="mixup", learning_rate=0.0,
                                 norm="none")
    method = supervised.build(config, spec)
    method.compile()
    assert method.loss_names == ("loss", "dice_loss", "ce_loss", "seg_grad_norm")
    history = method.fit(_fake_batches(spec, 2, 0), steps_per_epoch=1, epochs=1, verbose=0)
    h = {k: v[-1] for k, v in history.history.items()}
    assert h["loss"] == pytest.approx(h["dice_loss"] + h["ce_loss"], rel=1e-5)
    assert 0.0 < h["dice_loss"] < 1.0


def test_shared_test_step_reports_ce_and_dice():
    spec = _spec(2)
    method = supervised.build(dataclasses.replace(supervised.Config(), filters=(4, 8)), spec)
    method.compile()
    logs = method.evaluate(_fake_batches(spec, 2, 0), steps=1, verbose=0, return_dict=True)
    assert set(logs) >= {"val_ce", "val_dice_loss"}
    assert logs["val_ce"] > 0 and 0 < logs["val_dice_loss"] <= 1
