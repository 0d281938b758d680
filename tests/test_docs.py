"""Every shell command and Python snippet of README.md and docs/*.md runs, or its block says why it cannot run
offline; so a doc that drifts from the code fails here.

Each runnable block runs in a fresh folder holding the model-zoo configs at test size and the files its
``<!-- doc-test: setup: ... -->`` markers name (tests/docs/setups.py); the marker convention is in
docs/architecture.md ("Examples in the docs are tested") and tests/docs/markdown.py. A failure names the file and
line of the block and of the command, what was run and its output.

``python -m tests.test_docs`` lists every block: run, skipped (with the reason) or invalid.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml

from tests.docs.markdown import Block, parse_blocks
from tests.docs.runner import parse_command, run_command, run_python, shell_commands
from tests.docs.setups import SETUPS, Cache

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
BLOCKS = [block for doc in DOCS for block in parse_blocks(doc, REPO, set(SETUPS))]
RUNNABLE = [b for b in BLOCKS if b.kind in ("shell", "python") and b.skip is None and not b.problems]


def marker_problems(block: Block) -> list[str]:
    """Markers that no longer match their block (a stale marker would hide a command from the test)."""
    scoped = [("append", p) for p, _ in block.append] + [("parse-only", p) for p, _ in block.parse_only] + \
        [("skip-command", p) for p, _ in block.skip_commands]
    if block.kind != "shell":
        return ["append, parse-only and skip-command only apply to console blocks"] if scoped else []
    commands = shell_commands(block)
    problems = [f"{verb} {' '.join(prefix)}: no command of the block starts with {' '.join(prefix)!r}"
                for verb, prefix in scoped if not any(c.starts_with(prefix) for c in commands)]
    if not commands:
        problems.append("console block without a command")
    return problems


def test_every_block_runs_or_says_why():
    """No indented or untagged block, no unknown directive, no skip without a reason, no stale marker."""
    assert len(BLOCKS) > 20 and len(RUNNABLE) > 10, f"found only {len(BLOCKS)} blocks in {len(DOCS)} files"
    problems = [f"{b.where}: {p}" for b in BLOCKS for p in [*b.problems, *marker_problems(b)]]
    if problems:
        pytest.fail("doc blocks the test cannot classify:\n" + "\n".join(problems), pytrace=False)


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.lang in ("yaml", "json")], ids=lambda b: b.where)
def test_data_blocks_parse(block):
    try:
        yaml.safe_load(block.code) if block.lang == "yaml" else json.loads(block.code)
    except (yaml.YAMLError, ValueError) as err:
        pytest.fail(f"{block.where}: ```{block.lang} block does not parse: {err}", pytrace=False)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Cache:
    return Cache(tmp_path_factory.mktemp("doc_files"))


@pytest.fixture
def block_dirs(tmp_path, monkeypatch, cache) -> tuple[Path, Path]:
    """(working folder with configs/, HOME), the working folder as cwd; one compute thread on a shared machine."""
    cwd, home = tmp_path / "work", tmp_path / "home"
    cwd.mkdir()
    home.mkdir()
    (cwd / "configs").symlink_to(cache.configs(), target_is_directory=True)
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("HOME", str(home))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield cwd, home
    torch.set_num_threads(threads)


@pytest.mark.parametrize("block", RUNNABLE, ids=lambda b: f"{b.where}-{b.lang}")
def test_doc_block_runs(block, block_dirs, cache):
    cwd, home = block_dirs
    for name in block.setups:
        SETUPS[name](cache, cwd, home)
    context = f"{block.where}: ```{block.lang} block" + (f" (setup: {', '.join(block.setups)})" if block.setups
                                                         else "")
    if block.kind == "python":
        outcome = run_python(block, REPO / block.file)
        if not outcome.ok:
            pytest.fail(f"{context} {outcome.detail}", pytrace=False)
        return
    for command in shell_commands(block):
        if any(command.starts_with(prefix) for prefix, _ in block.skip_commands):
            continue
        if any(command.starts_with(prefix) for prefix, _ in block.parse_only):
            outcome = parse_command(command, cwd, home)
        else:
            append = [word for prefix, args in block.append if command.starts_with(prefix) for word in args]
            outcome = run_command(command, append, cwd, home)
        if not outcome.ok:
            pytest.fail(f"{context}, command at {block.file}:{command.line}:\n  {command.text}\n  {outcome.detail}",
                        pytrace=False)


def inventory() -> str:
    lines, counts = [], Counter()
    for b in BLOCKS:
        if b.problems or b.kind == "unknown":
            state = "INVALID: " + "; ".join(b.problems)
        elif b.kind == "data":
            state = f"not run ({b.lang})"
        elif b.skip is not None:
            state = f"skipped: {b.skip}"
        else:
            state = f"runs ({b.lang}" + (f", setup: {', '.join(b.setups)}" if b.setups else "") + ")"
            notes = [f"{' '.join(p)} skipped: {r}" for p, r in b.skip_commands] + \
                [f"{' '.join(p)} parsed only: {r}" for p, r in b.parse_only] + \
                [f"{' '.join(p)} + {' '.join(a)}" for p, a in b.append]
            state += "".join(f"; {n}" for n in notes)
            counts[b.file] += 1
        lines.append(f"{b.where:28s} {state}")
    lines.append("runnable blocks per file: " + ", ".join(f"{f} {n}" for f, n in counts.items()))
    return "\n".join(lines)


if __name__ == "__main__":
    print(inventory())
