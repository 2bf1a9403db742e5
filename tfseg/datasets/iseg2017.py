"""iSEG-2017 (6-month infant brain MRI segmentation challenge): T1 + T2, CSF / GM / WM.

Layout as shipped (Analyze 7.5 .hdr/.img pairs, 144×192×256 at 1 mm):

    iSeg-2017-Training/subject-N-T1.hdr|.img, subject-N-T2..., subject-N-label...   N = 1..10
    iSeg-2017-Testing/subject-N-T1..., subject-N-T2...                            N = 11..23

--data_dir may be the parent of those folders or one of them. The label files store 0 (bg),
10 (CSF), 150 (GM), 250 (WM); they are remapped to classes 0..3 (the few-shot GAN reference code
did not remap and so trained on what it took for all-background). Analyze headers carry no
reliable orientation, so geometry checks must ignore the direction cosines.

Missing files: a subject whose T1, T2 or (training) label is absent is listed with the expected
path, so preprocessing reports it (see `_layout`).
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Mapping, Sequence

from tfseg.datasets import _layout
from tfseg.datasets.base import Dataset, Subject

TRAINING_FOLDER = "iSeg-2017-Training"
TESTING_FOLDER = "iSeg-2017-Testing"
_EXPECTED = (f"{TRAINING_FOLDER}/subject-N-{{T1,T2,label}}.hdr/.img and/or "
             f"{TESTING_FOLDER}/subject-N-{{T1,T2}}.hdr/.img")
_FILE = re.compile(r"^subject-(\d+)-(T1|T2|label)\.(hdr|img)(\.gz)?$")


def _subjects(*numbers: int) -> list[str]:
    return _layout.numbered("subject-", numbers)


def _fewshot(num_labeled: int) -> dict[str, list[str]]:
    """Few-shot GAN protocol: train 1..n, val n+1, test the next 7, unlabeled = testing set."""
    return {"labeled": _subjects(*range(1, num_labeled + 1)),
            "unlabeled": _subjects(*range(11, 24)),
            "val": _subjects(num_labeled + 1),
            "test": _subjects(*range(num_labeled + 2, num_labeled + 9))}


# Written out as published facts (not derived from the files present).
PUBLISHED_SPLITS: dict[str, dict[str, list[str]]] = {
    "fewshot_n1": _fewshot(1),   # labeled 1, val 2, test 3..9
    "fewshot_n2": _fewshot(2),   # labeled 1-2, val 3, test 4..10
}


@dataclasses.dataclass(frozen=True)
class ISegDataset(Dataset):
    """iSEG-2017 facts and reader; every field defaults to iSEG, so subclasses (the synthetic
    brain dataset, written in the same layout) override only what differs."""

    name: str = "iseg2017"
    modalities: tuple[str, ...] = ("T1", "T2")
    class_names: tuple[str, ...] = ("background", "csf", "gm", "wm")
    label_values: tuple[int, ...] = (0, 10, 150, 250)
    spatial_dims: int = 3
    patch_size_zyx: tuple[int, int, int] | None = (32, 32, 32)
    patch_stride_zyx: tuple[int, int, int] | None = (8, 8, 8)
    # Reference code: a labeled patch is kept when more than 6000 of its 32³ voxels are brain.
    min_foreground_fraction: float = 6000 / 32768
    n4_shrink: int = 4
    published_splits: Mapping[str, Mapping[str, Sequence[str]]] = dataclasses.field(
        default_factory=lambda: PUBLISHED_SPLITS)
    default_split: str | None = "fewshot_n1"
    orientation_reliable: bool = False

    def _parts(self, folder: str) -> list[tuple[str, bool | None]]:
        """(folder, labels expected?) pairs; None = labeled only where a label file exists."""
        parts = [(os.path.join(folder, name), name == TRAINING_FOLDER)
                 for name in (TRAINING_FOLDER, TESTING_FOLDER)
                 if os.path.isdir(os.path.join(folder, name))]
        if parts:
            return parts
        if any(_FILE.match(n) for n in _layout.visible_entries(folder)):
            base = os.path.basename(folder)
            expected = {TRAINING_FOLDER: True, TESTING_FOLDER: False}.get(base)
            return [(folder, expected)]
        raise _layout.layout_error(self.name, folder, _EXPECTED,
                                   "found no subject-N-T1.hdr files or iSeg-2017-* folders")

    def list_subjects(self, data_dir: str, **options: Any) -> list[Subject]:
        """Lists the training (labeled) and testing (unlabeled) subjects.

        Raises:
          ValueError: naming the folder for an empty folder or another layout.
        """
        _layout.merge_options({}, options, self.name)
        folder = _layout.check_data_dir(data_dir, self.name, _EXPECTED)
        subjects = []
        for part_dir, labels_expected in self._parts(folder):
            numbers = sorted({int(m.group(1)) for m in map(_FILE.match,
                              _layout.visible_entries(part_dir)) if m})
            for number in numbers:
                subjects.append(self._subject(part_dir, number, labels_expected))
        if not subjects:
            raise _layout.layout_error(self.name, folder, _EXPECTED,
                                       "no subject-N-*.hdr files were found")
        return subjects

    def _subject(self, part_dir: str, number: int, labels_expected: bool | None) -> Subject:
        def path(kind: str) -> str:
            stem = f"subject-{number}-{kind}"
            # The .hdr names the pair (either member reads); a gzipped pair is also accepted.
            return (_layout.find_file(part_dir, stem, (".hdr", ".img", ".hdr.gz", ".img.gz"))
                    or os.path.join(part_dir, stem + ".hdr"))

        label = path("label")
        if labels_expected is False or (labels_expected is None and not os.path.isfile(label)):
            label = None
        subject_id = f"subject-{number}"
        return Subject(subject_id=subject_id, patient_id=subject_id,
                       image_paths=tuple(path(m) for m in self.modalities), label_path=label)


DATASET = ISegDataset()
