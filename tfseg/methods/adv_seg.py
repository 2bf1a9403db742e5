"""adv_seg: pixel-level adversarial semi-supervised segmentation.

Hung, Tsai, Liou, Lin & Yang, "Adversarial Learning for Semi-Supervised Semantic Segmentation",
BMVC 2018. The baseline DMNet (Fang & Li, MICCAI 2020) builds on and compares with.

- Segmentor S: our ResNet-style encoder + DeepLabv3+-style decoder, i.e. exactly DMNet's DeepLab
  branch (`networks.dmnet_nets.build_deeplab_segmentor`, the same `NetworkFields` as dmnet), so
  the two methods differ only by what they train. (Hung et al. used DeepLab-v2 on ResNet-101
  pre-trained on ImageNet/COCO; nothing is pre-trained here.)
- Discriminator D: fully convolutional on probability maps (softmax of S, or one-hot labels),
  per-pixel real/fake logit up-sampled to the input size (`build_discriminator`, leaky ReLU 0.2
  as Hung et al.). L_D = BCE(D(S(x_l)), 0) + BCE(D(S(x_u)), 0) + BCE(D(y), 1) (the unlabeled fake
  term is their default `D_remain`).
- S's loss: L_seg(labeled) + λ_adv·BCE(D(S(x_l)), 1) + λ_adv,u·BCE(D(S(x_u)), 1)
  + λ_semi·L_semi, λ_adv = 0.01, λ_adv,u = 0.001, λ_semi = 0.1. L_semi: confidence-masked
  self-training — pixels of an unlabeled slice where D(S(x_u)) > 0.2 (`semi_threshold`) get the
  cross-entropy against S's own argmax (both detached), averaged over those pixels (per slice; a
  slice without any gets 0). It starts after `semi_start` steps (5 000 of 20 000 in Hung et al.;
  scaled down in the quick preset): before that its weight is 0.
- L_seg: cross-entropy ("ce", Hung et al.) or DMNet's Dice ("dice", all K classes, smooth 1),
  for a comparison with DMNet that differs only in the semi-supervised part.
- Optimisers (Hung et al.'s code): S SGD lr 2.5e-4, momentum 0.9, weight decay 5e-4 (L2 added to
  the gradient, as PyTorch's SGD does); D Adam lr 1e-4, β = (0.9, 0.99); both with poly decay
  power 0.9 over `steps`. Batch 10, 20 000 iterations. Random horizontal flip p = 0.5 in the
  step (Hung et al. also randomly rescaled; not done here). `stream_batches`: labeled and
  unlabeled slices in one forward pass ("joint", default) or one pass each ("separate"; see
  docs/results/dmnet.md for why it matters with one labeled subject). The quick preset uses Adam for S
  (SGD at 2.5e-4 barely moves a network trained from scratch in a few hundred steps).
"""
from __future__ import annotations

import dataclasses

import keras
import tensorflow as tf

from tfseg.losses import gan as gan_losses
from tfseg.losses import segmentation as losses
from tfseg.methods import dmnet
from tfseg.methods.base import DataSpec, SegMethod, global_mean, probability_model
from tfseg.networks import dmnet_nets

OPTIMIZERS = ("sgd", "adam")
SEG_LOSSES = ("ce", "dice")


@dataclasses.dataclass(frozen=True)
class Config(dmnet.NetworkFields):
    """adv_seg settings (Hung et al.'s defaults; network fields as dmnet's).

    Attributes:
      disc_activation: "leaky_relu" (Hung et al.) or "relu" (DMNet's discriminator).
      seg_loss: "ce" | "dice".
      adversarial_weight: λ_adv (labeled); unlabeled_adversarial_weight: λ_adv,u.
      semi_weight: λ_semi; semi_threshold: D-confidence threshold; semi_start: first step of
        the semi term.
      optimizer: "sgd" (momentum) or "adam" for S; learning_rate, momentum, weight_decay (L2,
        S only); disc_learning_rate, beta_1, beta_2: D's Adam (β also for S when "adam").
      poly_power: poly learning-rate decay over `steps` (0: constant).
      flip_probability: random horizontal flip.
      batch_size, unlabeled_batch_size, steps, validation_every.
    """

    disc_activation: str = "leaky_relu"
    seg_loss: str = "ce"
    adversarial_weight: float = 0.01
    unlabeled_adversarial_weight: float = 0.001
    semi_weight: float = 0.1
    semi_threshold: float = 0.2
    semi_start: int = 5000
    optimizer: str = "sgd"
    learning_rate: float = 2.5e-4
    momentum: float = 0.9
    weight_decay: float = 5e-4
    disc_learning_rate: float = 1e-4
    beta_1: float = 0.9
    beta_2: float = 0.99


SPATIAL_DIMS = dmnet.SPATIAL_DIMS          # 2D slices
TARGETS = dmnet.TARGETS                    # exclusive classes (softmax)
MIN_EXAMPLE_SIZE = dmnet.MIN_EXAMPLE_SIZE

PRESETS = {
    # `python -m launch.train --method=adv_seg --preset=paper --dataset=synthetic_tumor
    # --dataset_option=target=binary --dataset_option=modalities=t1,t1ce,t2`: ResNet-101 encoder,
    # SGD 2.5e-4, batch 10 + 10, 20 000 steps, semi term from step 5 000 (GPU-sized; not run here).
    "paper": {"blocks": (3, 4, 23, 3), "optimizer": "sgd", "learning_rate": 2.5e-4,
              "batch_size": 10, "unlabeled_batch_size": 10, "steps": 20000, "semi_start": 5000},
    # `python -m launch.train --method=adv_seg --preset=quick --dataset=synthetic_tumor
    # --dataset_option=target=binary --dataset_option=modalities=t1,t1ce,t2 --labeled_fraction=0.1`:
    # 2-4 min wall per run on 2 shared cores (load 9-13), test Dice 0.227 over three labeled draws
    # (0.437, 0.154, 0.090) vs 0.509 for dmnet's supervised variant (docs/results/dmnet.md).
    # Adam instead of SGD and intensity augmentation (dmnet's quick preset explains why).
    "quick": {**dmnet.QUICK_NETWORK, "optimizer": "adam", "learning_rate": 1e-3,
              "weight_decay": 5e-5, "disc_learning_rate": 1e-4, "augment": "intensity",
              "batch_size": 4, "unlabeled_batch_size": 4, "steps": 150, "semi_start": 40,
              "validation_every": 50},
}


def resolve(config: Config, data_spec: DataSpec) -> Config:
    """Checks every field against the data.

    Raises:
      ValueError: naming the bad setting and the fix.
    """
    dmnet.check_network(config, data_spec, "adv_seg")
    for name, allowed in (("optimizer", OPTIMIZERS), ("seg_loss", SEG_LOSSES),
                          ("disc_activation", ("relu", "leaky_relu"))):
        if getattr(config, name) not in allowed:
            raise ValueError(f"adv_seg: {name}={getattr(config, name)!r}; choose one of "
                             f"{list(allowed)}.")
    if not 0.0 <= config.semi_threshold <= 1.0:
        raise ValueError(f"adv_seg: semi_threshold must be in [0, 1] (0.2 in the paper), got "
                         f"{config.semi_threshold}.")
    dmnet.check_training(config, "adv_seg", (
        "adversarial_weight", "unlabeled_adversarial_weight", "semi_weight", "semi_start",
        "weight_decay", "momentum", "poly_power"))
    return config


def confident_self_training_loss(logits, confidence_logits, threshold: float) -> tf.Tensor:
    """Hung et al.'s semi loss: CE against S's own argmax on pixels where D's confidence
    sigmoid(confidence_logits) > threshold, averaged over those pixels per slice (0 if none).

    Args:
      logits: (B, H, W, K) segmentor logits of unlabeled slices.
      confidence_logits: (B, H, W, 1) discriminator logits of their softmax maps (no gradient).
      threshold: T_semi.

    Returns:
      (B,) float32.
    """
    logits = tf.cast(logits, tf.float32)
    mask = tf.cast(tf.sigmoid(tf.stop_gradient(tf.cast(confidence_logits, tf.float32)))[..., 0]
                   > threshold, tf.float32)                                      # (B, H, W)
    pseudo = tf.stop_gradient(tf.one_hot(tf.argmax(logits, -1), tf.shape(logits)[-1]))
    voxel_ce = -tf.reduce_sum(pseudo * tf.nn.log_softmax(logits, -1), -1)         # (B, H, W)
    kept = tf.reduce_sum(mask, axis=[1, 2])
    return tf.reduce_sum(mask * voxel_ce, axis=[1, 2]) / tf.maximum(kept, 1.0)


LOSS_NAMES = ("loss", "seg_loss", "adv_loss", "adv_unlabeled_loss", "semi_loss", "semi_kept",
              "disc_loss", "d_real_prob", "d_fake_prob", "seg_grad_norm", "disc_grad_norm")


class AdvSeg(SegMethod):
    """One segmentor, a per-pixel discriminator, D-confidence-masked self-training."""

    def __init__(self, config: Config, data_spec: DataSpec, **kwargs):
        config = resolve(config, data_spec)
        super().__init__(config, data_spec, build_segmentor(config, data_spec),
                         labeled_batch_size=config.batch_size,
                         unlabeled_batch_size=config.unlabeled_batch_size,
                         pipeline_augment=config.augment,
                         size_multiple=dmnet_nets.SIZE_MULTIPLE, loss_names=LOSS_NAMES, **kwargs)
        self.discriminator = dmnet_nets.build_discriminator(
            data_spec.num_classes, config.disc_filters, activation=config.disc_activation)

    def make_optimizers(self):
        c = self.config
        schedule = dmnet.poly_schedule(c.learning_rate, c.steps, c.poly_power)
        if c.optimizer == "sgd":
            seg = keras.optimizers.SGD(schedule, momentum=c.momentum, name="seg_sgd")
        else:
            seg = keras.optimizers.Adam(schedule, beta_1=c.beta_1, beta_2=c.beta_2,
                                        name="seg_adam")
        disc = keras.optimizers.Adam(
            dmnet.poly_schedule(c.disc_learning_rate, c.steps, c.poly_power), beta_1=c.beta_1,
            beta_2=c.beta_2, name="disc_adam")
        return {"seg_optimizer": (seg, [self.segmentor]),
                "disc_optimizer": (disc, [self.discriminator])}

    def forward(self, images, unlabeled):
        """S's logits of [labeled; unlabeled]: one call ("joint", batch-norm statistics of both
        streams) or one per stream ("separate")."""
        if self.config.stream_batches == "separate":
            return tf.concat([self.segmentor(images, training=True),
                              self.segmentor(unlabeled, training=True)], 0)
        return self.segmentor(tf.concat([images, unlabeled], 0), training=True)

    def seg_loss(self, targets, logits) -> tf.Tensor:
        if self.config.seg_loss == "dice":
            return dmnet.dice_loss(targets, logits, 1.0)
        return losses.cross_entropy(targets, logits)

    def train_step(self, data):
        c = self.config
        # 1. inputs: flipped labeled and unlabeled slices
        images, labels = dmnet.flip(data["labeled"]["image"], data["labeled"]["label"],
                                    self.next_seed(), c.flip_probability)
        unlabeled, _ = dmnet.flip(data["unlabeled"]["image"], None, self.next_seed(),
                                  c.flip_probability)
        targets = self.one_hot(labels)                                   # (B, H, W, K)
        batch, total = tf.shape(images)[0], tf.shape(images)[0] + tf.shape(unlabeled)[0]
        # The semi term is off for the first semi_start steps (weight 0, same graph).
        semi_on = tf.cast(self.seg_optimizer.iterations >= c.semi_start, tf.float32)
        with tf.GradientTape(persistent=True) as tape:
            # 2. one forward pass of S over labeled + unlabeled, one of D over [p_l; p_u; y]
            logits = self.forward(images, unlabeled)                       # (B + B', H, W, K)
            probabilities = tf.nn.softmax(logits)
            outputs = self.discriminator(tf.concat([probabilities, targets], 0), training=True)
            fake_labeled, fake_unlabeled = outputs[:batch], outputs[batch:total]
            real = outputs[total:]
            # 3. S: supervised + adversarial (labeled, unlabeled) + confident self-training
            seg = self.seg_loss(targets, logits[:batch])
            adv = gan_losses.generator_adversarial_loss(fake_labeled)
            adv_unlabeled = gan_losses.generator_adversarial_loss(fake_unlabeled)
            semi = confident_self_training_loss(logits[batch:], fake_unlabeled,
                                                c.semi_threshold)
            loss = (global_mean(seg) + c.adversarial_weight * global_mean(adv)
                    + c.unlabeled_adversarial_weight * global_mean(adv_unlabeled)
                    + semi_on * c.semi_weight * global_mean(semi))
            objective = loss
            if c.weight_decay:  # coupled L2 (PyTorch SGD/Adam weight_decay)
                objective += dmnet.l2_penalty([self.segmentor], c.weight_decay)
            # 4. D: predictions fake, one-hot labels real
            disc_loss = (global_mean(gan_losses.discriminator_fake_loss(fake_labeled))
                         + global_mean(gan_losses.discriminator_fake_loss(fake_unlabeled))
                         + global_mean(gan_losses.discriminator_real_loss(real)))
        # 5. apply gradients
        seg_norm = self.apply_network_gradients("seg_optimizer", tape, objective)
        disc_norm = self.apply_network_gradients("disc_optimizer", tape, disc_loss)
        del tape
        kept = tf.reduce_mean(tf.cast(tf.sigmoid(fake_unlabeled) > c.semi_threshold, tf.float32))
        return self.track(loss=loss, seg_loss=tf.reduce_mean(seg), adv_loss=tf.reduce_mean(adv),
                          adv_unlabeled_loss=tf.reduce_mean(adv_unlabeled),
                          semi_loss=tf.reduce_mean(semi) * semi_on, semi_kept=kept,
                          disc_loss=disc_loss, d_real_prob=tf.reduce_mean(tf.sigmoid(real)),
                          d_fake_prob=tf.reduce_mean(tf.sigmoid(outputs[:total])),
                          seg_grad_norm=seg_norm, disc_grad_norm=disc_norm)


def build_segmentor(config: Config, data_spec: DataSpec) -> keras.Model:
    return dmnet_nets.build_deeplab_segmentor(data_spec.input_shape, data_spec.num_classes,
                                              dmnet.encoder_config(config),
                                              dmnet.branch_config(config))


def build_predictor(config: Config, data_spec: DataSpec) -> keras.Model:
    """The exported network alone (no discriminator): the segmentor's probabilities."""
    return probability_model(build_segmentor(resolve(config, data_spec), data_spec), data_spec)


def build(config: Config, data_spec: DataSpec) -> AdvSeg:
    """Builds the (uncompiled) adv_seg method for `data_spec`."""
    return AdvSeg(config, data_spec, name="adv_seg")
