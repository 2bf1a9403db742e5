"""Streaming (in-graph) Dice for validation during training.

`DiceScore` accumulates, per class, the voxel counts |P∩T|, |P| and |T| of the arg-max
prediction P and the reference T over every batch since the last `reset_state()`, and reports
Dice = 2|P∩T| / (|P| + |T|) over everything seen (a pooled, dataset-level Dice: large and small
examples weigh by their voxel counts). A class absent from both prediction and reference so far
scores 1, the empty-mask policy of docs/evaluation.md. Per-subject Dice in physical space for the
final evaluation lives in `tfseg.metrics.volume`.
"""
from __future__ import annotations

from collections.abc import Sequence

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="tfseg")
class DiceScore(keras.metrics.Metric):
    """Per-class and mean Dice of arg-max predictions, accumulated over batches.

    `update_state(labels, logits)` takes integer labels (B, *S) in [0, K) and logits (or
    probabilities) (B, *S, K). `result()` returns a dict, which Keras 3 merges into the logs:
    `{name: mean Dice over the reported classes, f"{name}_{class_name}": Dice of that class}`,
    e.g. {"dice": …, "dice_RV": …, "dice_Myo": …, "dice_LV": …}. `per_class_result()` returns
    the (K,) Dice of every class, background included. Counts are float64 so they stay exact
    beyond 2^24 voxels.

    Args:
        num_classes: K, background (class 0) included.
        class_names: K names used in the result keys (default "class0" … ).
        include_background: also report (and average) class 0.
        name: metric name and key prefix.
        dtype: result dtype (default float32).

    Raises:
        ValueError: if num_classes < 1, len(class_names) != K, or K = 1 without background.
    """

    def __init__(self, num_classes: int, class_names: Sequence[str] | None = None,
                 include_background: bool = False, name: str = "dice", dtype=None):
        super().__init__(name=name, dtype=dtype)
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"DiceScore: num_classes={num_classes!r} must be a positive int.")
        if class_names is None:
            class_names = [f"class{k}" for k in range(num_classes)]
        if len(class_names) != num_classes:
            raise ValueError(f"DiceScore: class_names={list(class_names)} must hold "
                             f"num_classes={num_classes} names (background first).")
        if num_classes == 1 and not include_background:
            raise ValueError("DiceScore: with num_classes=1 there is no foreground class; set "
                             "include_background=True.")
        self.num_classes = num_classes
        self.class_names = tuple(class_names)
        self.include_background = bool(include_background)
        shape = (num_classes,)
        self.intersection = self.add_variable(shape=shape, initializer="zeros", dtype="float64",
                                              name="intersection")
        self.predicted = self.add_variable(shape=shape, initializer="zeros", dtype="float64",
                                           name="predicted")
        self.reference = self.add_variable(shape=shape, initializer="zeros", dtype="float64",
                                           name="reference")

    def update_state(self, labels, logits, sample_weight=None):
        """Adds one batch.

        Args:
            labels: (B, *S) integer class indices in [0, K).
            logits: (B, *S, K) logits or probabilities (only the arg-max is used).
            sample_weight: optional weights broadcastable to (B, *S) (e.g. a validity mask).
        """
        labels = tf.reshape(tf.cast(labels, tf.int32), [-1])
        prediction = tf.reshape(tf.argmax(logits, axis=-1, output_type=tf.int32), [-1])
        tf.debugging.assert_equal(
            tf.size(labels), tf.size(prediction),
            message="DiceScore: labels must have the logits' shape without the class axis")
        tf.debugging.assert_less(labels, self.num_classes,
                                 message="DiceScore: a label is >= num_classes")
        tf.debugging.assert_non_negative(labels, message="DiceScore: a label is negative")
        if sample_weight is None:
            weights = None
        else:
            weights = tf.reshape(tf.broadcast_to(tf.cast(sample_weight, tf.float64),
                                                 tf.shape(logits)[:-1]), [-1])

        def count(values, mask=None):                                       # -> (K,) float64
            w = weights
            if mask is not None:
                values = tf.boolean_mask(values, mask)
                w = None if weights is None else tf.boolean_mask(weights, mask)
            return tf.math.bincount(values, weights=w, minlength=self.num_classes,
                                    maxlength=self.num_classes, dtype=tf.float64)

        self.intersection.assign_add(count(labels, tf.equal(labels, prediction)))
        self.predicted.assign_add(count(prediction))
        self.reference.assign_add(count(labels))

    def per_class_result(self):
        """(K,) Dice of every class; 1 for a class absent from prediction and reference."""
        total = self.predicted + self.reference
        dice = tf.where(total > 0, 2.0 * self.intersection / tf.maximum(total, 1e-300),
                        tf.ones_like(total))
        return tf.cast(dice, self.dtype)

    def result(self):
        dice = self.per_class_result()
        first = 0 if self.include_background else 1
        results = {self.name: tf.reduce_mean(dice[first:])}
        for k in range(first, self.num_classes):
            results[f"{self.name}_{self.class_names[k]}"] = dice[k]
        return results

    def reset_state(self):
        for variable in (self.intersection, self.predicted, self.reference):
            variable.assign(tf.zeros_like(variable))

    def get_config(self):
        config = super().get_config()
        config.update({"num_classes": self.num_classes, "class_names": list(self.class_names),
                       "include_background": self.include_background})
        return config
