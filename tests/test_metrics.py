"""Tests of tfseg.metrics: hand-computed volume metrics, empty masks, AUC, streaming Dice."""
import math

import numpy as np
import pytest
import keras
import tensorflow as tf
from scipy import ndimage
from scipy.spatial.distance import cdist

from tfseg.metrics import (DiceScore, auc, binary_metrics, field_of_view_diagonal, mean_iou,
                           surface_distances, volume_metrics)

# ---------------------------------------------------------------- volume metrics, hand values


def test_shifted_squares_in_2d_anisotropic():
    """3×3 squares shifted by 2 columns, spacing (y, x) = (1.0, 0.5) mm.

    A: rows 1-3, cols 1-3; B: rows 1-3, cols 3-5. Overlap = column 3 = 3 pixels.
    Dice = 2·3/(9+9) = 1/3; IoU = 3/15 = 0.2; precision = recall = 3/9.
    Surfaces (face connectivity): the 8 border pixels of each square.
    A→B: col 3 (3 px, on B's surface) 0; col 2 rows 1,3 -> (r, 3) at 0.5 mm; col 1 (3 px) -> 1.0.
    -> [0,0,0, .5,.5, 1,1,1]; B→A is the mirror image. Pooled 16: six 0, four 0.5, six 1.0.
    ASD = (4·0.5 + 6·1)/16 = 0.5 mm. HD95: index 0.95·15 = 14.25 in the sorted list -> 1.0 mm.
    """
    a = np.zeros((5, 7), np.uint8)
    a[1:4, 1:4] = 1
    b = np.zeros((5, 7), np.uint8)
    b[1:4, 3:6] = 1
    metrics = volume_metrics(b, a, (1.0, 0.5), num_classes=2)
    assert list(metrics) == [1]
    expected = {"dice": 1 / 3, "iou": 0.2, "precision": 1 / 3, "recall": 1 / 3,
                "hd95_mm": 1.0, "hd_mm": 1.0, "asd_mm": 0.5}
    assert metrics[1] == pytest.approx(expected, abs=1e-6)


def test_cube_shifted_two_voxels_along_x():
    """4×4×4 cubes shifted by 2 voxels along x, spacing (z, y, x) = (1, 1, 0.5) mm.

    Overlap 4·4·2 = 32 of 64 -> Dice 0.5, IoU 32/96 = 1/3.
    Surface of a cube: 64 − 2³ = 56 voxels. A→B by x-slice of A (A at x 0-3, B at x 2-5):
    x=0 face (16 voxels) -> B's face at x=2: 2·0.5 = 1.0 mm; x=1 ring (12) -> 0.5 mm;
    x=2 ring (12) lies on B's face -> 0; x=3 face: ring (12) on B's surface -> 0, centre 2×2 (4)
    -> B's face at x=2: 0.5 mm. Sum = 16 + 6 + 2 = 24 over 56 voxels; B→A the same.
    ASD = 48/112 = 3/7 mm; HD = 1.0 mm; pooled sorted: 48 zeros, 32×0.5, 32×1.0, so the 95th
    percentile (index 105.45) is 1.0 mm.
    """
    truth = np.zeros((6, 6, 10), np.uint8)
    truth[1:5, 1:5, 2:6] = 1
    pred = np.zeros_like(truth)
    pred[1:5, 1:5, 4:8] = 1
    metrics = volume_metrics(pred, truth, (1.0, 1.0, 0.5), num_classes=2)[1]
    assert metrics == pytest.approx({"dice": 0.5, "iou": 1 / 3, "precision": 0.5, "recall": 0.5,
                                     "hd95_mm": 1.0, "hd_mm": 1.0, "asd_mm": 3 / 7}, abs=1e-5)


def test_parallel_planes_at_known_distance():
    # Single-voxel-thick planes x = 2 and x = 6 with spacing_x = 0.5 mm: every surface voxel is
    # 4 voxels = 2.0 mm from the other plane; no overlap.
    pred = np.zeros((4, 5, 10), np.uint8)
    truth = np.zeros_like(pred)
    pred[:, :, 2] = 1
    truth[:, :, 6] = 1
    metrics = volume_metrics(pred, truth, (2.0, 1.0, 0.5), num_classes=2)[1]
    assert metrics == pytest.approx({"dice": 0.0, "iou": 0.0, "precision": 0.0, "recall": 0.0,
                                     "hd95_mm": 2.0, "hd_mm": 2.0, "asd_mm": 2.0}, abs=1e-5)


def test_precision_and_recall_of_a_subset():
    # pred = 2 voxels inside a 4-voxel truth: precision 2/2 = 1, recall 2/4 = 0.5,
    # Dice = 4/6, IoU = 2/4.
    truth = np.zeros((1, 4, 6), np.int32)
    truth[0, 1, 1:5] = 1
    pred = np.zeros_like(truth)
    pred[0, 1, 1:3] = 1
    m = volume_metrics(pred, truth, (1.0, 1.0, 1.0), num_classes=2)[1]
    assert (m["precision"], m["recall"]) == pytest.approx((1.0, 0.5))
    assert (m["dice"], m["iou"]) == pytest.approx((2 / 3, 0.5))


def test_multiclass_maps_and_background():
    truth = np.array([[0, 1, 1, 2], [0, 1, 2, 2]])
    pred = np.array([[0, 1, 2, 2], [0, 1, 2, 2]])
    # class 1: |P|=2, |T|=3, overlap 2 -> Dice 4/5; class 2: |P|=4, |T|=3, overlap 3 -> 6/7
    # class 0: identical (2 px) -> Dice 1
    metrics = volume_metrics(pred, truth, (1.0, 1.0), num_classes=3, include_background=True)
    assert sorted(metrics) == [0, 1, 2]
    assert [metrics[c]["dice"] for c in range(3)] == pytest.approx([1.0, 0.8, 6 / 7])
    assert metrics[0]["hd95_mm"] == 0.0
    # mIoU over the 3 classes: (2/2 + 2/3 + 3/4)/3 = 0.805556
    assert mean_iou(pred, truth, 3) == pytest.approx((1 + 2 / 3 + 3 / 4) / 3)
    assert mean_iou(pred, truth, 3, include_background=False) == pytest.approx((2 / 3 + 3 / 4)
                                                                                / 2)


def test_empty_mask_policy():
    shape, spacing = (4, 5, 10), (2.0, 1.0, 0.5)
    diagonal = math.sqrt(8.0 ** 2 + 5.0 ** 2 + 5.0 ** 2)       # sqrt(114) = 10.677 mm
    assert field_of_view_diagonal(shape, spacing) == pytest.approx(diagonal)
    empty = np.zeros(shape, np.uint8)
    blob = empty.copy()
    blob[1:3, 1:3, 1:3] = 1
    # Both empty: perfect agreement.
    both = volume_metrics(empty, empty, spacing, num_classes=2)[1]
    assert both == {"dice": 1.0, "iou": 1.0, "precision": 1.0, "recall": 1.0,
                    "hd95_mm": 0.0, "hd_mm": 0.0, "asd_mm": 0.0}
    # Exactly one empty (missed structure, or a false structure): worst values, never NaN.
    for pred, truth in [(empty, blob), (blob, empty)]:
        one = volume_metrics(pred, truth, spacing, num_classes=2)[1]
        assert one == pytest.approx({"dice": 0.0, "iou": 0.0, "precision": 0.0, "recall": 0.0,
                                     "hd95_mm": diagonal, "hd_mm": diagonal,
                                     "asd_mm": diagonal})
    assert mean_iou(empty, empty, 2) == 1.0


def _reference_distances(a, b, spacing):
    """Independent brute force: surfaces by scipy erosion, distances by all-pairs cdist."""
    structure = ndimage.generate_binary_structure(a.ndim, 1)
    surface = lambda m: m & ~ndimage.binary_erosion(m, structure, border_value=0)
    pa = np.argwhere(surface(a)) * np.asarray(spacing)
    pb = np.argwhere(surface(b)) * np.asarray(spacing)
    d = cdist(pa, pb)
    return d.min(axis=1), d.min(axis=0)


@pytest.mark.parametrize("seed", [0, 1])
def test_surface_distances_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    spacing = (2.5, 0.8, 1.3)
    a = ndimage.binary_opening(ndimage.gaussian_filter(rng.random((10, 14, 12)), 1.5) > 0.5)
    b = ndimage.binary_opening(ndimage.gaussian_filter(rng.random((10, 14, 12)), 1.5) > 0.5)
    a[0, :, :] |= b[0, :, :]               # touch the image border: outside counts as background
    assert a.any() and b.any()
    ab, ba = surface_distances(a, b, spacing)
    ref_ab, ref_ba = _reference_distances(a, b, spacing)
    np.testing.assert_allclose(np.sort(ab), np.sort(ref_ab), atol=1e-4)
    np.testing.assert_allclose(np.sort(ba), np.sort(ref_ba), atol=1e-4)
    pooled = np.concatenate([ref_ab, ref_ba])
    m = binary_metrics(a, b, spacing)
    assert m["hd95_mm"] == pytest.approx(np.percentile(pooled, 95), abs=1e-4)
    assert m["asd_mm"] == pytest.approx(pooled.mean(), abs=1e-4)
    assert m["hd_mm"] == pytest.approx(pooled.max(), abs=1e-4)
    assert m["hd95_mm"] <= m["hd_mm"]


def test_object_filling_the_image_has_its_border_as_surface():
    # A mask covering the whole image still has a surface (the image border), so distances are
    # defined: full 3×3 vs its centre pixel -> centre is 1 px from the ring, ring is 1 or √2 px.
    full = np.ones((3, 3), np.uint8)
    centre = np.zeros((3, 3), np.uint8)
    centre[1, 1] = 1
    m = binary_metrics(centre, full, (1.0, 1.0))
    # pooled: centre→ring 1; ring→centre: 4 edge-mid pixels 1, 4 corners √2
    assert m["hd_mm"] == pytest.approx(math.sqrt(2), abs=1e-5)
    assert m["asd_mm"] == pytest.approx((1 + 4 + 4 * math.sqrt(2)) / 9, abs=1e-5)


def test_volume_metrics_rejects_bad_inputs():
    a = np.zeros((3, 4, 5), np.int32)
    with pytest.raises(ValueError, match="must hold 3 positive spacings"):
        volume_metrics(a, a, (1.0, 1.0), num_classes=2)
    with pytest.raises(ValueError, match="differ"):
        volume_metrics(a, a[:, :, :4], (1.0, 1.0, 1.0), num_classes=2)
    bad = a.copy()
    bad[0, 0, 0] = 3
    with pytest.raises(ValueError, match="labels in \\[0, 3\\] but num_classes=2"):
        volume_metrics(bad, a, (1.0, 1.0, 1.0), num_classes=2)
    with pytest.raises(ValueError, match="integer label map"):
        volume_metrics(a + 0.5, a, (1.0, 1.0, 1.0), num_classes=2)
    with pytest.raises(ValueError, match="positive spacings"):
        volume_metrics(a, a, (1.0, 0.0, 1.0), num_classes=2)


# ---------------------------------------------------------------- AUC


def test_auc_hand_values():
    # Positives score 0.35, 0.8; negatives 0.1, 0.4. Pairs (pos > neg): 0.35>0.1, 0.8>0.1,
    # 0.8>0.4 -> 3 of 4 pairs -> AUC 0.75.
    assert auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    # A tie counts one half.
    assert auc([0.5, 0.5], [0, 1]) == pytest.approx(0.5)
    assert auc(np.array([[0.9, 0.2], [0.8, 0.1]]), np.array([[True, False], [True, False]])) \
        == pytest.approx(1.0)
    assert math.isnan(auc([0.2, 0.3], [1, 1]))
    with pytest.raises(ValueError, match="binary"):
        auc([0.2, 0.3], [0, 2])


# ---------------------------------------------------------------- streaming Dice


def _logits(pred, num_classes):
    return np.eye(num_classes, dtype=np.float32)[np.asarray(pred)] * 5.0


def test_dice_score_accumulates_over_batches():
    metric = DiceScore(3, class_names=["bg", "RV", "LV"])
    # batch 1: labels [0,1,1,2], pred [0,1,2,2]; batch 2: labels [2,2,0,0], pred [2,0,0,1]
    metric.update_state(np.array([[0, 1, 1, 2]]), _logits([[0, 1, 2, 2]], 3))
    metric.update_state(np.array([[2, 2, 0, 0]]), _logits([[2, 0, 0, 1]], 3))
    # class 1: |P∩T| = 1, |P| = 2, |T| = 2 -> 0.5
    # class 2: |P∩T| = 2 (batch 1 pos 3, batch 2 pos 0), |P| = 3, |T| = 3 -> 4/6
    # class 0: |P∩T| = 2, |P| = 3, |T| = 3 -> 4/6
    result = {k: float(v) for k, v in metric.result().items()}
    assert result == pytest.approx({"dice": (0.5 + 2 / 3) / 2, "dice_RV": 0.5,
                                    "dice_LV": 2 / 3})
    np.testing.assert_allclose(metric.per_class_result(), [2 / 3, 0.5, 2 / 3], rtol=1e-6)
    metric.reset_state()
    # Nothing seen: every class absent from both -> 1 (empty-mask policy).
    assert float(metric.result()["dice"]) == 1.0


def test_dice_score_background_and_sample_weight():
    metric = DiceScore(2, include_background=True, name="val_dice")
    labels = np.array([[[0, 1], [1, 1]]])
    pred = np.array([[[0, 0], [1, 1]]])
    # Weight 0 masks out the wrong pixel (0, 1): then the prediction is perfect.
    metric.update_state(labels, _logits(pred, 2), sample_weight=np.array([[[1, 0], [1, 1]]]))
    result = {k: float(v) for k, v in metric.result().items()}
    assert result == {"val_dice": 1.0, "val_dice_class0": 1.0, "val_dice_class1": 1.0}


def test_dice_score_in_keras_evaluate_and_tf_function():
    inputs = keras.Input((None, None, 1))
    model = keras.Model(inputs, keras.layers.Conv2D(2, 1)(inputs))
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=[DiceScore(2, class_names=["bg", "fg"])])
    x = np.random.default_rng(0).normal(size=(4, 6, 6, 1)).astype("float32")
    labels = np.random.default_rng(1).integers(0, 2, (4, 6, 6))
    logs = model.evaluate(x, labels, batch_size=2, verbose=0, return_dict=True)
    pred = np.argmax(model.predict(x, verbose=0), axis=-1)
    overlap = np.sum((pred == 1) & (labels == 1))
    expected = 2 * overlap / (np.sum(pred == 1) + np.sum(labels == 1))
    assert logs["dice"] == pytest.approx(expected, rel=1e-5)
    assert logs["dice_fg"] == pytest.approx(expected, rel=1e-5)
    clone = DiceScore.from_config(DiceScore(2, class_names=["bg", "fg"]).get_config())
    assert clone.class_names == ("bg", "fg")


def test_dice_score_rejects_bad_arguments():
    with pytest.raises(ValueError, match="must hold num_classes=3 names"):
        DiceScore(3, class_names=["a", "b"])
    with pytest.raises(ValueError, match="include_background=True"):
        DiceScore(1)
    metric = DiceScore(2)
    with pytest.raises(tf.errors.InvalidArgumentError, match="label is >= num_classes"):
        metric.update_state(np.array([[0, 2]]), _logits([[0, 1]], 2))
