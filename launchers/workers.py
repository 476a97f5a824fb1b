"""The training processes of one node: started as torchrun and DeepSpeed's launcher start them
(RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT; deepspeed.init_distributed
reads them), but directly, without the launcher's two extra Python processes.

- Each worker runs in a session of its own, so a terminal's Ctrl-C or a signal to b2b's process
  group reaches b2b only, and b2b decides what the workers get (launch.py).
- Each dies with the process that started it (PARENT_ENV; launchers.train.die_with_parent), so
  a kill -9 of `b2b train` leaves no orphan training on.
- A worker that fails takes the others down with it (a peer would wait for it in a collective
  forever), and `kill` leaves none behind.
- LOCAL_SIZE is not set, so DeepSpeed's CPU shared-memory all-reduce (deepspeed/ops/csrc/cpu/
  comm: inference only; training reduces through gloo) creates no 64 MiB /dev/shm buffer per
  rank, which it would never unlink: a killed run leaves none (DeepSpeed's own launcher sets it).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

PARENT_ENV = "B2B_PARENT_PID"  # the pid of the process that started the worker
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)  # checkpoint at the end of the step, and exit


def init_distributed(cpu: bool) -> None:
    """A worker joins the process group (deepspeed.init_distributed, from the variables above):
    gloo on CPU, NCCL on GPUs. On CPU without DeepSpeed's shared-memory all-reduce op, which its
    CPU backend would load here: a JIT build check (ninja, about a second) under a lock file in
    ~/.cache/torch_extensions, which a process killed meanwhile leaves behind, and every later
    start on the machine then waits for it forever (found by benchmarks/kill_campaign.py).
    Training never uses the op (it reduces through gloo, and without LOCAL_SIZE the op has no
    buffers), and DeepSpeed falls back to torch.distributed without it."""
    import importlib

    import deepspeed
    if cpu:  # (the package's `torch` attribute is torch itself, so the module by its name)
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo" if cpu else "nccl")


def rendezvous_store():
    """The workers' rendezvous store, hosted by the process that starts them, as torchrun's agent
    hosts it: on a port the kernel picks and holds while it lives. A port probed free and handed to
    rank 0 to bind could be taken in between (another run's store, or a connection's ephemeral
    port: EADDRINUSE, seen in CI). Keep it alive until the workers end (start_workers gives each
    worker a reference)."""
    from torch.distributed import TCPStore
    return TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)


def world_env(procs: int, store) -> dict:
    """torch.distributed's variables for `procs` ranks on this node, but the rank's own (rank_env):
    every rank a client of `store` (rendezvous_store)."""
    return dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(store.port), TORCHELASTIC_USE_AGENT_STORE="True",
                WORLD_SIZE=str(procs), LOCAL_WORLD_SIZE=str(procs))


def rank_env(env: dict, world: dict, rank: int) -> dict:
    return dict(env, **world, RANK=str(rank), LOCAL_RANK=str(rank))


def popen_start(run_dir: Path, procs: int, resume: str, env: dict, world: dict, logs: list | None) -> list:
    """`python -m launchers.train` for each rank, with `world` and its RANK in its environment."""
    return [subprocess.Popen([sys.executable, "-u", "-m", "launchers.train", "--run-dir", str(run_dir),
                              "--resume", resume], env=rank_env(env, world, rank),
                             start_new_session=True,  # terminal signals reach b2b, not the workers
                             **({} if logs is None else dict(stdout=logs[rank], stderr=subprocess.STDOUT)))
            for rank in range(procs)]


def start_workers(run_dir: Path, procs: int, resume: str, env: dict,
                  logs: list | None = None, start=popen_start) -> list[subprocess.Popen]:
    """The `procs` training processes of this node, each in a session of its own; `logs`: one open
    file per rank for its output (default: this process's). `start`: what starts them (the tests'
    harness forks them from a server that has imported their modules)."""
    store = rendezvous_store()
    variables = dict(world_env(procs, store), **{PARENT_ENV: str(os.getpid())})
    # the stop signals are blocked while the workers start (they inherit the mask), not ignored:
    # one that arrives meanwhile waits, for b2b's handler once they have started (it sends it on
    # to them every second until they end) and for each worker's first line, which catches and
    # unblocks them; so it is neither lost nor a KeyboardInterrupt traceback
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        workers = start(run_dir, procs, resume, env, variables, logs)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    for worker in workers:
        worker.rendezvous = store  # the store lives as long as a worker that may use it
    return workers


def wait(workers: list[subprocess.Popen], timeout: float | None = None, every_second=None) -> int:
    """Wait for every worker: 0, or the first failure's exit code, after which the others are
    killed, as DeepSpeed's launcher and torchrun do (and all of them after `timeout` seconds).
    every_second: called about once a second while they run."""
    deadline = None if timeout is None else time.monotonic() + timeout
    polls = 0
    while True:
        polls += 1
        if every_second is not None and polls % 5 == 0:
            every_second()
        codes = [w.poll() for w in workers]
        failed = [c for c in codes if c not in (None, 0)]
        if failed or deadline is not None and time.monotonic() > deadline:
            kill(workers)
            if not failed:
                raise TimeoutError(f"the workers ran past {timeout} s")
            return failed[0]
        if None not in codes:
            return 0
        time.sleep(0.2)


def kill(workers: list[subprocess.Popen]) -> None:
    for worker in workers:
        try:
            os.killpg(worker.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        worker.wait()
