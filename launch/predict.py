"""Segment new scans with an exported model; outputs keep each scan's exact geometry.

    python -m launch.predict --model=runs/.../export/acdc_supervised/1 --input=scan.nii.gz \
        --output=out/
    python -m launch.predict --model=... --input=t1.nii.gz,t2.nii.gz --output=out/
    python -m launch.predict --model=... --input=/data/Task05_Prostate --dataset=msd_prostate \
        --output=out/

--input: one scan file (a multi-channel file supplies every modality), comma-separated files in
the model's modality order (see assets/preprocessing.json), a DICOM series folder, or, with
--dataset, a folder in that dataset's public layout (every subject found is predicted). Writes
<output>/<subject>_seg.nii.gz with the dataset's label values (and, with --overlays, the
montage <output>/<subject>_overlay.png).
"""
from __future__ import annotations

import sys

from absl import flags

from launch import _common

PROGRAM = "launch.predict"
FLAGS = flags.FlagValues()
_F = dict(flag_values=FLAGS)

flags.DEFINE_string("model", None, "Export folder export/<name>/<version> (or export/<name>: "
                    "the highest version).", **_F)
flags.DEFINE_string("input", None, "Scan file, comma-separated files in modality order, DICOM "
                    "folder, or dataset folder (with --dataset).", **_F)
flags.DEFINE_string("output", None, "Output folder for <subject>_seg.nii.gz.", **_F)
flags.DEFINE_string("dataset", None, "Dataset layout of a folder --input, e.g. folder, acdc.",
                    **_F)
flags.DEFINE_integer("tile_batch", 4, "Slices (2D) or sliding-window tiles (3D) per call.", **_F)
flags.DEFINE_boolean("flip_tta", False, "Average the probabilities over in-plane flips.", **_F)
flags.DEFINE_list("tile_size", None, "3D sliding-window tile D,H,W (default: the export's "
                  "tile_size_zyx, the training patch; larger tiles are faster but change the answer).", **_F)
flags.DEFINE_boolean("overlays", False, "Also write <subject>_overlay.png beside each "
                     "prediction: its contours on evenly spaced slices of the scan.", **_F)
flags.DEFINE_integer("frame", None, "For 4D inputs (e.g. a cine series): segment this frame "
                     "(0-based) of each input file.", **_F)
flags.DEFINE_float("overlap", None, "3D sliding-window overlap in [0, 1) (default: the "
                   "export's, 0.5).", **_F)


def main(argv) -> int:
    _common.setup_environment()
    _common.parse_flags(FLAGS, argv, PROGRAM)
    for name in ("model", "input", "output"):
        if not FLAGS[name].value:
            _common.fail(PROGRAM, f"--{name} is required (see --help).")
    tile = None
    if FLAGS.tile_size:
        try:
            tile = tuple(int(v) for v in FLAGS.tile_size)
        except ValueError:
            tile = ()
        if len(tile) != 3 or min(tile) < 1:
            _common.fail(PROGRAM, f"--tile_size={','.join(FLAGS.tile_size)}: expected 3 "
                                  "positive integers, e.g. 64,64,64.")
    from tfseg._files import check_writable

    try:  # before the (slow) model load and inference
        check_writable(FLAGS.output, "output folder", "pass a writable --output", create=False)
    except ValueError as error:
        _common.fail(PROGRAM, str(error))
    from tfseg.predict import predict_inputs  # after the environment is set: imports TF

    try:
        written = predict_inputs(FLAGS.model, FLAGS.input, FLAGS.output,
                                 dataset_name=FLAGS.dataset, tile_batch=FLAGS.tile_batch,
                                 flip_tta=FLAGS.flip_tta, tile_size_zyx=tile,
                                 overlap=FLAGS.overlap, overlays=FLAGS.overlays,
                                 frame=FLAGS.frame)
    except ValueError as error:
        _common.fail(PROGRAM, str(error))
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
