"""Image I/O: `read_image` / `read_label` / `write_image` over SimpleITK, with integrity checks."""
from tfseg.io.image import (ImageReadError, array_to_sitk, check_finite, meta_from_sitk,
                            read_channels, read_image, read_label, write_image)
from tfseg.io.meta import ImageMeta

__all__ = ["ImageMeta", "ImageReadError", "array_to_sitk", "check_finite", "meta_from_sitk",
           "read_channels", "read_image", "read_label", "write_image"]
