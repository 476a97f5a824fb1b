"""The `b2b` command line."""

from __future__ import annotations

import argparse
import sys

from growth import DEPTH_METHODS, PRESETS, SYMMETRY_METHODS, WIDTH_METHODS, B2BError, GrowthError


def cmd_grow(args) -> int:
    from growth.adapters import megatron
    from growth.adapters.deepspeed import grow_checkpoint, is_checkpoint
    from growth.adapters.hf import grow_directory
    if args.noise_db is not None and args.break_symmetry != "noise":
        raise GrowthError(f"--noise-db applies to --break-symmetry noise, not {args.break_symmetry}")
    given = {k: v for k, v in (("noise_db", args.noise_db), ("insert", args.insert)) if v is not None}
    common = dict(width=args.width, depth=args.depth, seed=args.seed, symmetry=args.break_symmetry,
                  overwrite=args.overwrite, **given)
    if args.tp is not None and args.tp < 1:
        raise GrowthError(f"--tp {args.tp}: must be a positive integer")
    if megatron.open_source(args.src) is not None:
        if args.no_check:
            raise GrowthError(f"{args.src}: --no-check applies to HF model directories (a megatron growth is not "
                              "run as a model; b2b verify compares it)")
        if args.optimizer or args.schedule:
            raise GrowthError(f"{args.src}: --optimizer and --schedule apply to DeepSpeed checkpoints; a megatron "
                              "checkpoint is grown without optimizer state")
        megatron.grow_checkpoint(args.src, args.out, args.to, tp=args.tp, **common)
    elif args.tp is not None:
        raise GrowthError(f"{args.src}: --tp applies to megatron-core (tensor-parallel) checkpoints")
    elif is_checkpoint(args.src):
        if args.no_check:
            raise GrowthError(f"{args.src}: --no-check applies to HF model directories (a ZeRO growth is not run "
                              "as a model)")
        grow_checkpoint(args.src, args.out, args.to, optimizer=args.optimizer or "reset",
                        schedule=args.schedule or "restart", **common)
    elif args.optimizer or args.schedule:
        raise GrowthError(f"{args.src}: --optimizer and --schedule apply to DeepSpeed checkpoints; "
                          "an HF model directory has no optimizer state")
    else:
        grow_directory(args.src, args.out, args.to, check=not args.no_check, **common)
    return 0


def cmd_copies(args) -> int:
    from growth.adapters.hf import copy_cosines_of
    for kind, value in copy_cosines_of(args.model, args.manifest).items():
        print(f"{kind}: {value:.4f}")
    return 0


def cmd_convert(args) -> int:
    from growth.adapters.megatron import convert
    convert(args.src, args.out, overwrite=args.overwrite)
    return 0


def cmd_verify(args) -> int:
    from growth.adapters.verify import verify
    return verify(args.src, args.grown, args.text)


def cmd_train(args) -> int:
    from .launch import train
    return train(args.recipe, args.set, args.procs, resume=args.resume, dry_run=args.dry_run,
                 prepare_only=args.prepare_only, verbose=args.verbose)


def cmd_data_prepare(args) -> int:
    from . import config
    from .data import prepare, quiet_libraries
    quiet_libraries()
    print(prepare(config.load(args.recipe, args.set)))
    return 0


def cmd_tokenizer(args) -> int:
    from .launch import train_tokenizer_command
    return train_tokenizer_command(args.kind, args.vocab_size, args.files, args.out)


def cmd_vocab_transfer(args) -> int:
    from growth.adapters.vocab import transfer_directory
    transfer_directory(args.model, args.to_tokenizer, args.out, method=args.method, seed=args.seed)
    return 0


def cmd_report(args) -> int:
    from .report import report
    report(args.runs, target=args.target, k=args.smooth, baseline=args.baseline, out=args.out)
    return 0


def cmd_run(args) -> int:
    from .run import run
    return run(args.set_file, methods=args.methods, seeds=args.seeds, procs=args.procs, dry_run=args.dry_run,
               verbose=args.verbose)


def cmd_submit(args) -> int:
    from .submit import Resources, submit
    res = Resources(nodes=args.nodes, gpus_per_node=args.gpus_per_node, partition=args.partition, time=args.time,
                    account=args.account, signal_seconds=args.signal_seconds, cpus_per_node=args.cpus_per_node,
                    prepare_partition=args.prepare_partition, prepare_cpus=args.prepare_cpus)
    return submit(args.recipe, args.set, res, dry_run=args.dry_run)


def version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("bert2bert-recipes")
    except PackageNotFoundError:  # run from a checkout without installing it
        return "unknown (not installed)"


def csv(kind):
    return lambda text: [kind(x) for x in text.split(",") if x]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="b2b", description="bert2BERT: grow pretrained transformers and train them.")
    p.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("grow", help="grow an HF model directory, a DeepSpeed ZeRO checkpoint or a megatron-core "
                                    "tensor-parallel checkpoint into a larger shape")
    g.add_argument("src", help="HF model directory (or 'minilm', the packaged all-MiniLM-L6-v2), a DeepSpeed "
                               "checkpoint directory (ZeRO 1-3: its root with 'latest', or a tag directory), or a "
                               "megatron-core GPT checkpoint (torch_dist directory, or Megatron-LM's legacy "
                               "iter_XXXXXXX/mp_rank_XX layout)")
    g.add_argument("--to", required=True,
                   help=f"target: a preset ({', '.join(PRESETS)}), an HF config.json, "
                        "or layers=..,hidden=..,heads=..,ffn=.. (omitted keys keep the source's)")
    g.add_argument("--width", choices=WIDTH_METHODS, default="aki",
                   help="new neurons and heads: fpi (copies of the source's), aki (fan-in weights from the next "
                        "layer), direct (the small weights in a corner, the rest random), exact (fpi with the "
                        "symmetric map, integer ratios only) (default: %(default)s)")
    g.add_argument("--depth", choices=DEPTH_METHODS, default="stack",
                   help="new layers: stack (copies of the source's, in order) or identity (blocks that start as "
                        "the identity) (default: %(default)s)")
    g.add_argument("--insert", help="--depth identity: where the new blocks go, each a copy of the layer below it "
                                    "with zeroed output projections: even (spread through the stack, as LLaMA-Pro "
                                    "does), every=N (after every N source layers), top (above the source's "
                                    "layers) (default: even)")
    g.add_argument("--seed", type=int, default=0, help="for the random choices of growth (default: %(default)s)")
    g.add_argument("--break-symmetry", choices=SYMMETRY_METHODS, default="none",
                   help="split: unequal fan-in shares of the copied units (LEMON); noise: zero-sum noise over "
                        "the copies' fan-in weights (HyperCloning). Both are exact at initialisation, and a unit "
                        "and its copy get different gradients (default: none)")
    g.add_argument("--noise-db", type=float,
                   help="--break-symmetry noise: the signal-to-noise ratio of the noise in dB, its std relative "
                        "to each weight before it is made zero-sum over the copies (default: 10)")
    g.add_argument("--optimizer", choices=("reset", "grow"),
                   help="DeepSpeed source: Adam moments grown with the weights and step kept (grow), or "
                        "fresh moments and step 0 (reset, the default)")
    g.add_argument("--schedule", choices=("restart", "keep"),
                   help="DeepSpeed source: keep the lr schedule position and step counters, or restart "
                        "them (the default)")
    g.add_argument("--tp", type=int, help="megatron source: the tensor-parallel degree whose shards grow "
                                          "independently (default: the degree it was saved at)")
    g.add_argument("--no-check", action="store_true",
                   help="HF source: skip the forward pass that checks an exact growth before it is saved (it "
                        "loads the source and the grown model, about 1.2x the target's size in memory); "
                        "b2b verify runs it later")
    g.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    g.add_argument("--overwrite", action="store_true")
    g.set_defaults(func=cmd_grow)

    c = sub.add_parser("convert", help="convert between an HF GPT-2 or Llama-family (Llama, Mistral, Qwen2) "
                                       "directory and a megatron-core torch_dist checkpoint (the direction "
                                       "follows the source)")
    c.add_argument("src", help="an HF GPT-2 or Llama-family model directory, or a megatron-core GPT checkpoint")
    c.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    c.add_argument("--overwrite", action="store_true")
    c.set_defaults(func=cmd_convert)

    v = sub.add_parser("verify", help="compare a grown model's outputs with its source's")
    v.add_argument("src")
    v.add_argument("grown")
    v.add_argument("--text", help="a text file to run both models on (default: a fixed paragraph)")
    v.set_defaults(func=cmd_verify)

    cp = sub.add_parser("copies", help="how alike a grown model's copied units still are (mean cosine per kind)")
    cp.add_argument("model", help="an HF model directory, or a b2b train run directory (RUN/final against "
                                  "RUN/grown/growth.json)")
    cp.add_argument("--manifest", help="the growth.json the model was grown by (default: MODEL/growth.json)")
    cp.set_defaults(func=cmd_copies)

    t = sub.add_parser("train", help="train a recipe with DeepSpeed")
    t.add_argument("recipe", help="a YAML recipe (see recipes/)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, e.g. --set optim.lr=3e-4 (repeatable)")
    t.add_argument("--procs", type=int, help="processes on this node: data-parallel x parallel.tensor (default: GPUs, "
                                             "or "
                                                  "parallel.tensor on CPU)")
    t.add_argument("--resume", default="none",
                   help="'auto' (the newest complete checkpoint, if any), a checkpoint tag, or 'none'")
    t.add_argument("--dry-run", action="store_true", help="print the resolved recipe and DeepSpeed JSON, and exit")
    t.add_argument("--verbose", action="store_true", help="keep DeepSpeed's and megatron's routine log lines and "
                                                          "warnings (default: errors only)")
    t.add_argument("--prepare-only", action="store_true",
                   help="check, prepare the data and the run directory for --procs processes in all, and exit "
                        "(a scheduler starts the workers: see slurm/)")
    t.set_defaults(func=cmd_train)

    k = sub.add_parser("tokenizer", help="train a tokenizer on a corpus (default: the offline corpus)")
    k.add_argument("--kind", choices=("wordpiece", "bpe"), required=True,
                   help="wordpiece (BERT, lower-cased) or bpe (GPT-2 byte-level)")
    k.add_argument("--vocab-size", type=int, default=8192)
    k.add_argument("--files", nargs="+", help="local .txt/.jsonl/.parquet files (default: the offline corpus)")
    k.add_argument("--out", required=True)
    k.set_defaults(func=cmd_tokenizer)

    a = sub.add_parser("data", help="data tools").add_subparsers(dest="data_command", required=True)
    r = a.add_parser("prepare", help="tokenise a recipe's corpus into its cache entry (megatron-core's indexed "
                     "format), with every core; b2b train uses it; resumes a killed preparation")
    r.add_argument("recipe", help="a recipe YAML")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key (e.g. data.num_proc=8); repeatable")
    r.set_defaults(func=cmd_data_prepare)

    w = sub.add_parser("vocab", help="vocabulary tools").add_subparsers(dest="vocab_command", required=True)
    x = w.add_parser("transfer", help="give a model another tokenizer (VIPI: shared tokens keep their rows)")
    x.add_argument("model", help="HF model directory (or 'minilm')")
    x.add_argument("--to-tokenizer", required=True, metavar="TOK", help="a tokenizer or model directory")
    x.add_argument("--method", choices=("vipi", "exact", "random"), default="vipi",
                   help="vipi: exact matches, then segmentation means; exact: exact matches only; "
                        "random: every row fresh (default vipi)")
    x.add_argument("--seed", type=int, default=0, help="for the fresh rows")
    x.add_argument("--out", required=True, help="output directory (must not exist)")
    x.set_defaults(func=cmd_vocab_transfer)

    u = sub.add_parser("run", help="a method comparison: source pretraining, each method and seed, the report")
    u.add_argument("set_file", metavar="SET", help="a recipe set (e.g. recipes/sets/demo-bert.yaml)")
    u.add_argument("--methods", type=csv(str), help="comma-separated subset of the set's methods")
    u.add_argument("--seeds", type=csv(int), help="comma-separated seeds (default: the set's)")
    u.add_argument("--procs", type=int, help="processes per run (default: GPUs, or 1 on CPU)")
    u.add_argument("--dry-run", action="store_true", help="check every recipe and print the runs, and exit")
    u.add_argument("--verbose", action="store_true", help="keep DeepSpeed's and megatron's routine log lines")
    u.set_defaults(func=cmd_run)

    b = sub.add_parser("submit", help="submit a recipe (or a recipe set) to SLURM: requeued on preemption, resumed")
    b.add_argument("recipe", help="a YAML recipe, or a recipe set (recipes/sets/) for a job array and its report")
    b.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key (repeatable)")
    b.add_argument("--nodes", type=int, default=1)
    b.add_argument("--gpus-per-node", type=int, help="processes per node (default: the nodes' GPUs, or 1 on CPU nodes)")
    b.add_argument("--cpus-per-node", type=int, help="CPUs per node, shared by its processes (default: the "
                                                      "partition's smallest node)")
    b.add_argument("--partition", help="default: the cluster's default partition")
    b.add_argument("--prepare-partition", metavar="P", help="the data preparation job's partition, CPU nodes "
                   "(default: --partition)")
    b.add_argument("--prepare-cpus", type=int, metavar="N", help="its cores (default: the partition's smallest node's)")
    b.add_argument("--time", default="1:00:00", help="time limit, e.g. 2-00:00:00 (default 1:00:00)")
    b.add_argument("--account")
    b.add_argument("--signal-seconds", type=int, default=120, metavar="S",
                   help="checkpoint and requeue S seconds before the time limit (default 120)")
    b.add_argument("--dry-run", action="store_true", help="print the job scripts, and submit nothing (the "
                                                          "partition is checked when the controller answers)")
    b.set_defaults(func=cmd_submit)

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
    except B2BError as err:
        print(f"b2b {args.command}: error: {err}", file=sys.stderr)
        return 2
    except (NotADirectoryError, FileExistsError, PermissionError, IsADirectoryError) as err:
        # an output path that cannot be made (a file where a directory should be, no permission)
        where = f": {err.filename}" if err.filename else ""
        print(f"b2b {args.command}: error: cannot write{where} ({err.strerror or err}); choose another path",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
