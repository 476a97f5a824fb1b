"""A `b2b train` run directory and its checkpoints, with one owner.

    RUN/recipe.yaml      the resolved recipe          RUN/status.json    how the run ended
    RUN/deepspeed.json   the generated DeepSpeed JSON RUN/tensorboard/   rank 0's event files
    RUN/grown/           model.grow_from grown        RUN/final/         the trained HF model
    RUN/checkpoints/latest, RUN/checkpoints/stepNNNNNNNN/   DeepSpeed's sharded checkpoints
    RUN/lock             the live run's lock (launchers/runlock.py)

A checkpoint is complete once 'latest' names it: every rank has written its files before rank 0
moves the pointer, so a tag newer than 'latest' is a save that died half-way and is never
resumed from (the next save removes it). The launcher (`b2b train`) reads this module without
starting a worker; the worker's Checkpointer saves, loads and prunes.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from growth import CheckpointError
from growth.adapters.files import atomic_file

STEP_TAG = "step{:08d}"
LATEST = "latest"
CLIENT_KEY = "b2b"  # the TrainState inside DeepSpeed's client_state


RECIPE = "recipe.yaml"  # in RUN and in every checkpoint tag


@dataclass(frozen=True)
class RunDir:
    """The layout of a run directory (out_dir)."""
    root: Path

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def status(self) -> Path:
        return self.root / "status.json"

    @property
    def final(self) -> Path:
        return self.root / "final"

    @property
    def grown(self) -> Path:
        return self.root / "grown"

    @property
    def recipe(self) -> Path:
        return self.root / RECIPE

    @property
    def deepspeed(self) -> Path:
        return self.root / "deepspeed.json"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"


@dataclass
class TrainState:
    """What a checkpoint carries beside DeepSpeed's own state: the step and the run's counters."""
    step: int = 0
    samples: int = 0
    tokens: int = 0
    flops: float = 0.0
    seconds: float = 0.0  # training time, evaluation excluded
    stage: int = 0  # bert2BERT's stage (0, or 1 during stage 1)

    @classmethod
    def from_client(cls, data: dict) -> TrainState:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def tags(ckpt_dir: Path) -> list[str]:
    return sorted(p.name for p in ckpt_dir.glob("step*") if p.is_dir())


def latest_tag(ckpt_dir: Path) -> str | None:
    """The newest complete checkpoint: 'latest' is written only after every rank saved."""
    latest = ckpt_dir / LATEST
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    if not (ckpt_dir / tag).is_dir():
        raise CheckpointError(f"{latest} names {tag!r}, which is missing: the checkpoint directory is damaged")
    return tag


def resume_tag(ckpt_dir: Path, resume: str) -> str | None:
    """The checkpoint `--resume` names: none for 'none', the newest complete one for 'auto' (none if
    there is none yet), else that tag, which must exist."""
    if resume == "none":
        return None
    if resume == "auto":
        return latest_tag(ckpt_dir)
    if not (ckpt_dir / resume).is_dir() or not resume.removeprefix("step").isdigit():
        raise CheckpointError(f"--resume {resume}: no such checkpoint in {ckpt_dir}; use 'auto' or one of "
                              f"{tags(ckpt_dir) if ckpt_dir.is_dir() else []}")
    return resume


def check_same_parallel(recipe, tag_dir: Path) -> None:
    """A checkpoint resumes only with the parallel section it was saved with (DeepSpeed's files are
    per tensor-parallel rank); its weights (TAG/dist, RUN/final) start a run at any other."""
    file = tag_dir / RECIPE
    saved = type(recipe.parallel)(**(yaml.safe_load(file.read_text()).get("parallel") or {})) \
        if file.is_file() else recipe.parallel
    if saved != recipe.parallel:
        def text(p):
            return f"parallel.tensor={p.tensor}, parallel.megatron={str(p.megatron).lower()}"
        raise CheckpointError(f"parallel: {tag_dir} was saved with {text(saved)}, this recipe has "
                              f"{text(recipe.parallel)}: resume with the saved values, or start a new run from "
                              "its weights (model.init_from: the tag's dist/ directory, or RUN/final)")


class Checkpointer:
    """Saves, loads and prunes one run's DeepSpeed checkpoints (every rank calls each method)."""

    def __init__(self, ckpt_dir: Path, keep: int, rank: int, barrier: Callable[[], None]):
        self.dir, self.keep, self.rank, self.barrier = ckpt_dir, keep, rank, barrier

    def latest(self) -> str | None:
        return latest_tag(self.dir)

    def save(self, engine, state: TrainState, side_files: Callable[[Path], None]) -> str:
        """TAG = the state's step: rank 0 writes `side_files(TAG dir)` (the recipe, the model's config
        and tokenizer, what `b2b grow` reads), every rank its shards; then 'latest' moves to TAG and
        older tags beyond `keep` (and any newer, abandoned one) go."""
        tag = STEP_TAG.format(state.step)
        if self.rank == 0:
            (self.dir / tag).mkdir(parents=True, exist_ok=True)
        side_files(self.dir / tag)
        engine.save_checkpoint(str(self.dir), tag, client_state={CLIENT_KEY: dataclasses.asdict(state)},
                               save_latest=False)
        self.barrier()
        if self.rank == 0:
            with atomic_file(self.dir / LATEST) as tmp:  # DeepSpeed's pointer, written last
                tmp.write_text(tag)
            saved = tags(self.dir)
            here = saved.index(tag) + 1
            for old in saved[:max(0, here - self.keep)] + saved[here:]:
                shutil.rmtree(self.dir / old, ignore_errors=True)
        self.barrier()
        return tag

    def load(self, engine, tag: str) -> TrainState:
        path, client = engine.load_checkpoint(str(self.dir), tag)
        if path is None or CLIENT_KEY not in client:
            raise CheckpointError(f"{self.dir / tag}: not a checkpoint written by b2b train")
        return TrainState.from_client(client[CLIENT_KEY])
