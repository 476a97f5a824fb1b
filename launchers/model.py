"""The model a recipe trains (HF BertForMaskedLM or GPT2LMHeadModel), and its analytic FLOPs.

Knows nothing of DeepSpeed: the trainer wraps what this returns.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from growth import Shape

from .config import Recipe, RecipeError


def build_model(recipe: Recipe, tokenizer):
    """A fresh model of the recipe's shape (seeded), or the HF directory in model.init_from."""
    from transformers import (AutoModelForCausalLM, AutoModelForMaskedLM, BertConfig, BertForMaskedLM, GPT2Config,
                              GPT2LMHeadModel)
    m = recipe.model
    vocab = len(tokenizer)
    dropout = {"hidden_dropout_prob": m.dropout, "attention_probs_dropout_prob": m.dropout} if m.arch == "bert" \
        else {"resid_pdrop": m.dropout, "embd_pdrop": m.dropout, "attn_pdrop": m.dropout}
    torch.manual_seed(recipe.seed)  # also for what a start model lacks (a new MLM head): the same on every rank
    start = recipe.start_model
    if start is not None:
        auto = AutoModelForMaskedLM if m.arch == "bert" else AutoModelForCausalLM
        model = auto.from_pretrained(str(start), dtype=torch.float32, **dropout)
        if model.config.vocab_size != vocab:
            raise RecipeError(f"model: {start} has a vocabulary of {model.config.vocab_size} rows but the "
                              f"tokenizer has {vocab} tokens: use the model's own tokenizer (leave data.tokenizer "
                              "unset) or transfer the vocabulary first (b2b vocab)")
    elif m.arch == "bert":
        model = BertForMaskedLM(BertConfig(
            vocab_size=vocab, hidden_size=m.hidden, num_hidden_layers=m.layers, num_attention_heads=m.heads,
            intermediate_size=m.ffn, max_position_embeddings=m.max_positions, pad_token_id=tokenizer.pad_token_id,
            **dropout))
    else:
        model = GPT2LMHeadModel(GPT2Config(
            vocab_size=vocab, n_embd=m.hidden, n_layer=m.layers, n_head=m.heads, n_inner=m.ffn,
            n_positions=m.max_positions, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
            **dropout))
    model.config.use_cache = False  # training: no key/value cache
    return model


def _block_and_head_flops(shape: Shape, seq_len: int, vocab: int, arch: str) -> tuple[int, int]:
    h, f = shape.hidden, shape.ffn
    return 8 * h * h + 4 * h * f + 4 * seq_len * h, 2 * h * vocab + (2 * h * h if arch == "bert" else 0)


def forward_flops_per_token(shape: Shape, seq_len: int, vocab: int, arch: str, layers: int | None = None) -> float:
    """Matrix-multiply FLOPs (2 per multiply-add) of one token's forward pass through `layers`
    blocks (default all) and the LM head: per block the Q, K, V and output projections (8 h^2),
    the FFN (4 h f) and attention scores and their weighted sum over the sequence (4 s h); the
    head's vocabulary projection (2 h V) and, for BERT, its dense transform (2 h^2). Causal
    attention is counted over the full sequence, as Megatron-LM and the bert2BERT paper do."""
    block, head = _block_and_head_flops(shape, seq_len, vocab, arch)
    return (shape.layers if layers is None else layers) * block + head


def train_flops_per_token(shape: Shape, seq_len: int, vocab: int, arch: str, active: int | None = None,
                          traversed: int | None = None) -> float:
    """Forward of the bottom `active` blocks (default all) and the head, plus the backward,
    counted as twice the forward, of the head and the top `traversed` of those blocks (default
    all active): the blocks gradients flow through. Exact for full training; for a stage-1
    sub-model it is an upper bound by the input gradient of the lowest trained block and the
    weight gradient of a frozen tied head, which autograd skips."""
    block, head = _block_and_head_flops(shape, seq_len, vocab, arch)
    active = shape.layers if active is None else active
    traversed = active if traversed is None else traversed
    return active * block + head + 2 * (traversed * block + head)


@contextmanager
def bottom_blocks(model, n: int):
    """Run only the bottom `n` transformer blocks of an HF BertForMaskedLM / GPT2LMHeadModel
    (a bert2BERT stage-1 sub-model: embeddings, those blocks, the LM head)."""
    parent, attr = (model.bert.encoder, "layer") if hasattr(model, "bert") else (model.transformer, "h")
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
    index, or 'head' (BERT's MLM transform and bias, GPT-2's final LayerNorm)."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in ("layer", "h") and parts[i + 1].isdigit():
            return int(parts[i + 1])
    if parts[0] == "cls" or parts[:2] == ["transformer", "ln_f"] or parts[0] == "lm_head":
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
