"""The method contract: `SegMethod`, `DataSpec`, `Stage` and checked config overrides.

A method is one `SegMethod` subclass in one module of `tfseg.methods` (see its `__init__`):
`call()` is the segmentor's forward pass (logits), `train_step` is the method, `fit()` is the loop.
This base class holds what every method shares and what is easy to get wrong under
`tf.distribute`:

- one named optimizer per network, created and *built* in `compile()` inside the current strategy
  scope (an optimizer first built inside the traced step crashes under MirroredStrategy);
- losses reduced with the *global* batch size (`global_mean`), so gradients summed over replicas
  equal the single-device gradient;
- loss terms tracked as `keras.metrics.Mean`, listed by the `metrics` property, so Keras resets them
  every epoch and reduces them over replicas;
- a `keras.random.SeedGenerator` owned by the model for every random draw in the step;
- a shared `test_step` (cross-entropy and Dice on a labeled batch).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import keras
import tensorflow as tf

from tfseg.losses.segmentation import cross_entropy, soft_dice_loss
from tfseg.overrides import apply_overrides, config_from_dict  # noqa: F401  (re-exported)


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """What a method needs to know about the data to build its networks.

    Attributes:
      spatial_dims: 2 (slices) or 3 (patches).
      num_channels: image channels (modalities).
      num_classes: classes including background (index 0).
      class_names: one name per class.
      example_shape: the spatial shape of one training example: (H, W) or the patch (D, H, W).
    """

    spatial_dims: int
    num_channels: int
    num_classes: int
    class_names: tuple[str, ...]
    example_shape: tuple[int, ...]

    def __post_init__(self):
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"DataSpec.spatial_dims must be 2 or 3, got {self.spatial_dims!r}.")
        if len(self.example_shape) != self.spatial_dims:
            raise ValueError(f"DataSpec.example_shape {self.example_shape} must have "
                             f"{self.spatial_dims} entries (spatial_dims).")
        if len(self.class_names) != self.num_classes or self.num_classes < 2:
            raise ValueError(f"DataSpec: {self.num_classes} classes but class names "
                             f"{self.class_names}; need one name per class, at least 2 classes.")
        if self.num_channels < 1:
            raise ValueError(f"DataSpec.num_channels must be >= 1, got {self.num_channels}.")

    @property
    def input_shape(self) -> tuple[int | None, ...]:
        """Network input shape: spatial axes left free (the networks are fully convolutional)."""
        return (None,) * self.spatial_dims + (self.num_channels,)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DataSpec":
        return config_from_dict(cls, d)


@dataclasses.dataclass(frozen=True)
class Stage:
    """One `fit()` of a method's schedule.

    Attributes:
      name: short identifier (used in checkpoint names and logs).
      steps: optimisation steps of the stage.
      description: one line for the logs.
      select_best: keep (and restore at the end of the stage) the weights with the best validation
        Dice of this stage; False keeps the last weights.
    """

    name: str
    steps: int
    description: str = ""
    select_best: bool = True


class SegMethod(keras.Model):
    """Base class of every method: a segmentor plus whatever trains it.

    Subclasses name their tracked terms (`loss_names`, shown in the progress bar and
    TensorBoard: every loss term and each network's gradient norm), implement
    `make_optimizers()` and `train_step(data)`, and may override `stages()` and `begin_stage()`.
    `data` is the pipeline's batch:
    {"labeled": {"image": (B, *S, C), "label": (B, *S) int32}, "unlabeled": {"image": ...}}.

    Attributes:
      config: the method's resolved (frozen) `Config`.
      data_spec: the `DataSpec` it was built for.
      segmentor: the exported network, logits out.
      pipeline_augment: augmentation spec the input pipeline applies to labeled batches.
      labeled_batch_size / unlabeled_batch_size: global batch sizes (0: no unlabeled stream).
      size_multiple: spatial sizes the segmentor accepts are multiples of this.
    """

    loss_names: tuple[str, ...] = ("loss",)

    def __init__(self, config: Any, data_spec: DataSpec, segmentor: keras.Model, *,
                 labeled_batch_size: int, unlabeled_batch_size: int = 0,
                 pipeline_augment: str = "none", size_multiple: int = 1,
                 loss_names: Sequence[str] | None = None, seed: int | None = None,
                 name: str | None = None):
        super().__init__(name=name)
        self.config = config
        self.data_spec = data_spec
        self.segmentor = segmentor
        self.labeled_batch_size = int(labeled_batch_size)
        self.unlabeled_batch_size = int(unlabeled_batch_size)
        self.pipeline_augment = pipeline_augment
        self.size_multiple = int(size_multiple)
        self.seed_generator = keras.random.SeedGenerator(seed)
        if loss_names is not None:
            self.loss_names = tuple(loss_names)
        self.trackers = {n: keras.metrics.Mean(name=n) for n in self.loss_names}
        self.optimizer_networks: dict[str, tuple[keras.Model, ...]] = {}

    def call(self, x, training=False):
        return self.segmentor(x, training=training)  # (B, *S, K) logits

    @property
    def metrics(self):
        return list(self.trackers.values())

    # ----------------------------------------------------------------------- optimizers
    def make_optimizers(self) -> dict[str, tuple[keras.optimizers.Optimizer,
                                                 Sequence[keras.Model]]]:
        """Returns {"seg_optimizer": (optimizer, [networks it updates]), ...} (subclasses).

        The optimizers are created here, i.e. inside the strategy scope `compile()` runs in.
        """
        raise NotImplementedError

    def compile(self, **kwargs):
        """Creates and builds one optimizer per network; call inside the strategy scope.

        `self.optimizer` is the segmentor's (`seg_optimizer`): Keras uses it for the learning
        rate in logs; the others are attributes named after their role, so weight saving and
        resume cover all of them.
        """
        optimizers = self.make_optimizers()
        if "seg_optimizer" not in optimizers:
            raise ValueError(f"{type(self).__name__}.make_optimizers() must return a "
                             "'seg_optimizer' entry.")
        super().compile(optimizer=optimizers["seg_optimizer"][0], **kwargs)
        for name, (optimizer, networks) in optimizers.items():
            setattr(self, name, optimizer)
            self.optimizer_networks[name] = tuple(networks)
            # Built up front on exactly its networks' variables: lazily built optimizers crash
            # under MirroredStrategy, and this keeps each optimizer's slots to its own network.
            optimizer.build([v for net in networks for v in net.trainable_variables])
        if not self.built:
            # Subclassed wrappers stay unbuilt until called; saving weights needs them built.
            self(tf.zeros((1, *self.data_spec.example_shape, self.data_spec.num_channels)))

    def optimizers(self) -> dict[str, keras.optimizers.Optimizer]:
        return {name: getattr(self, name) for name in self.optimizer_networks}

    # ----------------------------------------------------------------------- schedule
    def stages(self) -> list[Stage]:
        """The method's schedule; one `fit()` per stage. Default: one stage of `config.steps`."""
        return [Stage("train", int(self.config.steps), "train the segmentor")]

    def begin_stage(self, stage: Stage) -> None:
        """Called before each stage's `fit()` (re-initialise networks, switch losses...)."""

    # ----------------------------------------------------------------------- step helpers
    def next_seed(self) -> tf.Tensor:
        """A fresh shape-[2] int seed for stateless ops, different on every replica."""
        seed = self.seed_generator.next()
        replica = tf.distribute.get_replica_context()
        replica_id = 0 if replica is None else replica.replica_id_in_sync_group
        return seed + tf.cast(tf.stack([replica_id, 0]), seed.dtype)

    def one_hot(self, labels: tf.Tensor) -> tf.Tensor:
        return tf.one_hot(labels, self.data_spec.num_classes, dtype=tf.float32)  # (B, *S, K)

    def apply_network_gradients(self, optimizer_name: str, tape: tf.GradientTape,
                                loss: tf.Tensor) -> tf.Tensor:
        """Applies d loss / d (the optimizer's networks) and returns the gradient norm.

        The norm is that of the gradient of the replica's *local* mean loss (the single-device
        gradient norm when there is one replica).
        """
        variables = [v for net in self.optimizer_networks[optimizer_name]
                     for v in net.trainable_variables]
        gradients = tape.gradient(loss, variables)
        getattr(self, optimizer_name).apply_gradients(zip(gradients, variables))
        return tf.linalg.global_norm(gradients) * float(num_replicas())

    def track(self, **values: tf.Tensor) -> dict[str, tf.Tensor]:
        """Updates the named trackers and returns their current results (in `loss_names` order).

        Only the terms this step computes are returned, so the progress bar, train_log.csv (blank
        cells) and TensorBoard of a multi-stage method show each stage's own terms, not zeros.
        """
        for name, value in values.items():
            self.trackers[name].update_state(value)
        return {name: tracker.result() for name, tracker in self.trackers.items()
                if name in values}

    def test_step(self, data):
        """Cross-entropy and Dice loss of the segmentor on a labeled batch (for `evaluate`)."""
        batch = data["labeled"] if "labeled" in data else data
        logits = tf.cast(self(batch["image"], training=False), tf.float32)
        y_true = self.one_hot(batch["label"])
        return {"val_ce": keras.ops.mean(cross_entropy(y_true, logits)),
                "val_dice_loss": keras.ops.mean(soft_dice_loss(y_true, logits))}


# --------------------------------------------------------------------------- distribution helpers
def num_replicas() -> int:
    return tf.distribute.get_strategy().num_replicas_in_sync


def global_mean(per_example: tf.Tensor) -> tf.Tensor:
    """Sum of this replica's per-example losses / the global batch size.

    Gradients of this, summed over replicas by the optimizer, equal the single-device gradient of
    the mean over the global batch (a plain mean would be summed `num_replicas` times).

    Args:
      per_example: (B_local,) losses.

    Returns:
      A float32 scalar.
    """
    per_example = tf.cast(per_example, tf.float32)
    global_batch = tf.cast(tf.shape(per_example)[0] * num_replicas(), tf.float32)
    return tf.reduce_sum(per_example) / global_batch


def check_finite(logs: Mapping[str, Any], step: int) -> None:
    """Stops training on a non-finite tracked value.

    Raises:
      FloatingPointError: naming the first non-finite term and the step.
    """
    for name, value in logs.items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if not math.isfinite(number):
            raise FloatingPointError(
                f"loss term {name} became {number} at step {step}; training stopped before any "
                "checkpoint of this round was written. Lower the learning rate, check the input "
                "intensities, or use --mixed_precision=none.")
