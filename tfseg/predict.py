"""Prediction on new scans with an exported model (the library side of `launch.predict`).

The export folder holds the SavedModel and `assets/preprocessing.json` (`tfseg.export`). For each
scan: read the modalities, redo the training preprocessing with the saved settings
(`preprocessing.preprocess_volume`: N4, CT window, percentile normalisation, in-plane resampling
and crop for 2D models), predict slice-wise (2D) or with a Gaussian-blended sliding window (3D)
by calling the serving signature on batches of slices / tiles (`tfseg.inference.predict_volume`
with `outputs="probabilities"`), map the probabilities back onto the scan's own grid
(`preprocessing.restore_geometry`), decode them as the run's `DataSpec` says (argmax over classes,
or the regions with probability >= 0.5 painted in their declared order) and write
`<subject>_seg.nii.gz` with the scan's exact geometry (size, spacing, origin, direction) and the
dataset's label values.

Inputs: one scan file (a multi-channel file such as an MSD 4D NIfTI supplies all modalities), a
comma-separated list of files in the model's modality order, a DICOM series folder, or a folder
in a dataset's public layout (with `dataset`: every subject found is predicted).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from typing import Any, Callable, Sequence

import numpy as np
import tensorflow as tf
from absl import logging

from tfseg.datasets import Dataset
from tfseg.io import ImageMeta, read_channels, read_image

__all__ = ["ExportedModel", "Scan", "load_exported_model", "find_scans", "read_scan",
           "predict_scan", "predict_inputs"]

_EXTENSIONS = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr", ".hdr", ".img")


@dataclasses.dataclass(frozen=True, eq=False)
class ExportedModel:
    """A loaded export: the serving function and the preprocessing that goes with it.

    Attributes:
      path: the version folder.
      probabilities: float32 (B, *S, C) -> (B, *S, K|R) probabilities, the `serving_default`
        signature.
      assets: assets/preprocessing.json.
      dataset: the training dataset's facts, as preprocessing needs them.
      config: the resolved preprocessing settings of the training records.
    """

    path: str
    probabilities: Callable[[tf.Tensor], tf.Tensor]
    assets: dict[str, Any]
    dataset: Dataset
    config: Any

    @property
    def spatial_dims(self) -> int:
        return int(self.assets["spatial_dims"])

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.assets["modalities"])

    @property
    def data_spec(self):
        """The run's `DataSpec` (classes or regions); exports older than regions: classes."""
        from tfseg.data.spec import DataSpec

        recorded = self.assets.get("data_spec")
        if recorded:
            return DataSpec.from_dict(recorded)
        names = self.assets["class_names"]
        return DataSpec(self.spatial_dims, len(self.modalities), len(names), tuple(names),
                        (1,) * self.spatial_dims)


@dataclasses.dataclass(frozen=True)
class Scan:
    """One case to predict: its name and one path per modality (a path may repeat with
    `channel_indices` picking channels of a multi-channel file)."""

    subject_id: str
    image_paths: tuple[str, ...]
    channel_indices: tuple[int | None, ...] | None = None


def load_exported_model(path: str, output: str = "probabilities") -> ExportedModel:
    """Loads `<export>/<version>/` written by `tfseg.export` (also accepts its parent folder,
    taking the highest version); `output`: the signature output that `probabilities` returns
    ("translation" for `tfseg.translate.export_translator`'s exports).

    Raises:
      ValueError: naming the folder if it is not such an export.
    """
    from preprocessing import PreprocessConfig
    from tfseg.methods import config_from_dict

    path = _version_folder(path)
    assets_path = os.path.join(path, "assets", "preprocessing.json")
    if not os.path.isfile(assets_path):
        raise ValueError(f"{path} has no assets/preprocessing.json: it is not a tfseg export. "
                         "Point --model at export/<name>/<version> from `python -m "
                         "launch.export`.")
    with open(assets_path, encoding="utf-8") as f:
        assets = json.load(f)
    try:
        loaded = tf.saved_model.load(path)
        signature = loaded.signatures["serving_default"]
    except (OSError, KeyError, ValueError, tf.errors.OpError) as error:
        raise ValueError(f"Cannot load the SavedModel in {path}: {error}") from None

    if output not in signature.structured_outputs:
        raise ValueError(f"The SavedModel in {path} has no output {output!r} (it has "
                         f"{', '.join(sorted(signature.structured_outputs))}).")

    def probabilities(images):
        return signature(image=images)[output]

    # Keep the loaded object alive as long as the function that calls into it.
    probabilities.loaded = loaded
    known = {f.name for f in dataclasses.fields(Dataset)}
    facts = {k: v for k, v in assets["dataset_facts"].items() if k in known}
    if facts.get("label_map") is not None:
        facts["label_map"] = {int(k): int(v) for k, v in facts["label_map"].items()}
    dataset = config_from_dict(Dataset, facts)
    config = config_from_dict(PreprocessConfig, assets["settings"])
    return ExportedModel(path=path, probabilities=probabilities, assets=assets, dataset=dataset,
                         config=config)


def _version_folder(path: str) -> str:
    if not os.path.isdir(path):
        raise ValueError(f"Model folder {path} does not exist. Point --model at "
                         "export/<name>/<version> from `python -m launch.export`.")
    if os.path.isfile(os.path.join(path, "saved_model.pb")):
        return path
    versions = [n for n in os.listdir(path) if n.isdigit()
                and os.path.isfile(os.path.join(path, n, "saved_model.pb"))]
    if not versions:
        raise ValueError(f"{path} holds no saved_model.pb (nor numbered version folders with "
                         "one). Point --model at export/<name>/<version>.")
    return os.path.join(path, max(versions, key=int))


def find_scans(input_spec: str, model: ExportedModel, dataset_name: str | None = None
               ) -> list[Scan]:
    """Turns `--input` into scans.

    Args:
      input_spec: a file, comma-separated files (modality order), a DICOM series folder, or a
        folder in a dataset's layout (with `dataset_name`).
      model: the loaded export (for the modality count and the dataset options).
      dataset_name: the `--dataset` key for a folder input.

    Raises:
      ValueError: for a missing path, an empty folder, a dataset whose modalities do not match
        the model's, or a folder without `dataset_name` that is not a DICOM series.
    """
    paths = [p.strip() for p in input_spec.split(",") if p.strip()]
    if not paths:
        raise ValueError("--input is empty; pass a scan file, comma-separated files in the "
                         f"model's modality order ({', '.join(model.modalities)}) or a folder.")
    for path in paths:
        if not os.path.exists(path):
            raise ValueError(f"Input {path} does not exist.")
    if dataset_name is not None:
        if len(paths) != 1 or not os.path.isdir(paths[0]):
            raise ValueError(f"--dataset={dataset_name} reads a folder in that dataset's layout; "
                             f"--input={input_spec} is not one folder.")
        return _dataset_scans(paths[0], dataset_name, model)
    if len(paths) == 1 and os.path.isdir(paths[0]):
        if not any(not name.startswith(".") for name in os.listdir(paths[0])):
            raise ValueError(f"Input folder {paths[0]} is empty.")
        # Read as a DICOM series; read_image says so clearly if it is not one.
    return [Scan(_subject_name(paths[0]), tuple(paths))]


def _dataset_scans(folder: str, dataset_name: str, model: ExportedModel) -> list[Scan]:
    from tfseg.datasets import get_dataset

    options = (model.assets.get("dataset_options") or {}) if dataset_name == model.assets.get(
        "dataset") else {}
    dataset = get_dataset(dataset_name, **options)
    dataset = dataset.resolve(folder)
    if dataset.num_channels != len(model.modalities):
        raise ValueError(f"Dataset {dataset_name!r} has {dataset.num_channels} modalities "
                         f"({', '.join(dataset.modalities)}) but the model expects "
                         f"{len(model.modalities)} ({', '.join(model.modalities)}).")
    if tuple(dataset.modalities) != model.modalities:
        logging.warning("Dataset %s modalities %s are fed as the model's %s, in that order.",
                        dataset_name, dataset.modalities, model.modalities)
    subjects = dataset.list_subjects(folder)
    if not subjects:
        raise ValueError(f"No subject found in {folder} for dataset {dataset_name!r}; check the "
                         "folder against the dataset's layout (docs/datasets.md).")
    return [Scan(s.subject_id, tuple(s.image_paths),
                 tuple(s.channel_indices) if s.channel_indices is not None else None)
            for s in subjects]


def _subject_name(path: str) -> str:
    name = os.path.basename(os.path.normpath(path))
    for extension in _EXTENSIONS:
        if name.lower().endswith(extension):
            name = name[:-len(extension)]
            break
    return re.sub(r"_0000$", "", name)  # nnU-Net / MSD channel suffix of the first modality


def read_scan(scan: Scan, model: ExportedModel
              ) -> tuple[list[np.ndarray], list[ImageMeta], list[str]]:
    """Reads one (z, y, x) array per model modality.

    Returns:
      (arrays, metas, sources): per modality, the array, its geometry and the file it came from
      (with the channel for multi-channel files), for error messages.

    Raises:
      ValueError: unreadable file (naming it), wrong number of modalities (naming the expected
        ones), or wrong dimensionality for the model.
    """
    expected = model.modalities
    if scan.channel_indices is not None:
        volumes = read_channels(scan.image_paths, scan.channel_indices)
        sources = [path if index is None else f"{path} (channel {index})"
                   for path, index in zip(scan.image_paths, scan.channel_indices)]
    else:
        volumes, sources = [], []
        for path in scan.image_paths:
            array, meta = read_image(path)
            if meta.num_channels > 1:  # e.g. MSD 4D NIfTI: every channel is a modality
                single = dataclasses.replace(meta, num_channels=1)
                volumes += [(np.ascontiguousarray(array[..., c]), single)
                            for c in range(meta.num_channels)]
                sources += [f"{path} (channel {c})" for c in range(meta.num_channels)]
            else:
                volumes.append((array, meta))
                sources.append(path)
    if len(volumes) != len(expected) and len(expected) == 1 and len(scan.image_paths) == 1 \
            and len(volumes) > 1:
        raise ValueError(f"{scan.image_paths[0]} holds {len(volumes)} frames or channels (a 4D "
                         f"image); the model segments one volume ({expected[0]}). Pick the frame "
                         f"with --frame=K (0..{len(volumes) - 1}), e.g. the ED or ES phase of a "
                         "cine series, or pass a single-frame file.")
    if len(volumes) != len(expected):
        raise ValueError(f"The model expects {len(expected)} modalit"
                         f"{'y' if len(expected) == 1 else 'ies'} ({', '.join(expected)}), "
                         f"got {len(volumes)} from {', '.join(scan.image_paths)}. Pass "
                         "--input=" + ",".join(f"<{m}>" for m in expected) + " in that order.")
    for source, (_, meta) in zip(sources, volumes):
        if meta.ndim not in (2, 3) or (model.spatial_dims == 3 and meta.ndim != 3):
            raise ValueError(f"{source} is a {meta.ndim}D image; this {model.spatial_dims}D model "
                             f"needs {'3D volumes' if model.spatial_dims == 3 else '2D or 3D'} "
                             "images.")
    return [v[0] for v in volumes], [v[1] for v in volumes], sources


def predict_scan(model: ExportedModel, scan: Scan, *, tile_batch: int = 4,
                 flip_tta: bool = False, tile_size_zyx: Sequence[int] | None = None,
                 overlap: float | None = None) -> tuple[np.ndarray, ImageMeta]:
    """Predicts one scan.

    Returns:
      (class indices (z, y, x) on the scan's own grid, the scan's geometry). Map them to the
      dataset's label values with `assets["label_values"]` (`evaluate.write_label_map` does).

    Raises:
      ValueError: see `read_scan` and `preprocessing.preprocess_volume`.
    """
    from preprocessing import preprocess_volume, restore_geometry
    from tfseg.inference import predict_volume

    images, metas, sources = read_scan(scan, model)
    processed = preprocess_volume(images, metas, None, model.dataset, model.config,
                                  sources=sources)
    del images
    tile = tile_size_zyx or model.assets.get("tile_size_zyx")
    probs = predict_volume(model.probabilities, processed.image, model.spatial_dims,
                           patch_size_zyx=tuple(tile) if tile else None,
                           overlap=overlap if overlap is not None else model.assets["overlap"],
                           tile_batch=tile_batch, flip_tta=flip_tta,
                           size_multiple=int(model.assets["size_multiple"]),
                           outputs="probabilities")
    original = dataclasses.replace(metas[0], num_channels=1)
    spec = model.data_spec
    restored = restore_geometry(probs, processed.geometry, original, is_probability=True,
                                background=spec.targets == "classes")
    return spec.label_map(restored), original


def predict_inputs(model_dir: str, input_spec: str, output_dir: str, *,
                   dataset_name: str | None = None, tile_batch: int = 4, flip_tta: bool = False,
                   tile_size_zyx: Sequence[int] | None = None, overlap: float | None = None,
                   overlays: bool = False, frame: int | None = None) -> list[str]:
    """Predicts every scan of `input_spec` and writes `<output_dir>/<subject>_seg.nii.gz`
    (and, with `overlays`, its montage `<subject>_overlay.png`, `tfseg.visualize`).

    A scan that fails (unreadable file, wrong modalities...) does not stop the others: every
    other scan is written first, then the failures are raised together.

    Returns:
      The written paths.

    Raises:
      ValueError: for bad model folders or inputs (see `load_exported_model`, `find_scans`,
        `read_scan`); with several scans, one message listing every failed scan.
    """
    from tfseg.evaluate import write_label_map

    model = load_exported_model(model_dir)
    scans = find_scans(input_spec, model, dataset_name)
    if frame is not None:  # one frame (channel) of 4D inputs, e.g. a cine phase
        scans = [dataclasses.replace(s, channel_indices=(int(frame),) * len(s.image_paths))
                 for s in scans]

    def process(scan: Scan) -> list[str]:
        classes, meta = predict_scan(model, scan, tile_batch=tile_batch, flip_tta=flip_tta,
                                     tile_size_zyx=tile_size_zyx, overlap=overlap)
        path = os.path.join(output_dir, f"{scan.subject_id}_seg.nii.gz")
        write_label_map(classes, meta, model.assets["label_values"], path)
        return [path] + ([_write_overlay(model, scan, classes, output_dir)] if overlays else [])

    return for_each_scan(scans, process, output_dir)


def for_each_scan(scans: Sequence[Scan], process, output_dir: str) -> list[str]:
    """Runs `process(scan) -> written paths` on every scan, logging each. A scan that fails
    (ValueError) does not stop the others: every other scan is written first, then the
    failures are raised together (a single scan's error is raised as it is).

    Returns:
      Every written path, in scan order.
    """
    written, failures = [], []
    for position, scan in enumerate(scans, 1):
        started = time.perf_counter()
        try:
            paths = process(scan)
        except ValueError as error:
            if len(scans) == 1:
                raise
            logging.error("[%d/%d] %s failed: %s", position, len(scans), scan.subject_id, error)
            failures.append(f"{scan.subject_id}: {error}")
            continue
        written += paths
        logging.info("[%d/%d] %s -> %s  %.1f s", position, len(scans), scan.subject_id,
                     paths[0], time.perf_counter() - started)
    if failures:
        raise ValueError(f"{len(failures)} of {len(scans)} scans failed (the other "
                         f"{len(scans) - len(failures)} were written to {output_dir}): "
                         + "; ".join(failures))
    return written


def _write_overlay(model: ExportedModel, scan: Scan, classes: np.ndarray, output_dir: str
                   ) -> str:
    """`<output_dir>/<subject>_overlay.png`: the prediction's contours on the scan."""
    from preprocessing.transforms import canonical_transform
    from tfseg.visualize import display_channel, write_prediction_overlay

    images, metas, _ = read_scan(scan, model)
    channel = display_channel(model.modalities)
    transform = canonical_transform(metas[channel], model.spatial_dims,  # as preprocessing
                                    model.dataset.slice_axis_zyx,
                                    model.dataset.orientation_reliable)
    return write_prediction_overlay(
        os.path.join(output_dir, f"{scan.subject_id}_overlay.png"), scan.subject_id,
        images[channel], metas[channel], model.data_spec.reported_names,
        model.data_spec.target_masks(classes), transform=transform,
        note=f"image: {model.modalities[channel]}")
