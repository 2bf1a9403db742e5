"""Image geometry, with the axis order in every name.

SimpleITK arrays are indexed (z, y, x) while its spacing, origin and size are (x, y, z); mixing
the two is the classic bug, so every field says which order it holds.
"""
from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class ImageMeta:
    """Physical geometry of an image as SimpleITK reports it.

    Attributes:
      spacing_xyz: voxel size in mm, (x, y[, z]).
      origin_xyz: physical position of voxel 0 in mm, (x, y[, z]).
      direction: direction cosines, row-major dim×dim flattened (SimpleITK order).
      size_xyz: number of voxels per axis, (x, y[, z]).
      num_channels: components per voxel (1 for scalar images; MSD 4D NIfTI: the 4th axis).
    """

    spacing_xyz: tuple[float, ...]
    origin_xyz: tuple[float, ...]
    direction: tuple[float, ...]
    size_xyz: tuple[int, ...]
    num_channels: int = 1

    @property
    def ndim(self) -> int:
        return len(self.size_xyz)

    @property
    def shape_zyx(self) -> tuple[int, ...]:
        """The numpy array shape (without the channel axis)."""
        return tuple(reversed(self.size_xyz))

    @property
    def spacing_zyx(self) -> tuple[float, ...]:
        return tuple(reversed(self.spacing_xyz))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ImageMeta":
        return cls(spacing_xyz=tuple(float(v) for v in d["spacing_xyz"]),
                   origin_xyz=tuple(float(v) for v in d["origin_xyz"]),
                   direction=tuple(float(v) for v in d["direction"]),
                   size_xyz=tuple(int(v) for v in d["size_xyz"]),
                   num_channels=int(d.get("num_channels", 1)))
