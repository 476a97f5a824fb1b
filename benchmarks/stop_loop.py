"""The stop path, counted (issue 20, item 0): a 2-process ZeRO run stopped by `train.stop_at`,
N times, its workers started as `b2b train` starts them (workers.start_workers), and each
worker's exit code tallied. The contract: every worker exits 0 once rank 0 has committed
status.json "stopped" (from which `b2b train` and the SLURM entrypoint derive 75, requeue); a
teardown crash ("terminate called without an active exception", exit 250 once in a fresh
clone's `make test`, before the workers left through os._exit) shows as another code.

    python benchmarks/stop_loop.py --runs 20 --stage 3 --arch gpt2 --out runs/stop-loop

Prints one line per run and the tally; exits 1 if any worker broke the contract.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import sys
import time
from pathlib import Path

from launchers.checkpoint import RunDir
from launchers.cli import main as b2b
from launchers.workers import start_workers

ROOT = Path(__file__).resolve().parent.parent

RECIPES = {"gpt2": ROOT / "recipes" / "gpt-tiny-cpu.yaml", "bert": ROOT / "recipes" / "bert-tiny-cpu.yaml"}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--stage", type=int, default=3)
    p.add_argument("--arch", choices=sorted(RECIPES), default="gpt2")
    p.add_argument("--out", type=Path, default=Path("runs/stop-loop"))
    args = p.parse_args()
    sets = [f"data.cache_dir={args.out / 'cache'}", "data.max_documents=800", "data.vocab_size=512",
            "logging.progress=false", f"zero.stage={args.stage}", "train.steps=12", "train.eval_every=6",
            "optim.warmup_steps=2", "checkpoint.every=4", "train.stop_at=6"]
    tally, broken = collections.Counter(), 0
    for i in range(args.runs):
        run = args.out / f"run{i}"
        shutil.rmtree(run, ignore_errors=True)
        argv = ["train", str(RECIPES[args.arch]), "--procs", "2", "--prepare-only",
                *sum((["--set", s] for s in [f"out_dir={run}", *sets]), [])]
        if b2b(argv) != 0:
            return 2
        start = time.time()
        paths = [run / f"rank{rank}.log" for rank in range(2)]
        files = [open(path, "w") for path in paths]
        codes = [w.wait(timeout=600) for w in start_workers(run, 2, "none", dict(os.environ, DS_ACCELERATOR="cpu"),
                                                             files)]
        for f in files:
            f.close()
        logs = [path.read_text() for path in paths]
        state = json.loads(RunDir(run).status.read_text()).get("state")
        terminate = sum("terminate called" in log for log in logs)
        tally.update(codes)
        bad = any(codes) or state != "stopped"
        broken += bad
        print(f"run {i}: worker exit codes {codes}, status {state}, 'terminate called' in {terminate} log(s), "
              f"{time.time() - start:.1f} s{'  <- broke the contract' if bad else ''}", flush=True)
        if not bad:
            shutil.rmtree(run)
    print(f"{args.runs} runs ({args.arch}, ZeRO-{args.stage}, 2 workers): exit codes {dict(tally)}; "
          f"{broken} run(s) broke the contract")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
