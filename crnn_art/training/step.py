"""One optimizer step: ``train.grad_accum_steps`` micro-batches on every process, then one update that every
process agrees on.

A batch goes: micro-batches from the run's batches (``data.loaders`` or ``streaming``) -> agreement before any
forward (a micro-batch left with fewer than 2 decodable images anywhere skips the step everywhere; stop
requests) -> device augmentation -> one-hot targets per head -> MixUp/CutMix -> the CRNN -> soft-target loss
-> backward (gradients synchronised on the last micro-batch only) -> frozen-stem gradients dropped -> clip ->
agreement on a non-finite loss or gradient -> AdamW -> cosine schedule -> EMA.
"""

from __future__ import annotations

import contextlib
import math
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import gather_object

from crnn_art.checkpoints import CHECKPOINTS, TrainState, complete_checkpoints
from crnn_art.config import RunConfig
from crnn_art.data.bad_images import BadImages
from crnn_art.data.sampling import mix_seed
from crnn_art.errors import NonFiniteLoss
from crnn_art.training.loss import BatchMixer, one_hot_targets, soft_target_loss


def step_seed(seed: int, step: int, rank: int) -> int:
    """Dropout and mixing randomness of one optimizer step: a function of (seed, step, rank) only,
    so that a resumed run draws exactly what the uninterrupted one drew."""
    return mix_seed(seed, 0x5EED, step, rank)


@dataclass
class StepResult:
    """What one step did, the same on every process."""

    loss: float | None
    """The step's loss averaged over processes; None when the step was skipped (non-finite or undecodable)."""
    stop_signal: int | None
    """SIGTERM or SIGINT when any process was asked to stop (every process then stops after this step)."""
    rows: list[torch.Tensor]
    """Row ids of this process's micro-batches (for ``data.log_rows``)."""


class TrainStep:
    """Call it once per optimizer step; it advances ``state.step`` and ``state.batch`` whatever happened.

    ``model`` is the prepared (DDP-wrapped) model, ``raw_model`` the module itself (stem parameters, EMA).
    Raises ``NonFiniteLoss`` after ``train.max_bad_steps`` consecutive non-finite steps.
    """

    def __init__(self, accelerator, model, raw_model, optimizer, scheduler, ema, cfg: RunConfig,
                 head_sizes: dict[str, int], class_weights: dict[str, torch.Tensor] | None, device_augment,
                 bad: BadImages, run_dir: Path) -> None:
        self.accelerator, self.model, self.raw_model = accelerator, model, raw_model
        self.optimizer, self.scheduler, self.ema = optimizer, scheduler, ema
        self.t, self.head_sizes, self.class_weights = cfg.train, head_sizes, class_weights
        self.device_augment, self.bad, self.run_dir = device_augment, bad, run_dir
        self.mixer = BatchMixer(cfg.augment)
        self.rank, self.world, self.device = accelerator.process_index, accelerator.num_processes, accelerator.device
        self.mass_weights = {h: (torch.ones(n, dtype=torch.float64) if class_weights is None else
                                 class_weights[h].detach().cpu().double()) for h, n in head_sizes.items()}

    def __call__(self, batches: Iterator[dict[str, Any]], state: TrainState, frozen: bool,
                 stop_requested: int | None) -> StepResult:
        torch.manual_seed(step_seed(self.t.seed, state.step, self.rank))  # dropout: a function of (seed, step, rank)
        micro_batches = [next(batches) for _ in range(self.t.grad_accum_steps)]
        masses = [self._label_mass(b) for b in micro_batches]  # per micro-batch and head: the loss's denominators
        unusable, stop, totals = self._agree_before_forward(micro_batches, masses, state, stop_requested)
        loss = None
        if unusable:
            state.data_skipped_steps += 1
        else:
            # a non-finite forward also writes NaN into BatchNorm's running statistics: a skipped step puts them back
            buffers = [b.detach().clone() for b in self.raw_model.buffers()]
            local_loss, finite = self._forward_backward(micro_batches, masses, totals, state.step, frozen)
            loss = self._update(local_loss, finite, state)
            if loss is None:
                with torch.no_grad():
                    for live, saved in zip(self.raw_model.buffers(), buffers, strict=True):
                        live.copy_(saved)
        state.step += 1
        state.batch += 1
        return StepResult(loss, stop, [b["row"][b["row"] >= 0] for b in micro_batches])

    def _agree_before_forward(self, micro_batches: list[dict[str, Any]], masses: list[torch.Tensor], state: TrainState,
                              stop_requested: int | None) -> tuple[bool, int | None, list[float]]:
        """One all-reduce before any forward: whether a micro-batch anywhere kept fewer than 2 decodable images
        (then every process skips the step: DDP needs all of them in each backward), how many images failed and
        were drawn, the step's label mass per head (all processes), and whether any process was asked to stop."""
        mass = torch.stack(masses).sum(dim=0)
        agreed = self.accelerator.reduce(torch.tensor(
            [*self.bad.collect(micro_batches), float(stop_requested == signal.SIGTERM),
             float(stop_requested == signal.SIGINT), *mass.tolist()], dtype=torch.float64,
            device=self.device), reduction="sum").tolist()
        self.bad.count(state, int(agreed[1]), int(agreed[2]))
        state.epoch_skipped_images += int(agreed[1])
        stop = signal.SIGINT if agreed[4] > 0 else signal.SIGTERM if agreed[3] > 0 else None
        return agreed[0] > 0, stop, agreed[5:]

    def _label_mass(self, batch: dict[str, Any]) -> torch.Tensor:
        """Per head, the micro-batch's known labels weighed by their class weights (1 without): the denominator of
        its loss (MixUp/CutMix mix within the batch, which keeps that sum)."""
        labels = batch["labels"]
        return torch.stack([self.mass_weights[head][labels[:, h][labels[:, h] >= 0]].sum()
                            for h, head in enumerate(self.head_sizes)])

    def _forward_backward(self, micro_batches: list[dict[str, Any]], masses: list[torch.Tensor], totals: list[float],
                          step: int, frozen: bool) -> tuple[torch.Tensor, bool]:
        """Accumulate the gradients of every micro-batch; returns this process's share of the step's loss and
        whether it is finite (the gradient norm included, except under fp16, whose loss scaler handles inf
        gradients itself).

        Each head's mean loss over a micro-batch is weighed by the micro-batch's share of that head's label mass
        in the whole step (``totals``, all processes): DDP averages processes equally, so a process with fewer
        (or lighter) labels (undecodable files, unknown labels, a stream's last, smaller step) would otherwise
        weigh each of its labels more. The step's loss is then exactly the loss over the global batch (for one
        head and hard labels, ``F.cross_entropy(weight=...)`` over all of it). With equal micro-batches the weight
        is exactly 1."""
        t, acc = self.t, self.accelerator
        local_loss = torch.zeros((), device=self.device)
        finite = True
        for micro, batch in enumerate(micro_batches):
            images = batch["image"].to(self.device, non_blocking=True)
            if self.device_augment is not None:  # uint8 crops -> jitter, normalise, erase here
                images = self.device_augment(images, mix_seed(t.seed, 0xA06, step, micro, self.rank))
            targets = one_hot_targets(batch["labels"], list(self.head_sizes.values())).to(self.device)
            images, targets, _ = self.mixer(images, targets, mix_seed(t.seed, step, micro, self.rank))
            share = [m * self.world * t.grad_accum_steps / total if total > 0 else 0.0
                     for m, total in zip(masses[micro].tolist(), totals, strict=True)]
            # padding alone (a stream's last step): its forward must not move BatchNorm's running statistics
            saved = [b.detach().clone() for b in self.raw_model.buffers()] if _images(batch) == 0 else None
            # gradients are all-reduced once, on the last micro-batch
            with contextlib.nullcontext() if micro == t.grad_accum_steps - 1 else acc.no_sync(self.model):
                with acc.autocast():
                    loss, _ = soft_target_loss(self.model(images).logits, targets, self.head_sizes, t.label_smoothing,
                                               self.class_weights, dict(zip(self.head_sizes, share, strict=True)))
                finite = finite and bool(torch.isfinite(loss))
                acc.backward(loss / t.grad_accum_steps)
            if saved is not None:
                with torch.no_grad():
                    for live, kept in zip(self.raw_model.buffers(), saved, strict=True):
                        live.copy_(kept)
            local_loss += loss.detach().float() / t.grad_accum_steps
        if frozen:
            for p in self.raw_model.stem_parameters():
                p.grad = None
        # the same norm on every process after DDP's all-reduce; a non-finite one would write inf/NaN weights
        norm = acc.clip_grad_norm_(self.model.parameters(), t.grad_clip if t.grad_clip > 0 else math.inf)
        if acc.mixed_precision != "fp16":
            finite = finite and bool(torch.isfinite(norm))
        return local_loss, finite

    def _update(self, local_loss: torch.Tensor, finite: bool, state: TrainState) -> float | None:
        """Every process learns whether any saw a non-finite loss or gradient (then all skip the update) and the
        loss averaged over processes; returns that loss, or None for a skipped step."""
        after = self.accelerator.reduce(torch.stack([torch.tensor(float(not finite), device=self.device),
                                                     local_loss]), reduction="sum").tolist()
        if after[0] > 0:
            self.optimizer.zero_grad(set_to_none=True)
            state.nonfinite_in_row += 1
            state.nonfinite_steps += 1
            if state.nonfinite_in_row >= self.t.max_bad_steps:  # decided on global values: every process stops
                self.bad.flush(gather_object)
                raise NonFiniteLoss(nonfinite_message(self.run_dir, state.nonfinite_in_row, state.step))
            return None
        state.nonfinite_in_row = 0
        self.optimizer.step()
        if self.accelerator.optimizer_step_was_skipped:
            state.scaler_skips += 1  # fp16 loss scaling found inf gradients and lowered the scale
        else:
            self.scheduler.step()
            if self.ema is not None:
                self.ema.update_parameters(self.raw_model)
        self.optimizer.zero_grad(set_to_none=True)
        loss = after[1] / self.world
        state.epoch_loss_sum += loss
        state.epoch_applied_steps += 1
        return loss


def _images(batch: dict[str, Any]) -> int:
    """Images of a micro-batch that count in the loss (decoded, not padding)."""
    return int((batch["row"] >= 0).sum())


def nonfinite_message(out: Path, bad_in_row: int, step: int) -> str:
    """Why the run stops, and what is left to resume from (only checkpoints with finite weights are ever written)."""
    done = complete_checkpoints(out / CHECKPOINTS)
    left = (f"the last good checkpoint, {done[-1].name}, is intact (resume it with --resume latest to retry, e.g. "
            "after fixing the data); for a lower train.lr or train.mixed_precision=no start a new run in another "
            "--output-dir" if done else
            "no checkpoint was written (the weights were never finite at a checkpoint): start again with a lower "
            "train.lr (or train.mixed_precision=no)")
    return f"{bad_in_row} consecutive steps had a non-finite loss or gradient (step {step}); {left}"
