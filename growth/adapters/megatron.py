"""megatron-core GPT checkpoints: grow them tensor-parallel shard by shard, and convert to and
from HF GPT-2.

Sources: a `torch_dist` checkpoint (growth/adapters/dist_checkpoint.py; `b2b train` writes one in
every checkpoint tag as TAG/dist, `b2b convert` and `b2b grow` write them) or Megatron-LM's legacy
layout (iter_XXXXXXX/mp_rank_XX/model_optim_rng.pt, one file per tensor-parallel rank, read with
weights_only=True). Either needs the model's GPT-2 config.json beside it (a torch_dist directory
holds it; for the legacy layout: the checkpoint root), as `b2b train` and `b2b convert` write.

Shard-local growth at tensor-parallel degree T (default: the degree the source was saved at):
the heads and FFN units grow within each of the T shards (growth.maps.prefix_map(..., shards)),
so target shard r is computed from source shard r alone: column-parallel weights (fused QKV,
grown per head, and linear_fc1) copy units of their own shard, row-parallel ones (linear_proj,
linear_fc2) divide by copy counts that the shard knows. The hidden size is not sharded and grows
the same on every shard. Nothing gathers a full tensor-parallel tensor; memory follows one shard.
The output is a torch_dist checkpoint whose chunks are the grown shards; megatron-core loads it
at any TP degree that divides the heads, FFN and padded vocabulary.

Layout facts (docs/tensor-parallel.md): ColumnParallelLinear [out/T, in], RowParallelLinear
[out, in/T], VocabParallelEmbedding [V_pad/T, h]; the fused QKV rows are [head, (q, k, v), dim];
torch_dist keys stack the layers on a leading axis and name the layer norms after the TE-fused
linear they feed (input_layernorm -> self_attention.linear_qkv.layer_norm_weight).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..errors import GrowthError
from ..grow import Grower, check_source
from ..schema import MCORE_GPT
from ..shape import shape_from_config
from . import dist_checkpoint
from .dist_checkpoint import Chunk, DistCheckpoint
from .files import (
    atomic_directory,
    copy_side_files,
    dump_manifest,
    free_output,
    load_torch,
    read_json,
    target_config,
    target_shape,
)

VOCAB_MULTIPLE = 128  # megatron pads the vocabulary; 128 is divisible by every TP degree up to 128
LAYERS = "decoder.layers."
FUSED_NORMS = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_",
               "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}


def padded_vocab(vocab: int) -> int:
    return -(-vocab // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def sharded_key(name: str) -> tuple[str, int | None]:
    """Module name -> (torch_dist key, layer): 'decoder.layers.3.input_layernorm.weight' ->
    ('decoder.layers.self_attention.linear_qkv.layer_norm_weight', 3)."""
    m = re.match(re.escape(LAYERS) + r"(\d+)\.(.*)$", name)
    if not m:
        return name, None
    rest = m.group(2)
    for module, fused in FUSED_NORMS.items():
        if rest.startswith(module):
            rest = fused + rest[len(module):]
    return LAYERS + rest, int(m.group(1))


def module_name(key: str, layer: int | None) -> str:
    if layer is None:
        return key
    rest = key[len(LAYERS):]
    for module, fused in FUSED_NORMS.items():
        if rest.startswith(fused):
            rest = module + rest[len(fused):]
    return f"{LAYERS}{layer}.{rest}"


# -- HF GPT-2 <-> megatron-core GPT ------------------------------------------------------------

# megatron module name -> HF GPT2LMHeadModel name ({L}: the layer); HF's Conv1D weights are [in, out]
HF_NAMES = {
    "embedding.word_embeddings.weight": "transformer.wte.weight",
    "embedding.position_embeddings.weight": "transformer.wpe.weight",
    "decoder.final_layernorm.weight": "transformer.ln_f.weight",
    "decoder.final_layernorm.bias": "transformer.ln_f.bias",
    "output_layer.weight": "lm_head.weight",
    **{f"decoder.layers.{{L}}.{m}.{p}": f"transformer.h.{{L}}.{h}.{p}" for m, h in [
        ("input_layernorm", "ln_1"), ("self_attention.linear_qkv", "attn.c_attn"),
        ("self_attention.linear_proj", "attn.c_proj"), ("pre_mlp_layernorm", "ln_2"),
        ("mlp.linear_fc1", "mlp.c_fc"), ("mlp.linear_fc2", "mlp.c_proj")] for p in ("weight", "bias")},
}
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
VOCAB_ROWS = ("embedding.word_embeddings.weight", "output_layer.weight")


def _template(name: str) -> tuple[str, str | None]:
    m = re.search(r"\.(\d+)\.", name)
    return (name[:m.start()] + ".{L}." + name[m.end():], m.group(1)) if m else (name, None)


def _qkv_rows(w: torch.Tensor, heads: int, to_head_major: bool) -> torch.Tensor:
    """[q; k; v] rows (HF, each head-major) <-> megatron's [head, (q, k, v), dim] rows."""
    rest = w.shape[1:]
    if to_head_major:
        return w.reshape(3, heads, -1, *rest).transpose(0, 1).reshape(w.shape)
    return w.reshape(heads, 3, -1, *rest).transpose(0, 1).reshape(w.shape)


def hf_to_mcore(hf: dict[str, torch.Tensor], heads: int, vocab_rows: int, tied: bool = True) -> dict[str, torch.Tensor]:
    """An HF GPT2LMHeadModel state dict -> megatron-core GPTModel's (full, unsharded tensors), the
    vocabulary padded with zero rows to `vocab_rows` (padded_vocab); a tied lm_head is dropped."""
    to_hf = {hf_name: m for m, hf_name in HF_NAMES.items()}
    out = {}
    for name, w in hf.items():
        if tied and name == "lm_head.weight":
            continue
        template, layer = _template(name)
        if template not in to_hf:
            if template.endswith(("attn.bias", "attn.masked_bias")):
                continue  # old GPT-2 files' mask buffers
            raise GrowthError(f"{name}: not a GPT2LMHeadModel parameter")
        target = to_hf[template].replace("{L}", layer or "")
        w = w.t() if template.endswith(CONV1D) else w
        if target.endswith("linear_qkv.weight") or target.endswith("linear_qkv.bias"):
            w = _qkv_rows(w, heads, to_head_major=True)
        if target in VOCAB_ROWS:
            w = torch.cat([w, w.new_zeros(vocab_rows - w.shape[0], *w.shape[1:])])
        out[target] = w.contiguous()
    return out


def mcore_to_hf(state: dict[str, torch.Tensor], heads: int, vocab: int) -> dict[str, torch.Tensor]:
    """megatron-core GPTModel's full state dict -> HF GPT2LMHeadModel's (padding rows dropped)."""
    out = {}
    for name, w in state.items():
        template, layer = _template(name)
        if template not in HF_NAMES:
            if name.endswith("_extra_state"):
                continue
            raise GrowthError(f"{name}: not a megatron-core GPT parameter this converter knows")
        target = HF_NAMES[template].replace("{L}", layer or "")
        if name in VOCAB_ROWS:
            w = w[:vocab]
        if "linear_qkv" in name:
            w = _qkv_rows(w, heads, to_head_major=False)
        out[target] = (w.t() if target.endswith(CONV1D) else w).contiguous()
    return out


# -- reading a source, one tensor-parallel shard at a time -------------------------------------

def tensor_region(shape: tuple, layer: int | None, tp_dim: int | None, shard: int | None, shards: int) -> tuple:
    """(offsets, sizes) in a torch_dist tensor of `shape` of one module tensor: layer `layer` of the
    stacked layer axis (None: not a layer tensor), and of its tensor-parallel axis `tp_dim` (the
    module tensor's axis; None: not sharded) shard `shard` of `shards` (None: all of it)."""
    pre = 0 if layer is None else 1
    offsets, sizes = [0] * len(shape), list(shape)
    if shard is not None and tp_dim is not None:
        dim = tp_dim + pre
        if shape[dim] % shards:
            raise GrowthError(f"tensor-parallel degree {shards} does not divide axis {dim} of size {shape[dim]}")
        sizes[dim] = shape[dim] // shards
        offsets[dim] = shard * sizes[dim]
    if layer is not None:
        offsets[0], sizes[0] = layer, 1
    return tuple(offsets), tuple(sizes)


class DistSource:
    """A torch_dist checkpoint, by megatron module name."""

    def __init__(self, path: Path):
        self.ckpt = DistCheckpoint(path)
        self.path, self.config_dir = path, path
        self.shapes, self.dtypes = {}, {}
        for key, md in self.ckpt.tensors.items():
            layers = md.size[0] if key.startswith(LAYERS) else None
            for layer in range(layers) if layers is not None else [None]:
                name = module_name(key, layer)
                self.shapes[name] = tuple(md.size[1:] if layers is not None else md.size)
                self.dtypes[name] = md.properties.dtype
        fc1 = LAYERS + "mlp.linear_fc1.weight"
        self.tp = len(self.ckpt.chunk_offsets(fc1, 1)) if fc1 in self.ckpt.tensors else 1
        self.format = f"megatron-core torch_dist (saved at TP {self.tp})"

    def get(self, name: str, shard: int | None, shards: int) -> torch.Tensor:
        key, layer = sharded_key(name)
        param = MCORE_GPT.lookup(name)
        region = self.ckpt.read(key, *tensor_region(self.ckpt.shape(key), layer, param.tp, shard, shards))
        return region[0] if layer is not None else region


class LegacySource:
    """Megatron-LM's legacy layout: one model_optim_rng.pt per tensor-parallel rank."""

    def __init__(self, path: Path):
        latest = path / "latest_checkpointed_iteration.txt"
        root = path
        if latest.is_file():
            it = latest.read_text().strip()
            path = path / ("release" if it == "release" else f"iter_{int(it):07d}")
        elif path.name.startswith("iter_") or path.name == "release":
            root = path.parent
        self.path, self.config_dir = path, next((d for d in (path, root) if (d / "config.json").is_file()), path)
        ranks = sorted(path.glob("mp_rank_*"))
        if not ranks:
            raise GrowthError(f"{path}: no mp_rank_XX directories: not a Megatron-LM checkpoint")
        self.tp = len(ranks)
        self.files = [path / (f"mp_rank_{r:02d}" if (path / f"mp_rank_{r:02d}").is_dir() else f"mp_rank_{r:02d}_000")
                      / "model_optim_rng.pt" for r in range(self.tp)]
        for r, file in enumerate(self.files):
            if not file.is_file():
                raise GrowthError(f"{file} is missing: tensor-parallel rank {r} of {self.tp}")
        self.models = [self._load(file) for file in self.files]
        iterations = {m.get("iteration") for m, _ in self.models}
        if len(iterations) > 1:
            raise GrowthError(f"{path}: the rank files come from different saves (iterations {sorted(iterations)})")
        self.shapes, self.dtypes = {}, {}
        for name, w in self.models[0][1].items():
            if name.endswith("_extra_state") or not torch.is_tensor(w):
                continue
            param = MCORE_GPT.lookup(name)
            shape = list(w.shape)
            if param is not None and param.tp is not None:
                shape[param.tp] *= self.tp
            self.shapes[name], self.dtypes[name] = tuple(shape), w.dtype
        self.format = f"Megatron-LM legacy (TP {self.tp})"

    @staticmethod
    def _load(file: Path) -> tuple[dict, dict]:
        import argparse
        state = load_torch(file, [argparse.Namespace], what="checkpoint file")
        if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
            raise GrowthError(f"{file}: no 'model' state dict (pipeline-parallel or virtual-pipeline checkpoints "
                              "are not supported)")
        return state, state["model"]

    def get(self, name: str, shard: int | None, shards: int) -> torch.Tensor:
        param = MCORE_GPT.lookup(name)
        if param.tp is None:
            return self.models[0][1][name]
        if shard is None:
            return torch.cat([m[name] for _, m in self.models], dim=param.tp)
        if shards != self.tp:
            raise GrowthError(f"a legacy checkpoint grows at its saved TP degree ({self.tp}), not {shards}")
        return self.models[shard][1][name]


def open_source(path: str | Path):
    """A megatron source: a torch_dist directory (or a b2b train tag holding one as dist/), or a
    Megatron-LM legacy checkpoint; None if `path` is neither."""
    path = Path(path)
    if dist_checkpoint.is_dist_checkpoint(path / "dist"):
        path = path / "dist"
    if dist_checkpoint.is_dist_checkpoint(path):
        return DistSource(path)
    if (path / "latest_checkpointed_iteration.txt").is_file() or any(path.glob("mp_rank_*/model_optim_rng.pt")) \
            or any(path.glob("mp_rank_*_000/model_optim_rng.pt")):
        return LegacySource(path)
    return None


def source_config(source) -> dict:
    file = source.config_dir / "config.json"
    if not file.is_file():
        raise GrowthError(f"{source.path}: no config.json beside the checkpoint: write the model's GPT-2 config "
                          "there (b2b train and b2b convert do) so that its heads and vocabulary are known")
    cfg = read_json(file, "config")
    if cfg.get("model_type") != "gpt2":
        raise GrowthError(f"{file}: model_type {cfg.get('model_type')!r}; megatron-core checkpoints are grown "
                          "as GPT (model_type gpt2)")
    return cfg


# -- growth --------------------------------------------------------------------------------------

def grow_checkpoint(src: str | Path, out: str | Path, to: str, tp: int | None = None, overwrite: bool = False,
                    log=print, **options) -> dict:
    """`b2b grow` of a megatron-core checkpoint: shard-local growth into a torch_dist checkpoint
    (`options`: the Grower's width, depth, seed, symmetry, noise_db, insert)."""
    out = free_output(out, overwrite)
    source = open_source(src)
    if source is None:
        raise GrowthError(f"{src}: not a megatron-core torch_dist or Megatron-LM legacy checkpoint")
    cfg = source_config(source)
    shape = shape_from_config(cfg)
    target = target_shape(to, shape)
    tp = tp or source.tp
    rows = source.shapes.get("embedding.word_embeddings.weight", (0,))[0]
    for what, n in [("source heads", shape.heads), ("target heads", target.heads), ("source FFN", shape.ffn),
                    ("target FFN", target.ffn), ("padded vocabulary", rows)]:
        if n % tp:
            raise GrowthError(f"tensor-parallel degree {tp} does not divide the {what} ({n}); "
                              f"choose --tp (or a target) so that every shard holds whole units")
    check_source(source.shapes, MCORE_GPT, shape)
    tied = "output_layer.weight" not in source.shapes
    grower = Grower(MCORE_GPT, shape, target, tied=tied, init_std=float(cfg.get("initializer_range", 0.02)),
                    shards=tp, **options)
    manifest = {"source": str(source.path), "source_format": source.format, "tensor_parallel_growth": tp,
                **grower.manifest(),
                "format": "megatron-core torch_dist: load with megatron.core.dist_checkpointing.load at any TP "
                          "degree dividing the heads, FFN and padded vocabulary"}
    log(f"growing megatron-core GPT {shape} -> {target} from {source.format}, shard-local at TP {tp} "
        f"({grower.describe()})")

    copies: dict[str, list] = {}  # source name -> its (target name, target shape), stacked copies together
    for target_name, name, tshape in grower.plan(source.shapes):
        copies.setdefault(name, []).append((target_name, tshape))
    chunks = []  # in an order where a source shard's stacked copies follow each other (Grower.grow reuses it)
    for name, targets in copies.items():
        param = MCORE_GPT.lookup(name)
        for shard in range(tp) if param.tp is not None else [None]:
            for target_name, tshape in targets:
                key, layer = sharded_key(target_name)
                gshape = tshape if layer is None else (target.layers, *tshape)
                offsets, sizes = tensor_region(gshape, layer, param.tp, shard, tp)

                def make(target_name=target_name, shard=shard, sizes=sizes):
                    return grower.grow(target_name, lambda n: source.get(n, shard, tp), shard=shard).reshape(sizes)
                chunks.append(Chunk(key, gshape, offsets, sizes, source.dtypes[name], make))

    with atomic_directory(out) as tmp:
        dist_checkpoint.save(tmp, chunks)
        copy_side_files(source.config_dir, tmp, target_config(cfg, target))
        (tmp / "growth.json").write_text(dump_manifest(manifest))
    log(f"wrote {out}")
    return manifest


# -- conversion ----------------------------------------------------------------------------------

def hf_weights(source) -> tuple[dict, dict[str, torch.Tensor]]:
    """A megatron source as an HF GPT2LMHeadModel: its config and its full (gathered) state dict."""
    cfg = source_config(source)
    full = {name: source.get(name, None, 1) for name in source.shapes if MCORE_GPT.lookup(name)}
    hf_cfg = {k: v for k, v in cfg.items() if k != "padded_vocab_size"}
    hf_cfg["architectures"] = ["GPT2LMHeadModel"]
    return hf_cfg, mcore_to_hf(full, cfg["n_head"], cfg["vocab_size"])


def convert(src: str | Path, out: str | Path, overwrite: bool = False, log=print) -> str:
    """`b2b convert`: HF GPT-2 directory -> megatron-core torch_dist checkpoint, or a megatron
    checkpoint (torch_dist or legacy) -> HF GPT-2 directory. Returns the direction."""
    from .files import open_weights, read_config, resolve, weight_files
    out = free_output(out, overwrite)
    source = open_source(src)
    with atomic_directory(out) as tmp:
        if source is not None:  # megatron -> HF
            hf_cfg, state = hf_weights(source)
            from safetensors.torch import save_file
            save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            copy_side_files(source.config_dir, tmp, hf_cfg)
            direction = f"{source.format} -> HF GPT2LMHeadModel"
        else:  # HF -> megatron
            path = resolve(src)
            cfg = read_config(path)
            if cfg["model_type"] != "gpt2":
                raise GrowthError(f"{path}: b2b convert handles GPT-2 (model_type gpt2), not {cfg['model_type']!r}")
            weights = open_weights(weight_files(path))
            shape = shape_from_config(cfg)
            rows = padded_vocab(cfg["vocab_size"])
            state = hf_to_mcore({n: weights[n] for n in weights.shapes}, shape.heads, rows,
                                tied=bool(cfg.get("tie_word_embeddings", True)))
            check_source({n: tuple(w.shape) for n, w in state.items()}, MCORE_GPT, shape)
            chunks = []
            for name, w in state.items():
                key, layer = sharded_key(name)
                gshape = tuple(w.shape) if layer is None else (shape.layers, *w.shape)
                offsets, sizes = tensor_region(gshape, layer, None, None, 1)
                chunks.append(Chunk(key, gshape, offsets, sizes, w.dtype, lambda w=w, sizes=sizes: w.reshape(sizes)))
            dist_checkpoint.save(tmp, chunks)
            copy_side_files(path, tmp, {**cfg, "padded_vocab_size": rows})
            direction = "HF GPT2LMHeadModel -> megatron-core torch_dist"
    log(f"converted {src} ({direction}) into {out}")
    return direction
