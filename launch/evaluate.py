"""Evaluate a trained run on its test split, in each subject's original geometry.

    python -m launch.evaluate --run_dir=runs/acdc/c1/supervised/seed0
    python -m launch.evaluate --run_dir=... --split=val --flip_tta --tile_batch=8

Writes metrics.csv (subject x class), summary.json, summary.md and predictions/<subject>_seg.nii.gz
(original geometry and label values) into the run folder, and prints the summary. Also writes
overlays/dice<mean>_<subject>.png montages (--nooverlays: not) and the run's page report.html.
"""
from __future__ import annotations

import sys

from absl import flags

from launch import _common

PROGRAM = "launch.evaluate"
FLAGS = flags.FlagValues()
_F = dict(flag_values=FLAGS)

flags.DEFINE_string("run_dir", None, "Run folder written by launch.train.", **_F)
flags.DEFINE_enum("split", "test", ["test", "val", "labeled"], "Which list of the run's split "
                  "to evaluate.", **_F)
flags.DEFINE_boolean("flip_tta", False, "Average the probabilities over in-plane flips.", **_F)
flags.DEFINE_integer("tile_batch", 4, "Slices (2D) or sliding-window tiles (3D) per network "
                     "call.", **_F)
flags.DEFINE_list("tile_size", None, "3D sliding-window tile D,H,W, multiples of the network's "
                  "size multiple (default: the training patch; larger tiles are faster but change the "
                  "answer, docs/evaluation.md).", **_F)
flags.DEFINE_float("overlap", 0.5, "3D sliding-window overlap in [0, 1).", **_F)
flags.DEFINE_enum("domain", "source", ["source", "target"], "Which data domain of the run: "
                  "source (its labeled dataset) or target (its --target_dataset; reports go to "
                  "<run_dir>/target/).", **_F)
flags.DEFINE_boolean("write_predictions", True, "Write predictions/<subject>_seg.nii.gz.", **_F)
flags.DEFINE_boolean("overlays", True, "Write overlays/dice<mean>_<subject>.png montages "
                     "(--nooverlays: skip them; report.html is written either way).", **_F)


def main(argv) -> int:
    _common.setup_environment()
    _common.parse_flags(FLAGS, argv, PROGRAM)
    if not FLAGS.run_dir:
        _common.fail(PROGRAM, "--run_dir is required: the folder written by launch.train.")
    tile = _int_list(FLAGS.tile_size, "tile_size", 3)
    from tfseg.evaluate import evaluate_run  # after the environment is set: imports TF

    try:
        summary = evaluate_run(FLAGS.run_dir, split=FLAGS.split, flip_tta=FLAGS.flip_tta,
                               write_predictions=FLAGS.write_predictions,
                               tile_batch=FLAGS.tile_batch, tile_size_zyx=tile,
                               overlap=FLAGS.overlap, domain=FLAGS.domain,
                               overlays=FLAGS.overlays)
    except ValueError as error:
        _common.fail(PROGRAM, str(error))
    print_summary(summary)
    return 0


def _int_list(values, name: str, length: int):
    if not values:
        return None
    try:
        numbers = tuple(int(v) for v in values)
    except ValueError:
        _common.fail(PROGRAM, f"--{name}={','.join(values)}: expected {length} integers.")
    if len(numbers) != length or min(numbers) < 1:
        _common.fail(PROGRAM, f"--{name}={','.join(values)}: expected {length} positive "
                              "integers, e.g. 64,64,64.")
    return numbers


def print_summary(summary) -> None:
    """Mean Dice, then one line per class with every metric's mean ± std."""
    print(f"Split {summary['split']}: {summary['num_subjects']} subjects, mean Dice "
          f"{summary['mean_dice']:.4f} (checkpoint {summary.get('checkpoint')}, flip TTA "
          f"{'on' if summary.get('flip_tta') else 'off'}, {summary.get('seconds', 0):.1f} s)")
    width = max(len(name) for name in summary["classes"])
    print(f"  {'class':<{width}}  {'Dice':>15}  {'IoU':>15}  {'HD95 mm':>15}  {'ASD mm':>15}")
    for name, stats in summary["classes"].items():
        cells = "  ".join(f"{stats[m]['mean']:>7.3f} ± {stats[m]['std']:<5.3f}"
                          for m in ("dice", "iou", "hd95_mm", "asd_mm"))
        print(f"  {name:<{width}}  {cells}")
    print(f"Reports: {summary.get('run_dir', '')}/summary.md, metrics.csv, report.html")


if __name__ == "__main__":
    sys.exit(main(sys.argv))
