"""The training loop, top to bottom: data, model, optimiser, epochs, evaluation, model folders.

Read it like nanoGPT's train.py. A batch goes: ``GlobalDrawBatchSampler`` (this process's share
of the epoch's class-balanced draw) -> ``PaintingDataset`` (decode, augment with a per-slot seed)
-> one-hot targets per head -> MixUp/CutMix -> the CRNN -> soft-target loss per head -> backward
-> frozen-stem gradients dropped -> clip -> AdamW -> cosine schedule.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
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

from crnn_art.checkpoints import save_model_folder
from crnn_art.config import RunConfig, save_config
from crnn_art.evaluation import METRIC_KEYS, compute_metrics, predict, selection_score
from crnn_art.loaders import PaintingDataset, eval_loader, train_loader
from crnn_art.mixing import BatchMixer, one_hot_targets, soft_target_loss
from crnn_art.model import CRNNArtClassifier
from crnn_art.runtime import make_accelerator
from crnn_art.sampling import GlobalDrawBatchSampler, _mix_seed, balanced_weights
from crnn_art.sources import make_splits, open_source, task_labels, write_splits
from crnn_art.transforms import eval_resize, eval_transform, train_transform


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


def build_optimizer(model: CRNNArtClassifier, cfg: RunConfig) -> torch.optim.AdamW:
    """Two groups (SPEC §3): the pretrained trunk learns slower than the new modules."""
    groups = [
        {"params": model.backbone_parameters(), "lr": cfg.train.backbone_lr, "name": "backbone"},
        {"params": model.new_parameters(), "lr": cfg.train.lr, "name": "new"},
    ]
    return torch.optim.AdamW(groups, weight_decay=cfg.train.weight_decay)


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


def train(cfg: RunConfig, output_dir: str | Path) -> dict[str, Any]:
    """Run one training job; returns the final validation metrics (also in ``metrics.json``)."""
    t = cfg.train
    accelerator = make_accelerator(t.mixed_precision)
    is_main = accelerator.is_main_process
    console = Console(quiet=not is_main, highlight=False)
    out = Path(output_dir)
    set_seed(t.seed)  # the same initial weights on every process

    # ---- data: source -> task labels -> split -> datasets -------------------------------------
    with accelerator.main_process_first():  # the main process generates/downloads, the others reuse
        source = open_source(cfg.data)
    labels = task_labels(source, cfg.heads, cfg.data)
    splits = make_splits(len(source), cfg.data, labels.known_rows())
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        write_splits(splits, out / "split.json", cfg.data)
        (out / "history.jsonl").write_text("")
    size = cfg.data.image_size
    train_side = max(eval_resize(size), math.ceil(size / math.sqrt(cfg.augment.crop_scale[0])))
    train_set = PaintingDataset(source, splits["train"], labels.labels, train_transform(size, cfg.augment), train_side)
    val_set = PaintingDataset(source, splits["validation"], labels.labels, eval_transform(size), eval_resize(size))

    world, rank = accelerator.num_processes, accelerator.process_index
    if t.batch_size % world:
        raise ValueError(f"train.batch_size={t.batch_size} is not divisible by {world} processes; "
                         f"use a multiple of {world}")
    weights = balanced_weights(labels.labels[splits["train"]]) if t.balanced_sampling else None
    sampler = GlobalDrawBatchSampler(len(train_set), t.batch_size, rank, world, t.seed, weights)
    steps_per_epoch = sampler.batches_per_epoch
    total_steps = t.epochs * steps_per_epoch

    # ---- model and optimiser -------------------------------------------------------------------
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
    raw_model = model
    optimizer = build_optimizer(model, cfg)
    # The schedule spans the whole planned run (the seed's T_max=15 for 10 epochs was an oversight);
    # train.max_steps stops early without changing it, so a stopped run can be resumed exactly.
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps, eta_min=t.min_lr)
    model, optimizer = accelerator.prepare(model, optimizer)
    loader = train_loader(train_set, sampler, cfg.data.num_workers)
    val_loader = accelerator.prepare(eval_loader(val_set, t.eval_batch_size, cfg.data.num_workers))

    mixer = BatchMixer(cfg.augment)
    head_sizes = labels.num_classes
    console.print(
        f"[bold]crnn-art[/] task={cfg.data.task} heads={head_sizes} source={cfg.data.source} "
        f"train={len(train_set)} val={len(val_set)} test={len(splits['test'])} | "
        f"{world} process(es) on {accelerator.device}, precision={accelerator.mixed_precision} | "
        f"batch {t.batch_size} ({t.batch_size // world}/process), {steps_per_epoch} steps/epoch, "
        f"{t.epochs} epochs"
    )

    # ---- epochs -------------------------------------------------------------------------------
    step, best_score, best_metrics, metrics = 0, -math.inf, None, {}
    stop = False
    with make_progress(console, is_main) as progress:
        for epoch in range(1, t.epochs + 1):
            frozen = not stem_trainable(cfg, epoch)
            sampler.set_epoch(epoch)
            model.train()
            if frozen:
                hold_frozen_stem(raw_model)
            task = progress.add_task(f"epoch {epoch}/{t.epochs}", total=steps_per_epoch, status="")
            loss_sum = torch.zeros((), device=accelerator.device)
            seen, t0 = 0, time.perf_counter()
            for batch in loader:
                images = batch["image"].to(accelerator.device, non_blocking=True)
                targets = one_hot_targets(batch["labels"], list(head_sizes.values())).to(accelerator.device)
                images, targets, _ = mixer(images, targets, _mix_seed(t.seed, step, rank))
                with accelerator.autocast():
                    output = model(images)
                    loss, _ = soft_target_loss(output.logits, targets, head_sizes, t.label_smoothing)
                accelerator.backward(loss)
                if frozen:
                    for p in raw_model.stem_parameters():
                        p.grad = None
                if t.grad_clip > 0:
                    accelerator.clip_grad_norm_(model.parameters(), t.grad_clip)
                optimizer.step()
                if not accelerator.optimizer_step_was_skipped:
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                loss_sum += loss.detach()
                seen += 1
                if step % t.log_every == 0 or seen == 1:
                    progress.update(task, status=f"loss {loss.item():.3f} lr {scheduler.get_last_lr()[1]:.2e}")
                progress.advance(task)
                if t.max_steps is not None and step >= t.max_steps:
                    stop = True
                    break
            elapsed = time.perf_counter() - t0
            progress.remove_task(task)
            train_loss = float(accelerator.reduce(loss_sum / max(seen, 1), reduction="mean"))

            metrics = compute_metrics(predict(model, val_loader, accelerator, cfg.heads, progress), cfg.heads)
            metrics["epoch"] = epoch
            metrics["step"] = step
            score = selection_score(metrics, cfg.heads)
            record = {
                "epoch": epoch, "step": step, "train_loss": train_loss,
                "lr": scheduler.get_last_lr()[1], "backbone_lr": scheduler.get_last_lr()[0],
                "images_per_s": seen * t.batch_size / max(elapsed, 1e-9), "epoch_seconds": elapsed,
                "stem_frozen": frozen, "processes": world,
                "val": {k: v for k, v in metrics.items() if k not in ("epoch", "step")},
            }
            improved = score > best_score
            if improved:
                best_score, best_metrics = score, dict(metrics)
            accelerator.wait_for_everyone()
            if is_main:
                with open(out / "history.jsonl", "a") as fh:
                    fh.write(json.dumps(record) + "\n")
                unwrapped = accelerator.unwrap_model(model)
                info = {"epoch": epoch, "step": step, "metrics": metrics, "task": cfg.data.task}
                save_model_folder(unwrapped, out / "last", info)
                if improved:
                    save_model_folder(unwrapped, out / "best", info)
            accelerator.wait_for_everyone()
            console.print(_summary_line(epoch, t.epochs, record, metrics, improved))
            if stop:
                console.print(f"stopped after {step} optimizer steps (train.max_steps={t.max_steps})")
                break

    final = dict(metrics)
    final["best"] = best_metrics
    if is_main:
        (out / "metrics.json").write_text(json.dumps(final, indent=2))
        console.print(metrics_table(final, cfg.heads))
        console.print(f"run saved in {out}/: best/, last/, metrics.json, history.jsonl, config.yaml, split.json")
    accelerator.end_training()
    return final


def _summary_line(epoch: int, epochs: int, record: dict, metrics: dict, improved: bool) -> str:
    mark = " [green]* best[/]" if improved else ""
    return (
        f"epoch {epoch}/{epochs} | train loss {record['train_loss']:.3f} | val loss {metrics['loss']:.3f} "
        f"top1 {metrics['top1']:.1f} top5 {metrics['top5']:.1f} macroF1 {metrics['macro_f1']:.1f} "
        f"weightedF1 {metrics['weighted_f1']:.1f}"
        + (f" joint {metrics['joint_exact_match']:.1f}" if "joint_exact_match" in metrics else "")
        + f" | lr {record['lr']:.2e} | {record['images_per_s']:.0f} img/s | {record['epoch_seconds']:.0f} s{mark}"
    )


def metrics_table(metrics: dict[str, Any], heads: tuple[str, ...]) -> Table:
    """A rich table of final (and best) validation metrics, one row per head for combined runs."""
    table = Table(title="validation metrics (%; loss is cross-entropy)")
    table.add_column("")
    for key in METRIC_KEYS:
        table.add_column(key, justify="right")
    table.add_column("samples", justify="right")

    def row(name: str, m: dict[str, Any]) -> None:
        table.add_row(name, *[f"{m[k]:.3f}" if k == "loss" else f"{m[k]:.2f}" for k in METRIC_KEYS],
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
