"""Patient-level data splits: drawn from a seed, read from a file, or published with a dataset.

A split names patients, never slices or subjects: every subject (frame, phase, slice) of a patient
lands in the same part. `labeled`, `val` and `test` are disjoint and must have labels; `unlabeled`
patients contribute images only. `unlabeled` must not share a patient with `val` or `test` (that
would train on evaluation images); it may share patients with `labeled` only when written so on
purpose (docs/datasets.md, "Splits").

JSON form: {"name": ..., "labeled": [...], "unlabeled": [...], "val": [...], "test": [...],
"seed": int | null}.
"""
from __future__ import annotations

import dataclasses
import json
import os
from tfseg._files import write_text_atomic
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

PARTS = ("labeled", "unlabeled", "val", "test")


@dataclasses.dataclass(frozen=True)
class Split:
    """A patient-level split.

    Attributes:
      name: e.g. "c1", "labeled3_seed0" or the file stem.
      labeled, unlabeled, val, test: patient ids (tuples; lists are converted).
      seed: the seed that drew it, or None (published or hand-written).
    """

    name: str
    labeled: tuple[str, ...]
    unlabeled: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]
    seed: int | None = None

    def __post_init__(self):
        for part in PARTS:
            value = getattr(self, part)
            if not isinstance(value, (list, tuple)):
                raise ValueError(f"Split {self.name!r}: {part} must be a list of patient ids, got "
                                 f"{value!r}.")
            object.__setattr__(self, part, tuple(str(v) for v in value))
        _check_disjoint(self, where=f"split {self.name!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **{p: list(getattr(self, p)) for p in PARTS},
                "seed": self.seed}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "split") -> "Split":
        """Builds a Split from its dict form.

        Raises:
          ValueError: naming `where` when keys are missing or the parts overlap.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"{where}: expected a JSON object with keys {', '.join(PARTS)}, got "
                             f"{type(data).__name__}.")
        missing = [p for p in PARTS if p not in data]
        if missing:
            raise ValueError(f"{where}: missing key(s) {', '.join(missing)}. A split file needs "
                             f"the lists {', '.join(PARTS)} (may be empty) and optionally "
                             "'name' and 'seed'.")
        seed = data.get("seed")
        try:
            return cls(name=str(data.get("name", "split")),
                       **{p: data[p] for p in PARTS},
                       seed=None if seed is None else int(seed))
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str, where: str = "split") -> "Split":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: not valid JSON ({error}).") from None
        return cls.from_dict(data, where=where)

    def patients(self) -> tuple[str, ...]:
        """Every patient named anywhere in the split, sorted."""
        return tuple(sorted(set().union(*(getattr(self, p) for p in PARTS))))


def _check_disjoint(split: Split, where: str) -> None:
    for part in PARTS:
        ids = getattr(split, part)
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"{where}: {part} lists {', '.join(duplicates)} more than once.")
    pairs = [("labeled", "val"), ("labeled", "test"), ("val", "test"), ("unlabeled", "val"),
             ("unlabeled", "test")]
    for first, second in pairs:
        shared = sorted(set(getattr(split, first)) & set(getattr(split, second)))
        if shared:
            raise ValueError(f"{where}: patient(s) {', '.join(shared)} are in both {first} and "
                             f"{second}; a patient belongs to one part only (the evaluation "
                             "parts must stay unseen in training).")


def save_split(split: Split, path: str) -> None:
    """Writes `split` as JSON atomically (temporary file in the same folder, then rename)."""
    write_text_atomic(path, split.to_json() + "\n")


def load_split(path: str) -> Split:
    """Reads a split JSON file.

    Raises:
      ValueError: naming the file if it is missing, not JSON, lacks keys or has overlapping parts.
    """
    if not os.path.isfile(path):
        raise ValueError(f"Split file {path} does not exist. Write one with the keys "
                         f"{', '.join(PARTS)}, or draw a split with --labeled=N --split_seed=K.")
    where = f"split file {path}"
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: not valid JSON ({error}).") from None
    if isinstance(data, dict) and "name" not in data:  # unnamed: use the file stem
        data = {**data, "name": os.path.splitext(os.path.basename(path))[0]}
    return Split.from_dict(data, where=where)


def validate_split(split: Split, available_labeled_patients: Iterable[str],
                   available_patients: Iterable[str], source: str | None = None,
                   allow_no_labeled: bool = False) -> None:
    """Checks the split's patients against what the records hold.

    Args:
      split: the split.
      available_labeled_patients: patients with at least one labeled subject.
      available_patients: every patient in the records.
      source: where the split came from (file path, published name) for the message.
      allow_no_labeled: accept an empty `labeled` list (a target domain's split).

    Raises:
      ValueError: for an unknown patient, or a labeled/val/test patient without a label.
    """
    where = source or f"split {split.name!r}"
    known, labeled = set(available_patients), set(available_labeled_patients)
    unknown = [p for p in split.patients() if p not in known]
    if unknown:
        raise ValueError(f"{where}: unknown patient id(s) {', '.join(unknown[:10])}"
                         f"{' …' if len(unknown) > 10 else ''}. Known ids look like "
                         f"{', '.join(sorted(known)[:3])}; check the ids (or the preprocessing "
                         "skipped these subjects).")
    for part in ("labeled", "val", "test"):
        no_label = [p for p in getattr(split, part) if p not in labeled]
        if no_label:
            raise ValueError(f"{where}: {part} patient(s) {', '.join(no_label)} have no label; "
                             f"{part} needs annotated patients (move them to 'unlabeled').")
    if not split.labeled and not allow_no_labeled:
        raise ValueError(f"{where}: 'labeled' is empty; at least one annotated patient is needed "
                         "for training.")


def fraction_counts(pool_size: int, fraction: float, num_val: int | None = None,
                    num_test: int | None = None) -> tuple[int, int, int]:
    """(labeled, val, test) patient counts of a patient-level 7:1:2 split with `fraction` of the
    training patients labeled (DMNet's protocol: `--labeled_fraction=0.1|0.3|0.5|1.0`).

    Test = round(0.2 · pool), val = round(0.1 · pool) (each at least 1, unless given); the rest
    are training patients, of which max(1, round(fraction · training)) are labeled and the others
    unlabeled (their labels hidden).

    Raises:
      ValueError: for a fraction outside (0, 1] or a pool too small for the split.
    """
    if not 0.0 < float(fraction) <= 1.0:
        raise ValueError(f"labeled_fraction must be in (0, 1], got {fraction!r}.")
    num_test = max(1, round(0.2 * pool_size)) if num_test is None else int(num_test)
    num_val = max(1, round(0.1 * pool_size)) if num_val is None else int(num_val)
    training = pool_size - num_test - num_val
    if training < 1:
        raise ValueError(f"{pool_size} annotated patients leave none for training after "
                         f"{num_test} test and {num_val} validation patients.")
    return max(1, round(float(fraction) * training)), num_val, num_test


def draw_split(labeled_patients: Sequence[str], unlabeled_patients: Sequence[str],
               num_labeled: int, seed: int, num_val: int | None = None,
               num_test: int | None = None, test_seed: int | None = None) -> Split:
    """Draws a patient-level split, deterministic in `seed` (and `test_seed`).

    The pool of labeled patients (sorted, so input order does not matter) is permuted with the
    seed; test = the first `num_test`, val = the next `num_val`, labeled = the next `num_labeled`.
    Test and val therefore do not depend on `num_labeled`, and the labeled set for N is a subset
    of the one for N' > N at the same seed (label-efficiency studies compare like with like).
    Unlabeled = the rest of the pool (labels hidden) + every image-only patient.

    With `test_seed`, test and val are drawn from a permutation by `test_seed` instead, and the
    labeled patients from a permutation by `seed` of the patients left: every seed then shares
    one test and validation set (the few-shot GAN paper's protocol, where rows of different
    labeled draws are scored on the same seven test subjects), and only the labeled draw varies.

    Args:
      labeled_patients: patients with labels.
      unlabeled_patients: image-only patients (ids also in `labeled_patients` are ignored here).
      num_labeled: number of labeled training patients (>= 1).
      seed: the split seed.
      num_val: validation patients; default max(1, round(0.1 · pool)).
      num_test: test patients; default max(1, round(0.25 · pool)).

    Returns:
      A Split named f"labeled{num_labeled}_seed{seed}".

    Raises:
      ValueError: if counts are negative or the pool is too small, saying how many are available.
    """
    pool = sorted(set(map(str, labeled_patients)))
    image_only = sorted(set(map(str, unlabeled_patients)) - set(pool))
    if num_test is None:
        num_test = max(1, round(0.25 * len(pool)))
    if num_val is None:
        num_val = max(1, round(0.1 * len(pool)))
    if num_labeled < 1:
        raise ValueError(f"num_labeled must be >= 1, got {num_labeled}.")
    if num_val < 0 or num_test < 0:
        raise ValueError(f"num_val and num_test must be >= 0, got {num_val} and {num_test}.")
    available = len(pool) - num_test - num_val
    if num_labeled > available:
        raise ValueError(f"num_labeled={num_labeled} is too large: {len(pool)} labeled patients "
                         f"minus {num_test} test and {num_val} val leave {max(available, 0)} for "
                         f"training. Use --labeled <= {max(available, 0)} or fewer val/test "
                         "patients.")
    if test_seed is None:
        order = [pool[i] for i in np.random.default_rng(seed).permutation(len(pool))]
        name = f"labeled{num_labeled}_seed{seed}"
    else:  # test/val from test_seed's permutation, the labeled from seed's permutation of the rest
        fixed = [pool[i] for i in np.random.default_rng(test_seed).permutation(len(pool))]
        held, others = fixed[:num_test + num_val], sorted(fixed[num_test + num_val:])
        order = held + [others[i] for i in np.random.default_rng(seed).permutation(len(others))]
        name = f"labeled{num_labeled}_seed{seed}_test{test_seed}"
    test = order[:num_test]
    val = order[num_test:num_test + num_val]
    labeled = order[num_test + num_val:num_test + num_val + num_labeled]
    rest = order[num_test + num_val + num_labeled:]
    return Split(name=name, labeled=tuple(sorted(labeled)),
                 unlabeled=tuple(sorted(rest + image_only)), val=tuple(sorted(val)),
                 test=tuple(sorted(test)), seed=int(seed))


def draw_target_split(labeled_patients: Sequence[str], unlabeled_patients: Sequence[str],
                      seed: int, num_val: int | None = None, num_test: int | None = None
                      ) -> Split:
    """The split of a run's second (target) domain, whose labels never train anything.

    Test and val are drawn from the annotated patients exactly as `draw_split` does (same
    defaults, same permutation for a seed); every other patient, annotated or not, is an
    unlabeled training image. A target without annotations has empty test and val lists.

    Returns:
      A Split named f"target_seed{seed}" with an empty `labeled` list.
    """
    pool = sorted(set(map(str, labeled_patients)))
    image_only = sorted(set(map(str, unlabeled_patients)) - set(pool))
    if not pool:
        return Split(name=f"target_seed{seed}", labeled=(), unlabeled=tuple(image_only),
                     val=(), test=(), seed=int(seed))
    num_test = max(1, round(0.25 * len(pool))) if num_test is None else num_test
    num_val = max(1, round(0.1 * len(pool))) if num_val is None else num_val
    if num_val < 0 or num_test < 0 or num_val + num_test > len(pool):
        raise ValueError(f"Target domain: {num_test} test + {num_val} val patients do not fit its "
                         f"{len(pool)} annotated patients; lower --num_test / --num_val.")
    order = [pool[i] for i in np.random.default_rng(seed).permutation(len(pool))]
    test, val = order[:num_test], order[num_test:num_test + num_val]
    rest = order[num_test + num_val:]
    return Split(name=f"target_seed{seed}", labeled=(), unlabeled=tuple(sorted(rest + image_only)),
                 val=tuple(sorted(val)), test=tuple(sorted(test)), seed=int(seed))


def published_split(dataset, name: str) -> Split:
    """The split `name` from `dataset.published_splits`.

    Raises:
      ValueError: listing the published names when `name` is unknown.
    """
    splits = dict(getattr(dataset, "published_splits", {}) or {})
    if name not in splits:
        available = ", ".join(sorted(splits)) or "none"
        raise ValueError(f"Dataset {dataset.name!r} has no published split {name!r}. Published: "
                         f"{available}.")
    data = dict(splits[name])
    data.setdefault("name", name)
    return Split.from_dict(data, where=f"published split {name!r} of dataset {dataset.name!r}")


def patient_pools(manifest: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """(patients with a labeled subject, patients with only unlabeled subjects) of a manifest."""
    labeled, every = set(), set()
    for entry in manifest["subjects"].values():
        every.add(entry["patient_id"])
        if entry["labeled"]:
            labeled.add(entry["patient_id"])
    return sorted(labeled), sorted(every - labeled)


def resolve_split(manifest: Mapping[str, Any], dataset=None, *, published: str | None = None,
                  path: str | None = None, num_labeled: int | None = None, seed: int = 0,
                  num_val: int | None = None, num_test: int | None = None,
                  allow_no_labeled: bool = False, test_seed: int | None = None) -> Split:
    """Returns the split chosen by exactly one of: a published name, a file, or (num_labeled, seed).

    The result is validated against the records' manifest (every patient known; labeled, val and
    test patients annotated).

    Args:
      manifest: the records' manifest (pipeline.load_manifest).
      dataset: the Dataset (needed for `published`).
      published: a name in `dataset.published_splits`.
      path: a split JSON file.
      num_labeled: draw a split with this many labeled patients ...
      seed: ... and this seed (num_val / num_test / test_seed as in `draw_split`).

    Raises:
      ValueError: if not exactly one source is given, or the split does not fit the records.
    """
    given = [n for n, v in (("published", published), ("path", path),
                            ("num_labeled", num_labeled)) if v is not None]
    if len(given) != 1:
        raise ValueError("Choose the split with exactly one of a published name (--split=NAME), a "
                         "split file (--split=PATH.json) or --labeled=N [--split_seed=K]; got "
                         f"{', '.join(given) or 'none'}.")
    labeled_pool, image_only = patient_pools(manifest)
    if published is not None:
        if dataset is None:
            raise ValueError(f"Published split {published!r} needs the dataset.")
        split, source = published_split(dataset, published), f"published split {published!r}"
    elif path is not None:
        split, source = load_split(path), f"split file {path}"
    else:
        split = draw_split(labeled_pool, image_only, num_labeled, seed, num_val, num_test,
                           test_seed)
        source = f"drawn split {split.name!r}"
    validate_split(split, labeled_pool, labeled_pool + image_only, source=source,
                   allow_no_labeled=allow_no_labeled)
    return split
