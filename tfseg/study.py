"""Label-efficiency studies (EVALUATION.md, "Studies"): the papers' tables, reproducibly.

`run_study(StudyConfig)` is what `python -m launch.study` calls:
1. checks everything before any run starts: method and dataset names, the preset and every
   `--set` override against each method's `Config` (`check_config`), and that run folders left
   by an earlier invocation were made with the same settings;
2. plans every (number of labeled subjects N × repeat k × method) as one ordinary training run in
   `out_dir/runs/<method>/l<N>/r<k>/`. Repeat k draws its labeled subjects with split seed s_k
   and trains with the same seed, for every method: the methods see the same labeled,
   validation and test subjects in repeat k, so their per-subject results are paired. The test
   and validation subjects of a draw do not depend on N (`tfseg.data.splits.draw_split`).
   `draws="independent"`: s_k = seed + k, so two repeats can draw the same labeled subjects (a
   small pool makes that likely). `draws="distinct"` (default): s_0 = seed, and s_k is the first
   seed after s_{k-1} whose labeled subjects differ, at every budget, from those of the earlier
   repeats (`repeat_seeds`; the same seeds as "independent" when nothing repeats). The pool is
   read from the records' manifest once the first run has preprocessed them;
3. runs each unfinished run as a `python -m launch.train` subprocess (which isolates TensorFlow's
   state and memory per run and dies with the study). A run whose `summary.json` (test split) and
   `metrics.csv` are present is skipped; an unfinished one resumes through launch.train's own
   resume. A progress line with an ETA follows every run;
4. aggregates (`aggregate_study`) into `out_dir/study.json`, `out_dir/study.md` and PNG plots.
   study.md lists the labeled subjects of every repeat (from each run's config.json) and warns
   when two repeats drew the same ones (with `draws="independent"`, or with fewer possible
   draws than repeats) or when the arms of one repeat did not train on the same subjects (then
   they are not paired).

Statistics. Per method × N × class (plus "mean", each subject's mean over the foreground
classes): mean, population std (ddof=0, as summary.json) and median of the per-subject Dice and
HD95 (mm) of the test subjects, pooled over repeats. Paired two-sided Wilcoxon signed-rank tests
(`scipy.stats.wilcoxon(a, b)`, its defaults: zero_method "wilcox", exact for small samples
without ties) of every method against the baseline (supervised) and of the pairs the user names,
per N, class and metric (Dice and HD95; for HD95 the lower value counts as the better one). The
pairing key is (repeat, test subject): the same subject evaluated in two repeats gives two pairs
(trained on different labeled draws). Values come from each run's `metrics.csv` (the per-subject
rows), so the tables can be recomputed from the run folders. A test is reported as "n/a" with the
reason when there are fewer than `min_pairs` pairs or every difference is zero.
"""
from __future__ import annotations

import csv
import ctypes
import dataclasses
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from absl import logging

from tfseg._files import write_text_atomic

RUNS_DIR = "runs"
PLOTS_DIR = "plots"
REQUEST_NAME = "study_run.json"
LOG_NAME = "study_train.log"
METRICS = ("dice", "hd95_mm")
LOWER_IS_BETTER = frozenset({"hd95_mm"})  # distances: a lower value is the better one
METRIC_TITLES = {"dice": "Dice", "hd95_mm": "HD95 (mm)"}  # headings in study.md
MEAN_CLASS = "mean"
PAIRING_KEY = ("Pairs are matched on (repeat, test subject): in repeat k both methods were trained "
               "on the same labeled draw (the repeat's split seed) and evaluated on the same test "
               "subjects; pairs are pooled over repeats.")
DRAWS = ("distinct", "independent")
# Seeds tried per repeat for a labeled draw that no earlier repeat made (then the study goes on
# with a repeated draw, which study.md reports).
MAX_SEED_TRIES = 1000
STD_NOTE = "population standard deviation (ddof=0) over test subjects pooled over repeats"
_REQUEST_KEYS = ("method", "dataset", "dataset_options", "labeled", "repeat", "split_seed", "seed",
                 "preset", "overrides", "steps", "validation_every", "n4", "num_val", "num_test")


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """A label-efficiency study (the flags of launch.study).

    Attributes:
      dataset / dataset_options / data_dir: as in `tfseg.train.TrainConfig`.
      methods: the study's arms: a method module name ("supervised") or "label=method"
        ("RDRI=supervised"), so one method can appear with different settings
        (`--set=RDRI:augment=affine+elastic+intensity`). Stored as the labels; `arms` maps each
        label to its method. Labels name the run folders, the table rows and `baseline`.
      labeled: numbers of labeled subjects (budgets), e.g. (1, 3).
      repeats: labeled draws per budget; repeat k uses split seed and training seed s_k.
      draws: "distinct" (s_k skips seeds that would repeat an earlier repeat's labeled subjects)
        or "independent" (s_k = seed + k); see the module docstring.
      out_dir: the study folder (runs/, study.json, study.md, plots/).
      preset: method preset for every method (e.g. "quick").
      overrides: "name=value" (every method whose Config has the field) or
        "method:name=value" (that method only).
      compare: extra (a, b) method pairs to test besides each method against `baseline`.
      baseline: the method every other one is tested against (if among `methods`).
      steps / validation_every / n4 / num_val / num_test / records_root / preprocess_workers:
        passed to every launch.train run.
      seed: base seed.
      export: export a SavedModel per run (off: a study needs only the test metrics).
      min_pairs: fewer pairs than this -> the test is "n/a".
    """

    dataset: str
    methods: tuple[str, ...]
    labeled: tuple[int, ...]
    repeats: int
    out_dir: str
    data_dir: str | None = None
    dataset_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    preset: str | None = None
    overrides: tuple[str, ...] = ()
    compare: tuple[tuple[str, str], ...] = ()
    baseline: str = "supervised"
    steps: int | None = None
    validation_every: int | None = None
    n4: bool = True
    num_val: int | None = None
    num_test: int | None = None
    records_root: str = "records"
    preprocess_workers: int = 1
    seed: int = 0
    export: bool = False
    min_pairs: int = 5
    arms: Mapping[str, str] = dataclasses.field(default_factory=dict)
    draws: str = "distinct"

    def __post_init__(self):
        for name in ("methods", "labeled", "overrides"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        arms = dict(self.arms)
        labels = []
        for item in self.methods:
            label, method = parse_arm(item)
            if "=" not in item and label in arms:  # already parsed (dataclasses.replace)
                method = arms[label]
            if arms.get(label, method) != method:
                raise ValueError(f"Arm {label!r} is both {arms[label]!r} and {method!r}.")
            arms[label] = method
            labels.append(label)
        object.__setattr__(self, "methods", tuple(labels))
        object.__setattr__(self, "arms", {label: arms[label] for label in labels})
        object.__setattr__(self, "compare", tuple(tuple(p) for p in self.compare))
        object.__setattr__(self, "dataset_options", dict(self.dataset_options))
        if not self.methods:
            raise ValueError("A study needs at least one method (--methods=supervised,...).")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"--methods={','.join(self.methods)} names a method twice.")
        if not self.labeled or any(n < 1 for n in self.labeled) \
                or len(set(self.labeled)) != len(self.labeled):
            raise ValueError(f"--labeled={','.join(map(str, self.labeled))}: give distinct "
                             "numbers of labeled subjects >= 1, e.g. --labeled=1,3.")
        object.__setattr__(self, "labeled", tuple(sorted(self.labeled)))
        if self.repeats < 1:
            raise ValueError(f"--repeats must be >= 1, got {self.repeats}.")
        if self.min_pairs < 1:
            raise ValueError(f"min_pairs must be >= 1, got {self.min_pairs}.")
        if self.draws not in DRAWS:
            raise ValueError(f"--draws={self.draws}: choose one of {', '.join(DRAWS)}.")
        for pair in self.compare:
            if len(pair) != 2 or pair[0] == pair[1] or not set(pair) <= set(self.methods):
                raise ValueError(f"--compare pair {':'.join(pair)}: expected two different "
                                 f"methods of --methods ({', '.join(self.methods)}), e.g. "
                                 f"--compare={self.methods[0]}:{self.methods[-1]}.")


_ARM_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")


def parse_arm(item: str) -> tuple[str, str]:
    """"method" -> (method, method); "label=method" -> (label, method).

    Raises:
      ValueError: an empty part or a label that cannot name a folder.
    """
    label, sep, method = (part.strip() for part in item.partition("="))
    if not sep:
        method = label
    if not label or not method or not _ARM_LABEL.fullmatch(label):
        raise ValueError(f"--methods item {item!r}: expected a method name or label=method with "
                         "a label of letters, digits and _ . + - (e.g. RDRI=supervised).")
    return label, method


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One planned training run of a study (`method` is the arm's label, `module` its method)."""

    method: str
    labeled: int
    repeat: int
    seed: int | None  # None: a distinct draw not yet chosen (the records are not read yet)
    run_dir: str
    overrides: tuple[str, ...]
    module: str = ""

    def __post_init__(self):
        if not self.module:
            object.__setattr__(self, "module", self.method)

    @property
    def name(self) -> str:
        return f"{self.method} l{self.labeled} r{self.repeat}"

    def request(self, config: StudyConfig) -> dict[str, Any]:
        """The settings that define this run (compared on resume)."""
        method = self.method if self.module == self.method else f"{self.method}={self.module}"
        return {"method": method, "dataset": config.dataset,
                "dataset_options": dict(config.dataset_options), "labeled": self.labeled,
                "repeat": self.repeat, "split_seed": self.seed, "seed": self.seed,
                "preset": config.preset, "overrides": list(self.overrides),
                "steps": config.steps, "validation_every": config.validation_every,
                "n4": config.n4, "num_val": config.num_val, "num_test": config.num_test}

    def train_argv(self, config: StudyConfig) -> list[str]:
        """The `python -m launch.train` command line of this run."""
        argv = [sys.executable, "-m", "launch.train", f"--method={self.module}",
                f"--dataset={config.dataset}", f"--labeled={self.labeled}",
                f"--split_seed={self.seed}", f"--seed={self.seed}",
                f"--run_dir={os.path.abspath(self.run_dir)}",
                f"--records_root={os.path.abspath(config.records_root)}",
                "--n4" if config.n4 else "--non4", "--export" if config.export else "--noexport",
                f"--preprocess_workers={config.preprocess_workers}"]
        if config.data_dir:
            argv.append(f"--data_dir={os.path.abspath(config.data_dir)}")
        if config.dataset_options.get("phase"):
            argv.append(f"--phase={config.dataset_options['phase']}")
        for name in ("preset", "steps", "validation_every", "num_val", "num_test"):
            if getattr(config, name) is not None:
                argv.append(f"--{name}={getattr(config, name)}")
        argv += [f"--set={item}" for item in self.overrides]
        return argv


# --------------------------------------------------------------------------- checks and plan
def split_overrides(overrides: Sequence[str], method_fields: Mapping[str, Sequence[str]]
                    ) -> dict[str, tuple[str, ...]]:
    """Distributes study overrides to methods.

    Args:
      overrides: "name=value" (to every method whose Config has `name`) or "method:name=value".
      method_fields: arm label (a method, or label=method's label) -> its Config field names.

    Returns:
      method -> its "name=value" overrides, in the given order.

    Raises:
      ValueError: malformed item, a method not in the study, or a global field no method has.
    """
    result: dict[str, list[str]] = {m: [] for m in method_fields}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set={item!r}: expected name=value or method:name=value, e.g. "
                             "--set=filters=8,16 or --set=supervised:augment=affine.")
        method, colon, name = key.partition(":")
        if colon:
            method, name = method.strip(), name.strip()
            if method not in method_fields:
                raise ValueError(f"--set={item!r}: method {method!r} is not in the study "
                                 f"(--methods={','.join(method_fields)}).")
            result[method].append(f"{name}={value}")
            continue
        name = key.strip()
        targets = [m for m, fields in method_fields.items() if name in fields]
        if not targets:
            raise ValueError(f"--set={item!r}: none of the study's methods "
                             f"({', '.join(method_fields)}) has a setting {name!r}.")
        for method in targets:
            result[method].append(f"{name}={value}")
    return {m: tuple(v) for m, v in result.items()}


def check_config(config: StudyConfig) -> dict[str, tuple[str, ...]]:
    """Validates names, preset and overrides of every method before anything runs.

    Returns:
      method -> its overrides.

    Raises:
      ValueError: unknown dataset, method, preset or setting, or a value that does not parse.
    """
    from tfseg.datasets import available_datasets
    from tfseg.methods import available_methods, get_method_module, resolve_config

    if config.dataset not in available_datasets():
        raise ValueError(f"Unknown dataset {config.dataset!r}. Available: "
                         f"{', '.join(available_datasets())}.")
    unknown = sorted({m for m in config.arms.values() if m not in available_methods()})
    if unknown:
        raise ValueError(f"Unknown method(s) {', '.join(map(repr, unknown))}. Available: "
                         f"{', '.join(available_methods())}.")
    modules = {label: get_method_module(m) for label, m in config.arms.items()}
    fields = {m: [f.name for f in dataclasses.fields(module.Config)]
              for m, module in modules.items()}
    per_method = split_overrides(config.overrides, fields)
    for method, module in modules.items():
        try:
            resolve_config(module, config.preset, per_method[method])
        except ValueError as error:
            raise ValueError(f"Method {_arm_name(config, method)}: {error}") from None
    return per_method


def plan_runs(config: StudyConfig, per_method: Mapping[str, Sequence[str]],
              seeds: Sequence[int | None] | None = None) -> list[RunSpec]:
    """Every run, budget-major then repeat then method (so an interrupted study has pairs).

    seeds: the split (and training) seed of each repeat (`repeat_seeds`); default seed + k.
    """
    seeds = list(seeds) if seeds is not None else [config.seed + k for k in range(config.repeats)]
    return [RunSpec(label, n, k, seeds[k],
                    os.path.join(config.out_dir, RUNS_DIR, label, f"l{n}", f"r{k}"),
                    tuple(per_method.get(label, ())), config.arms[label])
            for n in config.labeled for k in range(config.repeats) for label in config.methods]


def repeat_seeds(config: StudyConfig,
                 pools: tuple[Sequence[str], Sequence[str]] | None) -> list[int | None]:
    """The split seed of each repeat (module docstring, step 2).

    Args:
      pools: (labeled patients, image-only patients) of the records (`splits.patient_pools`);
        None while unknown: then only repeat 0's seed is known for distinct draws.
    """
    independent = [config.seed + k for k in range(config.repeats)]
    if config.draws == "independent" or config.repeats == 1:
        return independent
    if pools is None:
        return [config.seed] + [None] * (config.repeats - 1)
    from tfseg.data.splits import draw_split

    def labeled_sets(seed: int) -> dict[int, tuple[str, ...]]:
        return {n: draw_split(pools[0], pools[1], n, seed, config.num_val,
                              config.num_test).labeled for n in config.labeled}

    seeds: list[int | None] = []
    taken: dict[int, set[tuple[str, ...]]] = {n: set() for n in config.labeled}
    candidate = config.seed
    for _ in range(config.repeats):
        for tried in range(MAX_SEED_TRIES):
            sets = labeled_sets(candidate + tried)
            if all(sets[n] not in taken[n] for n in config.labeled):
                candidate += tried
                break
        else:  # fewer possible draws than repeats: go on with a repeated draw (reported)
            sets = labeled_sets(candidate)
        seeds.append(candidate)
        for n in config.labeled:
            taken[n].add(sets[n])
        candidate += 1
    return seeds


def records_pools(run_dirs: Sequence[str]) -> tuple[list[str], list[str]] | None:
    """The records' patient pools, via the records folder a run's config.json names (or None)."""
    from tfseg.data.splits import patient_pools

    for run_dir in run_dirs:
        try:
            with open(os.path.join(run_dir, "config.json"), encoding="utf-8") as f:
                records_dir = json.load(f).get("records_dir")
            with open(os.path.join(str(records_dir), "manifest.json"), encoding="utf-8") as f:
                return patient_pools(json.load(f))
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            continue
    return None


def plan_study(config: StudyConfig, per_method: Mapping[str, Sequence[str]]) -> list[RunSpec]:
    """plan_runs with the repeats' seeds as far as they are known."""
    specs = plan_runs(config, per_method)
    seeds = repeat_seeds(config, records_pools([s.run_dir for s in specs]))
    return [dataclasses.replace(s, seed=seeds[s.repeat]) for s in specs]


def _arm_name(config: StudyConfig, label: str) -> str:
    method = config.arms.get(label, label)
    return repr(label) if method == label else f"{label!r} ({method})"


def is_complete(run_dir: str) -> bool:
    """A run is finished when its test summary and per-subject metrics are written."""
    try:
        with open(os.path.join(run_dir, "summary.json"), encoding="utf-8") as f:
            summary = json.load(f)
        rows = _read_metrics(run_dir)
    except (OSError, ValueError):
        return False
    return (summary.get("split") == "test" and bool(rows)
            and len({r["subject"] for r in rows}) == summary.get("num_subjects"))


def _read_request(run_dir: str) -> dict[str, Any] | None:
    path = os.path.join(run_dir, REQUEST_NAME)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def check_existing(config: StudyConfig, specs: Sequence[RunSpec]) -> None:
    """Refuses run folders made by a study with other settings (before anything runs)."""
    for spec in specs:
        record = _read_request(spec.run_dir)
        if record is None:
            continue
        old, new = record.get("request", {}), spec.request(config)
        unknown = ("split_seed", "seed") if spec.seed is None else ()  # checked once known
        differs = [k for k in _REQUEST_KEYS if k not in unknown and old.get(k) != new.get(k)]
        if differs:
            raise ValueError(f"{spec.run_dir} holds a run made with other settings (differs in: "
                             f"{', '.join(differs)}). Use another --out, or delete that folder "
                             "to redo it.")


# --------------------------------------------------------------------------- running
def _die_with_parent() -> None:
    """In the child: receive SIGKILL when the study process dies (Linux prctl)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def subprocess_runner(argv: Sequence[str], log_path: str) -> int:
    """Runs one launch.train command, output appended to `log_path`; returns its exit code."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, KERAS_BACKEND="tensorflow",
               PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} "
                  f"{' '.join(shlex.quote(a) for a in argv)}\n")
        log.flush()
        preexec = _die_with_parent if sys.platform.startswith("linux") else None
        process = subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT, env=env,
                                   cwd=root, preexec_fn=preexec)
        try:
            return process.wait()
        except BaseException:
            process.kill()
            process.wait()
            raise


def _log_error(log_path: str) -> str:
    """The launcher's one-line error from the end of a run's log, if any."""
    try:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            lines = f.read()[-20000:].splitlines()
    except OSError:
        return ""
    errors = [line for line in lines if line.startswith("launch.train: error:")]
    return f": {errors[-1][len('launch.train: '):]}" if errors else ""


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def run_study(config: StudyConfig, runner: Callable[[Sequence[str], str], int] | None = None,
              progress: Callable[[str], None] = logging.info) -> dict[str, Any]:
    """Runs every unfinished run of the study, then aggregates (see the module docstring).

    Args:
      config: the study.
      runner: (argv, log_path) -> exit code; default `subprocess_runner`.
      progress: receives one line per finished or skipped run.

    Returns:
      The aggregate written to study.json.

    Raises:
      ValueError: bad settings (before anything runs), or a run that failed (naming its log).
    """
    runner = runner or subprocess_runner
    per_method = check_config(config)
    specs = plan_study(config, per_method)
    check_existing(config, specs)
    todo = [s.run_dir for s in specs if not is_complete(s.run_dir)]
    progress(f"Study {config.out_dir}: {len(specs)} runs ({len(config.methods)} methods × "
             f"{len(config.labeled)} budgets × {config.repeats} repeats); "
             f"{len(specs) - len(todo)} already finished, {len(todo)} to run.")
    started, durations = time.time(), []
    by_dir = {s.run_dir: s for s in specs}
    for position, run_dir in enumerate(todo, 1):
        spec = by_dir[run_dir]
        if spec.seed is None:  # distinct draws: choose the seeds now that the records exist
            specs = plan_study(config, per_method)
            check_existing(config, specs)
            by_dir = {s.run_dir: s for s in specs}
            spec = by_dir[run_dir]
            if spec.seed is None:
                raise ValueError(
                    f"Cannot choose distinct labeled draws for repeat {spec.repeat}: no finished "
                    "run of this study names a readable records folder (config.json "
                    "records_dir/manifest.json). Re-run, or use --draws=independent.")
        os.makedirs(spec.run_dir, exist_ok=True)
        record = _read_request(spec.run_dir) or {"request": spec.request(config), "seconds": 0.0}
        _write_json(os.path.join(spec.run_dir, REQUEST_NAME), record)
        log_path = os.path.join(spec.run_dir, LOG_NAME)
        run_start = time.time()
        code = runner(spec.train_argv(config), log_path)
        seconds = time.time() - run_start
        # Time accumulates over interrupted attempts (a resumed run only adds its remainder).
        record["seconds"] = float(record.get("seconds") or 0.0) + seconds
        _write_json(os.path.join(spec.run_dir, REQUEST_NAME), record)
        if code != 0 or not is_complete(spec.run_dir):
            raise ValueError(f"Run {spec.name} failed (exit code {code}){_log_error(log_path)};"
                             f" see {log_path}. Fix the cause and re-run the same command: "
                             "finished runs are skipped and this one resumes.")
        durations.append(seconds)
        remaining = (len(todo) - position) * float(np.mean(durations))
        dice = _mean_dice(spec.run_dir)
        progress(f"[{position}/{len(todo)}] {spec.name}: test mean Dice {dice:.4f} in "
                 f"{seconds:.0f} s; elapsed {_duration(time.time() - started)}, "
                 f"ETA {_duration(remaining)}")
    result = aggregate_study(config, specs)
    progress(f"Study written: {os.path.join(config.out_dir, 'study.md')} "
             f"({result['num_complete']}/{result['num_runs']} runs).")
    return result


# --------------------------------------------------------------------------- aggregation
def _read_metrics(run_dir: str) -> list[dict[str, Any]]:
    with open(os.path.join(run_dir, "metrics.csv"), newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [{"subject": r["subject"], "class": r["class"],
             **{m: float(r[m]) for m in METRICS}} for r in rows]


def _mean_dice(run_dir: str) -> float:
    return float(np.mean([r["dice"] for r in _read_metrics(run_dir)]))


def run_values(run_dir: str) -> tuple[list[str], dict[str, dict[str, dict[str, float]]]]:
    """(foreground classes in file order, {class or "mean": {subject: {metric: value}}})."""
    rows = _read_metrics(run_dir)
    classes = list(dict.fromkeys(r["class"] for r in rows))
    values: dict[str, dict[str, dict[str, float]]] = {c: {} for c in [*classes, MEAN_CLASS]}
    for r in rows:
        values[r["class"]][r["subject"]] = {m: r[m] for m in METRICS}
    for subject in dict.fromkeys(r["subject"] for r in rows):
        values[MEAN_CLASS][subject] = {
            m: float(np.mean([values[c][subject][m] for c in classes])) for m in METRICS}
    return classes, values


def run_labeled_subjects(run_dir: str) -> list[str] | None:
    """The labeled training subjects a run used (its config.json's split), or None if unknown."""
    try:
        with open(os.path.join(run_dir, "config.json"), encoding="utf-8") as f:
            labeled = (json.load(f).get("split") or {}).get("labeled")
    except (OSError, ValueError):
        return None
    return sorted(map(str, labeled)) if isinstance(labeled, list) else None


def labeled_draws(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The labeled subjects of each (budget, repeat), and what breaks the study's design.

    Returns {"draws": [{"labeled", "repeat", "seed", "subjects"}], "mismatches": [...],
    "duplicates": [...]}: a mismatch is a (budget, repeat) whose runs did not all train on the same
    subjects (their results are then not paired); a duplicate is a set of repeats of one budget
    that drew the same labeled subjects (the study has fewer distinct labeled draws than repeats).
    """
    first: dict[tuple[int, int], Mapping[str, Any]] = {}  # (budget, repeat) -> its first run
    mismatches = []
    for r in runs:
        if r.get("labeled_subjects") is None:
            continue
        ref = first.setdefault((r["labeled"], r["repeat"]), r)
        if ref["labeled_subjects"] != r["labeled_subjects"]:
            mismatches.append({"labeled": r["labeled"], "repeat": r["repeat"],
                               "methods": [ref["method"], r["method"]],
                               "subjects": [ref["labeled_subjects"], r["labeled_subjects"]]})
    draws = [{"labeled": r["labeled"], "repeat": r["repeat"], "seed": r["split_seed"],
              "subjects": r["labeled_subjects"]} for _, r in sorted(first.items())]
    groups: dict[tuple[int, tuple[str, ...]], list[int]] = {}
    for d in draws:
        groups.setdefault((d["labeled"], tuple(d["subjects"])), []).append(d["repeat"])
    duplicates = [{"labeled": n, "repeats": repeats, "subjects": list(subjects)}
                  for (n, subjects), repeats in groups.items() if len(repeats) > 1]
    return {"draws": draws, "mismatches": mismatches, "duplicates": duplicates}


def describe(values: Sequence[float]) -> dict[str, Any]:
    """n, mean, population std and median (None when empty)."""
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        return {"n": 0, "mean": None, "std": None, "median": None}
    return {"n": int(array.size), "mean": float(array.mean()), "std": float(array.std()),
            "median": float(np.median(array))}


def paired_wilcoxon(a: Mapping[Any, float], b: Mapping[Any, float],
                    min_pairs: int = 5, lower_is_better: bool = False) -> dict[str, Any]:
    """Two-sided Wilcoxon signed-rank test of a vs b on their common keys.

    Args:
      a, b: pairing key (repeat, subject) -> value.
      min_pairs: fewer common keys -> "n/a".
      lower_is_better: the metric is a distance (HD95): "better" counts lower values.

    Returns:
      {"n_pairs", "n_nonzero", "mean_difference", "median_difference" (a − b), "a_better",
       "b_better" (counts of pairs where that side is better: higher Dice, or lower values
       with lower_is_better), "statistic", "p_value", "note"}; p_value and statistic are None
       with a reason in "note" for degenerate cases.
    """
    from scipy import stats

    keys = sorted(set(a) & set(b))
    x = np.array([a[k] for k in keys], dtype=np.float64)
    y = np.array([b[k] for k in keys], dtype=np.float64)
    d = x - y
    result = {"n_pairs": len(keys), "n_nonzero": int(np.count_nonzero(d)),
              "mean_difference": float(d.mean()) if keys else None,
              "median_difference": float(np.median(d)) if keys else None,
              "a_better": int((d < 0).sum() if lower_is_better else (d > 0).sum()),
              "b_better": int((d > 0).sum() if lower_is_better else (d < 0).sum()),
              "statistic": None, "p_value": None, "note": ""}
    if len(keys) < min_pairs:
        result["note"] = f"n/a: {len(keys)} pairs, fewer than the {min_pairs} required"
    elif not np.any(d):
        result["note"] = "n/a: all differences are zero"
    else:
        test = stats.wilcoxon(x, y)
        result["statistic"], result["p_value"] = float(test.statistic), float(test.pvalue)
    return result


def aggregate_study(config: StudyConfig, specs: Sequence[RunSpec] | None = None
                    ) -> dict[str, Any]:
    """Aggregates the finished runs into study.json, study.md and plots/ (see module docstring).

    Unfinished runs are listed as such and left out of the statistics.
    """
    if specs is None:
        specs = plan_study(config, split_overrides(config.overrides, _fields_for(config)))
    runs, classes = [], []
    # values[method][N][class][metric] = {(repeat, subject): value}
    values: dict[str, dict[int, dict[str, dict[str, dict]]]] = {}
    for spec in specs:
        record = _read_request(spec.run_dir) or {}
        complete = is_complete(spec.run_dir)
        seed = (record.get("request") or {}).get("split_seed", spec.seed)
        entry = {"method": spec.method, "labeled": spec.labeled, "repeat": spec.repeat,
                 "split_seed": seed, "seed": seed,
                 "run_dir": os.path.relpath(spec.run_dir, config.out_dir), "complete": complete,
                 "seconds": record.get("seconds"), "mean_dice": None,
                 "labeled_subjects": run_labeled_subjects(spec.run_dir)}
        if complete:
            run_classes, run = run_values(spec.run_dir)
            classes = classes or run_classes
            if run_classes != classes:
                raise ValueError(f"{spec.run_dir}/metrics.csv has classes {run_classes}, other "
                                 f"runs {classes}: the study mixes datasets.")
            entry["mean_dice"] = float(np.mean([v["dice"] for v in run[MEAN_CLASS].values()]))
            budget = values.setdefault(spec.method, {}).setdefault(spec.labeled, {})
            for name, subjects in run.items():
                for metric in METRICS:
                    target = budget.setdefault(name, {}).setdefault(metric, {})
                    for subject, metrics in subjects.items():
                        target[(spec.repeat, subject)] = metrics[metric]
        runs.append(entry)
    names = [*classes, MEAN_CLASS] if classes else []
    results = {m: {str(n): {c: {metric: describe(list(
        values.get(m, {}).get(n, {}).get(c, {}).get(metric, {}).values())) for metric in METRICS}
        for c in names} for n in config.labeled} for m in config.methods}
    for m in config.methods:  # spread over repeats of the per-run mean Dice
        for n in config.labeled:
            means = [r["mean_dice"] for r in runs if r["method"] == m and r["labeled"] == n
                     and r["complete"]]
            results[m][str(n)]["run_mean_dice"] = describe(means)
    comparisons = []
    for a, b in comparison_pairs(config):
        for n in config.labeled:
            for c in names:
                for metric in METRICS:
                    test = paired_wilcoxon(
                        values.get(a, {}).get(n, {}).get(c, {}).get(metric, {}),
                        values.get(b, {}).get(n, {}).get(c, {}).get(metric, {}),
                        config.min_pairs, lower_is_better=metric in LOWER_IS_BETTER)
                    comparisons.append({"a": a, "b": b, "labeled": n, "class": c,
                                        "metric": metric, **test})
    seconds = [r["seconds"] for r in runs if r["seconds"] is not None]
    result = {
        "dataset": config.dataset, "dataset_options": dict(config.dataset_options),
        "methods": list(config.methods), "arms": dict(config.arms),
        "arm_overrides": {s.method: list(s.overrides) for s in specs},
        "labeled": list(config.labeled),
        "repeats": config.repeats, "seed": config.seed, "draws": config.draws,
        "preset": config.preset,
        "overrides": list(config.overrides), "steps": config.steps,
        "baseline": config.baseline, "classes": names, "pairing": PAIRING_KEY,
        "std": STD_NOTE, "test": "scipy.stats.wilcoxon(a, b), two-sided, zero_method='wilcox'",
        "min_pairs": config.min_pairs, "num_runs": len(runs),
        "num_complete": sum(r["complete"] for r in runs),
        "total_seconds": float(sum(seconds)), "runs": runs, "results": results,
        "comparisons": comparisons, "labeled_draws": labeled_draws(runs),
    }
    os.makedirs(config.out_dir, exist_ok=True)
    result["plots"] = write_plots(result, values, config.out_dir) if names else {}
    _write_json(os.path.join(config.out_dir, "study.json"), result)
    write_text_atomic(os.path.join(config.out_dir, "study.md"), study_markdown(result))
    return result


def comparison_pairs(config: StudyConfig) -> list[tuple[str, str]]:
    """Each method against the baseline (if in the study), then the named pairs, no repeats."""
    pairs = []
    if config.baseline in config.methods:
        pairs += [(m, config.baseline) for m in config.methods if m != config.baseline]
    for pair in config.compare:
        if pair not in pairs and pair[::-1] not in pairs:
            pairs.append(tuple(pair))
    return pairs


def _fields_for(config: StudyConfig) -> dict[str, list[str]]:
    from tfseg.methods import get_method_module

    return {label: [f.name for f in dataclasses.fields(get_method_module(m).Config)]
            for label, m in config.arms.items()}


# --------------------------------------------------------------------------- reports
def _cell(stats: Mapping[str, Any], digits: int) -> str:
    if not stats["n"]:
        return "—"
    return (f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f} "
            f"({stats['median']:.{digits}f})")


def study_markdown(result: Mapping[str, Any]) -> str:
    """study.md: settings, tables per budget, the tests, the plots and the runs."""
    names, methods = result["classes"], result["methods"]
    lines = [f"# Study: {result['dataset']} — {', '.join(methods)}", "",
             f"- Runs finished: {result['num_complete']} / {result['num_runs']} "
             f"({len(methods)} methods × budgets {', '.join(map(str, result['labeled']))} "
             f"labeled × {result['repeats']} repeats); training time (sum over runs, wall "
             f"clock): {_duration(result['total_seconds'])}",
             f"- Preset: {result['preset'] or 'none'}; overrides: "
             f"{', '.join(result['overrides']) or 'none'}; steps: {result['steps'] or 'default'};"
             f" repeat k uses split seed and training seed "
             + (f"{result['seed']} + k." if result.get("draws", "independent") == "independent"
                else f"s_k: {result['seed']}, then the next seed whose labeled subjects no "
                     "earlier repeat drew (see Labeled draws)."),
             f"- Cells: mean ± std (median) over test subjects pooled over repeats "
             f"({result['std']}); \"{MEAN_CLASS}\" = each subject's mean over the foreground "
             "classes. Per-subject values from each run's metrics.csv (test split, original "
             "geometry; HD95 in mm).", ""]
    arms, arm_overrides = result.get("arms") or {}, result.get("arm_overrides") or {}
    if any(arms.get(m, m) != m or arm_overrides.get(m) for m in methods):
        lines += ["| Arm | method | settings |", "|---|---|---|"]
        lines += [f"| {m} | {arms.get(m, m)} | {', '.join(arm_overrides.get(m, [])) or '—'} |"
                  for m in methods]
        lines.append("")
    for metric, digits in (("dice", 3), ("hd95_mm", 2)):
        lines += [f"## {METRIC_TITLES[metric]}", ""]
        for n in result["labeled"]:
            per_run = metric == "dice"  # plus the spread of the runs' mean Dice over repeats
            lines += [f"### {n} labeled", "",
                      "| Method | n | " + " | ".join(names)
                      + (" | runs: mean Dice over repeats |" if per_run else " |"),
                      "|---" * (len(names) + 2 + per_run) + "|"]
            for m in methods:
                cells = result["results"][m][str(n)]
                count = cells[names[0]][metric]["n"] if names else 0
                runs = cells["run_mean_dice"]
                extra = (f" {_cell(runs, 3)} ({runs['n']} runs) |" if per_run and runs["n"]
                         else " — |" if per_run else "")
                lines.append(f"| {m} | {count} | "
                             + " | ".join(_cell(cells[c][metric], digits) for c in names)
                             + " |" + extra)
            lines.append("")
    lines += ["## Paired Wilcoxon signed-rank tests", "",
              f"{result['pairing']} Test: {result['test']}; \"n/a\" when fewer than "
              f"{result['min_pairs']} pairs or all differences are zero. With fewer than 6 "
              "non-zero differences no two-sided exact p-value can be below 0.05. \"A better / "
              "B better\" counts the pairs where that method is better: higher Dice, lower "
              "HD95.", ""]
    for metric, digits in (("dice", 4), ("hd95_mm", 2)):
        tests = [t for t in result["comparisons"] if t["metric"] == metric]
        if not tests:
            continue
        lines += [f"### {METRIC_TITLES[metric]}", "",
                  "| A vs B | labeled | class | pairs | mean Δ (A−B) | median Δ | A better / "
                  "B better | p |",
                  "|---|---|---|---|---|---|---|---|"]
        for t in tests:
            delta = ("—" if t["mean_difference"] is None
                     else f"{t['mean_difference']:+.{digits}f}")
            median = ("—" if t["median_difference"] is None
                      else f"{t['median_difference']:+.{digits}f}")
            p = f"{t['p_value']:.4g}" if t["p_value"] is not None else t["note"]
            lines.append(f"| {t['a']} vs {t['b']} | {t['labeled']} | {t['class']} | "
                         f"{t['n_pairs']} | {delta} | {median} | {t['a_better']} / "
                         f"{t['b_better']} | {p} |")
        lines.append("")
    if not result["comparisons"]:
        lines += [f"No comparison: the baseline {result['baseline']!r} is not among the "
                  "methods and no --compare pair was given.", ""]
    plots = result.get("plots") or {}
    if plots:
        lines += ["## Plots", "", f"![Dice vs labeled subjects]({plots['label_efficiency']})", ""]
        for n, path in plots.get("boxplots", {}).items():
            lines += [f"![Dice per class, {n} labeled]({path})", ""]
    lines += _draws_markdown(result.get("labeled_draws") or {})
    lines += ["## Runs", "", "| Method | labeled | repeat | seed | finished | mean Dice | "
              "seconds | folder |", "|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        dice = "—" if r["mean_dice"] is None else f"{r['mean_dice']:.4f}"
        seconds = "—" if r["seconds"] is None else f"{r['seconds']:.0f}"
        lines.append(f"| {r['method']} | {r['labeled']} | {r['repeat']} | {r['seed']} | "
                     f"{'yes' if r['complete'] else 'no'} | {dice} | {seconds} | "
                     f"{r['run_dir']} |")
    return "\n".join(lines) + "\n"


def _draws_markdown(info: Mapping[str, Any]) -> list[str]:
    """The "Labeled draws" section: subjects per (budget, repeat) and the design warnings."""
    if not info.get("draws"):
        return []
    lines = ["## Labeled draws", "", "| labeled | repeat | split seed | labeled subjects |",
             "|---|---|---|---|"]
    lines += [f"| {d['labeled']} | {d['repeat']} | {d['seed']} | {', '.join(d['subjects'])} |"
              for d in info["draws"]]
    lines.append("")
    for d in info.get("duplicates", []):
        lines.append(f"**Warning:** with {d['labeled']} labeled, repeats "
                     f"{', '.join(map(str, d['repeats']))} drew the same labeled subjects "
                     f"({', '.join(d['subjects'])}); they differ in seed, validation and test "
                     "subjects, but the study has fewer distinct labeled draws than repeats.")
    for m in info.get("mismatches", []):
        lines.append(f"**Warning:** with {m['labeled']} labeled, repeat {m['repeat']}: "
                     f"{m['methods'][0]} trained on {', '.join(m['subjects'][0])} but "
                     f"{m['methods'][1]} on {', '.join(m['subjects'][1])}; their results are not"
                     " paired (were the records or the dataset changed between runs?).")
    if info.get("duplicates") or info.get("mismatches"):
        lines.append("")
    return lines


def write_plots(result: Mapping[str, Any], values, out_dir: str) -> dict[str, Any]:
    """Label-efficiency curves and per-budget box plots of Dice; returns relative paths."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names, methods, budgets = result["classes"], result["methods"], result["labeled"]
    folder = os.path.join(out_dir, PLOTS_DIR)
    os.makedirs(folder, exist_ok=True)
    paths: dict[str, Any] = {"boxplots": {}}

    # 1. Dice vs number of labeled subjects: mean ± std per method, one panel per class.
    figure = Figure(figsize=(3.2 * len(names), 3.2), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(names), squeeze=False)[0]
    for axis, name in zip(axes, names):
        for m in methods:
            stats = [result["results"][m][str(n)][name]["dice"] for n in budgets]
            points = [(n, s["mean"], s["std"]) for n, s in zip(budgets, stats) if s["n"]]
            if not points:
                continue
            x, mean, std = (np.array(v, dtype=float) for v in zip(*points))
            line = axis.errorbar(x, mean, yerr=std, marker="o", capsize=3, label=m)
            axis.fill_between(x, mean - std, mean + std, alpha=0.15, color=line[0].get_color())
        axis.set(title=name, xlabel="labeled subjects", ylim=(0, 1), xticks=budgets)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("Dice (mean ± std)")
    axes[-1].legend(fontsize="small")
    paths["label_efficiency"] = _save_figure(figure, folder, "label_efficiency.png", out_dir)

    # 2. Box plots per class and method at each budget.
    for n in budgets:
        figure = Figure(figsize=(max(3.2, 0.9 * len(methods) + 1) * len(names), 3.4),
                        layout="constrained")
        FigureCanvasAgg(figure)
        axes = figure.subplots(1, len(names), squeeze=False)[0]
        for axis, name in zip(axes, names):
            data = [list(values.get(m, {}).get(n, {}).get(name, {}).get("dice", {}).values())
                    for m in methods]
            axis.boxplot([d if d else [math.nan] for d in data], tick_labels=methods)
            axis.set(title=f"{name}, {n} labeled", ylim=(0, 1))
            axis.tick_params(axis="x", labelrotation=30)
            axis.grid(alpha=0.3, axis="y")
        axes[0].set_ylabel("Dice per test subject")
        paths["boxplots"][str(n)] = _save_figure(figure, folder, f"boxplot_l{n}.png", out_dir)
    return paths


def _save_figure(figure, folder: str, name: str, out_dir: str) -> str:
    """Saves a PNG atomically (temporary file, then rename) with the usual permissions."""
    handle, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    os.close(handle)
    try:
        figure.savefig(temporary, dpi=100, format="png")
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(temporary, 0o666 & ~mask)
        os.replace(temporary, os.path.join(folder, name))
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return os.path.relpath(os.path.join(folder, name), out_dir)


def _write_json(path: str, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")
