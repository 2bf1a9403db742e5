"""Orchestration of the offline stage: subjects -> workers -> shards + manifest.

- Parallel over subjects (`workers` spawned processes, one subject at a time each, so memory is
  bounded by one subject per worker); SimpleITK runs single-threaded inside each worker.
- Resumable: a subject whose shard exists with the sha256 recorded in the manifest, and whose
  input files are those it was made from (`input_signature`: path, size, modification time and
  sha256 of every image and label file, recorded in its entry), is not redone; a changed,
  replaced or moved input, or an entry without a signature, is redone. Temporary files of
  killed runs are removed; the parent process rewrites the manifest atomically after every
  finished subject.
- Shardable over machines: subject i (in subject-id order) belongs to machine
  `i % num_shards`; see `writer` for how their manifests are merged.
- A subject that cannot be read or fails a check is skipped with a reason naming the file and the
  fix; the run raises `SubjectsSkippedError` at the end unless `allow_skips`.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import multiprocessing
import os
import time
import traceback
from typing import Any, Mapping

from absl import logging
import numpy as np

from preprocessing import writer
from preprocessing.config import (PREPROCESSING_VERSION, PreprocessConfig, dataset_facts,
                                  fingerprint, records_dir, resolve_config, settings_dict)
from preprocessing.transforms import check_geometry, preprocess_volume
from tfseg._files import check_writable
from tfseg.datasets.base import Dataset, Subject
from tfseg.io import ImageMeta, check_finite, read_channels, read_label


@dataclasses.dataclass(frozen=True)
class PreprocessSummary:
    """What one run did. `skipped` maps subject id -> reason (naming the file and the fix)."""

    out_dir: str
    manifest_path: str
    num_subjects: int
    written: tuple[str, ...]
    already_done: tuple[str, ...]
    skipped: Mapping[str, str]
    num_examples: int
    seconds: float


class SubjectsSkippedError(ValueError):
    """Some subjects were skipped and `allow_skips` was not set; `.summary` has the details."""

    def __init__(self, summary: PreprocessSummary):
        lines = "\n".join(f"  {sid}: {reason}" for sid, reason in summary.skipped.items())
        super().__init__(f"{len(summary.skipped)} of {summary.num_subjects} subjects were skipped "
                         f"(the other shards are in {summary.out_dir}):\n{lines}\nFix or remove "
                         "those files and re-run (finished subjects are not redone), or pass "
                         "--allow_skips to go on without them.")
        self.summary = summary


def resolve_dataset(dataset: Dataset, data_dir: str | None) -> tuple[Dataset, str]:
    """`prepare` the data folder (synthetic datasets generate themselves), then `resolve` the
    dataset against it when the dataset reads its facts from the folder (e.g. dataset.json)."""
    data_dir = dataset.prepare(data_dir)
    if hasattr(dataset, "resolve"):
        dataset = dataset.resolve(data_dir)
    return dataset, data_dir


def read_subject(subject: Subject, dataset: Dataset
                 ) -> tuple[list[np.ndarray], list[ImageMeta], np.ndarray | None,
                            ImageMeta | None]:
    """Reads every modality (+ label) of a subject through `tfseg.io`, with the input checks.

    Returns:
      (images: one (z, y, x) float32 array per modality, their metas, raw label or None, label
      meta or None).

    Raises:
      ValueError: (ImageReadError included) naming the file: missing/unreadable/truncated,
        wrong channel, NaN/Inf voxels, or images and label on different grids.
    """
    if len(subject.image_paths) != dataset.num_channels:
        raise ValueError(f"Subject {subject.subject_id} lists {len(subject.image_paths)} image "
                         f"files {list(subject.image_paths)}; dataset {dataset.name!r} expects "
                         f"{dataset.num_channels} modalities {list(dataset.modalities)}.")
    pairs = read_channels(subject.image_paths, subject.channel_indices)
    images, metas = [array for array, _ in pairs], [meta for _, meta in pairs]
    for array, path in zip(images, subject.image_paths):
        check_finite(array, path)
    label = label_meta = None
    if subject.label_path is not None:
        label, label_meta = read_label(subject.label_path)
    check_geometry(metas + ([label_meta] if label_meta is not None else []),
                   list(subject.image_paths) + ([subject.label_path] if label is not None else []),
                   dataset.orientation_reliable)
    return images, metas, label, label_meta


def _examples(processed, subject_id: str):
    from tfseg.data.schema import encode_example  # lazy: TF only in the processes that write

    if processed.patch_corners is not None:  # 3D: the whole volume, one example
        yield encode_example(processed.image, processed.label, subject_id, 0,
                             processed.patch_corners)
        return
    for z in range(processed.image.shape[0]):  # 2D: one example per slice
        label = None if processed.label is None else processed.label[z]
        yield encode_example(processed.image[z], label, subject_id, z)


def _to_json(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def process_subject(subject: Subject, dataset: Dataset, config: PreprocessConfig, out_dir: str
                    ) -> dict[str, Any]:
    """Reads, transforms and writes one subject; returns its manifest entry.

    Raises:
      ValueError: for bad input (see `read_subject` and `preprocess_volume`).
    """
    start = time.perf_counter()
    inputs = input_signature(subject)  # before reading: a file changed meanwhile is redone
    images, metas, label, _ = read_subject(subject, dataset)
    processed = preprocess_volume(images, metas, label, dataset, config,
                                  sources=subject.image_paths, label_source=subject.label_path)
    del images, label
    shard = writer.write_shard(out_dir, subject.subject_id,
                               _examples(processed, subject.subject_id))
    stats = dict(processed.stats)
    seconds = {"total": time.perf_counter() - start, "n4": stats.pop("n4_seconds", 0.0)}
    return _to_json({
        "patient_id": subject.patient_id, "labeled": processed.label is not None,
        "image_paths": list(subject.image_paths), "label_path": subject.label_path,
        "channel_indices": subject.channel_indices, **shard,
        "shape_zyx": list(processed.image.shape[:3]), "original": metas[0].to_dict(),
        "geometry": processed.geometry,
        "num_patch_corners": 0 if processed.patch_corners is None else len(processed.patch_corners),
        "intensity": stats, "seconds": seconds, "extra": dict(subject.extra),
        "inputs": inputs})


def input_signature(subject: Subject, with_hash: bool = True) -> list[dict[str, Any]]:
    """What a subject's shard is made from: per input file (images, then the label) its absolute
    path, size, modification time (ns) and, with `with_hash`, content sha256. A missing file
    has size -1."""
    files = [*subject.image_paths, *([subject.label_path] if subject.label_path else [])]
    signature = []
    for path in files:
        path = os.path.abspath(path)
        try:
            info = os.stat(path)
        except OSError:
            signature.append({"path": path, "size": -1})
            continue
        item = {"path": path, "size": info.st_size, "mtime_ns": info.st_mtime_ns}
        if with_hash:
            item["sha256"] = writer.sha256_file(path)
        signature.append(item)
    return signature


def inputs_unchanged(subject: Subject, entry: Mapping[str, Any]) -> bool:
    """Whether `entry` (a manifest entry) was made from `subject`'s current input files.

    Same paths and sizes, and either the same modification times (cheap) or, when only those
    differ (a copy, a touch), the same content hashes."""
    recorded = entry.get("inputs")
    if not recorded:
        return False  # made before inputs were recorded: provenance unknown, redo
    current = input_signature(subject, with_hash=False)
    if [(r.get("path"), r.get("size")) for r in recorded] != [
            (c["path"], c["size"]) for c in current] or any(c["size"] < 0 for c in current):
        return False
    if all(r.get("mtime_ns") == c["mtime_ns"] for r, c in zip(recorded, current)):
        return True
    return all(r.get("sha256") == writer.sha256_file(c["path"]) for r, c in zip(recorded, current))


def _run_one(subject: Subject, dataset: Dataset, config: PreprocessConfig, out_dir: str
             ) -> tuple[str, Any, str | None]:
    """("ok", entry, None) or ("skipped", reason, traceback or None); never raises."""
    try:
        return "ok", process_subject(subject, dataset, config, out_dir), None
    except ValueError as error:  # bad input: the message names the file and the fix
        return "skipped", str(error), None
    except Exception as error:  # pylint: disable=broad-except
        return ("skipped", f"unexpected {type(error).__name__} while processing "
                f"{list(subject.image_paths)}: {error}", traceback.format_exc())


def _init_worker(parent_pid: int | None = None) -> None:
    # Die with the parent, whatever kills it (even SIGKILL, which runs no cleanup): Linux
    # delivers SIGTERM to this worker when the process that started it exits. If the parent
    # died while this worker was still starting (before the request), leave now.
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM))  # PDEATHSIG
    except (OSError, AttributeError):
        pass
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)
    import SimpleITK as sitk
    # Workers already use the cores; ITK's own threads would oversubscribe them.
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)


def _results(todo, dataset, config, out_dir, workers):
    """Yields (subject, result) as subjects finish."""
    if workers == 1 or len(todo) == 1:
        for subject in todo:
            yield subject, _run_one(subject, dataset, config, out_dir)
        return
    context = multiprocessing.get_context("spawn")
    pool = concurrent.futures.ProcessPoolExecutor(min(workers, len(todo)), mp_context=context,
                                                  initializer=_init_worker,
                                                  initargs=(os.getpid(),))
    try:
        futures = {pool.submit(_run_one, s, dataset, config, out_dir): s for s in todo}
        for future in concurrent.futures.as_completed(futures):
            try:
                result = future.result()
            except Exception as error:  # pylint: disable=broad-except
                result = ("skipped", f"the worker process died ({type(error).__name__}: {error});"
                          " if it ran out of memory, use fewer --workers", None)
            yield futures[future], result
    except BaseException:
        # Interrupted (Ctrl-C, SIGTERM turned into SystemExit, an error while saving): stop the
        # workers now instead of letting them finish (or outlive us); their half-written
        # temporaries are removed by the next run.
        stop_workers(pool)
        raise
    pool.shutdown(wait=True)


def stop_workers(pool: concurrent.futures.ProcessPoolExecutor) -> None:
    """Cancels queued subjects and terminates the pool's worker processes."""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(timeout=5)
        if process.is_alive():
            process.kill()


def _progress(entry: dict[str, Any], spatial_dims: int) -> str:
    if spatial_dims == 2:
        what = f"{entry['num_examples']} slices"
    else:
        what = (f"volume {'×'.join(map(str, entry['shape_zyx']))}, "
                f"{entry['num_patch_corners']} patch corners")
    seconds = entry["seconds"]
    n4 = f" (N4 {seconds['n4']:.1f} s)" if entry["intensity"].get("n4") else ""
    return f"{what}, {seconds['total']:.1f} s{n4}"


def list_checked_subjects(dataset: Dataset, data_dir: str) -> list[Subject]:
    """The dataset's subjects in subject-id order, checked to name distinct shard files.

    Raises:
      ValueError: for an empty folder or wrong layout (from `list_subjects`), no subjects,
        duplicate ids or ids that cannot be file names.
    """
    subjects = sorted(dataset.list_subjects(data_dir), key=lambda s: s.subject_id)
    if not subjects:
        raise ValueError(f"No subjects found under {data_dir} for dataset {dataset.name!r}; "
                         "point --data_dir at the dataset as downloaded and unpacked.")
    seen = set()
    for subject in subjects:
        sid = subject.subject_id
        if not sid or sid.startswith(".") or "/" in sid or "\\" in sid:
            raise ValueError(f"Subject id {sid!r} cannot name a shard file; the dataset module "
                             f"{dataset.name!r} must give ids without path separators.")
        if sid in seen:
            raise ValueError(f"Subject id {sid!r} is listed twice under {data_dir}; expected "
                             "unique ids (two copies of the data in one folder?).")
        seen.add(sid)
    return subjects


def _recorded_entries(out_dir: str, manifest_path: str, fingerprint_hex: str, data_dir: str
                      ) -> dict[str, Any]:
    """Subject entries recorded by earlier runs (merged manifest, then this machine's part).

    Raises:
      ValueError: if the folder holds records made with other settings.
    """
    known: dict[str, Any] = {}
    for path in dict.fromkeys([os.path.join(out_dir, writer.MANIFEST_NAME), manifest_path]):
        previous = writer.read_manifest(path)
        if previous is None:
            continue
        if previous["fingerprint"] != fingerprint_hex:
            raise ValueError(f"{out_dir} holds records made with other settings (fingerprint "
                             f"{previous['fingerprint']}, these settings give "
                             f"{fingerprint_hex}). Use another --out_dir or delete this one.")
        if os.path.abspath(data_dir) != previous.get("data_dir"):
            logging.warning("%s was built from %s; now reading %s: subjects whose input files "
                            "differ are redone.", path, previous.get("data_dir"),
                            os.path.abspath(data_dir))
        known.update(previous["subjects"])
    return known


def run_preprocessing(dataset: Dataset, data_dir: str | None, out_dir: str,
                      config: PreprocessConfig, workers: int = 1, num_shards: int = 1,
                      shard_index: int = 0, allow_skips: bool = False,
                      dataset_options: Mapping[str, Any] | None = None) -> PreprocessSummary:
    """Preprocesses every subject of this machine's shard into `out_dir`.

    Args:
      dataset: the dataset (with its options applied).
      data_dir: the raw data folder (None for synthetic datasets: generated into the cache).
      out_dir: the records folder (shards + manifest).
      config: preprocessing settings; `None` fields take the dataset's defaults.
      workers: subjects processed in parallel (spawned processes).
      num_shards / shard_index: this machine handles subjects i with i % num_shards ==
        shard_index, in subject-id order.
      allow_skips: return normally even if subjects were skipped.
      dataset_options: recorded in the manifest and the fingerprint (e.g. {"phase": "ES"}).

    Returns:
      The `PreprocessSummary`.

    Raises:
      ValueError: up front, for an empty folder / wrong layout (from `list_subjects`), bad
        settings, or an `out_dir` holding records made with other settings.
      SubjectsSkippedError: at the end, if subjects were skipped and not `allow_skips`.
    """
    start = time.perf_counter()
    if workers < 1 or num_shards < 1 or not 0 <= shard_index < num_shards:
        raise ValueError(f"Need workers >= 1 and 0 <= shard_index < num_shards; got workers="
                         f"{workers}, shard_index={shard_index}, num_shards={num_shards}.")
    dataset, data_dir = resolve_dataset(dataset, data_dir)
    resolved = resolve_config(config, dataset)
    subjects = list_checked_subjects(dataset, data_dir)
    selected = subjects[shard_index::num_shards]
    options = {**dataset.options(), **(dataset_options or {})}
    fingerprint_hex = fingerprint(dataset, dataset_options, config)

    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as error:
        raise ValueError(f"Cannot create the records folder {out_dir} ({error.strerror}); point "
                         "--records_root at a writable folder.") from None
    manifest_path = os.path.join(out_dir, writer.manifest_name(num_shards, shard_index))
    known = _recorded_entries(out_dir, manifest_path, fingerprint_hex, data_dir)
    own_files = [writer.shard_name(s.subject_id) for s in selected] + [
        os.path.basename(manifest_path)]
    if os.access(out_dir, os.W_OK):
        for name in writer.remove_stale_temporaries(out_dir, own_files):
            logging.info("Removed %s, left by an interrupted run.", name)

    manifest = {
        "schema_version": _schema_version(), "preprocessing_version": PREPROCESSING_VERSION,
        "dataset": dataset.name, "dataset_options": _to_json(options),
        "fingerprint": fingerprint_hex, "settings": settings_dict(resolved),
        **dataset_facts(dataset), "data_dir": os.path.abspath(data_dir),
        "num_shards": num_shards, "shard_index": shard_index, "num_subjects": len(selected),
        "complete": False, "subjects": {}, "skipped": {}}
    already_done, todo, changed = [], [], []
    for subject in selected:
        entry = known.get(subject.subject_id)
        if entry is not None and writer.shard_is_intact(out_dir, entry):
            if inputs_unchanged(subject, entry):
                manifest["subjects"][subject.subject_id] = entry
                already_done.append(subject.subject_id)
                continue
            changed.append(subject.subject_id)
        todo.append(subject)
    if changed:
        logging.warning("%d subject(s) have input files that differ from those their records "
                        "were made from (edited, replaced, another data folder, or records "
                        "older than this check) and are redone: %s", len(changed),
                        ", ".join(changed))

    gone = sorted(set(known) - {s.subject_id for s in subjects})
    if gone:
        logging.warning("%d subject(s) recorded in %s are no longer listed under %s and are left "
                        "out of the manifest (their shards stay on disk): %s", len(gone), out_dir,
                        data_dir, ", ".join(gone))

    def save() -> None:
        manifest["subjects"] = dict(sorted(manifest["subjects"].items()))
        writer.write_manifest(manifest_path, manifest)

    previous = writer.read_manifest(manifest_path)
    if (not todo and num_shards == 1 and previous is not None and previous.get("complete")
            and previous.get("subjects") == dict(sorted(manifest["subjects"].items()))
            and not previous.get("skipped")):
        # Everything is there and recorded: write nothing (the records may be read-only).
        logging.info("All %d subjects of %s are already in %s; nothing to do.", len(selected),
                     dataset.name, out_dir)
        return PreprocessSummary(
            out_dir=out_dir, manifest_path=manifest_path, num_subjects=len(selected),
            written=(), already_done=tuple(already_done), skipped={}, num_examples=0,
            seconds=time.perf_counter() - start)
    check_writable(out_dir, "records folder", "point --records_root at a writable folder, or "
                   "preprocess there first")
    save()
    logging.info("Preprocessing %d subjects of %s into %s (%d already done, %d to do, %d "
                 "workers).", len(selected), dataset.name, out_dir, len(already_done), len(todo),
                 workers)
    written, num_examples = [], 0
    for position, (subject, (status, value, trace)) in enumerate(
            _results(todo, dataset, resolved, out_dir, workers), start=1):
        sid = subject.subject_id
        if status == "ok":
            manifest["subjects"][sid] = value
            written.append(sid)
            num_examples += value["num_examples"]
            logging.info("[%d/%d] %s: %s", position, len(todo), sid,
                         _progress(value, dataset.spatial_dims))
        else:
            manifest["skipped"][sid] = value
            logging.error("[%d/%d] %s: skipped: %s", position, len(todo), sid, value)
            if trace:
                logging.error("%s", trace)
        save()
    manifest["complete"] = True
    save()
    if num_shards > 1:
        merged = writer.merge_manifests(out_dir, num_shards, require_all=False)
        if merged:
            logging.info("Merged the %d manifest parts into %s.", num_shards, merged)
        else:
            logging.info("%s will be written when the last of the %d shards finishes here (or "
                         "copy every shard and part here and run with --merge_manifests).",
                         writer.MANIFEST_NAME, num_shards)
    summary = PreprocessSummary(
        out_dir=out_dir, manifest_path=manifest_path, num_subjects=len(selected),
        written=tuple(written), already_done=tuple(already_done),
        skipped=dict(manifest["skipped"]), num_examples=num_examples,
        seconds=time.perf_counter() - start)
    logging.info("Done: %d written, %d skipped, %d already done; %d examples written in %.1f s. "
                 "Records: %s", len(written), len(summary.skipped), len(already_done),
                 num_examples, summary.seconds, out_dir)
    if summary.skipped:
        error = SubjectsSkippedError(summary)
        if not allow_skips:
            raise error
        logging.warning("%s", str(error).split("\nFix")[0])
    return summary


def _schema_version() -> int:
    from tfseg.data.schema import SCHEMA_VERSION
    return SCHEMA_VERSION


def preprocess_dataset(dataset: Dataset, data_dir: str | None,
                       config: PreprocessConfig | None = None, *, records_root: str = "records",
                       out_dir: str | None = None, workers: int = 1, num_shards: int = 1,
                       shard_index: int = 0, allow_skips: bool = False,
                       dataset_options: Mapping[str, Any] | None = None) -> str:
    """Makes sure the dataset's records exist and returns their folder ("preprocess on first use").

    The default folder is `records_dir(records_root, dataset.name, fingerprint, data_dir)` (one
    per settings and data folder). When every shard is already there, intact and made from the
    current input files, nothing is recomputed.

    Returns:
      The records folder.

    Raises:
      ValueError / SubjectsSkippedError: as `run_preprocessing`.
    """
    config = config or PreprocessConfig()
    dataset, data_dir = resolve_dataset(dataset, data_dir)
    # Fail on a wrong folder or settings before the fingerprint imports TensorFlow.
    resolve_config(config, dataset)
    list_checked_subjects(dataset, data_dir)
    if out_dir is None:
        out_dir = records_dir(records_root, dataset.name,
                              fingerprint(dataset, dataset_options, config), data_dir)
    run_preprocessing(dataset, data_dir, out_dir, config, workers=workers, num_shards=num_shards,
                      shard_index=shard_index, allow_skips=allow_skips,
                      dataset_options=dataset_options)
    return out_dir
