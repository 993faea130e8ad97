"""The training loop, top to bottom: data, model, optimiser, epochs, evaluation, model folders.

Read it like nanoGPT's train.py. A batch goes: ``GlobalDrawBatchSampler`` (this process's share
of the epoch's class-balanced draw) -> ``PaintingDataset`` (decode, augment with a per-slot seed)
-> one-hot targets per head -> MixUp/CutMix -> the CRNN -> soft-target loss per head -> backward
-> frozen-stem gradients dropped -> clip -> AdamW -> cosine schedule.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import broadcast, broadcast_object_list, gather_object, set_seed
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from crnn_art.bad_images import BadImages
from crnn_art.checkpoints import (
    CHECKPOINTS,
    HISTORY,
    CheckpointError,
    TrainState,
    complete_checkpoints,
    load_checkpoint,
    plan_resume,
    read_history,
    save_checkpoint,
    save_model_folder,
)
from crnn_art.config import RunConfig, config_text, flat_config
from crnn_art.evaluation import METRIC_KEYS, compute_metrics, fmt, predict, selection_score
from crnn_art.hub import push, write_model_card
from crnn_art.loaders import STREAMED, DrawnBatches, PaintingDataset, eval_loader, split_dataset
from crnn_art.mixing import BatchMixer, one_hot_targets, soft_target_loss
from crnn_art.model import CRNNArtClassifier
from crnn_art.runs import RunFolderError, RunLock, append_line, atomic_write_text, check_output_dir
from crnn_art.runtime import make_accelerator
from crnn_art.sampling import GlobalDrawBatchSampler, _mix_seed, balanced_weights, local_batch_size
from crnn_art.sources import DataError, make_splits, open_source, task_labels, write_splits
from crnn_art.streaming import balanced_class_weights, streamed_batches
from crnn_art.transforms import DeviceAugment, eval_resize, eval_transform, train_transform, worker_transform


def make_progress(console: Console, enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
        transient=True,
    )


def build_optimizer(model: CRNNArtClassifier, cfg: RunConfig, fused: bool = False) -> torch.optim.AdamW:
    """Two groups (SPEC §3): the pretrained trunk learns slower than the new modules."""
    groups = [
        {"params": model.backbone_parameters(), "lr": cfg.train.backbone_lr, "name": "backbone"},
        {"params": model.new_parameters(), "lr": cfg.train.lr, "name": "new"},
    ]
    return torch.optim.AdamW(groups, weight_decay=cfg.train.weight_decay, fused=fused or None)


def stem_trainable(cfg: RunConfig, epoch: int) -> bool:
    """Whether the stem (conv1, bn1) trains in this 1-based epoch."""
    if not cfg.train.freeze_stem:
        return True
    return cfg.train.unfreeze_epoch is not None and epoch >= cfg.train.unfreeze_epoch


def hold_frozen_stem(model: CRNNArtClassifier) -> None:
    """Keep a frozen stem's BatchNorm statistics fixed for this epoch (``model.train()`` resets it).

    Freezing itself happens in the step: the stem's gradients are dropped before the optimiser
    sees them. ``requires_grad`` is left on on purpose: DDP builds its reducer once, and
    parameters that stop producing gradients after that make it fail (or, with unused-parameter
    search, cost every step); discarding the stem's small gradient is simpler and exact.
    """
    model.stem_norm.eval()


class TrainingStopped(RuntimeError):
    """The run stopped before its end on purpose (a signal); ``exit_code`` is what the CLI returns."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class NonFiniteLoss(RuntimeError):
    """Too many consecutive steps with a NaN/inf loss; the last good checkpoint is untouched."""


class StopRequests:
    """SIGTERM (SLURM, Kubernetes) and SIGINT (Ctrl-C) ask the run to stop after the current step."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self.orphaned = False
        self._previous: dict[int, Any] = {}
        # under a launcher (torchrun / accelerate launch set LOCAL_RANK) a process whose launcher died
        # (SIGKILL) would train on unsupervised: its parent changing counts as SIGTERM
        self._parent = os.getppid() if "LOCAL_RANK" in os.environ else None

    @property
    def requested(self) -> int | None:
        """The signal that asked the run to stop, if any (checked once per step)."""
        if self.signal is None and self._parent is not None and os.getppid() != self._parent:
            self.signal, self.orphaned = signal.SIGTERM, True
        return self.signal

    def __enter__(self) -> StopRequests:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.signal = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _step_seed(seed: int, step: int, rank: int) -> int:
    """Dropout and mixing randomness of one optimizer step: a function of (seed, step, rank) only,
    so that a resumed run draws exactly what the uninterrupted one drew."""
    return _mix_seed(seed, 0x5EED, step, rank)


def train(cfg: RunConfig, output_dir: str | Path, resume: str | None = None) -> dict[str, Any]:
    """Run one training job (or continue one with ``resume``: ``latest``, a checkpoint folder, or
    ``auto`` = latest if the run has a checkpoint, else start).

    Nothing in the run folder is written before the resume is checked (``plan_resume``) and the
    folder is held (``RunLock``, main process, released on any exit). A finished run is left as it
    is. Returns the final validation metrics (also in ``metrics.json``).
    """
    t = cfg.train
    out = Path(output_dir)
    check_output_dir(out)
    accelerator = make_accelerator(
        t.mixed_precision,
        log_with=None if t.log_with == "none" else t.log_with,
        project_dir=str(out),
    )
    plan = plan_resume(cfg, out, resume)  # fail fast, before any data work or any write
    if plan.finished or plan.at_max_steps:
        return finish_run(accelerator, cfg, out, plan.finished)
    lock = _hold_run_folder(accelerator, out)
    try:
        return _train(cfg, out, accelerator, plan.checkpoint)
    finally:
        if lock is not None:
            lock.release()


def _hold_run_folder(accelerator, out: Path) -> RunLock | None:
    """The main process takes the run folder's lock; every process learns whether it could (then all stop alike)."""
    lock, problem = None, ""
    if accelerator.is_main_process:
        lock = RunLock(out)
        try:
            lock.acquire()
        except RunFolderError as exc:
            lock, problem = None, str(exc)
    problem = broadcast_object_list([problem])[0] if accelerator.num_processes > 1 else problem
    if problem:
        raise RunFolderError(problem)
    return lock


def finish_run(accelerator, cfg: RunConfig, out: Path, finished: bool) -> dict[str, Any]:
    """Nothing to train: the last checkpoint is past the final epoch (``finished``) or at ``train.max_steps``.
    Say so and change nothing; a finished run stopped before writing ``metrics.json`` gets it from its
    history (no retraining)."""
    console = Console(quiet=not accelerator.is_main_process, highlight=False)
    existing = out / "metrics.json"
    final = json.loads(existing.read_text()) if existing.is_file() else {}
    if not finished:
        console.print(f"{out} already stopped at train.max_steps={cfg.train.max_steps}: nothing to do; continue "
                      "with a larger --set train.max_steps=N (or train.max_steps=null for the whole run)")
    elif "loss" in final:
        console.print(f"{out} is a finished run ({cfg.train.epochs} epochs): nothing to do; its results are in "
                      f"{existing}. To train longer, start a new run (another --output-dir).")
    elif accelerator.is_main_process:
        final = _write_final(out, {}, cfg.heads)
        console.print(metrics_table(final, cfg.heads))
        console.print(f"{out} had finished training but not written metrics.json: written from history.jsonl")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return final


def _train(cfg: RunConfig, out: Path, accelerator, resume_from: Path | None) -> dict[str, Any]:
    t = cfg.train
    is_main = accelerator.is_main_process
    console = Console(quiet=not is_main, highlight=False)
    set_seed(t.seed)  # the same initial weights on every process

    # ---- data: source -> task labels -> split -> datasets -------------------------------------
    with accelerator.local_main_process_first():  # one process per machine generates/downloads first
        opened = open_source(cfg.data)
    source = opened.dataset  # streamed: the label columns only
    if opened.note:
        console.print(f"[yellow]note:[/] {opened.note}")
    labels = task_labels(source, cfg.heads, cfg.data)
    splits = make_splits(len(source), cfg.data, labels.known_rows(), opened.splits)
    if is_main and resume_from is None:  # a resume writes nothing until its checkpoint has loaded
        atomic_write_text(out / "config.yaml", config_text(cfg), "the run's config")
        write_splits(splits, out / "split.json", cfg.data)
    size = cfg.data.image_size
    train_side = max(eval_resize(size), math.ceil(size / math.sqrt(cfg.augment.crop_scale[0])))
    on_device = cfg.augment.on_device if cfg.augment.on_device is not None else accelerator.device.type == "cuda"
    augment = worker_transform(size, cfg.augment) if on_device else train_transform(size, cfg.augment)
    device_augment = DeviceAugment(cfg.augment) if on_device else None
    with accelerator.local_main_process_first():  # streamed: validation is read from the stream once
        val_set = split_dataset(opened, splits["validation"], labels.labels, eval_transform(size), eval_resize(size),
                                out / STREAMED, "validation", console)

    world, rank = accelerator.num_processes, accelerator.process_index
    class_weights = None
    try:
        local_batch = local_batch_size(t.batch_size, world, t.grad_accum_steps)
        if opened.stream is None:
            weights = balanced_weights(labels.labels[splits["train"]]) if t.balanced_sampling else None
            sampler = GlobalDrawBatchSampler(len(splits["train"]), t.batch_size, rank, world, t.seed, weights,
                                             accum=t.grad_accum_steps)
            train_set = PaintingDataset(source, splits["train"], labels.labels, augment, train_side)
            train_batches = DrawnBatches(train_set, sampler, cfg.data.num_workers)
        else:
            train_batches = streamed_batches(opened.stream, splits["train"], labels.labels, augment, train_side, cfg,
                                             rank, world, local_batch)
            plans = train_batches.plans
            if t.balanced_sampling:  # a stream cannot be drawn by weight: balance the loss instead
                class_weights = {h: w.to(accelerator.device) for h, w in
                                 balanced_class_weights(labels.labels[splits["train"]], labels.num_classes).items()}
    except ValueError as exc:
        raise DataError(str(exc)) from exc
    total_steps = sum(train_batches.steps(e) for e in range(1, t.epochs + 1))

    # ---- model, optimiser, schedule, EMA -------------------------------------------------------
    model = CRNNArtClassifier(
        heads=labels.num_classes,
        class_names=labels.class_names,
        backbone_weights=cfg.model.backbone_weights,
        image_size=size,
        proj_channels=cfg.model.proj_channels,
        gru_hidden=cfg.model.gru_hidden,
        gru_layers=cfg.model.gru_layers,
        gru_dropout=cfg.model.gru_dropout,
        dropout=cfg.model.dropout,
    )
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    raw_model = model
    fused = t.fused_adamw if t.fused_adamw is not None else accelerator.device.type in ("cpu", "cuda")
    optimizer = build_optimizer(model, cfg, fused)
    # The schedule spans the whole planned run (the seed's T_max=15 for 10 epochs was an oversight);
    # train.max_steps stops early without changing it, so a stopped run can be resumed exactly.
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps, eta_min=t.min_lr)
    model, optimizer = accelerator.prepare(model, optimizer)
    ema = None
    if t.ema_decay is not None:
        ema = AveragedModel(raw_model, multi_avg_fn=get_ema_multi_avg_fn(t.ema_decay), use_buffers=True)
    if cfg.model.compile_trunk:
        # In place (state_dict keys unchanged), after the EMA copy so the EMA model stays eager.
        raw_model.trunk.compile()
    val_loader = accelerator.prepare(eval_loader(val_set, t.eval_batch_size, cfg.data.num_workers))

    # ---- state: what a checkpoint holds besides weights, optimizer, scaler and RNG -----------------
    state = TrainState()
    if resume_from is not None:
        load_checkpoint(accelerator, resume_from, state, scheduler, ema)
        console.print(f"resumed from {resume_from}: epoch {state.epoch}, {state.batch} batches done, step {state.step}")
        if is_main:  # the same split (checked); the config may differ in the keys a resume may change
            atomic_write_text(out / "config.yaml", config_text(cfg), "the run's config")
    if is_main:
        _keep_history_before(out, state.epoch)
    if accelerator.log_with:
        state.tracker_run_id = state.tracker_run_id or f"{out.name}-{int(time.time())}"
        accelerator.init_trackers(t.project_name, config=_hparams(cfg),
                                  init_kwargs={"wandb": {"id": state.tracker_run_id, "resume": "allow"}})

    mixer = BatchMixer(cfg.augment)
    head_sizes = labels.num_classes
    hardware = (torch.cuda.get_device_name(accelerator.device) if accelerator.device.type == "cuda"
                else f"CPU ({os.cpu_count()} cores)")
    console.print(
        f"[bold]crnn-art[/] task={cfg.data.task} heads={head_sizes} source={cfg.data.source} "
        f"train={len(splits['train'])} val={len(val_set)} test={len(splits['test'])} | "
        f"{world} process(es) on {accelerator.device}, precision={accelerator.mixed_precision} | "
        f"batch {t.batch_size} ({local_batch}/process"
        + (f" in {t.grad_accum_steps} micro-batches" if t.grad_accum_steps > 1 else "")
        + f"), {train_batches.steps(1)} steps/epoch, {t.epochs} epochs"
        + (" | colour jitter/erasing on the device" if on_device else "")
        + (" | trunk compiled (the first steps and the first validation take longer)"
           if cfg.model.compile_trunk else "")
    )
    if opened.stream is not None:
        used = sum(p["steps"] for p in plans) * t.batch_size / (t.epochs * len(splits["train"]))
        console.print(f"streaming {len(opened.stream.pieces)} shards with a {cfg.data.shuffle_buffer}-row shuffle "
                      f"buffer; {total_steps} steps over {t.epochs} epochs use {100 * used:.0f}% of the training rows "
                      f"per epoch (equal steps on every process)"
                      + ("; classes balanced by loss weights" if class_weights else ""))

    # ---- epochs -------------------------------------------------------------------------------
    metrics: dict[str, Any] = {}
    bad_in_row = 0
    stop_reason = None
    bad = BadImages(out, cfg.data.max_bad_fraction, is_main)
    with StopRequests() as stops, make_progress(console, is_main) as progress:
        for epoch in range(state.epoch, t.epochs + 1):
            frozen = not stem_trainable(cfg, epoch)
            steps_per_epoch = train_batches.steps(epoch)
            state.start_epoch(epoch)
            model.train()
            if frozen:
                hold_frozen_stem(raw_model)
            task = progress.add_task(f"epoch {epoch}/{t.epochs}", total=steps_per_epoch, completed=state.batch,
                                     status="")
            t0, seconds_before = time.perf_counter(), state.epoch_seconds
            batches = train_batches.epoch(epoch, state.batch)
            rows_seen = []
            while state.batch < steps_per_epoch:
                # one optimizer step = grad_accum_steps micro-batches on every process
                torch.manual_seed(_step_seed(t.seed, state.step, rank))
                micro_batches = [next(batches) for _ in range(t.grad_accum_steps)]
                if cfg.data.log_rows:
                    rows_seen += [b["row"] for b in micro_batches]
                # before any forward, every process learns whether a micro-batch anywhere kept fewer than 2
                # decodable images (then all skip the step), how many images failed, and any stop request
                agreed = accelerator.reduce(torch.tensor(
                    [*bad.collect(micro_batches), float(stops.requested == signal.SIGTERM),
                     float(stops.requested == signal.SIGINT)], device=accelerator.device), reduction="sum").tolist()
                bad.count(int(agreed[1]), int(agreed[2]))
                state.epoch_skipped_images += int(agreed[1])
                step_loss = None
                if agreed[0] > 0:
                    state.data_skipped_steps += 1
                else:
                    local_loss = torch.zeros((), device=accelerator.device)
                    finite = True
                    for micro, batch in enumerate(micro_batches):
                        images = batch["image"].to(accelerator.device, non_blocking=True)
                        if device_augment is not None:  # uint8 crops -> jitter, normalise, erase here
                            images = device_augment(images, _mix_seed(t.seed, 0xA06, state.step, micro, rank))
                        targets = one_hot_targets(batch["labels"], list(head_sizes.values())).to(accelerator.device)
                        images, targets, _ = mixer(images, targets, _mix_seed(t.seed, state.step, micro, rank))
                        last_micro = micro == t.grad_accum_steps - 1
                        with contextlib.nullcontext() if last_micro else accelerator.no_sync(model):
                            with accelerator.autocast():
                                output = model(images)
                                loss, _ = soft_target_loss(output.logits, targets, head_sizes, t.label_smoothing,
                                                           class_weights)
                            finite = finite and bool(torch.isfinite(loss))
                            accelerator.backward(loss / t.grad_accum_steps)
                        local_loss += loss.detach().float() / t.grad_accum_steps
                    if frozen:
                        for p in raw_model.stem_parameters():
                            p.grad = None
                    # the gradient norm (clipped when train.grad_clip > 0) is the same on every process after
                    # DDP's all-reduce; a non-finite one would write inf/NaN weights. fp16 leaves that to its scaler.
                    norm = accelerator.clip_grad_norm_(model.parameters(),
                                                       t.grad_clip if t.grad_clip > 0 else math.inf)
                    if accelerator.mixed_precision != "fp16":
                        finite = finite and bool(torch.isfinite(norm))
                    # every process learns whether any process saw a non-finite loss or gradient, and the
                    # step's loss averaged over processes
                    after = accelerator.reduce(torch.stack([torch.tensor(float(not finite), device=accelerator.device),
                                                            local_loss]), reduction="sum").tolist()
                    if after[0] > 0:
                        optimizer.zero_grad(set_to_none=True)
                        bad_in_row += 1
                        state.nonfinite_steps += 1
                        if bad_in_row >= t.max_bad_steps:
                            raise NonFiniteLoss(_nonfinite_message(out, bad_in_row, state.step))
                    else:
                        bad_in_row = 0
                        optimizer.step()
                        if accelerator.optimizer_step_was_skipped:
                            state.scaler_skips += 1  # fp16 loss scaling found inf gradients and lowered the scale
                        else:
                            scheduler.step()
                            if ema is not None:
                                ema.update_parameters(raw_model)
                        optimizer.zero_grad(set_to_none=True)
                        step_loss = after[1] / world
                        state.epoch_loss_sum += step_loss
                        state.epoch_applied_steps += 1
                state.step += 1
                state.batch += 1
                state.epoch_seconds = seconds_before + time.perf_counter() - t0
                progress.advance(task)
                if step_loss is not None and (state.step % t.log_every == 0 or state.epoch_applied_steps == 1):
                    lr = scheduler.get_last_lr()
                    progress.update(task, status=f"loss {step_loss:.3f} lr {lr[1]:.2e}")
                    accelerator.log({"train/loss": step_loss, "train/lr": lr[1], "train/backbone_lr": lr[0],
                                     "train/images_per_s": _images_per_s(state, t.batch_size)}, step=state.step)
                if agreed[3] + agreed[4] > 0:  # every process stops here, with the signal one of them received
                    stops.signal = stops.signal or (signal.SIGINT if agreed[4] > 0 else signal.SIGTERM)
                    stop_reason = "signal"
                    break
                if bad.too_many(epoch_end=False):
                    stop_reason = "bad_images"
                    break
                if t.max_steps is not None and state.step >= t.max_steps:
                    stop_reason = "max_steps"
                    break
                if t.checkpoint_every_steps and state.step % t.checkpoint_every_steps == 0 \
                        and state.batch < steps_per_epoch:
                    _checkpoint(accelerator, out, state, t.keep_last, scheduler, ema, model, console)
            progress.remove_task(task)
            del batches
            if cfg.data.log_rows and rows_seen:
                (out / "rows").mkdir(parents=True, exist_ok=True)
                np.save(out / "rows" / f"epoch{epoch:03d}-from{state.step:08d}-rank{rank}.npy",
                        torch.cat(rows_seen).numpy())
            bad.flush(gather_object)
            epoch_done = state.batch >= steps_per_epoch
            if stop_reason is None and epoch_done and bad.too_many(epoch_end=True):
                stop_reason = "bad_images"
            if stop_reason in ("signal", "bad_images") or (stop_reason == "max_steps" and not epoch_done):
                # before evaluating: resume starts here
                _checkpoint(accelerator, out, state, t.keep_last, scheduler, ema, model, console)
            if stop_reason == "signal":
                break
            if stop_reason == "bad_images":
                raise DataError(bad.stop_message(f"continue with the same command plus --resume latest "
                                                 f"--output-dir {out}"))
            train_loss = state.epoch_loss_sum / state.epoch_applied_steps if state.epoch_applied_steps else None

            metrics = compute_metrics(predict(model, val_loader, accelerator, cfg.heads, progress), cfg.heads)
            metrics.update(epoch=epoch, step=state.step)
            ema_metrics = None
            if ema is not None:
                _same_ema_everywhere(accelerator, ema)
                ema_metrics = compute_metrics(predict(ema.module, val_loader, accelerator, cfg.heads, progress),
                                              cfg.heads)
            score = selection_score(metrics, cfg.heads)
            improved = epoch_done and score > state.best_score
            if improved:
                state.best_score = score
            lr = scheduler.get_last_lr()
            record = {
                "epoch": epoch, "step": state.step, "train_loss": train_loss, "lr": lr[1], "backbone_lr": lr[0],
                "images_per_s": _images_per_s(state, t.batch_size), "epoch_seconds": state.epoch_seconds,
                "stem_frozen": frozen, "processes": world, "hardware": hardware,
                "skipped_train": state.epoch_skipped_images, "data_skipped_steps": state.data_skipped_steps,
                "nonfinite_steps": state.nonfinite_steps, "scaler_skips": state.scaler_skips,
                "partial": not epoch_done,
                "val": {k: v for k, v in metrics.items() if k not in ("epoch", "step")},
                **({"val_ema": ema_metrics} if ema_metrics else {}),
            }
            accelerator.log({f"val/{k}": metrics[k] for k in METRIC_KEYS if metrics[k] is not None}
                            | ({"train/epoch_loss": train_loss} if train_loss is not None else {})
                            | ({f"val_ema/{k}": ema_metrics[k] for k in METRIC_KEYS if ema_metrics[k] is not None}
                               if ema_metrics else {}),
                            step=state.step)
            accelerator.wait_for_everyone()
            if is_main:
                append_line(out / HISTORY, json.dumps(record), "the history")
                unwrapped = accelerator.unwrap_model(model)
                info = {"epoch": epoch, "step": state.step, "metrics": metrics, "task": cfg.data.task}
                saved = []
                if _all_finite(unwrapped):  # never replace a model folder with inf/NaN weights
                    saved.append(save_model_folder(unwrapped, out / "last", info))
                    if improved:
                        saved.append(save_model_folder(unwrapped, out / "best", info))
                if ema is not None and _all_finite(ema.module):
                    saved.append(save_model_folder(ema.module, out / "last_ema",
                                                   {**info, "metrics": ema_metrics, "ema": True}))
                for folder in saved:  # the card a Hub user would read, in every model folder
                    write_model_card(out, folder)
            if epoch_done:
                state.start_epoch(epoch + 1)
                if improved:
                    state.best_step = state.step
                _checkpoint(accelerator, out, state, t.keep_last, scheduler, ema, model, console)
            console.print(_summary_line(epoch, t.epochs, record, metrics, improved))
            if stop_reason == "max_steps":
                console.print(f"stopped after {state.step} optimizer steps (train.max_steps={t.max_steps}); "
                              "continue with --resume latest")
                break

    if stop_reason == "signal":
        name = signal.Signals(stops.signal).name + (" (the launcher is gone)" if stops.orphaned else "")
        accelerator.end_training()
        raise TrainingStopped(
            f"stopped by {name} at step {state.step} (epoch {state.epoch}, batch {state.batch}/{steps_per_epoch}); "
            f"checkpoint saved: continue with the same command plus --resume latest --output-dir {out}",
            exit_code=128 + int(stops.signal),
        )
    final = dict(metrics)
    if is_main:
        final = _write_final(out, metrics, cfg.heads)
        console.print(metrics_table(final, cfg.heads))
        saved = [n for n in ("best/", "last/", "last_ema/", "metrics.json", "history.jsonl", "config.yaml",
                             "split.json", f"{CHECKPOINTS}/") if (out / n).exists()]
        console.print(f"run saved in {out}/: {', '.join(saved)}")
    accelerator.wait_for_everyone()
    if is_main and cfg.hub.push_to_hub:
        url = push(out, cfg.hub.push_to_hub, private=cfg.hub.private, revision=cfg.hub.revision)
        console.print(f"pushed to the Hub: {url}")
    accelerator.end_training()
    return final


def _same_ema_everywhere(accelerator, ema: AveragedModel) -> None:
    """Give every process the main process's EMA buffers before the EMA is evaluated or saved.

    The EMA's weights are the same everywhere (DDP keeps the model's weights equal), but with
    ``use_buffers=True`` each process averages its own BatchNorm running statistics, which follow its
    own batches. Without this, each process would evaluate its rows with a different EMA model and
    ``val_ema`` would belong to no saved model; ``last_ema/`` and checkpoints hold the main process's.
    """
    if accelerator.num_processes > 1:
        broadcast(list(ema.module.buffers()), from_process=0)


def _images_per_s(state: TrainState, batch_size: int) -> float:
    """Training throughput of the epoch so far: images of the applied steps per second of training."""
    return state.epoch_applied_steps * batch_size / max(state.epoch_seconds, 1e-9)


def _hparams(cfg: RunConfig) -> dict[str, Any]:
    """The config as trackers accept hyperparameters: dotted keys, lists and nulls as strings."""
    return {k: str(v) if isinstance(v, list) or v is None else v for k, v in flat_config(cfg.to_dict()).items()}


def _keep_history_before(out: Path, epoch: int) -> None:
    """On (re)start, keep only whole epochs before the one in progress (drops a stopped run's partial line)."""
    kept = [r for r in read_history(out) if r["epoch"] < epoch and not r.get("partial")]
    atomic_write_text(out / HISTORY, "".join(json.dumps(r) + "\n" for r in kept), "the history")


def _write_final(out: Path, metrics: dict[str, Any], heads: tuple[str, ...]) -> dict[str, Any]:
    """``metrics.json``: the final epoch's validation metrics (from the history when this process ran no epoch)
    and the best whole epoch's."""
    final = dict(metrics)
    if not final:
        whole = [r for r in read_history(out) if not r.get("partial")]
        if not whole:
            raise CheckpointError(f"{out / HISTORY} holds no finished epoch; the run cannot be summarised")
        final = {**whole[-1]["val"], "epoch": whole[-1]["epoch"], "step": whole[-1]["step"]}
    final["best"] = _best_from_history(out, heads)
    atomic_write_text(out / "metrics.json", json.dumps(final, indent=2), "metrics.json")
    return final


def _nonfinite_message(out: Path, bad_in_row: int, step: int) -> str:
    """Why the run stops, and what is left to resume from (only checkpoints with finite weights are ever written)."""
    done = complete_checkpoints(out / CHECKPOINTS)
    left = (f"the last good checkpoint, {done[-1].name}, is intact (resume it with --resume latest to retry, e.g. "
            "after fixing the data); for a lower train.lr or train.mixed_precision=no start a new run in another "
            "--output-dir" if done else
            "no checkpoint was written (the weights were never finite at a checkpoint): start again with a lower "
            "train.lr (or train.mixed_precision=no)")
    return f"{bad_in_row} consecutive steps had a non-finite loss or gradient (step {step}); {left}"


def _all_finite(module: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in module.state_dict().values() if t.is_floating_point())


def _checkpoint(accelerator, out: Path, state: TrainState, keep_last: int, scheduler, ema, model,
                console: Console) -> None:
    """Save a checkpoint only when every process's weights (and EMA) are finite, so that rotation never
    replaces the last good checkpoint with a broken one."""
    finite = _all_finite(model) and (ema is None or _all_finite(ema))
    if accelerator.reduce(torch.tensor(float(not finite), device=accelerator.device), reduction="sum") > 0:
        console.print(f"[yellow]warning:[/] the weights at step {state.step} are not finite: no checkpoint written, "
                      "the earlier ones are kept")
        return
    save_checkpoint(accelerator, out, state, keep_last, scheduler, ema)


def _best_from_history(out: Path, heads: tuple[str, ...]) -> dict[str, Any] | None:
    """The best whole epoch's validation metrics (a resumed run did not see the earlier epochs itself)."""
    best = None
    for record in read_history(out):
        if record.get("partial"):
            continue
        metrics = {**record["val"], "epoch": record["epoch"], "step": record["step"]}
        if best is None or selection_score(metrics, heads) > selection_score(best, heads):
            best = metrics
    return best


def _summary_line(epoch: int, epochs: int, record: dict, metrics: dict, improved: bool) -> str:
    mark = " [green]* best[/]" if improved else ""
    return (
        f"epoch {epoch}/{epochs} | "
        + (f"train loss {record['train_loss']:.3f}" if record["train_loss"] is not None
           else "train loss n/a (no step applied: every step was skipped, non-finite or undecodable)")
        + f" | val loss {metrics['loss']:.3f} "
        f"top1 {metrics['top1']:.1f} top5 {fmt(metrics['top5'], 1)} macroF1 {metrics['macro_f1']:.1f} "
        f"weightedF1 {metrics['weighted_f1']:.1f}"
        + (f" joint {metrics['joint_exact_match']:.1f}" if "joint_exact_match" in metrics else "")
        + f" | lr {record['lr']:.2e} | {record['images_per_s']:.0f} img/s | {record['epoch_seconds']:.0f} s"
        + (f" | skipped {record['skipped_train']} train, {metrics['skipped']} val undecodable"
           if record["skipped_train"] or metrics.get("skipped") else "")
        + mark
    )


def metrics_table(metrics: dict[str, Any], heads: tuple[str, ...]) -> Table:
    """A rich table of final (and best) validation metrics, one row per head for combined runs."""
    table = Table(title="validation metrics (%; loss is cross-entropy)")
    table.add_column("")
    for key in METRIC_KEYS:
        table.add_column(key, justify="right")
    table.add_column("samples", justify="right")

    def row(name: str, m: dict[str, Any]) -> None:
        table.add_row(name, *[fmt(m[k], 3 if k == "loss" else 2) for k in METRIC_KEYS],
                      str(m.get("num_samples", "")))

    row(f"final (epoch {metrics['epoch']})" if metrics.get("epoch") else metrics.get("split", "all"), metrics)
    for head, m in metrics.get("heads", {}).items():
        row(f"  {head}", m)
    best = metrics.get("best")
    if best:
        row(f"best (epoch {best.get('epoch')})", best)
    if "joint_exact_match" in metrics:
        table.caption = f"joint exact match {metrics['joint_exact_match']:.2f}% on {metrics['joint_samples']} samples"
    return table


def per_class_table(head: str, per_class: dict[str, dict[str, float]]) -> Table:
    table = Table(title=f"{head}: per class (%)")
    table.add_column("class")
    for key in ("precision", "recall", "f1", "support"):
        table.add_column(key, justify="right")
    for name, m in per_class.items():
        table.add_row(name, f"{m['precision']:.1f}", f"{m['recall']:.1f}", f"{m['f1']:.1f}", str(m["support"]))
    return table
