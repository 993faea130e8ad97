"""crnn-art: a convolutional-recurrent classifier of paintings (style, genre, artist) on WikiArt.

The public names are imported on first use (PEP 562), so that ``import crnn_art`` and the command
line's ``--help``, ``--version`` and config errors answer without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["CRNNArtClassifier", "CRNNOutput", "ModelLoadError", "predict", "__version__"]

_PUBLIC = {"CRNNArtClassifier": "crnn_art.model", "CRNNOutput": "crnn_art.model", "ModelLoadError": "crnn_art.errors",
           "predict": "crnn_art.inference"}

if TYPE_CHECKING:
    from crnn_art.errors import ModelLoadError
    from crnn_art.inference import predict
    from crnn_art.model import CRNNArtClassifier, CRNNOutput


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'crnn_art' has no attribute {name!r}")
