"""Typed dataclasses to and from plain mappings and YAML, with one rule for every number."""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping
from typing import Any

import yaml

from vpdm.errors import ConfigError

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def check_finite(config: Any, prefix: str = "") -> None:
    """Refuse NaN and infinity in every float, and integers beyond 64 bits, of a (nested) config dataclass,
    naming the setting.

    One generic rule rather than a check in each component: a comparison such as ``value >= 0`` is
    False for NaN, so a forgotten check would let ``train.weight_decay=nan`` train a model of NaNs; and
    torch, numpy and the checkpoint store integers in 64 bits, so ``train.seed=10**23`` would fail
    after feature extraction instead of now.
    """
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            check_finite(value, name + ".")
            continue
        for item in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(item, float) and not math.isfinite(item):
                raise ConfigError(f"{name} must be a finite number, got {item!r}")
            if isinstance(item, int) and not isinstance(item, bool) and not INT64_MIN <= item <= INT64_MAX:
                raise ConfigError(
                    f"{name} must be an integer that fits in 64 bits ({INT64_MIN}..{INT64_MAX}), got {item}"
                )


def to_dict(config: Any) -> dict[str, Any]:
    """Plain dict of builtins (lists for tuples) - safe for YAML, JSON, MLflow params and weights_only checkpoints."""

    def convert(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: convert(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [convert(v) for v in value]
        return value

    return convert(config)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping of {hint.__name__} settings, got {value!r}")
        return from_dict(hint, value, where + ".")
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        others = [a for a in args if a is not type(None)]
        return _coerce(value, others[0], where) if len(others) == 1 else value
    if origin is tuple:
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            value = [value]  # a single value for a list setting: scoring.pools=4 means [4]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return tuple(_coerce(v, args[0], where) for v in value)
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if hint in (int, float, str, bool) and not (
        isinstance(value, hint) and not (hint is int and isinstance(value, bool))
    ):
        raise ConfigError(f"{where} must be of type {hint.__name__}, got {value!r}")
    return value


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build a (nested) dataclass from a dict, rejecting unknown keys and wrong types by name."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(
            f"unknown setting(s) {[prefix + u for u in unknown]}; known: {sorted(prefix + k for k in known)}"
        )
    kwargs = {name: _coerce(value, hints[name], prefix + name) for name, value in data.items()}
    return cls(**kwargs)


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key given twice in one mapping (YAML would keep the last, silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                where = f" in {self.name}" if getattr(self, "name", None) not in (None, "<unicode string>") else ""
                raise ConfigError(
                    f"setting {key!r} is given twice{where}, on lines {seen[key]} and {line}; keep one "
                    "(YAML would silently keep the last)"
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str, name: str | None = None) -> Any:
    """``yaml.safe_load`` of a settings text that refuses duplicate keys (:class:`ConfigError` naming the key
    and both lines; ``name``, the file, in the message)."""
    loader = _UniqueKeyLoader(text)
    if name is not None:
        loader.name = name
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def flatten_dict(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings -> ``{"a.b.c": value}`` (YAML sections, MLflow params and tags)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            out.update(flatten_dict(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
