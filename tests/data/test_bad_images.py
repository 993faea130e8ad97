"""Undecodable training images: a step whose micro-batch they empty is skipped alike on every process and
counted, the files are listed once in RUN/bad_images.tsv, and only too large a share stops the run (one line,
checkpoint kept, resumable)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from crnn_art.checkpoints import complete_checkpoints
from tests.conftest import TEST_BACKBONE, read_history, run_cli
from tests.standins.odd_images import painting

SMALL = [f"--set=model.backbone={TEST_BACKBONE}",
         "--set=data.image_size=32", "--set=data.num_workers=0", "--set=model.backbone_weights=null",
         "--set=augment.mixup_prob=0.0", "--set=augment.cutmix_prob=0.0", "--set=train.eval_batch_size=16",
         "--set=train.epochs=1", "--set=data.val_fraction=0.2", "--set=data.test_fraction=0.1"]


def folder_with_broken_files(root: Path, good: int, broken: int) -> set[str]:
    """Two style folders of 48 px paintings plus ``broken`` files that are not images; returns their names."""
    names = set()
    for style in ("Impressionism", "Cubism"):
        (root / style).mkdir(parents=True, exist_ok=True)
    for k in range(good):
        painting(48, seed=k).save(root / ("Impressionism", "Cubism")[k % 2] / f"good-{k}.jpg", format="JPEG")
    for k in range(broken):
        name = f"broken-{k}.jpg"
        (root / ("Impressionism", "Cubism")[k % 2] / name).write_bytes(b"not an image at all")
        names.add(name)
    return names


def listed(run: Path) -> list[dict[str, str]]:
    with open(run / "bad_images.tsv", newline="") as fh:
        return [dict(zip(("split", "row", "path", "reason"), r, strict=True)) for r in csv.reader(fh, delimiter="\t")]


@pytest.mark.parametrize("processes", [1, 2])
def test_micro_batches_emptied_by_broken_files_are_skipped_counted_and_listed(tmp_path, processes):
    root = tmp_path / "paintings"
    broken = folder_with_broken_files(root, good=40, broken=10)
    run = tmp_path / "run"
    # two images per micro-batch on every process: one broken image leaves one, so the step is skipped
    run_cli(["train", "--output-dir", str(run), *SMALL, f"--set=data.source={root}",
             f"--set=train.batch_size={2 * processes}", "--set=data.max_bad_fraction=0.5"],
            processes=processes, timeout=400)  # a step skipped on one process only would hang DDP here
    history = read_history(run)
    assert history[0]["data_skipped_steps"] >= 1
    assert history[0]["skipped_train"] >= history[0]["data_skipped_steps"]
    rows = listed(run)
    names = [Path(r["path"]).name for r in rows]
    assert rows and set(names) <= broken and len(names) == len(set(names))  # each broken file listed once
    assert all(r["split"] == "train" and r["reason"] for r in rows)
    assert history[0]["train_loss"] is not None  # the other steps trained


def test_too_many_broken_files_stop_with_one_line_and_the_run_resumes(tmp_path):
    root = tmp_path / "paintings"
    folder_with_broken_files(root, good=24, broken=24)
    run = tmp_path / "run"
    args = ["train", "--output-dir", str(run), *SMALL, f"--set=data.source={root}", "--set=train.batch_size=4"]
    result = run_cli(args, check=False)
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1
    assert "failed to decode" in line and "data.max_bad_fraction=0.1" in line and str(run / "bad_images.tsv") in line
    assert "--resume latest" in line
    assert complete_checkpoints(run / "checkpoints"), "the stop keeps what was trained"
    assert listed(run)
    resumed = run_cli([*args, "--set=data.max_bad_fraction=1", "--resume", "latest"], check=False)
    assert resumed.returncode == 0, resumed.stderr
    assert [h["epoch"] for h in read_history(run)] == [1]
    # `embed` keeps a row for every painting of the split and marks the ones that could not be decoded
    from datasets import load_dataset

    run_cli(["embed", "--checkpoint", str(run), "--split", "validation", "--output-dir", str(tmp_path / "emb")])
    table = load_dataset("parquet", data_dir=str(tmp_path / "emb"), split="validation")
    broken = [Path(p).name.startswith("broken-") for p in table["path"]]
    assert any(broken) and not all(broken)
    assert table["decoded"] == [not b for b in broken]
    assert all(label is None for label, b in zip(table["style_label"], broken, strict=True) if b)


@pytest.mark.parametrize("value", ["-0.1", "1.5", "nan"])
def test_max_bad_fraction_outside_0_1_is_a_config_error(value, capsys):
    from crnn_art.cli import main

    assert main(["train", "--print-config", f"--set=data.max_bad_fraction={value}"]) == 2
    assert "data.max_bad_fraction" in capsys.readouterr().err


def test_an_evaluation_batch_of_only_broken_files_keeps_the_model_input_shape():
    """Evaluation keeps undecodable files as unlabelled blanks; a batch of nothing else still has the transform's
    image size (a ViT or ConvNeXt would fail on anything else), and the random state is left alone."""
    import torch

    from crnn_art.data.loaders import collate, load_sample
    from crnn_art.data.transforms import eval_transform

    transform = eval_transform(48, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    broken = {"bytes": b"not an image at all", "path": "broken.jpg"}
    before = torch.random.get_rng_state()
    samples = [load_sample(broken, torch.tensor([2]), row, transform, 56, None) for row in (4, 9)]
    assert torch.equal(torch.random.get_rng_state(), before)
    batch = collate(samples, keep_skipped=True)
    assert batch["image"].shape == (2, 3, 48, 48)
    assert batch["labels"].tolist() == [[-1], [-1]] and int(batch["skipped"]) == 2
    assert [f[:2] for f in batch["failed"]] == [(4, "broken.jpg"), (9, "broken.jpg")]
