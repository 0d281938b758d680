"""Runs a doc block in its folder: ``segrank`` commands in this process through ``segrank.cli.main`` (fast, and the
failure shows the real error), other commands with bash; Python blocks with ``exec``, their tracebacks pointing at
the Markdown file's own line numbers."""

from __future__ import annotations

import contextlib
import glob
import io
import os
import shlex
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

from segrank.cli import build_parser, main

from .markdown import Block

OPERATORS = {"&&", "||", "|", ";", "&", ">", ">>", "<", "(", ")", ";;"}


@dataclass
class Command:
    line: int  # line of the Markdown file where the command starts
    text: str  # as written (continuation lines joined)
    words: list[str]  # shell words, comments dropped; operators are separate words

    @property
    def program(self) -> str:
        return next((w for w in self.words if "=" not in w), "")

    @property
    def in_process(self) -> bool:
        return self.words[0] == "segrank" and not OPERATORS & set(self.words)

    def starts_with(self, prefix: list[str]) -> bool:
        return self.words[:len(prefix)] == prefix


@dataclass
class Outcome:
    ok: bool
    detail: str  # what went wrong, with the output's tail


def shell_commands(block: Block) -> list[Command]:
    """The block's commands: ``\\`` joins lines, ``#`` starts a comment, blank lines separate nothing."""
    commands, pending, start = [], "", None
    for offset, raw in enumerate(block.code.splitlines()):
        start = start if start is not None else block.first_code_line + offset
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        text, pending = (pending + raw).strip(), ""
        lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words = list(lexer)
        if words:
            commands.append(Command(start, " ".join(text.split()), words))
        start = None
    return commands


def expand(words: list[str], cwd: Path, home: Path) -> list[str]:
    """What bash does to the words of a simple command: ``~/`` is $HOME, glob patterns match files (sorted), a
    pattern that matches nothing stays as written."""
    out = []
    for word in words:
        if word == "~" or word.startswith("~/"):
            word = str(home) + word[1:]
        matches = sorted(glob.glob(word, root_dir=cwd)) if glob.has_magic(word) else []
        out += matches or [word]
    return out


def tail(text: str, lines: int = 25) -> str:
    kept = text.rstrip().splitlines()[-lines:]
    return "\n".join("    | " + line for line in kept) if kept else "    | (nothing)"


def run_in_process(argv: list[str]) -> tuple[int | None, str, str, str]:
    """(exit code, stdout, stderr, traceback of an unexpected exception) of ``segrank ARGV``."""
    out, err, trace = io.StringIO(), io.StringIO(), ""
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code: int | None = main(argv)
        except SystemExit as stop:  # argparse: --help exits 0, a usage error 2
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        except Exception:
            code, trace = None, traceback.format_exc()
    return code, out.getvalue(), err.getvalue(), trace


def parse_command(command: Command, cwd: Path, home: Path) -> Outcome:
    """Parse a segrank command line with segrank's own parser, without running it: its flags and choices exist."""
    if not command.in_process:
        return Outcome(False, "parse-only applies to plain segrank commands")
    argv = expand(command.words[1:], cwd, home)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            build_parser().parse_args(argv)
        except SystemExit as stop:
            if stop.code not in (0, None):
                return Outcome(False, f"segrank's parser rejects it (parse-only):\n{tail(err.getvalue())}")
    return Outcome(True, "")


def run_command(command: Command, append: list[str], cwd: Path, home: Path) -> Outcome:
    if command.in_process:
        argv = expand(command.words[1:], cwd, home) + append
        code, out, err, trace = run_in_process(argv)
        if code == 0:
            return Outcome(True, "")
        shown = shlex.join(["segrank", *argv])
        what = f"raised an exception:\n{tail(trace, 40)}" if trace else f"exited {code}"
        return Outcome(False, f"ran in-process as: {shown}\n  {what}\n  stderr:\n{tail(err)}\n  stdout:\n{tail(out)}")
    env = os.environ | {"HOME": str(home), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    text = command.text if not append else f"{command.text} {shlex.join(append)}"
    try:
        proc = subprocess.run(["bash", "-c", text], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return Outcome(False, f"ran with bash: {text}\n  did not finish within 300 s")
    if proc.returncode == 0:
        return Outcome(True, "")
    return Outcome(False, f"ran with bash: {text}\n  exited {proc.returncode}\n  stderr:\n{tail(proc.stderr)}\n"
                          f"  stdout:\n{tail(proc.stdout)}")


def run_python(block: Block, path: Path) -> Outcome:
    """exec the block; blank lines in front make a traceback's line numbers those of the Markdown file."""
    code = "\n" * (block.first_code_line - 1) + block.code
    try:
        exec(compile(code, str(path), "exec"), {"__name__": "__main__"})
    except Exception:
        return Outcome(False, f"raised an exception:\n{tail(traceback.format_exc(), 40)}")
    return Outcome(True, "")
