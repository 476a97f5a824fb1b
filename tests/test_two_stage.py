"""Training schedules: bert2BERT's two stages (the step plans, their exact FLOPs, a real DeepSpeed
run in which a stage-1 step changes only the blocks it trains) and progressive stacking
(StackBERT, MSLT) inside one run, resumed exactly across a growth."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer
from torch.utils.flop_counter import FlopCounterMode
from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from growth import Shape
from launchers import config
from launchers.data import prepare
from launchers.events import read_scalars
from launchers.model import StepPlan, blocks, bottom_blocks, train_flops_per_token, unit_of
from launchers.train import plan_for

import harness

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def recipe(*sets):
    return config.load(RECIPES / "bert-tiny-cpu.yaml", ["model.layers=6", "train.steps=50", *sets])


def test_stage_one_samples_sub_models_and_stage_two_trains_everything():
    r = recipe("stage1.steps=30", "stage1.block=2")
    plans = [plan_for(r, step) for step in range(1, 51)]
    assert all(p.stage == 1 for p in plans[:30]) and all(p.stage == 2 for p in plans[30:])
    assert {p.active for p in plans[:30]} == {2, 4, 6}  # uniform over the sub-model depths
    assert all(p.lowest == p.active - 2 and not p.embeddings and p.head for p in plans[:30])
    assert all(p == StepPlan(2, 6, 0, True, True) for p in plans[30:])
    assert plans == [plan_for(r, step) for step in range(1, 51)]  # a function of (seed, step): resumable
    cyclic = recipe("stage1.steps=30", "stage1.block=2", "stage1.sampling=cyclic")
    assert [plan_for(cyclic, s).active for s in range(1, 7)] == [2, 4, 6, 2, 4, 6]
    assert plan_for(recipe(), 1) == StepPlan(0, 6, 0, True, True)


def test_progressive_stacking_phases():
    stack = recipe("model.layers=4", "progressive.layers=[1, 2]", "progressive.steps=[10, 20]")
    assert [plan_for(stack, s) for s in (1, 10, 11, 30, 31, 50)] == [
        StepPlan(1, 1, 0, True, True), StepPlan(1, 1, 0, True, True), StepPlan(2, 2, 0, True, True),
        StepPlan(2, 2, 0, True, True), StepPlan(3, 4, 0, True, True), StepPlan(3, 4, 0, True, True)]
    mslt = recipe("model.layers=4", "progressive.layers=[1, 2, 4]", "progressive.steps=[10, 10, 10]",
                  "progressive.freeze_lower=true")
    assert [plan_for(mslt, s) for s in (1, 11, 21, 31)] == [  # new top blocks (and the head) only, then all
        StepPlan(1, 1, 0, True, True), StepPlan(2, 2, 1, False, True), StepPlan(3, 4, 2, False, True),
        StepPlan(4, 4, 0, True, True)]
    for bad, message in ((["progressive.layers=[2, 1]", "progressive.steps=[5, 5]"], "must increase"),
                         (["progressive.layers=[1]", "progressive.steps=[50]"], "fewer than train.steps"),
                         (["progressive.layers=[1]", "progressive.steps=[5]", "stage1.steps=5", "stage1.block=2"],
                          "does not combine")):
        with pytest.raises(config.RecipeError, match=message):
            recipe("model.layers=4", *bad)


PLANS = [StepPlan(1, 2, 1, False, True), StepPlan(1, 3, 0, False, True), StepPlan(1, 2, 1, True, True),
         StepPlan(1, 4, 2, False, False), StepPlan(1, 4, 2, True, False), StepPlan(0, 4, 0, True, True)]


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("plan", PLANS, ids=[f"{p.active}-{p.lowest}-{p.embeddings:d}{p.head:d}" for p in PLANS])
def test_step_flops_equal_torchs_flop_counter(arch, tied, plan):
    shape, vocab, seq, batch = Shape(4, 64, 4, 96, kv_heads=2 if arch == "llama" else None), 300, 32, 2
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                       intermediate_size=96, tie_word_embeddings=tied)) if arch == "bert" else \
        GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=64, n_layer=4, n_head=4, n_inner=96,
                                   tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0)) if arch == "gpt2" else \
        LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                     num_key_value_heads=2, intermediate_size=96, tie_word_embeddings=tied,
                                     attn_implementation="eager"))  # torch counts no CPU flash-attention kernel
    for name, p in model.named_parameters():
        p.requires_grad_(plan.trains(unit_of(name)))
    with FlopCounterMode(display=False) as counter, bottom_blocks(model, plan.active):
        model(input_ids=torch.randint(0, vocab, (batch, seq))).logits.sum().backward()
    assert counter.get_total_flops() == train_flops_per_token(shape, seq, vocab, arch, plan, tied) * batch * seq
    assert len(blocks(model)) == 4  # restored


TINY = {"bert": RECIPES / "bert-tiny-cpu.yaml", "llama": RECIPES / "llama-tiny-cpu.yaml"}


def tiny_start(arch: str, vocab: int):
    """A 4-block model of the arch, 32 wide (Llama: 2 query heads sharing 1 key/value head, tied)."""
    torch.manual_seed(0)
    if arch == "bert":
        return BertForMaskedLM(BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                                          intermediate_size=64, max_position_embeddings=128))
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                                        num_key_value_heads=1, intermediate_size=64, max_position_embeddings=128,
                                        tie_word_embeddings=True))


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_a_stage_one_step_changes_only_what_it_trains(arch, tmp_path):
    """Two cyclic stage-1 steps at a constant learning rate with block 1 on a 4-block model: step 1
    trains block 0 (a 1-block sub-model), step 2 trains block 1 (a 2-block sub-model); blocks 2 and 3
    and the embeddings must come out bit-identical under ZeRO-3's partitioned parameters (ZeRO-2
    freezing runs in the MSLT test below). The head: BERT's MLM transform, the Llama's final RMSNorm."""
    sets = [f"data.cache_dir={tmp_path / 'cache'}", "data.max_documents=300", "data.vocab_size=256"]
    tok = prepare(config.load(TINY[arch], sets)) / "tokenizer"
    vocab = Tokenizer.from_file(str(tok / "tokenizer.json")).get_vocab_size()  # BPE: 256 bytes and its special token
    start = tmp_path / "start"
    tiny_start(arch, vocab).save_pretrained(start)
    for file in tok.iterdir():
        (start / file.name).write_bytes(file.read_bytes())
    run = tmp_path / "run"
    sets += [f"model.init_from={start}", "train.steps=2", "optim.warmup_steps=1",
             "optim.lr=1e-2", "optim.schedule=linear", "optim.min_lr_ratio=1.0", "stage1.steps=2", "stage1.block=1",
             "stage1.sampling=cyclic",
             "zero.stage=3", "train.eval_batches=1", "logging.progress=false"]
    done = harness.train(TINY[arch], run, sets)
    assert done.returncode == 0, done.stderr[-3000:]

    before, after = load_file(start / "model.safetensors"), load_file(run / "final" / "model.safetensors")
    changed = {unit_of(name) for name in before if not torch.equal(before[name], after[name])}
    assert changed == {0, 1, "head"}

    r = config.load(run / "recipe.yaml")
    flops = read_scalars(run)["train/flops"]
    per_token = [train_flops_per_token(r.shape, 64, vocab, arch, StepPlan(1, k + 1, k, False, True)) for k in (0, 1)]
    tokens = 8 * 2 * 64
    assert flops[1] == pytest.approx(tokens * per_token[0], rel=1e-6)
    assert flops[2] == pytest.approx(tokens * sum(per_token), rel=1e-6)


@pytest.mark.parametrize("arch,method,stage,optimizer", [("bert", "stackbert", 3, "grow"), ("bert", "mslt", 2, "reset"),
                                                        ("llama", "stackbert", 2, "grow")])
def test_progressive_stacking_grows_in_the_run_and_resumes_exactly(arch, method, stage, optimizer, tmp_path):
    """1 block for 4 steps, stacked to 2 for 4 steps (MSLT: only the new block trains), then to
    4 blocks, each growth through the sharded checkpoint (StackBERT carrying Adam's moments); a
    run stopped at step 4, before the first growth, resumes to the same losses. The tiny Llama too
    (grouped-query attention, tied)."""
    phases = ["progressive.layers=[1, 2]", "progressive.steps=[4, 4]", f"progressive.optimizer={optimizer}"] + \
        (["progressive.freeze_lower=true"] if method == "mslt" else [])
    sets = [f"data.cache_dir={tmp_path / 'cache'}", "data.max_documents=300", "data.vocab_size=256",
            "model.layers=4", "train.steps=12", "train.eval_every=4", "optim.warmup_steps=2", f"zero.stage={stage}",
            "logging.progress=false", *phases]

    def train(run, *more, resume="none"):
        return harness.train(TINY[arch], run, [*sets, *more], resume=resume)

    full, part = tmp_path / "full", tmp_path / "part"
    done = train(full)
    assert done.returncode == 0, done.stderr[-3000:]
    a = read_scalars(full)
    assert [a["train/active_layers"][s] for s in range(1, 13)] == [1] * 4 + [2] * 4 + [4] * 4
    assert train(part, "train.stop_at=4").returncode == 75
    resumed = train(part, resume="auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    b = read_scalars(part)
    assert all(a["train/loss"][s] == b["train/loss"][s] for s in range(1, 13))
    r = config.load(full / "recipe.yaml")
    model = (BertForMaskedLM if arch == "bert" else LlamaForCausalLM).from_pretrained(full / "final")
    assert model.config.num_hidden_layers == 4
    vocab = model.config.vocab_size  # the tokenizer's: byte-level BPE adds its special token to the 256
    per_step = [8 * 2 * 64 * train_flops_per_token(r.shape, 64, vocab, arch, plan_for(r, s), True)
                for s in range(1, 13)]
    assert a["train/flops"][12] == pytest.approx(sum(per_step), rel=1e-6)
    if method == "mslt":
        assert per_step[4] < per_step[0] * 2  # phase 2 trains one of its two blocks, and not the embeddings
