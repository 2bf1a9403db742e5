"""Speed of a method on a dataset: train step, input pipeline, inference, preprocessing, N4.

`run_benchmark(BenchmarkConfig)` is what `python -m launch.benchmark` calls. It measures the
method's configuration (defaults, or a preset / overrides) exactly as `launch.train` would build
it, and returns one JSON-able dict (docs/performance.md):

1. records: the same records `launch.train` uses (preprocessed on first use under
   `records_root`, keyed by the settings fingerprint, so an existing cache is reused and never
   rewritten), or `records_dir`;
2. split: a published split, a split file or a drawn one (`labeled`); default the dataset's
   default split, as `launch.train`. Nothing is written to the records folder;
3. the method is built and compiled as in `tfseg.train` (same seed, mixed-precision policy);
4. per stage of `method.stages()` (stages with 0 steps are skipped): `begin_stage(stage)`, a
   fresh compiled train function (`method.make_train_function(force=True)`, graph mode, what
   `fit()` runs), `warmup` untimed steps (the first one traces), then `steps` timed steps on an
   iterator of the method's own training pipeline; the median step time gives
   `train_examples_per_s`. Then the same pipeline alone, fresh, for `pipeline_batches` batches
   after `pipeline_warmup` (cache filling, autotuning): `pipeline_examples_per_s`.
   Examples per step = the method's labeled + unlabeled batch sizes (what the step consumes;
   the placeholder unlabeled stream of a labeled-only method is not counted), so
   `pipeline_to_train_ratio` = pipeline batches/s ÷ train steps/s (the bar is >= 5).
   The top-level train / pipeline figures are those of the *main stage*: the stage with the most
   steps, the last one on ties (e.g. the segmentation stage of a pre-train + train schedule);
   `stages` holds every stage's figures and `main_stage` names the one reported;
5. inference: whole-volume prediction of one validation (else test) subject with
   `tfseg.inference.predict_volume`, as `tfseg.evaluate` calls it (2D: slice batches; 3D: the
   sliding window with `default_tile_size`, the training patch, Gaussian blending); one warm-up
   call (tracing), then the median of `inference_repeats` timed calls;
6. preprocessing: `n4_subjects` subjects read from the raw data and preprocessed by
   `preprocessing.runner.process_subject` into a temporary folder, with and without N4 (SimpleITK
   with its default threads, as `--preprocess_workers=1` runs it);
7. N4: `preprocessing.n4.compare_n4_shrink` on the first modality of the first of those subjects:
   full-resolution vs shrunk fit (the dataset's shrink factor), their time ratio (`n4_speedup`)
   and the correlation of the two log bias fields. Full resolution costs minutes on a large
   volume, so `n4_compare="auto"` compares on the whole image only up to
   `n4_compare_max_voxels`, else on a centre crop of that many voxels ("crop" always crops,
   "full" never does, "none" skips). CT datasets (no N4) report null N4 figures with a reason.
8. `peak_rss_mb` (ru_maxrss of this process, after everything), parameter counts, shapes,
   versions and the machine's CPU count.

Timings are wall clock: run with nothing else busy (the result records the load average at the
start and the end), and compare figures measured in the same conditions. `*_cpu_s*` figures are
the process's CPU seconds (all threads) for the same work: they barely change when other
processes share the cores, so on a busy machine CPU seconds / cores estimates the idle wall time.
"""
from __future__ import annotations

import dataclasses
import os
import platform
import resource
import statistics
import tempfile
import time
from typing import Any, Mapping

import keras
import numpy as np
import tensorflow as tf
from absl import logging

import tfseg
from tfseg import benchmark_inference as inference_lib
from tfseg import flops as flops_lib
from tfseg import hardware, overhead
from tfseg import train as train_lib
from tfseg.data import pipeline
from tfseg.data import splits as splits_lib
from tfseg.datasets import get_dataset
from tfseg.methods import DataSpec, get_method_module, resolve_config

__all__ = ["BenchmarkConfig", "run_benchmark", "network_parameters", "peak_rss_mb",
           "pipeline_config", "measure_pipeline", "n4_comparison_volume", "rounded",
           "REQUIRED_KEYS", "N4_COMPARE", "DEFAULT_N4_COMPARE_MAX_VOXELS"]

N4_COMPARE = ("auto", "full", "crop", "none")
# Whole-image full-resolution N4 up to this many voxels (~80³: 10-30 s on 2 cores).
DEFAULT_N4_COMPARE_MAX_VOXELS = 512_000
# The keys every result has (tests check them; README documents them).
REQUIRED_KEYS = (
    "method", "dataset", "main_stage", "stages", "train_examples_per_s", "train_step_s_median",
    "pipeline_examples_per_s", "pipeline_to_train_ratio", "inference_s_per_volume",
    "preprocess_s_per_subject", "preprocess_s_per_subject_no_n4", "n4_speedup",
    "n4_field_correlation", "peak_rss_mb", "params", "params_per_network", "input_shape",
    "labeled_batch_size", "unlabeled_batch_size", "examples_per_step", "num_replicas",
    "mixed_precision", "tensorflow_version", "keras_version", "cpu_count",
    "mixed_precision_requested", "train_step_flops", "train_flops_per_s",
    "inference_flops_per_s", "peak_flops_per_s", "fraction_of_peak_train",
    "fraction_of_peak_inference", "overhead_ratio", "reference_step_s_median")


@dataclasses.dataclass(frozen=True)
class BenchmarkConfig:
    """What to measure (the flags of launch.benchmark).

    Attributes:
      method / dataset / dataset_options / data_dir: as `tfseg.train.TrainConfig`.
      records_root / records_dir / n4 / preprocess_workers: which records train on (the same
        cache `launch.train` uses; `n4` is the records' N4 setting, not the timing's).
      split / labeled / split_seed: the split (default: the dataset's default split).
      preset / overrides: method config preset and "name=value" overrides.
      batch_size: shorthand for the override of the config's `batch_size` (or
        `labeled_batch_size`) field.
      steps / warmup: timed and untimed train steps per stage.
      pipeline_batches / pipeline_warmup: timed and untimed batches of the pipeline alone.
      mixed_precision: "auto" | "none" | "bf16" (`tfseg.hardware`).
      seed: weights, pipeline and augmentation seed.
      tile_batch / overlap: inference settings (as `launch.evaluate`).
      inference_repeats: timed whole-volume predictions (the median is reported).
      n4_subjects: subjects timed in preprocessing (0: skip the preprocessing timing).
      n4_compare: "auto" | "full" | "crop" | "none" (see the module docstring).
      n4_compare_max_voxels: voxel budget of the full-resolution N4 comparison.
      n4_levels / n4_iterations: N4 settings of the preprocessing timing and the comparison
        (None: the preprocessing defaults, 4 levels × 50 iterations).
      overhead: also time the reference step of the networks' own work (`tfseg.overhead`)
        interleaved with the train step, and report their ratio.
      tile_compare_subjects: 3D: subjects predicted with large tiles (`suggest_tile_size`) and with
        32³ tiles at overlap 0.5 (Dice of each, their agreement); 0 skips it.
      inference_run_dir: a finished run folder: inference and the tile comparison use its
        trained predictor on its records' validation / test subjects (default: the
        benchmark's own, barely trained, method on the benchmark's split).
      compare_precision: also build the method in the other precision (float32 <-> bf16) and
        time the main stage's step in both, in turns: `bf16_speedup`.
      peak_size: side of the square matmuls timed for the machine's float32 and bfloat16
        peak (`tfseg.flops.matmul_peak`); 0 skips the peak (and the fractions of it).
    """

    method: str
    dataset: str
    dataset_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    data_dir: str | None = None
    records_root: str = "records"
    records_dir: str | None = None
    n4: bool = True
    preprocess_workers: int = 1
    split: str | None = None
    labeled: int | None = None
    split_seed: int = 0
    preset: str | None = None
    overrides: tuple[str, ...] = ()
    batch_size: int | None = None
    steps: int = 20
    warmup: int = 3
    pipeline_batches: int = 50
    pipeline_warmup: int = 10
    mixed_precision: str = "auto"
    seed: int = 0
    tile_batch: int = 4
    overlap: float = 0.5
    inference_repeats: int = 3
    n4_subjects: int = 2
    n4_compare: str = "auto"
    n4_compare_max_voxels: int = DEFAULT_N4_COMPARE_MAX_VOXELS
    n4_levels: int | None = None
    n4_iterations: int | None = None
    overhead: bool = True
    tile_compare_subjects: int = 2
    peak_size: int = 2048
    compare_precision: bool = False
    inference_run_dir: str | None = None

    def __post_init__(self):
        hardware.check_mixed_precision(self.mixed_precision)
        if self.n4_compare not in N4_COMPARE:
            raise ValueError(f"n4_compare={self.n4_compare!r}; choose one of {list(N4_COMPARE)}.")
        for name in ("steps", "warmup", "pipeline_batches", "tile_batch", "preprocess_workers",
                     "n4_compare_max_voxels", "inference_repeats"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        for name in ("pipeline_warmup", "n4_subjects", "tile_compare_subjects", "peak_size"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}.")
        for name in ("batch_size", "labeled", "n4_levels", "n4_iterations"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}.")
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"overlap must be in [0, 1), got {self.overlap}.")
        if self.split is not None and self.labeled is not None:
            raise ValueError(f"Choose the split with either --split={self.split} or "
                             f"--labeled={self.labeled}, not both.")
        object.__setattr__(self, "overrides", tuple(self.overrides))
        object.__setattr__(self, "dataset_options", dict(self.dataset_options))


def run_benchmark(config: BenchmarkConfig) -> dict[str, Any]:
    """Measures (see the module docstring) and returns the result dict (JSON-able).

    Raises:
      ValueError: for bad settings, an unknown method / dataset / preset / override, a split that
        does not fit the records, or data that cannot be read.
    """
    started = time.perf_counter()
    load_before = _load_average()
    module = get_method_module(config.method)
    dataset = get_dataset(config.dataset, **config.dataset_options)
    method_config = resolve_config(module, config.preset, _overrides(module, config))

    records_dir = train_lib.resolve_records(config, dataset)
    manifest = pipeline.load_manifest(records_dir)
    split = _split(config, dataset, manifest)
    data_spec = pipeline.dataset_facts(manifest)

    keras.utils.set_random_seed(config.seed)
    precision = hardware.resolve_mixed_precision(config.mixed_precision)
    logging.info("Benchmark: %s.", precision.describe())
    with hardware.precision_policy(precision):
        method = module.build(method_config, data_spec)
        method.compile()

    result: dict[str, Any] = {
        "method": config.method, "dataset": config.dataset,
        "dataset_options": dict(config.dataset_options), "preset": config.preset,
        "overrides": list(config.overrides), "batch_size_flag": config.batch_size,
        "method_config": _jsonable(dataclasses.asdict(method.config)),
        "records_dir": os.path.abspath(records_dir), "split": split.name,
        "spatial_dims": data_spec.spatial_dims,
        "input_shape": [*data_spec.example_shape, data_spec.num_channels],
        "num_classes": data_spec.num_classes,
        "params": int(method.segmentor.count_params()),
        "params_per_network": network_parameters(method),
        "mixed_precision": precision.resolved,
        "mixed_precision_requested": precision.requested,
        "mixed_precision_reason": precision.reason,
        "num_replicas": int(tf.distribute.get_strategy().num_replicas_in_sync),
        "jit_compile": bool(getattr(method, "jit_compile", False)),
        "steps_timed": config.steps, "warmup_steps": config.warmup,
    }

    # 4. train step and pipeline, per stage.
    stages = [s for s in method.stages() if int(s.steps) > 0]
    if not stages:
        raise ValueError(f"Method {config.method!r} has no stage with steps > 0; check --set "
                         "steps=... .")
    per_stage: dict[str, dict[str, Any]] = {}
    main = max(range(len(stages)), key=lambda i: (int(stages[i].steps), i))
    keys = [s.name if [t.name for t in stages].count(s.name) == 1 else f"{i}_{s.name}"
            for i, s in enumerate(stages)]
    for index, stage in enumerate(stages):
        logging.info("Benchmark: stage %s (%d steps in training).", stage.name, stage.steps)
        method.begin_stage(stage)
        method.make_train_function(force=True)
        per_stage[keys[index]] = _measure_stage(config, method, records_dir, split, index)
        per_stage[keys[index]]["steps_in_schedule"] = int(stage.steps)
    main_figures = per_stage[keys[main]]
    if config.compare_precision:
        result.update(_compare_precision(config, module, method_config, data_spec, records_dir,
                                         split, method, stages[main], precision))
    result.update(main_stage=keys[main], stages=per_stage, **{
        key: main_figures[key] for key in (
            "train_step_s_median", "train_step_s_mean", "train_step_s_min",
            "train_first_step_s", "train_step_cpu_s_median", "train_examples_per_s",
            "pipeline_examples_per_s",
            "pipeline_to_train_ratio", "labeled_batch_size", "unlabeled_batch_size",
            "examples_per_step", "train_step_constant_input_s_median", "train_step_flops",
            "train_flops_per_s", "reference_step_s_median", "overhead_ratio",
            "overhead_ratio_constant_input") if key in main_figures})

    # 5. inference.
    result.update(_measure_inference(config, method, records_dir, manifest, split, data_spec))
    # 5b. the machine's matmul peak, in this process and after the timings above.
    result.update(_peak_figures(config, result, precision.resolved))
    # 6-7. preprocessing and N4.
    result.update(_measure_preprocessing(config, dataset, manifest))

    result.update(
        peak_rss_mb=peak_rss_mb(), cpu_count=os.cpu_count(),
        # Other processes on the machine slow every figure down: the 1-minute load average at the
        # start and at the end (about cpu_count or more means the cores were shared).
        load_average_start=load_before, load_average_end=_load_average(),
        tensorflow_version=tf.__version__, keras_version=keras.__version__,
        tfseg_version=tfseg.__version__, python_version=platform.python_version(),
        benchmark_seconds=round(time.perf_counter() - started, 2))
    return result


def _compare_precision(config: BenchmarkConfig, module, method_config, data_spec, records_dir,
                       split, method, stage, precision) -> dict[str, Any]:
    """The main stage's train step in float32 and in bf16, timed in turns on one constant
    batch: the bf16 speed-up measured so that machine load affects both alike."""
    other = hardware.PrecisionChoice(precision.requested, "none" if precision.resolved == "bf16"
                                     else "bf16", "the other precision, for the comparison")
    keras.utils.set_random_seed(config.seed)
    with hardware.precision_policy(other):
        twin = module.build(method_config, data_spec)
        twin.compile()
    batch = next(iter(pipeline.training_dataset(records_dir, split,
                                                pipeline_config(method, config.seed))))
    functions = {}
    for choice, each in ((precision, method), (other, twin)):
        each.begin_stage(stage)
        each.make_train_function(force=True)
        constant = iter(tf.data.Dataset.from_tensors(batch).repeat())
        functions[choice.resolved] = (lambda f=each.train_function, it=constant: f(it))
    timed = overhead.time_interleaved(functions, config.steps, max(config.warmup, 1))
    return {"precision_step_s_median": {k: v["median_s"] for k, v in timed.items()},
            "bf16_speedup": timed["none"]["median_s"] / timed["bf16"]["median_s"]}


def _peak_figures(config: BenchmarkConfig, result: Mapping[str, Any], resolved: str
                  ) -> dict[str, Any]:
    """float32 and bfloat16 matmul peaks and the fraction of the peak of the dtype the networks
    compute in that the train step and inference reach."""
    if not config.peak_size:
        return {"peak_flops_per_s": None, "fraction_of_peak_train": None,
                "fraction_of_peak_inference": None}
    peaks = {dtype: flops_lib.matmul_peak(dtype, config.peak_size)
             for dtype in ("float32", "bfloat16")}
    peak = peaks["bfloat16" if resolved == "bf16" else "float32"]["flops_per_s"]
    return {"peak_flops_per_s": {d: p["flops_per_s"] for d, p in peaks.items()},
            "peak_matmul_size": config.peak_size, "peak_dtype": "bfloat16" if resolved == "bf16"
            else "float32",
            "fraction_of_peak_train": result["train_flops_per_s"] / peak,
            "fraction_of_peak_inference": result["inference_flops_per_s"] / peak}


# --------------------------------------------------------------------------- setup
def _overrides(module, config: BenchmarkConfig) -> list[str]:
    overrides = list(config.overrides)
    if config.batch_size is not None:
        fields = [f.name for f in dataclasses.fields(module.Config)]
        name = next((n for n in ("batch_size", "labeled_batch_size") if n in fields), None)
        if name is None:
            raise ValueError(f"--batch_size: method {config.method!r} has no batch_size field; "
                             f"set its batch sizes with --set (fields: {', '.join(fields)}).")
        overrides.append(f"{name}={config.batch_size}")
    return overrides


def _split(config: BenchmarkConfig, dataset, manifest) -> splits_lib.Split:
    """The split `launch.train` would use, without saving it (the benchmark writes nothing)."""
    published, path = train_lib.split_source(config.split, config.labeled, dataset,
                                             config.dataset)
    return splits_lib.resolve_split(manifest, dataset, published=published, path=path,
                                    num_labeled=config.labeled, seed=config.split_seed)


def network_parameters(method: keras.Model) -> dict[str, int]:
    """Parameter count of every network the method holds (attribute name -> count).

    Networks are the `keras.Model` attributes of the method (segmentor, discriminators, EMA
    teachers...) plus any network an optimizer updates. Views that only reuse another listed
    network's weights (e.g. fm_gan's feature extractor, a sub-model of the segmentor) are left
    out, so the counts add up to the method's parameters.
    """
    networks: dict[str, keras.Model] = {}
    for name, value in vars(method).items():
        if isinstance(value, keras.Model) and value is not method and not name.startswith("_"):
            networks.setdefault(name, value)
    for nets in getattr(method, "optimizer_networks", {}).values():
        for net in nets:
            if all(net is not known for known in networks.values()):
                networks[net.name] = net
    # Largest first, so a network is kept before the views of its weights.
    order = sorted(networks.items(), key=lambda item: -int(item[1].count_params()))
    covered: set[int] = set()
    kept = {}
    for name, net in order:
        ids = {id(w) for w in net.weights}
        if ids and ids <= covered:
            continue
        covered |= ids
        kept[name] = int(net.count_params())
    return dict(sorted(kept.items()))


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:  # not available on this platform
        return None


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MB (Linux reports ru_maxrss in KB)."""
    kilobytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(kilobytes / 1024.0, 1)


# --------------------------------------------------------------------------- train + pipeline
def pipeline_config(method, seed: int, replicas: int = 1) -> pipeline.PipelineConfig:
    """The training pipeline settings `tfseg.train` uses for `method` (single process)."""
    unlabeled = method.unlabeled_batch_size
    return pipeline.PipelineConfig(
        labeled_batch_size=method.labeled_batch_size,
        unlabeled_batch_size=unlabeled or replicas, augment=method.pipeline_augment,
        seed=seed, include_unlabeled=bool(unlabeled))


def _measure_stage(config: BenchmarkConfig, method, records_dir, split, index: int
                   ) -> dict[str, Any]:
    """Times the current train function (one stage) against its networks' own work, then the
    stage's pipeline alone.

    Three functions are timed in turns (`tfseg.overhead.time_interleaved`), so that other
    processes slow them alike: the train function on the method's pipeline (what `fit()` runs,
    prefetched: a slow pipeline shows here), the same train function on one constant batch
    (no pipeline), and the reference step of the networks' own forward and backward passes
    (`tfseg.overhead.reference_step`). FLOPs are counted from the traced step
    (`tfseg.flops`). The pipeline is then timed on a fresh copy, with no step running.
    """
    seed = config.seed * 1000 + index * 100_003  # as tfseg.train, for a fresh run
    examples = method.labeled_batch_size + method.unlabeled_batch_size
    train_function = method.train_function
    iterator = iter(pipeline.training_dataset(records_dir, split, pipeline_config(method, seed)))
    batch = next(iterator)
    trace = overhead.record_step(method, batch)
    calls, concrete = trace.calls, trace.concrete
    forward = sum(flops_lib.forward_flops(c.network, c.input_shapes[0], bool(c.training))
                  for c in calls if len(c.input_shapes) == 1)
    constant = iter(tf.data.Dataset.from_tensors(batch).repeat())
    start = time.perf_counter()
    overhead.block(train_function(iterator))  # traces
    first_step = time.perf_counter() - start
    functions = {"step": lambda: train_function(iterator),
                 "step_constant_input": lambda: train_function(constant)}
    if config.overhead:
        weights = getattr(method.config, "class_weights", None)
        functions["reference"] = overhead.reference_step(method, trace, weights, batch)
    timed = overhead.time_interleaved(functions, config.steps, max(config.warmup - 1, 1))
    del iterator, constant
    median = timed["step"]["median_s"]
    train_rate = examples / median
    figures = {"train_step_s_median": median, "train_step_s_mean": timed["step"]["mean_s"],
               "train_step_s_min": timed["step"]["min_s"], "train_first_step_s": first_step,
               "train_step_cpu_s_median": timed["step"]["cpu_median_s"],
               "train_step_constant_input_s_median": timed["step_constant_input"]["median_s"],
               "network_calls": [c.to_dict() for c in calls],
               "forward_flops": forward, "train_step_flops": 3 * forward,
               "train_step_graph_flops": flops_lib.count_graph_flops(concrete.graph)["flops"],
               "gradient_requests": [g.to_dict() for g in trace.gradients],
               "train_flops_per_s": 3 * forward / median}
    if config.overhead:
        reference = timed["reference"]["median_s"]
        figures.update(
            reference_step_s_median=reference,
            reference_step_graph_flops=flops_lib.count_graph_flops(
                functions["reference"].get_concrete_function().graph)["flops"],
            overhead_ratio=median / reference,
            overhead_ratio_constant_input=timed["step_constant_input"]["median_s"] / reference,
            overhead_ratio_min=timed["step"]["min_s"] / timed["reference"]["min_s"],
            overhead_ratio_cpu=timed["step"]["cpu_median_s"] / timed["reference"]["cpu_median_s"])
    pipeline_rate = measure_pipeline(
        pipeline.training_dataset(records_dir, split, pipeline_config(method, seed + 1)),
        examples, config.pipeline_batches, config.pipeline_warmup)
    figures.update({"train_examples_per_s": train_rate, "pipeline_examples_per_s": pipeline_rate,
                    "pipeline_to_train_ratio": pipeline_rate / train_rate,
                    "labeled_batch_size": method.labeled_batch_size,
                    "unlabeled_batch_size": method.unlabeled_batch_size,
                    "examples_per_step": examples})
    return figures


def measure_pipeline(dataset: tf.data.Dataset, examples_per_batch: int, num_batches: int,
                     warmup_batches: int) -> float:
    """Examples per second a training dataset delivers on its own, counting
    `examples_per_batch` per element (the examples a train step consumes from it)."""
    iterator = iter(dataset)
    for _ in range(warmup_batches):
        next(iterator)
    start = time.perf_counter()
    for _ in range(num_batches):
        next(iterator)
    return examples_per_batch * num_batches / (time.perf_counter() - start)


# --------------------------------------------------------------------------- inference
def _measure_inference(config: BenchmarkConfig, method, records_dir, manifest, split,
                       data_spec: DataSpec) -> dict[str, Any]:
    predictor, size_multiple = method.predictor, method.size_multiple
    val, test = list(split.val), list(split.test)
    if config.inference_run_dir:
        # A trained run's predictor, records and held-back subjects: the Dice figures of the
        # tile comparison then mean something (the benchmark's own weights are barely trained).
        from tfseg.run import load_run

        run = load_run(config.inference_run_dir)
        predictor, size_multiple, data_spec = run.predictor, run.size_multiple, run.data_spec
        records_dir, manifest = run.records_dir, run.manifest
        val, test = list(run.split.get("val") or []), list(run.split.get("test") or [])
    patients = val or test or list(split.labeled)
    subject_ids = pipeline.subject_ids_for(manifest, patients)
    image, _ = pipeline.load_subject(records_dir, subject_ids[0], manifest)
    per_voxel = inference_lib.flops_per_voxel(predictor, data_spec)
    result = inference_lib.measure_inference(
        predictor, image, data_spec, size_multiple, tile_batch=config.tile_batch,
        overlap=config.overlap, repeats=config.inference_repeats, subject_id=subject_ids[0],
        per_voxel_flops=per_voxel)
    result.update(inference_flops_per_voxel=per_voxel,
                  inference_run_dir=config.inference_run_dir)
    if data_spec.spatial_dims == 3 and config.tile_compare_subjects:
        # Test subjects first: the comparison is about the answer on held-back data.
        ordered = pipeline.subject_ids_for(manifest, [*test, *val])
        result.update(inference_lib.compare_tiles(
            predictor, records_dir, manifest, ordered[:config.tile_compare_subjects],
            data_spec, size_multiple, tile_batch=config.tile_batch, overlap=config.overlap))
    return result


# --------------------------------------------------------------------------- preprocessing, N4
def _measure_preprocessing(config: BenchmarkConfig, dataset, manifest) -> dict[str, Any]:
    from preprocessing.config import PreprocessConfig, dataset_uses_n4, resolve_config as resolve
    from preprocessing.runner import list_checked_subjects, process_subject, read_subject
    from preprocessing.runner import resolve_dataset

    out: dict[str, Any] = dict.fromkeys((
        "preprocess_s_per_subject", "preprocess_s_per_subject_no_n4", "preprocess_n4_s_per_subject",
        "preprocess_subjects", "n4_speedup", "n4_field_correlation", "n4_seconds_full",
        "n4_seconds_shrunk", "n4_compare_shape_zyx", "n4_compare_mode", "n4_shrink"))
    out["n4_note"] = None
    if config.n4_subjects == 0:
        out["preprocess_note"] = out["n4_note"] = "skipped (--n4_subjects=0)"
        return out
    data_dir = config.data_dir or manifest.get("data_dir")
    try:
        dataset, data_dir = resolve_dataset(dataset, data_dir)
        subjects = list_checked_subjects(dataset, data_dir)
    except ValueError as error:
        out["preprocess_note"] = out["n4_note"] = (
            f"skipped: no raw data to preprocess ({error}); pass --data_dir")
        return out
    out["preprocess_note"] = None
    # Labeled subjects first: they also get label resampling and patch corners.
    subjects = sorted(subjects, key=lambda s: (s.label_path is None, s.subject_id))
    subjects = subjects[:config.n4_subjects]
    out["preprocess_subjects"] = [s.subject_id for s in subjects]
    n4_settings = {k: v for k, v in (("n4_levels", config.n4_levels),
                                     ("n4_iterations", config.n4_iterations)) if v is not None}
    uses_n4 = dataset_uses_n4(dataset)
    timings: dict[bool, list[float]] = {}
    n4_seconds = []
    for n4 in ((True, False) if uses_n4 else (False,)):
        settings = resolve(PreprocessConfig(n4=n4, **n4_settings), dataset)
        timings[n4] = []
        with tempfile.TemporaryDirectory(prefix="tfseg_benchmark_") as folder:
            for subject in subjects:
                start = time.perf_counter()
                entry = process_subject(subject, dataset, settings, folder)
                timings[n4].append(time.perf_counter() - start)
                if n4:
                    n4_seconds.append(float(entry["seconds"]["n4"]))
    out["preprocess_s_per_subject_no_n4"] = statistics.fmean(timings[False])
    if not uses_n4:
        out["preprocess_s_per_subject"] = out["preprocess_s_per_subject_no_n4"]
        out["n4_note"] = (f"dataset {dataset.name!r} is not MR (n4_default=False or an intensity "
                          "window): preprocessing runs no N4")
        return out
    out["preprocess_s_per_subject"] = statistics.fmean(timings[True])
    out["preprocess_n4_s_per_subject"] = statistics.fmean(n4_seconds)
    shrink = resolve(PreprocessConfig(), dataset).n4_shrink
    out["n4_shrink"] = shrink
    if config.n4_compare == "none":
        out["n4_note"] = "skipped (--n4_compare=none)"
        return out
    images, metas, _, _ = read_subject(subjects[0], dataset)
    volume, meta, mode = n4_comparison_volume(images[0], metas[0], config.n4_compare,
                                              config.n4_compare_max_voxels)
    from preprocessing.n4 import compare_n4_shrink

    levels = config.n4_levels or PreprocessConfig.n4_levels
    iterations = config.n4_iterations or PreprocessConfig.n4_iterations
    logging.info("Benchmark: N4 full resolution vs shrink %d on %s (%s).", shrink,
                 "×".join(map(str, volume.shape)), mode)
    compared = compare_n4_shrink(volume, meta, shrink=shrink, levels=levels,
                                 iterations=iterations)
    out.update(n4_speedup=compared["speedup"], n4_field_correlation=compared["correlation"],
               n4_seconds_full=compared["seconds_full"],
               n4_seconds_shrunk=compared["seconds_shrunk"],
               n4_compare_shape_zyx=list(volume.shape), n4_compare_mode=mode)
    return out


def n4_comparison_volume(volume: np.ndarray, meta, mode: str, max_voxels: int):
    """The volume the N4 comparison runs on: the whole image or a centre crop.

    Args:
      volume: (z, y, x) image of one modality.
      meta: its `ImageMeta`.
      mode: "full" (whole image), "crop" (centre crop of about `max_voxels`: every axis shrunk
        by the same factor, but none below 32 voxels, so a slice stack keeps its slices), "auto"
        (whole image if it has at most `max_voxels`, else the crop).
      max_voxels: voxel budget of the crop.

    Returns:
      (volume, meta of that volume with the origin moved to the crop, "full" | "crop").
    """
    shape = np.array(volume.shape)
    if mode == "full" or (mode == "auto" and shape.prod() <= max_voxels):
        return volume, meta, "full"
    # Shrink every axis by the same factor; axes of 32 voxels or fewer (slice stacks) stay whole.
    size = shape.astype(float)
    for _ in range(len(shape)):
        free = size > 32
        factor = (max_voxels / np.prod(size)) ** (1.0 / max(int(free.sum()), 1))
        if not free.any() or factor >= 1.0:
            break
        size = np.where(free, np.maximum(size * factor, 32), size)
    size = np.minimum(np.floor(size).astype(int), shape)
    start = (shape - size) // 2
    crop = volume[tuple(slice(s, s + n) for s, n in zip(start, size))]
    offset_xyz = np.array(start[::-1], float) * np.array(meta.spacing_xyz, float)
    direction = np.array(meta.direction, float).reshape(meta.ndim, meta.ndim)
    origin = tuple(float(v) for v in np.array(meta.origin_xyz, float) + direction @ offset_xyz)
    cropped = dataclasses.replace(meta, origin_xyz=origin, size_xyz=tuple(int(v) for v in
                                                                           size[::-1]))
    return np.ascontiguousarray(crop), cropped, "crop"


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    return value


def rounded(result: Mapping[str, Any], digits: int = 5) -> dict[str, Any]:
    """The result with floats rounded to `digits` significant digits (for printing)."""
    def walk(value):
        if isinstance(value, Mapping):
            return {k: walk(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [walk(v) for v in value]
        if isinstance(value, float) and value != 0.0 and np.isfinite(value):
            return float(f"{value:.{digits}g}")
        return value

    return walk(_jsonable(result))
