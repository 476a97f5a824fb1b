"""The training worker: one process per device, started by `b2b train` (workers.start_workers) or srun.

    python -m launchers.train --run-dir RUN [--resume none|auto|TAG]

Reads RUN/recipe.yaml (resolved by `b2b train`), builds the DeepSpeed engine from the
generated config, and trains: deterministic batches, periodic validation, rank-0 TensorBoard
scalars, sharded checkpoints every N steps, at the end and on SIGTERM/SIGUSR1.

Exact resume: a step's batch, masks and dropout are functions of (seed, step, data-parallel rank), and the
checkpoint carries the optimizer, scheduler, data position and counters, so a resumed run
computes the same losses as an uninterrupted one.

Tensor parallelism (recipe `parallel`): the model is megatron-core's GPTModel (launchers/megatron.py),
split over groups of parallel.tensor consecutive ranks; DeepSpeed runs data parallelism (and ZeRO 0-1)
over the groups, so batches, dropout and the global batch follow the data-parallel rank and size.
Each checkpoint tag also holds the weights as a megatron-core torch_dist checkpoint (TAG/dist, with
its HF config.json and tokenizer), which loads at any tensor-parallel degree.
"""

# ruff: noqa: E402 (the stop signals are caught before the imports below take their seconds)
from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)  # as launchers.workers.STOP_SIGNALS
STOP_RECEIVED: list[int] = []  # the stop signals this worker got: the run stops at the end of the next step
if __name__ == "__main__":  # from the first line, so that one arriving while the worker imports and builds
    for _sig in STOP_SIGNALS:  # its engine is kept: not lost (a background shell starts it with SIGINT
        signal.signal(_sig, lambda signum, frame: STOP_RECEIVED.append(signum))  # ignored), nor a traceback
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # blocked by workers.start_workers: one pending is caught

import argparse
import contextlib
import dataclasses
import io
import json
import logging
import math
import os
import random
import shutil
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
import yaml

from growth import B2BError
from growth.adapters.deepspeed import universal_tag
from growth.adapters.files import atomic_directory, read_json

from . import config, ds_config
from .batches import Batches
from .checkpoint import EXIT_STOPPED, RECIPE, STEP_TAG, Checkpointer, NotSaved, RunDir, TrainState, resume_tag
from .data import cache_path, prepare, quiet_libraries, seed_for
from .model import (
    StepPlan,
    apply_perf,
    blocks,
    bottom_blocks,
    build_model,
    peak_tflops,
    train_flops_per_token,
    unit_of,
)
from .workers import PARENT_ENV, init_distributed

NO_DECAY = ("bias", "LayerNorm.weight", "ln_1.weight", "ln_2.weight", "ln_f.weight",
            "norm.weight")  # the last: megatron-core's input_/pre_mlp_/final_layernorm, the Llama family's norms


def param_groups(model, weight_decay: float, by_unit: bool = False) -> tuple[list[dict], list]:
    """AdamW groups (biases and LayerNorm weights get no weight decay, as BERT's and GPT-2's
    recipes), and the unit of each group: one pair of groups per unit (embeddings, each block,
    head) when `by_unit`, so that a unit can be frozen by giving its groups a learning rate of 0."""
    groups: dict[tuple, list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((unit_of(name) if by_unit else None, name.endswith(NO_DECAY)), []).append(p)
    return ([{"params": params, "weight_decay": 0.0 if no_decay else weight_decay}
             for (_, no_decay), params in groups.items()], [unit for unit, _ in groups])


def plan_for(recipe: config.Recipe, step: int) -> StepPlan:
    """bert2BERT's two stages: stage-1 steps sample a depth k x block (uniformly, or cyclically
    bottom-up) and train its top `block` blocks; later steps train the full model. Progressive
    stacking: phase i (stage i + 1) runs progressive.layers[i] blocks, training only those above
    the previous phase's with freeze_lower (MSLT); the last phase runs and trains everything."""
    layers, s1, pg = recipe.model.layers, recipe.stage1, recipe.progressive
    end = 0
    for i, (depth, steps) in enumerate(zip(pg.layers, pg.steps)):
        end += steps
        if step <= end:
            lowest = pg.layers[i - 1] if pg.freeze_lower and i > 0 else 0
            return StepPlan(i + 1, depth, lowest, lowest == 0, True)
    if pg.layers:
        return StepPlan(len(pg.layers) + 1, layers, 0, True, True)
    if step > s1.steps:
        return StepPlan(2 if s1.steps else 0, layers, 0, True, True)
    depths = layers // s1.block
    k = (step - 1) % depths + 1 if s1.sampling == "cyclic" else \
        random.Random(seed_for(recipe.seed, step, 2)).randint(1, depths)
    return StepPlan(1, k * s1.block, (k - 1) * s1.block, s1.train_embeddings, s1.train_head)


def is_eval_step(t: config.TrainConfig, step: int) -> bool:
    """Validation steps: every eval_every steps, every eval_early_every steps up to eval_early_until,
    and the last step (step 0, the starting model, is train.eval_at_start)."""
    return bool((t.eval_every and step % t.eval_every == 0) or step == t.steps or
                (t.eval_early_every and step <= t.eval_early_until and step % t.eval_early_every == 0))


def flops_budget(recipe: config.Recipe, world: int, vocab: int, tied: bool = True) -> float:
    """Total training FLOPs of the recipe: every step's plan, as the trainer counts them."""
    tokens = ds_config.fit_world(recipe, world) * recipe.data.seq_len
    per_plan: dict[StepPlan, int] = {}
    for step in range(1, recipe.train.steps + 1):
        plan = plan_for(recipe, step)
        per_plan[plan] = per_plan.get(plan, 0) + 1
    return tokens * sum(n * train_flops_per_token(recipe.shape, recipe.data.seq_len, vocab, recipe.model.arch, plan,
                                                  tied) for plan, n in per_plan.items())


class Monitor:
    """Rank-0 logging: every scalar to TensorBoard; to the terminal a progress bar, or elsewhere (a
    log file, SLURM) a compact line per log step, with the few figures a person watches."""

    LINE = (("train/loss", "loss"), ("val/loss", "val_loss"), ("train/lr", "lr"), ("train/grad_norm", "grad_norm"),
            ("perf/tokens_per_s", "tokens_per_s"))
    BAR = (("train/loss", "loss"), ("val/loss", "val_loss"), ("train/lr", "lr"))

    def __init__(self, recipe: config.Recipe, rank: int, start: int):
        self.enabled = rank == 0
        self.writer = self.bar = None
        self.last = {}  # the latest value of each scalar (the bar shows the last val_loss between evaluations)
        if not self.enabled:
            return
        if recipe.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(RunDir(recipe.run_dir).tensorboard))
        if recipe.logging.progress and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=recipe.train.steps, initial=start, desc=recipe.name, unit="step",
                            dynamic_ncols=True, bar_format="{desc} {percentage:3.0f}%|{bar:12}| {n_fmt}/{total_fmt} "
                                                           "[{elapsed}<{remaining}] {postfix}")

    def scalars(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        if self.writer:
            for key, value in values.items():
                if value is not None:
                    self.writer.add_scalar(key, value, step)
        self.last |= {k: v for k, v in values.items() if v is not None}
        if self.bar:
            self.bar.set_postfix_str(" ".join(f"{name}={self.last[k]:.4g}" for k, name in self.BAR if k in self.last),
                                     refresh=False)
        else:
            print(f"step {step}: " + " ".join(f"{name}={values[k]:.4g}" for k, name in self.LINE
                                              if values.get(k) is not None), flush=True)

    def advance(self):
        if self.bar:
            self.bar.update(1)

    def close(self):
        if self.writer:
            self.writer.close()
        if self.bar:
            self.bar.close()


class Trainer:
    def __init__(self, recipe: config.Recipe, resume: str):
        import torch.distributed as dist
        self.recipe, self.dist = recipe, dist
        self.cpu = not torch.cuda.is_available()
        with contextlib.redirect_stdout(io.StringIO()) if os.environ.get(config.VERBOSE) != "1" else nullcontext():
            init_distributed(self.cpu)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.megatron = recipe.megatron
        self.dp_rank, self.dp_world = self.rank, self.world  # data parallelism: over tensor-parallel groups
        if self.megatron:
            from . import megatron
            megatron.initialize(recipe.parallel.tensor)
            self.mpu = megatron.DeepSpeedMPU()
            self.dp_rank, self.dp_world = self.mpu.get_data_parallel_rank(), self.mpu.get_data_parallel_world_size()
        # processes on this node: torchrun and slurm/entrypoint.sh say LOCAL_WORLD_SIZE, DeepSpeed's launcher LOCAL_SIZE
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if self.cpu:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
        else:
            torch.cuda.set_device(local_rank)
        if local_rank == 0:
            prepare(recipe, log=print if self.rank == 0 else lambda *_: None)
        dist.barrier()
        self.data = Batches(cache_path(recipe), recipe, self.dp_rank, self.dp_world)
        self.run_dir = RunDir(recipe.run_dir)
        self.checkpoints = Checkpointer(self.run_dir.checkpoints, recipe.checkpoint.keep, self.rank, dist.barrier,
                                        local_rank, self._any_rank)
        self.by_unit = recipe.stage1.steps > 0 or recipe.progressive.freeze_lower
        tag = self._resume_tag(resume)
        start = int(tag.removeprefix("step")) if tag else 0  # progressive runs start at that step's depth
        grown = recipe.start_model if tag is None and recipe.start_model and universal_tag(recipe.start_model) else None
        self.engine = None
        if self.megatron:
            from .megatron import build_model as build_megatron
            model = build_megatron(recipe, self.data.tokenizer)
        else:
            model = build_model(recipe, self.data.tokenizer, layers=plan_for(recipe, max(1, start)).active
                                if recipe.progressive.layers else None)
        self._start_engine(model, load_universal=grown is not None)
        self.global_batch = ds_config.fit_world(recipe, self.dp_world)
        self.tokens_per_step = self.global_batch * recipe.data.seq_len
        self.peak = peak_tflops(recipe)
        self.state = TrainState()
        if grown is not None:
            self._load_grown(grown)
        elif tag is None:
            # DeepSpeed's warmup schedulers start at iteration -1, so the first step and the second
            # would both run at the floor; one step puts step 1 at iteration 0 (HF's convention).
            self.engine.lr_scheduler.step()
        else:
            self._load(tag)
        self.copies = self._copy_grower()
        self.fresh = tag is None  # not resumed from a checkpoint of this run

    # ------------------------------------------------------------ checkpoints

    def _start_engine(self, model, load_universal: bool = False) -> None:
        """A DeepSpeed engine (and a fresh optimizer) for `model`, replacing the current one;
        `load_universal` for one that loads a universal (grown) checkpoint next."""
        import deepspeed
        if self.engine is not None:
            self.engine.destroy()
        model = apply_perf(model, self.recipe.perf)
        groups, self.group_units = param_groups(model, self.recipe.optim.weight_decay, by_unit=self.by_unit)
        self.group_decay = [g["weight_decay"] for g in groups]
        self.engine, *_ = deepspeed.initialize(
            model=model, model_parameters=groups, mpu=self.mpu if self.megatron else None,
            config=ds_config.deepspeed_config(self.recipe, self.dp_world, self.cpu, load_universal=load_universal))
        if self.recipe.perf.compile:
            self.engine.compile()  # compiles the module in place: its state dict keeps its names
        self.plan = None
        self.tied = bool(model.config.tie_word_embeddings)

    def _load_grown(self, path: Path) -> None:
        """Load a grown (universal) checkpoint: its weights, Adam moments and step, and its lr schedule
        position when the growth kept it (growth.json); the recipe sets the hyperparameters."""
        tag = universal_tag(path)
        keep = read_json(path / "growth.json", "growth manifest").get("schedule") == "keep"
        self.engine.load_checkpoint(str(path), tag, load_optimizer_states=True, load_lr_scheduler_states=keep)
        self._recipe_hyperparameters()
        scheduler = self.engine.lr_scheduler
        scheduler.step(scheduler.last_batch_iteration if keep else None)  # a fresh schedule: as in __init__
        if keep:  # the run continues the source's step count: train.steps is the total, as in one long run
            self.state.step = scheduler.last_batch_iteration
        if self.rank == 0:
            print(f"initialised from the grown checkpoint {path} ({tag}; lr schedule "
                  f"{f'at iteration {scheduler.last_batch_iteration}' if keep else 'restarted'})", flush=True)

    def _recipe_hyperparameters(self) -> None:
        """DeepSpeed's loaders copy the saved param groups' hyperparameters into the engine's groups
        (the ZeRO-3 universal loader copies the first group's into all); the recipe's win."""
        o = self.recipe.optim
        for group, decay in zip(self.engine.optimizer.param_groups, self.group_decay):
            group.update(weight_decay=decay, betas=tuple(o.betas), eps=o.eps)

    def _stack(self, layers: int, step: int) -> None:
        """Progressive stacking: grow the model to `layers` blocks ([0..n-1, 0..n-1, ...], the growth
        library's stack) and continue with a new engine, the schedule where it was. With ZeRO, the
        live sharded checkpoint is grown shard by shard (growth/adapters/deepspeed.py), carrying Adam's
        moments when progressive.optimizer is 'grow'; at stage 0 the model is grown in memory and the
        optimizer starts afresh."""
        if self.recipe.zero.stage > 0:
            self._stack_checkpoint(layers)
            return
        import deepspeed

        from growth.adapters.hf import grow_model
        module = self.engine.module
        gather = deepspeed.zero.GatheredParameters(list(module.parameters())) \
            if self.recipe.zero.stage == 3 else nullcontext()
        with gather:
            current = type(module)(module.config)
            current.load_state_dict({n: p.detach().clone() for n, p in module.named_parameters()}, strict=False)
        grown, _ = grow_model(current, dataclasses.replace(self.recipe.shape, layers=layers), width="exact",
                              depth="stack")
        self._start_engine(grown)
        self.engine.lr_scheduler.step(step - 1)  # step k runs at iteration k - 1

    def _stack_checkpoint(self, layers: int) -> None:
        """Save the live checkpoint (unless it was just saved), grow it, and load it into a new engine."""
        from growth.adapters.deepspeed import grow_checkpoint
        tag = STEP_TAG.format(self.state.step)
        if self.checkpoints.latest() != tag:
            self.save()
        grown = self.checkpoints.dir / f"grown-{tag}"  # not a step* tag: never resumed from, removed below
        if self.rank == 0:
            grow_checkpoint(self.checkpoints.dir / tag, grown, f"layers={layers}", width="exact", depth="stack",
                            optimizer=self.recipe.progressive.optimizer, schedule="keep", overwrite=True,
                            log=lambda *_: None)
        self.dist.barrier()
        self._start_engine(build_model(self.recipe, self.data.tokenizer, layers=layers), load_universal=True)
        self._load_grown(grown)
        self.dist.barrier()
        if self.rank == 0:
            shutil.rmtree(grown)

    def _resume_tag(self, resume: str) -> str | None:
        tag = resume_tag(self.checkpoints.dir, resume)
        if tag is None and resume == "auto" and self.rank == 0:
            print(f"resume auto: no complete checkpoint in {self.checkpoints.dir}; starting at step 0", flush=True)
        return tag

    def _load(self, tag: str) -> None:
        self.state = self.checkpoints.load(self.engine, tag)
        self._recipe_hyperparameters()
        scheduler = self.engine.lr_scheduler  # the recipe's schedule at the saved iteration: a changed
        scheduler.step(scheduler.last_batch_iteration)  # train.steps applies from the first resumed step
        if self.rank == 0:
            print(f"resumed from {self.checkpoints.dir / tag} at step {self.state.step}", flush=True)

    def save(self) -> None:
        """A sharded DeepSpeed checkpoint at the current step (launchers/checkpoint.py); with
        megatron-core, the weights also go to TAG/dist as a torch_dist checkpoint."""
        self.checkpoints.save(self.engine, self.state, self._side_files)

    def _side_files(self, tag_dir: Path) -> None:
        """Beside the shards: the recipe, and the model's HF config and tokenizer (what `b2b grow`
        needs), in TAG/dist with megatron-core, whose torch_dist weights all ranks write there."""
        side = tag_dir / "dist" if self.megatron else tag_dir
        if self.rank == 0:
            side.mkdir(parents=True, exist_ok=True)
            (tag_dir / RECIPE).write_text(config.dump(self.recipe))
            module_config = self.engine.module.config
            if not self.megatron:
                module_config.architectures = [type(self.engine.module).__name__]
            module_config.save_pretrained(str(side))
            self.data.tokenizer.save_pretrained(str(side))
        if self.megatron:
            from .megatron import save_dist
            self.dist.barrier()
            save_dist(self.engine.module, side)

    def export(self) -> None:
        """The final weights as an HF model directory (RUN/final), e.g. a source for `b2b grow`."""
        import deepspeed
        module = self.engine.module
        if self.megatron:  # gathered from the shards by rank 0's tensor-parallel group
            from .megatron import to_hf
            module = to_hf(module) if self.dp_rank == 0 else None
        gather = deepspeed.zero.GatheredParameters(list(module.parameters())) \
            if self.recipe.zero.stage == 3 else nullcontext()
        with gather:
            if self.rank == 0:
                with atomic_directory(self.run_dir.final) as tmp:
                    module.save_pretrained(str(tmp))
                    self.data.tokenizer.save_pretrained(str(tmp))
                    s = self.state  # this model's own training cost, for reports on models grown from it
                    (tmp / "training.json").write_text(json.dumps(
                        {"recipe": self.recipe.name, "steps": s.step, "tokens": s.tokens, "flops": s.flops,
                         "train_seconds": s.seconds}, indent=1))
        self.dist.barrier()

    # ------------------------------------------------------------ steps

    def _all_mean(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self.engine.device)
        self.dist.all_reduce(t)
        return t.item() / self.world

    def step_flops(self, plan: StepPlan) -> float:
        r = self.recipe
        return self.tokens_per_step * train_flops_per_token(r.shape, r.data.seq_len, len(self.data.tokenizer),
                                                            r.model.arch, plan, self.tied)

    def _freeze(self, plan: StepPlan) -> float:
        """Apply the plan: parameters outside it get no gradient and their groups a learning rate
        of 0 for this step (DeepSpeed's scheduler sets every group's rate again after the step).
        Returns the scheduled learning rate."""
        groups = self.engine.optimizer.param_groups
        lr = max(g["lr"] for g in groups)
        if plan != self.plan:
            for name, p in self.engine.module.named_parameters():
                p.requires_grad_(plan.trains(unit_of(name)))
            self.plan = plan
        if self.by_unit:
            for group, unit in zip(groups, self.group_units):
                if not plan.trains(unit):
                    group["lr"] = 0.0
        return lr

    def _on_device(self, batch: dict) -> dict:
        """A batch on this rank's device: on GPUs from pinned memory without blocking (perf.pin_memory)."""
        pin = self.recipe.perf.pin_memory and not self.cpu
        return {k: (v.pin_memory() if pin else v).to(self.engine.device, non_blocking=pin) for k, v in batch.items()}

    def train_step(self, step: int, plan: StepPlan) -> tuple[float, float]:
        """(mean loss over micro steps and ranks, the learning rate this step used)."""
        self.engine.train()
        lr = self._freeze(plan)
        torch.manual_seed(seed_for(self.recipe.seed, step, self.dp_rank, 1))  # dropout: the same in a TP group
        total = 0.0
        with bottom_blocks(self.engine.module, plan.active):
            for micro in range(self.recipe.batch.accum):
                loss = self.engine(**self._on_device(self.data.train_batch(step, micro))).loss
                self.engine.backward(loss)
                self.engine.step()
                total += loss.item()
        return self._all_mean(total / self.recipe.batch.accum), lr

    @torch.no_grad()
    def evaluate(self) -> float:
        self.engine.eval()
        losses = [self.engine(**self._on_device(batch)).loss.item()
                  for batch in self.data.val_batches(self.recipe.train.eval_batches)]
        return self._all_mean(sum(losses) / len(losses))

    def _copy_grower(self):
        """The growth that made the start model (its growth.json), for growth/copy_cosine/*: HF
        models grown by copying units (not DirectCopy); None otherwise."""
        start = self.recipe.start_model
        manifest = start / "growth.json" if start is not None else None
        if self.megatron or manifest is None or not manifest.is_file():
            return None
        from growth import GrowthError
        from growth.adapters.hf import copies_grower
        try:
            return copies_grower(manifest)
        except GrowthError as err:
            if self.rank == 0:
                print(f"warning: no growth/copy_cosine scalars: {err}", flush=True)
            return None

    def copy_cosines(self) -> dict:
        """growth/copy_cosine/{hidden,heads,ffn}: how alike the grown copies still are (growth/copies.py),
        on rank 0; every rank takes part in gathering ZeRO-3's partitioned parameters."""
        if self.copies is None:
            return {}
        import deepspeed

        from growth.copies import copy_cosines
        module = self.engine.module
        gather = deepspeed.zero.GatheredParameters(list(module.parameters())) \
            if self.recipe.zero.stage == 3 else nullcontext()
        with gather:
            found = copy_cosines(self.copies, module.named_parameters()) if self.rank == 0 else {}
        return {f"growth/copy_cosine/{kind}": value for kind, value in found.items()}

    def _any_rank(self, value: int) -> int:
        """The largest of every rank's value (a flag: whether any rank's is set)."""
        flag = torch.tensor([int(value)], dtype=torch.int64, device=self.engine.device)
        self.dist.all_reduce(flag, op=self.dist.ReduceOp.MAX)
        return int(flag.item())

    def _should_stop(self) -> bool:
        return bool(self._any_rank(STOP_RECEIVED[0] if STOP_RECEIVED else 0))

    def run(self) -> str:
        r, t = self.recipe, self.recipe.train
        monitor = Monitor(r, self.rank, self.state.step)
        last = t.stop_at or t.steps
        outcome = "finished"
        try:
            if self.fresh and t.eval_at_start:  # the starting model, before any update (step 0, or a kept schedule's)
                monitor.scalars(self.state.step, {"val/loss": self.evaluate(), **self.copy_cosines(),
                                                     "train/tokens": 0, "train/flops": 0.0, "time/train_seconds": 0.0})
            while self.state.step < last:
                step = self.state.step + 1
                plan = plan_for(r, step)
                if plan.active > len(blocks(self.engine.module)):
                    self._stack(plan.active, step)
                start = time.perf_counter()
                loss, lr = self.train_step(step, plan)
                elapsed = time.perf_counter() - start
                s = self.state
                s.step, s.samples, s.stage = step, s.samples + self.global_batch, plan.stage
                s.tokens, s.flops = s.tokens + self.tokens_per_step, s.flops + self.step_flops(plan)
                s.seconds += elapsed
                if not math.isfinite(loss):
                    raise FloatingPointError(f"step {step}: training loss is {loss}; lower optim.lr or check the data")
                evaluate = is_eval_step(t, step)
                if evaluate or step % r.logging.every == 0 or step == last:
                    values = self._train_scalars(loss, lr, elapsed, plan)
                    if evaluate:
                        values["val/loss"] = self.evaluate()
                        values |= self.copy_cosines()
                    monitor.scalars(step, values)
                monitor.advance()
                stop = self._should_stop()
                if stop or step == last or (r.checkpoint.every and step % r.checkpoint.every == 0):
                    self.save()
                if stop:
                    name = signal.Signals(STOP_RECEIVED[0] if STOP_RECEIVED else signal.SIGTERM).name
                    outcome = f"stopped by signal {name}"
                    break
            if self.state.step < t.steps and outcome == "finished":
                outcome = "stopped at train.stop_at"
            if self.state.step == t.steps:
                self.export()
        finally:
            monitor.close()
        if self.rank == 0:
            status = {"state": "finished" if self.state.step == t.steps else "stopped", "reason": outcome,
                      "step": self.state.step, "steps": t.steps, "checkpoint": self.checkpoints.latest()}
            self.run_dir.status.write_text(json.dumps(status, indent=1))
            print(f"{outcome} at step {self.state.step}/{t.steps}; "
                  f"checkpoint {self.checkpoints.dir}/{status['checkpoint']}", flush=True)
        return outcome

    def _train_scalars(self, loss: float, lr: float, elapsed: float, plan: StepPlan) -> dict:
        tflops = self.step_flops(plan) / elapsed / self.world / 1e12
        scale = getattr(self.engine.optimizer, "cur_scale", None) if self.recipe.train.precision == "fp16" else None
        norm = self.engine.get_global_grad_norm()
        return {
            "train/loss": loss,
            "train/lr": lr,
            "train/grad_norm": float(norm) if norm is not None else None,
            "train/tokens": self.state.tokens,
            "train/flops": self.state.flops,
            "train/stage": self.state.stage,
            "train/active_layers": plan.active,
            "time/train_seconds": self.state.seconds,
            "train/loss_scale": scale,
            "perf/tokens_per_s": self.tokens_per_step / elapsed,
            "perf/tflops_per_device": tflops,
            "perf/mfu": tflops / self.peak if self.peak else None,
            "perf/peak_memory_gib": None if self.cpu else torch.cuda.max_memory_allocated() / 2 ** 30,
        }


def quiet_workers() -> None:
    """Without `b2b train --verbose`: no routine INFO lines and warnings from DeepSpeed (its logger,
    the lr scheduler's), megatron-core and torch; errors still print."""
    if os.environ.get(config.VERBOSE) == "1":
        return
    from deepspeed.utils import logger
    logger.setLevel(logging.ERROR)
    logging.getLogger("megatron").setLevel(logging.ERROR)
    for category in (UserWarning, FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m launchers.train")
    p.add_argument("--run-dir", required=True, type=Path)
    p.add_argument("--resume", default="none")
    args = p.parse_args(argv)
    die_with_parent()
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    quiet_workers()
    quiet_libraries()
    recipe = config.validate(config.build(config.Recipe, yaml.safe_load(RunDir(args.run_dir).recipe.read_text())))
    import torch.distributed as dist
    try:
        Trainer(recipe, args.resume).run()
    except NotSaved as err:  # the last checkpoint is intact: resumable once the disk has room
        if err.here:
            print(f"b2b train: error: {err}", file=sys.stderr)
        return EXIT_STOPPED
    except B2BError as err:  # a bad recipe, checkpoint or model (in-run growth included): one line
        print(f"b2b train: error: {err}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def die_with_parent() -> None:
    """On Linux, a worker that `b2b train` started is killed when b2b dies (a kill -9 of its
    process group, whose signals the worker's own session does not get), so that no orphan trains
    on in a directory the next run will take over."""
    parent = os.environ.get(PARENT_ENV)
    if parent is None or not sys.platform.startswith("linux"):
        return
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != int(parent):  # b2b died before the line above
        os._exit(1)


if __name__ == "__main__":
    code = main()
    # Leave without the interpreter's teardown: a C++ thread still joinable in a static destructor
    # (seen once in a ZeRO-3 worker after a clean stop) aborts with "terminate called without an
    # active exception" and exit 250, although the checkpoint and status.json are written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
