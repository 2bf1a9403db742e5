"""supervised: the baseline every other method is compared with — a U-Net trained on the labeled
images only.

Paper defaults, chosen by the data's dimensionality unless a field is set explicitly:
- 2D (Chaitanya et al., "Semi-supervised task-driven data augmentation for medical image
  segmentation", MedIA 2021): U-Net 16/32/64/128/256, batch norm, ReLU, max pooling, bilinear
  up-sampling (`networks.unet.PAPER_UNET_2D`); weighted cross-entropy with background 0.1 and 0.9
  shared by the foreground classes; Adam lr 1e-3; batch 20 slices (224×224 for ACDC — the crop is
  the dataset's preprocessing setting).
- 3D (Mondal, Dolz & Desrosiers, "Few-shot 3D multi-modal medical image segmentation using
  generative adversarial learning", 2018): the weight-normalised U-Net 32/64/128/256, leaky ReLU
  0.2, average pooling, transposed convolutions (`PAPER_UNET_3D`); class-weighted cross-entropy
  (the reference code's brain-tissue weights bg 0.33, CSF 1.5, GM 0.83, WM 1.33 when the classes
  are those tissues, else the 2D rule); Adam lr 1e-4, β1 0.5; batch 30 patches of 32³.

Losses: "ce", "weighted_ce", "dice" (soft Dice over the foreground classes), "dice_ce".
Region targets (e.g. BraTS whole tumour / tumour core / enhancing tumour): one sigmoid per region;
"ce" is then the per-region binary cross-entropy (the default: "weighted_ce" without explicit
region weights resolves to it, the U-Net comparator of SegAN), "dice" the soft Dice over every
region, "dice_ce" their sum; `class_weights` weigh the regions.
Network (`network`): "unet" (above, the default) or "segan": SegAN's segmentor
(`networks.segan_nets`: 4×4 stride-2 encoder 64/128/256/512, leaky ReLU, batch norm on all but the
first layer, ×2 resize + 3×3 conv decoder with skip connections; 2D only; `filters` are its
encoder widths, the other U-Net fields are ignored) — with region data and the default loss, the
U-Net comparator of SegAN (Xue et al., Neuroinformatics 2018): the same segmentor trained with
the per-region sigmoid cross-entropy alone.
Augmentation (`augment`): "none" or a "+"-joined subset of affine, elastic, flip, intensity
(applied by the input pipeline, same draw for image and label) and mixup (applied here, in the
train step, with λ ~ Beta(α, α), α = `mixup_alpha` = 0.2 as in the task-driven paper).
`augment_half` builds the batches as the task-driven paper built its random-augmentation
baselines (RD, RI, RD+RI, Mixup): half of each batch (the even positions) affine-only, the other
half (odd positions) with the named augmentation as well (`augment.is_half`, `augment.mixup_half`);
off (the default), every example gets the whole spec. The "paper" preset switches it on.
"""
from __future__ import annotations

import dataclasses

import keras
import tensorflow as tf

from tfseg.data import augment as augment_lib
from tfseg.losses import segmentation as losses
from tfseg.methods.base import DataSpec, SegMethod, global_mean, probability_model
from tfseg.networks import segan_nets, unet

# Few-shot 3D GAN reference code: class weights for brain tissues (iSEG / MRBrainS class names).
BRAIN_TISSUE_CLASS_WEIGHTS = {"background": 0.33, "csf": 1.5, "gm": 0.83, "wm": 1.33}


@dataclasses.dataclass(frozen=True)
class Config:
    """Supervised baseline settings. `None` = the paper default for the data's dimensionality.

    Attributes:
      filters, norm, activation, pooling, upsampling: U-Net architecture (`networks.unet`);
        norm "batch" | "instance" | "weight" | "none", upsampling "bilinear" | "transpose".
        network "segan" uses `filters` only (its encoder widths; default 64/128/256/512).
      loss: "ce" | "weighted_ce" | "dice" | "dice_ce"; "default" = the papers' loss for the
        data's dimensionality (`DEFAULT_LOSS`: the task-driven paper's weighted CE in 2D, the
        few-shot GAN paper's plain CE, eq. 4, in 3D).
      class_weights: per-class cross-entropy weights (weighted_ce, dice_ce); None = default.
      augment: "none" or e.g. "affine+elastic", "intensity", "mixup", "affine+mixup";
        "default" = `DEFAULT_AUGMENT` for the data's dimensionality (affine in 2D, none in 3D).
      mixup_alpha: Beta(α, α) parameter of mixup.
      augment_half: the non-affine part of `augment` (elastic, flip, intensity, mixup) touches
        only half of each batch, the other half is affine-only (the task-driven paper's
        random-augmentation baselines); False: every example gets all of `augment`.
      learning_rate, beta_1, beta_2: Adam.
      batch_size: labeled examples per (global) batch.
      steps: optimisation steps.
      validation_every: steps between validation rounds (best checkpoint selection).
      network: "unet" | "segan" (SegAN's segmentor, 2D; see the module docstring).
      batch_dice: the Dice term ("dice", "dice_ce") as batch Dice (sums over the batch too,
        `losses.soft_dice_loss(batch=True)`); None = True for region targets, whose slices
        are mostly tumour-free (per-example Dice then pushes every prediction to zero), False
        for classes (as before).
    """

    filters: tuple[int, ...] | None = None
    norm: str | None = None
    activation: str | None = None
    pooling: str | None = None
    upsampling: str | None = None
    loss: str = "weighted_ce"
    class_weights: tuple[float, ...] | None = None
    augment: str = "none"
    mixup_alpha: float = 0.2
    augment_half: bool = False
    learning_rate: float | None = None
    beta_1: float | None = None
    beta_2: float = 0.999
    batch_size: int | None = None
    steps: int = 10000
    validation_every: int = 500
    network: str = "unet"
    batch_dice: bool | None = None


PRESETS = {
    # `python -m launch.train --method=supervised --dataset=synthetic_cardiac --preset=quick`:
    # 2.3–2.7 min per run on 2 idle cores; test mean Dice 0.484 ± 0.128 over seven labeled
    # patients (per-run mean ± std, 0.316–0.640; docs/results/task_aug.md session 5, synthetic
    # data v1) — one run's figure (e.g. the README's 0.488) says little on its own. With one
    # labeled patient the plain U-Net overfits within a few hundred steps; the paper's affine
    # augmentation (the default here) is what makes 800 steps useful. `--set=augment=none` gives
    # the paper's "no augmentation" row. A seed reproduces a run exactly only on the same
    # hardware and thread count.
    "quick": {"filters": (8, 16, 32, 64), "batch_size": 8, "steps": 800,
              "validation_every": 100, "augment": "default"},
    # The task-driven paper's baselines (2D: U-Net 16…256, weighted CE, Adam 1e-3, batch 20, 10k
    # steps; the rows by `--set=augment=`: none, affine (Aff), affine+elastic (RD),
    # affine+intensity (RI), affine+elastic+intensity (RD+RI), affine+mixup (Mixup)), batches
    # half affine-only as the paper built them. Not run here at this size (CPU); at half
    # the quick preset's steps (400; docs/results/task_aug.md session 6, five labeled draws,
    # fixed test set, 2.3–5 min per run on loaded cores): Aff 0.467 ± 0.255 per run, half-batch
    # RD+RI 0.571 ± 0.261. In 3D the few-shot GAN paper's U-Net comparator: the weight-normalised
    # 3D U-Net 32…256 with the plain cross-entropy of its eq. 4 (loss "default"), no
    # augmentation, Adam 1e-4 / β1 0.5, batch 30 (five-draw study at the quick budget:
    # docs/results/fm_gan.md, U-Net 0.482 ± 0.102 per run with the 32³ tile).
    "paper": {"augment": "default", "augment_half": True, "loss": "default"},
}

# `loss="default"`: the papers' loss for the data's dimensionality.
DEFAULT_LOSS = {2: "weighted_ce", 3: "ce"}

# `augment="default"`: the conventional augmentation of the paper for the data's dimensionality.
# 2D: the task-driven paper's affine augmentation; 3D: none (the few-shot GAN paper used none).
DEFAULT_AUGMENT = {2: "affine", 3: "none"}

# Segmentor networks: the U-Net, or SegAN's segmentor (the paper's U-Net comparator).
NETWORKS = ("unet", "segan")

# What this method trains for: exclusive classes and overlapping regions (one sigmoid each).
TARGETS = ("classes", "regions")

_DEFAULTS = {
    2: {"norm": "batch", "activation": "relu", "pooling": "max", "upsampling": "bilinear",
        "learning_rate": 1e-3, "beta_1": 0.9, "batch_size": 20},
    3: {"norm": "weight", "activation": "leaky_relu", "pooling": "average",
        "upsampling": "transpose", "learning_rate": 1e-4, "beta_1": 0.5, "batch_size": 30},
}


def default_class_weights(data_spec: DataSpec) -> tuple[float, ...]:
    """The paper's class weights for these classes (see the module docstring)."""
    names = [n.lower() for n in data_spec.class_names]
    if data_spec.spatial_dims == 3 and all(n in BRAIN_TISSUE_CLASS_WEIGHTS for n in names):
        return tuple(BRAIN_TISSUE_CLASS_WEIGHTS[n] for n in names)
    return losses.task_driven_class_weights(data_spec.num_classes)


def resolve(config: Config, data_spec: DataSpec) -> Config:
    """Fills every `None` field with the default for `data_spec.spatial_dims`.

    Raises:
      ValueError: for an unknown loss or augmentation, bad class weights or batch size.
    """
    paper = unet.PAPER_UNET_2D if data_spec.spatial_dims == 2 else unet.PAPER_UNET_3D
    values = dict(_DEFAULTS[data_spec.spatial_dims], filters=paper.filters)
    if config.network not in NETWORKS:
        raise ValueError(f"supervised: network={config.network!r}; choose one of "
                         f"{list(NETWORKS)}.")
    if config.network == "segan":
        if type(config) is not Config or data_spec.spatial_dims != 2:
            raise ValueError("network=segan is a setting of --method=supervised on 2D data "
                             "(SegAN's segmentor is 2D); use network=unet here.")
        values["filters"] = segan_nets.PAPER_FILTERS
    regions = data_spec.targets == "regions"
    if config.loss == "default":
        config = dataclasses.replace(config, loss=DEFAULT_LOSS[data_spec.spatial_dims])
    if regions and config.loss == "weighted_ce" and config.class_weights is None:
        config = dataclasses.replace(config, loss="ce")  # per-region BCE: no class balance rule
    elif config.loss == "weighted_ce":  # dice_ce keeps an unweighted CE unless weights are set
        values["class_weights"] = default_class_weights(data_spec)
    values["batch_dice"] = regions
    changes = {k: v for k, v in values.items() if getattr(config, k, None) is None}
    if (config.augment or "").strip().lower() == "default":
        changes["augment"] = DEFAULT_AUGMENT[data_spec.spatial_dims]
    config = dataclasses.replace(config, **changes)
    if config.loss not in losses.LOSS_NAMES:
        raise ValueError(f"supervised: loss={config.loss!r}; choose one of "
                         f"{list(losses.LOSS_NAMES)}.")
    outputs = data_spec.region_names or data_spec.class_names
    if config.class_weights is not None and len(config.class_weights) != len(outputs):
        kind = "region" if regions else "class"
        raise ValueError(f"supervised: class_weights={config.class_weights} needs one weight per "
                         f"{kind} ({len(outputs)}: {', '.join(outputs)}).")
    pipeline_augment(config, data_spec.spatial_dims)  # checks the spec
    if config.batch_size < 1 or config.steps < 1 or config.validation_every < 1:
        raise ValueError("supervised: batch_size, steps and validation_every must be >= 1, got "
                         f"{config.batch_size}, {config.steps}, {config.validation_every}.")
    if config.mixup_alpha <= 0:
        raise ValueError(f"supervised: mixup_alpha must be > 0, got {config.mixup_alpha}.")
    return config


def network_config(config) -> unet.UNetConfig:
    """The segmentor U-Net of a config with supervised's network fields (filters, norm,
    activation, pooling, upsampling; also fm_gan's and self_training's)."""
    return unet.UNetConfig(filters=tuple(config.filters), norm=config.norm,
                           activation=config.activation, pooling=config.pooling,
                           upsampling=config.upsampling)


def pipeline_augment(config: Config, spatial_dims: int) -> str:
    """The part of `config.augment` the input pipeline applies (everything but mixup)."""
    parts = [p.strip() for p in (config.augment or "none").lower().split("+")]
    spec = "+".join(p for p in parts if p not in ("mixup", "none", "", augment_lib.HALF)) or "none"
    augment_lib.parse_spec(spec, spatial_dims)
    if getattr(config, "augment_half", False) and spec != "none":
        spec += "+" + augment_lib.HALF
    return spec


class Supervised(SegMethod):
    """U-Net trained with a (weighted) cross-entropy and/or Dice loss on labeled batches."""

    def __init__(self, config: Config, data_spec: DataSpec, **kwargs):
        config = resolve(config, data_spec)
        network = network_config(config)
        segmentor = build_segmentor(config, data_spec)
        terms = ("dice_loss", "ce_loss") if config.loss == "dice_ce" else ()
        super().__init__(config, data_spec, segmentor, labeled_batch_size=config.batch_size,
                         pipeline_augment=pipeline_augment(config, data_spec.spatial_dims),
                         size_multiple=segmentor_size_multiple(config),
                         loss_names=("loss", *terms, "seg_grad_norm"), **kwargs)
        self.network_config = network
        self.use_mixup = "mixup" in config.augment.lower().split("+")

    def make_optimizers(self):
        adam = keras.optimizers.Adam(self.config.learning_rate, beta_1=self.config.beta_1,
                                     beta_2=self.config.beta_2, name="seg_adam")
        return {"seg_optimizer": (adam, [self.segmentor])}

    def loss_terms(self, targets, logits) -> dict[str, tf.Tensor]:
        """Per-example loss terms (B,); "loss" is their total."""
        weights, activation = self.config.class_weights, self.activation
        batch = bool(self.config.batch_dice)
        if self.config.loss == "dice_ce":
            dice = losses.soft_dice_loss(targets, logits, activation=activation, batch=batch)
            ce = losses.cross_entropy(targets, logits, class_weights=weights,
                                      activation=activation)
            return {"loss": dice + ce, "dice_loss": dice, "ce_loss": ce}
        if self.config.loss == "dice":
            return {"loss": losses.soft_dice_loss(targets, logits, activation=activation,
                                                  batch=batch)}
        if self.config.loss == "ce":
            return {"loss": losses.cross_entropy(targets, logits, activation=activation)}
        return {"loss": losses.cross_entropy(targets, logits, class_weights=weights,
                                             activation=activation)}

    def labeled_batch(self, data):
        """Images (B, *S, C) and targets (B, *S, K|R) of the labeled batch, mixed up when the
        augmentation asks for it (mixup needs the one-hot targets, so it is done here)."""
        images = data["labeled"]["image"]
        targets = self.targets(data["labeled"]["label"])
        if self.use_mixup:
            mix = augment_lib.mixup_half if self.config.augment_half else augment_lib.mixup
            images, targets = mix(images, targets, self.config.mixup_alpha, self.next_seed())
        return images, targets

    def train_step(self, data):
        images, targets = self.labeled_batch(data)           # (B, *S, C), (B, *S, K)
        with tf.GradientTape() as tape:
            # 1. forward
            logits = self.segmentor(images, training=True)   # (B, *S, K) float32
            # 2. loss (per example, reduced with the global batch size)
            terms = self.loss_terms(targets, logits)
            loss = global_mean(terms["loss"])
        # 3. apply gradients
        grad_norm = self.apply_network_gradients("seg_optimizer", tape, loss)
        # 4. trackers
        return self.track(seg_grad_norm=grad_norm,
                          **{name: tf.reduce_mean(value) for name, value in terms.items()})


def segmentor_size_multiple(config: Config) -> int:
    """Spatial sizes the (resolved) config's segmentor accepts are multiples of this."""
    if config.network == "segan":
        return segan_nets.size_multiple(config.filters)
    return unet.size_multiple(network_config(config))


def build_segmentor(config: Config, data_spec: DataSpec) -> keras.Model:
    """The U-Net (or SegAN segmentor) of a (resolved or not) config: data_spec.num_outputs
    logits."""
    config = resolve(config, data_spec)
    if config.network == "segan":
        return segan_nets.build_segmentor(data_spec.input_shape, data_spec.num_outputs,
                                          config.filters, name="segmentor")
    return unet.build_unet(data_spec.input_shape, data_spec.num_outputs, network_config(config),
                           name="segmentor")


def build_predictor(config: Config, data_spec: DataSpec) -> keras.Model:
    """The exported network alone (no optimizer, no other network): the segmentor's
    probabilities."""
    return probability_model(build_segmentor(config, data_spec), data_spec)


def build(config: Config, data_spec: DataSpec) -> Supervised:
    """Builds the (uncompiled) supervised method for `data_spec`."""
    return Supervised(config, data_spec, name="supervised")
