"""The kill -9 campaign of issue 20 (item 1): a 2-process `b2b train` (StackBERT at ZeRO-2, so
that the run also grows its model in the middle) killed with SIGKILL at seeded random moments,
its whole process group at once, as a node's OOM killer or a scheduler without a grace period
does; then started again with `--resume auto`, until it finishes.

    python benchmarks/kill_campaign.py --seed 0 --kills 21

Each kill targets a phase, the targets drawn in turn from a seeded shuffle of every phase, and
lands a seeded random moment after the phase is seen from outside, as a user would see it:
data preparation (the cache removed first; after "data: building"), start-up (imports, engine
build, resume: a random time before the first step), a training step (after a step's line, in
the next one), a checkpoint save (a tag newer than 'latest' on disk), the pruning after it ('latest'
moved, a tag beyond checkpoint.keep not yet removed), the in-run growth (the grown checkpoint
being written or loaded) and the export of RUN/final (after the last step). The table counts
where the kill was seen to land.

After every kill: no process of the run is left; 'latest' names a tag that exists and holds
every rank's files; no DeepSpeed /dev/shm buffer was left. Each restart takes over the killed
run's lock and removes a half-written tag, each with a one-line warning; a kill loses at most one
checkpoint interval of steps (steps logged after the newest complete checkpoint); a start never
hangs. At the end the run has finished, nothing
half-written is left (no partial tag, no grown checkpoint, no hidden temporary directory), and
every step's loss equals an uninterrupted run's (float32 CPU, 1e-6). Prints the kills by phase
and the steps lost; exits 1 if any contract broke.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from growth import CheckpointError
from growth.adapters.files import alive
from launchers.checkpoint import RunDir, latest_tag, partial_tags, tags
from launchers.events import read_scalars

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
import harness  # noqa: E402

STEPS, EVERY, KEEP, BOUNDARIES = 24, 4, 2, (8, 16)
SETS = [f"train.steps={STEPS}", f"checkpoint.every={EVERY}", f"checkpoint.keep={KEEP}", "train.eval_every=8",
        "optim.warmup_steps=2", "zero.stage=2", "model.layers=4", "progressive.layers=[1, 2]",
        "progressive.steps=[8, 8]", "data.max_documents=800", "data.vocab_size=512", "logging.progress=false"]
PHASES = ("data", "start", "step", "save", "prune", "growth", "export")


class Start:
    """One `b2b train --resume auto`, its output read as it comes."""

    def __init__(self, run: Path, cache: Path):
        sets = sum((["--set", s] for s in [f"out_dir={run}", f"data.cache_dir={cache}", *SETS]), [])
        self.proc = subprocess.Popen([sys.executable, "-m", "launchers.cli", "train", str(ROOT / "recipes" /
                                      "bert-tiny-cpu.yaml"), "--procs", "2", "--resume", "auto", *sets],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True, cwd=ROOT)
        self.lines: list[str] = []
        self.last_step = 0  # the last step this start logged
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith("step ") and line.split()[1].rstrip(":").isdigit():
                self.last_step = int(line.split()[1].rstrip(":"))

    def wait(self, timeout: float | None = None) -> int | None:
        """The exit code; None when it ran past `timeout` (a hang), after which it is killed."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            code = None
        self.reader.join()
        return code


def pruning(run: Path) -> bool:
    """'latest' has moved to the newest tag, and a tag beyond checkpoint.keep is still there."""
    ckpt = RunDir(run).checkpoints
    try:
        return len(tags(ckpt)) > KEEP and not partial_tags(ckpt)
    except CheckpointError:  # 'latest' being replaced
        return False


def growing(run: Path) -> bool:
    """The grown checkpoint of launchers/train.py's in-run stacking on disk: being written (its
    hidden temporary sibling) or being loaded."""
    ckpt = RunDir(run).checkpoints  # a killed writer's temporary (.NAME.tmp-HOST-PID) is not growth
    return any(ckpt.glob("grown-*")) or any(alive(int(p.name.rsplit("-", 1)[1])) for p in ckpt.glob(".grown-*"))


def phase(start: Start, run: Path, cache: Path, prepared: bool) -> str:
    """Where a kill at this moment lands, as seen from outside."""
    if not prepared and not any(cache.glob("*/tokenizer")):
        return "data"
    if partial_tags(RunDir(run).checkpoints):
        return "save"
    if pruning(run):
        return "prune"
    if growing(run):
        return "growth"
    if start.last_step == 0:
        return "start"
    return "export" if start.last_step == STEPS else "step"


def seen(target: str, start: Start, run: Path, startup: float, began: float) -> bool:
    """Whether the target phase has begun in this start."""
    if target == "data":
        return any(line.startswith("data: building") for line in start.lines)
    if target == "start":
        return time.monotonic() - began > startup
    if target == "step":
        return start.last_step % EVERY != 0  # a step's line, mid-interval: the kill lands in a later step
    if target == "save":
        return bool(partial_tags(RunDir(run).checkpoints))
    if target == "prune":
        return pruning(run)
    if target == "growth":
        return growing(run)
    return start.last_step == STEPS  # export


# how long after a phase is seen the kill lands, at most, in seconds
DELAY = {"data": 1.0, "start": 0.0, "step": 0.2, "save": 0.01, "prune": 0.0, "growth": 0.05, "export": 1.0}


def shm_buffers() -> set:
    return set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"))


def complete(run: Path) -> str | None:
    """What is wrong with the checkpoint 'latest' names, if anything: it must hold the model's
    states and both ranks' optimizer partitions."""
    ckpt = RunDir(run).checkpoints
    try:
        tag = latest_tag(ckpt)
    except CheckpointError as err:
        return str(err)
    if tag is None:
        return None
    files = sorted(p.name for p in (ckpt / tag).iterdir())
    optim = [f for f in files if f.endswith("_optim_states.pt")]
    model = [f for f in files if f.endswith("_model_states.pt")]
    return None if len(optim) == 2 and model else f"'latest' names {tag}, which holds {files}"


def holder(run: Path) -> int | None:
    """The pid in the run's lock (the killed start's, or an earlier one's if it died before taking it)."""
    try:
        return json.loads((run / "lock").read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None


def newest_step(run: Path) -> int:
    """The step of the newest complete checkpoint (0: none yet)."""
    tag = latest_tag(RunDir(run).checkpoints)
    return int(tag.removeprefix("step")) if tag else 0


def possible(target: str, run: Path) -> bool:
    """Whether a start from the run's newest complete checkpoint still passes through the phase."""
    step = newest_step(run)
    return {"growth": step < max(BOUNDARIES), "step": step < STEPS - 1, "save": step < STEPS,
            "prune": step < STEPS}.get(target, True)


def campaign_run(run: Path, cache: Path, reference: dict, startup: float, targets: list[str], budget: int,
                 rng: random.Random, shm: set, log: list) -> list[str]:
    """Kills (at most `budget`, aimed at `targets` in turn) and restarts of one run until it
    finishes: the contracts broken. `log` gets (phase, steps lost) per kill."""
    broken, kills, removed_partial, stale_lock = [], 0, False, None
    hang = max(120.0, 10 * startup)
    for _ in range(budget + 20):
        target = next((t for t in targets if possible(t, run)), None) if kills < budget else None
        if target == "data":
            shutil.rmtree(cache, ignore_errors=True)  # this start prepares the data again
        prepared = any(cache.glob("*/tokenizer"))
        began = time.monotonic()
        start = Start(run, cache)
        killed = None
        if target is not None:
            moment = startup * rng.random() if target == "start" else 0.0
            while start.proc.poll() is None and not seen(target, start, run, moment, began) and \
                    time.monotonic() - began < hang:
                time.sleep(0.002)
            time.sleep(rng.uniform(0, DELAY[target]))
            if start.proc.poll() is None:
                targets.remove(target)
                killed = phase(start, run, cache, prepared)
                checkpoint = newest_step(run)
                os.killpg(start.proc.pid, signal.SIGKILL)
        code = start.wait(timeout=hang)
        out = "".join(start.lines)
        if code is None:
            broken.append(f"a start hung (killed after {hang:.0f} s): {out[-1500:]}")
            break
        if removed_partial and start.last_step > 0 and "a checkpoint whose save did not finish" not in out:
            broken.append(f"a start after a kill mid-save did not remove the partial tag: {out[-1500:]}")
        if stale_lock and start.last_step > 0 and f"took over the lock of process {stale_lock}" not in out:
            broken.append(f"a start did not take over the killed run's lock (pid {stale_lock}): {out[-1500:]}")
        if killed is None:
            if code != 0:
                broken.append(f"a start exited {code}: {out[-2000:]}")
            break
        kills += 1
        log.append((killed, max(0, start.last_step - checkpoint)))
        if log[-1][1] > EVERY:
            broken.append(f"kill {kills} ({killed}): {log[-1][1]} steps lost, more than one checkpoint interval")
        for _ in range(50):
            if not harness.run_processes(run):
                break
            time.sleep(0.2)
        if harness.run_processes(run):
            broken.append(f"kill {kills} ({killed}): processes left: {harness.run_processes(run)}")
        if (problem := complete(run)) is not None:
            broken.append(f"kill {kills} ({killed}): {problem}")
        if shm_buffers() - shm:
            broken.append(f"kill {kills} ({killed}): /dev/shm buffers left: {shm_buffers() - shm}")
        removed_partial = bool(partial_tags(RunDir(run).checkpoints))
        stale_lock = holder(run)
    loss = read_scalars(run)["train/loss"] if RunDir(run).tensorboard.is_dir() else {}
    differ = [s for s in range(1, STEPS + 1) if abs(reference[s] - loss.get(s, float("inf"))) > 1e-6 * reference[s]]
    if differ:
        broken.append(f"losses differ from the uninterrupted run's at steps {differ}")
    if not (RunDir(run).final / "config.json").is_file():
        broken.append("the run did not finish")
    ckpt = RunDir(run).checkpoints
    left = [p.name for p in [*run.glob(".*"), *ckpt.glob("grown-*"), *ckpt.glob(".grown-*")]] + partial_tags(
        RunDir(run).checkpoints)
    if left:
        broken.append(f"half-written entries left at the end: {left}")
    return broken


@dataclass
class Campaign:
    seed: int
    span: float  # an uninterrupted run's wall clock, data preparation included
    log: list[tuple[str, int]] = field(default_factory=list)  # per kill: (phase, steps lost)
    runs: int = 0
    recovered: int = 0  # runs that finished, every loss the uninterrupted run's, no contract broken
    broken: list[str] = field(default_factory=list)

    def table(self) -> str:
        kills = collections.Counter(where for where, _ in self.log)
        lost = collections.Counter(n for _, n in self.log)
        return "\n".join([
            f"seed {self.seed}: {len(self.log)} kills over {self.runs} runs of {STEPS} steps (checkpoint every "
            f"{EVERY} steps; an uninterrupted run {self.span:.1f} s)", "", "| phase | kills |", "|---|---|",
            *(f"| {where} | {kills[where]} |" for where in PHASES), "",
            f"steps lost per kill (logged after the newest complete checkpoint): {dict(sorted(lost.items()))}",
            f"runs recovered (finished, every loss the uninterrupted run's): {self.recovered} of {self.runs}",
            f"contracts broken: {len(self.broken)}", *(" - " + x.splitlines()[0][:300] for x in self.broken)])


def campaign(seed: int, kills: int, root: Path, phases: tuple[str, ...] = PHASES) -> Campaign:
    """An uninterrupted reference run, then runs killed `kills` times in all, in `root`, aimed at
    `phases` in turn."""
    rng = random.Random(seed)
    cache = root / "cache"
    began = time.monotonic()
    ref = Start(root / "reference", cache)
    while ref.last_step == 0 and ref.proc.poll() is None:
        time.sleep(0.01)
    startup = time.monotonic() - began  # to the first step: data preparation, imports, engine build
    if ref.wait() != 0:
        raise RuntimeError("the uninterrupted run failed:\n" + "".join(ref.lines[-40:]))
    c = Campaign(seed, time.monotonic() - began)
    reference = read_scalars(root / "reference")["train/loss"]
    targets = [phases[i % len(phases)] for i in range(kills)]
    rng.shuffle(targets)
    shm = shm_buffers()
    while len(c.log) < kills and c.runs < kills + 5:  # a target that never fires ends the campaign
        c.runs += 1
        problems = campaign_run(root / f"run{c.runs}", cache, reference, startup, targets, kills - len(c.log), rng,
                                shm, c.log)
        c.recovered += not problems
        c.broken += [f"run {c.runs}: {x}" for x in problems]
    return c


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kills", type=int, default=3 * len(PHASES))
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        c = campaign(args.seed, args.kills, Path(d))
    print(c.table())
    return 1 if c.broken else 0


if __name__ == "__main__":
    sys.exit(main())
