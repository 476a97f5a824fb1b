"""Data: a corpus through `datasets`, an HF tokenizer, sequences packed to the recipe's length,
cached on disk, split into train and validation (read as batches by launchers/batches.py).

The corpus is local text files (.txt, .jsonl/.json, .parquet), a hub dataset (downloaded at
run time), or by default the offline corpus: the docstrings of this Python's standard library,
which exist wherever the project is installed and are fixed for a given Python version.

`prepare(recipe)` builds the cache entry once, with every core (`b2b data prepare RECIPE`; `b2b
train` calls it): the train and validation splits as shards in megatron-core's indexed format
(.bin/.idx, launchers/indexed.py), read a sequence at a time, and tokenizer/. It is keyed by everything
that changes its contents, so a second run does not re-tokenise, and a killed preparation resumes
from its finished shards.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import os
import shutil
import sys
import sysconfig
from pathlib import Path

from growth.adapters.files import atomic_directory, disk_full, sha256

from . import indexed
from .config import FILE_KINDS, TOKENIZER_KINDS, Recipe, RecipeError, SourceConfig

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


def load_corpus(source, what: str = "the corpus", max_documents: int | None = None, streaming: bool = False):
    """The documents of `source` (recipe.data, or one of data.sources: its files, its hub dataset,
    or neither: the offline corpus) as a `datasets.Dataset` with one text column named 'text'
    (streaming: an IterableDataset, read as it is iterated, never copied to an Arrow cache)."""
    import datasets
    if source.files:
        ds = datasets.load_dataset(FILE_KINDS[Path(source.files[0]).suffix], data_files=list(source.files),
                                   split="train", streaming=streaming)
    elif source.hub:  # (offline, HF_HUB_OFFLINE=1: from the cache `datasets` kept of an earlier load)
        try:
            ds = datasets.load_dataset(source.hub, source.hub_config, split="train", streaming=streaming)
        except (OSError, ValueError) as err:  # not found, not reachable, not cached, no such config
            raise RecipeError(f"{what}: hub dataset {source.hub!r}: cannot load it "
                              f"({str(err).splitlines()[0]})") from None
    else:
        ds = datasets.Dataset.from_dict({"text": list(python_docs())})
        ds = ds.to_iterable_dataset() if streaming else ds
    field = source.text_field if source.files or source.hub else "text"
    if ds.column_names is not None and field not in ds.column_names:  # (a stream may not know its columns)
        raise RecipeError(f"data.text_field: {field!r} is not a column of {what} ({ds.column_names})")
    ds = ds.select_columns([field]).rename_column(field, "text") if field != "text" else ds.select_columns(["text"])
    ds = ds.filter(lambda batch: [bool(t and t.strip()) for t in batch["text"]], batched=True)
    if streaming:
        return ds.take(max_documents) if max_documents else ds
    if max_documents:
        ds = ds.select(range(min(max_documents, len(ds))))
    if len(ds) < (1 if what == "data.val_files" else 2):
        raise RecipeError(f"data: {what} has too few non-empty documents ({len(ds)})")
    return ds


def _corpora(d) -> list[tuple[str, object, str]]:
    """The training corpora of recipe.data `d`: (part, source, the name errors give it) each."""
    if d.sources:
        return [(f"train.{i}", source, f"data.sources[{i}]") for i, source in enumerate(d.sources)]
    return [("train", d, "the corpus")]


def _val_source(d) -> SourceConfig:
    """data.val_files as a corpus (their text field is data.text_field)."""
    return SourceConfig(files=d.val_files, text_field=d.text_field)


def parts(recipe: Recipe) -> dict:
    """The documents to prepare, by part: 'train' (for a mixture, 'train.0', 'train.1', ...: each
    of data.sources in order) and 'val': data.val_files, held out whole, or else a fixed-seed
    data.val_fraction of each corpus's documents."""
    import datasets
    d = recipe.data
    if d.indexed:  # tokenised already: only a validation text to prepare
        return {"val": load_corpus(_val_source(d), "data.val_files")} if d.val_files else {}
    out, held = {}, []
    for name, source, what in _corpora(d):
        corpus = load_corpus(source, what, d.max_documents)
        if d.val_files:
            out[name] = corpus
        else:
            split = corpus.train_test_split(test_size=d.val_fraction, seed=SPLIT_SEED)
            out[name] = split["train"]
            held.append(split["test"])
    out["val"] = load_corpus(_val_source(d), "data.val_files") if d.val_files else datasets.concatenate_datasets(held)
    return out


def _files_key(files: list[str]) -> list:
    return [[str(Path(f).resolve()), sha256([Path(f)])] for f in files]


def _source_key(source) -> dict:
    if source.files:
        key = {"files": _files_key(source.files)}
    elif source.hub:
        key = {"hub": source.hub, "config": source.hub_config}
    else:
        key = {"python-docs": sys.version}
    return {**key, "text_field": source.text_field}


def _indexed_key(prefix: str) -> list:
    """An indexed dataset's identity: its path, its index's hash (the documents' lengths) and its
    tokens' size (hashing a corpus's .bin would read all of it)."""
    return [str(Path(prefix).resolve()), sha256([Path(f"{prefix}.idx")]), Path(f"{prefix}.bin").stat().st_size]


def corpus_key(recipe: Recipe) -> dict:
    """What the prepared documents depend on (a mixture's weights are not: they act when read)."""
    d = recipe.data
    val = {"val_files": _files_key(d.val_files)} if d.val_files else {}
    if d.indexed:
        return {"indexed": [_indexed_key(p) for p in d.indexed], **val,
                "val_indexed": [_indexed_key(p) for p in d.val_indexed or []]}
    streamed = {"streaming": d.shard_documents} if d.streaming else {}  # streamed, the shards define the split
    return {"sources": [_source_key(s) for s in d.sources or [d]], **val, "max_documents": d.max_documents, **streamed}


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


def _tokenize_shard(task: tuple) -> tuple[str, int]:
    """A shard's documents, tokenised, each followed by the separator, into its indexed pair
    (PREFIX.bin/.idx); (its name, its tokens). task: ((part, begin, end) of the prepared parts,
    or the documents' texts), PREFIX."""
    what, prefix = task
    tok, sep = _PREPARING["tokenizer"], _PREPARING["sep"]
    if isinstance(what, list):
        batches = (what[first:first + 1000] for first in range(0, len(what), 1000))
    else:
        part, begin, end = what
        docs = _PREPARING["corpus"][part]
        batches = (docs[first:min(first + 1000, end)]["text"] for first in range(begin, end, 1000))

    def documents():
        for texts in batches:
            for ids in encode(tok, texts):
                ids.append(sep)
                yield ids
    return Path(prefix).name, indexed.write(Path(prefix), documents(), indexed.token_dtype(len(tok)))


def encode(tok, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens: for a fast tokenizer its Rust encode_batch_fast
    (the same ids as tok(texts), without computing offsets or attention masks), with the
    truncation or padding a tokenizer.json may carry turned off, as tok(texts) turns them off."""
    backend = tok.backend_tokenizer if tok.is_fast else None
    if backend is None or not hasattr(backend, "encode_batch_fast"):
        return tok(texts, add_special_tokens=False)["input_ids"]
    if backend.truncation is not None or backend.padding is not None:  # all-MiniLM's truncates at 128
        backend.no_truncation()
        backend.no_padding()
    return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]


def _streamed(recipe: Recipe, work: Path, shards: dict):
    """data.streaming: each corpus read once, in order, data.shard_documents documents at a time,
    each chunk written as a train shard and a validation shard (a document is held out when a
    hash of its corpus and place falls under data.val_fraction; data.val_files, when given, are
    streamed the same way, whole). Yields the (texts, prefix) tasks of the shards not written yet,
    and records every shard's name in `shards` (by part) as it goes."""
    import itertools
    d, size = recipe.data, recipe.data.shard_documents
    corpora = _corpora(d) + ([("val", _val_source(d), "data.val_files")] if d.val_files else [])
    cut = int(d.val_fraction * 2**63)  # seed_for's 63 bits
    for number, (part, source, what) in enumerate(corpora):
        docs = iter(load_corpus(source, what, None if part == "val" else d.max_documents, streaming=True))
        for first in itertools.count(0, size):
            chunk = [doc["text"] for doc in itertools.islice(docs, size)]
            if not chunk:
                break
            if part == "val" or d.val_files:
                out = [(part, chunk)]
            else:
                held = [seed_for(SPLIT_SEED, number, first + i) < cut for i in range(len(chunk))]
                out = [(part, [t for t, h in zip(chunk, held) if not h]),
                       ("val" + part.removeprefix("train"), [t for t, h in zip(chunk, held) if h])]
            for name, texts in out:
                prefix = work / f"{name}-{first:09d}-{first + len(chunk):09d}"
                shards.setdefault("val" if name.startswith("val") else name, []).append(prefix.name)
                if not Path(f"{prefix}.idx").is_file():
                    yield texts, str(prefix)


def _tokenizer(recipe: Recipe, corpus, where: Path, log):
    """The run's tokenizer, saved in `where` first (a resumed preparation reuses the one its
    shards were tokenised with: a trained one can differ between trainings on tied counts)."""
    source = tokenizer_source(recipe)
    if not (where / "tokenizer_config.json").is_file():
        if source in TOKENIZER_KINDS:  # (not for a stream: config refuses it)
            texts = (t for part, docs in corpus.items() if part != "val" for t in docs["text"])
            tok = train_tokenizer(texts, source, recipe.data.vocab_size)
        else:
            tok = load_tokenizer(source)
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
    resumes with the shards it had finished, and no reader sees a partial entry; bad input leaves
    nothing. The data do not depend on the number of processes, nor (but for a stream) on the
    shard size: blocks are cut within PACK_DOCS-document groups, which shards never split."""
    path = cache_path(recipe)
    if (path / "meta.json").is_file():
        return path
    work = path.parent / f".{path.name}.partial"
    try:
        _build(recipe, work, path, log)
    except RecipeError:  # bad input, fixed by a change of the recipe: nothing to resume
        shutil.rmtree(work, ignore_errors=True)
        raise
    except (OSError, indexed.IndexedError) as err:
        if (path / "meta.json").is_file():  # another process preparing the same entry finished it meanwhile
            shutil.rmtree(work, ignore_errors=True)
            return path
        if disk_full(err, path.parent):  # the shards written so far would only hold the space needed
            shutil.rmtree(work, ignore_errors=True)
            raise RecipeError(f"{path}: no space left on the device while preparing the data: free space or "
                              "set data.cache_dir elsewhere") from None
        raise
    return path


def _build(recipe: Recipe, work: Path, path: Path, log) -> None:
    """prepare's work, in `work`, renamed to `path` at the end."""
    d, arch = recipe.data, recipe.model.arch
    work.mkdir(parents=True, exist_ok=True)
    log(f"data: building {path} (tokenising and packing the corpus; done once)")
    corpus = None if d.streaming else parts(recipe)
    tok = _tokenizer(recipe, corpus, work / "tokenizer", log)
    sep = tok.sep_token_id if arch == "bert" else tok.eos_token_id
    if d.streaming:
        shards: dict[str, list[str]] = {}
        tasks, todo, processes = None, _streamed(recipe, work, shards), preparation_processes(recipe)
    else:
        size = d.shard_documents  # a multiple of PACK_DOCS (config)
        bounds = [(part, b, min(b + size, len(docs))) for part, docs in corpus.items()
                  for b in range(0, len(docs), size)]
        tasks = [((part, b, e), str(work / f"{part}-{b:09d}-{e:09d}")) for part, b, e in bounds]
        shards = {part: [Path(t[1]).name for t in tasks if t[0][0] == part] for part in corpus}
        todo = [t for t in tasks if not Path(t[1] + ".idx").is_file()]
        processes = min(preparation_processes(recipe), len(todo))
        if len(todo) < len(tasks):
            log(f"data: {len(tasks) - len(todo)} of {len(tasks)} shards already written")
    shards.update(_in_place(recipe, tok))
    _PREPARING.update(corpus=corpus, tokenizer=tok, sep=sep)
    try:
        for name, tokens in _map(_tokenize_shard, todo, processes):
            log(f"data: {name}: {tokens} tokens" + (f" ({len(tasks)} shards in all)" if tasks else ""))
    finally:
        _PREPARING.clear()
    planned = {name + suffix for names in shards.values() for name in names for suffix in (".bin", ".idx")}
    for stale in work.glob("*-*-*.[bi][id][nx]"):  # another shard size's, from a preparation killed before
        if stale.name not in planned:
            stale.unlink()
    blocks = {part: len(open_split(work, shards[part], d.seq_len, tok if arch == "bert" else None)) for part in shards}
    for part, count in blocks.items():
        if count == 0:
            raise RecipeError(f"data: the {part} split holds no full sequence of {d.seq_len} tokens: "
                              "use more documents, a smaller data.seq_len or a larger data.val_fraction")
    meta = {"sequences": blocks, "seq_len": d.seq_len, "vocab_size": len(tok), "tokenizer": tokenizer_source(recipe),
            "shards": shards, "cls": tok.cls_token_id if arch == "bert" else None, "sep": sep}
    (work / "meta.json").write_text(json.dumps(meta, indent=1))
    os.rename(work, path)
    train = " + ".join(str(n) for part, n in blocks.items() if part != "val")
    log(f"data: {train} train and {blocks['val']} validation sequences of {d.seq_len} tokens, vocabulary {len(tok)}")


def _in_place(recipe: Recipe, tok) -> dict[str, list[str]]:
    """data.indexed (the train part) and data.val_indexed (val), by absolute prefix: read where they
    are, once checked to be indexed datasets whose token ids the tokenizer has (one pass over
    each, in the preparation job)."""
    d, out = recipe.data, {}
    for part, key, prefixes in (("train", "data.indexed", d.indexed), ("val", "data.val_indexed", d.val_indexed)):
        for prefix in prefixes or []:
            try:
                tokens, _ = indexed.read(Path(prefix))
            except indexed.IndexedError as err:
                raise RecipeError(f"{key}: {err}") from None
            top = int(tokens.max()) if len(tokens) else -1
            if top >= len(tok):
                raise RecipeError(f"{key}: {prefix} holds token id {top}, but data.tokenizer "
                                  f"({tokenizer_source(recipe)}) has {len(tok)} tokens: it was tokenised by another")
            out.setdefault(part, []).append(str(Path(prefix).resolve()))
    return out


def _map(function, tasks, processes: int):
    """function(task) for every task, in `processes` forked workers (here when one), as they end.
    Each worker tokenises with one thread (the tokenizer's own threads off in them); here, the
    tokenizer's threads use every core. A new task is handed out as each one ends, at most
    2 x processes of them out at once (a stream's tasks carry their documents): no worker waits
    for another's task to end."""
    if processes <= 1:
        yield from map(function, tasks)
        return
    import multiprocessing
    import queue
    parallelism = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # read by the forked workers (and no fork warning)
    try:
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            ended, out = queue.SimpleQueue(), 0  # each task's result, or its exception, as it ends

            def collect():
                result = ended.get()
                if isinstance(result, BaseException):
                    raise result
                return result
            for task in tasks:
                pool.apply_async(function, (task,), callback=ended.put, error_callback=ended.put)
                out += 1
                if out == 2 * processes:  # the next task is taken once one has ended
                    yield collect()
                    out -= 1
            for _ in range(out):
                yield collect()
    finally:
        if parallelism is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = parallelism


def open_split(root: Path, shards: list[str], seq_len: int, bert_tok=None) -> indexed.Blocks:
    """A prepared split's sequences (launchers.indexed.Blocks): its shards, named in `root` or by
    absolute prefix (data.indexed)."""
    ends = () if bert_tok is None else (bert_tok.cls_token_id, bert_tok.sep_token_id)
    return indexed.Blocks([root / name for name in shards], PACK_DOCS, seq_len, *ends)


# ---------------------------------------------------------------- seeds


def seed_for(*parts: int) -> int:
    """A 63-bit seed mixed from integers (stable across processes and Python runs)."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") >> 1
