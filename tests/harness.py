"""`b2b train` runs for the tests, started the way a cluster starts them (slurm/entrypoint.sh):
every check and the run directory in this process (`b2b train --prepare-only`), then the workers
straight from torch.distributed's variables, without DeepSpeed's launcher and its launch process
(each one more Python start that imports DeepSpeed: about 15 s a run on 2 cores). The tests of
the launcher itself (signals, Ctrl-C, its exit codes, the README's commands) start `b2b train`
as a user does."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from launchers.checkpoint import RunDir
from launchers.cli import main
from launchers.launch import EXIT_STOPPED, free_port


@dataclass
class Done:
    returncode: int  # as b2b train's: 0 finished, 75 stopped with a checkpoint, 2 refused, else failed
    stdout: str  # b2b's own output and rank 0's
    stderr: str  # b2b's errors, and every rank's output when a worker failed


def train(recipe: str | Path, out_dir: Path, sets: list[str], procs: int = 2, resume: str = "none") -> Done:
    argv = ["train", str(recipe), "--procs", str(procs), "--resume", resume, "--prepare-only",
            *sum((["--set", s] for s in [f"out_dir={out_dir}", *sets]), [])]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    run = RunDir(Path(out_dir))
    if code != 0 or (run.status.is_file() and json.loads(run.status.read_text())["state"] == "finished"):
        return Done(code, out.getvalue(), err.getvalue())  # refused, or already finished
    for _ in range(2):  # a port taken between free_port() and rank 0's bind (another test's run): again
        codes, logs = start_workers(run.root, procs, resume)
        if not any(codes) or "EADDRINUSE" not in "".join(logs) and "address already in use" not in "".join(logs):
            break
    if any(codes):
        return Done(max(codes), out.getvalue() + logs[0], "".join(logs))
    state = json.loads(run.status.read_text())["state"]
    return Done(0 if state == "finished" else EXIT_STOPPED, out.getvalue() + logs[0], "")


def start_workers(run_dir: Path, procs: int, resume: str) -> tuple[list[int], list[str]]:
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(procs),
               LOCAL_WORLD_SIZE=str(procs), DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(max(1, 2 // procs)))
    workers = []
    for rank in range(procs):
        log = run_dir / f"rank{rank}.log"
        with open(log, "w") as f:
            workers.append((subprocess.Popen([sys.executable, "-m", "launchers.train", "--run-dir", str(run_dir),
                                              "--resume", resume], env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)),
                                             stdout=f, stderr=subprocess.STDOUT), log))
    codes = [w.wait(timeout=600) for w, _ in workers]
    return codes, [log.read_text() for _, log in workers]
