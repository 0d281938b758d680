"""Parity test hooks: mark every test here ``parity`` and print the max |diff| per fixture at the end."""

from __future__ import annotations

from pathlib import Path

import pytest

from .common import MAX_DIFF


def pytest_collection_modifyitems(items):
    for item in items:
        if Path(item.fspath).parent == Path(__file__).parent:
            item.add_marker(pytest.mark.parity)


def pytest_terminal_summary(terminalreporter):
    if MAX_DIFF:
        terminalreporter.section("parity: max |diff| per fixture")
        for name in sorted(MAX_DIFF):
            terminalreporter.write_line(f"{name:60s} {MAX_DIFF[name]:.3e}")
