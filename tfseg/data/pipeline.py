"""tf.data training pipelines (labeled ⨯ unlabeled streams) and record readers for evaluation.

Training (`training_dataset`), all in TF ops (no py_function / numpy_function):
  shard files → interleave(TFRecordDataset, parallel) → parallel map(schema.parse_example)
  → cache in memory (optional) → shuffle → repeat → [3D: cut random patches] → batch
  (drop_remainder) → parallel map(augment) ; zip(labeled, unlabeled) → prefetch.

- 2D datasets: one example per slice; every slice of the split's subjects is used, unless the
  dataset's training protocol (manifest "training_protocol", from the Dataset fields
  train_crop_yx / train_slices / labeled_slices_per_subject / unlabeled_slices_per_subject)
  keeps only the central `train_slices` of each subject, or a few slices per subject (chosen
  once per split by `protocol_slices`, stable across stages and resumes), and trains on random
  `train_crop_yx` crops (the same crop for image and label; target-domain slices too).
- 3D datasets: one example per subject (the whole volume and its `patch_corners`). Each visit of
  a volume cuts `patches_per_volume` patches at corners drawn uniformly from its stored corners
  (labeled volumes: the foreground-filtered stride grid; unlabeled volumes: corners inside their
  own foreground mask), then the patches are shuffled across visits. A volume with no stored corner
  gets uniformly random corners. Corners are clamped so a patch always fits the volume.
- `cache=True` keeps the parsed examples in memory (labels as uint8): for 2D the slices of the
  split's subjects, for 3D the whole volumes, e.g. ~30 MB per iSEG subject (144×192×256×2
  float32 + uint8 label), well within RAM for the few tens of volumes these studies use. Turn it
  off for large 2D collections; the shards are then re-read (and their order reshuffled) per pass.
- Randomness: shuffles are seeded with `config.seed`; patch corners and augmentation use stateless
  ops whose per-element seed is `fold_in([config.seed, stream], element counter)`. With
  `deterministic=True` the whole stream is reproducible for a seed; with the default False
  (faster), parallel interleave/map may reorder elements between runs, but the draws bound to
  each element are still fixed by the seed.
- The labeled stream is augmented with `config.augment` (same draw for image and label). The
  unlabeled stream is delivered un-augmented: methods that perturb unlabeled data (MixMatch, mean
  teacher style consistency) do it themselves, and adversarial methods use unlabeled images as the
  "real" distribution, which pipeline augmentation would shift.
- If the split has no unlabeled patients or `include_unlabeled=False`, the unlabeled stream is
  made of the labeled subjects' images (labels dropped) so the element structure never changes.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import tensorflow as tf

from tfseg._files import read_json
from tfseg.data import augment as augment_lib
from tfseg.data import schema
from tfseg.data import splits as splits_lib
from tfseg.data.spec import DataSpec

MANIFEST_NAME = "manifest.json"
_TOP_KEYS = ("schema_version", "spatial_dims", "modalities", "class_names", "subjects")
_SUBJECT_KEYS = ("patient_id", "labeled", "shard", "num_examples", "shape_zyx")
_LABELED_STREAM, _UNLABELED_STREAM, _TARGET_STREAM = 1, 2, 3
AUTOTUNE = tf.data.AUTOTUNE


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """How to build the training stream.

    Attributes:
      labeled_batch_size / unlabeled_batch_size: examples per batch of each stream.
      augment: augmentation spec for the labeled stream (see augment.parse_spec).
      seed: seeds shuffles, patch corners and augmentation.
      shuffle_buffer: shuffle buffer (slices for 2D, patches for 3D).
      patch_size_zyx: 3D patch size; None = the preprocessing setting in the manifest.
      patches_per_volume: 3D: patches cut per volume visit before moving to the next volume.
      include_unlabeled: False = the unlabeled stream repeats the labeled subjects' images.
      cache: keep parsed examples in memory.
      deterministic: fixed element order (slower); see the module docstring.
      target_batch_size: images per batch of the second domain's stream (0: no target stream).
    """

    labeled_batch_size: int
    unlabeled_batch_size: int
    augment: str = "none"
    seed: int = 0
    shuffle_buffer: int = 256
    patch_size_zyx: tuple[int, int, int] | None = None
    patches_per_volume: int = 8
    include_unlabeled: bool = True
    cache: bool = True
    deterministic: bool = False
    target_batch_size: int = 0

    def __post_init__(self):
        if int(self.target_batch_size) < 0:
            raise ValueError(f"PipelineConfig.target_batch_size must be >= 0, got "
                             f"{self.target_batch_size}.")
        for name in ("labeled_batch_size", "unlabeled_batch_size", "shuffle_buffer",
                     "patches_per_volume"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"PipelineConfig.{name} must be >= 1, got {getattr(self, name)}.")
        if self.patch_size_zyx is not None:
            size = tuple(int(v) for v in self.patch_size_zyx)
            if len(size) != 3 or min(size) < 1:
                raise ValueError(f"PipelineConfig.patch_size_zyx must be 3 positive ints (z, y, x),"
                                 f" got {self.patch_size_zyx}.")
            object.__setattr__(self, "patch_size_zyx", size)
        augment_lib.parse_spec(self.augment)


def load_manifest(records_dir: str) -> dict[str, Any]:
    """Reads and checks `records_dir/manifest.json`.

    Raises:
      ValueError: naming the folder if the manifest is missing, unreadable, of another schema
        version or lacks required keys.
    """
    path = os.path.join(records_dir, MANIFEST_NAME)
    if not os.path.isfile(path):
        raise ValueError(f"No {MANIFEST_NAME} in records folder {records_dir}. Run "
                         "`python -m launch.preprocess` for this dataset (or point --records_dir "
                         "at its output folder).")
    manifest = read_json(path, "Re-run preprocessing.")
    missing = [k for k in _TOP_KEYS if k not in manifest]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}; it was not written by tfseg's "
                         "preprocessing. Re-run preprocessing.")
    if manifest["schema_version"] != schema.SCHEMA_VERSION:
        raise ValueError(f"{path} has schema_version {manifest['schema_version']}, this tfseg reads "
                         f"version {schema.SCHEMA_VERSION}. Re-run preprocessing into a new folder.")
    if manifest["spatial_dims"] not in (2, 3) or not manifest["subjects"]:
        raise ValueError(f"{path}: spatial_dims must be 2 or 3 and subjects non-empty, got "
                         f"{manifest['spatial_dims']} and {len(manifest['subjects'])} subject(s).")
    for subject_id, entry in manifest["subjects"].items():
        lacking = [k for k in _SUBJECT_KEYS if k not in entry]
        if lacking:
            raise ValueError(f"{path}: subject {subject_id} lacks {', '.join(lacking)}. Re-run "
                             "preprocessing.")
    return manifest


def subject_ids_for(manifest: Mapping[str, Any], patient_ids: Sequence[str],
                    labeled: bool | None = None) -> list[str]:
    """The subject ids (sorted) of the given patients.

    Args:
      manifest: see `load_manifest`.
      patient_ids: patients to select.
      labeled: None = all their subjects; True / False = only labeled / unlabeled subjects.

    Raises:
      ValueError: naming the patients that have no (matching) subject in the records.
    """
    wanted = set(patient_ids)
    found, chosen = set(), []
    for subject_id, entry in manifest["subjects"].items():
        if entry["patient_id"] in wanted and (labeled is None or bool(entry["labeled"]) == labeled):
            found.add(entry["patient_id"])
            chosen.append(subject_id)
    absent = sorted(wanted - found)
    if absent:
        kind = {None: "", True: "labeled ", False: "unlabeled "}[labeled]
        raise ValueError(f"Patient(s) {', '.join(absent)} have no {kind}subject in the records of "
                         f"dataset {manifest.get('dataset', '?')!r} (fingerprint "
                         f"{manifest.get('fingerprint', '?')}); check the split against the "
                         "preprocessing output.")
    return sorted(chosen)


def dataset_facts(manifest: Mapping[str, Any], patch_size_zyx=None) -> DataSpec:
    """The `DataSpec` of a manifest (`DataSpec.from_manifest`)."""
    return DataSpec.from_manifest(manifest, patch_size_zyx)


def _shard_paths(records_dir, manifest, subject_ids) -> list[str]:
    paths = []
    for subject_id in subject_ids:
        entry = manifest["subjects"][subject_id]
        path = os.path.join(records_dir, entry["shard"])
        if not os.path.isfile(path):
            raise ValueError(f"Shard {path} of subject {subject_id} is missing. Re-run "
                             "preprocessing (it resumes and rewrites missing shards).")
        if int(entry["num_examples"]) < 1:
            raise ValueError(f"Shard {path} of subject {subject_id} holds no example.")
        paths.append(path)
    return paths


def _element_seed(config: PipelineConfig, stream: int, counter) -> tf.Tensor:
    base = tf.constant([config.seed, stream], tf.int64)
    return tf.random.experimental.stateless_fold_in(base, tf.cast(counter, tf.int64))


def _read(paths, parse_fn, config: PipelineConfig, stream: int) -> tf.data.Dataset:
    """One pass over the shards' parsed examples (cached when config.cache)."""
    files = tf.data.Dataset.from_tensor_slices(paths)
    if not config.cache:  # cached streams are shuffled after the cache instead
        files = files.shuffle(len(paths), seed=config.seed + stream)
    examples = files.interleave(tf.data.TFRecordDataset, cycle_length=min(len(paths), 4),
                                num_parallel_calls=AUTOTUNE, deterministic=config.deterministic)
    examples = examples.map(parse_fn, num_parallel_calls=AUTOTUNE,
                            deterministic=config.deterministic)
    return examples.cache() if config.cache else examples


PROTOCOL_KEYS = ("train_crop_yx", "train_slices", "labeled_slices_per_subject",
                 "unlabeled_slices_per_subject")


def training_protocol(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest's training protocol with every key (None = not set)."""
    recorded = manifest.get("training_protocol") or {}
    return {key: recorded.get(key) for key in PROTOCOL_KEYS}


def stored_slice_shape(manifest: Mapping[str, Any]) -> tuple[int, int]:
    """The (rows, cols) of the 2D records' slices (every subject has the same)."""
    shapes = {tuple(int(v) for v in e["shape_zyx"][1:]) for e in manifest["subjects"].values()}
    if len(shapes) != 1:
        raise ValueError(f"2D records with different in-plane shapes {sorted(shapes)}; "
                         "preprocess with a fixed crop_size_yx.")
    return shapes.pop()


def _central_window(num_slices: int, keep: int | None) -> tuple[int, int]:
    """[start, stop) of the `keep` central slices (all of them when keep is None or larger)."""
    if not keep or keep >= num_slices:
        return 0, num_slices
    start = (num_slices - int(keep)) // 2
    return start, start + int(keep)


def protocol_slices(records_dir: str, manifest: Mapping[str, Any], subject_ids: Sequence[str],
                    count: int, labeled: bool, seed: int) -> dict[str, list[int]]:
    """Chooses `count` slices per subject for a few-slices-per-patient protocol (DMNet).

    Labeled subjects: among the slices whose label has foreground (a slice an annotator would
    draw; a blank slice teaches nothing), else among all slices; unlabeled: among the slices
    with image content. Only the protocol's central `train_slices` window is eligible. The draw
    depends on (seed, subject id) only, so a run's stages and resumes see the same slices.
    This reads each subject's shard once.

    Returns:
      {subject id: sorted slice indices}.
    """
    import zlib

    window = training_protocol(manifest)["train_slices"]
    chosen = {}
    for subject_id in subject_ids:
        image, label = load_subject(records_dir, subject_id, manifest)
        start, stop = _central_window(image.shape[0], window)
        if labeled and label is not None:
            content = np.any(label[start:stop] > 0, axis=(1, 2))
        else:
            content = np.any(image[start:stop] != 0, axis=(1, 2, 3))
        candidates = np.flatnonzero(content) + start
        if candidates.size == 0:
            candidates = np.arange(start, stop)
        rng = np.random.default_rng([int(seed), zlib.crc32(subject_id.encode("utf-8"))])
        picked = rng.choice(candidates, size=min(int(count), candidates.size), replace=False)
        chosen[subject_id] = sorted(int(i) for i in picked)
    return chosen


def _slice_filter(manifest: Mapping[str, Any], subject_ids: Sequence[str],
                  chosen: Mapping[str, Sequence[int]] | None):
    """A predicate on (subject_id, index) keeping the protocol's slices, or None for all."""
    window = training_protocol(manifest)["train_slices"]
    if chosen is None and not window:
        return None
    keys = []
    for subject_id in subject_ids:
        if chosen is not None:
            indices = chosen[subject_id]
        else:
            indices = range(*_central_window(int(manifest["subjects"][subject_id]["shape_zyx"][0]),
                                             window))
        keys += [f"{subject_id}#{i}" for i in indices]
    table = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
        tf.constant(keys, tf.string), tf.ones([len(keys)], tf.int64)), default_value=0)

    def keep(subject_id, index):
        key = tf.strings.join([subject_id, tf.strings.as_string(index)], separator="#")
        return table.lookup(key) > 0

    return keep


def _slices_stream(paths, shape_yx, num_channels, with_label, batch_size,
                   config: PipelineConfig, stream: int, keep=None,
                   crop_yx: Sequence[int] | None = None) -> tf.data.Dataset:
    def parse(serialized):
        example = schema.parse_example(serialized, 2, num_channels)
        out = {"image": tf.ensure_shape(example["image"], [*shape_yx, num_channels])}
        if with_label:  # uint8 in the cache; int32 after batching
            out["label"] = tf.ensure_shape(tf.cast(example["label"], tf.uint8), shape_yx)
        if keep is not None:
            out["keep"] = keep(example[schema.SUBJECT_ID], example[schema.INDEX])
        return out

    examples = _read(paths, parse, config, stream)
    if keep is not None:
        examples = examples.filter(lambda e: e.pop("keep"))
    examples = examples.shuffle(config.shuffle_buffer, seed=config.seed + stream).repeat()
    if crop_yx and tuple(crop_yx) != tuple(shape_yx):
        examples = examples.enumerate().map(
            lambda counter, e: _random_crop(e, crop_yx, _element_seed(config, stream + 200,
                                                                       counter)),
            num_parallel_calls=AUTOTUNE, deterministic=config.deterministic)
    return examples.batch(batch_size, drop_remainder=True)


def _random_crop(example, crop_yx, seed):
    """One random (rows, cols) window of a slice, the same for its image and label."""
    image = example["image"]
    shape = tf.shape(image)
    limit = tf.stack([shape[0] - crop_yx[0] + 1, shape[1] - crop_yx[1] + 1])
    corner = tf.cast(tf.floor(tf.random.stateless_uniform([2], seed)
                              * tf.cast(limit, tf.float32)), tf.int32)
    corner = tf.minimum(corner, limit - 1)
    out = {"image": tf.ensure_shape(
        tf.slice(image, [corner[0], corner[1], 0], [crop_yx[0], crop_yx[1], -1]),
        [crop_yx[0], crop_yx[1], image.shape[-1]])}
    if "label" in example:
        out["label"] = tf.ensure_shape(tf.slice(example["label"], corner, crop_yx), crop_yx)
    return out


def _patches_stream(paths, patch_size, num_channels, with_label, batch_size,
                    config: PipelineConfig, stream: int) -> tf.data.Dataset:
    count = config.patches_per_volume

    def parse(serialized):
        example = schema.parse_example(serialized, 3, num_channels)
        out = {"image": example["image"], "corners": example["patch_corners"]}
        if with_label:
            out["label"] = tf.cast(example["label"], tf.uint8)
        return out

    def cut(counter, volume):
        corner_seed, fallback_seed = tf.unstack(tf.random.experimental.stateless_split(
            _element_seed(config, stream, counter), 2))
        corners = volume["corners"]  # (N, 3)
        max_corner = tf.maximum(tf.shape(volume["image"])[:3] - patch_size, 0)  # (3,)

        def stored():
            index = tf.random.stateless_uniform([count], corner_seed, minval=0,
                                                maxval=tf.shape(corners)[0], dtype=tf.int32)
            return tf.gather(corners, index)

        def uniform():
            unit = tf.random.stateless_uniform([count, 3], fallback_seed)
            return tf.cast(tf.floor(unit * tf.cast(max_corner + 1, tf.float32)), tf.int32)

        chosen = tf.cond(tf.shape(corners)[0] > 0, stored, uniform)
        chosen = tf.clip_by_value(chosen, 0, max_corner)  # (count, 3)
        out = {"image": tf.stack([
            tf.slice(volume["image"], tf.concat([chosen[j], [0]], 0), [*patch_size, num_channels])
            for j in range(count)])}  # (count, D, H, W, C)
        if with_label:
            out["label"] = tf.stack([tf.slice(volume["label"], chosen[j], patch_size)
                                     for j in range(count)])
        return out

    volumes = _read(paths, parse, config, stream)
    volumes = volumes.shuffle(len(paths), seed=config.seed + stream).repeat()
    patches = volumes.enumerate().map(cut, num_parallel_calls=AUTOTUNE,
                                      deterministic=config.deterministic).unbatch()
    patches = patches.shuffle(config.shuffle_buffer, seed=config.seed + 10 + stream)
    return patches.batch(batch_size, drop_remainder=True)


def training_dataset(records_dir: str, split: splits_lib.Split, config: PipelineConfig,
                     target: tuple[str, splits_lib.Split] | None = None) -> tf.data.Dataset:
    """The infinite training stream of a split.

    Args:
      records_dir: folder with manifest.json and the shards.
      split: patient-level split; `labeled` feeds the labeled stream, `unlabeled` the other.
      config: see `PipelineConfig`.
      target: (records folder, split) of a second data domain; with
        `config.target_batch_size` > 0 its training patients (labeled and unlabeled parts of
        its split; labels are never delivered) feed a `target` stream, un-augmented like the
        unlabeled one. 3D targets are cut into the source's patch size.

    Returns:
      A dataset of {"labeled": {"image": (Bl, *S, C) float32, "label": (Bl, *S) int32},
      "unlabeled": {"image": (Bu, *S, C) float32}} (+ "target": {"image": (Bt, *S', C)}) with
      static shapes; S = (H, W) for 2D, the patch size for 3D.

    Raises:
      ValueError: for a missing/bad manifest or shard, a split that does not fit the records,
        a 3D volume smaller than the patch, or an augmentation the dimensionality lacks.
    """
    manifest = load_manifest(records_dir)
    facts = dataset_facts(manifest, config.patch_size_zyx)
    ops = augment_lib.parse_spec(config.augment, facts.spatial_dims)
    labeled_pool, image_only = splits_lib.patient_pools(manifest)
    splits_lib.validate_split(split, labeled_pool, labeled_pool + image_only,
                              source=f"split {split.name!r} for records {records_dir}")
    labeled_ids = subject_ids_for(manifest, split.labeled, labeled=True)
    unlabeled_ids = (subject_ids_for(manifest, split.unlabeled)
                     if config.include_unlabeled and split.unlabeled else labeled_ids)
    if facts.spatial_dims == 3:
        for subject_id in sorted(set(labeled_ids) | set(unlabeled_ids)):
            shape = manifest["subjects"][subject_id]["shape_zyx"]
            if any(int(s) < p for s, p in zip(shape, facts.example_shape)):
                raise ValueError(f"{records_dir}: subject {subject_id} has shape {shape}, smaller "
                                 f"than the patch {facts.example_shape}; re-run preprocessing "
                                 "(it pads small volumes) or choose a smaller patch_size_zyx.")
    if facts.spatial_dims == 2:
        protocol = training_protocol(manifest)
        stored = stored_slice_shape(manifest)

        def build(ids, with_label, batch_size, stream, per_subject):
            chosen = (protocol_slices(records_dir, manifest, ids, per_subject, with_label,
                                      split.seed) if per_subject else None)
            return _slices_stream(
                _shard_paths(records_dir, manifest, ids), stored, facts.num_channels,
                with_label, batch_size, config, stream,
                keep=_slice_filter(manifest, ids, chosen), crop_yx=protocol["train_crop_yx"])

        labeled = build(labeled_ids, True, config.labeled_batch_size, _LABELED_STREAM,
                        protocol["labeled_slices_per_subject"])
        unlabeled = build(unlabeled_ids, False, config.unlabeled_batch_size, _UNLABELED_STREAM,
                          protocol["unlabeled_slices_per_subject"])
    else:
        labeled = _patches_stream(_shard_paths(records_dir, manifest, labeled_ids),
                                  facts.example_shape, facts.num_channels, True,
                                  config.labeled_batch_size, config, _LABELED_STREAM)
        unlabeled = _patches_stream(_shard_paths(records_dir, manifest, unlabeled_ids),
                                    facts.example_shape, facts.num_channels, False,
                                    config.unlabeled_batch_size, config, _UNLABELED_STREAM)

    def finish_labeled(counter, batch):
        images, labels = batch["image"], tf.cast(batch["label"], tf.int32)
        if ops:
            images, labels = augment_lib.augment(
                images, labels, config.augment, _element_seed(config, _LABELED_STREAM + 100,
                                                              counter))
        return {"image": images, "label": labels}

    labeled = labeled.enumerate().map(finish_labeled, num_parallel_calls=AUTOTUNE,
                                      deterministic=config.deterministic)
    streams = {"labeled": labeled, "unlabeled": unlabeled}
    if config.target_batch_size:
        if target is None:
            raise ValueError("PipelineConfig.target_batch_size > 0 needs the target domain's "
                             "(records folder, split).")
        streams["target"] = _target_stream(*target, facts, config)
    return tf.data.Dataset.zip(streams).prefetch(AUTOTUNE)


def _target_stream(records_dir: str, split: splits_lib.Split, source: DataSpec,
                   config: PipelineConfig) -> tf.data.Dataset:
    """Images of the target domain's training patients, batched like the unlabeled stream."""
    manifest = load_manifest(records_dir)
    facts = dataset_facts(manifest, source.example_shape if source.spatial_dims == 3 else None)
    if facts.spatial_dims != source.spatial_dims or facts.num_channels != source.num_channels:
        raise ValueError(f"Target records {records_dir} are {facts.spatial_dims}D with "
                         f"{facts.num_channels} channel(s); the source is {source.spatial_dims}D "
                         f"with {source.num_channels}. Preprocess the target to match.")
    patients = [*split.labeled, *split.unlabeled]
    if not patients:
        raise ValueError(f"The target split {split.name!r} has no training patient (labeled or "
                         f"unlabeled) for the records {records_dir}.")
    subject_ids = subject_ids_for(manifest, patients)
    paths = _shard_paths(records_dir, manifest, subject_ids)
    if facts.spatial_dims == 3:
        return _patches_stream(paths, facts.example_shape, facts.num_channels, False,
                               config.target_batch_size, config, _TARGET_STREAM)
    # Target slices are cut to the source's training shape (its protocol crop, if any).
    stored = stored_slice_shape(manifest)
    crop = tuple(source.example_shape)
    if any(c > s for c, s in zip(crop, stored)):
        raise ValueError(f"Target records {records_dir} hold {stored} slices, smaller than the "
                         f"source's training slices {crop}. Preprocess the target with a "
                         "crop_size_yx at least that large.")
    return _slices_stream(paths, stored, facts.num_channels, False, config.target_batch_size,
                          config, _TARGET_STREAM, crop_yx=crop)


def measure_pipeline_throughput(dataset: tf.data.Dataset, num_batches: int,
                                warmup_batches: int = 2) -> float:
    """Examples per second a dataset delivers (every "image" tensor's batch size is counted, so
    a training element counts labeled + unlabeled examples). Warm-up batches (cache filling,
    autotuning) are excluded."""
    iterator = iter(dataset)
    for _ in range(warmup_batches):
        next(iterator)
    examples = 0
    start = time.perf_counter()
    for _ in range(num_batches):
        element = next(iterator)
        examples += sum(int(t.shape[0]) for path, t in _flatten_with_paths(element)
                        if path.endswith("image"))
    return examples / (time.perf_counter() - start)


def _flatten_with_paths(element, prefix=""):
    if isinstance(element, Mapping):
        for key, value in element.items():
            yield from _flatten_with_paths(value, f"{prefix}/{key}")
    else:
        yield prefix, element


def load_subject(records_dir: str, subject_id: str, manifest: Mapping[str, Any] | None = None):
    """Reads one subject's preprocessed volume (numpy, for validation and evaluation).

    Args:
      records_dir: the records folder.
      subject_id: a key of manifest["subjects"].
      manifest: the loaded manifest (read from `records_dir` when None).

    Returns:
      (image (Z, H, W, C) float32, label (Z, H, W) int32 or None when unlabeled).

    Raises:
      ValueError: naming the shard when the subject is unknown, the shard missing or its content
        does not match the manifest (truncated shard, missing slices).
    """
    manifest = manifest if manifest is not None else load_manifest(records_dir)
    entry = manifest["subjects"].get(subject_id)
    if entry is None:
        raise ValueError(f"Subject {subject_id!r} is not in {records_dir}/{MANIFEST_NAME}.")
    path = _shard_paths(records_dir, manifest, [subject_id])[0]
    try:
        examples = [schema.decode_example_numpy(blob) for blob in
                    tf.data.TFRecordDataset(path).as_numpy_iterator()]
    except tf.errors.OpError as error:
        raise ValueError(f"Shard {path} is corrupt ({error.message}); re-run preprocessing.") from None
    if len(examples) != int(entry["num_examples"]):
        raise ValueError(f"Shard {path} holds {len(examples)} example(s), the manifest says "
                         f"{entry['num_examples']}; re-run preprocessing.")
    if int(manifest["spatial_dims"]) == 3:
        image, label = examples[0]["image"], examples[0]["label"]
    else:
        examples.sort(key=lambda e: e["index"])
        if [e["index"] for e in examples] != list(range(len(examples))):
            raise ValueError(f"Shard {path}: slice indices are not 0..{len(examples) - 1}; "
                             "re-run preprocessing.")
        image = np.stack([e["image"] for e in examples])
        has = [e["label"] is not None for e in examples]
        if any(has) and not all(has):
            raise ValueError(f"Shard {path}: some slices have labels and some not.")
        label = np.stack([e["label"] for e in examples]) if all(has) else None
    expected = tuple(int(v) for v in entry["shape_zyx"])
    if tuple(image.shape[:3]) != expected:
        raise ValueError(f"Shard {path}: volume shape {image.shape[:3]} differs from the "
                         f"manifest's {expected}; re-run preprocessing.")
    image = np.array(image, dtype=np.float32)  # writable copy
    return image, (None if label is None else label.astype(np.int32))


def evaluation_dataset(records_dir: str, subject_ids: Sequence[str]
                       ) -> Iterator[tuple[str, np.ndarray, np.ndarray | None]]:
    """Yields (subject_id, image (Z, H, W, C) float32, label (Z, H, W) int32 | None) one subject
    at a time (a Python iterator: evaluation works per volume in numpy, memory is one volume).

    Raises:
      ValueError: at the call (not at the first `next`) for a bad manifest or unknown subject.
    """
    manifest = load_manifest(records_dir)
    unknown = [s for s in subject_ids if s not in manifest["subjects"]]
    if unknown:
        raise ValueError(f"Subject(s) {', '.join(unknown)} are not in "
                         f"{records_dir}/{MANIFEST_NAME}.")

    def volumes():
        for subject_id in subject_ids:
            image, label = load_subject(records_dir, subject_id, manifest)
            yield subject_id, image, label

    return volumes()
