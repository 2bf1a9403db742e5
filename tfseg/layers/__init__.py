"""Custom Keras layers with weights or state: weight normalisation and dense warping."""
from tfseg.layers.warp import Warp, warp
from tfseg.layers.weight_norm import WeightNormConv, WeightNormConvTranspose, WeightNormDense

__all__ = ["Warp", "WeightNormConv", "WeightNormConvTranspose", "WeightNormDense", "warp"]
