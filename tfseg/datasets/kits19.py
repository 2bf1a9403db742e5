"""KiTS19 (Kidney Tumor Segmentation Challenge 2019): arterial-phase abdominal CT.

Layout as shipped by the official repository (github.com/neheller/kits19, `data/` filled by
`starter_code/get_imaging.py`); `--data_dir` = the repository root or its `data/` folder:

    data/case_NNNNN/imaging.nii.gz        CT in Hounsfield units; all 300 cases (00000-00299)
    data/case_NNNNN/segmentation.nii.gz   cases 00000-00209: 0 background, 1 kidney, 2 tumour
    data/kits.json                        clinical data (not read)

A case without segmentation.nii.gz is unlabeled (the 90 test cases 00210-00299; a training case
missing it is also unlabeled, with a warning). A case folder without imaging.nii.gz is listed
with the expected path so preprocessing reports it. Subject id = patient id = "case_NNNNN".

Axis order (verified 2026-12 in the repository's README, changelog and starter_code/visualize.py):
the arrays are stored as (num_slices, height, width) in the NIfTI voxel order, i.e. the axial
slice index is the FIRST NIfTI axis (the affine was diag(slice thickness, pixel, pixel), later
corrected for slice thickness and a horizontal flip but keeping that axis order). SimpleITK
therefore returns (z, y, x) arrays whose x axis is the slice axis. `slice_axis_zyx = 2` makes
preprocessing swap it with z, so the 2D slices are the axial ones, and swap it back when
predictions are restored, so they are written in the files' voxel order (same shape and
header as segmentation.nii.gz).

Targets (`target` option):
- "kidney" (default): kidney and tumour merged into one foreground class, written back as 1;
- "tumour": tumour only (kidney is background), written back as 2 (the file's tumour value);
- "classes": the challenge's three classes (background, kidney, tumour), values 0/1/2.

CT intensities are clipped to [-79, 304] HU before percentile scaling: the 0.5 / 99.5
percentiles of the foreground voxels over the KiTS19 training set, the window of the winning
entry (Isensee & Maier-Hein, "An attempt at beating the 3D U-Net", 2019; nnU-Net's CT
normalisation) and widely reused since. No N4: CT has no receive-coil bias and N4 would distort
Hounsfield units.

Protocols (`protocol` option; axial 2D slices, evaluation always on whole volumes):
- "default": 0.8 x 0.8 mm in-plane (native spacing is 0.44-1.04 mm, most near 0.78),
  centre crop 384 x 384 (307 mm: both kidneys fit; the 512 x 512 field is ~400 mm).
- "dmnet": Fang & Li, "DMNet: Difference Minimization Network for Semi-supervised
  Segmentation in Medical Images", MICCAI 2020: 224 x 224 slices, one labeled and two unlabeled
  slices per patient. We read the paper's 224 x 224 as the whole ~400 mm field resampled
  (1.8 mm), since a 224 crop at native spacing (175 mm) would cut off the kidneys.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Mapping

from absl import logging

from tfseg.datasets import _layout
from tfseg.datasets.base import Dataset, Subject

TARGETS: dict[str, dict[str, Any]] = {
    "kidney": {"class_names": ("background", "kidney"), "label_values": (0, 1),
               "label_map": {0: 0, 1: 1, 2: 1}},
    "tumour": {"class_names": ("background", "tumour"), "label_values": (0, 2),
               "label_map": {0: 0, 1: 0, 2: 1}},
    "classes": {"class_names": ("background", "kidney", "tumour"), "label_values": (0, 1, 2),
                "label_map": None},
}
PROTOCOLS: dict[str, dict[str, Any]] = {
    "default": {"target_spacing_xy": (0.8, 0.8), "crop_size_yx": (384, 384)},
    "dmnet": {"target_spacing_xy": (1.8, 1.8), "crop_size_yx": (224, 224),
              "labeled_slices_per_subject": 1, "unlabeled_slices_per_subject": 2},
}
NUM_LABELED_CASES = 210  # case_00000 .. case_00209 ship a segmentation
_CASE = re.compile(r"^case_\d{5}$")
_EXPECTED = "data/case_NNNNN/imaging.nii.gz [+ segmentation.nii.gz] (the kits19 repository)"


@dataclasses.dataclass(frozen=True)
class Kits19Dataset(Dataset):
    """KiTS19 facts and reader; `target` and `protocol` are dataset options."""

    name: str = "kits19"
    modalities: tuple[str, ...] = ("CT",)
    class_names: tuple[str, ...] = TARGETS["kidney"]["class_names"]
    label_values: tuple[int, ...] = TARGETS["kidney"]["label_values"]
    spatial_dims: int = 2
    label_map: Mapping[int, int] | None = dataclasses.field(
        default_factory=lambda: dict(TARGETS["kidney"]["label_map"]))
    target_spacing_xy: tuple[float, float] | None = PROTOCOLS["default"]["target_spacing_xy"]
    crop_size_yx: tuple[int, int] | None = PROTOCOLS["default"]["crop_size_yx"]
    intensity_window: tuple[float, float] | None = (-79.0, 304.0)
    n4_shrink: int = 2
    n4_default: bool = False
    slice_axis_zyx: int = 2
    target: str = "kidney"
    protocol: str = "default"

    def options(self) -> dict[str, Any]:
        return {"target": self.target, "protocol": self.protocol}

    def list_subjects(self, data_dir: str, **options: Any) -> list[Subject]:
        """One subject per case_NNNNN folder; labeled when it holds segmentation.nii.gz.

        Raises:
          ValueError: naming the folder when it is empty or holds no case_NNNNN folder.
        """
        _layout.merge_options(self.options(), options, self.name)
        folder = _layout.check_data_dir(data_dir, self.name, _EXPECTED)
        root = os.path.join(folder, "data") if os.path.isdir(os.path.join(folder, "data")) \
            else folder
        cases = [n for n in _layout.subfolders(root) if _CASE.match(n)]
        if not cases:
            raise _layout.layout_error(self.name, folder, _EXPECTED,
                                       "found no case_NNNNN folder")
        subjects = []
        for case in cases:
            case_dir = os.path.join(root, case)
            label = os.path.join(case_dir, "segmentation.nii.gz")
            if not os.path.isfile(label):
                label = None
                if int(case[len("case_"):]) < NUM_LABELED_CASES:
                    logging.warning("KiTS19 %s has no segmentation.nii.gz (the release ships one "
                                    "for cases 00000-00209); it is read as unlabeled.", case_dir)
            subjects.append(Subject(subject_id=case, patient_id=case,
                                    image_paths=(os.path.join(case_dir, "imaging.nii.gz"),),
                                    label_path=label))
        return subjects


def make_dataset(target: str = "kidney", protocol: str = "default") -> Kits19Dataset:
    """KiTS19 with the given target ("kidney", "tumour" or "classes") and slice protocol.

    Raises:
      ValueError: for an unknown target or protocol.
    """
    if target not in TARGETS:
        raise ValueError(f"Unknown KiTS19 target {target!r}; choose one of {', '.join(TARGETS)}.")
    if protocol not in PROTOCOLS:
        raise ValueError(f"Unknown KiTS19 protocol {protocol!r}; choose one of "
                         f"{', '.join(PROTOCOLS)}.")
    facts = dict(TARGETS[target])
    facts["label_map"] = dict(facts["label_map"]) if facts["label_map"] else None
    return Kits19Dataset(target=target, protocol=protocol, **facts, **PROTOCOLS[protocol])
