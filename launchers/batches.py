"""Batches: the training and validation sequences of a prepared cache entry (launchers/data.py)
read as deterministic batches, a pure function of (seed, step, rank, micro step), so that
resuming at step N reads exactly what the uninterrupted run read and masks exactly the same
tokens; a weighted mixture's draws (Mixture), an epoch's order (numpy's permutation, or Shuffle
above PERMUTATION_MAX sequences) and BERT's dynamic masking."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .config import Recipe
from .data import SPLIT_SEED, open_split, seed_for

MIX_BLOCK = 4096  # global samples per block of a mixture's draws
PERMUTATION_MAX = 1 << 24  # sequences up to which an epoch's order is numpy's permutation (8 bytes each, 128 MiB)
_MASK64 = (1 << 64) - 1


def _mix(x: int) -> int:
    """splitmix64's finaliser: a 64-bit integer hash."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _MASK64
    return x ^ (x >> 31)


class Shuffle:
    """A seeded permutation of range(n) computed per index, holding nothing per element: a
    4-round Feistel network on the smallest even number of bits that covers n, walking the
    cycle until the result falls below n (fewer than 4 steps on average). Used for an epoch of
    more than PERMUTATION_MAX sequences, whose numpy permutation would cost every rank 8 bytes
    per sequence (and about 6 s per 10^8, docs/benchmarks.md)."""

    def __init__(self, n: int, seed: list[int]):
        self.n, self.half = n, max(1, ((n - 1).bit_length() + 1) // 2)
        self.mask, self.keys = (1 << self.half) - 1, [seed_for(*seed, r) for r in range(4)]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        if not 0 <= i < self.n:
            raise IndexError(f"{i} of {self.n}")
        while True:
            left, right = i >> self.half, i & self.mask
            for key in self.keys:
                left, right = right, left ^ (_mix(key ^ right) & self.mask)
            i = left << self.half | right
            if i < self.n:
                return i


class Mixture:
    """Which corpus global sample k of a weighted mixture comes from, and which of that corpus's
    samples it is. In each block of MIX_BLOCK samples every sample's corpus is drawn by weight
    (seeded by the seed and the block), so the counts follow the weights within binomial error,
    and each corpus's samples are taken in its own order: a pure function of (seed, k). Holds
    each corpus's count before every block seen so far: numbers per block, not per sample.

    Not megatron-core's BlendedDataset: it builds two arrays over every sample of the run
    (10 bytes each) through its C++ helpers, and importing megatron-core costs every rank 4.5 s
    (launchers/indexed.py)."""

    def __init__(self, weights: list[float], seed: int):
        self.p, self.seed = np.asarray(weights, np.float64) / sum(weights), seed
        self.before = [np.zeros(len(weights), np.int64)]  # each corpus's samples before block b
        self._drawn = (-1, None)

    def _labels(self, block: int) -> np.ndarray:
        if self._drawn[0] != block:
            rng = np.random.default_rng(seed_for(self.seed, block, -1))
            self._drawn = (block, rng.choice(len(self.p), MIX_BLOCK, p=self.p))
        return self._drawn[1]

    def locate(self, k: int) -> tuple[int, int]:
        block, r = divmod(k, MIX_BLOCK)
        while len(self.before) <= block:
            self.before.append(self.before[-1] + np.bincount(self._labels(len(self.before) - 1), minlength=len(self.p)))
        labels = self._labels(block)
        source = int(labels[r])
        return source, int(self.before[block][source]) + int(np.count_nonzero(labels[:r] == source))


class Batches:
    """Deterministic batches: global sample k of the run is position k mod N of epoch k // N's
    permutation; step s takes samples [s*G, (s+1)*G) with G = micro x accum x world, and
    rank r's micro step m takes the chunk (m*world + r). A mixture (data.sources) first maps k to
    a corpus and that corpus's own sample index (Mixture), then reads it from the corpus's epochs."""

    def __init__(self, path: Path, recipe: Recipe, rank: int, world: int):
        from transformers import AutoTokenizer
        meta = json.loads((path / "meta.json").read_text())
        self.tokenizer = AutoTokenizer.from_pretrained(str(path / "tokenizer"))
        bert = self.tokenizer if recipe.model.arch == "bert" else None
        self.sources = [open_split(path, meta["shards"][part], meta["seq_len"], bert)
                        for part in meta["shards"] if part != "val"]
        self.val = open_split(path, meta["shards"]["val"], meta["seq_len"], bert)
        sources = recipe.data.sources
        self.mixture = Mixture([s.weight for s in sources], recipe.seed) if sources else None
        self.recipe, self.rank, self.world = recipe, rank, world
        self.micro, self.accum = recipe.batch.micro, recipe.batch.accum
        self.mlm = recipe.model.arch == "bert"
        self._perms: dict[tuple[int, int], np.ndarray | Shuffle] = {}
        if self.mlm:
            tok = self.tokenizer
            self.special = torch.tensor(sorted({tok.cls_token_id, tok.sep_token_id, tok.pad_token_id}))

    @property
    def train(self):
        """The training sequences of a single corpus."""
        (train,) = self.sources
        return train

    def _order(self, source: int, epoch: int) -> np.ndarray | Shuffle:
        if (source, epoch) not in self._perms:  # one epoch's kept per corpus
            self._perms = {key: v for key, v in self._perms.items() if key[0] != source}
            seed, n = [self.recipe.seed, epoch] + ([source] if self.mixture else []), len(self.sources[source])
            self._perms[source, epoch] = np.random.default_rng(seed).permutation(n) if n <= PERMUTATION_MAX \
                else Shuffle(n, seed)
        return self._perms[source, epoch]

    def _sample(self, k: int) -> np.ndarray:
        source, j = self.mixture.locate(k) if self.mixture else (0, k)
        n = len(self.sources[source])
        return self.sources[source][[int(self._order(source, j // n)[j % n])]]

    def train_batch(self, step: int, micro_step: int) -> dict:
        """The batch of (1-based) optimizer step `step`, micro step `micro_step`, on this rank."""
        first = (step - 1) * self.micro * self.accum * self.world + (micro_step * self.world + self.rank) * self.micro
        ids = torch.from_numpy(np.concatenate([self._sample(k) for k in range(first, first + self.micro)]))
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
