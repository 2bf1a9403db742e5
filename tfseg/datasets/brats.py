"""BraTS (Multimodal Brain Tumor Segmentation challenge): glioma MR, four co-registered,
skull-stripped modalities on a 1 mm isotropic 240 x 240 x 155 grid.

Releases read as unpacked (`--data_dir` = the release folder, a parent of it, or HGG/ / LGG/);
`resolve(data_dir)` detects which one from the files (both in one folder is an error):
- "2018" (BraTS 2017-2021, NIfTI, labels 0/1/2/4):
    2018  {HGG,LGG}/Brats18_<inst>_<case>_1/Brats18_..._{t1,t1ce,t2,flair,seg}.nii.gz
    2019  {HGG,LGG}/BraTS19_<...>/BraTS19_<...>_{t1,t1ce,t2,flair,seg}.nii.gz
    2020  BraTS20_Training_NNN/BraTS20_Training_NNN_{...}.nii.gz  (the Kaggle copy: `.nii`, and
          case 355's seg is named W39_1998.09.19_Segm.nii: a lone *_seg / *_Segm file is used)
    2021  BraTS2021_NNNNN/BraTS2021_NNNNN_{t1,t1ce,t2,flair,seg}.nii.gz
  A case folder holds `<folder name>_<modality>.nii[.gz]`; subject id = folder name.
- "2015" (BRATS 2013 and 2015, MetaImage, labels 0-4):
    2015  BRATS2015_Training/{HGG,LGG}/brats_{2013,tcia}_patNNN_NNNN/
              VSD.Brain.XX.O.MR_{Flair,T1,T1c,T2}.<id>/VSD.Brain.XX.O.MR_<mod>.<id>.mha
              VSD.Brain_3more.XX.O.OT.<id>/VSD.Brain_3more.XX.O.OT.<id>.mha  (LGG: _2more)
          BRATS2015_Testing/HGG_LGG/brats_.../ (no OT folder: unlabeled)
    2013  BRATS_2013_Training/Image_Data/{HG,LG}/NNNN/VSD.Brain.XX.O.MR_<mod>/...<id>.mha,
          ground truth VSD.Brain_{1,2,3}more.XX.XX.OT/VSD.Brain_3more.XX.XX.OT.<id>.mha
  Each modality and the ground truth sit in their own folder with one .mha (a bare .mha in the
  case folder is read too); the numeric <id>s differ per file. Modalities map Flair -> flair,
  T1 -> t1, T1c -> t1ce, T2 -> t2, so `modalities=t1ce,t2,flair` works for every release.
  Subject id = "<grade>_<case folder>" (HGG/LGG/HG/LG): HGG and LGG reuse case names
  (HGG/brats_2013_pat0013_1 and LGG/brats_2013_pat0013_1 are different patients). Patient id
  drops the scan suffix: the TCIA cases are longitudinal (brats_tcia_pat153_0002, _0109,
  _0165, ... are one patient), so splits keep a patient's scans together.
  Verified (2026-12) from the BRATS 2014/2015 SMIR page (blog.smir.ch/BRATS/Start2014: labels,
  int16 MHA) and public code reading these downloads (folder and file names, 220 HGG + 54 LGG
  in 2015, HGG_LGG testing folder, HG/LG + XX.XX.OT naming in 2013).
A case without ground truth is unlabeled (validation/testing downloads). When some cases of
a folder have ground truth and one does not, that one is listed with the expected path, so
preprocessing reports the missing file (a broken download), and a warning names it.

Labels and classes, per release (each keeps its own values so predictions are written back
in them; the region names and output channels are the same, so a model of one release runs on
the other, and the painted values 2/1/4 are valid in both):
- 2018: 0 background, 1 necrotic and non-enhancing core, 2 oedema, 4 enhancing (3 unused).
  Regions whole tumour {1, 2, 4}, tumour core {1, 4}, enhancing {4}.
- 2015: 0, 1 necrosis, 2 oedema, 3 non-enhancing tumour, 4 enhancing (five classes).
  Regions whole tumour {1, 2, 3, 4}, tumour core {1, 3, 4}, enhancing {4}.
Options: `target` "regions" (overlapping, one sigmoid each, painted whole -> 2, core -> 1,
enhancing -> 4), "binary" (tumour = any non-zero value, written as 1) or one region as a binary
task, "whole_tumour", "tumour_core" or "enhancing_tumour" (e.g. tumour core = labels 1 and 4 of
2018, 1, 3 and 4 of 2015; written as 1), which also matches a binary tumour label of another
dataset in domain adaptation (tfseg.data.domains.target_class_map); `modalities` picks and
orders the channels; `release` "auto" (the files decide; "2015"/"2018" only preset the facts
before `resolve`, which always follows the files); `protocol` (below). Explicit `target` /
`modalities` override the protocol's.

Protocols (axial 2D slices at 1 mm; evaluation always predicts whole volumes on the original
grid):
- "default": centre crop 192 x 192 (the brain fits; the 240 x 240 frame is mostly air).
- "segan": Xue et al., "SegAN: Adversarial Network with Multi-scale L1 Loss for Medical Image
  Segmentation", Neuroinformatics 2018 (BRATS 2015): centre crop 180 x 180 x 128 slices,
  random 160 x 160 training crops, three regions, T1c/T2/FLAIR.
- "dmnet": Fang & Li, "DMNet: Difference Minimization Network for Semi-supervised
  Segmentation in Medical Images", MICCAI 2020: whole 240 x 240 slices, binary tumour,
  T1/T1c/T2 as three channels, one labeled and two unlabeled slices per patient.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Mapping

from absl import logging

from tfseg.datasets import _layout
from tfseg.datasets.base import Dataset, Subject

MODALITIES = ("t1", "t1ce", "t2", "flair")
REGION_TARGETS = ("whole_tumour", "tumour_core", "enhancing_tumour")
TARGETS = ("regions", "binary", *REGION_TARGETS)
LABEL_VALUES = (0, 1, 2, 4)
CLASS_NAMES = ("background", "necrotic_core", "oedema", "enhancing")
REGIONS = (("whole_tumour", (1, 2, 4)), ("tumour_core", (1, 4)), ("enhancing_tumour", (4,)))
LABEL_VALUES_2015 = (0, 1, 2, 3, 4)
CLASS_NAMES_2015 = ("background", "necrosis", "oedema", "non_enhancing", "enhancing")
REGIONS_2015 = (("whole_tumour", (1, 2, 3, 4)), ("tumour_core", (1, 3, 4)),
                ("enhancing_tumour", (4,)))
RELEASES = ("auto", "2015", "2018")
_RELEASE_ALIASES = {"2013": "2015", "2017": "2018", "2019": "2018", "2020": "2018",
                    "2021": "2018"}
PROTOCOLS: dict[str, dict[str, Any]] = {
    "default": {"target": "regions", "modalities": MODALITIES, "crop_size_yx": (192, 192)},
    "segan": {"target": "regions", "modalities": ("t1ce", "t2", "flair"),
              "crop_size_yx": (180, 180), "train_crop_yx": (160, 160), "train_slices": 128},
    "dmnet": {"target": "binary", "modalities": ("t1", "t1ce", "t2"), "crop_size_yx": (240, 240),
              "labeled_slices_per_subject": 1, "unlabeled_slices_per_subject": 2},
}
VSD_NAMES = {"t1": "T1", "t1ce": "T1c", "t2": "T2", "flair": "Flair"}   # ours -> 2013/2015
GRADES = ("HGG", "LGG", "HG", "LG")
_NIFTI = (".nii.gz", ".nii")
_VSD_MR = re.compile(r"^VSD\.Brain\.XX\.O\.MR_([A-Za-z0-9]+)(?:\.\d+)?(?:\.mha)?$", re.I)
_VSD_OT = re.compile(r"^VSD\.Brain_\d+more\.XX\.(?:O|XX)\.OT(?:\.\d+)?(?:\.mha)?$", re.I)
_ODD_SEG = re.compile(r"_segm?\.nii(?:\.gz)?$", re.I)
_SCAN_SUFFIX = re.compile(r"^(brats_\w+?_pat\w+?)_\d+$", re.I)
_MAX_DEPTH = 4
_EXPECTED = ("BraTS 2017-2021: [HGG|LGG/]<case>/<case>_{t1,t1ce,t2,flair}.nii.gz [+ <case>_seg"
             ".nii.gz]; or BRATS 2013/2015: {HGG,LGG}/<case>/VSD.Brain.XX.O.MR_{Flair,T1,T1c,T2}"
             ".<id>/*.mha [+ VSD.Brain_*more.XX.O.OT.<id>/*.mha]")


def _parse_modalities(text: str | tuple[str, ...]) -> tuple[str, ...]:
    names = tuple(p.strip().lower() for p in (text.split(",") if isinstance(text, str) else text)
                  if p.strip())
    bad = [n for n in names if n not in MODALITIES]
    if not names or bad or len(set(names)) != len(names):
        raise ValueError(f"BraTS modalities {text!r}: choose distinct names among "
                         f"{', '.join(MODALITIES)}, comma-separated (e.g. t1ce,t2,flair).")
    return names


def label_facts(release: str, target: str) -> dict[str, Any]:
    """The class / label / region fields of `release` ("2015" or "2018") for `target`."""
    values = LABEL_VALUES_2015 if release == "2015" else LABEL_VALUES
    if target == "binary":
        return {"class_names": ("background", "tumour"), "label_values": (0, 1),
                "label_map": {v: int(v > 0) for v in values}, "regions": ()}
    if target in REGION_TARGETS:  # one region as a binary task, e.g. tumour core = {1, 4}
        inside = dict(REGIONS_2015 if release == "2015" else REGIONS)[target]
        return {"class_names": ("background", target), "label_values": (0, 1),
                "label_map": {v: int(v in inside) for v in values}, "regions": ()}
    if release == "2015":
        return {"class_names": CLASS_NAMES_2015, "label_values": LABEL_VALUES_2015,
                "label_map": None, "regions": REGIONS_2015}
    return {"class_names": CLASS_NAMES, "label_values": LABEL_VALUES, "label_map": None,
            "regions": REGIONS}


@dataclasses.dataclass(frozen=True)
class BratsDataset(Dataset):
    """BraTS facts and reader; `target`, `modalities`, `protocol`, `release` are options."""

    name: str = "brats"
    modalities: tuple[str, ...] = MODALITIES
    class_names: tuple[str, ...] = CLASS_NAMES
    label_values: tuple[int, ...] = LABEL_VALUES
    spatial_dims: int = 2
    target_spacing_xy: tuple[float, float] | None = (1.0, 1.0)
    crop_size_yx: tuple[int, int] | None = (192, 192)
    n4_shrink: int = 4
    regions: tuple[tuple[str, tuple[int, ...]], ...] = REGIONS
    target: str = "regions"
    protocol: str = "default"
    release: str = "auto"

    def options(self) -> dict[str, Any]:
        # protocol / release only when they differ from the defaults, so the records of the
        # default 2017-2021 reading keep their fingerprint.
        options: dict[str, Any] = {"target": self.target, "modalities": ",".join(self.modalities)}
        if self.protocol != "default":
            options["protocol"] = self.protocol
        if self.release == "2015":
            options["release"] = self.release
        return options

    def resolve(self, data_dir: str) -> "BratsDataset":
        """The dataset with the label facts of the release found under `data_dir`.

        Raises:
          ValueError: naming the folder if it is empty, holds no BraTS case, or mixes releases.
        """
        folder = _layout.check_data_dir(data_dir, self.name, _EXPECTED)
        release, _ = detect_release(folder, self.name)
        if self.release not in ("auto", release):
            logging.warning("%s holds the BraTS %s layout, not release=%s; the files decide.",
                            folder, _describe(release), self.release)
        return dataclasses.replace(self, release=release, **label_facts(release, self.target))

    def list_subjects(self, data_dir: str, **options: Any) -> list[Subject]:
        """One subject per case folder found under `data_dir` (four levels deep at most).

        Raises:
          ValueError: naming the folder when it is empty, holds no BraTS case folder or mixes
            the 2013/2015 and 2017-2021 layouts, or naming a case folder holding two copies of
            one scan.
        """
        merged = _layout.merge_options(self.options(), options, self.name)
        modalities = _parse_modalities(merged["modalities"])
        folder = _layout.check_data_dir(data_dir, self.name, _EXPECTED)
        release, cases = detect_release(folder, self.name)
        read = _nifti_case if release == "2018" else _vsd_case
        found = [(case, *read(case, modalities)) for case in cases]
        # A case without ground truth among cases with it is a broken download, not unlabeled.
        parents_with_labels = {os.path.dirname(c) for c, _, label, _ in found if label}
        subjects = []
        for case, images, label, expected_label in found:
            if label is None and os.path.dirname(case) in parents_with_labels:
                label = expected_label
                logging.warning("BraTS case %s has no ground truth although other cases of its "
                                "folder have one; expected %s (listed, so preprocessing reports "
                                "it).", case, label)
            subjects.append(_subject(case, images, label, release))
        return subjects


def _describe(release: str) -> str:
    return "2013/2015 (.mha)" if release == "2015" else "2017-2021 (NIfTI)"


def _case_kind(path: str) -> str | None:
    """"2018" for a NIfTI case folder, "2015" for a VSD .mha case folder, else None."""
    entries = _layout.visible_entries(path)
    stem = re.escape(os.path.basename(path))
    nifti = re.compile(rf"^{stem}_(?:t1|t1ce|t2|flair|seg)\.nii(?:\.gz)?$")
    if any(nifti.match(e) for e in entries):
        return "2018"
    if any(_VSD_MR.match(e) or _VSD_OT.match(e) for e in entries):
        return "2015"
    return None


def detect_release(folder: str, dataset: str = "brats") -> tuple[str, list[str]]:
    """The release ("2015" or "2018") of the case folders under `folder`, and those folders.

    Raises:
      ValueError: naming the folder if it holds no case folder or cases of both layouts.
    """
    found: dict[str, list[str]] = {"2015": [], "2018": []}

    def visit(path: str, depth: int) -> None:
        kind = _case_kind(path)
        if kind is not None:
            found[kind].append(path)
        elif depth < _MAX_DEPTH:
            for name in _layout.subfolders(path):
                visit(os.path.join(path, name), depth + 1)

    visit(folder, 0)
    if found["2015"] and found["2018"]:
        raise ValueError(
            f"{folder} mixes two BraTS releases: 2013/2015 .mha cases (e.g. {found['2015'][0]}) "
            f"and 2017-2021 NIfTI cases (e.g. {found['2018'][0]}), which label tumour "
            "differently. Point --data_dir at one release's folder.")
    release = "2015" if found["2015"] else "2018"
    if not found[release]:
        raise _layout.layout_error(
            dataset, folder, _EXPECTED,
            "no folder holds a <folder name>_t1.nii.gz or a VSD.Brain.XX.O.MR_* scan")
    return release, sorted(found[release],
                           key=lambda path: _layout.natural_key(os.path.relpath(path, folder)))


def _nifti_case(case_dir: str, modalities: tuple[str, ...]
                ) -> tuple[tuple[str, ...], str | None, str]:
    """(image paths, label path or None, expected label path) of a 2017-2021 case folder."""
    case = os.path.basename(case_dir)
    images = tuple(_layout.find_file(case_dir, f"{case}_{m}", _NIFTI)
                   or os.path.join(case_dir, f"{case}_{m}.nii.gz") for m in modalities)
    label = _layout.find_file(case_dir, f"{case}_seg", _NIFTI)
    if label is None:  # BraTS 2020 case 355: W39_1998.09.19_Segm.nii
        odd = [e for e in _layout.visible_entries(case_dir) if _ODD_SEG.search(e)]
        label = os.path.join(case_dir, odd[0]) if len(odd) == 1 else None
    return images, label, os.path.join(case_dir, f"{case}_seg.nii.gz")


def _vsd_case(case_dir: str, modalities: tuple[str, ...]
              ) -> tuple[tuple[str, ...], str | None, str]:
    """(image paths, label path or None, expected label path) of a 2013/2015 case folder.

    Raises:
      ValueError: naming the case folder if it holds two folders of one scan.
    """
    scans: dict[str, list[str]] = {}
    truths = []
    for entry in _layout.visible_entries(case_dir):
        match = _VSD_MR.match(entry)
        if match:
            scans.setdefault(match.group(1).lower(), []).append(entry)
        elif _VSD_OT.match(entry):
            truths.append(entry)
    images = []
    for modality in modalities:
        token = VSD_NAMES[modality]
        entries = scans.get(token.lower(), [])
        if len(entries) > 1:
            raise ValueError(f"{case_dir} holds {len(entries)} {token} scans ({', '.join(entries)})"
                             f"; expected one VSD.Brain.XX.O.MR_{token}.<id> per case. Remove "
                             "the extra copy.")
        folder = f"VSD.Brain.XX.O.MR_{token}.<id>"
        images.append(_mha(case_dir, entries[0]) if entries
                      else os.path.join(case_dir, folder, folder + ".mha"))
    if len(truths) > 1:
        raise ValueError(f"{case_dir} holds {len(truths)} ground-truth OT entries "
                         f"({', '.join(truths)}); expected one. Remove the extra copy.")
    expected = os.path.join(case_dir, "VSD.Brain_3more.XX.O.OT.<id>",
                            "VSD.Brain_3more.XX.O.OT.<id>.mha")
    return tuple(images), (_mha(case_dir, truths[0]) if truths else None), expected


def _mha(case_dir: str, entry: str) -> str:
    """The .mha file of a VSD entry: the entry itself, or the one .mha inside its folder.

    Raises:
      ValueError: naming the folder if it holds several .mha files.
    """
    path = os.path.join(case_dir, entry)
    if not os.path.isdir(path):
        return path
    files = [n for n in _layout.visible_entries(path) if n.lower().endswith(".mha")]
    if entry + ".mha" in files:
        return os.path.join(path, entry + ".mha")
    if len(files) > 1:
        raise ValueError(f"{path} holds {len(files)} .mha files ({', '.join(files)}); expected "
                         f"one ({entry}.mha). Remove the extra files.")
    # No .mha at all: the expected path, so preprocessing reports the missing file.
    return os.path.join(path, files[0] if files else entry + ".mha")


def _subject(case_dir: str, images: tuple[str, ...], label: str | None, release: str
             ) -> Subject:
    case = os.path.basename(case_dir)
    grade = os.path.basename(os.path.dirname(case_dir))
    grade = grade if grade in GRADES else ""
    subject_id = patient_id = case
    if release == "2015":
        match = _SCAN_SUFFIX.match(case)
        patient = match.group(1) if match else case
        subject_id = f"{grade}_{case}" if grade else case
        patient_id = f"{grade}_{patient}" if grade else patient
    return Subject(subject_id=subject_id, patient_id=patient_id, image_paths=images,
                   label_path=label, extra={"grade": grade, "release": release})


def make_dataset(target: str | None = None, modalities: str | tuple[str, ...] | None = None,
                 protocol: str = "default", release: str = "auto") -> BratsDataset:
    """BraTS with the given target, input modalities, slice protocol and release.

    Args:
      target: "regions", "binary" or a region ("whole_tumour", "tumour_core",
        "enhancing_tumour") as a binary task; None = the protocol's.
      modalities: e.g. "t1ce,t2,flair"; None = the protocol's.
      protocol: "default", "segan" or "dmnet" (module docstring).
      release: "auto" (the files decide in `resolve`), "2015" (also "2013") or "2018" (also
        "2017", "2019", "2020", "2021"): the facts before `resolve`.

    Raises:
      ValueError: for an unknown target, modality, protocol or release.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"Unknown BraTS protocol {protocol!r}; choose one of "
                         f"{', '.join(PROTOCOLS)}.")
    release = _RELEASE_ALIASES.get(str(release), str(release))
    if release not in RELEASES:
        raise ValueError(f"Unknown BraTS release {release!r}; choose auto, 2013, 2015, 2017, "
                         "2018, 2019, 2020 or 2021 (or leave it to the files: auto).")
    fields: Mapping[str, Any] = dict(PROTOCOLS[protocol])
    target = fields["target"] if target is None else target
    if target not in TARGETS:
        raise ValueError(f"Unknown BraTS target {target!r}; choose one of {', '.join(TARGETS)}.")
    geometry = {k: v for k, v in fields.items() if k not in ("target", "modalities")}
    return BratsDataset(
        modalities=_parse_modalities(fields["modalities"] if modalities is None else modalities),
        target=target, protocol=protocol, release=release, **geometry,
        **label_facts("2015" if release == "2015" else "2018", target))
