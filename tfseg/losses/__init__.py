"""Stateless segmentation losses: (y_true probabilities, logits) -> per-example (B,) tensor."""
from tfseg.losses.segmentation import (LOSS_NAMES, cross_entropy, dice_ce_loss, get_loss,
                                       soft_dice_loss, task_driven_class_weights)

__all__ = ["LOSS_NAMES", "cross_entropy", "dice_ce_loss", "get_loss", "soft_dice_loss",
           "task_driven_class_weights"]
