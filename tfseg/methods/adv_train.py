"""adv_train: adversarial training, the "Adv tr" comparator of the task-driven augmentation paper.

Chaitanya et al., "Semi-supervised task-driven data augmentation for medical image segmentation"
(MedIA 2021) compare their learned augmentations with adversarial training; the published code
(github.com/krishnabits001/task_driven_data_augmentation) has no implementation of it. We read
"Adv tr" as virtual adversarial training (VAT: Miyato, Maeda, Koyama & Ishii, "Virtual
adversarial training: a regularization method for supervised and semi-supervised learning",
IEEE TPAMI 2018), the semi-supervised adversarial training the paper cites; this identification
is ours (the paper's text gives no hyperparameters for it).

- Segmentor, loss, augmentation and optimiser are the supervised baseline's
  (`tfseg.methods.supervised`: same fields, same defaults for the data's dimensionality), so an
  `Adv tr` arm differs from `Aff` only by the VAT term.
- Each step: S runs once on [labeled; unlabeled] images (one batch-norm batch); p = softmax of
  that pass (no gradient). A random unit direction d is refined by `power_iterations` steps of
  d ← normalise(∇_d KL(p ‖ S(x + ξ·d))) (one power iteration approximates the direction that
  changes the prediction most); r_adv = ε·d.
- L = L_sup(labeled) + α · mean over the examples of the per-voxel mean KL(p ‖ S(x + r_adv)).
  The KL is taken on labeled and unlabeled images (`use_unlabeled`; off: labeled only).
- ε and ξ are given as the RMS per input value (‖r‖₂ = ε·sqrt(number of input values)), so one
  setting means the same on 128² and 224² slices; Miyato et al. state the L2 norm of the whole
  input. ε = 0.05 is 5 % of the percentile-normalised range (p2..p98 -> 0..1) per value; ξ = 1e-3
  is small enough for the finite difference to be linear, large enough to survive float32.
- The perturbed passes run in training mode (batch statistics), as the clean one, so each step
  also moves the batch-norm averages three times (they see near-identical batches).

Tracked: loss (the total), seg_loss (the supervised term), vat_loss (the KL term before α), the
supervised loss's own parts (dice_ce) and seg_grad_norm.
"""
from __future__ import annotations

import dataclasses

import keras
import tensorflow as tf

from tfseg.methods import supervised
from tfseg.methods.base import DataSpec, global_mean


@dataclasses.dataclass(frozen=True)
class Config(supervised.Config):
    """Supervised fields (network, loss, augmentation, Adam, batch_size, steps,
    validation_every) plus the adversarial term.

    Attributes:
      vat_weight: α, the weight of the KL term.
      vat_epsilon: ε, the perturbation's RMS per input value.
      vat_xi: ξ, the finite-difference step's RMS per input value.
      power_iterations: refinements of the adversarial direction (Miyato et al.: 1).
      use_unlabeled: the KL term also on unlabeled images (semi-supervised VAT); False: on the
        labeled batch only (no unlabeled stream).
      unlabeled_batch_size: unlabeled images per batch; None = batch_size.
    """

    vat_weight: float = 1.0
    vat_epsilon: float = 0.05
    vat_xi: float = 1e-3
    power_iterations: int = 1
    use_unlabeled: bool = True
    unlabeled_batch_size: int | None = None


PRESETS = {
    # `python -m launch.train --method=adv_train --dataset=synthetic_cardiac --preset=quick`:
    # the supervised quick preset's budget (800 steps, batch 8) plus 8 unlabeled slices a step,
    # three segmentor passes per step (clean, power iteration, adversarial). At half these steps
    # (400, U-Net 8…128, five labeled draws on one fixed test set, float32; docs/results/
    # task_aug.md session 7): test mean Dice 0.246 ± 0.223 per run (0.04–0.61), below affine-only
    # supervised (0.467) at that budget; 254–401 s per run on 2 shared cores. A seed reproduces
    # a run exactly only on the same hardware and thread count.
    "quick": {"filters": (8, 16, 32, 64), "batch_size": 8, "unlabeled_batch_size": 8,
              "steps": 800, "validation_every": 100, "augment": "default"},
    # The task-driven paper's baseline settings (U-Net 16…256, weighted CE, Adam 1e-3, batch 20,
    # affine augmentation, 10k steps) with the VAT term; not run here at this size (CPU).
    "paper": {"augment": "default"},
}

TARGETS = ("classes",)


def resolve(config: Config, data_spec: DataSpec) -> Config:
    """Supervised defaults for the data's dimensionality, then the VAT settings checked.

    Raises:
      ValueError: naming the bad setting and what it accepts.
    """
    if data_spec.targets != "classes":
        raise ValueError("adv_train: region targets are not supported (its KL term compares "
                         "softmax distributions); use --dataset_option=target=... with classes "
                         "or --method=supervised.")
    config = supervised.resolve(config, data_spec)
    if config.unlabeled_batch_size is None:
        config = dataclasses.replace(config, unlabeled_batch_size=config.batch_size)
    if config.vat_weight < 0:
        raise ValueError(f"adv_train: vat_weight={config.vat_weight} must be >= 0.")
    if config.vat_epsilon <= 0 or config.vat_xi <= 0:
        raise ValueError(f"adv_train: vat_epsilon={config.vat_epsilon} and vat_xi="
                         f"{config.vat_xi} must be > 0 (RMS per input value, e.g. 0.05 and "
                         "1e-3).")
    if config.power_iterations < 1:
        raise ValueError(f"adv_train: power_iterations={config.power_iterations} must be >= 1.")
    if config.use_unlabeled and config.unlabeled_batch_size < 1:
        raise ValueError(f"adv_train: unlabeled_batch_size={config.unlabeled_batch_size} must "
                         "be >= 1 (or set use_unlabeled=false).")
    return config


def kl_divergence(probabilities, logits) -> tf.Tensor:
    """Per example (B,): the mean over voxels of KL(p ‖ softmax(logits)).

    Args:
      probabilities: (B, *S, K) the reference distribution p (treated as a constant).
      logits: (B, *S, K).
    """
    p = tf.cast(probabilities, tf.float32)
    log_q = tf.nn.log_softmax(tf.cast(logits, tf.float32), axis=-1)
    log_p = tf.math.log(tf.maximum(p, 1e-12))                    # 0 · log 0 counts as 0
    voxel = tf.reduce_sum(p * (log_p - log_q), axis=-1)          # (B, *S)
    return tf.reduce_mean(voxel, axis=list(range(1, voxel.shape.rank)))


def unit_rms(direction) -> tf.Tensor:
    """Scales each example of (B, ...) to RMS 1 over its values (zero stays zero)."""
    axes = list(range(1, direction.shape.rank))
    largest = tf.reduce_max(tf.abs(direction), axis=axes, keepdims=True)
    direction = direction / tf.where(largest > 0, largest, 1.0)   # tiny gradients: no underflow
    rms = tf.sqrt(tf.reduce_mean(tf.square(direction), axis=axes, keepdims=True))
    return direction / (rms + 1e-12)


class AdvTrain(supervised.Supervised):
    """Supervised baseline plus the virtual adversarial (KL) term on labeled + unlabeled images."""

    def __init__(self, config: Config, data_spec: DataSpec, **kwargs):
        config = resolve(config, data_spec)
        super().__init__(config, data_spec,
                         unlabeled_batch_size=(config.unlabeled_batch_size
                                               if config.use_unlabeled else 0), **kwargs)
        self.loss_names = (*self.loss_names, "seg_loss", "vat_loss")
        for name in ("seg_loss", "vat_loss"):
            self.trackers[name] = keras.metrics.Mean(name=name)

    def adversarial_perturbation(self, images, probabilities) -> tf.Tensor:
        """r_adv (B, *S, C): ε times the power-iterated direction of the largest KL change."""
        c = self.config
        direction = unit_rms(tf.random.stateless_normal(tf.shape(images), self.next_seed()))
        for _ in range(int(c.power_iterations)):
            with tf.GradientTape() as tape:
                tape.watch(direction)
                logits = self.segmentor(images + c.vat_xi * direction, training=True)
                distance = tf.reduce_sum(kl_divergence(probabilities, logits))
            direction = unit_rms(tf.stop_gradient(tape.gradient(distance, direction)))
        return c.vat_epsilon * direction

    def train_step(self, data):
        images, targets = self.labeled_batch(data)          # (B, *S, C), (B, *S, K)
        batch = tf.shape(images)[0]
        inputs = (tf.concat([images, data["unlabeled"]["image"]], axis=0)
                  if self.config.use_unlabeled else images)  # (B [+ B'], *S, C)
        with tf.GradientTape() as tape:
            # 1. one clean pass over labeled (+ unlabeled) images; supervised loss on the labeled
            all_logits = self.segmentor(inputs, training=True)
            terms = self.loss_terms(targets, all_logits[:batch])
            probabilities = tf.stop_gradient(tf.nn.softmax(tf.cast(all_logits, tf.float32)))
            # 2. the adversarial direction (its own tape; not part of the loss's graph)
            with tape.stop_recording():
                perturbation = self.adversarial_perturbation(inputs, probabilities)
            # 3. KL between the clean prediction and the prediction on x + r_adv
            vat = kl_divergence(probabilities,
                                self.segmentor(inputs + perturbation, training=True))
            loss = global_mean(terms["loss"]) + self.config.vat_weight * global_mean(vat)
        # 4. apply gradients
        grad_norm = self.apply_network_gradients("seg_optimizer", tape, loss)
        # 5. trackers
        values = {name: tf.reduce_mean(value) for name, value in terms.items()}
        values["seg_loss"] = values["loss"]
        values["vat_loss"] = tf.reduce_mean(vat)
        values["loss"] = values["seg_loss"] + self.config.vat_weight * values["vat_loss"]
        return self.track(seg_grad_norm=grad_norm, **values)


def build_predictor(config: Config, data_spec: DataSpec) -> keras.Model:
    """The exported network alone: the segmentor's probabilities."""
    return supervised.build_predictor(resolve(config, data_spec), data_spec)


def build(config: Config, data_spec: DataSpec) -> AdvTrain:
    """Builds the (uncompiled) adversarial-training method for `data_spec`."""
    return AdvTrain(config, data_spec, name="adv_train")
