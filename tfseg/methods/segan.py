"""segan: a segmentor trained against a critic with a multi-scale L1 loss.

Paper: Y. Xue, T. Xu, H. Zhang, L. R. Long, X. Huang, "SegAN: Adversarial Network with
Multi-scale L1 Loss for Medical Image Segmentation", Neuroinformatics 16:383–392 (2018).

Key ideas:
- Segmentor S (`networks.segan_nets.build_segmentor`): encoder of 4×4 stride-2 convs
  64/128/256/512 (leaky ReLU, batch norm on all but the first), decoder of ×2 resize + 3×3 conv
  blocks with skip connections; one sigmoid per region (regions data) or a softmax over the
  classes (classes data).
- Critic C (`build_critic`): the same encoder shape on the image multiplied channel-wise by a
  label map, the prediction S(x) or the ground truth y. Its features are the outputs of every
  layer, the masked input included.
- Multi-scale L1 loss (`multiscale_l1`): L = mean over the layers of the mean |f_C(x∘S(x)) −
  f_C(x∘y)|. Per train step: 1. one critic step maximising L, then every critic weight clipped
  to [−c, c] (`clip_value`; 0.01 is the value the paper's text gives, the public skin-lesion
  code used 0.05); 2. one segmentor step minimising L against the updated critic (+
  `dice_weight` × soft Dice, 0 in the paper: S learns from the critic's gradients only).
  RMSProp lr 2e-5 for both (paper), batch 64.
- Variants (`variant`): "S1-1C" one label map and one critic; "S3-1C" one map per region, the
  masked images concatenated channel-wise into one critic; "S3-3C" one critic per region's
  masked image, their losses averaged.

S1-1C's one map (`s1_map`): by default the union of the foreground — for BraTS regions the whole
tumour (it is the union of the three regions; the first, outermost, region), for classes data
1 − p(background). The paper trained one S1-1C model per region; here the segmentor still has
one output per region (evaluation scores every region), and with S1-1C the regions other than
the critic's map learn only from the optional soft Dice term (`dice_weight`): set `s1_map` to a
region (e.g. `tumour_core`) to train and read that region as the paper did.

Choices where the paper leaves room (and the public code differs):
- the critic sees the prediction and the ground truth in ONE pass over their concatenation, so
  its batch-norm statistics are shared and the feature difference is not normalised away per
  side (the public code ran the critic twice, each batch normalised on its own);
- the loss is the mean over layers of per-layer means, as the paper writes; the public code took
  one mean over all concatenated features (dominated by the largest layer, the input) with
  hand-set layer weights;
- the segmentor runs once per train step: its prediction feeds the critic step (gradient
  stopped) and, against the updated critic, the segmentor step (the public code ran it twice).

Measured (docs/results/segan.md, synthetic_tumor, 3 labeled subjects, quick budget): with
c = 0.01 every critic kernel, batch-norm γ and β lies in [−0.01, 0.01], so each deeper layer's
term of L is 5–10× smaller than the one before and the masked input's own term
mean |x∘S(x) − x∘y| makes up most of L: the segmentor is trained, in effect, by an
intensity-weighted L1 loss on its probabilities. Its minimiser on a voxel of uncertain label is
the median, i.e. 0 for a region covering well under 1 % of a slice: S3-1C matched the
cross-entropy comparator on the whole tumour (S3-3C was worse), but SegAN mostly predicted no
tumour core or enhancing tumour where the comparator found some; `dice_weight=1` brings the core
back, about as much as a Dice term lifts the comparator. (This term is the per-example soft
Dice; supervised pools it over the batch for regions.)

Tracked: loss (the segmentor's total), ms_l1 (L after the critic step), critic_ms_l1 (L the
critic maximised), dice_loss (soft Dice of the prediction, tracked whatever its weight),
seg_grad_norm, critic_grad_norm.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import keras
import numpy as np
import tensorflow as tf

from tfseg.losses import segmentation as losses
from tfseg.methods.base import DataSpec, SegMethod, global_mean, probability_model
from tfseg.networks import segan_nets

VARIANTS = ("S1-1C", "S3-1C", "S3-3C")
SPATIAL_DIMS = (2,)
TARGETS = ("classes", "regions")
MIN_EXAMPLE_SIZE = 16


@dataclasses.dataclass(frozen=True)
class Config:
    """SegAN settings (paper defaults).

    Attributes:
      variant: "S1-1C" | "S3-1C" | "S3-3C" (module docstring).
      s1_map: S1-1C's label map: None = the union of the foreground (BraTS: whole tumour), or
        the name of a region (regions data) or class (classes data).
      filters: encoder widths of the segmentor (decoder mirrored).
      critic_filters: encoder widths of the critic(s); None = `filters`.
      clip_value: c, every critic weight is clipped to [−c, c] after each critic step.
      dice_weight: weight of the soft Dice term in the segmentor's loss (0: critic only).
      learning_rate: RMSProp of the segmentor; critic_learning_rate: of the critic(s), None =
        learning_rate.
      batch_size: labeled slices per (global) batch.
      steps: train steps (each one critic step and one segmentor step); validation_every: steps
        between validation rounds (best checkpoint selection).
    """

    variant: str = "S3-3C"
    s1_map: str | None = None
    filters: tuple[int, ...] = segan_nets.PAPER_FILTERS
    critic_filters: tuple[int, ...] | None = None
    clip_value: float = 0.01
    dice_weight: float = 0.0
    learning_rate: float = 2e-5
    critic_learning_rate: float | None = None
    batch_size: int = 64
    steps: int = 10000
    validation_every: int = 500


PRESETS = {
    # `python -m launch.train --method=segan --preset=paper --dataset=synthetic_tumor
    # --dataset_option=protocol=segan` (T1c/T2/FLAIR, 160 x 160 crops of 180 x 180 slices; or
    # --dataset=brats --data_dir=...): the paper's networks, RMSProp 2e-5, batch 64. Not run on
    # this 2-core CPU: no runtime or Dice measured.
    "paper": {},
    # `python -m launch.train --method=segan --preset=quick --dataset=synthetic_tumor
    # --dataset_option=modalities=t1ce,t2,flair --labeled=3 --num_val=2 --num_test=8`
    # (S3-3C): 174–378 s wall per run on 2 shared cores (load 10–13), test mean Dice 0.418 over
    # three labeled draws (whole tumour 0.848, tumour core 0.073, enhancing 0.333; the BCE
    # comparator `supervised --set=network=segan` 0.458; S3-1C 0.440; S1-1C, one model per
    # region via --set=variant=S1-1C --set=s1_map=<region>, 0.431): docs/results/segan.md.
    # A seed reproduces a run exactly only on the same hardware and thread count.
    "quick": {"filters": (16, 32, 64, 128), "batch_size": 8, "learning_rate": 1e-3,
              "steps": 400, "validation_every": 100},
}


# --------------------------------------------------------------------------- the loss
def multiscale_l1(fake_features: Sequence[tf.Tensor],
                  real_features: Sequence[tf.Tensor]) -> tf.Tensor:
    """SegAN's multi-scale L1 loss, per example.

    Args:
      fake_features: the critic's features of x∘S(x), one (B, ...) tensor per layer, the masked
        input first.
      real_features: the same of x∘y.

    Returns:
      (B,) float32: mean over layers of the mean over each layer's elements of |fake − real|.

    Raises:
      ValueError: when the two lists differ in length or are empty.
    """
    if len(fake_features) != len(real_features) or not fake_features:
        raise ValueError(f"multiscale_l1: {len(fake_features)} fake and {len(real_features)} "
                         "real feature layers; expected the same non-zero number.")
    per_layer = []
    for fake, real in zip(fake_features, real_features):
        difference = tf.abs(tf.cast(fake, tf.float32) - tf.cast(real, tf.float32))
        per_layer.append(tf.reduce_mean(difference, axis=list(range(1, difference.shape.rank))))
    return tf.add_n(per_layer) / float(len(per_layer))


def map_matrix(config: Config, data_spec: DataSpec) -> np.ndarray:
    """(num_outputs, num_maps) float32: the critic's label maps are probabilities @ matrix (and
    the ground-truth maps targets @ matrix). S3 variants: one map per region (regions data) or
    per foreground class; S1-1C: one map (`Config.s1_map`).

    Raises:
      ValueError: for an unknown `s1_map`, or regions without a union region when s1_map is None.
    """
    outputs = data_spec.num_outputs
    regions = data_spec.targets == "regions"
    if config.variant != "S1-1C":
        first = 0 if regions else 1
        return np.eye(outputs, dtype=np.float32)[:, first:]
    names = data_spec.region_names if regions else data_spec.class_names
    column = np.zeros((outputs, 1), np.float32)
    if config.s1_map is not None:
        if config.s1_map not in names[0 if regions else 1:]:
            raise ValueError(f"segan: s1_map={config.s1_map!r}; choose one of "
                             f"{list(names[0 if regions else 1:])} or null (the union).")
        column[names.index(config.s1_map), 0] = 1.0
        return column
    if not regions:
        column[1:, 0] = 1.0                     # Σ foreground softmax = 1 − p(background)
        return column
    union = set().union(*map(set, data_spec.region_classes))
    for index, members in enumerate(data_spec.region_classes):
        if set(members) == union:
            column[index, 0] = 1.0              # BraTS: the whole tumour
            return column
    raise ValueError(f"segan: no region of {list(data_spec.region_names)} is the union of the "
                     "others, so S1-1C has no default map; set --set=s1_map=<region name>.")


def resolve(config: Config, data_spec: DataSpec) -> Config:
    """Fills `critic_filters` / `critic_learning_rate`; checks every field against the data.

    Raises:
      ValueError: naming the setting and the fix.
    """
    if data_spec.spatial_dims != 2:
        raise ValueError(f"segan is a 2D method; the data has spatial_dims="
                         f"{data_spec.spatial_dims}. Use 2D slices (brats, synthetic_tumor).")
    if config.variant not in VARIANTS:
        raise ValueError(f"segan: variant={config.variant!r}; choose one of {list(VARIANTS)}.")
    config = dataclasses.replace(
        config, critic_filters=tuple(config.critic_filters or config.filters),
        critic_learning_rate=(config.learning_rate if config.critic_learning_rate is None
                              else config.critic_learning_rate))
    if config.clip_value <= 0:
        raise ValueError(f"segan: clip_value must be > 0 (critic weights are clipped to "
                         f"[-c, c]), got {config.clip_value}.")
    if config.dice_weight < 0:
        raise ValueError(f"segan: dice_weight must be >= 0, got {config.dice_weight}.")
    if config.learning_rate <= 0 or config.critic_learning_rate <= 0:
        raise ValueError(f"segan: learning_rate and critic_learning_rate must be > 0, got "
                         f"{config.learning_rate}, {config.critic_learning_rate}.")
    for name in ("batch_size", "steps", "validation_every"):
        if getattr(config, name) < 1:
            raise ValueError(f"segan: {name} must be >= 1, got {getattr(config, name)}.")
    multiple = max(segan_nets.size_multiple(config.filters),
                   segan_nets.size_multiple(config.critic_filters))
    if any(size % multiple for size in data_spec.example_shape):
        raise ValueError(f"segan: the training slices {data_spec.example_shape} are not "
                         f"multiples of {multiple} (2**len(filters)); crop them (the dataset's "
                         "crop or protocol) or use fewer filters.")
    map_matrix(config, data_spec)  # checks s1_map
    return config


class SegAN(SegMethod):
    """Segmentor + critic(s) (one, or one per region for S3-3C) with the multi-scale L1 loss.

    Attributes:
      critics: the critic networks (their inputs: C channels, or M·C for S3-1C).
      num_maps: label maps per example (1 for S1-1C).
    """

    def __init__(self, config: Config, data_spec: DataSpec, **kwargs):
        config = resolve(config, data_spec)
        segmentor = segan_nets.build_segmentor(data_spec.input_shape, data_spec.num_outputs,
                                               config.filters, name="segmentor")
        super().__init__(config, data_spec, segmentor, labeled_batch_size=config.batch_size,
                         size_multiple=segan_nets.size_multiple(config.filters),
                         loss_names=("loss", "ms_l1", "critic_ms_l1", "dice_loss",
                                     "seg_grad_norm", "critic_grad_norm"), **kwargs)
        self.maps = tf.constant(map_matrix(config, data_spec))        # (outputs, M)
        self.num_maps = int(self.maps.shape[1])
        channels = data_spec.num_channels
        if config.variant == "S3-3C":
            shapes = [channels] * self.num_maps
        else:
            shapes = [channels * self.num_maps]
        self.critics = [segan_nets.build_critic((None, None, c), config.critic_filters,
                                                name=f"critic{i}" if len(shapes) > 1
                                                else "critic")
                        for i, c in enumerate(shapes)]

    def make_optimizers(self):
        cfg = self.config
        return {"seg_optimizer": (keras.optimizers.RMSprop(cfg.learning_rate,
                                                           name="seg_rmsprop"),
                                  [self.segmentor]),
                "critic_optimizer": (keras.optimizers.RMSprop(cfg.critic_learning_rate,
                                                              name="critic_rmsprop"),
                                     self.critics)}

    # ----------------------------------------------------------------------- step pieces
    def label_maps(self, values: tf.Tensor) -> tf.Tensor:
        """Probabilities or targets (B, H, W, outputs) -> the critic's maps (B, H, W, M)."""
        return tf.einsum("bhwo,om->bhwm", tf.cast(values, tf.float32), self.maps)

    def critic_inputs(self, images: tf.Tensor, maps: tf.Tensor) -> list[tf.Tensor]:
        """One masked image per critic: x∘map (B, H, W, C) per map (S3-3C), or the M masked
        images concatenated (B, H, W, M·C) for the one critic."""
        images = tf.cast(images, tf.float32)
        masked = [images * maps[..., m:m + 1] for m in range(self.num_maps)]
        return masked if len(self.critics) > 1 else [tf.concat(masked, axis=-1)]

    def adversarial_loss(self, images, fake_maps, real_maps) -> tf.Tensor:
        """(B,) multi-scale L1 between the critics' features of x∘S(x) and x∘y, averaged over
        the critics. Each critic sees fake and real in one pass (shared batch statistics)."""
        per_critic = []
        fakes, reals = self.critic_inputs(images, fake_maps), self.critic_inputs(images, real_maps)
        for critic, fake, real in zip(self.critics, fakes, reals):
            both = tf.concat([fake, real], axis=0)                      # (2B, H, W, c)
            features = [both, *critic(both, training=True)]
            batch = tf.shape(fake)[0]
            per_critic.append(multiscale_l1([f[:batch] for f in features],
                                            [f[batch:] for f in features]))
        return tf.add_n(per_critic) / float(len(per_critic))

    def clip_critics(self) -> None:
        """Every trainable critic weight into [−c, c] (batch-norm γ, β included)."""
        c = self.config.clip_value
        for critic in self.critics:
            for variable in critic.trainable_variables:
                variable.assign(tf.clip_by_value(variable, -c, c))

    def critic_step(self, images, fake_maps, real_maps) -> dict[str, tf.Tensor]:
        """1. The critics maximise L (gradient step on −L), then their weights are clipped."""
        with tf.GradientTape() as tape:
            ms_l1 = self.adversarial_loss(images, fake_maps, real_maps)
            loss = -global_mean(ms_l1)
        grad_norm = self.apply_network_gradients("critic_optimizer", tape, loss)
        self.clip_critics()
        return {"critic_ms_l1": tf.reduce_mean(ms_l1), "critic_grad_norm": grad_norm}

    def train_step(self, data):
        images = data["labeled"]["image"]                                # (B, H, W, C)
        targets = self.targets(data["labeled"]["label"])                 # (B, H, W, R|K)
        real_maps = self.label_maps(targets)                             # (B, H, W, M)
        with tf.GradientTape() as tape:
            # 0. the segmentor's prediction, once
            logits = self.segmentor(images, training=True)               # (B, H, W, R|K)
            fake_maps = self.label_maps(losses.probabilities_of(logits, self.activation))
            # 1. critic step (outside the segmentor's tape, prediction held fixed)
            with tape.stop_recording():
                critic_terms = self.critic_step(images, tf.stop_gradient(fake_maps), real_maps)
            # 2. segmentor step against the updated critic
            ms_l1 = self.adversarial_loss(images, fake_maps, real_maps)
            dice = losses.soft_dice_loss(targets, logits, activation=self.activation)
            loss = global_mean(ms_l1) + self.config.dice_weight * global_mean(dice)
        grad_norm = self.apply_network_gradients("seg_optimizer", tape, loss)
        # 3. trackers
        return self.track(loss=tf.reduce_mean(ms_l1 + self.config.dice_weight * dice),
                          ms_l1=tf.reduce_mean(ms_l1), dice_loss=tf.reduce_mean(dice),
                          seg_grad_norm=grad_norm, **critic_terms)


def build_predictor(config: Config, data_spec: DataSpec) -> keras.Model:
    """The exported network alone (no critic): the segmentor's probabilities."""
    config = resolve(config, data_spec)
    return probability_model(segan_nets.build_segmentor(
        data_spec.input_shape, data_spec.num_outputs, config.filters, name="segmentor"),
        data_spec)


def build(config: Config, data_spec: DataSpec) -> SegAN:
    """Builds the (uncompiled) SegAN method for `data_spec`."""
    return SegAN(config, data_spec, name="segan")
