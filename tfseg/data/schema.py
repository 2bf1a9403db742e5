"""The one home of the TFRecord schema: keys, version, encode and parse.

One `tf.train.Example` is either a 2D slice (2D datasets: one example per slice) or a whole 3D
volume (3D datasets: one example per subject; training patches are cut on the fly from it, at the
precomputed `patch_corners`).

Keys:
  subject_id      bytes      the case id
  index           int64      slice index along z (2D) or 0 (3D)
  shape           int64[]    spatial shape then channels: [H, W, C] or [D, H, W, C]
  image           bytes      float32 little-endian, C-order, shape `shape`
  label           bytes      uint8 class indices, spatial shape; b"" when unlabeled
  has_label       int64      1 when `label` holds a label
  patch_corners   int64[]    3D only: flattened (N, 3) patch start corners (z, y, x) on the
                             stride grid that pass the dataset's filter (foreground fraction for
                             labeled volumes, inside the subject's own foreground mask otherwise)
"""
from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

SCHEMA_VERSION = 1

SUBJECT_ID = "subject_id"
INDEX = "index"
SHAPE = "shape"
IMAGE = "image"
LABEL = "label"
HAS_LABEL = "has_label"
PATCH_CORNERS = "patch_corners"

_FEATURES = {
    SUBJECT_ID: tf.io.FixedLenFeature([], tf.string),
    INDEX: tf.io.FixedLenFeature([], tf.int64, default_value=0),
    SHAPE: tf.io.VarLenFeature(tf.int64),
    IMAGE: tf.io.FixedLenFeature([], tf.string),
    LABEL: tf.io.FixedLenFeature([], tf.string, default_value=b""),
    HAS_LABEL: tf.io.FixedLenFeature([], tf.int64, default_value=0),
    PATCH_CORNERS: tf.io.VarLenFeature(tf.int64),
}


def _bytes(value: bytes) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _ints(values) -> tf.train.Feature:
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v) for v in values]))


def encode_example(image: np.ndarray, label: np.ndarray | None, subject_id: str, index: int = 0,
                   patch_corners: np.ndarray | None = None) -> bytes:
    """Serialises one slice or volume.

    Args:
      image: float array, spatial dims then channels: (H, W, C) or (D, H, W, C).
      label: integer class indices with the spatial shape of `image`, or None.
      subject_id: the case id.
      index: slice index (2D) or 0.
      patch_corners: 3D only, (N, 3) int patch start corners.

    Returns:
      The serialised `tf.train.Example`.

    Raises:
      ValueError: if the shapes or label values do not fit the schema.
    """
    image = np.asarray(image)
    if image.ndim not in (3, 4):
        raise ValueError(f"{subject_id}: image must be (H, W, C) or (D, H, W, C), got "
                         f"shape {image.shape}.")
    feature = {
        SUBJECT_ID: _bytes(subject_id.encode("utf-8")),
        INDEX: _ints([index]),
        SHAPE: _ints(image.shape),
        IMAGE: _bytes(np.ascontiguousarray(image, dtype="<f4").tobytes()),
        HAS_LABEL: _ints([0 if label is None else 1]),
    }
    if label is not None:
        label = np.asarray(label)
        if label.shape != image.shape[:-1]:
            raise ValueError(f"{subject_id}: label shape {label.shape} does not match image "
                             f"spatial shape {image.shape[:-1]}.")
        if label.size and (label.min() < 0 or label.max() > 255):
            raise ValueError(f"{subject_id}: label values must be class indices in [0, 255].")
        feature[LABEL] = _bytes(np.ascontiguousarray(label, dtype=np.uint8).tobytes())
    if patch_corners is not None:
        corners = np.asarray(patch_corners, dtype=np.int64).reshape(-1, 3)
        feature[PATCH_CORNERS] = _ints(corners.ravel())
    # deterministic=True: map entries in key order, so identical examples serialise to identical
    # bytes in every process (the shard sha256 in the manifest identifies the content).
    example = tf.train.Example(features=tf.train.Features(feature=feature))
    return example.SerializeToString(deterministic=True)


def parse_example(serialized: tf.Tensor, spatial_dims: int, num_channels: int) -> dict[str, Any]:
    """Parses one serialised example inside tf.data (graph-safe, no py_function).

    Args:
      serialized: scalar string tensor.
      spatial_dims: 2 or 3.
      num_channels: the number of image channels (for a static channel dimension).

    Returns:
      A dict with `image` float32 (*spatial, C), `label` int32 (*spatial) — zeros when the
      example has no label —, `has_label` bool, `subject_id` string, `index` int64 and, for 3D,
      `patch_corners` int32 (N, 3).
    """
    parsed = tf.io.parse_single_example(serialized, _FEATURES)
    shape = tf.cast(tf.sparse.to_dense(parsed[SHAPE]), tf.int32)
    image = tf.reshape(tf.io.decode_raw(parsed[IMAGE], tf.float32), shape)
    image = tf.ensure_shape(image, [None] * spatial_dims + [num_channels])
    has_label = tf.equal(parsed[HAS_LABEL], 1)
    spatial = shape[:-1]
    label = tf.cond(
        has_label,
        lambda: tf.reshape(tf.cast(tf.io.decode_raw(parsed[LABEL], tf.uint8), tf.int32), spatial),
        lambda: tf.zeros(spatial, tf.int32))
    label = tf.ensure_shape(label, [None] * spatial_dims)
    out = {IMAGE: image, LABEL: label, HAS_LABEL: has_label, SUBJECT_ID: parsed[SUBJECT_ID],
           INDEX: parsed[INDEX]}
    if spatial_dims == 3:
        corners = tf.cast(tf.sparse.to_dense(parsed[PATCH_CORNERS]), tf.int32)
        out[PATCH_CORNERS] = tf.reshape(corners, [-1, 3])
    return out


def decode_example_numpy(serialized: bytes) -> dict[str, Any]:
    """Decodes one example to numpy without TF graph ops (evaluation, tests, tools)."""
    example = tf.train.Example.FromString(serialized)
    f = example.features.feature
    shape = tuple(f[SHAPE].int64_list.value)
    image = np.frombuffer(f[IMAGE].bytes_list.value[0], dtype="<f4").reshape(shape)
    has_label = bool(f[HAS_LABEL].int64_list.value[0]) if HAS_LABEL in f else False
    label = None
    if has_label:
        label = np.frombuffer(f[LABEL].bytes_list.value[0], dtype=np.uint8).reshape(shape[:-1])
    out = {IMAGE: image, LABEL: label, HAS_LABEL: has_label,
           SUBJECT_ID: f[SUBJECT_ID].bytes_list.value[0].decode("utf-8"),
           INDEX: int(f[INDEX].int64_list.value[0]) if INDEX in f else 0}
    if PATCH_CORNERS in f:
        out[PATCH_CORNERS] = np.asarray(f[PATCH_CORNERS].int64_list.value,
                                        dtype=np.int64).reshape(-1, 3)
    return out
