"""Benchmark: grow a ZeRO-3 checkpoint shard by shard, next to consolidate-then-grow, in one run.

The source is written by real DeepSpeed (2 gloo processes, ZeRO-3, AdamW, one training step) for
a BertForMaskedLM larger than the memory bound claimed for sharded growth. It is grown to a wider
and deeper target with Adam's moments (`--optimizer grow`), writing the same universal checkpoint
both ways, each in a fresh process so that its peak RSS is its own:

  sharded:     growth.adapters.deepspeed.grow_checkpoint as `b2b grow` runs it: each parameter's
               fragments are read from the rank files, grown and written, one at a time
  consolidate: every parameter's weights (DeepSpeed's zero_to_fp32) and moments read into memory
               first, then grown and written by the same code

    .venv/bin/python benchmarks/zero_grow_bench.py [--workdir DIR] [--repeat N]

Goal (issue 5): sharded peak RSS < 3x the largest parameter + a fixed overhead (the RSS of the
same process before growing), and no slower than consolidate-then-grow.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from measure import rss_bytes, run_phase

SOURCE = dict(vocab_size=30522, hidden_size=1024, num_hidden_layers=6, num_attention_heads=16,
              intermediate_size=4096)
TARGET = "layers=12,hidden=1536,heads=24,ffn=6144"




def phase_source_worker(out: str) -> dict:
    """Run under torchrun: one ZeRO-3 AdamW step of the source model, then save."""
    import deepspeed
    import torch
    from transformers import BertConfig, BertForMaskedLM

    from launchers.workers import init_distributed
    init_distributed(cpu=True)
    torch.manual_seed(0)
    config = BertConfig(**SOURCE)
    model = BertForMaskedLM(config)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config={
        "train_batch_size": 2, "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}}, "steps_per_print": 10 ** 9})
    ids = torch.randint(0, SOURCE["vocab_size"], (1, 16))
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()
    engine.save_checkpoint(out, "step00000001")
    if torch.distributed.get_rank() == 0:
        config.architectures = ["BertForMaskedLM"]
        config.save_pretrained(Path(out) / "step00000001")
    return {}


def phase_grow(src: str, out: str, mode: str) -> dict:
    from growth.adapters import deepspeed as adapter
    if mode == "consolidate":
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint, to_torch_tensor

        sharded = adapter.ZeroCheckpoint

        class Consolidated(sharded):
            """Every state of every parameter in memory before growth starts."""

            def __init__(self, path):
                super().__init__(path)
                self.full = {"fp32": to_torch_tensor(get_fp32_state_dict_from_zero_checkpoint(path))}
                for key in ("exp_avg", "exp_avg_sq"):
                    self.full[key] = {name: sharded.read(self, name, key) for name in self.shapes}

            def read(self, name, key):
                return self.full[key][name]

        adapter.ZeroCheckpoint = Consolidated
    base = rss_bytes(peak=False)
    start = time.perf_counter()
    adapter.grow_checkpoint(src, out, TARGET, width="fpi", depth="stack", optimizer="grow", log=lambda *_: None)
    seconds = time.perf_counter() - start
    largest = max(t.numel() * 4 for t in adapter.read_universal(out, ["bert.embeddings.word_embeddings.weight"])
                  .values())
    return {"seconds": seconds, "peak_rss": rss_bytes(peak=True), "base_rss": base, "largest_param": largest,
            "written": sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file())}




def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--repeat", type=int, default=1, help="sharded/consolidate pairs (the median is reported)")
    ap.add_argument("--phase", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:
        name, *rest = args.phase
        print(json.dumps({"source-worker": phase_source_worker, "grow": phase_grow}[name](*rest)))
        return

    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        src, out = os.path.join(work, "source"), os.path.join(work, "grown")
        run_phase(__file__, "source-worker", src, torchrun=True)
        source_bytes = sum(f.stat().st_size for f in Path(src).rglob("*.pt"))
        pairs = []
        for _ in range(args.repeat):
            pair = []
            for mode in ("sharded", "consolidate"):
                shutil.rmtree(out, ignore_errors=True)
                pair.append(run_phase(__file__, "grow", src, out, mode))
            pairs.append(pair)
    gib, mib = 2 ** 30, 2 ** 20
    for i, (sharded, whole) in enumerate(pairs):
        print(f"run {i}: sharded {sharded['seconds']:.1f} s, peak RSS {sharded['peak_rss'] / gib:.2f} GiB; "
              f"consolidate {whole['seconds']:.1f} s, peak RSS {whole['peak_rss'] / gib:.2f} GiB")
    sharded, whole = sorted(pairs, key=lambda p: p[0]["seconds"] / p[1]["seconds"])[len(pairs) // 2]
    largest = sharded["largest_param"]
    print(f"median run, {os.cpu_count()} CPUs: ZeRO-3 DP 2 BERT {SOURCE['num_hidden_layers']}/{SOURCE['hidden_size']} "
          f"(checkpoint {source_bytes / gib:.2f} GiB) -> {TARGET}, fpi + stack, Adam moments grown "
          f"({sharded['written'] / gib:.2f} GiB written)")
    print(f"largest parameter: {largest / mib:.0f} MiB (word embeddings, fp32)")
    for label, r in (("sharded", sharded), ("consolidate-then-grow", whole)):
        over = r["peak_rss"] - r["base_rss"]
        print(f"{label}: {r['seconds']:.1f} s, peak RSS {r['peak_rss'] / gib:.2f} GiB = fixed "
              f"{r['base_rss'] / mib:.0f} MiB + {over / mib:.0f} MiB ({over / largest:.2f}x the largest parameter)")
    print(f"goal: sharded growth above the fixed overhead < 3x the largest parameter: "
          f"{(sharded['peak_rss'] - sharded['base_rss']) / largest:.2f}x; "
          f"time sharded / consolidate = {sharded['seconds'] / whole['seconds']:.2f} (goal <= 1)")


if __name__ == "__main__":
    main()
