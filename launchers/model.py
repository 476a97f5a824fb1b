"""The model a recipe trains (HF BertForMaskedLM, GPT2LMHeadModel, or a Llama-family causal LM:
LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM), and its analytic FLOPs.

Knows nothing of DeepSpeed: the trainer wraps what this returns.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager

import torch

from growth import LLAMA_FAMILY, Shape

from .config import PerfConfig, Recipe, RecipeError

# model.arch -> the HF config and model classes of a fresh model
CLASSES = {"bert": ("BertConfig", "BertForMaskedLM"), "gpt2": ("GPT2Config", "GPT2LMHeadModel"),
           "llama": ("LlamaConfig", "LlamaForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM"),
           "qwen2": ("Qwen2Config", "Qwen2ForCausalLM")}


def dropout_options(arch: str, dropout: float) -> dict:
    return {"bert": {"hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout},
            "gpt2": {"resid_pdrop": dropout, "embd_pdrop": dropout, "attn_pdrop": dropout}}.get(
        arch, {"attention_dropout": dropout})  # the Llama family drops attention probabilities only


def model_config(recipe: Recipe, tokenizer, layers: int | None = None):
    """The HF config of the recipe's fresh model (`layers` blocks if given)."""
    import transformers
    m, vocab, eos, depth = recipe.model, len(tokenizer), tokenizer.eos_token_id, layers or recipe.model.layers
    if m.arch == "bert":
        shape = dict(hidden_size=m.hidden, num_hidden_layers=depth, num_attention_heads=m.heads,
                     intermediate_size=m.ffn, max_position_embeddings=m.max_positions,
                     pad_token_id=tokenizer.pad_token_id)
    elif m.arch == "gpt2":
        shape = dict(n_embd=m.hidden, n_layer=depth, n_head=m.heads, n_inner=m.ffn, n_positions=m.max_positions,
                     bos_token_id=eos, eos_token_id=eos)
    else:  # the Llama family
        shape = dict(hidden_size=m.hidden, num_hidden_layers=depth, num_attention_heads=m.heads,
                     num_key_value_heads=m.kv_heads or m.heads, intermediate_size=m.ffn,
                     max_position_embeddings=m.max_positions, bos_token_id=eos, eos_token_id=eos,
                     tie_word_embeddings=True)
    config_class, model_class = CLASSES[m.arch]
    return getattr(transformers, config_class)(vocab_size=vocab, architectures=[model_class], **shape,
                                               **dropout_options(m.arch, m.dropout))


def build_model(recipe: Recipe, tokenizer, layers: int | None = None):
    """A fresh model of the recipe's shape (seeded; `layers` blocks if given), or the start model."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM
    m = recipe.model
    vocab = len(tokenizer)
    dropout = dropout_options(m.arch, m.dropout)
    torch.manual_seed(recipe.seed)  # also for what a start model lacks (a new MLM head): the same on every rank
    start = recipe.start_model
    if start is not None:
        from growth.adapters.deepspeed import universal_tag
        auto = AutoModelForMaskedLM if m.arch == "bert" else AutoModelForCausalLM
        if universal_tag(start):  # a grown DeepSpeed checkpoint: the trainer loads its weights into the engine
            from transformers import AutoConfig
            model = auto.from_config(AutoConfig.from_pretrained(str(start), **dropout), dtype=torch.float32)
        else:
            model = auto.from_pretrained(str(start), dtype=torch.float32, **dropout)
        if model.config.vocab_size != vocab:
            raise RecipeError(f"model: {start} has a vocabulary of {model.config.vocab_size} rows but the "
                              f"tokenizer has {vocab} tokens: use the model's own tokenizer (leave data.tokenizer "
                              "unset) or transfer the vocabulary first (b2b vocab)")
    else:
        config = model_config(recipe, tokenizer, layers)
        model = getattr(transformers, config.architectures[0])(config)
    model.config.use_cache = False  # training: no key/value cache
    return model


def apply_perf(model, perf: PerfConfig):
    """The recipe's perf options that change the model itself, before DeepSpeed wraps it (every
    model a run trains passes here: built, started from, or stacked): the attention kernel of an
    HF model, and activation checkpointing, HF's non-reentrant gradient checkpointing, or for
    megatron-core's GPTModel its full recomputation of each layer."""
    if hasattr(model, "gpt"):  # launchers.megatron.GPT: perf.attention stays auto (config.check_perf)
        if perf.activation_checkpointing:  # TransformerBlock reads these at every forward
            c = model.gpt.config
            c.recompute_granularity, c.recompute_method, c.recompute_num_layers = "full", "uniform", 1
        return model
    if perf.attention != "auto":
        model.set_attn_implementation(perf.attention)
    if perf.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """What one training step runs and trains: the bottom `active` blocks run, blocks [lowest,
    active) train, and the embeddings and the head train or not. Ordinary training runs and
    trains everything; a bert2BERT stage-1 step runs a sub-model and trains its top blocks."""
    stage: int  # 0: ordinary training; 1 or 2: the stages of a two-stage run
    active: int
    lowest: int
    embeddings: bool
    head: bool

    def trains(self, unit) -> bool:
        if unit == "embeddings":
            return self.embeddings
        if unit == "head":
            return self.head
        return self.lowest <= unit < self.active


def linear_flops(shape: Shape, arch: str) -> int:
    """Per block and token, the FLOPs of its linear layers: the Q and output projections (4 h^2),
    K and V over the key/value heads (4 h h_kv; h_kv = h without grouped-query attention), the FFN
    (4 h f; SwiGLU's gate, up and down in the Llama family: 6 h f)."""
    h, kv = shape.hidden, shape.kv_heads * shape.head_dim
    return 4 * h * h + 4 * h * kv + (6 if arch in LLAMA_FAMILY else 4) * h * shape.ffn


def forward_flops_per_token(shape: Shape, seq_len: int, vocab: int, arch: str, layers: int | None = None) -> float:
    """Matrix-multiply FLOPs (2 per multiply-add) of one token's forward pass through `layers`
    blocks (default all) and the LM head: per block its linear layers (linear_flops: 8 h^2 + 4 h f
    for BERT and GPT-2) and the attention scores and their weighted sum over the sequence (4 s h);
    the head's vocabulary projection (2 h V) and, for BERT, its dense transform (2 h^2). Causal
    attention is counted over the full sequence, as Megatron-LM and the bert2BERT paper do."""
    h = shape.hidden
    head = 2 * h * vocab + (2 * h * h if arch == "bert" else 0)
    return (shape.layers if layers is None else layers) * (linear_flops(shape, arch) + 4 * seq_len * h) + head


def train_flops_per_token(shape: Shape, seq_len: int, vocab: int, arch: str, plan: StepPlan | None = None,
                          tied: bool = True) -> float:
    """Forward plus backward FLOPs of one token for a step plan (default: the whole model).

    Backward, per block that gradients pass through: the gradient of its input (its linear
    layers' FLOPs again, and both operands of the two attention products: twice 4 s h), plus
    its weights' gradients when it trains (the linear layers' FLOPs once more). Gradients pass
    through every block from the lowest trained one up (from the bottom when the embeddings
    train). The head passes the gradient down and computes its own weights' gradients when they
    train; a tied output matrix trains with the embeddings. In post-LN BERT, the lowest trained
    block's Q, K and V need no input gradient when nothing below it trains (6 h^2). For full
    training this is three times the forward; it matches torch's FlopCounterMode exactly."""
    h, layers = shape.hidden, shape.layers
    plan = plan or StepPlan(0, layers, 0, True, True)
    linear, attention = linear_flops(shape, arch), 4 * seq_len * h
    dense, decoder = (2 * h * h if arch == "bert" else 0), 2 * h * vocab
    forward = plan.active * (linear + attention) + dense + decoder
    bottom = 0 if plan.embeddings else plan.lowest
    backward = (plan.active - bottom) * (linear + 2 * attention) + (plan.active - plan.lowest) * linear
    if arch == "bert" and not plan.embeddings:
        backward -= 6 * h * h
    backward += dense + decoder  # the head's input gradient
    backward += (dense if plan.head else 0) + (decoder if (plan.embeddings if tied else plan.head) else 0)
    return forward + backward


def _blocks_parent(model) -> tuple[torch.nn.Module, str]:
    if hasattr(model, "bert"):
        return model.bert.encoder, "layer"
    if hasattr(model, "gpt"):  # launchers.megatron.GPT: megatron-core's GPTModel
        return model.gpt.decoder, "layers"
    if hasattr(model, "transformer"):
        return model.transformer, "h"
    return model.model, "layers"  # the Llama family


def blocks(model) -> torch.nn.ModuleList:
    """The transformer blocks of an HF BertForMaskedLM / GPT2LMHeadModel / Llama-family causal LM
    (or megatron-core's GPTModel in launchers.megatron.GPT), bottom first."""
    return getattr(*_blocks_parent(model))


@contextmanager
def bottom_blocks(model, n: int):
    """Run only the bottom `n` transformer blocks of an HF BertForMaskedLM / GPT2LMHeadModel
    (a bert2BERT stage-1 sub-model: embeddings, those blocks, the LM head)."""
    parent, attr = _blocks_parent(model)
    full = getattr(parent, attr)
    if n == len(full):
        yield
        return
    setattr(parent, attr, torch.nn.ModuleList(full[:n]))
    try:
        yield
    finally:
        setattr(parent, attr, full)


def unit_of(name: str) -> str | int:
    """Which unit a parameter belongs to: 'embeddings' (a tied LM head's matrix included), a block
    index, or 'head' (BERT's MLM transform and bias, GPT-2's final LayerNorm, the Llama family's
    final RMSNorm; megatron-core's too)."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in ("layer", "h", "layers") and parts[i + 1].isdigit():
            return int(parts[i + 1])
    if parts[0] in ("cls", "lm_head") or parts[:2] in (["transformer", "ln_f"], ["model", "norm"]) or \
            parts[:3] == ["gpt", "decoder", "final_layernorm"] or parts[:2] == ["gpt", "output_layer"]:
        return "head"
    return "embeddings"


PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "V100": 125.0}
"""Dense bf16/fp16 tensor-core peaks per device (vendor data sheets, SXM parts, no sparsity)."""


def peak_tflops(recipe: Recipe) -> float | None:
    """logging.peak_tflops, or the known peak of this GPU in bf16/fp16; None on CPU or in fp32."""
    if recipe.logging.peak_tflops is not None:
        return recipe.logging.peak_tflops
    if not torch.cuda.is_available() or recipe.train.precision == "fp32":
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)
