"""fm_gan: few-shot 3D multi-modal segmentation with a K+1-class GAN.

Paper: A. K. Mondal, J. Dolz, C. Desrosiers, "Few-shot 3D multi-modal medical image segmentation
using generative adversarial learning", arXiv:1810.12241 (2018); the semi-supervised K+1-class
GAN and feature matching of T. Salimans et al., "Improved Techniques for Training GANs" (NeurIPS
2016); the bad GAN of Z. Dai et al., "Good Semi-supervised Learning that Requires a Bad GAN"
(NeurIPS 2017).

The segmentor is the discriminator: the weight-normalised 3D U-Net (`networks.unet.PAPER_UNET_3D`,
filters 32/64/128/256, leaky ReLU 0.2, average pooling, weight-normalised transposed convs, final
3³ conv to K logits, no batch norm) — the same network, with the same option names, as
`--method=supervised` on 3D data, so `--set=filters=...` means the same in both. The fake class
has the implicit logit 0 (`tfseg.losses.gan`). The generator and the bad-GAN encoder are
`tfseg.networks.gan3d`.

**The default `Config()` is the paper's text (preset "paper" = the defaults)**; preset
"reference" switches to the authors' published code where it differs (`PRESETS`).

Per batch (`train_step`): one discriminator step on labeled + unlabeled + fake patches
    L_D = CE(labeled) + w_u·(−LSE + softplus(LSE))(unlabeled) + w_f·softplus(LSE)(fake)
(each term the mean over voxels and patches):
- paper (eqs. 4–5): w_u = w_f = 1 and a plain (unweighted) mean cross-entropy
  (`class_weighting="none"`);
- reference code: w_u = w_f = 0.5 and class weights bg 0.33, CSF 1.5, GM 0.83, WM 1.33 for brain
  tissues (`class_weighting="reference"`, `supervised.default_class_weights`).
Then one generator step (`gan_loss`):
- "feature_matching" (default, best in the paper): distance between the batch means of an
  intermediate segmentor feature (`feature_layer`, default the first bottleneck conv
  "bottleneck_a_act", 4³×256 on 32³ patches) on unlabeled and on generated patches. Paper
  (eq. 11): the squared L2 norm ‖·‖²₂, i.e. summed over the feature's elements
  (`feature_norm="squared_l2"`, `feature_reduction="sum"`); reference code: the mean absolute
  difference (`"l1"`, `"mean"`);
- "standard": the non-saturating loss −log p(real | G(z));
- "bad": feature matching + `vi_weight` (0.01) × the variational entropy term
  E_z[−log q(z | G(z))], the Gaussian negative log-likelihood summed over the latent dimensions
  (a log-density of the vector z) and averaged over the batch. Eq. 12 adds it to the
  ‖·‖²₂ feature-matching term, which is likewise a sum (over feature elements), so with
  `feature_reduction="sum"` both terms are reduced as the paper writes them and `vi_weight`
  weighs them as in eq. 12. The reference code averaged the feature term over its elements
  but summed the entropy term, which weighs the entropy term n_features times more (16,384× at
  the paper's widths); preset "reference" keeps that.
Adam lr 1e-4, β1 0.5 for every network; batches of 30 labeled, 30 unlabeled and 30 fake patches
(paper and reference alike). z ~ U(−1, 1)^200.

Intensities: preprocessing maps each channel's foreground 2nd / 98th percentiles to 0 / 1
without clipping, so the data lies roughly in [−1.3, 1.7] (the zero background of skull-stripped
scans lands at −p2 / (p98 − p2): −0.6 … −1.3 on synthetic_brain; tissue up to ~1.6). The
generator's tanh output t ∈ [−1, 1] is mapped affinely onto `generator_range` (default
(−1.5, 2.0)), which contains that range; set it for data normalised otherwise (e.g. with a
`clip_range`).

Where the reference code was wrong, and what we do instead (preset "reference" does not
reproduce these):
- inference averaged the *class indices* of overlapping patches (a CSF vote and a WM vote made
  GM); we average softmax probabilities with Gaussian blending (`tfseg.inference`);
- unlabeled patches were drawn at positions chosen from *another subject's labels*; ours come
  from each unlabeled volume's own foreground mask (`tfseg.data.pipeline`);
- model selection used GM + WM Dice only; we select on the mean foreground Dice (`train.py`).

Tracked (progress bar, train_log.csv, TensorBoard train/*): loss (L_D), labeled_loss,
unlabeled_loss and fake_loss (weighted as in L_D), gen_loss, vi_loss (bad GAN), fm_distance (the
feature distance between the unlabeled and fake patches of the discriminator step, for every
variant), p_fake_on_fake and p_fake_on_unlabeled (mean 1 / (Z + 1)), seg_grad_norm, gen_grad_norm;
`summary_images()` adds the middle slices of generated patches (train/generated).

Under a distribution strategy the feature means are per replica (each replica matches its own
batch); the loss is divided by the number of replicas so the summed gradient is their average.
"""
from __future__ import annotations

import dataclasses

import keras
import numpy as np
import tensorflow as tf

from tfseg.losses import gan as gan_losses
from tfseg.methods import supervised
from tfseg.methods.base import (DataSpec, SegMethod, global_mean, num_replicas,
                               probability_model)
from tfseg.networks import gan3d, unet

SPATIAL_DIMS = (3,)
GAN_LOSSES = ("feature_matching", "standard", "bad")


@dataclasses.dataclass(frozen=True)
class Config:
    """fm_gan settings; the defaults are the paper's text (preset "paper").

    Attributes:
      filters, norm, activation, pooling, upsampling: segmentor U-Net (`networks.unet`), same
        names and meaning as `supervised` (paper: `PAPER_UNET_3D`).
      class_weighting: how `class_weights=None` resolves: "none" (the paper's eq. 4: plain mean
        cross-entropy, every weight 1) | "reference" (the reference code's brain tissue weights
        bg 0.33, CSF 1.5, GM 0.83, WM 1.33 when the classes are background/csf/gm/wm, else
        background 0.1 + 0.9 shared: `supervised.default_class_weights`).
      class_weights: explicit per-class weights of the labeled cross-entropy (override
        `class_weighting`); None = by `class_weighting`.
      gan_loss: "feature_matching" | "standard" | "bad".
      unlabeled_weight, fake_weight: w_u, w_f of the unlabeled and fake terms (paper 1,
        reference 0.5).
      rampup_steps: 0 (the paper) = w_u, w_f constant; N > 0 = both multiplied by the sigmoid
        ramp-up exp(−5 (1 − t)²), t = min(step / N, 1) (Laine & Aila 2017), so the segmentor
        first learns from the labeled patches and the adversarial terms grow in as the GAN
        forms (not in the paper: for small batches and budgets, see docs/results/fm_gan.md).
      feature_layer: segmentor layer whose output is matched ("bottleneck_a_act", "bottleneck",
        "enc2", ... — see `networks.unet`).
      feature_norm: "squared_l2" (paper eq. 11) | "l2" | "l1" (reference code).
      feature_reduction: how the feature-matching distance is reduced over the feature's
        elements: "sum" (the paper's ‖·‖²₂, consistent with the summed entropy term of eq. 12)
        | "mean" (the reference code's; its scale does not grow with the feature size).
      latent_dim: size of z ~ U(−1, 1).
      generator_filters: generator channels (dense grid first).
      generator_range: (low, high) the tanh output is mapped onto (see the module docstring).
      encoder_filters, encoder_kernel_size: bad-GAN encoder convolutions.
      vi_weight: weight of the variational entropy term (bad GAN).
      log_sigma_range: bounds of the encoder's log σ.
      learning_rate, beta_1, beta_2: Adam, for every network.
      batch_size: labeled patches per (global) batch.
      unlabeled_batch_size: unlabeled patches per batch; as many fakes are generated.
      steps: optimisation steps (one D and one G update each).
      validation_every: steps between validation rounds.
      image_summaries: number of generated patches shown (middle slice per channel) in
        TensorBoard at every summary step; 0 = none.
    """

    filters: tuple[int, ...] = unet.PAPER_UNET_3D.filters
    norm: str = unet.PAPER_UNET_3D.norm
    activation: str = unet.PAPER_UNET_3D.activation
    pooling: str = unet.PAPER_UNET_3D.pooling
    upsampling: str = unet.PAPER_UNET_3D.upsampling
    class_weighting: str = "none"
    class_weights: tuple[float, ...] | None = None
    gan_loss: str = "feature_matching"
    unlabeled_weight: float = 1.0
    fake_weight: float = 1.0
    rampup_steps: int = 0
    feature_layer: str = "bottleneck_a_act"
    feature_norm: str = "squared_l2"
    feature_reduction: str = "sum"
    latent_dim: int = gan3d.PAPER_LATENT_DIM
    generator_filters: tuple[int, ...] = gan3d.PAPER_GENERATOR_FILTERS
    generator_range: tuple[float, float] = (-1.5, 2.0)
    encoder_filters: tuple[int, ...] = gan3d.PAPER_ENCODER_FILTERS
    encoder_kernel_size: int = 5
    vi_weight: float = 0.01
    log_sigma_range: tuple[float, float] = (-5.0, 2.0)
    learning_rate: float = 1e-4
    beta_1: float = 0.5
    beta_2: float = 0.999
    batch_size: int = 30
    unlabeled_batch_size: int = 30
    steps: int = 10000
    validation_every: int = 500
    image_summaries: int = 4


PRESETS = {
    # `python -m launch.train --method=fm_gan --dataset=synthetic_brain --preset=paper`: the
    # paper's text (= Config()); not run (10,000 steps of 30 + 30 + 30 patches: ~64 h here).
    "paper": {},
    # same with `--preset=reference`: the authors' published code where it differs from the
    # paper's text (w_u = w_f = 0.5, class-weighted CE, L1 feature matching averaged over the
    # feature's elements); not run at full size.
    "reference": {"unlabeled_weight": 0.5, "fake_weight": 0.5, "class_weighting": "reference",
                  "feature_norm": "l1", "feature_reduction": "mean"},
    # `python -m launch.train --method=fm_gan --dataset=synthetic_brain --preset=quick --labeled=1 --num_val=1 --num_test=4`: 3.2–7.4 min per run on 2 shared cores (load 10–16); test mean Dice 0.397 ± 0.011 per run over 5 labeled draws on one fixed test set, scored with the default 32³ tile (`launch.study --fixed_test`; U-Net 0.482 ± 0.102 at the same budget; normal GAN 0.378, bad GAN 0.394; docs/results/fm_gan.md). The paper's settings and depth at ¼ widths, batches of 4 + 4 + 4 instead of 30 + 30 + 30 (equal thirds kept), 100 steps. A seed repeats a run exactly only on the same hardware and thread count.
    "quick": {"filters": (8, 16, 32, 64), "generator_filters": (64, 32, 16, 8),
              "encoder_filters": (16, 32, 64), "batch_size": 4, "unlabeled_batch_size": 4,
              "steps": 100, "validation_every": 50},
}

CLASS_WEIGHTINGS = ("none", "reference")


def resolve(config: Config, data_spec: DataSpec) -> Config:
    """Fills `class_weights` and checks every field against `data_spec`.

    Raises:
      ValueError: naming the field and the fix.
    """
    if data_spec.spatial_dims != 3:
        raise ValueError("fm_gan works on 3D patches; the dataset is "
                         f"{data_spec.spatial_dims}D. Use a 3D dataset (iseg2017, mrbrains13, "
                         "synthetic_brain) or --method=supervised.")
    for name, choices in (("class_weighting", CLASS_WEIGHTINGS), ("gan_loss", GAN_LOSSES),
                          ("feature_norm", gan_losses.FEATURE_NORMS),
                          ("feature_reduction", gan_losses.FEATURE_REDUCTIONS)):
        if getattr(config, name) not in choices:
            raise ValueError(f"fm_gan: {name}={getattr(config, name)!r}; choose one of "
                             f"{list(choices)}.")
    if config.class_weights is None:
        weights = ((1.0,) * data_spec.num_classes if config.class_weighting == "none"
                   else supervised.default_class_weights(data_spec))
        config = dataclasses.replace(config, class_weights=weights)
    if len(config.class_weights) != data_spec.num_classes:
        raise ValueError(f"fm_gan: class_weights={config.class_weights} needs one weight per "
                         f"class ({data_spec.num_classes}: {', '.join(data_spec.class_names)}).")
    for name in ("batch_size", "unlabeled_batch_size", "steps", "validation_every",
                 "latent_dim", "encoder_kernel_size"):
        if getattr(config, name) < 1:
            raise ValueError(f"fm_gan: {name} must be >= 1, got {getattr(config, name)}.")
    for name in ("unlabeled_weight", "fake_weight", "vi_weight", "learning_rate"):
        if getattr(config, name) < 0:
            raise ValueError(f"fm_gan: {name} must be >= 0, got {getattr(config, name)}.")
    if config.rampup_steps < 0:
        raise ValueError(f"fm_gan: rampup_steps must be >= 0 (0 = no ramp-up), got "
                         f"{config.rampup_steps}.")
    if config.image_summaries < 0:
        raise ValueError(f"fm_gan: image_summaries must be >= 0, got {config.image_summaries}.")
    multiple = gan3d.generator_size_multiple(config.generator_filters)
    if any(s % multiple for s in data_spec.example_shape):
        raise ValueError(f"fm_gan: the training patch {data_spec.example_shape} is not a multiple "
                         f"of {multiple} (2**len(generator_filters) = 2**"
                         f"{len(config.generator_filters)}); the generated patch must have the "
                         "training patch's size. Use fewer generator_filters or another patch.")
    return config


class FMGAN(SegMethod):
    """Weight-normalised 3D U-Net discriminator/segmentor with K+1 classes, plus a generator
    (and, for `gan_loss=bad`, an encoder).

    Attributes:
      generator: z (B, latent_dim) -> patch (B, D, H, W, C).
      encoder: generated patch -> [μ, log σ] of z (`gan_loss=bad`), else None.
      segmentor_with_features: the segmentor's layers with outputs [logits, matched feature].
      feature_extractor: input -> matched feature (only the layers up to it).
    """

    def __init__(self, config: Config, data_spec: DataSpec, **kwargs):
        config = resolve(config, data_spec)
        network = supervised.network_config(config)
        segmentor = unet.build_unet(data_spec.input_shape, data_spec.num_classes, network,
                                    name="segmentor")
        names = ["loss", "labeled_loss", "unlabeled_loss", "fake_loss", "gen_loss",
                 "fm_distance", "p_fake_on_fake", "p_fake_on_unlabeled"]
        if config.gan_loss == "bad":
            names.append("vi_loss")
        names += ["seg_grad_norm", "gen_grad_norm"]
        super().__init__(config, data_spec, segmentor, labeled_batch_size=config.batch_size,
                         unlabeled_batch_size=config.unlabeled_batch_size,
                         size_multiple=unet.size_multiple(network), loss_names=names, **kwargs)
        layer_names = [layer.name for layer in segmentor.layers]
        if config.feature_layer not in layer_names:
            choices = [n for n in layer_names if n.endswith("_act") or n in ("bottleneck",)]
            raise ValueError(f"fm_gan: feature_layer={config.feature_layer!r} is not a layer of "
                             f"the segmentor; choose one of {choices}.")
        feature = segmentor.get_layer(config.feature_layer).output
        # Both share the segmentor's layers (and so its weights).
        self.segmentor_with_features = keras.Model(segmentor.input, [segmentor.output, feature],
                                                   name="segmentor_with_features")
        self.feature_extractor = keras.Model(segmentor.input, feature, name="feature_extractor")
        self.generator = gan3d.build_generator(
            data_spec.example_shape, data_spec.num_channels, config.latent_dim,
            config.generator_filters, config.generator_range, name="generator")
        self.encoder = None
        if config.gan_loss == "bad":
            self.encoder = gan3d.build_encoder(
                (*data_spec.example_shape, data_spec.num_channels), config.latent_dim,
                config.encoder_filters, config.encoder_kernel_size, config.log_sigma_range,
                name="encoder")
        self.class_weights = tuple(float(w) for w in config.class_weights)
        # A fixed z for the TensorBoard panel of generated patches.
        self._summary_z = np.random.default_rng(0).uniform(
            -1, 1, (config.image_summaries, config.latent_dim)).astype(np.float32)

    # ----------------------------------------------------------------------- optimizers
    def make_optimizers(self):
        def adam(name):
            return keras.optimizers.Adam(self.config.learning_rate, beta_1=self.config.beta_1,
                                         beta_2=self.config.beta_2, name=name)

        generator_side = [self.generator] + ([self.encoder] if self.encoder is not None else [])
        return {"seg_optimizer": (adam("seg_adam"), [self.segmentor]),
                "gen_optimizer": (adam("gen_adam"), generator_side)}

    # ----------------------------------------------------------------------- step pieces
    def sample_z(self, batch_size) -> tf.Tensor:
        """z ~ U(−1, 1)^latent_dim: (batch_size, latent_dim) float32."""
        return tf.random.stateless_uniform((batch_size, self.config.latent_dim),
                                           seed=self.next_seed(), minval=-1.0, maxval=1.0)

    def rampup(self) -> tf.Tensor:
        """The factor of w_u and w_f at the current step: exp(−5 (1 − t)²), t = min(step /
        rampup_steps, 1), step = the segmentor optimizer's iterations; 1 when rampup_steps = 0."""
        if not self.config.rampup_steps:
            return tf.constant(1.0)
        step = tf.cast(self.seg_optimizer.iterations, tf.float32)
        t = tf.minimum(step / float(self.config.rampup_steps), 1.0)
        return tf.exp(-5.0 * tf.square(1.0 - t))

    def discriminator_terms(self, y_labeled, logits_labeled, logits_unlabeled, logits_fake
                            ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """The three per-example terms of L_D, weighted: (class-weighted) CE of the labeled
        patches, w_u·(−log p(real)) of the unlabeled and w_f·(−log p(fake)) of the generated ones
        (w_u, w_f times the ramp-up factor); each the mean over voxels: three (B,) tensors.

        Args:
          y_labeled: (B, *S, K) one-hot labels; logits_*: (B_*, *S, K) segmentor logits.
        """
        cfg = self.config
        ramp = self.rampup()
        labeled = gan_losses.labeled_loss(y_labeled, logits_labeled, self.class_weights)
        unlabeled = ramp * cfg.unlabeled_weight * gan_losses.unlabeled_loss(logits_unlabeled)
        fake_term = ramp * cfg.fake_weight * gan_losses.fake_loss(logits_fake)
        return labeled, unlabeled, fake_term

    def discriminator_step(self, labeled_images, labels, unlabeled_images, z
                           ) -> dict[str, tf.Tensor]:
        """One update of the segmentor on labeled + unlabeled + fake patches.

        Args:
          labeled_images: (B, *S, C); labels: (B, *S) int; unlabeled_images: (B_u, *S, C);
          z: (B_f, latent_dim).

        Returns:
          The step's scalar terms (losses, fake probabilities, feature distance, grad norm).
        """
        cfg = self.config
        fake = tf.stop_gradient(self.generator(z, training=True))       # (B_f, *S, C)
        b_l, b_u = tf.shape(labeled_images)[0], tf.shape(unlabeled_images)[0]
        # Weight norm has no batch statistics: one pass over the concatenation equals three.
        images = tf.concat([labeled_images, unlabeled_images,
                            tf.cast(fake, labeled_images.dtype)], axis=0)
        with tf.GradientTape() as tape:
            logits, features = self.segmentor_with_features(images, training=True)
            logits = tf.cast(logits, tf.float32)
            logits_l, logits_u, logits_f = (logits[:b_l], logits[b_l:b_l + b_u],
                                            logits[b_l + b_u:])
            labeled, unlabeled, fake_term = self.discriminator_terms(
                self.one_hot(labels), logits_l, logits_u, logits_f)
            loss = global_mean(labeled) + global_mean(unlabeled) + global_mean(fake_term)
        grad_norm = self.apply_network_gradients("seg_optimizer", tape, loss)
        features = tf.cast(features, tf.float32)
        return {"loss": loss, "labeled_loss": tf.reduce_mean(labeled),
                "unlabeled_loss": tf.reduce_mean(unlabeled),
                "fake_loss": tf.reduce_mean(fake_term),
                "fm_distance": gan_losses.feature_matching(
                    features[b_l:b_l + b_u], features[b_l + b_u:], cfg.feature_norm,
                    cfg.feature_reduction),
                "p_fake_on_fake": tf.reduce_mean(gan_losses.fake_probability(logits_f)),
                "p_fake_on_unlabeled": tf.reduce_mean(gan_losses.fake_probability(logits_u)),
                "seg_grad_norm": grad_norm}

    def generator_loss(self, unlabeled_images, z) -> dict[str, tf.Tensor]:
        """The generator (+ encoder) loss terms; call inside the generator's tape."""
        cfg = self.config
        fake = self.generator(z, training=True)                          # (B_f, *S, C)
        terms = {}
        if cfg.gan_loss == "standard":
            logits = tf.cast(self.segmentor(fake, training=True), tf.float32)
            terms["gen_loss"] = global_mean(gan_losses.generator_nonsaturating_loss(logits))
            return terms
        real_features = tf.stop_gradient(self.feature_extractor(unlabeled_images, training=True))
        fake_features = self.feature_extractor(fake, training=True)
        fm = gan_losses.feature_matching(real_features, fake_features, cfg.feature_norm,
                                         cfg.feature_reduction)
        terms["gen_loss"] = fm / float(num_replicas())
        if cfg.gan_loss == "bad":
            mu, log_sigma = self.encoder(fake, training=True)
            vi = gan_losses.gaussian_nll(z, mu, log_sigma)                # (B_f,)
            terms["vi_loss"] = global_mean(vi)
            terms["gen_loss"] = terms["gen_loss"] + cfg.vi_weight * terms["vi_loss"]
        return terms

    def generator_step(self, unlabeled_images, z) -> dict[str, tf.Tensor]:
        """One update of the generator (+ encoder); the segmentor is not changed."""
        with tf.GradientTape() as tape:
            terms = self.generator_loss(unlabeled_images, z)
        terms["gen_grad_norm"] = self.apply_network_gradients("gen_optimizer", tape,
                                                              terms["gen_loss"])
        return terms

    def train_step(self, data):
        labeled_images = data["labeled"]["image"]           # (B, *S, C)
        labels = data["labeled"]["label"]                   # (B, *S)
        unlabeled_images = data["unlabeled"]["image"]       # (B_u, *S, C)
        batch_fake = tf.shape(unlabeled_images)[0]          # as many fakes as unlabeled
        # 1. discriminator (segmentor) step: labeled + unlabeled + fake
        d_terms = self.discriminator_step(labeled_images, labels, unlabeled_images,
                                          self.sample_z(batch_fake))
        # 2. generator (+ encoder) step against the updated segmentor, fresh z
        g_terms = self.generator_step(unlabeled_images, self.sample_z(batch_fake))
        # 3. trackers (gen_loss is the replica's share: rescale to the mean for display)
        g_terms["gen_loss"] = g_terms["gen_loss"] * float(num_replicas())
        return self.track(**d_terms, **g_terms)

    # ----------------------------------------------------------------------- TensorBoard
    def summary_images(self) -> dict[str, np.ndarray]:
        """{"generated": (N, H, C·W, 1)}: the middle axial slice of each channel of N generated
        patches from a fixed z, scaled from `generator_range` to [0, 1] (called eagerly by
        `callbacks.StepMonitor` at its summary steps)."""
        if not len(self._summary_z):
            return {}
        fake = keras.ops.convert_to_numpy(self.generator(self._summary_z, training=False))
        low, high = self.config.generator_range
        middle = fake[:, fake.shape[1] // 2]                             # (N, H, W, C)
        panel = np.concatenate([middle[..., c] for c in range(middle.shape[-1])], axis=2)
        return {"generated": np.clip((panel[..., None] - low) / (high - low), 0.0, 1.0)}


def build_predictor(config: Config, data_spec: DataSpec) -> keras.Model:
    """The exported network alone (no generator, no optimizer): the K real classes' softmax."""
    config = resolve(config, data_spec)
    segmentor = unet.build_unet(data_spec.input_shape, data_spec.num_classes,
                                supervised.network_config(config), name="segmentor")
    return probability_model(segmentor, data_spec)


def build(config: Config, data_spec: DataSpec) -> FMGAN:
    """Builds the (uncompiled) fm_gan method for `data_spec`."""
    return FMGAN(config, data_spec, name="fm_gan")
