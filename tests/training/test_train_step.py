"""One optimizer step without the CLI: it updates, skips alike when a micro-batch has too few images or the loss is
not finite, counts what it skipped, and stops the run after train.max_bad_steps non-finite steps in a row; and the
undecodable-image bookkeeping behind it."""

from __future__ import annotations

import pytest
import torch

from crnn_art.checkpoints import TrainState
from crnn_art.config import resolve_config
from crnn_art.data.bad_images import BadImages
from crnn_art.data.loaders import load_sample
from crnn_art.errors import NonFiniteLoss
from crnn_art.model import CRNNArtClassifier
from crnn_art.runtime import make_accelerator
from crnn_art.training.loop import build_optimizer
from crnn_art.training.step import TrainStep


def batch(images: int, failed: int = 0, nan: bool = False) -> dict:
    image = torch.randn(images, 3, 32, 32)
    if nan:
        image[0, 0, 0, 0] = float("nan")
    return {"image": image, "labels": torch.arange(images)[:, None] % 3, "row": torch.arange(images),
            "skipped": torch.tensor(failed), "failed": [(100 + i, f"bad-{i}.jpg", "broken") for i in range(failed)]}


def make_step(tmp_path, *extra: str) -> TrainStep:
    torch.manual_seed(0)
    cfg = resolve_config(None, None, ["augment.mixup_prob=0", "augment.cutmix_prob=0", "train.max_bad_steps=2",
                                      "model.backbone_weights=null", "data.image_size=32", *extra])
    accelerator = make_accelerator("no", cpu=True)
    model = CRNNArtClassifier(heads={"style": 3}, backbone_weights=None, image_size=32)
    optimizer = build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10)
    model, optimizer = accelerator.prepare(model, optimizer)
    bad = BadImages(tmp_path, cfg.data.max_bad_fraction, True)
    return TrainStep(accelerator, model, model, optimizer, scheduler, None, cfg, {"style": 3}, None, None, bad,
                     tmp_path)


@pytest.fixture
def step(tmp_path):
    return make_step(tmp_path)


def weights(step: TrainStep) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in step.raw_model.state_dict().items()}


def changed(before: dict, after: dict) -> bool:
    return any(not torch.equal(before[k], after[k]) for k in before)


def test_a_step_updates_the_weights_and_reports_the_loss(step):
    state, before = TrainState(), weights(step)
    result = step(iter([batch(4)]), state, frozen=False, stop_requested=None)
    assert result.loss is not None and result.loss > 0 and changed(before, weights(step))
    assert (state.step, state.batch, state.epoch_applied_steps) == (1, 1, 1)
    assert state.epoch_loss_sum == pytest.approx(result.loss)


def test_a_micro_batch_with_one_decodable_image_skips_the_step(step):
    state, before = TrainState(), weights(step)
    result = step(iter([batch(1, failed=3)]), state, frozen=False, stop_requested=None)
    assert result.loss is None and not changed(before, weights(step))
    assert (state.step, state.data_skipped_steps, state.epoch_skipped_images) == (1, 1, 3)
    assert (state.images_drawn, state.images_failed) == (4, 3)
    assert [row for row, _, _ in step.bad.pending] == [100, 101, 102]


def test_non_finite_steps_are_skipped_then_stop_the_run(step):
    state, before = TrainState(), weights(step)
    assert step(iter([batch(4, nan=True)]), state, frozen=False, stop_requested=None).loss is None
    assert not changed(before, weights(step)) and (state.nonfinite_steps, state.nonfinite_in_row) == (1, 1)
    assert step(iter([batch(4)]), state, frozen=False, stop_requested=None).loss is not None
    assert state.nonfinite_in_row == 0  # a good step ends the streak
    step(iter([batch(4, nan=True)]), state, frozen=False, stop_requested=None)
    with pytest.raises(NonFiniteLoss, match="2 consecutive steps had a non-finite loss"):
        step(iter([batch(4, nan=True)]), state, frozen=False, stop_requested=None)


def test_a_stop_request_is_reported_after_the_step(step):
    import signal

    state = TrainState()
    result = step(iter([batch(4)]), state, frozen=False, stop_requested=signal.SIGTERM)
    assert result.stop_signal == signal.SIGTERM and result.loss is not None and state.step == 1


def test_a_frozen_stem_does_not_change(step):
    stem = {k: v.clone() for k, v in step.raw_model.state_dict().items() if k.startswith("trunk.0.")}
    assert stem
    step(iter([batch(4)]), TrainState(), frozen=True, stop_requested=None)
    after = step.raw_model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in stem.items() if "running" not in k and "num_batches" not in k)


def test_bad_image_counts_survive_a_resume_and_zero_stops_at_the_first(tmp_path):
    state = TrainState()
    state.images_drawn, state.images_failed = 5000, 50  # the epoch so far, restored from a checkpoint
    bad = BadImages(tmp_path, 0.1, True)
    bad.count(state, 7, 64)
    assert not bad.too_many(epoch_end=True)  # 57 of 5064, not 7 of 64
    strict = BadImages(tmp_path, 0.0, True)
    strict.count(TrainState(), 1, 32)
    assert strict.too_many(epoch_end=False)


def test_an_image_cell_holding_nothing_is_a_counted_skip():
    """A prepared folder stores a broken original as an empty image cell."""
    sample = load_sample(None, torch.tensor([1]), 7, lambda image: image, 32, None)
    assert sample["skipped"] and sample["failed"][0] == 7 and sample["failed"][1] == ""


def padding(like: dict, n: int = 2) -> dict:
    """A micro-batch of the unlabelled filler a stream's last step adds (row -1)."""
    return {**like, "image": like["image"][:1].repeat(n, 1, 1, 1), "labels": torch.full((n, 1), -1),
            "row": torch.full((n,), -1), "skipped": torch.tensor(0), "failed": []}


def test_padding_alone_changes_neither_the_gradient_nor_batchnorm_statistics(tmp_path):
    """A stream's last step may leave a process a micro-batch of padding only: the step equals the step without it
    (its loss weighs 0, BatchNorm's running statistics are put back after its forward)."""
    real = batch(2)
    alone, padded = make_step(tmp_path / "a"), make_step(tmp_path / "b", "train.grad_accum_steps=2")
    alone(iter([real]), TrainState(), frozen=False, stop_requested=None)
    padded(iter([real, padding(real)]), TrainState(), frozen=False, stop_requested=None)
    a, b = weights(alone), weights(padded)
    for key in a:
        if "running" in key or "num_batches" in key:
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_uneven_micro_batches_weigh_every_label_the_same(tmp_path):
    """Micro-batches of 4 and 2 images: the step's loss is the mean over the 6 labels (each micro-batch's mean
    weighed by its share), not the mean of the two means."""
    first, second = batch(4), batch(2)
    second["labels"] = torch.tensor([[2], [2]])
    step = make_step(tmp_path, "train.grad_accum_steps=2", "model.dropout=0", "model.gru_dropout=0")
    step.raw_model.eval()  # BatchNorm from running statistics: each image's loss does not depend on its batch
    step.raw_model.train = lambda mode=True: step.raw_model  # keep it so inside the step
    with torch.no_grad():
        logits = step.raw_model(torch.cat([first["image"], second["image"]])).logits["style"]
        labels = torch.cat([first["labels"], second["labels"]])[:, 0]
        per_image = torch.nn.functional.cross_entropy(logits, labels, reduction="none",
                                                      label_smoothing=step.t.label_smoothing)
        means = [per_image[:4].mean(), per_image[4:].mean()]
    result = step(iter([first, second]), TrainState(), frozen=False, stop_requested=None)
    assert result.loss == pytest.approx(float(per_image.mean()), rel=1e-5)
    assert result.loss != pytest.approx(float(sum(means) / 2), rel=1e-3)
