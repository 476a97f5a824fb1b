"""The model a recipe trains (HF BertForMaskedLM or GPT2LMHeadModel), and its analytic FLOPs.

Knows nothing of DeepSpeed: the trainer wraps what this returns.
"""

from __future__ import annotations

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
    torch.manual_seed(recipe.seed)  # also for what init_from lacks (a new MLM head): the same on every rank
    if m.init_from is not None:
        from growth.adapters.hf import resolve
        auto = AutoModelForMaskedLM if m.arch == "bert" else AutoModelForCausalLM
        model = auto.from_pretrained(str(resolve(m.init_from)), dtype=torch.float32, **dropout)
        if model.config.vocab_size != vocab:
            raise RecipeError(f"model.init_from: the model's vocabulary has {model.config.vocab_size} rows but the "
                              f"tokenizer has {vocab} tokens: use the model's own tokenizer (leave data.tokenizer "
                              "unset) or transfer the vocabulary first (b2b vocab)")
        return model
    if m.arch == "bert":
        cfg = BertConfig(vocab_size=vocab, hidden_size=m.hidden, num_hidden_layers=m.layers,
                         num_attention_heads=m.heads, intermediate_size=m.ffn, max_position_embeddings=m.max_positions,
                         pad_token_id=tokenizer.pad_token_id, **dropout)
        return BertForMaskedLM(cfg)
    cfg = GPT2Config(vocab_size=vocab, n_embd=m.hidden, n_layer=m.layers, n_head=m.heads, n_inner=m.ffn,
                     n_positions=m.max_positions, bos_token_id=tokenizer.eos_token_id,
                     eos_token_id=tokenizer.eos_token_id, **dropout)
    return GPT2LMHeadModel(cfg)


def forward_flops_per_token(shape: Shape, seq_len: int, vocab: int, arch: str, layers: int | None = None) -> float:
    """Matrix-multiply FLOPs (2 per multiply-add) of one token's forward pass through `layers`
    blocks (default all) and the LM head: per block the Q, K, V and output projections (8 h^2),
    the FFN (4 h f) and attention scores and their weighted sum over the sequence (4 s h); the
    head's vocabulary projection (2 h V) and, for BERT, its dense transform (2 h^2). Causal
    attention is counted over the full sequence, as Megatron-LM and the bert2BERT paper do."""
    h, f = shape.hidden, shape.ffn
    block = 8 * h * h + 4 * h * f + 4 * seq_len * h
    head = 2 * h * vocab + (2 * h * h if arch == "bert" else 0)
    return (shape.layers if layers is None else layers) * block + head


def train_flops_per_token(shape: Shape, seq_len: int, vocab: int, arch: str) -> float:
    """Forward plus backward (twice the forward) of the whole model."""
    return 3 * forward_flops_per_token(shape, seq_len, vocab, arch)


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
