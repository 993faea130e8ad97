"""Where paintings come from and how they become batches: sources and their schema, labels and splits, decoding,
transforms, the class-balanced draw, streaming, the DataLoaders, and the data of a run (``build_train_data``)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_PUBLIC = {
    "TrainData": "crnn_art.data.build",
    "build_train_data": "crnn_art.data.build",
    "split_dataset": "crnn_art.data.build",
    "decode_image": "crnn_art.data.decoding",
    "IMAGE_EXTENSIONS": "crnn_art.data.schema",
    "SPLITS": "crnn_art.data.schema",
    "Source": "crnn_art.data.schema",
    "make_splits": "crnn_art.data.sources",
    "open_source": "crnn_art.data.sources",
    "read_splits": "crnn_art.data.sources",
    "task_labels": "crnn_art.data.sources",
}
"""Public name -> the module that holds it; imported on first use, so that importing one module of the package
does not import the others."""

__all__ = [
    "IMAGE_EXTENSIONS", "SPLITS", "Source", "TrainData", "build_train_data", "decode_image", "make_splits",
    "open_source", "read_splits", "split_dataset", "task_labels"
]

if TYPE_CHECKING:
    from crnn_art.data.build import TrainData, build_train_data, split_dataset
    from crnn_art.data.decoding import decode_image
    from crnn_art.data.schema import IMAGE_EXTENSIONS, SPLITS, Source
    from crnn_art.data.sources import make_splits, open_source, read_splits, task_labels


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
