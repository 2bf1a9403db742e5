"""Translate scans between a run's two domains with its CycleGAN (the library side of
`launch.translate`).

The model is a run folder of `--method=cyclegan` or `--method=mixmatch --adapt=cyclegan`: its
generators come from the finished CycleGAN stage's checkpoint (`checkpoints/stages/
<i>_cyclegan.weights.h5`, so a MixMatch run can translate while its second stage still trains)
or else the selected checkpoint (`checkpoints/best.weights.h5`). Or it is an exported translator
(`export_translator`, `launch.export --translator=DIRECTION`): a SavedModel of one direction's
generator, `<run_dir>/export/<dataset>_<method>_<direction>/<version>/`, whose
`serving_default` signature takes `image` (B, H, W, C) float32 in preprocessed units (any H, W:
padded to the generator's multiple of 4 and cropped back) and returns `translation` of the same
shape, with `assets/preprocessing.json` (`"kind": "translator"`, the direction, and the input
domain's preprocessing) so that `launch.translate --model=<export>` needs no run folder, no
method code and no records.

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

__all__ = ["DIRECTIONS", "export_translator", "load_translator", "translate_inputs"]

DIRECTIONS = ("target_to_source", "source_to_target")
TRANSLATOR_KIND = "translator"
SIZE_MULTIPLE = 4  # two stride-2 convolutions in the ResNet generator


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


def load_translator(model: str, direction: str = "target_to_source"):
    """A run's generator (or an exported translator) for `direction`, as a predict-style model
    of the input domain.

    Args:
      model: a run folder, or an export written by `export_translator` (its version folder or
        the folder of versions).
      direction: for a run, the generator to use; an export holds one direction and must match.

    Returns:
      A `tfseg.predict.ExportedModel` whose `probabilities` is the translation (B, H, W, C) ->
      (B, H, W, C) in preprocessed intensities and whose assets/preprocessing are the input
      domain's.

    Raises:
      ValueError: a folder that is neither a run nor a translator export (a segmentation export
        says so), a run without CycleGAN (naming its method), a run without a target domain for
        the target's direction, missing weights, or an export of the other direction.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction={direction!r}; choose one of {list(DIRECTIONS)}.")
    if os.path.isdir(model) and not os.path.isfile(os.path.join(model, "config.json")):
        return _load_exported_translator(model, direction)
    translate, assets, dataset, config = _run_translator(model, direction)
    from tfseg.predict import ExportedModel

    return ExportedModel(path=model, probabilities=translate, assets=assets, dataset=dataset,
                         config=config)


def _run_translator(run_dir: str, direction: str):
    """(translate function, assets, Dataset facts, PreprocessConfig) of a run's generator."""
    import tensorflow as tf

    from preprocessing import PreprocessConfig
    from tfseg.data.pipeline import load_manifest
    from tfseg.data.spec import manifest_raw_to_class
    from tfseg.datasets import Dataset
    from tfseg.export import preprocessing_assets
    from tfseg.methods import DataSpec, config_from_dict, get_method_module
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
    translate.generator = generator
    return (translate, assets, config_from_dict(Dataset, facts),
            config_from_dict(PreprocessConfig, assets["settings"]))


def export_translator(run_dir: str, direction: str = "target_to_source", version: int = 1,
                      overwrite: bool = True) -> str:
    """Exports one direction's generator of a CycleGAN run as a SavedModel (module docstring).

    Returns:
      The version folder `<run_dir>/export/<dataset>_<method>_<direction>/<version>/`.

    Raises:
      ValueError: see `load_translator`; a bad version; an existing export without `overwrite`.
    """
    import tensorflow as tf

    from tfseg.export import check_version, crop_like, pad_to_multiple, write_saved_model

    check_version(version)
    translate, assets, _, _ = _run_translator(run_dir, direction)
    method, generator = translate.method, translate.generator
    channels = int(method.data_spec.num_channels)
    from tfseg.run import read_config

    config = read_config(run_dir)
    name = f"{config.get('dataset', 'run')}_{config['method']}_{direction}"
    export_dir = os.path.abspath(os.path.join(run_dir, "export", name, str(version)))
    if os.path.exists(export_dir) and not overwrite:
        raise ValueError(f"{export_dir} already exists. Export under another version "
                         "(--version) or pass --overwrite to replace it.")
    signature = tf.TensorSpec([None, None, None, channels], tf.float32, name="image")

    def serve(image):
        checks = [tf.debugging.assert_equal(
                      tf.shape(image)[-1], channels,
                      message=f"image must have {channels} channel(s) "
                              f"({', '.join(assets.get('modalities') or [])}) on its last axis"),
                  tf.debugging.assert_all_finite(image, message="image has NaN or infinite "
                                                                "values; fix the scan first")]
        with tf.control_dependencies(checks):
            image = tf.identity(image)
        padded = pad_to_multiple(image, 2, SIZE_MULTIPLE)
        translated = method.from_gan_range(
            generator(method.to_gan_range(padded), training=False))
        return {"translation": crop_like(translated, image)}

    return write_saved_model(export_dir, generator, serve, signature,
                             dict(assets, kind=TRANSLATOR_KIND))


def _load_exported_translator(path: str, direction: str):
    import json

    from tfseg.export import PREPROCESSING_ASSET
    from tfseg.predict import _version_folder, load_exported_model

    version = _version_folder(path)
    try:
        with open(os.path.join(version, PREPROCESSING_ASSET), encoding="utf-8") as f:
            kind = json.load(f).get("kind")
    except (OSError, ValueError, AttributeError):
        kind = None  # load_exported_model names what is wrong with the folder
    if kind != TRANSLATOR_KIND and os.path.isfile(os.path.join(version, PREPROCESSING_ASSET)):
        raise ValueError(f"{version} is a segmentation export, not a translator; export one "
                         "with `python -m launch.export --run_dir=<CycleGAN run> "
                         "--translator=target_to_source`, or pass the run folder.")
    model = load_exported_model(version, output="translation")
    if model.assets.get("direction") != direction:
        raise ValueError(f"{model.path} translates {model.assets.get('direction')}, not "
                         f"{direction}; pass --direction={model.assets.get('direction')} or "
                         "export the other direction.")
    return model


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
