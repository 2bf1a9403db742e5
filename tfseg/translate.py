"""Translate scans between a run's two domains with its CycleGAN (the library side of
`launch.translate`).

The model is a run folder of `--method=cyclegan` or `--method=mixmatch --adapt=cyclegan`: its
generators come from the finished CycleGAN stage's checkpoint (`checkpoints/stages/
<i>_cyclegan.weights.h5`, so a MixMatch run can translate while its second stage still trains)
or else the selected checkpoint (`checkpoints/best.weights.h5`).

Each scan goes through the same steps as `launch.predict` (`tfseg.predict`: `find_scans`,
`read_scan`; `preprocessing.preprocess_volume` with the settings recorded in the input domain's
records manifest, N4 and percentile normalisation included; slice-wise `inference.predict_volume`;
`preprocessing.restore_geometry` back onto the scan's own grid), with the generator in place of
the segmentor. Target -> source (the direction MixMatch uses) reads target-domain scans with the
target's preprocessing and writes them as the source domain would look; source -> target the
reverse. Output: `<output>/<subject>_translated.nii.gz`, one channel per modality (the domain's
modality order, as in `assets`), in **preprocessed intensity units** (foreground percentiles 2/98
of the input domain -> 0/1, as the networks see them), on the input's exact geometry; voxels
outside the processed crop are 0.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np
from absl import logging

__all__ = ["DIRECTIONS", "load_translator", "translate_inputs"]

DIRECTIONS = ("target_to_source", "source_to_target")


def _checkpoint(run_dir: str) -> str:
    stages = os.path.join(run_dir, "checkpoints", "stages")
    if os.path.isdir(stages):
        finished = sorted(n for n in os.listdir(stages) if n.endswith("_cyclegan.weights.h5"))
        if finished:
            return os.path.join(stages, finished[-1])
    best = os.path.join(run_dir, "checkpoints", "best.weights.h5")
    if not os.path.isfile(best):
        raise ValueError(f"{run_dir} has no finished CycleGAN stage (checkpoints/stages/"
                         "*_cyclegan.weights.h5) nor checkpoints/best.weights.h5: resume its "
                         "training with launch.train first.")
    return best


def load_translator(run_dir: str, direction: str = "target_to_source"):
    """The run's generator for `direction` and a predict-style model of the input domain.

    Returns:
      A `tfseg.predict.ExportedModel` whose `probabilities` is the translation (B, H, W, C) ->
      (B, H, W, C) in preprocessed intensities and whose assets/preprocessing are the input
      domain's.

    Raises:
      ValueError: a folder that is not a run, a run without CycleGAN (naming its method), a
        run without a target domain for the target's direction, or missing weights.
    """
    import tensorflow as tf

    from preprocessing import PreprocessConfig
    from tfseg.data.pipeline import load_manifest
    from tfseg.data.spec import manifest_raw_to_class
    from tfseg.datasets import Dataset
    from tfseg.export import preprocessing_assets
    from tfseg.methods import DataSpec, config_from_dict, get_method_module
    from tfseg.predict import ExportedModel
    from tfseg.run import RunInfo, domain_records, read_config

    if direction not in DIRECTIONS:
        raise ValueError(f"direction={direction!r}; choose one of {list(DIRECTIONS)}.")
    if not os.path.isdir(run_dir):
        raise ValueError(f"--model={run_dir} does not exist; point it at a run folder of "
                         "--method=cyclegan or --method=mixmatch --adapt=cyclegan.")
    config = read_config(run_dir)
    settings = config["method_config"]
    if config["method"] not in ("cyclegan", "mixmatch") or settings.get("adapt",
                                                                      "cyclegan") != "cyclegan":
        raise ValueError(f"The run in {run_dir} (method {config['method']}"
                         f"{', adapt=' + settings['adapt'] if 'adapt' in settings else ''}) has "
                         "no CycleGAN; translate with a run of --method=cyclegan or "
                         "--method=mixmatch --adapt=cyclegan.")
    domain = "target" if direction == "target_to_source" else "source"
    if domain == "target" and not config.get("target"):
        logging.warning("The run has no target domain: target scans are preprocessed with the "
                        "source's settings.")
        domain = "source"
    records_dir, split = domain_records(config, domain)
    module = get_method_module(config["method"])
    data_spec = DataSpec.from_dict(config["data_spec"])
    method = module.build(config_from_dict(module.Config, settings), data_spec)
    method.compile()
    method.load_weights(_checkpoint(run_dir))
    generator = (method.gen_target_to_source if direction == "target_to_source"
                 else method.gen_source_to_target)

    @tf.function(reduce_retracing=True)
    def translate(images):
        images = method.to_gan_range(images)
        return method.from_gan_range(generator(images, training=False))

    manifest = load_manifest(records_dir)
    run = RunInfo(run_dir=run_dir, config=config, domain=domain, manifest=manifest,
                  records_dir=records_dir, split=split, data_spec=data_spec, predictor=None,
                  spatial_dims=2, modalities=tuple(manifest["modalities"]),
                  class_names=tuple(data_spec.class_names),
                  label_values=tuple(int(v) for v in manifest["label_values"]),
                  raw_to_class=manifest_raw_to_class(manifest), patch_size_zyx=None,
                  size_multiple=4)
    assets = dict(preprocessing_assets(run), direction=direction)
    known = {f.name for f in dataclasses.fields(Dataset)}
    facts = {k: v for k, v in assets["dataset_facts"].items() if k in known}
    if facts.get("label_map") is not None:
        facts["label_map"] = {int(k): int(v) for k, v in facts["label_map"].items()}
    translate.method = method  # keeps the networks alive with the function
    return ExportedModel(path=run_dir, probabilities=translate, assets=assets,
                         dataset=config_from_dict(Dataset, facts),
                         config=config_from_dict(PreprocessConfig, assets["settings"]))


def translate_scan(model, scan, *, tile_batch: int = 4) -> tuple[np.ndarray, Any]:
    """One scan: (translated (z, y, x, C) float32 on the scan's grid, its geometry)."""
    from preprocessing import preprocess_volume, restore_geometry
    from tfseg.inference import predict_volume
    from tfseg.predict import read_scan

    images, metas, sources = read_scan(scan, model)
    processed = preprocess_volume(images, metas, None, model.dataset, model.config,
                                  sources=sources)
    del images
    translated = predict_volume(model.probabilities, processed.image, 2, tile_batch=tile_batch,
                                size_multiple=4, outputs="probabilities")
    original = dataclasses.replace(metas[0], num_channels=translated.shape[-1])
    restored = restore_geometry(translated, processed.geometry,
                                dataclasses.replace(metas[0], num_channels=1),
                                is_probability=True, background=False)
    return restored.astype(np.float32), original


def translate_inputs(run_dir: str, input_spec: str, output_dir: str, *,
                     direction: str = "target_to_source", dataset_name: str | None = None,
                     tile_batch: int = 4) -> list[str]:
    """Translates every scan of `input_spec` (a file, files in modality order, a DICOM folder or,
    with `dataset_name`, a folder in that dataset's layout) into
    `<output_dir>/<subject>_translated.nii.gz`.

    Returns:
      The written paths.

    Raises:
      ValueError: see `load_translator`, `tfseg.predict.find_scans` / `read_scan`; with several
        scans, one message listing the failed ones after writing the others.
    """
    from tfseg.io import write_image
    from tfseg.predict import find_scans, for_each_scan

    model = load_translator(run_dir, direction)
    scans = find_scans(input_spec, model, dataset_name)

    def process(scan) -> list[str]:
        translated, meta = translate_scan(model, scan, tile_batch=tile_batch)
        path = os.path.join(output_dir, f"{scan.subject_id}_translated.nii.gz")
        write_image(translated if translated.shape[-1] > 1 else translated[..., 0],
                    meta if translated.shape[-1] > 1
                    else dataclasses.replace(meta, num_channels=1), path)
        return [path]

    return for_each_scan(scans, process, output_dir)
