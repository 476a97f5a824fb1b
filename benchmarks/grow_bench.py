"""Benchmark: grow a randomly initialised BERT_BASE (MLM head) into BERT_LARGE with
`b2b grow`, next to a plain torch.save of the same target state dict, in the same run; or
(`--case smollm2`) the real SmolLM2-135M (the `smollm2` alias, dequantised once into the cache)
into twice its width and depth: 60 layers, hidden 1152, 18 heads, 6 KV heads, FFN 3072, with
LLaMA-Pro's interleaved identity blocks.

Each phase runs in a fresh process so its peak RSS is its own:
  grow: growth.adapters.hf.grow_directory (read source, grow, write safetensors + config)
  save: load the grown state dict, then torch.save it (the time of torch.save alone)

    .venv/bin/python benchmarks/grow_bench.py [--case bert-large|smollm2] [--width fpi] [--no-check] [--workdir DIR]

Goal (issue 2): growth time <= 2x the save time, growth peak RSS <= 2x the target's size.
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

CASES = {  # source, target, depth
    "bert-large": ("bert-base", "bert-large", "stack"),
    "smollm2": ("smollm2", "layers=60,hidden=1152,heads=18,ffn=3072", "identity"),
}


def phase_source(src: str, case: str) -> dict:
    if case == "smollm2":
        from growth.adapters.files import resolve
        resolve("smollm2")  # the GGUF dequantised into the cache, outside the timed growth
        return {}
    import torch
    from transformers import BertConfig, BertForMaskedLM
    torch.manual_seed(0)
    BertForMaskedLM(BertConfig()).save_pretrained(src)  # bert-base-uncased's shape
    return {}


def phase_grow(src: str, out: str, width: str, case: str, check: str) -> dict:
    from growth.adapters.hf import grow_directory
    _, target, depth = CASES[case]
    start = time.perf_counter()
    grow_directory("smollm2" if case == "smollm2" else src, out, target, width=width, depth=depth, seed=0,
                   log=lambda *_: None, check=check == "check")
    return {"seconds": time.perf_counter() - start, "peak_rss": rss_bytes(peak=True)}


def phase_save(grown: str, dest: str) -> dict:
    import torch
    from safetensors.torch import load_file
    state = load_file(Path(grown) / "model.safetensors")
    start = time.perf_counter()
    torch.save(state, dest)
    return {"seconds": time.perf_counter() - start, "peak_rss": rss_bytes(peak=True),
            "target_bytes": sum(t.numel() * t.element_size() for t in state.values())}



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", choices=sorted(CASES), default="bert-large")
    ap.add_argument("--width", default="fpi")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--repeat", type=int, default=3, help="grow/save pairs to run (median reported)")
    ap.add_argument("--no-check", action="store_true", help="b2b grow --no-check: an exact growth is not run "
                                                            "against its source before it is saved")
    ap.add_argument("--phase", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:
        name, *rest = args.phase
        result = {"source": phase_source, "grow": phase_grow, "save": phase_save}[name](*rest)
        print(json.dumps(result))
        return

    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        src, out, dest = (os.path.join(work, n) for n in ("source", "grown", "target.pt"))
        run_phase(__file__, "source", src, args.case)
        pairs = []
        for _ in range(args.repeat):
            shutil.rmtree(out, ignore_errors=True)
            pairs.append((run_phase(__file__, "grow", src, out, args.width, args.case,
                                    "no-check" if args.no_check else "check"),
                          run_phase(__file__, "save", out, dest)))
    for i, (grow, save) in enumerate(pairs):
        print(f"run {i}: grow {grow['seconds']:.2f} s, save {save['seconds']:.2f} s, "
              f"ratio {grow['seconds'] / save['seconds']:.2f}")
    grow, save = sorted(pairs, key=lambda p: p[0]["seconds"] / p[1]["seconds"])[len(pairs) // 2]
    gib = 2 ** 30
    source, target, depth = CASES[args.case]
    print(f"median run: {source} -> {target}, width {args.width}, depth {depth}"
          f"{', --no-check' if args.no_check else ''}, {os.cpu_count()} CPUs")
    print(f"target state dict: {save['target_bytes'] / gib:.2f} GiB")
    print(f"b2b grow:   {grow['seconds']:.2f} s in-process ({grow['process_seconds']:.2f} s with "
          f"interpreter and imports), peak RSS {grow['peak_rss'] / gib:.2f} GiB")
    print(f"torch.save: {save['seconds']:.2f} s, peak RSS {save['peak_rss'] / gib:.2f} GiB "
          "(process holding the target state dict)")
    print(f"ratios: time {grow['seconds'] / save['seconds']:.2f}x save (goal <= 2), "
          f"peak RSS {grow['peak_rss'] / save['target_bytes']:.2f}x target size (goal <= 2)")


if __name__ == "__main__":
    main()
