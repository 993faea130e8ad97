"""The training loop, top to bottom: data, model, optimiser, epochs of "step, log, checkpoint, evaluate,
record", and the model folders.

Read it like nanoGPT's train.py. The data is built by ``run_data.build_train_data`` (source -> labels ->
split -> batches) and one optimizer step is ``train_step.TrainStep`` (micro-batches -> augment -> MixUp/CutMix
-> the CRNN -> soft-target loss -> backward -> clip -> AdamW -> schedule -> EMA).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import broadcast, broadcast_object_list, gather_object, set_seed
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from crnn_art.backbones import backbone_problem, frozen_stem_note, normalization
from crnn_art.checkpoints import (
    CHECKPOINTS,
    HISTORY,
    TrainState,
    load_checkpoint,
    plan_resume,
    read_history,
    save_checkpoint,
    save_model_folder,
)
from crnn_art.config import RunConfig, config_text, flat_config
from crnn_art.console import fmt, make_console, make_progress, metrics_table
from crnn_art.data.bad_images import BadImages
from crnn_art.data.build import TrainData, build_train_data
from crnn_art.data.loaders import eval_loader
from crnn_art.errors import CheckpointError, ConfigError, DataError, RunFolderError, TrainingStopped, first_line
from crnn_art.evaluation.metrics import METRIC_KEYS, compute_metrics, gather_predictions, selection_score
from crnn_art.hub import push, write_model_card
from crnn_art.model import CRNNArtClassifier
from crnn_art.runs import RunLock, append_line, atomic_write_text, check_output_dir
from crnn_art.runtime import CpuPlan, fit_to_cores, make_accelerator
from crnn_art.training.step import StepResult, TrainStep


def build_optimizer(model: CRNNArtClassifier, cfg: RunConfig, fused: bool = False) -> torch.optim.AdamW:
    """Two groups (docs/model-and-recipe.md): the pretrained trunk learns slower than the new modules."""
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
    for norm in model.stem_norms():
        norm.eval()


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
    problem = backbone_problem(cfg.model.backbone)  # timm installed, the model known: before any data work
    if problem:
        raise ConfigError(problem)
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
    console = make_console(accelerator.is_main_process)
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
        console.print(metrics_table(final, cfg.heads, METRIC_KEYS))
        console.print(f"{out} had finished training but not written metrics.json: written from history.jsonl")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return final


def _train(cfg: RunConfig, out: Path, accelerator, resume_from: Path | None) -> dict[str, Any]:
    t, is_main = cfg.train, accelerator.is_main_process
    console = make_console(is_main)
    set_seed(t.seed)  # the same initial weights on every process
    cpu = fit_to_cores(cfg.data.num_workers)  # workers and threads from the cores this process has

    # ---- data: source -> labels -> split -> validation set and this process's batches ------------
    normal = normalization(cfg.model.backbone)  # the backbone's input mean and std
    data = build_train_data(cfg, accelerator, out, resume_from is None, cpu.workers, console, normal)

    # ---- model, optimiser, schedule, EMA -------------------------------------------------------
    model = raw_model = build_model(cfg, data, normal)
    fused = t.fused_adamw if t.fused_adamw is not None else accelerator.device.type in ("cpu", "cuda")
    optimizer = build_optimizer(model, cfg, fused)
    # the schedule spans the whole planned run; train.max_steps stops early without changing it
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=data.total_steps, eta_min=t.min_lr)
    model, optimizer = accelerator.prepare(model, optimizer)
    ema = make_ema(raw_model, t.ema_decay)
    if cfg.model.compile_trunk:  # in place (state_dict keys unchanged), after the EMA copy: the EMA stays eager
        raw_model.trunk.compile()
    val_loader = accelerator.prepare(eval_loader(data.val_set, t.eval_batch_size, cpu.workers))

    # ---- state: what a checkpoint holds besides weights, optimiser, scaler and RNG ----------------
    state = TrainState()
    if resume_from is not None:
        saved_by = load_checkpoint(accelerator, resume_from, state, scheduler, ema)
        console.print(resumed_line(resume_from, state, saved_by, accelerator.num_processes))
    begin_run(accelerator, cfg, out, state, resume_from is not None)
    stem = frozen_stem_note(raw_model.trunk, cfg.model.backbone) if t.freeze_stem else None
    for line in [*data.notes, *([stem] if stem else []), start_line(cfg, data, accelerator, cpu)]:
        console.print(line)

    # ---- epochs: step, log, checkpoint, evaluate, record ------------------------------------------
    bad = BadImages(out, cfg.data.max_bad_fraction, is_main)
    step = TrainStep(accelerator, model, raw_model, optimizer, scheduler, ema, cfg, data.labels.num_classes,
                     data.class_weights, data.device_augment, bad, out)
    save = Checkpointer(accelerator, out, state, t.keep_last, scheduler, ema, model, console, bad)
    metrics: dict[str, Any] = {}
    stop = None
    with StopRequests() as stops, make_progress(console, is_main) as progress:
        for epoch in range(state.epoch, t.epochs + 1):
            steps = data.train_batches.steps(epoch)
            frozen = begin_epoch(cfg, model, raw_model, state, epoch)
            task = progress.add_task(f"epoch {epoch}/{t.epochs}", total=steps, completed=state.batch, status="")
            # set up now: the step's seeded RNG must not see it
            batches = data.train_batches.epoch(epoch, state.batch, state.stream_legs)
            t0, seconds_before, rows_seen = time.perf_counter(), state.epoch_seconds, []
            while state.batch < steps:
                result = step(batches, state, frozen, stops.requested)
                state.epoch_seconds = seconds_before + time.perf_counter() - t0
                if cfg.data.log_rows:
                    rows_seen += result.rows
                progress.advance(task)
                log_step(accelerator, progress, task, state, result, scheduler, t)
                stop = stop_reason(result, stops, bad, state, t.max_steps)
                if stop:
                    break
                if t.checkpoint_every_steps and state.step % t.checkpoint_every_steps == 0 and state.batch < steps:
                    save()
            progress.remove_task(task)
            del batches
            epoch_done = state.batch >= steps
            if cfg.data.log_rows:
                save_rows(out, epoch, state.step, accelerator.process_index, rows_seen)
            stop = end_steps(stop, epoch_done, bad, save, out)  # a checkpoint first if the run stops mid-epoch
            if stop == "signal":
                break

            # ---- evaluate, record, keep the models ----
            metrics, ema_metrics = evaluate_epoch(accelerator, model, ema, val_loader, cfg.heads, progress)
            record, improved = record_epoch(accelerator, cfg, out, state, model, ema, metrics, ema_metrics,
                                            epoch_done, frozen, scheduler)
            if epoch_done:
                state.start_epoch(epoch + 1)
                if improved:
                    state.best_step = state.step
                save()
            console.print(summary_line(epoch, t.epochs, record, metrics, improved))
            if stop == "max_steps":
                console.print(f"stopped after {state.step} optimizer steps (train.max_steps={t.max_steps}); "
                              "continue with --resume latest")
                break

    if stop == "signal":
        accelerator.end_training()
        raise stopped_by_signal(stops, state, data.train_batches.steps(state.epoch), out)
    return finish(accelerator, cfg, out, metrics, console)


def build_model(cfg: RunConfig, data: TrainData, normal: tuple) -> CRNNArtClassifier:
    """The CRNN for the run's heads and classes (``channels_last`` when ``model.channels_last``)."""
    m = cfg.model
    model = CRNNArtClassifier(heads=data.labels.num_classes, class_names=data.labels.class_names,
                              backbone=m.backbone, backbone_weights=m.backbone_weights, image_size=cfg.data.image_size,
                              proj_channels=m.proj_channels, gru_hidden=m.gru_hidden, gru_layers=m.gru_layers,
                              gru_dropout=m.gru_dropout, dropout=m.dropout, mean=normal[0], std=normal[1])
    return model.to(memory_format=torch.channels_last) if m.channels_last else model


def make_ema(model: CRNNArtClassifier, decay: float | None) -> AveragedModel | None:
    """An exponential moving average of the weights and BatchNorm statistics, or None (``train.ema_decay``)."""
    if decay is None:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def begin_run(accelerator, cfg: RunConfig, out: Path, state: TrainState, resumed: bool) -> None:
    """After the checkpoint (if any) loaded: the run's config (a resume may change some keys), whole epochs of
    history only, and the trackers under a run id that survives resumes."""
    if accelerator.is_main_process:
        if resumed:  # the same split (checked); the config may differ in the keys a resume may change
            atomic_write_text(out / "config.yaml", config_text(cfg), "the run's config")
        _keep_history_before(out, state.epoch)
    if accelerator.log_with:
        state.tracker_run_id = state.tracker_run_id or f"{out.name}-{int(time.time())}"
        accelerator.init_trackers(cfg.train.project_name, config=_hparams(cfg),
                                  init_kwargs={"wandb": {"id": state.tracker_run_id, "resume": "allow"}})


def resumed_line(path: Path, state: TrainState, saved_by: int, world: int) -> str:
    """Where a resumed run continues, and on how many processes when that changed (an elastic resume)."""
    where = f"epoch {state.epoch}, {state.batch} batches done, step {state.step}"
    if saved_by == world:
        return f"resumed from {path}: {where}"
    return (f"resumed from {saved_by} process(es) on {world}: {path}, {where}; the same global batch, the rest "
            "of the epoch's rows, the schedule at the same step")


def start_line(cfg: RunConfig, data: TrainData, accelerator, cpu: CpuPlan) -> str:
    """The line that says what this run is: task, data, processes, device, precision, batch, schedule."""
    t = cfg.train
    return (
        f"[bold]crnn-art[/] task={cfg.data.task} heads={data.labels.num_classes} source={cfg.data.source} "
        f"train={len(data.splits['train'])} val={len(data.val_set)} test={len(data.splits['test'])} | "
        f"{accelerator.num_processes} process(es) on {accelerator.device}, "
        f"precision={accelerator.mixed_precision} | batch {t.batch_size} ({data.local_batch}/process"
        + (f" in {t.grad_accum_steps} micro-batches" if t.grad_accum_steps > 1 else "")
        + f"), {data.train_batches.steps(1)} steps/epoch, {t.epochs} epochs | {cpu.describe()}"
        + (" | colour jitter/erasing on the device" if data.device_augment is not None else "")
        + (" | trunk compiled (the first steps and the first validation take longer)"
           if cfg.model.compile_trunk else "")
    )


def begin_epoch(cfg: RunConfig, model, raw_model: CRNNArtClassifier, state: TrainState, epoch: int) -> bool:
    """Enter ``epoch`` (its running sums restart unless a checkpoint stopped in it); train mode, with a frozen
    stem's BatchNorm statistics held. Returns whether the stem is frozen in this epoch."""
    state.start_epoch(epoch)
    model.train()
    frozen = not stem_trainable(cfg, epoch)
    if frozen:
        hold_frozen_stem(raw_model)
    return frozen


def log_step(accelerator, progress, task, state: TrainState, result: StepResult, scheduler, t) -> None:
    """Every ``train.log_every`` applied steps (and the epoch's first): the progress bar and the trackers."""
    if result.loss is None or not (state.step % t.log_every == 0 or state.epoch_applied_steps == 1):
        return
    lr = scheduler.get_last_lr()
    progress.update(task, status=f"loss {result.loss:.3f} lr {lr[1]:.2e}")
    accelerator.log({"train/loss": result.loss, "train/lr": lr[1], "train/backbone_lr": lr[0],
                     "train/images_per_s": _images_per_s(state, t.batch_size)}, step=state.step)


def stop_reason(result: StepResult, stops: StopRequests, bad: BadImages, state: TrainState,
                max_steps: int | None) -> str | None:
    """Why the epoch stops after this step, the same on every process: "signal", "bad_images", "max_steps"."""
    if result.stop_signal is not None:  # every process stops here, with the signal one of them received
        stops.signal = stops.signal or result.stop_signal
        return "signal"
    if bad.too_many(epoch_end=False):
        return "bad_images"
    if max_steps is not None and state.step >= max_steps:
        return "max_steps"
    return None


def end_steps(stop: str | None, epoch_done: bool, bad: BadImages, save: Checkpointer, out: Path) -> str | None:
    """After the epoch's steps: a run that stops before evaluating (a signal, too many undecodable images, or
    train.max_steps mid-epoch) is checkpointed there, where a resume starts. Too many undecodable images then
    raise ``DataError``; returns why the run stops, if it does."""
    if stop is None and epoch_done and bad.too_many(epoch_end=True):
        stop = "bad_images"
    if stop in ("signal", "bad_images") or (stop == "max_steps" and not epoch_done):
        save(bad_images_stop=stop == "bad_images")
    if stop == "bad_images":
        raise DataError(bad.stop_message(f"continue with the same command plus --resume latest --output-dir {out}"))
    return stop


def save_rows(out: Path, epoch: int, step: int, rank: int, rows: list[torch.Tensor]) -> None:
    """``data.log_rows``: the row ids this process trained on in this (part of an) epoch."""
    if rows:
        (out / "rows").mkdir(parents=True, exist_ok=True)
        np.save(out / "rows" / f"epoch{epoch:03d}-from{step:08d}-rank{rank}.npy", torch.cat(rows).numpy())


class Checkpointer:
    """``save()`` writes a checkpoint of the run's state when every process's weights are finite (so rotation
    never replaces the last good checkpoint with a broken one), after listing the undecodable files seen since
    the last one. Every process calls it at the same step."""

    def __init__(self, accelerator, out: Path, state: TrainState, keep_last: int, scheduler, ema, model, console,
                 bad: BadImages) -> None:
        self.accelerator, self.out, self.state, self.keep_last = accelerator, out, state, keep_last
        self.scheduler, self.ema, self.model, self.console, self.bad = scheduler, ema, model, console, bad

    def __call__(self, bad_images_stop: bool = False) -> None:
        self.bad.flush(gather_object)
        if bad_images_stop:  # the user acts on the list before resuming: judge the resumed run afresh
            self.bad.reset(self.state)
        finite = _all_finite(self.model) and (self.ema is None or _all_finite(self.ema))
        device = self.accelerator.device
        if self.accelerator.reduce(torch.tensor(float(not finite), device=device), reduction="sum") > 0:
            self.console.print(f"[yellow]warning:[/] the weights at step {self.state.step} are not finite: no "
                               "checkpoint written, the earlier ones are kept")
            return
        save_checkpoint(self.accelerator, self.out, self.state, self.keep_last, self.scheduler, self.ema)


def evaluate_epoch(accelerator, model, ema, val_loader, heads: tuple[str, ...],
                   progress) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Validation metrics of the model and, with EMA, of the EMA model (the main process's, as saved)."""
    metrics = compute_metrics(gather_predictions(model, val_loader, accelerator, heads, progress), heads)
    if ema is None:
        return metrics, None
    _same_ema_everywhere(accelerator, ema)
    return metrics, compute_metrics(gather_predictions(ema.module, val_loader, accelerator, heads, progress), heads)


def record_epoch(accelerator, cfg: RunConfig, out: Path, state: TrainState, model, ema, metrics: dict,
                 ema_metrics: dict | None, epoch_done: bool, frozen: bool, scheduler) -> tuple[dict, bool]:
    """The epoch's line in ``history.jsonl`` and the trackers, and the model folders ``last/``, ``best/`` (when
    it improved a whole epoch) and ``last_ema/``, each with its model card. Returns the line and whether it
    improved."""
    t = cfg.train
    score = selection_score(metrics, cfg.heads)
    improved = epoch_done and score > state.best_score
    if improved:
        state.best_score = score
    lr = scheduler.get_last_lr()
    train_loss = state.epoch_loss_sum / state.epoch_applied_steps if state.epoch_applied_steps else None
    record = {
        "epoch": state.epoch, "step": state.step, "train_loss": train_loss, "lr": lr[1], "backbone_lr": lr[0],
        "images_per_s": _images_per_s(state, t.batch_size), "epoch_seconds": state.epoch_seconds,
        "stem_frozen": frozen, "processes": accelerator.num_processes, "hardware": _hardware(accelerator),
        "skipped_train": state.epoch_skipped_images, "data_skipped_steps": state.data_skipped_steps,
        "nonfinite_steps": state.nonfinite_steps, "scaler_skips": state.scaler_skips, "partial": not epoch_done,
        "val": dict(metrics), **({"val_ema": ema_metrics} if ema_metrics else {}),
    }
    metrics.update(epoch=state.epoch, step=state.step)
    accelerator.log({f"val/{k}": metrics[k] for k in METRIC_KEYS if metrics[k] is not None}
                    | ({"train/epoch_loss": train_loss} if train_loss is not None else {})
                    | ({f"val_ema/{k}": ema_metrics[k] for k in METRIC_KEYS if ema_metrics[k] is not None}
                       if ema_metrics else {}), step=state.step)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        append_line(out / HISTORY, json.dumps(record), "the history")
        _save_model_folders(accelerator.unwrap_model(model), ema, out, improved,
                            {"epoch": state.epoch, "step": state.step, "metrics": metrics, "task": cfg.data.task},
                            ema_metrics)
    return record, improved


def _save_model_folders(model, ema, out: Path, improved: bool, info: dict, ema_metrics: dict | None) -> None:
    saved = []
    if _all_finite(model):  # never replace a model folder with inf/NaN weights
        saved.append(save_model_folder(model, out / "last", info))
        if improved:
            saved.append(save_model_folder(model, out / "best", info))
    if ema is not None and _all_finite(ema.module):
        saved.append(save_model_folder(ema.module, out / "last_ema", {**info, "metrics": ema_metrics, "ema": True}))
    for folder in saved:  # the card a Hub user would read, in every model folder
        try:
            write_model_card(out, folder)
        except Exception as exc:  # noqa: BLE001 - a card is not worth a run: the other processes wait on this one
            print(f"crnn-art: warning: the model card of {folder} was not written ({type(exc).__name__}: "
                  f"{first_line(exc)}); `crnn-art push --dry-run` writes it at upload", file=sys.stderr)


def _hardware(accelerator) -> str:
    if accelerator.device.type == "cuda":
        return torch.cuda.get_device_name(accelerator.device)
    return f"CPU ({os.cpu_count()} cores)"


def stopped_by_signal(stops: StopRequests, state: TrainState, steps: int, out: Path) -> TrainingStopped:
    name = signal.Signals(stops.signal).name + (" (the launcher is gone)" if stops.orphaned else "")
    return TrainingStopped(
        f"stopped by {name} at step {state.step} (epoch {state.epoch}, batch {state.batch}/{steps}); "
        f"checkpoint saved: continue with the same command plus --resume latest --output-dir {out}",
        exit_code=128 + int(stops.signal),
    )


def finish(accelerator, cfg: RunConfig, out: Path, metrics: dict[str, Any], console) -> dict[str, Any]:
    """``metrics.json`` (the final and the best epoch), the table, where everything went, and the Hub push
    (``hub.push_to_hub``) from the main process once every process is done."""
    final = dict(metrics)
    if accelerator.is_main_process:
        final = _write_final(out, metrics, cfg.heads)
        console.print(metrics_table(final, cfg.heads, METRIC_KEYS))
        saved = [n for n in ("best/", "last/", "last_ema/", "metrics.json", "history.jsonl", "config.yaml",
                             "split.json", f"{CHECKPOINTS}/", "bad_images.tsv") if (out / n).exists()]
        console.print(f"run saved in {out}/: {', '.join(saved)}")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and cfg.hub.push_to_hub:
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


def _all_finite(module: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in module.state_dict().values() if t.is_floating_point())


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


def summary_line(epoch: int, epochs: int, record: dict, metrics: dict, improved: bool) -> str:
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
