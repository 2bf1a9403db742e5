"""Datasets in their public layouts: one module per dataset, looked up by name."""
from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from tfseg.datasets.base import Dataset, Subject

__all__ = ["Dataset", "Subject", "available_datasets", "get_dataset"]


def available_datasets() -> list[str]:
    pkg = importlib.import_module(__name__)
    return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__)
                  if not m.name.startswith("_") and m.name not in ("base", "synthetic_common"))


def get_dataset(name: str, **options: Any) -> Dataset:
    """Returns the `Dataset` for `--dataset=name`, with dataset options (e.g. phase="ES").

    Raises:
      ValueError: for an unknown name, listing the available ones.
    """
    names = available_datasets()
    if name not in names:
        raise ValueError(f"Unknown dataset {name!r}. Available: {', '.join(names)}.")
    module = importlib.import_module(f"{__name__}.{name}")
    if hasattr(module, "make_dataset"):
        return module.make_dataset(**options)
    if options:
        raise ValueError(f"Dataset {name!r} takes no options, got {sorted(options)}.")
    return module.DATASET
