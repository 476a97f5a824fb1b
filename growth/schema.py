"""One explicit schema per architecture: for every parameter, the role of each axis.

Axis roles (None: the axis is not grown, e.g. vocabulary or positions):
  h_out / h_in     hidden (residual stream) as fan-out / fan-in; ONE map for the whole model
  a_out / a_in     attention inner axis (heads x head_dim), fan-out / fan-in
  q_out            query fan-out: like a_out, plus the head_dim score compensation
  kv_out           grouped-query attention's key/value fan-out (kv_heads x head_dim)
  qkv_out          GPT-2's fused [q; k; v] fan-out
  hqkv_out         megatron-core's fused QKV fan-out, group-major: rows [group, (the group's query
                   heads, k, v), dim]; a group a head under multi-head attention
  f_out / f_in     FFN intermediate units, fan-out / fan-in
  glu_out          megatron-core's fused SwiGLU fan-out [gate; up]: each half by the FFN map
Tensor kinds: 'weight' (random init for new units under DirectCopy), 'bias' (zeros),
'norm_w' / 'norm_b' (ones / zeros), 'head_norm_*' (the LayerNorm that feeds a tied output
embedding: divided by the hidden counts, see docs/growth.md), 'proj_*' (a block's output
projection, zeroed in identity-grown blocks), 'output' (the output embedding, absent when
tied).
`optional`: a tensor some variants of the architecture have (Llama's attention_bias and
mlp_bias, Qwen2's q/k/v biases); every other layer tensor must be present.
`tp`: the axis a tensor-parallel checkpoint shards (megatron-core: column-parallel weights on
their output axis, row-parallel on their input axis, the vocabulary of embeddings), or None.
"""

from __future__ import annotations

import dataclasses
import functools
import re

from .errors import GrowthError
from .shape import LLAMA_FAMILY


@dataclasses.dataclass(frozen=True)
class Param:
    axes: tuple
    kind: str
    tp: int | None = None
    optional: bool = False


@dataclasses.dataclass(frozen=True)
class Schema:
    model_type: str
    base_prefix: str          # prefix of the base model inside heads, e.g. "bert."
    layer_prefix: str         # e.g. "encoder.layer."
    pre_ln: bool              # pre-LayerNorm blocks admit exact identity depth growth
    params: dict              # template name ({L} for the layer index) -> Param
    dropped: tuple = ()       # buffers that old checkpoints saved and HF rebuilds
    rope: bool = False        # rotary position embeddings: head_dim cannot grow

    def split(self, name: str) -> tuple[int | None, str]:
        """'bert.encoder.layer.3.output.dense.weight' -> (3, 'encoder.layer.{L}.output.dense.weight')."""
        if name.startswith(self.base_prefix):
            name = name[len(self.base_prefix):]
        m = re.match(re.escape(self.layer_prefix) + r"(\d+)\.(.*)$", name)
        if m:
            return int(m.group(1)), f"{self.layer_prefix}{{L}}.{m.group(2)}"
        return None, name

    def at_layer(self, name: str, layer: int, new_layer: int) -> str:
        """The same parameter in another layer: '...layer.3.x' -> '...layer.7.x'."""
        return name.replace(f"{self.layer_prefix}{layer}.", f"{self.layer_prefix}{new_layer}.", 1)

    def lookup(self, name: str) -> Param | None:
        """The Param of a state-dict key; None for a dropped buffer; error if unknown."""
        layer, template = self.split(name)
        if template in self.params:
            return self.params[template]
        if template in self.dropped:
            return None
        raise GrowthError(f"{self.model_type}: parameter {name!r} is not in the schema; "
                          "this architecture variant is not supported")


def _dense(name, weight_axes, out_role, kind, optional_bias=False):
    bias_kind = "proj_b" if kind == "proj_w" else "bias"
    return {f"{name}.weight": Param(weight_axes, kind),
            f"{name}.bias": Param((out_role,), bias_kind, optional=optional_bias)}


def _linear(name, out_role, in_role, kind="weight", optional_bias=False):
    """torch.nn.Linear: weight [out, in]."""
    return _dense(name, (out_role, in_role), out_role, kind, optional_bias)


def _conv1d(name, in_role, out_role, kind="weight"):
    """HF GPT-2 Conv1D: weight [in, out]."""
    return _dense(name, (in_role, out_role), out_role, kind)


def _norm(name, kind="norm"):
    return {f"{name}.weight": Param(("h_out",), f"{kind}_w"), f"{name}.bias": Param(("h_out",), f"{kind}_b")}


L = "encoder.layer.{L}"
BERT = Schema(
    model_type="bert", base_prefix="bert.", layer_prefix="encoder.layer.", pre_ln=False,
    params={
        "embeddings.word_embeddings.weight": Param((None, "h_out"), "weight"),
        "embeddings.position_embeddings.weight": Param((None, "h_out"), "weight"),
        "embeddings.token_type_embeddings.weight": Param((None, "h_out"), "weight"),
        **_norm("embeddings.LayerNorm"),
        **_linear(f"{L}.attention.self.query", "q_out", "h_in"),
        **_linear(f"{L}.attention.self.key", "a_out", "h_in"),
        **_linear(f"{L}.attention.self.value", "a_out", "h_in"),
        **_linear(f"{L}.attention.output.dense", "h_out", "a_in", "proj_w"),
        **_norm(f"{L}.attention.output.LayerNorm"),
        **_linear(f"{L}.intermediate.dense", "f_out", "h_in"),
        **_linear(f"{L}.output.dense", "h_out", "f_in", "proj_w"),
        **_norm(f"{L}.output.LayerNorm"),
        **_linear("pooler.dense", "h_out", "h_in"),
        **_linear("cls.predictions.transform.dense", "h_out", "h_in"),
        **_norm("cls.predictions.transform.LayerNorm", "head_norm"),
        "cls.predictions.decoder.weight": Param((None, "h_in"), "output"),
        "cls.predictions.decoder.bias": Param((None,), "bias"),
        "cls.predictions.bias": Param((None,), "bias"),
        **_linear("cls.seq_relationship", None, "h_in"),
    },
    dropped=("embeddings.position_ids", "embeddings.token_type_ids"),
)

H = "h.{L}"
GPT2 = Schema(
    model_type="gpt2", base_prefix="transformer.", layer_prefix="h.", pre_ln=True,
    params={
        "wte.weight": Param((None, "h_out"), "weight"),
        "wpe.weight": Param((None, "h_out"), "weight"),
        **_norm(f"{H}.ln_1"),
        **_conv1d(f"{H}.attn.c_attn", "h_in", "qkv_out"),
        **_conv1d(f"{H}.attn.c_proj", "a_in", "h_out", "proj_w"),
        **_norm(f"{H}.ln_2"),
        **_conv1d(f"{H}.mlp.c_fc", "h_in", "f_out"),
        **_conv1d(f"{H}.mlp.c_proj", "f_in", "h_out", "proj_w"),
        **_norm("ln_f", "head_norm"),
        "lm_head.weight": Param((None, "h_in"), "output"),
    },
    dropped=("h.{L}.attn.bias", "h.{L}.attn.masked_bias"),  # mask buffers of old GPT-2 files
)

# megatron-core GPTModel (local layer spec, learned positions, biases): its module names; a
# torch_dist checkpoint stores the layers stacked on a leading axis (growth/adapters/megatron.py).
D = "decoder.layers.{L}"
MCORE_GPT = Schema(
    model_type="mcore_gpt", base_prefix="", layer_prefix="decoder.layers.", pre_ln=True,
    params={
        "embedding.word_embeddings.weight": Param((None, "h_out"), "weight", tp=0),
        "embedding.position_embeddings.weight": Param((None, "h_out"), "weight"),
        **_norm(f"{D}.input_layernorm"),
        f"{D}.self_attention.linear_qkv.weight": Param(("hqkv_out", "h_in"), "weight", tp=0),
        f"{D}.self_attention.linear_qkv.bias": Param(("hqkv_out",), "bias", tp=0),
        f"{D}.self_attention.linear_proj.weight": Param(("h_out", "a_in"), "proj_w", tp=1),
        f"{D}.self_attention.linear_proj.bias": Param(("h_out",), "proj_b"),
        **_norm(f"{D}.pre_mlp_layernorm"),
        f"{D}.mlp.linear_fc1.weight": Param(("f_out", "h_in"), "weight", tp=0),
        f"{D}.mlp.linear_fc1.bias": Param(("f_out",), "bias", tp=0),
        f"{D}.mlp.linear_fc2.weight": Param(("h_out", "f_in"), "proj_w", tp=1),
        f"{D}.mlp.linear_fc2.bias": Param(("h_out",), "proj_b"),
        **_norm("decoder.final_layernorm", "head_norm"),
        "output_layer.weight": Param((None, "h_in"), "output", tp=0),
    },
)

# megatron-core's GPTModel built as a Llama-family model (launchers/megatron.py): RMSNorm weights,
# grouped fused QKV (Qwen2's q/k/v bias optional), no other biases, SwiGLU's fc1 as [gate; up]
MCORE_LLAMA = Schema(
    model_type="mcore_llama", base_prefix="", layer_prefix="decoder.layers.", pre_ln=True, rope=True,
    params={
        "embedding.word_embeddings.weight": Param((None, "h_out"), "weight", tp=0),
        f"{D}.input_layernorm.weight": Param(("h_out",), "norm_w"),
        f"{D}.self_attention.linear_qkv.weight": Param(("hqkv_out", "h_in"), "weight", tp=0),
        f"{D}.self_attention.linear_qkv.bias": Param(("hqkv_out",), "bias", tp=0, optional=True),
        f"{D}.self_attention.linear_proj.weight": Param(("h_out", "a_in"), "proj_w", tp=1),
        f"{D}.pre_mlp_layernorm.weight": Param(("h_out",), "norm_w"),
        f"{D}.mlp.linear_fc1.weight": Param(("glu_out", "h_in"), "weight", tp=0),
        f"{D}.mlp.linear_fc2.weight": Param(("h_out", "f_in"), "proj_w", tp=1),
        "decoder.final_layernorm.weight": Param(("h_out",), "head_norm_w"),
        "output_layer.weight": Param((None, "h_in"), "output", tp=0),
    },
)


def _llama(model_type: str) -> Schema:
    """HF LlamaForCausalLM and the families that share its module names (Mistral, Qwen2): RMSNorm
    (a weight, no bias), grouped-query attention (k/v over kv_heads), SwiGLU (gate and up share
    the FFN map, down is the fan-in), RoPE; biases where a variant has them."""
    a, m = "layers.{L}.self_attn", "layers.{L}.mlp"
    linear = functools.partial(_linear, optional_bias=True)
    return Schema(
        model_type=model_type, base_prefix="model.", layer_prefix="layers.", pre_ln=True, rope=True,
        params={
            "embed_tokens.weight": Param((None, "h_out"), "weight"),
            "layers.{L}.input_layernorm.weight": Param(("h_out",), "norm_w"),
            **linear(f"{a}.q_proj", "q_out", "h_in"),
            **linear(f"{a}.k_proj", "kv_out", "h_in"),
            **linear(f"{a}.v_proj", "kv_out", "h_in"),
            **linear(f"{a}.o_proj", "h_out", "a_in", "proj_w"),
            "layers.{L}.post_attention_layernorm.weight": Param(("h_out",), "norm_w"),
            **linear(f"{m}.gate_proj", "f_out", "h_in"),
            **linear(f"{m}.up_proj", "f_out", "h_in"),
            **linear(f"{m}.down_proj", "h_out", "f_in", "proj_w"),
            "norm.weight": Param(("h_out",), "head_norm_w"),
            "lm_head.weight": Param((None, "h_in"), "output"),
        },
        dropped=("layers.{L}.self_attn.rotary_emb.inv_freq", "rotary_emb.inv_freq"),
    )


SCHEMAS = {s.model_type: s for s in (BERT, GPT2, MCORE_GPT, MCORE_LLAMA, *map(_llama, LLAMA_FAMILY))}


def schema_for(model_type: str) -> Schema:
    if model_type not in SCHEMAS:
        raise GrowthError(f"unknown architecture {model_type!r}: supported are {sorted(SCHEMAS)}")
    return SCHEMAS[model_type]
