"""Megatron-core's indexed dataset format (megatron/core/datasets/indexed_dataset.py), written and
read here without importing megatron-core (4.5 s and a page of warnings in every rank and every
preparation worker: `python -X importtime -c "import megatron.core.datasets.indexed_dataset"`);
tests/test_data.py checks that megatron-core's IndexedDataset reads what we write and that we
read what its IndexedDatasetBuilder writes.

PREFIX.bin holds the tokens of every sequence back to back; PREFIX.idx a header (magic, version 1,
the dtype's code, the counts), each sequence's length (int32) and byte offset (int64), and the
document boundaries (int64, in sequences). We write one sequence per document, each ending in the
separator, as Megatron-LM's tools/preprocess_data.py does with --append-eod, so a prepared split
is a corpus Megatron-LM trains on, and a corpus it prepared is one we read: a split's documents,
joined, are cut into the recipe's blocks (Blocks) when read; the reader holds a few numbers per
group of documents, never per token or per document.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

HEADER = b"MMIDIDX\x00\x00"
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
          8: np.uint16}  # megatron-core's DType codes
CODES = {np.dtype(t): code for code, t in DTYPES.items()}


class IndexedError(ValueError):
    """A .bin/.idx pair that is missing, partial or not this format."""


def token_dtype(vocab_size: int):
    """The smallest dtype Megatron chooses for a vocabulary (DType.optimal_dtype)."""
    return np.uint16 if vocab_size < 65500 else np.int32


def write(prefix: Path, documents, dtype) -> int:
    """Write `documents` (arrays of token ids) as PREFIX.bin and PREFIX.idx, one sequence per
    document; the number of tokens. Both are written under temporary names and renamed, the .idx
    last, their data on disk first: a PREFIX.idx exists only beside its complete PREFIX.bin."""
    prefix = Path(prefix)
    tmp = [prefix.with_name(f".{prefix.name}{suffix}.tmp-{os.getpid()}") for suffix in (".bin", ".idx")]
    dtype = np.dtype(dtype)
    lengths = []
    try:
        with open(tmp[0], "wb") as f:
            for doc in documents:
                f.write(np.asarray(doc, dtype).tobytes())
                lengths.append(len(doc))
            f.flush()
            os.fsync(f.fileno())
        lengths = np.asarray(lengths, np.int32)
        pointers = np.zeros(len(lengths), np.int64)
        np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
        with open(tmp[1], "wb") as f:
            f.write(HEADER + struct.pack("<QBQQ", 1, CODES[dtype], len(lengths), len(lengths) + 1))
            f.write(lengths.tobytes() + (pointers * dtype.itemsize).tobytes())
            f.write(np.arange(len(lengths) + 1, dtype=np.int64).tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp[0], f"{prefix}.bin")
        os.replace(tmp[1], f"{prefix}.idx")
    finally:
        for t in tmp:
            t.unlink(missing_ok=True)
    return int(lengths.sum())


def read(prefix: Path) -> tuple[np.ndarray, np.ndarray]:
    """PREFIX's tokens and its sequences' lengths, memory-mapped. Checked against each other: an
    IndexedError for a missing, truncated or foreign pair."""
    idx, bin_ = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    for path in (idx, bin_):
        if not path.is_file():
            raise IndexedError(f"{path}: no such file")
    with open(idx, "rb") as f:
        head = f.read(34)
    if len(head) < 34 or head[:9] != HEADER:
        raise IndexedError(f"{idx}: not a megatron-core indexed dataset index (no MMIDIDX header)")
    version, code, sequences, _documents = struct.unpack("<QBQQ", head[9:])
    if version != 1 or code not in DTYPES:
        raise IndexedError(f"{idx}: version {version}, dtype code {code}: not a format this reads")
    dtype = np.dtype(DTYPES[code])
    if idx.stat().st_size < 34 + 12 * sequences:
        raise IndexedError(f"{idx}: truncated ({idx.stat().st_size} bytes for {sequences} sequences)")
    lengths = np.memmap(idx, np.int32, mode="r", offset=34, shape=(sequences,)) if sequences else np.zeros(0, np.int32)
    tokens = int(lengths.sum(dtype=np.int64))
    if bin_.stat().st_size != tokens * dtype.itemsize:
        raise IndexedError(f"{bin_}: {bin_.stat().st_size} bytes, but {idx.name} indexes {tokens} tokens of "
                           f"{dtype.itemsize} bytes: partial or not its pair")
    return (np.memmap(bin_, dtype, mode="r") if tokens else np.zeros(0, dtype)), lengths


class Blocks:
    """The sequences of seq_len tokens cut from indexed datasets (shards, in order): consecutive
    windows (causal LM), or [CLS] + seq_len - 2 tokens + [SEP] (BERT: `cls` and `sep` given), cut
    within each group of `group` consecutive documents of a shard, its remainder dropped. Holds
    an open file per shard and three numbers per group; a sequence is read with pread, through
    the page cache but not mapped into this process, so that a rank's RSS stays the same however
    much of the corpus it has read (a memory map's pages count in it as they are read:
    docs/benchmarks.md)."""

    def __init__(self, prefixes: list[Path], group: int, seq_len: int, cls: int | None = None,
                 sep: int | None = None):
        self.seq_len, self.ends = seq_len, None if cls is None else (cls, sep)
        self.body = seq_len if cls is None else seq_len - 2
        self.files, shard, start, count = [], [], [], []
        for i, prefix in enumerate(prefixes):
            tokens, lengths = read(prefix)
            self.files.append((os.open(f"{prefix}.bin", os.O_RDONLY), tokens.dtype))
            if len(lengths):
                tokens_in = np.add.reduceat(lengths, np.arange(0, len(lengths), group), dtype=np.int64)
                shard.append(np.full(len(tokens_in), i))
                start.append(np.cumsum(tokens_in) - tokens_in)
                count.append(tokens_in // self.body)
        self.group_shard, self.group_start = (np.concatenate(a) if a else np.zeros(0, np.int64) for a in (shard, start))
        self.first_block = np.concatenate([[0], *count]).cumsum()  # of each group, and the end

    def __len__(self) -> int:
        return int(self.first_block[-1])

    def __del__(self):
        for fd, _ in getattr(self, "files", []):
            os.close(fd)

    def __getitem__(self, rows) -> np.ndarray:
        """The sequences at `rows` (indices, or a slice) as an int64 array [len(rows), seq_len]."""
        rows = range(*rows.indices(len(self))) if isinstance(rows, slice) else rows
        out = np.empty((len(rows), self.seq_len), np.int64)
        for i, row in enumerate(rows):
            if not 0 <= row < len(self):
                raise IndexError(f"sequence {row} of {len(self)}")
            g = int(np.searchsorted(self.first_block, row, side="right")) - 1
            begin = int(self.group_start[g]) + (row - int(self.first_block[g])) * self.body
            fd, dtype = self.files[self.group_shard[g]]
            body = np.frombuffer(os.pread(fd, self.body * dtype.itemsize, begin * dtype.itemsize), dtype)
            if self.ends is None:
                out[i] = body
            else:
                out[i, 0], out[i, 1:-1], out[i, -1] = self.ends[0], body, self.ends[1]
        return out
