"""What every source becomes: the columns of ``huggan/wikiart`` (``image``, ``artist``, ``genre``, ``style``,
the last three ``ClassLabel``), the ``Source`` a reader returns, and the names shared by the readers, the
streaming path and the commands. Imports nothing else of crnn-art's data code, so every reader can use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from crnn_art.errors import DataError

UNKNOWN_NAMES = frozenset({"Unknown Artist", "Unknown Genre", "Unknown Style"})
SPLITS = ("train", "validation", "test")


@dataclass
class Source:
    """A source opened for a run: the rows, and the splits the source itself defines (if any)."""

    dataset: Any  # datasets.Dataset with columns image, artist, genre, style
    splits: dict[str, np.ndarray] | None = None
    """Row ids per split when the source has its own (ArtGAN lists, train/ validation/ test/ folders)."""
    note: str = ""
    """Something the user should know (e.g. listed files that are missing), printed at start."""
    stream: Any = None
    """With ``data.streaming``: the ``streaming.StreamSource`` the images come from; ``dataset`` then
    holds only the label columns (read up front, one row per row id)."""


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")


def check_schema(ds, source: str) -> None:
    from datasets import ClassLabel

    needed = ("image", "artist", "genre", "style")
    missing = [c for c in needed if c not in ds.column_names]
    if missing:
        raise DataError(
            f"data.source {source!r} lacks column(s) {missing} (has {ds.column_names}); "
            "crnn-art expects the huggan/wikiart schema: image, artist, genre, style"
        )
    for column in needed[1:]:
        if not isinstance(ds.features[column], ClassLabel):
            raise DataError(
                f"column {column!r} of {source!r} is {ds.features[column]}, not a ClassLabel; "
                "cast it with dataset.cast_column(column, ClassLabel(names=[...]))"
            )
