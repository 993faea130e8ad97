"""`crnn-art export`: ONNX (run by onnxruntime), TorchScript and torch.export programs give PyTorch's logits and
embedding to 1e-4, with the preprocessing written beside them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from crnn_art.errors import ConfigError
from crnn_art.export import export_model
from crnn_art.model import CRNNArtClassifier


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("export") / "best"
    model = CRNNArtClassifier(heads={"style": 4, "genre": 3}, backbone_weights=None, image_size=64, gru_hidden=32)
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "exported-program"])
def test_the_exported_model_gives_pytorchs_outputs(model_folder, tmp_path, fmt):
    path = export_model(str(model_folder), fmt, str(tmp_path), dynamic_batch=True)
    info = json.loads((tmp_path / "preprocessing.json").read_text())
    assert sorted(info["outputs"]) == ["embedding", "genre_logits", "style_logits"] and info["image_size"] == 64
    assert info["outputs"][-1] == "embedding"
    assert info["mean"] == [0.485, 0.456, 0.406] and info["resize_short_side"] == 69
    model = CRNNArtClassifier.from_pretrained(str(model_folder)).eval()
    for batch in (4, 3):  # --dynamic-batch: other batch sizes than the example's
        images = torch.randn(batch, 3, 64, 64)
        with torch.no_grad():
            out = model(images)
        expected = [out.logits[name.removesuffix("_logits")] for name in info["outputs"][:-1]] + [out.embedding]
        if fmt == "onnx":
            import onnxruntime

            session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            got = [torch.from_numpy(np.asarray(a)) for a in session.run(None, {"images": images.numpy()})]
        elif fmt == "torchscript":
            got = torch.jit.load(str(path))(images)
        else:
            got = torch.export.load(str(path)).module()(images)
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)


def test_an_unknown_format_is_one_line(model_folder, tmp_path):
    with pytest.raises(ConfigError, match="--format 'tflite' is not an export format; choose one of onnx"):
        export_model(str(model_folder), "tflite", str(tmp_path))
