"""The DeepSpeed JSON, generated from a recipe (never kept beside it), and the batch arithmetic
it needs: the data-parallel size of a launch and the global batch at that size."""

from __future__ import annotations

from .config import Recipe, _require


def data_parallel_size(recipe: Recipe, procs: int) -> int:
    """The data-parallel size of `procs` processes: each tensor-parallel group of parallel.tensor
    processes holds one replica of the model."""
    tp = recipe.parallel.tensor
    _require(procs % tp == 0, "parallel.tensor",
             f"{tp} does not divide the {procs} processes: use a multiple of {tp} processes (--procs)")
    return procs // tp


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


def adam_kernel(kernel: str, cpu: bool) -> dict:
    """DeepSpeed's AdamW parameters for perf.optimizer: `torch_adam` takes torch.optim.AdamW, which
    gets the rest (fused, foreach); without it, DeepSpeed builds its own FusedAdam (a CUDA kernel,
    compiled on first use). auto: torch's fused kernel on GPUs, its for-loop on CPU."""
    if kernel == "auto":
        kernel = "forloop" if cpu else "fused"
    if kernel == "deepspeed":
        return {"torch_adam": False}
    return {"torch_adam": True, "fused": True} if kernel == "fused" else \
        {"torch_adam": True, "foreach": kernel == "foreach"}


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
                                                  "weight_decay": o.weight_decay,
                                                  **adam_kernel(recipe.perf.optimizer, cpu)}},
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
