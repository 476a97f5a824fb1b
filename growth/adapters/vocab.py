"""`b2b vocab transfer`: an HF model directory given another tokenizer (growth/vocab.py's plan).

The format edge of the vocabulary transfer: reads the model (config.json, safetensors or a
weights-only torch file) and both tokenizers (HF fast tokenizers: WordPiece or byte-level
BPE), rewrites every vocabulary-indexed tensor with one plan, and writes an HF directory with
the new tokenizer, the updated config and a manifest (transfer.json) atomically: a hidden
temporary sibling renamed into place, removed on any error, so a failure writes nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import GrowthError
from ..schema import schema_for
from ..vocab import MAX_SEGMENTATIONS, METHODS, Plan, apply_plan, byte_level_form, plan_transfer, wordpiece_form
from .files import (
    atomic_directory,
    dump_manifest,
    has_tied_output,
    model_class,
    open_weights,
    read_config,
    resolve,
    sha256,
    weight_files,
)
from .safetensors_io import write_streaming

# per architecture: (input embedding, the other vocabulary-indexed tensors), schema templates
VOCAB_PARAMS = {
    "bert": ("embeddings.word_embeddings.weight",
             ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias", "cls.predictions.bias")),
    "gpt2": ("wte.weight", ("lm_head.weight",)),
}
OUTPUT_WEIGHTS = {"cls.predictions.decoder.weight", "lm_head.weight"}


def load_tokenizer(path: str | Path, what: str):
    """An HF fast tokenizer from a tokenizer or model directory (or 'minilm')."""
    from transformers import AutoTokenizer
    path = resolve(path) if str(path) == "minilm" else Path(path)
    if not path.is_dir():
        raise GrowthError(f"{what} {path}: no such directory")
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except Exception as err:  # transformers raises many kinds for unreadable files
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise GrowthError(f"{what} {path}: cannot load a tokenizer ({reason})") from None
    if not getattr(tok, "is_fast", False):
        raise GrowthError(f"{what} {path}: not a fast tokenizer (no tokenizer.json); save it with transformers first")
    return tok


def token_form(tok, what: str):
    """The normalised-form function of a tokenizer's convention (WordPiece or byte-level BPE)."""
    spec = json.loads(tok.backend_tokenizer.to_str())
    model = spec["model"]
    if model["type"] == "WordPiece":
        prefix = model.get("continuing_subword_prefix") or "##"
        return lambda token: wordpiece_form(token, prefix)
    if model["type"] == "BPE" and "ByteLevel" in json.dumps(spec.get("pre_tokenizer")):
        return byte_level_form
    raise GrowthError(f"{what}: a {model['type']} tokenizer; supported are WordPiece and byte-level BPE")


def roles(tok) -> dict[str, str]:
    """role ('cls', 'eos', ...) -> special token string."""
    return {k.removesuffix("_token"): v for k, v in tok.special_tokens_map.items()
            if k.endswith("_token") and isinstance(v, str)}


def _first(*ids):
    return next((i for i in ids if i is not None), None)


def target_config(cfg: dict, tok) -> dict:
    """The config for the new vocabulary: its size and the special ids the architecture reads."""
    out = dict(cfg, vocab_size=len(tok))
    if cfg["model_type"] == "bert":
        out["pad_token_id"] = tok.pad_token_id
    else:
        eos = _first(tok.eos_token_id, tok.sep_token_id)
        bos = _first(tok.bos_token_id, tok.cls_token_id, eos)
        out.update(bos_token_id=bos, eos_token_id=eos, pad_token_id=tok.pad_token_id)
    return out


def plan_for(source_tok, target_tok, method: str, tokenizer_path) -> Plan:
    normalizer = source_tok.backend_tokenizer.normalizer
    return plan_transfer(
        source_tok.get_vocab(), target_tok.get_vocab(), token_form(source_tok, "the model's tokenizer"),
        token_form(target_tok, str(tokenizer_path)), normalizer.normalize_str if normalizer else (lambda s: s),
        roles(source_tok), roles(target_tok), method)


def transfer_directory(src: str | Path, tokenizer: str | Path, out: str | Path, method: str = "vipi",
                       seed: int = 0, log=print) -> dict:
    """`b2b vocab transfer`: write `src` with the tokenizer `tokenizer` into `out`; returns the manifest."""
    out = Path(out)
    if out.exists():
        raise GrowthError(f"{out} exists; choose a new output directory")
    if method not in METHODS:
        raise GrowthError(f"--method {method!r}: use one of {', '.join(METHODS)}")
    src = resolve(src)
    cfg = read_config(src)
    schema = schema_for(cfg["model_type"])
    tied = has_tied_output(cfg, model_class(cfg, src))
    source_tok = load_tokenizer(src, "the model's tokenizer in")
    target_tok = load_tokenizer(tokenizer, "--to-tokenizer")
    files = weight_files(src)
    weights = open_weights(files)
    by_template = {schema.split(name)[1]: name for name in weights.shapes}
    embed_template, others = VOCAB_PARAMS[cfg["model_type"]]
    if embed_template not in by_template:
        raise GrowthError(f"{src}: no input embeddings ({embed_template}) in the weights; "
                          "the vocabulary transfer rewrites them")
    embed = by_template[embed_template]
    rows = weights.shapes[embed][0]
    if len(source_tok) > rows:
        raise GrowthError(f"{src}: its tokenizer has {len(source_tok)} tokens but the embeddings only {rows} rows")
    plan = plan_for(source_tok, target_tok, method, tokenizer)
    rewritten = [embed] + [by_template[t] for t in others if t in by_template]
    manifest = {"source": str(src), "source_sha256": sha256(files), "tokenizer": str(tokenizer), "method": method,
                "seed": seed, "source_vocab": len(source_tok), "target_vocab": len(target_tok),
                "coverage": plan.coverage(), "specials": plan.specials, "tied": tied, "rewritten": rewritten,
                "max_segmentations": MAX_SEGMENTATIONS, "examples": plan.examples}
    log(f"vocabulary {len(source_tok)} -> {len(target_tok)} tokens ({method}): "
        + ", ".join(f"{v} {k}" for k, v in plan.coverage().items()))

    std = float(cfg.get("initializer_range", 0.02))
    gen = torch.Generator().manual_seed(seed)
    new = {}
    for name in rewritten:
        template = schema.split(name)[1]
        if tied and template in OUTPUT_WEIGHTS:
            continue  # a tied output is the new input embedding (below)
        new[name] = apply_plan(plan, weights[name], std if weights[name].dim() > 1 else None, gen)
    for name in rewritten:
        if name not in new:
            new[name] = new[embed]

    def tensors():
        for name in weights.shapes:
            yield name, new[name] if name in new else weights[name]

    with atomic_directory(out) as tmp:
        layout = [(name, tuple(new[name].shape) if name in new else weights.shapes[name], weights.dtypes[name])
                  for name in weights.shapes]
        write_streaming(tmp / "model.safetensors", layout, tensors())
        (tmp / "config.json").write_text(json.dumps(target_config(cfg, target_tok), indent=2) + "\n")
        target_tok.save_pretrained(str(tmp))
        (tmp / "transfer.json").write_text(dump_manifest(manifest))
    log(f"wrote {out}")
    return manifest

