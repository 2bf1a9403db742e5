"""Training orchestration: records → split → method → fit() per stage → best checkpoint → test.

`run_training(TrainConfig)` is what `python -m launch.train` calls:
1. creates the distribution strategy (first: multi-worker must precede any other TF op);
2. preprocesses the dataset on first use (cached under `records_root` by a settings fingerprint);
3. resolves the split (published name, split file, or `labeled` patients drawn with `split_seed`)
   and saves it under `records_root/<dataset>/splits/<name>.json`;
4. builds and compiles the method inside the strategy scope, writes `config.json`;
5. runs each of `method.stages()` as one `fit()` (custom loop under multi-worker), one "epoch" per
   validation round, selecting the checkpoint on the validation split only (never test);
6. evaluates the selected segmentor on the test split (`tfseg.evaluate.evaluate_run`) and exports
   it (`tfseg.export.export_run`).
Re-running the same command resumes a killed run from its last validation round (every network,
every optimizer and the best-validation bookkeeping); finished stages are skipped.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from typing import Any, Mapping

import keras
import tensorflow as tf
from absl import logging

import tfseg
from tfseg import callbacks as cb
from tfseg import distribute
from tfseg import hardware
from tfseg._files import check_writable, write_json_atomic
from tfseg.data import domains, pipeline, schema
from tfseg.data import splits as splits_lib
from tfseg.datasets import get_dataset
from tfseg import run as run_folder
from tfseg.methods import DataSpec, get_method_module, resolve_config

MIXED_PRECISION = hardware.MIXED_PRECISION
# Settings that must match for a re-run to resume an existing run folder.
_RESUME_KEYS = ("method", "method_config", "dataset", "dataset_options", "split", "data_spec",
                "pipeline", "target")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs (the flags of launch.train).

    Attributes:
      method / dataset: module names in tfseg.methods / tfseg.datasets.
      dataset_options: e.g. {"phase": "ES"} for ACDC.
      data_dir: raw data folder (None: synthetic datasets generate into their cache).
      records_root: where preprocessed records and splits live.
      records_dir: use this records folder (e.g. from `launch.preprocess --out_dir`) instead of
        preprocessing on first use; its manifest must be of `dataset`.
      run_dir: output folder; None = runs/<dataset>/<split name>/<method>/seed<seed>.
      split: a published split name or a split JSON file; None = draw `labeled` patients (or the
        dataset's default split when `labeled` is None too).
      labeled / split_seed / num_val / num_test: the drawn split (tfseg.data.splits.draw_split).
      test_seed: draw test and validation patients with this seed instead of split_seed, so that
        runs of different split seeds share one test set (a study's `--fixed_test`); the target
        domain's test/val follow it too.
      labeled_fraction: instead of `labeled`, a patient-level 7:1:2 split (test 20%, val 10%)
        with this fraction of the training patients labeled (splits.fraction_counts; DMNet).
      allow_skips: preprocessing on first use goes on without subjects that cannot be read
        (they are left out of the records, hence of every split; config.json lists them as
        "skipped_subjects").
      steps / validation_every: None = the method's defaults.
      seed: training seed (weights, pipeline, augmentation); None = split_seed.
      distribute: "none" | "mirrored" | "multi_worker".
      mixed_precision: "auto" (the default: bf16 where the hardware runs it natively, float32
        elsewhere, `tfseg.hardware`) | "none" (float32) | "bf16" (mixed_bfloat16 compute,
        float32 variables and losses); config.json records the request and the resolved value
        ("mixed_precision").
      deterministic: TensorFlow op determinism (`tf.config.experimental.
        enable_op_determinism`, for the rest of the process): the same command and seed on the
        same machine then give the same weights and test metrics. Off by default because it
        costs speed (docs/performance.md) and because without it runs still match in
        everything but the CPU kernels' floating-point summation order, which makes two runs
        drift apart slowly.
      preset / overrides: method config preset name and "name=value" overrides.
      n4: N4 bias-field correction in preprocessing (MR datasets).
      preprocess_workers: parallel subjects during preprocessing on first use.
      evaluate / export: run the test evaluation / the SavedModel export at the end.
      verbose: Keras progress: 0 silent, 1 bar, 2 one line per round.
      summary_every: steps between training scalars in TensorBoard.
      target_dataset: a second data domain (unlabeled target of domain adaptation): a dataset
        name; None = one domain. Preprocessed into its own records with its own split; the
        pipeline then delivers a `target` stream to methods that ask for one, and the test
        patients of the target split are evaluated too (`<run_dir>/target/`).
      target_data_dir / target_dataset_options / target_records_dir: as data_dir,
        dataset_options and records_dir, for the target domain.
      target_split: a split JSON file (or published name) for the target; None = drawn with
        split_seed: test/val as `draw_split` on the target's annotated patients, every other
        target patient an unlabeled training image.
    """

    method: str
    dataset: str
    dataset_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    data_dir: str | None = None
    records_root: str = "records"
    records_dir: str | None = None
    run_dir: str | None = None
    split: str | None = None
    labeled: int | None = None
    labeled_fraction: float | None = None
    allow_skips: bool = False
    split_seed: int = 0
    test_seed: int | None = None
    num_val: int | None = None
    num_test: int | None = None
    steps: int | None = None
    validation_every: int | None = None
    seed: int | None = None
    distribute: str = "none"
    mixed_precision: str = "auto"
    deterministic: bool = False
    preset: str | None = None
    overrides: tuple[str, ...] = ()
    n4: bool = True
    preprocess_workers: int = 1
    evaluate: bool = True
    export: bool = True
    verbose: int = 2
    summary_every: int = 50
    target_dataset: str | None = None
    target_data_dir: str | None = None
    target_dataset_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    target_records_dir: str | None = None
    target_split: str | None = None

    def __post_init__(self):
        if self.distribute not in distribute.STRATEGIES:
            raise ValueError(f"distribute={self.distribute!r}; choose one of "
                             f"{list(distribute.STRATEGIES)}.")
        hardware.check_mixed_precision(self.mixed_precision)
        for name in ("steps", "validation_every", "labeled"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}.")
        object.__setattr__(self, "overrides", tuple(self.overrides))
        object.__setattr__(self, "dataset_options", dict(self.dataset_options))
        object.__setattr__(self, "target_dataset_options", dict(self.target_dataset_options))
        if self.target_dataset is None and (self.target_data_dir or self.target_records_dir
                                            or self.target_split or self.target_dataset_options):
            raise ValueError("--target_data_dir / --target_records_dir / --target_split need "
                             "--target_dataset (the second domain's dataset).")

    @property
    def training_seed(self) -> int:
        return self.split_seed if self.seed is None else self.seed


def run_training(config: TrainConfig) -> dict[str, Any]:
    """Trains, selects on validation, evaluates on test and exports (see the module docstring).

    Returns:
      {"run_dir", "output_dir" (where this process wrote: run_dir, or a private folder on a
       non-chief worker), "best_val_mean_dice", "best_step", "steps", "train_seconds",
       "checkpoint_policy", "test": the evaluation summary or None, "export_path": str or None}.

    Raises:
      ValueError: for bad settings, data, split, or a run_dir holding a different run.
      FloatingPointError: when a tracked loss becomes non-finite (nothing is exported).
    """
    strategy = distribute.make_strategy(config.distribute)
    chief = distribute.is_chief(strategy)
    module = get_method_module(config.method)
    dataset = get_dataset(config.dataset, **config.dataset_options)
    method_config = method_settings(module, config)

    # Multi-worker: the chief preprocesses while the others wait, so no two processes write
    # (or clean up after) the same records folder.
    if not chief:
        distribute.barrier(strategy)
    records_dir = resolve_records(config, dataset)
    target = (_target_domain(config, pipeline.load_manifest(records_dir)["modalities"])
              if config.target_dataset else None)
    if chief:
        distribute.barrier(strategy)
    manifest = pipeline.load_manifest(records_dir)
    split = _split(config, dataset, manifest)
    data_spec = pipeline.dataset_facts(manifest)
    check_method_supports(module, config.method, data_spec)
    if target is not None:
        _check_target(target, manifest, data_spec)
    run_dir = config.run_dir or os.path.join("runs", config.dataset, split.name, config.method,
                                             f"seed{config.training_seed}")
    if chief:
        check_writable(run_dir, "run folder", "pass a writable --run_dir")
    # Non-chief workers of a multi-worker run write to a private folder (docs/performance.md).
    output_dir = run_dir if chief else tempfile.mkdtemp(prefix="tfseg_worker_")

    keras.utils.set_random_seed(config.training_seed)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    precision = hardware.resolve_mixed_precision(config.mixed_precision)
    logging.info("Training with %s.", precision.describe())
    with hardware.precision_policy(precision), strategy.scope():
        method = module.build(method_config, data_spec)
        method.compile()
    plans = cb.plan_stages(method.stages(), int(method.config.validation_every))
    validator = _validator(records_dir, manifest, split, data_spec, method)
    policy = "best_val" if validator is not None and plans and plans[-1].stage.select_best \
        else "last"
    run_config = _run_config(config, method, data_spec, split, records_dir, run_dir, policy,
                             plans, strategy, target)
    run_config["mixed_precision"] = precision.to_dict()
    if chief:
        run_folder.write_config(run_dir, run_config, _RESUME_KEYS)

    summary = _train_stages(config, method, strategy, plans, validator, split, records_dir,
                            run_dir, output_dir, chief, target)
    summary.update(run_dir=run_dir, output_dir=output_dir, checkpoint_policy=policy, test=None,
                   test_target=None, export_path=None)
    if not any(p.stage.trains_segmentor for p in plans):
        # Nothing to evaluate or export: e.g. a translation-only method (its networks are in
        # checkpoints/best.weights.h5).
        logging.info("No stage of %s trains the segmentor: evaluation and export skipped.",
                     config.method)
        return summary
    if chief and config.evaluate:
        from tfseg.evaluate import evaluate_run
        summary["test"] = evaluate_run(run_dir, "test")
        if target is not None and target["split"]["test"]:
            summary["test_target"] = evaluate_run(run_dir, "test", domain="target")
    if chief and config.export:
        from tfseg.export import export_run
        # Overwrite: a re-run re-selects the same checkpoint, and the export must match it.
        summary["export_path"] = export_run(run_dir, overwrite=True)
    return summary


# --------------------------------------------------------------------------- setup helpers
def method_settings(module, config: TrainConfig):
    """The method's Config, resolved once: defaults, preset, `--set`, then --steps and
    --validation_every as typed values.

    Raises:
      ValueError: for a bad preset or override, or a method Config without steps /
        validation_every.
    """
    method_config = resolve_config(module, config.preset, config.overrides)
    for field in ("steps", "validation_every"):
        if not hasattr(method_config, field):
            raise ValueError(f"Method {config.method!r}: its Config lacks {field!r}.")
    given = {k: getattr(config, k) for k in ("steps", "validation_every")
             if getattr(config, k) is not None}
    return dataclasses.replace(method_config, **given)


def check_method_supports(module, name: str, data_spec: DataSpec) -> None:
    """Refuses data a method cannot train on (its module's SPATIAL_DIMS and TARGETS).

    Raises:
      ValueError: naming the method, what the data needs and what the method supports.
    """
    dims = tuple(getattr(module, "SPATIAL_DIMS", (2, 3)))
    if data_spec.spatial_dims not in dims:
        raise ValueError(f"Method {name!r} trains on {' or '.join(map(str, dims))}D data; these "
                         f"records are {data_spec.spatial_dims}D. Choose another dataset or "
                         "method.")
    targets = tuple(getattr(module, "TARGETS", ("classes",)))
    if data_spec.targets not in targets:
        raise ValueError(f"Method {name!r} does not train for {data_spec.targets} targets "
                         f"({', '.join(data_spec.reported_names)}); it supports "
                         f"{', '.join(targets)}. Choose a dataset option with exclusive classes "
                         "or a method that supports regions (e.g. supervised).")


def _target_domain(config: TrainConfig, source_modalities) -> dict[str, Any]:
    """Preprocesses (on first use) and splits the target domain; its config.json record. Its
    modalities are picked and ordered by name like the source's (`tfseg.data.domains`)."""
    from preprocessing.runner import resolve_dataset

    target_dataset = get_dataset(config.target_dataset, **config.target_dataset_options)
    options = domains.align_target_options(
        source_modalities, resolve_dataset(target_dataset, config.target_data_dir)[0],
        config.target_dataset_options, source=config.dataset, target=config.target_dataset)
    if options != dict(config.target_dataset_options):
        logging.info("Target modalities chosen like the source's: %s", options["modalities"])
        config = dataclasses.replace(config, target_dataset_options=options)
        target_dataset = get_dataset(config.target_dataset, **options)
    # Records of the target live under their own root, named by the data folder: the
    # preprocessing fingerprint ignores the folder, so a target of the same dataset as the source
    # (another site's scans, say) would otherwise share the source's records folder.
    where = os.path.abspath(config.target_data_dir) if config.target_data_dir else "embedded"
    records_root = os.path.join(
        config.records_root, "target-" + hashlib.sha256(where.encode()).hexdigest()[:10])
    domain = dataclasses.replace(
        config, dataset=config.target_dataset, data_dir=config.target_data_dir,
        dataset_options=config.target_dataset_options, records_dir=config.target_records_dir,
        records_root=records_root,
        target_dataset=None, target_data_dir=None, target_dataset_options={},
        target_records_dir=None, target_split=None)
    records_dir = resolve_records(domain, target_dataset)
    manifest = pipeline.load_manifest(records_dir)
    if config.target_split is not None:
        published, path = split_source(config.target_split, None, target_dataset,
                                       config.target_dataset)
        split = splits_lib.resolve_split(manifest, target_dataset, published=published,
                                         path=path, allow_no_labeled=True)
    else:
        labeled, image_only = splits_lib.patient_pools(manifest)
        split = splits_lib.draw_target_split(
            labeled, image_only,
            config.split_seed if config.test_seed is None else config.test_seed,
            config.num_val, config.num_test)
    return {"dataset": config.target_dataset,
            "dataset_options": dict(config.target_dataset_options),
            "data_dir": config.target_data_dir, "records_dir": os.path.abspath(records_dir),
            "split": split.to_dict()}


def _check_target(target: Mapping[str, Any], manifest: Mapping[str, Any],
                  data_spec: DataSpec) -> None:
    """The target domain must feed the same networks: same channels; and, when it has labels to
    evaluate, the same classes and regions.

    Raises:
      ValueError: naming both datasets and what differs.
    """
    other = pipeline.load_manifest(target["records_dir"])
    names = (f"target {target['dataset']!r} ({target['records_dir']})",
             f"source {manifest.get('dataset')!r}")
    match = domains.match_domains(manifest["modalities"], data_spec.class_names,
                                  other["modalities"], None, source=names[1], target=names[0])
    if list(match.target_modalities) != list(other["modalities"]):
        raise ValueError(f"The {names[0]} has modalities {other['modalities']}, the {names[1]} "
                         f"{manifest['modalities']}: a run's domains need the same channels in "
                         "the same order (choose the target's modalities to match).")
    if not target["split"]["test"]:
        return
    target_spec = pipeline.dataset_facts(other, data_spec.example_shape
                                         if data_spec.spatial_dims == 3 else None)
    class_map = domains.target_class_map(data_spec.class_names, target_spec.class_names,
                                         source=names[1], target=names[0])
    mapped = {name: sorted(class_map[c] for c in classes)
              for name, classes in zip(target_spec.region_names, target_spec.region_classes)}
    wanted = {name: sorted(classes)
              for name, classes in zip(data_spec.region_names, data_spec.region_classes)}
    if mapped != wanted:
        raise ValueError(f"The {names[0]} has regions {list(target_spec.region_names)}; the "
                         f"{names[1]} {list(data_spec.region_names)} (of the same classes). "
                         "Evaluating on the target needs the same regions: choose the target's "
                         "target option like the source's (or give the target a split without "
                         "test patients).")
    if list(target_spec.class_names) != [data_spec.class_names[i] for i in class_map] or \
            class_map != tuple(range(len(class_map))):
        logging.info("Target classes %s are evaluated as the source classes %s.",
                     list(target_spec.class_names),
                     [data_spec.class_names[i] for i in class_map])


def resolve_records(config, dataset) -> str:
    """Preprocesses on first use; returns the records folder.

    `config` needs the TrainConfig fields records_dir, dataset, data_dir, n4, records_root,
    preprocess_workers and dataset_options (launch.benchmark passes its own config).
    """
    if config.records_dir is not None:
        manifest = pipeline.load_manifest(config.records_dir)
        if manifest.get("dataset") != config.dataset:
            raise ValueError(f"Records {config.records_dir} are of dataset "
                             f"{manifest.get('dataset')!r}, not {config.dataset!r}; pass the "
                             "matching --dataset or another --records_dir.")
        if config.data_dir and manifest.get("data_dir") and os.path.abspath(
                dataset.prepare(config.data_dir)) != manifest["data_dir"]:
            raise ValueError(f"Records {config.records_dir} were made from "
                             f"{manifest['data_dir']}, not from --data_dir={config.data_dir}; "
                             "drop --records_dir (records are then made for this folder) or "
                             "--data_dir.")
        return config.records_dir
    from preprocessing.config import PreprocessConfig
    from preprocessing.runner import preprocess_dataset

    return preprocess_dataset(dataset, config.data_dir, PreprocessConfig(n4=config.n4),
                              records_root=config.records_root,
                              workers=config.preprocess_workers,
                              allow_skips=bool(getattr(config, "allow_skips", False)),
                              dataset_options=config.dataset_options)


def split_source(split: str | None, labeled: int | None, dataset, dataset_name: str
                 ) -> tuple[str | None, str | None]:
    """(published split name, split file path) for `--split` / `--labeled`; both None = draw.

    Raises:
      ValueError: if both are given, or neither and the dataset has no default split.
    """
    if split is not None:
        if labeled is not None:
            raise ValueError(f"Choose the split with either --split={split} or "
                             f"--labeled={labeled}, not both.")
        is_file = split.endswith(".json") or os.path.sep in split
        return (None, split) if is_file else (split, None)
    if labeled is None:
        if dataset.default_split is None:
            raise ValueError(f"Dataset {dataset_name!r} has no default split: choose one with "
                             "--labeled=N [--split_seed=K] or --split=NAME|FILE.json.")
        return dataset.default_split, None
    return None, None


def _split(config: TrainConfig, dataset, manifest) -> splits_lib.Split:
    num_labeled, num_val, num_test = config.labeled, config.num_val, config.num_test
    if config.labeled_fraction is not None:
        if config.labeled is not None:
            raise ValueError(f"Choose either --labeled={config.labeled} or --labeled_fraction="
                             f"{config.labeled_fraction}, not both.")
        num_labeled, num_val, num_test = splits_lib.fraction_counts(
            len(splits_lib.patient_pools(manifest)[0]), config.labeled_fraction, num_val,
            num_test)
    published, path = split_source(config.split, num_labeled, dataset, config.dataset)
    split = splits_lib.resolve_split(
        manifest, dataset, published=published, path=path, num_labeled=num_labeled,
        seed=config.split_seed, num_val=num_val, num_test=num_test, test_seed=config.test_seed)
    split_path = os.path.join(config.records_root, config.dataset, "splits", f"{split.name}.json")
    if not os.path.isfile(split_path) or splits_lib.load_split(split_path) != split:
        try:
            splits_lib.save_split(split, split_path)
        except OSError as error:  # read-only records: the run's config.json keeps the split
            logging.warning("Could not save the split to %s (%s); it is recorded in the run's "
                            "config.json.", split_path, error.strerror)
    return split


def _validator(records_dir, manifest, split, data_spec: DataSpec, method) -> cb.Validator | None:
    if not split.val:
        logging.warning("The split has no validation patients: the last checkpoint is kept.")
        return None
    volumes = []
    for subject_id in pipeline.subject_ids_for(manifest, split.val, labeled=True):
        image, label = pipeline.load_subject(records_dir, subject_id, manifest)
        volumes.append((subject_id, image, label))
    return cb.Validator(volumes, data_spec, method.size_multiple)


def _git_commit() -> str:
    folder = os.path.dirname(os.path.abspath(tfseg.__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=folder, capture_output=True, text=True, timeout=10,
                               check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{commit}+dirty" if dirty else commit


def _run_config(config, method, data_spec, split, records_dir, run_dir, policy, plans,
                strategy, target) -> dict[str, Any]:
    return {
        "method": config.method, "method_config": dataclasses.asdict(method.config),
        "preset": config.preset, "train": dataclasses.asdict(config),
        "dataset": config.dataset, "dataset_options": dict(config.dataset_options),
        "data_dir": config.data_dir, "records_dir": os.path.abspath(records_dir),
        "split": split.to_dict(), "data_spec": dataclasses.asdict(data_spec),
        "size_multiple": method.size_multiple, "run_dir": os.path.abspath(run_dir),
        "pipeline": {"labeled_batch_size": method.labeled_batch_size,
                     "unlabeled_batch_size": method.unlabeled_batch_size,
                     "target_batch_size": method.target_batch_size if target else 0,
                     "augment": method.pipeline_augment, "seed": config.training_seed},
        "target": target,
        "stages": [dict(dataclasses.asdict(p.stage), steps_per_round=p.steps_per_epoch)
                   for p in plans],
        "num_replicas": strategy.num_replicas_in_sync,
        "git_commit": _git_commit(), "schema_version": schema.SCHEMA_VERSION,
        "tfseg_version": tfseg.__version__, "keras_version": keras.__version__,
        "tensorflow_version": tf.__version__, "checkpoint_policy": policy,
        "skipped_subjects": dict(pipeline.load_manifest(records_dir).get("skipped") or {}),
    }


# --------------------------------------------------------------------------- the loop
def _train_stages(config, method, strategy, plans, validator, split, records_dir, run_dir,
                  output_dir, chief, target) -> dict[str, Any]:
    checkpoints = os.path.join(run_dir, "checkpoints")
    out_checkpoints = os.path.join(output_dir, "checkpoints")
    progress_path = os.path.join(checkpoints, "progress.json")
    progress = {"completed": [], "best": {}}
    if os.path.isfile(progress_path):
        with open(progress_path, encoding="utf-8") as f:
            progress = json.load(f)
    state = cb.TrainingState(os.path.join(checkpoints, "backup"),
                             os.path.join(out_checkpoints, "backup"))
    train_log = cb.TrainLog(os.path.join(run_dir, "train_log.csv"))
    tensorboard = os.path.join(output_dir, "tensorboard")
    train_writer = tf.summary.create_file_writer(os.path.join(tensorboard, "train"))
    validation_writer = tf.summary.create_file_writer(os.path.join(tensorboard, "validation"))
    start = time.time()
    best = cb.BestRecord()
    for plan in plans:
        stage_weights = os.path.join(checkpoints, "stages", plan.key + cb.WEIGHTS_SUFFIX)
        if plan.key in progress["completed"] and os.path.isfile(stage_weights):
            with strategy.scope():
                method.load_weights(stage_weights)
            best = cb.BestRecord(**progress["best"].get(plan.key, {}))
            logging.info("Stage %s already finished; skipped.", plan.stage.name)
            continue
        logging.info("Stage %s (%d steps): %s", plan.stage.name, plan.stage.steps,
                     plan.stage.description)
        method.begin_stage(plan.stage)
        method.make_train_function(force=True)
        best = cb.BestRecord()
        initial_epoch = plan.epoch_offset
        with strategy.scope():
            restored = state.restore(method, plan)
        if restored is not None:
            initial_epoch = int(restored["epoch"])
            best = cb.BestRecord(float(restored["best_mean_dice"]), int(restored["best_step"]))
            step = int(restored["step"])
            logging.info("Resuming stage %s at step %d (optimizer iterations %d).",
                         plan.stage.name, step, method.steps_done)
            train_log.truncate(step)
            # Fresh random draws after a resume (the seed state is not part of the weights).
            seed_state = method.seed_generator.state
            seed_state.assign(tf.stack([seed_state[0] + step, tf.zeros_like(seed_state[0])]))
            if best.step == step:
                cb.save_best(method, output_dir)  # killed between resume state and best file
            elif not chief and best.step >= 0:
                # This worker's private folder is new: start from the chief's best checkpoint.
                os.makedirs(os.path.join(output_dir, "checkpoints"), exist_ok=True)
                shutil.copyfile(os.path.join(checkpoints, "best" + cb.WEIGHTS_SUFFIX),
                                os.path.join(out_checkpoints, "best" + cb.WEIGHTS_SUFFIX))
        else:
            train_log.truncate(plan.step_offset)
        callbacks = [
            cb.StepMonitor(plan, train_writer, config.summary_every),
            cb.RoundEnd(plan, validator=validator, state=state, train_log=train_log, best=best, output_dir=output_dir,
                        validation_writer=validation_writer, start_time=start),
        ]
        # No keras.callbacks.TensorBoard: its batch scalars use a per-fit() counter (restarting
        # on resume and at every stage) and land in whatever default writer is active; the
        # callbacks above log every tracked value against the global step instead.
        try:
            _fit_stage(config, method, strategy, plan, split, records_dir, initial_epoch,
                       callbacks, target)
        finally:
            callbacks[0].close()  # leaves the default summary writer even when fit() raised
        # Each worker reads its own copy: the chief may be renaming a newer file into its folder.
        best_path = os.path.join(out_checkpoints, "best" + cb.WEIGHTS_SUFFIX)
        if plan.stage.select_best and best.step >= 0 and os.path.isfile(best_path):
            with strategy.scope():
                method.load_weights(best_path)
        if chief:
            cb.save_weights_atomic(method, stage_weights)
            progress["completed"].append(plan.key)
            progress["best"][plan.key] = dataclasses.asdict(best)
            write_json_atomic(progress_path, progress, sort_keys=True, default=str)
        state.clear(plan)
    # The selected checkpoint (best of the last stage, or its last weights).
    cb.save_best(method, output_dir)
    train_writer.close()
    validation_writer.close()
    return {"best_val_mean_dice": best.mean_dice if best.step >= 0 else None,
            "best_step": best.step if best.step >= 0 else None,
            "steps": sum(p.stage.steps for p in plans), "train_seconds": time.time() - start}


def _fit_stage(config, method, strategy, plan, split, records_dir, initial_epoch, callbacks,
               target):
    """One stage: `fit()`, or the custom loop under multi-worker."""
    labeled = method.labeled_batch_size
    unlabeled = method.unlabeled_batch_size
    target_batch = method.target_batch_size if target else 0
    replicas = strategy.num_replicas_in_sync
    distribute.per_replica_batch(labeled, strategy, "labeled batch size")
    if unlabeled:
        distribute.per_replica_batch(unlabeled, strategy, "unlabeled batch size")
    if target_batch:
        distribute.per_replica_batch(target_batch, strategy, "target batch size")
    target_source = (None if not target_batch else
                     (target["records_dir"], splits_lib.Split.from_dict(target["split"])))
    # A stage-dependent seed, shifted on resume, so a resumed stage does not replay its batches.
    seed = config.training_seed * 1000 + plan.index * 100_003 + initial_epoch

    def make_config(labeled_batch, unlabeled_batch, pipeline_seed, target_batch=0):
        # Methods without an unlabeled stream still get a small one (one image per replica,
        # unused): the element structure is the same for every method. Deterministic order:
        # the same seed gives the same batches, so runs of two methods with the same seed see
        # the same data (paired studies) and a run can be reproduced; the pipeline is still
        # >1000x faster than the train step (launch.benchmark).
        return pipeline.PipelineConfig(
            labeled_batch_size=labeled_batch, unlabeled_batch_size=unlabeled_batch,
            augment=method.pipeline_augment, seed=pipeline_seed,
            include_unlabeled=bool(unlabeled), deterministic=True,
            target_batch_size=target_batch)

    verbose = config.verbose
    if distribute.is_multi_worker(strategy):
        def dataset_fn(context: tf.distribute.InputContext):
            per_replica = context.get_per_replica_batch_size
            return pipeline.training_dataset(records_dir, split, make_config(
                per_replica(labeled), per_replica(unlabeled) if unlabeled else 1,
                seed + 7919 * context.input_pipeline_id,
                per_replica(target_batch) if target_batch else 0), target=target_source)

        distribute.fit_custom_loop(method, strategy, dataset_fn, initial_epoch=initial_epoch,
                                   epochs=plan.end_epoch, steps_per_epoch=plan.steps_per_epoch,
                                   callbacks=callbacks, verbose=verbose)
        return
    dataset = pipeline.training_dataset(records_dir, split, make_config(
        labeled, unlabeled or replicas, seed, target_batch), target=target_source)
    method._initial_epoch = None  # fit() prefers it to initial_epoch; BackupAndRestore sets it
    method.fit(dataset, steps_per_epoch=plan.steps_per_epoch, epochs=plan.end_epoch,
               initial_epoch=initial_epoch, callbacks=callbacks, verbose=verbose)
