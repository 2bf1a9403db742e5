"""Translate scans between the two domains of a CycleGAN run; outputs keep each scan's geometry.

    python -m launch.translate --model=runs/.../mixmatch/seed0 --input=scan_t1.nii.gz,... \
        --output=out/
    python -m launch.translate --model=RUN_DIR --input=/data/target --dataset=brats --output=out/
    python -m launch.translate --model=RUN_DIR --direction=source_to_target --input=... --output=...

--model: a run folder of --method=cyclegan or --method=mixmatch --adapt=cyclegan, or a translator
exported from one (`launch.export --run_dir=RUN --translator=target_to_source`). --input as for
launch.predict: one scan file, comma-separated files in the domain's modality order, a DICOM
series folder, or with --dataset a folder in that dataset's layout. The scans are preprocessed as
the run's input domain was (target for target_to_source), translated slice by slice, and written
as <output>/<subject>_translated.nii.gz (one channel per modality, preprocessed intensity units)
on the scan's own grid.
"""
from __future__ import annotations

import sys

from absl import flags

from launch import _common

PROGRAM = "launch.translate"
FLAGS = flags.FlagValues()
_F = dict(flag_values=FLAGS)

flags.DEFINE_string("model", None, "Run folder of --method=cyclegan or --method=mixmatch "
                    "--adapt=cyclegan, or a translator export (launch.export --translator).",
                    **_F)
flags.DEFINE_string("input", None, "Scan file, comma-separated files in modality order, DICOM "
                    "folder, or dataset folder (with --dataset).", **_F)
flags.DEFINE_string("output", None, "Output folder for <subject>_translated.nii.gz.", **_F)
flags.DEFINE_enum("direction", "target_to_source", ["target_to_source", "source_to_target"],
                  "Translation direction (target_to_source: what MixMatch trains on).", **_F)
flags.DEFINE_string("dataset", None, "Dataset layout of a folder --input, e.g. brats, folder.",
                    **_F)
flags.DEFINE_integer("tile_batch", 4, "Slices per generator call.", **_F)


def main(argv) -> int:
    _common.setup_environment()
    _common.parse_flags(FLAGS, argv, PROGRAM)
    for name in ("model", "input", "output"):
        if not FLAGS[name].value:
            _common.fail(PROGRAM, f"--{name} is required (see --help).")
    from tfseg.translate import translate_inputs  # after the environment is set: imports TF

    try:
        written = translate_inputs(FLAGS.model, FLAGS.input, FLAGS.output,
                                   direction=FLAGS.direction, dataset_name=FLAGS.dataset,
                                   tile_batch=FLAGS.tile_batch)
    except ValueError as error:
        _common.fail(PROGRAM, str(error))
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
