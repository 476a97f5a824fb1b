"""Growing DeepSpeed ZeRO checkpoints shard by shard (growth/adapters/deepspeed.py), against real
DeepSpeed: tiny BERT, GPT-2 and Llama models trained by 2-process gloo engines at ZeRO 1, 2 and 3, in
fp32 and bf16 (tests/zero_worker.py). The grown weights are bit-identical to DeepSpeed's
zero_to_fp32 followed by in-memory growth, the grown moments to DeepSpeed's own ds_to_universal
followed by the same growth; DeepSpeed loads the result at world size 1 and 2 and another ZeRO
stage, exact growths reproduce the source's logits, and training continues, in DeepSpeed and in
`b2b train`. Bad checkpoints end in one error and write nothing."""

import argparse
import json
import random
import shutil
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

from growth import Grower, Shape, grow_state_dict, schema_for
from growth.adapters.deepspeed import STATES, ZeroCheckpoint, read_universal, universal_tag
from growth.adapters.files import has_tied_output, read_config
from launchers.checkpoint import EXIT_STOPPED
from launchers.cli import main
from launchers.events import read_scalars

import fuzz
import harness

sys.path.insert(0, str(Path(__file__).parent))
from zero_worker import SOURCES, STEPS, ids  # noqa: E402

WORKER = Path(__file__).parent / "zero_worker.py"
RECIPES = Path(__file__).resolve().parent.parent / "recipes"
ADAM = [name for name, spec in SOURCES.items() if spec[3] == "adamw"]
TARGET = "layers=3,hidden=32,heads=4,ffn=74"  # twice the width (head_dim 8 -> 8, 2 -> 4 heads), a stacked layer
WIDER = "layers=2,hidden=32,heads=2,ffn=74"  # width only, head_dim 8 -> 16: exact growth preserves logits
WIDER_ROPE = "layers=2,hidden=32,heads=4,ffn=74"  # the same with head_dim kept, as RoPE needs (2 KV heads)
TAG = f"step{STEPS:08d}"


def b2b(*argv) -> int:
    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero")
    harness.torchrun(WORKER, "save", out)
    return out


def consolidated(src: Path) -> dict:
    """DeepSpeed's own consolidation of the fp32 weights (the oracle)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint, to_torch_tensor
    return to_torch_tensor(get_fp32_state_dict_from_zero_checkpoint(str(src), TAG))


@pytest.fixture(scope="module")
def universal(sources, tmp_path_factory):
    """DeepSpeed's own ds_to_universal of every Adam source: per-parameter weights and moments."""
    from deepspeed.checkpoint import ds_to_universal
    out = tmp_path_factory.mktemp("universal")
    for name in ADAM:
        args = argparse.Namespace(input_folder=str(sources / name / TAG), output_folder=str(out / name / TAG),
                                  num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                                  strict=True, inject_missing_state=True)
        ds_to_universal.main(args)
    return out


def universal_tensor(path: Path) -> torch.Tensor:
    """A tensor of ds_to_universal's output: {'param': t} for ZeRO 1/2, a flat tensor for ZeRO-3."""
    value = torch.load(path, weights_only=True)
    return value["param"] if isinstance(value, dict) else value


def grower_for(src: Path, to: str, width: str, symmetry: str = "none") -> tuple[Grower, dict]:
    cfg = read_config(src / TAG)
    from growth import parse_target, shape_from_config
    source = shape_from_config(cfg)
    return Grower(schema_for(cfg["model_type"]), source, parse_target(to, source), width=width,
                  tied=has_tied_output(cfg, cfg["architectures"][0]), symmetry=symmetry), cfg


@pytest.mark.parametrize("width,symmetry", [("exact", "none"), ("aki", "none"), ("direct", "none"),
                                            ("fpi", "split"), ("aki", "noise")])
@pytest.mark.parametrize("name", ADAM)
def test_sharded_growth_equals_consolidating_first(name, width, symmetry, sources, universal, tmp_path):
    src, out = sources / name, tmp_path / "grown"
    assert b2b("grow", src, "--to", TARGET, "--width", width, "--break-symmetry", symmetry, "--optimizer", "grow",
               "--out", out) == 0
    shapes = ZeroCheckpoint(src).shapes
    names = list(shapes)

    # weights: zero_to_fp32, then the in-memory growth with the same seed
    grower, cfg = grower_for(src, TARGET, width, symmetry)
    full = consolidated(src)
    expected, manifest = grow_state_dict(full, schema_for(cfg["model_type"]), grower.source, grower.target,
                                         width=width, tied=grower.tied, symmetry=symmetry)
    assert json.loads((out / "growth.json").read_text())["symmetry"] == manifest["symmetry"] == symmetry
    got = read_universal(out)
    assert set(got) == {n for n, _, _ in grower.plan({n: tuple(full[n].shape) for n in names})}
    assert all(torch.equal(got[n], expected[n]) for n in got)

    # moments: DeepSpeed's per-parameter conversion, grown in memory the same way
    zero, oracle = out / TAG / "zero", universal / name / TAG / "zero"
    for key in ("exp_avg", "exp_avg_sq"):
        source = {n: universal_tensor(oracle / n / f"{key}.pt").view(shapes[n]) for n in names}
        grown = dict(grower_for(src, TARGET, width, symmetry)[0].items(names, source.__getitem__, moment=STATES[key]))
        for n, tensor in grown.items():
            assert torch.equal(torch.load(zero / n / f"{key}.pt", weights_only=True)["param"], tensor), (key, n)
    assert all(torch.load(zero / n / "step.pt", weights_only=True) == STEPS for n in got)  # Adam's step, kept


def test_a_llama_b2b_train_saved_at_zero3_grows_as_consolidating_first(tmp_path, capsys):
    """A tiny Llama (4 query heads, 2 KV heads, tied) trained by `b2b train` at ZeRO-3: `b2b grow`
    of its checkpoint equals DeepSpeed's zero_to_fp32 followed by the in-memory growth, bit for bit,
    and `b2b verify` of the checkpoint against the grown one says the growth is exact."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint, to_torch_tensor

    from growth import parse_target, shape_from_config
    run = tmp_path / "run"
    done = harness.train(RECIPES / "llama-tiny-cpu.yaml", run, [
        f"data.cache_dir={tmp_path / 'cache'}", "data.max_documents=300", "data.vocab_size=256", "zero.stage=3",
        "train.steps=2", "optim.warmup_steps=2", "checkpoint.every=2", "train.eval_every=0",
        "logging.progress=false"])
    assert done.returncode == 0, done.stderr[-3000:]
    ckpts, to = run / "checkpoints", "layers=2,hidden=128,heads=8,kv_heads=4,ffn=344"
    assert b2b("grow", ckpts, "--to", to, "--width", "exact", "--optimizer", "grow", "--out", tmp_path / "grown") == 0
    cfg = read_config(ckpts / "step00000002")
    source = shape_from_config(cfg)
    full = to_torch_tensor(get_fp32_state_dict_from_zero_checkpoint(str(ckpts), "step00000002"))
    expected, _ = grow_state_dict(full, schema_for("llama"), source, parse_target(to, source), width="exact",
                                  tied=True)
    got = read_universal(tmp_path / "grown")
    assert got and all(torch.equal(got[n], expected[n]) for n in got)
    capsys.readouterr()
    assert b2b("verify", ckpts, tmp_path / "grown") == 0
    assert "growth.json says exact: OK" in capsys.readouterr().out


@pytest.mark.parametrize("name", ADAM)
def test_reading_matches_the_live_engine(name, sources):
    """Each parameter read from the rank files equals what the engine held when it saved."""
    live = torch.load(sources / f"{name}.reference.pt", weights_only=True)
    ckpt = ZeroCheckpoint(sources / name)  # the root: 'latest' names the tag
    assert ckpt.tag == TAG and set(ckpt.shapes) == set(live)
    assert all(torch.equal(ckpt.read(n, "fp32"), live[n]["fp32"]) for n in live)


@pytest.fixture(scope="module")
def loaded(sources):
    """Every Adam source grown exactly in width (moments grown, schedule kept), loaded by DeepSpeed at
    another ZeRO stage, at world size 2 and 1."""
    for name in ADAM:
        stage = SOURCES[name][1] % 3 + 1
        assert b2b("grow", sources / name, "--to", WIDER_ROPE if name.startswith("llama") else WIDER, "--width",
                   "exact", "--optimizer", "grow",
                   "--schedule", "keep", "--out", sources / f"{name}.grown") == 0
        (sources / f"{name}.grown.stage").write_text(str(stage))
    harness.torchrun(WORKER, "load", sources)
    harness.torchrun(WORKER, "load", sources, procs=1)
    return sources


def hf_model(config_dir: Path, state: dict):
    """The HF model of `config_dir`'s config.json with these weights (a tied output shares the input's)."""
    cfg = AutoConfig.from_pretrained(config_dir)
    model = (AutoModelForMaskedLM if cfg.model_type == "bert" else AutoModelForCausalLM).from_config(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias",
                                               "lm_head.weight"}  # tied to entries that are there
    return model.eval()


def source_logits(src: Path) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(src / TAG, consolidated(src))(input_ids=ids(99)).logits


@pytest.mark.parametrize("world", [2, 1])
@pytest.mark.parametrize("name", ADAM)
def test_deepspeed_loads_the_grown_checkpoint_and_trains(name, world, loaded):
    grown = loaded / f"{name}.grown"
    result = torch.load(loaded / f"{name}.loaded-{world}.pt", weights_only=True)
    zero = grown / universal_tag(grown) / "zero"
    for n, state in result["state"].items():
        for key in STATES:
            assert torch.equal(state[key], torch.load(zero / n / f"{key}.pt", weights_only=True)["param"]), (n, key)
    reference = source_logits(loaded / name)
    rel = (result["logits"] - reference).abs().max() / reference.abs().max()
    assert rel < 1e-5  # exact width growth: the grown model computes the source's function
    assert result["lr_iteration"] == STEPS  # the schedule went on from the source's position
    assert torch.isfinite(torch.tensor(result["loss"]))
    changed = [n for n in result["after"] if not torch.equal(result["after"][n]["fp32"], result["state"][n]["fp32"])]
    assert len(changed) > len(result["after"]) // 2  # the step trained the grown model


def test_gradients_of_a_grown_model_are_its_grown_moments():
    """The moment rule (growth.maps.AxisMap.factor): for an exact growth, the gradient of the grown
    model at the grown weights is the source's gradient grown as exp_avg, and its square grown as
    exp_avg_sq; so grown moments are the ones the grown model would have accumulated."""
    from growth.adapters.hf import grow_model

    from conftest import VOCAB, make_model
    source, target = Shape(2, 12, 2, 20), Shape(2, 24, 3, 40)  # hidden x2, 2 -> 3 heads, head_dim 6 -> 8
    batch = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))
    for cls, tied in [("BertForMaskedLM", True), ("BertForMaskedLM", False), ("GPT2LMHeadModel", True),
                      ("GPT2LMHeadModel", False)]:
        small = make_model(cls, source, tied=tied)
        big = grow_model(small, target, width="exact")[0].double()

        def grads(model):
            model.double().zero_grad()
            model(input_ids=batch, labels=batch).loss.backward()
            return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

        small_grads, big_grads = grads(small), grads(big)
        grower = Grower(schema_for(small.config.model_type), source, target, width="exact",
                        tied=has_tied_output(small.config.to_dict(), cls))
        scale = max(g.abs().max() for g in big_grads.values())
        for moment, f in ((1, lambda g: g), (2, lambda g: g * g)):
            for n, g in grower.items(list(small_grads), lambda n, f=f, grads=small_grads: f(grads[n]), moment=moment):
                if n in big_grads:
                    # float32 weights (the grown copies are rounded): agreement to ~1e-8 of the largest gradient
                    assert (g - f(big_grads[n])).abs().max() <= 1e-6 * scale ** moment, (cls, tied, moment, n)


def test_with_split_shares_the_moment_rule_is_an_approximation_through_layernorm():
    """With --break-symmetry split, a LayerNorm's backward subtracts the mean of its input gradients
    over all units equally, not by share, so no per-axis rule gives the grown gradient exactly; the
    share rule (AxisMap.factor) is the closer one on these models (docs/zero-growth.md)."""
    from growth.adapters.hf import grow_model

    from conftest import VOCAB, make_model
    source, target = Shape(2, 12, 2, 20), Shape(2, 24, 3, 40)
    batch = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))
    for cls, tied in [("BertForMaskedLM", True), ("GPT2LMHeadModel", True), ("GPT2LMHeadModel", False)]:
        small = make_model(cls, source, tied=tied)
        big = grow_model(small, target, width="exact", symmetry="split")[0].double()
        grads = {}
        for name, model in (("small", small), ("big", big)):
            model.double().zero_grad()
            model(input_ids=batch, labels=batch).loss.backward()
            grads[name] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        error = {}
        for rule in ("split", "none"):
            grower = Grower(schema_for(small.config.model_type), source, target, width="exact",
                            tied=has_tied_output(small.config.to_dict(), cls), symmetry=rule)
            pairs = [(g, grads["big"][n]) for n, g in grower.items(list(grads["small"]), grads["small"].__getitem__,
                                                                      moment=1) if n in grads["big"]]
            error[rule] = (sum(((a - b) ** 2).sum() for a, b in pairs) / sum((b ** 2).sum() for _, b in pairs)) ** 0.5
        assert error["split"] < 0.1 and error["split"] < 0.6 * error["none"], (cls, tied, error)


def test_b2b_train_starts_from_a_grown_checkpoint(tmp_path, capsys):
    """b2b train (ZeRO-1) stops at step 4; its checkpoint is grown to 4x the width with Adam's state
    (exactly: `b2b verify` of the ZeRO checkpoint against the universal one says so), and a ZeRO-3
    `b2b train` with model.init_from on it starts where the source stood: its first
    loss is the grown model's own loss on that batch and its lr continues the source's schedule."""
    cache = tmp_path / "cache"
    common = [f"data.cache_dir={cache}", "data.max_documents=300", "data.vocab_size=256", "train.steps=8",
              "optim.warmup_steps=2", "optim.lr=1e-3", "train.eval_every=4", "logging.progress=false",
              "model.dropout=0.0"]

    def train(run, *sets):
        return harness.train(RECIPES / "bert-tiny-cpu.yaml", run, [*common, *sets])

    source = tmp_path / "source"
    done = train(source, "zero.stage=1", "train.stop_at=4")
    assert done.returncode == EXIT_STOPPED, done.stderr[-3000:]
    grown = tmp_path / "grown"
    assert b2b("grow", source / "checkpoints", "--to", "layers=2,hidden=128,heads=4,ffn=512", "--width", "exact",
               "--optimizer", "grow", "--schedule", "keep", "--out", grown) == 0
    assert (grown / "tokenizer.json").is_file()
    assert json.loads((grown / "config.json").read_text())["hidden_size"] == 128
    capsys.readouterr()
    assert b2b("verify", source / "checkpoints", grown) == 0
    assert "growth.json says exact: OK" in capsys.readouterr().out

    run = tmp_path / "run"
    done = train(run, "zero.stage=3", f"model.init_from={grown}", "train.steps=8")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "initialised from the grown checkpoint" in done.stdout
    scalars = read_scalars(run)
    # --schedule keep continues the source's step count: steps 5 to 8, the first at iteration 4 of 8
    assert sorted(scalars["train/loss"]) == [5, 6, 7, 8]
    assert scalars["train/lr"][5] == pytest.approx(1e-3 * (8 - 4) / (8 - 2), rel=1e-6)
    # the copies' cosine, gathered from ZeRO-3's partitions: identical at the start, and the same figure offline
    from growth.adapters.hf import copy_cosines_of
    assert all(scalars[f"growth/copy_cosine/{k}"][4] == pytest.approx(1.0, abs=1e-6) for k in ("hidden", "ffn"))
    offline = copy_cosines_of(run / "final", grown / "growth.json")
    assert offline["hidden"] == pytest.approx(scalars["growth/copy_cosine/hidden"][8], abs=1e-6)

    from launchers import config
    from launchers.batches import Batches
    from launchers.data import cache_path
    recipe = config.load(run / "recipe.yaml")
    model = hf_model(grown, read_universal(grown))
    with torch.no_grad():
        losses = [model(**Batches(cache_path(recipe), recipe, rank, 2).train_batch(5, 0)).loss for rank in (0, 1)]
    assert abs(scalars["train/loss"][5] - sum(losses).item() / 2) < 1e-5
    # a budget the kept schedule has already spent is refused before anything starts
    refused = train(tmp_path / "refused", "zero.stage=3", f"model.init_from={grown}", "train.steps=4")
    assert refused.returncode == 2 and "grown with --schedule keep at step 4" in refused.stderr
    assert not (tmp_path / "refused").exists()

    # model.grow_from on the checkpoint does the same growth inside b2b train (into RUN/grown, the
    # schedule restarted): Adam's moments are b2b grow's, bit for bit, and its step is the source's
    inside = tmp_path / "inside"
    done = train(inside, "zero.stage=1", f"model.grow_from={source / 'checkpoints'}", "model.growth.width=exact",
                 "model.growth.optimizer=grow", "model.hidden=128", "model.heads=4", "model.ffn=512",
                 "train.steps=2", "optim.warmup_steps=1")
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((inside / "grown" / "growth.json").read_text())
    assert (manifest["optimizer"], manifest["schedule"], manifest["adam_step"]) == ("grow", "restart", 4)
    for name in ("bert.encoder.layer.0.intermediate.dense.weight", "cls.predictions.transform.dense.bias"):
        for moment in ("exp_avg", "exp_avg_sq", "fp32"):
            ours, theirs = (universal_tensor(d / universal_tag(d) / "zero" / name / f"{moment}.pt")
                            for d in (inside / "grown", grown))
            assert torch.equal(ours, theirs) and ours.abs().sum() > 0, (name, moment)
    assert sorted(read_scalars(inside)["train/loss"]) == [1, 2]  # the step count restarted
    refused = train(tmp_path / "refused", "zero.stage=0", f"model.grow_from={source / 'checkpoints'}",
                    "model.hidden=128", "model.heads=4", "model.ffn=512")
    assert refused.returncode == 2 and "zero.stage: 0, but model.grow_from is a ZeRO checkpoint" in refused.stderr
    from launchers.report import source_cost
    assert source_cost(str(source / "checkpoints")) == read_scalars(source)["train/flops"][4]


# -- bad input: one clear error, exit 2, nothing written ---------------------------------------------

def _missing_rank(d):
    next((d / TAG).glob("*zero_pp_rank_1_mp_rank_00_optim_states.pt")).unlink()  # bf16_ prefix for bf16


def _truncated(d):
    f = d / TAG / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _mixed(d):
    later = next((d.parent / f"{d.name}-later").glob("step*"))
    shutil.copy(later / "zero_pp_rank_1_mp_rank_00_optim_states.pt", d / TAG)


def _no_config(d):
    (d / TAG / "config.json").unlink()


def _no_optimizer_files(d):
    for f in (d / TAG).glob("*optim_states.pt"):
        f.unlink()


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def _pickled_code(d):
    f = d / TAG / "mp_rank_00_model_states.pt"
    state = torch.load(f, weights_only=False)
    state["payload"] = Payload()
    torch.save(state, f)


@pytest.mark.parametrize("name,mutate,message", [
    ("bert-z2-bf16", _missing_rank, "missing rank file"),
    ("gpt2-z2-fp32", _truncated, "corrupt or truncated"),
    ("bert-z1-fp32", _mixed, "two different saves"),
    ("bert-z1-fp32", _no_config, "no config.json"),
    ("bert-z1-fp32", _no_optimizer_files, "stage-0"),
    ("gpt2-z2-fp32", _pickled_code, "refusing to load"),
    ("bert-z2-sgd", None, "only Adam/AdamW"),
])
def test_bad_checkpoints_are_one_clear_error(name, mutate, message, sources, tmp_path, capsys):
    src = tmp_path / name
    shutil.copytree(sources / name, src)
    shutil.copytree(sources / f"{name}-later", tmp_path / f"{name}-later")
    if mutate:
        mutate(src)
    out = tmp_path / "out"
    assert b2b("grow", src, "--to", TARGET, "--optimizer", "grow", "--out", out) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "this must never run" not in err
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_corrupted_checkpoint_files_end_cleanly(sources, tmp_path):
    """Seeded byte-level corruptions (tests/fuzz.py) of 'latest' and the rank files: a grown
    checkpoint, or one error line with exit 2 and nothing written; never a traceback."""
    rng = random.Random(0)
    grow = lambda src, work: ["grow", str(src), "--to", TARGET, "--optimizer", "grow",  # noqa: E731
                              "--out", str(work / "out")]
    cases = []
    for name in ("bert-z1-fp32", "gpt2-z2-fp32", "bert-z3-fp32"):
        files = sorted(str(p.relative_to(sources / name)) for p in (sources / name).rglob("*") if p.is_file())
        cases += [fuzz.file_case(rng, "zero checkpoint", sources / name, grow, rng.choice(files)) for _ in range(8)]
    outcomes = []
    for i, case in enumerate(cases):
        (tmp_path / str(i)).mkdir()
        outcomes.append(fuzz.run_case(case, tmp_path / str(i)))
    bad = [f"{o.name}: {o.ended}\n{o.detail}" for o in outcomes if o.ended not in ("valid", "error")]
    assert not bad, "\n".join(bad)


def test_a_killed_grow_of_a_zero_checkpoint_leaves_the_previous_output_or_none(sources, tmp_path):
    """`b2b grow` of a ZeRO-3 source with its moments, SIGKILLed at seeded moments (the writers of
    every rank file are inside one atomic directory): the previous output, whole, or none."""
    harness.killed_writer(["grow", sources / "bert-z3-fp32", "--to", TARGET, "--optimizer", "grow"],
                          tmp_path / "work" / "grown", seed=23, kills=3, previous=True, rerun=["--overwrite"])


def test_bad_options(sources, tmp_path, capsys):
    assert b2b("grow", sources / "bert-z3-fp32", "--to", "layers=1", "--out", tmp_path / "a") == 2
    assert "target is smaller" in capsys.readouterr().err
    assert b2b("grow", "minilm", "--to", "layers=7", "--optimizer", "grow", "--out", tmp_path / "b") == 2
    assert "apply to DeepSpeed checkpoints" in capsys.readouterr().err
    assert b2b("grow", sources / "bert-z3-fp32", "--to", TARGET, "--no-check", "--out", tmp_path / "c") == 2
    assert "--no-check applies to HF model directories" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
