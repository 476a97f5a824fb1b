"""Lazy safetensors reading and streaming writing, so that growth holds one parameter at a
time: the header is written from the plan, then each tensor's bytes as it is grown."""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open

DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
          torch.uint8: "U8", torch.bool: "BOOL"}


class Weights:
    """name -> tensor, with every shape and dtype known up front."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self._state = state
        self.shapes = {k: tuple(v.shape) for k, v in state.items()}
        self.dtypes = {k: v.dtype for k, v in state.items()}

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._state[name]


class LazyWeights(Weights):
    """Over safetensors files: tensors are read (memory-mapped) when asked for."""

    def __init__(self, files: list[Path]):
        handles = [safe_open(str(f), framework="pt") for f in files]
        self._where = {name: h for h in handles for name in h.keys()}
        slices = {name: h.get_slice(name) for name, h in self._where.items()}
        by_code = {code: dtype for dtype, code in DTYPES.items()}
        self.shapes = {name: tuple(s.get_shape()) for name, s in slices.items()}
        self.dtypes = {name: by_code[s.get_dtype()] for name, s in slices.items()}

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._where[name].get_tensor(name)


def write_streaming(path: Path, plan: list[tuple[str, tuple, torch.dtype]],
                    tensors: Iterable[tuple[str, torch.Tensor]], metadata: dict | None = None) -> None:
    """Write a safetensors file whose tensors arrive one at a time, in the plan's order."""
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, shape, dtype in plan:
        size = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        header[name] = {"dtype": DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    items: Iterator = iter(tensors)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dtype in plan:
            got_name, tensor = next(items)
            if (got_name, tuple(tensor.shape), tensor.dtype) != (name, tuple(shape), dtype):
                raise RuntimeError(f"streaming write out of plan: got {got_name} {tuple(tensor.shape)} "
                                   f"{tensor.dtype}, planned {name} {shape} {dtype}")
            f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
        if next(items, None) is not None:
            raise RuntimeError("streaming write: more tensors than planned")
