"""Model shapes: the four numbers growth changes, presets, and target parsing."""

from __future__ import annotations

import dataclasses

from .errors import GrowthError


@dataclasses.dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    heads: int
    ffn: int

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or value < 1:
                raise GrowthError(f"shape {field.name}={value!r}: must be a positive integer")
        if self.hidden % self.heads:
            raise GrowthError(
                f"heads={self.heads} does not divide hidden={self.hidden}: "
                "choose heads so that hidden / heads is a whole head_dim")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def __str__(self) -> str:
        return f"layers={self.layers},hidden={self.hidden},heads={self.heads},ffn={self.ffn}"


PRESETS = {
    "bert-base": Shape(12, 768, 12, 3072),
    "bert-large": Shape(24, 1024, 16, 4096),
    "gpt-half": Shape(12, 512, 8, 2048),
    "gpt-base": Shape(12, 768, 12, 3072),
}

# HF config keys holding the shape, per model_type.
CONFIG_KEYS = {
    "bert": {"layers": "num_hidden_layers", "hidden": "hidden_size",
             "heads": "num_attention_heads", "ffn": "intermediate_size"},
    "gpt2": {"layers": "n_layer", "hidden": "n_embd", "heads": "n_head", "ffn": "n_inner"},
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
    missing = [keys[n] for n, v in values.items() if v is None]
    if missing:
        raise GrowthError(f"config is missing {missing}")
    return Shape(**values)


def parse_target(spec: str, source: Shape) -> Shape:
    """A preset name or 'layers=..,hidden=..,heads=..,ffn=..' (keys left out keep the source's
    value). A target given as an HF config.json is read by the adapters (adapters.files.target_shape)."""
    if spec in PRESETS:
        return PRESETS[spec]
    if "=" in spec:
        values = dataclasses.asdict(source)
        for item in spec.split(","):
            key, _, value = item.partition("=")
            key = key.strip()
            if key not in values:
                raise GrowthError(f"--to: unknown key {key!r}: use layers, hidden, heads, ffn")
            try:
                values[key] = int(value)
            except ValueError:
                raise GrowthError(f"--to: {key}={value!r} is not an integer") from None
        return Shape(**values)
    raise GrowthError(
        f"--to {spec!r}: not a preset ({', '.join(PRESETS)}), not a config.json, "
        "and not 'layers=..,hidden=..,heads=..,ffn=..'")


def check_growable(source: Shape, target: Shape) -> None:
    smaller = [f"{name} {getattr(source, name)} -> {getattr(target, name)}"
               for name in ("layers", "hidden", "heads", "ffn", "head_dim")
               if getattr(target, name) < getattr(source, name)]
    if smaller:
        raise GrowthError(f"target is smaller than the source on: {', '.join(smaller)}; "
                          "growth only enlarges a model")
