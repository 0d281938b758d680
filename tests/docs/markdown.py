"""Code blocks of the Markdown docs and their ``doc-test`` markers (the convention is in docs/architecture.md,
"Examples in the docs are tested").

A block is a fenced code block with a language: ``console`` (shell commands, run), ``python`` (run), or ``text`` /
``yaml`` / ``json`` (not run; yaml and json must parse). Directly above a block, one HTML comment per directive;
PREFIX is the first words of the commands a directive applies to (default: ``segrank``, every segrank command):

    <!-- doc-test: skip: REASON -->                    the block is not run, for the reason given
    <!-- doc-test: setup: NAME, NAME -->               files created in the block's folder first (tests/docs/setups.py)
    <!-- doc-test: append [PREFIX]: ARGS -->           ARGS appended to those commands (smaller sizes: last flag wins)
    <!-- doc-test: parse-only [PREFIX]: REASON -->     those segrank commands are only parsed (flags and choices)
    <!-- doc-test: skip-command PREFIX: REASON -->     those commands are not run, for the reason given

Anything else is a problem the test reports with its file and line: an indented code block, a fence without a
language or with an unknown one, an unknown directive or setup, a skip without a reason, a marker that is not
directly above a fenced block.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

RUN_LANGUAGES = {"console": "shell", "sh": "shell", "bash": "shell", "shell": "shell", "python": "python"}
DATA_LANGUAGES = {"text", "yaml", "json"}
FENCE = re.compile(r"^( {0,3})(`{3,}|~{3,})\s*([^\s`]*)[^`]*$")
MARKER = re.compile(r"^\s*<!--\s*doc-test:\s*(.*?)\s*-->\s*$")
LIST_ITEM = re.compile(r"^\s*([-*+]|\d+[.)])\s")


@dataclass
class Block:
    file: str  # path relative to the repository root
    line: int  # 1-based line of the opening fence (or of the problem)
    lang: str = ""
    code: str = ""
    skip: str | None = None  # reason the whole block is not run
    setups: list[str] = field(default_factory=list)
    append: list[tuple[list[str], list[str]]] = field(default_factory=list)  # (prefix, arguments)
    parse_only: list[tuple[list[str], str]] = field(default_factory=list)  # (prefix, reason)
    skip_commands: list[tuple[list[str], str]] = field(default_factory=list)  # (prefix, reason)
    problems: list[str] = field(default_factory=list)

    @property
    def kind(self) -> str:
        return RUN_LANGUAGES.get(self.lang, "data" if self.lang in DATA_LANGUAGES else "unknown")

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"

    @property
    def first_code_line(self) -> int:
        return self.line + 1


def apply_marker(block: Block, text: str, line: int, known_setups: set[str]) -> None:
    """Record one ``doc-test`` directive on ``block`` (or a problem naming the marker's line)."""
    head, _, rest = text.partition(":")
    verb, _, prefix_text = head.strip().partition(" ")
    prefix, rest = shlex.split(prefix_text) or ["segrank"], rest.strip()
    if prefix_text and verb in ("skip", "setup"):
        block.problems.append(f"line {line}: '{verb}' takes no command prefix")
    if verb == "skip":
        if not rest:
            block.problems.append(f"line {line}: 'doc-test: skip:' needs a reason")
        block.skip = rest or "?"
    elif verb == "setup":
        names = [n.strip() for n in rest.split(",") if n.strip()]
        unknown = [n for n in names if n not in known_setups]
        if unknown or not names:
            block.problems.append(f"line {line}: unknown setup {', '.join(unknown) or '(none given)'}; known: "
                                  f"{', '.join(sorted(known_setups))}")
        block.setups += names
    elif verb in ("append", "parse-only", "skip-command"):
        if not rest:
            needs = "arguments" if verb == "append" else "a reason"
            block.problems.append(f"line {line}: '{head.strip()}:' needs {needs}")
        if verb == "skip-command" and not prefix_text:
            block.problems.append(f"line {line}: 'skip-command' needs the command's first words")
        if verb == "append":
            block.append.append((prefix, shlex.split(rest)))
        else:
            (block.parse_only if verb == "parse-only" else block.skip_commands).append((prefix, rest or "?"))
    else:
        block.problems.append(f"line {line}: unknown doc-test directive {text!r} (skip: REASON | setup: NAMES | "
                              "append [PREFIX]: ARGS | parse-only [PREFIX]: REASON | skip-command PREFIX: REASON)")


def fenced_block(lines: list[str], i: int, fence: re.Match[str], name: str) -> tuple[Block, int]:
    """The block whose opening fence is line ``i``, and the index of its closing fence."""
    indent, marks, lang = len(fence.group(1)), fence.group(2), fence.group(3).lower()
    end = i + 1
    closing = re.compile(rf" {{0,3}}{re.escape(marks[0])}{{{len(marks)},}}\s*")
    while end < len(lines) and not closing.fullmatch(lines[end]):
        end += 1
    code = "".join(re.sub(f"^ {{0,{indent}}}", "", ln) + "\n" for ln in lines[i + 1:end])
    block = Block(name, i + 1, lang, code)
    if end == len(lines):
        block.problems.append("code fence never closed")
    if block.kind == "unknown":
        block.problems.append(f"fenced block with language {lang or '(none)'!r}: tag commands ```console, "
                              "code ```python (both run), anything else ```text, ```yaml or ```json")
    return block, end


def indented_block(lines: list[str], start: int, name: str) -> tuple[Block, int]:
    """An indented code block starting at line ``start`` (refused: blocks are fenced), and the index after it."""
    i = start
    while i < len(lines) and (lines[i].startswith("    ") or not lines[i].strip()):
        i += 1
    return Block(name, start + 1, code="\n".join(ln[4:] for ln in lines[start:i]),
                 problems=["indented code block: fence it as ```console (commands, run), ```python (run) or "
                           "```text (not run)"]), i


def parse_blocks(path: Path, root: Path, known_setups: set[str]) -> list[Block]:
    """Every code block of one Markdown file, with its markers; problems are recorded on the blocks."""
    name = path.relative_to(root).as_posix()
    lines = path.read_text().splitlines()
    blocks: list[Block] = []
    markers: list[tuple[int, str]] = []
    in_list, previous_blank, i = False, True, 0
    while i < len(lines):
        line, number = lines[i], i + 1
        fence = FENCE.match(line)
        if fence:
            block, end = fenced_block(lines, i, fence, name)
            for marker_line, text in markers:
                apply_marker(block, text, marker_line, known_setups)
            if markers and block.kind == "data":
                block.problems.append("doc-test markers only apply to console and python blocks")
            blocks.append(block)
            markers, previous_blank, i = [], False, end + 1
            continue
        marker = MARKER.match(line)
        if marker:
            markers.append((number, marker.group(1)))
            i += 1
            continue
        if line.lstrip().startswith("<!--") and "doc-test" in line:
            blocks.append(Block(name, number, problems=[f"malformed marker {line.strip()!r}: expected "
                                                        "<!-- doc-test: DIRECTIVE --> on one line"]))
        if markers:
            blocks.append(Block(name, markers[0][0], problems=["doc-test marker not directly above a fenced block"]))
            markers = []
        if previous_blank and not in_list and line.startswith("    ") and line.strip():
            block, i = indented_block(lines, i, name)
            blocks.append(block)
            previous_blank = not lines[i - 1].strip()
            continue
        if LIST_ITEM.match(line):
            in_list = True
        elif line.strip() and not line[0].isspace():
            in_list = False
        previous_blank = not line.strip()
        i += 1
    if markers:
        blocks.append(Block(name, markers[0][0], problems=["doc-test marker not directly above a fenced block"]))
    return blocks
