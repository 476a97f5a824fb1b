"""GGUF files (llama.cpp's format) as growth sources: dequantised once by transformers into an HF
model directory, which is cached and then read like any other. What needs only the config and
the tokenizer (a recipe's checks, a dry run) reads them from the file's metadata instead, into a
directory of their own, without dequantising the weights.

transformers reads a GGUF file with `from_pretrained(dir, gguf_file=name)` (it needs the `gguf`
package) and dequantises it to float32. A model loaded that way refuses `save_pretrained`, so
the directory is written from a model rebuilt from its config (without the quantisation entry)
and its state dict, with the tokenizer read from the same file. The cache is keyed by the file's
content: $B2B_CACHE/gguf/<sha256 prefix>-<name> (B2B_CACHE defaults to ~/.cache/b2b).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from ..errors import GrowthError
from .files import atomic_directory, sha256


def cache_root() -> Path:
    return Path(os.environ.get("B2B_CACHE") or Path.home() / ".cache" / "b2b")


def hf_directory(file: Path, log=print) -> Path:
    """The HF directory of a GGUF file's model, converted on first use."""
    out = _cached(file)
    if (out / "config.json").is_file():
        return out
    check_architecture(file)
    log(f"{file.name}: dequantising the GGUF model into {out} (once)")
    with _quiet():
        model, tokenizer = _load(file)
        with atomic_directory(out) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    return out


def config_directory(file: Path) -> Path:
    """A directory with the GGUF model's config.json and tokenizer, read from the file's metadata
    on first use (seconds, where dequantising takes most of a minute); the full directory if it
    is there already."""
    full = _cached(file)
    if (full / "config.json").is_file():
        return full
    out = full.with_name(full.name + ".config")
    if (out / "config.json").is_file():
        return out
    check_architecture(file)
    import transformers
    with _quiet():
        try:
            config = transformers.AutoConfig.from_pretrained(file.parent, gguf_file=file.name)
            tokenizer = transformers.AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
        except (ValueError, KeyError, OSError, RuntimeError) as err:
            raise GrowthError(f"{file}: cannot read this GGUF file: {str(err).splitlines()[0][:200]}") from None
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
        with atomic_directory(out) as tmp:
            config.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    return out


GROWN = ("llama", "mistral", "qwen2", "gpt2")  # GGUF's general.architecture of the models b2b grows


def check_architecture(file: Path) -> None:
    """Refuse, before anything is dequantised or cached, a GGUF file of a model b2b does not grow
    (its general.architecture, read from the header)."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise GrowthError(f"{file}: reading GGUF files needs the gguf package (pip install gguf)") from None
    try:
        field = GGUFReader(str(file)).fields["general.architecture"]
        arch = bytes(field.parts[field.data[0]]).decode()
    except (ValueError, KeyError, IndexError, OSError, UnicodeDecodeError) as err:
        raise GrowthError(f"{file}: cannot read this GGUF file ({type(err).__name__}: "
                          f"{str(err).splitlines()[0][:200] if str(err) else 'no general.architecture'})") from None
    if arch not in GROWN:
        raise GrowthError(f"{file}: a GGUF model of architecture {arch!r}; b2b grows {', '.join(GROWN)}")


def _cached(file: Path) -> Path:
    if not file.is_file():
        raise GrowthError(f"{file}: no such GGUF file")
    return cache_root() / "gguf" / f"{sha256([file])[:16]}-{file.stem}"


@contextlib.contextmanager
def _quiet():
    """transformers' warnings and the dequantisation's and the writer's progress bars, off."""
    import transformers
    verbosity, bars = transformers.logging.get_verbosity(), os.environ.get("TQDM_DISABLE")
    transformers.logging.set_verbosity_error()
    os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = bars


def _load(file: Path):
    import transformers
    try:
        loaded = transformers.AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name)
        tokenizer = transformers.AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    except (ValueError, KeyError, OSError, RuntimeError) as err:
        raise GrowthError(f"{file}: cannot read this GGUF file: {str(err).splitlines()[0][:200]}") from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(loaded)(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise GrowthError(f"{file}: the dequantised weights do not fit {type(model).__name__}")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval(), tokenizer
