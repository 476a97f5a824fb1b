"""Model shapes: the numbers growth changes (layers, hidden, heads, FFN, and for grouped-query
attention the key/value heads), presets, and target parsing."""

from __future__ import annotations

import dataclasses

from .errors import GrowthError


@dataclasses.dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    heads: int
    ffn: int
    kv_heads: int | None = None  # grouped-query attention's key/value heads; None: one per query head

    def __post_init__(self):
        if self.kv_heads is None:
            object.__setattr__(self, "kv_heads", self.heads)
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or value < 1:
                raise GrowthError(f"shape {field.name}={value!r}: must be a positive integer")
        if self.hidden % self.heads:
            raise GrowthError(
                f"heads={self.heads} does not divide hidden={self.hidden}: "
                "choose heads so that hidden / heads is a whole head_dim")
        if self.heads % self.kv_heads:
            raise GrowthError(f"kv_heads={self.kv_heads} does not divide heads={self.heads}: every key/value "
                              "head serves a whole group of query heads")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def group(self) -> int:
        """Query heads per key/value head (1 without grouped-query attention)."""
        return self.heads // self.kv_heads

    def __str__(self) -> str:
        kv = f",kv_heads={self.kv_heads}" if self.kv_heads != self.heads else ""
        return f"layers={self.layers},hidden={self.hidden},heads={self.heads}{kv},ffn={self.ffn}"


LLAMA_PRESETS = {  # Llama-family shapes (grouped-query attention)
    "smollm2-135m": Shape(30, 576, 9, 1536, kv_heads=3),
    "smollm2-360m": Shape(32, 960, 15, 2560, kv_heads=5),
    "smollm2-1.7b": Shape(24, 2048, 32, 8192, kv_heads=32),
    "tinyllama-1.1b": Shape(22, 2048, 32, 5632, kv_heads=4),
    "llama-3.2-1b": Shape(16, 2048, 32, 8192, kv_heads=8),
    "llama-3.2-3b": Shape(28, 3072, 24, 8192, kv_heads=8),
    "qwen2.5-0.5b": Shape(24, 896, 14, 4864, kv_heads=2),
    "qwen2.5-1.5b": Shape(28, 1536, 12, 8960, kv_heads=2),
}
PRESETS = {
    "bert-base": Shape(12, 768, 12, 3072),
    "bert-large": Shape(24, 1024, 16, 4096),
    "gpt-half": Shape(12, 512, 8, 2048),
    "gpt-base": Shape(12, 768, 12, 3072),
    **LLAMA_PRESETS,
}

# HF model types of the Llama family: causal LMs with RMSNorm, SwiGLU, RoPE and grouped-query
# attention, whose HF module names and config keys are the same.
LLAMA_FAMILY = ("llama", "mistral", "qwen2")

# HF config keys holding the shape, per model_type.
CONFIG_KEYS = {
    "bert": {"layers": "num_hidden_layers", "hidden": "hidden_size",
             "heads": "num_attention_heads", "ffn": "intermediate_size"},
    "gpt2": {"layers": "n_layer", "hidden": "n_embd", "heads": "n_head", "ffn": "n_inner"},
    **{family: {"layers": "num_hidden_layers", "hidden": "hidden_size", "heads": "num_attention_heads",
                "ffn": "intermediate_size", "kv_heads": "num_key_value_heads"}
       for family in LLAMA_FAMILY},
}


def shape_from_config(cfg: dict) -> Shape:
    model_type = cfg.get("model_type")
    if model_type not in CONFIG_KEYS:
        raise GrowthError(
            f"unknown architecture model_type={model_type!r}: supported are {sorted(CONFIG_KEYS)}")
    keys = CONFIG_KEYS[model_type]
    values = {name: cfg.get(key) for name, key in keys.items()}
    if model_type == "gpt2" and values["ffn"] is None:
        values["ffn"] = 4 * values["hidden"]  # GPT-2's default n_inner
    if "kv_heads" in values and values["kv_heads"] is None:
        values["kv_heads"] = values["heads"]  # HF's default: multi-head attention
    missing = [keys[n] for n, v in values.items() if v is None]
    if missing:
        raise GrowthError(f"config is missing {missing}")
    shape = Shape(**values)
    if cfg.get("head_dim") not in (None, shape.head_dim):
        raise GrowthError(f"head_dim={cfg['head_dim']} is not hidden_size / num_attention_heads = {shape.head_dim}; "
                          "models with a separate head_dim are not supported")
    return shape


def parse_target(spec: str, source: Shape) -> Shape:
    """A preset name or 'layers=..,hidden=..,heads=..,kv_heads=..,ffn=..' (keys left out keep the
    source's value; kv_heads left out keeps the source's query heads per key/value head). A target
    given as an HF config.json is read by the adapters (adapters.files.target_shape)."""
    if spec in PRESETS:
        return PRESETS[spec]
    if "=" in spec:
        values = dataclasses.asdict(source)
        given = set()
        for item in spec.split(","):
            key, _, value = item.partition("=")
            key = key.strip()
            if key not in values:
                raise GrowthError(f"--to: unknown key {key!r}: use layers, hidden, heads, kv_heads, ffn")
            try:
                values[key] = int(value)
            except ValueError:
                raise GrowthError(f"--to: {key}={value!r} is not an integer") from None
            given.add(key)
        if "kv_heads" not in given:
            values["kv_heads"] = values["heads"] // source.group if values["heads"] % source.group == 0 else None
            if values["kv_heads"] is None:
                raise GrowthError(f"--to: heads={values['heads']} is not a multiple of the source's "
                                  f"{source.group} query heads per key/value head: give kv_heads=")
        return Shape(**values)
    raise GrowthError(
        f"--to {spec!r}: not a preset ({', '.join(PRESETS)}), not a config.json, "
        "and not 'layers=..,hidden=..,heads=..,ffn=..'")


def check_growable(source: Shape, target: Shape) -> None:
    smaller = [f"{name} {getattr(source, name)} -> {getattr(target, name)}"
               for name in ("layers", "hidden", "heads", "kv_heads", "ffn", "head_dim")
               if getattr(target, name) < getattr(source, name)]
    if smaller:
        raise GrowthError(f"target is smaller than the source on: {', '.join(smaller)}; "
                          "growth only enlarges a model")
    if target.group < source.group:
        raise GrowthError(f"target groups of {target.group} query heads per key/value head cannot hold the "
                          f"source's groups of {source.group}: every target group copies one source group, so "
                          "it needs at least as many query heads (raise heads or lower kv_heads)")
