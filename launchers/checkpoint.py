"""A `b2b train` run directory and its checkpoints, with one owner.

    RUN/recipe.yaml      the resolved recipe          RUN/status.json    how the run ended
    RUN/deepspeed.json   the generated DeepSpeed JSON RUN/tensorboard/   rank 0's event files
    RUN/grown/           model.grow_from grown        RUN/final/         the trained HF model
    RUN/checkpoints/latest, RUN/checkpoints/stepNNNNNNNN/   DeepSpeed's sharded checkpoints
    RUN/lock             the live run's lock (launchers/runlock.py)

A checkpoint is complete once 'latest' names it: every rank has written its files, and each
node has put them on disk (fsync), before rank 0 moves the pointer, so a tag newer than 'latest'
is a save that died half-way: it is never resumed from, and the next start removes it with a
warning. A save that cannot be written (a full disk, found before it starts or while it writes)
stops the run with the previous checkpoint intact: NotSaved, exit EXIT_STOPPED. The launcher
(`b2b train`) reads this module without starting a worker; the worker's Checkpointer saves,
loads and prunes.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from growth import CheckpointError
from growth.adapters.files import atomic_file, disk_full, fsync_tree, read_latest

EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped early with a checkpoint; run again with --resume auto
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
    tag = read_latest(latest)
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


def partial_tags(ckpt_dir: Path) -> list[str]:
    """Tags newer than 'latest' (all of them if there is none): saves that died half-way."""
    if not ckpt_dir.is_dir():
        return []
    latest = latest_tag(ckpt_dir)
    return [t for t in tags(ckpt_dir) if latest is None or t > latest]


def remove_partial(ckpt_dir: Path, log: Callable[[str], None]) -> None:
    """Remove the saves that died half-way (only ever with the run's lock held: a live run's save
    in progress looks the same)."""
    for tag in partial_tags(ckpt_dir):
        shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
        log(f"b2b train: warning: removed {ckpt_dir / tag}, a checkpoint whose save did not finish")


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class NotSaved(CheckpointError):
    """A checkpoint that could not be written; the previous one is intact. `here`: this rank saw why."""

    def __init__(self, message: str, here: bool = True):
        super().__init__(message)
        self.here = here


class Checkpointer:
    """Saves, loads and prunes one run's DeepSpeed checkpoints (every rank calls each method).
    any_rank(flag): whether any rank's flag is true (a collective); local_rank 0 of each node
    checks the free space and puts the node's files on disk."""

    def __init__(self, ckpt_dir: Path, keep: int, rank: int, barrier: Callable[[], None], local_rank: int = 0,
                 any_rank: Callable[[bool], bool] = bool):
        self.dir, self.keep, self.rank, self.barrier = ckpt_dir, keep, rank, barrier
        self.local_rank, self.any_rank = local_rank, any_rank

    def latest(self) -> str | None:
        return latest_tag(self.dir)

    def space_short(self, tag: str) -> str | None:
        """Why the disk cannot hold the next checkpoint (as large as the last one, 5% spare), or None."""
        last = self.latest()
        if self.local_rank != 0 or last is None:
            return None
        need, free = 1.05 * tree_bytes(self.dir / last), shutil.disk_usage(self.dir).free
        if free >= need:
            return None
        return (f"{self.dir}: {free / 2**20:.1f} MiB free, but the checkpoint at {tag} needs about "
                f"{need / 2**20:.1f} MiB (as large as {last}): free space, then continue with --resume auto; "
                f"the checkpoint {last} is intact")

    def save(self, engine, state: TrainState, side_files: Callable[[Path], None]) -> str:
        """TAG = the state's step: rank 0 writes `side_files(TAG dir)` (the recipe, the model's config
        and tokenizer, what `b2b grow` reads), every rank its shards, each node puts them on disk;
        then 'latest' moves to TAG and older tags beyond `keep` (and any newer, abandoned one) go.
        A disk too full for it is found first, on every rank at once (NotSaved, nothing written)."""
        tag = STEP_TAG.format(state.step)
        short = self.space_short(tag)
        if self.any_rank(short is not None):
            raise NotSaved(short or "another node's disk cannot hold the checkpoint", here=short is not None)
        try:
            if self.rank == 0:
                (self.dir / tag).mkdir(parents=True, exist_ok=True)
            side_files(self.dir / tag)
            engine.save_checkpoint(str(self.dir), tag, client_state={CLIENT_KEY: dataclasses.asdict(state)},
                                   save_latest=False)
            if self.local_rank == 0:
                fsync_tree(self.dir / tag)
        except (OSError, RuntimeError) as err:  # a full disk or quota mid-save (torch.save: RuntimeError)
            # A rank that failed leaves the save's collectives: the others' fail once it exits (gloo).
            # Out of space, each node's local rank 0 says so, in one line; any other error, each rank.
            full, last = disk_full(err, self.dir), self.latest()
            why = "no space left on the device" if full else " ".join(str(err).split())[:200]
            raise NotSaved(f"{self.dir / tag}: could not be written ({why}): "
                           + ("free space, then " if full else "") + "continue with --resume auto; "
                           + (f"the checkpoint {last} is intact" if last else "there is no earlier checkpoint")
                           + " (the half-written tag is removed at the next start)",
                           here=self.local_rank == 0 or not full) from None
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
