"""megatron-core's GPTModel, built from the project's GPT-2 shape, runnable on CPU (gloo) and GPU.

The model is megatron-core's own: the local layer spec (ColumnParallelLinear / RowParallelLinear,
torch LayerNorm), learned absolute positions, tied input/output embeddings, biases, tanh-GELU:
the same function as HF's GPT2LMHeadModel, so converted weights give the same logits
(growth/adapters/megatron.py converts both ways). One change to the spec: megatron-core's local
DotProductAttention asks CUDA for its score buffer, so the spec's core attention is
`SDPAttention`, the same causal softmax attention through torch's scaled_dot_product_attention,
which runs on CPU and GPU alike.

The trainer's side (`parallel.tensor` > 1 or `parallel.megatron`): `GPT` wraps GPTModel in the HF
causal-LM interface the trainer uses (forward(input_ids, labels).loss, .config an HF GPT2Config),
`DeepSpeedMPU` hands DeepSpeed megatron-core's process groups, and the loaders and writers move
weights between the tensor-parallel shards and an HF GPT-2 directory or a megatron-core torch_dist
checkpoint (growth.adapters.megatron converts, growth.adapters.dist_checkpoint writes).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.distributed as dist

from growth.adapters.megatron import hf_to_mcore, mcore_to_hf, padded_vocab

from .config import Recipe, RecipeError


def _attention_class():
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    class SDPAttention(DotProductAttention):
        """DotProductAttention's causal attention ([s, b, heads, head_dim] in, [s, b, heads x head_dim]
        out, its softmax scale and dropout) through torch.nn.functional.scaled_dot_product_attention."""

        def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                    packed_seq_params=None):
            q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, head_dim]
            out = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=self.softmax_scale,
                dropout_p=self.attention_dropout.p if self.training else 0.0)
            b, heads, s, head_dim = out.shape
            return out.permute(2, 0, 1, 3).reshape(s, b, heads * head_dim)

    return SDPAttention


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's GELU (HF 'gelu_new')."""
    return torch.nn.functional.gelu(x, approximate="tanh")


def build_gpt(layers: int, hidden: int, heads: int, ffn: int, vocab: int, max_positions: int, tp: int,
              dropout: float = 0.0, tied: bool = True, seed: int = 0):
    """megatron-core GPTModel with GPT-2's function; `vocab` is the padded vocabulary
    (growth.adapters.megatron.padded_vocab). Parameters are initialised on CPU from the full
    (unsharded) weights under `seed`, so every TP degree starts from the same model.
    Needs megatron.core.parallel_state initialised with tensor_model_parallel_size=tp."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig
    spec = get_gpt_layer_local_spec()
    spec.submodules.self_attention.submodules.core_attention = _attention_class()
    config = TransformerConfig(
        num_layers=layers, hidden_size=hidden, num_attention_heads=heads, ffn_hidden_size=ffn,
        tensor_model_parallel_size=tp, use_cpu_initialization=True, init_method_std=0.02,
        hidden_dropout=dropout, attention_dropout=dropout, add_bias_linear=True, layernorm_epsilon=1e-5,
        activation_func=gelu_tanh, bias_activation_fusion=False, bias_dropout_fusion=False,
        masked_softmax_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False,
        apply_rope_fusion=False)
    torch.manual_seed(seed)
    return GPTModel(config=config, transformer_layer_spec=spec, vocab_size=vocab,
                    max_sequence_length=max_positions, position_embedding_type="learned_absolute",
                    share_embeddings_and_output_weights=tied)


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


def _gather(t: torch.Tensor, dim: int) -> torch.Tensor:
    """The full tensor from its tensor-parallel shards along `dim` (torch.distributed.all_gather:
    megatron's gather_from_tensor_model_parallel_region allocates on CUDA)."""
    tp, _, group = _tp()
    if tp == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(tp)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


# ---------------------------------------------------------------- the model


@dataclasses.dataclass
class Output:
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None


class GPT(torch.nn.Module):
    """megatron-core's GPTModel behind the HF causal-LM interface the trainer uses: `config` is the
    HF GPT2Config of the same model (plus padded_vocab_size), forward(input_ids, labels) returns
    .loss with HF's convention (labels = input_ids, shifted here; -100 ignored; the mean over the
    predicted positions). The padding rows of the vocabulary are masked out of the softmax, so the
    loss and the probabilities are those of the HF model with the real vocabulary."""

    def __init__(self, config, seed: int = 0):
        super().__init__()
        self.config = config
        tp, _, _ = _tp()
        self.gpt = build_gpt(config.n_layer, config.n_embd, config.n_head, config.n_inner, config.padded_vocab_size,
                             config.n_positions, tp, dropout=config.resid_pdrop, seed=seed)

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


def gpt2_config(recipe: Recipe, tokenizer):
    """The HF GPT2Config of the recipe's model (what TAG/dist/config.json and RUN/final hold)."""
    from transformers import GPT2Config
    m, vocab, eos = recipe.model, len(tokenizer), tokenizer.eos_token_id
    return GPT2Config(vocab_size=vocab, n_embd=m.hidden, n_layer=m.layers, n_head=m.heads, n_inner=m.ffn,
                      n_positions=m.max_positions, resid_pdrop=m.dropout, embd_pdrop=m.dropout, attn_pdrop=m.dropout,
                      bos_token_id=eos, eos_token_id=eos, tie_word_embeddings=True, use_cache=False,
                      architectures=["GPT2LMHeadModel"], padded_vocab_size=padded_vocab(vocab))


def build_model(recipe: Recipe, tokenizer) -> GPT:
    """The recipe's model on this rank's tensor-parallel shard: fresh (seeded: the same full weights
    at every TP degree), or loaded from model.init_from / grow_from: an HF GPT-2 directory or a
    megatron-core torch_dist checkpoint (b2b grow, b2b convert, or RUN/checkpoints/TAG/dist)."""
    from growth.adapters.dist_checkpoint import is_dist_checkpoint
    from growth.adapters.files import read_config
    model = GPT(gpt2_config(recipe, tokenizer), seed=recipe.seed)
    start = recipe.start_model
    if start is None:
        return model
    cfg, vocab = read_config(start), len(tokenizer)
    if cfg["vocab_size"] != vocab:
        raise RecipeError(f"model: {start} has a vocabulary of {cfg['vocab_size']} rows but the tokenizer has {vocab} "
                          "tokens: use the model's own tokenizer (leave data.tokenizer unset) or transfer the "
                          "vocabulary first (b2b vocab)")
    if not cfg.get("tie_word_embeddings", True):
        raise RecipeError(f"model.init_from: {start} has an untied LM head; megatron-core's GPT here ties it to the "
                          "input embeddings (as GPT-2 does)")
    if cfg.get("padded_vocab_size", padded_vocab(vocab)) != padded_vocab(vocab):
        raise RecipeError(f"model.init_from: {start} pads the vocabulary to {cfg['padded_vocab_size']} rows, this "
                          f"trainer to {padded_vocab(vocab)} (growth.adapters.megatron.padded_vocab)")
    (load_dist if is_dist_checkpoint(start) else load_hf)(model, start)
    return model


# ---------------------------------------------------------------- weights in and out


def _copy_full(model: GPT, full: dict[str, torch.Tensor], source) -> None:
    """Copy this rank's slice of each full (unsharded) tensor into the model's parameters."""
    tp, rank, _ = _tp()
    params = dict(model.gpt.named_parameters())
    if set(full) != set(params):
        odd = sorted(set(full) ^ set(params))
        raise RecipeError(f"model.init_from: {source} does not match megatron-core's tied GPT-2 "
                          f"(differs in {', '.join(odd[:3])}{' ...' if len(odd) > 3 else ''})")
    with torch.no_grad():
        for name, p in params.items():
            w = full[name]
            if getattr(p, "tensor_model_parallel", False):
                w = w.chunk(tp, dim=p.partition_dim)[rank]
            p.copy_(w)


def load_hf(model: GPT, path: Path) -> None:
    """Weights from an HF GPT-2 directory (each rank reads the full tensors and keeps its slice)."""
    from growth.adapters.files import open_weights, weight_files
    weights = open_weights(weight_files(path))
    hf = {name: weights[name] for name in weights.shapes}
    _copy_full(model, hf_to_mcore(hf, model.config.n_head, model.config.padded_vocab_size), path)


def _sharded_tensors(model: GPT) -> dict:
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    return {k: v for k, v in model.gpt.sharded_state_dict().items() if isinstance(v, ShardedTensor)}


def load_dist(model: GPT, path: Path) -> None:
    """Weights from a torch_dist checkpoint saved at any tensor-parallel degree (megatron-core reads
    the regions of this rank's shards)."""
    from megatron.core import dist_checkpointing
    loaded = dist_checkpointing.load(_sharded_tensors(model), str(path))
    missing = {n for n, _ in model.gpt.named_parameters()} - set(loaded)
    if missing:
        raise RecipeError(f"model.init_from: {path} lacks {', '.join(sorted(missing)[:3])}")
    model.gpt.load_state_dict(loaded, strict=False)


def save_dist(model: GPT, path: Path) -> None:
    """This rank's shards into the torch_dist checkpoint `path` (an existing directory; every rank
    calls it): megatron-core's keys, global shapes and offsets (the layers stacked on a leading axis),
    written through growth.adapters.dist_checkpoint (megatron's own dist_checkpointing.save needs
    CUDA). A tensor replicated over ranks is written by the rank whose replica_id is all zeros."""
    from growth.adapters.dist_checkpoint import Chunk, save
    chunks = []
    for v in _sharded_tensors(model).values():
        if any(v.replica_id if isinstance(v.replica_id, tuple) else (v.replica_id,)):
            continue
        shape = (1,) * v.prepend_axis_num + tuple(v.local_shape)
        chunks.append(Chunk(v.key, tuple(v.global_shape), tuple(v.global_offset), shape, v.data.dtype,
                            lambda d=v.data, s=shape: d.detach().reshape(s)))
    save(path, chunks)


def full_state(model: GPT) -> dict[str, torch.Tensor]:
    """The full (gathered) fp32 tensors by megatron module name; every rank calls it."""
    out = {}
    for name, p in model.gpt.named_parameters():
        w = _gather(p.detach(), p.partition_dim) if getattr(p, "tensor_model_parallel", False) else p.detach()
        out[name] = w.float().cpu()
    return out


def to_hf(model: GPT):
    """The model as an HF GPT2LMHeadModel (gathered from the shards; every rank calls it)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    config = GPT2Config.from_dict({k: v for k, v in model.config.to_dict().items() if k != "padded_vocab_size"})
    hf = GPT2LMHeadModel(config)
    state = mcore_to_hf(full_state(model), config.n_head, config.vocab_size)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"megatron -> HF GPT-2: missing {missing}, unexpected {unexpected}")
    hf.tie_weights()
    return hf
