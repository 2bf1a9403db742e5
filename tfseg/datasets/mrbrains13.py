"""MRBrainS13 (MICCAI 2013 grand challenge on MR brain segmentation): T1, T1-IR, FLAIR.

Layout as shipped (files are .nii in the NIfTI release, .mhd/.raw in the original one):

    TrainingData/{1..5}/T1, T1_IR, T2_FLAIR, T1_1mm, LabelsForTraining, LabelsForTesting
    TestData/{1..15}/T1, T1_IR, T2_FLAIR, T1_1mm                      (unlabeled here)

The three aligned 0.958×0.958×3.0 mm scans (T1, T1_IR, T2_FLAIR) are the channels; T1_1mm is
not aligned with them and is not read. `LabelsForTesting` is the evaluation labelling: 0 bg,
1 CSF (incl. ventricles), 2 GM (cortex + basal ganglia), 3 WM (incl. lesions); brainstem and
cerebellum are background. Patient ids are "train-N" and "test-N". The challenge states that all
scans are already bias corrected, so N4 is off by default.

Missing files: a subject folder lacking a scan or (training) label is listed with the expected
path, so preprocessing reports it (see `_layout`).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Sequence

from tfseg.datasets import _layout
from tfseg.datasets.base import Dataset, Subject

_PARTS = {"TrainingData": "train", "TestData": "test"}  # folder -> patient id prefix
_EXTENSIONS = (".nii", ".nii.gz", ".mhd", ".mha")
_LABEL = "LabelsForTesting"
_EXPECTED = "TrainingData/{1..5}/{T1,T1_IR,T2_FLAIR,LabelsForTesting}.nii (or .mhd) and TestData/"

PUBLISHED_SPLITS: dict[str, dict[str, list[str]]] = {
    # Few-shot GAN protocol: 1 labeled, 1 validation, 3 test; unlabeled = the 15 test subjects.
    "fewshot": {"labeled": ["train-1"], "val": ["train-2"],
                "test": ["train-3", "train-4", "train-5"],
                "unlabeled": _layout.numbered("test-", range(1, 16))},
}


@dataclasses.dataclass(frozen=True)
class MRBrainS13Dataset(Dataset):
    """MRBrainS13 facts and reader."""

    name: str = "mrbrains13"
    modalities: tuple[str, ...] = ("T1", "T1_IR", "T2_FLAIR")
    class_names: tuple[str, ...] = ("background", "csf", "gm", "wm")
    label_values: tuple[int, ...] = (0, 1, 2, 3)
    spatial_dims: int = 3
    patch_size_zyx: tuple[int, int, int] | None = (32, 32, 32)
    patch_stride_zyx: tuple[int, int, int] | None = (8, 8, 8)
    min_foreground_fraction: float = 6000 / 32768
    n4_shrink: int = 4
    n4_default: bool = False
    published_splits: Mapping[str, Mapping[str, Sequence[str]]] = dataclasses.field(
        default_factory=lambda: PUBLISHED_SPLITS)
    default_split: str | None = "fewshot"

    def _parts(self, folder: str) -> list[tuple[str, str]]:
        """(folder holding numbered subject folders, part name) pairs."""
        parts = [(os.path.join(folder, name), name) for name in _PARTS
                 if os.path.isdir(os.path.join(folder, name))]
        if not parts and os.path.basename(folder) in _PARTS:
            parts = [(folder, os.path.basename(folder))]  # --data_dir is TrainingData itself
        if not parts:
            raise _layout.layout_error(self.name, folder, _EXPECTED,
                                       "found neither TrainingData/ nor TestData/")
        return parts

    def list_subjects(self, data_dir: str, **options: Any) -> list[Subject]:
        """Lists TrainingData subjects (labeled) and TestData subjects (unlabeled).

        Raises:
          ValueError: naming the folder for an empty folder or another layout.
        """
        _layout.merge_options({}, options, self.name)
        folder = _layout.check_data_dir(data_dir, self.name, _EXPECTED)
        subjects = []
        for part_dir, part in self._parts(folder):
            for number in (n for n in _layout.subfolders(part_dir) if n.isdigit()):
                subjects.append(self._subject(os.path.join(part_dir, number), part, number))
        if not subjects:
            raise _layout.layout_error(self.name, folder, _EXPECTED,
                                       "no numbered subject folders were found")
        return subjects

    def _subject(self, subject_dir: str, part: str, number: str) -> Subject:
        found = {stem: _layout.find_file(subject_dir, stem, _EXTENSIONS)
                 for stem in self.modalities + (_LABEL,)}
        # A missing file is expected with the extension its siblings use.
        existing = next((path for path in found.values() if path), None)
        ext = _layout.extension_of(existing, _EXTENSIONS) if existing else ".nii"
        paths = {stem: path or os.path.join(subject_dir, stem + ext)
                 for stem, path in found.items()}
        patient_id = f"{_PARTS[part]}-{int(number)}"
        return Subject(subject_id=patient_id, patient_id=patient_id,
                       image_paths=tuple(paths[m] for m in self.modalities),
                       label_path=paths[_LABEL] if part == "TrainingData" else None)


DATASET = MRBrainS13Dataset()
