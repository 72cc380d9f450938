"""Typed dataclasses from nested dicts (parsed YAML), with unknown or mistyped keys reported by their
dotted path; shared by the training recipes and the backends file, without their heavy imports."""

from __future__ import annotations

import dataclasses
import types
import typing


def from_dict(cls, data, where: str = "config"):
    """Build dataclass `cls` from nested dicts, checking keys and value types."""
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(names)}")
    return cls(**{name: _convert(hints[name], value, f"{where}.{name}") for name, value in data.items()})


def _convert(kind, value, where: str):
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, value, where)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0])
    if dataclasses.is_dataclass(kind):
        return from_dict(kind, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{where} must be a list, got {value!r}")
        (item,) = typing.get_args(kind)
        return [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind in (int, float, str, bool):
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ValueError(f"{where} must be {kind.__name__}, got {value!r}")
        return value
    return value
