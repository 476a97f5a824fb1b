"""megatron-core GPT checkpoints (GPTModel built as GPT-2 or as the Llama family): grow them
tensor-parallel shard by shard, and convert to and from HF (GPT2LMHeadModel, LlamaForCausalLM,
MistralForCausalLM, Qwen2ForCausalLM).

Sources: a `torch_dist` checkpoint (growth/adapters/dist_checkpoint.py; `b2b train` writes one in
every checkpoint tag as TAG/dist, `b2b convert` and `b2b grow` write them) or Megatron-LM's legacy
layout (iter_XXXXXXX/mp_rank_XX/model_optim_rng.pt, one file per tensor-parallel rank, read with
weights_only=True). Either needs the model's HF config.json beside it (a torch_dist directory
holds it; for the legacy layout: the checkpoint root), as `b2b train` and `b2b convert` write.

Shard-local growth at tensor-parallel degree T (default: the degree the source was saved at):
the query groups (heads, under multi-head attention) and FFN units grow within each of the T
shards (growth.maps.prefix_map(..., shards)), so target shard r is computed from source shard r
alone: column-parallel weights (fused QKV, grown per group, and linear_fc1) copy units of their own
shard, row-parallel ones (linear_proj, linear_fc2) divide by copy counts that the shard knows. The
hidden size is not sharded and grows the same on every shard. Nothing gathers a full
tensor-parallel tensor; memory follows one shard. The output is a torch_dist checkpoint whose
chunks are the grown shards; megatron-core loads it at any TP degree that divides the heads,
query groups, FFN and padded vocabulary.

Layout facts (docs/tensor-parallel.md): ColumnParallelLinear [out/T, in], RowParallelLinear
[out, in/T], VocabParallelEmbedding [V_pad/T, h]; the fused QKV rows are [group, (the group's
query heads, k, v), dim]; SwiGLU's fc1 is [gate; up], rank r holding the r-th block of each half;
torch_dist keys stack the layers on a leading axis and name the layer norms after the TE-fused
linear they feed (input_layernorm -> self_attention.linear_qkv.layer_norm_weight).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..errors import GrowthError
from ..grow import Grower, check_source
from ..schema import MCORE_GPT, MCORE_LLAMA, schema_for
from ..shape import LLAMA_FAMILY, shape_from_config
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


# -- HF GPT-2 / Llama <-> megatron-core GPT -----------------------------------------------------

def _layer_names(pairs: list[tuple[str, str]], params=("weight", "bias")) -> dict[str, tuple[str]]:
    return {f"decoder.layers.{{L}}.{m}.{p}": (f"{hf}.{p}",) for m, hf in pairs for p in params}


# megatron module name -> its HF names ({L}: the layer; several: fused in this order)
H = "transformer.h.{L}"
GPT2_NAMES = {
    "embedding.word_embeddings.weight": ("transformer.wte.weight",),
    "embedding.position_embeddings.weight": ("transformer.wpe.weight",),
    "decoder.final_layernorm.weight": ("transformer.ln_f.weight",),
    "decoder.final_layernorm.bias": ("transformer.ln_f.bias",),
    "output_layer.weight": ("lm_head.weight",),
    **_layer_names([("input_layernorm", f"{H}.ln_1"), ("self_attention.linear_qkv", f"{H}.attn.c_attn"),
                    ("self_attention.linear_proj", f"{H}.attn.c_proj"), ("pre_mlp_layernorm", f"{H}.ln_2"),
                    ("mlp.linear_fc1", f"{H}.mlp.c_fc"), ("mlp.linear_fc2", f"{H}.mlp.c_proj")]),
}
LL = "model.layers.{L}"
LLAMA_NAMES = {  # LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM (q/k/v biases: Qwen2)
    "embedding.word_embeddings.weight": ("model.embed_tokens.weight",),
    "decoder.final_layernorm.weight": ("model.norm.weight",),
    "output_layer.weight": ("lm_head.weight",),
    **_layer_names([("input_layernorm", f"{LL}.input_layernorm"),
                    ("pre_mlp_layernorm", f"{LL}.post_attention_layernorm"),
                    ("self_attention.linear_proj", f"{LL}.self_attn.o_proj"),
                    ("mlp.linear_fc2", f"{LL}.mlp.down_proj")], ("weight",)),
    **{f"decoder.layers.{{L}}.self_attention.linear_qkv.{p}": tuple(f"{LL}.self_attn.{x}_proj.{p}" for x in "qkv")
       for p in ("weight", "bias")},
    "decoder.layers.{L}.mlp.linear_fc1.weight": (f"{LL}.mlp.gate_proj.weight", f"{LL}.mlp.up_proj.weight"),
}
# megatron names of the tensors HF GPT-2 stores transposed (its Conv1D: [in, out])
CONV1D_TARGETS = ("linear_qkv.weight", "linear_proj.weight", "linear_fc1.weight", "linear_fc2.weight")
VOCAB_ROWS = ("embedding.word_embeddings.weight", "output_layer.weight")
IGNORED = ("attn.bias", "attn.masked_bias", "rotary_emb.inv_freq")  # buffers of older HF files


class Layout:
    """How an HF model's tensors map onto megatron-core's GPTModel: its names, heads and query groups
    (megatron's fused QKV rows are [group, (the group's queries, k, v), head_dim]; GPT-2: a group a
    head), and linear_fc1 = [gate; up] for SwiGLU models."""

    def __init__(self, cfg: dict):
        from .files import has_tied_output
        self.model_type = cfg.get("model_type")
        if self.model_type != "gpt2" and self.model_type not in LLAMA_FAMILY:
            raise GrowthError(f"model_type {self.model_type!r}: megatron-core's GPT is built here as GPT-2 or as "
                              f"the Llama family ({', '.join(LLAMA_FAMILY)})")
        shape = shape_from_config(cfg)
        self.llama = self.model_type in LLAMA_FAMILY
        self.names = LLAMA_NAMES if self.llama else GPT2_NAMES
        self.layers, self.heads, self.groups = shape.layers, shape.heads, shape.kv_heads or shape.heads
        self.vocab = cfg["vocab_size"]
        self.tied = has_tied_output(cfg, (cfg.get("architectures") or ["?ForCausalLM"])[0])

    def fuse(self, name: str, parts: list[torch.Tensor]) -> torch.Tensor:
        """HF tensors -> megatron's `name` (full, unsharded)."""
        if name.endswith(CONV1D_TARGETS) and not self.llama:
            parts = [w.t() for w in parts]
        if "linear_qkv" in name:
            q, k, v = parts if self.llama else parts[0].chunk(3)
            rest = q.shape[1:]
            return torch.cat([w.reshape(self.groups, -1, *rest) for w in (q, k, v)], 1).reshape(-1, *rest)
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def split(self, name: str, w: torch.Tensor) -> list[torch.Tensor]:
        """megatron's `name` (full) -> its HF tensors."""
        if "linear_qkv" in name:
            rest, per = w.shape[1:], w.shape[0] // (self.heads + 2 * self.groups)
            q, k, v = (t.reshape(-1, *rest) for t in w.reshape(self.groups, -1, *rest).split(
                [self.heads // self.groups * per, per, per], 1))
            parts = [q, k, v] if self.llama else [torch.cat([q, k, v])]
        else:
            parts = list(w.chunk(2)) if name.endswith("linear_fc1.weight") and self.llama else [w]
        return [t.t() for t in parts] if name.endswith(CONV1D_TARGETS) and not self.llama else parts

    def templates(self):
        """(megatron name, its HF names) of every tensor, layers spelled out."""
        for m, hf in self.names.items():
            for layer in range(self.layers) if "{L}" in m else [None]:
                yield m.replace("{L}", str(layer)), [h.replace("{L}", str(layer)) for h in hf]


def hf_to_mcore(hf: dict[str, torch.Tensor], cfg: dict, vocab_rows: int) -> dict[str, torch.Tensor]:
    """An HF GPT2LMHeadModel / LlamaForCausalLM (Mistral, Qwen2) state dict -> megatron-core GPTModel's
    (full, unsharded tensors), the vocabulary padded with zero rows to `vocab_rows` (padded_vocab); a
    tied lm_head is dropped. `cfg`: the HF config."""
    layout, out, used = Layout(cfg), {}, set()
    for name, parts in layout.templates():
        if name == "output_layer.weight" and layout.tied:
            used.update(parts)
            continue
        present = [p in hf for p in parts]
        if not any(present) and name.endswith(".bias") and layout.llama:
            continue  # Llama and Mistral have no biases; Qwen2 has the q/k/v ones
        if not all(present):
            raise GrowthError(f"{parts[present.index(False)]}: missing from the {layout.model_type} state dict")
        w = layout.fuse(name, [hf[p] for p in parts])
        used.update(parts)
        if name in VOCAB_ROWS:
            if w.shape[0] > vocab_rows:
                raise GrowthError(f"{parts[0]}: {w.shape[0]} rows, more than the padded vocabulary's {vocab_rows}")
            w = torch.cat([w, w.new_zeros(vocab_rows - w.shape[0], *w.shape[1:])])
        out[name] = w.contiguous()
    odd = sorted(n for n in set(hf) - used if not n.endswith(IGNORED))
    if odd:
        raise GrowthError(f"{odd[0]}: not a parameter of {layout.model_type} as megatron-core's GPT builds it")
    return out


def mcore_to_hf(state: dict[str, torch.Tensor], cfg: dict) -> dict[str, torch.Tensor]:
    """megatron-core GPTModel's full state dict -> the HF model's of `cfg` (padding rows dropped)."""
    layout, out = Layout(cfg), {}
    names = dict(layout.templates())
    for name, w in state.items():
        if name not in names:
            if name.endswith("_extra_state"):
                continue
            raise GrowthError(f"{name}: not a megatron-core GPT parameter this converter knows")
        if name in VOCAB_ROWS:
            w = w[:layout.vocab]
        for hf_name, part in zip(names[name], layout.split(name, w)):
            out[hf_name] = part.contiguous()
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


def glu_blocks(shards: list[torch.Tensor], dim: int) -> list[torch.Tensor]:
    """SwiGLU's fc1 from its tensor-parallel shards, rank r's being [gate_r; up_r] along `dim`: the
    blocks in the full tensor's order [gate; up], every rank's gate, then every rank's up."""
    halves = [shard.chunk(2, dim) for shard in shards]
    return [h[0] for h in halves] + [h[1] for h in halves]


def tp_axis(name: str) -> int | None:
    """The tensor-parallel axis of megatron-core tensor `name` (None: replicated). One table for
    GPT-2 and the Llama family: the Llama model's tensors are GPT-2's less its biases and positions,
    each split along the same axis (SwiGLU's fc1 too: its gate and up blocks along axis 0)."""
    param = MCORE_GPT.lookup(name)
    return None if param is None else param.tp


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
        fc2 = LAYERS + "mlp.linear_fc2.weight"  # row-parallel: one chunk a rank (fc1 of SwiGLU has two)
        self.tp = len(self.ckpt.chunk_offsets(fc2, 2)) if fc2 in self.ckpt.tensors else 1
        self.format = f"megatron-core torch_dist (saved at TP {self.tp})"

    def get(self, name: str, shard: int | None, shards: int) -> torch.Tensor:
        key, layer = sharded_key(name)
        region = self.ckpt.read(key, *tensor_region(self.ckpt.shape(key), layer, tp_axis(name), shard, shards))
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
        config = self.config_dir / "config.json"
        self.glu = config.is_file() and read_json(config, "config").get("model_type") in LLAMA_FAMILY  # SwiGLU
        iterations = {m.get("iteration") for m, _ in self.models}
        if len(iterations) > 1:
            raise GrowthError(f"{path}: the rank files come from different saves (iterations {sorted(iterations)})")
        self.shapes, self.dtypes = {}, {}
        for name, w in self.models[0][1].items():
            if name.endswith("_extra_state") or not torch.is_tensor(w):
                continue
            shape, axis = list(w.shape), tp_axis(name)
            if axis is not None:
                shape[axis] *= self.tp
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
        """The full tensor (shard None), or block `shard` of `shards`: a rank's shard, or for
        SwiGLU's fc1 (a rank's file holds [gate_r; up_r]) one half of one (megatron's torch_dist order:
        every rank's gate, then every rank's up)."""
        axis = tp_axis(name)
        if axis is None:
            return self.models[0][1][name]
        glu = self.glu and name.endswith("mlp.linear_fc1.weight")
        parts = [m[name] for _, m in self.models]
        if glu:
            parts = glu_blocks(parts, axis)
        if shard is None:
            return torch.cat(parts, dim=axis)
        if shards != len(parts):
            raise GrowthError(f"a legacy checkpoint grows at its saved TP degree ({self.tp}), "
                              f"not {shards // (1 + glu)}")
        return parts[shard]


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
    """The HF config.json beside a megatron source (GPT-2 or the Llama family)."""
    file = source.config_dir / "config.json"
    if not file.is_file():
        raise GrowthError(f"{source.path}: no config.json beside the checkpoint: write the model's HF config "
                          "there (b2b train and b2b convert do) so that its heads and vocabulary are known")
    cfg = read_json(file, "config")
    Layout(cfg)  # a model megatron-core's GPT is built as here
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
    schema = MCORE_LLAMA if cfg["model_type"] in LLAMA_FAMILY else MCORE_GPT  # source_config checked the family
    shape = shape_from_config(cfg)
    target = target_shape(to, shape)
    tp = tp or source.tp
    rows = source.shapes.get("embedding.word_embeddings.weight", (0,))[0]
    for what, n in [("source heads", shape.heads), ("target heads", target.heads), ("source FFN", shape.ffn),
                    ("target FFN", target.ffn), ("padded vocabulary", rows), ("source query groups", shape.kv_heads),
                    ("target query groups", target.kv_heads)]:
        if n % tp:
            raise GrowthError(f"tensor-parallel degree {tp} does not divide the {what} ({n}); "
                              f"choose --tp (or a target) so that every shard holds whole units")
    check_source(source.shapes, schema, shape)
    tied = "output_layer.weight" not in source.shapes
    grower = Grower(schema, shape, target, tied=tied, init_std=float(cfg.get("initializer_range", 0.02)),
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
        param = schema.lookup(name)
        blocks = grower.shard_count(param)  # tp, or 2 tp for SwiGLU's [gate; up]
        for shard in range(blocks) if param.tp is not None else [None]:
            for target_name, tshape in targets:
                key, layer = sharded_key(target_name)
                gshape = tshape if layer is None else (target.layers, *tshape)
                offsets, sizes = tensor_region(gshape, layer, param.tp, shard, blocks)

                def make(target_name=target_name, shard=shard, sizes=sizes, blocks=blocks):
                    return grower.grow(target_name, lambda n: source.get(n, shard, blocks), shard=shard).reshape(sizes)
                chunks.append(Chunk(key, gshape, offsets, sizes, source.dtypes[name], make))

    with atomic_directory(out) as tmp:
        dist_checkpoint.save(tmp, chunks)
        copy_side_files(source.config_dir, tmp, target_config(cfg, target))
        (tmp / "growth.json").write_text(dump_manifest(manifest))
    log(f"wrote {out}")
    return manifest


# -- conversion ----------------------------------------------------------------------------------

def hf_weights(source) -> tuple[dict, dict[str, torch.Tensor]]:
    """A megatron source as an HF model (GPT2LMHeadModel, LlamaForCausalLM, ...): its config and its
    full (gathered) state dict."""
    cfg = source_config(source)
    full = {name: source.get(name, None, 1) for name in source.shapes if MCORE_GPT.lookup(name)}
    hf_cfg = {k: v for k, v in cfg.items() if k != "padded_vocab_size"}
    hf_cfg.setdefault("architectures", ["GPT2LMHeadModel"])
    return hf_cfg, mcore_to_hf(full, cfg)


def convert(src: str | Path, out: str | Path, overwrite: bool = False, log=print) -> str:
    """`b2b convert`: an HF GPT-2 or Llama-family directory -> megatron-core torch_dist checkpoint, or
    a megatron checkpoint (torch_dist or legacy) -> HF directory. Returns the direction."""
    from .files import model_class, open_weights, read_config, resolve, weight_files
    out = free_output(out, overwrite)
    source = open_source(src)
    with atomic_directory(out) as tmp:
        if source is not None:  # megatron -> HF
            hf_cfg, state = hf_weights(source)
            from safetensors.torch import save_file
            save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            copy_side_files(source.config_dir, tmp, hf_cfg)
            direction = f"{source.format} -> HF {hf_cfg['architectures'][0]}"
        else:  # HF -> megatron
            path = resolve(src)
            cfg = read_config(path)
            weights = open_weights(weight_files(path))
            shape = shape_from_config(cfg)
            rows = padded_vocab(cfg["vocab_size"])
            check_source(weights.shapes, schema_for(cfg["model_type"]), shape)
            state = hf_to_mcore({n: weights[n] for n in weights.shapes}, cfg, rows)
            chunks = []
            for name, w in state.items():
                key, layer = sharded_key(name)
                gshape = tuple(w.shape) if layer is None else (shape.layers, *w.shape)
                offsets, sizes = tensor_region(gshape, layer, None, None, 1)
                chunks.append(Chunk(key, gshape, offsets, sizes, w.dtype, lambda w=w, sizes=sizes: w.reshape(sizes)))
            dist_checkpoint.save(tmp, chunks)
            copy_side_files(path, tmp, {**cfg, "padded_vocab_size": rows})
            direction = f"HF {model_class(cfg, path)} -> megatron-core torch_dist"
    log(f"converted {src} ({direction}) into {out}")
    return direction
