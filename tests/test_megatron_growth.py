"""Growing megatron-core tensor-parallel GPT checkpoints shard by shard (growth/adapters/megatron.py),
against real megatron-core: a GPT saved at TP=2 by 2 gloo processes (tests/megatron_worker.py) as a
torch_dist checkpoint and in Megatron-LM's legacy layout is grown by `b2b grow`, and megatron-core's
own dist_checkpointing loads every result at TP=2 and TP=1. Exact and integer-ratio FPI growths
reproduce the source's logits; a stacked growth equals the in-memory growth of the converted HF
model; no read spans more than one shard of a tensor-parallel tensor; bad input writes nothing."""

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import GPT2LMHeadModel

from growth import GrowthError
from growth.adapters import dist_checkpoint
from growth.adapters.dist_checkpoint import DistCheckpoint
from growth.adapters.megatron import sharded_key
from growth.schema import MCORE_GPT
from launchers.cli import main

import fuzz
import harness

WORKER = Path(__file__).parent / "megatron_worker.py"
WIDER = "layers=2,hidden=128,heads=8,ffn=512"    # twice the width: exact growth preserves the logits
STACKED = "layers=4,hidden=128,heads=8,ffn=512"  # and twice the depth
TOLERANCE = 1e-5  # max |a - b| / max |a|, float32 logits of two equal functions computed differently


def b2b(*argv) -> int:
    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("megatron")
    harness.torchrun(WORKER, "save", d)
    with harness.recorded_reads() as reads:
        assert b2b("grow", d / "source", "--to", WIDER, "--width", "exact", "--out", d / "exact") == 0
    assert b2b("grow", d / "source", "--to", STACKED, "--width", "exact", "--out", d / "stacked") == 0
    assert b2b("grow", d / "legacy", "--to", WIDER, "--width", "exact", "--out", d / "legacy-exact") == 0
    assert b2b("grow", d / "source", "--to", WIDER, "--width", "fpi", "--tp", "1", "--out", d / "fpi-tp1") == 0
    assert b2b("grow", d / "source", "--to", WIDER, "--width", "fpi", "--break-symmetry", "split",
               "--out", d / "split") == 0
    assert b2b("grow", d / "source", "--to", WIDER, "--width", "exact", "--break-symmetry", "noise", "--noise-db", "0",
               "--out", d / "noise") == 0
    assert b2b("convert", d / "source", "--out", d / "hf") == 0
    names = ["source", "exact", "stacked", "legacy-exact", "fpi-tp1", "split", "noise"]
    harness.torchrun(WORKER, "logits", d, *(d / n for n in names))
    logits = {(Path(k[0]).name, k[1]): v for k, v in torch.load(d / "logits.pt").items() if k != "ids"}
    return d, logits, torch.load(d / "logits.pt")["ids"], reads


def test_a_tp2_checkpoint_loads_at_tp1(run):
    _, logits, _, _ = run
    assert harness.rel(logits["source", 1], logits["source", 2]) < TOLERANCE


@pytest.mark.parametrize("name", ["exact", "legacy-exact", "fpi-tp1", "split", "noise"])
def test_function_preserving_growth_keeps_the_logits_at_tp2_and_tp1(run, name):
    _, logits, _, _ = run
    for tp in (2, 1):
        assert harness.rel(logits[name, tp], logits["source", 2]) < TOLERANCE, (name, tp)


def test_stacked_growth_equals_the_in_memory_growth_of_the_converted_hf_model(run):
    d, logits, ids, _ = run
    assert b2b("grow", d / "hf", "--to", STACKED, "--width", "exact", "--out", d / "hf-stacked") == 0
    with torch.no_grad():
        source = GPT2LMHeadModel.from_pretrained(d / "hf").eval()(ids).logits
        expected = GPT2LMHeadModel.from_pretrained(d / "hf-stacked").eval()(ids).logits
    assert harness.rel(source, logits["source", 2]) < TOLERANCE  # the converter preserves the function
    assert harness.rel(expected, source) > 0.01  # stacking changes the function, so the comparison means something
    for tp in (2, 1):
        assert harness.rel(logits["stacked", tp], expected) < TOLERANCE


def test_b2b_verify_reads_megatron_checkpoints(run, tmp_path, capsys):
    d, _, _, _ = run
    capsys.readouterr()
    assert b2b("verify", d / "source", d / "exact") == 0
    assert "growth.json says exact: OK" in capsys.readouterr().out
    assert b2b("verify", d / "hf", d / "legacy-exact") == 0  # an HF model against its megatron twin's growth
    assert "growth.json says exact: OK" in capsys.readouterr().out
    claims_exact = tmp_path / "stacked"  # stacking changes the function: a manifest calling it exact is caught
    shutil.copytree(d / "stacked", claims_exact)
    shutil.copy2(d / "exact" / "growth.json", claims_exact / "growth.json")
    assert b2b("verify", d / "source", claims_exact) == 1
    assert "growth.json says exact: FAILED" in capsys.readouterr().out


def test_growth_reads_one_shard_at_a_time(run):
    """Every read of a tensor-parallel parameter covers one TP=2 shard of it, never the whole."""
    d, _, _, reads = run
    sharded = {sharded_key(n.replace("{L}", "0"))[0]: p.tp for n, p in MCORE_GPT.params.items() if p.tp is not None}
    checked = 0
    for path, key, offsets, sizes in reads:
        if key in sharded:
            source = DistCheckpoint(path)
            dim = sharded[key] + (1 if key.startswith("decoder.layers.") else 0)
            assert sizes[dim] == source.shape(key)[dim] // 2, (key, offsets, sizes)
            checked += 1
    assert checked >= 2 * 6 * 2  # both shards of 6 sharded tensors per layer, 2 layers


@pytest.mark.parametrize("symmetry,options", [("split", dict(width="fpi")),
                                              ("noise", dict(width="exact", noise_db=0.0))])
def test_shard_local_symmetry_breaking_equals_growing_the_gathered_checkpoint(run, symmetry, options):
    """Symmetry breaking at TP 2, one shard at a time, is bit-identical to the same growth (same
    sharded maps, shares and noise) of the whole gathered state dict in memory."""
    from growth import Grower, grow_state_dict, parse_target, shape_from_config
    from growth.adapters.megatron import DistSource, source_config
    d, _, _, _ = run
    source, grown = DistSource(d / "source"), DistSource(d / symmetry)
    shape = shape_from_config(source_config(source))
    full = {n: source.get(n, None, 1) for n in source.shapes if MCORE_GPT.lookup(n)}
    options = dict(options, symmetry=symmetry, shards=2, tied="output_layer.weight" not in source.shapes)
    expected, manifest = grow_state_dict(full, MCORE_GPT, shape, parse_target(WIDER, shape), **options)
    assert set(expected) == {n for n in grown.shapes if MCORE_GPT.lookup(n)}
    for name, tensor in expected.items():
        assert torch.equal(grown.get(name, None, 1), tensor.to(grown.dtypes[name])), name
    assert json.loads((d / symmetry / "growth.json").read_text())["symmetry"] == symmetry == manifest["symmetry"]
    plain = Grower(MCORE_GPT, shape, parse_target(WIDER, shape), **{**options, "symmetry": "none"})
    assert not torch.equal(expected["decoder.layers.0.mlp.linear_fc2.weight"],
                           dict(plain.items(list(full), full.__getitem__))["decoder.layers.0.mlp.linear_fc2.weight"])


def test_dist_and_legacy_sources_grow_identically(run):
    d, _, _, _ = run
    a, b = DistCheckpoint(d / "exact"), DistCheckpoint(d / "legacy-exact")
    assert set(a.tensors) == set(b.tensors)
    for key in a.tensors:
        assert torch.equal(a.read(key), b.read(key)), key
    manifest = json.loads((d / "exact" / "growth.json").read_text())
    assert manifest["exact"] and manifest["tensor_parallel_growth"] == 2


def test_a_killed_grow_of_a_tp_checkpoint_leaves_no_output_and_a_rerun_succeeds(run, tmp_path):
    """`b2b grow` of the TP=2 torch_dist source SIGKILLed at seeded moments: no output, or a whole one."""
    d, _, _, _ = run
    harness.killed_writer(["grow", d / "source", "--to", STACKED, "--width", "fpi"], tmp_path / "work" / "grown",
                          seed=24, kills=3, volatile=(".metadata",))


def test_hf_megatron_round_trip_is_bit_exact(run, tmp_path):
    d, _, _, _ = run
    assert b2b("convert", d / "hf", "--out", tmp_path / "mc") == 0
    assert b2b("convert", tmp_path / "mc", "--out", tmp_path / "hf") == 0
    a, b = load_file(d / "hf" / "model.safetensors"), load_file(tmp_path / "hf" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    source, converted = DistCheckpoint(d / "source"), DistCheckpoint(tmp_path / "mc")
    for key in source.tensors:  # the vocabulary's padding rows are dropped, and come back as zeros
        a, b = source.read(key), converted.read(key)
        if key == "embedding.word_embeddings.weight":
            assert not b[300:].any()
            a, b = a[:300], b[:300]
        assert torch.equal(a, b), key


@pytest.mark.parametrize("kind, message", [
    ("missing rank", "missing"), ("mixed saves", "different saves"), ("truncated shard", "truncated"),
    ("corrupt shard", "corrupt"),
    ("missing shard file", "missing"), ("pickled code", "refusing"), ("no config", "no config.json"),
    ("tp does not divide heads", "does not divide"), ("smaller target", "smaller")])
def test_bad_input_is_one_error_and_writes_nothing(run, tmp_path, capsys, kind, message):
    d, _, _, _ = run
    src, extra = harness.damaged_megatron_source(kind, d, tmp_path, "layers=2,hidden=192,heads=6,ffn=512")
    args = extra if "--to" in extra else ["--to", WIDER, *extra]
    out = tmp_path / "out"
    assert b2b("grow", src, *args, "--out", out) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    assert not Path("/tmp/b2b-pwned").exists()


def test_corrupted_torch_dist_files_end_cleanly(run, tmp_path):
    """Seeded byte-level corruptions (tests/fuzz.py) of the torch_dist source's .metadata, shard
    chunks and config: a grown checkpoint, or one error line with exit 2 and nothing written; never
    a traceback."""
    d, _, _, _ = run
    rng = random.Random(1)
    files = sorted(p.name for p in (d / "source").iterdir() if p.is_file())
    grow = lambda src, work: ["grow", str(src), "--to", WIDER, "--out", str(work / "out")]  # noqa: E731
    outcomes = []
    for i in range(24):
        case = fuzz.file_case(rng, "torch_dist checkpoint", d / "source", grow, files[i % len(files)])
        (tmp_path / str(i)).mkdir()
        outcomes.append(fuzz.run_case(case, tmp_path / str(i)))
    bad = [f"{o.name}: {o.ended}\n{o.detail}" for o in outcomes if o.ended not in ("valid", "error")]
    assert not bad, "\n".join(bad)
    assert any(o.ended == "error" for o in outcomes)  # the corruptions reach the reader


def test_the_writer_refuses_a_chunk_of_the_wrong_shape(tmp_path):
    chunk = dist_checkpoint.Chunk("w", (4, 2), (0, 0), (4, 2), torch.float32, lambda: torch.zeros(2, 2))
    with pytest.raises(GrowthError, match="planned"):
        dist_checkpoint.save(tmp_path, [chunk])


def test_direct_width_at_tp1_matches_the_hf_growth_on_the_copied_block(run, tmp_path):
    """DirectCopy of a torch_dist checkpoint (the small matrix in the top-left block, the rest new):
    converted to HF, its copied entries (those the HF growth draws alike at two seeds) are the HF
    DirectCopy's, in megatron's head-major fused QKV too."""
    d, _, _, _ = run
    assert b2b("grow", d / "source", "--to", WIDER, "--width", "direct", "--tp", "1", "--out", tmp_path / "m") == 0
    assert b2b("convert", tmp_path / "m", "--out", tmp_path / "m-hf") == 0
    for seed in (0, 1):
        assert b2b("grow", d / "hf", "--to", WIDER, "--width", "direct", "--seed", seed,
                   "--out", tmp_path / f"hf-{seed}") == 0
    got, a, b = (load_file(tmp_path / name / "model.safetensors") for name in ("m-hf", "hf-0", "hf-1"))
    assert set(got) == set(a)
    for name, expected in a.items():
        copied = expected == b[name]
        assert torch.equal(got[name][copied], expected[copied]), name
    qkv = "transformer.h.0.attn.c_attn.weight"
    assert 0 < (a[qkv] == b[qkv]).float().mean() < 1  # the fused QKV has both copied and new entries
