"""Preprocessing settings, their resolution against a dataset's defaults, and the fingerprint.

The fingerprint names the records folder (`records/<dataset>/<fingerprint>`), so two runs with the
same settings share their records and any change of a setting, of the dataset's facts or of the
TFRecord schema gives a fresh folder. The data folder is deliberately not part of it: moving the
raw data must not invalidate the records.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Mapping

from tfseg.data.spec import resolve_regions
from tfseg.datasets.base import Dataset

# Bump when the algorithm changes in a way that changes the written arrays.
PREPROCESSING_VERSION = 2

# 3D patch grid when neither the config nor the dataset names one (docs/datasets.md: 32³, stride 8).
DEFAULT_PATCH_SIZE_ZYX = (32, 32, 32)
DEFAULT_PATCH_STRIDE_ZYX = (8, 8, 8)


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
    """What the offline stage does to every subject. `None` means the dataset's default.

    Attributes:
      n4: run N4 bias-field correction where the modality calls for it. MR datasets do; CT
        datasets (`intensity_window` set, or `n4_default=False`) never do, whatever this says,
        because Hounsfield units carry no multiplicative bias.
      n4_shrink: shrink factor of the N4 fit (the field is applied at full resolution).
      n4_levels / n4_iterations / n4_threshold: N4 fitting levels, iterations per level and
        convergence threshold (paper settings: 4 × 50, 0.001).
      percentiles: (low, high) percentiles of the foreground mapped to 0 and 1.
      clip_range: optional (low, high) clip of the normalised intensities.
      target_spacing_xy: 2D datasets: in-plane spacing (x, y) in mm after resampling.
      crop_size_yx: 2D datasets: centre crop/pad size (rows, cols) after resampling.
      patch_size_zyx / patch_stride_zyx: 3D datasets: training patch size and grid stride.
      min_foreground_fraction: 3D labeled patches need more foreground than this fraction.
    """

    n4: bool = True
    n4_shrink: int | None = None
    n4_levels: int = 4
    n4_iterations: int = 50
    n4_threshold: float = 1e-3
    percentiles: tuple[float, float] = (2.0, 98.0)
    clip_range: tuple[float, float] | None = None
    target_spacing_xy: tuple[float, float] | None = None
    crop_size_yx: tuple[int, int] | None = None
    patch_size_zyx: tuple[int, int, int] | None = None
    patch_stride_zyx: tuple[int, int, int] | None = None
    min_foreground_fraction: float | None = None


def dataset_uses_n4(dataset: Dataset) -> bool:
    """Whether N4 suits the dataset's modality: MR yes; CT (`n4_default=False` or an intensity
    window, either one suffices) no."""
    return bool(getattr(dataset, "n4_default", True)) and dataset.intensity_window is None


def _positive(name: str, values, kind=float) -> tuple:
    values = tuple(kind(v) for v in values)
    if any(v <= 0 for v in values):
        raise ValueError(f"{name} must be positive, got {values}.")
    return values


def resolve_config(config: PreprocessConfig, dataset: Dataset) -> PreprocessConfig:
    """Fills every `None` with the dataset's default and checks the values.

    Settings that do not apply to the dataset's geometry stay `None` (2D: no patch grid; 3D: no
    target spacing or crop). Resolving a resolved config returns it unchanged.

    Raises:
      ValueError: for out-of-range values, or a 2D-only / 3D-only setting given for a dataset of
        the other kind (naming the setting and the dataset).
    """
    two_d = dataset.spatial_dims == 2
    if dataset.spatial_dims not in (2, 3):
        raise ValueError(f"Dataset {dataset.name!r} has spatial_dims={dataset.spatial_dims}; "
                         "expected 2 or 3.")
    if two_d and (config.patch_size_zyx or config.patch_stride_zyx
                  or config.min_foreground_fraction is not None):
        raise ValueError(f"Dataset {dataset.name!r} is processed as 2D slices: patch size, stride "
                         "and foreground fraction do not apply. Leave them unset.")
    if not two_d and (config.target_spacing_xy or config.crop_size_yx):
        raise ValueError(f"Dataset {dataset.name!r} is processed as 3D volumes: target spacing "
                         "and crop size do not apply. Leave them unset.")
    low, high = (float(p) for p in config.percentiles)
    if not 0.0 <= low < high <= 100.0:
        raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {(low, high)}.")
    clip = None
    if config.clip_range is not None:
        clip = tuple(float(v) for v in config.clip_range)
        if len(clip) != 2 or clip[0] >= clip[1]:
            raise ValueError(f"clip_range must be (low, high) with low < high, got {clip}.")
    n4_shrink = int(config.n4_shrink if config.n4_shrink is not None else dataset.n4_shrink)
    if n4_shrink < 1 or config.n4_levels < 1 or config.n4_iterations < 1:
        raise ValueError("n4_shrink, n4_levels and n4_iterations must be >= 1, got "
                         f"{n4_shrink}, {config.n4_levels}, {config.n4_iterations}.")
    if not config.n4_threshold > 0:
        raise ValueError(f"n4_threshold must be positive, got {config.n4_threshold}.")
    fields: dict[str, Any] = dict(
        n4=bool(config.n4) and dataset_uses_n4(dataset), n4_shrink=n4_shrink,
        n4_levels=int(config.n4_levels), n4_iterations=int(config.n4_iterations),
        n4_threshold=float(config.n4_threshold), percentiles=(low, high), clip_range=clip)
    if two_d:
        spacing = config.target_spacing_xy or dataset.target_spacing_xy
        crop = config.crop_size_yx or dataset.crop_size_yx
        fields.update(
            target_spacing_xy=_positive("target_spacing_xy", spacing) if spacing else None,
            crop_size_yx=_positive("crop_size_yx", crop, int) if crop else None)
        for name in ("target_spacing_xy", "crop_size_yx"):
            if fields[name] is not None and len(fields[name]) != 2:
                raise ValueError(f"{name} needs 2 values, got {fields[name]}.")
    else:
        size = config.patch_size_zyx or dataset.patch_size_zyx or DEFAULT_PATCH_SIZE_ZYX
        stride = config.patch_stride_zyx or dataset.patch_stride_zyx or DEFAULT_PATCH_STRIDE_ZYX
        fraction = (config.min_foreground_fraction if config.min_foreground_fraction is not None
                    else dataset.min_foreground_fraction)
        if not 0.0 <= float(fraction) < 1.0:
            raise ValueError(f"min_foreground_fraction must be in [0, 1), got {fraction}.")
        fields.update(patch_size_zyx=_positive("patch_size_zyx", size, int),
                      patch_stride_zyx=_positive("patch_stride_zyx", stride, int),
                      min_foreground_fraction=float(fraction))
        for name in ("patch_size_zyx", "patch_stride_zyx"):
            if len(fields[name]) != 3:
                raise ValueError(f"{name} needs 3 values (z, y, x), got {fields[name]}.")
    return PreprocessConfig(**fields)


def settings_dict(config: PreprocessConfig) -> dict[str, Any]:
    """JSON-able form of a (resolved) config, tuples as lists."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def dataset_facts(dataset: Dataset) -> dict[str, Any]:
    """The dataset facts that change what is written (and so enter the fingerprint)."""
    return {"modalities": list(dataset.modalities), "class_names": list(dataset.class_names),
            "label_values": [int(v) for v in dataset.label_values],
            "raw_to_class": sorted([int(k), int(v)] for k, v in dataset.raw_to_class().items()),
            "spatial_dims": int(dataset.spatial_dims),
            "intensity_window": (list(dataset.intensity_window)
                                 if dataset.intensity_window is not None else None),
            "orientation_reliable": bool(dataset.orientation_reliable),
            "content_version": getattr(dataset, "content_version", None),
            # Only region datasets carry the key, so other datasets keep their fingerprints.
            **({"regions": resolve_regions(dataset.regions, dataset.region_paint,
                                           dataset.label_values, f"dataset {dataset.name!r}")}
               if dataset.regions else {}),
            # Likewise only datasets with a training protocol (how training slices are drawn).
            **({"training_protocol": protocol} if (protocol := training_protocol(dataset))
               else {})}


def training_protocol(dataset: Dataset) -> dict[str, Any]:
    """The dataset's training-protocol fields that are set (see `Dataset`), JSON-ready.

    Raises:
      ValueError: for a 3D dataset with a protocol, or a bad value.
    """
    protocol = {}
    for name in ("train_crop_yx", "train_slices", "labeled_slices_per_subject",
                 "unlabeled_slices_per_subject"):
        value = getattr(dataset, name, None)
        if value is None:
            continue
        values = [int(v) for v in (value if isinstance(value, (tuple, list)) else [value])]
        if min(values) < 1:
            raise ValueError(f"Dataset {dataset.name!r}: {name} must be positive, got {value!r}.")
        protocol[name] = values if name == "train_crop_yx" else values[0]
    if protocol and dataset.spatial_dims != 2:
        raise ValueError(f"Dataset {dataset.name!r}: training protocols ({', '.join(protocol)}) "
                         "apply to 2D datasets only.")
    crop, size = protocol.get("train_crop_yx"), dataset.crop_size_yx
    if crop and (len(crop) != 2 or not size or any(c > s for c, s in zip(crop, size))):
        raise ValueError(f"Dataset {dataset.name!r}: train_crop_yx {crop} must be 2 sizes no "
                         f"larger than crop_size_yx {size}.")
    return protocol


def fingerprint(dataset: Dataset, dataset_options: Mapping[str, Any] | None,
                config: PreprocessConfig) -> str:
    """Short sha256 (12 hex characters) of everything that determines the written records.

    Covers the resolved settings, the dataset's name, options and facts (modalities, label map,
    spatial dims, window), the TFRecord schema version and `PREPROCESSING_VERSION`; not the data
    folder.
    """
    from tfseg.data.schema import SCHEMA_VERSION  # lazy: importing the schema imports TF

    options = dict(dataset.options())
    options.update(dataset_options or {})
    payload = {"schema_version": SCHEMA_VERSION, "preprocessing_version": PREPROCESSING_VERSION,
               "dataset": dataset.name, "dataset_options": options,
               "dataset_facts": dataset_facts(dataset),
               "settings": settings_dict(resolve_config(config, dataset))}
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def records_dir(records_root: str, dataset_name: str, fingerprint_hex: str,
                data_dir: str | None = None) -> str:
    """Where a dataset's records live by default: `<records_root>/<dataset>/<fingerprint>`, and
    with the data folder `<fingerprint>-<sha256 of its absolute path, 8 hex>`, so two data
    folders of one dataset (e.g. a copy with edited labels, or another site's scans with the
    same case ids) never share records."""
    if data_dir is None:
        return os.path.join(records_root, dataset_name, fingerprint_hex)
    import hashlib

    where = hashlib.sha256(os.path.abspath(os.path.expanduser(data_dir)).encode()).hexdigest()
    return os.path.join(records_root, dataset_name, f"{fingerprint_hex}-{where[:8]}")
