"""megatron-core's `torch_dist` checkpoint format, read and written chunk by chunk.

A `torch_dist` checkpoint is a PyTorch Distributed Checkpoint (DCP) directory: `.metadata`
(for every tensor key its global shape and the chunks it was saved in), `__<rank>_<n>.distcp`
data files (each chunk a `torch.save`d tensor at a byte offset), plus megatron-core's own
`metadata.json` (the backend) and `common.pt` (non-tensor state). megatron-core loads any
region of a tensor from the chunks that overlap it, which is why such a checkpoint loads at
another tensor-parallel degree.

Reading: `.metadata` is a pickle, so it is read by an unpickler that knows only DCP's metadata
classes, torch sizes and dtypes (nothing from the file runs); each chunk is a tensor read with
`torch.load(weights_only=True)` from its byte range. `read(key, offsets, sizes)` assembles one
region from the chunks that overlap it, so a reader holds a region, never the whole tensor.

Writing: `save(path, chunks)` hands DCP a plan of (key, global shape, offsets, sizes) chunks and
computes each chunk's tensor only when the writer asks for it. Under torch.distributed every
rank calls it with its own chunks (DCP's collective plan); without, one process writes them all.
"""

from __future__ import annotations

import dataclasses
import io
import json
import pickle
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import GrowthError

BACKEND = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
           "common_backend": "torch", "common_backend_version": 1}


def is_dist_checkpoint(path: str | Path) -> bool:
    path = Path(path)
    if not (path / "metadata.json").is_file():
        return False
    try:
        return json.loads((path / "metadata.json").read_text()).get("sharded_backend") == "torch_dist"
    except (ValueError, AttributeError):  # not JSON, not UTF-8, not an object
        return False


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's `.metadata` without running code: only its own dataclasses and torch's value types."""

    def find_class(self, module, name):
        if module == "torch.distributed.checkpoint.metadata" or \
                (module, name) in {("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
                                   ("torch", "Size"), ("torch._utils", "_get_layout"),
                                   ("torch.serialization", "_get_layout"),
                                   ("collections", "OrderedDict"), ("pathlib", "PosixPath"),
                                   ("pathlib", "WindowsPath"), ("pathlib", "Path")} or \
                (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not a checkpoint metadata class")


def _ints(values) -> bool:
    return all(isinstance(v, int) for v in values)


class DistCheckpoint:
    """One torch_dist directory: tensor shapes, chunks, and region reads."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not is_dist_checkpoint(self.path):
            raise GrowthError(f"{self.path}: not a megatron-core torch_dist checkpoint (no metadata.json "
                              "naming the torch_dist backend)")
        try:
            with open(self.path / ".metadata", "rb") as f:
                meta = _MetadataUnpickler(f).load()
        except FileNotFoundError:
            raise GrowthError(f"{self.path}: .metadata is missing: partial checkpoint") from None
        except pickle.UnpicklingError as err:
            raise GrowthError(f"{self.path / '.metadata'}: refusing to load: {err}") from None
        except (EOFError, ValueError, AttributeError, TypeError) as err:
            raise GrowthError(f"{self.path / '.metadata'}: corrupt ({err})") from None
        try:  # a pickle of the right classes may still hold the wrong fields
            self.tensors = {key: md for key, md in meta.state_dict_metadata.items() if hasattr(md, "chunks")}
            self.storage = {(index.fqn, tuple(index.offset)): info for index, info in meta.storage_data.items()}
            self.save_id = getattr(meta.storage_meta, "save_id", None)
            for key, md in self.tensors.items():
                dims = len(md.size)
                if not (_ints(md.size) and isinstance(md.properties.dtype, torch.dtype) and all(
                        len(c.offsets) == len(c.sizes) == dims and _ints(c.offsets) and _ints(c.sizes)
                        for c in md.chunks)):
                    raise GrowthError(f"{self.path / '.metadata'}: corrupt ({key}: its shape, dtype or chunks)")
            for (key, _), info in self.storage.items():
                if not (isinstance(info.relative_path, str) and _ints((info.offset, info.length))):
                    raise GrowthError(f"{self.path / '.metadata'}: corrupt ({key}: its data file or byte range)")
        except (AttributeError, TypeError) as err:  # a field missing, or not what it should be
            raise GrowthError(f"{self.path / '.metadata'}: corrupt ({err})") from None
        for key, md in self.tensors.items():
            for chunk in md.chunks:
                info = self.storage.get((key, tuple(chunk.offsets)))
                if info is None:
                    raise GrowthError(f"{self.path}: {key} chunk at {tuple(chunk.offsets)} has no data entry: "
                                      "corrupt metadata")
                file = self.path / info.relative_path
                if not file.is_file():
                    raise GrowthError(f"{file} is missing: partial checkpoint (a rank's data file)")
                if file.stat().st_size < info.offset + info.length:
                    raise GrowthError(f"{file} is truncated: {key} needs bytes up to "
                                      f"{info.offset + info.length}, the file has {file.stat().st_size}")

    def shape(self, key: str) -> tuple:
        if key not in self.tensors:
            raise GrowthError(f"{self.path}: no tensor {key!r} in the checkpoint")
        return tuple(self.tensors[key].size)

    def chunk_offsets(self, key: str, dim: int) -> list[int]:
        """The offsets along `dim` at which the key's chunks start (its saved sharding)."""
        return sorted({c.offsets[dim] for c in self.tensors[key].chunks})

    def _chunk(self, key: str, offsets: tuple) -> torch.Tensor:
        info = self.storage[(key, offsets)]
        if info.transform_descriptors:
            raise GrowthError(f"{self.path}: {key} is stored with transforms {info.transform_descriptors}: "
                              "compressed checkpoints are not supported")
        with open(self.path / info.relative_path, "rb") as f:
            f.seek(info.offset)
            data = f.read(info.length)
        try:
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError) as err:
            raise GrowthError(f"{self.path / info.relative_path}: {key} chunk at {offsets} is corrupt "
                              f"({str(err).splitlines()[0][:200]})") from None

    def read(self, key: str, offsets: tuple | None = None, sizes: tuple | None = None) -> torch.Tensor:
        """The region [offsets, offsets + sizes) of a tensor (default: all of it), from the
        chunks that overlap it."""
        md = self.tensors.get(key)
        if md is None:
            raise GrowthError(f"{self.path}: no tensor {key!r} in the checkpoint")
        full = tuple(md.size)
        offsets = tuple(offsets or (0,) * len(full))
        sizes = tuple(sizes or full)
        exact = [c for c in md.chunks if tuple(c.offsets) == offsets and tuple(c.sizes) == sizes]
        if exact:  # the region is one saved chunk (reading at the saved sharding): no assembly copy
            return self._chunk(key, offsets)
        out = torch.empty(sizes, dtype=md.properties.dtype)
        covered = 0
        for chunk in md.chunks:
            lo = [max(o, c) for o, c in zip(offsets, chunk.offsets)]
            hi = [min(o + s, c + n) for o, s, c, n in zip(offsets, sizes, chunk.offsets, chunk.sizes)]
            if any(a >= b for a, b in zip(lo, hi)):
                continue
            data = self._chunk(key, tuple(chunk.offsets))
            src, dst = data, out
            for dim, (a, b) in enumerate(zip(lo, hi)):
                src = src.narrow(dim, a - chunk.offsets[dim], b - a)
                dst = dst.narrow(dim, a - offsets[dim], b - a)
            dst.copy_(src)
            covered += dst.numel()
            del data
        if covered != out.numel():
            raise GrowthError(f"{self.path}: {key} region {offsets}+{sizes} is not covered by its chunks: "
                              "partial checkpoint")
        return out


@dataclasses.dataclass(frozen=True)
class Chunk:
    """One piece of a global tensor to write: computed by `make` when the writer needs it."""
    key: str
    global_shape: tuple
    offsets: tuple
    sizes: tuple
    dtype: torch.dtype
    make: Callable[[], torch.Tensor]


def _planner(chunks: list[Chunk]):
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
    from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

    class ChunkPlanner(DefaultSavePlanner):
        def __init__(self):
            super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
            self.by_index = {(c.key, tuple(c.offsets)): c for c in chunks}

        def create_local_plan(self):
            self.plan = SavePlan([
                WriteItem(index=MetadataIndex(c.key, torch.Size(c.offsets)), type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(
                              chunk=ChunkStorageMetadata(torch.Size(c.offsets), torch.Size(c.sizes)),
                              properties=TensorProperties(dtype=c.dtype), size=torch.Size(c.global_shape)))
                for c in chunks])
            return self.plan

        def resolve_data(self, write_item):
            c = self.by_index[(write_item.index.fqn, tuple(write_item.index.offset))]
            tensor = c.make()
            if tuple(tensor.shape) != tuple(c.sizes) or tensor.dtype != c.dtype:
                raise GrowthError(f"{c.key} chunk at {c.offsets}: made {tuple(tensor.shape)} {tensor.dtype}, "
                                  f"planned {tuple(c.sizes)} {c.dtype}")
            return tensor.contiguous()

    return ChunkPlanner()


def save(path: str | Path, chunks: list[Chunk]) -> None:
    """Write `chunks` as a torch_dist checkpoint into the existing directory `path`."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    distributed = dist.is_available() and dist.is_initialized()
    from torch.distributed.checkpoint.api import CheckpointException
    try:
        with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.save({}, storage_writer=dcp.FileSystemWriter(str(path), thread_count=1), planner=_planner(chunks),
                     no_dist=not distributed)
    except CheckpointException as err:  # DCP wraps what a chunk's make() raised: pass on our own errors
        for failure in err.failures.values():  # (exception, traceback) per rank
            exc = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(exc, GrowthError):
                raise GrowthError(str(exc)) from None
        raise
    if not distributed or dist.get_rank() == 0:
        torch.save({}, Path(path) / "common.pt")
        (Path(path) / "metadata.json").write_text(json.dumps(BACKEND))
