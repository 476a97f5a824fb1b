"""Growing megatron-core tensor-parallel checkpoints of a Llama (RMSNorm, SwiGLU, RoPE, 8 query
heads in 4 key/value groups, untied output) shard by shard, against real megatron-core: a Llama
saved at TP=2 by 2 gloo processes (tests/megatron_worker.py) as a torch_dist checkpoint and in
Megatron-LM's legacy layout is grown by `b2b grow` at TP 2, 1 and 4, and megatron-core's own
dist_checkpointing loads every result at TP 2 and TP 1. Exact, integer-ratio FPI and identity-depth
growths keep the source's logits; growing shard-locally equals growing the converted HF model with
the same sharded maps, then converting, bit for bit; every read of a sharded tensor covers one shard
(SwiGLU's fc1: one half of one); bad input is one line."""

from pathlib import Path

import pytest
import torch

from growth import grow_state_dict, parse_target, schema_for, shape_from_config
from growth.adapters.dist_checkpoint import DistCheckpoint
from growth.adapters.megatron import DistSource, mcore_to_hf, sharded_key, source_config
from growth.schema import MCORE_LLAMA
from launchers.cli import main

import harness

WORKER = Path(__file__).parent / "megatron_worker.py"
WIDER = "layers=2,hidden=128,heads=16,kv_heads=8,ffn=192"  # twice the width, head_dim 8 kept (RoPE)
DEEPER = "layers=4,hidden=128,heads=16,kv_heads=8,ffn=192"  # and twice the depth, in identity blocks
TOLERANCE = 1e-5  # max |a - b| / max |a|, float32 logits of two equal functions computed differently
# name -> b2b grow arguments (the source saved at TP 2; --tp: the degree grown at)
GROWN = {
    "exact": ["--to", WIDER, "--width", "exact"],
    "fpi-tp1": ["--to", WIDER, "--width", "fpi", "--tp", "1"],
    "fpi-tp4": ["--to", WIDER, "--width", "fpi", "--tp", "4"],
    "identity": ["--to", DEEPER, "--width", "fpi", "--depth", "identity"],
    "legacy-exact": ["--to", WIDER, "--width", "exact"],
    "split": ["--to", WIDER, "--width", "fpi", "--break-symmetry", "split"],
    "aki": ["--to", WIDER, "--width", "aki"],
    "in-groups": ["--to", "layers=2,hidden=128,heads=16,kv_heads=4,ffn=192", "--width", "exact"],  # 4 heads a group
    "stacked": ["--to", DEEPER, "--width", "fpi"],
    "direct-tp1": ["--to", WIDER, "--width", "direct", "--tp", "1"],
}


def b2b(*argv) -> int:
    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("megatron-llama")
    harness.torchrun(WORKER, "save", d, "llama")
    for name, args in GROWN.items():
        with harness.recorded_reads() as recorded:
            assert b2b("grow", d / ("legacy" if name.startswith("legacy") else "source"), *args,
                       "--out", d / name) == 0, name
        if name == "exact":
            reads = recorded
    names = ["source", *GROWN]
    harness.torchrun(WORKER, "logits", d, *(d / n for n in names))
    logits = {(Path(k[0]).name, k[1]): v for k, v in torch.load(d / "logits.pt").items() if k != "ids"}
    return d, logits, reads


@pytest.mark.parametrize("name", ["exact", "fpi-tp1", "fpi-tp4", "identity", "legacy-exact", "split", "in-groups"])
def test_function_preserving_growth_keeps_the_logits_at_tp2_and_tp1(run, name):
    _, logits, _ = run
    assert harness.rel(logits["source", 1], logits["source", 2]) < TOLERANCE
    for tp in (2, 1):
        assert harness.rel(logits[name, tp], logits["source", 2]) < TOLERANCE, (name, tp)
    for other in ("aki", "stacked", "direct-tp1"):  # new units from layer l+1, stacked layers, random new units
        assert harness.rel(logits[other, 2], logits["source", 2]) > 1e-3, other
        assert harness.rel(logits[other, 1], logits[other, 2]) < TOLERANCE, other  # but the same function at TP 1


@pytest.mark.parametrize("name", ["fpi-tp1", "fpi-tp4", "identity", "aki", "split", "in-groups", "stacked"])
def test_shard_local_growth_equals_growing_the_converted_hf_model(run, name):
    """Growing the torch_dist checkpoint shard by shard = converting it to HF, growing the HF
    Llama (its q/k/v, gate/up/down by the same maps, drawn per shard) and converting back: bit for
    bit. So the grouped fused QKV and the [gate; up] fc1 follow HF's grouped-query rule."""
    d, _, _ = run
    source = DistSource(d / "source")
    cfg = source_config(source)
    hf = mcore_to_hf({n: source.get(n, None, 1) for n in source.shapes if MCORE_LLAMA.lookup(n)}, cfg)
    args = dict(zip(GROWN[name][::2], GROWN[name][1::2]))
    shape = shape_from_config(cfg)
    target = parse_target(args["--to"], shape)
    expected, _ = grow_state_dict(hf, schema_for("llama"), shape, target, width=args["--width"],
                                  depth=args.get("--depth", "stack"), symmetry=args.get("--break-symmetry", "none"),
                                  shards=int(args.get("--tp", 2)), tied=False)
    grown = DistSource(d / name)
    got = mcore_to_hf({n: grown.get(n, None, 1) for n in grown.shapes if MCORE_LLAMA.lookup(n)},
                      source_config(grown))
    assert got.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(got[key], tensor), key


def test_growth_reads_one_shard_at_a_time(run):
    """Every read of a tensor-parallel parameter covers one TP=2 shard of it (SwiGLU's fc1: one
    half of one shard, megatron's [gate_0; gate_1; up_0; up_1] blocks), never the whole."""
    d, _, reads = run
    sharded = {sharded_key(n.replace("{L}", "0"))[0]: p.tp for n, p in MCORE_LLAMA.params.items() if p.tp is not None}
    checked = 0
    for path, key, offsets, sizes in reads:
        if key in sharded:
            dim = sharded[key] + (1 if key.startswith("decoder.layers.") else 0)
            blocks = 4 if key.endswith("linear_fc1.weight") else 2
            assert sizes[dim] == DistCheckpoint(path).shape(key)[dim] // blocks, (key, offsets, sizes)
            checked += 1
    assert checked >= 2 * (2 + 4 + 2 + 2) + 2 * 2  # per layer: qkv, fc1 (4 blocks), proj, fc2; the two vocabularies


@pytest.mark.parametrize("args, message", [
    (["--to", WIDER, "--tp", "8"], "does not divide the source query groups (4)"),
    (["--to", "layers=2,hidden=80,heads=10,kv_heads=5,ffn=120"], "does not divide the target query groups (5)"),
    (["--to", "layers=2,hidden=128,heads=8,ffn=192"], "head_dim 8 -> 16"),
    (["--to", WIDER, "--width", "direct", "--tp", "2"], "--width direct is not available for tensor-parallel"),
])
def test_bad_input_is_one_error_and_writes_nothing(run, tmp_path, capsys, args, message):
    d, _, _ = run
    assert b2b("grow", d / "source", *args, "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("kind, message", [("mixed saves", "different saves"), ("truncated shard", "truncated"),
                                           ("missing rank", "missing")])
def test_damaged_llama_checkpoints_are_one_error_and_write_nothing(run, tmp_path, capsys, kind, message):
    d, _, _ = run
    src, extra = harness.damaged_megatron_source(kind, d, tmp_path, WIDER)
    out = tmp_path / "out"
    assert b2b("grow", src, "--to", WIDER, *extra, "--out", out) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
