"""Helpers shared by the dataset modules: folder checks, layout errors, file lookup, id ranges.

Policy for missing files (all real-dataset modules follow it): a subject whose folder or naming
shows it exists is listed even when one of its files is missing, with the path where that file
was expected. Preprocessing then reports "missing modality <path>" (or the missing label) for
that one subject and skips it, instead of the subject silently vanishing from the dataset.
"""
from __future__ import annotations

import os
import re
from typing import Any, Iterable, Mapping, Sequence

from tfseg.datasets.base import Subject


def layout_error(dataset: str, folder: str, expected: str, problem: str = "") -> ValueError:
    """A ValueError naming the folder, what layout was expected and how to fix it."""
    problem = f" ({problem})" if problem else ""
    return ValueError(
        f"{folder} does not look like the {dataset} dataset{problem}: expected {expected}. "
        f"Point --data_dir at the {dataset} folder exactly as downloaded and unpacked, and check "
        "that --dataset names the dataset stored there.")


def check_data_dir(data_dir: str, dataset: str, expected: str) -> str:
    """Returns `data_dir` as an absolute path after checking it is a non-empty folder.

    Raises:
      ValueError: naming the folder if it is missing, not a folder, or empty.
    """
    if not data_dir:
        raise ValueError(f"No data folder given for dataset {dataset!r}: expected {expected}. "
                         "Pass --data_dir.")
    folder = os.path.abspath(os.fspath(data_dir))
    if not os.path.isdir(folder):
        raise ValueError(f"Data folder {folder} for dataset {dataset!r} does not exist or is not "
                         f"a folder: expected {expected}. Check --data_dir.")
    if not visible_entries(folder):
        raise layout_error(dataset, folder, expected, "the folder is empty")
    return folder


def visible_entries(folder: str) -> list[str]:
    """Sorted names in `folder`, skipping hidden files (incl. macOS "._" AppleDouble files)."""
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    return sorted((n for n in names if not n.startswith(".")), key=natural_key)


def subfolders(folder: str) -> list[str]:
    return [n for n in visible_entries(folder) if os.path.isdir(os.path.join(folder, n))]


def natural_key(name: str) -> tuple[Any, ...]:
    """Sort key that orders "subject-2" before "subject-10"."""
    return tuple(int(part) if part.isdigit() else part.lower()
                 for part in re.split(r"(\d+)", name))


def find_file(folder: str, stem: str, extensions: Sequence[str]) -> str | None:
    """The first existing `folder/stem + ext` over `extensions`, or None."""
    for ext in extensions:
        path = os.path.join(folder, stem + ext)
        if os.path.isfile(path):
            return path
    return None


def extension_of(path: str, extensions: Sequence[str]) -> str:
    """The longest of `extensions` that `path` ends with (".nii.gz" wins over ".gz")."""
    return max((ext for ext in extensions if path.endswith(ext)), key=len, default="")


def merge_options(defaults: Mapping[str, Any], options: Mapping[str, Any], dataset: str
                  ) -> dict[str, Any]:
    """`defaults` updated by `options`; unknown option names are an error.

    Raises:
      ValueError: naming the unknown options and the accepted ones.
    """
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        accepted = ", ".join(sorted(defaults)) or "none"
        raise ValueError(f"Dataset {dataset!r} got unknown options {unknown}; accepted: "
                         f"{accepted}.")
    return {**defaults, **options}


def numbered(prefix: str, numbers: Iterable[int], width: int = 0) -> list[str]:
    """["patient002", ...] from prefix "patient", numbers (2, ...) and zero-padding width 3."""
    return [f"{prefix}{n:0{width}d}" if width else f"{prefix}{n}" for n in numbers]


def spans(*ranges: tuple[int, int]) -> list[int]:
    """Inclusive ranges flattened: spans((16, 20), (36, 40)) -> [16, ..., 20, 36, ..., 40]."""
    return [n for low, high in ranges for n in range(low, high + 1)]


def msd_subjects(data_dir: str, dataset: str, task_folder: str, case_prefix: str,
                 num_channels: int, channel_indices: tuple[int, ...] | None = None
                 ) -> list[Subject]:
    """Subjects of a Medical Segmentation Decathlon task folder as shipped.

    Layout: `TaskNN_Name/{dataset.json, imagesTr/<prefix>_NN.nii.gz, labelsTr/<same name>,
    imagesTs/<prefix>_NN.nii.gz}`; `data_dir` is the task folder or its parent. imagesTr cases
    are labeled (a missing label is listed with its expected path), imagesTs cases unlabeled.
    macOS "._" files shipped in the tarballs are ignored.

    Args:
      data_dir: the task folder or its parent.
      dataset: the dataset key, for messages.
      task_folder: e.g. "Task05_Prostate".
      case_prefix: e.g. "prostate".
      num_channels: modalities read per case (each from the same file).
      channel_indices: the channel of the (4D) file per modality; None for 3D files.

    Raises:
      ValueError: naming the folder if it is empty or not this task's layout.
    """
    expected = f"{task_folder}/imagesTr/{case_prefix}_NN.nii.gz (and labelsTr/, imagesTs/)"
    folder = check_data_dir(data_dir, dataset, expected)
    root = next((r for r in (folder, os.path.join(folder, task_folder))
                 if os.path.isdir(os.path.join(r, "imagesTr"))), None)
    if root is None:
        raise layout_error(dataset, folder, expected, "found no imagesTr/ folder")
    case = re.compile(rf"^{re.escape(case_prefix)}_\d+\.nii\.gz$")
    subjects = []
    for source in ("imagesTr", "imagesTs"):
        for name in (n for n in visible_entries(os.path.join(root, source)) if case.match(n)):
            case_id = name[: -len(".nii.gz")]
            label = os.path.join(root, "labelsTr", name) if source == "imagesTr" else None
            subjects.append(Subject(
                subject_id=case_id, patient_id=case_id,
                image_paths=(os.path.join(root, source, name),) * num_channels,
                label_path=label, channel_indices=channel_indices, extra={"source": source}))
    if not any(s.labeled for s in subjects):
        raise layout_error(dataset, root, expected,
                           f"imagesTr/ holds no {case_prefix}_NN.nii.gz files")
    return subjects
