"""`b2b verify`: run a source and a grown model (HF directories, megatron-core checkpoints, DeepSpeed
ZeRO checkpoints and the universal checkpoints grown from them) on the same inputs and compare
outputs.

Logits are compared where the model has a head; a headless model's hidden states are
mapped back to the source's units through the hidden map (every map keeps source unit j
at target index j, so the first d_small units are the source's).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import GrowthError
from .files import EXACT_TOLERANCE, model_class, read_config, read_json, resolve

DEFAULT_TEXT = (
    "Growing a small pretrained transformer into a larger one reuses what the small one "
    "learned. The grown model starts from the knowledge of its seed and trains faster than "
    "a model initialised at random, which is the whole point of bert2BERT."
)
HEADED = ("logits", "prediction_logits", "seq_relationship_logits")


def load_model(path: Path):
    """The model at `path`, its config, and the directory holding its tokenizer: an HF directory; a
    megatron-core checkpoint read as the HF model of its config.json; a DeepSpeed ZeRO checkpoint
    (a run's checkpoint directory or one of its tags: the fp32 master weights, assembled from the
    rank files) or a grown universal checkpoint, each as the HF model of the config.json beside it."""
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    from .deepspeed import ZeroCheckpoint, find_config, is_checkpoint, read_universal, universal_tag
    from .megatron import hf_weights, open_source
    if universal_tag(path) is not None:
        cfg = read_config(path)
        return _from_state(cfg, read_universal(path), path), cfg, path
    if is_checkpoint(path):
        ckpt = ZeroCheckpoint(path)
        where = find_config(ckpt)
        cfg = read_config(where)
        return _from_state(cfg, {name: ckpt.read(name, "fp32") for name in ckpt.shapes}, path), cfg, where
    source = open_source(path)
    if source is not None:
        cfg, state = hf_weights(source)
        return _from_state(cfg, state, path), cfg, source.config_dir
    cfg = read_config(path)
    name = model_class(cfg, path)
    try:
        model = getattr(transformers, name).from_pretrained(path, dtype=torch.float32)
    except (OSError, RuntimeError, ValueError) as err:
        raise GrowthError(f"{path}: could not load the model ({str(err).splitlines()[0]})") from None
    return model.eval(), cfg, path


def _from_state(cfg: dict, state: dict[str, torch.Tensor], path: Path):
    """The HF model of `cfg` holding `state` (every parameter, a tied one under either name)."""
    import transformers
    name = model_class(cfg, path)
    model = getattr(transformers, name)(transformers.AutoConfig.for_model(**cfg))
    try:
        loaded = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # a shape that is not the config's
        raise GrowthError(f"{path}: the checkpoint does not make a {name} of its config.json "
                          f"({' '.join(str(err).split())[:300]})") from None
    own = model.state_dict()
    names_of: dict[int, list[str]] = {}  # a tied tensor (an output embedding, BERT's decoder bias) has two names
    for key, value in own.items():
        names_of.setdefault(value.data_ptr(), []).append(key)
    missing = [k for k in loaded.missing_keys if not any(n in state for n in names_of[own[k].data_ptr()])]
    if loaded.unexpected_keys or missing:
        raise GrowthError(f"{path}: the checkpoint does not make a {name} of its config.json (missing "
                          f"{missing}, unexpected {loaded.unexpected_keys})")
    return model.eval()


def sample_inputs(path: Path, cfg: dict, text: str | None) -> torch.Tensor:
    """Token ids of `text` (default: a fixed paragraph) when the source has a tokenizer,
    else fixed random ids."""
    limit = min(64, cfg.get("max_position_embeddings") or cfg.get("n_positions") or 64)
    if (path / "tokenizer.json").is_file() or (path / "vocab.txt").is_file() or text is not None:
        from transformers import AutoTokenizer
        try:
            tok = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as err:
            raise GrowthError(f"{path}: tokenizer does not load ({str(err).splitlines()[0]})") from None
        return tok(text or DEFAULT_TEXT, return_tensors="pt", truncation=True, max_length=limit)["input_ids"]
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, cfg["vocab_size"], (2, min(32, limit)), generator=gen)


def outputs(model, ids: torch.Tensor, hidden: int) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out = model(input_ids=ids)
    found = {k: out[k] for k in HEADED if k in out}
    if found:
        return found
    return {k: out[k][..., :hidden] for k in ("last_hidden_state", "pooler_output") if out.get(k) is not None}


def differences(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """Absolute differences, and both relative to the largest source output (max |a|), so that
    the mean relative figure never exceeds the max."""
    diff = (a.double() - b.double()).abs()
    scale = a.double().abs().max().clamp_min(1e-30)
    return {"max_abs": diff.max().item(), "mean_abs": diff.mean().item(),
            "max_rel": (diff.max() / scale).item(), "mean_rel": (diff.mean() / scale).item()}


def vocabulary(model, files: Path) -> dict[str, int] | int:
    """The model's token -> id map where it has a tokenizer, else its vocabulary size."""
    if (files / "tokenizer.json").is_file() or (files / "vocab.txt").is_file() or (files / "vocab.json").is_file():
        from transformers import AutoTokenizer
        try:
            return AutoTokenizer.from_pretrained(files).get_vocab()
        except (OSError, ValueError) as err:
            raise GrowthError(f"{files}: tokenizer does not load ({str(err).splitlines()[0]})") from None
    return model.config.vocab_size


def check_same_vocabulary(src: Path, grown: Path, src_model, grown_model, src_files: Path, grown_files: Path):
    """Growth keeps the vocabulary; a model given another one (b2b vocab transfer) computes another
    function of other token ids, so there is nothing to compare."""
    a, b = src_model.config.vocab_size, grown_model.config.vocab_size
    if a != b:
        raise GrowthError(f"{src} has {a} tokens and {grown} has {b}: verify compares a model with its growth, "
                          "which keeps the vocabulary; models with different vocabularies have no outputs to "
                          "compare")
    va, vb = vocabulary(src_model, src_files), vocabulary(grown_model, grown_files)
    if isinstance(va, dict) and isinstance(vb, dict) and va != vb:
        raise GrowthError(f"{src} and {grown} have different tokenizers (of {a} tokens each): verify compares a "
                          "model with its growth, which keeps the tokenizer")


def compare(src: str | Path, grown: str | Path, text: str | None = None) -> dict[str, dict[str, float]]:
    src, grown = resolve(src), resolve(grown)
    src_model, src_cfg, src_files = load_model(src)
    grown_model, _, grown_files = load_model(grown)
    if type(src_model) is not type(grown_model):
        raise GrowthError(f"{type(src_model).__name__} vs {type(grown_model).__name__}: not the same architecture")
    check_same_vocabulary(src, grown, src_model, grown_model, src_files, grown_files)
    hidden = src_model.config.hidden_size
    ids = sample_inputs(src_files, src_cfg, text)
    a, b = outputs(src_model, ids, hidden), outputs(grown_model, ids, hidden)
    return {k: differences(a[k], b[k]) for k in a}


def verify(src: str | Path, grown: str | Path, text_file: str | None = None, log=print) -> int:
    """Print the differences; return 1 when growth.json calls the growth exact and it is not."""
    grown_path = resolve(grown)
    manifest_file = grown_path / "growth.json"
    manifest = read_json(manifest_file, "growth manifest") if manifest_file.is_file() else None
    text = None
    if text_file is not None:
        try:
            text = Path(text_file).read_text()
        except OSError as err:
            raise GrowthError(f"--text {text_file}: {err.strerror}") from None
    report = compare(src, grown_path, text)
    for name, d in report.items():
        log(f"{name:>24}: max abs {d['max_abs']:.3e}  mean abs {d['mean_abs']:.3e}  "
            f"max rel {d['max_rel']:.3e}  mean rel {d['mean_rel']:.3e}")
    worst = max(d["max_rel"] for d in report.values())
    if manifest is None:
        log("no growth.json: nothing is claimed exact")
        return 0
    if manifest.get("exact"):
        ok = worst <= EXACT_TOLERANCE
        log(f"growth.json says exact: {'OK' if ok else 'FAILED'} "
            f"(max rel {worst:.3e}, tolerance {EXACT_TOLERANCE:g})")
        return 0 if ok else 1
    log(f"growth.json says not exact: {manifest.get('exact_reason')}")
    return 0
