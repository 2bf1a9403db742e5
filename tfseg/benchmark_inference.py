"""The inference part of `tfseg.benchmark`: whole-volume prediction time and FLOP/s (as
evaluation runs it), and for 3D data large tiles against small overlapping tiles on the same
subjects (Dice of each against the ground truth, and the agreement of the two predictions).

Inference FLOPs: the predictor's forward FLOPs per input voxel (`tfseg.flops`, counted on one
training-shaped example; the networks are fully convolutional, so the count is proportional to
the voxels) times the voxels the network calls process: 2D, the slice batches padded to the
size multiple; 3D, every tile of the sliding window (overlaps counted as often as they are
computed), padded batches included.
"""
from __future__ import annotations

import itertools
import math
import statistics
import time
from typing import Any, Sequence

import numpy as np

from tfseg import flops as flops_lib
from tfseg.data import pipeline
from tfseg.inference import default_tile_size, predict_volume, suggest_tile_size, tile_starts
from tfseg.metrics.volume import dice

__all__ = ["measure_inference", "compare_tiles", "inference_voxels", "effective_tile",
           "SMALL_TILE", "SMALL_OVERLAP"]

# The small-tile reference of the 3D comparison (MONAI-style sliding window).
SMALL_TILE = (32, 32, 32)
SMALL_OVERLAP = 0.5


def _round_up(value: int, multiple: int) -> int:
    return -(-int(value) // multiple) * multiple


def effective_tile(tile: Sequence[int], shape_zyx: Sequence[int], multiple: int) -> list[int]:
    """The tile `predict_volume` runs: `tile` shrunk to the (rounded-up) volume."""
    return [min(int(t), _round_up(s, multiple)) for t, s in zip(tile, shape_zyx)]


def inference_voxels(shape_zyx: Sequence[int], spatial_dims: int, tile: Sequence[int] | None,
                     overlap: float, tile_batch: int, multiple: int) -> int:
    """Input voxels (per channel) the network processes for one volume, as `predict_volume`
    batches them (padding and overlaps included)."""
    depth, height, width = (int(v) for v in shape_zyx)
    if spatial_dims == 2:
        batch = min(tile_batch, depth)
        calls = math.ceil(depth / batch)
        return calls * batch * _round_up(height, multiple) * _round_up(width, multiple)
    tile = effective_tile(tile, shape_zyx, multiple)
    padded = [max(s, t) for s, t in zip(shape_zyx, tile)]
    corners = len(list(itertools.product(*(tile_starts(s, t, overlap)
                                           for s, t in zip(padded, tile)))))
    batch = min(tile_batch, corners)
    return math.ceil(corners / batch) * batch * int(np.prod(tile))


def flops_per_voxel(predictor, data_spec) -> float:
    """Forward FLOPs of the predictor per input voxel, counted on one training example."""
    shape = (1, *data_spec.example_shape, data_spec.num_channels)
    return flops_lib.forward_flops(predictor, shape) / float(np.prod(data_spec.example_shape))


def _timed(function, repeats: int) -> tuple[Any, float, list[float], list[float]]:
    start = time.perf_counter()
    result = function()  # traces the forward pass for this tile shape
    first = time.perf_counter() - start
    wall, cpu = [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        result = function()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - cpu_start)
    return result, first, wall, cpu


def measure_inference(predictor, image: np.ndarray, data_spec, size_multiple: int, *,
                      tile_batch: int, overlap: float, repeats: int, subject_id: str,
                      per_voxel_flops: float) -> dict[str, Any]:
    """Whole-volume prediction of one subject as `tfseg.evaluate` runs it (default tile: the
    training patch)."""
    tile = None
    if data_spec.spatial_dims == 3:
        tile = default_tile_size(data_spec.example_shape, size_multiple)

    def predict():
        return predict_volume(predictor, image, data_spec.spatial_dims, outputs="probabilities",
                              patch_size_zyx=tile, overlap=overlap, tile_batch=tile_batch,
                              size_multiple=size_multiple)

    _, first, wall, cpu = _timed(predict, repeats)
    seconds = statistics.median(wall)
    voxels = inference_voxels(image.shape[:3], data_spec.spatial_dims, tile, overlap, tile_batch,
                              size_multiple)
    work = per_voxel_flops * voxels
    return {"inference_s_per_volume": seconds,
            "inference_cpu_s_per_volume": statistics.median(cpu),
            "inference_s_min": min(wall), "inference_repeats": repeats,
            "inference_first_call_s": first,
            "inference_subject": subject_id, "inference_volume_shape": list(image.shape),
            "inference_tile_zyx": None if tile is None else effective_tile(
                tile, image.shape[:3], size_multiple),
            "inference_tile_batch": tile_batch,
            "inference_flops_per_volume": work, "inference_flops_per_s": work / seconds}


def _masks(probabilities: np.ndarray, data_spec) -> np.ndarray:
    """(Z, H, W, N) boolean masks of the reported foreground classes / regions."""
    if data_spec.targets == "regions":
        return probabilities > 0.5
    classes = np.argmax(probabilities, axis=-1)
    return np.stack([classes == k for k in range(1, data_spec.num_classes)], axis=-1)


def _truth_masks(label: np.ndarray, data_spec) -> np.ndarray:
    if data_spec.targets == "regions":
        table = np.asarray(data_spec.region_table(), bool)  # (classes, regions)
        return table[label]
    return np.stack([label == k for k in range(1, data_spec.num_classes)], axis=-1)


def compare_tiles(predictor, records_dir: str, manifest, subject_ids: Sequence[str], data_spec,
                  size_multiple: int, *, tile_batch: int, overlap: float) -> dict[str, Any]:
    """3D: large tiles (`suggest_tile_size`, the fast opt-in `--tile_size`; the default before
    issue 20) vs `SMALL_TILE` tiles with `SMALL_OVERLAP` on the same subjects.

    Returns:
      {"tile_compare_subjects", "tile_compare": {"large": {...}, "small": {...}},
       "tile_compare_voxel_agreement", "tile_compare_max_probability_difference"}, where each
      setting has its tile, overlap, seconds per volume (after a tracing call), mean Dice over
      the foreground classes/regions per subject and their mean.
    """
    settings = {
        "large": (tuple(suggest_tile_size(data_spec.example_shape, size_multiple)), overlap),
        "small": (tuple(_round_up(t, size_multiple) for t in SMALL_TILE), SMALL_OVERLAP)}
    out = {name: {"tile_zyx": list(tile), "overlap": lap, "seconds": [], "mean_dice": []}
           for name, (tile, lap) in settings.items()}
    agreement, max_difference = [], 0.0
    for subject_id in subject_ids:
        image, label = pipeline.load_subject(records_dir, subject_id, manifest)
        if label is None:
            continue
        truth = _truth_masks(label, data_spec)
        predictions = {}
        for name, (tile, lap) in settings.items():
            def predict(tile=tile, lap=lap):
                return predict_volume(predictor, image, 3, outputs="probabilities",
                                      patch_size_zyx=tile, overlap=lap, tile_batch=tile_batch,
                                      size_multiple=size_multiple)
            probabilities, _, wall, _ = _timed(predict, 1)
            masks = _masks(probabilities, data_spec)
            scores = [dice(masks[..., n], truth[..., n]) for n in range(truth.shape[-1])]
            out[name]["seconds"].append(wall[0])
            out[name]["mean_dice"].append(float(np.mean(scores)))
            predictions[name] = (probabilities, masks)
        (large, large_masks), (small, small_masks) = predictions["large"], predictions["small"]
        agreement.append(float(np.mean(np.all(large_masks == small_masks, axis=-1))))
        max_difference = max(max_difference, float(np.max(np.abs(large - small))))
    used = len(agreement)
    for figures in out.values():
        figures["mean_dice_over_subjects"] = (float(np.mean(figures["mean_dice"])) if used
                                              else None)
        figures["s_per_volume"] = float(np.mean(figures["seconds"])) if used else None
    return {"tile_compare_subjects": used, "tile_compare": out,
            "tile_compare_voxel_agreement": float(np.mean(agreement)) if used else None,
            "tile_compare_max_probability_difference": max_difference if used else None}
