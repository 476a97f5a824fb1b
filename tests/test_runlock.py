"""One live run per run directory (launchers/runlock.py): a second b2b train, b2b run or SLURM job
on a directory a live run holds is refused in one line; a lock whose holder is gone (killed on this
host, a requeued SLURM job, a stopped heartbeat elsewhere) is taken over."""

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launchers import runlock
from launchers.cli import main

ROOT = Path(__file__).resolve().parent.parent
HOLD = """
import sys, time
from pathlib import Path
from launchers import runlock
with runlock.held(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def holder(tmp_path):
    """A live process holding tmp_path/run's lock, as a running b2b train does."""
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.stdout.readline().strip() == "held"
    yield run, proc
    proc.kill()
    proc.wait()


def test_a_second_b2b_train_on_a_live_run_is_refused_in_one_line(holder, capfd):
    run, proc = holder
    (run / "status.json").write_text('{"state": "running"}')
    code = main(["train", str(ROOT / "recipes/bert-tiny-cpu.yaml"), "--set", f"out_dir={run}", "--resume", "auto"])
    err = capfd.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"is in use by process {proc.pid} on " in err
    assert sorted(p.name for p in run.iterdir()) == ["lock", "status.json"]  # nothing touched
    assert json.loads((run / "lock").read_text())["pid"] == proc.pid


def test_a_second_b2b_run_on_a_live_set_is_refused(tmp_path, capfd):
    s = tmp_path / "set.yaml"
    out = tmp_path / "cmp"
    s.write_text(f"name: cmp\nsource: {ROOT}/recipes/bert-tiny-cpu.yaml\ntarget: {ROOT}/recipes/bert-tiny-cpu.yaml\n"
                 f"out_dir: {out}\nseeds: [0]\nmethods: {{scratch: {{}}}}\n")
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        assert proc.stdout.readline().strip() == "held"
        code = main(["run", str(s)])
    finally:
        proc.kill()
        proc.wait()
    err = capfd.readouterr().err.strip()
    assert code == 2 and f"{out} is in use by process {proc.pid}" in err, err
    assert sorted(p.name for p in out.iterdir()) == ["lock"]  # the source never started


def test_the_lock_of_a_killed_run_is_taken_over_with_a_warning(holder, capfd):
    run, proc = holder
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with runlock.held(run) as mine:
        assert json.loads((run / "lock").read_text())["token"] == mine["token"]
        assert os.environ[runlock.TOKEN_ENV] == mine["token"]  # what the workers inherit
    err = capfd.readouterr().err.strip()
    assert f"took over the lock of process {proc.pid}" in err and "has ended" in err, err
    assert not (run / "lock").exists() and runlock.TOKEN_ENV not in os.environ


def other_host_lock(run: Path, age: float, **fields) -> None:
    run.mkdir(parents=True, exist_ok=True)
    lock = run / "lock"
    lock.write_text(json.dumps({"token": "t", "host": "node-elsewhere", "pid": 1, "job": None, "restart": 0,
                                "command": "b2b train", **fields}))
    os.utime(lock, (time.time() - age, time.time() - age))


def test_another_nodes_run_holds_while_its_heartbeat_lasts(tmp_path, capfd, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    run = tmp_path / "run"
    other_host_lock(run, age=runlock.STALE / 2)
    with pytest.raises(runlock.RunLocked, match="in use by process 1 on node-elsewhere"):
        runlock.acquire(run)
    other_host_lock(run, age=runlock.STALE * 2)
    mine = runlock.acquire(run)
    assert "heartbeat stopped" in capfd.readouterr().err
    runlock.release(run, mine)
    assert not (run / "lock").exists()


def test_a_requeued_slurm_job_takes_over_its_earlier_incarnations_lock(tmp_path, monkeypatch):
    run = tmp_path / "run"
    other_host_lock(run, age=0, job="4242", restart=0)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")  # the same incarnation elsewhere: a live job step
    with pytest.raises(runlock.RunLocked, match="SLURM job 4242"):
        runlock.acquire(run)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    mine = runlock.acquire(run)
    assert json.loads((run / "lock").read_text()) == mine and mine["restart"] == 1


def test_a_process_the_holder_started_shares_its_lock(holder, monkeypatch):
    run, _ = holder
    token = json.loads((run / "lock").read_text())["token"]
    monkeypatch.setenv(runlock.TOKEN_ENV, token)
    runlock.check_free(run)
    assert runlock.acquire(run) is None  # nothing taken, nothing to release
    assert json.loads((run / "lock").read_text())["token"] == token


def race(directory: str, start, results, ended) -> None:
    start.wait()
    try:
        results.put("took" if runlock.acquire(Path(directory)) else "inherited")
    except runlock.RunLocked:
        results.put("refused")
    ended.wait(60)  # the winner lives until every racer has tried: a dead holder's lock is free to take


def test_of_processes_racing_for_a_free_lock_exactly_one_takes_it(tmp_path):
    ctx = multiprocessing.get_context("fork")
    start, results, ended = ctx.Event(), ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=race, args=(str(tmp_path / "run"), start, results, ended)) for _ in range(8)]
    for p in procs:
        p.start()
    start.set()
    outcomes = sorted(results.get(timeout=60) for _ in procs)
    ended.set()
    for p in procs:
        p.join(60)
    assert outcomes == ["refused"] * 7 + ["took"]


def test_the_slurm_batch_shells_commands(tmp_path):
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop(runlock.TOKEN_ENV, None)
    acquire = subprocess.run([sys.executable, "-m", "launchers.runlock", "acquire", str(run), str(os.getpid())],
                             capture_output=True, text=True, env=env)
    lock = json.loads((run / "lock").read_text())
    assert acquire.returncode == 0 and lock["token"] == acquire.stdout.strip() and lock["pid"] == os.getpid()
    token = lock["token"]
    again = subprocess.run([sys.executable, "-m", "launchers.runlock", "acquire", str(run), "1"],
                           capture_output=True, text=True, env=env)
    assert again.returncode == 2 and "is in use by process" in again.stderr and len(again.stderr.splitlines()) == 1
    subprocess.run([sys.executable, "-m", "launchers.runlock", "release", str(run), "not-mine"], check=True, env=env)
    assert (run / "lock").exists()
    subprocess.run([sys.executable, "-m", "launchers.runlock", "release", str(run), token], check=True, env=env)
    assert not (run / "lock").exists()


def test_a_zombie_holder_is_dead():
    """A killed holder its parent has not reaped yet (a container's init can take seconds) is a
    zombie: kill(pid, 0) still finds it, but it holds nothing."""
    from growth.adapters.files import alive
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    try:
        for _ in range(500):
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                break
            time.sleep(0.01)
        os.kill(pid, 0)  # still there, as a zombie
        assert not alive(pid) and alive(os.getpid())
    finally:
        os.waitpid(pid, 0)
    assert not alive(pid)
