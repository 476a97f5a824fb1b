"""Tensor parallelism (recipe `parallel`): megatron-core's GPTModel trained by `b2b train` on CPU
(gloo, two processes, real DeepSpeed and megatron-core), built as GPT-2 and as a Llama (RMSNorm,
SwiGLU, RoPE, 8 query heads in 2 groups, an untied output layer). For each, a TP 2 run (DP 1),
stopped and resumed from its DeepSpeed checkpoint, and an uninterrupted TP 1 run (DP 2) of the same
recipe, both initialised from one HF directory, compute the same losses step by step, and the first
equals the HF model's own loss; the TP 2 run's torch_dist checkpoint loads at TP 1 with the logits of
its HF export. megatron-core's Llama computes HF's logits (Llama tied and untied, Qwen2 with its
q/k/v biases), and `b2b convert` moves them both ways bit for bit. Bad parallel recipes fail before
anything starts."""

from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from launchers import config
from launchers.batches import Batches
from launchers.cli import main
from launchers.data import cache_path, prepare, train_tokenizer
from launchers.events import read_scalars
from launchers.megatron import GPT, build_model, initialize, load_dist

import harness

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
TP_RECIPE = RECIPES / "gpt-tiny-tp.yaml"
STEPS = 4
# global batch 8 both ways: micro 4 x accum 2 x DP 1 at TP 2, micro 4 x accum 1 x DP 2 at TP 1
COMMON = ["data.seq_len=32", "batch.micro=4", "batch.accum=null", "batch.global_size=8", f"train.steps={STEPS}",
          "optim.warmup_steps=1", "optim.schedule=constant", "train.eval_every=0", "train.eval_batches=1",
          "checkpoint.every=0", "logging.progress=false", "model.dropout=0.0"]


def load(*sets):
    return config.load(TP_RECIPE, [*COMMON, *sets])


@contextmanager
def one_process():
    """torch.distributed (gloo) and megatron-core's groups for this test process alone (TP 1)."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        initialize(1)
        yield
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def hf_model(arch: str, vocab: int, eos: int, r: config.Recipe):
    """A fresh HF model of the TP recipe's size: GPT-2 as the recipe says (2 heads, tied), or a Llama
    with 8 query heads in 2 key/value groups and an untied LM head."""
    m = r.model
    if arch == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=m.hidden, n_layer=m.layers, n_head=m.heads,
                                          n_inner=m.ffn, n_positions=m.max_positions, bos_token_id=eos,
                                          eos_token_id=eos))
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=m.hidden, num_hidden_layers=m.layers,
                                        num_attention_heads=8, num_key_value_heads=2, intermediate_size=m.ffn,
                                        max_position_embeddings=m.max_positions, tie_word_embeddings=False,
                                        rope_theta=50000.0, bos_token_id=eos, eos_token_id=eos))


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def start(request, tmp_path_factory):
    """An HF directory of the recipe's size (hf_model), every parameter randomised (biases and norms
    too, so that a slicing bug cannot hide behind zeros and ones), with a BPE tokenizer trained on the
    corpus: this project's own launchers/*.py, one document a line (quicker to read than the default
    corpus, the standard library's docstrings)."""
    root = tmp_path_factory.mktemp(f"tp-{request.param}")
    lines = [line for f in sorted(RECIPES.parent.joinpath("launchers").glob("*.py"))
             for line in f.read_text().splitlines() if line.strip()]
    (root / "corpus.txt").write_text("\n".join(lines) + "\n")
    tokenizer = train_tokenizer(iter(lines), "bpe", 512)
    torch.manual_seed(0)
    model = hf_model(request.param, len(tokenizer), tokenizer.eos_token_id, load())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape) * 0.05)
    model.save_pretrained(root / "hf")
    tokenizer.save_pretrained(root / "hf")
    sets = [f"data.cache_dir={root / 'cache'}", f"data.files=[{root / 'corpus.txt'}]", f"model.init_from={root / 'hf'}",
            "data.tokenizer=null"]
    prepare(load(*sets), log=lambda *_: None)  # the runs' cache entry (tokenised with the start model's tokenizer)
    return root, sets


def prepare_only(out_dir, *sets, resume="none") -> int:
    """`b2b train --procs 2 --prepare-only`: every check, and the run directory, in this process."""
    sets = sum((["--set", s] for s in [f"out_dir={out_dir}", *COMMON, *sets]), [])
    return main(["train", str(TP_RECIPE), "--procs", "2", "--resume", resume, "--prepare-only", *sets])


def train(out_dir, *sets, resume="none") -> list[tuple[harness.Worker, Path]]:
    """`b2b train --procs 2` as a cluster runs it (slurm/entrypoint.sh): check and prepare the run here,
    then start the two workers (tests/harness.py)."""
    assert prepare_only(out_dir, *sets, resume=resume) == 0
    return list(zip(harness.start_run(out_dir, 2, resume), (out_dir / f"rank{r}.log" for r in range(2))))


def finish(workers: list) -> None:
    for worker, log in workers:
        assert worker.wait(timeout=300) == 0, log.read_text()[-4000:]


def test_tp2_and_tp1_train_alike_and_the_checkpoint_loads_at_another_tp(start, capsys):
    """TP 2 stopped at step 2 and resumed: every loss an uninterrupted TP 2 run's, and TP 1's to
    float32 rounding; the checkpoint loads at TP 1."""
    root, sets = start
    tp2, tp1, whole = root / "tp2", root / "tp1", root / "tp2-whole"
    # the runs overlap: each worker spends most of its time importing and starting up
    finish([*train(tp2, *sets, "parallel.tensor=2", "train.stop_at=2"),
            *train(tp1, *sets, "parallel.tensor=1", "parallel.megatron=true"),
            *train(whole, *sets, "parallel.tensor=2")])
    # DeepSpeed's files are per tensor-parallel rank: resuming at another degree is refused before any process starts
    assert prepare_only(tp2, *sets, "parallel.tensor=1", "parallel.megatron=true", resume="auto") == 2
    assert "was saved with parallel.tensor=2, parallel.megatron=false" in capsys.readouterr().err
    finish(train(tp2, *sets, "parallel.tensor=2", resume="auto"))  # from DeepSpeed's checkpoint at step 2
    assert "resumed from" in (tp2 / "rank0.log").read_text()

    a, b = read_scalars(tp2)["train/loss"], read_scalars(tp1)["train/loss"]
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    uninterrupted = read_scalars(whole)["train/loss"]  # the same degree: the resume is exact
    assert all(abs(a[step] - uninterrupted[step]) <= 1e-6 * abs(uninterrupted[step]) for step in a), (a, uninterrupted)
    # Same data, same weights, same arithmetic up to the order of float32 sums: TP 2 splits the
    # attention heads, FFN and vocabulary, so row-parallel layers add two partial products and the
    # softmax's normaliser is a sum of two partial sums; DP 2 averages gradients over two ranks
    # where TP 2 accumulates two micro steps. Measured: equal, or one float32 ulp apart (4.8e-7 at the
    # losses' ~6.3), over 4 steps of Adam at lr 1e-3; 1e-5 is 20 ulps and 1000x below one optimizer
    # step's change of the loss (0.04-0.1), so a wrong slice, a wrong reduction or a missed gradient fails.
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-5, (step, a[step], b[step])
    assert max(abs(a[step] - a[1]) for step in a) > 1e-3  # the runs did train (the loss moved)

    recipe = config.load(tp2 / "recipe.yaml")
    hf = AutoModelForCausalLM.from_pretrained(root / "hf").eval()
    data = Batches(cache_path(recipe), recipe, rank=0, world=1)
    with torch.no_grad():  # step 1 ran at the start weights: the HF model's own loss on its batches
        first = sum(hf(**data.train_batch(1, m)).loss.item() for m in range(2)) / 2
    assert abs(a[1] - first) <= 1e-5

    tag = tp2 / "checkpoints" / f"step{STEPS:08d}"
    assert sorted(p.name for p in tag.glob("*.pt")) == [
        "mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt",  # DeepSpeed's, for exact resume at TP 2
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_0_mp_rank_01_optim_states.pt"]
    assert len(list((tag / "dist").glob("*.distcp"))) == 2  # each tensor-parallel rank wrote its shards
    cfg = AutoConfig.from_pretrained(tag / "dist")
    assert cfg.vocab_size == len(data.tokenizer) and cfg.padded_vocab_size % 128 == 0

    ids = data.train_batch(STEPS + 1, 0)["input_ids"]
    with torch.no_grad():
        exported = AutoModelForCausalLM.from_pretrained(tp2 / "final").eval()(ids).logits
        other = AutoModelForCausalLM.from_pretrained(tp1 / "final").eval()(ids).logits
        with one_process():  # the TP 2 checkpoint at TP 1, through the trainer's init_from path
            at_tp1 = config.load(TP_RECIPE, [*COMMON, *sets[:1], f"model.init_from={tag / 'dist'}",
                                             "data.tokenizer=null", "parallel.tensor=1", "parallel.megatron=true"])
            loaded = build_model(at_tp1, data.tokenizer).eval()(ids).logits
    assert (loaded - exported).abs().max() <= 1e-5 * exported.abs().max()
    assert (other - exported).abs().max() <= 1e-4 * exported.abs().max()  # TP 1's training ended alike (4e-7)


@pytest.mark.parametrize("family, tied", [("llama", False), ("llama", True), ("qwen2", True)],
                         ids=["llama-untied", "llama-tied", "qwen2"])
def test_megatron_llama_computes_the_hf_models_logits_and_converts_both_ways_bit_for_bit(family, tied, tmp_path):
    """An HF Llama-family model (GQA 8 heads / 2 groups, RoPE theta 5e4; Qwen2: q/k/v biases),
    every parameter randomised, through `b2b convert` into torch_dist and back: bit-exact; the
    torch_dist checkpoint loaded by megatron-core's dist_checkpointing into its GPTModel built as
    that family gives the HF model's logits and loss."""
    import transformers
    name = {"llama": "Llama", "qwen2": "Qwen2"}[family]
    config = getattr(transformers, f"{name}Config")(
        vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
        intermediate_size=96, max_position_embeddings=64, tie_word_embeddings=tied, rope_theta=50000.0)
    torch.manual_seed(0)
    hf = getattr(transformers, f"{name}ForCausalLM")(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn(p.shape) * 0.05)
    hf.save_pretrained(tmp_path / "hf")
    assert main(["convert", str(tmp_path / "hf"), "--out", str(tmp_path / "mc")]) == 0
    assert main(["convert", str(tmp_path / "mc"), "--out", str(tmp_path / "back")]) == 0
    a, b = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert AutoConfig.from_pretrained(tmp_path / "back").architectures == [f"{name}ForCausalLM"]
    assert main(["grow", str(tmp_path / "mc"), "--to", "hidden=128", "--out", str(tmp_path / "grown")]) == 2
    assert not (tmp_path / "grown").exists()  # 8 heads of 16 would grow head_dim, which RoPE fixes: one line

    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), one_process():
        model = GPT(AutoConfig.from_pretrained(tmp_path / "mc")).eval()
        load_dist(model, tmp_path / "mc")
        logits, loss = model(ids).logits, model(ids, labels=ids).loss
        expected = hf(ids, labels=ids)
    assert (logits - expected.logits).abs().max() <= 1e-5 * expected.logits.abs().max()
    assert abs(loss.item() - expected.loss.item()) <= 1e-5


@pytest.mark.parametrize("change, message", [
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}, "RoPE type 'linear'"),
    ({"attention_bias": True}, "attention_bias (an o_proj bias)"),
], ids=["rope scaling", "o_proj bias"])
@pytest.mark.parametrize("key", ["init_from", "grow_from"])
def test_a_llama_megatron_cannot_build_alike_is_refused_before_anything_starts(change, message, key, tmp_path,
                                                                               capsys):
    import json
    LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, intermediate_size=96)).save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, **change}))
    code = main(["train", str(RECIPES / "llama-tiny-tp.yaml"), "--dry-run", "--procs", "2", "--set",
                 f"model.{key}={tmp_path / 'm'}", "--set", "data.tokenizer=bpe"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"b2b train: error: model.{key}: ") and message in err, err
    assert len(err.strip().splitlines()) == 1


BAD = {
    "bert": (RECIPES / "bert-tiny-cpu.yaml", ["parallel.tensor=2"],
             "parallel.tensor: 2: megatron-core's GPTModel is built as GPT-2 or the Llama family, but model.arch "
             "is bert"),
    "heads": (TP_RECIPE, ["parallel.tensor=4"], "parallel.tensor: 4 does not divide model.heads (2)"),
    "groups": (TP_RECIPE, ["model.arch=llama", "model.heads=4", "model.kv_heads=1"],
               "parallel.tensor: 2 does not divide model.heads (4), model.kv_heads (1)"),
    "zero 3": (TP_RECIPE, ["zero.stage=3"], "zero.stage: 3 with parallel.tensor 2: megatron-core's model trains"),
    "stage 1": (TP_RECIPE, ["stage1.steps=10", "stage1.block=1"], "stage1.steps: bert2BERT's two-stage training"),
    "processes": (TP_RECIPE, [], "parallel.tensor: 2 does not divide the 3 processes"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_parallel_recipes_fail_before_anything_starts(case, capsys):
    recipe, sets, message = BAD[case]
    procs = "3" if case == "processes" else "4"
    code = main(["train", str(recipe), "--dry-run", "--procs", procs, *sum((["--set", s] for s in sets), [])])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("b2b train: error: ") and message in err, err
    assert len(err.strip().splitlines()) == 1


def test_the_llama_tp_recipe_trains_from_scratch_and_exports_the_model_it_trained(tmp_path):
    """recipes/llama-tiny-tp.yaml as a user runs it, without a start model: megatron-core's Llama
    (4 query heads in 2 groups, one group a rank) trains at TP 2, writes its torch_dist checkpoint
    from both ranks, and exports an HF LlamaForCausalLM whose loss on the validation batches is the
    run's last val/loss."""
    run = tmp_path / "run"
    done = harness.train(RECIPES / "llama-tiny-tp.yaml", run, [
        f"data.cache_dir={tmp_path / 'cache'}", "data.max_documents=300", "data.vocab_size=256", "train.steps=4",
        "optim.warmup_steps=2", "train.eval_every=4", "checkpoint.every=4", "logging.progress=false",
        "model.dropout=0.0"])
    assert done.returncode == 0, done.stderr[-3000:]
    scalars = read_scalars(run)
    assert sorted(scalars["train/loss"]) == [1, 2, 3, 4]
    assert len(list((run / "checkpoints" / "step00000004" / "dist").glob("*.distcp"))) == 2
    recipe = config.load(run / "recipe.yaml")
    hf = AutoModelForCausalLM.from_pretrained(run / "final").eval()
    assert type(hf).__name__ == "LlamaForCausalLM" and hf.config.num_key_value_heads == 2
    data = Batches(cache_path(recipe), recipe, rank=0, world=1)
    with torch.no_grad():
        losses = [hf(**batch).loss.item() for batch in data.val_batches(recipe.train.eval_batches)]
    assert abs(sum(losses) / len(losses) - scalars["val/loss"][4]) <= 1e-4, (losses, scalars["val/loss"])
