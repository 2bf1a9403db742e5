"""Training callbacks: validation rounds, best checkpoint, resume state, non-finite guard, logs.

One "epoch" of `fit()` is one validation round (`steps_per_epoch = validation_every`). At the end of
each round `RoundEnd`, in this order: validates (whole-volume Dice per class on the validation
subjects, on the preprocessed grid), logs (train_log.csv, TensorBoard), writes the resume state,
then — if the mean foreground Dice improved — the best checkpoint. Writing the resume state before
the best checkpoint means a kill between the two leaves a resume state that knows about the new
best; on resume the best checkpoint is rewritten from the restored weights (`TrainingState`).

Every file is written atomically (temporary name in the same folder, then `os.replace`), and the
resume state is a directory renamed into place, so a killed run never leaves a half-written
checkpoint behind.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import shutil
import time
from typing import Any, Mapping, Sequence

import keras
import numpy as np
import tensorflow as tf

from tfseg._files import atomic_path, write_text_atomic
from tfseg.methods.base import Stage, check_finite

WEIGHTS_SUFFIX = ".weights.h5"


# --------------------------------------------------------------------------- atomic writes
def save_weights_atomic(model: keras.Model, path: str) -> None:
    """`model.save_weights(path)` through a temporary file and a rename (`tfseg._files`)."""
    with atomic_path(path, suffix=WEIGHTS_SUFFIX) as temporary:
        model.save_weights(temporary, overwrite=True)


# --------------------------------------------------------------------------- schedule
@dataclasses.dataclass(frozen=True)
class StagePlan:
    """Where a stage sits in the run: its `fit()` epochs are numbered globally across stages, so
    TensorBoard, the progress bar and the resume state see one continuous run.

    Attributes:
      index: position in `method.stages()`.
      stage: the stage.
      steps_per_epoch: steps per validation round.
      epoch_offset / step_offset: epochs and steps of the stages before this one.
    """

    index: int
    stage: Stage
    steps_per_epoch: int
    epoch_offset: int
    step_offset: int

    @property
    def epochs(self) -> int:
        return self.stage.steps // self.steps_per_epoch

    @property
    def end_epoch(self) -> int:
        return self.epoch_offset + self.epochs

    @property
    def key(self) -> str:
        return f"{self.index}_{self.stage.name}"

    def global_step(self, epoch: int, batch: int | None = None) -> int:
        """Steps done at the end of `batch` (or of the whole `epoch`) of global epoch `epoch`."""
        done = (epoch - self.epoch_offset) * self.steps_per_epoch
        done += self.steps_per_epoch if batch is None else batch + 1
        return self.step_offset + done


def plan_stages(stages: Sequence[Stage], validation_every: int) -> list[StagePlan]:
    """Lays the stages out on one step axis.

    Raises:
      ValueError: if a stage's steps are not a multiple of its validation interval.
    """
    plans, epoch_offset, step_offset = [], 0, 0
    for index, stage in enumerate(stages):
        if stage.steps < 1:
            continue
        every = min(validation_every, stage.steps)
        if stage.steps % every:
            raise ValueError(f"Stage {stage.name!r}: {stage.steps} steps is not a multiple of "
                             f"validation_every={validation_every}; choose steps and "
                             "validation_every so that one divides the other (e.g. "
                             f"--steps={(stage.steps // every + 1) * every}).")
        plan = StagePlan(index, stage, every, epoch_offset, step_offset)
        plans.append(plan)
        epoch_offset, step_offset = plan.end_epoch, step_offset + stage.steps
    return plans


# --------------------------------------------------------------------------- resume state
class TrainingState:
    """Resume checkpoints: checkpoints/backup/<stage>/round_<step>/{method.weights.h5,state.json}.

    The weights file holds every network and every optimizer (they are attributes of the method,
    so `save_weights` walks them); state.json holds the epoch, the step and the best-validation
    bookkeeping. The directory is written under a temporary name and renamed, so a round is
    either complete or absent. The last `keep` rounds are kept (a corrupt latest one falls back).
    """

    def __init__(self, read_root: str, write_root: str, keep: int = 2):
        self.read_root, self.write_root, self.keep = read_root, write_root, keep

    def _rounds(self, root: str, plan: StagePlan) -> list[str]:
        folder = os.path.join(root, plan.key)
        if not os.path.isdir(folder):
            return []
        names = sorted(n for n in os.listdir(folder)
                       if n.startswith("round_") and not n.endswith(".tmp"))
        return [os.path.join(folder, n) for n in names]

    def restore(self, model: keras.Model, plan: StagePlan) -> dict[str, Any] | None:
        """Loads the latest readable round of `plan` into `model`; returns its state or None."""
        for path in reversed(self._rounds(self.read_root, plan)):
            try:
                with open(os.path.join(path, "state.json"), encoding="utf-8") as f:
                    state = json.load(f)
                model.load_weights(os.path.join(path, "method" + WEIGHTS_SUFFIX))
            except (OSError, ValueError, KeyError) as error:
                tf.get_logger().warning(f"Skipping unreadable resume state {path}: {error}")
                continue
            return state
        return None

    def save(self, model: keras.Model, plan: StagePlan, state: Mapping[str, Any]) -> None:
        folder = os.path.join(self.write_root, plan.key)
        final = os.path.join(folder, f"round_{int(state['step']):09d}")
        tmp = final + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        model.save_weights(os.path.join(tmp, "method" + WEIGHTS_SUFFIX))
        with open(os.path.join(tmp, "state.json"), "w", encoding="utf-8") as f:
            json.dump(dict(state), f, indent=2)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in self._rounds(self.write_root, plan)[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def clear(self, plan: StagePlan) -> None:
        shutil.rmtree(os.path.join(self.write_root, plan.key), ignore_errors=True)


# --------------------------------------------------------------------------- validation
class Validator:
    """Whole-volume validation Dice of the method's predictor on preprocessed validation subjects.

    Scores what evaluation reports (`DataSpec.reported_names`: the foreground classes, or every
    region), with the same Dice (`tfseg.metrics.volume.dice_scores`) and the same decoding of
    probabilities (`DataSpec.prediction_masks`). The volumes are read once and kept in memory
    (validation sets are a few subjects).
    """

    def __init__(self, volumes: Sequence[tuple[str, np.ndarray, np.ndarray]], data_spec,
                 size_multiple: int):
        from tfseg.inference import predict_volume  # lazy: inference imports Keras helpers

        self._predict = predict_volume
        self.volumes = list(volumes)
        self.data_spec = data_spec
        self.names = tuple(data_spec.reported_names)
        self.size_multiple = size_multiple
        # 3D: tiles of the training patch, as evaluation (inference.default_tile_size): larger
        # tiles are faster but score differently from what evaluation will report.
        self.tile = (None if data_spec.spatial_dims == 2
                     else tuple(int(p) for p in data_spec.example_shape))
        # The panel shows the first subject's slice with the most foreground.
        first_label = self.volumes[0][2]
        self.panel_slice = int(np.argmax((first_label > 0).reshape(len(first_label), -1).sum(1)))

    def __call__(self, predictor) -> tuple[np.ndarray, np.ndarray]:
        """Returns (Dice per reported output averaged over subjects (N,), the first subject's
        predicted class map)."""
        from tfseg.metrics.volume import dice_scores

        scores, first = [], None
        for _, image, label in self.volumes:
            probs = self._predict(predictor, image, self.data_spec.spatial_dims,
                                  patch_size_zyx=self.tile, size_multiple=self.size_multiple,
                                  outputs="probabilities")
            if first is None:
                first = self.data_spec.label_map(probs)
            scores.append(dice_scores(self.data_spec.prediction_masks(probs),
                                      self.data_spec.target_masks(label)))
        return np.mean(scores, axis=0), first

    def panel(self, prediction: np.ndarray) -> np.ndarray:
        """(1, H, 3W, 3) float image: input | ground truth overlay | prediction overlay."""
        _, image, label = self.volumes[0]
        z = self.panel_slice
        gray = image[z, ..., 0]
        lo, hi = np.percentile(gray, [1, 99])
        gray = np.clip((gray - lo) / max(hi - lo, 1e-6), 0, 1)
        rgb = np.repeat(gray[..., None], 3, axis=-1)
        palette = np.array([[0, 0, 0], [1, 0.2, 0.2], [0.2, 1, 0.2], [0.2, 0.4, 1],
                            [1, 1, 0.2], [1, 0.2, 1], [0.2, 1, 1]], np.float32)

        def overlay(classes):
            colours = palette[1 + (classes - 1) % (len(palette) - 1)]
            return np.where(classes[..., None] > 0, 0.5 * rgb + 0.5 * colours, rgb)

        return np.concatenate([rgb, overlay(label[z]), overlay(prediction[z])], axis=1)[None]


# --------------------------------------------------------------------------- train log
class TrainLog:
    """train_log.csv: one row per validation round; rewritten atomically (rows are few)."""

    def __init__(self, path: str):
        self.path = path
        self.rows: list[dict[str, str]] = []
        if os.path.isfile(path):
            with open(path, newline="", encoding="utf-8") as f:
                self.rows = list(csv.DictReader(f))

    def truncate(self, step: int) -> None:
        """Drops rows after `step` (rounds a killed run logged but did not checkpoint)."""
        self.rows = [r for r in self.rows if int(r["step"]) <= step]

    def append(self, row: Mapping[str, Any], write_path: str | None = None) -> None:
        self.rows.append({k: _format(v) for k, v in row.items()})
        fields: list[str] = []
        for r in self.rows:
            fields.extend(k for k in r if k not in fields)
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(self.rows)
        write_text_atomic(write_path or self.path, out.getvalue())


def _format(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


# --------------------------------------------------------------------------- callbacks
@dataclasses.dataclass
class BestRecord:
    mean_dice: float = -1.0
    step: int = -1


class RoundEnd(keras.callbacks.Callback):
    """End of a validation round: validate, log, save the resume state, save the best."""

    def __init__(self, plan: StagePlan, *, validator: Validator | None,
                 state: TrainingState, train_log: TrainLog, best: BestRecord, output_dir: str,
                 validation_writer, start_time: float):
        super().__init__()
        # A stage that trains no segmentor (e.g. a GAN stage) has nothing to validate.
        self.plan = plan
        self.validator = validator if plan.stage.trains_segmentor else None
        self.state, self.train_log, self.best = state, train_log, best
        self.output_dir, self.writer, self.start_time = output_dir, validation_writer, start_time

    def on_epoch_end(self, epoch, logs=None):
        step = self.plan.global_step(epoch)
        row: dict[str, Any] = {"stage": self.plan.stage.name, "step": step, "epoch": epoch + 1,
                               "elapsed_s": round(time.time() - self.start_time, 1)}
        row.update({k: float(v) for k, v in (logs or {}).items()})
        for name, optimizer in self.model.optimizers().items():
            row[f"lr_{name}"] = float(keras.ops.convert_to_numpy(optimizer.learning_rate))
        improved = False
        if self.validator is not None:
            dice, prediction = self.validator(self.model.predictor)
            mean = float(np.mean(dice))
            row["val_mean_dice"] = mean
            row.update({f"val_dice_{n}": float(d) for n, d in zip(self.validator.names, dice)})
            improved = self.plan.stage.select_best and mean > self.best.mean_dice
            with self.writer.as_default(step=step):
                tf.summary.scalar("val/mean_dice", mean)
                for name, value in zip(self.validator.names, dice):
                    tf.summary.scalar(f"val/dice_{name}", float(value))
                tf.summary.image("val/input_truth_prediction", self.validator.panel(prediction))
            self.writer.flush()
        if improved:
            self.best.mean_dice, self.best.step = mean, step
        self.train_log.append(row, os.path.join(self.output_dir, "train_log.csv"))
        self.state.save(self.model, self.plan, {"epoch": epoch + 1, "step": step,
                                                "best_mean_dice": self.best.mean_dice,
                                                "best_step": self.best.step})
        if improved:
            save_best(self.model, self.output_dir)


def save_best(model: keras.Model, output_dir: str) -> None:
    """checkpoints/best.weights.h5 (whole method) and the predictor's weights
    (`tfseg.run.PREDICTOR_WEIGHTS`: what evaluation, export and prediction load)."""
    from tfseg.run import PREDICTOR_WEIGHTS

    save_weights_atomic(model, os.path.join(output_dir, "checkpoints", "best" + WEIGHTS_SUFFIX))
    save_weights_atomic(model.predictor, os.path.join(output_dir, PREDICTOR_WEIGHTS))


class StepMonitor(keras.callbacks.Callback):
    """Per step: stops on a non-finite tracked value; every `log_every` steps, writes the tracked
    values, learning rates and the method's `summary_images()` (if it has one) to TensorBoard.
    During training the train writer is the default writer, so `tf.summary` calls inside a
    `train_step` are recorded (Keras 3's own TensorBoard callback drops them)."""

    def __init__(self, plan: StagePlan, train_writer, log_every: int = 50):
        super().__init__()
        self.plan, self.writer, self.log_every = plan, train_writer, max(1, int(log_every))
        self._epoch = plan.epoch_offset
        self._context = None

    def on_train_begin(self, logs=None):
        self._context = self.writer.as_default()
        self._context.__enter__()

    def on_train_end(self, logs=None):
        self.close()

    def close(self) -> None:
        if self._context is not None:
            self._context.__exit__(None, None, None)
            self._context = None
        self.writer.flush()

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        step = self.plan.global_step(self._epoch, batch)
        check_finite(logs or {}, step)
        if step % self.log_every == 0:
            with self.writer.as_default(step=step):
                for name, value in (logs or {}).items():
                    tf.summary.scalar(f"train/{name}", float(value))
                for name, optimizer in self.model.optimizers().items():
                    tf.summary.scalar(f"learning_rate/{name}",
                                      float(keras.ops.convert_to_numpy(optimizer.learning_rate)))
                # Optional method hook: {name: (N, H, W, 1|3) float images in [0, 1]}.
                summary_images = getattr(self.model, "summary_images", None)
                if callable(summary_images):
                    for name, images in summary_images().items():
                        tf.summary.image(f"train/{name}", images, max_outputs=len(images))
