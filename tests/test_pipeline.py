import json
import os

import numpy as np
import pytest
import tensorflow as tf

from tfseg.data import pipeline
from tfseg.data import schema
from tfseg.data.spec import DataSpec
from tfseg.data.splits import Split

SIZE_2D = (8, 8)
PATCH = (4, 4, 4)
VOLUME = (12, 10, 9)


def _write_records(root, spatial_dims, subjects, modalities=("t1",), settings=None,
                   slice_order=None):
    """subjects: {subject_id: (patient_id, image (Z, H, W, C), label (Z, H, W) | None, corners)}."""
    entries = {}
    for subject_id, (patient_id, image, label, corners) in subjects.items():
        shard = f"{subject_id}.tfrecord"
        with tf.io.TFRecordWriter(os.path.join(root, shard)) as writer:
            if spatial_dims == 2:
                for z in (slice_order or range(image.shape[0])):
                    writer.write(schema.encode_example(
                        image[z], None if label is None else label[z], subject_id, index=z))
            else:
                writer.write(schema.encode_example(image, label, subject_id,
                                                   patch_corners=corners))
        entries[subject_id] = {
            "patient_id": patient_id, "labeled": label is not None, "shard": shard,
            "num_examples": image.shape[0] if spatial_dims == 2 else 1,
            "shape_zyx": list(image.shape[:3]),
            "num_patch_corners": 0 if corners is None else len(corners)}
    manifest = {"schema_version": schema.SCHEMA_VERSION, "dataset": "toy", "fingerprint": "f" * 12,
                "settings": settings or {}, "spatial_dims": spatial_dims,
                "modalities": list(modalities), "class_names": ["bg", "a", "b", "c"],
                "subjects": entries}
    with open(os.path.join(root, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    return manifest


# 2D: subject k has the constant image k + 1 (channel 0) / -(k + 1) (channel 1) and label k % 4.
SUBJECTS_2D = [("p1_ES", "p1", True), ("p1_ED", "p1", True), ("p2_ES", "p2", True),
               ("p3_ES", "p3", True), ("p4_ES", "p4", True), ("u1_ES", "u1", False),
               ("u2_ES", "u2", False), ("p2_frame7", "p2", False)]
SPLIT_2D = Split("t", labeled=["p1"], unlabeled=["u1", "u2"], val=["p2"], test=["p3"])


@pytest.fixture(scope="module")
def records_2d(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("rec2d"))
    subjects = {}
    for k, (subject_id, patient_id, labeled) in enumerate(SUBJECTS_2D):
        image = np.stack([np.full((3, *SIZE_2D), k + 1.0), np.full((3, *SIZE_2D), -(k + 1.0))],
                         axis=-1).astype(np.float32)
        label = np.full((3, *SIZE_2D), k % 4, np.uint8) if labeled else None
        subjects[subject_id] = (patient_id, image, label, None)
    _write_records(root, 2, subjects, modalities=("t1", "t2"))
    return root


def _values(images):  # (B, H, W, C) constant images -> subject index per example
    flat = images.reshape(images.shape[0], -1, images.shape[-1])
    assert (flat[:, :, 0] == flat[:, :1, 0]).all()
    return set((flat[:, 0, 0] - 1).astype(int))


def test_2d_structure_and_stream_membership(records_2d):
    config = pipeline.PipelineConfig(labeled_batch_size=4, unlabeled_batch_size=3)
    dataset = pipeline.training_dataset(records_2d, SPLIT_2D, config)
    spec = dataset.element_spec
    assert spec["labeled"]["image"].shape.as_list() == [4, 8, 8, 2]
    assert spec["labeled"]["label"].shape.as_list() == [4, 8, 8]
    assert spec["labeled"]["label"].dtype == tf.int32
    assert spec["unlabeled"]["image"] == tf.TensorSpec([3, 8, 8, 2], tf.float32)
    assert set(spec["unlabeled"]) == {"image"}
    labeled_seen, unlabeled_seen = set(), set()
    for element in dataset.take(12):
        images = element["labeled"]["image"].numpy()
        labels = element["labeled"]["label"].numpy()
        np.testing.assert_array_equal(images[..., 1], -images[..., 0])  # channel order kept
        for image, label in zip(images, labels):
            k = int(image[0, 0, 0]) - 1
            assert (label == k % 4).all()  # label belongs to the image's subject
        labeled_seen |= _values(images)
        unlabeled_seen |= _values(element["unlabeled"]["image"].numpy())
    assert labeled_seen == {0, 1}  # p1_ES and p1_ED: every subject of the labeled patient
    assert unlabeled_seen == {5, 6}  # u1, u2 only; never val/test/unused patients


@pytest.mark.parametrize("kwargs, split", [
    (dict(include_unlabeled=False), SPLIT_2D),
    ({}, Split("t", labeled=["p1"], unlabeled=[], val=["p2"], test=["p3"])),
])
def test_unlabeled_stream_falls_back_to_labeled_images(records_2d, kwargs, split):
    config = pipeline.PipelineConfig(2, 2, cache=False, **kwargs)
    dataset = pipeline.training_dataset(records_2d, split, config)
    seen = set()
    for element in dataset.take(6):
        seen |= _values(element["unlabeled"]["image"].numpy())
    assert seen == {0, 1}


def test_2d_augmentation_is_joint_in_the_pipeline(tmp_path):
    labels = np.broadcast_to((np.arange(8) // 2) % 3, (2, 8, 8)).astype(np.uint8)  # varies in x
    image = labels[..., None].astype(np.float32)
    _write_records(str(tmp_path), 2, {"a_ES": ("a", image, labels, None),
                                      "b_ES": ("b", image, labels, None)})
    config = pipeline.PipelineConfig(8, 2, augment="flip", seed=3)
    dataset = pipeline.training_dataset(str(tmp_path), Split("s", ["a"], [], [], ["b"]), config)
    flipped = 0
    for element in dataset.take(4):
        images = element["labeled"]["image"].numpy()[..., 0]
        out_labels = element["labeled"]["label"].numpy()
        np.testing.assert_array_equal(images, out_labels.astype(np.float32))
        for out_label in out_labels:
            assert (np.array_equal(out_label, labels[0])
                    or np.array_equal(out_label, labels[0][:, ::-1]))
            flipped += not np.array_equal(out_label, labels[0])
    assert 4 <= flipped <= 28  # about half of 32 examples flipped


def _volume(k):
    values = np.arange(np.prod(VOLUME), dtype=np.float32).reshape(VOLUME) + 10000.0 * k
    label = (np.arange(np.prod(VOLUME)).reshape(VOLUME) % 3).astype(np.uint8)
    return values[..., None], label


CORNERS = {"s0": [[0, 0, 0], [4, 2, 1], [8, 6, 5]], "s1": [[2, 2, 2]], "s2": [], "s3": [[1, 1, 1]]}


@pytest.fixture(scope="module")
def records_3d(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("rec3d"))
    subjects = {}
    for k, (subject_id, patient_id, labeled) in enumerate(
            [("s0", "a", True), ("s1", "u", False), ("s2", "w", False), ("s3", "t", True)]):
        image, label = _volume(k)
        subjects[subject_id] = (patient_id, image, label if labeled else None,
                                np.array(CORNERS[subject_id], np.int64).reshape(-1, 3))
    _write_records(root, 3, subjects, settings={"patch_size_zyx": list(PATCH)})
    return root


def _patch_origin(patch):
    """Subject index and corner of a patch cut from `_volume` (first voxel encodes both)."""
    first = int(patch[0, 0, 0, 0])
    return first // 10000, tuple(int(v) for v in np.unravel_index(first % 10000, VOLUME))


def test_3d_patches_come_from_stored_corners(records_3d):
    config = pipeline.PipelineConfig(5, 3, patches_per_volume=4, shuffle_buffer=16)
    split = Split("t", labeled=["a"], unlabeled=["u", "w"], val=[], test=["t"])
    dataset = pipeline.training_dataset(records_3d, split, config)
    spec = dataset.element_spec
    assert spec["labeled"]["image"].shape.as_list() == [5, 4, 4, 4, 1]
    assert spec["labeled"]["label"] == tf.TensorSpec([5, 4, 4, 4], tf.int32)
    assert spec["unlabeled"]["image"].shape.as_list() == [3, 4, 4, 4, 1]
    labeled_corners, unlabeled_subjects = set(), set()
    for element in dataset.take(8):
        for patch, label in zip(element["labeled"]["image"].numpy(),
                                element["labeled"]["label"].numpy()):
            k, (z, y, x) = _patch_origin(patch)
            assert k == 0 and [z, y, x] in CORNERS["s0"]
            image, volume_label = _volume(0)
            np.testing.assert_array_equal(patch, image[z:z + 4, y:y + 4, x:x + 4])
            np.testing.assert_array_equal(label, volume_label[z:z + 4, y:y + 4, x:x + 4])
            labeled_corners.add((z, y, x))
        for patch in element["unlabeled"]["image"].numpy():
            k, (z, y, x) = _patch_origin(patch)
            assert k in (1, 2)
            if k == 1:
                assert (z, y, x) == (2, 2, 2)
            else:  # no stored corner: uniform corners that keep the patch inside the volume
                assert z <= 8 and y <= 6 and x <= 5
            np.testing.assert_array_equal(patch, _volume(k)[0][z:z + 4, y:y + 4, x:x + 4])
            unlabeled_subjects.add(k)
    assert len(labeled_corners) == 3 and unlabeled_subjects == {1, 2}


def test_3d_deterministic_for_a_seed(records_3d):
    split = Split("t", labeled=["a"], unlabeled=["w"], val=[], test=[])

    def first_elements(seed):
        config = pipeline.PipelineConfig(3, 2, seed=seed, patches_per_volume=2,
                                         deterministic=True, augment="flip+intensity")
        dataset = pipeline.training_dataset(records_3d, split, config)
        return [tf.nest.map_structure(lambda t: t.numpy(), e) for e in dataset.take(3)]

    first, again, other = first_elements(1), first_elements(1), first_elements(2)
    for a, b in zip(first, again):
        tf.nest.map_structure(np.testing.assert_array_equal, a, b)
    assert not all(np.array_equal(a["unlabeled"]["image"], b["unlabeled"]["image"])
                   for a, b in zip(first, other))


def _graph_ops(dataset):
    graph = tf.compat.v1.GraphDef()
    graph.ParseFromString(dataset._as_serialized_graph().numpy())
    ops = {node.op for node in graph.node}
    for function in graph.library.function:
        ops |= {node.op for node in function.node_def}
    return ops


def test_no_python_functions_in_the_training_graph(records_2d, records_3d):
    python_ops = {"PyFunc", "PyFuncStateless", "EagerPyFunc"}
    control = tf.data.Dataset.range(2).map(lambda x: tf.py_function(lambda v: v, [x], tf.int64))
    assert _graph_ops(control) & python_ops  # the inspection does see python functions
    config = pipeline.PipelineConfig(2, 2, augment="affine+elastic+flip+intensity")
    ops = _graph_ops(pipeline.training_dataset(records_2d, SPLIT_2D, config))
    assert "ParseExampleV2" in ops and not ops & python_ops
    config3 = pipeline.PipelineConfig(2, 2, augment="flip+intensity")
    split3 = Split("t", labeled=["a"], unlabeled=["u"], val=[], test=[])
    assert not _graph_ops(pipeline.training_dataset(records_3d, split3, config3)) & python_ops


def test_training_dataset_errors(records_2d, records_3d, tmp_path):
    with pytest.raises(ValueError, match=r"unknown patient id\(s\) nobody"):
        pipeline.training_dataset(records_2d, Split("t", ["p1"], ["nobody"], [], []),
                                  pipeline.PipelineConfig(2, 2))
    with pytest.raises(ValueError, match=r"labeled patient\(s\) u1 have no label"):
        pipeline.training_dataset(records_2d, Split("t", ["u1"], [], [], []),
                                  pipeline.PipelineConfig(2, 2))
    split3 = Split("t", labeled=["a"], unlabeled=[], val=[], test=[])
    with pytest.raises(ValueError, match="affine are implemented for 2D slices only"):
        pipeline.training_dataset(records_3d, split3, pipeline.PipelineConfig(2, 2, augment="affine"))
    with pytest.raises(ValueError, match=r"subject s0 has shape \[12, 10, 9\], smaller than the "
                                         r"patch \(16, 16, 16\)"):
        pipeline.training_dataset(records_3d, split3,
                                  pipeline.PipelineConfig(2, 2, patch_size_zyx=(16, 16, 16)))
    with pytest.raises(ValueError, match="labeled_batch_size must be >= 1"):
        pipeline.PipelineConfig(0, 2)
    with pytest.raises(ValueError, match="unknown operation 'blur'"):
        pipeline.PipelineConfig(2, 2, augment="blur")


def test_missing_shard_is_reported(tmp_path):
    image = np.zeros((2, 8, 8, 1), np.float32)
    _write_records(str(tmp_path), 2, {"a_ES": ("a", image, np.zeros((2, 8, 8), np.uint8), None)})
    os.remove(tmp_path / "a_ES.tfrecord")
    with pytest.raises(ValueError, match=r"Shard .*a_ES.tfrecord of subject a_ES is missing"):
        pipeline.training_dataset(str(tmp_path), Split("t", ["a"], [], [], []),
                                  pipeline.PipelineConfig(1, 1))


def test_load_manifest_errors(tmp_path):
    with pytest.raises(ValueError, match=f"No manifest.json in records folder {tmp_path}"):
        pipeline.load_manifest(str(tmp_path))
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(ValueError, match="Cannot read"):
        pipeline.load_manifest(str(tmp_path))
    manifest = {"schema_version": 99, "spatial_dims": 2, "modalities": ["t1"],
                "class_names": ["bg"], "subjects": {"a": {}}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="schema_version 99, this tfseg reads version 1"):
        pipeline.load_manifest(str(tmp_path))
    manifest["schema_version"] = 1
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="subject a lacks patient_id, labeled, shard"):
        pipeline.load_manifest(str(tmp_path))
    del manifest["class_names"]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="lacks class_names"):
        pipeline.load_manifest(str(tmp_path))


def test_subject_ids_for_and_facts(records_2d, records_3d):
    manifest = pipeline.load_manifest(records_2d)
    assert pipeline.subject_ids_for(manifest, ["p2"]) == ["p2_ES", "p2_frame7"]
    assert pipeline.subject_ids_for(manifest, ["p2"], labeled=True) == ["p2_ES"]
    assert pipeline.subject_ids_for(manifest, ["p1", "u1"]) == ["p1_ED", "p1_ES", "u1_ES"]
    with pytest.raises(ValueError, match=r"Patient\(s\) u1 have no labeled subject .*'toy'"):
        pipeline.subject_ids_for(manifest, ["p1", "u1"], labeled=True)
    facts = pipeline.dataset_facts(manifest)
    assert facts == DataSpec(2, 2, 4, ("bg", "a", "b", "c"), (8, 8))
    assert facts.targets == "classes" and facts.num_outputs == 4
    facts3 = pipeline.dataset_facts(pipeline.load_manifest(records_3d))
    assert (facts3.spatial_dims, facts3.num_channels, facts3.example_shape) == (3, 1, PATCH)
    assert pipeline.dataset_facts(pipeline.load_manifest(records_3d), (8, 8, 8)).example_shape == (
        8, 8, 8)


def test_load_subject_2d_stacks_by_index(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.normal(size=(3, 8, 8, 1)).astype(np.float32)
    label = rng.integers(0, 4, size=(3, 8, 8)).astype(np.uint8)
    _write_records(str(tmp_path), 2, {"a_ES": ("a", image, label, None),
                                      "u_ES": ("u", image, None, None)}, slice_order=[2, 0, 1])
    loaded_image, loaded_label = pipeline.load_subject(str(tmp_path), "a_ES")
    np.testing.assert_array_equal(loaded_image, image)
    np.testing.assert_array_equal(loaded_label, label.astype(np.int32))
    assert loaded_image.dtype == np.float32 and loaded_label.dtype == np.int32
    assert pipeline.load_subject(str(tmp_path), "u_ES")[1] is None
    volumes = list(pipeline.evaluation_dataset(str(tmp_path), ["u_ES", "a_ES"]))
    assert [v[0] for v in volumes] == ["u_ES", "a_ES"]
    with pytest.raises(ValueError, match=r"Subject\(s\) zz are not in"):
        pipeline.evaluation_dataset(str(tmp_path), ["zz"])
    with pytest.raises(ValueError, match="Subject 'zz' is not in"):
        pipeline.load_subject(str(tmp_path), "zz")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["subjects"]["a_ES"]["num_examples"] = 4  # e.g. a truncated shard
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="holds 3 example\\(s\\), the manifest says 4"):
        pipeline.load_subject(str(tmp_path), "a_ES")


def test_load_subject_3d(records_3d):
    image, label = pipeline.load_subject(records_3d, "s0")
    expected_image, expected_label = _volume(0)
    np.testing.assert_array_equal(image, expected_image)
    np.testing.assert_array_equal(label, expected_label)
    assert pipeline.load_subject(records_3d, "s1")[1] is None


def test_measure_pipeline_throughput_counts_both_streams():
    element = {"labeled": {"image": tf.zeros((4, 2, 2, 1)), "label": tf.zeros((4, 2, 2))},
               "unlabeled": {"image": tf.zeros((3, 2, 2, 1))}}
    rate = pipeline.measure_pipeline_throughput(tf.data.Dataset.from_tensors(element).repeat(), 5)
    assert rate > 0
