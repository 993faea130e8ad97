"""Training: the loop (``train``), one optimizer step (``TrainStep``) and the loss with MixUp/CutMix."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_PUBLIC = {
    "train": "crnn_art.training.loop",
    "StepResult": "crnn_art.training.step",
    "TrainStep": "crnn_art.training.step",
}
"""Public name -> the module that holds it; imported on first use, so that importing one module of the package
does not import the others."""

__all__ = [
    "StepResult", "TrainStep", "train"
]

if TYPE_CHECKING:
    from crnn_art.training.loop import train
    from crnn_art.training.step import StepResult, TrainStep


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
