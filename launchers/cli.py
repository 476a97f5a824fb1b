"""The `b2b` command line."""

from __future__ import annotations

import argparse
import sys

from growth import DEPTH_METHODS, PRESETS, WIDTH_METHODS, GrowthError

from .config import RecipeError


def cmd_grow(args) -> int:
    from growth.adapters.hf import grow_directory
    grow_directory(args.src, args.out, args.to, width=args.width, depth=args.depth,
                   seed=args.seed, overwrite=args.overwrite)
    return 0


def cmd_verify(args) -> int:
    from growth.adapters.verify import verify
    return verify(args.src, args.grown, args.text)


def cmd_train(args) -> int:
    from .launch import train
    return train(args.recipe, args.set, args.procs, resume=args.resume, dry_run=args.dry_run)


def cmd_tokenizer(args) -> int:
    from .launch import train_tokenizer_command
    return train_tokenizer_command(args.kind, args.vocab_size, args.files, args.out)


def cmd_report(args) -> int:
    from .report import report
    report(args.runs, target=args.target, k=args.smooth, baseline=args.baseline, out=args.out)
    return 0


def cmd_run(args) -> int:
    from .run import run
    return run(args.set_file, methods=args.methods, seeds=args.seeds, procs=args.procs, dry_run=args.dry_run)


def csv(kind):
    return lambda text: [kind(x) for x in text.split(",") if x]


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

    t = sub.add_parser("train", help="train a recipe with DeepSpeed")
    t.add_argument("recipe", help="a YAML recipe (see recipes/)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, e.g. --set optim.lr=3e-4 (repeatable)")
    t.add_argument("--procs", type=int, help="data-parallel processes on this node (default: GPUs, or 1 on CPU)")
    t.add_argument("--resume", default="none",
                   help="'auto' (the newest complete checkpoint, if any), a checkpoint tag, or 'none'")
    t.add_argument("--dry-run", action="store_true", help="print the resolved recipe and DeepSpeed JSON, and exit")
    t.set_defaults(func=cmd_train)

    k = sub.add_parser("tokenizer", help="train a tokenizer on a corpus (default: the offline corpus)")
    k.add_argument("--kind", choices=("wordpiece", "bpe"), required=True,
                   help="wordpiece (BERT, lower-cased) or bpe (GPT-2 byte-level)")
    k.add_argument("--vocab-size", type=int, default=8192)
    k.add_argument("--files", nargs="+", help="local .txt/.jsonl/.parquet files (default: the offline corpus)")
    k.add_argument("--out", required=True)
    k.set_defaults(func=cmd_tokenizer)

    u = sub.add_parser("run", help="a method comparison: source pretraining, each method and seed, the report")
    u.add_argument("set_file", metavar="SET", help="a recipe set (e.g. recipes/demo-bert.yaml)")
    u.add_argument("--methods", type=csv(str), help="comma-separated subset of the set's methods")
    u.add_argument("--seeds", type=csv(int), help="comma-separated seeds (default: the set's)")
    u.add_argument("--procs", type=int, help="processes per run (default: GPUs, or 1 on CPU)")
    u.add_argument("--dry-run", action="store_true", help="check every recipe and print the runs, and exit")
    u.set_defaults(func=cmd_run)

    r = sub.add_parser("report", help="FLOPs and wall-clock to a target loss, and savings against the baseline")
    r.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories written by b2b train")
    r.add_argument("--target", type=float,
                   help="target validation loss (default: the baseline's final smoothed loss, mean over seeds)")
    r.add_argument("--smooth", type=int, default=3, metavar="K",
                   help="trailing moving average over the last K evaluations (default 3)")
    r.add_argument("--baseline", default="scratch", metavar="METHOD",
                   help="method label of the from-scratch baseline (default: scratch)")
    r.add_argument("--out", default="runs/report", help="output directory (default runs/report)")
    r.set_defaults(func=cmd_report)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except (GrowthError, RecipeError) as err:
        print(f"b2b {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
