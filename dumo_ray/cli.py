"""`dumo-ray <command>`: the user's entry point."""
from __future__ import annotations

import argparse
import sys

from dumo_ray.config import ConfigError, load_config


def _labels(text: str) -> list[int]:
    try:
        return [int(part) for part in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"labels must be integers separated by commas, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dumo-ray", description="Duality Models (DuMo) on Ray.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a model (rerun the same command to resume)")
    train.add_argument("--config", required=True, help="YAML config, e.g. configs/quickstart.yaml")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set optim.lr=3e-4 (repeatable)")

    sample = commands.add_parser("sample", help="draw samples from a checkpoint's EMA weights")
    sample.add_argument("--checkpoint", required=True, help="checkpoint directory or its state.pt")
    sample.add_argument("--steps", type=int, default=1, help="1, 2 or N sampling steps (default 1)")
    sample.add_argument("--num", type=int, default=100, help="number of samples (default 100)")
    sample.add_argument("--labels", type=_labels, default=None, help="class labels to cycle through, e.g. 3,7")
    sample.add_argument("--method", choices=["u", "euler"], default=None,
                        help="u: flow-map jumps (default); euler: Euler steps of the velocity head")
    sample.add_argument("--mid", type=float, default=0.5, help="intermediate time of the 2-step sampler")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--out", required=True, help="a .png grid, or .npz with images (uint8 NHWC) and labels")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            from dumo_ray.train.loop import train_single_process

            train_single_process(load_config(args.config, args.overrides))
        elif args.command == "sample":
            from dumo_ray.sampling import sample_to_file

            if args.num < 1 or args.steps < 1:
                raise ValueError("--num and --steps must be >= 1")
            path = sample_to_file(args.checkpoint, args.out, steps=args.steps, num=args.num, labels=args.labels,
                                  method=args.method, seed=args.seed, mid=args.mid)
            print(f"[dumo-ray] wrote {path}")
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"dumo-ray {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
