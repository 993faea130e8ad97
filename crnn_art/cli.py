"""``crnn-art`` command line: train, evaluate, outliers, embed, explain, prepare (and under ``accelerate launch``)."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

from crnn_art import __version__
from crnn_art.config import available_presets, load_run_config, resolve_config
from crnn_art.errors import CrnnArtError, DataError, TrainingStopped
from crnn_art.exits import report_exit, stop_worker_processes

SPLITS = ("train", "validation", "test")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crnn-art", description=__doc__)
    parser.add_argument("--version", action="version", version=f"crnn-art {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="print the full traceback of an unexpected error (always saved to a log file)")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser(
        "train", help="train a model (config: preset <- --config file <- --set overrides)",
        description="Train a model. The config is a preset, then a YAML --config file, then --set KEY=VALUE "
                    "overrides; `crnn-art train --preset NAME --print-config` prints every key with its value, and "
                    "docs/configuration.md describes each one.")
    train.add_argument("--preset", default=None,
                       help=f"one of: {', '.join(available_presets())} (default: demo; with --resume: the run's own "
                            "config.yaml; with --config/--set, those on top of it, train.max_steps not carried over)")
    train.add_argument("--config", help="a YAML file with data/model/augment/train sections")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override one key, e.g. --set train.epochs=3 (repeatable)")
    train.add_argument("--output-dir", default=None, help="run folder (default: runs/<preset>)")
    train.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    train.add_argument("--resume", default=None, metavar="latest|auto|PATH",
                       help="continue the run in --output-dir from its newest complete checkpoint (latest), "
                            "from PATH, or latest-if-any (auto, for requeued jobs)")

    ev = sub.add_parser("evaluate", help="metrics of a trained model on a split of its run's data")
    ev.add_argument("--checkpoint", required=True, help="a run folder, or its best/ or last/ folder")
    ev.add_argument("--split", default="test", choices=SPLITS, help="the split to evaluate (default: test)")
    ev.add_argument("--output-dir", default=None,
                    help="where metrics.json and the reports go (default: RUN/eval_<split>_<model>, "
                         "e.g. eval_test_best)")
    ev.add_argument("--batch-size", type=int, default=None,
                    help="per-process evaluation batch (default: the run's train.eval_batch_size)")

    out = sub.add_parser("outliers", help="rank the paintings whose label does not fit")
    out.add_argument("--checkpoint", required=True, help="a run folder, or its best/ or last/ folder")
    out.add_argument("--split", default="train", choices=SPLITS,
                     help="the split to score (default: train, where wrong labels hurt)")
    out.add_argument("--top", type=int, default=50, help="how many to select with --select top (default 50)")
    out.add_argument("--select", default="top", choices=("top", "threshold", "zscore"),
                     help="top (the --top highest scores), threshold, or zscore")
    out.add_argument("--threshold", type=float, default=None, help="with --select threshold: minimum score")
    out.add_argument("--z", type=float, default=3.5, help="with --select zscore: per-class robust z-score (3.5)")
    out.add_argument("--known-wrong", default=None,
                     help="CSV with a 'row' column of known wrong labels: measure the scorers (demo: automatic)")
    out.add_argument("--output-dir", default=None, help="default: RUN/outliers_<split>")
    out.add_argument("--batch-size", type=int, default=None,
                     help="per-process batch (default: the run's train.eval_batch_size)")

    _add_export_commands(sub)
    _add_duplicates_command(sub)

    pr = sub.add_parser("prepare", help="convert a source once into resized JPEG shards (fast to train on)")
    pr.add_argument("--source", required=True, help="what data.source would be: a Hub id, folder, artgan, demo")
    pr.add_argument("--output-dir", required=True, help="the prepared folder; then train with data.source=<it>")
    pr.add_argument("--set", dest="overrides", action="append", default=[], metavar="data.KEY=VALUE",
                    help="other data keys of the source, e.g. data.lists_dir=... for artgan")
    pr.add_argument("--short-side", type=int, default=512, help="resize so the short side is at most this (512)")
    pr.add_argument("--quality", type=int, default=90, help="JPEG quality (90)")
    pr.add_argument("--num-proc", type=int, default=None, help="worker processes (default: all cores)")
    pr.add_argument("--shard-size", type=int, default=1000, help="rows per shard, the unit of resumption")

    pu = sub.add_parser("push", help="publish a trained model (with a generated model card) to the Hugging Face Hub")
    pu.add_argument("--checkpoint", required=True, help="a run folder (its best/), or a best/ or last/ folder")
    pu.add_argument("--repo-id", required=True, help="USER/NAME or ORG/NAME")
    pu.add_argument("--private", action="store_true", help="create the repository private")
    pu.add_argument("--revision", default=None, help="push to this branch (created if needed)")
    pu.add_argument("--dry-run", action="store_true",
                    help="show exactly what would be uploaded (files, sizes, the model card) without any network")

    pd = sub.add_parser("predict", help="top-k classes per head for images, folders or lists of paths")
    pd.add_argument("--model", required=True, help="a run folder, a best/ or last/ folder, or a Hub id")
    pd.add_argument("paths", nargs="+", help="image files, folders (recursive), or .txt files of paths")
    pd.add_argument("--top-k", type=int, default=5, help="classes shown per head (default 5)")
    pd.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default 16)")
    pd.add_argument("--json", action="store_true", help="one JSON object per image on stdout")
    pd.add_argument("--heatmaps", default=None, metavar="OUT", help="also save attention overlays into OUT")

    be = sub.add_parser("bench", help="speed and memory figures: model step vs ResNet-50, input pipeline, outliers")
    be.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where to measure (default: cpu)")
    be.add_argument("--image-size", type=int, default=224, help="input side in px (default 224)")
    be.add_argument("--batch", type=int, nargs="+", default=[16], help="one or more batch sizes")
    be.add_argument("--steps", type=int, default=7, help="timed steps per measurement (median)")
    be.add_argument("--precision", default="no", choices=("no", "bf16", "fp16"),
                    help="mixed precision (default: no)")
    be.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: cores, at most 8)")
    be.add_argument("--peak-tflops", type=float, default=None,
                    help="the device's peak TFLOP/s at this precision, to report model FLOP utilisation")
    be.add_argument("--quick", action="store_true", help="fewer steps and images (a smoke run)")
    be.add_argument("--compile", action="store_true",
                    help="also time the CRNN with its trunk under torch.compile (model.compile_trunk); "
                         "compiling takes a minute or more")
    be.add_argument("--json", action="store_true", help="print the report as JSON")
    be.add_argument("--backbone", nargs="+", default=None, metavar="NAME",
                    help="only the CRNN's train step on these backbones (resnet50, timm:NAME) vs each bare backbone")
    be.add_argument("--streaming-plan", action="store_true",
                    help="only the streaming partition at 8-256 processes (no model, no I/O; seconds)")
    be.add_argument("--duplicates", action="store_true",
                    help="only `duplicates` past decoding: grouping 81,444 WikiArt-like hashes, and the --cosine "
                         "search (on --device), timed on 8,000 embeddings and scaled to 81,444")

    ex = sub.add_parser("explain", help="attention maps (row x column) over paintings, as PNGs")
    ex.add_argument("--checkpoint", required=True, help="a run folder, or its best/ or last/ folder")
    ex.add_argument("images", nargs="+", help="image files")
    ex.add_argument("--output-dir", default="attention", help="where the PNGs go (default: ./attention)")
    return parser


def _refresh_card(checkpoint: str, split: str) -> None:
    """After a test evaluation, the evaluated folder's model card shows its figures (main process only)."""
    from accelerate import PartialState

    from crnn_art.checkpoints import resolve_model_folder
    from crnn_art.hub import write_model_card

    found = resolve_model_folder(checkpoint)
    if split == "test" and found.run_dir is not None and PartialState().is_main_process:
        print(f"model card refreshed: {write_model_card(found.run_dir, found.path)}")


def _predict(args: argparse.Namespace) -> int:
    import json

    from crnn_art.console import make_console, make_progress
    from crnn_art.data.schema import IMAGE_EXTENSIONS
    from crnn_art.inference import collect_paths, load_model, predict_images

    model = load_model(args.model)
    paths = collect_paths(args.paths)
    if not paths:

        raise DataError(f"no images found in {', '.join(args.paths)} (looked for {', '.join(IMAGE_EXTENSIONS)} "
                        "files, recursively in folders); give image files, folders or .txt lists of paths")
    errors = 0
    console = make_console(stderr=True)
    with make_progress(console, enabled=not args.json) as progress:
        task = progress.add_task("predict", total=len(paths), status="")
        for result in predict_images(model, paths, args.top_k, args.batch_size, args.heatmaps):
            progress.advance(task)
            if "error" in result:
                errors += 1
                print(f"crnn-art: skipped {result['image']}: {result['error']}", file=sys.stderr)
                if args.json:
                    print(json.dumps(result))
                continue
            if args.json:
                print(json.dumps(result), flush=True)
            else:
                tops = " | ".join(f"{h}: " + ", ".join(f"{p['label']} {p['score']:.2f}" for p in preds)
                                  for h, preds in result["predictions"].items())
                progress.console.print(f"{result['image']}: {tops}")
    if errors:
        print(f"crnn-art: {errors} of {len(paths)} files could not be read", file=sys.stderr)
    return 2 if errors == len(paths) else 0


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit status: 0 done, 2 a user error (one line), 1 an unexpected error (one line,
    the traceback in a log file), 3 non-finite losses, 128+N stopped by signal N."""
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except TrainingStopped as exc:  # every process stops alike: the main process says so
        return report_exit(exc.exit_code, f"crnn-art: {exc}", every_rank=False)
    except CrnnArtError as exc:
        return report_exit(exc.exit_code, f"crnn-art: error: {exc}")
    except KeyboardInterrupt:
        return report_exit(130, "crnn-art: interrupted")
    except Exception as exc:
        return report_exit(1, _unexpected(exc, args.debug or os.environ.get("CRNN_ART_DEBUG") == "1"))


def _unexpected(exc: BaseException, debug: bool) -> str:
    """One line for an error crnn-art did not foresee; the traceback goes to a log file (and to stderr with --debug)."""
    text = "".join(traceback.format_exception(exc))
    folder = Path(tempfile.gettempdir()) / "crnn-art-errors"
    log = folder / f"{time.strftime('%Y%m%d-%H%M%S')}-rank{os.environ.get('RANK', '0')}-pid{os.getpid()}.log"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        log.write_text(text)
        where = f"traceback in {log}"
    except OSError:
        where = "the traceback could not be saved"
    if debug:
        print(text, file=sys.stderr, end="")
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()] or [""]
    # a DataLoader worker's error arrives as "Caught X in DataLoader worker ..." + its traceback: add its last line
    first = lines[0][:300] + (f" ... {lines[-1][:300]}" if len(lines) > 1 else "")
    return (f"crnn-art: error: unexpected {type(exc).__name__}: {first} ({where}; "
            "`crnn-art --debug ...` prints it; please report it with that file)")


def _add_duplicates_command(sub) -> None:
    du = sub.add_parser("duplicates", help="paintings filed twice: exact and near copies, leakage across splits, "
                                           "conflicting labels")
    du.add_argument("--checkpoint", default=None, help="a run folder: its data, task and splits")
    du.add_argument("--source", default=None, help="or a data.source (splits as a training run would make them)")
    du.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="with --source: config keys, e.g. --set data.task=combined (repeatable)")
    du.add_argument("--near-bits", type=int, default=8,
                    help="perceptual-hash bits (of 64) in which near copies may differ (default 8; more finds more "
                         "copies and more false ones)")
    du.add_argument("--cosine", type=float, default=None,
                    help="with --checkpoint: also join paintings whose embeddings (the run's model) reach this cosine, "
                         "e.g. 0.95 (finds crops the hash misses; compares every pair, on the accelerator)")
    du.add_argument("--output-dir", default=None, help="default: RUN/duplicates, or ./duplicates with --source")


def _add_export_commands(sub) -> None:
    """``embed`` and ``export``: what leaves crnn-art for other tools."""
    em = sub.add_parser("embed", help="the model's embedding of every painting of a split, as parquet tables")
    em.add_argument("--checkpoint", required=True, help="a run folder, or its best/ or last/ folder")
    em.add_argument("--split", default="all", choices=(*SPLITS, "all"), help="the split to embed (default: all)")
    em.add_argument("--images", nargs="+", default=None, metavar="PATH",
                    help="embed these image files or folders instead of a split (one process; --checkpoint may "
                         "then be any model folder or Hub id)")
    em.add_argument("--output-dir", default=None, help="default: RUN/embeddings_<model>, e.g. embeddings_best")
    em.add_argument("--batch-size", type=int, default=None,
                    help="per-process batch (default: the run's train.eval_batch_size)")

    ex = sub.add_parser("export", help="the model as ONNX, TorchScript or a torch.export program, for serving")
    ex.add_argument("--checkpoint", required=True, help="a run folder, or its best/ or last/ folder")
    ex.add_argument("--format", required=True, choices=("onnx", "torchscript", "exported-program"))
    ex.add_argument("--dynamic-batch", action="store_true", help="any batch size (default: fixed at 2)")
    ex.add_argument("--output-dir", default=None, help="default: RUN/export_<model>, e.g. export_best")


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "train":
        output_dir = args.output_dir or f"runs/{args.preset or 'demo'}"
        own = Path(output_dir) / "config.yaml"
        if args.resume and not (args.preset or args.config or args.overrides) and own.is_file():
            cfg = load_run_config(own)  # resuming with nothing said: the run's own config, as it was
        elif args.resume and not args.preset and own.is_file():  # the run's own config, with --config/--set on top
            cfg = resolve_config(None, args.config, args.overrides, base=own)
        else:
            cfg = resolve_config(args.preset or "demo", args.config, args.overrides)
        if args.print_config:
            import yaml

            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            return 0
        from crnn_art.training.loop import train

        train(cfg, output_dir, resume=args.resume)
    elif args.command == "evaluate":
        from crnn_art.evaluation.evaluate import evaluate_checkpoint

        evaluate_checkpoint(args.checkpoint, args.split, args.output_dir, args.batch_size)
        if args.output_dir is None:  # a card reads only the run's own eval_* folders
            _refresh_card(args.checkpoint, args.split)
    elif args.command in ("outliers", "duplicates"):
        _label_review_command(args)
    elif args.command in ("embed", "export"):
        _export_command(args)

    elif args.command == "prepare":
        from crnn_art.data.prepare import prepare

        cfg = resolve_config(None, None, [f"data.source={args.source}", *args.overrides])
        prepare(cfg.data, args.output_dir, args.short_side, args.quality, args.num_proc, args.shard_size)
    elif args.command == "push":
        from crnn_art.hub import push

        if args.dry_run:
            from crnn_art.hub import preview

            print(preview(args.checkpoint, args.repo_id))
        else:
            print(f"pushed: {push(args.checkpoint, args.repo_id, args.private, args.revision)}")
    elif args.command == "predict":
        return _predict(args)
    elif args.command == "bench":
        _bench(args)
    elif args.command == "explain":
        _explain(args)
    return 0


def _label_review_command(args: argparse.Namespace) -> None:
    """``outliers`` and ``duplicates``: the paintings whose label (or copy) needs a look."""
    if args.command == "outliers":
        from crnn_art.evaluation.outliers import find_outliers

        find_outliers(args.checkpoint, args.split, args.top, args.select, args.threshold, args.z,
                      args.output_dir, args.known_wrong, args.batch_size)
    else:
        from crnn_art.evaluation.duplicates import find_duplicates

        find_duplicates(args.checkpoint, args.source, args.overrides, args.output_dir, args.near_bits, args.cosine)


def _export_command(args: argparse.Namespace) -> None:
    if args.command == "embed" and args.images:
        from crnn_art.inference import embed_images, load_model

        out = args.output_dir or "embeddings_images"
        print(embed_images(load_model(args.checkpoint), args.images, out, args.batch_size or 16))
    elif args.command == "embed":
        from crnn_art.evaluation.embeddings import embed_splits

        embed_splits(args.checkpoint, args.split, args.output_dir, args.batch_size)
    else:
        from crnn_art.export import export_model

        print(export_model(args.checkpoint, args.format, args.output_dir, args.dynamic_batch))


def _bench(args: argparse.Namespace) -> None:
    import json

    from crnn_art.bench import bench_backbones, bench_duplicates, bench_streaming_plan, run_bench
    from crnn_art.console import (
        backbone_table,
        duplicates_bench_table,
        make_console,
        make_progress,
        print_bench_report,
        streaming_plan_table,
    )

    if args.backbone:
        rows = bench_backbones(args.backbone, args.device, args.image_size, args.batch[0], args.steps, args.precision)
        print(json.dumps(rows, indent=2)) if args.json else make_console().print(
            backbone_table(rows, args.image_size, args.batch[0]))
        return

    if args.duplicates:
        figures = bench_duplicates(device=args.device)
        print(json.dumps(figures, indent=2)) if args.json else make_console().print(duplicates_bench_table(figures))
        return
    if args.streaming_plan:
        plans = bench_streaming_plan()
        print(json.dumps(plans, indent=2)) if args.json else make_console().print(streaming_plan_table(plans))
        return
    with make_progress(make_console(stderr=True)) as progress:
        task = progress.add_task("bench", total=None, status="")
        reports = [run_bench(args.device, args.image_size, b, args.steps, args.precision, workers=args.workers,
                             quick=args.quick, peak_tflops=args.peak_tflops, compile_trunk=args.compile,
                             on_stage=lambda name, b=b: progress.update(task, status=f"batch {b}: {name}"))
                   for b in args.batch]
    if args.json:
        print(json.dumps(reports[0] if len(reports) == 1 else reports, indent=2))
    else:
        console = make_console()
        for report in reports:
            print_bench_report(console, report, report["targets"])


def _explain(args: argparse.Namespace) -> None:
    from crnn_art.checkpoints import load_model_folder
    from crnn_art.inference import explain_images

    for item in explain_images(load_model_folder(args.checkpoint), args.images, args.output_dir):
        if "error" in item:
            print(f"{item['image']}: skipped ({item['error']})", file=sys.stderr)
            continue
        tops = "; ".join(f"{h}: " + ", ".join(f"{n} {p:.2f}" for n, p in v) for h, v in item["top"].items())
        print(f"{item['image']}: {tops} -> {item['attention_png']}")


def run(argv: list[str] | None = None) -> None:
    """The ``crnn-art`` entry point: run the command, then make sure this process can end.

    DataLoader workers ignore SIGTERM (the training process decides when to stop), so the
    interpreter's own exit, which terminates daemonic children with SIGTERM and joins them, would
    wait forever on a worker still alive after an error; they are killed here first.
    """
    code = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    stop_worker_processes()
    sys.exit(code)


if __name__ == "__main__":
    run()
