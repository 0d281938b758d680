"""YAML read as UTF-8 text by one loader (``YamlLoader``: safe, YAML 1.2 numbers, duplicate keys refused) and written
by the matching dumper, so what segrank writes loads again to the same values."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from segrank.errors import SegrankError

INT_TAG, FLOAT_TAG, MERGE_TAG = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float", "tag:yaml.org,2002:merge"
# YAML 1.2 core schema numbers. PyYAML implements YAML 1.1, whose floats need a dot (1e-3 would be the string '1e-3')
# and whose integers read 1_000 as 1000, 012 as octal 10 and 1:30 as 90; in YAML 1.2, 1_000 and 1:30 are text and 012
# is twelve.
YAML12_INT = re.compile(r"(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)\Z")
YAML12_FLOAT = re.compile(r"(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
                          r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))\Z")
MAX_YAML_DEPTH = 64  # nesting levels: deeper is no config, and would exhaust the recursion of every reader
MAX_YAML_BYTES = 16 * 2**20  # larger is no config: a checkpoint or a data file given in its place


def yaml12_resolvers(base: type) -> dict[str, list[tuple[str, re.Pattern[str]]]]:
    """``base``'s implicit resolvers (how a plain scalar's type is told) with YAML 1.2's integers and floats in place
    of YAML 1.1's, integers first (every integer also matches the float pattern)."""
    table = {first: [(tag, regexp) for tag, regexp in resolvers if tag not in (INT_TAG, FLOAT_TAG)]
             for first, resolvers in base.yaml_implicit_resolvers.items()}
    for tag, regexp, firsts in ((INT_TAG, YAML12_INT, "-+0123456789"), (FLOAT_TAG, YAML12_FLOAT, "-+.0123456789")):
        for first in firsts:
            table.setdefault(first, []).append((tag, regexp))
    return table


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping that names one key twice (YAML requires unique keys; PyYAML would keep the last silently)."""

    def __init__(self, key: Any, line: int, first_line: int) -> None:
        super().__init__(problem=f"duplicate key {key!r}")
        self.text = f"duplicate key {key!r} at line {line}, first at line {first_line}"


class YamlLoader(yaml.SafeLoader):
    """``yaml.safe_load``'s loader (plain data only, never a Python object) with YAML 1.2's numbers, duplicate keys
    refused and nesting limited. A subclass: yaml's own loaders stay as they are."""

    yaml_implicit_resolvers = yaml12_resolvers(yaml.SafeLoader)
    depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self.depth += 1
        try:
            if self.depth > MAX_YAML_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_YAML_DEPTH} levels",
                                                  self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            first_lines: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == MERGE_TAG:  # "<<: *defaults" merges keys the mapping may then override
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    if key in first_lines:
                        raise DuplicateKeyError(key, line, first_lines[key])
                    first_lines[key] = line
                except TypeError:  # an unhashable key: construct_mapping refuses it
                    continue
        return super().construct_mapping(node, deep=deep)

    def construct_yaml12_int(self, node: Any) -> int:
        text = self.construct_scalar(node)
        if not YAML12_INT.match(text):  # an explicit !!int tag on another text
            raise yaml.constructor.ConstructorError(None, None, f"{text!r} is not an integer", node.start_mark)
        return int(text[2:], {"0o": 8, "0x": 16}[text[:2]]) if text[:2] in ("0o", "0x") else int(text)


YamlLoader.add_constructor(INT_TAG, YamlLoader.construct_yaml12_int)


class YamlDumper(yaml.SafeDumper):
    """``yaml.safe_dump``'s dumper that quotes what YamlLoader would not read back as written (e.g. the string
    '1e-3', which YAML 1.2 reads as a number)."""

    yaml_implicit_resolvers = yaml12_resolvers(yaml.SafeDumper)


def parse_yaml(text: str, loader: type[YamlLoader] = YamlLoader) -> Any:
    """The data of a YAML text; raises ``yaml.YAMLError`` (``yaml_problem`` says it in words) when it is not YAML."""
    try:
        return yaml.load(text, Loader=loader)  # noqa: S506 - a SafeLoader subclass
    except (ValueError, KeyError, AttributeError, TypeError, OverflowError) as err:
        # yaml's constructors fail so on an explicit tag they cannot read, e.g. "!!float abc", "!!bool maybe"
        raise yaml.YAMLError(f"a value its tag cannot hold ({type(err).__name__}: {err})") from None


def yaml_problem(err: yaml.YAMLError) -> str:
    """One line saying what is wrong with a YAML text, and where."""
    if isinstance(err, DuplicateKeyError):
        return err.text
    problem = getattr(err, "problem", None) or (str(err).strip().splitlines() or [type(err).__name__])[0]
    mark = getattr(err, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


def dump_yaml(value: Any) -> str:
    """YAML text of plain data (keys in their order) that ``parse_yaml`` reads back to the same values."""
    return yaml.dump(value, Dumper=YamlDumper, sort_keys=False)


def read_text(path: Path, error: type[SegrankError] = SegrankError, limit: int = MAX_YAML_BYTES) -> str:
    """A UTF-8 text file of at most ``limit`` bytes; ``error`` naming the file when it is missing, a folder,
    unreadable, larger, binary or in another encoding."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if path.is_dir():
            raise error(f"{path}: is a folder, not a file")
        if size > limit:
            raise error(f"{path}: {size / 2**20:.1f} MiB, too large for a text file of settings (at most "
                        f"{limit // 2**20} MiB; a checkpoint or data file given in its place?)")
        data = path.read_bytes()
    except FileNotFoundError:
        raise error(f"{path}: file not found") from None
    except OSError as err:
        raise error(f"{path}: cannot read ({err.strerror})") from None
    if b"\x00" in data:
        raise error(f"{path}: a binary file, not text (it holds NUL bytes)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise error(f"{path}: not UTF-8 text (byte 0x{data[err.start]:02x} at line {line}); save it as UTF-8"
                    ) from None


def read_yaml(path: Path, error: type[SegrankError] = SegrankError, loader: type[YamlLoader] = YamlLoader) -> Any:
    """The data of a YAML file (``parse_yaml``), ``error`` naming the file when it is no UTF-8 YAML text."""
    text = read_text(path, error)
    try:
        return parse_yaml(text, loader)
    except yaml.YAMLError as err:
        raise error(f"{path}: not valid YAML ({yaml_problem(err)})") from None
