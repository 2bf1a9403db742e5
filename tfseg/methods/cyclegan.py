"""cyclegan: unpaired translation between the unlabeled target domain and the labeled source domain.

Zhu, Park, Isola & Efros, "Unpaired image-to-image translation using cycle-consistent adversarial
networks", ICCV 2017; used as the domain-adaptation step of the glioma MixMatch pipeline
(`tfseg.methods.mixmatch`, `--adapt=cyclegan`), which translates the target's images into the
source domain before semi-supervised training.

- Two ResNet generators (`networks.cyclegan_nets`: reflect padding, instance norm, tanh; 9
  residual blocks above 128², 6 at ≤128²): G_T→S (target to source: the one MixMatch uses) and
  G_S→T; two 70×70 PatchGAN discriminators D_S, D_T.
- LSGAN losses (Mao et al. 2017): D minimises ½[(D(x) − 1)² + D(G(z))²], G minimises
  (D(G(z)) − 1)²; cycle loss λ_cyc·(|G_S→T(G_T→S(t)) − t|₁ + |G_T→S(G_S→T(s)) − s|₁), λ_cyc = 10;
  identity loss λ_id·λ_cyc·(|G_T→S(s) − s|₁ + |G_S→T(t) − t|₁), λ_id = 0.5. L1 terms are means
  over pixels.
- Adam 2e-4, β1 0.5 for both generators (one optimizer) and both discriminators (another); the
  learning rate is constant for the first half of the steps and decays linearly to 0 over the
  second half (`LinearDecaySecondHalf`, driven by the optimizer's own iterations, so it resumes).
- Image pool of 50 generated images per domain (Shrivastava et al. 2017): each discriminator step
  sees, per image, the new fake or (with probability ½ once the pool is full) an older one, which
  the new fake replaces. The pools and their fill counts are method state (`add_state`), saved
  with every checkpoint and resume round, so a resumed run continues with the same history.
- Intensities: the preprocessed images (foreground percentiles 2/98 -> 0/1, background a
  negative constant) are mapped from `intensity_range` (default [−1, 2]) to [−1, 1] and clipped;
  translations are mapped back.
  Target slices whose in-plane size differs from the source's are centre-cropped / zero-padded
  to it (both are resampled to the same spacing by preprocessing); `crop_size` trains on random
  square crops of that size (CycleGAN's 256² crops; the quick preset's 64²).

`--method=cyclegan` trains the translators only (one GAN-only stage, no segmentor optimizer): its
SegMethod carries a placeholder segmentor (a 1×1 convolution that no optimizer touches), so
training skips validation, evaluation and export. Its output is the translation: `python -m
launch.translate --model=RUN_DIR --input=...` (`tfseg.translate`). `launch.evaluate` / `export`
on such a run stop with one line saying so (`build_predictor` raises a ValueError).

TensorBoard: scalars of every term; image panels `cyclegan/target_source_target` (t | G_T→S(t) |
G_S→T(G_T→S(t))) and `cyclegan/source_target_source` (the other cycle), first channel.

A run without `--target_dataset` has no target stream: the labeled source images then play the
target (a smoke-test setting, not domain adaptation).
"""
from __future__ import annotations

import dataclasses

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from tfseg.methods.base import DataSpec, SegMethod, Stage, global_mean
from tfseg.networks import cyclegan_nets


@dataclasses.dataclass(frozen=True)
class TranslationConfig:
    """CycleGAN settings shared by `cyclegan` and `mixmatch --adapt=cyclegan` (paper defaults).

    Attributes:
      generator_filters: f of the ResNet generators (64).
      residual_blocks: None = 9 above 128², 6 at ≤128² (of `crop_size` or the slice size).
      discriminator_filters: first-layer channels of the PatchGAN (64).
      gan_learning_rate, gan_beta_1: Adam of generators and discriminators (2e-4, 0.5).
      cycle_weight: λ_cyc (10).
      identity_weight: λ_id as a fraction of λ_cyc (0.5: the identity term weighs 5).
      pool_size: generated images kept per domain for the discriminators (50; 0: no pool).
      gan_batch_size: images per domain per GAN step (1).
      crop_size: train the GAN on random crops of this side (at most the slice size); None =
        whole slices.
      intensity_range: (low, high) preprocessed intensities mapped to [−1, 1] (clipped). The
        default covers the background too: percentile normalisation maps the foreground's 2nd/98th
        percentiles to 0/1 and the zero background to a negative constant (−0.5 to −0.9 on
        synthetic_tumor), which the translation must reproduce.
    """

    generator_filters: int = 64
    residual_blocks: int | None = None
    discriminator_filters: int = 64
    gan_learning_rate: float = 2e-4
    gan_beta_1: float = 0.5
    cycle_weight: float = 10.0
    identity_weight: float = 0.5
    pool_size: int = 50
    gan_batch_size: int = 1
    crop_size: int | None = None
    intensity_range: tuple[float, float] = (-1.0, 2.0)


@dataclasses.dataclass(frozen=True)
class Config(TranslationConfig):
    """cyclegan: the translation settings, `steps` GAN steps (the paper's 100 + 100 epochs of
    unpaired batches of 1; the linear decay covers the second half) and `validation_every` (the
    steps between resume rounds: no validation, nothing to validate)."""

    steps: int = 40000
    validation_every: int = 1000


PRESETS = {
    # `python -m launch.train --method=cyclegan --dataset=synthetic_tumor --dataset_option=target=binary --target_dataset=synthetic_tumor --target_option=domain=target --target_option=target=binary --preset=paper`: CycleGAN's published settings; not run (40k steps at full size).
    "paper": {},
    # same with `--preset=quick`: not run alone; its 200-step stage inside mixmatch quick took 122-135 s on 2 busy cores (translators only, no Dice; the translation is examined in docs/results/mixmatch.md).
    "quick": {"generator_filters": 16, "discriminator_filters": 16, "residual_blocks": 3,
              "gan_batch_size": 4, "crop_size": 64, "steps": 400, "validation_every": 100},
}

SPATIAL_DIMS = (2,)
TARGETS = ("classes", "regions")
GAN_LOSS_NAMES = ("loss", "gen_adv", "cycle_loss", "identity_loss", "disc_loss",
                  "d_real_score", "d_fake_score", "gen_grad_norm", "disc_grad_norm")


def check_translation(config: TranslationConfig, data_spec: DataSpec, method: str) -> int:
    """Checks the translation fields; returns the number of residual blocks.

    Raises:
      ValueError: naming the bad field.
    """
    if data_spec.spatial_dims != 2:
        raise ValueError(f"{method}: CycleGAN translates 2D slices; the data is "
                         f"{data_spec.spatial_dims}D. Use a 2D dataset or --set=adapt=none.")
    if config.crop_size is not None and config.crop_size < 4:
        raise ValueError(f"{method}: crop_size={config.crop_size} must be >= 4 (or null).")
    shape = gan_shape(config, data_spec)
    if any(side % 4 for side in shape):
        raise ValueError(f"{method}: the generators need sides that are multiples of 4; the "
                         f"GAN sees {shape}. Set crop_size to a multiple of 4.")
    for name in ("generator_filters", "discriminator_filters", "gan_batch_size"):
        if getattr(config, name) < 1:
            raise ValueError(f"{method}: {name} must be >= 1, got {getattr(config, name)}.")
    for name in ("cycle_weight", "identity_weight", "pool_size", "gan_learning_rate"):
        if getattr(config, name) < 0:
            raise ValueError(f"{method}: {name} must be >= 0, got {getattr(config, name)}.")
    low, high = (float(v) for v in config.intensity_range)
    if not high > low:
        raise ValueError(f"{method}: intensity_range={config.intensity_range} needs low < high.")
    if config.residual_blocks is not None and config.residual_blocks < 0:
        raise ValueError(f"{method}: residual_blocks must be >= 0 (or null for the default).")
    return (cyclegan_nets.default_residual_blocks(shape) if config.residual_blocks is None
            else int(config.residual_blocks))


def gan_shape(config: TranslationConfig, data_spec: DataSpec) -> tuple[int, int]:
    """What the GAN trains on: random crops of `crop_size` (at most the slice), or slices."""
    if config.crop_size:
        return tuple(min(int(config.crop_size), int(s)) for s in data_spec.example_shape)
    return tuple(int(s) for s in data_spec.example_shape)


# --------------------------------------------------------------------------- losses
def _per_example_mean(tensor) -> tf.Tensor:
    tensor = tf.cast(tensor, tf.float32)
    return tf.reduce_mean(tensor, axis=list(range(1, tensor.shape.rank)))


def lsgan_real_loss(scores) -> tf.Tensor:
    """(D(x) − 1)², mean over patches: (B, ...) scores -> (B,). The discriminator's term on real
    images, and the generator's on its fakes (LSGAN with targets 1 real, 0 fake)."""
    return _per_example_mean(tf.square(tf.cast(scores, tf.float32) - 1.0))


def lsgan_fake_loss(scores) -> tf.Tensor:
    """D(G(z))², mean over patches: (B, ...) -> (B,). The discriminator's term on fakes."""
    return _per_example_mean(tf.square(tf.cast(scores, tf.float32)))


def l1_loss(images, references) -> tf.Tensor:
    """Mean |a − b| per example: (B, H, W, C) -> (B,)."""
    return _per_example_mean(tf.abs(tf.cast(images, tf.float32) - tf.cast(references,
                                                                            tf.float32)))


@keras.saving.register_keras_serializable(package="tfseg")
class LinearDecaySecondHalf(keras.optimizers.schedules.LearningRateSchedule):
    """`initial` for the first half of `total_steps`, then linearly down to 0 at `total_steps`."""

    def __init__(self, initial: float, total_steps: int):
        self.initial = float(initial)
        self.total_steps = int(total_steps)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        half = float(self.total_steps // 2)
        remaining = (float(self.total_steps) - step) / max(float(self.total_steps) - half, 1.0)
        return self.initial * tf.clip_by_value(remaining, 0.0, 1.0)

    def get_config(self):
        return {"initial": self.initial, "total_steps": self.total_steps}


def query_pool(pool: keras.Variable, count: keras.Variable, images, seed) -> tf.Tensor:
    """The CycleGAN image pool: returns the images the discriminator sees and updates the pool.

    Per image: while the pool is not full, it is stored and returned; once full, with probability
    ½ a random stored image is returned and replaced by it, else it is returned itself.

    Args:
      pool: (N, H, W, C) variable; count: scalar float variable, images stored so far (<= N).
      images: (B, H, W, C) new generated images, B static.
      seed: shape-[2] seed.
    """
    size = pool.shape[0]
    if size == 0:
        return images
    batch = images.shape[0]
    if batch is None:
        raise ValueError("query_pool: the batch size must be static (drop_remainder batches).")
    draws = tf.random.stateless_uniform([batch], seed)
    slots = tf.random.stateless_uniform([batch], seed + 1, 0, size, dtype=tf.int32)
    outputs = []
    for i in range(batch):
        stored = tf.cast(count, tf.int32)
        full = stored >= size
        swap = tf.logical_and(full, draws[i] > 0.5)
        index = tf.where(full, slots[i], tf.minimum(stored, size - 1))
        old = tf.gather(pool, index)
        image = tf.cast(images[i], pool.dtype)
        outputs.append(tf.where(swap, old, image))
        written = tf.where(tf.logical_or(tf.logical_not(full), swap), image, old)
        pool.assign(tf.tensor_scatter_nd_update(pool, [[index]], written[None]))
        count.assign(tf.minimum(count + 1.0, float(size)))
    return tf.stack(outputs)


class _Panels:
    """Last-step cycles for TensorBoard (a plain object: not tracked, not saved)."""


class TranslationMixin:
    """The CycleGAN part of a SegMethod: networks, pools, optimizers, one GAN step, translation.

    Call `build_translation(config, data_spec, total_steps)` in `__init__` after
    `SegMethod.__init__`.
    """

    def build_translation(self, config: TranslationConfig, data_spec: DataSpec,
                          total_steps: int, blocks: int) -> None:
        channels = data_spec.num_channels
        gen = dict(filters=config.generator_filters, residual_blocks=blocks)
        self.gen_target_to_source = cyclegan_nets.build_resnet_generator(
            channels, name="gen_target_to_source", **gen)
        self.gen_source_to_target = cyclegan_nets.build_resnet_generator(
            channels, name="gen_source_to_target", **gen)
        disc = dict(filters=config.discriminator_filters)
        self.disc_source = cyclegan_nets.build_patch_discriminator(channels, name="disc_source",
                                                                   **disc)
        self.disc_target = cyclegan_nets.build_patch_discriminator(channels, name="disc_target",
                                                                   **disc)
        self.gan_total_steps = int(total_steps)
        self.gan_shape = gan_shape(config, data_spec)
        pool_shape = (int(config.pool_size), *self.gan_shape, channels)
        # State, not weights: saved with every checkpoint and resume round.
        self.pool_fake_source = self.add_state("pool_fake_source", pool_shape)
        self.pool_fake_target = self.add_state("pool_fake_target", pool_shape)
        self.pool_count_source = self.add_state("pool_count_source", ())
        self.pool_count_target = self.add_state("pool_count_target", ())
        panels = _Panels()
        height, width = self.gan_shape
        for key in ("target_cycle", "source_cycle"):
            setattr(panels, key, tf.Variable(
                tf.zeros((1, height, 3 * width, channels)), trainable=False,
                name=f"panel_{key}", synchronization=tf.VariableSynchronization.ON_READ,
                aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA))
        self.__dict__["_panels"] = panels

    def translation_optimizers(self):
        c = self.config

        def adam(name):
            schedule = LinearDecaySecondHalf(c.gan_learning_rate, self.gan_total_steps)
            return keras.optimizers.Adam(schedule, beta_1=c.gan_beta_1, name=name)

        return {"gen_optimizer": (adam("gen_adam"), [self.gen_target_to_source,
                                                      self.gen_source_to_target]),
                "disc_optimizer": (adam("disc_adam"), [self.disc_source, self.disc_target])}

    # ----------------------------------------------------------------------- intensities
    def to_gan_range(self, images) -> tf.Tensor:
        low, high = (float(v) for v in self.config.intensity_range)
        scaled = 2.0 * (tf.cast(images, tf.float32) - low) / (high - low) - 1.0
        return tf.clip_by_value(scaled, -1.0, 1.0)

    def from_gan_range(self, images) -> tf.Tensor:
        low, high = (float(v) for v in self.config.intensity_range)
        return (tf.cast(images, tf.float32) + 1.0) * 0.5 * (high - low) + low

    def to_source_shape(self, images) -> tf.Tensor:
        """Centre crop / zero pad (B, H', W', C) to the source slice size."""
        height, width = self.data_spec.example_shape
        if tuple(images.shape[1:3]) == (height, width):
            return images
        return tf.image.resize_with_crop_or_pad(images, height, width)

    def translate_to_source(self, target_images) -> tf.Tensor:
        """G_T→S on target images (pipeline intensities in and out; source slice size)."""
        images = self.to_gan_range(self.to_source_shape(target_images))
        return self.from_gan_range(self.gen_target_to_source(images, training=False))

    def _gan_input(self, images) -> tf.Tensor:
        images = self.to_gan_range(self.to_source_shape(images))
        height, width = self.gan_shape
        if (height, width) != tuple(self.data_spec.example_shape):
            shape = tf.stack([tf.shape(images)[0], height, width, tf.shape(images)[3]])
            images = tf.image.stateless_random_crop(images, shape, self.next_seed())
            images = tf.ensure_shape(images, [None, height, width, images.shape[-1]])
        return images

    # ----------------------------------------------------------------------- the GAN step
    def translation_step(self, data) -> dict[str, tf.Tensor]:
        """One CycleGAN step on the source (unlabeled stream) and target (target stream) images.

        Returns the tracked terms (local means)."""
        c = self.config
        if "target" in data:
            target = data["target"]["image"]
        else:  # one-domain run: the labeled images play the target (smoke tests only)
            logging.warning("CycleGAN without a target stream: translating between the source's "
                            "unlabeled and labeled images (pass --target_dataset).")
            target = data["labeled"]["image"]
        s = self._gan_input(data["unlabeled"]["image"])                    # (B, h, w, C)
        t = self._gan_input(target)                                        # (B', h, w, C)
        identity = c.identity_weight * c.cycle_weight
        with tf.GradientTape() as tape:
            # 1. both cycles: t -> S -> T and s -> T -> S
            fake_s = self.gen_target_to_source(t, training=True)
            rec_t = self.gen_source_to_target(fake_s, training=True)
            fake_t = self.gen_source_to_target(s, training=True)
            rec_s = self.gen_target_to_source(fake_t, training=True)
            # 2. generator objective: LSGAN + λ_cyc cycle + λ_id λ_cyc identity. Per-example
            #    terms of one domain's batch, reduced per domain (the two batches may differ).
            adv = (global_mean(lsgan_real_loss(self.disc_source(fake_s, training=True)))
                   + global_mean(lsgan_real_loss(self.disc_target(fake_t, training=True))))
            cycle = global_mean(l1_loss(rec_t, t)) + global_mean(l1_loss(rec_s, s))
            gen_loss = adv + c.cycle_weight * cycle
            same = tf.zeros_like(cycle)
            if identity:
                same = (global_mean(l1_loss(self.gen_target_to_source(s, training=True), s))
                        + global_mean(l1_loss(self.gen_source_to_target(t, training=True), t)))
                gen_loss = gen_loss + identity * same
        gen_norm = self.apply_network_gradients("gen_optimizer", tape, gen_loss)
        # 3. discriminators on real images and pooled fakes (generated before the G update)
        pooled_s = query_pool(self.pool_fake_source, self.pool_count_source,
                              tf.stop_gradient(fake_s), self.next_seed())
        pooled_t = query_pool(self.pool_fake_target, self.pool_count_target,
                              tf.stop_gradient(fake_t), self.next_seed())
        with tf.GradientTape() as tape:
            real_s = self.disc_source(s, training=True)
            real_t = self.disc_target(t, training=True)
            pooled_scores_s = self.disc_source(pooled_s, training=True)
            pooled_scores_t = self.disc_target(pooled_t, training=True)
            # ½[(D(x) − 1)² + D(G(z))²] per discriminator
            disc_loss = 0.5 * (global_mean(lsgan_real_loss(real_s))
                               + global_mean(lsgan_fake_loss(pooled_scores_s))
                               + global_mean(lsgan_real_loss(real_t))
                               + global_mean(lsgan_fake_loss(pooled_scores_t)))
        disc_norm = self.apply_network_gradients("disc_optimizer", tape, disc_loss)
        # 4. panels and trackers (global means back to the local mean for display)
        p = self._panels
        p.target_cycle.assign(tf.concat([t[:1], fake_s[:1], rec_t[:1]], axis=2))
        p.source_cycle.assign(tf.concat([s[:1], fake_t[:1], rec_s[:1]], axis=2))
        replicas = float(tf.distribute.get_strategy().num_replicas_in_sync)
        return {"loss": gen_loss * replicas, "gen_adv": adv * replicas,
                "cycle_loss": cycle * replicas, "identity_loss": same * replicas,
                "disc_loss": disc_loss * replicas,
                "d_real_score": 0.5 * (tf.reduce_mean(real_s) + tf.reduce_mean(real_t)),
                "d_fake_score": 0.5 * (tf.reduce_mean(pooled_scores_s)
                                       + tf.reduce_mean(pooled_scores_t)),
                "gen_grad_norm": gen_norm, "disc_grad_norm": disc_norm}

    def summary_images(self) -> dict[str, np.ndarray]:
        """TensorBoard panels: real | translated | reconstructed, first channel, [0, 1]; none
        for a method built without its translators (mixmatch --adapt=none)."""
        p = self.__dict__.get("_panels")
        if p is None:
            return {}

        def gray(variable):
            image = np.asarray(variable.numpy())[..., :1]
            return np.clip((image + 1.0) * 0.5, 0.0, 1.0)

        return {"cyclegan/target_source_target": gray(p.target_cycle),
                "cyclegan/source_target_source": gray(p.source_cycle)}


class CycleGAN(TranslationMixin, SegMethod):
    """Translators only: one GAN-only stage; a placeholder segmentor that nothing trains."""

    def __init__(self, config: Config, data_spec: DataSpec, **kwargs):
        blocks = check_translation(config, data_spec, "cyclegan")
        if config.steps < 1 or config.validation_every < 1:
            raise ValueError(f"cyclegan: steps and validation_every must be >= 1, got "
                             f"{config.steps}, {config.validation_every}.")
        placeholder = keras.Sequential(
            [keras.Input(data_spec.input_shape),
             keras.layers.Conv2D(data_spec.num_outputs, 1, name="placeholder_logits")],
            name="placeholder_segmentor")
        super().__init__(config, data_spec, placeholder, labeled_batch_size=config.gan_batch_size,
                         unlabeled_batch_size=config.gan_batch_size,
                         target_batch_size=config.gan_batch_size, pipeline_augment="none",
                         size_multiple=4, loss_names=GAN_LOSS_NAMES, **kwargs)
        self.build_translation(config, data_spec, config.steps, blocks)

    def make_optimizers(self):
        return self.translation_optimizers()

    def stages(self) -> list[Stage]:
        return [Stage("cyclegan", int(self.config.steps), "CycleGAN translators target <-> "
                      "source (no segmentor)", trains_segmentor=False)]

    def train_step(self, data):
        return self.track(**self.translation_step(data))


def build_predictor(config: Config, data_spec: DataSpec):
    """A cyclegan run has no segmentation: evaluation and export stop here with one line."""
    raise ValueError("cyclegan trains image translators only and has no segmentor to evaluate "
                     "or export; translate scans with `python -m launch.translate "
                     "--model=RUN_DIR --input=... --output=...`, or train `--method=mixmatch "
                     "--adapt=cyclegan` for a segmentation.")


def build(config: Config, data_spec: DataSpec) -> CycleGAN:
    """Builds the (uncompiled) CycleGAN method."""
    return CycleGAN(config, data_spec, name="cyclegan")
