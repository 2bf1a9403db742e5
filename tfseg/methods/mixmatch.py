"""mixmatch: MixMatch adapted to per-pixel segmentation, after CycleGAN domain adaptation.

The glioma paper's pipeline: CycleGAN (`tfseg.methods.cyclegan`) translates the unlabeled target
domain into the labeled source domain, then MixMatch (Berthelot et al., "MixMatch: a holistic
approach to semi-supervised learning", NeurIPS 2019) trains the segmentor on the source's labels
and the translated target images.

Schedule (`stages()`; `adapt`):
- adapt="cyclegan" (paper): stage "cyclegan" trains the translators only (GAN-only stage, not
  validated, `cyclegan.TranslationMixin`), then stage "mixmatch" trains the U-Net while the
  frozen G_T→S translates each target batch on the fly (the same images an offline translation
  would give, with no files to keep in sync; kill-and-resume goes through the stage checkpoints).
- adapt="none": stage "mixmatch" only, on the raw target images (MixMatch without adaptation).
  A run without a target domain uses the source's unlabeled images (plain semi-supervised).

One MixMatch step, per pixel:
1. labeled batch X (augmented once by the pipeline: `augment`, flip + intensity) with one-hot
   targets p; unlabeled batch U.
2. label guess: for k = 1..K (K = 2) draw a random flip (vertical, horizontal, each p = ½) and
   intensity change (contrast U(0.8, 1.2), brightness U(−0.1, 0.1)) `guess_augment`, predict
   softmax (sigmoid for regions), undo the flip on the prediction, and average:
   q̄ = (1/K) Σₖ flipₖ⁻¹(f(augₖ(U))).
3. sharpen per pixel with T = 0.5: classes qᵢ^(1/T) / Σⱼ qⱼ^(1/T) (softmax form); regions / binary
   outputs p^(1/T) / (p^(1/T) + (1 − p)^(1/T)). For two classes the two forms agree.
4. the K augmented unlabeled views Ûₖ get the guess in their own frame, flipₖ(q).
5. MixUp: W = shuffle([X̂; Û₁..Û_K]); every example i is mixed with Wᵢ, λ = max(λ′, 1 − λ′),
   λ′ ~ Beta(α, α), α = 0.75 (`mixup_beta="paper"`: the paper's Beta(γ, 1 − γ), γ = α), one λ
   per example, same λ for image and targets.
6. L = CE(mixed labeled part) + λ_u(t) · MSE(mixed unlabeled part), MSE = mean over pixels and
   outputs of (q − f(u))², λ_u = 1, ramped up linearly over `rampup_steps` (0: no ramp-up).
One forward pass of the segmentor over the mixed labeled + unlabeled batch (one batch-norm batch).

Reported: precision, recall, Dice, mIoU and AUC on the target's held-out labels (`launch.evaluate
--domain=target`; `launch.train` evaluates both domains).
"""
from __future__ import annotations

import dataclasses

import keras
import tensorflow as tf

from tfseg.data import augment as augment_lib
from tfseg.losses.segmentation import probabilities_of
from tfseg.methods import cyclegan, supervised
from tfseg.methods.base import DataSpec, Stage, global_mean, probability_model
from tfseg.networks import unet

ADAPTATIONS = ("cyclegan", "none")
MIXUP_BETAS = ("symmetric", "paper")
GUESS_AUGMENTS = ("flip", "intensity")


@dataclasses.dataclass(frozen=True)
class Config(cyclegan.TranslationConfig, supervised.Config):
    """MixMatch settings (paper defaults), the U-Net and optimiser of `supervised`, and the
    CycleGAN settings of stage 1 (`cyclegan.TranslationConfig`).

    Attributes:
      adapt: "cyclegan" (translate the target into the source domain first) or "none".
      gan_steps: CycleGAN steps of stage 1 (adapt="cyclegan").
      steps: MixMatch steps (stage 2).
      loss: the labeled term ("ce": cross-entropy on the mixed soft targets; any supervised
        loss works).
      augment: the labeled batch's augmentation (pipeline), flip + intensity.
      unlabeled_batch_size: unlabeled images per step; None = batch_size.
      guess_augmentations: K, augmented views averaged by the label guess.
      guess_augment: "+"-joined subset of flip, intensity: the views' augmentation.
      temperature: T of the sharpening.
      mixup_alpha: α (Beta(α, α)) or γ (Beta(γ, 1 − γ)) of MixUp.
      mixup_beta: "symmetric" (Beta(α, α), MixMatch) or "paper" (Beta(γ, 1 − γ)).
      unlabeled_weight: λ_u.
      rampup_steps: λ_u grows linearly from 0 over these MixMatch steps (0: constant).
    """

    adapt: str = "cyclegan"
    gan_steps: int = 40000
    loss: str = "ce"
    augment: str = "flip+intensity"
    unlabeled_batch_size: int | None = None
    guess_augmentations: int = 2
    guess_augment: str = "flip+intensity"
    temperature: float = 0.5
    mixup_alpha: float = 0.75
    mixup_beta: str = "symmetric"
    unlabeled_weight: float = 1.0
    rampup_steps: int = 0


PRESETS = {
    # `python -m launch.train --method=mixmatch --adapt=cyclegan --dataset=synthetic_tumor --dataset_option=target=binary --target_dataset=synthetic_tumor --target_option=domain=target --target_option=target=binary --labeled=4 --preset=paper`: not run (40k CycleGAN + 10k MixMatch steps at full size: far beyond 2 cores today).
    "paper": {},
    # same with `--preset=quick --steps=300 --set=loss=weighted_ce --set=augment=flip+intensity --non4`: 5-10 min on 2 busy cores, target Dice 0.239 ± 0.171 over 3 draws (--adapt=none 0.307 ± 0.216; source-only 0.457 ± 0.087); with --labeled=8: 0.228 ± 0.163 (none 0.468 ± 0.106, source-only 0.474 ± 0.122); --labeled=2: 0.201 ± 0.157 (none 0.531 ± 0.094, source-only 0.570 ± 0.137), docs/results/mixmatch.md. A seed reproduces a run exactly only on the same hardware and thread count.
    "quick": {"filters": (8, 16, 32, 64), "batch_size": 8, "unlabeled_batch_size": 4,
              "steps": 300, "validation_every": 100, "generator_filters": 16,
              "discriminator_filters": 16, "residual_blocks": 3, "gan_batch_size": 4,
              "crop_size": 64, "gan_steps": 200, "rampup_steps": 300},
}

SPATIAL_DIMS = (2,)
TARGETS = ("classes", "regions")
MIXMATCH_LOSS_NAMES = ("loss", "labeled_loss", "unlabeled_loss", "unlabeled_weight",
                       "guess_confidence", "seg_grad_norm")


def resolve(config: Config, data_spec: DataSpec) -> Config:
    """Supervised defaults, then the MixMatch and adaptation settings checked.

    Raises:
      ValueError: naming the bad setting and the accepted values.
    """
    config = supervised.resolve(config, data_spec)
    if config.unlabeled_batch_size is None:
        config = dataclasses.replace(config, unlabeled_batch_size=config.batch_size)
    if config.adapt not in ADAPTATIONS:
        raise ValueError(f"mixmatch: adapt={config.adapt!r}; choose one of {list(ADAPTATIONS)} "
                         "(--adapt=cyclegan|none).")
    if config.mixup_beta not in MIXUP_BETAS:
        raise ValueError(f"mixmatch: mixup_beta={config.mixup_beta!r}; choose one of "
                         f"{list(MIXUP_BETAS)}.")
    if "mixup" in config.augment.lower().split("+"):
        raise ValueError("mixmatch: augment must not contain mixup (MixMatch mixes labeled and "
                         "unlabeled batches itself); use e.g. flip+intensity.")
    parts = [p for p in config.guess_augment.lower().split("+") if p and p != "none"]
    if any(p not in GUESS_AUGMENTS for p in parts):
        raise ValueError(f"mixmatch: guess_augment={config.guess_augment!r}; use a '+'-joined "
                         f"subset of {list(GUESS_AUGMENTS)} or none.")
    if config.guess_augmentations < 1 or config.unlabeled_batch_size < 1:
        raise ValueError("mixmatch: guess_augmentations and unlabeled_batch_size must be >= 1, "
                         f"got {config.guess_augmentations}, {config.unlabeled_batch_size}.")
    if not config.temperature > 0 or not config.mixup_alpha > 0:
        raise ValueError(f"mixmatch: temperature and mixup_alpha must be > 0, got "
                         f"{config.temperature}, {config.mixup_alpha}.")
    if config.mixup_beta == "paper" and not config.mixup_alpha < 1:
        raise ValueError(f"mixmatch: mixup_beta=paper draws Beta(γ, 1 − γ): mixup_alpha (γ) must "
                         f"be in (0, 1), got {config.mixup_alpha}.")
    if config.unlabeled_weight < 0 or config.rampup_steps < 0:
        raise ValueError("mixmatch: unlabeled_weight and rampup_steps must be >= 0, got "
                         f"{config.unlabeled_weight}, {config.rampup_steps}.")
    if config.adapt == "cyclegan":
        cyclegan.check_translation(config, data_spec, "mixmatch --adapt=cyclegan")
        if config.gan_steps < 1:
            raise ValueError(f"mixmatch: gan_steps must be >= 1 with adapt=cyclegan, got "
                             f"{config.gan_steps} (or --adapt=none).")
    return config


# --------------------------------------------------------------------------- MixMatch pieces
def sharpen(probabilities, temperature: float, activation: str = "softmax") -> tf.Tensor:
    """Per-pixel sharpening: softmax form over the last axis, or the binary form per channel.

    softmax: qᵢ^(1/T) / Σⱼ qⱼ^(1/T); sigmoid: p^(1/T) / (p^(1/T) + (1 − p)^(1/T)).
    Computed in log space (no 0/0 for tiny probabilities).
    """
    probabilities = tf.cast(probabilities, tf.float32)
    logs = tf.math.log(tf.clip_by_value(probabilities, 1e-12, 1.0)) / temperature
    if activation == "softmax":
        return tf.nn.softmax(logs, axis=-1)
    complement = tf.math.log(tf.clip_by_value(1.0 - probabilities, 1e-12, 1.0)) / temperature
    return tf.sigmoid(logs - complement)


def _beta(shape, a: float, b: float, seed) -> tf.Tensor:
    """Beta(a, b) draws as G_a / (G_a + G_b) of two stateless gammas."""
    s1, s2 = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    g1 = tf.random.stateless_gamma(shape, s1, alpha=a, dtype=tf.float64)
    g2 = tf.random.stateless_gamma(shape, s2, alpha=b, dtype=tf.float64)
    total = g1 + g2
    return tf.cast(tf.where(total > 0, g1 / tf.where(total > 0, total, 1.0), 0.5), tf.float32)


def mixup_lambda(batch, alpha: float, seed, distribution: str = "symmetric") -> tf.Tensor:
    """λ = max(λ′, 1 − λ′) per example; λ′ ~ Beta(α, α) ("symmetric") or Beta(α, 1 − α)
    ("paper"). Returns (batch,) float32 in [0.5, 1]."""
    shape = tf.reshape(batch, [1])
    if distribution == "symmetric":
        draws = augment_lib.sample_beta(shape, alpha, seed)
    else:
        draws = _beta(shape, alpha, 1.0 - alpha, seed)
    return tf.maximum(draws, 1.0 - draws)


def mix(images, targets, lam, permutation):
    """x_i ← λᵢ xᵢ + (1 − λᵢ) x_perm(i), targets likewise (one λ per example)."""
    def mixed(tensor):
        weight = tf.reshape(tf.cast(lam, tensor.dtype), [-1] + [1] * (tensor.shape.rank - 1))
        return weight * tensor + (1.0 - weight) * tf.gather(tensor, permutation)

    return mixed(images), mixed(targets)


def random_flips(batch, seed) -> tf.Tensor:
    """(B, 2) bool: flip rows / columns, each with probability ½."""
    return tf.random.stateless_uniform(tf.stack([batch, 2]), seed) < 0.5


def apply_flips(tensor, flips) -> tf.Tensor:
    """Flips (B, H, W, C) per example along H and/or W; its own inverse."""
    rows = tf.reshape(flips[:, 0], [-1, 1, 1, 1])
    tensor = tf.where(rows, tf.reverse(tensor, [1]), tensor)
    columns = tf.reshape(flips[:, 1], [-1, 1, 1, 1])
    return tf.where(columns, tf.reverse(tensor, [2]), tensor)


def guess_labels(predict, images, seeds, augment: str = "flip+intensity"):
    """The label guess: mean over len(seeds) augmented views of the predictions mapped back.

    Args:
      predict: images (B, H, W, C) -> probabilities (B, H, W, K).
      images: (B, H, W, C) unlabeled images.
      seeds: one shape-[2] seed per view (K views).
      augment: "+"-joined subset of flip, intensity.

    Returns:
      (guess (B, H, W, K) in the images' own frame, [K augmented views], [K flips (B, 2)]).
    """
    parts = augment.lower().split("+")
    batch = tf.shape(images)[0]
    views, flips, total = [], [], 0.0
    for seed in seeds:
        flip_seed, intensity_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        flip = (random_flips(batch, flip_seed) if "flip" in parts
                else tf.zeros(tf.stack([batch, 2]), tf.bool))
        view = apply_flips(images, flip)
        if "intensity" in parts:
            view = augment_lib.random_intensity(view, intensity_seed)
        total = total + apply_flips(predict(view), flip)   # back to the images' frame
        views.append(view)
        flips.append(flip)
    return total / float(len(seeds)), views, flips


def unlabeled_mse(targets, logits, activation: str = "softmax") -> tf.Tensor:
    """Mean over pixels and outputs of (q − p)², p = softmax / sigmoid of logits: (B,)."""
    squared = tf.square(tf.cast(targets, tf.float32) - probabilities_of(logits, activation))
    return tf.reduce_mean(squared, axis=list(range(1, squared.shape.rank)))


def mixmatch_loss(labeled_loss, unlabeled_targets, unlabeled_logits, unlabeled_weight,
                  activation: str = "softmax"):
    """L = L_x + λ_u · L_u, each reduced with its global batch size (`global_mean`).

    Args:
      labeled_loss: (B,) the labeled term of the mixed labeled part (e.g. cross-entropy).
      unlabeled_targets / unlabeled_logits: (B', *S, K) the mixed unlabeled part.
      unlabeled_weight: λ_u (after ramp-up).

    Returns:
      (total scalar, labeled (B,), unlabeled (B',) per-example MSE).
    """
    unlabeled = unlabeled_mse(unlabeled_targets, unlabeled_logits, activation)
    total = global_mean(labeled_loss) + unlabeled_weight * global_mean(unlabeled)
    return total, labeled_loss, unlabeled


class MixMatch(cyclegan.TranslationMixin, supervised.Supervised):
    """[CycleGAN stage →] MixMatch stage; the segmentor is supervised's U-Net."""

    def __init__(self, config: Config, data_spec: DataSpec, **kwargs):
        config = resolve(config, data_spec)
        adapt = config.adapt == "cyclegan"
        first_unlabeled = config.gan_batch_size if adapt else config.unlabeled_batch_size
        super().__init__(config, data_spec, unlabeled_batch_size=first_unlabeled,
                         target_batch_size=first_unlabeled, **kwargs)
        names = MIXMATCH_LOSS_NAMES + (cyclegan.GAN_LOSS_NAMES if adapt else ())
        self.loss_names = tuple(dict.fromkeys(names))
        self.trackers = {n: keras.metrics.Mean(name=n) for n in self.loss_names}
        if adapt:
            blocks = cyclegan.check_translation(config, data_spec, "mixmatch --adapt=cyclegan")
            self.build_translation(config, data_spec, config.gan_steps, blocks)
        self.stage_name = "mixmatch"

    def make_optimizers(self):
        optimizers = super().make_optimizers()
        if self.config.adapt == "cyclegan":
            optimizers.update(self.translation_optimizers())
        return optimizers

    def stages(self) -> list[Stage]:
        c = self.config
        mixmatch = Stage("mixmatch", int(c.steps), "MixMatch on the labeled source and the "
                         + ("target translated by G_T→S" if c.adapt == "cyclegan"
                            else "unlabeled images"))
        if c.adapt == "none":
            return [mixmatch]
        return [Stage("cyclegan", int(c.gan_steps), "CycleGAN translators target <-> source",
                      trains_segmentor=False), mixmatch]

    def begin_stage(self, stage: Stage) -> None:
        if stage.name not in ("cyclegan", "mixmatch"):
            raise ValueError(f"mixmatch: unknown stage {stage.name!r}.")
        self.stage_name = stage.name
        c = self.config
        batch = c.gan_batch_size if stage.name == "cyclegan" else c.unlabeled_batch_size
        self.unlabeled_batch_size = self.target_batch_size = int(batch)

    def unlabeled_images(self, data) -> tf.Tensor:
        """The MixMatch unlabeled batch: target images (translated into the source domain with
        adapt=cyclegan), or the source's unlabeled images in a one-domain run."""
        if "target" not in data:
            return data["unlabeled"]["image"]
        if self.config.adapt == "cyclegan":
            return tf.stop_gradient(self.translate_to_source(data["target"]["image"]))
        return self.to_source_shape(data["target"]["image"])

    def train_step(self, data):
        if self.stage_name == "cyclegan":
            return self.track(**self.translation_step(data))
        c, activation = self.config, self.activation
        # 1. labeled batch (pipeline-augmented) and unlabeled batch
        images = data["labeled"]["image"]                                # (B, H, W, C)
        targets = self.targets(data["labeled"]["label"])                 # (B, H, W, K)
        unlabeled = tf.cast(self.unlabeled_images(data), images.dtype)  # (B', H, W, C)

        # 2-4. label guess over K views, sharpened, expressed in each view's frame
        def predict(view):
            return probabilities_of(self.segmentor(view, training=True), activation)

        seeds = [self.next_seed() for _ in range(c.guess_augmentations)]
        guess, views, flips = guess_labels(predict, unlabeled, seeds, c.guess_augment)
        guess = tf.stop_gradient(sharpen(guess, c.temperature, activation))
        view_targets = [apply_flips(guess, flip) for flip in flips]
        # 5. MixUp of [X; Û_1..Û_K] with a shuffle of itself, λ = max(λ', 1 − λ')
        all_images = tf.concat([images, *views], 0)
        all_targets = tf.concat([targets, *view_targets], 0)
        count = tf.shape(all_images)[0]
        permutation = tf.argsort(tf.random.stateless_uniform(tf.reshape(count, [1]),
                                                             self.next_seed()))
        lam = mixup_lambda(count, c.mixup_alpha, self.next_seed(), c.mixup_beta)
        mixed_images, mixed_targets = mix(all_images, all_targets, lam, permutation)
        batch = tf.shape(images)[0]
        steps = tf.cast(self.seg_optimizer.iterations, tf.float32)
        ramp = 1.0 if not c.rampup_steps else tf.minimum(steps / float(c.rampup_steps), 1.0)
        weight = c.unlabeled_weight * ramp
        with tf.GradientTape() as tape:
            # 6. one forward pass; CE on the mixed labeled part + λ_u MSE on the unlabeled part
            logits = self.segmentor(mixed_images, training=True)
            loss, labeled_loss, unlabeled_loss = mixmatch_loss(
                self.loss_terms(mixed_targets[:batch], logits[:batch])["loss"],
                mixed_targets[batch:], logits[batch:], weight, activation)
        grad_norm = self.apply_network_gradients("seg_optimizer", tape, loss)
        confidence = tf.reduce_mean(tf.reduce_max(guess, axis=-1))
        return self.track(loss=tf.reduce_mean(labeled_loss) + weight * tf.reduce_mean(
                              unlabeled_loss),
                          labeled_loss=tf.reduce_mean(labeled_loss),
                          unlabeled_loss=tf.reduce_mean(unlabeled_loss),
                          unlabeled_weight=tf.cast(weight, tf.float32) * tf.ones([]),
                          guess_confidence=confidence, seg_grad_norm=grad_norm)


def build_predictor(config: Config, data_spec: DataSpec) -> keras.Model:
    """The exported network alone: the U-Net's probabilities (no translator, no optimizer)."""
    config = resolve(config, data_spec)
    segmentor = unet.build_unet(data_spec.input_shape, data_spec.num_outputs,
                                supervised.network_config(config), name="segmentor")
    return probability_model(segmentor, data_spec)


def build(config: Config, data_spec: DataSpec) -> MixMatch:
    """Builds the (uncompiled) MixMatch method (with its CycleGAN when adapt="cyclegan")."""
    return MixMatch(config, data_spec, name="mixmatch")
