"""Measure a method's speed on a dataset and print one JSON object.

    python -m launch.benchmark --method=supervised --dataset=synthetic_cardiac
    python -m launch.benchmark --method=supervised --dataset=synthetic_brain --mixed_precision=bf16
    python -m launch.benchmark --method=supervised --dataset=acdc --data_dir=/data/ACDC \
        --preset=quick --set=augment=affine --output=bench.json

Train step (median over timed graph-mode steps after warm-up), the method's own training pipeline
alone and their ratio (docs/performance.md: pipeline >= 5x the train step), whole-volume inference of one
validation subject, preprocessing per subject with and without N4, the N4 shrink speed-up and its
bias-field agreement, peak memory, parameter counts. See `tfseg.benchmark` for what each figure
measures. Records are the ones `launch.train` uses (same cache under --records_root, created on
first use); preprocessing is timed in a temporary folder.
"""
from __future__ import annotations

import json
import sys

from absl import flags

from launch import _common

PROGRAM = "launch.benchmark"
FLAGS = flags.FlagValues()
_F = dict(flag_values=FLAGS)

flags.DEFINE_string("method", None, "Method (module of tfseg/methods), e.g. supervised.", **_F)
flags.DEFINE_string("dataset", None, "Dataset (module of tfseg/datasets), e.g. synthetic_cardiac, "
                    "acdc.", **_F)
flags.DEFINE_string("data_dir", None, "Raw data folder as downloaded (not needed for synthetic "
                    "datasets).", **_F)
flags.DEFINE_string("records_root", "records", "Folder of preprocessed records (shared with "
                    "launch.train).", **_F)
flags.DEFINE_string("records_dir", None, "Use this preprocessed records folder instead of "
                    "preprocessing on first use.", **_F)
flags.DEFINE_boolean("n4", True, "N4 in the records trained on (as launch.train --n4).", **_F)
flags.DEFINE_integer("preprocess_workers", 1, "Subjects preprocessed in parallel when the records "
                     "are made on first use.", **_F)
flags.DEFINE_string("phase", None, "Cardiac phase for ACDC-style datasets: ES, ED or both.", **_F)
flags.DEFINE_multi_string("dataset_option", [], "Dataset option: --dataset_option=name=value "
                          "(repeatable), e.g. target=binary for brats / synthetic_tumor.", **_F)
flags.DEFINE_string("split", None, "A published split name or a split JSON file; default the "
                    "dataset's default split.", **_F)
flags.DEFINE_integer("labeled", None, "Draw a split with this many labeled patients.", **_F)
flags.DEFINE_integer("split_seed", 0, "Seed of the drawn split.", **_F)
flags.DEFINE_string("preset", None, "Named set of method settings, e.g. quick.", **_F)
flags.DEFINE_multi_string("set", [], "Override a method setting: --set=name=value (repeatable).",
                          **_F)
flags.DEFINE_integer("batch_size", None, "Labeled batch size (the config's batch_size field).",
                     **_F)
flags.DEFINE_integer("steps", 20, "Timed train steps per stage.", **_F)
flags.DEFINE_integer("warmup", 3, "Untimed train steps before timing (the first traces).", **_F)
flags.DEFINE_integer("pipeline_batches", 50, "Timed batches of the pipeline alone.", **_F)
flags.DEFINE_integer("pipeline_warmup", 10, "Untimed pipeline batches (cache, autotuning).", **_F)
flags.DEFINE_enum("mixed_precision", "auto", ["auto", "none", "bf16"],
                  "auto (default): bf16 where the hardware runs it natively, else none "
                  "(float32); bf16: mixed_bfloat16 compute (the result records both).", **_F)
flags.DEFINE_integer("seed", 0, "Weights, pipeline and augmentation seed.", **_F)
flags.DEFINE_integer("tile_batch", 4, "Inference: slices (2D) or tiles (3D) per network call.",
                     **_F)
flags.DEFINE_float("overlap", 0.5, "Inference: sliding-window overlap (3D).", **_F)
flags.DEFINE_integer("inference_repeats", 3, "Timed whole-volume predictions (median reported).",
                     **_F)
flags.DEFINE_integer("n4_subjects", 2, "Subjects preprocessed (with and without N4) for the "
                     "preprocessing timing; 0 skips it.", **_F)
flags.DEFINE_string("n4_compare", "auto", "N4 full resolution vs shrunk: auto (whole image up to "
                    "--n4_compare_max_voxels, else a centre crop), full, crop, none (also "
                    "false).", **_F)
flags.DEFINE_integer("n4_compare_max_voxels", 512_000, "Voxel budget of the full-resolution N4 "
                     "comparison.", **_F)
flags.DEFINE_integer("n4_levels", None, "N4 fitting levels of the timing and comparison "
                     "(default: preprocessing's 4).", **_F)
flags.DEFINE_integer("n4_iterations", None, "N4 iterations per level of the timing and "
                     "comparison (default: preprocessing's 50).", **_F)
flags.DEFINE_boolean("overhead", True, "Also time the networks' own forward and backward "
                     "passes (the reference step) in turns with the train step; report the "
                     "ratio.", **_F)
flags.DEFINE_integer("tile_compare_subjects", 2, "3D: subjects predicted with large tiles "
                     "(the training patch grown within 128^3) and with 32^3 tiles at overlap "
                     "0.5 (Dice of each); 0 skips.", **_F)
flags.DEFINE_integer("peak_size", 2048, "Side of the square matmuls timed for the machine's "
                     "float32 / bfloat16 peak; 0 skips the peak.", **_F)
flags.DEFINE_boolean("compare_precision", False, "Also time the main stage's step in the other "
                     "precision (float32 <-> bf16), in turns with this one: bf16_speedup.", **_F)
flags.DEFINE_string("inference_run_dir", None, "A finished run folder (launch.train's): time "
                    "inference and compare tiles with its trained predictor on its test "
                    "subjects.", **_F)
flags.DEFINE_string("output", None, "Also write the JSON to this file.", **_F)

_N4_COMPARE_ALIASES = {"false": "none", "no": "none", "0": "none", "off": "none",
                       "true": "auto", "yes": "auto", "1": "auto", "on": "auto"}


def main(argv) -> int:
    _common.setup_environment()
    _common.parse_flags(FLAGS, argv, PROGRAM)
    overrides = _common.check_method_flags(FLAGS, PROGRAM)
    n4_compare = FLAGS.n4_compare.strip().lower()
    n4_compare = _N4_COMPARE_ALIASES.get(n4_compare, n4_compare)

    from tfseg import benchmark
    try:
        config = benchmark.BenchmarkConfig(
            method=FLAGS.method, dataset=FLAGS.dataset,
            dataset_options={**_common.parse_options(FLAGS.dataset_option, PROGRAM,
                                                     "--dataset_option"),
                             **({"phase": FLAGS.phase} if FLAGS.phase else {})},
            data_dir=FLAGS.data_dir, records_root=FLAGS.records_root,
            records_dir=FLAGS.records_dir, n4=FLAGS.n4,
            preprocess_workers=FLAGS.preprocess_workers, split=FLAGS.split,
            labeled=FLAGS.labeled, split_seed=FLAGS.split_seed, preset=FLAGS.preset,
            overrides=overrides, batch_size=FLAGS.batch_size, steps=FLAGS.steps,
            warmup=FLAGS.warmup, pipeline_batches=FLAGS.pipeline_batches,
            pipeline_warmup=FLAGS.pipeline_warmup, mixed_precision=FLAGS.mixed_precision,
            seed=FLAGS.seed, tile_batch=FLAGS.tile_batch, overlap=FLAGS.overlap,
            inference_repeats=FLAGS.inference_repeats,
            n4_subjects=FLAGS.n4_subjects, n4_compare=n4_compare,
            n4_compare_max_voxels=FLAGS.n4_compare_max_voxels, n4_levels=FLAGS.n4_levels,
            n4_iterations=FLAGS.n4_iterations, overhead=FLAGS.overhead,
            tile_compare_subjects=FLAGS.tile_compare_subjects, peak_size=FLAGS.peak_size,
            compare_precision=FLAGS.compare_precision,
            inference_run_dir=FLAGS.inference_run_dir)
    except ValueError as error:
        _common.fail(PROGRAM, str(error))
    try:
        result = benchmark.run_benchmark(config)
    except ValueError as error:
        _common.fail(PROGRAM, str(error), exit_code=1)
    result = benchmark.rounded(result)
    if FLAGS.output:
        from tfseg._files import write_json_atomic
        write_json_atomic(FLAGS.output, result, sort_keys=True, default=str)
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
