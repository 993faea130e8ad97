"""Publish and use: Hub-ready folders, the model card, push (against a stand-in HfApi), predict, safe loading."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image

from crnn_art import CRNNArtClassifier, ModelLoadError, predict
from crnn_art.checkpoints import load_model_folder, save_model_folder
from crnn_art.cli import main as cli_main
from tests.conftest import run_cli, scratch, tiny_overrides
from tests.standins.odd_images import odd_images, painting

TOKEN = "hf_SENTINELtokenNEVERwritten0123456789"


class StandInHub:
    """Records what crnn-art sends at the HfApi boundary; keeps a copy of the uploaded folder."""

    def __init__(self, keep: Path) -> None:
        self.calls: list[tuple[str, dict]] = []
        self.keep = keep

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        self.calls.append(("upload_folder", {"repo_id": repo_id, **kwargs}))
        shutil.copytree(folder_path, self.keep, dirs_exist_ok=True)

        class Commit:
            commit_url = f"https://huggingface.co/{repo_id}/commit/0"

        return Commit()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, demo_dir):
    with scratch(tmp_path_factory) as folder:
        run = folder / "pub"
        run_cli(["train", "--output-dir", str(run), *tiny_overrides(demo_dir, train__epochs=1)],
                env={"HF_TOKEN": TOKEN})
        run_cli(["evaluate", "--checkpoint", str(run), "--split", "test"], env={"HF_TOKEN": TOKEN})
        yield run


def top1_of(path: Path) -> float:
    return json.loads(path.read_text())["top1"]


def _no_token_anywhere(*roots: Path) -> None:
    for root in roots:
        for f in root.rglob("*"):
            if f.is_file():
                assert TOKEN.encode() not in f.read_bytes(), f


def test_push_sends_model_card_and_reports_and_never_the_token(trained, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    hub = StandInHub(tmp_path / "repo")
    monkeypatch.setattr("crnn_art.hub.HfApi", lambda: hub)
    code = cli_main(["push", "--checkpoint", str(trained), "--repo-id", "someone/crnn-demo", "--private",
                     "--revision", "v1"])
    assert code == 0
    names = [c[0] for c in hub.calls]
    assert names == ["create_repo", "create_branch", "upload_folder"]
    assert hub.calls[0][1]["private"] is True and hub.calls[2][1]["revision"] == "v1"
    sent = {p.name for p in (tmp_path / "repo").iterdir()}
    assert {"config.json", "model.safetensors", "README.md", "LICENSE", "confusion_matrix.png", "metrics.json",
            "classification_report.txt"} <= sent
    assert top1_of(tmp_path / "repo" / "metrics.json") == top1_of(trained / "eval_test_best" / "metrics.json")
    card = ModelCard.load(tmp_path / "repo" / "README.md")
    meta = card.data.to_dict()
    assert meta["library_name"] == "crnn-art" and meta["pipeline_tag"] == "image-classification"
    assert meta["license"] == "mit" and "model-index" in meta
    results = meta["model-index"][0]["results"]
    top1 = [r for r in results if r["metrics"][0]["type"] == "accuracy"]
    assert top1 and top1[0]["metrics"][0]["value"] == pytest.approx(
        json.loads((trained / "eval_test_best" / "metrics.json").read_text())["top1"], abs=1e-3)
    assert "## Limits" in card.text and "demonstration model" in card.text and "from_pretrained" in card.text
    assert "process(es) (CPU (" in card.text  # the hardware it was trained on
    loaded = CRNNArtClassifier.from_pretrained(str(tmp_path / "repo"))
    assert loaded.class_names == load_model_folder(trained).class_names
    out = capsys.readouterr()
    assert TOKEN not in out.out + out.err
    _no_token_anywhere(trained, tmp_path / "repo")


def test_push_at_the_end_of_training(tmp_path, demo_dir, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    hub = StandInHub(tmp_path / "repo")
    monkeypatch.setattr("crnn_art.hub.HfApi", lambda: hub)
    run = tmp_path / "run"
    code = cli_main(["train", "--output-dir", str(run), *tiny_overrides(demo_dir, train__max_steps=3),
                     "--set", "hub.push_to_hub=someone/at-end"])
    assert code == 0 and [c[0] for c in hub.calls] == ["create_repo", "upload_folder"]
    assert (tmp_path / "repo" / "model.safetensors").is_file()
    _no_token_anywhere(run, tmp_path / "repo")


def test_predict_cli_json_on_a_folder_with_a_broken_file(trained, tmp_path):
    folder = tmp_path / "images"
    (folder / "nested").mkdir(parents=True)
    painting(60, 1).save(folder / "a.jpg")
    painting(50, 2).save(folder / "nested" / "b.png")
    (folder / "broken.jpg").write_bytes(odd_images(huge=False)["truncated.jpg"][0])
    result = run_cli(["predict", "--model", str(trained), str(folder), "--json", "--top-k", "2",
                      "--heatmaps", str(tmp_path / "maps")])
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [Path(r["image"]).name for r in lines] == ["a.jpg", "broken.jpg", "b.png"]
    good = [r for r in lines if "error" not in r]
    assert len(good) == 2 and all(len(r["predictions"]["style"]) == 2 for r in good)
    assert all(abs(sum(p["score"] for p in r["predictions"]["style"])) <= 1.0001 for r in good)
    assert "broken.jpg" in result.stderr and "1 of 3 files could not be read" in result.stderr
    assert Image.open(tmp_path / "maps" / "a_attention.png").size == (32, 32)


def test_predict_python_api_and_text_list(trained, tmp_path):
    painting(40, 3).save(tmp_path / "c.jpg")
    (tmp_path / "list.txt").write_text("c.jpg\n# a comment\n")
    results = predict(str(trained), [tmp_path / "list.txt"], top_k=1)
    assert len(results) == 1 and results[0]["predictions"]["style"][0]["label"] in \
        load_model_folder(trained).class_names["style"]


def test_altered_or_mismatched_weights_are_refused(tmp_path):
    torch.manual_seed(0)
    model = CRNNArtClassifier(heads={"style": 3})
    folder = save_model_folder(model, tmp_path / "m", {})
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF  # flip bits inside a tensor: the file still parses
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="altered"):
        load_model_folder(folder)
    other = save_model_folder(model, tmp_path / "o", {})
    config = json.loads((other / "config.json").read_text())
    config["heads"] = {"style": 4}
    config["class_names"]["style"].append("extra")
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="does not fit"):
        CRNNArtClassifier.from_pretrained(str(other))


# ---- what a command was given, found and used: one line when it cannot be used ---------------------

def _err(argv: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = cli_main(argv)
    return code, capsys.readouterr().err.strip()


def test_checkpoint_arguments_that_are_not_models_are_one_line_naming_them(trained, tmp_path, capsys):
    a_file = tmp_path / "weights.safetensors"
    a_file.write_bytes(b"x")
    step = next((trained / "checkpoints").iterdir())
    outside = tmp_path / "copied_best"
    shutil.copytree(trained / "best", outside)
    cases = {
        str(tmp_path / "nope"): "does not exist",
        str(a_file): "is a file",
        str(step): "is a training checkpoint (for train --resume), not a model",
        str(tmp_path): "is neither a run folder",
        str(outside): "is a model folder outside a run",
    }
    for given, problem in cases.items():
        for command in (["evaluate", "--checkpoint", given], ["outliers", "--checkpoint", given]):
            code, err = _err(command, capsys)
            assert code == 2 and len(err.splitlines()) == 1, (command, err)
            assert f"{given} {problem}" in err, (command, err)


def test_a_run_without_best_says_that_it_uses_last(trained, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained, run, ignore=shutil.ignore_patterns("checkpoints", "best"))
    code = cli_main(["evaluate", "--checkpoint", str(run), "--split", "validation"])
    assert code == 0 and f"{run} has no best/" in capsys.readouterr().out.replace("\n", "")


def test_predict_with_nothing_to_read_is_an_error(trained, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, err = _err(["predict", "--model", str(trained), str(tmp_path / "empty")], capsys)
    assert code == 2 and "no images found in" in err and len(err.splitlines()) == 1
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    code, err = _err(["predict", "--model", str(trained), str(tmp_path / "broken.jpg")], capsys)
    assert code == 2 and "1 of 1 files could not be read" in err


def test_a_mistyped_local_model_path_is_an_error_at_once(trained, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(trained.parent)
    image = tmp_path / "p.jpg"
    painting(48).save(image)
    for typo in (f"{trained.name}/bset", "./nowhere", f"{trained.name}/best/x/y", "~/nowhere/model"):
        code, err = _err(["predict", "--model", typo, str(image)], capsys)
        assert code == 2 and f"{typo} does not exist" in err, (typo, err)


def test_predict_and_evaluate_feed_the_model_the_same_tensor(trained, tmp_path):
    """One decode rule: a large JPEG (draft-decoded, then reduced) reaches the model identically in both paths."""
    from crnn_art.data.loaders import load_sample
    from crnn_art.data.transforms import eval_resize, eval_transform
    from crnn_art.inference import predict_images

    path = tmp_path / "large.jpg"
    painting(48, seed=3).resize((2400, 1800)).save(path, quality=92)
    model = load_model_folder(trained).eval()
    sample = load_sample({"bytes": None, "path": str(path)}, torch.zeros(1, dtype=torch.long), 0,
                         eval_transform(model.image_size), eval_resize(model.image_size), None)
    with torch.no_grad():
        expected = model(sample["image"][None]).logits["style"].softmax(dim=1)[0]
    result = next(predict_images(model, [path], top_k=4))
    got = {p["label"]: p["score"] for p in result["predictions"]["style"]}
    for j, name in enumerate(model.class_names["style"]):
        assert got[name] == pytest.approx(float(expected[j]), abs=1e-6)


@pytest.mark.parametrize("repo_id", ["no-slash", "a/b/c", "bad id/name", "user/na me", "user/--double"])
def test_a_malformed_repo_id_is_refused_before_any_network_call(trained, tmp_path, monkeypatch, capsys, repo_id):
    hub = StandInHub(tmp_path / "hub")
    monkeypatch.setattr("crnn_art.hub.HfApi", lambda: hub)
    code, err = _err(["push", "--checkpoint", str(trained), "--repo-id", repo_id], capsys)
    assert code == 2 and "is not a Hub repository id" in err and len(err.splitlines()) == 1
    assert hub.calls == []


def test_image_file_names_that_are_not_utf8_are_skipped_and_counted(tmp_path):
    import os

    from crnn_art.config import resolve_config
    from crnn_art.data.sources import open_source
    from tests.standins.layouts import image_folder

    root = image_folder(tmp_path / "folder", split_dirs=False)
    latin1 = os.fsencode(str(root / "Cubism")) + b"/caf\xe9-latin1.jpg"
    painting(48).save(os.fsdecode(latin1), format="JPEG")
    opened = open_source(resolve_config(None, None, [f"data.source={root}"]).data)
    assert len(opened.dataset) == 36 and "1 image file(s) skipped: their names are not valid UTF-8" in opened.note


def test_a_hub_model_with_the_hub_unreachable_is_one_line_at_once(hub_down, tmp_path, capsys):
    image = tmp_path / "p.jpg"
    painting(48).save(image)
    code, err = _err(["predict", "--model", "someone/some-model", str(image)], capsys)
    assert code == 2 and len(err.splitlines()) == 1
    assert "the Hub cannot be reached" in err and "127.0.0.1" in err and "not in the local cache" in err


def test_a_hub_model_downloaded_before_is_used_from_the_cache_when_the_hub_is_unreachable(trained, hub_down,
                                                                                         tmp_path, capsys):
    snapshot = hub_down / "models--someone--cached" / "snapshots" / "0123456789abcdef"
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(trained / "best" / name, snapshot / name)
    (hub_down / "models--someone--cached" / "refs").mkdir()
    (hub_down / "models--someone--cached" / "refs" / "main").write_text("0123456789abcdef")
    image = tmp_path / "p.jpg"
    painting(48).save(image)
    capsys.readouterr()
    assert cli_main(["predict", "--model", "someone/cached", str(image), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[0])
    assert result["image"] == str(image) and result["predictions"]["style"]


@pytest.fixture(scope="module")
def with_ema(tmp_path_factory, demo_dir):
    """Two epochs with EMA: best/, last/ and last_ema/ hold different weights."""
    with scratch(tmp_path_factory, "ema") as folder:
        run = folder / "ema"
        run_cli(["train", "--output-dir", str(run), *tiny_overrides(demo_dir, train__ema_decay=0.9)])
        yield run


def _card(folder: Path) -> ModelCard:
    return ModelCard.load(folder / "README.md")


def test_a_card_shows_only_figures_of_its_own_weights(with_ema):
    from crnn_art.checkpoints import weights_sha256

    run_cli(["evaluate", "--checkpoint", str(with_ema / "last_ema"), "--split", "test"])
    ema_eval = json.loads((with_ema / "eval_test_last_ema" / "metrics.json").read_text())
    assert ema_eval["model"] == {"folder": "last_ema", "sha256": weights_sha256(with_ema / "last_ema")}
    best = _card(with_ema / "best")  # written when best/ was saved; the EMA's test figures are not its own
    assert "The test split was not evaluated for these weights" in best.text
    assert all(r["dataset"]["split"] == "validation" for r in best.data.to_dict()["model-index"][0]["results"])
    assert "test split" in _card(with_ema / "last_ema").text and "confusion_matrix.png" in _card(
        with_ema / "last_ema").text

    run_cli(["evaluate", "--checkpoint", str(with_ema), "--split", "test"])  # the run's best/
    best_eval = json.loads((with_ema / "eval_test_best" / "metrics.json").read_text())
    assert best_eval["model"]["sha256"] == weights_sha256(with_ema / "best") != ema_eval["model"]["sha256"]
    results = _card(with_ema / "best").data.to_dict()["model-index"][0]["results"]
    top1 = [m["value"] for r in results for m in r["metrics"] if m["type"] == "accuracy"]
    assert top1 == [pytest.approx(best_eval["top1"], abs=1e-3)] and results[0]["dataset"]["split"] == "test"


def test_the_card_in_every_model_folder_is_the_generated_one(with_ema):
    import re

    for name in ("best", "last", "last_ema"):
        card = _card(with_ema / name)
        assert "## Install and use" in card.text and "from_pretrained" in card.text and "[More Information" not in \
            card.text
        assert not re.search(r"\b(None|True|False)\b", card.text), name  # no Python values in prose
        assert "WikiArt" not in card.text.split("## Limits")[1]  # the demo card speaks of the demo data
        assert "MIT License" in (with_ema / name / "LICENSE").read_text()
        meta = card.data.to_dict()
        assert "datasets" not in meta  # the demo is not a Hub dataset, whatever folder the card is written from
        types = {(m["type"], m.get("config")) for r in meta["model-index"][0]["results"] for m in r["metrics"]}
        assert types == {("accuracy", None), ("f1", "macro"), ("f1", "weighted")}  # 4 classes: no top-5


def test_push_dry_run_shows_what_would_be_sent_offline(with_ema, monkeypatch, capsys):
    def no_network():
        raise AssertionError("a dry run must not create an HfApi client")

    monkeypatch.setattr("crnn_art.hub.HfApi", no_network)
    capsys.readouterr()
    assert cli_main(["push", "--checkpoint", str(with_ema), "--repo-id", "someone/demo", "--dry-run"]) == 0
    out = capsys.readouterr().out
    for name in ("model.safetensors", "config.json", "README.md", "LICENSE", "config.yaml"):
        assert re.search(rf"^  {re.escape(name)}\s+[\d,]+ bytes$", out, re.M), name
    assert "name: someone/demo" in out and "## Install and use" in out


@pytest.mark.parametrize(("source", "dataset"), [("huggan/wikiart", "huggan/wikiart"), ("cases/a/folder", None),
                                                 ("data/wikiart.parquet", None), ("./local/x", None),
                                                 ("demo", None), ("artgan", None)])
def test_card_metadata_names_a_hub_dataset_only_for_hub_ids(source, dataset):
    from crnn_art.hub import hub_dataset_id

    assert hub_dataset_id(source) == dataset


def test_embed_a_folder_of_images_gives_the_models_embedding_and_prediction(trained, tmp_path):
    """`crnn-art embed --images`: one row per decodable file, the same embedding as the model on predict's tensor and
    the same prediction as predict; a broken file is left out and named."""
    from datasets import load_dataset

    from crnn_art.inference import load_model, predict_images

    folder = tmp_path / "images"
    folder.mkdir()
    painting(60, 1).save(folder / "a.jpg")
    painting(50, 2).save(folder / "b.png")
    (folder / "broken.jpg").write_bytes(odd_images(huge=False)["truncated.jpg"][0])
    result = run_cli(["embed", "--checkpoint", str(trained), "--images", str(folder), "--output-dir",
                      str(tmp_path / "emb")])
    assert "broken.jpg: left out" in result.stderr
    table = load_dataset("parquet", data_files=str(tmp_path / "emb" / "*.parquet"), split="train")
    assert [Path(p).name for p in table["path"]] == ["a.jpg", "b.png"]
    model = load_model(trained, "cpu")
    expected = [r for r in predict_images(model, [folder], top_k=1, embeddings=True) if "error" not in r]
    for row, want in zip(table, expected, strict=True):
        assert row["style_predicted"] == want["predictions"]["style"][0]["label"]
        np.testing.assert_allclose(row["embedding"], want["embedding"], rtol=1e-5, atol=1e-5)
        assert len(row["embedding"]) == model.embedding_dim
