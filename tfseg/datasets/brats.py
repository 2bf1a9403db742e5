"""BraTS (Multimodal Brain Tumor Segmentation challenge): glioma MR, four co-registered,
skull-stripped modalities on a 1 mm isotropic 240 x 240 x 155 grid.

Layouts read (as unpacked; `--data_dir` may point at the release folder or at HGG/ or LGG/):
    BraTS 2018   {HGG,LGG}/Brats18_<institution>_<case>_1/Brats18_..._{t1,t1ce,t2,flair,seg}.nii.gz
    BraTS 2019   {HGG,LGG}/BraTS19_<...>/BraTS19_<...>_{t1,t1ce,t2,flair,seg}.nii.gz
    BraTS 2020   BraTS20_Training_NNN/BraTS20_Training_NNN_{t1,t1ce,t2,flair,seg}.nii.gz
    BraTS 2021   BraTS2021_NNNNN/BraTS2021_NNNNN_{t1,t1ce,t2,flair,seg}.nii.gz
A case folder is any folder holding `<folder name>_t1.nii.gz`; a case without `_seg` (a
validation-set download) is unlabeled. The 2013/2015 `.mha` releases are not read yet.

Labels (2017 onwards): 0 background, 1 necrotic and non-enhancing tumour core, 2 peritumoral
oedema, 4 GD-enhancing tumour (value 3 is unused). Targets (`target` option):
- "regions" (default): the challenge's evaluation regions, which overlap, predicted with one
  sigmoid each: whole tumour {1, 2, 4}, tumour core {1, 4}, enhancing tumour {4}. Painted back
  into a label map in that order: whole tumour -> 2, core -> 1, enhancing -> 4.
- "binary": tumour (1, 2, 4) against background; predictions are written as 1.
`modalities` picks and orders the input channels, e.g. "t1ce,t2,flair".

Default geometry: axial 2D slices, resampled to 1 mm in-plane and centre-cropped to 192 x 192
(the brain fits; the 240 x 240 frame is mostly background).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

from tfseg.datasets import _layout
from tfseg.datasets.base import Dataset, Subject

MODALITIES = ("t1", "t1ce", "t2", "flair")
TARGETS = ("regions", "binary")
LABEL_VALUES = (0, 1, 2, 4)
CLASS_NAMES = ("background", "necrotic_core", "oedema", "enhancing")
REGIONS = (("whole_tumour", (1, 2, 4)), ("tumour_core", (1, 4)), ("enhancing_tumour", (4,)))
_EXPECTED = ("{HGG,LGG}/<case>/<case>_{t1,t1ce,t2,flair}.nii.gz [+ <case>_seg.nii.gz] "
             "(BraTS 2018/2019), or <case>/<case>_*.nii.gz (BraTS 2020/2021)")


def _parse_modalities(text: str | tuple[str, ...]) -> tuple[str, ...]:
    names = tuple(p.strip().lower() for p in (text.split(",") if isinstance(text, str) else text)
                  if p.strip())
    bad = [n for n in names if n not in MODALITIES]
    if not names or bad or len(set(names)) != len(names):
        raise ValueError(f"BraTS modalities {text!r}: choose distinct names among "
                         f"{', '.join(MODALITIES)}, comma-separated (e.g. t1ce,t2,flair).")
    return names


@dataclasses.dataclass(frozen=True)
class BratsDataset(Dataset):
    """BraTS facts and reader; `target` and `modalities` are dataset options."""

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

    def options(self) -> dict[str, Any]:
        return {"target": self.target, "modalities": ",".join(self.modalities)}

    def list_subjects(self, data_dir: str, **options: Any) -> list[Subject]:
        """One subject per case folder found under `data_dir` (two levels deep at most).

        Raises:
          ValueError: naming the folder when it holds no BraTS case folder.
        """
        merged = _layout.merge_options(self.options(), options, self.name)
        modalities = _parse_modalities(merged["modalities"])
        folder = _layout.check_data_dir(data_dir, self.name, _EXPECTED)
        subjects = [self._subject(case_dir, modalities) for case_dir in _case_folders(folder)]
        if not subjects:
            raise _layout.layout_error(self.name, folder, _EXPECTED,
                                       "no folder holds a <folder name>_t1.nii.gz")
        return subjects

    def _subject(self, case_dir: str, modalities: tuple[str, ...]) -> Subject:
        case = os.path.basename(case_dir)
        label = os.path.join(case_dir, f"{case}_seg.nii.gz")
        grade = os.path.basename(os.path.dirname(case_dir))
        return Subject(subject_id=case, patient_id=case,
                       image_paths=tuple(os.path.join(case_dir, f"{case}_{m}.nii.gz")
                                         for m in modalities),
                       label_path=label if os.path.isfile(label) else None,
                       extra={"grade": grade if grade in ("HGG", "LGG") else ""})


def _case_folders(folder: str) -> list[str]:
    """Folders named like their files (`<name>/<name>_t1.nii.gz`), at depth 0, 1 or 2."""
    def is_case(path: str) -> bool:
        return os.path.isfile(os.path.join(path, f"{os.path.basename(path)}_t1.nii.gz"))

    if is_case(folder):
        return [folder]
    found = []
    for name in _layout.subfolders(folder):
        child = os.path.join(folder, name)
        if is_case(child):
            found.append(child)
            continue
        found += [os.path.join(child, n) for n in _layout.subfolders(child)
                  if is_case(os.path.join(child, n))]
    return sorted(found, key=lambda p: _layout.natural_key(os.path.basename(p)))


def make_dataset(target: str = "regions",
                 modalities: str | tuple[str, ...] = MODALITIES) -> BratsDataset:
    """BraTS with the given targets ("regions" or "binary") and input modalities.

    Raises:
      ValueError: for an unknown target or modality.
    """
    if target not in TARGETS:
        raise ValueError(f"Unknown BraTS target {target!r}; choose one of {', '.join(TARGETS)}.")
    modalities = _parse_modalities(modalities)
    if target == "binary":
        return BratsDataset(modalities=modalities, class_names=("background", "tumour"),
                            label_values=(0, 1), label_map={0: 0, 1: 1, 2: 1, 4: 1},
                            regions=(), target=target)
    return BratsDataset(modalities=modalities, target=target)
