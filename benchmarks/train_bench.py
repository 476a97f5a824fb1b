"""Throughput of `b2b train` against a bare PyTorch loop on the same model, batch and machine.

    .venv/bin/python benchmarks/train_bench.py [--steps 60] [--warmup 10] [--repeats 2] [--zero 0]

Both sides train the same BERT (built by launchers.model from the same recipe and seed) on the
same batches (launchers.batches) in fp32 with AdamW, gradient clipping and a warmup/decay schedule.
The bare loop is plain PyTorch in this process; `b2b train` runs one worker through the DeepSpeed
launcher, and its tokens/s are read back from its TensorBoard events (perf/tokens_per_s: the
step's forward, backward and optimizer step, as timed by the trainer). Each side reports the
median over the steps after the first `--warmup`; the sides alternate `--repeats` times.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from launchers import config  # noqa: E402
from launchers.batches import Batches  # noqa: E402
from launchers.data import prepare, quiet_libraries  # noqa: E402
from launchers.events import read_scalars  # noqa: E402
from launchers.model import build_model  # noqa: E402
from launchers.train import param_groups  # noqa: E402

SHAPE = ["model.layers=4", "model.hidden=256", "model.heads=4", "model.ffn=1024", "data.seq_len=128",
         "batch.micro=16", "batch.accum=1", "model.dropout=0.1", "optim.warmup_steps=5"]


def bare_loop(recipe: config.Recipe, steps: int, warmup: int) -> float:
    """Median tokens/s of a plain PyTorch training loop."""
    data = Batches(prepare(recipe), recipe, rank=0, world=1)
    model = build_model(recipe, data.tokenizer).train()
    o = recipe.optim
    opt = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    total = recipe.train.steps
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: i / o.warmup_steps if i < o.warmup_steps else (total - i) / max(1, total - o.warmup_steps))
    rates = []
    for step in range(1, steps + 1):
        batch = data.train_batch(step, 0)
        start = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        rates.append(batch["input_ids"].numel() / (time.perf_counter() - start))
    return statistics.median(rates[warmup:])


def b2b_train(recipe_path: Path, sets: list[str], out: Path, warmup: int) -> tuple[float, float]:
    """Median tokens/s of `b2b train` (from its TensorBoard events), and its wall time."""
    cmd = [sys.executable, "-m", "launchers.cli", "train", str(recipe_path), "--procs", "1",
           *sum((["--set", s] for s in sets + [f"out_dir={out}"]), [])]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    wall = time.perf_counter() - start
    rates = read_scalars(out)["perf/tokens_per_s"]
    return statistics.median(rates[s] for s in sorted(rates)[warmup:]), wall


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--zero", type=int, default=0)
    args = p.parse_args()
    quiet_libraries()
    recipe_path = ROOT / "recipes" / "bert-tiny-cpu.yaml"
    with tempfile.TemporaryDirectory() as tmp:
        sets = SHAPE + [f"train.steps={args.steps}", "train.eval_every=0", "train.eval_batches=1",
                        "checkpoint.every=0", f"zero.stage={args.zero}", f"data.cache_dir={tmp}/cache",
                        "logging.progress=false"]
        recipe = config.load(recipe_path, sets)
        prepare(recipe)
        bare, ours = [], []
        for r in range(args.repeats):
            bare.append(bare_loop(recipe, args.steps, args.warmup))
            rate, wall = b2b_train(recipe_path, sets, Path(tmp) / f"run{r}", args.warmup)
            ours.append(rate)
            print(f"repeat {r}: bare loop {bare[-1]:,.0f} tokens/s, b2b train {rate:,.0f} tokens/s "
                  f"(ratio {rate / bare[-1]:.3f}; b2b wall {wall:.1f} s incl. launch)", flush=True)
    m = recipe.model
    print(f"BERT {m.layers}x{m.hidden} (ffn {m.ffn}), seq {recipe.data.seq_len}, micro batch {recipe.batch.micro}, "
          f"fp32, ZeRO-{args.zero}, 1 process, {torch.get_num_threads()} threads, {args.steps} steps "
          f"(median after {args.warmup})")
    print(f"bare loop {statistics.mean(bare):,.0f} tokens/s; b2b train {statistics.mean(ours):,.0f} tokens/s; "
          f"ratio {statistics.mean(ours) / statistics.mean(bare):.3f} (goal >= 0.9)")


if __name__ == "__main__":
    main()
