"""A study's settings and plan: `StudyConfig`, the arms and `--set` overrides per method
(`check_config`), and the runs with each repeat's split seed (`plan_runs`, `repeat_seeds`,
`plan_study`). Nothing here trains or writes; see the package docstring for the design."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from typing import Any, Mapping, Sequence

RUNS_DIR = "runs"
DRAWS = ("distinct", "independent")
# Seeds tried per repeat for a labeled draw that no earlier repeat made (then the study goes on
# with a repeated draw, which study.md reports).
MAX_SEED_TRIES = 1000
# `--set` names that are launch.train flags, not method settings: `--set=mixed_precision=bf16`
# (every arm) or `--set=ARM:mixed_precision=bf16` runs launch.train --mixed_precision=bf16, so a
# study can compare precisions arm by arm (e.g. fp32=supervised,bf16=supervised).
# `--set=ARM:seed_offset=K` trains the arm with launch.train --seed=<the repeat's seed + K>: the
# same labeled draw, split and test set, other initial weights and batches (an arm that measures
# how far a method moves with its training seed alone, the yardstick of a precision study).
TRAIN_SETTINGS = ("mixed_precision", "seed_offset")


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """A label-efficiency study (the flags of launch.study).

    Attributes:
      dataset / dataset_options / data_dir: as in `tfseg.train.TrainConfig` (dataset_options:
        launch.train's --phase and --dataset_option=name=value).
      target_dataset / target_data_dir / target_dataset_options / target_records_dir: a second
        data domain, as in `tfseg.train.TrainConfig` (launch.train's --target_* flags); every
        run gets them, its target split drawn with the repeat's split seed, and the reports add
        the target-domain test results (`<run_dir>/target/metrics.csv`). None: no target.
      methods: the study's arms: a method module name ("supervised") or "label=method"
        ("RDRI=supervised"), so one method can appear with different settings
        (`--set=RDRI:augment=affine+elastic+intensity`). Stored as the labels; `arms` maps each
        label to its method. Labels name the run folders, the table rows and `baseline`.
      labeled: numbers of labeled subjects (budgets), e.g. (1, 3).
      repeats: labeled draws per budget; repeat k uses split seed and training seed s_k.
      draws: "distinct" (s_k skips seeds that would repeat an earlier repeat's labeled subjects)
        or "independent" (s_k = seed + k); see the package docstring.
      out_dir: the study folder (runs/, study.json, study.md, plots/).
      preset: method preset for every method (e.g. "quick").
      overrides: "name=value" (every method whose Config has the field) or
        "method:name=value" (that method only).
      compare: extra (a, b) method pairs to test besides each method against `baseline`.
      baseline: the method every other one is tested against (if among `methods`).
      steps / validation_every / n4 / num_val / num_test / records_root / preprocess_workers:
        passed to every launch.train run (n4, records_root and preprocess_workers also choose
        the records the study resolves before it plans).
      seed: base seed.
      fixed_test: every run draws its test and validation patients with the base seed
        (launch.train --test_seed), so only the labeled draw changes between repeats and every
        repeat is scored on the same test set; off: each repeat's seed draws test/val too.
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
    target_dataset: str | None = None
    target_data_dir: str | None = None
    target_dataset_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    target_records_dir: str | None = None
    fixed_test: bool = False

    @property
    def test_seed(self) -> int | None:
        """launch.train's --test_seed for every run (None: each repeat's split seed)."""
        return self.seed if self.fixed_test else None

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
        object.__setattr__(self, "target_dataset_options", dict(self.target_dataset_options))
        if not self.target_dataset and (self.target_data_dir or self.target_records_dir
                                        or self.target_dataset_options):
            raise ValueError("--target_data_dir / --target_records_dir / --target_option need "
                             "--target_dataset (the second domain's dataset).")
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
    seed: int | None  # None: a distinct draw not yet chosen (the records' pools are unknown)
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
                "n4": config.n4, "num_val": config.num_val, "num_test": config.num_test,
                "target": target_request(config),
                **({"test_seed": config.test_seed} if config.fixed_test else {})}

    def train_argv(self, config: StudyConfig, records_dir: str | None = None) -> list[str]:
        """The `python -m launch.train` command line of this run.

        records_dir: the records folder the study resolved (`--records_dir`); None lets
        launch.train find (or make) them under `records_root` itself.
        """
        argv = [sys.executable, "-m", "launch.train", f"--method={self.module}",
                f"--labeled={self.labeled}", f"--split_seed={self.seed}", f"--seed={self.seed}",
                f"--run_dir={os.path.abspath(self.run_dir)}", *data_flags(config),
                "--export" if config.export else "--noexport",
                f"--preprocess_workers={config.preprocess_workers}"]
        if records_dir is not None:
            argv.append(f"--records_dir={os.path.abspath(records_dir)}")
        for name in ("preset", "steps", "validation_every", "num_val", "num_test"):
            if getattr(config, name) is not None:
                argv.append(f"--{name}={getattr(config, name)}")
        if config.fixed_test:
            argv.append(f"--test_seed={config.test_seed}")
        argv += target_flags(config)
        offsets = [int(item.partition("=")[2]) for item in self.overrides
                   if _setting_name(item) == "seed_offset"]
        if offsets:  # the last one wins, as for absl flags
            argv[argv.index(f"--seed={self.seed}")] = f"--seed={self.seed + offsets[-1]}"
        argv += [f"--{item}" if is_train_setting(item) else f"--set={item}"
                 for item in self.overrides if _setting_name(item) != "seed_offset"]
        return argv


def _setting_name(item: str) -> str:
    """The name of a "name=value" override."""
    return item.partition("=")[0].strip()


def is_train_setting(item: str) -> bool:
    """Whether a "name=value" override is a launch.train flag (`TRAIN_SETTINGS`)."""
    return _setting_name(item) in TRAIN_SETTINGS


def target_request(config: StudyConfig) -> dict[str, Any] | None:
    """The study's target domain as recorded (study.json, each run's request), or None."""
    if not config.target_dataset:
        return None
    return {"dataset": config.target_dataset,
            "dataset_options": dict(config.target_dataset_options),
            "data_dir": _abs(config.target_data_dir),
            "records_dir": _abs(config.target_records_dir)}


def target_flags(config: StudyConfig) -> list[str]:
    """launch.train's flags of the target domain (none without one)."""
    if not config.target_dataset:
        return []
    flags = [f"--target_dataset={config.target_dataset}"]
    if config.target_data_dir:
        flags.append(f"--target_data_dir={os.path.abspath(config.target_data_dir)}")
    if config.target_records_dir:
        flags.append(f"--target_records_dir={os.path.abspath(config.target_records_dir)}")
    flags += [f"--target_option={k}={v}" for k, v in config.target_dataset_options.items()]
    return flags


def _abs(path: str | None) -> str | None:
    return os.path.abspath(path) if path else None


def data_flags(config: StudyConfig) -> list[str]:
    """The flags that choose the records, the same for launch.train and launch.preprocess:
    dataset, records_root, N4, the data folder and the dataset's options (phase as --phase,
    every other one as --dataset_option=name=value)."""
    flags = [f"--dataset={config.dataset}",
             f"--records_root={os.path.abspath(config.records_root)}",
             "--n4" if config.n4 else "--non4"]
    if config.data_dir:
        flags.append(f"--data_dir={os.path.abspath(config.data_dir)}")
    if config.dataset_options.get("phase"):
        flags.append(f"--phase={config.dataset_options['phase']}")
    flags += [f"--dataset_option={k}={v}" for k, v in config.dataset_options.items()
              if k != "phase"]
    return flags


# --------------------------------------------------------------------------- checks
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
        targets = [m for m, fields in method_fields.items()
                   if name in fields or name in TRAIN_SETTINGS]
        if not targets:
            raise ValueError(f"--set={item!r}: none of the study's methods "
                             f"({', '.join(method_fields)}) has a setting {name!r}.")
        for method in targets:
            result[method].append(f"{name}={value}")
    return {m: tuple(v) for m, v in result.items()}


def method_fields(config: StudyConfig) -> dict[str, list[str]]:
    """Arm label -> the field names of its method's Config."""
    from tfseg.methods import get_method_module

    return {label: [f.name for f in dataclasses.fields(get_method_module(m).Config)]
            for label, m in config.arms.items()}


def check_config(config: StudyConfig) -> dict[str, tuple[str, ...]]:
    """Validates names, preset and overrides of every method before anything runs.

    Returns:
      method -> its overrides.

    Raises:
      ValueError: unknown dataset (or target dataset), method, preset or setting, or a value that does not parse.
    """
    from tfseg.datasets import available_datasets
    from tfseg.methods import available_methods, get_method_module, resolve_config

    if config.dataset not in available_datasets():
        raise ValueError(f"Unknown dataset {config.dataset!r}. Available: "
                         f"{', '.join(available_datasets())}.")
    if config.target_dataset and config.target_dataset not in available_datasets():
        raise ValueError(f"Unknown target dataset {config.target_dataset!r}. Available: "
                         f"{', '.join(available_datasets())}.")
    unknown = sorted({m for m in config.arms.values() if m not in available_methods()})
    if unknown:
        raise ValueError(f"Unknown method(s) {', '.join(map(repr, unknown))}. Available: "
                         f"{', '.join(available_methods())}.")
    per_method = split_overrides(config.overrides, method_fields(config))
    from tfseg.hardware import check_mixed_precision

    for label, method in config.arms.items():
        try:
            for item in filter(is_train_setting, per_method[label]):
                name, _, value = item.partition("=")
                if name.strip() == "seed_offset":
                    try:
                        int(value)
                    except ValueError:
                        raise ValueError(f"--set=seed_offset={value.strip()!r}: an integer "
                                         "(added to each repeat's training seed), e.g. "
                                         "--set=ARM:seed_offset=1000.") from None
                else:
                    check_mixed_precision(value.strip(), "--set=mixed_precision")
            resolve_config(get_method_module(method), config.preset,
                           [o for o in per_method[label] if not is_train_setting(o)])
        except ValueError as error:
            raise ValueError(f"Method {_arm_name(config, label)}: {error}") from None
    return per_method


def _arm_name(config: StudyConfig, label: str) -> str:
    method = config.arms.get(label, label)
    return repr(label) if method == label else f"{label!r} ({method})"


# --------------------------------------------------------------------------- plan
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
    """The split seed of each repeat (package docstring, step 2).

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
                              config.num_test, config.test_seed).labeled for n in config.labeled}

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


def manifest_pools(records_dir: str) -> tuple[list[str], list[str]]:
    """The patient pools (labeled, image-only) of the records in `records_dir`.

    Raises:
      ValueError: the folder has no readable manifest.json.
    """
    from tfseg.data.splits import patient_pools

    path = os.path.join(records_dir, "manifest.json")
    try:
        with open(path, encoding="utf-8") as f:
            return patient_pools(json.load(f))
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as error:
        raise ValueError(f"Cannot read the patients of the records {records_dir} ({path}: "
                         f"{error}); delete that folder to preprocess again.") from None


def records_pools(run_dirs: Sequence[str]) -> tuple[list[str], list[str]] | None:
    """The records' patient pools, via the records folder a run's config.json names (or None)."""
    for run_dir in run_dirs:
        try:
            with open(os.path.join(run_dir, "config.json"), encoding="utf-8") as f:
                records_dir = json.load(f).get("records_dir")
            return manifest_pools(str(records_dir))
        except (OSError, ValueError, AttributeError):
            continue
    return None


def plan_study(config: StudyConfig, per_method: Mapping[str, Sequence[str]],
               records_dir: str | None = None) -> list[RunSpec]:
    """plan_runs with the seed of every repeat (`repeat_seeds`).

    records_dir: the study's records (what `run_study` resolves before it plans). Without it
      (reports of finished runs, which must not preprocess) the pools come from the records a
      finished run names in its config.json, and distinct draws stay unknown (None) until then.
    """
    specs = plan_runs(config, per_method)
    pools = (manifest_pools(records_dir) if records_dir is not None
             else records_pools([s.run_dir for s in specs]))
    seeds = repeat_seeds(config, pools)
    return [dataclasses.replace(s, seed=seeds[s.repeat]) for s in specs]
