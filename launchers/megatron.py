"""megatron-core's GPTModel, built as a GPT-2 or a Llama-family model, runnable on CPU (gloo) and GPU.

The model is megatron-core's own, with the local layer spec (ColumnParallelLinear /
RowParallelLinear, torch norms), configured from an HF config to compute the HF model's function,
so converted weights give the same logits (growth/adapters/megatron.py converts both ways):
- GPT-2: LayerNorm, learned absolute positions, biases, tanh-GELU, tied input/output embeddings;
- Llama, Mistral, Qwen2: RMSNorm, RoPE with the model's theta (megatron's rotate-half layout, HF's
  too), grouped-query attention (num_query_groups), SwiGLU (gated_linear_unit with SiLU; fc1 is
  [gate; up]), no biases but Qwen2's q/k/v ones, a tied or untied output layer.
Two CPU changes: megatron-core's local DotProductAttention asks CUDA for its score buffer, so the
spec's core attention is `SDPAttention`, the same causal softmax attention (key/value heads
repeated over their query groups) through torch's scaled_dot_product_attention; and its
RotaryEmbedding moves its frequencies to CUDA on the first forward, which a CPU subclass does not.

The trainer's side (`parallel.tensor` > 1 or `parallel.megatron`): `GPT` wraps GPTModel in the HF
causal-LM interface the trainer uses (forward(input_ids, labels).loss, .config the HF config),
`DeepSpeedMPU` hands DeepSpeed megatron-core's process groups, and the loaders and writers move
weights between the tensor-parallel shards and an HF directory or a megatron-core torch_dist
checkpoint (growth.adapters.megatron converts, growth.adapters.dist_checkpoint writes).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.distributed as dist

from growth import shape_from_config
from growth.adapters.megatron import Layout, glu_blocks, hf_to_mcore, mcore_to_hf, padded_vocab

from .config import Recipe, RecipeError


def _attention_class():
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    class SDPAttention(DotProductAttention):
        """DotProductAttention's causal attention ([s, b, heads, head_dim] queries, [s, b, groups,
        head_dim] keys and values in, [s, b, heads x head_dim] out, its softmax scale and dropout)
        through torch.nn.functional.scaled_dot_product_attention."""

        def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                    packed_seq_params=None):
            per_group = query.shape[2] // key.shape[2]
            if per_group > 1:  # grouped-query attention: each group's key/value head serves its queries
                key, value = key.repeat_interleave(per_group, dim=2), value.repeat_interleave(per_group, dim=2)
            q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, head_dim]
            out = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=self.softmax_scale,
                dropout_p=self.attention_dropout.p if self.training else 0.0)
            b, heads, s, head_dim = out.shape
            return out.permute(2, 0, 1, 3).reshape(s, b, heads * head_dim)

    return SDPAttention


def _cpu_rotary_class():
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    class CPURotaryEmbedding(RotaryEmbedding):
        """RotaryEmbedding whose frequencies stay on the CPU (the parent moves them to CUDA)."""

        def get_emb(self, max_seq_len: int, offset: int = 0) -> torch.Tensor:
            freqs = self.get_freqs_non_repeated(max_seq_len, offset)
            return torch.cat((freqs, freqs), dim=-1)[:, None, None, :]  # not interleaved: rotate-half

    return CPURotaryEmbedding


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's GELU (HF 'gelu_new')."""
    return torch.nn.functional.gelu(x, approximate="tanh")


def _rope(cfg: dict) -> dict:
    """An HF config's RoPE parameters (transformers 5's rope_parameters, or the older keys)."""
    return cfg.get("rope_parameters") or {"rope_theta": cfg.get("rope_theta", 10000.0),
                                          **(cfg.get("rope_scaling") or {})}


def refusal(cfg: dict) -> str | None:
    """Why megatron-core's GPT cannot be built here with the function of the HF model of `cfg`
    (None: it can): RoPE other than the default, Llama's o_proj or MLP biases, sliding-window
    attention shorter than the positions. `b2b train` checks it before any process starts."""
    if cfg.get("model_type") == "gpt2":
        return None
    rope = _rope(cfg)
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        return f"RoPE type {kind!r}: megatron-core's GPT is built here with plain RoPE only"
    for key, why in [("attention_bias", "o_proj bias"), ("mlp_bias", "MLP biases")]:
        if cfg.get(key):
            return f"{key} (an {why}): megatron-core's GPT is built here with q/k/v biases only"
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None
    if window and window < cfg["max_position_embeddings"]:
        return f"sliding-window attention ({window} < {cfg['max_position_embeddings']} positions) is not built here"
    return None


def build_gpt(cfg: dict, tp: int, seed: int = 0):
    """megatron-core GPTModel with the function of the HF model of `cfg` (GPT-2 or the Llama family),
    its vocabulary cfg["padded_vocab_size"] (growth.adapters.megatron.padded_vocab). Parameters are
    initialised on CPU from the full (unsharded) weights under `seed`, so every TP degree starts
    from the same model. Needs megatron.core.parallel_state initialised with tensor_model_parallel_size=tp."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig
    why = refusal(cfg)
    if why:
        raise RecipeError(f"model: {why}")
    layout, shape = Layout(cfg), shape_from_config(cfg)
    spec = get_gpt_layer_local_spec(normalization="RMSNorm" if layout.llama else None)
    spec.submodules.self_attention.submodules.core_attention = _attention_class()
    common = dict(
        num_layers=shape.layers, hidden_size=shape.hidden, num_attention_heads=shape.heads, ffn_hidden_size=shape.ffn,
        tensor_model_parallel_size=tp, use_cpu_initialization=True, init_method_std=cfg.get("initializer_range", 0.02),
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        gradient_accumulation_fusion=False, persist_layer_norm=False, apply_rope_fusion=False)
    if layout.llama:
        config = TransformerConfig(
            **common, num_query_groups=shape.kv_heads, normalization="RMSNorm",
            layernorm_epsilon=cfg.get("rms_norm_eps", 1e-6), add_bias_linear=False,
            add_qkv_bias=cfg["model_type"] == "qwen2", gated_linear_unit=True, activation_func=torch.nn.functional.silu,
            hidden_dropout=0.0, attention_dropout=cfg.get("attention_dropout", 0.0))
        position = dict(position_embedding_type="rope", rotary_base=float(_rope(cfg)["rope_theta"]))
    else:
        config = TransformerConfig(
            **common, add_bias_linear=True, layernorm_epsilon=cfg.get("layer_norm_epsilon", 1e-5),
            activation_func=gelu_tanh, hidden_dropout=cfg.get("resid_pdrop", 0.0),
            attention_dropout=cfg.get("attn_pdrop", 0.0))
        position = dict(position_embedding_type="learned_absolute")
    torch.manual_seed(seed)
    model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=cfg["padded_vocab_size"],
                     max_sequence_length=cfg.get("max_position_embeddings") or cfg["n_positions"],
                     share_embeddings_and_output_weights=layout.tied, **position)
    if layout.llama and not torch.cuda.is_available():
        model.rotary_pos_emb.__class__ = _cpu_rotary_class()
    return model


# ---------------------------------------------------------------- process groups


def initialize(tp: int) -> None:
    """megatron-core's tensor- and data-parallel groups over the initialised torch.distributed world:
    consecutive ranks form a tensor-parallel group."""
    from megatron.core import parallel_state
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)


class DeepSpeedMPU:
    """What DeepSpeed asks its `mpu` for (deepspeed/utils/groups.py, bwc.py, zero/stage_1_and_2.py):
    the model-parallel group is megatron-core's tensor-parallel group (no pipeline), so that
    DeepSpeed averages gradients over the data-parallel group only, counts replicated parameters
    once in the gradient norm, and names checkpoint files by tensor-parallel rank (mp_rank_XX)."""

    def __init__(self):
        from megatron.core import parallel_state
        self.ps = parallel_state

    def get_model_parallel_group(self):
        return self.ps.get_tensor_model_parallel_group()

    def get_model_parallel_rank(self):
        return self.ps.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self):
        return self.ps.get_tensor_model_parallel_world_size()

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size

    def get_tensor_model_parallel_src_rank(self):
        return self.ps.get_tensor_model_parallel_src_rank()

    def get_data_parallel_group(self):
        return self.ps.get_data_parallel_group()

    def get_data_parallel_rank(self):
        return self.ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self):
        return self.ps.get_data_parallel_world_size()

    def get_data_parallel_group_ranks(self):
        return dist.get_process_group_ranks(self.get_data_parallel_group())

    def get_pipeline_model_parallel_world_size(self):
        return 1


def _tp() -> tuple[int, int, object]:
    """(tensor-parallel size, rank, group)."""
    from megatron.core import parallel_state as ps
    return ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank(), \
        ps.get_tensor_model_parallel_group()


def _gather(t: torch.Tensor, dim: int, glu: bool = False) -> torch.Tensor:
    """The full tensor from its tensor-parallel shards along `dim` (torch.distributed.all_gather:
    megatron's gather_from_tensor_model_parallel_region allocates on CUDA). `glu`: SwiGLU's fc1,
    whose shard r is [gate_r; up_r] and whose full tensor is [gate; up]."""
    tp, _, group = _tp()
    if tp == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(tp)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(glu_blocks(parts, dim) if glu else parts, dim=dim)


def _shard(w: torch.Tensor, dim: int, glu: bool = False) -> torch.Tensor:
    """This rank's shard of the full tensor `w` along `dim` (the inverse of _gather)."""
    tp, rank, _ = _tp()
    if glu:
        return torch.cat([half.chunk(tp, dim)[rank] for half in w.chunk(2, dim)], dim=dim)
    return w.chunk(tp, dim=dim)[rank]


def _is_glu(model: GPT, name: str) -> bool:
    return model.gpt.config.gated_linear_unit and name.endswith("mlp.linear_fc1.weight")


# ---------------------------------------------------------------- the model


@dataclasses.dataclass
class Output:
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None


class GPT(torch.nn.Module):
    """megatron-core's GPTModel behind the HF causal-LM interface the trainer uses: `config` is the
    HF config of the same model (GPT2Config, LlamaConfig, ...; plus padded_vocab_size),
    forward(input_ids, labels) returns .loss with HF's convention (labels = input_ids, shifted here;
    -100 ignored; the mean over the predicted positions). The padding rows of the vocabulary are
    masked out of the softmax, so the loss and the probabilities are those of the HF model with the
    real vocabulary."""

    def __init__(self, config, seed: int = 0):
        super().__init__()
        self.config = config
        tp, _, _ = _tp()
        self.gpt = build_gpt(config.to_dict(), tp, seed=seed)

    def vocab_parallel_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[batch, seq, padded vocab / tp]: this rank's columns, padding columns at -inf."""
        b, s = input_ids.shape
        positions = torch.arange(s, device=input_ids.device).expand(b, s)
        logits = self.gpt(input_ids, positions, None)
        _, rank, _ = _tp()
        width = logits.shape[-1]
        column = torch.arange(rank * width, (rank + 1) * width, device=logits.device)
        return logits.masked_fill(column >= self.config.vocab_size, float("-inf"))

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, **_) -> Output:
        logits = self.vocab_parallel_logits(input_ids)
        if labels is None:
            return Output(logits=_gather(logits, -1)[..., :self.config.vocab_size])
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
        targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)  # position t predicts token t + 1
        keep = targets != -100
        per_token = vocab_parallel_cross_entropy(logits.float(), targets.clamp(min=0))
        return Output(loss=(per_token * keep).sum() / keep.sum())


def hf_config(recipe: Recipe, tokenizer):
    """The HF config of the recipe's model (what TAG/dist/config.json and RUN/final hold), with the
    padded vocabulary megatron-core builds."""
    from .model import model_config
    config = model_config(recipe, tokenizer)
    config.use_cache, config.padded_vocab_size = False, padded_vocab(len(tokenizer))
    return config


def build_model(recipe: Recipe, tokenizer) -> GPT:
    """The recipe's model on this rank's tensor-parallel shard: fresh (seeded: the same full weights
    at every TP degree), or loaded from model.init_from / grow_from: an HF directory of the recipe's
    family or a megatron-core torch_dist checkpoint (b2b grow, b2b convert, or RUN/checkpoints/TAG/dist)."""
    from transformers import AutoConfig

    from growth.adapters.dist_checkpoint import is_dist_checkpoint
    from growth.adapters.files import read_config

    from .model import dropout_options
    start = recipe.start_model
    if start is None:
        return GPT(hf_config(recipe, tokenizer), seed=recipe.seed)
    cfg, vocab = read_config(start), len(tokenizer)
    if cfg["vocab_size"] != vocab:
        raise RecipeError(f"model: {start} has a vocabulary of {cfg['vocab_size']} rows but the tokenizer has {vocab} "
                          "tokens: use the model's own tokenizer (leave data.tokenizer unset) or transfer the "
                          "vocabulary first (b2b vocab)")
    if cfg.get("padded_vocab_size", padded_vocab(vocab)) != padded_vocab(vocab):
        raise RecipeError(f"model.init_from: {start} pads the vocabulary to {cfg['padded_vocab_size']} rows, this "
                          f"trainer to {padded_vocab(vocab)} (growth.adapters.megatron.padded_vocab)")
    # the start model's own config (its RoPE theta, norm epsilon, tying, ...), the recipe's dropout
    config = AutoConfig.from_pretrained(str(start), **dropout_options(cfg["model_type"], recipe.model.dropout))
    config.use_cache, config.padded_vocab_size = False, padded_vocab(vocab)
    model = GPT(config, seed=recipe.seed)
    (load_dist if is_dist_checkpoint(start) else load_hf)(model, start)
    return model


# ---------------------------------------------------------------- weights in and out


def _copy_full(model: GPT, full: dict[str, torch.Tensor], source) -> None:
    """Copy this rank's slice of each full (unsharded) tensor into the model's parameters."""
    params = dict(model.gpt.named_parameters())
    if set(full) != set(params):
        odd = sorted(set(full) ^ set(params))
        raise RecipeError(f"model.init_from: {source} does not match megatron-core's {model.config.model_type} "
                          f"(differs in {', '.join(odd[:3])}{' ...' if len(odd) > 3 else ''})")
    with torch.no_grad():
        for name, p in params.items():
            w = full[name]
            if getattr(p, "tensor_model_parallel", False):
                w = _shard(w, p.partition_dim, _is_glu(model, name))
            p.copy_(w)


def load_hf(model: GPT, path: Path) -> None:
    """Weights from an HF directory (each rank reads the full tensors and keeps its slice)."""
    from growth.adapters.files import open_weights, read_config, weight_files
    weights = open_weights(weight_files(path))
    hf = {name: weights[name] for name in weights.shapes}
    _copy_full(model, hf_to_mcore(hf, read_config(path), model.config.padded_vocab_size), path)


def _sharded_state(model: GPT) -> dict:
    """megatron-core's sharded state dict of the weights: ShardedTensors, and for SwiGLU's fc1 the
    factory that splits it into its gate and up halves."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
    return {k: v for k, v in model.gpt.sharded_state_dict().items()
            if isinstance(v, (ShardedTensor, ShardedTensorFactory))}


def load_dist(model: GPT, path: Path) -> None:
    """Weights from a torch_dist checkpoint saved at any tensor-parallel degree (megatron-core reads
    the regions of this rank's shards)."""
    from megatron.core import dist_checkpointing
    loaded = dist_checkpointing.load(_sharded_state(model), str(path))
    missing = {n for n, _ in model.gpt.named_parameters()} - set(loaded)
    if missing:
        raise RecipeError(f"model.init_from: {path} lacks {', '.join(sorted(missing)[:3])}")
    model.gpt.load_state_dict(loaded, strict=False)


def save_dist(model: GPT, path: Path) -> None:
    """This rank's shards into the torch_dist checkpoint `path` (an existing directory; every rank
    calls it): megatron-core's keys, global shapes and offsets (the layers stacked on a leading axis;
    SwiGLU's fc1 as its gate and up halves, each sharded), written through
    growth.adapters.dist_checkpoint (megatron's own dist_checkpointing.save needs CUDA). A tensor
    replicated over ranks is written by the rank whose replica_id is all zeros."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    from growth.adapters.dist_checkpoint import Chunk, save
    chunks = []
    for v in _sharded_state(model).values():
        for t in v.build() if isinstance(v, ShardedTensorFactory) else [v]:
            if any(t.replica_id if isinstance(t.replica_id, tuple) else (t.replica_id,)):
                continue
            shape = (1,) * t.prepend_axis_num + tuple(t.local_shape)
            chunks.append(Chunk(t.key, tuple(t.global_shape), tuple(t.global_offset), shape, t.data.dtype,
                                lambda d=t.data, s=shape: d.detach().reshape(s)))
    save(path, chunks)


def full_state(model: GPT) -> dict[str, torch.Tensor]:
    """The full (gathered) fp32 tensors by megatron module name; every rank calls it."""
    out = {}
    for name, p in model.gpt.named_parameters():
        w = p.detach()
        if getattr(p, "tensor_model_parallel", False):
            w = _gather(w, p.partition_dim, _is_glu(model, name))
        out[name] = w.float().cpu()
    return out


def to_hf(model: GPT):
    """The model as the HF model of its config (GPT2LMHeadModel, LlamaForCausalLM, ...), gathered
    from the shards; every rank calls it."""
    import transformers
    cfg = {k: v for k, v in model.config.to_dict().items() if k != "padded_vocab_size"}
    config = type(model.config).from_dict(cfg)
    hf = getattr(transformers, config.architectures[0])(config)
    state = mcore_to_hf(full_state(model), cfg)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if unexpected or set(missing) - ({"lm_head.weight"} if config.tie_word_embeddings else set()):
        raise RuntimeError(f"megatron -> HF {config.architectures[0]}: missing {missing}, unexpected {unexpected}")
    hf.tie_weights()
    return hf
