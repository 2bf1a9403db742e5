"""Train a method on a dataset: preprocess on first use, train, select on validation, evaluate on
test, export.

    python -m launch.train --method=supervised --dataset=synthetic_cardiac --labeled=3
    python -m launch.train --method=supervised --dataset=acdc --data_dir=/data/ACDC --split=c1
    python -m launch.train ... --preset=quick --set=learning_rate=1e-4 --set=augment=affine

Re-running the same command resumes an interrupted run.
"""
from __future__ import annotations

import sys

from absl import flags

from launch import _common

PROGRAM = "launch.train"
FLAGS = flags.FlagValues()
_F = dict(flag_values=FLAGS)

flags.DEFINE_string("method", None, "Method (module of tfseg/methods), e.g. supervised.", **_F)
flags.DEFINE_string("dataset", None, "Dataset (module of tfseg/datasets), e.g. synthetic_cardiac, "
                    "acdc.", **_F)
flags.DEFINE_string("data_dir", None, "Raw data folder as downloaded (not needed for synthetic "
                    "datasets).", **_F)
flags.DEFINE_string("run_dir", None, "Output folder; default runs/<dataset>/<split>/<method>/"
                    "seed<seed>.", **_F)
flags.DEFINE_string("records_root", "records", "Folder of preprocessed records and splits.", **_F)
flags.DEFINE_string("records_dir", None, "Use this preprocessed records folder instead of "
                    "preprocessing on first use.", **_F)
flags.DEFINE_integer("labeled", None, "Draw a split with this many labeled patients.", **_F)
flags.DEFINE_float("labeled_fraction", None, "Instead of --labeled: a patient-level 7:1:2 "
                  "split (test 20%, val 10%) with this fraction of the training patients "
                  "labeled, e.g. 0.1 (DMNet's protocol).", **_F)
flags.DEFINE_bool("deterministic", False, "TensorFlow op determinism: the same command and "
                  "seed give the same weights and test metrics on the same machine (slower; "
                  "recorded in config.json).", **_F)
flags.DEFINE_bool("allow_skips", False, "Preprocessing on first use goes on without subjects "
                  "that cannot be read (listed in config.json as skipped_subjects) instead of "
                  "stopping.", **_F)
flags.DEFINE_integer("split_seed", 0, "Seed of the drawn split.", **_F)
flags.DEFINE_integer("test_seed", None, "Draw the test and validation patients with this seed "
                     "(the labeled ones still with --split_seed), so runs of different split "
                     "seeds are scored on the same test set. Default: --split_seed.", **_F)
flags.DEFINE_integer("num_val", None, "Validation patients of a drawn split (default: 10%).",
                     **_F)
flags.DEFINE_integer("num_test", None, "Test patients of a drawn split (default: 25%).", **_F)
flags.DEFINE_string("split", None, "A published split name (e.g. c1) or a split JSON file, "
                    "instead of --labeled.", **_F)
flags.DEFINE_integer("seed", None, "Training seed; default --split_seed.", **_F)
flags.DEFINE_integer("steps", None, "Training steps (default: the method's).", **_F)
flags.DEFINE_integer("validation_every", None, "Steps between validation rounds (default: the "
                     "method's).", **_F)
flags.DEFINE_string("preset", None, "Named set of method settings, e.g. quick.", **_F)
flags.DEFINE_multi_string("set", [], "Override a method setting: --set=name=value (repeatable).",
                          **_F)
flags.DEFINE_enum("distribute", "none", ["none", "mirrored", "multi_worker"],
                  "Distribution strategy (multi_worker reads TF_CONFIG).", **_F)
flags.DEFINE_enum("mixed_precision", "auto", ["auto", "none", "bf16"],
                  "auto (default): bf16 where the hardware runs it natively (CPU "
                  "avx512_bf16/amx_bf16, GPU compute capability >= 8.0), else none (float32); "
                  "bf16: mixed_bfloat16 compute (float32 variables and losses). config.json "
                  "records both.", **_F)
flags.DEFINE_string("phase", None, "Cardiac phase for ACDC-style datasets: ES, ED or both.", **_F)
flags.DEFINE_multi_string("dataset_option", [], "Dataset option: --dataset_option=name=value "
                          "(repeatable), e.g. target=binary or modalities=t1ce,t2,flair for "
                          "brats.", **_F)
flags.DEFINE_boolean("n4", True, "N4 bias-field correction during preprocessing (MR).", **_F)
flags.DEFINE_integer("preprocess_workers", 1, "Subjects preprocessed in parallel.", **_F)
flags.DEFINE_boolean("evaluate", True, "Evaluate on the test split after training.", **_F)
flags.DEFINE_boolean("export", True, "Export the SavedModel after training.", **_F)
flags.DEFINE_string("target_dataset", None, "A second data domain (e.g. the unlabeled target of "
                    "domain adaptation): its dataset name. Preprocessed into its own records "
                    "with its own split; its test patients are evaluated into <run_dir>/target/.",
                    **_F)
flags.DEFINE_string("target_data_dir", None, "Raw data folder of --target_dataset.", **_F)
flags.DEFINE_string("target_records_dir", None, "Preprocessed records of --target_dataset.",
                    **_F)
flags.DEFINE_string("target_split", None, "Split JSON file (or published name) of the target "
                    "domain; default: drawn with --split_seed (test/val from its annotated "
                    "patients, every other patient unlabeled).", **_F)
flags.DEFINE_multi_string("target_option", [], "Option of --target_dataset: --target_option="
                          "name=value (repeatable), e.g. phase=ED.", **_F)
flags.DEFINE_enum("adapt", None, ["cyclegan", "none"], "Domain adaptation of a method that has "
                  "it (mixmatch): cyclegan translates the target domain into the source domain "
                  "first, none skips it. Same as --set=adapt=...", **_F)
flags.DEFINE_integer("summary_every", 50, "Steps between training scalars in TensorBoard.", **_F)


def main(argv) -> int:
    _common.setup_environment()
    _common.parse_flags(FLAGS, argv, PROGRAM)
    if FLAGS.adapt is not None:  # sugar for --set=adapt=...
        FLAGS.set = [*FLAGS.set, f"adapt={FLAGS.adapt}"]
    overrides = _common.check_method_flags(FLAGS, PROGRAM)

    from tfseg.train import TrainConfig, run_training
    try:
        config = TrainConfig(
            method=FLAGS.method, dataset=FLAGS.dataset,
            dataset_options={**_common.parse_options(FLAGS.dataset_option, PROGRAM,
                                                     "--dataset_option"),
                             **({"phase": FLAGS.phase} if FLAGS.phase else {})},
            data_dir=FLAGS.data_dir, records_root=FLAGS.records_root,
            records_dir=FLAGS.records_dir, run_dir=FLAGS.run_dir,
            split=FLAGS.split, labeled=FLAGS.labeled, labeled_fraction=FLAGS.labeled_fraction,
            allow_skips=FLAGS.allow_skips, deterministic=FLAGS.deterministic,
            split_seed=FLAGS.split_seed, test_seed=FLAGS.test_seed,
            num_val=FLAGS.num_val, num_test=FLAGS.num_test, steps=FLAGS.steps,
            validation_every=FLAGS.validation_every, seed=FLAGS.seed,
            distribute=FLAGS.distribute, mixed_precision=FLAGS.mixed_precision,
            preset=FLAGS.preset, overrides=overrides, n4=FLAGS.n4,
            preprocess_workers=FLAGS.preprocess_workers, evaluate=FLAGS.evaluate,
            export=FLAGS.export, verbose=_common.progress_verbosity(),
            summary_every=FLAGS.summary_every, target_dataset=FLAGS.target_dataset,
            target_data_dir=FLAGS.target_data_dir, target_records_dir=FLAGS.target_records_dir,
            target_split=FLAGS.target_split,
            target_dataset_options=_common.parse_options(FLAGS.target_option, PROGRAM,
                                                         "--target_option"))
        summary = run_training(config)
    except (ValueError, FloatingPointError) as error:
        _common.fail(PROGRAM, str(error), exit_code=1)
    _print_summary(summary)
    return 0


def _print_summary(summary) -> None:
    if summary.get("best_val_mean_dice") is not None:
        print(f"Best validation mean Dice {summary['best_val_mean_dice']:.4f} at step "
              f"{summary['best_step']}.")
    test = summary.get("test")
    if test:
        classes = ", ".join(f"{name} {values['dice']['mean']:.4f}"
                            for name, values in test["classes"].items())
        print(f"Test mean Dice {test['mean_dice']:.4f} over {test['num_subjects']} subjects "
              f"({classes}).")
    target = summary.get("test_target")
    if target:
        print(f"Target-domain test mean Dice {target['mean_dice']:.4f} over "
              f"{target['num_subjects']} subjects.")
    if summary.get("export_path"):
        print(f"Exported: {summary['export_path']}")
    print(f"Run folder: {summary['run_dir']}")


if __name__ == "__main__":
    sys.exit(main(sys.argv))
