"""Two data domains in one run: which modalities and classes of the target match the source's.

Source and target may come in different layouts (e.g. a labeled folder-layout source and a
BraTS-layout unlabeled target). The networks see the source's channels in the source's order, so
the target must supply every source modality, found **by name** (case-insensitive, common
spellings folded: T1w = t1, T1Gd / T1c = t1ce, T2w = t2, T2-FLAIR = flair), and its labels must name
the same classes (oedema = edema, tumour = tumor, ...). No TensorFlow here.

- `match_domains` is the pure rule: the target's modality names in the source's order, and per
  target class the source class it is (or a ValueError naming what cannot be matched).
- `align_target_options` applies the modality part to a dataset with a `modalities` option
  (BraTS and its kin): it picks and orders the target's channels to the source's before the
  target is preprocessed.

- `target_class_map` is what evaluation on the target uses: per target class, the source class
  it is, by name in any index order (the target's records keep their own indices; evaluation
  reads the target's label files through this map and writes predictions with the target's own
  label values). Two binary label maps (background + one foreground class each) match whatever
  the foreground is called: choosing which structure is "the" foreground is what a binary
  target option does (e.g. BraTS `--target_option=target=tumour_core`, labels 1 and 4, against
  a source whose one class is a tumour core), and the match is logged with both names.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Sequence

__all__ = ["DomainMatch", "align_target_options", "canonical_name", "match_domains",
           "target_class_map"]

# Spellings of one modality or class in public layouts -> one canonical name.
_ALIASES = {
    "t1w": "t1", "t1native": "t1", "t1n": "t1",
    "t1gd": "t1ce", "t1c": "t1ce", "t1post": "t1ce", "t1contrast": "t1ce", "t1ce": "t1ce",
    "t2w": "t2",
    "t2flair": "flair", "flair": "flair", "t2f": "flair",
    "edema": "oedema", "peritumoraledema": "oedema", "peritumoraloedema": "oedema",
    "tumor": "tumour",
    "necrosis": "necrotic_core", "necroticcore": "necrotic_core", "ncrnet": "necrotic_core",
    "necroticandnonenhancingtumorcore": "necrotic_core",
    "enhancingtumor": "enhancing", "enhancingtumour": "enhancing", "et": "enhancing",
    "bg": "background",
}


def canonical_name(name: str) -> str:
    """Lower case, punctuation and spaces dropped, common spellings folded ("T1Gd" -> "t1ce")."""
    key = re.sub(r"[^a-z0-9]", "", str(name).lower())
    return _ALIASES.get(key, key)


@dataclasses.dataclass(frozen=True)
class DomainMatch:
    """How the target domain feeds the source's networks.

    Attributes:
      target_modalities: the target's modality names (its own spelling) in the source's order.
      class_map: per target class index, the source class index with the same name.
    """

    target_modalities: tuple[str, ...]
    class_map: tuple[int, ...]

    @property
    def classes_identity(self) -> bool:
        """True when the target's class indices already are the source's."""
        return self.class_map == tuple(range(len(self.class_map)))


def match_domains(source_modalities: Sequence[str], source_classes: Sequence[str],
                  target_modalities: Sequence[str], target_classes: Sequence[str] | None = None,
                  *, source: str = "source", target: str = "target") -> DomainMatch:
    """Matches the target's modalities and classes to the source's by name.

    Args:
      source_modalities / source_classes: the source's channel and class names, in order.
      target_modalities / target_classes: the target's (classes None: not checked, e.g. a target
        without labels to evaluate).
      source / target: how to name the domains in errors (e.g. the dataset names).

    Returns:
      A `DomainMatch`.

    Raises:
      ValueError: one line naming the source modalities the target lacks, or the target classes
        no source class matches.
    """
    found = {canonical_name(m): m for m in target_modalities}
    missing = [m for m in source_modalities if canonical_name(m) not in found]
    if missing:
        raise ValueError(
            f"The {target} domain lacks the {source} modalities {', '.join(missing)} (it has "
            f"{', '.join(target_modalities)}); train on the modalities both have, e.g. "
            f"--dataset_option=modalities=<those> for a BraTS-style source.")
    modalities = tuple(found[canonical_name(m)] for m in source_modalities)
    if target_classes is None:
        return DomainMatch(modalities, ())
    index = {canonical_name(c): i for i, c in enumerate(source_classes)}
    unmatched = [c for c in target_classes if canonical_name(c) not in index]
    if unmatched:
        raise ValueError(
            f"The {target} classes {', '.join(unmatched)} cannot be matched by name to the "
            f"{source} classes ({', '.join(source_classes)}); choose target options with the "
            "same classes (e.g. --target_option=target=binary with a binary source).")
    return DomainMatch(modalities, tuple(index[canonical_name(c)] for c in target_classes))


def align_target_options(source_modalities: Sequence[str], target_dataset: Any,
                         options: Mapping[str, Any], *, source: str = "source",
                         target: str = "target") -> dict[str, Any]:
    """The target's dataset options with its modalities picked and ordered like the source's.

    Args:
      source_modalities: the source's channel names (its records' manifest), in order.
      target_dataset: the target's `Dataset`, resolved on its folder (its `modalities` and
        `options()`).
      options: the target options the user gave.

    Returns:
      `options`, plus `modalities=<names in the source's order>` when the target's channels
      differ from the source's and its dataset has a `modalities` option.

    Raises:
      ValueError: when the target lacks a source modality (`match_domains`), or its channels
        differ and it has no `modalities` option to choose them.
    """
    match = match_domains(source_modalities, (), target_dataset.modalities, None,
                          source=source, target=target)
    options = dict(options)
    if tuple(match.target_modalities) == tuple(target_dataset.modalities):
        return options
    if "modalities" not in target_dataset.options():
        raise ValueError(
            f"The {target} domain's channels ({', '.join(target_dataset.modalities)}) are not "
            f"the {source}'s ({', '.join(source_modalities)}) in order, and its dataset has no "
            "modalities option to choose them; write the target with the source's channels.")
    options["modalities"] = ",".join(match.target_modalities)
    return options


def target_class_map(source_classes: Sequence[str], target_classes: Sequence[str], *,
                     source: str = "source", target: str = "target") -> tuple[int, ...]:
    """Per target class index, the index of the same source class (a permutation).

    By name (`match_domains`' spellings), in any order; two binary label maps (background + one
    foreground class each) match by position whatever their foreground is called.

    Raises:
      ValueError: one line naming the classes that cannot be matched, or the counts that differ.
    """
    source_classes, target_classes = list(source_classes), list(target_classes)
    background = canonical_name("background")
    if (len(source_classes) == len(target_classes) == 2
            and canonical_name(source_classes[0]) == canonical_name(target_classes[0])
            == background):
        return (0, 1)
    if len(source_classes) != len(target_classes):
        raise ValueError(
            f"The {target} has {len(target_classes)} classes ({', '.join(target_classes)}), the "
            f"{source} {len(source_classes)} ({', '.join(source_classes)}); evaluating on the "
            "target needs the same classes: choose target options that give them (e.g. "
            "--target_option=target=binary, or a BraTS region such as target=tumour_core, "
            "against a binary source).")
    class_map = match_domains((), source_classes, (), target_classes, source=source,
                              target=target).class_map
    if len(set(class_map)) != len(class_map):
        raise ValueError(f"Two {target} classes ({', '.join(target_classes)}) match one {source} "
                         f"class ({', '.join(source_classes)}) by name; rename one.")
    return class_map
