"""Medical Segmentation Decathlon Task05 Prostate: multi-parametric MR, PZ and TZ zones.

Layout as shipped (--data_dir = Task05_Prostate or its parent):

    Task05_Prostate/dataset.json
    Task05_Prostate/imagesTr/prostate_NN.nii.gz   4D: channel 0 = T2, channel 1 = ADC
    Task05_Prostate/labelsTr/prostate_NN.nii.gz   0 bg, 1 PZ (peripheral zone), 2 TZ
    Task05_Prostate/imagesTs/prostate_NN.nii.gz   no labels: the unlabeled cases

The task-driven augmentation paper uses T2 only (the default) at 0.6×0.6 mm in-plane, cropped to
224×224; `make_dataset(use_adc=True)` adds ADC as a second channel. Both channels come from the
same 4D file (`Subject.channel_indices`). A training case whose label is missing is listed with
its expected path, so preprocessing reports it.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from tfseg.datasets import _layout
from tfseg.datasets.base import Dataset, Subject


@dataclasses.dataclass(frozen=True)
class MsdProstateDataset(Dataset):
    """MSD prostate facts and reader."""

    name: str = "msd_prostate"
    modalities: tuple[str, ...] = ("T2",)
    class_names: tuple[str, ...] = ("background", "pz", "tz")
    label_values: tuple[int, ...] = (0, 1, 2)
    spatial_dims: int = 2
    target_spacing_xy: tuple[float, float] | None = (0.6, 0.6)
    crop_size_yx: tuple[int, int] | None = (224, 224)
    n4_shrink: int = 2

    @property
    def channel_indices(self) -> tuple[int, ...]:
        """Channel of the 4D file per modality: T2 is channel 0, ADC channel 1."""
        return tuple({"T2": 0, "ADC": 1}[m] for m in self.modalities)

    def options(self) -> dict[str, Any]:
        return {"use_adc": "ADC" in self.modalities}

    def list_subjects(self, data_dir: str, **options: Any) -> list[Subject]:
        """Lists imagesTr (labeled) and imagesTs (unlabeled) cases.

        Raises:
          ValueError: naming the folder for an empty folder or another layout.
        """
        _layout.merge_options({}, options, self.name)
        return _layout.msd_subjects(data_dir, self.name, "Task05_Prostate", "prostate",
                                    num_channels=len(self.modalities),
                                    channel_indices=self.channel_indices)


def make_dataset(use_adc: bool = False) -> MsdProstateDataset:
    """MSD prostate with T2 only (default, as in the paper) or T2 + ADC."""
    if not isinstance(use_adc, bool):
        raise ValueError(f"use_adc must be True or False, got {use_adc!r}.")
    return MsdProstateDataset(modalities=("T2", "ADC") if use_adc else ("T2",))
