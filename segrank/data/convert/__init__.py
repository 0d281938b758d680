"""``segrank datasets prepare NAME SRC DST``: official releases -> the layouts of ``segrank.data.info``.

A converter plans one task per image (reading the release's index and lists, and refusing bad input before any
output exists), then the tasks run in worker processes with a progress bar. Each task writes only the outputs that
do not exist yet, every file to a temporary name in its folder before renaming it: a run that was killed leaves no
half-written file, and running the same command again skips what is finished (the temporaries of killed writes are
deleted first). Reading ``.mat`` files needs scipy (``pip install 'segrank[convert]'``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from segrank import files
from segrank.data.convert.ade20k_full import plan_ade20k_full
from segrank.data.convert.coco_lvis import plan_coco_lvis
from segrank.data.convert.coco_stuff import plan_coco_stuff10k
from segrank.data.convert.common import Job
from segrank.data.convert.pascal_context import plan_pascal_context
from segrank.data.parallel import run_parallel

# Each plans the conversion of one release; its docstring is the help of ``segrank datasets prepare NAME``.
CONVERTERS: dict[str, Callable[..., Job]] = {
    "coco_stuff10k": plan_coco_stuff10k,
    "pascal_context60": plan_pascal_context,
    "pascal_context59": plan_pascal_context,
    "ade20k_full": plan_ade20k_full,
    "coco_lvis": plan_coco_lvis,
}


@dataclass
class Prepared:
    images: int  # in the release's lists
    converted: int  # written by this run (the others were finished before)
    seconds: float  # converting, after the plan

    @property
    def images_per_s(self) -> float:
        return self.converted / self.seconds if self.seconds > 0 else 0.0


def prepare(name: str, src: Path, dst: Path, workers: int = 1, progress: bool = True, **options: object) -> Prepared:
    """Convert release ``name`` from ``src`` into ``dst`` with ``workers`` processes (``options``: the converter's
    keyword arguments, e.g. ``categories`` for ade20k_full)."""
    job = CONVERTERS[name](Path(src), Path(dst), **options)
    if Path(dst).is_dir():
        files.remove_temps(Path(dst))
    start = time.perf_counter()
    converted = sum(run_parallel(job.work, job.tasks, workers, job.desc, progress))
    job.finish()
    return Prepared(len(job.tasks), converted, time.perf_counter() - start)
