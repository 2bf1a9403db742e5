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
- outputs `probabilities` (batch, *S, K) float32 softmax and `labels` (batch, *S) int32 argmax.

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
from typing import Any, Mapping

import keras
import numpy as np
import tensorflow as tf

from tfseg import __version__
from tfseg.inference import dynamic_shape_model, infer_size_multiple, suggest_tile_size

__all__ = ["RunInfo", "export_run", "export_segmentor", "load_run", "build_segmentor",
           "preprocessing_assets", "PREPROCESSING_ASSET", "CONFIG_NAME", "SEGMENTOR_WEIGHTS"]

CONFIG_NAME = "config.json"
SEGMENTOR_WEIGHTS = os.path.join("checkpoints", "segmentor.weights.h5")
PREPROCESSING_ASSET = os.path.join("assets", "preprocessing.json")
ASSET_FORMAT_VERSION = 1
# Dataset fields that tell preprocessing what to do (published splits are not needed to predict).
_DATASET_FACTS_SKIPPED = ("published_splits", "default_split")


@dataclasses.dataclass(frozen=True, eq=False)
class RunInfo:
    """A trained run, loaded: its config, records manifest, segmentor and the facts around it.

    Attributes:
      run_dir: the run folder.
      config: config.json as a dict.
      manifest: the records manifest (`tfseg.data.pipeline.load_manifest`).
      segmentor: the network (logits) with the selected checkpoint's weights.
      spatial_dims: 2 (slice-wise network) or 3.
      modalities: input channel names, in order.
      class_names / label_values: class index -> name / value in the dataset's label files.
      raw_to_class: label file value -> class index (a dataset may merge values).
      patch_size_zyx: 3D: the training patch (the default inference tile); 2D: None.
      size_multiple: spatial sizes the segmentor accepts are multiples of this.
    """

    run_dir: str
    config: dict[str, Any]
    manifest: dict[str, Any]
    segmentor: keras.Model
    spatial_dims: int
    modalities: tuple[str, ...]
    class_names: tuple[str, ...]
    label_values: tuple[int, ...]
    raw_to_class: dict[int, int]
    patch_size_zyx: tuple[int, int, int] | None
    size_multiple: int


def load_run(run_dir: str) -> RunInfo:
    """Rebuilds a run's segmentor from config.json and loads checkpoints/segmentor.weights.h5.

    Raises:
      ValueError: naming the file when config.json, the weights or the records manifest are
        missing or incomplete, or the method is unknown.
    """
    from tfseg.data.pipeline import load_manifest

    config_path = os.path.join(run_dir, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise ValueError(f"{run_dir} is not a run folder: no {CONFIG_NAME}. Point --run_dir at a "
                         "folder written by `python -m launch.train`.")
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"Cannot read {config_path}: {error}.") from None
    missing = [k for k in ("method", "method_config", "data_spec", "records_dir")
               if k not in config]
    if missing:
        raise ValueError(f"{config_path} lacks {', '.join(missing)}; it was not written by "
                         "tfseg's training (or by an incompatible version).")
    weights = os.path.join(run_dir, SEGMENTOR_WEIGHTS)
    if not os.path.isfile(weights):
        raise ValueError(f"No segmentor weights at {weights}: training has not finished (or "
                         "was interrupted before a checkpoint). Resume it with launch.train.")
    manifest = load_manifest(config["records_dir"])
    segmentor, size_multiple = build_segmentor(config)
    segmentor.load_weights(weights)
    spatial_dims = int(config["data_spec"]["spatial_dims"])
    patch = None
    if spatial_dims == 3:
        patch = (config["data_spec"].get("example_shape")
                 or manifest.get("settings", {}).get("patch_size_zyx"))
        patch = tuple(int(v) for v in patch) if patch else None
    return RunInfo(run_dir=run_dir, config=config, manifest=manifest, segmentor=segmentor,
                   spatial_dims=spatial_dims, modalities=tuple(manifest["modalities"]),
                   class_names=tuple(config["data_spec"]["class_names"]),
                   label_values=tuple(int(v) for v in manifest["label_values"]),
                   raw_to_class=_raw_to_class(manifest), patch_size_zyx=patch,
                   size_multiple=size_multiple)


def build_segmentor(config: Mapping[str, Any]) -> tuple[keras.Model, int]:
    """The (untrained) segmentor of a run config and its size multiple.

    `get_method_module(method).build(Config, DataSpec).segmentor`; the size multiple is the
    method's `size_multiple`, or inferred from the network's down-sampling layers.
    """
    from tfseg.methods import DataSpec, config_from_dict, get_method_module

    module = get_method_module(config["method"])
    method = module.build(config_from_dict(module.Config, config["method_config"]),
                          DataSpec.from_dict(config["data_spec"]))
    segmentor = method.segmentor
    multiple = int(getattr(method, "size_multiple", 0) or 0)
    return segmentor, max(multiple, infer_size_multiple(segmentor))


def _raw_to_class(manifest: Mapping[str, Any]) -> dict[int, int]:
    """Label file value -> class index, as preprocessing recorded it (else the inverse of the
    label values)."""
    recorded = manifest.get("raw_to_class")
    if recorded:
        pairs = recorded.items() if isinstance(recorded, Mapping) else recorded
        return {int(k): int(v) for k, v in pairs}
    return {int(v): index for index, v in enumerate(manifest["label_values"])}


def preprocessing_assets(run: RunInfo) -> dict[str, Any]:
    """Everything `launch.predict` needs to preprocess a new scan as the training data was.

    The resolved preprocessing settings (N4, percentiles, clip, target spacing, crop, patch),
    the dataset facts that steer preprocessing (modalities, intensity window, orientation
    reliability, label map...), class names and label values, the network's size multiple, the
    training patch and the default sliding-window tile (`inference.suggest_tile_size`).
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
        "settings": manifest["settings"], "dataset_facts": facts,
        "intensity_window": facts.get("intensity_window"),
        "size_multiple": run.size_multiple,
        "patch_size_zyx": list(run.patch_size_zyx) if run.patch_size_zyx else None,
        "tile_size_zyx": (list(suggest_tile_size(run.patch_size_zyx, run.size_multiple))
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
    if not isinstance(version, int) or version < 1:
        raise ValueError(f"version must be a positive integer (TF Serving loads numeric "
                         f"folders), got {version!r}.")
    run = load_run(run_dir)
    name = f"{run.config.get('dataset', run.manifest.get('dataset'))}_{run.config['method']}"
    export_dir = os.path.join(run_dir, "export", name, str(version))
    return export_segmentor(run.segmentor, export_dir, preprocessing_assets(run),
                            run.spatial_dims, run.size_multiple, overwrite=overwrite)


def export_segmentor(segmentor: keras.Model, export_dir: str, preprocessing: Mapping[str, Any],
                     spatial_dims: int, size_multiple: int, *, overwrite: bool = False) -> str:
    """Writes a SavedModel with a pad-and-crop `serving_default` signature (module docstring).

    Args:
      segmentor: the network, (B, *S, C) -> logits (B, *S, K).
      export_dir: the version folder to create, e.g. `.../export/acdc_supervised/1`.
      preprocessing: JSON-able dict written to `assets/preprocessing.json`.
      spatial_dims: 2 or 3.
      size_multiple: spatial sizes the network accepts are multiples of this.
      overwrite: replace an existing `export_dir`.

    Returns:
      `export_dir`.

    Raises:
      ValueError: if `export_dir` exists (without `overwrite`), `spatial_dims` is not 2/3 or the
        segmentor's channel count is unknown.
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}.")
    channels = segmentor.inputs[0].shape[-1] if getattr(segmentor, "inputs", None) else None
    channels = channels or preprocessing.get("num_channels")
    if not channels:
        raise ValueError("Cannot export: the segmentor's input channel count is unknown; build "
                         "it with a known channel axis or record num_channels in preprocessing.")
    export_dir = os.path.abspath(export_dir)
    if os.path.exists(export_dir) and not overwrite:
        raise ValueError(f"{export_dir} already exists. Export under another version "
                         "(--version) or pass overwrite / --overwrite to replace it.")
    network = dynamic_shape_model(segmentor)
    signature = tf.TensorSpec([None] * (spatial_dims + 1) + [int(channels)], tf.float32,
                              name="image")
    names = ", ".join(preprocessing.get("modalities") or []) or "see assets/preprocessing.json"

    def serve(image):
        # A loaded signature does not enforce its TensorSpec's shape (and oneDNN aborts the whole
        # process on a wrong rank), so check before any convolution runs. `tf.rank` would be
        # folded to the static rank at trace time; EnsureShape is checked at run time.
        checks = [
            tf.debugging.assert_equal(
                tf.shape(image)[-1], int(channels),
                message=f"image must have {channels} channel(s) ({names}) on its last axis"),
            tf.debugging.assert_positive(
                tf.shape(image), message="image must have non-empty batch and spatial axes"),
        ]
        with tf.control_dependencies(checks):
            image = tf.ensure_shape(image, signature.shape)  # the rank
        shape = tf.shape(image)
        spatial_axes = list(range(1, spatial_dims + 1))
        background = tf.reduce_min(image, axis=spatial_axes, keepdims=True)  # (B, 1.., C)
        padded = image
        for axis in spatial_axes:
            # Pad with the background level rather than 0; concat keeps the values exact.
            amount = (-shape[axis]) % size_multiple
            pad_shape = tf.tensor_scatter_nd_update(tf.shape(padded), [[axis]], [amount])
            padded = tf.concat([padded, tf.broadcast_to(background, pad_shape)], axis)
        logits = tf.cast(network(padded, training=False), tf.float32)
        probabilities = tf.nn.softmax(logits, axis=-1)
        crop = tf.concat([shape[:-1], [-1]], 0)
        probabilities = tf.slice(probabilities, tf.zeros_like(crop), crop)
        probabilities.set_shape(image.shape[:-1] + logits.shape[-1:])  # K stays static
        return {"probabilities": probabilities,
                "labels": tf.argmax(probabilities, axis=-1, output_type=tf.int32)}

    parent = os.path.dirname(export_dir)
    os.makedirs(parent, exist_ok=True)
    temporary = tempfile.mkdtemp(prefix=f".tmp-{os.path.basename(export_dir)}-", dir=parent)
    try:
        archive = keras.export.ExportArchive()
        archive.track(network)
        archive.add_endpoint("serving_default", serve, input_signature=[signature])
        archive.write_out(temporary, verbose=False)
        os.makedirs(os.path.join(temporary, "assets"), exist_ok=True)
        with open(os.path.join(temporary, PREPROCESSING_ASSET), "w", encoding="utf-8") as f:
            json.dump(dict(preprocessing), f, indent=2, default=_jsonable)
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
