"""Records-folder writing: one TFRecord shard per subject and the manifest, both atomic.

A shard is written under a hidden temporary name in the output folder (`.<id>.tfrecord.tmp-…`,
never matched by `*.tfrecord`), hashed, flushed to disk and renamed into place
(`tfseg._files.atomic_path`); a killed run leaves at most a temporary file, which the next run
removes. The manifest is rewritten the same way after every finished subject (`write_manifest`).

Runs split over machines (`num_shards > 1`) each write `manifest-<k>-of-<n>.json` listing only
their own subjects, so several machines can share one output folder without overwriting each
other's manifest; `merge_manifests` joins the parts into `manifest.json` once every part is
complete (done automatically by the run that finishes last when the folder is shared).
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Iterable

from tfseg._files import atomic_path, temporary_prefix, write_json_atomic

MANIFEST_NAME = "manifest.json"
SHARD_SUFFIX = ".tfrecord"


def shard_name(subject_id: str) -> str:
    return f"{subject_id}{SHARD_SUFFIX}"


def manifest_name(num_shards: int = 1, shard_index: int = 0) -> str:
    """`manifest.json`, or `manifest-<k>-of-<n>.json` for one machine of a sharded run."""
    if num_shards == 1:
        return MANIFEST_NAME
    return f"manifest-{shard_index:05d}-of-{num_shards:05d}.json"


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_shard(out_dir: str, subject_id: str, examples: Iterable[bytes]) -> dict[str, Any]:
    """Writes serialised examples to `out_dir/<subject_id>.tfrecord` atomically.

    Returns:
      {"shard": file name, "sha256": hex digest, "size_bytes", "num_examples"}.
    """
    import tensorflow as tf  # lazy: only the processes that write shards pay for TF

    count = 0
    with atomic_path(os.path.join(out_dir, shard_name(subject_id))) as temporary:
        with tf.io.TFRecordWriter(temporary) as writer:
            for example in examples:
                writer.write(example)
                count += 1
        digest = sha256_file(temporary)
        size = os.path.getsize(temporary)
    return {"shard": shard_name(subject_id), "sha256": digest, "size_bytes": size,
            "num_examples": count}


def remove_stale_temporaries(out_dir: str, final_names: Iterable[str]) -> list[str]:
    """Deletes the temporaries of these files (shards, manifest) left by killed runs.

    Only this run's files are named, so a machine sharing the folder never deletes the shard
    another machine is writing.

    Returns:
      The removed file names.
    """
    if not os.path.isdir(out_dir):
        return []
    prefixes = tuple(temporary_prefix(name) for name in final_names)
    removed = []
    for name in sorted(os.listdir(out_dir)):
        if prefixes and name.startswith(prefixes):
            os.remove(os.path.join(out_dir, name))
            removed.append(name)
    return removed


def shard_is_intact(out_dir: str, entry: dict[str, Any]) -> bool:
    """Whether the entry's shard exists and its sha256 matches the manifest."""
    path = os.path.join(out_dir, entry.get("shard", ""))
    return (bool(entry.get("shard")) and os.path.isfile(path)
            and os.path.getsize(path) == entry.get("size_bytes", os.path.getsize(path))
            and sha256_file(path) == entry.get("sha256"))


def write_manifest(path: str, data: dict[str, Any]) -> None:
    """Writes a manifest (or manifest part) atomically, as JSON indented by one space."""
    write_json_atomic(path, data, indent=1)


def read_manifest(path: str) -> dict[str, Any] | None:
    """The manifest at `path`, or None when there is none.

    Raises:
      ValueError: naming the file when it is not a valid manifest.
    """
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as stream:
            data = json.load(stream)
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"Manifest {path} is unreadable ({error}). It is only ever replaced "
                         "atomically, so the file was modified by hand: delete it and re-run "
                         "to rebuild it (intact shards are re-verified, not recomputed).") from None
    if not isinstance(data, dict) or "fingerprint" not in data or "subjects" not in data:
        raise ValueError(f"Manifest {path} lacks 'fingerprint'/'subjects'; it was not written by "
                         "tfseg preprocessing. Use an empty --out_dir.")
    return data


def merge_manifests(out_dir: str, num_shards: int, require_all: bool = True) -> str | None:
    """Joins `manifest-<k>-of-<n>.json` parts into `manifest.json` once every run finished.

    Subjects and skipped subjects are the union of the parts'.

    Args:
      out_dir: the records folder holding every part (and every shard).
      num_shards: n.
      require_all: raise when a part is missing or incomplete (else return None).

    Returns:
      The path of the merged manifest, or None (only when `require_all` is False).

    Raises:
      ValueError: listing missing or incomplete parts, or parts with different fingerprints.
    """
    parts, problems = [], []
    for index in range(num_shards):
        name = manifest_name(num_shards, index)
        part = read_manifest(os.path.join(out_dir, name))
        if part is None:
            problems.append(f"{name} is missing")
        elif not part.get("complete"):
            problems.append(f"{name} is from a run that has not finished")
        else:
            parts.append(part)
    if problems:
        if not require_all:
            return None
        raise ValueError(f"Cannot merge the manifests in {out_dir}: {'; '.join(problems)}. Run "
                         "(or re-run) those shards with --num_shards/--shard_index into this "
                         "folder, or copy their shards and manifest parts here.")
    fingerprints = sorted({part["fingerprint"] for part in parts})
    if len(fingerprints) > 1:
        raise ValueError(f"The manifest parts in {out_dir} come from different settings "
                         f"(fingerprints {fingerprints}); re-run every shard with one setting.")
    merged = {key: value for key, value in parts[0].items()
              if key not in ("subjects", "skipped", "shard_index", "num_subjects")}
    subjects, skipped = {}, {}
    for part in parts:
        subjects.update(part["subjects"])
        skipped.update(part.get("skipped", {}))
    merged.update(subjects=dict(sorted(subjects.items())), skipped=dict(sorted(skipped.items())),
                  complete=True, num_subjects=len(subjects) + len(skipped),
                  merged_from=[manifest_name(num_shards, k) for k in range(num_shards)])
    path = os.path.join(out_dir, MANIFEST_NAME)
    write_manifest(path, merged)
    return path
