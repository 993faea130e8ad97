"""``crnn-art`` command line: train and evaluate (also under ``accelerate launch -m crnn_art``)."""

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
    except USER_ERRORS as exc:
        print(f"crnn-art: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("crnn-art: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
