"""Recipes: the schema (one typed config tree per recipe) and the checks that run before any
process starts. Reading YAML into the tree is launchers/tree.py's; the DeepSpeed JSON generated
from it, launchers/ds_config.py's. Impossible values and missing files raise RecipeError naming
the key and the fix.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from growth import LLAMA_FAMILY, GrowthError, Shape
from growth.adapters.files import ALIASES

from .tree import RecipeError, apply_overrides, build, load_raw, merge, read_yaml  # noqa: F401 (the API)

ARCHS = ("bert", "gpt2", *LLAMA_FAMILY)
PRECISIONS = ("fp32", "bf16", "fp16")
SCHEDULES = ("linear", "cosine", "constant")
STAGE1_SAMPLING = ("uniform", "cyclic")
ATTENTIONS = ("auto", "eager", "sdpa", "flash_attention_2")  # HF's attn_implementation; auto: its default
OPTIMIZER_KERNELS = ("auto", "fused", "foreach", "forloop", "deepspeed")
TOKENIZER_KINDS = ("wordpiece", "bpe")  # trained on the corpus by `b2b tokenizer` / the data pipeline
MAX_POSITIONS = 1 << 20
VERBOSE = "B2B_VERBOSE"  # "1" in the workers' environment: DeepSpeed's and megatron's routine output kept


@dataclass
class GrowthConfig:
    width: str = "aki"  # fpi | aki | direct | exact (b2b grow --width)
    depth: str = "stack"  # stack | identity (b2b grow --depth)
    insert: str = "even"  # identity blocks: even | every=N | top (b2b grow --insert)
    seed: int = 0
    symmetry: str = "none"  # none | split | noise (b2b grow --break-symmetry)
    noise_db: float = 10.0  # symmetry noise: its signal-to-noise ratio in dB (b2b grow --noise-db)
    optimizer: str = "reset"  # reset | grow: Adam's moments grown too (a ZeRO grow_from; b2b grow --optimizer)


@dataclass
class ModelConfig:
    arch: str | None = None  # bert (masked LM), or gpt2, llama, mistral, qwen2 (causal LM); read from init_from
    layers: int | None = None
    hidden: int | None = None
    heads: int | None = None
    ffn: int | None = None
    kv_heads: int | None = None  # grouped-query attention (the Llama family); unset: one per query head
    max_positions: int = 512
    dropout: float = 0.1
    init_from: str | None = None  # an HF model directory or a grown DeepSpeed checkpoint (`b2b grow`)
    grow_from: str | None = None  # a smaller HF model or ZeRO checkpoint, grown (model.growth) into RUN/grown
    growth: GrowthConfig = field(default_factory=GrowthConfig)


FILE_KINDS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}  # suffix -> datasets' loader


@dataclass
class SourceConfig:
    """One corpus of a weighted mixture (data.sources)."""
    files: list[str] | None = None  # local .txt/.jsonl/.json/.parquet files
    hub: str | None = None  # or a hub dataset (downloads at run time)
    hub_config: str | None = None
    text_field: str = "text"
    weight: float = 1.0  # the share of training samples drawn from it: weight / the sum of the weights


@dataclass
class DataConfig:
    files: list[str] | None = None  # local .txt/.jsonl/.json/.parquet files (else the offline corpus)
    sources: list[SourceConfig] | None = None  # a weighted mixture of corpora, instead of files or hub
    hub: str | None = None  # a hub dataset name (downloads at run time)
    hub_config: str | None = None  # its configuration, e.g. wikitext-103-raw-v1
    text_field: str = "text"
    tokenizer: str | None = None  # a tokenizer/model dir, an alias (minilm, smollm2), 'wordpiece' or 'bpe' (trained)
    vocab_size: int = 8192  # for a trained tokenizer
    seq_len: int = 128
    val_fraction: float = 0.05  # of the corpus's documents, held out for validation (unless val_files)
    val_files: list[str] | None = None  # held-out validation text (.txt/.jsonl/.json/.parquet): the whole corpus trains
    max_documents: int | None = None
    cache_dir: str = "runs/cache"
    num_proc: int | None = None  # preparation processes (default: every core this process may use)
    streaming: bool = False  # read the corpora as streams (no Arrow copy of a hub corpus); needs a given tokenizer
    shard_documents: int = 10_000  # documents per prepared shard (a multiple of 2000): the unit of work and resume
    indexed: list[str] | None = None  # a corpus tokenised already (by data.tokenizer) in megatron-core's indexed
    # format, each PREFIX of PREFIX.bin/.idx (Megatron-LM's preprocess_data.py output): read in place
    val_indexed: list[str] | None = None  # held-out validation data in that format (else data.val_files)


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
    """Model parallelism: with tensor > 1 a GPT-2 or Llama-family recipe trains megatron-core's GPTModel with its
    layers split over `tensor` processes (launchers/megatron.py); data parallelism and ZeRO stage
    0 or 1 run over the remaining factor (processes / tensor)."""
    tensor: int = 1  # tensor-parallel degree; must divide model.heads, model.kv_heads and model.ffn
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
class PerfConfig:
    """Speed options for GPU training. The defaults leave CPU training as it is; each option is a
    no-op, or a one-line refusal, where it cannot apply."""
    # HF models' attn_implementation: auto (transformers' choice, sdpa), eager, sdpa, flash_attention_2 (GPUs)
    attention: str = "auto"
    # AdamW's kernel: auto (torch's fused on GPUs, its for-loop on CPU), fused, foreach, forloop, or
    # deepspeed (DeepSpeed's FusedAdam, built on first use; GPUs)
    optimizer: str = "auto"
    activation_checkpointing: bool = False  # recompute each block's activations in the backward pass
    compile: bool = False  # torch.compile the model (DeepSpeed's engine.compile; inductor)
    pin_memory: bool = True  # GPUs: batches go from pinned memory, without blocking; CPU: nothing to do


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
    perf: PerfConfig = field(default_factory=PerfConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir or f"runs/{self.name}")

    @property
    def start_model(self) -> Path | None:
        """The directory the model starts from: init_from, or grow_from grown into RUN/grown (an HF
        directory; a universal checkpoint when grow_from is a ZeRO checkpoint)."""
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
        return Shape(m.layers, m.hidden, m.heads, m.ffn, m.kv_heads)


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
    from growth.adapters.deepspeed import OPTIMIZERS, is_checkpoint
    from growth.adapters.files import read_config
    from growth.grow import check_insert
    from growth.shape import shape_from_config
    key = "model.init_from" if m.init_from else "model.grow_from"
    try:
        cfg = read_config(config_dir(start))
        shape = shape_from_config(cfg)
        _require(m.growth.optimizer in OPTIMIZERS, "model.growth.optimizer", f"use one of {', '.join(OPTIMIZERS)}")
        _require(m.growth.optimizer == "reset" or bool(m.grow_from and is_checkpoint(m.grow_from)),
                 "model.growth.optimizer", "grow carries the source's Adam moments, which only a ZeRO checkpoint "
                 "holds: set model.grow_from to a ZeRO >= 1 run's checkpoints (RUN/checkpoints), or use reset")
        if m.init_from and is_checkpoint(m.init_from):
            raise RecipeError(f"model.init_from: {m.init_from} is a ZeRO checkpoint: start from its run's model "
                              "(RUN/final), grow it (model.grow_from), or resume its own run (--resume auto)")
        if m.grow_from:
            _require(m.growth.width in WIDTH_METHODS, "model.growth.width", f"use one of {', '.join(WIDTH_METHODS)}")
            _require(m.growth.depth in DEPTH_METHODS, "model.growth.depth", f"use one of {', '.join(DEPTH_METHODS)}")
            _require(m.growth.symmetry in SYMMETRY_METHODS, "model.growth.symmetry",
                     f"use one of {', '.join(SYMMETRY_METHODS)}")
            _require(m.growth.symmetry == "none" or m.growth.width != "direct", "model.growth.symmetry",
                     "symmetry breaking applies to copied units, and width direct copies none: set it to none")
            check_insert(m.growth.insert, m.growth.depth)
            _require(math.isfinite(m.growth.noise_db), "model.growth.noise_db", "must be a finite number of decibels")
            check_growable(shape, Shape(m.layers, m.hidden, m.heads, m.ffn, m.kv_heads))
    except GrowthError as err:
        raise RecipeError(f"{key}: {err}") from None
    shape_keys = {} if m.grow_from else {k: v for k, v in dataclasses.asdict(shape).items() if hasattr(m, k)}
    found = {"arch": cfg["model_type"]} | shape_keys
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
    _require(m.kv_heads in (None, m.heads) or m.arch in LLAMA_FAMILY, "model.kv_heads",
             f"{m.kv_heads}: {m.arch} has one key/value head per query head; grouped-query attention is for "
             f"{', '.join(LLAMA_FAMILY)}")
    _require(0.0 <= m.dropout < 1.0, "model.dropout", f"{m.dropout}: must be in [0, 1)")
    _require(m.max_positions <= MAX_POSITIONS, "model.max_positions",
             f"{m.max_positions}: more than {MAX_POSITIONS}, longer than any released model's context")
    _require(2 <= d.seq_len <= m.max_positions, "data.seq_len",
             f"{d.seq_len}: must be between 2 and model.max_positions ({m.max_positions})")
    _require(d.files is None or d.hub is None, "data.hub", "set data.files or data.hub, not both")
    _require(d.sources is None or d.files is None and d.hub is None, "data.sources",
             "a mixture replaces data.files and data.hub: set one of them")
    _require(d.sources != [], "data.sources", "empty list: name corpora, or drop the key")
    named = [("data.files", d.files), ("data.val_files", d.val_files)]
    for i, source in enumerate(d.sources or []):
        key = f"data.sources[{i}]"
        _require((source.files is None) != (source.hub is None), key, "give it files or a hub dataset (one of them)")
        _require(source.files != [], f"{key}.files", "empty list: name files")
        _require(source.weight > 0, f"{key}.weight", f"{source.weight}: must be positive")
        named.append((f"{key}.files", source.files))
    for key, files in named:
        for file in files or []:
            _require(Path(file).is_file(), key, f"{file}: no such file")
            _require(Path(file).suffix in FILE_KINDS, key, f"{file}: use .txt, .jsonl, .json or .parquet files")
        _require(len({FILE_KINDS[Path(f).suffix] for f in files or []}) <= 1, key,
                 "files of one kind: .txt, .jsonl/.json or .parquet, not a mixture")
    _require(d.files != [], "data.files",
             "empty list: name files, or read the offline corpus with --set data.files=null")
    _require(d.val_files != [], "data.val_files", "empty list: name files, or hold out data.val_fraction with null")
    if d.tokenizer not in (None, *TOKENIZER_KINDS, *ALIASES):
        _require(Path(d.tokenizer).is_dir(), "data.tokenizer",
                 f"{d.tokenizer}: not a directory; use a tokenizer or model directory, 'minilm', "
                 f"or {' / '.join(TOKENIZER_KINDS)} to train one on the corpus")
    _require(d.vocab_size >= 64, "data.vocab_size", f"{d.vocab_size}: too small (>= 64)")
    _require(0.0 < d.val_fraction < 0.5, "data.val_fraction", f"{d.val_fraction}: must be in (0, 0.5)")
    _require(d.max_documents is None or d.max_documents > 0, "data.max_documents", "must be positive")
    _require(d.num_proc is None or d.num_proc > 0, "data.num_proc", "must be positive")
    trains = d.tokenizer in TOKENIZER_KINDS or d.tokenizer is None and not (m.init_from or m.grow_from)
    _require(not (d.streaming and trains), "data.streaming",
             "a streamed corpus is read once, so the tokenizer is not trained on it: name one (data.tokenizer: a "
             "directory, or train one first with b2b tokenizer --files ...)")
    _check_indexed(d, trains)
    _require(d.shard_documents > 0 and d.shard_documents % 2000 == 0, "data.shard_documents",
             f"{d.shard_documents}: must be a positive multiple of 2000 (the documents sequences are cut within)")
    _require(0.0 < recipe.objective.mask_prob < 1.0 or m.arch != "bert", "objective.mask_prob",
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
    from growth.adapters.deepspeed import is_checkpoint, universal_tag
    grown_checkpoint = bool(m.init_from and universal_tag(m.init_from))
    _require(recipe.zero.stage > 0 or not grown_checkpoint,
             "zero.stage", "0, but model.init_from is a grown DeepSpeed checkpoint, which DeepSpeed loads "
             "into ZeRO stages 1-3 only: set zero.stage to 1, 2 or 3")
    _require(recipe.zero.stage > 0 or not (m.grow_from and is_checkpoint(m.grow_from)), "zero.stage",
             "0, but model.grow_from is a ZeRO checkpoint, grown into a DeepSpeed universal checkpoint that loads "
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
    check_perf(recipe)
    return recipe


def _check_indexed(d: DataConfig, trains: bool) -> None:
    """data.indexed / data.val_indexed: a corpus tokenised already, read in place."""
    _require(d.indexed != [], "data.indexed", "empty list: name prefixes (PREFIX.bin, PREFIX.idx), or drop the key")
    _require(d.val_indexed != [], "data.val_indexed", "empty list: name prefixes, or drop the key")
    _require(d.val_indexed is None or d.indexed is not None, "data.val_indexed",
             "validation data in the indexed format go with data.indexed (the training data in that format)")
    if d.indexed is None:
        return
    _require(d.files is None and d.hub is None and d.sources is None, "data.indexed",
             "data.indexed replaces data.files, data.hub and data.sources: set one of them")
    _require(not d.streaming, "data.streaming", "data.indexed are read in place, not streamed: drop data.streaming")
    _require(d.max_documents is None, "data.max_documents", "does not apply to data.indexed (each is read whole)")
    _require(not trains, "data.tokenizer", "data.indexed are already tokenised: name the tokenizer that made them "
             "(a tokenizer or model directory, or an alias)")
    _require(d.val_indexed is not None or d.val_files is not None, "data.indexed",
             "name held-out validation data: data.val_indexed (the same format) or data.val_files (text)")
    _require(d.val_indexed is None or d.val_files is None, "data.val_indexed", "set it or data.val_files, not both")
    for key, prefixes in (("data.indexed", d.indexed), ("data.val_indexed", d.val_indexed or [])):
        for prefix in prefixes:
            for suffix in (".bin", ".idx"):
                _require(Path(prefix + suffix).is_file(), key, f"{prefix}{suffix}: no such file")


def check_perf(recipe: Recipe) -> None:
    """What the speed options cannot combine with, whatever the machine (launch.check_can_run
    checks what needs a GPU)."""
    p = recipe.perf
    _require(p.attention in ATTENTIONS, "perf.attention", f"{p.attention!r}: use one of {', '.join(ATTENTIONS)}")
    _require(p.optimizer in OPTIMIZER_KERNELS, "perf.optimizer",
             f"{p.optimizer!r}: use one of {', '.join(OPTIMIZER_KERNELS)}")
    _require(p.attention == "auto" or not recipe.megatron, "perf.attention",
             f"{p.attention}: megatron-core's GPTModel has its own core attention (torch's "
             "scaled_dot_product_attention): leave perf.attention at auto")
    _require(not p.compile or recipe.stage1.steps == 0, "perf.compile",
             "bert2BERT's stage 1 runs another sub-model every step, which torch.compile would recompile: set "
             "perf.compile to false, or stage1.steps to 0")


def config_dir(start: str | Path) -> Path:
    """Where a starting model's config.json is: its directory, or a ZeRO checkpoint's tag directory."""
    from growth.adapters import deepspeed
    from growth.adapters.files import resolve
    if deepspeed.is_checkpoint(Path(start)):
        return deepspeed.find_config(deepspeed.ZeroCheckpoint(start))
    return resolve(start, weights=False)


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
    """Tensor parallelism trains megatron-core's GPTModel: GPT-2 or the Llama family, ZeRO 0-1, no
    stage 1 or progressive stacking (they rebuild HF models), started fresh, from an HF directory of
    the recipe's family or from a megatron-core torch_dist checkpoint."""
    from growth.adapters.deepspeed import is_checkpoint, universal_tag
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
    _require(m.arch != "bert", key, f"{value}: megatron-core's GPTModel is built as GPT-2 or the Llama family, but "
             f"model.arch is {m.arch}: set {key} to {off} (BERT trains data-parallel only)")
    groups = m.kv_heads or m.heads
    _require(m.heads % tp == 0 and m.ffn % tp == 0 and groups % tp == 0, "parallel.tensor",
             f"{tp} does not divide model.heads ({m.heads}), model.kv_heads ({groups}) and model.ffn ({m.ffn}): "
             "use a divisor of all three (every rank holds whole query groups)")
    _require(recipe.zero.stage <= 1, "zero.stage",
             f"{recipe.zero.stage} with {what}: megatron-core's model trains with ZeRO stage 0 or 1 "
             "(data parallelism over the tensor-parallel groups): set zero.stage to 0 or 1")
    _require(recipe.stage1.steps == 0, "stage1.steps",
             f"bert2BERT's two-stage training runs HF models, not {what}: set stage1.steps to 0")
    _require(not recipe.progressive.layers, "progressive.layers",
             f"progressive stacking grows HF models, not {what}: remove the progressive section")
    _require(not (m.grow_from and is_checkpoint(m.grow_from)), "model.grow_from",
             f"{m.grow_from} is a ZeRO checkpoint, grown into a DeepSpeed universal checkpoint, which loads into HF "
             f"models only: with {what} grow from an HF directory (the source run's final)")
    _require(not (m.init_from and universal_tag(m.init_from)), "model.init_from",
             f"{m.init_from} is a grown DeepSpeed checkpoint, which loads into HF models only: with {what} "
             "start from an HF directory or a torch_dist checkpoint (b2b grow, or RUN/checkpoints/TAG/dist)")
    for key, source in (("model.init_from", m.init_from), ("model.grow_from", m.grow_from)):
        if source is not None:  # a grown model keeps its source's RoPE, biases and window
            from growth.adapters.files import read_config, resolve

            from .megatron import refusal
            why = refusal(read_config(resolve(source)))
            _require(why is None, key, f"{source}: {why} (with {what})")


# What a starting model named on the command line brings with it: its architecture, its shape
# (init_from; grow_from's shape is the target's), and its tokenizer, whose ids its embeddings index.
FROM_MODEL = {"model.init_from": ("model.arch", "model.layers", "model.hidden", "model.heads", "model.ffn",
                                  "model.kv_heads", "data.tokenizer"),
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


