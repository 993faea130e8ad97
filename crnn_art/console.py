"""What crnn-art shows on a terminal or in a log: the only module that imports ``rich``.

Commands make their console here (``make_console``): on a terminal, rich's colours and live progress
bars; anywhere else (log files, SLURM output, pipes) one message per line, never hard-wrapped at 80
columns, and no live bars. Tables are built here from the plain dicts the library returns.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

LOG_WIDTH = 200
"""Columns of a console that is not a terminal: wide enough that a training line or a table row stays one line."""


def make_console(enabled: bool = True, stderr: bool = False) -> Console:
    """A console that prints only when ``enabled`` (the main process); not hard-wrapped when it is not a terminal."""
    console = Console(quiet=not enabled, highlight=False, stderr=stderr)
    if not console.is_terminal:
        console.soft_wrap = True
        console.width = max(console.width, LOG_WIDTH)
    return console


def make_progress(console: Console, enabled: bool = True, transient: bool = True) -> Progress:
    """A progress bar per task (``add_task(description, total=..., status="")``); off when not ``enabled`` or when the
    console is not a terminal (a log gets the summary lines, not bar redraws)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled or not console.is_terminal,
        transient=transient,
    )


def fmt(value: float | None, digits: int) -> str:
    """A metric as printed: ``n/a`` where it does not apply (top-5 on a head of 5 or fewer classes)."""
    return "n/a" if value is None else f"{value:.{digits}f}"


def metrics_table(metrics: dict[str, Any], heads: tuple[str, ...], keys: Iterable[str], title: str = "") -> Table:
    """Final (and best) metrics, one row per head for combined runs; ``keys`` are the metric columns."""
    keys = tuple(keys)
    table = Table(title=title or "validation metrics (%; loss is cross-entropy)")
    table.add_column("")
    for key in keys:
        table.add_column(key, justify="right")
    table.add_column("samples", justify="right")

    def row(name: str, m: dict[str, Any]) -> None:
        table.add_row(name, *[fmt(m.get(k), 3 if k == "loss" else 2) for k in keys], str(m.get("num_samples", "")))

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


def outliers_table(records: list[dict[str, Any]], split: str, scored: int, limit: int = 15) -> Table:
    """The first ``limit`` selected outliers (records as in outliers.json)."""
    table = Table(title=f"top outliers of the {split} split (of {scored} scored)")
    for col in ("rank", "row", "path", "head", "given", "predicted", "conf", "own_sim", "margin", "nbrs agree",
                "score", "flags"):
        table.add_column(col)
    for i, r in enumerate(records[:limit], 1):
        table.add_row(str(i), str(r["row"]), r["path"] or "-", r["head"], r["true_label"], r["predicted_label"],
                      f"{r['confidence']:.2f}", f"{r['own_similarity']:.3f}", f"{r['margin']:.3f}",
                      f"{r['knn_agreement']:.0%}", f"{r['score']:.3f}", r["flagged_by"])
    return table


def quality_table(q: dict[str, dict[str, float]], split: str, scorers: dict[str, str]) -> Table:
    """How well each scorer finds the known wrong labels."""
    k = next(iter(q.values()))["k"]
    table = Table(title=f"finding the {k} known wrong style labels in the {split} split (%)")
    for col in ("scorer", "precision@k", "recall@2k", "avg precision"):
        table.add_column(col)
    for name, m in q.items():
        table.add_row(name, f"{m['precision_at_k']:.1f}", f"{m['recall_at_2k']:.1f}", f"{m['average_precision']:.1f}")
    table.caption = "; ".join(f"{name}: {text}" for name, text in scorers.items())
    return table


def _streaming_plan_rows(table: Table, plans: list[dict[str, Any]]) -> None:
    for r in plans:
        table.add_row(f"streaming plan, {r['processes']} processes x {r['local_batch']}: rows trained per epoch "
                      f"(twice), {r['epochs']} epochs planned", f"{100 * r['used']:.2f} % ({r['twice']}), "
                      f"{r['seconds']:.2f} s", "")


def streaming_plan_table(plans: list[dict[str, Any]]) -> Table:
    """``crnn-art bench --streaming-plan``: the partition of a Hub-shaped layout at each cluster size."""
    table = Table(title=f"streaming plan: {plans[0]['rows']:,} training rows in a layout like huggan/wikiart")
    table.add_column("what")
    table.add_column("figure", justify="right")
    table.add_column("")
    _streaming_plan_rows(table, plans)
    return table


def duplicates_table(summary: dict[str, Any]) -> Table:
    """``crnn-art duplicates``: how many copies, how many cross splits or carry other labels."""
    near = f"up to {summary['near_bits']} of 64 bits" + (
        f" or embeddings at cosine >= {summary['cosine']}" if summary.get("cosine") is not None else "")
    table = Table(title=f"copies among {summary['images']:,} images (near: {near})")
    table.add_column("what")
    table.add_column("count", justify="right")
    for key, what in (("groups", "groups of copies"), ("exact_groups", "  of them exact copies"),
                      ("rows_in_groups", "images in a group"), ("leaking_groups", "groups across splits (leakage)"),
                      ("test_rows_with_a_copy_in_train", "test images with a copy in train"),
                      ("conflicting_groups", "groups with different labels (conflicts)"),
                      ("undecodable", "images that could not be decoded")):
        table.add_row(what, f"{summary[key]:,}")
    return table


def duplicates_bench_table(f: dict[str, Any]) -> Table:
    """``crnn-art bench --duplicates``: grouping by hashes at WikiArt size, and the embeddings' cosine search."""
    table = Table(title=f"duplicates past decoding, {f['images']:,} WikiArt-like images")
    table.add_column("what")
    table.add_column("figure", justify="right")
    for what, value in (
            ("group by hashes (s)", f"{f['group_seconds']:.1f}"),
            ("peak resident memory (MB)", f"{f['peak_mb']:,.0f}"),
            ("groups / images in them", f"{f['groups']:,} / {f['images_in_groups']:,}"),
            ("planted copies found", f"{f['planted_found']:,} of {f['planted_copies']:,}"),
            (f"--cosine on {f['embedded']:,} x {f['dim']:,} ({f['device']}, s)", f"{f['cosine_seconds']:.1f}"),
            (f"--cosine scaled to {f['images']:,} (s)", f"{f['cosine_seconds_at_images']:,.0f}")):
        table.add_row(what, value)
    return table


def backbone_table(rows: list[dict[str, Any]], size: int, batch: int) -> Table:
    """``crnn-art bench --backbone``: the CRNN on each backbone against the bare backbone."""
    table = Table(title=f"CRNN vs bare backbone, train step, {size} px, batch {batch}")
    for column in ("backbone", "CRNN img/s", "backbone img/s", "CRNN / backbone step time", "CRNN peak MB"):
        table.add_column(column, justify="left" if column == "backbone" else "right")
    for r in rows:
        table.add_row(r["name"], f"{r['crnn']['images_per_s']:.1f}", f"{r['backbone']['images_per_s']:.1f}",
                      f"{r['ratio']:.3f}x", f"{r['crnn']['peak_mb']:.0f}")
    return table


def print_bench_report(console: Console, report: dict[str, Any], targets: dict[str, float]) -> None:
    """``crnn-art bench``'s figures as a table, then the targets each one meets or misses."""
    s = report["settings"]
    table = Table(title=f"crnn-art bench on {report['machine']['device']} ({report['machine']['cpu_cores']} cores), "
                        f"{s['image_size']} px, batch {s['batch']}, precision {s['precision']}")
    table.add_column("what")
    table.add_column("figure", justify="right")
    table.add_column("peak MB", justify="right")
    for layout, r in report["training"].items():
        table.add_row(f"train step CRNN ({layout})", f"{r['crnn']['images_per_s']:.1f} img/s",
                      f"{r['crnn']['peak_mb']:.0f}")
        table.add_row(f"train step ResNet-50 ({layout})", f"{r['backbone']['images_per_s']:.1f} img/s",
                      f"{r['backbone']['peak_mb']:.0f}")
        table.add_row(f"  CRNN / ResNet-50 step time ({layout})", f"{r['ratio']:.3f}x", "")
        table.add_row(f"evaluation CRNN ({layout})", f"{r['eval']['images_per_s']:.1f} img/s",
                      f"{r['eval']['peak_mb']:.0f}")
    if "compile" in report:
        c = report["compile"]
        table.add_row("train step CRNN, trunk compiled / eager",
                      f"{c['compiled']['images_per_s']:.1f} / {c['eager']['images_per_s']:.1f} img/s "
                      f"({c['speedup']:.2f}x)", f"{c['compiled']['peak_mb']:.0f}")
        payback = f"{c['payback_steps']:.0f} steps" if c["payback_steps"] is not None else "never"
        table.add_row("  one-off compile time (paid back after)", f"{c['compile_s']:.1f} s ({payback})", "")
    opt = report["optimizer"]
    table.add_row(f"AdamW step, {opt['parameters'] / 1e6:.1f} M parameters: for-each / fused",
                  f"{opt['foreach_step_ms']:.1f} / {opt['fused_step_ms']:.1f} ms ({opt['fused_speedup']:.2f}x)", "")
    p = report["pipeline"]
    table.add_row("pipeline: seed (PIL full decode 1600x1280 + v1 @384)", f"{p['seed_images_per_s']:.1f} img/s", "")
    table.add_row("pipeline: crnn-art (draft decode + v2)", f"{p['draft_decode_images_per_s']:.1f} img/s "
                  f"({p['speedup_draft']:.2f}x)", "")
    table.add_row("pipeline: crnn-art on 512 px prepared", f"{p['prepared_512_images_per_s']:.1f} img/s "
                  f"({p['speedup_prepared']:.2f}x)", f"{p['peak_mb']:.0f}")
    table.add_row("pipeline: worker share with augment.on_device (decode + crop + flip, 512 px prepared)",
                  f"{p['worker_on_device_images_per_s']:.1f} img/s ({p['speedup_worker_on_device']:.2f}x)", "")
    d = p["device_augment"]
    table.add_row(f"  device share: jitter + normalise + erase on {d['device']} (batch {d['batch']})",
                  f"{d['images_per_s']:.1f} img/s", "")
    j = report["jpeg_decode"]
    table.add_row(f"JPEG decode 1600x1280: decode_jpeg on {j['device']} (batch {j['batch']}) / PIL draft, 1 process",
                  f"{j['decode_jpeg_images_per_s']:.1f} / {j['pil_draft_images_per_s']:.1f} img/s "
                  f"({j['ratio']:.2f}x)", "")
    table.add_row(f"DataLoader, {p['loader_workers']} workers, prepared", f"{p['loader_images_per_s']:.1f} img/s", "")
    o = report["outliers"]
    table.add_row(f"outlier scoring {o['samples']:,} x {o['dim']}, {o['classes']} classes, "
                  f"{o['references']:,} neighbour references", f"{o['seconds']:.2f} s",
                  f"{o['peak_mb']:.0f}")
    _streaming_plan_rows(table, report.get("streaming_plan", []))
    console.print(table)
    if "model_flop_utilisation" in report["summary"]:
        console.print(f"model FLOP utilisation: {100 * report['summary']['model_flop_utilisation']:.1f} % "
                      f"({report['summary']['achieved_tflops']:.1f} TFLOP/s)")
    for key, ok in report["meets_targets"].items():
        mark = "[green]meets[/]" if ok else "[red]misses[/]"
        console.print(f"{key}: {report['summary'][key]:.3f} (target {targets[key]}) {mark}")
