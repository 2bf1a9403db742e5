"""Training protocols of 2D datasets (SegAN crops and central slices, DMNet's few slices per
patient): which slices the training streams deliver and how they are cropped."""
import dataclasses
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from preprocessing.config import dataset_facts, training_protocol
from tfseg.data import pipeline, schema
from tfseg.data.spec import DataSpec
from tfseg.data.splits import Split
from tfseg.datasets import get_dataset

SLICES, ROWS, COLS = 6, 12, 10
FOREGROUND_SLICES = (1, 4)        # labeled subjects have foreground on these slices only
CONTENT_SLICES = (0, 1, 2, 3)     # unlabeled subjects have image content on these only


def _image(k, z, with_content=True):
    """Channel 0: the pixel's own position (row * 100 + col); channel 1: subject and slice."""
    rows, cols = np.meshgrid(np.arange(ROWS), np.arange(COLS), indexing="ij")
    position = (rows * 100 + cols).astype(np.float32)
    ident = np.full((ROWS, COLS), 1000.0 * (k + 1) + z, np.float32)
    image = np.stack([position, ident], -1)
    return image if with_content else np.zeros_like(image)


def _label(z):
    rows, cols = np.meshgrid(np.arange(ROWS), np.arange(COLS), indexing="ij")
    label = ((rows + cols) % 3 + 1).astype(np.uint8)
    return label if z in FOREGROUND_SLICES else np.zeros_like(label)


def _records(root, protocol, subjects=("a", "b", "u"), labeled=("a", "b")):
    entries = {}
    for k, subject in enumerate(subjects):
        shard = f"{subject}.tfrecord"
        with tf.io.TFRecordWriter(os.path.join(root, shard)) as writer:
            for z in range(SLICES):
                is_labeled = subject in labeled
                writer.write(schema.encode_example(
                    _image(k, z, is_labeled or z in CONTENT_SLICES),
                    _label(z) if is_labeled else None, subject, index=z))
        entries[subject] = {"patient_id": subject, "labeled": subject in labeled, "shard": shard,
                            "num_examples": SLICES, "shape_zyx": [SLICES, ROWS, COLS]}
    manifest = {"schema_version": schema.SCHEMA_VERSION, "dataset": "toy", "fingerprint": "p" * 12,
                "settings": {}, "spatial_dims": 2, "modalities": ["pos", "id"],
                "class_names": ["bg", "a", "b", "c"], "subjects": entries,
                **({"training_protocol": protocol} if protocol else {})}
    with open(os.path.join(root, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    return str(root)


SPLIT = Split("s", labeled=("a", "b"), unlabeled=("u",), val=(), test=(), seed=3)


def _batches(records, split=SPLIT, n=12, seed=0, labeled_batch=2, unlabeled_batch=2):
    config = pipeline.PipelineConfig(labeled_batch_size=labeled_batch,
                                     unlabeled_batch_size=unlabeled_batch, seed=seed,
                                     deterministic=True)
    return list(pipeline.training_dataset(records, split, config).take(n).as_numpy_iterator())


def _slices_seen(images):  # (B, H, W, 2) -> {(subject index, slice)}
    ident = images[:, 0, 0, 1].astype(int)
    return {(int(i) // 1000 - 1, int(i) % 1000) for i in ident}


def test_central_slices_only(tmp_path):
    records = _records(tmp_path, {"train_slices": 2})
    seen_labeled, seen_unlabeled = set(), set()
    for batch in _batches(records, n=20):
        seen_labeled |= _slices_seen(batch["labeled"]["image"])
        seen_unlabeled |= _slices_seen(batch["unlabeled"]["image"])
    assert seen_labeled == {(0, 2), (0, 3), (1, 2), (1, 3)}   # the central window [2, 4) of 6
    assert seen_unlabeled == {(2, 2), (2, 3)}


def test_few_slices_per_subject_are_stable_and_informative(tmp_path):
    records = _records(tmp_path, {"labeled_slices_per_subject": 1,
                                  "unlabeled_slices_per_subject": 2})
    labeled, unlabeled = set(), set()
    for batch in _batches(records, n=20):
        labeled |= _slices_seen(batch["labeled"]["image"])
        unlabeled |= _slices_seen(batch["unlabeled"]["image"])
    # one labeled slice per subject, drawn among those with foreground
    assert sorted(s for s, _ in labeled) == [0, 1]
    assert all(z in FOREGROUND_SLICES for _, z in labeled)
    # two unlabeled slices of the unlabeled subject, among those with image content
    assert len(unlabeled) == 2 and all(s == 2 and z in CONTENT_SLICES for s, z in unlabeled)
    # the choice depends on the split's seed only: another pipeline seed (a later stage, a
    # resume) sees the same slices
    again = set()
    for batch in _batches(records, n=20, seed=17):
        again |= _slices_seen(batch["labeled"]["image"])
    assert again == labeled
    chosen = pipeline.protocol_slices(records, pipeline.load_manifest(records), ["a", "b"], 1,
                                      True, SPLIT.seed)
    assert {(0, chosen["a"][0]), (1, chosen["b"][0])} == labeled


def test_random_training_crops_keep_image_and_label_aligned(tmp_path):
    records = _records(tmp_path, {"train_crop_yx": [8, 6]})
    manifest = pipeline.load_manifest(records)
    assert DataSpec.from_manifest(manifest).example_shape == (8, 6)   # what networks train on
    assert pipeline.stored_slice_shape(manifest) == (ROWS, COLS)     # what is stored / evaluated
    corners = set()
    for batch in _batches(records, n=15):
        images, labels = batch["labeled"]["image"], batch["labeled"]["label"]
        assert images.shape == (2, 8, 6, 2) and labels.shape == (2, 8, 6)
        assert batch["unlabeled"]["image"].shape == (2, 8, 6, 2)
        position = images[..., 0].astype(int)
        rows, cols = position // 100, position % 100
        # a contiguous window of the original slice ...
        np.testing.assert_array_equal(np.diff(rows, axis=1), 1)
        np.testing.assert_array_equal(np.diff(cols, axis=2), 1)
        # ... whose label is the label at the same pixels
        has_foreground = labels.reshape(2, -1).max(axis=1) > 0
        expected = (rows + cols) % 3 + 1
        np.testing.assert_array_equal(labels[has_foreground], expected[has_foreground])
        corners |= {(int(r), int(c)) for r, c in zip(rows[:, 0, 0], cols[:, 0, 0])}
    assert len(corners) > 3 and all(r <= ROWS - 8 and c <= COLS - 6 for r, c in corners)


def test_target_stream_is_cut_to_the_source_training_shape(tmp_path):
    os.makedirs(tmp_path / "s")
    os.makedirs(tmp_path / "t")
    source = _records(tmp_path / "s", {"train_crop_yx": [8, 6]})
    target = _records(tmp_path / "t", None, subjects=("x", "y"), labeled=("x",))
    target_split = Split("t", labeled=(), unlabeled=("x", "y"), val=(), test=())
    config = pipeline.PipelineConfig(labeled_batch_size=2, unlabeled_batch_size=2,
                                     target_batch_size=3, deterministic=True)
    batch = next(iter(pipeline.training_dataset(source, SPLIT, config,
                                                target=(target, target_split))))
    assert batch["target"]["image"].shape == (3, 8, 6, 2)


def test_protocol_facts_and_errors():
    brats = get_dataset("brats")
    assert training_protocol(brats) == {} and "training_protocol" not in dataset_facts(brats)
    segan_like = dataclasses.replace(brats, crop_size_yx=(180, 180), train_crop_yx=(160, 160),
                                     train_slices=128)
    assert dataset_facts(segan_like)["training_protocol"] == {"train_crop_yx": [160, 160],
                                                              "train_slices": 128}
    with pytest.raises(ValueError, match="train_crop_yx .* no larger than crop_size_yx"):
        training_protocol(dataclasses.replace(brats, train_crop_yx=(200, 200)))
    with pytest.raises(ValueError, match="must be positive"):
        training_protocol(dataclasses.replace(brats, labeled_slices_per_subject=0))
    with pytest.raises(ValueError, match="2D datasets only"):
        training_protocol(dataclasses.replace(get_dataset("synthetic_brain"), train_slices=4))
