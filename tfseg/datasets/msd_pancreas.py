"""Medical Segmentation Decathlon Task07 Pancreas: portal-venous CT, pancreas (+ tumour).

Layout as shipped (--data_dir = Task07_Pancreas or its parent):

    Task07_Pancreas/dataset.json
    Task07_Pancreas/imagesTr/pancreas_NNN.nii.gz   3D CT in Hounsfield units
    Task07_Pancreas/labelsTr/pancreas_NNN.nii.gz   0 bg, 1 pancreas, 2 tumour
    Task07_Pancreas/imagesTs/pancreas_NNN.nii.gz   no labels: the unlabeled cases

Pancreas and tumour are merged into one foreground class (label_map {0: 0, 1: 1, 2: 1}), so
predictions are written back as 1. Processed as 2D axial slices at 0.8×0.8 mm, cropped to
320×320 as in the paper. CT intensities are clipped to a soft-tissue abdominal window of
[-100, 240] HU before percentile scaling: pancreas and tumour enhance well inside it, fat sits at
its lower edge, and bone and air (which would otherwise dominate the percentiles) are clipped.
No N4: there is no receive-coil bias in CT and N4 would distort Hounsfield units.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from tfseg.datasets import _layout
from tfseg.datasets.base import Dataset, Subject


@dataclasses.dataclass(frozen=True)
class MsdPancreasDataset(Dataset):
    """MSD pancreas facts and reader."""

    name: str = "msd_pancreas"
    modalities: tuple[str, ...] = ("CT",)
    class_names: tuple[str, ...] = ("background", "pancreas")
    label_values: tuple[int, ...] = (0, 1)
    spatial_dims: int = 2
    label_map: Mapping[int, int] | None = dataclasses.field(
        default_factory=lambda: {0: 0, 1: 1, 2: 1})
    target_spacing_xy: tuple[float, float] | None = (0.8, 0.8)
    crop_size_yx: tuple[int, int] | None = (320, 320)
    intensity_window: tuple[float, float] | None = (-100.0, 240.0)
    n4_shrink: int = 2
    n4_default: bool = False

    def list_subjects(self, data_dir: str, **options: Any) -> list[Subject]:
        """Lists imagesTr (labeled) and imagesTs (unlabeled) cases.

        Raises:
          ValueError: naming the folder for an empty folder or another layout.
        """
        _layout.merge_options({}, options, self.name)
        return _layout.msd_subjects(data_dir, self.name, "Task07_Pancreas", "pancreas",
                                    num_channels=1)


DATASET = MsdPancreasDataset()
