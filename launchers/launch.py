"""`b2b train`: check the recipe, prepare the data, start one worker per process on this node
(launchers/workers.py), holding the run directory's lock (launchers/runlock.py).

Everything that can be wrong with a recipe fails here, before any process starts. A terminal's
Ctrl-C or a signal to b2b's process group reaches b2b only (the workers run in sessions of their
own): SIGINT, SIGTERM or SIGUSR1 sent to `b2b train` is forwarded to the workers, which
checkpoint at the end of the current step and exit; a second Ctrl-C kills them at once. When b2b
returns, no worker of the run is left. The exit code says how the run ended: 0 finished, 75
stopped early with a checkpoint (resume with `--resume auto`), 130 aborted by a second Ctrl-C,
anything else failed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from pathlib import Path

from . import config, ds_config, runlock
from .checkpoint import EXIT_STOPPED, RunDir, remove_partial
from .config import RecipeError
from .workers import kill, start_workers, wait


def resolve(path: str, sets: list[str], procs: int | None) -> tuple[config.Recipe, int, bool, dict]:
    import torch
    recipe = config.load(path, sets)
    cpu = not torch.cuda.is_available()
    procs = procs if procs is not None else (recipe.parallel.tensor if cpu else torch.cuda.device_count())
    if procs < 1:
        raise RecipeError(f"--procs {procs}: must be >= 1")
    return recipe, procs, cpu, ds_config.deepspeed_config(recipe, ds_config.data_parallel_size(recipe, procs), cpu)


def dry_run_text(recipe: config.Recipe, procs: int, ds: dict) -> str:
    from .data import TOKENIZER_KINDS, load_tokenizer, tokenizer_source
    from .train import flops_budget
    source = tokenizer_source(recipe)
    vocab = recipe.data.vocab_size if source in TOKENIZER_KINDS else len(load_tokenizer(source))
    dp = ds_config.data_parallel_size(recipe, procs)
    budget = flops_budget(recipe, dp, vocab)
    layout = f"{dp} data-parallel x {recipe.parallel.tensor} tensor-parallel" if recipe.megatron else "data-parallel"
    return (f"# resolved recipe ({recipe.run_dir})\n{config.dump(recipe)}"
            f"# DeepSpeed config for {procs} process(es), {layout}\n{json.dumps(ds, indent=2)}\n"
            f"# FLOPs budget: {budget:.3e} ({recipe.train.steps} steps of {ds['train_batch_size']} x "
            f"{recipe.data.seq_len} tokens, vocabulary {vocab}; forward and backward as the trainer counts them)\n")


def check_vocabulary(recipe: config.Recipe, tokens: int | None = None) -> None:
    """A starting model's embeddings index its own tokenizer's ids: the recipe's tokenizer must have
    as many tokens (`tokens`: the prepared data's count; before it, a trained tokenizer's
    data.vocab_size is an upper bound). Checked here, before any process starts."""
    from growth.adapters.files import read_config

    from .data import TOKENIZER_KINDS, load_tokenizer, tokenizer_source
    m = recipe.model
    start = m.init_from or m.grow_from
    if start is None:
        return
    rows = read_config(config.config_dir(start)).get("vocab_size")
    source = tokenizer_source(recipe)
    trained = source in TOKENIZER_KINDS
    if tokens is None and not trained:
        tokens = len(load_tokenizer(source))
    key = "model.init_from" if m.init_from else "model.grow_from"
    if rows is None or (rows == tokens if tokens is not None else rows <= recipe.data.vocab_size):
        return
    what = (f"data.tokenizer {source} trains a new one of {tokens or f'at most {recipe.data.vocab_size}'} tokens"
            if trained else f"data.tokenizer {source} has {tokens}")
    raise RecipeError(f"{key}: {start} has a vocabulary of {rows} rows, but {what}: use the model's own tokenizer "
                      "(--set data.tokenizer=null) or give the model another vocabulary first (b2b vocab transfer)")


def check_perf_can_run(perf: config.PerfConfig, megatron: bool, cpu: bool) -> None:
    """The perf options that need a GPU, or a package, this machine lacks."""
    import importlib.util
    none = "this machine has none"
    if perf.attention == "flash_attention_2":
        if cpu:
            raise RecipeError(f"perf.attention: flash_attention_2 is a CUDA kernel and {none}: use sdpa (or auto)")
        if importlib.util.find_spec("flash_attn") is None:
            raise RecipeError("perf.attention: flash_attention_2 needs the flash-attn package: install it "
                              "(pip install flash-attn), or use sdpa")
    if perf.optimizer == "deepspeed" and cpu:
        raise RecipeError(f"perf.optimizer: deepspeed is DeepSpeed's FusedAdam, a CUDA kernel, and {none}: use "
                          "fused, foreach or forloop (torch.optim.AdamW's kernels)")
    if perf.activation_checkpointing and megatron and cpu:
        raise RecipeError(f"perf.activation_checkpointing: megatron-core's recomputation keeps CUDA random states "
                          f"and {none}: set it to false here")


def check_can_run(recipe: config.Recipe, cpu: bool, resume: str) -> None:
    if cpu and recipe.train.precision != "fp32":
        raise RecipeError(f"train.precision: {recipe.train.precision} needs a GPU; this machine has none: "
                          "use --set train.precision=fp32")
    check_perf_can_run(recipe.perf, recipe.megatron, cpu)
    from .checkpoint import check_same_parallel, resume_tag, tags
    ckpts = RunDir(recipe.run_dir).checkpoints
    if resume == "none" and ckpts.is_dir() and tags(ckpts):
        raise RecipeError(f"{recipe.run_dir} already holds checkpoints: continue it with --resume auto, "
                          "or choose a new out_dir (--set out_dir=...)")
    tag = resume_tag(ckpts, resume)
    if tag is not None:
        check_same_parallel(recipe, ckpts / tag)
        step = int(tag.removeprefix("step"))
        if step > recipe.train.steps:  # resuming would save again at once and stop "before the end" forever
            raise RecipeError(f"train.steps: {recipe.train.steps}, but {ckpts / tag} is at step {step}: raise "
                              f"train.steps above {step} to train on (--set train.steps=N), or start a new run "
                              "from its weights (model.init_from)")


def train(path: str, sets: list[str], procs: int | None, resume: str = "none", dry_run: bool = False,
          prepare_only: bool = False, verbose: bool = False) -> int:
    """prepare_only: check, prepare the data and the run directory for `procs` processes in all and
    stop there; a cluster scheduler then starts the workers itself (slurm/entrypoint.sh).
    verbose: DeepSpeed's and megatron's routine INFO lines and warnings too."""
    recipe, procs, cpu, ds = resolve(path, sets, procs)
    check_vocabulary(recipe)
    if dry_run:
        sys.stdout.write(dry_run_text(recipe, procs, ds))
        return 0
    run_dir = recipe.run_dir
    runlock.check_free(run_dir)  # before reading the state a live run is changing
    check_can_run(recipe, cpu, resume)
    if resume == "auto" and finished_at(run_dir) == recipe.train.steps:
        print(f"b2b train: {run_dir} already finished at step {recipe.train.steps}; the model is in "
              f"{RunDir(run_dir).final}")
        return 0
    from .data import prepare, quiet_libraries
    quiet_libraries()
    data = prepare(recipe)  # tokenising once here surfaces data errors before workers start
    check_vocabulary(recipe, json.loads((data / "meta.json").read_text())["vocab_size"])
    fresh = not run_dir.exists()  # a failed start of a new run leaves nothing behind
    with runlock.held(run_dir):  # one live run per directory
        try:
            code = start(recipe, ds, procs, cpu, path, sets, resume, prepare_only, verbose)
        except BaseException:
            if fresh:
                shutil.rmtree(run_dir, ignore_errors=True)
            raise
        if fresh and code not in (0, EXIT_STOPPED, 130) and not RunDir(run_dir).checkpoints.is_dir():
            shutil.rmtree(run_dir, ignore_errors=True)
            print(f"b2b train: removed {run_dir}: the run saved nothing", file=sys.stderr)
    return code


def start(recipe: config.Recipe, ds: dict, procs: int, cpu: bool, path: str, sets: list[str], resume: str,
          prepare_only: bool, verbose: bool) -> int:
    """Write the run directory and run the workers; the exit code (see the module's docstring)."""
    run_dir = recipe.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    m = recipe.model
    if m.grow_from and (resume == "none" or not (recipe.start_model / "growth.json").is_file()):
        from growth.adapters import deepspeed, hf
        g = m.growth
        options = dict(width=g.width, depth=g.depth, seed=g.seed, symmetry=g.symmetry, noise_db=g.noise_db,
                       insert=g.insert, overwrite=True)
        if deepspeed.is_checkpoint(Path(m.grow_from)):  # a universal checkpoint, Adam's moments grown or reset
            deepspeed.grow_checkpoint(m.grow_from, recipe.start_model, str(recipe.shape), optimizer=g.optimizer,
                                      schedule="restart", **options)
        else:
            hf.grow_directory(m.grow_from, recipe.start_model, str(recipe.shape), **options)
    layout = RunDir(run_dir)
    remove_partial(layout.checkpoints, lambda line: print(line, file=sys.stderr, flush=True))
    layout.recipe.write_text(config.dump(recipe))
    layout.deepspeed.write_text(json.dumps(ds, indent=2))
    status = layout.status
    status.unlink(missing_ok=True)
    if prepare_only:
        return 0
    env = dict(os.environ, **({"DS_ACCELERATOR": "cpu"} if cpu else {}), **({config.VERBOSE: "1"} if verbose else {}))
    received, workers = [], []  # the handler is in place before the workers start: a signal that
    # arrives while they start is neither lost (SIGINT ignored by the caller: the kernel drops it) nor
    # a KeyboardInterrupt; it is sent on to them once they run (forward, every second)

    def on_signal(signum, frame):
        received.append(signum)
        if received.count(signal.SIGINT) > 1:  # a second Ctrl-C: stop now, without a checkpoint
            kill(workers)
        elif len(received) == 1:
            print(f"b2b train: {signal.Signals(signum).name}: saving a checkpoint at the end of the step "
                  "(Ctrl-C again to abort)", file=sys.stderr, flush=True)
            forward()

    def forward():  # the workers record which signal stopped them
        for worker in workers:
            if received and worker.poll() is None:
                worker.send_signal(received[0])
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    try:
        workers += start_workers(run_dir, procs, resume, env)
        code = wait(workers, every_second=forward)  # again until they end: one still starting misses a signal
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        kill(workers)  # nothing of the run outlives b2b (a worker's own children included)
    if received.count(signal.SIGINT) > 1:
        print("b2b train: aborted by a second Ctrl-C; the last complete checkpoint is kept "
              f"(continue with: b2b train {path} --resume auto)", file=sys.stderr)
        return 130
    again = " ".join(f"--set {s}" for s in sets if not s.startswith("train.stop_at="))
    if code == EXIT_STOPPED:  # a worker stopped the run with its last checkpoint intact (a full disk); it said why
        print(f"b2b train: stopped; continue with: b2b train {path} --resume auto {again}".rstrip(), file=sys.stderr)
        return EXIT_STOPPED
    if not status.is_file():
        print(f"b2b train: error: the workers failed (exit code {code}); see the log above", file=sys.stderr)
        return code or 1
    if code != 0:  # rank 0 wrote the status after the last checkpoint: a death in teardown loses nothing
        print(f"b2b train: warning: the workers exited with {code} after writing their status; going by it",
              file=sys.stderr)
    if json.loads(status.read_text())["state"] == "finished":
        print(f"b2b train: finished; the model is in {RunDir(run_dir).final}")
        return 0
    print(f"b2b train: stopped before the end; continue with: b2b train {path} --resume auto {again}".rstrip(),
          file=sys.stderr)
    return EXIT_STOPPED


def finished_at(run_dir: Path) -> int | None:
    """The step a finished run ended at (status.json, with its RUN/final), or None."""
    from .report import run_status
    status = run_status(run_dir)
    return status.get("step") if status.get("state") == "finished" and RunDir(run_dir).final.is_dir() else None


def train_tokenizer_command(kind: str, vocab_size: int, files: list[str] | None, out: str) -> int:
    from .data import load_corpus, train_tokenizer
    out_dir = Path(out)
    if out_dir.exists():
        raise RecipeError(f"--out {out_dir}: already exists; choose a new directory")
    recipe = config.Recipe(data=config.DataConfig(files=files, vocab_size=vocab_size))
    for file in files or []:
        if not Path(file).is_file():
            raise RecipeError(f"{file}: no such file")
    tok = train_tokenizer(iter(load_corpus(recipe.data)["text"]), kind, vocab_size)
    from growth.adapters.files import atomic_directory
    with atomic_directory(out_dir) as tmp:
        tok.save_pretrained(str(tmp))
    print(f"{kind} tokenizer with {len(tok)} tokens written to {out_dir}")
    return 0
