"""``crnn-art export``: a trained model as ONNX, TorchScript or a ``torch.export`` program, for serving without
crnn-art, with its preprocessing written beside it.

The exported model takes ``images``: ``(B, 3, S, S)`` float32, RGB, already preprocessed (resize the short
side to ``resize_short_side``, centre-crop ``S``, scale to [0, 1], normalise with ``mean``/``std``: all in
``preprocessing.json``), and returns one logits tensor per head, ``(B, classes)``, in the order of
``outputs`` in that file, then the embedding ``(B, D)``. The row and column GRUs export as ONNX ``GRU``
operators (opset 17).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from crnn_art.errors import ConfigError, ModelLoadError, first_line

FORMATS = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt", "exported-program": "model.pt2"}
"""Format -> the file it writes."""
OPSET = 17


class ExportedCRNN(nn.Module):
    """The model with plain tensor outputs: each head's logits in ``heads`` order, then the embedding."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.heads = list(model.heads_spec)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(images)
        return (*[out.logits[h] for h in self.heads], out.embedding)


def preprocessing(model) -> dict[str, Any]:
    """What a server must do to an image before the exported model, and what comes out of it."""
    size = model.image_size
    return {"image_size": size, "resize_short_side": round(size * 416 / 384), "crop": "centre", "scale": 1 / 255,
            "mean": list(model.mean), "std": list(model.std), "input": "images (B, 3, S, S) float32 RGB",
            "outputs": [*[f"{h}_logits" for h in model.heads_spec], "embedding"],
            "class_names": model.class_names, "backbone": model.arch.get("backbone", "resnet50"),
            "embedding_dim": model.embedding_dim}


def export_model(checkpoint: str, fmt: str, output_dir: str | None = None, dynamic_batch: bool = False) -> Path:
    """Export a run's (or model folder's) model; returns the file written. ``ConfigError`` for an unknown format,
    ``ModelLoadError`` for a checkpoint that does not load or a model the format cannot express."""
    from crnn_art.checkpoints import load_model_folder, resolve_model_folder

    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r} is not an export format; choose one of {', '.join(FORMATS)}")
    folder = resolve_model_folder(checkpoint).path
    model = load_model_folder(folder).float().eval()
    out = Path(output_dir) if output_dir else folder.parent / f"export_{folder.name}"
    out.mkdir(parents=True, exist_ok=True)
    wrapped = ExportedCRNN(model).eval()
    example = torch.zeros(2, 3, model.image_size, model.image_size)
    path = out / FORMATS[fmt]
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer notes on shape arithmetic: the outputs are checked below
            _write(wrapped, example, fmt, path, dynamic_batch)
    except Exception as exc:  # noqa: BLE001 - any exporter failure is one line naming the format
        raise ModelLoadError(f"exporting {folder} as {fmt} failed ({type(exc).__name__}: {first_line(exc)[:160]}); "
                             "try another --format") from exc
    (out / "preprocessing.json").write_text(json.dumps({**preprocessing(model), "format": fmt, "file": path.name,
                                                        "dynamic_batch": dynamic_batch}, indent=2))
    return path


def _write(wrapped: ExportedCRNN, example: torch.Tensor, fmt: str, path: Path, dynamic_batch: bool) -> None:
    outputs = [*[f"{h}_logits" for h in wrapped.heads], "embedding"]
    if fmt == "onnx":
        axes = {name: {0: "batch"} for name in ["images", *outputs]} if dynamic_batch else None
        torch.onnx.export(wrapped, (example,), str(path), input_names=["images"], output_names=outputs,
                          dynamic_axes=axes, opset_version=OPSET, dynamo=False)
    elif fmt == "torchscript":
        torch.jit.save(torch.jit.trace(wrapped, (example,)), str(path))
    else:
        shapes = {"images": {0: torch.export.Dim("batch", min=1, max=4096)}} if dynamic_batch else None
        torch.export.save(torch.export.export(wrapped, (example,), dynamic_shapes=shapes), str(path))
