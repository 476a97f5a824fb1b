"""Distributed processes for the tests, started cheaply.

Most of a tiny 2-process run on CPU is Python importing torch, transformers and DeepSpeed: about
7 s a process, against 2 s of training. So the tests start their workers from a fork server
(multiprocessing's, one per test process) that has imported those once: each worker is a fork of
it that runs `python -m launchers.train` (or a test's worker script) as its __main__, with the
environment, session and output the direct start gives it (launchers/workers.py).

- train(): a `b2b train` run started the way a cluster starts one (slurm/entrypoint.sh): every
  check and the run directory in this process (`b2b train --prepare-only`), then the workers
  through workers.start_workers (start_run), each rank's output in RUN/rank<N>.log.
- forked_start: what start_workers starts the processes with.
- b2b(): a b2b command (`b2b run`, `b2b train`, ...) in the test's process, its workers forked.
- torchrun(): a test's worker script on N ranks, as torchrun starts it.
- killed_writer(): a b2b command that writes one output directory, SIGKILLed at seeded moments.
- recorded_reads(): the regions read from torch_dist checkpoints (one shard at a time, or not).

The tests of the launcher itself (signals, Ctrl-C, its exit codes, the README's commands, SLURM)
start `b2b train` as a user does."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import multiprocessing
import os
import pickle
import random
import runpy
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from multiprocessing import reduction
from pathlib import Path

from launchers import launch
from launchers.checkpoint import EXIT_STOPPED, RunDir
from launchers.cli import main
from launchers.workers import PARENT_ENV, rank_env, rendezvous_store, start_workers, wait, world_env

# what a worker imports before its first step (the fork server imports them once)
PRELOAD = ["launchers.train", "launchers.megatron", "deepspeed.runtime.zero.muon.muon_optimizer",
           "deepspeed.runtime.zero.stage_1_and_2", "deepspeed.runtime.zero.stage3", "torch.utils.tensorboard",
           "transformers.models.bert.modeling_bert", "transformers.models.gpt2.modeling_gpt2",
           "transformers.models.llama.modeling_llama"]
_server: list = []  # the fork-server context, once started


def forkserver():
    """multiprocessing's fork server, started on first use with PRELOAD imported and the
    environment every CPU worker has at import time (DS_ACCELERATOR, one OpenMP thread)."""
    if not _server:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        saved = {k: os.environ.get(k) for k in ("DS_ACCELERATOR", "OMP_NUM_THREADS")}
        os.environ.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
        try:
            from multiprocessing import forkserver as server
            server.ensure_running()
        finally:
            for k, v in saved.items():
                os.environ.pop(k) if v is None else os.environ.update({k: v})
        _server.append(ctx)
    return _server[0]


class _Fd:
    """A file descriptor handed to a forked worker (multiprocessing's DupFd: sent over the fork
    server's socket), so that it writes where a Popen's child would."""

    def __init__(self, fd: int):
        self.fd = fd

    def __reduce__(self):
        return _received, (reduction.DupFd(self.fd),)


def _received(dup) -> int:
    return dup.detach()


def _main(target: str, args: list[str], env: dict, stdout: int, stderr: int) -> None:
    """A forked worker: `python -m target` (or the script at path `target`) as __main__, in a session
    of its own, with `env`, writing to `stdout` and `stderr`; it dies with the fork server (PARENT_ENV)."""
    os.setsid()
    os.dup2(stdout, 1)
    os.dup2(stderr, 2)
    sys.stdout.reconfigure(line_buffering=True)  # as `python -u`
    os.environ.clear()
    os.environ.update(env, **{PARENT_ENV: str(os.getppid())})
    sys.argv = [target, *args]
    try:
        if target.endswith(".py"):
            runpy.run_path(target, run_name="__main__")
        else:
            runpy.run_module(target, run_name="__main__", alter_sys=True)
    except SystemExit as stop:  # a script's sys.exit(code)
        code = stop.code if isinstance(stop.code, int) else (stop.code is not None)
    else:
        code = 0
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class Worker:
    """A forked worker as workers.wait, workers.kill and launch.start use a subprocess.Popen: its
    output to `out` (an open file; stderr too) or, as Popen's default, to this process's."""

    def __init__(self, target: str, args: list[str], env: dict, out=None):
        fds = (out.fileno(), out.fileno()) if out is not None else (sys.__stdout__.fileno(), sys.__stderr__.fileno())
        self.process = forkserver().Process(target=_main, args=(target, args, env, *map(_Fd, fds)))
        self.process.start()
        self.pid = self.process.pid

    def poll(self) -> int | None:
        return self.process.exitcode  # as Popen's: -N when killed by signal N

    def wait(self, timeout: float | None = None) -> int | None:
        self.process.join(timeout)
        return self.poll()

    def send_signal(self, sig: int) -> None:
        os.kill(self.pid, sig)


def forked_start(run_dir: Path, procs: int, resume: str, env: dict, world: dict, logs: list | None) -> list[Worker]:
    """workers.popen_start with forked workers."""
    return [Worker("launchers.train", ["--run-dir", str(run_dir), "--resume", resume],
                   rank_env(env, world, rank), logs[rank] if logs else None)
            for rank in range(procs)]


@contextlib.contextmanager
def forked_workers():
    """Every `b2b train` the commands run in this process start forked workers (forked_start)."""
    popen_workers = launch.start_workers
    launch.start_workers = functools.partial(start_workers, start=forked_start)
    try:
        yield
    finally:
        launch.start_workers = popen_workers


def torchrun(script: Path, *args, procs: int = 2, logs: Path | None = None, timeout: float = 600) -> list[str]:
    """`torchrun --nproc-per-node procs script args...` with forked workers: every rank's output
    (kept in `logs`, a directory, as rank<N>.log; default a temporary one, removed after). Fails
    the test with the logs when a rank fails. (One OpenMP thread each: the fork server's.)"""
    import tempfile
    with contextlib.nullcontext(logs) if logs else tempfile.TemporaryDirectory(prefix="torchrun-") as where:
        paths = [Path(where) / f"rank{rank}.log" for rank in range(procs)]
        paths[0].parent.mkdir(parents=True, exist_ok=True)
        store = rendezvous_store()  # alive until they end
        env, variables, workers = dict(os.environ, DS_ACCELERATOR="cpu"), world_env(procs, store), []
        for rank, path in enumerate(paths):
            with open(path, "w") as out:
                workers.append(Worker(str(script), [str(a) for a in args], rank_env(env, variables, rank), out))
        code = wait(workers, timeout=timeout)
        texts = [path.read_text() for path in paths]
    assert code == 0, f"{script.name} {' '.join(map(str, args))} failed with exit {code}:\n" + \
        "\n".join(t[-3000:] for t in texts)
    return texts


def b2b(*argv) -> subprocess.CompletedProcess:
    """`b2b ARGV...` run in this process (launchers.cli.main, as the console script runs it), the
    workers of every `b2b train` it starts forked: its exit code and output."""
    out, err = io.StringIO(), io.StringIO()
    with forked_workers(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return subprocess.CompletedProcess(["b2b", *map(str, argv)], code, out.getvalue(), err.getvalue())


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
    code, logs = run_workers(run.root, procs, resume)
    if code:
        return Done(code, out.getvalue() + logs[0], "".join(logs))
    state = json.loads(run.status.read_text())["state"]
    return Done(0 if state == "finished" else EXIT_STOPPED, out.getvalue() + logs[0], err.getvalue())


def start_run(run_dir: Path, procs: int = 2, resume: str = "none") -> list[Worker]:
    """b2b train's workers for a prepared run directory (workers.start_workers, forked), each
    rank's output in a new RUN/rank<N>.log."""
    logs = [open(Path(run_dir) / f"rank{rank}.log", "w") for rank in range(procs)]
    try:
        return start_workers(Path(run_dir), procs, resume, dict(os.environ, DS_ACCELERATOR="cpu"), logs,
                             start=forked_start)
    finally:  # each worker has its own copy
        for f in logs:
            f.close()


def run_workers(run_dir: Path, procs: int, resume: str) -> tuple[int, list[str]]:
    """(exit code as workers.wait gives it, every rank's log)."""
    code = wait(start_run(run_dir, procs, resume), timeout=600)
    return code, [(run_dir / f"rank{rank}.log").read_text() for rank in range(procs)]


def rel(a, b) -> float:
    """max |a - b| / max |b|: how far two tensors (logits) are apart, relative to b's scale."""
    return ((a - b).abs().max() / b.abs().max()).item()


@contextlib.contextmanager
def recorded_reads():
    """Every region read of a torch_dist checkpoint while in the block (DistCheckpoint.read): a
    list of (checkpoint path, key, offsets, sizes)."""
    from growth.adapters.dist_checkpoint import DistCheckpoint
    reads, original = [], DistCheckpoint.read

    def recording(self, key, offsets=None, sizes=None):
        reads.append((str(self.path), key, tuple(offsets or ()), tuple(sizes or ())))
        return original(self, key, offsets, sizes)
    DistCheckpoint.read = recording
    try:
        yield reads
    finally:
        DistCheckpoint.read = original


def run_processes(run: Path) -> list:
    """The live processes whose command line names the run directory `run` (psutil.Process)."""
    import psutil
    return [p for p in psutil.process_iter(["cmdline"]) if str(run) in " ".join(p.info["cmdline"] or [])]


def b2b_process(*argv, wait: bool = True) -> subprocess.Popen:
    """`b2b ARGV...` as its own process in a session of its own, as a user starts it (imports
    included); with `wait`, the test fails unless it exits 0."""
    proc = subprocess.Popen([sys.executable, "-m", "launchers.cli", *map(str, argv)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    if wait:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-3000:]
    return proc


def digest(directory: Path, volatile: tuple = ()) -> dict:
    """Every file under `directory` by its relative path: its sha256 (for a `volatile` file name,
    whose content differs from save to save, only whether it is non-empty)."""
    return {str(p.relative_to(directory)): p.stat().st_size > 0 if p.name in volatile else
            hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.rglob("*")) if p.is_file()}


def killed_writer(argv: list, out: Path, seed: int, kills: int, previous: bool = False, rerun: list = (),
                  volatile: tuple = ()) -> None:
    """`b2b ARGV... --out OUT` SIGKILLed (its whole process group) `kills` times at seeded moments of
    its run, from the imports to the write; after each kill, OUT is the previous output, whole, or
    absent, and its directory holds nothing else but the killed writers' hidden siblings. Then a
    rerun (with `rerun`'s extra arguments) writes the same output as an uninterrupted run (the
    writers are deterministic, but for the `volatile` files: a torch_dist .metadata holds a save id)
    and leaves no sibling. `previous`: OUT exists before the kills."""
    fingerprint = functools.partial(digest, volatile=volatile)
    rng = random.Random(seed)
    reference = out.parent.parent / f"{out.name}.reference"
    start = time.monotonic()
    b2b_process(*argv, "--out", reference)
    seconds, expected = time.monotonic() - start, fingerprint(reference)
    out.parent.mkdir(parents=True, exist_ok=True)
    if previous:
        b2b_process(*argv, "--out", out)
    for _ in range(kills):
        proc = b2b_process(*argv, "--out", out, *rerun, wait=False)
        try:
            proc.wait(timeout=rng.uniform(0.2, 1.0) * seconds)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stdout.close()
        if out.exists():
            assert fingerprint(out) == expected  # a whole output, the reference's
        others = [p.name for p in out.parent.iterdir() if p.name != out.name]
        assert all(name.startswith(f".{out.name}.tmp-") for name in others), others  # a killed writer's
        assert out.is_dir() or not previous  # an existing output is exchanged in one step, never removed first
    if out.exists() and not rerun:
        shutil.rmtree(out)  # finished, and a rerun without --overwrite would be refused
    b2b_process(*argv, "--out", out, *rerun)
    assert fingerprint(out) == expected
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # the killed writers' siblings removed


# -- damaged megatron checkpoints (tests/test_megatron_growth.py, tests/test_megatron_llama.py) ------

class Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/b2b-pwned",))


def damaged_megatron_source(kind: str, d: Path, tmp: Path, indivisible: str) -> tuple[Path, list]:
    """A damaged copy of tests/megatron_worker.py's saved checkpoints in `d` (DIR/source, the
    torch_dist one, or DIR/legacy), and extra b2b grow arguments; `indivisible`: a target whose
    heads --tp 4 does not divide."""
    if kind in ("missing rank", "mixed saves"):
        src = tmp / "legacy"
        shutil.copytree(d / "legacy", src)
        rank1 = src / "iter_0000007" / "mp_rank_01"
        if kind == "missing rank":
            shutil.rmtree(rank1)
            (src / "iter_0000007" / "mp_rank_02").mkdir()  # the count says 2 ranks, rank 1 is absent
            (src / "iter_0000007" / "mp_rank_02" / "model_optim_rng.pt").write_bytes(b"")
        else:
            import torch
            state = torch.load(rank1 / "model_optim_rng.pt", weights_only=False)  # the test's own file
            state["iteration"] = 8
            torch.save(state, rank1 / "model_optim_rng.pt")
        return src, []
    src = tmp / "source"
    shutil.copytree(d / "source", src)
    if kind == "truncated shard":
        data = (src / "__1_0.distcp").read_bytes()
        (src / "__1_0.distcp").write_bytes(data[:len(data) // 2])
    elif kind == "corrupt shard":  # found while writing: the error still comes out as one line
        data = bytearray((src / "__1_0.distcp").read_bytes())
        data[:64] = bytes(64)
        (src / "__1_0.distcp").write_bytes(bytes(data))
    elif kind == "missing shard file":
        (src / "__1_0.distcp").unlink()
    elif kind == "pickled code":
        (src / ".metadata").write_bytes(pickle.dumps(Evil()))
    elif kind == "no config":
        (src / "config.json").unlink()
    elif kind == "tp does not divide heads":
        return src, ["--tp", "4", "--to", indivisible]
    elif kind == "smaller target":
        return src, ["--to", "hidden=32"]
    return src, []
