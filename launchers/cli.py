"""The `b2b` command line."""

from __future__ import annotations

import argparse
import sys

from growth import DEPTH_METHODS, PRESETS, WIDTH_METHODS, GrowthError


def cmd_grow(args) -> int:
    from growth.adapters.hf import grow_directory
    grow_directory(args.src, args.out, args.to, width=args.width, depth=args.depth,
                   seed=args.seed, overwrite=args.overwrite)
    return 0


def cmd_verify(args) -> int:
    from growth.adapters.verify import verify
    return verify(args.src, args.grown, args.text)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="b2b", description="bert2BERT: grow pretrained transformers and train them.")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("grow", help="grow an HF model directory into a larger shape")
    g.add_argument("src", help="HF model directory (or 'minilm', the packaged all-MiniLM-L6-v2)")
    g.add_argument("--to", required=True,
                   help=f"target: a preset ({', '.join(PRESETS)}), an HF config.json, "
                        "or layers=..,hidden=..,heads=..,ffn=.. (omitted keys keep the source's)")
    g.add_argument("--width", choices=WIDTH_METHODS, default="aki")
    g.add_argument("--depth", choices=DEPTH_METHODS, default="stack")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    g.add_argument("--overwrite", action="store_true")
    g.set_defaults(func=cmd_grow)

    v = sub.add_parser("verify", help="compare a grown model's outputs with its source's")
    v.add_argument("src")
    v.add_argument("grown")
    v.add_argument("--text", help="a text file to run both models on (default: a fixed paragraph)")
    v.set_defaults(func=cmd_verify)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except GrowthError as err:
        print(f"b2b {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
