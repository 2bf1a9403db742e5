"""dmnet: the difference minimisation network for semi-supervised segmentation.

Fang & Li, "DMNet: Difference Minimization Network for Semi-supervised Segmentation in Medical
Images", MICCAI 2020 (LNCS 12261).

- One encoder (ResNet-style; ResNet-101 in the paper, depth configurable) and two **different**
  decoders (`networks.dmnet_nets`): U-Net style (skip concatenation at every level) and
  DeepLabv3+ style (ASPP + one low-level skip, ×4 up-sampling). The segmentation is the
  **average of the two branches' probabilities** (`predictor`; `build_predictor` builds the same
  model for evaluation, export and predict).
- Labeled slices: Dice loss on both branches, L_dice = D(y, p¹) + D(y, p²) with
  D(a, b) = 1 − (1/K)·Σₖ (2Σ aₖbₖ + s)/(Σ aₖ + Σ bₖ + s) over all K classes (the paper's formula;
  s = `dice_smooth`, our addition, see below).
- Unlabeled slices: both softmax outputs sharpened per pixel, p^(1/T)/Σ p^(1/T) = softmax(l/T),
  T = 0.5, and L_semi = D(sharpen(p¹), sharpen(p²)); gradients flow into both branches (each
  decoder learns from the other).
- Adversary: a fully convolutional per-pixel discriminator on probability maps.
  L_D = BCE(D(p¹), 0) + BCE(D(p²), 0) + BCE(D(y), 1) (y one-hot, labeled batch); for S
  L_adv = BCE(D(p¹), 1) + BCE(D(p²), 1); p are the (unsharpened) softmax maps of every slice in the
  batch, labeled and unlabeled. L_S = L_dice + λ₁·L_adv + λ₂·L_semi, λ₁ = 0.01, λ₂ = 0.1. S and D
  are updated from the same forward pass (D's loss is differentiated w.r.t. D only).
- Adam: S lr 1e-4, D lr 1e-5; poly decay (1 − step/steps)^0.9 (`PolynomialDecay` over the run's
  `steps`); weight decay 5e-5. The paper's code base is PyTorch, where Adam's `weight_decay` is an
  **L2 penalty coupled into the gradient** (g + wd·w, before Adam's moment scaling), not AdamW's
  decoupled decay; so `weight_decay_mode="l2"` (default) adds ½·wd·Σw² of every trainable weight of
  the network to its loss. `"decoupled"` uses Keras Adam's `weight_decay` instead (w −= lr·wd·w,
  i.e. AdamW).
- Random horizontal flip p = 0.5, applied here in the step to labeled (image and label) and
  unlabeled slices alike (the pipeline's "flip" would leave the unlabeled stream unflipped).

Variants (`variant=`, the paper's ablations): "full"; "sup" (labeled slices only, Dice on both
branches, no adversary — no discriminator is built and there is no D optimizer); "sup_adv"
(labeled only, with the adversary); "separate_encoders" (one encoder per decoder); "no_sharpen"
(T = 1); "no_adv" (semi term, no adversary); "no_adv_no_sharpen".

Our choices where the paper is silent: `dice_smooth` s = 1 (with s → 0 the Dice of a class absent
from both maps of an unlabeled slice is 0/0-like and pushes the branches to predict it somewhere;
s = 1 scores two empty maps as agreeing); the batch size and number of iterations of the `paper`
preset are those of Hung et al.'s code base DMNet builds on (batch 10, 20 000 iterations), as the
paper does not state them; the discriminator's up-sampling widths (see the networks module).
"""
from __future__ import annotations

import dataclasses

import keras
import tensorflow as tf

from tfseg.data import augment as augment_lib
from tfseg.losses import gan as gan_losses
from tfseg.losses import segmentation as losses
from tfseg.methods.base import DataSpec, SegMethod, global_mean, num_replicas, probability_model
from tfseg.networks import dmnet_nets


@dataclasses.dataclass(frozen=True)
class Variant:
    """What a variant switches on."""

    semi: bool          # unlabeled slices and L_semi
    adversarial: bool   # discriminator, L_adv and L_D
    sharpen: bool       # T = temperature (else 1)
    separate_encoders: bool = False


VARIANTS = {
    "full": Variant(semi=True, adversarial=True, sharpen=True),
    "sup": Variant(semi=False, adversarial=False, sharpen=False),
    "sup_adv": Variant(semi=False, adversarial=True, sharpen=False),
    "separate_encoders": Variant(semi=True, adversarial=True, sharpen=True,
                                 separate_encoders=True),
    "no_sharpen": Variant(semi=True, adversarial=True, sharpen=False),
    "no_adv": Variant(semi=True, adversarial=False, sharpen=True),
    "no_adv_no_sharpen": Variant(semi=True, adversarial=False, sharpen=False),
}
WEIGHT_DECAY_MODES = ("l2", "decoupled")
STREAM_BATCHES = ("joint", "separate")


@dataclasses.dataclass(frozen=True)
class NetworkFields:
    """Network and schedule settings shared by dmnet and adv_seg (`networks.dmnet_nets`).

    Attributes:
      stem_filters, widths, blocks, expansion: the ResNet-style encoder (ResNet-101 by default).
      unet_filters: the U-Net decoder's five levels (1/16 … 1/1).
      aspp_filters, aspp_rates, low_level_filters, deeplab_filters: the DeepLabv3+ decoder.
      disc_filters: the discriminator's three stride-2 convs.
      poly_power: exponent of the poly learning-rate decay over `steps` (0: constant).
      flip_probability: random horizontal flip of every slice (in the step).
      augment: extra augmentation of the labeled slices by the input pipeline, "none" (the
        papers) or e.g. "intensity", "affine+intensity" (`tfseg.data.augment`).
      stream_batches: "joint" (labeled and unlabeled slices in one forward pass, one set of
        batch-norm statistics) or "separate" (one forward pass per stream).
      batch_size, unlabeled_batch_size: slices per step.
      steps, validation_every: the run.
    """

    stem_filters: int = 64
    widths: tuple[int, ...] = (64, 128, 256, 512)
    blocks: tuple[int, ...] = (3, 4, 23, 3)
    expansion: int = 4
    unet_filters: tuple[int, ...] = (256, 128, 64, 32, 16)
    aspp_filters: int = 256
    aspp_rates: tuple[int, ...] = (6, 12, 18)
    low_level_filters: int = 48
    deeplab_filters: int = 256
    disc_filters: tuple[int, ...] = (64, 128, 256)
    # The schedule both share (Hung et al.'s code base: batch 10, 20 000 iterations, poly 0.9).
    poly_power: float = 0.9
    flip_probability: float = 0.5
    augment: str = "none"
    stream_batches: str = "joint"
    batch_size: int = 10
    unlabeled_batch_size: int = 10
    steps: int = 20000
    validation_every: int = 1000


@dataclasses.dataclass(frozen=True)
class Config(NetworkFields):
    """DMNet settings (paper defaults; see the module docstring).

    Attributes:
      variant: one of VARIANTS.
      temperature: T of the sharpening.
      adversarial_weight: λ₁; semi_weight: λ₂.
      dice_smooth: s of both Dice terms.
      learning_rate, disc_learning_rate: Adam of S and D (β = `beta_1`, `beta_2`).
      weight_decay, weight_decay_mode: "l2" (PyTorch Adam's coupled L2) | "decoupled" (AdamW).
      (unlabeled_batch_size is unused by "sup" and "sup_adv".)
    """

    variant: str = "full"
    temperature: float = 0.5
    adversarial_weight: float = 0.01
    semi_weight: float = 0.1
    dice_smooth: float = 1.0
    learning_rate: float = 1e-4
    disc_learning_rate: float = 1e-5
    beta_1: float = 0.9
    beta_2: float = 0.999
    weight_decay: float = 5e-5
    weight_decay_mode: str = "l2"


# 2D slices, exclusive classes (binary tumour or K tissue classes, softmax).
SPATIAL_DIMS = (2,)
TARGETS = ("classes",)
MIN_EXAMPLE_SIZE = dmnet_nets.SIZE_MULTIPLE

QUICK_NETWORK = {"stem_filters": 8, "widths": (8, 16, 32, 64), "blocks": (1, 1, 1, 1),
                 "expansion": 2, "unet_filters": (64, 32, 16, 16, 8), "aspp_filters": 32,
                 "aspp_rates": (2, 4, 6), "low_level_filters": 8, "deeplab_filters": 32,
                 "disc_filters": (16, 32, 64)}

PRESETS = {
    # `python -m launch.train --method=dmnet --preset=paper --dataset=synthetic_tumor
    # --dataset_option=target=binary --dataset_option=modalities=t1,t1ce,t2`: ResNet-101 encoder,
    # batch 10 + 10, 20 000 steps (GPU-sized; not run on this machine).
    "paper": {"blocks": (3, 4, 23, 3), "batch_size": 10, "unlabeled_batch_size": 10,
              "learning_rate": 1e-4, "disc_learning_rate": 1e-5, "steps": 20000},
    # `python -m launch.train --method=dmnet --preset=quick --dataset=synthetic_tumor
    # --dataset_option=target=binary --dataset_option=modalities=t1,t1ce,t2 --labeled_fraction=0.1`:
    # 3.5-7 min wall per run on 2 cores shared by four engineers (load 9-13), test Dice 0.192 over
    # three labeled draws (0.114, 0.311, 0.151) vs 0.509 for --set=variant=sup, mIoU 0.42 vs 0.68
    # (docs/results/dmnet.md: the joint labeled+unlabeled batch is part of the cause;
    # --set=stream_batches=separate gives 0.285 over the same three draws, p 0.36 vs joint, still
    # below the sup variant). A seed reproduces a run exactly only on the same hardware and
    # thread count. With one labeled subject and
    # no intensity augmentation every variant keys on that subject's exact background value and
    # floods other subjects (val Dice 0.03), so quick adds the pipeline's intensity augmentation
    # of labeled slices (not in the paper).
    "quick": {**QUICK_NETWORK, "batch_size": 4, "unlabeled_batch_size": 4,
              "learning_rate": 1e-3, "disc_learning_rate": 1e-4, "augment": "intensity",
              "steps": 150, "validation_every": 50},
}


def resolve(config: Config, data_spec: DataSpec) -> Config:
    """Checks every field against the data.

    Raises:
      ValueError: naming the bad setting and the fix.
    """
    check_network(config, data_spec, "dmnet")
    if config.variant not in VARIANTS:
        raise ValueError(f"dmnet: variant={config.variant!r}; choose one of {list(VARIANTS)}.")
    if config.weight_decay_mode not in WEIGHT_DECAY_MODES:
        raise ValueError(f"dmnet: weight_decay_mode={config.weight_decay_mode!r}; choose one of "
                         f"{list(WEIGHT_DECAY_MODES)}.")
    if config.temperature <= 0:
        raise ValueError(f"dmnet: temperature must be > 0 (0.5 in the paper), got "
                         f"{config.temperature}.")
    check_training(config, "dmnet", ("adversarial_weight", "semi_weight", "dice_smooth",
                                     "weight_decay", "poly_power"))
    return config


def check_network(config: NetworkFields, data_spec: DataSpec, what: str) -> None:
    """The data is 2D classes of a size the encoder accepts; the network fields are valid."""
    dmnet_nets.check_size(data_spec.example_shape, what)
    if data_spec.targets != "classes":
        raise ValueError(f"{what} trains exclusive classes (softmax); the data asks for "
                         f"{data_spec.targets}. Use --dataset_option=target=binary (or classes).")
    try:
        encoder_config(config)
    except ValueError as error:
        raise ValueError(f"{what}: {error} Set it with --set=widths=… / --set=blocks=….") from None
    for name, count in (("unet_filters", 5), ("aspp_rates", 3), ("disc_filters", 3)):
        value = tuple(getattr(config, name))
        if len(value) != count or any(v < 1 for v in value):
            raise ValueError(f"{what}: {name}={value} needs {count} positive ints.")


def check_training(config, what: str, non_negative: tuple[str, ...]) -> None:
    """Batch sizes, steps, validation_every >= 1; flip probability in [0, 1]; the listed fields
    and the learning rates >= 0; a known 2D augmentation."""
    if config.stream_batches not in STREAM_BATCHES:
        raise ValueError(f"{what}: stream_batches={config.stream_batches!r}; choose one of "
                         f"{list(STREAM_BATCHES)}.")
    try:
        augment_lib.parse_spec(config.augment, 2)
    except ValueError as error:
        raise ValueError(f"{what}: augment={config.augment!r}: {error}") from None
    for name in ("batch_size", "unlabeled_batch_size", "steps", "validation_every"):
        if getattr(config, name) < 1:
            raise ValueError(f"{what}: {name} must be >= 1, got {getattr(config, name)}.")
    if not 0.0 <= config.flip_probability <= 1.0:
        raise ValueError(f"{what}: flip_probability must be in [0, 1], got "
                         f"{config.flip_probability}.")
    for name in (*non_negative, "learning_rate", "disc_learning_rate"):
        if getattr(config, name) < 0:
            raise ValueError(f"{what}: {name} must be >= 0, got {getattr(config, name)}.")


def encoder_config(config: NetworkFields) -> dmnet_nets.EncoderConfig:
    return dmnet_nets.EncoderConfig(stem_filters=config.stem_filters, widths=tuple(config.widths),
                                    blocks=tuple(config.blocks), expansion=config.expansion)


def branch_config(config: NetworkFields) -> dmnet_nets.BranchConfig:
    return dmnet_nets.BranchConfig(
        unet_filters=tuple(config.unet_filters), aspp_filters=config.aspp_filters,
        aspp_rates=tuple(config.aspp_rates), low_level_filters=config.low_level_filters,
        deeplab_filters=config.deeplab_filters)


def poly_schedule(learning_rate: float, steps: int, power: float):
    """lr·(1 − step/steps)^power (constant when power is 0)."""
    if power == 0:
        return learning_rate
    return keras.optimizers.schedules.PolynomialDecay(
        learning_rate, decay_steps=max(int(steps), 1), end_learning_rate=0.0, power=power)


def make_adam(config, learning_rate: float, name: str) -> keras.optimizers.Adam:
    """Adam with poly decay; Keras' decoupled weight decay only in "decoupled" mode."""
    decoupled = getattr(config, "weight_decay_mode", "l2") == "decoupled"
    return keras.optimizers.Adam(
        poly_schedule(learning_rate, config.steps, config.poly_power), beta_1=config.beta_1,
        beta_2=config.beta_2, weight_decay=config.weight_decay if decoupled else None,
        name=name)


def l2_penalty(networks, weight_decay: float) -> tf.Tensor:
    """½·wd·Σ w² over the networks' trainable weights, / replicas (the optimizer sums replicas'
    gradients): its gradient adds wd·w, PyTorch Adam's coupled weight decay."""
    squares = [tf.reduce_sum(tf.square(tf.cast(v, tf.float32)))
               for net in networks for v in net.trainable_variables]
    return 0.5 * weight_decay * tf.add_n(squares) / float(num_replicas())


def flip(images, labels, seed, probability: float):
    """Random left-right flip per example (image and label with the same draw)."""
    if probability <= 0:
        return images, labels
    return augment_lib.random_flip(images, labels, seed, probability)


def dice_loss(y_true, logits, smooth: float) -> tf.Tensor:
    """1 − (1/K)·Σₖ (2Σ y p + s)/(Σ y + Σ p + s) over all K classes, p = softmax(logits): (B,)."""
    return losses.soft_dice_loss(y_true, logits, smooth=smooth, include_background=True)


def sharpen(logits, temperature: float) -> tf.Tensor:
    """Per-pixel p^(1/T) / Σₖ p^(1/T) of p = softmax(logits), i.e. softmax(logits / T)."""
    return tf.nn.softmax(tf.cast(logits, tf.float32) / temperature, axis=-1)


def semi_dice_loss(first_logits, second_logits, temperature: float, smooth: float) -> tf.Tensor:
    """L_semi = 1 − (1/K)·Σₖ (2Σ q¹q² + s)/(Σ q¹ + Σ q² + s), qⁱ = sharpen(pⁱ): (B,).

    Differentiable w.r.t. both branches (the sharpened first map enters as `y_true`)."""
    return dice_loss(sharpen(first_logits, temperature),
                     tf.cast(second_logits, tf.float32) / temperature, smooth)


LOSS_NAMES = ("loss", "dice_loss", "semi_loss", "adv_loss", "disc_loss", "d_real_prob",
              "d_fake_prob", "seg_grad_norm", "disc_grad_norm")


class DMNet(SegMethod):
    """Shared encoder, U-Net and DeepLabv3+ decoders, per-pixel discriminator."""

    def __init__(self, config: Config, data_spec: DataSpec, **kwargs):
        config = resolve(config, data_spec)
        self.variant = VARIANTS[config.variant]
        branches, segmentor = build_segmentor(config, data_spec)
        super().__init__(config, data_spec, segmentor, labeled_batch_size=config.batch_size,
                         unlabeled_batch_size=config.unlabeled_batch_size
                         if self.variant.semi else 0, pipeline_augment=config.augment,
                         size_multiple=dmnet_nets.SIZE_MULTIPLE, loss_names=LOSS_NAMES,
                         predictor=probability_model(segmentor, data_spec), **kwargs)
        self.branches = branches
        self.discriminator = None
        if self.variant.adversarial:
            self.discriminator = dmnet_nets.build_discriminator(
                data_spec.num_classes, config.disc_filters, activation="relu")
        self.temperature = config.temperature if self.variant.sharpen else 1.0

    def make_optimizers(self):
        c = self.config
        optimizers = {"seg_optimizer": (make_adam(c, c.learning_rate, "seg_adam"),
                                        [self.branches])}
        if self.discriminator is not None:
            optimizers["disc_optimizer"] = (make_adam(c, c.disc_learning_rate, "disc_adam"),
                                            [self.discriminator])
        return optimizers

    def _l2(self, network):
        if self.config.weight_decay_mode != "l2" or not self.config.weight_decay:
            return 0.0
        return l2_penalty([network], self.config.weight_decay)

    def forward(self, inputs, batch):
        """Both branches' logits of [labeled; unlabeled]: one call ("joint": batch norm
        statistics over both streams), or one call per stream ("separate")."""
        if self.config.stream_batches == "joint" or not self.variant.semi:
            return self.branches(inputs, training=True)
        labeled = self.branches(inputs[:batch], training=True)
        unlabeled = self.branches(inputs[batch:], training=True)
        return [tf.concat([a, b], 0) for a, b in zip(labeled, unlabeled)]

    def adversarial_terms(self, first, second, targets):
        """D on [p¹; p²; y] in one pass. Returns (L_adv (N,) per example, L_D scalar, D(y) and
        D(p) mean probabilities)."""
        count = tf.shape(first)[0]
        probabilities = tf.concat([tf.nn.softmax(first), tf.nn.softmax(second)], 0)   # (2N, ..)
        outputs = self.discriminator(tf.concat([probabilities, targets], 0), training=True)
        fake_first, fake_second = outputs[:count], outputs[count:2 * count]
        real = outputs[2 * count:]
        adv = (gan_losses.generator_adversarial_loss(fake_first)
               + gan_losses.generator_adversarial_loss(fake_second))
        disc = (global_mean(gan_losses.discriminator_fake_loss(fake_first))
                + global_mean(gan_losses.discriminator_fake_loss(fake_second))
                + global_mean(gan_losses.discriminator_real_loss(real)))
        return (adv, disc, tf.reduce_mean(tf.sigmoid(real)),
                tf.reduce_mean(tf.sigmoid(outputs[:2 * count])))

    def train_step(self, data):
        c, variant = self.config, self.variant
        # 1. inputs: flip labeled (with labels) and unlabeled slices
        images, labels = flip(data["labeled"]["image"], data["labeled"]["label"],
                              self.next_seed(), c.flip_probability)
        targets = self.one_hot(labels)                                   # (B, H, W, K)
        batch = tf.shape(images)[0]
        inputs = images
        if variant.semi:
            unlabeled, _ = flip(data["unlabeled"]["image"], None, self.next_seed(),
                                c.flip_probability)
            inputs = tf.concat([images, unlabeled], 0)                   # (B + B', H, W, C)
        with tf.GradientTape(persistent=variant.adversarial) as tape:
            # 2. one forward pass of both branches over every slice (or one per stream)
            first, second = self.forward(inputs, batch)                  # 2 × (N, H, W, K)
            # 3. supervised Dice on both branches (labeled part)
            dice = (dice_loss(targets, first[:batch], c.dice_smooth)
                    + dice_loss(targets, second[:batch], c.dice_smooth))
            loss = global_mean(dice)
            values = {"dice_loss": tf.reduce_mean(dice)}
            # 4. difference minimisation between the sharpened branches (unlabeled part)
            if variant.semi:
                semi = semi_dice_loss(first[batch:], second[batch:], self.temperature,
                                      c.dice_smooth)
                loss += c.semi_weight * global_mean(semi)
                values["semi_loss"] = tf.reduce_mean(semi)
            # 5. adversary: S wants D(p) = real; D separates p from the one-hot labels
            if variant.adversarial:
                adv, disc_loss, real_prob, fake_prob = self.adversarial_terms(first, second,
                                                                              targets)
                loss += c.adversarial_weight * global_mean(adv)
                values.update(adv_loss=tf.reduce_mean(adv), disc_loss=disc_loss,
                              d_real_prob=real_prob, d_fake_prob=fake_prob)
                disc_objective = disc_loss + self._l2(self.discriminator)
            objective = loss + self._l2(self.branches)
        # 6. apply gradients (S and D from the same forward pass)
        values["seg_grad_norm"] = self.apply_network_gradients("seg_optimizer", tape, objective)
        if variant.adversarial:
            values["disc_grad_norm"] = self.apply_network_gradients("disc_optimizer", tape,
                                                                    disc_objective)
            del tape
        # 7. trackers ("loss" is L_S without the weight penalty)
        return self.track(loss=loss, **values)


def build_segmentor(config: Config, data_spec: DataSpec):
    """(branches: image -> [U-Net logits, DeepLab logits], segmentor: image -> log of their
    mean probability) for a config; the segmentor shares the branches' layers."""
    separate = VARIANTS[config.variant].separate_encoders if config.variant in VARIANTS else False
    branches = dmnet_nets.build_two_branch(data_spec.input_shape, data_spec.num_classes,
                                           encoder_config(config), branch_config(config),
                                           separate_encoders=separate)
    return branches, dmnet_nets.build_average_segmentor(branches, data_spec.input_shape)


def build_predictor(config: Config, data_spec: DataSpec) -> keras.Model:
    """The exported network alone: images -> mean of the two branches' probabilities."""
    config = resolve(config, data_spec)
    return probability_model(build_segmentor(config, data_spec)[1], data_spec)


def build(config: Config, data_spec: DataSpec) -> DMNet:
    """Builds the (uncompiled) DMNet method for `data_spec`."""
    return DMNet(config, data_spec, name="dmnet")
