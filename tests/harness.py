"""`b2b train` runs for the tests, started the way a cluster starts them (slurm/entrypoint.sh):
every check and the run directory in this process (`b2b train --prepare-only`), then the workers
(launchers/workers.py, as `b2b train` does), with each rank's output kept in RUN/rank<N>.log and one
OpenMP thread per worker. The checks run in the test's process, which saves a Python start per
run. The tests of the launcher itself (signals, Ctrl-C, its exit codes, the README's commands)
start `b2b train` as a user does."""

from __future__ import annotations

import contextlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

from launchers.checkpoint import EXIT_STOPPED, RunDir
from launchers.cli import main
from launchers.workers import start_workers, wait


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
        code, logs = run_workers(run.root, procs, resume)
        if not code or "EADDRINUSE" not in "".join(logs) and "address already in use" not in "".join(logs):
            break
    if code:
        return Done(code, out.getvalue() + logs[0], "".join(logs))
    state = json.loads(run.status.read_text())["state"]
    return Done(0 if state == "finished" else EXIT_STOPPED, out.getvalue() + logs[0], "")


def run_workers(run_dir: Path, procs: int, resume: str) -> tuple[int, list[str]]:
    """b2b train's workers (workers.start_workers), one OpenMP thread each, each rank's output in
    RUN/rank<N>.log: (exit code as workers.wait gives it, the logs)."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(max(1, 2 // procs)))
    paths = [run_dir / f"rank{rank}.log" for rank in range(procs)]
    files = [open(path, "w") for path in paths]
    try:
        code = wait(start_workers(run_dir, procs, resume, env, files), timeout=600)
    finally:
        for f in files:
            f.close()
    return code, [path.read_text() for path in paths]
