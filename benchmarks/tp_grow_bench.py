"""Benchmark: grow a tensor-parallel megatron-core checkpoint shard by shard, next to
gather-then-grow, in one run.

The source is a torch_dist checkpoint of a megatron-core GPT saved at TP=4 (every tensor-parallel
tensor in 4 chunks, the layers stacked, as megatron-core and `b2b train` write it), with random
weights written chunk by chunk by growth/adapters/dist_checkpoint.py. It is grown to a wider and
deeper target with the same code both ways, each in a fresh process so that its peak RSS is its own:

  shard-local: growth.adapters.megatron.grow_checkpoint as `b2b grow` runs it: each target chunk
               (one layer's TP shard of one tensor) computed from the source's same shard
  gather:      every tensor gathered to its full, unsharded size in memory first (what converting
               to TP=1 does), then grown and written by the same code

    .venv/bin/python benchmarks/tp_grow_bench.py [--arch gpt2|llama] [--workdir DIR] [--repeat N]

--arch llama: a SmolLM2-like Llama (30 x 576, FFN 1536, vocabulary 49152, tied; 12 query heads in 4
key/value groups rather than SmolLM2's 9 in 3, so that TP 4 holds whole groups) grown to twice its
width (hidden 1152, 24 heads in 8 groups, FFN 3072), FPI: the grouped fused QKV and SwiGLU's
[gate; up] fc1, whose TP shard is two blocks.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from measure import rss_bytes, run_phase  # noqa: E402

# --arch -> (the source's HF config, the target, the depth method)
ARCHS = {
    "gpt2": (dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], n_layer=4, n_embd=2048, n_head=16,
                  n_inner=8192, vocab_size=32768, n_positions=1024),
             "layers=8,hidden=3072,heads=24,ffn=12288", "stack"),
    "llama": (dict(model_type="llama", architectures=["LlamaForCausalLM"], num_hidden_layers=30, hidden_size=576,
                   num_attention_heads=12, num_key_value_heads=4, intermediate_size=1536, vocab_size=49152,
                   max_position_embeddings=2048, tie_word_embeddings=True, rms_norm_eps=1e-5),
              "layers=30,hidden=1152,heads=24,kv_heads=8,ffn=3072", "stack"),
}
TP = 4


def phase_source(out: str, arch: str) -> dict:
    """Random weights for every megatron module name, written as TP=4 chunks, one at a time."""
    import torch

    from growth.adapters.dist_checkpoint import Chunk, save
    from growth.adapters.megatron import padded_vocab, sharded_key, tensor_region
    from growth.grow import FRAGMENTS, axis_size
    from growth.schema import MCORE_GPT, MCORE_LLAMA
    from growth.shape import shape_from_config
    source = ARCHS[arch][0]
    cfg = {**source, "padded_vocab_size": padded_vocab(source["vocab_size"])}
    shape = shape_from_config(cfg)
    rows = {"embedding.word_embeddings.weight": cfg["padded_vocab_size"],
            "embedding.position_embeddings.weight": source.get("n_positions")}
    chunks = []
    for template, param in (MCORE_LLAMA if arch == "llama" else MCORE_GPT).params.items():
        if param.kind == "output" or param.optional:
            continue  # tied; no q/k/v biases
        layered = "{L}" in template
        key, _ = sharded_key(template.replace("{L}", "0"))
        local = tuple(axis_size(r, shape) or rows[template] for r in param.axes)
        gshape = ((shape.layers,) if layered else ()) + local
        blocks = TP * FRAGMENTS.get(param.axes[param.tp], 1) if param.tp is not None else 1
        for layer in range(shape.layers) if layered else [None]:
            for shard in range(blocks) if param.tp is not None else [None]:
                offsets, sizes = tensor_region(gshape, layer, param.tp, shard, blocks)
                seed = zlib.crc32(repr((key, layer, shard)).encode())
                chunks.append(Chunk(key, gshape, offsets, sizes, torch.float32,
                                    lambda s=sizes, seed=seed:
                                    torch.randn(s, generator=torch.Generator().manual_seed(seed)) * 0.02))
    Path(out).mkdir(parents=True)
    save(out, chunks)
    (Path(out) / "config.json").write_text(json.dumps(cfg))
    return {}


def phase_grow(src: str, out: str, mode: str, arch: str) -> dict:
    from growth.adapters import megatron
    if mode == "gather":
        sharded = megatron.DistSource

        class Gathered(sharded):
            """Every tensor at its full size in memory before growth starts."""

            def __init__(self, path):
                super().__init__(path)
                self.full = {name: sharded.get(self, name, None, 1) for name in self.shapes}

            def get(self, name, shard, shards):
                full = self.full[name]
                tp = megatron.tp_axis(name)
                if shard is None or tp is None:
                    return full
                return full.narrow(tp, shard * full.shape[tp] // shards, full.shape[tp] // shards)

        megatron.DistSource = Gathered
    base = rss_bytes(peak=False)
    start = time.perf_counter()
    _, target, depth = ARCHS[arch]
    megatron.grow_checkpoint(src, out, target, width="fpi", depth=depth, log=lambda *_: None)
    seconds = time.perf_counter() - start
    from growth.adapters.dist_checkpoint import DistCheckpoint
    grown = DistCheckpoint(out)
    largest = max(md.size.numel() // (md.size[0] if k.startswith("decoder.layers.") else 1) * 4
                  for k, md in grown.tensors.items())
    return {"seconds": seconds, "peak_rss": rss_bytes(peak=True), "base_rss": base, "largest_param": largest,
            "largest_shard": largest // TP,
            "written": sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=sorted(ARCHS), default="gpt2")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--repeat", type=int, default=3, help="runs of each mode, in alternating order (medians reported)")
    ap.add_argument("--phase", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:
        name, *rest = args.phase
        print(json.dumps({"source": phase_source, "grow": phase_grow}[name](*rest)))
        return

    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        src, out = os.path.join(work, "source"), os.path.join(work, "grown")
        run_phase(__file__, "source", src, args.arch)
        source_bytes = sum(f.stat().st_size for f in Path(src).rglob("*.distcp"))
        runs = {"shard-local": [], "gather": []}
        for i in range(args.repeat):  # alternating which goes first: the first write after the source's is slower
            for mode in ("shard-local", "gather")[::1 if i % 2 == 0 else -1]:
                shutil.rmtree(out, ignore_errors=True)
                runs[mode].append(run_phase(__file__, "grow", src, out, mode, args.arch))
    gib, mib = 2 ** 30, 2 ** 20
    for mode, results in runs.items():
        print(f"{mode}: " + ", ".join(f"{r['seconds']:.1f} s" for r in results))
    local, gather = (sorted(runs[m], key=lambda r: r["seconds"])[(args.repeat - 1) // 2] for m in runs)  # medians
    from growth.shape import shape_from_config
    source, target, depth = ARCHS[args.arch]
    shape = shape_from_config(source)
    print(f"median of {args.repeat}, {os.cpu_count()} CPUs: megatron-core {args.arch} {shape} saved at TP {TP} "
          f"(checkpoint {source_bytes / gib:.2f} GiB) -> {target}, fpi + {depth}, shard-local at TP {TP} "
          f"({local['written'] / gib:.2f} GiB written)")
    print(f"largest target parameter {local['largest_param'] / mib:.0f} MiB, its TP shard "
          f"{local['largest_shard'] / mib:.0f} MiB (fp32)")
    for label, r in (("shard-local", local), ("gather-then-grow", gather)):
        over = r["peak_rss"] - r["base_rss"]
        print(f"{label}: {r['seconds']:.1f} s, peak RSS {r['peak_rss'] / gib:.2f} GiB = fixed "
              f"{r['base_rss'] / mib:.0f} MiB + {over / mib:.0f} MiB ({over / r['largest_shard']:.2f}x the "
              f"largest shard)")
    print(f"peak above the fixed overhead, gather / shard-local: "
          f"{(gather['peak_rss'] - gather['base_rss']) / (local['peak_rss'] - local['base_rss']):.1f}x; "
          f"time shard-local / gather = {local['seconds'] / gather['seconds']:.2f}")


if __name__ == "__main__":
    main()
