"""Run one function over many independent items (one image each) in worker processes, with a progress bar: the
engine of ``segrank datasets prepare`` and ``datasets check`` on datasets of 100k images."""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from tqdm import tqdm

T = TypeVar("T")
R = TypeVar("R")


def default_workers() -> int:
    """min(4, the CPUs this process may use): more rarely helps when the disk is the limit."""
    return min(4, len(os.sched_getaffinity(0)))


def ignore_interrupts() -> None:
    """Worker processes leave Ctrl-C to the parent, which stops them all (Pool.terminate)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def run_parallel(work: Callable[[T], R], items: Sequence[T], workers: int, desc: str, progress: bool = True,
                 ordered: bool = False) -> Iterator[R]:
    """``work(item)`` for every item, in ``workers`` processes (1: in this process); yields the results as they
    come (in the order of ``items`` when ``ordered``) while a bar counts them. ``work`` must be picklable: a
    module-level function, or a functools.partial of one. The first exception in any item stops every worker and
    is raised here."""
    with tqdm(total=len(items), desc=desc, disable=not progress, dynamic_ncols=True) as bar:
        if workers <= 1 or len(items) <= 1:
            for item in items:
                yield work(item)
                bar.update()
            return
        # Chunks of several items amortise the inter-process traffic; small enough that the bar moves and that the
        # processes finish together.
        chunk = max(1, min(32, len(items) // (8 * workers)))
        with multiprocessing.get_context().Pool(workers, initializer=ignore_interrupts) as pool:
            results: Iterator[Any] = (pool.imap if ordered else pool.imap_unordered)(work, items, chunksize=chunk)
            for result in results:
                yield result
                bar.update()
