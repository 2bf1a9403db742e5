"""Preprocess a dataset into TFRecords: one shard per subject + manifest.json.

    python -m launch.preprocess --dataset=acdc --data_dir=/data/ACDC
    python -m launch.preprocess --dataset=iseg2017 --data_dir=/data/iSeg2017 --workers=2
    python -m launch.preprocess --dataset=acdc --data_dir=/data/ACDC --num_shards=4 --shard_index=0

Records go to <records_root>/<dataset>/<fingerprint> unless --out_dir is given; the folder is
printed at the end. Re-running resumes: finished subjects (intact shard, matching sha256) are not
redone. Exit codes: 0 done; 1 some subjects were skipped (listed; pass --allow_skips to accept);
2 nothing could start (bad flag, empty folder, wrong layout for --dataset).
Optional: `launch.train` preprocesses on first use with the same settings.
"""
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import importlib  # noqa: E402
import inspect  # noqa: E402
import sys  # noqa: E402
from typing import Sequence  # noqa: E402

from launch import _common  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from preprocessing import (PreprocessConfig, SubjectsSkippedError, merge_manifests,  # noqa: E402
                           preprocess_dataset)
from tfseg.datasets import available_datasets, get_dataset  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("dataset", None, "Dataset key, e.g. acdc, iseg2017, mrbrains13, folder, "
                    "synthetic_cardiac.")
flags.DEFINE_string("data_dir", None, "The dataset folder exactly as downloaded and unpacked "
                    "(synthetic datasets: where to generate; default ~/.cache/tfseg/<dataset>).")
flags.DEFINE_string("out_dir", None, "Records folder. Default: "
                    "<records_root>/<dataset>/<fingerprint of the settings>.")
flags.DEFINE_string("records_root", "records", "Root of the default records folders.")
flags.DEFINE_integer("workers", 1, "Subjects processed in parallel (one process each).",
                     lower_bound=1)
flags.DEFINE_bool("n4", True, "N4 bias-field correction for MR datasets (CT datasets never "
                  "use it).")
flags.DEFINE_integer("n4_shrink", None, "Shrink factor of the N4 fit. Default: the dataset's "
                     "(4 for 3D, 2 for 2D).", lower_bound=1)
flags.DEFINE_multi_string("dataset_option", [], "Dataset option: --dataset_option=name=value "
                          "(repeatable), e.g. target=binary for brats.")
flags.DEFINE_string("phase", None, "Datasets with cardiac phases (acdc): ES, ED or both. "
                    "Default: the dataset's.")
flags.DEFINE_integer("num_shards", 1, "Split the subjects over this many machines.",
                     lower_bound=1)
flags.DEFINE_integer("shard_index", 0, "This machine's share: subjects i with i % num_shards == "
                     "shard_index.", lower_bound=0)
flags.DEFINE_bool("allow_skips", False, "Exit 0 even if some subjects were skipped.")
flags.DEFINE_list("target_spacing", None, "2D datasets: in-plane spacing in mm, 'x,y' or one "
                  "value for both. Default: the dataset's.")
flags.DEFINE_list("crop_size", None, "2D datasets: crop/pad size 'rows,cols' or one value. "
                  "Default: the dataset's.")
flags.DEFINE_list("patch_size", None, "3D datasets: training patch 'z,y,x' or one value. "
                  "Default: the dataset's (32).")
flags.DEFINE_list("patch_stride", None, "3D datasets: patch grid stride 'z,y,x' or one value. "
                  "Default: the dataset's (8).")
flags.DEFINE_bool("merge_manifests", False, "Only join the manifest-<k>-of-<n>.json parts in "
                  "--out_dir into manifest.json (after copying every shard's output there).")


def _values(name: str, kind: type, length: int) -> tuple | None:
    raw = FLAGS[name].value
    if raw is None:
        return None
    try:
        values = tuple(kind(v) for v in raw)
    except ValueError:
        raise ValueError(f"--{name}={','.join(raw)}: expected {length} numbers or one.") from None
    if len(values) == 1:
        values = values * length
    if len(values) != length:
        raise ValueError(f"--{name}={','.join(raw)}: expected {length} numbers or one.")
    return values


def _config() -> PreprocessConfig:
    return PreprocessConfig(n4=FLAGS.n4, n4_shrink=FLAGS.n4_shrink,
                            target_spacing_xy=_values("target_spacing", float, 2),
                            crop_size_yx=_values("crop_size", int, 2),
                            patch_size_zyx=_values("patch_size", int, 3),
                            patch_stride_zyx=_values("patch_stride", int, 3))


def _dataset_options(name: str) -> dict:
    """The dataset options set by flags, checked against what `make_dataset` accepts."""
    options = {}
    for item in FLAGS.dataset_option:
        option, sep, value = item.partition("=")
        if not sep or not option.strip():
            raise ValueError(f"--dataset_option={item!r}: expected --dataset_option=name=value.")
        options[option.strip()] = value.strip()
    if FLAGS.phase is not None:
        options["phase"] = FLAGS.phase
    if name not in available_datasets():
        raise ValueError(f"Unknown --dataset={name}. Available: "
                         f"{', '.join(available_datasets())}.")
    module = importlib.import_module(f"tfseg.datasets.{name}")
    accepted = (inspect.signature(module.make_dataset).parameters
                if hasattr(module, "make_dataset") else {})
    for option in options:
        if option not in accepted:
            raise ValueError(f"--{option} does not apply to dataset {name!r} (it has no "
                             f"{option} option); drop the flag.")
    return options


def _parse(argv: Sequence[str]) -> bool:
    """Parses the command line; False (after printing why) if it is invalid."""
    FLAGS.unparse_flags()
    try:
        FLAGS(list(argv))
    except flags.Error as error:
        print(f"{argv[0] if argv else 'preprocess'}: {error}\nPass --help to see every flag.",
              file=sys.stderr)
        return False
    if FLAGS["verbosity"].using_default_value:
        FLAGS.verbosity = 0  # progress lines are INFO
    return True


def main(argv: Sequence[str]) -> int:
    """Runs the preprocessing for a full command line (program name first).

    Returns:
      The exit code: 0 done, 1 subjects skipped (without --allow_skips), 2 could not start,
      128 + signal number when stopped by SIGTERM (workers stopped; re-run to resume).
    """
    _common.setup_environment()
    if not _parse(argv):
        return 2
    if FLAGS.merge_manifests:
        if not FLAGS.out_dir or FLAGS.num_shards < 2:
            logging.error("--merge_manifests needs --out_dir and --num_shards >= 2.")
            return 2
        try:
            print(merge_manifests(FLAGS.out_dir, FLAGS.num_shards))
        except ValueError as error:
            logging.error("%s", error)
            return 2
        return 0
    if not FLAGS.dataset:
        logging.error("--dataset is required (one of %s).", ", ".join(available_datasets()))
        return 2
    try:
        options = _dataset_options(FLAGS.dataset)
        out_dir = preprocess_dataset(
            get_dataset(FLAGS.dataset, **options), FLAGS.data_dir, _config(),
            records_root=FLAGS.records_root, out_dir=FLAGS.out_dir, workers=FLAGS.workers,
            num_shards=FLAGS.num_shards, shard_index=FLAGS.shard_index,
            allow_skips=FLAGS.allow_skips, dataset_options=options)
    except SubjectsSkippedError as error:
        logging.error("%s", error)
        print(error.summary.out_dir)
        return 1
    except ValueError as error:  # nothing could start: one line naming the problem and the fix
        logging.error("%s", error)
        return 2
    print(out_dir)
    return 0


def _parse_for_app(argv: Sequence[str]) -> Sequence[str]:
    app.parse_flags_with_usage(list(argv))  # handles --help
    return argv  # main parses again, so that tests can call main(argv) directly


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_for_app)
