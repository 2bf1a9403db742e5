"""Your own data, in the nnU-Net v2 raw layout (also the domain-adaptation source/target format).

    dataset.json                         {"channel_names": {"0": "T2", "1": "ADC"},
                                          "labels": {"background": 0, "pz": 1, "tz": 2},
                                          "file_ending": ".nii.gz", ...}
    imagesTr/{case}_{0000..}{ending}     one file per channel; labeled cases
    labelsTr/{case}{ending}              integer label map per labeled case
    imagesTs/{case}_{0000..}{ending}     nnU-Net's test images: unlabeled, or labeled when
    labelsTs/{case}{ending}              their labels are there (held-out evaluation cases)
    imagesUnl/{case}_{0000..}{ending}    unlabeled cases (tfseg's addition)

The modalities and classes come from dataset.json, so the facts depend on the folder: call
`dataset.resolve(data_dir)` to get them (CONTRACTS.md). An nnU-Net v1 / MSD style dataset.json
("modality": {"0": "MRI"}, "labels": {"0": "background", ...}) is read too. A channel named "CT"
(nnU-Net's convention) turns N4 off by default.

Geometry defaults (`make_dataset` options):
  - spatial_dims=2 (default): slices in-plane. `target_spacing_xy=None` means the median
    in-plane spacing of the training images; `crop_size_yx=None` means the median in-plane size
    after resampling to that spacing, rounded up to a multiple of 16 (U-Net friendly). Both are
    computed in `resolve` from the image headers only (no voxel data is read).
  - spatial_dims=3: patches of `patch_size_zyx` (default 32³) on a `patch_stride_zyx` (8³) grid;
    `min_foreground_fraction=0.0` keeps any labeled patch with at least one foreground voxel.

Missing files: a case with a missing channel or label is listed with the expected path, so
preprocessing reports it (see `_layout`). Patient id = case id (nnU-Net has no patient notion).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any, Sequence

import numpy as np
import SimpleITK as sitk

from tfseg.datasets import _layout
from tfseg.datasets.base import Dataset, Subject

_EXPECTED = ("dataset.json plus imagesTr/{case}_0000.nii.gz and labelsTr/{case}.nii.gz "
             "(nnU-Net v2 raw layout)")
_UNLABELED_FOLDERS = ("imagesTs", "imagesUnl")


def _description(folder: str) -> dict[str, Any]:
    """dataset.json normalised: channel names, (class name, value) pairs, file ending.

    Raises:
      ValueError: naming the file if it is missing, not JSON, or lacks channels / labels.
    """
    path = os.path.join(folder, "dataset.json")
    if not os.path.isfile(path):
        raise _layout.layout_error("folder", folder, _EXPECTED, "dataset.json is missing")
    try:
        with open(path, encoding="utf-8") as stream:
            description = json.load(stream)
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}). Fix the file.") from None
    channels = description.get("channel_names", description.get("modality"))
    labels = description.get("labels")
    if not isinstance(channels, dict) or not channels or not isinstance(labels, dict):
        raise ValueError(f"{path} must hold 'channel_names' (e.g. {{\"0\": \"T2\"}}) and "
                         "'labels' (e.g. {\"background\": 0, \"tumour\": 1}). Fix the file.")
    if sorted(channels) != sorted(str(i) for i in range(len(channels))):
        raise ValueError(f"{path}: channel_names keys must be 0..{len(channels) - 1}, got "
                         f"{sorted(channels)}. Fix the file.")
    # v2: {"name": value}; v1 / MSD: {"value": "name"}.
    pairs = ([(str(v), k) for k, v in labels.items()] if all(
        isinstance(v, str) for v in labels.values()) else list(labels.items()))
    if not all(isinstance(v, int) or (isinstance(v, str) and v.isdigit()) for _, v in pairs):
        raise ValueError(f"{path}: every label must map a class name to one integer value "
                         "(region-based labels with lists are not supported). Fix the file.")
    classes = sorted(((name, int(value)) for name, value in pairs), key=lambda p: p[1])
    if len({value for _, value in classes}) != len(classes):
        raise ValueError(f"{path}: two labels share a value ({classes}). Fix the file.")
    if not classes or classes[0][1] != 0:
        raise ValueError(f"{path}: labels must include background with value 0. Fix the file.")
    return {"channel_names": tuple(channels[str(i)] for i in range(len(channels))),
            "classes": tuple(classes),
            "file_ending": description.get("file_ending", ".nii.gz")}


def _cases(folder: str, ending: str, num_channels: int) -> list[str]:
    """Case ids in an images folder; every file must be {case}_{XXXX}{ending}.

    Raises:
      ValueError: naming a file that breaks the naming scheme or has an undeclared channel.
    """
    pattern = re.compile(rf"^(.+)_(\d{{4}}){re.escape(ending)}$")
    cases = set()
    for name in _layout.visible_entries(folder):
        match = pattern.match(name)
        if match is None:
            if name.endswith(ending):
                raise _layout.layout_error("folder", folder, _EXPECTED,
                                           f"{name} is not named {{case}}_{{XXXX}}{ending}")
            continue
        if int(match.group(2)) >= num_channels:
            raise ValueError(f"{os.path.join(folder, name)}: channel {match.group(2)} is not "
                             f"declared in dataset.json ({num_channels} channel_names). Add it "
                             "to channel_names or remove the file.")
        cases.add(match.group(1))
    return sorted(cases, key=_layout.natural_key)


@dataclasses.dataclass(frozen=True)
class FolderDataset(Dataset):
    """A dataset described by its own dataset.json; unresolved, its facts are empty."""

    name: str = "folder"
    modalities: tuple[str, ...] = ()
    class_names: tuple[str, ...] = ()
    label_values: tuple[int, ...] = ()
    spatial_dims: int = 2
    n4_shrink: int = 2

    def options(self) -> dict[str, Any]:
        return {"spatial_dims": self.spatial_dims,
                "target_spacing_xy": _plain(self.target_spacing_xy),
                "crop_size_yx": _plain(self.crop_size_yx),
                "patch_size_zyx": _plain(self.patch_size_zyx),
                "patch_stride_zyx": _plain(self.patch_stride_zyx),
                "min_foreground_fraction": self.min_foreground_fraction,
                "intensity_window": _plain(self.intensity_window)}

    def resolve(self, data_dir: str) -> "FolderDataset":
        """Reads dataset.json (and, for 2D defaults, the image headers) under `data_dir`.

        Raises:
          ValueError: naming the folder or file if dataset.json is missing or invalid, or no
            image is found to derive the default spacing and crop from.
        """
        folder = _layout.check_data_dir(data_dir, self.name, _EXPECTED)
        description = _description(folder)
        channel_names = description["channel_names"]
        changes: dict[str, Any] = {
            "modalities": channel_names,
            "class_names": tuple(name for name, _ in description["classes"]),
            "label_values": tuple(value for _, value in description["classes"]),
            "n4_default": not any(c.strip().upper() == "CT" for c in channel_names)}
        if self.spatial_dims == 2 and (self.target_spacing_xy is None or
                                       self.crop_size_yx is None):
            spacing, crop = _default_plane(self.list_subjects(folder), self.target_spacing_xy)
            changes["target_spacing_xy"] = self.target_spacing_xy or spacing
            changes["crop_size_yx"] = self.crop_size_yx or crop
        return dataclasses.replace(self, **changes)

    def list_subjects(self, data_dir: str, **options: Any) -> list[Subject]:
        """Lists imagesTr cases (labeled) and imagesTs / imagesUnl cases (unlabeled).

        Raises:
          ValueError: naming the folder for an empty folder, a missing dataset.json, misnamed
            files, or a case id present in two image folders.
        """
        _layout.merge_options({}, options, self.name)
        folder = _layout.check_data_dir(data_dir, self.name, _EXPECTED)
        description = _description(folder)
        ending, num_channels = description["file_ending"], len(description["channel_names"])
        subjects: dict[str, Subject] = {}
        for source in ("imagesTr",) + _UNLABELED_FOLDERS:
            images = os.path.join(folder, source)
            for case in _cases(images, ending, num_channels):
                if case in subjects:
                    raise ValueError(f"Case {case!r} is in both {subjects[case].extra['source']}/"
                                     f" and {source}/ of {folder}; case ids must be unique. "
                                     "Rename one of them.")
                label = _label_path(folder, source, case + ending)
                subjects[case] = Subject(
                    subject_id=case, patient_id=case, label_path=label,
                    image_paths=tuple(os.path.join(images, f"{case}_{c:04d}{ending}")
                                      for c in range(num_channels)),
                    extra={"source": source})
        if not subjects:
            raise _layout.layout_error(self.name, folder, _EXPECTED,
                                       f"no {{case}}_0000{ending} images were found")
        return list(subjects.values())


def _label_path(folder: str, source: str, name: str) -> str | None:
    """labelsTr/<name> for imagesTr cases (reported by preprocessing when missing);
    labelsTs/<name> for imagesTs cases when it exists; None (unlabeled) otherwise."""
    if source == "imagesTr":
        return os.path.join(folder, "labelsTr", name)
    if source == "imagesTs":
        path = os.path.join(folder, "labelsTs", name)
        return path if os.path.isfile(path) else None
    return None


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _default_plane(subjects: Sequence[Subject], spacing_xy: Sequence[float] | None
                   ) -> tuple[tuple[float, float], tuple[int, int]]:
    """Median in-plane spacing (x, y) and crop (rows, cols) from the channel-0 headers.

    Labeled cases are used when there are any (they define the training geometry).
    """
    labeled = [s for s in subjects if s.labeled] or list(subjects)
    spacings, sizes = [], []
    for subject in labeled:
        path = subject.image_paths[0]
        if not os.path.isfile(path):
            continue  # reported by preprocessing; it must not block the defaults
        reader = sitk.ImageFileReader()
        reader.SetFileName(path)
        try:
            reader.ReadImageInformation()
        except RuntimeError as error:
            raise ValueError(f"Cannot read the header of {path} ({str(error).splitlines()[-1]})."
                             " Re-download or re-extract the file.") from None
        spacings.append(reader.GetSpacing()[:2])
        sizes.append(reader.GetSize()[:2])
    if not spacings:
        raise ValueError(f"No readable image among {len(labeled)} cases to derive the default "
                         "in-plane spacing and crop from; pass target_spacing_xy and "
                         "crop_size_yx.")
    spacing = tuple(spacing_xy) if spacing_xy else tuple(
        float(v) for v in np.median(np.asarray(spacings), axis=0))
    extent = np.median(np.asarray(sizes) * np.asarray(spacings), axis=0)  # mm, (x, y)
    cols, rows = (int(math.ceil(e / s / 16.0) * 16) for e, s in zip(extent, spacing))
    return (spacing[0], spacing[1]), (rows, cols)


def make_dataset(spatial_dims: int = 2, target_spacing_xy: Sequence[float] | None = None,
                 crop_size_yx: Sequence[int] | None = None,
                 patch_size_zyx: Sequence[int] | None = None,
                 patch_stride_zyx: Sequence[int] | None = None,
                 min_foreground_fraction: float = 0.0,
                 intensity_window: Sequence[float] | None = None) -> FolderDataset:
    """A `folder` dataset; its modalities and classes are filled in by `resolve(data_dir)`.

    Args:
      spatial_dims: 2 (in-plane slices, default) or 3 (volumes and 3D patches).
      target_spacing_xy: 2D: in-plane spacing in mm (x, y); None = median of the training images.
      crop_size_yx: 2D: crop/pad size; None = median resampled size rounded up to 16.
      patch_size_zyx / patch_stride_zyx: 3D: training patch size and grid stride
        (None = 32³ / 8³).
      min_foreground_fraction: 3D: labeled patches need more foreground than this.
      intensity_window: (low, high) clip before percentile scaling (CT in HU); None for MR.

    Raises:
      ValueError: for an invalid option value or an option of the other spatial_dims.
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}.")
    other = ({"patch_size_zyx": patch_size_zyx, "patch_stride_zyx": patch_stride_zyx}
             if spatial_dims == 2 else
             {"target_spacing_xy": target_spacing_xy, "crop_size_yx": crop_size_yx})
    given = sorted(name for name, value in other.items() if value is not None)
    if given:
        raise ValueError(f"{', '.join(given)} do not apply to spatial_dims={spatial_dims}; "
                         "drop them or change spatial_dims.")
    if spatial_dims == 3:
        patch_size_zyx = patch_size_zyx or (32, 32, 32)
        patch_stride_zyx = patch_stride_zyx or (8, 8, 8)
    for name, value, length in (("target_spacing_xy", target_spacing_xy, 2),
                                ("crop_size_yx", crop_size_yx, 2),
                                ("patch_size_zyx", patch_size_zyx, 3),
                                ("patch_stride_zyx", patch_stride_zyx, 3)):
        if value is not None and (len(value) != length or min(value) <= 0):
            raise ValueError(f"{name} must be {length} positive numbers, got {value!r}.")
    if intensity_window is not None and (len(intensity_window) != 2 or
                                         intensity_window[0] >= intensity_window[1]):
        raise ValueError(f"intensity_window must be (low, high) with low < high, got "
                         f"{intensity_window!r}.")
    return FolderDataset(spatial_dims=spatial_dims,
                         target_spacing_xy=_typed(target_spacing_xy, float),
                         crop_size_yx=_typed(crop_size_yx, int),
                         patch_size_zyx=_typed(patch_size_zyx, int),
                         patch_stride_zyx=_typed(patch_stride_zyx, int),
                         min_foreground_fraction=float(min_foreground_fraction),
                         intensity_window=_typed(intensity_window, float))


def _typed(values: Sequence[Any] | None, kind: type) -> tuple[Any, ...] | None:
    return tuple(kind(v) for v in values) if values is not None else None
