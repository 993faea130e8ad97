"""The CRNN matches docs/model-and-recipe.md: shapes, parameter count, attention, saving and loading."""

from __future__ import annotations

import pytest
import torch
from torchvision.models import resnet50

from crnn_art import CRNNArtClassifier, ModelLoadError
from crnn_art.checkpoints import load_model_folder, save_model_folder


@pytest.fixture(scope="module")
def style_model() -> CRNNArtClassifier:
    torch.manual_seed(0)
    return CRNNArtClassifier(heads={"style": 27}).eval()


def test_parameter_count_matches_spec(style_model):
    total = sum(p.numel() for p in style_model.parameters())
    trunk = sum(p.numel() for p in style_model.backbone_parameters())
    new = sum(p.numel() for p in style_model.new_parameters())
    assert (total, trunk, new) == (28_389_085, 23_508_032, 4_881_053)


@pytest.mark.parametrize(("h", "w", "map_h", "map_w"), [(64, 64, 2, 2), (224, 224, 7, 7), (384, 384, 12, 12),
                                                        (96, 160, 3, 5), (32, 32, 1, 1)])
def test_output_shapes(style_model, h, w, map_h, map_w):
    with torch.no_grad():
        out = style_model(torch.randn(2, 3, h, w))
    assert out.logits["style"].shape == (2, 27)
    assert out.embedding.shape == (2, 3072)
    assert out.row_attention.shape == (2, map_h)
    assert out.col_attention.shape == (2, map_w)
    torch.testing.assert_close(out.row_attention.sum(1), torch.ones(2))
    torch.testing.assert_close(out.col_attention.sum(1), torch.ones(2))
    assert (out.row_attention >= 0).all() and (out.col_attention >= 0).all()


def test_rows_and_columns_are_read_along_their_own_axis(style_model):
    """Non-square map: the row branch attends over h rows, the column branch over w columns."""
    with torch.no_grad():
        out = style_model(torch.randn(1, 3, 64, 192))
    assert out.row_attention.shape == (1, 2) and out.col_attention.shape == (1, 6)


def test_combined_heads():
    model = CRNNArtClassifier(heads={"style": 27, "genre": 10, "artist": 23}).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert {k: v.shape[1] for k, v in out.logits.items()} == {"style": 27, "genre": 10, "artist": 23}


def test_embedding_is_taken_before_dropout():
    torch.manual_seed(0)
    model = CRNNArtClassifier(heads={"style": 3}, dropout=0.9).train()
    x = torch.randn(2, 3, 64, 64)
    torch.manual_seed(1)
    a = model(x)
    torch.manual_seed(2)
    b = model(x)
    # the GRUs' inter-layer dropout also differs between the two calls, so compare the global part
    torch.testing.assert_close(a.embedding[:, :2048], b.embedding[:, :2048])
    assert not torch.allclose(a.logits["style"], b.logits["style"])


def test_save_and_load_give_identical_outputs(tmp_path):
    torch.manual_seed(0)
    names = {"style": ["a", "b", "c"], "genre": ["x", "y"]}
    model = CRNNArtClassifier(heads={"style": 3, "genre": 2}, class_names=names, image_size=64).eval()
    save_model_folder(model, tmp_path / "best", {"epoch": 1})
    loaded = load_model_folder(tmp_path / "best")
    assert loaded.class_names == names and loaded.image_size == 64 and not loaded.training
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a, b = model(x), loaded(x)
    for head in names:
        torch.testing.assert_close(a.logits[head], b.logits[head], rtol=0, atol=0)
    torch.testing.assert_close(a.embedding, b.embedding, rtol=0, atol=0)


def test_damaged_weights_give_a_clear_error(tmp_path):
    model = CRNNArtClassifier(heads={"style": 3})
    folder = save_model_folder(model, tmp_path / "last", {})
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="damaged"):
        load_model_folder(folder)
    with pytest.raises(ModelLoadError, match="nowhere does not exist; pass a run folder"):
        load_model_folder(tmp_path / "nowhere")


def test_local_backbone_file_is_loaded(tmp_path):
    torch.manual_seed(3)
    reference = resnet50()
    path = tmp_path / "resnet50.pth"
    torch.save(reference.state_dict(), path)
    model = CRNNArtClassifier(heads={"style": 2}, backbone_weights=str(path))
    torch.testing.assert_close(model.trunk[0].weight, reference.conv1.weight)
    torch.testing.assert_close(model.trunk[7][2].conv3.weight, reference.layer4[2].conv3.weight)
    bad = tmp_path / "other.pth"
    torch.save({"not": torch.zeros(1)}, bad)
    with pytest.raises(ModelLoadError, match="not a torchvision ResNet-50"):
        CRNNArtClassifier(heads={"style": 2}, backbone_weights=str(bad))


def test_imagenet_weights_unavailable_give_one_line_advice(monkeypatch):
    from torchvision.models import ResNet50_Weights

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(ResNet50_Weights.IMAGENET1K_V2.__class__, "get_state_dict", offline)
    with pytest.raises(ModelLoadError) as err:
        CRNNArtClassifier(heads={"style": 2}, backbone_weights="imagenet")
    message = str(err.value)
    assert "\n" not in message and "local" in message and "null" in message


@pytest.mark.parametrize("wrap", ["compiled", "ema", "ddp+compiled"])
def test_backbone_weights_saved_through_a_wrapper_load(tmp_path, wrap):
    """torch.compile (`_orig_mod.`), AveragedModel/EMA (`module.` plus `n_averaged`) and DDP prefixes are read."""
    torch.manual_seed(4)
    reference = resnet50()
    prefix = {"compiled": "_orig_mod.", "ema": "module.", "ddp+compiled": "module._orig_mod."}[wrap]
    state = {prefix + k: v for k, v in reference.state_dict().items()}
    if wrap == "ema":
        state["n_averaged"] = torch.tensor(12)
    path = tmp_path / "backbone.pth"
    torch.save(state, path)
    model = CRNNArtClassifier(heads={"style": 2}, backbone_weights=str(path))
    torch.testing.assert_close(model.trunk[0].weight, reference.conv1.weight)


def test_a_pickled_backbone_file_is_one_line(tmp_path):
    path = tmp_path / "whole_model.pth"
    torch.save(resnet50(), path)  # the module object, not its state dict: needs unpickling code
    with pytest.raises(ModelLoadError) as info:
        CRNNArtClassifier(heads={"style": 2}, backbone_weights=str(path))
    assert "\n" not in str(info.value) and "state_dict" in str(info.value)
