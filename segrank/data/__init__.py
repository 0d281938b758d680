"""Datasets, label conventions and the reference (mmseg 0.x) pipelines; the ``segrank datasets`` commands call
``check`` and ``convert``.

``dataset_info(name, options, root)`` describes a dataset; ``build_dataset(cfg, split, train)`` loads it. Labels are
int64 with one ignore value per dataset (``info.ignore_index``: 255, or -1 above 255 classes). Train items are
reproducible: ``dataset[(index, seed)]`` (see ``segrank.data.datasets``).
"""

from segrank.data.datasets import SegDataset, build_dataset
from segrank.data.info import DATASETS, DatasetInfo, dataset_info, ignore_for

__all__ = ["DATASETS", "DatasetInfo", "SegDataset", "build_dataset", "dataset_info", "ignore_for"]
