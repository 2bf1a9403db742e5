"""Atomic file writes: the one implementation every module uses.

A file is written under a hidden temporary name in its own folder,
`.<name>.tmp-<host>-<pid>-<random>[suffix]`, flushed to disk and renamed into place with
`os.replace`. A reader never sees a half-written file, and a crash leaves the previous version (or
none). The temporary is created with mode 0666, so the umask gives it (and, after the rename, the
file) the usual permissions, not mkstemp's private 0600. A process killed mid-write leaves only
its temporary, whose name starts with `temporary_prefix(name)` so the folder's owner can remove
it (`preprocessing.writer.remove_stale_temporaries`).

No TensorFlow or Keras import: splits, evaluation, preprocessing and the launchers use it.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
from typing import Any, Callable, Iterator


def temporary_prefix(name: str) -> str:
    """How the temporaries of the file named `name` (no folder) start: `.<name>.tmp-`."""
    return f".{name}.tmp-"


def _create_temporary(folder: str, name: str, suffix: str) -> str:
    stem = f"{temporary_prefix(name)}{socket.gethostname()}-{os.getpid()}-"
    for _ in range(100):
        # os.urandom, not the random module: writing a file never moves a seeded generator.
        temporary = os.path.join(folder, f"{stem}{os.urandom(4).hex()}{suffix}")
        try:
            os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return temporary
    raise FileExistsError(f"Could not create a temporary file {stem}…{suffix} in {folder}.")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def make_temporary_dir(folder: str, name: str) -> str:
    """Creates `.<name>.tmp-<host>-<pid>-<random>` in `folder` (for a folder written then
    renamed into place as `name`) and returns its path."""
    os.makedirs(folder, exist_ok=True)
    path = _create_temporary(folder, name, "")
    os.remove(path)
    os.mkdir(path)
    return path


def remove_stale_temporary_dirs(folder: str, name: str) -> list[str]:
    """Deletes the temporaries of `name` in `folder` left by processes of this host that are no
    longer running (killed mid-write); a live writer's temporary is kept. Returns the removed
    names."""
    import shutil

    prefix = f"{temporary_prefix(name)}{socket.gethostname()}-"
    removed = []
    if not os.path.isdir(folder):
        return removed
    for entry in sorted(os.listdir(folder)):
        if not entry.startswith(prefix):
            continue
        pid_text = entry[len(prefix):].split("-", 1)[0]
        if pid_text.isdigit() and not _pid_alive(int(pid_text)):
            shutil.rmtree(os.path.join(folder, entry), ignore_errors=True)
            removed.append(entry)
    return removed


def check_writable(folder: str, what: str, fix: str, create: bool = True) -> None:
    """Raises ValueError (one line naming `folder` and the fix) unless files can be created in
    `folder` (created if missing). With `create=False` nothing is created: the folder, or its
    nearest existing ancestor, must be a writable directory."""
    if not create:
        existing = os.path.abspath(folder)
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
            problem = "not a directory" if not os.path.isdir(existing) else "permission denied"
            raise ValueError(f"The {what} {folder} is not writable ({existing}: {problem}); "
                             f"{fix}.")
        return
    try:
        os.makedirs(folder, exist_ok=True)
        probe = _create_temporary(folder, ".write-check", "")
        os.remove(probe)
    except OSError as error:
        raise ValueError(f"The {what} {folder} is not writable ({error.strerror}); {fix}.") \
            from None


def _fsync(path: str) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = "") -> Iterator[str]:
    """Yields a temporary path beside `path`; renames it to `path` when the block ends normally.

    The block writes the whole file to the temporary path (which exists, empty, so the writer
    overwrites it: opening it for writing keeps its permissions). Then the temporary is flushed
    to disk and renamed to `path`. If the block raises, the temporary is removed and `path` is
    left as it was.

    Args:
      path: the final file; its folder is created if needed.
      suffix: ending of the temporary name, for writers that check the extension (e.g. Keras's
        `.weights.h5`).
    """
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    temporary = _create_temporary(folder, name, suffix)
    try:
        yield temporary
        _fsync(temporary)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise


def write_text_atomic(path: str, text: str) -> None:
    """Writes `text` (UTF-8) to `path` atomically (see `atomic_path`)."""
    with atomic_path(path) as temporary:
        with open(temporary, "w", encoding="utf-8") as stream:
            stream.write(text)


def write_json_atomic(path: str, data: Any, *, indent: int | None = 2, sort_keys: bool = False,
                      default: Callable[[Any], Any] | None = None) -> None:
    """Writes `json.dumps(data, indent=…, sort_keys=…, default=…)` and a newline atomically.

    The keyword arguments are `json.dumps`'s, so each kind of file keeps its own format.
    """
    write_text_atomic(path, json.dumps(data, indent=indent, sort_keys=sort_keys, default=default)
                      + "\n")


def read_json(path: str, fix: str = "") -> Any:
    """The JSON document at `path`.

    Raises:
      ValueError: "Cannot read <path>: <reason>." plus `fix`, for an unreadable or invalid file.
    """
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"Cannot read {path}: {error}.{' ' + fix if fix else ''}") from None
