"""The run folder: its file names, its config.json, and loading a trained run's predictor.

Everything that reads or writes `<run_dir>/config.json` or the selected weights goes through here
(training writes them; evaluation, export, prediction and studies read them), so the layout lives
in one place (docs/CONTRACTS.md, "Run folder").

`load_run` builds only the network(s) that make the method's segmentation (the method module's
`build_predictor(config, data_spec)`), never its generators, discriminators or optimizers, and
loads the selected checkpoint into them.

A run may have two data domains: the labeled **source** (`config["records_dir"]`, `["split"]`) and
an unlabeled **target** (`config["target"]`: dataset, options, data folder, records folder and
split), e.g. for domain adaptation. `load_run(run_dir, domain="target")` reads the target's records
and label map, with the same predictor.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

from tfseg._files import read_json, write_json_atomic
from tfseg.data.spec import manifest_raw_to_class

__all__ = ["CONFIG_NAME", "PREDICTOR_WEIGHTS", "DOMAINS", "RunInfo", "build_predictor",
           "domain_records", "load_run", "read_config", "write_config"]

CONFIG_NAME = "config.json"
PREDICTOR_WEIGHTS = os.path.join("checkpoints", "predictor.weights.h5")
# Runs written before the predictor existed saved the segmentor alone under this name.
_LEGACY_SEGMENTOR_WEIGHTS = os.path.join("checkpoints", "segmentor.weights.h5")
DOMAINS = ("source", "target")
_REQUIRED = ("method", "method_config", "data_spec", "records_dir")


@dataclasses.dataclass(frozen=True, eq=False)
class RunInfo:
    """A trained run, loaded for one of its data domains.

    Attributes:
      run_dir: the run folder.
      config: config.json as a dict.
      domain: "source" or "target".
      manifest: the domain's records manifest (`tfseg.data.pipeline.load_manifest`).
      records_dir: the domain's records folder.
      split: the domain's split (dict of patient-id lists).
      data_spec: the `DataSpec` the method was built for (targets, outputs, regions).
      predictor: images -> probabilities, with the selected checkpoint's weights.
      spatial_dims: 2 (slice-wise network) or 3.
      modalities: input channel names, in order.
      class_names / label_values: class index -> name / value in the domain's label files.
      raw_to_class: the domain's label file value -> class index.
      patch_size_zyx: 3D: the training patch (the default inference tile); 2D: None.
      size_multiple: spatial sizes the predictor accepts are multiples of this.
    """

    run_dir: str
    config: dict[str, Any]
    domain: str
    manifest: dict[str, Any]
    records_dir: str
    split: dict[str, Any]
    data_spec: Any
    predictor: Any
    spatial_dims: int
    modalities: tuple[str, ...]
    class_names: tuple[str, ...]
    label_values: tuple[int, ...]
    raw_to_class: dict[int, int]
    patch_size_zyx: tuple[int, int, int] | None
    size_multiple: int


def read_config(run_dir: str) -> dict[str, Any]:
    """config.json of a run folder.

    Raises:
      ValueError: naming the file when it is missing, unreadable or lacks the keys training
        writes.
    """
    path = os.path.join(run_dir, CONFIG_NAME)
    if not os.path.isfile(path):
        raise ValueError(f"{run_dir} is not a run folder: no {CONFIG_NAME}. Point --run_dir at a "
                         "folder written by `python -m launch.train`.")
    config = read_json(path)
    missing = [k for k in _REQUIRED if k not in config]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}; it was not written by tfseg's "
                         "training (or by an incompatible version).")
    return config


def write_config(run_dir: str, config: Mapping[str, Any], resume_keys: tuple[str, ...]) -> None:
    """Writes config.json atomically; refuses a folder that holds a run whose `resume_keys`
    differ (another method, dataset, split, target domain...)."""
    path = os.path.join(run_dir, CONFIG_NAME)
    new = json.loads(json.dumps(config, default=str))
    if os.path.isfile(path):
        old = read_json(path)
        differs = [k for k in resume_keys if old.get(k) != new.get(k)]
        if differs:
            raise ValueError(f"{run_dir} already holds a run with other settings (differs in: "
                             f"{', '.join(differs)}). Use another --run_dir, or delete the folder "
                             "to start over.")
    write_json_atomic(path, new, indent=2, sort_keys=True)


def domain_records(config: Mapping[str, Any], domain: str = "source"
                   ) -> tuple[str, dict[str, Any]]:
    """(records folder, split dict) of a run's domain.

    Raises:
      ValueError: for an unknown domain, or "target" in a run without a target domain.
    """
    if domain not in DOMAINS:
        raise ValueError(f"domain={domain!r}; choose one of {list(DOMAINS)}.")
    if domain == "source":
        return config["records_dir"], dict(config.get("split") or {})
    target = config.get("target")
    if not target:
        raise ValueError(f"The run in {config.get('run_dir', '?')} has no target domain (it was "
                         "trained without --target_dataset); evaluate its source domain.")
    return target["records_dir"], dict(target.get("split") or {})


def build_predictor(config: Mapping[str, Any]):
    """The untrained predictor of a run config and its size multiple.

    The method module's `build_predictor(Config, DataSpec)` when it has one (only the networks
    of the segmentation), else `build(...).predictor`.
    """
    from tfseg.inference import infer_size_multiple
    from tfseg.methods import DataSpec, config_from_dict, get_method_module

    module = get_method_module(config["method"])
    method_config = config_from_dict(module.Config, config["method_config"])
    data_spec = DataSpec.from_dict(config["data_spec"])
    if hasattr(module, "build_predictor"):
        predictor = module.build_predictor(method_config, data_spec)
    else:
        predictor = module.build(method_config, data_spec).predictor
    multiple = int(config.get("size_multiple") or 0)
    return predictor, max(multiple, infer_size_multiple(predictor))


def load_run(run_dir: str, domain: str = "source") -> RunInfo:
    """Rebuilds a run's predictor and loads the selected weights; reads the domain's records.

    Raises:
      ValueError: naming the file when config.json, the weights or the records manifest are
        missing or incomplete, the method is unknown, or the run has no such domain.
    """
    from tfseg.data.pipeline import load_manifest
    from tfseg.methods import DataSpec

    config = read_config(run_dir)
    records_dir, split = domain_records(config, domain)
    weights = os.path.join(run_dir, PREDICTOR_WEIGHTS)
    legacy = os.path.join(run_dir, _LEGACY_SEGMENTOR_WEIGHTS)
    if not os.path.isfile(weights) and not os.path.isfile(legacy):
        raise ValueError(f"No predictor weights at {weights}: training has not finished (or "
                         "was interrupted before a checkpoint). Resume it with launch.train.")
    manifest = load_manifest(records_dir)
    predictor, size_multiple = build_predictor(config)
    if os.path.isfile(weights):
        predictor.load_weights(weights)
    else:  # an older run: the segmentor's weights, inside the default predictor
        predictor.get_layer(index=1).load_weights(legacy)
    data_spec = DataSpec.from_dict(config["data_spec"])
    patch = tuple(data_spec.example_shape) if data_spec.spatial_dims == 3 else None
    label_values = tuple(int(v) for v in manifest["label_values"])
    raw_to_class = manifest_raw_to_class(manifest)
    if domain == "target" and manifest.get("class_names"):
        label_values, raw_to_class = target_labels(data_spec.class_names, manifest)
    return RunInfo(run_dir=run_dir, config=config, domain=domain, manifest=manifest,
                   records_dir=records_dir, split=split, data_spec=data_spec,
                   predictor=predictor, spatial_dims=data_spec.spatial_dims,
                   modalities=tuple(manifest["modalities"]),
                   class_names=tuple(data_spec.class_names),
                   label_values=label_values, raw_to_class=raw_to_class,
                   patch_size_zyx=patch, size_multiple=size_multiple)


def target_labels(source_classes, manifest: Mapping[str, Any]
                  ) -> tuple[tuple[int, ...], dict[int, int]]:
    """The target domain's label files read as the source's classes.

    Returns:
      (label_values: per SOURCE class index, the value the target's files use for it, so that
       predictions are written in the target's own label values; raw_to_class: target label
       file value -> SOURCE class index), through `domains.target_class_map`.
    """
    from tfseg.data.domains import target_class_map

    class_map = target_class_map(source_classes, manifest["class_names"],
                                 target=f"target {manifest.get('dataset')!r}")
    values = [int(v) for v in manifest["label_values"]]
    label_values = [0] * len(class_map)
    for target_class, source_class in enumerate(class_map):
        label_values[source_class] = values[target_class]
    raw_to_class = {raw: class_map[c] for raw, c in manifest_raw_to_class(manifest).items()}
    return tuple(label_values), raw_to_class
