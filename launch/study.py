"""Label-efficiency study: every method × number of labeled subjects × repeat as one launch.train
run, then the tables, paired Wilcoxon tests and plots (study.md, study.json, plots/).

    python -m launch.study --dataset=synthetic_cardiac --methods=supervised,self_training \\
        --labeled=1,3 --repeats=3 --preset=quick --non4 --out=studies/cardiac
    python -m launch.study ... --set=filters=8,16,32,64 --set=supervised:augment=affine \\
        --compare=self_training:task_aug
    python -m launch.study --dataset=synthetic_cardiac --labeled=1 --repeats=3 --preset=quick \
        --methods=supervised,RDRI=supervised,task_aug,independent=task_aug \
        --set=supervised:augment=affine --set=RDRI:augment=affine+elastic+intensity \
        --set=independent:joint=false --compare=task_aug:RDRI,task_aug:independent

The study first finds the dataset's records (preprocessing them on first use, into the folder
launch.train would use), then plans every repeat: repeat k draws its labeled subjects with one
split seed (see --draws) and trains every method on them with the same seed (paired comparisons).
With --target_dataset every run also trains with (and is tested on) a second data domain, and
study.md adds a "Target domain" section. Re-running the same command skips finished runs and resumes the unfinished one; --aggregate_only
rewrites the reports from the finished runs (without preprocessing).
"""
from __future__ import annotations

import sys

from absl import flags

from launch import _common

PROGRAM = "launch.study"
FLAGS = flags.FlagValues()
_F = dict(flag_values=FLAGS)

flags.DEFINE_string("dataset", None, "Dataset (module of tfseg/datasets), e.g. synthetic_cardiac.",
                    **_F)
flags.DEFINE_string("data_dir", None, "Raw data folder (not needed for synthetic datasets).", **_F)
flags.DEFINE_string("phase", None, "Cardiac phase for ACDC-style datasets: ES, ED or both.", **_F)
flags.DEFINE_multi_string("dataset_option", [], "Dataset option: --dataset_option=name=value "
                          "(repeatable), e.g. target=binary for brats; passed to every run.",
                          **_F)
flags.DEFINE_string("target_dataset", None, "A second data domain for every run (launch.train's "
                    "--target_dataset); study.md then also reports its test results.", **_F)
flags.DEFINE_string("target_data_dir", None, "Raw data folder of --target_dataset.", **_F)
flags.DEFINE_string("target_records_dir", None, "Preprocessed records of --target_dataset "
                    "(default: launch.train finds or makes them under --records_root).", **_F)
flags.DEFINE_multi_string("target_option", [], "Option of --target_dataset: --target_option="
                          "name=value (repeatable).", **_F)
flags.DEFINE_list("methods", None, "Comma-separated methods, e.g. supervised,self_training; "
                  "label=method adds a method again under another name for its own --set, e.g. "
                  "Aff=supervised,RDRI=supervised,task_aug.", **_F)
flags.DEFINE_list("labeled", None, "Comma-separated numbers of labeled subjects, e.g. 1,3.", **_F)
flags.DEFINE_list("labeled_fraction", None, "Instead of --labeled: fractions of the training "
                  "patients labeled in a patient-level 7:1:2 split, e.g. 0.1,0.3 (DMNet's "
                  "protocol; converted to numbers of labeled patients from the dataset's "
                  "annotated patients).", **_F)
flags.DEFINE_integer("repeats", 3, "Labeled draws (and seeds) per number of labeled subjects.",
                     **_F)
flags.DEFINE_string("out", None, "Study folder: runs/, study.md, study.json, plots/.", **_F)
flags.DEFINE_string("preset", None, "Method preset for every method, e.g. quick.", **_F)
flags.DEFINE_multi_string("set", [], "Method setting: --set=name=value (every method that has "
                          "it) or --set=method:name=value (repeatable).", **_F)
flags.DEFINE_list("compare", [], "Extra method pairs to test, e.g. task_aug:mixmatch (each "
                  "method is tested against --baseline anyway).", **_F)
flags.DEFINE_string("baseline", "supervised", "Method every other method is tested against.",
                    **_F)
flags.DEFINE_integer("steps", None, "Training steps of every run (default: the method's).", **_F)
flags.DEFINE_integer("validation_every", None, "Steps between validation rounds.", **_F)
flags.DEFINE_integer("num_val", None, "Validation patients per draw (default: 10%).", **_F)
flags.DEFINE_integer("num_test", None, "Test patients per draw (default: 25%).", **_F)
flags.DEFINE_integer("seed", 0, "Base seed: repeat 0 uses split and training seed --seed, "
                     "repeat k the seeds after it (see --draws).", **_F)
flags.DEFINE_enum("draws", "distinct", ["distinct", "independent"],
                  "distinct: each repeat's seed is the next one whose labeled subjects differ "
                  "from the earlier repeats'; independent: repeat k uses seed + k (repeats may "
                  "draw the same subjects).", **_F)
flags.DEFINE_boolean("fixed_test", False, "One test and validation set for every repeat, drawn "
                     "with --seed (launch.train --test_seed): only the labeled subjects change "
                     "between draws, so rows of different draws are scored on the same subjects "
                     "(the few-shot GAN paper's protocol).", **_F)
flags.DEFINE_enum("mixed_precision", None, ["auto", "none", "bf16"], "launch.train's "
                  "--mixed_precision for every run (default: launch.train's default); per arm: "
                  "--set=ARM:mixed_precision=bf16.", **_F)
flags.DEFINE_boolean("n4", True, "N4 bias-field correction during preprocessing (MR).", **_F)
flags.DEFINE_string("records_root", "records", "Folder of preprocessed records and splits.", **_F)
flags.DEFINE_integer("preprocess_workers", 1, "Subjects preprocessed in parallel.", **_F)
flags.DEFINE_boolean("export", False, "Export a SavedModel from every run.", **_F)
flags.DEFINE_integer("min_pairs", 5, "Fewer (repeat, subject) pairs than this: the test is n/a.",
                     **_F)
flags.DEFINE_boolean("aggregate_only", False, "Only rewrite the reports from finished runs.",
                     **_F)


def fraction_budgets(dataset_name, data_dir, options, fractions, num_val=None, num_test=None):
    """(labeled counts, num_val, num_test) of `splits.fraction_counts` for each fraction, from
    the number of annotated patients the dataset lists (no preprocessing needed).

    Raises:
      ValueError: for a bad fraction, an unreadable dataset folder, or two fractions giving
        the same number of labeled patients.
    """
    from tfseg.data.splits import fraction_counts
    from tfseg.datasets import get_dataset

    dataset = get_dataset(dataset_name, **options)
    folder = dataset.prepare(data_dir)
    subjects = dataset.resolve(folder).list_subjects(folder)
    pool = len({s.patient_id for s in subjects if s.labeled})
    counts = [fraction_counts(pool, f, num_val, num_test) for f in fractions]
    labeled = tuple(c[0] for c in counts)
    if len(set(labeled)) != len(labeled):
        raise ValueError(f"--labeled_fraction={','.join(map(str, fractions))} gives the same "
                         f"number of labeled patients twice ({labeled}) for {pool} annotated "
                         "patients; choose fractions further apart.")
    return labeled, counts[0][1], counts[0][2]


def main(argv) -> int:
    _common.setup_environment()
    _common.parse_flags(FLAGS, argv, PROGRAM)
    # Cheap checks first: these imports do not load TensorFlow.
    from tfseg.datasets import available_datasets
    from tfseg.methods import available_methods

    for flag in ("dataset", "methods", "out"):
        if not FLAGS[flag].value:
            _common.fail(PROGRAM, f"--{flag} is required (see --help).")
    if bool(FLAGS.labeled) == bool(FLAGS.labeled_fraction):
        _common.fail(PROGRAM, "give either --labeled=N,... or --labeled_fraction=F,... (one).")
    if FLAGS.dataset not in available_datasets():
        _common.fail(PROGRAM, f"unknown --dataset={FLAGS.dataset}. Available: "
                              f"{', '.join(available_datasets())}.")
    from tfseg import study
    try:
        arms = [study.parse_arm(item) for item in FLAGS.methods]
    except ValueError as error:
        _common.fail(PROGRAM, str(error))
    unknown = [m for _, m in arms if m not in available_methods()]
    if unknown:
        _common.fail(PROGRAM, f"unknown method(s) {', '.join(unknown)} in --methods. Available: "
                              f"{', '.join(available_methods())}.")
    if FLAGS.labeled:
        try:
            labeled = tuple(int(n) for n in FLAGS.labeled)
        except ValueError:
            _common.fail(PROGRAM, f"--labeled={','.join(FLAGS.labeled)}: expected integers, e.g. "
                                  "--labeled=1,3.")
    compare = []
    for item in FLAGS.compare:
        pair = tuple(p.strip() for p in item.split(":"))
        if len(pair) != 2:
            _common.fail(PROGRAM, f"--compare={item}: expected method_a:method_b.")
        compare.append(pair)
    overrides = _common.parse_set(FLAGS.set, PROGRAM)
    if FLAGS.mixed_precision:  # first, so that a per-arm --set=ARM:mixed_precision=... wins
        overrides = (f"mixed_precision={FLAGS.mixed_precision}", *overrides)
    dataset_options = {**_common.parse_options(FLAGS.dataset_option, PROGRAM, "--dataset_option"),
                       **({"phase": FLAGS.phase} if FLAGS.phase else {})}
    target_options = _common.parse_options(FLAGS.target_option, PROGRAM, "--target_option")
    num_val, num_test = FLAGS.num_val, FLAGS.num_test
    if FLAGS.labeled_fraction:
        try:
            labeled, num_val, num_test = fraction_budgets(
                FLAGS.dataset, FLAGS.data_dir, dataset_options,
                [float(f) for f in FLAGS.labeled_fraction], num_val, num_test)
        except ValueError as error:
            _common.fail(PROGRAM, str(error))
        _print(f"--labeled_fraction={','.join(FLAGS.labeled_fraction)}: "
               f"{', '.join(map(str, labeled))} labeled patients; {num_val} val, {num_test} test.")
    if FLAGS.target_dataset and FLAGS.target_dataset not in available_datasets():
        _common.fail(PROGRAM, f"unknown --target_dataset={FLAGS.target_dataset}. Available: "
                              f"{', '.join(available_datasets())}.")

    try:
        config = study.StudyConfig(
            dataset=FLAGS.dataset, methods=tuple(FLAGS.methods), labeled=labeled,
            repeats=FLAGS.repeats, out_dir=FLAGS.out, data_dir=FLAGS.data_dir,
            dataset_options=dataset_options, target_dataset=FLAGS.target_dataset,
            target_data_dir=FLAGS.target_data_dir, target_records_dir=FLAGS.target_records_dir,
            target_dataset_options=target_options,
            preset=FLAGS.preset, overrides=overrides, compare=tuple(compare),
            baseline=FLAGS.baseline, steps=FLAGS.steps, validation_every=FLAGS.validation_every,
            n4=FLAGS.n4, num_val=num_val, num_test=num_test,
            records_root=FLAGS.records_root, preprocess_workers=FLAGS.preprocess_workers,
            seed=FLAGS.seed, export=FLAGS.export, min_pairs=FLAGS.min_pairs,
            draws=FLAGS.draws, fixed_test=FLAGS.fixed_test)
        per_method = study.check_config(config)  # names, preset, every --set: before any run
    except ValueError as error:
        _common.fail(PROGRAM, str(error))
    try:
        if FLAGS.aggregate_only:
            result = study.aggregate_study(config, study.plan_study(config, per_method))
        else:
            result = study.run_study(config, progress=_print)
    except ValueError as error:
        _common.fail(PROGRAM, str(error), exit_code=1)
    except KeyboardInterrupt:
        _common.fail(PROGRAM, "interrupted; re-run the same command to resume (finished runs "
                              "are skipped).", exit_code=130)
    _print(f"{result['num_complete']}/{result['num_runs']} runs finished; report: "
           f"{FLAGS.out}/study.md")
    return 0


def _print(line: str) -> None:
    print(line, flush=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
