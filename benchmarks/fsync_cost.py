"""What putting a checkpoint on disk costs (issue 20, item 2): before 'latest' moves, each node
fsyncs the tag's files and directories (launchers/checkpoint.py, growth.adapters.files.fsync_tree).
This writes checkpoint-like tags (one torch.save file per rank, as DeepSpeed's ZeRO shards) of
several sizes into --dir, and times the write and the fsync separately.

    python benchmarks/fsync_cost.py --dir runs/fsync-bench --sizes 16,128,512 --ranks 2

Prints one line per size: MiB, write seconds, fsync seconds, fsync's share of the save.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch

from growth.adapters.files import fsync_tree


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dir", default="runs/fsync-bench")
    p.add_argument("--sizes", default="16,128,512", help="MiB per tag, comma-separated")
    p.add_argument("--ranks", type=int, default=2, help="files per tag")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    root = Path(args.dir)
    print("MiB | write s | fsync s | fsync share")
    for mib in (int(x) for x in args.sizes.split(",")):
        writes, syncs = [], []
        for i in range(args.repeats):
            tag = root / f"step{i:08d}"
            shutil.rmtree(tag, ignore_errors=True)
            tag.mkdir(parents=True)
            shard = torch.randn(mib * 2**20 // 4 // args.ranks)
            start = time.perf_counter()
            for rank in range(args.ranks):
                torch.save({"optimizer_state": shard}, tag / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
            written = time.perf_counter()
            fsync_tree(tag)
            synced = time.perf_counter()
            writes.append(written - start)
            syncs.append(synced - written)
            shutil.rmtree(tag)
        w, s = sorted(writes)[len(writes) // 2], sorted(syncs)[len(syncs) // 2]
        print(f"{mib} | {w:.3f} | {s:.3f} | {s / (w + s):.0%}", flush=True)


if __name__ == "__main__":
    main()
