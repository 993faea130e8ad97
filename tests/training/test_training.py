"""End to end through the CLI, as a user runs it: a short demo run, its outputs, evaluation, freezing."""

from __future__ import annotations

import pytest
import torch
from accelerate.utils import set_seed
from safetensors.torch import load_file

from crnn_art import CRNNArtClassifier
from crnn_art.config import load_run_config
from crnn_art.evaluation.metrics import METRIC_KEYS
from tests.conftest import ROOT, read_history, read_json, run_cli, scratch, tiny_overrides


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, demo_dir):
    with scratch(tmp_path_factory) as folder:
        run = folder / "demo"
        run_cli(["train", "--preset", "demo", "--output-dir", str(run),
                 *tiny_overrides(demo_dir, train__epochs=4, train__lr=3e-4, train__backbone_lr=3e-4,
                                data__image_size=48, train__batch_size=16, model__backbone="resnet50")])
        yield run


def test_run_folder_holds_config_metrics_history_and_models(demo_run):
    cfg = load_run_config(demo_run / "config.yaml")
    assert cfg.data.source == "demo" and cfg.train.epochs == 4
    metrics = read_json(demo_run / "metrics.json")
    assert set(METRIC_KEYS) | {"epoch"} <= set(metrics) and metrics["epoch"] == 4
    assert metrics["top5"] is None  # 4 styles: top-5 would always be 100
    assert all(0 <= metrics[k] <= 100 for k in METRIC_KEYS if k not in ("loss", "top5"))
    history = read_history(demo_run)
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    for folder in ("best", "last"):
        model = CRNNArtClassifier.from_pretrained(str(demo_run / folder))
        assert model.class_names["style"] == ["Color_Field_Painting", "Impressionism", "Minimalism", "Pointillism"]
        assert read_json(demo_run / folder / "training.json")["epoch"] >= 1


def test_training_loss_falls(demo_run):
    losses = [h["train_loss"] for h in read_history(demo_run)]
    assert losses[-1] < losses[0] * 0.9, losses


def test_evaluate_reproduces_the_final_validation_metrics(demo_run, tmp_path):
    run_cli(["evaluate", "--checkpoint", str(demo_run / "last"), "--split", "validation",
             "--output-dir", str(tmp_path)])
    again = read_json(tmp_path / "metrics.json")
    final = read_json(demo_run / "metrics.json")
    for key in (*METRIC_KEYS, "num_samples"):
        assert again[key] == pytest.approx(final[key], abs=1e-4) if final[key] is not None else again[key] is None, key


def test_a_run_with_a_compiled_trunk_evaluates_the_same_without_compiling(tmp_path, demo_dir):
    """model.compile_trunk=true trains through torch.compile; its weights load and evaluate eagerly to the
    run's own final validation figures (checkpoints are interchangeable with eager runs)."""
    run = tmp_path / "compiled"
    run_cli(["train", "--output-dir", str(run),
             *tiny_overrides(demo_dir, train__epochs=1, train__max_steps=2, model__compile_trunk="true")], timeout=1200)
    assert load_run_config(run / "config.yaml").model.compile_trunk
    run_cli(["evaluate", "--checkpoint", str(run / "last"), "--split", "validation", "--output-dir", str(tmp_path)])
    again, final = read_json(tmp_path / "metrics.json"), read_json(run / "metrics.json")
    assert again["num_samples"] == final["num_samples"]
    assert again["loss"] == pytest.approx(final["loss"], abs=1e-3)  # float32: fused kernels round differently


def _initial_weights(run) -> dict[str, torch.Tensor]:
    """The weights train() starts from: same seed, same constructor call."""
    cfg = load_run_config(run / "config.yaml")
    names = CRNNArtClassifier.from_pretrained(str(run / "last")).class_names
    set_seed(cfg.train.seed)
    model = CRNNArtClassifier(heads={k: len(v) for k, v in names.items()}, class_names=names,
                              backbone_weights=None, image_size=cfg.data.image_size)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_stem_stays_frozen_until_the_unfreeze_epoch(tmp_path, demo_dir):
    stem = ("trunk.0.weight", "trunk.1.weight", "trunk.1.bias", "trunk.1.running_mean", "trunk.1.running_var")
    frozen_run = tmp_path / "frozen"
    run_cli(["train", "--output-dir", str(frozen_run),
             *tiny_overrides(demo_dir, train__epochs=1, train__unfreeze_epoch=2, train__max_steps=4,
                             model__backbone="resnet50")])
    start = _initial_weights(frozen_run)
    after = load_file(frozen_run / "last" / "model.safetensors")
    for key in stem:
        torch.testing.assert_close(after[key], start[key], rtol=0, atol=0, msg=key)
    assert not torch.equal(after["trunk.4.0.conv1.weight"], start["trunk.4.0.conv1.weight"])  # layer1 trains

    thawed_run = tmp_path / "thawed"
    run_cli(["train", "--output-dir", str(thawed_run),
             *tiny_overrides(demo_dir, train__epochs=2, train__unfreeze_epoch=2, model__backbone="resnet50")])
    assert [h["stem_frozen"] for h in read_history(thawed_run)] == [True, False]
    after = load_file(thawed_run / "last" / "model.safetensors")
    assert not torch.equal(after["trunk.0.weight"], start["trunk.0.weight"])


def test_world_size_without_a_launcher_is_refused(tmp_path, demo_dir):
    result = run_cli(["train", "--output-dir", str(tmp_path / "run"), *tiny_overrides(demo_dir)],
                     env={"WORLD_SIZE": "2"}, check=False)
    assert result.returncode == 2
    assert "WORLD_SIZE=2" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_processes_that_each_see_a_world_of_one_are_stopped():
    """Two launched processes whose Accelerator lacks cpu=True must not train twice."""
    import subprocess
    import sys

    from tests.conftest import CPU_2PROC, _free_port

    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_2PROC),
         "--main_process_port", str(_free_port()), str(ROOT / "tests" / "scripts" / "accelerator_without_cpu_flag.py")],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert result.returncode != 0
    assert "WORLD_SIZE=2 but Accelerate sees 1 process" in result.stderr
    assert "trained alone" not in result.stdout
