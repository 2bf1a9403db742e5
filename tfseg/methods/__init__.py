"""Segmentation methods: one module per method, looked up by module name (`--method=NAME`).

Each method module exposes:
  Config    frozen dataclass with the paper's defaults (network, losses, optimiser, batch sizes,
            `steps`, `validation_every`);
  PRESETS   {"quick": {field: value, ...}, ...} named override sets (`--preset`);
  build(config, data_spec) -> SegMethod   (not compiled).
Adding a method is adding one file here; nothing else needs to change.
"""
from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType
from typing import Any, Sequence

__all__ = ["DataSpec", "SegMethod", "Stage", "apply_overrides", "available_methods",
           "config_from_dict", "get_method_module", "resolve_config"]

_NOT_METHODS = ("base",)
_FROM_BASE = ("DataSpec", "SegMethod", "Stage", "apply_overrides", "config_from_dict")


def __getattr__(name: str) -> Any:
    # Lazy: listing or validating method names (launchers, before anything heavy) must not
    # import TensorFlow; the classes come from base.py on first use.
    if name in ("apply_overrides", "config_from_dict"):
        return getattr(importlib.import_module("tfseg.overrides"), name)
    if name in _FROM_BASE:
        return getattr(importlib.import_module(f"{__name__}.base"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def available_methods() -> list[str]:
    """Names of the method modules in this package (not `base`, not private modules)."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__)
                  if not m.name.startswith("_") and m.name not in _NOT_METHODS)


def get_method_module(name: str) -> ModuleType:
    """Imports `tfseg.methods.<name>`.

    Raises:
      ValueError: for an unknown name, listing the available methods.
    """
    names = available_methods()
    if name not in names:
        raise ValueError(f"Unknown method {name!r}. Available: {', '.join(names)}.")
    return importlib.import_module(f"{__name__}.{name}")


def resolve_config(module: ModuleType, preset: str | None = None,
                   overrides: Sequence[str] = ()) -> Any:
    """The method's `Config()` with a named preset and `--set` overrides applied.

    Raises:
      ValueError: for an unknown preset (listing the module's presets) or a bad override.
    """
    from tfseg.overrides import apply_overrides

    presets = getattr(module, "PRESETS", {})
    if preset is not None and preset not in presets:
        raise ValueError(f"Unknown preset {preset!r} for method {module.__name__.split('.')[-1]!r}."
                         f" Available: {', '.join(sorted(presets)) or 'none'}.")
    return apply_overrides(module.Config(), presets[preset] if preset else None, overrides)
