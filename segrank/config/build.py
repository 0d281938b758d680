"""Strict construction of config dataclasses from plain data, and the YAML files and ``--set`` overrides that data
comes from. The config classes themselves are in segrank.config."""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from segrank import files
from segrank.errors import ConfigError


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ConfigError naming the key."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{path or cls.__name__}: expected a mapping, got {type(data).__name__}")
    data = dict(data)
    if hasattr(cls, "expand_keys"):  # keys that stand for others, e.g. a backbone preset
        data = cls.expand_keys(data, path)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in names:
            raise ConfigError(f"{_join(path, key)}: unknown key{_suggest(key, names)}")
    kwargs = {key: _coerce(hints[key], value, _join(path, key)) for key, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{path or cls.__name__}: {err}") from None


def to_dict(obj: Any) -> Any:
    """Plain YAML-safe structure of a config dataclass (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else str(key)


def _suggest(key: str, options: Any) -> str:
    match = difflib.get_close_matches(str(key), [str(o) for o in options], n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(tp: Any, value: Any, path: str) -> Any:
    """``value`` as the annotated type ``tp`` (nested dataclasses built by ``from_dict``), or a ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(typing.get_args(tp), value, path)
    if origin is Literal:
        args = typing.get_args(tp)
        if value not in args:
            raise ConfigError(f"{path}: {value!r} is not one of {list(args)}{_suggest(value, args)}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if origin in _CONTAINERS:
        return _CONTAINERS[origin](typing.get_args(tp), value, path)
    if tp is Any:
        return value
    if tp in _SCALARS:
        accepts, expected, convert = _SCALARS[tp]
        if not accepts(value):
            raise ConfigError(f"{path}: expected {expected}, got {value!r}")
        return convert(value)
    raise ConfigError(f"{path}: unsupported type {_type_name(tp)}")


def _coerce_union(args: tuple[Any, ...], value: Any, path: str) -> Any:
    """The first member type that takes ``value`` (None for an optional's None); else the first member's error."""
    if value is None and type(None) in args:
        return None
    errors = []
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _coerce(arg, value, path)
        except ConfigError as err:
            errors.append(err)
    raise errors[0]


def _coerce_tuple(args: tuple[Any, ...], value: Any, path: str) -> tuple[Any, ...]:
    """A fixed-length tuple (a single value fills every place) or a ``tuple[T, ...]``."""
    variadic = bool(args) and args[-1] is Ellipsis
    if not isinstance(value, (list, tuple)):
        value = [value] * len(args) if args and not variadic else [value]
    if variadic:
        return tuple(_coerce(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
    if len(value) != len(args):
        raise ConfigError(f"{path}: expected {len(args)} values, got {len(value)}")
    return tuple(_coerce(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))


def _coerce_list(args: tuple[Any, ...], value: Any, path: str) -> list[Any]:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
    return [_coerce(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)] if args else list(value)


def _coerce_dict(args: tuple[Any, ...], value: Any, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__} {value!r}")
    return {str(k): _coerce(args[1], v, f"{path}.{k}") for k, v in value.items()} if args else dict(value)


_CONTAINERS = {tuple: _coerce_tuple, list: _coerce_list, dict: _coerce_dict}
# type -> (accepts a value, what the error says was expected, conversion). bool is an int to Python, not here.
_SCALARS = {
    bool: (lambda v: isinstance(v, bool), "true/false", lambda v: v),
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer", lambda v: v),
    float: (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number", float),
    str: (lambda v: isinstance(v, str), "a string", lambda v: v),
}


# --------------------------------------------------------------------------------------------------------------
# YAML files


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a config file, resolving ``_base_`` files relative to it; returns the merged plain dict."""
    return load_with_bases(Path(path), ())


def load_with_bases(path: Path, chain: tuple[tuple[Path, str], ...]) -> dict[str, Any]:
    """``path``'s settings over those of its ``_base_`` files; ``chain``: (resolved path, shown name) of the files
    whose ``_base_`` led here, to name a cycle instead of recursing forever."""
    link = (path.resolve(), os.path.normpath(path))
    check_no_cycle(link, chain)
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder, not a config file")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    data = files.read_yaml(path, ConfigError)
    if data is None or data == {}:
        # An empty file would silently mean "all defaults": a full-size training on synthetic data.
        raise ConfigError(f"{path}: empty config file (no settings)")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    merged: dict[str, Any] = {}
    for base in base_names(data.pop("_base_", []), path):
        base_path = path.parent / base
        if not base_path.exists():
            where = os.path.normpath(base_path)
            raise ConfigError(f"{path}: _base_ {base}: config file not found{f' ({where})' if where != base else ''}")
        merged = merge_dicts(merged, load_with_bases(base_path, (*chain, link)))
    return merge_dicts(merged, data)


def check_no_cycle(link: tuple[Path, str], chain: tuple[tuple[Path, str], ...]) -> None:
    """Refuse a file that its own ``_base_`` chain already reads, naming the cycle."""
    resolved = [file for file, _ in chain]
    if link[0] in resolved:
        names = [name for _, name in chain[resolved.index(link[0]):]]
        raise ConfigError(f"{chain[-1][1]}: _base_ cycle: {' -> '.join([*names, link[1]])}")


def base_names(bases: Any, path: Path) -> list[str]:
    """The file names a ``_base_`` value lists: one name or a list of names (relative to ``path``'s folder)."""
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list):
        raise ConfigError(f"{path}: _base_ must be a file name or a list of file names, got "
                          f"{'null' if bases is None else repr(bases)}")
    for i, base in enumerate(bases):
        if not isinstance(base, str) or not base.strip():
            raise ConfigError(f"{path}: _base_[{i}] must be a file name, got {base!r}")
    return bases


def merge_dicts(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and not value.pop("_delete_", False):
            out[key] = merge_dicts(out[key], value)
        else:
            if isinstance(value, dict):
                value.pop("_delete_", None)
            out[key] = value
    return out


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` strings (value parsed as YAML) to a plain config dict."""
    data = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        dotted, raw = item.split("=", 1)
        try:
            value = files.parse_yaml(raw)
        except files.DuplicateKeyError as err:
            raise ConfigError(f"--set {item}: {err.text}") from None
        except yaml.YAMLError:
            value = raw
        keys = dotted.strip().split(".")
        node = data
        for key in keys[:-1]:
            child = node.get(key)
            node[key] = dict(child) if isinstance(child, dict) else {}
            node = node[key]
        node[keys[-1]] = value
    return data
