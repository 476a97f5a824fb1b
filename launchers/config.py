"""Recipes: YAML files read into one typed config tree, checked before any process starts.

A recipe may name a `base:` recipe (a path relative to itself) and then only the keys that
differ. Unknown or duplicate keys, wrong types, impossible values and missing files raise
`RecipeError` naming the key and the fix. The DeepSpeed JSON is generated here from the
tree (`deepspeed_config`), never kept beside the recipe.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from growth import B2BError, GrowthError, Shape

ARCHS = ("bert", "gpt2")
PRECISIONS = ("fp32", "bf16", "fp16")
SCHEDULES = ("linear", "cosine", "constant")
STAGE1_SAMPLING = ("uniform", "cyclic")
TOKENIZER_KINDS = ("wordpiece", "bpe")  # trained on the corpus by `b2b tokenizer` / the data pipeline
VERBOSE = "B2B_VERBOSE"  # "1" in the workers' environment: DeepSpeed's and megatron's routine output kept


class RecipeError(B2BError):
    """A bad recipe or command line: the message names the key and how to fix it."""


@dataclass
class GrowthConfig:
    width: str = "aki"  # fpi | aki | direct | exact (b2b grow --width)
    depth: str = "stack"  # stack | identity (b2b grow --depth)
    seed: int = 0
    symmetry: str = "none"  # none | split (b2b grow --break-symmetry)


@dataclass
class ModelConfig:
    arch: str | None = None  # bert (masked LM) or gpt2 (causal LM); read from init_from when set
    layers: int | None = None
    hidden: int | None = None
    heads: int | None = None
    ffn: int | None = None
    max_positions: int = 512
    dropout: float = 0.1
    init_from: str | None = None  # an HF model directory or a grown DeepSpeed checkpoint (`b2b grow`)
    grow_from: str | None = None  # a smaller HF model, grown (model.growth) to this shape into RUN/grown first
    growth: GrowthConfig = field(default_factory=GrowthConfig)


@dataclass
class DataConfig:
    files: list[str] | None = None  # local .txt/.jsonl/.json/.parquet files (else the offline corpus)
    hub: str | None = None  # a hub dataset name (downloads at run time)
    hub_config: str | None = None  # its configuration, e.g. wikitext-103-raw-v1
    text_field: str = "text"
    tokenizer: str | None = None  # a tokenizer/model dir, 'minilm', 'wordpiece' or 'bpe' (trained)
    vocab_size: int = 8192  # for a trained tokenizer
    seq_len: int = 128
    val_fraction: float = 0.05
    max_documents: int | None = None
    cache_dir: str = "runs/cache"


@dataclass
class ObjectiveConfig:
    mask_prob: float = 0.15  # masked LM (bert): 80% [MASK], 10% random, 10% kept


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.01
    warmup_steps: int = 1  # linear from the floor; step 1 runs at the floor (as HF schedules)
    schedule: str = "linear"  # linear decay, cosine decay or constant after warmup
    min_lr_ratio: float = 0.0  # the floor as a fraction of lr (linear: warmup starts there too)
    decay_steps: int | None = None  # linear/cosine: the decay reaches the floor here, then stays (default train.steps)
    grad_clip: float = 1.0


@dataclass
class BatchConfig:
    micro: int = 8  # sequences per process per micro step
    accum: int | None = None  # gradient accumulation; unset: global_size / (micro x data-parallel size), or 1
    global_size: int | None = None  # sequences per optimizer step = micro x accum x data-parallel size


@dataclass
class ZeroConfig:
    stage: int = 0


@dataclass
class TrainConfig:
    steps: int = 100
    precision: str = "fp32"
    eval_every: int = 50
    eval_batches: int = 4
    eval_at_start: bool = True  # validate the starting model at step 0 (a fresh run: not on resume)
    eval_early_every: int = 0  # also validate every N steps up to train.eval_early_until (the early curve; 0: off)
    eval_early_until: int = 0
    stop_at: int | None = None  # checkpoint and stop after this step, as if preempted


@dataclass
class Stage1Config:
    """bert2BERT's stage 1: each step trains a sub-model of the bottom k x block layers (plus the
    head), updating only its top `block` layers; stage 2 (the remaining steps) trains the full model."""
    steps: int = 0  # stage-1 steps (0: no stage 1, ordinary training)
    block: int = 3  # l_b: layers trained per step; sub-model depths block, 2 block, ..., model.layers
    sampling: str = "uniform"  # uniform over the depths, or cyclic (bottom-up, one depth per step)
    train_embeddings: bool = False  # embeddings (and a head tied to them) also train in stage 1
    train_head: bool = True  # the LM head (its untied parts) trains in stage 1


@dataclass
class ProgressiveConfig:
    """Progressive stacking inside one run: the model starts with layers[0] blocks and trains
    steps[0] steps, is stacked ([0..n-1, 0..n-1, ...]) to layers[1], and so on; after the listed
    phases it is stacked to model.layers and trains the remaining steps (StackBERT). With
    freeze_lower, each phase after a growth trains only the new top blocks and the head (MSLT);
    the final phase trains everything. With ZeRO, each growth grows the live sharded checkpoint
    (b2b grow's DeepSpeed path) and Adam's state starts afresh or is grown with it (optimizer)."""
    layers: list[int] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    freeze_lower: bool = False
    optimizer: str = "reset"  # at each growth: fresh Adam (reset) or its moments grown with the model (grow, ZeRO >= 1)


@dataclass
class ParallelConfig:
    """Model parallelism: with tensor > 1 a GPT-2 recipe trains megatron-core's GPTModel with its
    layers split over `tensor` processes (launchers/megatron.py); data parallelism and ZeRO stage
    0 or 1 run over the remaining factor (processes / tensor)."""
    tensor: int = 1  # tensor-parallel degree; must divide model.heads and model.ffn
    megatron: bool = False  # megatron-core's GPTModel even at tensor 1 (e.g. to compare with a tensor 2 run)


@dataclass
class CheckpointConfig:
    every: int = 0  # steps between checkpoints (0: only at the end and on a signal)
    keep: int = 2


@dataclass
class LoggingConfig:
    every: int = 1
    tensorboard: bool = True
    peak_tflops: float | None = None  # per device; None: known GPUs only, so no MFU on CPU
    progress: bool = True  # a progress bar on rank 0 when attached to a terminal


@dataclass
class Recipe:
    name: str = "run"
    method: str | None = None  # the label `b2b report` groups runs by (default: name)
    setting: str | None = None  # the swept keys of this run (`b2b run`'s sweep), e.g. "optim.lr=0.002"
    out_dir: str | None = None  # default runs/<name>
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    progressive: ProgressiveConfig = field(default_factory=ProgressiveConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir or f"runs/{self.name}")

    @property
    def start_model(self) -> Path | None:
        """The HF directory the model starts from: init_from, or grow_from grown into RUN/grown."""
        if self.model.grow_from is not None:
            from .checkpoint import RunDir
            return RunDir(self.run_dir).grown
        if self.model.init_from is not None:
            from growth.adapters.files import resolve
            return resolve(self.model.init_from)
        return None

    @property
    def megatron(self) -> bool:
        """The model is megatron-core's GPTModel (tensor parallelism, or parallel.megatron)."""
        return self.parallel.tensor > 1 or self.parallel.megatron

    @property
    def shape(self) -> Shape:
        m = self.model
        return Shape(m.layers, m.hidden, m.heads, m.ffn)


# ---------------------------------------------------------------- reading YAML


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping."""


def _mapping(loader, node, deep=False):
    seen = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise RecipeError(f"duplicate key {key!r} (line {seen[key]} and line {key_node.start_mark.line + 1}): "
                              "keep one")
        seen[key] = key_node.start_mark.line + 1
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise RecipeError(f"{path}: no such recipe file")
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except RecipeError as err:
        raise RecipeError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML ({err})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of sections, got {type(data).__name__}")
    return data


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_raw(path: Path, _chain: tuple = ()) -> dict:
    """The recipe's mapping with its `base:` chain merged in (the recipe's own keys win)."""
    path = Path(path).resolve()
    if path in _chain:
        raise RecipeError(f"{path}: base recipes form a cycle: {' -> '.join(map(str, _chain + (path,)))}")
    data = read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise RecipeError(f"{path}: base: expected a recipe path, got {base!r}")
    return merge(load_raw(path.parent / base, _chain + (path,)), data)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """`key.sub=value` overrides; the value is read as YAML (numbers, lists, null)."""
    data = merge({}, data)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise RecipeError(f"--set {item!r}: expected key=value, e.g. --set optim.lr=3e-4")
        value = yaml.safe_load(text) if text else ""
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RecipeError(f"--set {key}: {part} is not a section")
        node[leaf] = value
    return data


# ---------------------------------------------------------------- typed tree


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def _convert(value, tp, key: str):
    """value checked (and int -> float widened) against a field's annotated type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is not type(None):
                try:
                    return _convert(value, option, key)
                except RecipeError:
                    pass
        raise RecipeError(f"{key}: expected {' or '.join(_type_name(o) for o in options)}, got {value!r}")
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{key}: expected a mapping, got {value!r}")
        _, item = typing.get_args(tp)
        return {k: build(item, v, f"{key}.{k}.") if dataclasses.is_dataclass(item) else _convert(v, item, f"{key}.{k}")
                for k, v in value.items()}
    if origin is list:
        if isinstance(value, str) and typing.get_args(tp) == (str,):
            value = [value]  # a single path (--set data.files=/path)
        if not isinstance(value, list):
            raise RecipeError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is typing.Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp is bool and not isinstance(value, bool) or not isinstance(value, tp) or \
            (tp is int and isinstance(value, bool)):
        raise RecipeError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    return value


def build(cls, data, prefix: str = ""):
    if not isinstance(data, dict):
        raise RecipeError(f"{prefix.rstrip('.') or 'recipe'}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), names, n=1)
        hint = f"did you mean {prefix}{close[0]}?" if close else f"known keys here: {', '.join(names)}"
        raise RecipeError(f"unknown key {prefix}{key}: {hint}")
    values = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            values[name] = build(tp, value, f"{prefix}{name}.")
        else:
            values[name] = _convert(value, tp, f"{prefix}{name}")
    return cls(**values)


def as_dict(recipe: Recipe) -> dict:
    return dataclasses.asdict(recipe)


def dump(recipe: Recipe) -> str:
    return yaml.safe_dump(as_dict(recipe), sort_keys=False)


# ---------------------------------------------------------------- checks


def _require(ok: bool, key: str, message: str):
    if not ok:
        raise RecipeError(f"{key}: {message}")


def resolve_model(recipe: Recipe) -> None:
    """Fill arch (and for init_from, the shape) from the starting model's config.json;
    conflicting values are errors. A grow_from source must be growable into the recipe's shape."""
    m = recipe.model
    _require(m.init_from is None or m.grow_from is None, "model.grow_from",
             "set model.init_from or model.grow_from, not both")
    start = m.init_from or m.grow_from
    shape_keys = ("layers", "hidden", "heads", "ffn")
    if start is None or m.grow_from is not None:
        missing = [k for k in shape_keys if getattr(m, k) is None]
        missing += ["arch"] if start is None and m.arch is None else []
        _require(not missing, f"model.{missing[0] if missing else ''}",
                 "required (the target shape)" if m.grow_from else
                 "required (or set model.init_from to a grown model directory)")
    if start is None:
        return
    from growth import DEPTH_METHODS, SYMMETRY_METHODS, WIDTH_METHODS, check_growable
    from growth.adapters.files import read_config, resolve
    from growth.shape import shape_from_config
    key = "model.init_from" if m.init_from else "model.grow_from"
    try:
        cfg = read_config(resolve(start))
        shape = shape_from_config(cfg)
        if m.grow_from:
            _require(m.growth.width in WIDTH_METHODS, "model.growth.width", f"use one of {', '.join(WIDTH_METHODS)}")
            _require(m.growth.depth in DEPTH_METHODS, "model.growth.depth", f"use one of {', '.join(DEPTH_METHODS)}")
            _require(m.growth.symmetry in SYMMETRY_METHODS, "model.growth.symmetry",
                     f"use one of {', '.join(SYMMETRY_METHODS)}")
            _require(m.growth.symmetry == "none" or m.growth.width != "direct", "model.growth.symmetry",
                     "split applies to copied units, and width direct copies none: set it to none")
            check_growable(shape, Shape(m.layers, m.hidden, m.heads, m.ffn))
    except GrowthError as err:
        raise RecipeError(f"{key}: {err}") from None
    found = {"arch": cfg["model_type"]} | ({} if m.grow_from else dataclasses.asdict(shape))
    for k, value in found.items():
        mine = getattr(m, k)
        _require(mine is None or mine == value, f"model.{k}",
                 f"{mine!r} but {key} {start} has {value!r}: take the model's with --set model.{k}=null, "
                 "or fix it")
        setattr(m, k, value)
    positions = cfg.get("max_position_embeddings", cfg.get("n_positions"))
    if positions is not None:
        m.max_positions = positions


def validate(recipe: Recipe) -> Recipe:
    m, d, o, b, t = recipe.model, recipe.data, recipe.optim, recipe.batch, recipe.train
    resolve_model(recipe)
    _require(m.arch in ARCHS, "model.arch", f"{m.arch!r}: use one of {', '.join(ARCHS)}")
    try:
        _ = recipe.shape  # the property checks the shape
    except GrowthError as err:
        raise RecipeError(f"model: {err}") from None
    _require(0.0 <= m.dropout < 1.0, "model.dropout", f"{m.dropout}: must be in [0, 1)")
    _require(2 <= d.seq_len <= m.max_positions, "data.seq_len",
             f"{d.seq_len}: must be between 2 and model.max_positions ({m.max_positions})")
    _require(d.files is None or d.hub is None, "data.hub", "set data.files or data.hub, not both")
    for file in d.files or []:
        _require(Path(file).is_file(), "data.files", f"{file}: no such file")
        _require(Path(file).suffix in (".txt", ".jsonl", ".json", ".parquet"), "data.files",
                 f"{file}: use .txt, .jsonl, .json or .parquet files")
    _require(d.files != [], "data.files",
             "empty list: name files, or read the offline corpus with --set data.files=null")
    if d.tokenizer not in (None, *TOKENIZER_KINDS, "minilm"):
        _require(Path(d.tokenizer).is_dir(), "data.tokenizer",
                 f"{d.tokenizer}: not a directory; use a tokenizer or model directory, 'minilm', "
                 f"or {' / '.join(TOKENIZER_KINDS)} to train one on the corpus")
    _require(d.vocab_size >= 64, "data.vocab_size", f"{d.vocab_size}: too small (>= 64)")
    _require(0.0 < d.val_fraction < 0.5, "data.val_fraction", f"{d.val_fraction}: must be in (0, 0.5)")
    _require(d.max_documents is None or d.max_documents > 0, "data.max_documents", "must be positive")
    _require(0.0 < recipe.objective.mask_prob < 1.0 or m.arch == "gpt2", "objective.mask_prob",
             f"{recipe.objective.mask_prob}: must be in (0, 1)")
    _require(o.lr > 0, "optim.lr", f"{o.lr}: must be positive")
    _require(len(o.betas) == 2 and all(0 <= x < 1 for x in o.betas), "optim.betas",
             f"{o.betas}: two numbers in [0, 1)")
    _require(o.eps > 0, "optim.eps", "must be positive")
    _require(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    _require(o.schedule in SCHEDULES, "optim.schedule", f"{o.schedule!r}: use one of {', '.join(SCHEDULES)}")
    _require(1 <= o.warmup_steps <= t.steps, "optim.warmup_steps",
             f"{o.warmup_steps}: must be in [1, train.steps] (DeepSpeed's warmup schedulers need a step or more)")
    _require(o.schedule != "cosine" or o.warmup_steps >= 2, "optim.warmup_steps",
             "DeepSpeed's WarmupCosineLR needs at least 2 warmup steps: set 2 or more, or another optim.schedule")
    _require(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]")
    _require(o.decay_steps is None or o.schedule != "constant", "optim.decay_steps",
             "a constant schedule does not decay: --set optim.decay_steps=null, or choose optim.schedule linear "
             "or cosine")
    _require(o.decay_steps is None or o.decay_steps > o.warmup_steps, "optim.decay_steps",
             f"{o.decay_steps}: must be greater than optim.warmup_steps ({o.warmup_steps})")
    _require(o.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0: no clipping)")
    _require(b.micro >= 1, "batch.micro", "must be >= 1")
    _require(b.accum is None or b.accum >= 1, "batch.accum", "must be >= 1")
    _require(b.global_size is None or b.global_size >= 1, "batch.global_size", "must be >= 1")
    _require(recipe.zero.stage in (0, 1, 2, 3), "zero.stage", f"{recipe.zero.stage}: use 0, 1, 2 or 3")
    _require(t.steps >= 1, "train.steps", "must be >= 1")
    _require(t.precision in PRECISIONS, "train.precision", f"{t.precision!r}: use one of {', '.join(PRECISIONS)}")
    _require(t.eval_every >= 0, "train.eval_every", "must be >= 0 (0: only at the end)")
    _require(t.eval_batches >= 1, "train.eval_batches", "must be >= 1")
    _require(t.eval_early_every >= 0, "train.eval_early_every", "must be >= 0 (0: off)")
    _require(t.eval_early_until >= 0, "train.eval_early_until", "must be >= 0")
    _require(t.stop_at is None or 1 <= t.stop_at <= t.steps, "train.stop_at", "must be in [1, train.steps]")
    s1 = recipe.stage1
    _require(0 <= s1.steps <= t.steps, "stage1.steps", f"{s1.steps}: must be in [0, train.steps]")
    _require(s1.steps == 0 or (s1.block >= 1 and m.layers % s1.block == 0), "stage1.block",
             f"{s1.block}: must divide model.layers ({m.layers}) so that the sub-models are block, 2 block, ...")
    _require(s1.sampling in STAGE1_SAMPLING, "stage1.sampling",
             f"{s1.sampling!r}: use one of {', '.join(STAGE1_SAMPLING)}")
    pg = recipe.progressive
    _require(len(pg.layers) == len(pg.steps), "progressive.steps",
             "give one step count per entry of progressive.layers")
    _require(all(a < b for a, b in zip([0] + pg.layers, pg.layers + [m.layers + 1])), "progressive.layers",
             f"{pg.layers}: must increase, from 1 up to model.layers ({m.layers})")
    _require(all(n >= 1 for n in pg.steps) and sum(pg.steps) < t.steps, "progressive.steps",
             f"{pg.steps}: positive, and together fewer than train.steps ({t.steps}) so a full-model phase remains")
    _require(not pg.layers or (s1.steps == 0 and m.init_from is None and m.grow_from is None), "progressive.layers",
             "progressive stacking starts from scratch: it does not combine with stage1 or a start model")
    check_parallel(recipe)
    from growth.adapters.deepspeed import universal_tag
    grown_checkpoint = bool(m.init_from and universal_tag(m.init_from))
    _require(recipe.zero.stage > 0 or not grown_checkpoint,
             "zero.stage", "0, but model.init_from is a grown DeepSpeed checkpoint, which DeepSpeed loads "
             "into ZeRO stages 1-3 only: set zero.stage to 1, 2 or 3")
    kept = kept_step(m.init_from) if grown_checkpoint else None
    _require(kept is None or kept < t.steps, "train.steps",
             f"{t.steps}, but model.init_from {m.init_from} was grown with --schedule keep at step {kept}: the run "
             f"continues that step count, so set train.steps above {kept} (--set train.steps=N), or grow it with "
             "--schedule restart")
    _require(pg.optimizer in ("reset", "grow"), "progressive.optimizer", f"{pg.optimizer!r}: use reset or grow")
    _require(pg.optimizer == "reset" or recipe.zero.stage > 0, "progressive.optimizer",
             "grow carries Adam's state through the sharded checkpoint: set zero.stage to 1, 2 or 3")
    _require(recipe.checkpoint.every >= 0, "checkpoint.every", "must be >= 0 (0: only at the end)")
    _require(recipe.checkpoint.keep >= 1, "checkpoint.keep", "must be >= 1")
    _require(recipe.logging.every >= 1, "logging.every", "must be >= 1")
    _require(recipe.logging.peak_tflops is None or recipe.logging.peak_tflops > 0, "logging.peak_tflops",
             "must be positive")
    return recipe


def kept_step(grown: str) -> int | None:
    """The step a grown DeepSpeed checkpoint keeps its lr schedule at (b2b grow --schedule keep), or None."""
    import json

    from growth.adapters.files import resolve
    try:
        manifest = json.loads((resolve(grown) / "growth.json").read_text())
    except (OSError, ValueError, GrowthError):
        return None
    return int(manifest.get("adam_step", 0)) if manifest.get("schedule") == "keep" else None


def check_parallel(recipe: Recipe) -> None:
    """Tensor parallelism trains megatron-core's GPTModel: GPT-2 only, ZeRO 0-1, no stage 1 or
    progressive stacking (they rebuild HF models), started fresh, from an HF GPT-2 directory or
    from a megatron-core torch_dist checkpoint."""
    from growth.adapters.deepspeed import universal_tag
    from growth.adapters.dist_checkpoint import is_dist_checkpoint
    m, tp = recipe.model, recipe.parallel.tensor
    _require(tp >= 1, "parallel.tensor", f"{tp}: must be >= 1")
    dist_start = m.init_from is not None and is_dist_checkpoint(recipe.start_model)
    _require(recipe.megatron or not dist_start, "model.init_from",
             f"{m.init_from} is a megatron-core torch_dist checkpoint: set parallel.megatron: true "
             "(or parallel.tensor > 1) to train megatron-core's GPTModel from it")
    if not recipe.megatron:
        return
    key, value, off = ("parallel.tensor", tp, 1) if tp > 1 else ("parallel.megatron", "true", "false")
    what = f"{key} {value}"
    _require(m.arch == "gpt2", key, f"{value}: megatron-core's GPTModel is a GPT-2, but model.arch is {m.arch}: "
             f"set {key} to {off} (BERT trains data-parallel only)")
    _require(m.heads % tp == 0 and m.ffn % tp == 0, "parallel.tensor",
             f"{tp} does not divide model.heads ({m.heads}) and model.ffn ({m.ffn}): use a divisor of both")
    _require(recipe.zero.stage <= 1, "zero.stage",
             f"{recipe.zero.stage} with {what}: megatron-core's model trains with ZeRO stage 0 or 1 "
             "(data parallelism over the tensor-parallel groups): set zero.stage to 0 or 1")
    _require(recipe.stage1.steps == 0, "stage1.steps",
             f"bert2BERT's two-stage training runs HF models, not {what}: set stage1.steps to 0")
    _require(not recipe.progressive.layers, "progressive.layers",
             f"progressive stacking grows HF models, not {what}: remove the progressive section")
    _require(not (m.init_from and universal_tag(m.init_from)), "model.init_from",
             f"{m.init_from} is a grown DeepSpeed checkpoint, which loads into HF models only: with {what} "
             "start from an HF GPT-2 directory or a torch_dist checkpoint (b2b grow, or RUN/checkpoints/TAG/dist)")


def data_parallel_size(recipe: Recipe, procs: int) -> int:
    """The data-parallel size of `procs` processes: each tensor-parallel group of parallel.tensor
    processes holds one replica of the model."""
    tp = recipe.parallel.tensor
    _require(procs % tp == 0, "parallel.tensor",
             f"{tp} does not divide the {procs} processes: use a multiple of {tp} processes (--procs)")
    return procs // tp


# What a starting model named on the command line brings with it: its architecture, its shape
# (init_from; grow_from's shape is the target's), and its tokenizer, whose ids its embeddings index.
FROM_MODEL = {"model.init_from": ("model.arch", "model.layers", "model.hidden", "model.heads", "model.ffn",
                                  "data.tokenizer"),
              "model.grow_from": ("model.arch", "data.tokenizer")}


def yield_to_model(data: dict, overrides: list[str]) -> dict:
    """The recipe file's keys that a `--set model.init_from=DIR` (or grow_from) takes from the model
    itself, removed unless the command line sets them too: `--set model.init_from=DIR` alone works."""
    given = {item.partition("=")[0] for item in overrides}
    dropped = {key for start, keys in FROM_MODEL.items() if start in given for key in keys if key not in given}
    out = copy.deepcopy(data)
    for key in dropped:
        section, leaf = key.split(".")
        if isinstance(out.get(section), dict):
            out[section].pop(leaf, None)
    return out


def load(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read, merge the base chain, apply --set overrides, type-check and validate."""
    overrides = list(overrides)
    raw = load_raw(Path(path))
    if "methods" in raw:
        raise RecipeError(f"{path}: a recipe set (it names methods), not a training recipe: run it with "
                          f"b2b run {path} (or b2b submit)")
    data = apply_overrides(yield_to_model(raw, overrides), overrides)
    return validate(build(Recipe, data))


def fit_world(recipe: Recipe, world: int) -> int:
    """The global batch at this data-parallel size: fills batch.accum when it is unset and
    checks micro x accum x world against batch.global_size."""
    b = recipe.batch
    if b.accum is None:
        per_step = b.micro * world
        _require(b.global_size is None or b.global_size % per_step == 0, "batch.global_size",
                 f"{b.global_size} is not a multiple of batch.micro x data-parallel size = {b.micro} x {world}: "
                 "change one of them or set batch.accum")
        b.accum = 1 if b.global_size is None else b.global_size // per_step
    size = b.micro * b.accum * world
    _require(b.global_size is None or b.global_size == size, "batch.global_size",
             f"{b.global_size} but batch.micro x batch.accum x data-parallel size = {b.micro} x {b.accum} x "
             f"{world} = {size}: fix one of them")
    return size


def deepspeed_config(recipe: Recipe, world: int, cpu: bool, load_universal: bool = False) -> dict:
    """The DeepSpeed JSON for this recipe at this data-parallel size; `load_universal` for an engine
    that loads a universal checkpoint (a grown one, see growth/adapters/deepspeed.py)."""
    o, t = recipe.optim, recipe.train
    decay_end = o.decay_steps or t.steps
    warmup = dict(warmup_num_steps=o.warmup_steps, warmup_type="linear")
    if o.schedule == "constant":
        scheduler = {"type": "WarmupLR", "params": {**warmup, "warmup_min_lr": 0.0, "warmup_max_lr": o.lr}}
    elif o.schedule == "linear":
        scheduler = {"type": "WarmupDecayLR", "params": {**warmup, "warmup_min_lr": o.lr * o.min_lr_ratio,
                                                         "warmup_max_lr": o.lr, "total_num_steps": decay_end}}
    else:
        scheduler = {"type": "WarmupCosineLR", "params": {**warmup, "warmup_min_ratio": 0.0,
                                                          "cos_min_ratio": o.min_lr_ratio,
                                                          "total_num_steps": decay_end}}
    config = {
        "train_batch_size": fit_world(recipe, world),
        "train_micro_batch_size_per_gpu": recipe.batch.micro,
        "gradient_accumulation_steps": recipe.batch.accum,
        "gradient_clipping": o.grad_clip,
        "optimizer": {"type": "AdamW", "params": {"lr": o.lr, "betas": o.betas, "eps": o.eps,
                                                  "weight_decay": o.weight_decay, "torch_adam": cpu}},
        "scheduler": scheduler,
        "zero_optimization": {"stage": recipe.zero.stage},
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16", "initial_scale_power": 16},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    if recipe.zero.stage == 3:
        config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = False
    if load_universal:
        config["checkpoint"] = {"load_universal": True}
    return config
