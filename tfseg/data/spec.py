"""What a model needs to know about the data: `DataSpec`, and the one definition of what a
prediction means for each kind of target (numpy, no TensorFlow).

Two kinds of target:

- **classes** (the default): mutually exclusive classes, class 0 = background. A network has K
  outputs with a softmax; the prediction is the argmax; background is not reported.
- **regions**: overlapping regions, each a set of label classes, e.g. BraTS whole tumour
  {necrosis, oedema, enhancing}, tumour core {necrosis, enhancing}, enhancing tumour
  {enhancing}. A network has R outputs with one sigmoid each; region r is predicted where its
  probability is >= 0.5; every region is reported.

The records always store the label classes (one index per voxel), so augmentation, the TFRecord
schema and the manifest are the same for both kinds; region masks are derived from the classes
with `region_table()` (training) or `target_masks()` (validation, evaluation).

A label map is built back from region probabilities by painting the regions in their declared
order (outermost first), each with its `region_paint` class: for BraTS, whole tumour paints
oedema, then tumour core paints necrosis, then enhancing tumour paints enhancing, so a voxel gets
the class of the innermost region predicted there. The class indices map to the dataset's label
values as for exclusive classes.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ["DataSpec", "REGION_THRESHOLD", "default_paint", "manifest_raw_to_class",
           "resolve_regions"]

# Region r is predicted where its sigmoid probability reaches this value.
REGION_THRESHOLD = 0.5


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """What a method needs to know about the data to build its networks.

    Attributes:
      spatial_dims: 2 (slices) or 3 (patches).
      num_channels: image channels (modalities).
      num_classes: label classes including background (index 0), as stored in the records.
      class_names: one name per class.
      example_shape: the spatial shape of one training example: (H, W) or the patch (D, H, W).
      region_names: region targets, in painting order (outermost first); empty = classes.
      region_classes: per region, the class indices it is made of.
      region_paint: per region, the class index painted for it when building a label map.
    """

    spatial_dims: int
    num_channels: int
    num_classes: int
    class_names: tuple[str, ...]
    example_shape: tuple[int, ...]
    region_names: tuple[str, ...] = ()
    region_classes: tuple[tuple[int, ...], ...] = ()
    region_paint: tuple[int, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "class_names", tuple(self.class_names))
        object.__setattr__(self, "example_shape", tuple(int(v) for v in self.example_shape))
        object.__setattr__(self, "region_names", tuple(self.region_names))
        object.__setattr__(self, "region_classes",
                           tuple(tuple(int(c) for c in r) for r in self.region_classes))
        object.__setattr__(self, "region_paint", tuple(int(c) for c in self.region_paint))
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"DataSpec.spatial_dims must be 2 or 3, got {self.spatial_dims!r}.")
        if len(self.example_shape) != self.spatial_dims:
            raise ValueError(f"DataSpec.example_shape {self.example_shape} must have "
                             f"{self.spatial_dims} entries (spatial_dims).")
        if len(self.class_names) != self.num_classes or self.num_classes < 2:
            raise ValueError(f"DataSpec: {self.num_classes} classes but class names "
                             f"{self.class_names}; need one name per class, at least 2 classes.")
        if self.num_channels < 1:
            raise ValueError(f"DataSpec.num_channels must be >= 1, got {self.num_channels}.")
        count = len(self.region_names)
        if len(self.region_classes) != count or len(self.region_paint) != count:
            raise ValueError(f"DataSpec: {count} region names but {len(self.region_classes)} "
                             f"class sets and {len(self.region_paint)} paint classes.")
        for name, members, paint in zip(self.region_names, self.region_classes,
                                        self.region_paint):
            if not members or not all(0 < c < self.num_classes for c in members):
                raise ValueError(f"DataSpec: region {name!r} must be a non-empty set of "
                                 f"foreground classes 1..{self.num_classes - 1}, got {members}.")
            if paint not in members:
                raise ValueError(f"DataSpec: region {name!r} paints class {paint}, which is not "
                                 f"one of its classes {members}.")

    # ------------------------------------------------------------------ the kind of target
    @property
    def targets(self) -> str:
        """"regions" (overlapping, one sigmoid each) or "classes" (exclusive, softmax)."""
        return "regions" if self.region_names else "classes"

    @property
    def activation(self) -> str:
        """The output activation: "sigmoid" for regions, "softmax" for classes."""
        return "sigmoid" if self.region_names else "softmax"

    @property
    def num_outputs(self) -> int:
        """Network output channels: R regions or K classes."""
        return len(self.region_names) or self.num_classes

    @property
    def reported_names(self) -> tuple[str, ...]:
        """What validation and evaluation score: every region, or the foreground classes."""
        return self.region_names or self.class_names[1:]

    @property
    def input_shape(self) -> tuple[int | None, ...]:
        """Network input shape: spatial axes left free (the networks are fully convolutional)."""
        return (None,) * self.spatial_dims + (self.num_channels,)

    def region_table(self) -> np.ndarray:
        """(K, R) float32: 1 where class k belongs to region r (the training targets are
        `table[labels]`)."""
        table = np.zeros((self.num_classes, len(self.region_names)), np.float32)
        for r, members in enumerate(self.region_classes):
            table[list(members), r] = 1.0
        return table

    # ------------------------------------------------------------------ numpy decoding
    def target_masks(self, labels: np.ndarray) -> np.ndarray:
        """Ground-truth masks (*S, N) bool of the reported outputs from a class-index map."""
        labels = np.asarray(labels)
        if self.region_names:
            return self.region_table().astype(bool)[labels]
        return np.stack([labels == c for c in range(1, self.num_classes)], axis=-1)

    def prediction_masks(self, probabilities: np.ndarray) -> np.ndarray:
        """Predicted masks (*S, N) bool of the reported outputs from probabilities (*S, R|K)."""
        probabilities = np.asarray(probabilities)
        self._check_outputs(probabilities)
        if self.region_names:
            return probabilities >= REGION_THRESHOLD
        return self.target_masks(np.argmax(probabilities, axis=-1))

    def label_map(self, probabilities: np.ndarray) -> np.ndarray:
        """Class indices (*S) int32 from probabilities: argmax, or the regions painted in order."""
        probabilities = np.asarray(probabilities)
        self._check_outputs(probabilities)
        if not self.region_names:
            return np.argmax(probabilities, axis=-1).astype(np.int32)
        classes = np.zeros(probabilities.shape[:-1], np.int32)
        for r, paint in enumerate(self.region_paint):
            classes[probabilities[..., r] >= REGION_THRESHOLD] = paint
        return classes

    def _check_outputs(self, probabilities: np.ndarray) -> None:
        if probabilities.shape[-1] != self.num_outputs:
            raise ValueError(f"Expected {self.num_outputs} output channels "
                             f"({', '.join(self.region_names or self.class_names)}), got "
                             f"an array of shape {probabilities.shape}.")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DataSpec":
        from tfseg.overrides import config_from_dict

        return config_from_dict(cls, d)

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any],
                      patch_size_zyx: Sequence[int] | None = None) -> "DataSpec":
        """Channels, classes, regions, dimensionality and the training example shape of a records
        manifest.

        Raises:
          ValueError: if 2D subjects have different in-plane shapes (no fixed crop), or a 3D
            manifest records no patch size.
        """
        dims = int(manifest["spatial_dims"])
        if dims == 2:
            shapes = {tuple(e["shape_zyx"][1:]) for e in manifest["subjects"].values()}
            if len(shapes) != 1:
                raise ValueError(f"2D records with different in-plane shapes {sorted(shapes)}; "
                                 "preprocess with a fixed crop_size_yx.")
            example_shape = tuple(int(v) for v in shapes.pop())
            crop = (manifest.get("training_protocol") or {}).get("train_crop_yx")
            if crop:  # training examples are random crops of the stored slices
                example_shape = tuple(int(v) for v in crop)
        else:
            size = patch_size_zyx or (manifest.get("settings") or {}).get("patch_size_zyx")
            if not size:
                raise ValueError("3D records: no patch size; set PipelineConfig.patch_size_zyx or "
                                 "re-run preprocessing (its manifest records "
                                 "settings.patch_size_zyx).")
            example_shape = tuple(int(v) for v in size)
        raw_to_class = manifest_raw_to_class(manifest)
        names, members, paint = [], [], []
        for region in manifest.get("regions") or []:
            names.append(region["name"])
            members.append(tuple(sorted({raw_to_class[int(v)] for v in region["label_values"]})))
            paint.append(raw_to_class[int(region["paint"])])
        return cls(spatial_dims=dims, num_channels=len(manifest["modalities"]),
                   num_classes=len(manifest["class_names"]),
                   class_names=tuple(manifest["class_names"]), example_shape=example_shape,
                   region_names=tuple(names), region_classes=tuple(members),
                   region_paint=tuple(paint))


def manifest_raw_to_class(manifest: Mapping[str, Any]) -> dict[int, int]:
    """Label file value -> class index, as preprocessing recorded it in a manifest (else the
    inverse of its label values)."""
    recorded = manifest.get("raw_to_class")
    if recorded:
        pairs = recorded.items() if isinstance(recorded, Mapping) else recorded
        return {int(k): int(v) for k, v in pairs}
    return {int(v): index for index, v in enumerate(manifest.get("label_values") or [])}


def default_paint(regions: Sequence[tuple[str, Sequence[int]]]) -> tuple[int, ...]:
    """Per region, the label value painted for it: the smallest of its values that no later
    region holds (BraTS 2018: whole tumour {1, 2, 4} -> 2, tumour core {1, 4} -> 1, enhancing
    {4} -> 4).

    Raises:
      ValueError: when every value of a region also belongs to a later region (its paint value
        must then be given explicitly).
    """
    paint = []
    for index, (name, values) in enumerate(regions):
        later = {int(v) for _, vs in regions[index + 1:] for v in vs}
        own = sorted({int(v) for v in values} - later)
        if not own:
            raise ValueError(f"Region {name!r} {sorted(values)} has no label value outside the "
                             "regions painted after it; give its paint value explicitly.")
        paint.append(own[0])
    return tuple(paint)


def resolve_regions(regions: Sequence[tuple[str, Sequence[int]]],
                    paint: Sequence[int] | None, label_values: Sequence[int],
                    source: str) -> list[dict[str, Any]]:
    """Checks region definitions against a dataset's label values; the manifest's JSON form.

    Args:
      regions: (name, label values) in painting order.
      paint: per region the label value to paint, or None for `default_paint`.
      label_values: the dataset's label values (class index -> value).
      source: what declared the regions, for error messages (a dataset name or file).

    Returns:
      [{"name", "label_values", "paint"}] with sorted values.

    Raises:
      ValueError: for a value outside the label values, background in a region, a duplicate
        name, or a paint value outside its region.
    """
    known = [int(v) for v in label_values]
    background = known[0] if known else 0
    paint = tuple(paint) if paint is not None else default_paint(regions)
    if len(paint) != len(regions):
        raise ValueError(f"{source}: {len(regions)} regions but {len(paint)} paint values.")
    out, names = [], set()
    for (name, values), value in zip(regions, paint):
        values = sorted({int(v) for v in values})
        bad = [v for v in values if v not in known or v == background]
        if name in names or not values or bad:
            raise ValueError(f"{source}: region {name!r} must be a new name with foreground label "
                             f"values among {known[1:]}; got {values}.")
        if int(value) not in values:
            raise ValueError(f"{source}: region {name!r} paints {value}, not one of {values}.")
        names.add(name)
        out.append({"name": str(name), "label_values": values, "paint": int(value)})
    return out
