"""Export a trained run's segmentor as a SavedModel in the TF Serving layout.

    python -m launch.export --run_dir=runs/acdc/c1/supervised/seed0 [--version=2]
    python -m launch.export --run_dir=RUN_OF_CYCLEGAN --translator=target_to_source

Writes <run_dir>/export/<dataset>_<method>/<version>/ (saved_model.pb, variables/,
assets/preprocessing.json). Serve it with TF Serving (model_base_path=<run_dir>/export/<name>) or
predict new scans with `python -m launch.predict --model=<that folder> --input=scan.nii.gz`.
"""
from __future__ import annotations

import sys

from absl import flags

from launch import _common

PROGRAM = "launch.export"
FLAGS = flags.FlagValues()
_F = dict(flag_values=FLAGS)

flags.DEFINE_string("run_dir", None, "Run folder written by launch.train.", **_F)
flags.DEFINE_integer("version", 1, "TF Serving version number (the folder name).", **_F)
flags.DEFINE_enum("translator", None, ["target_to_source", "source_to_target"], "Export this "
                  "direction's CycleGAN generator instead of a segmentor (runs of --method="
                  "cyclegan or mixmatch --adapt=cyclegan), for launch.translate --model=<export>.",
                  **_F)
flags.DEFINE_boolean("overwrite", True, "Replace an existing export of this version "
                     "(atomically).", **_F)


def main(argv) -> int:
    _common.setup_environment()
    _common.parse_flags(FLAGS, argv, PROGRAM)
    if not FLAGS.run_dir:
        _common.fail(PROGRAM, "--run_dir is required: the folder written by launch.train.")
    if FLAGS.version < 1:
        _common.fail(PROGRAM, f"--version={FLAGS.version}: expected a positive integer.")
    from tfseg.export import export_run  # after the environment is set: imports TF
    from tfseg.translate import export_translator

    try:
        if FLAGS.translator:
            path = export_translator(FLAGS.run_dir, FLAGS.translator, version=FLAGS.version,
                                     overwrite=FLAGS.overwrite)
        else:
            path = export_run(FLAGS.run_dir, version=FLAGS.version, overwrite=FLAGS.overwrite)
    except ValueError as error:
        _common.fail(PROGRAM, str(error))
    print(f"Exported: {path}")
    print(f"Inspect: saved_model_cli show --dir {path} --tag_set serve "
          "--signature_def serving_default")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
