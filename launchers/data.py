"""Data: a corpus through `datasets`, an HF tokenizer, sequences packed to the recipe's length,
cached on disk, split into train and validation; deterministic batches and MLM masking.

The corpus is local text files (.txt, .jsonl/.json, .parquet), a hub dataset (downloaded at
run time), or by default the offline corpus: the docstrings of this Python's standard library,
which exist wherever the project is installed and are fixed for a given Python version.

`prepare(recipe)` builds the cache entry once, with every core (`b2b data prepare RECIPE`; `b2b
train` calls it): the train and validation splits as shards in megatron-core's indexed format
(.bin/.idx, launchers/indexed.py), read memory-mapped, and tokenizer/. It is keyed by everything
that changes its contents, so a second run does not re-tokenise, and a killed preparation resumes
from its finished shards. Batches are a pure function of (seed, step, rank, micro step): resuming
at step N reads exactly what the uninterrupted run read, and masks exactly the same tokens.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import os
import sys
import sysconfig
from pathlib import Path

import numpy as np
import torch

from growth.adapters.files import atomic_directory, sha256

from . import indexed
from .config import FILE_KINDS, TOKENIZER_KINDS, Recipe, RecipeError

SPLIT_SEED = 1234  # the train/validation split and validation masks do not depend on the run's seed
STDLIB_SKIP = {"test", "tests", "idlelib", "lib2to3", "turtledemo", "site-packages", "dist-packages", "__pycache__"}
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
GPT_EOS = "<|endoftext|>"


def quiet_libraries() -> None:
    """No per-map progress bars from datasets/transformers unless attached to a terminal."""
    import datasets
    import transformers
    if not sys.stderr.isatty():
        datasets.disable_progress_bars()
        transformers.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()


# ---------------------------------------------------------------- corpus


@functools.cache  # parsing the standard library takes seconds; a process preparing several caches parses it once
def python_docs() -> tuple[str, ...]:
    """Docstrings (100 characters or more) of the standard library's modules, classes and functions."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for file in sorted(root.rglob("*.py")):
        if STDLIB_SKIP & set(file.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(file.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 100:
                    docs.append(doc)
    return tuple(docs)


def load_corpus(recipe: Recipe, files: list[str] | None = None):
    """The documents as a `datasets.Dataset` with one text column named 'text': the recipe's
    corpus, or the text files `files` (data.val_files)."""
    import datasets
    d = recipe.data
    local = files or d.files
    if local:
        ds = datasets.load_dataset(FILE_KINDS[Path(local[0]).suffix], data_files=list(local), split="train")
    elif d.hub:
        ds = datasets.load_dataset(d.hub, d.hub_config, split="train")
    else:
        ds = datasets.Dataset.from_dict({"text": list(python_docs())})
    field = "text" if not (local or d.hub) else d.text_field
    what = "data.val_files" if files else "the corpus"
    if field not in ds.column_names:
        raise RecipeError(f"data.text_field: {field!r} is not a column of {what} ({ds.column_names})")
    ds = ds.select_columns([field]).rename_column(field, "text") if field != "text" else ds.select_columns(["text"])
    ds = ds.filter(lambda batch: [bool(t and t.strip()) for t in batch["text"]], batched=True)
    if d.max_documents and not files:
        ds = ds.select(range(min(d.max_documents, len(ds))))
    if len(ds) < (1 if files else 2):
        raise RecipeError(f"data: {what} has too few non-empty documents ({len(ds)})")
    return ds


def splits(recipe: Recipe):
    """{'train': ..., 'test': ...} documents: data.val_files held out as the validation split, or
    a fixed-seed data.val_fraction of the corpus's documents."""
    import datasets
    corpus = load_corpus(recipe)
    if recipe.data.val_files:
        return datasets.DatasetDict(train=corpus, test=load_corpus(recipe, recipe.data.val_files))
    return corpus.train_test_split(test_size=recipe.data.val_fraction, seed=SPLIT_SEED)


def _files_key(files: list[str]) -> list:
    return [[str(Path(f).resolve()), sha256([Path(f)])] for f in files]


def corpus_key(recipe: Recipe) -> dict:
    d = recipe.data
    if d.files:
        source = {"files": _files_key(d.files)}
    elif d.hub:
        source = {"hub": d.hub, "config": d.hub_config}
    else:
        source = {"python-docs": sys.version}
    val = {"val_files": _files_key(d.val_files)} if d.val_files else {}
    return {**source, **val, "text_field": d.text_field, "max_documents": d.max_documents}


# ---------------------------------------------------------------- tokenizers


def train_tokenizer(texts, kind: str, vocab_size: int):
    """A WordPiece (BERT, lower-cased, [CLS] x [SEP]) or byte-level BPE (GPT-2) tokenizer."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    if kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=BERT_SPECIALS)
        tok.train_from_iterator(texts, trainer=trainer)
        # The trainer numbers its vocabulary in hash-map order, new in every process (tokenizers#1794):
        # renumber it, special tokens first and the rest sorted, so the ids depend only on the tokens
        # learned. (Which tokens it learns can still change on tied merge counts.)
        learned = sorted(set(tok.get_vocab()) - set(BERT_SPECIALS))
        tok.model = models.WordPiece({t: i for i, t in enumerate(BERT_SPECIALS + learned)}, unk_token="[UNK]")
        cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                       sep_token="[SEP]", mask_token="[MASK]", model_max_length=10 ** 6)
    if kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[GPT_EOS],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts, trainer=trainer)
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=GPT_EOS, eos_token=GPT_EOS, unk_token=GPT_EOS,
                                       model_max_length=10 ** 6)
    raise RecipeError(f"tokenizer kind {kind!r}: use one of {', '.join(TOKENIZER_KINDS)}")


def tokenizer_source(recipe: Recipe) -> str:
    """What data.tokenizer resolves to: a directory, or a kind to train."""
    d, m = recipe.data, recipe.model
    if d.tokenizer is None:
        if m.init_from or m.grow_from:  # the model's own (a ZeRO checkpoint keeps it beside its config)
            from .config import config_dir
            return str(config_dir(m.init_from or m.grow_from).resolve())
        return "wordpiece" if m.arch == "bert" else "bpe"
    return d.tokenizer if d.tokenizer in TOKENIZER_KINDS else str(_resolve_dir(d.tokenizer))


def _resolve_dir(name: str) -> Path:
    from growth.adapters.files import resolve
    return resolve(name, weights=False).resolve()


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, TypeError, json.JSONDecodeError) as err:
        raise RecipeError(f"data.tokenizer: {path}: cannot load a tokenizer ({str(err).splitlines()[0]})") from None


def check_tokenizer(tok, arch: str, where: str) -> None:
    needed = ("cls_token", "sep_token", "mask_token", "pad_token") if arch == "bert" else ("eos_token",)
    missing = [n for n in needed if getattr(tok, n) is None]
    if missing:
        raise RecipeError(f"data.tokenizer: {where} has no {', '.join(missing)}, which the "
                          f"{'masked' if arch == 'bert' else 'causal'} LM objective needs")


# ---------------------------------------------------------------- preparation and the cache


PACK_DOCS = 2000  # sequences are cut within each group of this many documents, its remainder dropped:
# the earlier Arrow cache packed each 2000-document map batch alone, and keeping its blocks keeps
# every run's data, and the figures in docs/ from them, as they were (<= 1 block lost per group)
_PREPARING: dict = {}  # what the forked preparation workers read: the splits' documents, the tokenizer


def cache_path(recipe: Recipe) -> Path:
    d = recipe.data
    tok = tokenizer_source(recipe)
    tok_key = {"train": tok, "vocab_size": d.vocab_size} if tok in TOKENIZER_KINDS else \
        {"dir": tok, "sha256": sha256([Path(tok) / "tokenizer.json"]) if (Path(tok) / "tokenizer.json").is_file()
         else None}
    key = json.dumps({"corpus": corpus_key(recipe), "tokenizer": tok_key, "arch": recipe.model.arch,
                      "seq_len": d.seq_len, "val_fraction": d.val_fraction, "format": 2}, sort_keys=True)
    return Path(d.cache_dir) / hashlib.sha256(key.encode()).hexdigest()[:16]


def preparation_processes(recipe: Recipe) -> int:
    """data.num_proc, or every core this process may run on (under SLURM, its allocation's)."""
    return recipe.data.num_proc or len(os.sched_getaffinity(0))


def _tokenize_shard(task: tuple[str, int, int, str]) -> tuple[str, int]:
    """Documents [begin, end) of a split, tokenised, each followed by the separator, into the
    shard's indexed pair (PREFIX.bin/.idx); (its name, its tokens)."""
    split, begin, end, prefix = task
    docs, tok, sep = _PREPARING["corpus"][split], _PREPARING["tokenizer"], _PREPARING["sep"]

    def documents():
        for first in range(begin, end, 1000):
            for ids in tok(docs[first:min(first + 1000, end)]["text"], add_special_tokens=False)["input_ids"]:
                ids.append(sep)
                yield ids
    return Path(prefix).name, indexed.write(Path(prefix), documents(), indexed.token_dtype(len(tok)))


def _tokenizer(recipe: Recipe, corpus, where: Path, log):
    """The run's tokenizer, saved in `where` first (a resumed preparation reuses the one its
    shards were tokenised with: a trained one can differ between trainings on tied counts)."""
    source = tokenizer_source(recipe)
    if not (where / "tokenizer_config.json").is_file():
        tok = train_tokenizer(iter(corpus["train"]["text"]), source, recipe.data.vocab_size) \
            if source in TOKENIZER_KINDS else load_tokenizer(source)
        check_tokenizer(tok, recipe.model.arch, source)
        with atomic_directory(where, replace=False) as tmp:
            tok.save_pretrained(str(tmp))
    else:
        log(f"data: resuming the preparation in {where.parent}")
    return load_tokenizer(where)


def prepare(recipe: Recipe, log=print) -> Path:
    """Build the cache entry if it is not there; return its path. The splits' documents are
    tokenised by preparation_processes() forked workers, data.shard_documents at a time, into shards in
    megatron-core's indexed format (launchers.indexed), each written whole or not at all in a
    hidden PATH.partial directory, renamed to PATH when every shard is there: a killed preparation
    resumes with the shards it had finished, and no reader sees a partial entry. The data do not
    depend on the number of shards or processes: a split is its documents' one token stream."""
    path = cache_path(recipe)
    if (path / "meta.json").is_file():
        return path
    d, arch = recipe.data, recipe.model.arch
    work = path.parent / f".{path.name}.partial"
    work.mkdir(parents=True, exist_ok=True)
    log(f"data: building {path} (tokenising and packing the corpus; done once)")
    corpus = splits(recipe)
    tok = _tokenizer(recipe, corpus, work / "tokenizer", log)
    sep = tok.sep_token_id if arch == "bert" else tok.eos_token_id
    names, size = {"train": "train", "test": "val"}, d.shard_documents  # a multiple of PACK_DOCS (config)
    bounds = [(split, b, min(b + size, len(corpus[split])))
              for split in names for b in range(0, len(corpus[split]), size)]
    tasks = [(split, b, e, str(work / f"{names[split]}-{b:09d}-{e:09d}")) for split, b, e in bounds]
    todo = [t for t in tasks if not Path(t[3] + ".idx").is_file()]
    processes = min(preparation_processes(recipe), len(todo))
    _PREPARING.update(corpus=corpus, tokenizer=tok, sep=sep)
    try:
        done = len(tasks) - len(todo)
        for name, tokens in _map(_tokenize_shard, todo, processes):
            done += 1
            log(f"data: {name}: {tokens} tokens ({done}/{len(tasks)} shards)")
    finally:
        _PREPARING.clear()
    planned = {Path(t[3]).name + suffix for t in tasks for suffix in (".bin", ".idx")}
    for stale in work.glob("*-*-*.[bi][id][nx]"):  # another shard size's, from a preparation killed before
        if stale.name not in planned:
            stale.unlink()
    shards = {name: [Path(t[3]).name for t in tasks if t[0] == split] for split, name in names.items()}
    blocks = {name: len(open_split(work, shards[name], d.seq_len, tok if arch == "bert" else None)) for name in shards}
    for name, count in blocks.items():
        if count == 0:
            raise RecipeError(f"data: the {name} split holds no full sequence of {d.seq_len} tokens: "
                              "use more documents, a smaller data.seq_len or a larger data.val_fraction")
    meta = {"sequences": blocks, "seq_len": d.seq_len, "vocab_size": len(tok), "tokenizer": tokenizer_source(recipe),
            "shards": shards, "cls": tok.cls_token_id if arch == "bert" else None, "sep": sep}
    (work / "meta.json").write_text(json.dumps(meta, indent=1))
    try:
        os.rename(work, path)
    except OSError:  # another process preparing the same entry renamed it first
        if not (path / "meta.json").is_file():
            raise
    log(f"data: {blocks['train']} train and {blocks['val']} validation sequences of {d.seq_len} tokens, "
        f"vocabulary {len(tok)}")
    return path


def _map(function, tasks: list, processes: int):
    """function(task) for every task, in `processes` forked workers (here when one), as they end.
    The workers tokenise one document at a time: the tokenizer's own threads off in them."""
    if processes <= 1:
        yield from map(function, tasks)
        return
    import multiprocessing
    parallelism = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # read by the forked workers (and no fork warning)
    try:
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            yield from pool.imap_unordered(function, tasks)
    finally:
        if parallelism is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = parallelism


def open_split(root: Path, shards: list[str], seq_len: int, bert_tok=None) -> indexed.Blocks:
    """A prepared split's sequences, memory-mapped (launchers.indexed.Blocks)."""
    ends = () if bert_tok is None else (bert_tok.cls_token_id, bert_tok.sep_token_id)
    return indexed.Blocks([root / name for name in shards], PACK_DOCS, seq_len, *ends)


# ---------------------------------------------------------------- batches


def seed_for(*parts: int) -> int:
    """A 63-bit seed mixed from integers (stable across processes and Python runs)."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") >> 1


class Batches:
    """Deterministic batches: global sample k of the run is position k mod N of epoch k // N's
    permutation; step s takes samples [s*G, (s+1)*G) with G = micro x accum x world, and
    rank r's micro step m takes the chunk (m*world + r)."""

    def __init__(self, path: Path, recipe: Recipe, rank: int, world: int):
        from transformers import AutoTokenizer
        meta = json.loads((path / "meta.json").read_text())
        self.tokenizer = AutoTokenizer.from_pretrained(str(path / "tokenizer"))
        bert = self.tokenizer if recipe.model.arch == "bert" else None
        self.train, self.val = (open_split(path, meta["shards"][s], meta["seq_len"], bert) for s in ("train", "val"))
        self.recipe, self.rank, self.world = recipe, rank, world
        self.micro, self.accum = recipe.batch.micro, recipe.batch.accum
        self.mlm = recipe.model.arch == "bert"
        self._perms: dict[int, np.ndarray] = {}
        if self.mlm:
            tok = self.tokenizer
            self.special = torch.tensor(sorted({tok.cls_token_id, tok.sep_token_id, tok.pad_token_id}))

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.recipe.seed, epoch]).permutation(len(self.train))}
        return self._perms[epoch]

    def train_batch(self, step: int, micro_step: int) -> dict:
        """The batch of (1-based) optimizer step `step`, micro step `micro_step`, on this rank."""
        n = len(self.train)
        first = (step - 1) * self.micro * self.accum * self.world + (micro_step * self.world + self.rank) * self.micro
        rows = [int(self._order(k // n)[k % n]) for k in range(first, first + self.micro)]
        ids = torch.from_numpy(self.train[rows])
        gen = torch.Generator().manual_seed(seed_for(self.recipe.seed, step, self.rank, micro_step))
        return self.objective(ids, gen)

    def val_batches(self, count: int):
        """`count` fixed validation batches for this rank (split round-robin over ranks, wrapping)."""
        n = len(self.val)
        for b in range(count):
            first = (b * self.world + self.rank) * self.micro
            rows = [k % n for k in range(first, first + self.micro)]
            ids = torch.from_numpy(self.val[rows])
            yield self.objective(ids, torch.Generator().manual_seed(seed_for(SPLIT_SEED, b, self.rank)))

    def objective(self, ids: torch.Tensor, gen: torch.Generator) -> dict:
        if not self.mlm:
            return {"input_ids": ids, "labels": ids}
        return mask_tokens(ids, gen, self.recipe.objective.mask_prob, self.special, self.tokenizer.mask_token_id,
                           len(self.tokenizer))


def mask_tokens(ids, gen, prob: float, special: torch.Tensor, mask_id: int, vocab: int) -> dict:
    """BERT's dynamic masking: each non-special token is chosen with `prob`; of those, 80% become
    [MASK], 10% a random token, 10% stay. Labels are -100 except at chosen positions."""
    chosen = (torch.rand(ids.shape, generator=gen) < prob) & ~torch.isin(ids, special)
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    draw = torch.rand(ids.shape, generator=gen)
    random_ids = torch.randint(vocab, ids.shape, generator=gen)
    inputs = torch.where(chosen & (draw < 0.8), torch.full_like(ids, mask_id), ids)
    inputs = torch.where(chosen & (draw >= 0.8) & (draw < 0.9), random_ids, inputs)
    return {"input_ids": inputs, "labels": labels}
