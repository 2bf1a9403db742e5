"""Typed `name=value` overrides of frozen config dataclasses, and their JSON round trip.

Kept free of TensorFlow and Keras so launchers can check `--set` values (and studies can check a
whole plan) before anything heavy is imported. Used for method `Config`s, `PreprocessConfig` and
`Dataset` facts alike.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Mapping, Sequence

__all__ = ["apply_overrides", "config_from_dict", "parse_value"]


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def parse_value(text: str, annotation: Any, name: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        word = text.strip().lower()
        # "null" always means None; "none" too, except for string fields where "none" can be a
        # legitimate value (norm="none", augment="none").
        if type(None) in args and (word == "null" or (word == "none" and str not in args)):
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return parse_value(text, arg, name)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError("; ".join(errors))
    if origin is tuple:
        body = text.strip().strip("()[]").strip()
        items = [p.strip() for p in body.split(",") if p.strip()] if body else []
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(parse_value(p, args[0], name) for p in items)
        if len(items) != len(args):
            raise ValueError(f"{name}: expected {len(args)} comma-separated values, got {text!r}")
        return tuple(parse_value(p, a, name) for p, a in zip(items, args))
    if annotation is bool:
        low = text.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{name}: expected true/false, got {text!r}")
    if annotation is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{name}: expected an integer, got {text!r}") from None
    if annotation is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{name}: expected a number, got {text!r}") from None
    if annotation is str:
        return text
    raise ValueError(f"{name}: fields of type {annotation} cannot be set from the command line")


def apply_overrides(config: Any, preset: Mapping[str, Any] | None,
                    overrides: Sequence[str] = ()) -> Any:
    """Applies a preset's values, then `name=value` strings, to a frozen config dataclass.

    Args:
      config: a frozen dataclass instance (the method's `Config()`).
      preset: field -> value (a method's `PRESETS[name]`), or None.
      overrides: "name=value" strings (`--set`), parsed to the field's type: int, float,
        bool (true/false), str, tuples as "8,16,32"; optional fields accept "null" (and "none",
        except string fields, where "none" is the string) to restore the default None.

    Returns:
      A new config.

    Raises:
      ValueError: for an unknown field (listing the fields), a malformed item or a value that
        does not parse to the field's type.
    """
    cls = type(config)
    hints = _field_types(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    changes: dict[str, Any] = {}
    for name, value in (preset or {}).items():
        if name not in names:
            raise ValueError(f"Preset sets unknown field {name!r} of {cls.__name__}. "
                             f"Fields: {', '.join(names)}.")
        changes[name] = value
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected name=value, e.g. --set=learning_rate=1e-4.")
        name, text = (part.strip() for part in item.split("=", 1))
        if name not in names:
            raise ValueError(f"--set {name}=...: {cls.__name__} has no field {name!r}. "
                             f"Fields: {', '.join(names)}.")
        try:
            changes[name] = parse_value(text, hints[name], name)
        except ValueError as e:
            raise ValueError(f"--set {item!r}: {e}.") from None
    return dataclasses.replace(config, **changes)


def _coerce(value: Any, annotation: Any) -> Any:
    """JSON value -> the annotated type (lists back to tuples, recursively)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if value is None:
        return None
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        for arg in non_none:
            if typing.get_origin(arg) is tuple and isinstance(value, (list, tuple)):
                return _coerce(value, arg)
        return value
    if origin is tuple and isinstance(value, (list, tuple)):
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0]) for v in value)
        return tuple(_coerce(v, a) for v, a in zip(value, args))
    return value


def config_from_dict(cls: type, d: Mapping[str, Any]) -> Any:
    """Rebuilds a frozen config dataclass from its `dataclasses.asdict` / JSON form.

    Raises:
      ValueError: for keys that are not fields of `cls`.
    """
    hints = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"{cls.__name__} has no fields {unknown}; the run folder was written by "
                         "another version of tfseg.")
    return cls(**{k: _coerce(v, hints[k]) for k, v in d.items()})
