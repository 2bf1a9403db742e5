"""Shared launcher helpers: environment before TensorFlow loads, flag parsing, errors, logging.

Each launcher defines its flags on its own `flags.FlagValues()` (so several launchers can be
imported in one process, e.g. by the tests) and calls `parse_flags` in `main(argv)`:

    FLAGS = flags.FlagValues()
    flags.DEFINE_string("run_dir", None, "...", flag_values=FLAGS)
    def main(argv):
        _common.parse_flags(FLAGS, argv, "launch.evaluate")
        ...
    if __name__ == "__main__":
        sys.exit(main(sys.argv))
"""
from __future__ import annotations

import os
import sys
from typing import NoReturn, Sequence

from absl import flags, logging


def setup_environment() -> None:
    """Backend and log level; call before anything imports TensorFlow or Keras. Also turns
    SIGTERM (what schedulers and `docker stop` send) into SystemExit(143), so cleanup runs as
    on Ctrl-C: worker processes are stopped and nothing half-written is kept."""
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit_on_sigterm)


def _exit_on_sigterm(signum, frame) -> None:
    del frame
    print(f"Stopped by signal {signum}; re-run the same command to resume.", file=sys.stderr)
    raise SystemExit(128 + signum)


def fail(program: str, message: str, exit_code: int = 2) -> NoReturn:
    """Prints one line `program: error: message` to stderr and exits."""
    print(f"{program}: error: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(exit_code)


def parse_flags(flag_values: flags.FlagValues, argv: Sequence[str], program: str) -> list[str]:
    """Parses `argv` (argv[0] = program) into `flag_values`; handles --help and --flagfile.

    `--help` prints every flag with its default and exits 0; a bad flag or a missing required
    flag exits 2 with a one-line message.

    Returns:
      The positional arguments after the program name.
    """
    argv = list(argv) or [program]
    if any(a in ("-h", "--help", "--helpfull", "--helpshort", "-help") for a in argv[1:]):
        print(format_help(flag_values, program))
        sys.exit(0)
    flag_values.unparse_flags()  # main() may run several times in one process (tests)
    try:
        remaining = flag_values(argv)
    except flags.Error as error:
        fail(program, f"{error} (see --help)")
    logging.set_verbosity(logging.INFO)
    return remaining[1:]


def format_help(flag_values: flags.FlagValues, program: str) -> str:
    """Every flag with its help and its default (absl omits None defaults; we show them)."""
    lines = [f"usage: python -m {program} [flags]", ""]
    for name in sorted(flag_values):
        flag = flag_values[name]
        if flag.name != name:  # short-name alias
            continue
        default = flag.default
        if isinstance(flag, flags.MultiFlag) or isinstance(default, list):
            shown = ", ".join(map(repr, default or [])) or "not set; repeatable"
        elif isinstance(default, bool):
            shown = str(default).lower()
        elif isinstance(default, str):
            shown = repr(default)
        else:
            shown = "not set" if default is None else str(default)
        prefix = "--[no]" if isinstance(default, bool) else "--"
        lines.append(f"  {prefix}{name}: {' '.join(flag.help.split(';')[0].split())}")
        lines.append(f"      (default: {shown})")
    lines.append("  --flagfile: read flags from a file (one --name=value per line)")
    return "\n".join(lines)


def parse_set(values: Sequence[str] | None, program: str) -> tuple[str, ...]:
    """Checks the form of repeated `--set=name=value` flags (types are checked by the config)."""
    result = []
    for value in values or ():
        name, sep, _ = value.partition("=")
        if not sep or not name.strip():
            fail(program, f"--set={value!r}: expected --set=name=value, e.g. "
                          "--set=learning_rate=1e-4.")
        result.append(value)
    return tuple(result)


def parse_options(values: Sequence[str] | None, program: str, flag: str) -> dict[str, str]:
    """Repeated `name=value` flags (dataset options) as a dict; a malformed one exits 2."""
    options = {}
    for value in values or ():
        name, sep, text = value.partition("=")
        if not sep or not name.strip():
            fail(program, f"{flag}={value!r}: expected {flag}=name=value.")
        options[name.strip()] = text.strip()
    return options


def progress_verbosity() -> int:
    """Keras verbosity: a live progress bar on a terminal, one line per round otherwise."""
    return 1 if sys.stdout.isatty() else 2


def check_method_flags(flag_values: flags.FlagValues, program: str) -> tuple[str, ...]:
    """--method, --dataset, --preset and --set of launch.train / launch.benchmark, checked
    before TensorFlow loads: exits 2 with a one-line error naming what is wrong.

    Returns:
      The parsed --set overrides.
    """
    # Cheap checks first: these imports do not load TensorFlow.
    from tfseg.datasets import available_datasets
    from tfseg.methods import available_methods

    for flag, available in (("method", available_methods()), ("dataset", available_datasets())):
        value = flag_values[flag].value
        if value is None:
            fail(program, f"--{flag} is required. Available: {', '.join(available)}.")
        if value not in available:
            fail(program, f"unknown --{flag}={value}. Available: {', '.join(available)}.")
    overrides = parse_set(flag_values.set, program)

    from tfseg.methods import get_method_module, resolve_config
    try:
        resolve_config(get_method_module(flag_values.method), flag_values.preset, overrides)
    except ValueError as error:
        fail(program, str(error))
    return overrides
