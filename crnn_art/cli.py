"""``crnn-art`` command line: train, evaluate, outliers, explain (also under ``accelerate launch -m crnn_art``)."""

from __future__ import annotations

import argparse
import sys

from crnn_art.config import ConfigError, available_presets, resolve_config
from crnn_art.model import ModelLoadError
from crnn_art.runtime import LaunchError
from crnn_art.sources import DataError

USER_ERRORS = (ConfigError, DataError, ModelLoadError, LaunchError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crnn-art", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model (config: preset <- --config file <- --set overrides)")
    train.add_argument("--preset", default="demo", help=f"one of: {', '.join(available_presets())}")
    train.add_argument("--config", help="a YAML file with data/model/augment/train sections")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override one key, e.g. --set train.epochs=3 (repeatable)")
    train.add_argument("--output-dir", default=None, help="run folder (default: runs/<preset>)")
    train.add_argument("--print-config", action="store_true", help="print the resolved config and exit")

    ev = sub.add_parser("evaluate", help="metrics of a trained model on a split of its run's data")
    ev.add_argument("--checkpoint", required=True, help="a run folder, or its best/ or last/ folder")
    ev.add_argument("--split", default="test", help="train, validation or test (default: test)")
    ev.add_argument("--output-dir", default=None, help="where metrics.json goes (default: RUN/eval_<split>)")
    ev.add_argument("--batch-size", type=int, default=None, help="per-process evaluation batch")

    out = sub.add_parser("outliers", help="rank the paintings whose label does not fit (SPEC §5)")
    out.add_argument("--checkpoint", required=True, help="a run folder, or its best/ or last/ folder")
    out.add_argument("--split", default="train", help="train (default: where wrong labels hurt), validation, test")
    out.add_argument("--top", type=int, default=50, help="how many to select with --select top (default 50)")
    out.add_argument("--select", default="top", help="top (the --top highest scores), threshold, or zscore")
    out.add_argument("--threshold", type=float, default=None, help="with --select threshold: minimum score")
    out.add_argument("--z", type=float, default=3.5, help="with --select zscore: per-class robust z-score (3.5)")
    out.add_argument("--known-wrong", default=None,
                     help="CSV with a 'row' column of known wrong labels: measure the scorers (demo: automatic)")
    out.add_argument("--output-dir", default=None, help="default: RUN/outliers_<split>")
    out.add_argument("--batch-size", type=int, default=None)

    ex = sub.add_parser("explain", help="attention maps (row x column) over paintings, as PNGs")
    ex.add_argument("--checkpoint", required=True, help="a run folder, or its best/ or last/ folder")
    ex.add_argument("images", nargs="+", help="image files")
    ex.add_argument("--output-dir", default="attention", help="where the PNGs go (default: ./attention)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            cfg = resolve_config(args.preset, args.config, args.overrides)
            if args.print_config:
                import yaml

                print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
                return 0
            from crnn_art.training import train

            train(cfg, args.output_dir or f"runs/{args.preset}")
        elif args.command == "evaluate":
            from crnn_art.evaluation import evaluate_checkpoint

            evaluate_checkpoint(args.checkpoint, args.split, args.output_dir, args.batch_size)
        elif args.command == "outliers":
            from crnn_art.outliers import find_outliers

            find_outliers(args.checkpoint, args.split, args.top, args.select, args.threshold, args.z,
                          args.output_dir, args.known_wrong, args.batch_size)
        elif args.command == "explain":
            from crnn_art.attention import explain_images
            from crnn_art.checkpoints import load_model_folder

            for item in explain_images(load_model_folder(args.checkpoint), args.images, args.output_dir):
                tops = "; ".join(f"{h}: " + ", ".join(f"{n} {p:.2f}" for n, p in v) for h, v in item["top"].items())
                print(f"{item['image']}: {tops} -> {item['attention_png']}")
    except USER_ERRORS as exc:
        print(f"crnn-art: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("crnn-art: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
