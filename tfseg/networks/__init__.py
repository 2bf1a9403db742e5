"""Pure network builders returning keras.Model (no training logic)."""
from tfseg.networks.blocks import LinearUpsampling
from tfseg.networks.unet import (PAPER_UNET_2D, PAPER_UNET_3D, UNetConfig, build_unet,
                                 size_multiple)

__all__ = ["LinearUpsampling", "PAPER_UNET_2D", "PAPER_UNET_3D", "UNetConfig", "build_unet",
           "size_multiple"]
