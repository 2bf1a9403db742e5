"""What every dataset module declares: the facts of a public dataset and how to list its subjects.

A dataset module in `tfseg/datasets/<name>.py` exposes `DATASET`, an instance of a `Dataset`
subclass whose `list_subjects(data_dir)` walks the folder exactly as the challenge ships it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence


@dataclasses.dataclass(frozen=True)
class Subject:
    """One case to preprocess.

    Attributes:
      subject_id: unique id of the case, used as shard name (e.g. "patient001_ES").
      patient_id: the patient it belongs to; splits are drawn over patient ids, never slices.
      image_paths: one path per modality, in `Dataset.modalities` order. A path may be a DICOM
        series folder. For multi-channel files (MSD 4D NIfTI) the same path may repeat, with
        `channel_indices` telling which channel each modality is.
      label_path: the label file, or None for an unlabeled case.
      channel_indices: per modality, the channel to take from a multi-channel file (None: scalar).
      extra: anything else worth recording (phase, frame number, domain…).
    """

    subject_id: str
    patient_id: str
    image_paths: tuple[str, ...]
    label_path: str | None = None
    channel_indices: tuple[int | None, ...] | None = None
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def labeled(self) -> bool:
        return self.label_path is not None


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Facts about a dataset. Subclasses implement `list_subjects`.

    Attributes:
      name: the `--dataset` key (module name).
      modalities: channel names in order.
      class_names: class index -> name; index 0 is background.
      label_values: class index -> the value written in the dataset's label files (used to map
        predictions back to the original label values).
      label_map: raw file value -> class index. Values absent from it are an error. Defaults to
        the inverse of `label_values`; a dataset merging classes (MSD pancreas) overrides it.
      spatial_dims: 2 = processed as in-plane slices; 3 = processed as volumes and 3D patches.
      target_spacing_xy: 2D datasets: in-plane spacing in mm after resampling (x, y).
      crop_size_yx: 2D datasets: centre crop/pad size after resampling (rows, cols).
      patch_size_zyx / patch_stride_zyx: 3D datasets: training patch size and grid stride.
      min_foreground_fraction: 3D labeled patches are kept if their non-background fraction is
        above this (reference code: 6000 / 32768).
      intensity_window: CT: (low, high) HU clipped before percentile scaling; None for MR.
      n4_shrink: shrink factor of the N4 fit (4 for 3D, 2 for 2D by default).
      published_splits: split name -> {"labeled", "unlabeled", "val", "test"} patient-id lists.
      default_split: the published split used when the user asks for none (may be None).
      orientation_reliable: False where the header's direction cosines are untrustworthy
        (Analyze); geometry checks then ignore direction.
      n4_default: whether N4 bias correction applies by default (False for CT: N4 models an MR
        receive-coil bias and would distort Hounsfield units).
      content_version: generated datasets: the generator's version, part of the preprocessing
        fingerprint so records of an older generation are never reused; None for real data.
      regions: region targets, (name, label values) in painting order (outermost first), e.g.
        BraTS (("whole_tumour", (1, 2, 4)), ("tumour_core", (1, 4)), ("enhancing_tumour", (4,))).
        Empty (the default): the classes are the targets. Regions may overlap; a model predicts
        one sigmoid per region, and evaluation scores every region (`tfseg.data.spec`).
      region_paint: per region, the label value painted for it when a label map is built back
        from region predictions; None = `tfseg.data.spec.default_paint` (the smallest value of
        the region that no later region holds).
      Training protocol (2D; how training examples are drawn from the records, never what is
      evaluated: evaluation always predicts every slice of the whole volume):
      train_crop_yx: random (rows, cols) crops of each training slice (labeled, unlabeled and
        target streams); the network then runs fully convolutionally on the whole `crop_size_yx`
        slice at validation, evaluation and prediction (SegAN: 160 x 160 crops of 180 x 180).
      train_slices: only the `train_slices` central slices along z of each subject train
        (SegAN: 128 of BraTS's 155); None = all slices.
      labeled_slices_per_subject / unlabeled_slices_per_subject: keep only this many slices per
        subject in the labeled / unlabeled stream, drawn with the split seed (labeled: among the
        slices whose label has foreground; unlabeled: among slices with image content); None =
        every slice (DMNet: one labeled and two unlabeled slices per patient).
      slice_axis_zyx: the axis of the (z, y, x) arrays read from the files along which the
        slices lie; preprocessing swaps it with axis 0 (images, label and geometry) and
        `restore_geometry` swaps it back, so predictions keep the files' voxel order. 0 (the
        default) = the files' own z; KiTS19 stores its axial slices along the files' x (2).
    """

    name: str
    modalities: tuple[str, ...]
    class_names: tuple[str, ...]
    label_values: tuple[int, ...]
    spatial_dims: int
    label_map: Mapping[int, int] | None = None
    target_spacing_xy: tuple[float, float] | None = None
    crop_size_yx: tuple[int, int] | None = None
    patch_size_zyx: tuple[int, int, int] | None = None
    patch_stride_zyx: tuple[int, int, int] | None = None
    min_foreground_fraction: float = 0.0
    intensity_window: tuple[float, float] | None = None
    n4_shrink: int = 4
    published_splits: Mapping[str, Mapping[str, Sequence[str]]] = dataclasses.field(
        default_factory=dict)
    default_split: str | None = None
    orientation_reliable: bool = True
    n4_default: bool = True
    content_version: int | None = None
    regions: tuple[tuple[str, tuple[int, ...]], ...] = ()
    region_paint: tuple[int, ...] | None = None
    train_crop_yx: tuple[int, int] | None = None
    train_slices: int | None = None
    labeled_slices_per_subject: int | None = None
    unlabeled_slices_per_subject: int | None = None
    slice_axis_zyx: int = 0

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_channels(self) -> int:
        return len(self.modalities)

    def raw_to_class(self) -> dict[int, int]:
        """Raw label value -> class index."""
        if self.label_map is not None:
            return dict(self.label_map)
        return {int(v): i for i, v in enumerate(self.label_values)}

    def prepare(self, data_dir: str | None) -> str:
        """Returns the folder to read. Synthetic datasets generate themselves here.

        Raises:
          ValueError: if `data_dir` is required and missing.
        """
        if not data_dir:
            raise ValueError(f"--data_dir is required for dataset {self.name!r}: point it at the "
                             "folder as downloaded and unpacked.")
        return data_dir

    def resolve(self, data_dir: str) -> "Dataset":
        """Returns the dataset with the facts that depend on the data folder filled in.

        Fixed public datasets return themselves; `folder` reads `dataset.json` and the image
        headers there (modalities, classes, default spacing and crop). Call it on the folder
        returned by `prepare` before using the facts.

        Raises:
          ValueError: naming the folder if the facts cannot be read from it.
        """
        del data_dir  # the facts of a public dataset do not depend on where it is stored
        return self

    def list_subjects(self, data_dir: str, **options: Any) -> list[Subject]:
        """Lists every subject found under `data_dir`, labeled and unlabeled.

        Raises:
          ValueError: naming the folder and the expected layout when it is empty or not this
            dataset's layout.
        """
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        """Dataset-specific options that change which files are read (e.g. ACDC phase)."""
        return {}
