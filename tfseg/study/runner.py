"""Running a study: resolve the dataset's records (`resolve_records`, a `python -m
launch.preprocess` child with launch.train's settings), plan every repeat with the records'
patient pools known, refuse run folders made with other settings (`check_existing`), then run each
unfinished run as a `python -m launch.train` child (`subprocess_runner`), skipping finished ones,
and aggregate (`run_study`)."""
from __future__ import annotations

import ctypes
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from typing import IO, Any, Callable, Sequence

import numpy as np
from absl import logging

from tfseg._files import write_json_atomic
from tfseg.study.plan import (RunSpec, StudyConfig, check_config, data_flags, plan_runs,
                              plan_study, repeat_seeds)
from tfseg.study.report import aggregate_study, format_duration
from tfseg.study.runs import REQUEST_NAME, is_complete, mean_dice, read_request

LOG_NAME = "study_train.log"
PREPROCESS_LOG_NAME = "study_preprocess.log"
_REQUEST_KEYS = ("method", "dataset", "dataset_options", "labeled", "repeat", "split_seed", "seed",
                 "preset", "overrides", "steps", "validation_every", "n4", "num_val", "num_test",
                 "target", "test_seed")
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The last error a child reported: launch.train's one-line error, or launch.preprocess's
# absl ERROR line (`E<mmdd> <time> <thread> <file>.py:<line>] message`).
_TRAIN_ERROR = re.compile(r"launch\.train: (error: .*)")
_PREPROCESS_ERROR = re.compile(r"E\d{4} \S+\s+\d+ \S+\.py:\d+\] (.*)")


def check_existing(config: StudyConfig, specs: Sequence[RunSpec]) -> None:
    """Refuses run folders made by a study with other settings (before anything runs)."""
    for spec in specs:
        record = read_request(spec.run_dir)
        if record is None:
            continue
        old, new = record.get("request", {}), spec.request(config)
        unknown = ("split_seed", "seed") if spec.seed is None else ()  # checked once known
        differs = [k for k in _REQUEST_KEYS if k not in unknown and old.get(k) != new.get(k)]
        if differs:
            raise ValueError(f"{spec.run_dir} holds a run made with other settings (differs in: "
                             f"{', '.join(differs)}). Use another --out, or delete that folder "
                             "to redo it.")


# --------------------------------------------------------------------------- child processes
def _die_with_parent() -> None:
    """In the child: receive SIGKILL when the study process dies (Linux prctl)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _run_child(argv: Sequence[str], log_path: str, stdout: IO | None = None) -> int:
    """Runs a command from the repository root, dying with the study; returns its exit code.

    Its stderr (and its stdout, unless `stdout` is given) is appended to `log_path`, after a
    line with the time and the command.
    """
    env = dict(os.environ, KERAS_BACKEND="tensorflow",
               PYTHONPATH=os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH")) if p))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} "
                  f"{' '.join(shlex.quote(a) for a in argv)}\n")
        log.flush()
        preexec = _die_with_parent if sys.platform.startswith("linux") else None
        process = subprocess.Popen(list(argv), stdout=log if stdout is None else stdout,
                                   stderr=log, env=env, cwd=_ROOT, preexec_fn=preexec)
        try:
            return process.wait()
        except BaseException:
            process.kill()
            process.wait()
            raise


def subprocess_runner(argv: Sequence[str], log_path: str) -> int:
    """Runs one launch.train command, output appended to `log_path`; returns its exit code."""
    return _run_child(argv, log_path)


def preprocess_argv(config: StudyConfig) -> list[str]:
    """The `python -m launch.preprocess` command that finds (or makes) the study's records.

    It passes what launch.train passes to `preprocess_dataset` (dataset and its options, data
    folder, N4, records_root, workers; every other preprocessing setting the dataset's default),
    so the records get the fingerprint folder launch.train would use.
    """
    return [sys.executable, "-m", "launch.preprocess", *data_flags(config),
            f"--workers={config.preprocess_workers}"]


def resolve_records(config: StudyConfig, log_path: str) -> str:
    """The study's records folder: preprocessed now if missing or unfinished, as launch.train
    would on first use (`preprocess_argv`), in a child process so that the study process does
    not load TensorFlow. Its log is appended to `log_path`.

    Raises:
      ValueError: the preprocessing failed (naming its error and log).
    """
    with tempfile.TemporaryFile("w+", encoding="utf-8") as stdout:
        code = _run_child(preprocess_argv(config), log_path, stdout=stdout)
        stdout.seek(0)
        printed = [line.strip() for line in stdout.read().splitlines() if line.strip()]
    folder = printed[-1] if printed else ""
    if code != 0 or not os.path.isfile(os.path.join(folder, "manifest.json")):
        raise ValueError(f"Preprocessing {config.dataset} for the study failed (exit code "
                         f"{code}){_log_error(log_path, _PREPROCESS_ERROR)}; see {log_path}. "
                         "Fix the cause and re-run the same command.")
    return folder


def _log_error(log_path: str, pattern: re.Pattern = _TRAIN_ERROR) -> str:
    """A child's last error line (`pattern`'s group 1) from the end of its log, if any."""
    try:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            lines = f.read()[-20000:].splitlines()
    except OSError:
        return ""
    errors = [m.group(1) for m in map(pattern.fullmatch, lines) if m]
    return f": {errors[-1]}" if errors else ""


# --------------------------------------------------------------------------- the study
def run_study(config: StudyConfig, runner: Callable[[Sequence[str], str], int] | None = None,
              progress: Callable[[str], None] = logging.info,
              records: Callable[[StudyConfig, str], str] | None = None) -> dict[str, Any]:
    """Runs every unfinished run of the study, then aggregates (see the package docstring).

    Args:
      config: the study.
      runner: (argv, log_path) -> exit code; default `subprocess_runner`.
      progress: receives one line before the records are resolved, one with the plan, and one
        per finished run.
      records: (config, log_path) -> the records folder; default `resolve_records`.

    Returns:
      The aggregate written to study.json.

    Raises:
      ValueError: bad settings (before anything runs), or a preprocessing or run that failed
        (naming its log).
    """
    runner = runner or subprocess_runner
    records = records or resolve_records
    per_method = check_config(config)
    # Folders of another study are refused before a possibly long preprocessing (the seeds of
    # distinct draws are compared once the records are known).
    check_existing(config, plan_runs(config, per_method, repeat_seeds(config, None)))
    log_path = os.path.join(config.out_dir, PREPROCESS_LOG_NAME)
    progress(f"Study {config.out_dir}: finding the records of {config.dataset} (preprocessed on "
             f"first use; log: {log_path}).")
    records_dir = records(config, log_path)
    specs = plan_study(config, per_method, records_dir)
    check_existing(config, specs)
    todo = [s for s in specs if not is_complete(s.run_dir)]
    progress(f"Study {config.out_dir}: {len(specs)} runs ({len(config.methods)} methods × "
             f"{len(config.labeled)} budgets × {config.repeats} repeats); "
             f"{len(specs) - len(todo)} already finished, {len(todo)} to run; records: "
             f"{records_dir}.")
    started, durations = time.time(), []
    for position, spec in enumerate(todo, 1):
        os.makedirs(spec.run_dir, exist_ok=True)
        record = read_request(spec.run_dir) or {"request": spec.request(config), "seconds": 0.0}
        write_json_atomic(os.path.join(spec.run_dir, REQUEST_NAME), record, default=str)
        log_path = os.path.join(spec.run_dir, LOG_NAME)
        run_start = time.time()
        code = runner(spec.train_argv(config, records_dir), log_path)
        seconds = time.time() - run_start
        # Time accumulates over interrupted attempts (a resumed run only adds its remainder).
        record["seconds"] = float(record.get("seconds") or 0.0) + seconds
        write_json_atomic(os.path.join(spec.run_dir, REQUEST_NAME), record, default=str)
        if code != 0 or not is_complete(spec.run_dir):
            raise ValueError(f"Run {spec.name} failed (exit code {code}){_log_error(log_path)};"
                             f" see {log_path}. Fix the cause and re-run the same command: "
                             "finished runs are skipped and this one resumes.")
        durations.append(seconds)
        remaining = (len(todo) - position) * float(np.mean(durations))
        dice = mean_dice(spec.run_dir)
        progress(f"[{position}/{len(todo)}] {spec.name}: test mean Dice {dice:.4f} in "
                 f"{seconds:.0f} s; elapsed {format_duration(time.time() - started)}, "
                 f"ETA {format_duration(remaining)}")
    result = aggregate_study(config, specs)
    progress(f"Study written: {os.path.join(config.out_dir, 'study.md')} "
             f"({result['num_complete']}/{result['num_runs']} runs).")
    return result
