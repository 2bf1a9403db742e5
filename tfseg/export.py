"""SavedModel export of a run's segmentor, in the layout TF Serving expects.

`export_run(run_dir)` writes `<run_dir>/export/<dataset>_<method>/<version>/`:

    saved_model.pb, fingerprint.pb, variables/      the graph and weights (TF Serving layout)
    assets/preprocessing.json                       what `launch.predict` needs to redo the
                                                    preprocessing and map classes back

Serving signature `serving_default` (also the only endpoint):
- input `image`: float32, PREPROCESSED intensities (see assets/preprocessing.json), shape
  (batch, H, W, C) for 2D networks (a batch of slices) or (batch, D, H, W, C) for 3D networks;
  any spatial size: the signature pads each axis at the far end to a multiple of
  `size_multiple` with each example's per-channel minimum (the background level) and crops the
  outputs back. Rank, channel count and dtype are checked by the input signature.
- outputs:
  - `probabilities` (batch, *S, K|R) float32: the method's probabilities (softmax over the K
    classes, or one sigmoid per region for region targets; e.g. the mean of two decoders for a
    method whose segmentation is that);
  - `labels` (batch, *S) int32: class indices (argmax; for regions, the regions with
    probability >= 0.5 painted in their declared order, outermost first — see
    `tfseg.data.spec`);
  - `label_map` (batch, *S) int32: `labels` in the dataset's original label values (e.g. BraTS
    0/1/2/4, iSEG 0/10/150/250), ready to write as a segmentation file.

3D: one call predicts the whole input in one piece, so its memory grows with the volume. For
whole scans use `launch.predict`, which calls the same signature on sliding-window tiles
(`tfseg.inference.predict_volume`, Gaussian blending), or send tiles from your client.

The version folder is written under a hidden temporary name and renamed into place, so neither a
reader nor TF Serving (which only loads numeric folder names) ever sees a partial export.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any, Mapping, Sequence

import keras
import numpy as np
import tensorflow as tf

from tfseg import __version__
from tfseg._files import make_temporary_dir, remove_stale_temporary_dirs
from tfseg.data.spec import REGION_THRESHOLD, DataSpec
from tfseg.inference import default_tile_size, dynamic_shape_model
from tfseg.run import RunInfo, load_run

__all__ = ["export_run", "export_predictor", "preprocessing_assets", "PREPROCESSING_ASSET"]

PREPROCESSING_ASSET = os.path.join("assets", "preprocessing.json")
ASSET_FORMAT_VERSION = 2
# Dataset fields that tell preprocessing what to do (published splits are not needed to predict).
_DATASET_FACTS_SKIPPED = ("published_splits", "default_split")


def preprocessing_assets(run: RunInfo) -> dict[str, Any]:
    """Everything `launch.predict` needs to preprocess a new scan as the training data was.

    The resolved preprocessing settings (N4, percentiles, clip, target spacing, crop, patch),
    the dataset facts that steer preprocessing (modalities, intensity window, orientation
    reliability, label map...), class names and label values, the network's size multiple, the
    training patch and the default sliding-window tile (`inference.default_tile_size`).
    """
    manifest, config = run.manifest, run.config
    facts = _dataset_facts(config, manifest)
    return {
        "format_version": ASSET_FORMAT_VERSION, "tfseg_version": __version__,
        "dataset": manifest.get("dataset", config.get("dataset")),
        "dataset_options": manifest.get("dataset_options", config.get("dataset_options", {})),
        "method": config.get("method"), "spatial_dims": run.spatial_dims,
        "modalities": list(run.modalities), "num_channels": len(run.modalities),
        "class_names": list(run.class_names), "label_values": list(run.label_values),
        "raw_to_class": sorted([k, v] for k, v in run.raw_to_class.items()),
        "data_spec": dataclasses.asdict(run.data_spec), "targets": run.data_spec.targets,
        "output_names": list(run.data_spec.region_names or run.data_spec.class_names),
        "regions": manifest.get("regions") or [],
        "settings": manifest["settings"], "dataset_facts": facts,
        "intensity_window": facts.get("intensity_window"),
        "size_multiple": run.size_multiple,
        "patch_size_zyx": list(run.patch_size_zyx) if run.patch_size_zyx else None,
        "tile_size_zyx": (list(default_tile_size(run.patch_size_zyx, run.size_multiple))
                          if run.patch_size_zyx else None),
        "overlap": 0.5, "fingerprint": manifest.get("fingerprint"),
    }


def _dataset_facts(config: Mapping[str, Any], manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The `Dataset` fields of the run's dataset, JSON-able (from the dataset module, resolved
    on its data folder when it needs one; the manifest's record overrides what it holds)."""
    from tfseg.datasets import Dataset, get_dataset

    facts: dict[str, Any] = {}
    try:
        dataset = get_dataset(manifest.get("dataset", config.get("dataset")),
                              **(manifest.get("dataset_options") or {}))
        data_dir = manifest.get("data_dir") or config.get("data_dir")
        if data_dir and os.path.isdir(data_dir):
            dataset = dataset.resolve(data_dir)
        facts = {f.name: getattr(dataset, f.name) for f in dataclasses.fields(dataset)
                 if f.name not in _DATASET_FACTS_SKIPPED}
    except ValueError:
        pass  # e.g. a `folder` dataset whose folder is gone: the manifest's record suffices
    for name in ("modalities", "class_names", "label_values", "spatial_dims",
                 "intensity_window", "orientation_reliable"):
        if name in manifest:
            facts[name] = manifest[name]
    if "raw_to_class" in manifest:
        facts["label_map"] = {int(k): int(v) for k, v in manifest["raw_to_class"]}
    facts.setdefault("name", manifest.get("dataset", config.get("dataset")))
    known = {f.name for f in dataclasses.fields(Dataset)}
    missing = [n for n in ("modalities", "class_names", "label_values", "spatial_dims")
               if n not in facts]
    if missing:
        raise ValueError(f"Cannot export: the run's manifest and dataset do not record "
                         f"{', '.join(missing)}. Re-run preprocessing with this tfseg version.")
    return json.loads(json.dumps({k: v for k, v in facts.items() if k in known},
                                 default=_jsonable))


def _jsonable(value):
    if isinstance(value, Mapping):
        return {str(k): v for k, v in value.items()}
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def export_run(run_dir: str, version: int = 1, overwrite: bool = True) -> str:
    """Exports a run's segmentor to `<run_dir>/export/<dataset>_<method>/<version>/`.

    Args:
      run_dir: a finished run folder.
      version: the TF Serving version number (a positive integer).
      overwrite: replace an existing export of that version (atomically). On by default: the
        version folder belongs to this run, and re-running a finished training re-exports.

    Returns:
      The version folder.

    Raises:
      ValueError: for a bad run folder (see `load_run`), a bad version, or an existing export
        without `overwrite`.
    """
    check_version(version)
    run = load_run(run_dir)
    name = f"{run.config.get('dataset', run.manifest.get('dataset'))}_{run.config['method']}"
    export_dir = os.path.join(run_dir, "export", name, str(version))
    return export_predictor(run.predictor, export_dir, preprocessing_assets(run), run.data_spec,
                            run.size_multiple, label_values=run.label_values,
                            overwrite=overwrite)


def export_predictor(predictor: keras.Model, export_dir: str, preprocessing: Mapping[str, Any],
                     data_spec: DataSpec, size_multiple: int, *,
                     label_values: Sequence[int] | None = None, overwrite: bool = False) -> str:
    """Writes a SavedModel with a pad-and-crop `serving_default` signature (module docstring).

    Args:
      predictor: the method's segmentation, (B, *S, C) -> probabilities (B, *S, K|R).
      export_dir: the version folder to create, e.g. `.../export/acdc_supervised/1`.
      preprocessing: JSON-able dict written to `assets/preprocessing.json`.
      data_spec: what the outputs are (classes or regions, their number) and the dimensionality.
      size_multiple: spatial sizes the network accepts are multiples of this.
      label_values: class index -> the dataset's label value, for `label_map`; default
        `preprocessing["label_values"]`, else the class indices themselves.
      overwrite: replace an existing `export_dir`.

    Returns:
      `export_dir`.

    Raises:
      ValueError: if `export_dir` exists (without `overwrite`), the predictor's channel count is
        unknown, or the label values do not match the classes.
    """
    spatial_dims = data_spec.spatial_dims
    label_values = list(label_values if label_values is not None else
                        preprocessing.get("label_values") or range(data_spec.num_classes))
    if len(label_values) != data_spec.num_classes:
        raise ValueError(f"Cannot export: {len(label_values)} label values {label_values} for "
                         f"{data_spec.num_classes} classes {list(data_spec.class_names)}.")
    channels = predictor.inputs[0].shape[-1] if getattr(predictor, "inputs", None) else None
    channels = channels or preprocessing.get("num_channels")
    if not channels:
        raise ValueError("Cannot export: the segmentor's input channel count is unknown; build "
                         "it with a known channel axis or record num_channels in preprocessing.")
    export_dir = os.path.abspath(export_dir)
    if os.path.exists(export_dir) and not overwrite:
        raise ValueError(f"{export_dir} already exists. Export under another version "
                         "(--version) or pass overwrite / --overwrite to replace it.")
    network = dynamic_shape_model(predictor)
    value_table = tf.constant([int(v) for v in label_values], tf.int32)
    paint = list(enumerate(data_spec.region_paint))  # (region, class) in painting order
    signature = tf.TensorSpec([None] * (spatial_dims + 1) + [int(channels)], tf.float32,
                              name="image")
    names = ", ".join(preprocessing.get("modalities") or []) or "see assets/preprocessing.json"

    def serve(image):
        # A loaded signature does not enforce its TensorSpec's shape (and oneDNN aborts the whole
        # process on a wrong rank), so check before any convolution runs. `tf.rank` would be
        # folded to the static rank at trace time; EnsureShape is checked at run time.
        # The rank first (a rank-2 input is told its rank is wrong, not its channel count).
        rank = tf.debugging.assert_equal(
            tf.size(tf.shape(image)), spatial_dims + 2,
            message=f"image must have rank {spatial_dims + 2} (batch, "
                    f"{'z, ' if spatial_dims == 3 else ''}y, x, channels)")
        with tf.control_dependencies([rank]):
            checks = [
                tf.debugging.assert_equal(
                    tf.shape(image)[-1], int(channels),
                    message=f"image must have {channels} channel(s) ({names}) on its last axis"),
                tf.debugging.assert_positive(
                    tf.shape(image), message="image must have non-empty batch and spatial axes"),
                # NaN / Inf would give confident garbage: refuse them.
                tf.debugging.assert_all_finite(
                    image, message="image has NaN or infinite values; fix the scan (or its "
                                   "preprocessing) before segmenting it"),
            ]
        with tf.control_dependencies(checks):
            image = tf.ensure_shape(image, signature.shape)
        outputs = tf.cast(network(pad_to_multiple(image, spatial_dims, size_multiple),
                                  training=False), tf.float32)
        probabilities = crop_like(outputs, image)
        probabilities.set_shape(image.shape[:-1] + outputs.shape[-1:])  # K|R stays static
        if paint:  # regions: painted in order, outermost first (tfseg.data.spec)
            labels = tf.zeros(tf.shape(probabilities)[:-1], tf.int32)
            for region, value in paint:
                labels = tf.where(probabilities[..., region] >= REGION_THRESHOLD, value, labels)
        else:
            labels = tf.argmax(probabilities, axis=-1, output_type=tf.int32)
        return {"probabilities": probabilities, "labels": labels,
                "label_map": tf.gather(value_table, labels)}

    return write_saved_model(export_dir, network, serve, signature, preprocessing)


def check_version(version) -> None:
    """Raises ValueError unless `version` is a positive int (TF Serving's numeric folders)."""
    if not isinstance(version, int) or version < 1:
        raise ValueError(f"version must be a positive integer (TF Serving loads numeric "
                         f"folders), got {version!r}.")


def pad_to_multiple(image, spatial_dims: int, size_multiple: int):
    """Pads the spatial axes of (B, *S, C) at their end to multiples of `size_multiple` with each
    example's per-channel minimum (the background level; concat keeps the values exact)."""
    shape = tf.shape(image)
    spatial_axes = list(range(1, spatial_dims + 1))
    background = tf.reduce_min(image, axis=spatial_axes, keepdims=True)  # (B, 1.., C)
    padded = image
    for axis in spatial_axes:
        amount = (-shape[axis]) % size_multiple
        pad_shape = tf.tensor_scatter_nd_update(tf.shape(padded), [[axis]], [amount])
        padded = tf.concat([padded, tf.broadcast_to(background, pad_shape)], axis)
    return padded


def crop_like(outputs, image):
    """`outputs` (B, *S', K) cropped back to the spatial size of `image` (B, *S, C)."""
    crop = tf.concat([tf.shape(image)[:-1], [-1]], 0)
    return tf.slice(outputs, tf.zeros_like(crop), crop)


def write_saved_model(export_dir: str, network, serve, signature, assets: Mapping[str, Any]
                      ) -> str:
    """Writes `serve` as the `serving_default` signature (tracking `network`'s variables) and
    `assets` as assets/preprocessing.json into `export_dir`, atomically: a temporary sibling
    folder renamed into place (a killed export leaves only that, removed by the next export)."""
    parent = os.path.dirname(export_dir)
    os.makedirs(parent, exist_ok=True)
    remove_stale_temporary_dirs(parent, os.path.basename(export_dir))
    temporary = make_temporary_dir(parent, os.path.basename(export_dir))
    try:
        archive = keras.export.ExportArchive()
        archive.track(network)
        archive.add_endpoint("serving_default", serve, input_signature=[signature])
        archive.write_out(temporary, verbose=False)
        os.makedirs(os.path.join(temporary, "assets"), exist_ok=True)
        with open(os.path.join(temporary, PREPROCESSING_ASSET), "w", encoding="utf-8") as f:
            json.dump(dict(assets), f, indent=2, default=_jsonable)
            f.write("\n")
        _move_into_place(temporary, export_dir)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return export_dir


def _move_into_place(source: str, target: str) -> None:
    """Renames `source` to `target`; an existing `target` is first renamed aside, then removed."""
    if not os.path.exists(target):
        os.rename(source, target)
        return
    aside = tempfile.mkdtemp(prefix=f".old-{os.path.basename(target)}-",
                             dir=os.path.dirname(target))
    os.rmdir(aside)
    os.rename(target, aside)
    try:
        os.rename(source, target)
    except OSError:
        os.rename(aside, target)  # put the old export back
        raise
    shutil.rmtree(aside, ignore_errors=True)
