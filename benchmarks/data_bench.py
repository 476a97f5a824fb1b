"""The data path at scale (issue 21): preparation throughput, the reader's memory, and training
throughput, for megatron-core's indexed format (launchers/data.py, launchers/indexed.py) against
the Arrow cache it replaced, measured in the same run on the same generated corpus.

    python benchmarks/data_bench.py --dir runs/data-bench --mb 1024 --small-mb 10 --repeats 3 --out docs/data_bench.json

- corpus: JSON lines of documents made from the offline corpus's docstrings (sentences of random
  docstrings, seeded), --mb and --small-mb megabytes; a byte-level BPE tokenizer (8192) trained
  once on the offline corpus, so tokenizer training is in no timing;
- preparation, each timing in a fresh process pinned to its cores, --repeats times in a rotating
  order (the spread between runs is part of the figure): the Arrow path (one process:
  datasets.map over 2000-document batches, packing in Python, save_to_disk, as launchers/data.py
  did before), and `prepare` with data.num_proc 1 (the tokenizer's own threads) and every core
  (forked workers); `prepare` on one core, for the scaling with cores; and the tokenizer alone
  (its encode calls only, every core), the ceiling of any preparation here; tokens per second
  of each, and each run's ratio to the Arrow path of its own repeat;
- reader: a fresh process opens each corpus's prepared data and reads --steps training batches
  of 32 sequences; its peak RSS (VmHWM), and its RSS after, anonymous and file-backed;
- training: a 2-layer GPT-2 on CPU trained --train-steps steps on each reader's batches; tokens/s;
- the epoch order: bytes and seconds of numpy's permutation of N sequences, and the time per
  index of Shuffle, which replaces it above launchers.batches.PERMUTATION_MAX sequences.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from launchers import config  # noqa: E402
from launchers.batches import Batches, Shuffle  # noqa: E402
from launchers.data import cache_path, parts, prepare, python_docs, train_tokenizer  # noqa: E402


def make_corpus(path: Path, mb: int, seed: int = 0) -> Path:
    """Documents of 3 to 30 sentences drawn from the offline corpus's docstrings, until `mb` MB."""
    if path.is_file():
        return path
    sentences = [s.strip() for doc in python_docs() for s in doc.replace("\n", " ").split(". ") if len(s) > 20]
    rng, size, tmp = random.Random(seed), 0, path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        while size < mb * 10**6:
            line = json.dumps({"text": ". ".join(rng.choices(sentences, k=rng.randint(3, 30))) + "."}) + "\n"
            f.write(line)
            size += len(line)
    tmp.rename(path)
    return path


def recipe_for(corpus: Path, tokenizer: Path, cache: Path, *sets: str):
    return config.load(ROOT / "recipes/gpt-tiny-cpu.yaml", [f"data.files=[{corpus}]", f"data.tokenizer={tokenizer}",
                                                            f"data.cache_dir={cache}", "data.seq_len=128", *sets])


def arrow_prepare(recipe, out: Path) -> int:
    """The Arrow cache as launchers/data.py built it before the indexed format (the baseline):
    one process, 2000-document batches tokenised and packed in Python; the tokens kept."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(recipe.data.tokenizer)
    seq_len, eos = recipe.data.seq_len, tok.eos_token_id

    def tokenize_and_pack(batch):
        ids = tok(batch["text"], add_special_tokens=False)["input_ids"]
        stream = [t for doc in ids for t in doc + [eos]]
        return {"input_ids": [stream[i:i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)]}
    tokens = 0
    for split, docs in parts(recipe).items():
        packed = docs.map(tokenize_and_pack, batched=True, batch_size=2000, remove_columns=docs.column_names,
                          load_from_cache_file=False)  # timed each run: not datasets' cached result
        packed.save_to_disk(str(out / split))
        tokens += len(packed) * seq_len
    return tokens


class ArrowRows:
    """The Arrow cache behind the reader interface (Batches.train/val), as the trainer read it."""

    def __init__(self, path: Path):
        import datasets
        self.rows = datasets.load_from_disk(str(path)).with_format("numpy")

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, rows):
        return self.rows[rows]["input_ids"].astype(np.int64)


def rate(tokens: int, seconds: float) -> dict:
    return {"seconds": round(seconds, 1), "tokens": tokens, "tokens_per_s": round(tokens / seconds)}


def indexed_cache(root: Path, procs: int, cores: int) -> Path:
    """Where `prepare` with `procs` processes on `cores` cores writes its cache."""
    return root / f"cache-{procs}-on-{cores}"


def tokenizer_alone(recipe) -> dict:
    """The tokenizer by itself over the corpus's training texts: its Rust encode_batch_fast with its
    own threads (every core), 2000 documents a call, only the calls timed. No preparation on this
    machine tokenises faster than this."""
    from launchers.data import load_tokenizer
    backend = load_tokenizer(recipe.data.tokenizer).backend_tokenizer
    tokens, seconds = 0, 0.0
    for batch in parts(recipe)["train"].iter(batch_size=2000):
        start = time.perf_counter()
        tokens += sum(len(e) for e in backend.encode_batch_fast(batch["text"], add_special_tokens=False))
        seconds += time.perf_counter() - start
    return rate(tokens, seconds)


def timed_preparation(kind: str, corpus: str, tokenizer: str, cache: str, procs: int) -> dict:
    """In a fresh process (its cores set by the caller before the tokenizer's threads start): one
    preparation of `corpus` from nothing, by `kind` (arrow, indexed or the tokenizer alone)."""
    recipe = recipe_for(Path(corpus), Path(tokenizer), Path(cache), f"data.num_proc={procs}")
    if kind == "tokenizer":
        return tokenizer_alone(recipe)
    subprocess.run(["rm", "-rf", cache], check=True)
    start = time.perf_counter()
    if kind == "arrow":
        tokens = arrow_prepare(recipe, Path(cache))
    else:
        meta = json.loads((prepare(recipe, log=lambda *_: None) / "meta.json").read_text())
        tokens = sum(meta["sequences"].values()) * recipe.data.seq_len
    seconds = time.perf_counter() - start
    return rate(tokens, seconds)


def preparations(root: Path, corpus: Path, tokenizer: Path, cores: int, repeats: int) -> dict:
    """Every preparation timed `repeats` times, each repeat in another order; per kind, its runs, and
    per repeat its ratio to that repeat's Arrow path; the scaling from one core to every core."""
    kinds = [("arrow", "arrow", 1, cores), ("indexed, num_proc 1", "indexed", 1, cores),
             (f"indexed, num_proc {cores}", "indexed", cores, cores), ("indexed, 1 core", "indexed", 1, 1),
             ("tokenizer alone", "tokenizer", 1, cores)]
    kinds = list({name: k for name, *k in kinds}.items())  # on one core, num_proc 1 and every core are one row
    runs: dict[str, list] = {name: [] for name, _ in kinds}
    for repeat in range(repeats):
        for name, (kind, procs, on) in kinds[repeat % len(kinds):] + kinds[:repeat % len(kinds)]:
            cache = indexed_cache(root, procs, on) if kind == "indexed" else \
                root / ("cache-arrow" if kind == "arrow" else "warm")  # the tokenizer alone writes nothing
            pin = ",".join(map(str, sorted(os.sched_getaffinity(0))[:on]))
            out = subprocess.run(["taskset", "-c", pin, sys.executable, __file__, "--prepare", kind, str(corpus),
                                  str(tokenizer), str(cache), str(procs)],
                                 capture_output=True, text=True, check=True).stdout
            runs[name].append(json.loads(out.splitlines()[-1]))
            print(f"repeat {repeat + 1}, {name} ({on} core{'s' * (on > 1)}): {runs[name][-1]}", flush=True)
    ratios = {name: [round(r["tokens_per_s"] / a["tokens_per_s"], 3) for r, a in zip(rs, runs["arrow"])]
              for name, rs in runs.items()}
    every, one = ratios[f"indexed, num_proc {cores}"], ratios["indexed, 1 core"]
    return {"runs": runs, "speedup": ratios,
            "speedup_median": {name: statistics.median(r) for name, r in ratios.items()},
            "scaling": [round(r / o, 3) for r, o in zip(every, one)]}


def rss() -> dict:
    """This process's peak RSS (VmHWM: ru_maxrss would carry the parent's over the exec), and its
    RSS now, anonymous and file-backed (mapped pages of files)."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return {key: int(status[name].split()[0]) / 1024
            for key, name in (("peak_mib", "VmHWM"), ("anon_mib", "RssAnon"), ("file_mib", "RssFile"))}


def reader(corpus: str, tokenizer: str, cache: str, steps: int) -> dict:
    """In a fresh process: open the prepared data and read `steps` training steps' batches."""
    recipe = recipe_for(Path(corpus), Path(tokenizer), Path(cache), "batch.micro=32")
    before = rss()
    data = Batches(cache_path(recipe), recipe, rank=0, world=1)
    start = time.perf_counter()
    for step in range(1, steps + 1):
        data.train_batch(step, 0)
    return {"sequences": len(data.train), "before": before, "after": rss(),
            "ms_per_batch": 1000 * (time.perf_counter() - start) / steps}


def train_throughput(data: Batches, steps: int) -> float:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=128, n_head=2, vocab_size=len(data.tokenizer),
                                       n_positions=data.recipe.data.seq_len))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(1, steps + 6):
        if step == 6:  # after the warm-up steps
            start = time.perf_counter()
        batch = data.train_batch(step, 0)
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    return steps * batch["input_ids"].numel() / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dir", default="runs/data-bench")
    p.add_argument("--mb", type=int, default=1024, help="the large corpus, MB of JSON lines")
    p.add_argument("--small-mb", type=int, default=10)
    p.add_argument("--steps", type=int, default=2000, help="batches the reader reads")
    p.add_argument("--train-steps", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3, help="times each preparation is timed")
    p.add_argument("--out", help="write the figures here (JSON)")
    p.add_argument("--reader", nargs=4, metavar=("CORPUS", "TOKENIZER", "CACHE", "STEPS"), help=argparse.SUPPRESS)
    p.add_argument("--prepare", nargs=5, metavar=("KIND", "CORPUS", "TOKENIZER", "CACHE", "PROCS"),
                   help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.reader:
        print(json.dumps(reader(*args.reader[:3], int(args.reader[3]))))
        return
    from launchers.data import quiet_libraries
    quiet_libraries()
    if args.prepare:
        print(json.dumps(timed_preparation(*args.prepare[:4], int(args.prepare[4]))))
        return
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    tokenizer = root / "tokenizer"
    if not tokenizer.is_dir():
        train_tokenizer(iter(python_docs()), "bpe", 8192).save_pretrained(str(tokenizer))
    figures = {"cores": len(os.sched_getaffinity(0)), "reader": {}}
    corpora = {mb: make_corpus(root / f"corpus-{mb}mb.jsonl", mb) for mb in (args.small_mb, args.mb)}
    big = corpora[args.mb]
    parts(recipe_for(big, tokenizer, root / "warm"))  # datasets' JSON-to-Arrow conversion, cached: in no timing
    figures["preparation"] = preparations(root, big, tokenizer, figures["cores"], args.repeats)
    print(f"x the Arrow path: {figures['preparation']['speedup']}; scaling {figures['preparation']['scaling']}",
          flush=True)
    cache = indexed_cache(root, figures["cores"], figures["cores"])  # the default preparation's
    for mb, corpus in corpora.items():
        prepare(recipe_for(corpus, tokenizer, cache), log=lambda *_: None)
        out = subprocess.run([sys.executable, __file__, "--reader", str(corpus), str(tokenizer), str(cache),
                              str(args.steps)], capture_output=True, text=True, check=True).stdout
        figures["reader"][f"{mb} MB"] = json.loads(out.splitlines()[-1])
        print(f"reader, {mb} MB corpus: {figures['reader'][f'{mb} MB']}", flush=True)
    recipe = recipe_for(big, tokenizer, cache, "batch.micro=16")
    indexed = Batches(cache_path(recipe), recipe, rank=0, world=1)
    arrow = Batches(cache_path(recipe), recipe, rank=0, world=1)
    arrow.sources = [ArrowRows(root / "cache-arrow" / "train")]
    assert len(arrow.train) == len(indexed.train), (len(arrow.train), len(indexed.train))
    assert (arrow.train_batch(3, 0)["input_ids"] == indexed.train_batch(3, 0)["input_ids"]).all()  # the same data
    figures["train_tokens_per_s"] = {name: round(train_throughput(data, args.train_steps))
                                     for name, data in (("arrow", arrow), ("indexed", indexed))}
    print(f"training tokens/s: {figures['train_tokens_per_s']}", flush=True)
    figures["permutation"] = {}
    for n in (10**6, 10**7, 10**8):
        start = time.perf_counter()
        perm = np.random.default_rng([0, 0]).permutation(n)
        seconds = time.perf_counter() - start
        del perm
        order, start = Shuffle(n, [0, 0]), time.perf_counter()
        for i in range(0, n, n // 10000):
            order[i]
        figures["permutation"][str(n)] = {"numpy_mib": n * 8 / 2**20, "numpy_seconds": round(seconds, 2),
                                          "shuffle_us_per_index": round((time.perf_counter() - start) / 10000 * 1e6, 1)}
    print(f"permutation: {figures['permutation']}")
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
