"""Typed configuration: dataclasses filled from a recipe YAML plus ``key=value`` overrides.

Everything is checked before any work starts. An unknown key names the recipe file, the key, the
closest valid keys and the section's full list; a value of the wrong type names the key, the
expected type and the value given. A recipe may start from another with ``extends: other.yaml``
(resolved relative to the recipe's folder); the child's keys override the parent's.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A recipe or override that cannot be turned into a valid config."""


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A recipe as a plain dict, with ``extends:`` chains merged (child wins)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"recipe file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a mapping of keys to values, got {type(data).__name__}")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    return merge_recipe(load_yaml(path.parent / parent), data)


# A recipe (or override) that switches to another method starts that method's options afresh:
# the parent's were typed for the old method and would be unknown keys of the new one.
OPTIONS_OF = {"method": "method_args", "baseline_method": "baseline_args"}


def merge_recipe(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``deep_merge`` for recipes: where ``override`` names a different method (or baseline
    method), ``base``'s options for the old one are dropped first."""
    base = dict(base)
    for selector, options in OPTIONS_OF.items():
        if selector in override and override[selector] != base.get(selector):
            base.pop(options, None)
    return deep_merge(base, override)


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` over ``base``, recursively; a mapping keyed by positions over a list edits
    those items (``stages.1.train.steps=5`` changes the second stage's steps)."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        elif isinstance(value, dict) and isinstance(out.get(key), list) and value and all(map(_is_index, value)):
            out[key] = _merge_items(key, out[key], value)
        else:
            out[key] = value
    return out


def _is_index(key: Any) -> bool:
    return (isinstance(key, int) and not isinstance(key, bool)) or (isinstance(key, str) and key.isdigit())


def _merge_items(key: str, items: list[Any], override: dict[Any, Any]) -> list[Any]:
    items = list(items)
    for index, value in override.items():
        i = int(index)
        if not 0 <= i < len(items):
            raise ConfigError(f"override {key}.{index}: {key} has {len(items)} items (positions 0 to {len(items) - 1})")
        # Items of recipe lists are recipe-like mappings (stages): the method-switch rule applies.
        items[i] = merge_recipe(items[i], value) if isinstance(items[i], dict) and isinstance(value, dict) else value
    return items


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["train.lr=3e-4", "seeds=[0,1]"]`` -> nested dict; values parsed as YAML scalars/lists."""
    nested: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"override {pair!r} must look like key=value (e.g. train.steps=200)")
        key, raw = pair.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {pair!r} sets a key inside {part!r}, which is already a value")
        node[parts[-1]] = value
    return nested


def build(cls: type, data: dict[str, Any], *, source: str, prefix: str = "") -> Any:
    """An instance of dataclass ``cls`` from ``data``, checking every key and type."""
    if not isinstance(data, dict):
        where = prefix.rstrip(".") or "the top level"
        raise ConfigError(f"{source}: {where} must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(repr(prefix + c) for c in close)}?" if close else ""
            raise ConfigError(
                f"{source}: unknown config key {prefix + key!r}{hint} "
                f"(valid keys{' in ' + repr(prefix.rstrip('.')) if prefix else ''}: {', '.join(sorted(fields))})"
            )
    kwargs = {key: _coerce(hints[key], value, key=prefix + key, source=source) for key, value in data.items()}
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, *, key: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, source=source, prefix=key + ".")
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, key=key, source=source)
            except ConfigError as exc:
                errors.append(str(exc))
        raise _type_error(key, tp, value, source)
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"{source}: {key}={value!r} is not one of {', '.join(map(repr, args))}{hint}"
            )
        return value
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise _type_error(key, tp, value, source)
        item = args[0] if args else Any
        return [_coerce(item, v, key=f"{key}[{i}]", source=source) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise _type_error(key, tp, value, source)
        return dict(value)
    if tp is Any:
        return value
    if tp is float:
        # YAML reads "1e-3" as a string (no dot in the mantissa): accept any int or numeric string.
        if isinstance(value, bool):
            raise _type_error(key, tp, value, source)
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise _type_error(key, tp, value, source)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _type_error(key, tp, value, source)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _type_error(key, tp, value, source)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _type_error(key, tp, value, source)
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise _type_error(key, tp, value, source)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _type_error(key: str, tp: Any, value: Any, source: str) -> ConfigError:
    return ConfigError(
        f"{source}: {key} must be {_type_name(tp)}, got {value!r} ({type(value).__name__})"
    )


def to_dict(obj: Any) -> Any:
    """A config dataclass as plain YAML-able data."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list | tuple):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj
