"""self_training: train on the labeled images, pseudo-label the unlabeled ones, retrain.

The self-training baseline both the task-driven (Chaitanya et al., MedIA 2021) and the DMNet
(Fang & Li, MICCAI 2020) papers compare against, after Bai et al., "Semi-supervised learning for
network-based cardiac MR image segmentation" (MICCAI 2017): a network trained on the labeled
images predicts the unlabeled ones, and its predictions serve as labels for the next network.

Schedule (one `fit()` per stage, `stages()`):
- stage 0 "supervised": the supervised baseline (`tfseg.methods.supervised`: same U-Net, loss,
  augmentation and optimiser fields, so `--set=filters=…` means the same), `steps` steps, the
  best validation checkpoint kept. It draws no unlabeled batches, so with the same seed it
  repeats the `supervised` run (same initial weights, same pipeline settings; equal up to the
  input pipeline's run-to-run nondeterminism);
- stage r = 1..`rounds` "round<r>": `begin_stage` copies the segmentor — the previous stage's
  selected best checkpoint — into a frozen teacher (not trained by any optimizer; batch norm in
  inference mode), optionally re-initialises the student (`reinitialize_student`), and trains on
  labeled batches plus unlabeled batches labeled by the teacher:
      L = L_sup(labeled) + λ · mean over voxels [ m · w(ŷ) · CE(ŷ, student(x_u)) ],
  ŷ = argmax of the teacher's softmax, m = 1 where its maximum probability ≥
  `confidence_threshold` (0: every voxel), w the class weight of ŷ when the loss is class
  weighted. Pseudo-labels are computed on the fly each step from the frozen teacher — the same
  labels as a pseudo-labelled copy of the set, without storing one, and they also cover 3D
  patches drawn at random. Each round keeps its best validation checkpoint (the next teacher).

Differences from Bai et al.: no CRF refinement of the pseudo-labels (a confidence threshold is
offered instead, as in Hung et al.'s semi-supervised term); the student continues from the
teacher unless `reinitialize_student` is set (Adam's moments carry over either way).
"""
from __future__ import annotations

import dataclasses

import keras
import tensorflow as tf

from tfseg.losses import segmentation as losses
from tfseg.methods import supervised
from tfseg.methods.base import DataSpec, Stage, global_mean, probability_model
from tfseg.networks import unet


@dataclasses.dataclass(frozen=True)
class Config(supervised.Config):
    """Supervised fields (network, loss, augmentation, Adam, batch_size, steps = the first
    stage's steps, validation_every) plus the self-training rounds.

    Attributes:
      rounds: pseudo-labelling rounds after the supervised stage.
      round_steps: steps per round; None = `steps`.
      unlabeled_batch_size: unlabeled examples per batch in the rounds; None = `batch_size`.
      pseudo_label_weight: λ, the weight of the pseudo-label loss.
      confidence_threshold: voxels whose teacher probability (of its argmax class) is below this
        get no pseudo-label loss; 0 keeps every voxel.
      reinitialize_student: start every round from freshly initialised weights instead of the
        teacher's.
    """

    rounds: int = 2
    round_steps: int | None = None
    unlabeled_batch_size: int | None = None
    pseudo_label_weight: float = 1.0
    confidence_threshold: float = 0.0
    reinitialize_student: bool = False


PRESETS = {
    # `python -m launch.train --method=self_training --dataset=synthetic_cardiac --preset=quick`:
    # 11 min wall (6 min CPU, N4 preprocessing included) on 2 shared cores, test mean Dice 0.23.
    # 200 supervised steps + 2 rounds of 100 (a smoke-level budget: no augmentation). Five
    # labeled draws with affine augmentation and a U-Net 8…128 at this budget (docs/results/
    # task_aug.md session 7, float32): 0.264 ± 0.194 per run (0.02–0.50); the rounds lowered
    # the teacher's validation Dice in 3 of 4 draws, and the last round's checkpoint is exported.
    "quick": {"filters": (8, 16, 32, 64), "batch_size": 8, "steps": 200, "round_steps": 100,
              "validation_every": 100},
}


def resolve(config: Config, data_spec: DataSpec) -> Config:
    """Supervised defaults for the data's dimensionality, then the round settings checked.

    Raises:
      ValueError: naming the bad setting.
    """
    config = supervised.resolve(config, data_spec)
    changes = {}
    if config.unlabeled_batch_size is None:
        changes["unlabeled_batch_size"] = config.batch_size
    if config.round_steps is None:
        changes["round_steps"] = config.steps
    config = dataclasses.replace(config, **changes)
    if config.rounds < 0:
        raise ValueError(f"self_training: rounds must be >= 0, got {config.rounds}.")
    if config.round_steps < 1 or config.unlabeled_batch_size < 1:
        raise ValueError("self_training: round_steps and unlabeled_batch_size must be >= 1, got "
                         f"{config.round_steps}, {config.unlabeled_batch_size}.")
    if not 0.0 <= config.confidence_threshold <= 1.0:
        raise ValueError("self_training: confidence_threshold must be in [0, 1], got "
                         f"{config.confidence_threshold}.")
    if config.pseudo_label_weight < 0:
        raise ValueError("self_training: pseudo_label_weight must be >= 0, got "
                         f"{config.pseudo_label_weight}.")
    return config


def pseudo_label_loss(teacher_logits, student_logits, threshold: float,
                      class_weights=None) -> tuple[tf.Tensor, tf.Tensor]:
    """Confidence-masked cross-entropy of the student against the teacher's hard labels.

    Args:
      teacher_logits: (B, *S, K); no gradient flows into them.
      student_logits: (B, *S, K).
      threshold: voxels with max softmax probability of the teacher < threshold are masked.
      class_weights: None or K weights of the pseudo-label's class.

    Returns:
      (loss (B,): mean over all voxels of mask · w · CE, masked voxels counting as 0;
       kept (B,): the fraction of voxels kept).
    """
    probabilities = tf.nn.softmax(tf.stop_gradient(tf.cast(teacher_logits, tf.float32)))
    num_classes = probabilities.shape[-1]
    mask = tf.cast(tf.reduce_max(probabilities, axis=-1) >= threshold, tf.float32)  # (B, *S)
    targets = tf.one_hot(tf.argmax(probabilities, axis=-1), num_classes) * mask[..., None]
    # A masked voxel has an all-zero target, hence zero CE (and zero class weight).
    loss = losses.cross_entropy(targets, student_logits, class_weights=class_weights)
    kept = tf.reduce_mean(tf.reshape(mask, (tf.shape(mask)[0], -1)), axis=-1)
    return loss, kept


class SelfTraining(supervised.Supervised):
    """Supervised stage, then rounds of training against a frozen teacher's pseudo-labels."""

    def __init__(self, config: Config, data_spec: DataSpec, **kwargs):
        config = resolve(config, data_spec)
        super().__init__(config, data_spec, unlabeled_batch_size=config.unlabeled_batch_size,
                         **kwargs)
        # The trackers of the rounds are there from the start (Keras resets every tracker).
        self.loss_names = (*self.loss_names, "pseudo_loss", "pseudo_kept")
        for name in ("pseudo_loss", "pseudo_kept"):
            self.trackers[name] = keras.metrics.Mean(name=name)
        self.teacher = unet.build_unet(data_spec.input_shape, data_spec.num_classes,
                                       self.network_config, name="teacher")
        self.teacher.trainable = False
        self.round = 0  # 0: supervised stage; r >= 1: pseudo-label round r

    def stages(self) -> list[Stage]:
        return [Stage("supervised", int(self.config.steps), "train on the labeled images"),
                *[Stage(f"round{r}", int(self.config.round_steps),
                        f"self-training round {r}: labeled + teacher pseudo-labels")
                  for r in range(1, int(self.config.rounds) + 1)]]

    def begin_stage(self, stage: Stage) -> None:
        """Round r: freeze a copy of the segmentor as teacher; optionally re-init the student."""
        self.round = 0 if stage.name == "supervised" else int(stage.name[len("round"):])
        # No unlabeled stream in stage 0: its input pipeline is then configured exactly as the
        # supervised baseline's with the same seed (paired studies compare the rounds, not two
        # supervised runs fed differently).
        self.unlabeled_batch_size = self.config.unlabeled_batch_size if self.round else 0
        if self.round == 0:
            return
        self.teacher.set_weights(self.segmentor.get_weights())
        if self.config.reinitialize_student:
            fresh = unet.build_unet(self.data_spec.input_shape, self.data_spec.num_classes,
                                    self.network_config, name="fresh")
            self.segmentor.set_weights(fresh.get_weights())

    def train_step(self, data):
        images, targets = self.labeled_batch(data)           # (B, *S, C), (B, *S, K)
        pseudo = self.round > 0  # Python: the step is retraced for each stage
        if pseudo:
            # 1. pseudo-labels from the frozen teacher (inference mode, no gradient)
            unlabeled = data["unlabeled"]["image"]           # (B', *S, C)
            teacher_logits = tf.stop_gradient(self.teacher(unlabeled, training=False))
        with tf.GradientTape() as tape:
            # 2. one student forward pass over labeled (+ unlabeled) images
            batch = tf.shape(images)[0]
            inputs = tf.concat([images, unlabeled], axis=0) if pseudo else images
            all_logits = self.segmentor(inputs, training=True)  # (B [+ B'], *S, K)
            logits = all_logits[:batch]
            # 3. supervised loss on the labeled part, pseudo-label loss on the unlabeled part
            terms = self.loss_terms(targets, logits)
            loss = global_mean(terms["loss"])
            if pseudo:
                pseudo_loss, kept = pseudo_label_loss(
                    teacher_logits, all_logits[batch:], self.config.confidence_threshold,
                    self.config.class_weights if self.config.loss != "ce" else None)
                loss = loss + self.config.pseudo_label_weight * global_mean(pseudo_loss)
        # 4. apply gradients (the teacher belongs to no optimizer)
        grad_norm = self.apply_network_gradients("seg_optimizer", tape, loss)
        # 5. trackers (the pseudo terms only in the rounds)
        values = {name: tf.reduce_mean(value) for name, value in terms.items()}
        if pseudo:
            values.update(pseudo_loss=tf.reduce_mean(pseudo_loss),
                          pseudo_kept=tf.reduce_mean(kept))
        return self.track(seg_grad_norm=grad_norm, **values)


def build_predictor(config: Config, data_spec: DataSpec) -> keras.Model:
    """The exported network alone (no teacher, no optimizer)."""
    config = resolve(config, data_spec)
    segmentor = unet.build_unet(data_spec.input_shape, data_spec.num_classes,
                                supervised.network_config(config), name="segmentor")
    return probability_model(segmentor, data_spec)


def build(config: Config, data_spec: DataSpec) -> SelfTraining:
    """Builds the (uncompiled) self-training method for `data_spec`."""
    return SelfTraining(config, data_spec, name="self_training")
