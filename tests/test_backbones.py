"""Any timm backbone under the row/column GRU head: shapes and attention grids, the first stage, save and load
from config.json alone, one-line errors for names that are not backbones, and training that resumes exactly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from crnn_art.backbones import backbone_problem
from crnn_art.config import resolve_config
from crnn_art.errors import ConfigError, ModelLoadError
from crnn_art.model import CRNNArtClassifier
from tests.conftest import read_history, run_cli, tiny_overrides

# a CNN (its last stage, stride 32) and a ViT (patch tokens, stride 16), both small enough for a CPU test
KINDS = {"timm:mobilenetv3_small_050": 32, "timm:vit_tiny_patch16_224": 16}


def test_resnet50_stays_the_default_with_the_same_weights_layout():
    model = CRNNArtClassifier(heads={"style": 27}, backbone_weights=None)
    assert sum(p.numel() for p in model.parameters()) == 28_389_085
    assert list(model.state_dict())[:3] == ["trunk.0.weight", "trunk.1.weight", "trunk.1.bias"]
    assert model.hub_config()["backbone"] == "resnet50" and model.embedding_dim == 3072


@pytest.mark.parametrize(("backbone", "stride"), KINDS.items())
def test_a_timm_backbone_gives_the_grid_the_grus_read_and_loads_from_its_config(tmp_path, backbone, stride):
    torch.manual_seed(0)
    model = CRNNArtClassifier(heads={"style": 4, "genre": 3}, backbone=backbone, backbone_weights=None,
                              image_size=64, gru_hidden=32).eval()
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    side = 64 // stride
    assert out.row_attention.shape == out.col_attention.shape == (2, side)  # rows / columns of the map
    assert out.embedding.shape == (2, model.trunk.channels + 4 * 32)
    assert out.logits["style"].shape == (2, 4) and out.logits["genre"].shape == (2, 3)
    stem, trunk = set(map(id, model.stem_parameters())), set(map(id, model.backbone_parameters()))
    assert stem and stem <= trunk
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["backbone"], config["embedding_dim"]) == (backbone, out.embedding.shape[1])
    loaded = CRNNArtClassifier.from_pretrained(str(tmp_path))  # rebuilt from config.json, no weights download
    torch.testing.assert_close(loaded(x).logits["style"], out.logits["style"])


def test_names_that_are_not_backbones_are_one_line_errors():
    with pytest.raises(ConfigError, match="model.backbone = 'vgg16' is not allowed; use resnet50 or timm:NAME"):
        resolve_config(None, None, ["model.backbone=vgg16"])
    problem = backbone_problem("timm:convnext_tiniest")
    assert "timm has no model 'convnext_tiniest'" in problem and "convnext_tiny" in problem and "\n" not in problem
    assert backbone_problem("timm:convnext_atto") is None and backbone_problem("resnet50") is None


def test_a_timm_vit_run_stopped_and_resumed_equals_the_uninterrupted_one(tmp_path, demo_dir):
    common = ["train", *tiny_overrides(demo_dir, model__backbone="timm:vit_tiny_patch16_224", train__epochs=1)]
    run_cli([*common, "--output-dir", str(tmp_path / "whole")])
    run_cli([*common, "--output-dir", str(tmp_path / "cut"), "--set=train.max_steps=4"])
    run_cli([*common, "--output-dir", str(tmp_path / "cut"), "--resume", "latest"])
    a, b = (load_file(tmp_path / name / "last" / "model.safetensors") for name in ("whole", "cut"))
    assert a.keys() == b.keys() and any(k.startswith("trunk.body.blocks.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert read_history(tmp_path / "whole")[-1]["step"] == read_history(tmp_path / "cut")[-1]["step"]
    card = (tmp_path / "whole" / "last" / "README.md").read_text()
    assert "timm:vit_tiny_patch16_224 backbone" in card
    # the ViT was pretrained on inputs normalised with 0.5 / 0.5: the run trains, and records, that normalisation
    config = json.loads((tmp_path / "whole" / "last" / "config.json").read_text())
    assert config["mean"] == config["std"] == [0.5, 0.5, 0.5]


def test_each_backbone_brings_the_normalisation_it_was_pretrained_with():
    from crnn_art.backbones import normalization

    assert normalization("resnet50") == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert normalization("timm:vit_tiny_patch16_224") == ((0.5,) * 3, (0.5,) * 3)
    assert normalization("timm:vit_base_patch16_clip_224")[0][0] == pytest.approx(0.48145466)


def test_pretrained_timm_weights_with_the_hub_unreachable_are_one_line_at_once(hub_down):
    """No cached weights and no Hub: one line with the fix, without huggingface_hub's retries (the fixture fails
    the test if it ever backs off)."""
    with pytest.raises(ModelLoadError, match="could not fetch timm's pretrained weights for convnext_atto.*"
                                             "model.backbone_weights to a local file") as info:
        CRNNArtClassifier(heads={"style": 4}, backbone="timm:convnext_atto", backbone_weights="imagenet")
    assert "\n" not in str(info.value)


def test_freeze_stem_warns_when_a_backbone_has_no_stem_it_can_find():
    """DenseNet keeps its stem inside ``features``: train.freeze_stem would freeze nothing, and says so."""
    from crnn_art.backbones import build_trunk, frozen_stem_note

    assert frozen_stem_note(build_trunk("resnet50", None, 64), "resnet50") is None
    assert frozen_stem_note(build_trunk("timm:mobilenetv3_small_050", None, 64), "timm:mobilenetv3_small_050") is None
    note = frozen_stem_note(build_trunk("timm:densenet121", None, 64), "timm:densenet121")
    assert note is not None and "timm:densenet121 has no first stage" in note and "train.freeze_stem=false" in note
