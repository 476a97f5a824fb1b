"""The data pipeline (offline corpus, trained tokenizers, packing, cache, deterministic batches,
MLM masking) and the analytic FLOPs, checked against torch's own FLOP counter."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from growth import Shape
from launchers import config
from launchers.batches import Batches, mask_tokens
from launchers.cli import main
from launchers.data import BERT_SPECIALS, cache_path, prepare, python_docs, train_tokenizer
from launchers.events import read_scalars
from launchers.model import forward_flops_per_token

import harness

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def tiny(arch, cache, *sets):
    name = "bert-tiny-cpu" if arch == "bert" else "gpt-tiny-cpu"
    return config.load(RECIPES / f"{name}.yaml", [f"data.cache_dir={cache}", "data.max_documents=800",
                                                  "data.vocab_size=512", *sets])


def test_offline_corpus_is_the_standard_library_docs():
    docs = python_docs()
    assert len(docs) > 1000 and all(len(d) >= 100 for d in docs)
    assert any("Return" in d for d in docs[:200])


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_prepare_packs_and_caches(arch, cache):
    recipe = tiny(arch, cache)
    logs = []
    path = prepare(recipe, log=logs.append)
    assert logs and (path / "meta.json").is_file()
    meta = json.loads((path / "meta.json").read_text())
    assert meta["vocab_size"] == 512 and meta["sequences"]["train"] > 10 * meta["sequences"]["val"] > 0
    again = []
    assert prepare(recipe, log=again.append) == path and again == []  # cached: nothing rebuilt
    assert prepare(tiny(arch, cache, "data.seq_len=32"), log=again.append) != path and again  # new key
    data = Batches(path, recipe, rank=0, world=1)
    rows = data.train[:50]
    assert rows.shape == (50, recipe.data.seq_len)
    tok = data.tokenizer
    if arch == "bert":
        assert (rows[:, 0] == tok.cls_token_id).all() and (rows[:, -1] == tok.sep_token_id).all()
    else:
        assert (rows == tok.eos_token_id).any()  # documents are separated by end-of-text


def test_batches_are_a_function_of_step_and_rank(cache):
    recipe = tiny("gpt2", cache, "batch.micro=3", "batch.accum=2")
    path = prepare(recipe)
    ranks = [Batches(path, recipe, rank=r, world=2) for r in range(2)]
    seen = []
    for step in (1, 2):
        for micro in range(2):
            for data in ranks:
                seen += [tuple(row.tolist()) for row in data.train_batch(step, micro)["input_ids"]]
    assert len(set(seen)) == len(seen) == 2 * 2 * 2 * 3  # no sample read twice within an epoch
    fresh = Batches(path, recipe, rank=1, world=2)  # a resumed process reads what the first one read
    assert torch.equal(fresh.train_batch(2, 1)["input_ids"], ranks[1].train_batch(2, 1)["input_ids"])
    n = len(fresh.train)
    wrap = (n // 12) + 2  # a step past the first epoch draws from the next epoch's permutation
    assert fresh.train_batch(wrap, 0)["input_ids"].shape == (3, recipe.data.seq_len)


def test_dynamic_masking_80_10_10(cache):
    recipe = tiny("bert", cache)
    data = Batches(prepare(recipe), recipe, rank=0, world=1)
    tok = data.tokenizer
    ids = torch.from_numpy(data.train[:400]).long()
    def gen():
        return torch.Generator().manual_seed(5)
    out = mask_tokens(ids, gen(), 0.15, data.special, tok.mask_token_id, len(tok))
    again = mask_tokens(ids, gen(), 0.15, data.special, tok.mask_token_id, len(tok))
    assert torch.equal(out["input_ids"], again["input_ids"])
    chosen = out["labels"] != -100
    assert torch.equal(out["labels"][chosen], ids[chosen])
    assert not chosen[:, 0].any() and not chosen[:, -1].any()  # [CLS] and [SEP] are never chosen
    assert 0.14 < chosen.float().mean() < 0.16
    masked = (out["input_ids"] == tok.mask_token_id) & chosen
    kept = (out["input_ids"] == ids) & chosen
    assert 0.77 < masked.sum() / chosen.sum() < 0.83
    assert 0.08 < kept.sum() / chosen.sum() < 0.13  # 10% kept, plus random draws that hit the same token
    assert torch.equal(out["input_ids"][~chosen], ids[~chosen])


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama", "qwen2"])
def test_analytic_forward_flops_equal_torchs_flop_counter(arch):
    shape, vocab, seq, batch = Shape(2, 64, 4, 96, kv_heads=None if arch in ("bert", "gpt2") else 2), 300, 32, 2
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=96)) if arch == "bert" else \
        GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_inner=96,
                                   bos_token_id=0, eos_token_id=0)) if arch == "gpt2" else \
        LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, intermediate_size=96, attn_implementation="eager")) \
        if arch == "llama" else \
        Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, intermediate_size=96, attn_implementation="eager"))
    ids = torch.randint(0, vocab, (batch, seq))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids)
    assert counter.get_total_flops() == forward_flops_per_token(shape, seq, vocab, arch) * batch * seq
    # forward plus backward, for full training and for stage-1 sub-models: tests/test_two_stage.py


@pytest.mark.parametrize("kind", ["wordpiece", "bpe"])
def test_b2b_tokenizer(kind, tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(python_docs()[:300]))
    out = tmp_path / "tok"
    assert main(["tokenizer", "--kind", kind, "--vocab-size", "400", "--files", str(corpus), "--out", str(out)]) == 0
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == 400
    ids = tok("Return the value.")["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True).strip().lower() == "return the value."
    if kind == "wordpiece":
        assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    capsys.readouterr()
    assert main(["tokenizer", "--kind", kind, "--files", str(corpus), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_wordpiece_ids_are_a_function_of_the_learned_tokens():
    # WordPieceTrainer numbers its vocabulary in hash-map order, new in every process
    # (huggingface/tokenizers#1794): the ids are renumbered, special tokens first, the rest sorted.
    tok = train_tokenizer(python_docs()[:300], "wordpiece", 400)
    by_id = sorted(tok.get_vocab(), key=tok.get_vocab().get)
    assert by_id[:len(BERT_SPECIALS)] == BERT_SPECIALS
    assert by_id[len(BERT_SPECIALS):] == sorted(by_id[len(BERT_SPECIALS):])
    assert tok("Return the value.")["input_ids"][0] == tok.cls_token_id == BERT_SPECIALS.index("[CLS]")


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".parquet"])
def test_local_corpus_files(suffix, tmp_path):
    import datasets
    docs = python_docs()[:400]
    path = tmp_path / f"corpus{suffix}"
    if suffix == ".txt":
        path.write_text("\n".join(d.replace("\n", " ") for d in docs))
    else:
        ds = datasets.Dataset.from_dict({"body": docs})
        ds.to_json(path) if suffix == ".jsonl" else ds.to_parquet(path)
    sets = [f"data.files=[{path}]", f"data.cache_dir={tmp_path / 'cache'}", "data.vocab_size=300"]
    if suffix != ".txt":
        sets.append("data.text_field=body")
    recipe = config.load(RECIPES / "gpt-tiny-cpu.yaml", sets)
    meta = json.loads((prepare(recipe, log=lambda *_: None) / "meta.json").read_text())
    assert meta["sequences"]["train"] > 100 and meta["vocab_size"] == 300
    bad = config.load(RECIPES / "gpt-tiny-cpu.yaml", sets[:2] + ["data.text_field=nope"])
    with pytest.raises(config.RecipeError, match="data.text_field: 'nope' is not a column"):
        prepare(bad)


def test_held_out_validation_files_are_the_validation_split(tmp_path, capsys):
    """data.val_files: the whole corpus trains, and validation reads those files only (the same
    held-out text for runs trained on different corpora); the cache entry follows their content."""
    docs = python_docs()
    corpus, held_out = tmp_path / "corpus.txt", tmp_path / "val.txt"
    corpus.write_text("\n".join(d.replace("\n", " ") for d in docs[:400]))
    held_out.write_text("\n".join(f"zebra quokka {i} " * 40 for i in range(30)))  # words the corpus lacks
    sets = [f"data.files=[{corpus}]", f"data.cache_dir={tmp_path / 'cache'}", "data.vocab_size=300",
            "data.seq_len=32"]
    recipe = config.load(RECIPES / "gpt-tiny-cpu.yaml", [*sets, f"data.val_files=[{held_out}]"])
    path = prepare(recipe, log=lambda *_: None)
    plain = prepare(config.load(RECIPES / "gpt-tiny-cpu.yaml", sets), log=lambda *_: None)
    meta, plain_meta = (json.loads((p / "meta.json").read_text()) for p in (path, plain))
    assert meta["sequences"]["train"] > plain_meta["sequences"]["train"]  # nothing of the corpus held out
    data = Batches(path, recipe, rank=0, world=1)
    text = "".join(data.tokenizer.decode(b["input_ids"].flatten()) for b in data.val_batches(4))
    assert text.count("zebra quokka") > 10 and "Return" not in text
    assert "zebra" not in data.tokenizer.decode(data.train[:200].flatten())
    held_out.write_text(held_out.read_text() + "\nzebra quokka again\n")
    assert cache_path(recipe) != path  # new content, new entry
    missing = ["train", str(RECIPES / "gpt-tiny-cpu.yaml"), "--dry-run", "--set", f"data.val_files=[{tmp_path}/no.txt]"]
    assert main(missing) == 2
    assert f"data.val_files: {tmp_path}/no.txt: no such file" in capsys.readouterr().err


def test_megatron_core_reads_the_prepared_shards_and_we_read_what_its_builder_writes(cache, tmp_path):
    """Prepared splits are megatron-core indexed datasets, one sequence per document (its tokens and
    the separator), as Megatron-LM's preprocess_data.py writes them with --append-eod; and a corpus
    megatron-core's IndexedDatasetBuilder wrote is read here as the same token stream."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    from launchers import indexed
    from launchers.data import PACK_DOCS, parts
    recipe = tiny("gpt2", cache)
    path = prepare(recipe)
    meta, tok = json.loads((path / "meta.json").read_text()), AutoTokenizer.from_pretrained(path / "tokenizer")
    texts = parts(recipe)["train"]["text"]
    theirs = [IndexedDataset(str(path / name)) for name in meta["shards"]["train"]]
    assert sum(len(d) for d in theirs) == len(texts)
    assert all(np.array_equal(d.document_indices, np.arange(len(d) + 1)) for d in theirs)
    for i in (0, 1, len(texts) - 1):
        expected = tok(texts[i], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert theirs[0][i].tolist() == expected

    docs = [np.array([5, 6, 7]), np.array([8, 9]), np.arange(10, 40)]
    builder = IndexedDatasetBuilder(str(tmp_path / "theirs.bin"), dtype=np.uint16)
    for doc in docs:
        builder.add_item(torch.from_numpy(doc))
        builder.end_document()
    builder.finalize(str(tmp_path / "theirs.idx"))
    tokens, lengths = indexed.read(tmp_path / "theirs")
    assert tokens.dtype == np.uint16 and lengths.tolist() == [3, 2, 30]
    assert tokens.tolist() == np.concatenate(docs).tolist()
    blocks = indexed.Blocks([tmp_path / "theirs"] * 2, PACK_DOCS, 8)  # two shards: cut within each
    assert len(blocks) == 2 * (35 // 8)
    assert blocks[[3, 4]].tolist() == [list(range(29, 37)), [5, 6, 7, 8, 9, 10, 11, 12]]
    mine = indexed.write(tmp_path / "mine", docs, np.uint16)
    assert mine == 35 and (tmp_path / "mine.bin").read_bytes() == (tmp_path / "theirs.bin").read_bytes()
    assert (tmp_path / "mine.idx").read_bytes() == (tmp_path / "theirs.idx").read_bytes()


def test_a_partial_shard_is_refused_in_one_line(tmp_path, capsys):
    import numpy as np

    from launchers import indexed
    indexed.write(tmp_path / "s", [np.arange(100)], np.uint16)
    with open(tmp_path / "s.bin", "r+b") as f:
        f.truncate(150)
    with pytest.raises(indexed.IndexedError, match="partial or not its pair"):
        indexed.read(tmp_path / "s")
    (tmp_path / "s.idx").write_bytes(b"not an index")
    with pytest.raises(indexed.IndexedError, match="no MMIDIDX header"):
        indexed.read(tmp_path / "s")


def test_a_killed_preparation_resumes_from_its_finished_shards(tmp_path):
    """`b2b data prepare` SIGKILLed while it writes a shard: no cache entry and no visible partial
    shard; run again, it tokenises only the shards it had not finished, and the data are those of
    one uninterrupted preparation with another shard size and number of processes."""
    import signal
    import time

    from launchers.batches import Batches

    from harness import b2b_process
    sets = ["data.tokenizer=minilm", "data.max_documents=12000", "logging.progress=false"]
    argv = ["data", "prepare", RECIPES / "bert-tiny-cpu.yaml", *sum((["--set", s] for s in sets), [])]
    killed = ["--set", f"data.cache_dir={tmp_path / 'a'}", "--set", "data.shard_documents=2000",
              "--set", "data.num_proc=1"]
    proc = b2b_process(*argv, *killed, wait=False)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:  # the second shard is being written
        work = list((tmp_path / "a").glob(".*.partial"))
        if work and list(work[0].glob("*.idx")) and list(work[0].glob(".train-*.bin.tmp-*")):
            break
        time.sleep(0.02)
    assert proc.poll() is None, proc.communicate()[0]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = sorted(p.name for p in work[0].glob("*.idx"))
    assert finished and not [p for p in (tmp_path / "a").iterdir() if not p.name.startswith(".")]
    assert all((work[0] / name).with_suffix(".bin").is_file() for name in finished)  # none visible half-written
    again = subprocess.run([sys.executable, "-m", "launchers.cli", *map(str, argv + killed)], capture_output=True,
                           text=True, timeout=600)
    out = again.stdout + again.stderr
    assert again.returncode == 0, out[-3000:]
    assert "resuming the preparation" in out and f"data: {len(finished)} of " in out
    assert not any(f"{name.removesuffix('.idx')}:" in out for name in finished)  # not tokenised again
    b2b_process(*argv, "--set", f"data.cache_dir={tmp_path / 'b'}", "--set", "data.num_proc=2")
    recipe = config.load(RECIPES / "bert-tiny-cpu.yaml", sets + [f"data.cache_dir={tmp_path / 'a'}"])
    resumed = Batches(cache_path(recipe), recipe, 0, 1)
    recipe = config.load(RECIPES / "bert-tiny-cpu.yaml", sets + [f"data.cache_dir={tmp_path / 'b'}"])
    whole = Batches(cache_path(recipe), recipe, 0, 1)
    assert len(resumed.train) == len(whole.train) > 0 and len(resumed.val) == len(whole.val)
    assert (resumed.train[:] == whole.train[:]).all() and (resumed.val[:] == whole.val[:]).all()
    from launchers import indexed
    from launchers.data import parts
    first = json.loads((cache_path(recipe) / "meta.json").read_text())["shards"]["train"][0]
    tokens, lengths = indexed.read(cache_path(recipe) / first)
    tok, texts = whole.tokenizer, parts(recipe)["train"][:100]["text"]
    expected = [tok(t, add_special_tokens=False)["input_ids"] + [tok.sep_token_id] for t in texts]
    assert max(map(len, expected)) > 128  # all-MiniLM's tokenizer.json truncates at 128: not here
    assert tokens[:sum(map(len, expected))].tolist() == sum(expected, []) and lengths[:100].tolist() == [
        len(e) for e in expected]


def _nap(task: tuple) -> tuple:
    seconds, name = task
    if seconds < 0:
        raise ValueError(f"task {name} failed")
    import time
    time.sleep(seconds)
    return name, os.getpid()


def test_preparation_workers_take_a_task_as_each_one_ends(monkeypatch):
    """launchers.data._map, in 2 forked workers: a worker takes the next task when its own ends, not
    when every task handed out with it has ended, so a slow shard holds up no other; no more than
    2 x processes tasks are taken from the stream ahead of the results (a streamed shard carries
    its documents); a task's error is raised here."""
    from launchers.data import _map
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    taken, out, done = [], [], []

    def stream(tasks):
        for task in tasks:
            taken.append(task)
            out.append(len(taken) - len(done))  # taken, not yet ended
            yield task
    for name, pid in _map(_nap, stream([(3.0, "slow")] + [(0.05, f"quick-{i}") for i in range(9)]), 2):
        done.append((name, pid))
    assert [name for name, _ in done] == [f"quick-{i}" for i in range(9)] + ["slow"]
    assert len({pid for _, pid in done[:9]}) == 1 != len({pid for _, pid in done})  # the other worker took them all
    assert max(out) == 4 and "TOKENIZERS_PARALLELISM" not in os.environ
    with pytest.raises(ValueError, match="task bad failed"):
        list(_map(_nap, [(0.05, "good"), (-1, "bad"), (0.05, "after")], 2))


def test_a_mixture_draws_its_corpora_by_weight_each_in_its_own_order_and_resumes_exactly(tmp_path):
    """data.sources: two corpora weighted 3:1. Over 4,800 samples (past the first block of
    draws) the share of each is 3/4 and 1/4 within binomial error; the small corpus cycles its
    epochs, no sample repeated within one; a fresh reader (a resumed run) reads what the first
    one read; validation holds both corpora's held-out documents."""
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("".join(f"alpha apple avocado almond {i}\n" for i in range(3000)))
    b.write_text("".join(f"beta banana berry blueberry {i}\n" for i in range(600)))
    recipe = config.load(RECIPES / "gpt-tiny-cpu.yaml", [
        f"data.cache_dir={tmp_path / 'cache'}", "data.vocab_size=300", "data.seq_len=32", "batch.micro=8",
        f"data.sources=[{{files: [{a}], weight: 3}}, {{files: [{b}], weight: 1.0}}]"])
    data = Batches(prepare(recipe), recipe, rank=0, world=1)
    tok = data.tokenizer
    assert len(data.sources) == 2 and len(data.sources[1]) < 200

    def corpus_of(rows):
        texts = [tok.decode(row) for row in rows]
        assert all(("alpha" in t) != ("beta" in t) for t in texts)  # a block is one corpus's
        return ["a" if "alpha" in t else "b" for t in texts]
    steps = 600
    batches = [data.train_batch(step, 0)["input_ids"] for step in range(1, steps + 1)]
    drawn = corpus_of(torch.cat(batches).numpy())
    n, share = len(drawn), drawn.count("a") / len(drawn)
    assert abs(share - 0.75) < 4 * (0.75 * 0.25 / n) ** 0.5, share
    b_rows = [tuple(r.tolist()) for r, c in zip(torch.cat(batches), drawn) if c == "b"]
    epoch = len(data.sources[1])
    assert len(b_rows) > 3 * epoch and len(set(b_rows[:epoch])) == epoch == len(set(b_rows))  # every one, each epoch
    fresh = Batches(cache_path(recipe), recipe, rank=0, world=1)
    for step in (steps, 517, 3):
        assert torch.equal(fresh.train_batch(step, 0)["input_ids"], batches[step - 1])
    assert set(corpus_of(data.val[:])) == {"a", "b"}
    with pytest.raises(ValueError):
        data.train  # noqa: B018 (a mixture has no single training split)


def test_an_epoch_too_large_for_a_permutation_array_is_shuffled_per_index(cache, monkeypatch):
    """Shuffle, the order of an epoch of more than PERMUTATION_MAX sequences, is a permutation
    (seeded, nothing held per element); with it, batches still read every sample once per epoch
    and a fresh reader reads what the first one read."""
    from launchers import batches
    from launchers.batches import Shuffle
    for n in (1, 2, 1000, 4097):
        order = Shuffle(n, [0, 0])
        assert sorted(order[i] for i in range(n)) == list(range(n))
    assert [Shuffle(1000, [0, 0])[i] for i in range(20)] != [Shuffle(1000, [0, 1])[i] for i in range(20)]
    monkeypatch.setattr(batches, "PERMUTATION_MAX", 10)
    recipe = tiny("gpt2", cache, "batch.micro=1")
    data = Batches(prepare(recipe), recipe, rank=0, world=1)
    n = len(data.train)
    epoch = [tuple(data.train_batch(step, 0)["input_ids"][0].tolist()) for step in range(1, n + 1)]
    assert isinstance(data._order(0, 0), Shuffle)
    assert sorted(epoch) == sorted(tuple(r.tolist()) for r in data.train[:])  # each sequence once
    assert epoch[:50] != [tuple(r.tolist()) for r in data.train[:50]]  # in a shuffled order
    fresh = Batches(cache_path(recipe), recipe, rank=0, world=1)
    assert torch.equal(fresh.train_batch(n + 3, 0)["input_ids"], data.train_batch(n + 3, 0)["input_ids"])


def test_a_streamed_corpus_is_prepared_shard_by_shard_without_an_arrow_copy(tmp_path):
    """data.streaming: the corpus is read once as a stream, data.shard_documents documents per
    train and validation shard, and nothing of it is copied into datasets' Arrow cache (which the
    ordinary path fills); a preparation stopped with shards missing writes only those again; a
    streamed corpus with a tokenizer to train is refused in one line."""
    from launchers import indexed
    corpus = tmp_path / "corpus.jsonl"
    docs = list(python_docs())[:2500] * 2
    corpus.write_text("".join(json.dumps({"body": f"{i}: {t}"}) + "\n" for i, t in enumerate(docs)))
    sets = [f"data.files=[{corpus}]", "data.text_field=body", "data.tokenizer=minilm", "data.shard_documents=2000",
            "data.num_proc=2", f"data.cache_dir={tmp_path / 'cache'}", "data.max_documents=null"]

    def prepare_apart(*more, hf=tmp_path / "hf"):
        argv = ["data", "prepare", RECIPES / "bert-tiny-cpu.yaml", *sum((["--set", s] for s in (*sets, *more)), [])]
        out = subprocess.run([sys.executable, "-m", "launchers.cli", *map(str, argv)], capture_output=True, text=True,
                             timeout=600, env=dict(os.environ, HF_DATASETS_CACHE=str(hf)))
        return out.returncode, out.stdout + out.stderr
    code, out = prepare_apart("data.streaming=true")
    assert code == 0, out[-3000:]
    assert not list((tmp_path / "hf").rglob("*.arrow"))  # streamed: no copy of the corpus
    path = Path(out.strip().splitlines()[-1])
    meta = json.loads((path / "meta.json").read_text())
    assert meta["shards"]["train"] == ["train-000000000-000002000", "train-000002000-000004000",
                                       "train-000004000-000005000"]
    counts = {part: sum(len(indexed.read(path / name)[1]) for name in names) for part, names in meta["shards"].items()}
    assert counts["train"] + counts["val"] == 5000 and 0.03 < counts["val"] / 5000 < 0.07
    recipe = config.load(RECIPES / "bert-tiny-cpu.yaml", [*sets, "data.streaming=true"])
    data = Batches(path, recipe, rank=0, world=1)
    before = data.train_batch(7, 0)["input_ids"]

    work = path.parent / f".{path.name}.partial"  # as a preparation stopped after some shards left it
    path.rename(work)
    (work / "meta.json").unlink()
    for suffix in (".bin", ".idx"):
        (work / f"train-000002000-000004000{suffix}").unlink()
    code, out = prepare_apart("data.streaming=true")
    assert code == 0 and "resuming the preparation" in out, out[-3000:]
    assert "train-000002000-000004000:" in out and "train-000000000-000002000:" not in out
    assert torch.equal(Batches(path, recipe, rank=0, world=1).train_batch(7, 0)["input_ids"], before)

    code, out = prepare_apart(hf=tmp_path / "hf-arrow")  # the ordinary path, for contrast
    assert code == 0 and list((tmp_path / "hf-arrow").rglob("*.arrow")), out[-3000:]
    code, out = prepare_apart("data.streaming=true", "data.tokenizer=wordpiece")
    assert code == 2 and "data.streaming: a streamed corpus is read once" in out, out[-3000:]
    entries = sorted(p.name for p in (tmp_path / "cache").iterdir())
    code, out = prepare_apart("data.streaming=true", "data.text_field=text")  # bad input: one line, nothing left
    assert code == 2 and "data.text_field: 'text' is not a column of the corpus (['body'])" in out, out[-3000:]
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == entries


def megatron_corpus(tmp_path, tok, texts, name="corpus"):
    """`texts` tokenised by `tok` and written by megatron-core's own IndexedDatasetBuilder, one
    document each followed by the end-of-document token, as Megatron-LM's preprocess_data.py
    --append-eod writes them: PREFIX.bin/.idx."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    prefix = tmp_path / name
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    docs = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    for doc in docs:
        builder.add_item(torch.tensor(doc))
        builder.end_document()
    builder.finalize(f"{prefix}.idx")
    return prefix, docs


def test_a_hub_corpus_is_read_offline_from_the_datasets_cache(tmp_path, monkeypatch, capsys):
    """data.hub with HF_HUB_OFFLINE=1 (the tests' setting): the corpus comes from the cache that
    `datasets` keeps of a hub dataset it has loaded, HF_DATASETS_CACHE/ORG___NAME/default/0.0.0/
    COMMIT (here written by its json builder from a local file); prepared whole and streamed, its
    sequences are those of the same file given as data.files. A hub id that is not there is one
    line, naming it."""
    import datasets
    from datasets.packaged_modules.json.json import Json

    from launchers.batches import Batches
    texts = [" ".join(python_docs()[i:i + 3]) for i in range(0, 1200, 3)]
    source = tmp_path / "corpus.jsonl"
    source.write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
    commit = "0" * 40
    builder = Json(data_files={"train": [str(source)]}, dataset_name="tiny-corpus", hash=commit,
                   cache_dir=str(tmp_path / "built"))
    builder.download_and_prepare()
    hub_cache = tmp_path / "datasets" / "tiny-org___tiny-corpus" / "default" / "0.0.0"
    hub_cache.mkdir(parents=True)
    os.rename(builder.cache_dir, hub_cache / commit)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    sequences = {}
    for corpus in (f"data.files=[{source}]", "data.hub=tiny-org/tiny-corpus"):
        for streaming in ("false", "true"):
            recipe = tiny("bert", tmp_path / "cache", corpus, "data.tokenizer=minilm", "data.text_field=body",
                          f"data.streaming={streaming}", "data.max_documents=null")
            batches = Batches(prepare(recipe, log=lambda *_: None), recipe, 0, 1)
            sequences[corpus.split("=")[0], streaming] = batches.train[:], batches.val[:]
    for streaming in ("false", "true"):
        files, hub = sequences["data.files", streaming], sequences["data.hub", streaming]
        assert len(hub[0]) > 0 and all((a == b).all() for a, b in zip(files, hub))
    whole, streamed = sequences["data.hub", "false"][0], sequences["data.hub", "true"][0]
    assert whole.shape != streamed.shape or (whole != streamed).any()  # two preparations (a stream splits its own)
    argv = ["data", "prepare", str(RECIPES / "bert-tiny-cpu.yaml"), "--set", "data.hub=tiny-org/no-such-corpus",
            "--set", "data.tokenizer=minilm", "--set", f"data.cache_dir={tmp_path / 'missing'}"]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "hub dataset 'tiny-org/no-such-corpus': cannot load it" in err
    assert list((tmp_path / "missing").iterdir()) == []


def test_a_corpus_megatron_lm_prepared_is_trained_on_as_it_is(cache, tmp_path, capsys):
    """data.indexed names megatron-core indexed datasets (Megatron-LM's preprocess_data.py output)
    and data.tokenizer the tokenizer that made them: nothing is tokenised again, the sequences are
    the documents' tokens cut as for a corpus prepared here, validation comes from data.val_files,
    and b2b train trains on them."""
    import numpy as np
    texts = python_docs()[:1200]
    tok = train_tokenizer(iter(texts), "bpe", 512)
    tok.save_pretrained(tmp_path / "tok")
    prefix, docs = megatron_corpus(tmp_path, tok, texts[:1000])
    (tmp_path / "val.txt").write_text("\n".join(t.replace("\n", " ") for t in texts[1000:]))
    sets = [f"data.indexed=[{prefix}]", f"data.tokenizer={tmp_path / 'tok'}",
            f"data.val_files=[{tmp_path / 'val.txt'}]",
            f"data.cache_dir={tmp_path / 'cache'}", "data.seq_len=32", "logging.progress=false"]
    assert main(["data", "prepare", str(RECIPES / "gpt-tiny-cpu.yaml"), *sum((["--set", s] for s in sets), [])]) == 0
    out = capsys.readouterr().out
    assert "data: val-" in out and "data: train" not in out  # only the validation text is tokenised
    recipe = config.load(RECIPES / "gpt-tiny-cpu.yaml", sets)
    data = Batches(cache_path(recipe), recipe, rank=0, world=1)
    stream = np.concatenate(docs)
    assert len(data.train) == len(stream) // 32  # 1000 documents: one group, cut into whole sequences
    assert data.train[[0, 5]].tolist() == [stream[:32].tolist(), stream[160:192].tolist()]
    assert not list((cache_path(recipe)).glob("train*"))  # read in place, not copied
    val_prefix, val_docs = megatron_corpus(tmp_path, tok, texts[1000:], "val")  # validation in that format too
    other = config.load(RECIPES / "gpt-tiny-cpu.yaml", [*sets[:2], *sets[3:], f"data.val_indexed=[{val_prefix}]"])
    assert main(["data", "prepare", str(RECIPES / "gpt-tiny-cpu.yaml"),
                 *sum((["--set", s] for s in [*sets[:2], *sets[3:], f"data.val_indexed=[{val_prefix}]"]), [])]) == 0
    val = Batches(cache_path(other), other, rank=0, world=1).val
    assert val[[0]].tolist() == [np.concatenate(val_docs)[:32].tolist()] and cache_path(other) != cache_path(recipe)

    done = harness.train(RECIPES / "gpt-tiny-cpu.yaml", tmp_path / "run",
                         [*sets, "train.steps=4", "optim.warmup_steps=2", "train.eval_every=4"])
    assert done.returncode == 0, done.stderr[-3000:]
    scalars = read_scalars(tmp_path / "run")
    assert sorted(scalars["train/loss"]) == [1, 2, 3, 4] and 4 in scalars["val/loss"]


@pytest.mark.parametrize("change, message", [
    (["data.indexed=[{d}/nope]"], "{d}/nope.bin: no such file"),
    (["data.val_files=null"], "name held-out validation data"),
    (["data.tokenizer=bpe"], "already tokenised"),
    (["data.files=[{d}/val.txt]"], "data.indexed replaces data.files"),
    (["data.tokenizer={d}/small"], "token id"),
])
def test_bad_indexed_data_is_one_line_and_writes_nothing(change, message, tmp_path, capsys):
    texts = python_docs()[:300]
    tok = train_tokenizer(iter(texts), "bpe", 512)
    tok.save_pretrained(tmp_path / "tok")
    train_tokenizer(iter(texts), "bpe", 300).save_pretrained(tmp_path / "small")
    prefix, _ = megatron_corpus(tmp_path, tok, texts[:200])
    (tmp_path / "val.txt").write_text("\n".join(t.replace("\n", " ") for t in texts[200:]))
    sets = [f"data.indexed=[{prefix}]", f"data.tokenizer={tmp_path / 'tok'}",
            f"data.val_files=[{tmp_path / 'val.txt'}]",
            f"data.cache_dir={tmp_path / 'cache'}", "data.seq_len=32",
            *(c.format(d=tmp_path) for c in change)]
    capsys.readouterr()
    code = main(["data", "prepare", str(RECIPES / "gpt-tiny-cpu.yaml"), *sum((["--set", s] for s in sets), [])])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message.format(d=tmp_path) in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())
