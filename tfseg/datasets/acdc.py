"""ACDC (Automated Cardiac Diagnosis Challenge, MICCAI 2017): cine MR, RV / myocardium / LV.

Layout as shipped (under --data_dir, or under --data_dir/database for the later re-release):

    training/patientNNN/Info.cfg                       NNN = 001..100, all labeled
    training/patientNNN/patientNNN_frameYY.nii.gz      YY = the ED / ES frame, 2 digits
    training/patientNNN/patientNNN_frameYY_gt.nii.gz   0 bg, 1 RV, 2 myocardium, 3 LV
    testing/patientNNN/...                             NNN = 101..150, gt may be absent
    (plus patientNNN_4d.nii.gz, the whole cine sequence, which is not read)

`Info.cfg` holds "ED: 1", "ES: 12", "Group: DCM", "Height:", "NbFrame:", "Weight:" lines. The
`phase` option picks the frames: "ES" (default: the task-driven augmentation paper's text),
"ED" (what that paper's released code actually used: frame01, the ED frame of most patients) or
"both" (two subjects per patient, "patientNNN_ED" and "patientNNN_ES", sharing the patient id so
splits keep them together).

Missing files: a training frame or gt that Info.cfg points at but that is absent is still listed
with its expected path, so preprocessing reports it (see `_layout`). A testing patient without
gt is unlabeled.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Mapping, Sequence

from tfseg.datasets import _layout
from tfseg.datasets.base import Dataset, Subject

PHASES = ("ES", "ED", "both")
_EXPECTED = "training/patientNNN/Info.cfg (and/or testing/patientNNN/Info.cfg)"
_PATIENT = re.compile(r"^patient\d{3}$")


def _patients(*numbers: int) -> list[str]:
    return _layout.numbered("patient", numbers, width=3)


# Published splits of the task-driven augmentation paper's code (patient ids).
_VAL = _patients(11, 71)
_UNLABELED = _patients(*_layout.spans((16, 20), (36, 40), (56, 60), (76, 80), (96, 100)))
_TEST = _patients(*_layout.spans((7, 10), (27, 30), (47, 50), (67, 70), (87, 90)))
_LABELED = {
    "tr1_c1": (2,), "tr1_c2": (42,), "tr1_c3": (22,), "tr1_c4": (62,), "tr1_c5": (95,),
    "tr3_c1": (2, 22, 42), "tr3_c2": (42, 62, 82), "tr3_c3": (22, 42, 82),
    "tr3_c4": (2, 42, 82), "tr3_c5": (2, 42, 95),
}
PUBLISHED_SPLITS: dict[str, dict[str, list[str]]] = {
    name: {"labeled": _patients(*numbers), "unlabeled": list(_UNLABELED), "val": list(_VAL),
           "test": list(_TEST)}
    for name, numbers in _LABELED.items()}


def parse_info_cfg(path: str) -> dict[str, str]:
    """Reads an ACDC Info.cfg ("Key: value" lines) into a dict of strings.

    Raises:
      ValueError: naming the file if it is missing or lacks valid integer ED / ES entries.
    """
    if not os.path.isfile(path):
        raise ValueError(f"Missing {path}: every ACDC patient folder holds an Info.cfg with its "
                         "ED and ES frame numbers. Re-extract the ACDC archive.")
    info = {}
    with open(path, encoding="utf-8", errors="replace") as stream:
        for line in stream:
            key, sep, value = line.partition(":")
            if sep:
                info[key.strip()] = value.strip()
    for key in ("ED", "ES"):
        if not info.get(key, "").isdigit():
            raise ValueError(f"{path} has no valid '{key}: <frame number>' line (got "
                             f"{info.get(key)!r}); expected lines like 'ED: 1' and 'ES: 12'. "
                             "Re-extract the ACDC archive.")
    return info


@dataclasses.dataclass(frozen=True)
class AcdcDataset(Dataset):
    """ACDC facts and reader. Every field has the ACDC default, so a subclass (the synthetic
    cardiac dataset, written in the same layout) overrides only what differs."""

    name: str = "acdc"
    modalities: tuple[str, ...] = ("cine_mr",)
    class_names: tuple[str, ...] = ("background", "rv", "myocardium", "lv")
    label_values: tuple[int, ...] = (0, 1, 2, 3)
    spatial_dims: int = 2
    # In-plane spacing and crop of the task-driven augmentation paper's code.
    target_spacing_xy: tuple[float, float] | None = (1.367516, 1.367516)
    crop_size_yx: tuple[int, int] | None = (224, 224)
    n4_shrink: int = 4
    published_splits: Mapping[str, Mapping[str, Sequence[str]]] = dataclasses.field(
        default_factory=lambda: PUBLISHED_SPLITS)
    default_split: str | None = "tr1_c1"
    phase: str = "ES"

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ValueError(f"Unknown ACDC phase {self.phase!r}; expected one of "
                             f"{', '.join(PHASES)} (e.g. --phase=ES).")

    def options(self) -> dict[str, Any]:
        return {"phase": self.phase}

    def _parts(self, folder: str) -> list[tuple[str, str]]:
        """(part name, folder holding patientNNN folders) pairs found under `folder`."""
        for root in (folder, os.path.join(folder, "database")):
            parts = [(name, os.path.join(root, name)) for name in ("training", "testing")
                     if os.path.isdir(os.path.join(root, name))]
            if parts:
                return parts
        if any(_PATIENT.match(n) for n in _layout.subfolders(folder)):
            # --data_dir points at training/ or testing/ itself.
            return [(os.path.basename(folder), folder)]
        raise _layout.layout_error(self.name, folder, _EXPECTED,
                                   "found neither training/ nor testing/")

    def list_subjects(self, data_dir: str, **options: Any) -> list[Subject]:
        """Lists one subject per patient and phase (two per patient for phase="both").

        Args:
          data_dir: the ACDC folder (holding training/ and/or testing/).
          **options: `phase` overrides the dataset's phase for this call.

        Raises:
          ValueError: naming the folder for an empty folder or another layout, or naming the
            Info.cfg that is missing or malformed.
        """
        phase = _layout.merge_options(self.options(), options, self.name)["phase"]
        if phase not in PHASES:
            raise ValueError(f"Unknown ACDC phase {phase!r}; expected one of {', '.join(PHASES)}.")
        folder = _layout.check_data_dir(data_dir, self.name, _EXPECTED)
        phases = ("ED", "ES") if phase == "both" else (phase,)
        subjects = []
        for part, part_dir in self._parts(folder):
            for patient in (n for n in _layout.subfolders(part_dir) if _PATIENT.match(n)):
                patient_dir = os.path.join(part_dir, patient)
                info = parse_info_cfg(os.path.join(patient_dir, "Info.cfg"))
                for which in phases:
                    subjects.append(self._subject(patient, patient_dir, part, info, which))
        if not subjects:
            raise _layout.layout_error(self.name, folder, _EXPECTED,
                                       "no patientNNN folders were found")
        return subjects

    def _subject(self, patient: str, patient_dir: str, part: str, info: Mapping[str, str],
                 phase: str) -> Subject:
        frame = int(info[phase])
        stem = os.path.join(patient_dir, f"{patient}_frame{frame:02d}")
        label = stem + "_gt.nii.gz"
        # Training ground truth is part of the release: expected even when absent (reported
        # later); testing ground truth is optional (the unlabeled cases).
        if not os.path.isfile(label) and part != "training":
            label = None
        return Subject(subject_id=f"{patient}_{phase}", patient_id=patient,
                       image_paths=(stem + ".nii.gz",), label_path=label,
                       extra={"phase": phase, "frame": frame, "group": info.get("Group", "")})


def make_dataset(phase: str = "ES") -> AcdcDataset:
    """The ACDC dataset reading the `phase` frames ("ES", "ED" or "both").

    Raises:
      ValueError: for an unknown phase.
    """
    return AcdcDataset(phase=phase)
