"""docs/config.md, rendered from the config dataclasses: every key with its type, default, allowed values and meaning,
all read from the field declarations that the loader enforces. Regenerate with
``python -m segrank.config.docs > docs/config.md`` (tests/test_config_docs.py fails while the file is stale)."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal

from segrank.config import Config
from segrank.config.fields import Section, bound_of, doc_of
from segrank.files import MAX_YAML_BYTES, MAX_YAML_DEPTH

REGENERATE = "python -m segrank.config.docs > docs/config.md"

INTRO = f"""# Configuration reference

<!-- Generated from the declarations in segrank/config/__init__.py by `{REGENERATE}`; edit those, not this. -->

A config is a YAML file with the sections below; `_base_: [a.yaml, b.yaml]` composes files (later files and the file
itself win, mappings merge key by key, `_delete_: true` in a mapping replaces instead of merging), and
`--set key.path=value` (value parsed as YAML) changes one key on the command line. `segrank config show CONFIG
[--set ...]` prints the resolved config, which loads again as it is.

Config files are UTF-8 text, read by a safe YAML loader (plain data only, never a Python object). Numbers follow YAML
1.2, in files and in `--set`: `1e-3`, `1E5`, `-2e+4`, `.5`, `+1.0` are numbers, `012` is twelve, `.inf` and `.nan`
are numbers that the ranges below refuse, and `1_000`, `1:30`, `0b101` are text (YAML 1.1 read those as numbers,
and `1e-3` as text). Every default below loads again as it is printed. A key given twice in one mapping, at any
depth, is refused with both lines (keys merged in with `<<:` may be set again). `_base_` is a file name or a list of
file names, relative to the file; a file that its own `_base_` chain already reads is refused, naming the cycle.

Every key and value is checked when the config is loaded, before a command writes anything: an unknown key, a value
of the wrong type, a number outside the range below (NaN and infinity are never allowed), a pair of the wrong length,
an empty list where values are needed, a broken rule between keys, or an empty config file stops the command with
exit code 2 and one line naming the key, e.g. `segrank train: error: train.batch_size: must be >= 1, got 0`; so
do, naming the file, a missing config or `_base_` file, a folder, a binary or non-UTF-8 file, a file over
{MAX_YAML_BYTES // 2**20} MiB, YAML nested deeper than {MAX_YAML_DEPTH} levels, a duplicate key and a `_base_` cycle.
"""


def type_text(tp: Any) -> str:
    """A field type in words: ``int or null``, ``[int, int]``, ``list of float``, ``one of the names below``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_text(a) for a in args if a is not type(None)) + " or null"
    if origin is Literal:
        return "str"
    if origin is tuple:
        return "[" + ", ".join(type_text(a) for a in args) + "]"
    if origin is list:
        return "list of mappings" if dataclasses.is_dataclass(args[0]) else f"list of {type_text(args[0])}"
    if origin is dict:
        return "mapping" if args[1] is Any else f"mapping of {type_text(args[0])} to {type_text(args[1])}"
    if dataclasses.is_dataclass(tp):
        return "section"
    return tp.__name__


def choices(tp: Any) -> list[Any]:
    """The values a Literal type (possibly inside ``X | None``) allows; empty for other types."""
    if typing.get_origin(tp) is Literal:
        return list(typing.get_args(tp))
    return [c for a in typing.get_args(tp) for c in choices(a)] if typing.get_origin(tp) is not None else []


def value_text(value: Any) -> str:
    """A default as it is written in YAML."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(value_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {value_text(v)}" for k, v in value.items()) + "}"
    return str(value)


def default_of(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def item_section(tp: Any) -> type | None:
    """The dataclass of a list-of-entries field (``list[X]``, possibly inside ``X | None``), else None."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is list:
        return args[0] if dataclasses.is_dataclass(args[0]) else None
    return next((s for s in map(item_section, args) if s is not None), None)


def allowed_text(f: dataclasses.Field, tp: Any) -> str:
    bound = bound_of(f)
    if bound is not None:
        return bound.text()
    names = choices(tp)
    return ", ".join(value_text(c) for c in names) if names else "any"


def section_docs(cls: type, key: str, meaning: str) -> list[str]:
    """The table of section ``cls`` (at ``key``), its rules between keys, then its subsections."""
    hints = typing.get_type_hints(cls)
    rows = ["| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]
    subsections = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.append(f"| `{f.name}` | section | see [{key}.{f.name}](#{key.replace('.', '')}{f.name}) | | "
                        f"{doc_of(f)} |")
            subsections.append((tp, f"{key}.{f.name}", doc_of(f)))
            continue
        rows.append(f"| `{f.name}` | {type_text(tp)} | `{value_text(default_of(f))}` | {allowed_text(f, tp)} | "
                    f"{doc_of(f)} |")
        item = item_section(tp)
        if item is not None:  # a list of entries: one table of an entry's keys
            subsections.append((item, f"{key}.{f.name}[]", f"one entry of {key}.{f.name}"))
    lines = [f"## {key}", "", meaning[0].upper() + meaning[1:] + ".", "", *rows]
    rules = cls.rules if issubclass(cls, Section) else ()
    if rules:
        lines += ["", "Rules between keys:", ""]
        lines += [f"- {' '.join(rule.__doc__.split())}" for rule in rules]
    lines.append("")
    for sub, sub_key, sub_meaning in subsections:
        lines += section_docs(sub, sub_key, sub_meaning)
    return lines


def render_config_docs() -> str:
    """The whole of docs/config.md."""
    lines = [INTRO]
    for f in dataclasses.fields(Config):
        lines += section_docs(typing.get_type_hints(Config)[f.name], f.name, doc_of(f))
    return "\n".join(lines).rstrip("\n") + "\n"


if __name__ == "__main__":
    print(render_config_docs(), end="")
