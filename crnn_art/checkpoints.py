"""Model folders of a run (``best/``, ``last/``): written whole or not at all.

Each folder is what ``CRNNArtClassifier.save_pretrained`` writes (``config.json`` with the
architecture, heads and class names, ``model.safetensors``), plus ``training.json`` saying
which epoch and step it is and its validation metrics. A folder is written under a temporary
name and renamed, so a crash mid-save leaves the previous one intact.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from crnn_art.model import WEIGHTS_NAME, CRNNArtClassifier, ModelLoadError


def save_model_folder(model: CRNNArtClassifier, folder: str | Path, info: dict[str, Any]) -> Path:
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    (tmp / "training.json").write_text(json.dumps(info, indent=2))
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def load_model_folder(folder: str | Path, map_location: str = "cpu") -> CRNNArtClassifier:
    """Load a ``best/`` or ``last/`` folder (or a run folder, meaning its ``best/``)."""
    folder = Path(folder)
    if (folder / "best").is_dir() and not (folder / WEIGHTS_NAME).exists():
        folder = folder / "best"
    if not (folder / "config.json").is_file():
        raise ModelLoadError(
            f"{folder} has no config.json; pass a run's best/ or last/ folder (or the run folder itself)"
        )
    try:
        json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{folder / 'config.json'} is damaged ({exc}); use another checkpoint") from exc
    return CRNNArtClassifier.from_pretrained(str(folder), map_location=map_location)
