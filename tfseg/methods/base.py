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

from tfseg.data.spec import DataSpec  # noqa: F401  (re-exported: the method contract)
from tfseg.losses.segmentation import cross_entropy, soft_dice_loss
from tfseg.overrides import apply_overrides, config_from_dict  # noqa: F401  (re-exported)


@dataclasses.dataclass(frozen=True)
class Stage:
    """One `fit()` of a method's schedule.

    Attributes:
      name: short identifier (used in checkpoint names and logs).
      steps: optimisation steps of the stage.
      description: one line for the logs.
      select_best: keep (and restore at the end of the stage) the weights with the best validation
        Dice of this stage; False keeps the last weights.
      trains_segmentor: False for a stage that trains only other networks (a GAN stage): it is
        not validated (its rounds still log, checkpoint and resume) and keeps its last weights.
    """

    name: str
    steps: int
    description: str = ""
    select_best: bool = True
    trains_segmentor: bool = True

    def __post_init__(self):
        if not self.trains_segmentor and self.select_best:
            object.__setattr__(self, "select_best", False)  # nothing to select on


class SegMethod(keras.Model):
    """Base class of every method: a segmentor plus whatever trains it.

    Subclasses name their tracked terms (`loss_names`, shown in the progress bar and
    TensorBoard: every loss term and each network's gradient norm), implement
    `make_optimizers()` and `train_step(data)`, and may override `stages()` and `begin_stage()`.
    `data` is the pipeline's batch:
    {"labeled": {"image": (B, *S, C), "label": (B, *S) int32}, "unlabeled": {"image": ...}}
    plus {"target": {"image": ...}} when the method asks for a target-domain stream
    (`target_batch_size` > 0 and the run names a target dataset).

    What the method's segmentation IS lives in one place, `self.predictor`: a Keras model from
    images to probabilities (B, *S, R|K). By default it is the segmentor followed by the output
    activation of the data's targets (softmax over classes, one sigmoid per region); a method
    whose prediction is something else (e.g. the mean of two decoders' probabilities) passes its
    own `predictor` and exposes a module-level `build_predictor(config, data_spec)` so a run can
    be evaluated and exported without building its other networks. Validation, evaluation, export
    and prediction all use the predictor.

    Attributes:
      config: the method's resolved (frozen) `Config`.
      data_spec: the `DataSpec` it was built for.
      segmentor: the main segmentation network, logits out (what `call()` runs).
      predictor: images -> probabilities; the exported network.
      pipeline_augment: augmentation spec the input pipeline applies to labeled batches.
      labeled_batch_size / unlabeled_batch_size / target_batch_size: global batch sizes (0: no
        such stream).
      size_multiple: spatial sizes the segmentor accepts are multiples of this.
    """

    loss_names: tuple[str, ...] = ("loss",)

    def __init__(self, config: Any, data_spec: DataSpec, segmentor: keras.Model, *,
                 labeled_batch_size: int, unlabeled_batch_size: int = 0,
                 target_batch_size: int = 0, pipeline_augment: str = "none",
                 size_multiple: int = 1, loss_names: Sequence[str] | None = None,
                 seed: int | None = None, name: str | None = None,
                 predictor: keras.Model | None = None):
        super().__init__(name=name)
        self.config = config
        self.data_spec = data_spec
        self.segmentor = segmentor
        self.predictor = predictor if predictor is not None else probability_model(
            segmentor, data_spec)
        self.labeled_batch_size = int(labeled_batch_size)
        self.unlabeled_batch_size = int(unlabeled_batch_size)
        self.target_batch_size = int(target_batch_size)
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
        if not optimizers:
            raise ValueError(f"{type(self).__name__}.make_optimizers() returned no optimizer.")
        # Keras reads the learning rate of `self.optimizer` for its logs: the segmentor's when
        # there is one (a method whose stages train only other networks may have none).
        main = optimizers.get("seg_optimizer") or next(iter(optimizers.values()))
        super().compile(optimizer=main[0], **kwargs)
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

    @property
    def steps_done(self) -> int:
        """Optimisation steps applied so far (the main optimizer's iterations)."""
        return int(self.optimizer.iterations.numpy())

    # ----------------------------------------------------------------------- state
    def add_state(self, name: str, shape: Sequence[int], dtype: str = "float32",
                  initializer: str = "zeros") -> keras.Variable:
        """A non-trainable variable of the method that is not a network weight (an image pool,
        a counter, an EMA): saved with every checkpoint and resume state, restored on resume.
        Create it in `__init__`; update it in `train_step` with `.assign(...)`.

        Under a distribution strategy it is one value for all replicas: an assignment in the
        train step keeps the first replica's value on every replica (without it each replica's
        copy would drift apart, and a checkpoint would keep only one of them)."""
        return self.add_weight(name=name, shape=tuple(shape), dtype=dtype,
                               initializer=initializer, trainable=False,
                               aggregation="only_first_replica")

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

    def targets(self, labels: tf.Tensor) -> tf.Tensor:
        """Training targets of a class-index batch (B, *S): one-hot classes (B, *S, K), or
        region masks (B, *S, R) for region targets."""
        if self.data_spec.targets == "regions":
            return tf.gather(tf.constant(self.data_spec.region_table()), labels)
        return self.one_hot(labels)

    @property
    def activation(self) -> str:
        """"softmax" (classes) or "sigmoid" (regions): what the segmentor's logits go through."""
        return self.data_spec.activation

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
        y_true = self.targets(batch["label"])
        activation = self.activation
        return {"val_ce": keras.ops.mean(cross_entropy(y_true, logits, activation=activation)),
                "val_dice_loss": keras.ops.mean(
                    soft_dice_loss(y_true, logits, activation=activation))}


def probability_model(segmentor: keras.Model, data_spec: DataSpec,
                      name: str = "predictor") -> keras.Model:
    """images -> the segmentor's probabilities (softmax over classes, or one sigmoid per
    region), float32 whatever the compute dtype; shares the segmentor's layers."""
    inputs = keras.Input(data_spec.input_shape, name="image")
    logits = segmentor(inputs)
    probabilities = keras.layers.Activation(data_spec.activation, dtype="float32",
                                            name="probabilities")(logits)
    return keras.Model(inputs, probabilities, name=name)


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
