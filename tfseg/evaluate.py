"""Evaluation of a trained run in the ORIGINAL geometry of every subject (docs/evaluation.md).

For each subject of the requested split: predict on the preprocessed grid (slice-wise or sliding
window, `tfseg.inference`), undo crop/pad and resampling (`preprocessing.restore_geometry`,
probabilities first, then argmax), read the original label file, map its raw values to classes,
and compute Dice, IoU, HD95/ASD in mm, precision and recall at the native spacing
(`tfseg.metrics.volume.volume_metrics`). Writes, atomically, into the run folder:

- `metrics.csv`: one row per subject x foreground class;
- `summary.json`: mean / std (population, ddof=0) / median per class and metric, the overall
  figures (per subject, the mean over foreground classes) and the protocol (split, checkpoint
  policy, flip TTA, tile size, empty-mask policy);
- `summary.md`: the same as GitHub tables;
- `predictions/<subject>_seg.nii.gz`: the predicted label map on the original grid, with the
  dataset's original label values (e.g. iSEG 10/150/250);
- `overlays/dice<mean>_<subject>.png` (worst subject first by name; `tfseg.visualize`) and the
  run's page `<run_dir>/report.html` (`tfseg.report_html`).

The background class is not reported: its Dice is dominated by the image size.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from absl import logging

from tfseg._files import write_json_atomic, write_text_atomic
from tfseg.data.spec import DataSpec
from tfseg.io import ImageMeta, read_label, write_image

__all__ = ["EvalSubject", "evaluate_run", "evaluate_volumes", "summarize", "summary_markdown",
           "write_label_map", "write_reports", "METRIC_NAMES"]

METRIC_NAMES = ("dice", "iou", "hd95_mm", "asd_mm", "precision", "recall")
# Per class / region, also in metrics.csv: "miou" = the two-class mean IoU of the class against
# everything else ((IoU of the class + IoU of its complement) / 2, DMNet's binary mIoU), and
# "auc" = one-against-rest ROC AUC of the class's probability (None when not computable: a
# prediction given as a label map, or a reference without that class or without background).
EXTRA_METRICS = ("miou", "auc")

EMPTY_MASK_POLICY = (
    "Per class: prediction and truth both empty -> Dice = IoU = precision = recall = 1 and "
    "distances 0; exactly one empty -> Dice = IoU = precision = recall = 0 and HD95 = ASD = the "
    "diagonal of the image's field of view in mm. No value is dropped from a mean.")


@dataclasses.dataclass(frozen=True)
class EvalSubject:
    """What evaluation needs about one subject.

    Attributes:
      subject_id: the case id (manifest key); names the prediction file.
      label_path: the ORIGINAL label file.
      original: geometry of the original image (the grid predictions are written on).
    """

    subject_id: str
    label_path: str
    original: ImageMeta


def evaluate_run(run_dir: str, split: str = "test", flip_tta: bool = False,
                 write_predictions: bool = True, subject_ids: Sequence[str] | None = None, *,
                 tile_batch: int = 4, tile_size_zyx: Sequence[int] | None = None,
                 overlap: float = 0.5, domain: str = "source",
                 out_dir: str | None = None, overlays: bool = True) -> dict[str, Any]:
    """Evaluates a run's predictor on a split, in original geometry; writes the reports.

    Args:
      run_dir: a run folder written by `tfseg.train` (config.json, checkpoints/).
      split: which list of the run's split to evaluate: "test" (default), "val", "labeled".
      flip_tta: average probabilities over in-plane flips.
      write_predictions: also write `predictions/<subject>_seg.nii.gz`.
      subject_ids: evaluate these manifest subject ids instead of the split's.
      tile_batch: slices (2D) or tiles (3D) per network call.
      tile_size_zyx: 3D sliding-window tile; any multiple of the network's size multiple works
        (the networks are fully convolutional). Default: the training patch
        (`inference.default_tile_size`; larger tiles are faster but change the answer),
        recorded in the summary.
      overlap: sliding-window overlap (3D).
      domain: "source" (the labeled domain) or "target" (the run's second domain: its records
        and split).
      out_dir: where the reports and predictions go; default the run folder for the source
        domain, `<run_dir>/target/` for the target domain.
      overlays: also write `overlays/dice<mean>_<subject>.png` montages (`tfseg.visualize`).
        Either way `<run_dir>/report.html` is (re)written (`tfseg.report_html`).

    Returns:
      The summary dict also written to `summary.json`.

    Raises:
      ValueError: for a missing run file, an unknown split name, a subject without a label, or
        a label file whose values or geometry do not match the dataset.
    """
    from preprocessing import restore_geometry  # lazy: TF and the methods load only here
    from tfseg.data.pipeline import load_subject, subject_ids_for
    from tfseg.inference import default_tile_size, predict_volume
    from tfseg.report_html import write_run_report
    from tfseg.run import CONFIG_NAME, load_run
    from tfseg.visualize import OVERLAYS_DIR, evaluation_overlays

    started = time.perf_counter()
    run = load_run(run_dir, domain)
    records_dir = run.records_dir
    manifest = run.manifest
    if out_dir is None:
        out_dir = run_dir if domain == "source" else os.path.join(run_dir, domain)
    if subject_ids is None:
        patients = run.split.get(split)
        if patients is None:
            raise ValueError(f"{os.path.join(run_dir, CONFIG_NAME)}: the {domain} split has no "
                             f"list {split!r}; expected one of test, val, labeled.")
        subject_ids = subject_ids_for(manifest, list(patients))
    subjects, skipped = [], []
    for subject_id in subject_ids:
        entry = manifest["subjects"].get(subject_id)
        if entry is None:
            raise ValueError(f"Subject {subject_id!r} is not in {records_dir}/manifest.json; "
                             "re-run preprocessing for this dataset or fix the subject list.")
        if not entry.get("label_path"):
            skipped.append(subject_id)
            continue
        subjects.append(EvalSubject(subject_id, entry["label_path"],
                                    ImageMeta.from_dict(entry["original"])))
    if skipped:
        logging.warning("Skipping %d unlabeled subject(s): %s", len(skipped), ", ".join(skipped))
    if not subjects:
        raise ValueError(f"No labeled subject to evaluate in split {split!r} of {run_dir}.")

    tile = tuple(tile_size_zyx) if tile_size_zyx else (
        default_tile_size(run.patch_size_zyx, run.size_multiple) if run.patch_size_zyx else None)

    def predict(subject: EvalSubject) -> np.ndarray:
        image, _ = load_subject(records_dir, subject.subject_id, manifest)  # (Z, H, W, C)
        probs = predict_volume(run.predictor, image, run.spatial_dims, patch_size_zyx=tile,
                               overlap=overlap, tile_batch=tile_batch, flip_tta=flip_tta,
                               size_multiple=run.size_multiple, outputs="probabilities")
        geometry = manifest["subjects"][subject.subject_id]["geometry"]
        return restore_geometry(probs, geometry, subject.original, is_probability=True,
                                background=run.data_spec.targets == "classes")

    predictions_dir = os.path.join(out_dir, "predictions") if write_predictions else None
    rows, per_subject = evaluate_volumes(
        subjects, predict, data_spec=run.data_spec, label_values=run.label_values,
        raw_to_class=run.raw_to_class, predictions_dir=predictions_dir,
        on_subject=evaluation_overlays(os.path.join(out_dir, OVERLAYS_DIR), manifest,
                                       run.data_spec.reported_names) if overlays else None)
    protocol = {"run_dir": os.path.abspath(run_dir),
                "dataset": manifest.get("dataset", run.config.get("dataset")),
                "method": run.config.get("method"), "domain": domain,
                "targets": run.data_spec.targets,
                "checkpoint": run.config.get("checkpoint_policy", "unknown"),
                "flip_tta": bool(flip_tta), "overlap": overlap,
                "tile_size_zyx": list(tile) if tile and run.spatial_dims == 3 else None,
                "skipped_unlabeled": skipped}
    summary = summarize(rows, per_subject, run.data_spec.reported_names, split=split,
                        extra=protocol)
    summary["seconds"] = round(time.perf_counter() - started, 2)
    write_reports(out_dir, rows, summary)
    write_run_report(run_dir)
    return summary


def evaluate_volumes(subjects: Sequence[EvalSubject],
                     predict: Callable[[EvalSubject], np.ndarray], *,
                     data_spec: DataSpec, label_values: Sequence[int],
                     raw_to_class: Mapping[int, int], predictions_dir: str | None = None,
                     on_subject: Callable[..., None] | None = None
                     ) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """Scores predictions against the original label files (the core of `evaluate_run`).

    What is scored is `data_spec.reported_names`: the foreground classes (prediction = argmax),
    or every region (prediction = probability >= 0.5; truth = the label values of the region).

    Args:
      subjects: the labeled subjects.
      predict: subject -> probabilities (z, y, x, K|R) on the ORIGINAL grid
        (`subject.original`), or an integer map (z, y, x) of class indices.
      data_spec: the run's `DataSpec` (classes or regions).
      label_values: class index -> the value written in prediction files.
      raw_to_class: raw label file value -> class index.
      predictions_dir: write `<subject>_seg.nii.gz` there (original geometry and label values;
        regions painted back into label values, `DataSpec.label_map`).
      on_subject: called as on_subject(subject, prediction_masks, truth_masks, record) after
        each subject is scored (masks (z, y, x, N) bool of the reported names; record: its
        per-subject dict), e.g. `tfseg.visualize.evaluation_overlays`.

    Returns:
      (rows, per_subject): one row per subject x reported class/region with `METRIC_NAMES`; and
      per subject {name: {metric: value}, "miou": mean IoU over all classes (background
      included, as DMNet; classes only), "auc": binary tasks given probabilities (None if
      undefined), "seconds": s}.

    Raises:
      ValueError: naming the file when a label's values are outside `raw_to_class` or its grid
        differs from the original image's; or when a prediction has the wrong shape.
    """
    from tfseg.metrics.volume import auc, binary_metrics, binary_mean_iou, mean_iou

    names = data_spec.reported_names
    rows: list[dict[str, Any]] = []
    per_subject: dict[str, dict[str, Any]] = {}
    for position, subject in enumerate(subjects, 1):
        started = time.perf_counter()
        output = np.asarray(predict(subject))
        shape = subject.original.shape_zyx
        if output.shape[:len(shape)] != shape:
            raise ValueError(f"Prediction for {subject.subject_id} has shape {output.shape}; "
                             f"expected the original grid {shape} (+ outputs).")
        is_probability = output.ndim == len(shape) + 1
        if is_probability:
            prediction = data_spec.label_map(output)
            pred_masks = data_spec.prediction_masks(output)
        else:
            prediction = output.astype(np.int32)
            pred_masks = data_spec.target_masks(prediction)
        truth = _label_classes(subject, raw_to_class)
        truth_masks = data_spec.target_masks(truth)
        if predictions_dir is not None:
            write_label_map(prediction, subject.original, label_values,
                            os.path.join(predictions_dir, f"{subject.subject_id}_seg.nii.gz"))
        record: dict[str, Any] = {}
        first_channel = 1 if data_spec.targets == "classes" else 0  # skip the background
        for n, name in enumerate(names):
            scores = binary_metrics(pred_masks[..., n], truth_masks[..., n],
                                    subject.original.spacing_zyx)
            values = {metric: float(scores[metric]) for metric in METRIC_NAMES}
            values["miou"] = binary_mean_iou(pred_masks[..., n], truth_masks[..., n])
            value = (auc(output[..., first_channel + n], truth_masks[..., n])
                     if is_probability else math.nan)
            values["auc"] = None if math.isnan(value) else value
            rows.append({"subject": subject.subject_id, "class": name, **values})
            record[name] = values
        if data_spec.targets == "classes":  # mIoU as DMNet reports it (background included)
            record["miou"] = mean_iou(prediction, truth, data_spec.num_classes)
        else:  # regions overlap: the mean of the regions' two-class mIoUs
            record["miou"] = float(np.mean([record[name]["miou"] for name in names]))
        aucs = [record[name]["auc"] for name in names if record[name]["auc"] is not None]
        record["auc"] = float(np.mean(aucs)) if aucs else None
        seconds = time.perf_counter() - started
        record["seconds"] = round(seconds, 2)
        if on_subject is not None:
            on_subject(subject, pred_masks, truth_masks, record)
        per_subject[subject.subject_id] = record
        logging.info("[%d/%d] %s  Dice %s  %.1f s", position, len(subjects), subject.subject_id,
                     "  ".join(f"{name}={record[name]['dice']:.3f}" for name in names), seconds)
    return rows, per_subject


def summarize(rows: Sequence[Mapping[str, Any]], per_subject: Mapping[str, Any],
              reported_names: Sequence[str], *, split: str,
              extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Aggregates metric rows into the `summary.json` structure (docs/CONTRACTS.md).

    `reported_names`: the foreground classes or the regions (`DataSpec.reported_names`).
    `mean_dice` is the mean over subjects of each subject's mean Dice over them (equal to the
    mean over all subject x class rows, since every subject has every class). The "overall"
    figures aggregate that per-subject class mean for every metric.
    """
    foreground = list(reported_names)
    classes = {}
    for name in foreground:
        class_rows = [r for r in rows if r["class"] == name]
        classes[name] = {m: _stats([r[m] for r in class_rows]) for m in METRIC_NAMES}
        for m in EXTRA_METRICS:  # where computed (AUC needs probabilities and both classes)
            values = [r[m] for r in class_rows if r.get(m) is not None]
            if values:
                classes[name][m] = _stats(values)
    subject_means = {m: [float(np.mean([r[m] for r in rows if r["subject"] == s]))
                         for s in per_subject] for m in METRIC_NAMES}
    overall = {m: _stats(values) for m, values in subject_means.items()}
    for name in EXTRA_METRICS:  # per-subject figures, where defined
        values = [r[name] for r in per_subject.values() if r.get(name) is not None]
        if values:
            overall[name] = _stats(values)
    summary = {"split": split, "num_subjects": len(per_subject),
               "mean_dice": overall["dice"]["mean"], "classes": classes, "overall": overall,
               "subjects": dict(per_subject), "empty_mask_policy": EMPTY_MASK_POLICY,
               "std": "population standard deviation (ddof=0) over subjects"}
    summary.update(extra or {})
    return summary


def write_label_map(classes_zyx: np.ndarray, original: ImageMeta, label_values: Sequence[int],
                    path: str) -> None:
    """Writes class indices as the dataset's raw label values on the original grid (atomic)."""
    values = np.asarray(label_values, dtype=np.int64)
    raw = values[classes_zyx]
    dtype = (np.uint8 if values.min() >= 0 and values.max() <= 255 else
             np.uint16 if values.min() >= 0 and values.max() <= 65535 else np.int32)
    meta = dataclasses.replace(original, num_channels=1)  # a label map is scalar
    write_image(raw.astype(dtype), meta, path)


def _label_classes(subject: EvalSubject, raw_to_class: Mapping[int, int]) -> np.ndarray:
    raw, meta = read_label(subject.label_path)
    if raw.shape != subject.original.shape_zyx:
        raise ValueError(f"Label {subject.label_path} has shape {raw.shape} but the image of "
                         f"{subject.subject_id} is {subject.original.shape_zyx}; the label must "
                         "be on the image's grid.")
    if not np.allclose(meta.spacing_xyz, subject.original.spacing_xyz, rtol=1e-3, atol=1e-4):
        raise ValueError(f"Label {subject.label_path} has spacing {meta.spacing_xyz} but the "
                         f"image has {subject.original.spacing_xyz}; they must match.")
    values, inverse = np.unique(raw, return_inverse=True)
    unknown = [int(v) for v in values if int(v) not in raw_to_class]
    if unknown:
        raise ValueError(f"Label {subject.label_path} holds values {unknown} outside the "
                         f"dataset's label map {dict(raw_to_class)}; check that this is the "
                         "dataset's segmentation file.")
    lookup = np.array([raw_to_class[int(v)] for v in values], dtype=np.int32)
    return lookup[inverse].reshape(raw.shape)


def _stats(values: Sequence[float]) -> dict[str, float]:
    array = np.asarray(values, dtype=np.float64)
    return {"mean": float(array.mean()), "std": float(array.std()),
            "median": float(np.median(array))}


def write_reports(out_dir: str, rows: Sequence[Mapping[str, Any]], summary: Mapping[str, Any]
                  ) -> None:
    """Writes metrics.csv, summary.json and summary.md into `out_dir`, each atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["subject", "class", *METRIC_NAMES,
                                                *EXTRA_METRICS], lineterminator="\n")
    writer.writeheader()
    for row in rows:  # an undefined AUC is an empty cell
        writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) else "" if v is None else v)
                         for k, v in row.items()})
    write_text_atomic(os.path.join(out_dir, "metrics.csv"), buffer.getvalue())
    write_json_atomic(os.path.join(out_dir, "summary.json"), _json_safe(summary), indent=2)
    write_text_atomic(os.path.join(out_dir, "summary.md"), summary_markdown(summary))


_MIOU_TEXT = ("over all classes, background included",
              "mean of the regions' two-class mIoUs")


def summary_markdown(summary: Mapping[str, Any]) -> str:
    """The summary as GitHub-flavoured Markdown tables."""
    headers = {"dice": "Dice", "iou": "IoU", "hd95_mm": "HD95 (mm)", "asd_mm": "ASD (mm)",
               "precision": "Precision", "recall": "Recall", "miou": "mIoU", "auc": "AUC"}

    def cell(table, metric):
        if metric not in table:
            return "n/a"
        stats = table[metric]
        digits = 2 if metric.endswith("_mm") else 3
        return (f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f} "
                f"({stats['median']:.{digits}f})")

    title = " / ".join(str(summary[k]) for k in ("dataset", "method") if summary.get(k))
    tile = summary.get("tile_size_zyx")
    lines = [f"# Evaluation{': ' + title if title else ''} — split `{summary['split']}`", "",
             f"- Subjects: {summary['num_subjects']}; mean Dice over foreground classes: "
             f"**{summary['mean_dice']:.3f}**",
             f"- Checkpoint: {summary.get('checkpoint', 'unknown')}; flip TTA: "
             f"{'yes' if summary.get('flip_tta') else 'no'}"
             + (f"; tile {'×'.join(map(str, tile))}, overlap {summary.get('overlap')}"
                if tile else ""),
             *([f"- mIoU ({_MIOU_TEXT[summary.get('targets') == 'regions']}): "
                f"{summary['overall']['miou']['mean']:.3f}"] if "miou" in summary["overall"]
               else []),
             *([f"- AUC (mean of the one-against-rest AUCs): "
                f"{summary['overall']['auc']['mean']:.3f}"]
               if "auc" in summary["overall"] else []),
             "- Per class: mIoU = (IoU of the class + IoU of the rest) / 2; AUC = ROC AUC of its "
             "probability against the rest (n/a: not computable).",
             f"- Original geometry; distances in mm. Empty masks: {summary['empty_mask_policy']}",
             "- Cells: mean ± std (median) over subjects.", "",
             "| Class | " + " | ".join(headers.values()) + " |",
             "|---" * (len(headers) + 1) + "|"]
    for name, stats in summary["classes"].items():
        lines.append(f"| {name} | " + " | ".join(cell(stats, m) for m in headers) + " |")
    lines.append("| **Mean of classes** | "
                 + " | ".join(cell(summary["overall"], m) for m in headers) + " |")
    names = list(summary["classes"])
    lines += ["", "## Dice per subject", "",
              "| Subject | " + " | ".join(names) + " | Seconds |",
              "|---" * (len(names) + 2) + "|"]
    for subject, record in summary["subjects"].items():
        lines.append(f"| {subject} | " + " | ".join(f"{record[n]['dice']:.3f}" for n in names)
                     + f" | {record['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def _json_safe(value):
    """Non-finite floats become null (strict JSON), numpy scalars plain numbers."""
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value
