"""Metrics: streaming Keras Dice for validation, per-subject volume metrics in mm."""
from tfseg.metrics.streaming import DiceScore
from tfseg.metrics.volume import (METRIC_NAMES, auc, binary_metrics, field_of_view_diagonal,
                                  mean_iou, surface_distances, volume_metrics)

__all__ = ["DiceScore", "METRIC_NAMES", "auc", "binary_metrics", "field_of_view_diagonal",
           "mean_iou", "surface_distances", "volume_metrics"]
