import math

import numpy as np
import pytest
import tensorflow as tf

from tfseg.data import augment

SEED = tf.constant([3, 14], tf.int64)


def _blocks(batch=6, scale=1, num_classes=4):
    """Label maps of large rectangles (one per class) + the one-hot image of them."""
    labels = np.zeros((batch, 24, 24), np.int32)
    for b in range(batch):
        shift = 2 * (b % 6)
        labels[b, 4:12, 3 + shift:11 + shift] = 1
        labels[b, 13:21, 5:15] = 2
        labels[b, 2:9, 14:22] = 3
    labels = labels.repeat(scale, axis=1).repeat(scale, axis=2)
    images = np.eye(num_classes, dtype=np.float32)[labels]  # (B, H, W, K)
    return images, labels


def test_sample_bilinear_golden_values():
    image = tf.constant([[[[1.0], [2.0]], [[3.0], [4.0]]]])  # (1, 2, 2, 1)
    coords = tf.constant([[[[0.5, 0.5], [0.0, 1.0], [1.0, 1.5], [-0.5, 0.0]]]])  # (1, 1, 4, 2)
    zero = augment.sample_bilinear(image, coords, fill="zero")[0, 0, :, 0].numpy()
    # centre = mean; exact pixel; half outside on the right -> 0.5 * 4; half above -> 0.5 * 1
    np.testing.assert_allclose(zero, [2.5, 2.0, 2.0, 0.5], rtol=1e-6)
    edge = augment.sample_bilinear(image, coords, fill="edge")[0, 0, :, 0].numpy()
    np.testing.assert_allclose(edge, [2.5, 2.0, 4.0, 1.0], rtol=1e-6)
    with pytest.raises(ValueError, match="fill must be"):
        augment.sample_bilinear(image, coords, fill="reflect")


def test_warp_nearest_rotation_by_90_matches_numpy():
    labels = np.arange(25, dtype=np.int32).reshape(1, 5, 5)
    # output (y, x) reads input (x, 4 - y): a quarter turn, np.rot90 with k=-1... checked by numpy
    grid_y, grid_x = np.meshgrid(np.arange(5), np.arange(5), indexing="ij")
    coords = np.stack([grid_x, 4 - grid_y], -1)[None].astype(np.float32) + 0.3  # rounds back
    out = augment.warp_nearest(tf.constant(labels), tf.constant(coords)).numpy()
    np.testing.assert_array_equal(out[0], labels[0][grid_x, 4 - grid_y])
    np.testing.assert_array_equal(out[0], np.rot90(labels[0], k=1))
    outside = augment.warp_nearest(tf.constant(labels), tf.constant(coords) + 10.0, fill_value=7)
    assert (outside.numpy() == 7).all()


def test_flip_is_exact_and_joint():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(32, 5, 7, 2)).astype(np.float32)
    labels = rng.integers(0, 3, size=(32, 5, 7)).astype(np.int32)
    out_images, out_labels = augment.augment(tf.constant(images), tf.constant(labels), "flip", SEED)
    flipped = [bool(np.array_equal(o, i[:, ::-1])) for o, i in zip(out_images.numpy(), images)]
    kept = [bool(np.array_equal(o, i)) for o, i in zip(out_images.numpy(), images)]
    assert all(f != k for f, k in zip(flipped, kept))  # each example: exactly flipped or kept
    assert 4 < sum(flipped) < 28
    for b in range(32):
        expected = labels[b][:, ::-1] if flipped[b] else labels[b]
        np.testing.assert_array_equal(out_labels[b].numpy(), expected)


def test_flip_3d_along_x():
    volume = np.arange(3 * 4 * 5, dtype=np.float32).reshape(1, 3, 4, 5, 1)
    volume = np.repeat(volume, 2, axis=0)
    labels = (volume[..., 0] % 3).astype(np.int32)
    images, out_labels = augment.random_flip(tf.constant(volume), tf.constant(labels), SEED,
                                             probability=1.0)
    np.testing.assert_array_equal(images.numpy(), volume[:, :, :, ::-1])
    np.testing.assert_array_equal(out_labels.numpy(), labels[:, :, :, ::-1])


@pytest.mark.parametrize("spec", ["affine", "elastic", "affine+elastic+flip"])
def test_same_transform_hits_image_and_label(spec):
    images, labels = _blocks(batch=12, scale=3)  # 72 × 72: σ = 10 px moves content, not out
    out_images, out_labels = augment.augment(tf.constant(images), tf.constant(labels), spec, SEED)
    out_images, out_labels = out_images.numpy(), out_labels.numpy()
    assert out_labels.dtype == np.int32 and out_labels.shape == labels.shape
    assert set(np.unique(out_labels)) <= {0, 1, 2, 3}
    # where one class carries > 75 % of the bilinear weight, the nearest sample is that class
    confident = out_images.max(-1) > 0.75
    np.testing.assert_array_equal(out_images.argmax(-1)[confident], out_labels[confident])
    # fully outside the source (zero-filled image): background label
    outside = out_images.sum(-1) == 0
    assert (out_labels[outside] == 0).all()
    assert (confident | outside).mean() > 0.9  # only boundary pixels are left unchecked
    changed = (out_labels != labels).reshape(12, -1).any(axis=1)
    assert changed.sum() >= 6  # the transforms really moved most examples


def test_fused_affine_kernel_matches_gather_sampler():
    # random_affine uses TF's ImageProjectiveTransformV3; the composite (affine + elastic) path
    # uses sample_bilinear / warp_nearest: both must implement the same mapping.
    rng = np.random.default_rng(2)
    images = tf.constant(rng.normal(size=(48, 20, 17, 2)).astype(np.float32))
    labels = tf.constant(rng.integers(0, 5, size=(48, 20, 17)).astype(np.int32))
    fused_images, fused_labels = augment.random_affine(images, labels, SEED)
    matrices = augment.affine_matrices(48, SEED)
    grid = tf.broadcast_to(augment._pixel_grid(20, 17), (48, 20, 17, 2))
    coords = augment._apply_affine(grid, matrices, 20, 17)
    np.testing.assert_allclose(fused_images.numpy(),
                               augment.sample_bilinear(images, coords).numpy(), atol=1e-4)
    # nearest may break exact .5 ties differently
    same = fused_labels.numpy() == augment.warp_nearest(labels, coords).numpy()
    assert same.mean() > 0.98


def test_identity_at_zero_magnitude():
    images, labels = _blocks()
    images, labels = tf.constant(images), tf.constant(labels)
    out = augment.random_affine(images, labels, SEED, probability=0.0)
    np.testing.assert_array_equal(out[0].numpy(), images.numpy())
    np.testing.assert_array_equal(out[1].numpy(), labels.numpy())
    out = augment.random_elastic(images, labels, SEED, sigma=0.0)
    np.testing.assert_array_equal(out[0].numpy(), images.numpy())
    np.testing.assert_array_equal(out[1].numpy(), labels.numpy())
    out = augment.random_intensity(images, SEED, contrast_range=(1.0, 1.0),
                                   brightness_range=(0.0, 0.0))
    np.testing.assert_allclose(out.numpy(), images.numpy(), atol=1e-6)
    same_images, same_labels = augment.augment(images, labels, "none", SEED)
    assert same_images is images and same_labels is labels


def test_intensity_golden_and_labels_untouched():
    rng = np.random.default_rng(1)
    images = rng.normal(size=(64, 6, 6, 2)).astype(np.float32)
    labels = rng.integers(0, 2, size=(64, 6, 6)).astype(np.int32)
    out_images, out_labels = augment.augment(tf.constant(images), tf.constant(labels),
                                             "intensity", SEED)
    np.testing.assert_array_equal(out_labels.numpy(), labels)
    out = out_images.numpy()
    mean = images.mean(axis=(1, 2), keepdims=True)
    # per example: out = (x - m) c + m + b, so c = std ratio and b = mean shift, same on channels
    contrast = out.std(axis=(1, 2)) / images.std(axis=(1, 2))  # (B, C)
    brightness = out.mean(axis=(1, 2)) - mean[:, 0, 0]
    np.testing.assert_allclose(contrast[:, 0], contrast[:, 1], rtol=1e-4)
    np.testing.assert_allclose(brightness[:, 0], brightness[:, 1], atol=1e-5)
    assert contrast.min() >= 0.8 - 1e-5 and contrast.max() <= 1.2 + 1e-5
    assert brightness.min() >= -0.1 - 1e-5 and brightness.max() <= 0.1 + 1e-5
    assert contrast.std() > 0.05 and brightness.std() > 0.03
    np.testing.assert_allclose(out, (images - mean) * contrast[:, None, None, :1]
                               + mean + brightness[:, None, None, :1], atol=1e-5)


def test_affine_matrix_distribution():
    matrices = augment.affine_matrices(8000, SEED).numpy()  # (B, 2, 2)
    det = np.linalg.det(matrices)
    identity = np.all(np.isclose(matrices, np.eye(2), atol=1e-6), axis=(1, 2))
    flips = np.isclose(det, -1.0, atol=1e-6)
    # identity: 20 % not transformed + 80 % · 1/4 · 1/8 (k = 0 of the 45° rotations) = 22.5 %
    assert abs(identity.mean() - 0.225) < 0.02
    assert abs(flips.mean() - 0.2) < 0.02
    scales = ~np.isclose(det, 1.0, atol=1e-5) & ~flips
    zoom = 1.0 / np.sqrt(det[scales])
    assert abs(scales.mean() - 0.2) < 0.02 and zoom.min() >= 0.9 - 1e-5 and zoom.max() <= 1.1 + 1e-5
    rotations = np.isclose(det, 1.0, atol=1e-5) & ~identity
    angles = np.degrees(np.arctan2(matrices[rotations, 1, 0], matrices[rotations, 0, 0]))
    small = np.abs(angles) <= 15.0 + 1e-3
    multiples = np.isclose(np.mod(angles, 45.0), 0, atol=1e-3) | np.isclose(
        np.mod(angles, 45.0), 45.0, atol=1e-3)
    assert np.all(small | multiples)
    assert abs((small & ~multiples).mean() * rotations.mean() - 0.2) < 0.02


def test_elastic_field_statistics():
    # 21 px: the 3×3 control values sit exactly at pixels 3, 10 and 17 (half-pixel centres)
    field = augment.elastic_field(3000, 21, 21, SEED, sigma=10.0).numpy()
    at_grid = field[:, [3, 10, 17]][:, :, [3, 10, 17]]  # (B, 3, 3, 2)
    assert abs(at_grid.std() - 10.0) < 0.3 and abs(at_grid.mean()) < 0.3
    # smooth: neighbouring pixels differ by far less than the displacement scale
    assert np.abs(np.diff(field, axis=1)).mean() < 2.0
    zero = augment.elastic_field(2, 21, 21, SEED, sigma=0.0).numpy()
    assert not zero.any()


def test_eager_and_dataset_map_agree_and_seed_matters():
    images, labels = _blocks(batch=4)
    spec = "affine+elastic+flip+intensity"
    eager = augment.augment(tf.constant(images), tf.constant(labels), spec, SEED)
    dataset = tf.data.Dataset.from_tensors((images, labels)).map(
        lambda x, y: augment.augment(x, y, spec, SEED))
    mapped = next(iter(dataset))
    np.testing.assert_allclose(mapped[0].numpy(), eager[0].numpy(), atol=1e-5)
    np.testing.assert_array_equal(mapped[1].numpy(), eager[1].numpy())
    traced = tf.function(lambda x, y: augment.augment(x, y, spec, SEED))(images, labels)
    np.testing.assert_array_equal(traced[1].numpy(), eager[1].numpy())
    other = augment.augment(tf.constant(images), tf.constant(labels), spec, [3, 15])
    assert not np.array_equal(other[1].numpy(), eager[1].numpy())


def test_adding_an_operation_keeps_the_others_draws():
    images, labels = _blocks(batch=4)
    geometric = augment.augment(tf.constant(images), tf.constant(labels), "affine", SEED)
    both = augment.augment(tf.constant(images), tf.constant(labels), "affine+intensity", SEED)
    np.testing.assert_array_equal(both[1].numpy(), geometric[1].numpy())


def test_images_only():
    images, _ = _blocks(batch=2)
    out, labels = augment.augment(tf.constant(images), None, "affine+flip", SEED)
    assert labels is None and out.shape == images.shape


@pytest.mark.parametrize("spec, spatial_dims, message", [
    ("rotate", None, "unknown operation 'rotate'"),
    ("affine+mixup", None, "mixup produces soft labels"),
    ("flip+flip", None, "repeats an operation"),
    ("affine+flip", 3, "affine are implemented for 2D slices only"),
])
def test_spec_errors(spec, spatial_dims, message):
    with pytest.raises(ValueError, match=message):
        augment.parse_spec(spec, spatial_dims)


def test_spec_order_and_3d_rejection_in_augment():
    assert augment.parse_spec("intensity+flip+affine") == ("affine", "flip", "intensity")
    assert augment.parse_spec("none") == () and augment.parse_spec("") == ()
    volume = tf.zeros((1, 4, 4, 4, 1))
    with pytest.raises(ValueError, match="elastic are implemented for 2D"):
        augment.augment(volume, tf.zeros((1, 4, 4, 4), tf.int32), "elastic", SEED)
    out, _ = augment.augment(volume + 1.0, None, "flip+intensity", SEED)
    assert out.shape == volume.shape


def test_beta_samples_match_beta_moments():
    alpha = 0.2
    lam = augment.sample_beta([20000], alpha, SEED).numpy()
    assert lam.min() >= 0.0 and lam.max() <= 1.0 and np.isfinite(lam).all()
    assert abs(lam.mean() - 0.5) < 0.015
    expected_var = 1.0 / (4.0 * (2.0 * alpha + 1.0))  # Beta(a, a) variance
    assert abs(lam.var() - expected_var) / expected_var < 0.05


@pytest.mark.parametrize("dominant_first", [False, True])
def test_mixup_soft_labels(dominant_first):
    batch, classes = 16, 16
    images = np.broadcast_to(np.arange(batch, dtype=np.float32)[:, None, None, None],
                             (batch, 3, 3, 1)).copy()
    one_hot = np.broadcast_to(np.eye(classes, dtype=np.float32)[:, None, None, :],
                              (batch, 3, 3, classes)).copy()
    mixed_images, mixed_labels = augment.mixup(tf.constant(images), tf.constant(one_hot), 0.4,
                                               SEED, dominant_first=dominant_first)
    probs = mixed_labels.numpy()
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-6)
    assert probs.min() >= 0.0
    # image value = Σ_k k · p_k because image b is the constant b and its label is class b
    np.testing.assert_allclose(mixed_images.numpy()[..., 0], probs @ np.arange(classes),
                               atol=1e-4)
    own = probs[np.arange(batch), 0, 0, np.arange(batch)]  # λ (or 1 when paired with itself)
    assert own.min() >= (0.5 - 1e-6 if dominant_first else 0.0) and own.max() <= 1.0 + 1e-6
    assert np.count_nonzero((probs[:, 0, 0] > 1e-6).sum(-1) <= 2) == batch  # two sources at most
    with pytest.raises(ValueError, match="alpha must be > 0"):
        augment.mixup(tf.constant(images), tf.constant(one_hot), 0.0, SEED)


# --------------------------------------------------------------------------- half batches
def _changed_examples(out, original):
    return [not np.array_equal(o, i) for o, i in zip(np.asarray(out), np.asarray(original))]


def test_half_modifier_touches_only_odd_positions():
    """"elastic+intensity+half": even positions untouched (no affine in the spec), odd ones get
    the whole spec, each half with its own split of the seed."""
    images, labels = _blocks(batch=5)
    out_images, out_labels = augment.augment(tf.constant(images), tf.constant(labels),
                                             "elastic+intensity+half", SEED)
    assert _changed_examples(out_images, images) == [False, True, False, True, False]
    np.testing.assert_array_equal(out_labels.numpy()[0::2], labels[0::2])
    assert all(_changed_examples(out_labels.numpy()[1::2], labels[1::2]))
    _, seed_odd = tf.unstack(tf.random.experimental.stateless_split(SEED, 2))
    odd_images, odd_labels = augment.augment(tf.constant(images[1::2]),
                                             tf.constant(labels[1::2]), "elastic+intensity",
                                             seed_odd)
    np.testing.assert_allclose(out_images.numpy()[1::2], odd_images.numpy(), atol=1e-6)
    np.testing.assert_array_equal(out_labels.numpy()[1::2], odd_labels.numpy())


def test_half_modifier_keeps_affine_on_every_example():
    """The paper's RD row: even positions affine-only, odd positions affine + elastic."""
    images, labels = _blocks(batch=6)
    out_images, out_labels = augment.augment(tf.constant(images), tf.constant(labels),
                                             "affine+elastic+half", SEED)
    seed_even, seed_odd = tf.unstack(tf.random.experimental.stateless_split(SEED, 2))
    even = augment.augment(tf.constant(images[0::2]), tf.constant(labels[0::2]), "affine",
                           seed_even)
    odd = augment.augment(tf.constant(images[1::2]), tf.constant(labels[1::2]),
                          "affine+elastic", seed_odd)
    np.testing.assert_allclose(out_images.numpy()[0::2], even[0].numpy(), atol=1e-6)
    np.testing.assert_array_equal(out_labels.numpy()[0::2], even[1].numpy())
    np.testing.assert_allclose(out_images.numpy()[1::2], odd[0].numpy(), atol=1e-6)
    np.testing.assert_array_equal(out_labels.numpy()[1::2], odd[1].numpy())
    # affine alone: "half" changes nothing
    plain = augment.augment(tf.constant(images), tf.constant(labels), "affine", SEED)
    halved = augment.augment(tf.constant(images), tf.constant(labels), "affine+half", SEED)
    np.testing.assert_array_equal(plain[1].numpy(), halved[1].numpy())


def test_half_modifier_in_graphs_and_parsing():
    images, labels = _blocks(batch=3)
    spec = "affine+elastic+intensity+half"
    eager = augment.augment(tf.constant(images), tf.constant(labels), spec, SEED)
    mapped = next(iter(tf.data.Dataset.from_tensors((images, labels)).map(
        lambda x, y: augment.augment(x, y, spec, SEED))))
    np.testing.assert_allclose(mapped[0].numpy(), eager[0].numpy(), atol=1e-5)
    np.testing.assert_array_equal(mapped[1].numpy(), eager[1].numpy())
    assert augment.parse_spec("half+intensity+affine") == ("affine", "intensity")
    assert augment.is_half("affine+HALF") and not augment.is_half("affine+intensity")
    out, none = augment.augment(tf.constant(images), None, "intensity+half", SEED)
    assert none is None and _changed_examples(out, images) == [False, True, False]


def test_mixup_half_mixes_only_odd_positions():
    batch, classes = 8, 8
    images = np.broadcast_to(np.arange(batch, dtype=np.float32)[:, None, None, None],
                             (batch, 2, 2, 1)).copy()
    one_hot = np.broadcast_to(np.eye(classes, dtype=np.float32)[:, None, None, :],
                              (batch, 2, 2, classes)).copy()
    mixed_images, mixed_labels = augment.mixup_half(tf.constant(images), tf.constant(one_hot),
                                                    0.4, SEED)
    np.testing.assert_array_equal(mixed_images.numpy()[0::2], images[0::2])
    np.testing.assert_array_equal(mixed_labels.numpy()[0::2], one_hot[0::2])
    full_images, full_labels = augment.mixup(tf.constant(images), tf.constant(one_hot), 0.4,
                                             SEED)
    np.testing.assert_array_equal(mixed_images.numpy()[1::2], full_images.numpy()[1::2])
    np.testing.assert_array_equal(mixed_labels.numpy()[1::2], full_labels.numpy()[1::2])
    assert any(_changed_examples(mixed_images.numpy()[1::2], images[1::2]))
    np.testing.assert_allclose(mixed_labels.numpy().sum(-1), 1.0, atol=1e-6)


def test_supervised_augment_half_option():
    """supervised's `augment_half` (the "paper" preset): the pipeline spec gets "half", mixup
    mixes odd positions only; off by default."""
    from tfseg.methods import DataSpec, apply_overrides, supervised

    spec2d = DataSpec(2, 1, 3, ("background", "a", "b"), (16, 16))
    config = apply_overrides(supervised.Config(), supervised.PRESETS["paper"],
                             ["augment=affine+elastic+intensity+mixup", "filters=4,8"])
    assert config.augment_half
    assert supervised.pipeline_augment(config, 2) == "affine+elastic+intensity+half"
    default = apply_overrides(supervised.Config(), None, ["augment=affine+elastic"])
    assert not default.augment_half and supervised.pipeline_augment(default, 2) == "affine+elastic"
    none = apply_overrides(supervised.Config(), supervised.PRESETS["paper"], ["augment=none"])
    assert supervised.pipeline_augment(none, 2) == "none"
    method = supervised.build(config, spec2d)
    labels = np.tile(np.arange(8, dtype=np.int32)[:, None, None] % 3, (1, 16, 16))
    images = labels[..., None].astype(np.float32)
    data = {"labeled": {"image": tf.constant(images), "label": tf.constant(labels)}}
    mixed, targets = method.labeled_batch(data)
    np.testing.assert_array_equal(mixed.numpy()[0::2], images[0::2])
    np.testing.assert_array_equal(targets.numpy()[0::2], np.eye(3)[labels[0::2]])
    assert any(_changed_examples(mixed.numpy()[1::2], images[1::2]))
