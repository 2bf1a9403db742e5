"""The method contract's room for domain adaptation: a second data domain (`target` stream, its
own records and split, evaluated into <run_dir>/target/), stages that train no segmentor (not
validated; a method without any segmentor optimizer), and method state that is not a weight
(saved with the resume rounds and stage checkpoints).

The toy method below is written the way a new method would be (one class, `make_optimizers`,
`stages`, `train_step`); it is injected in place of a real method module.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import types

import keras
import numpy as np
import pytest
import tensorflow as tf

from test_regions import write_brats2018
from tfseg import callbacks as cb
from tfseg.methods import supervised
from tfseg.methods.base import SegMethod, Stage, global_mean


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    steps: int = 4
    gan_steps: int = 4
    validation_every: int = 2
    gan_only: bool = False


class Toy(SegMethod):
    """Stage "gan" trains a critic on target-domain images only (and keeps a pool of the last
    target batch and a counter as state); stage "seg" trains the segmentor on labeled data."""

    def __init__(self, config: ToyConfig, data_spec):
        segmentor = supervised.build_segmentor(
            supervised.Config(filters=(4, 8), norm="none"), data_spec)
        super().__init__(config, data_spec, segmentor, labeled_batch_size=2,
                         target_batch_size=2, size_multiple=2,
                         loss_names=("seg_loss", "critic_loss"), name="toy")
        self.critic = keras.Sequential([keras.Input(data_spec.input_shape),
                                        keras.layers.Conv2D(1, 3, padding="same")],
                                       name="critic")
        self.seen = self.add_state("target_images_seen", ())
        self.pool = self.add_state("pool", (2, *data_spec.example_shape,
                                            data_spec.num_channels))
        self.stage_name = "gan"

    def make_optimizers(self):
        optimizers = {"critic_optimizer": (keras.optimizers.Adam(1e-3), [self.critic])}
        if not self.config.gan_only:
            optimizers["seg_optimizer"] = (keras.optimizers.Adam(1e-3), [self.segmentor])
        return optimizers

    def stages(self):
        gan = Stage("gan", self.config.gan_steps, "critic on target images",
                    trains_segmentor=False)
        return [gan] if self.config.gan_only else [gan, Stage("seg", self.config.steps)]

    def begin_stage(self, stage):
        self.stage_name = stage.name

    def train_step(self, data):
        if self.stage_name == "gan":
            images = data["target"]["image"]
            with tf.GradientTape() as tape:
                loss = global_mean(tf.reduce_mean(tf.square(self.critic(images) - 1.0),
                                                  axis=[1, 2, 3]))
            self.apply_network_gradients("critic_optimizer", tape, loss)
            self.seen.assign_add(tf.cast(tf.shape(images)[0], tf.float32))
            self.pool.assign(images[:2])
            return self.track(critic_loss=loss)
        targets = self.targets(data["labeled"]["label"])
        with tf.GradientTape() as tape:
            logits = self.segmentor(data["labeled"]["image"], training=True)
            loss = global_mean(supervised.losses.cross_entropy(targets, logits,
                                                               activation=self.activation))
        self.apply_network_gradients("seg_optimizer", tape, loss)
        return self.track(seg_loss=loss)


TOY = types.SimpleNamespace(__name__="tfseg.methods.toy", Config=ToyConfig, PRESETS={},
                            TARGETS=("classes", "regions"), SPATIAL_DIMS=(2,),
                            build=lambda config, spec: Toy(config, spec))


@pytest.fixture
def toy_method(monkeypatch):
    import tfseg.methods
    import tfseg.train

    real = tfseg.methods.get_method_module

    def lookup(name):
        return TOY if name == "toy" else real(name)

    monkeypatch.setattr(tfseg.train, "get_method_module", lookup)
    monkeypatch.setattr(tfseg.methods, "get_method_module", lookup)
    return TOY


@pytest.fixture(scope="module")
def two_domains(tmp_path_factory):
    root = tmp_path_factory.mktemp("domains")
    source, target = str(root / "source"), str(root / "target")
    write_brats2018(source, seed=0)
    write_brats2018(target, num_hgg=4, num_lgg_unlabeled=2, seed=1)
    return root, source, target


def _config(root, source, target, run, **overrides):
    from tfseg.train import TrainConfig

    return TrainConfig(
        method="toy", dataset="brats", data_dir=source, records_root=str(root / "records"),
        run_dir=str(root / run), labeled=2, num_val=1, num_test=1, n4=False, verbose=0,
        target_dataset="brats", target_data_dir=target, **overrides)


def _rows(run_dir):
    with open(os.path.join(run_dir, "train_log.csv"), newline="") as f:
        return list(csv.DictReader(f))


def test_two_domains_gan_stage_and_state(toy_method, two_domains):
    from tfseg.train import run_training

    root, source, target = two_domains
    summary = run_training(_config(root, source, target, "run"))
    run_dir = summary["run_dir"]
    with open(os.path.join(run_dir, "config.json")) as f:
        config = json.load(f)
    # The target domain: its own records and split (annotated patients only for val/test).
    domain = config["target"]
    assert domain["dataset"] == "brats" and domain["records_dir"] != config["records_dir"]
    assert domain["split"]["labeled"] == [] and len(domain["split"]["test"]) == 1
    assert len(domain["split"]["unlabeled"]) == 4  # 2 annotated training + 2 image-only
    assert config["pipeline"]["target_batch_size"] == 2
    # The GAN stage is not validated; the segmentor stage is.
    rows = _rows(run_dir)
    assert [r["stage"] for r in rows] == ["gan", "gan", "seg", "seg"]
    assert [r["val_mean_dice"] for r in rows[:2]] == ["", ""]
    assert all(r["val_mean_dice"] for r in rows[2:])
    assert rows[0]["critic_loss"] and not rows[0]["seg_loss"]
    # Both domains were evaluated, into their own folders.
    assert summary["test"]["domain"] == "source"
    assert summary["test_target"]["domain"] == "target"
    target_summary = os.path.join(run_dir, "target", "summary.json")
    with open(target_summary) as f:
        assert list(json.load(f)["subjects"]) == domain["split"]["test"]
    assert os.listdir(os.path.join(run_dir, "target", "predictions"))
    # The state rode along with the stage checkpoint: 4 steps x 2 target images.
    spec = toy_method.build(ToyConfig(), _spec(config)).data_spec
    fresh = Toy(ToyConfig(), spec)
    fresh.compile()
    fresh.load_weights(os.path.join(run_dir, "checkpoints", "stages", "0_gan.weights.h5"))
    assert float(fresh.seen.numpy()) == 8.0
    assert float(np.abs(fresh.pool.numpy()).sum()) > 0


def _spec(config):
    from tfseg.methods import DataSpec

    return DataSpec.from_dict(config["data_spec"])


def test_state_survives_a_resume_round(toy_method, tmp_path):
    from tfseg.methods import DataSpec

    spec = DataSpec(2, 4, 4, ("background", "a", "b", "c"), (16, 16))
    method = Toy(ToyConfig(), spec)
    method.compile()
    method.seen.assign(5.0)
    method.pool.assign(tf.ones_like(method.pool))
    plan = cb.plan_stages(method.stages(), 2)[0]
    state = cb.TrainingState(str(tmp_path), str(tmp_path))
    state.save(method, plan, {"epoch": 1, "step": 2, "best_mean_dice": -1.0, "best_step": -1})
    resumed = Toy(ToyConfig(), spec)
    resumed.compile()
    assert state.restore(resumed, plan)["step"] == 2
    assert float(resumed.seen.numpy()) == 5.0 and float(resumed.pool.numpy().min()) == 1.0


def test_a_method_without_segmentor_optimizer_trains_and_skips_evaluation(toy_method,
                                                                           two_domains):
    from tfseg.train import run_training

    root, source, target = two_domains
    summary = run_training(_config(root, source, target, "gan_only",
                                   overrides=("gan_only=true",)))
    assert summary["test"] is None and summary["export_path"] is None
    assert summary["best_val_mean_dice"] is None
    rows = _rows(summary["run_dir"])
    assert [r["stage"] for r in rows] == ["gan", "gan"] and "val_mean_dice" not in rows[-1]
    assert os.path.isfile(os.path.join(summary["run_dir"], "checkpoints", "best.weights.h5"))


def test_target_flags_need_a_target_dataset():
    from tfseg.train import TrainConfig

    with pytest.raises(ValueError, match="need --target_dataset"):
        TrainConfig(method="supervised", dataset="brats", target_data_dir="/x")
