"""Config: presets, overrides, and one-line errors that name the key, before any work starts."""

from __future__ import annotations

import pytest

from crnn_art.config import available_presets, resolve_config
from crnn_art.errors import ConfigError
from tests.conftest import run_cli


def test_presets_ship_with_seed_values():
    assert set(available_presets()) >= {"demo", "style", "genre", "artist", "combined"}
    style = resolve_config("style")
    assert (style.data.task, style.train.epochs, style.train.unfreeze_epoch) == ("style", 20, 7)
    assert style.data.image_size == 384 and style.model.backbone_weights == "imagenet"
    assert (style.train.lr, style.train.backbone_lr, style.train.weight_decay) == (8e-4, 1.5e-4, 1e-4)
    assert (style.augment.mixup_prob, style.augment.cutmix_prob) == (0.35, 0.35)
    assert (style.train.label_smoothing, style.train.grad_clip, style.train.batch_size) == (0.03, 1.0, 64)
    assert [resolve_config(p).train.epochs for p in ("genre", "artist", "combined")] == [10, 10, 20]
    assert resolve_config("combined").heads == ("style", "genre", "artist")


def test_overrides_and_files_layer_in_order(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("train:\n  epochs: 5\n  seed: 7\n")
    cfg = resolve_config("style", path, ["train.epochs=3", "model.backbone_weights=null",
                                         "augment.crop_scale=[0.5, 1.0]"])
    assert (cfg.train.epochs, cfg.train.seed, cfg.model.backbone_weights) == (3, 7, None)
    assert cfg.augment.crop_scale == [0.5, 1.0]


@pytest.mark.parametrize(("override", "named"), [
    ("train.epoch=3", "train.epoch"),
    ("train.epochs=0", "train.epochs"),
    ("train.epochs=many", "train.epochs"),
    ("data.task=painter", "data.task"),
    ("data.image_size=16", "data.image_size"),
    ("augment.mixup_prob=0.95", "augment.mixup_prob"),
    ("train.batch_size=7", "train.batch_size"),
    ("train.mixed_precision=fp8", "train.mixed_precision"),
    ("model.backbone_weights=weights.txt", "model.backbone_weights"),
    ("trian.epochs=3", "trian"),
])
def test_bad_values_name_the_key(override, named):
    with pytest.raises(ConfigError) as err:
        resolve_config("demo", None, [override])
    assert named in str(err.value) and "\n" not in str(err.value)


def test_cli_reports_config_error_in_one_line_before_any_work(tmp_path):
    result = run_cli(["train", "--set", "train.epoch=3", "--set", f"data.demo_dir={tmp_path / 'demo'}",
                      "--output-dir", str(tmp_path / "run")], check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.epoch" in lines[0] and "train.epochs" in lines[0]
    assert not (tmp_path / "demo").exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize(("key", "written", "value"), [
    ("train.lr", "3e-4", 3e-4), ("train.lr", "1E-3", 1e-3), ("train.lr", ".5", 0.5), ("train.weight_decay", "1e6", 1e6),
    ("train.log_every", "1_000", 1000), ("train.epochs", "1e1", 10), ("train.lr", "+2.5e-4", 2.5e-4),
])
def test_numbers_as_users_write_them(key, written, value):
    section, name = key.split(".")
    assert getattr(getattr(resolve_config(None, None, [f"{key}={written}"]), section), name) == value


@pytest.mark.parametrize("written", ["1.5", "3e-4", "ten"])
def test_a_non_integer_for_an_integer_key_is_one_clear_error(written):
    with pytest.raises(ConfigError, match="train.epochs must be an integer"):
        resolve_config(None, None, [f"train.epochs={written}"])


@pytest.mark.parametrize(("batch", "world", "accum"), [(2, 2, 1), (6, 2, 1), (4, 2, 2), (4, 4, 1), (9, 3, 1)])
def test_every_micro_batch_holds_an_even_number_of_at_least_two_images(batch, world, accum):
    from crnn_art.data.sampling import local_batch_size

    with pytest.raises(ValueError, match=f"use a multiple of {2 * world * accum}"):
        local_batch_size(batch, world, accum)


def test_bench_on_a_missing_gpu_is_one_line(capsys):
    from crnn_art.cli import main

    assert main(["bench", "--device", "cuda", "--quick"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no GPU is visible" in err


def test_the_configuration_reference_page_is_current():
    """docs/configuration.md is generated from the config's attribute docstrings; every key has one."""
    from crnn_art.config import config_reference, key_docs
    from tests.conftest import ROOT

    assert [k for k, doc in key_docs().items() if not doc] == []
    assert (ROOT / "docs" / "configuration.md").read_text() == config_reference(), (
        "regenerate: python -c \"import crnn_art.config as c; print(c.config_reference(), end='')\" "
        "> docs/configuration.md")


def test_a_resume_without_a_preset_starts_from_the_runs_own_config(tmp_path, capsys):
    """``--resume latest --set data.max_bad_fraction=0.5`` (the advice of a stop for undecodable images) changes that
    key of the run's own config, not of the demo preset."""
    import yaml

    from crnn_art.cli import main
    from crnn_art.config import config_text

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(config_text(resolve_config("style", None, ["train.epochs=7"])))
    capsys.readouterr()
    assert main(["train", "--output-dir", str(run), "--resume", "latest", "--set", "data.max_bad_fraction=0.5",
                 "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["epochs"] == 7 and printed["data"]["source"] == "huggan/wikiart"
    assert printed["data"]["max_bad_fraction"] == 0.5
