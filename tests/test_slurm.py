"""`b2b submit` against a real SLURM on this machine (tests/slurm_cluster.py: munged, slurmctld and
slurmd, started here and stopped by pid): a tiny recipe's job runs to the end; a job signalled
mid-run checkpoints, is requeued and resumes to the same steps and losses as an uninterrupted
one; two SLURM nodes in their own network namespaces train one process each through gloo; bad
input fails before anything is queued. sacct needs slurmdbd, so job states come from
`scontrol show job`."""

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from launchers.events import read_scalars

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from slurm_cluster import Cluster  # noqa: E402

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
TINY = RECIPES / "bert-tiny-cpu.yaml"

@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("starts SLURM daemons and network namespaces: needs root")
    c = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        yield c.start()
    finally:
        c.stop()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


HOLD = """
import sys, time
from pathlib import Path
from launchers import runlock
with runlock.held(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(120)
"""


def submit(cluster, *args, env=None):
    return subprocess.run([sys.executable, "-m", "launchers.cli", "submit", *args], capture_output=True,
                          text=True, env=env or cluster.env, timeout=120)


def tiny_sets(run, cache, *sets):
    sets = [f"out_dir={run}", f"data.cache_dir={cache}", "data.max_documents=800", "data.vocab_size=512",
            "logging.progress=false", "train.eval_every=0", "optim.warmup_steps=2", *sets]
    return sum((["--set", s] for s in sets), [])


def job_ids(out: str) -> list[str]:
    return [line.split()[2] for line in out.splitlines() if line.startswith("submitted job")]


def wait_for_line(path: Path, text: str, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.is_file() and text in path.read_text():
            return
        time.sleep(0.2)
    raise TimeoutError(f"{text!r} not in {path} after {timeout}s")


def dry_run(*args):
    """A dry run where no SLURM command answers (PATH holds only Python's): the scripts follow the flags."""
    out = subprocess.run([sys.executable, "-m", "launchers.cli", "submit", *args, "--dry-run"],
                         capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PATH=str(Path(sys.executable).parent)))
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_dry_run_renders_chained_stages_and_a_job_array(tmp_path):
    two_stage = dry_run(str(TINY), "--nodes", "2", "--gpus-per-node", "4", "--partition", "gpu", "--account", "lab",
                        "--set", f"out_dir={tmp_path}", "--set", "stage1.steps=40", "--set", "stage1.block=1")
    data, rest = two_stage.split("# ---- job 2 of 3: sbatch --dependency=afterok:<job 1>\n")
    first, second = rest.split("# ---- job 3 of 3: sbatch --dependency=afterok:<job 2>\n")
    assert data.startswith("# ---- job 1 of 3: sbatch\n#!/bin/bash") and "launchers.cli data prepare" in data
    for line in ("--nodes=1", "--ntasks=1", "--cpus-per-task=4", "--partition=gpu", "--requeue"):  # 4: the flags'
        assert f"#SBATCH {line}\n" in data
    assert "--gres" not in data and "launchers.cli data prepare" not in first + second
    for script in (first, second):
        for line in ("--nodes=2", "--ntasks-per-node=4", "--partition=gpu", "--account=lab", "--requeue",
                     "--signal=B:USR1@120", f"--output={tmp_path}/slurm-%j.out", "--open-mode=append"):
            assert f"#SBATCH {line}\n" in script
    assert "--set=train.stop_at=40" in first and "stop_at" not in second
    assert "slurm/entrypoint.sh batch" in second
    comparison = dry_run(str(RECIPES / "sets" / "demo-bert.yaml"))
    jobs = comparison.split("# ---- job ")[1:]
    assert [j.split("\n")[0] for j in jobs] == ["1 of 5: sbatch"] + [
        f"{i} of 5: sbatch --dependency=afterok:<job {i - 1}>" for i in range(2, 6)]
    assert [j.count("launchers.cli data prepare") for j in jobs] == [1, 0, 21, 0, 0]  # the source's, each run's
    assert "#SBATCH --array=0-20\n" in jobs[3] and "    20) " in jobs[3]  # 7 methods x 3 seeds
    assert "launchers.cli report" in jobs[4] and "--baseline scratch" in jobs[4]


def test_bad_input_fails_before_anything_is_queued(cluster, tmp_path):
    base = [str(TINY), "--set", f"out_dir={tmp_path / 'run'}"]
    for args, message in [(["--partition", "nosuch"], "--partition nosuch: no such partition"),
                          (["--nodes", "9"], "--nodes 9: partition debug has 1 node(s)"),
                          (["--gpus-per-node", "8"], "--gpus-per-node 8: the nodes of partition debug have 2 CPU")]:
        bad = submit(cluster, *base, *args)
        assert bad.returncode == 2 and message in bad.stderr, bad.stderr
    no_sbatch = submit(cluster, *base, env=dict(cluster.env, PATH=str(Path(sys.executable).parent)))
    assert no_sbatch.returncode == 2 and "sbatch: not found" in no_sbatch.stderr
    bad_recipe = submit(cluster, *base, "--set", "train.steps=0")
    assert bad_recipe.returncode == 2 and "train.steps" in bad_recipe.stderr
    held = tmp_path / "held"  # a directory a live run holds: the job would only fail when it started
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(held)], stdout=subprocess.PIPE, text=True,
                              env=cluster.env)
    try:
        assert holder.stdout.readline().strip() == "held"
        busy = submit(cluster, str(TINY), "--set", f"out_dir={held}")
        assert busy.returncode == 2 and f"is in use by process {holder.pid} on " in busy.stderr, busy.stderr
    finally:
        holder.kill()
        holder.wait()
    assert cluster.run("squeue", "-h").stdout.strip() == ""
    assert not (tmp_path / "run").exists()


def worker(run: Path, rank: int, timeout: float = 300) -> psutil.Process:
    """Rank `rank`'s training process of `run`'s job, once it has started."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for proc in harness.run_processes(run):
            with contextlib.suppress(psutil.Error):
                if "launchers.train" in proc.info["cmdline"] and proc.environ().get("RANK") == str(rank):
                    return proc
        time.sleep(0.2)
    raise TimeoutError(f"no rank {rank} worker of {run} after {timeout}s")


def test_a_job_runs_to_the_end_and_a_preempted_or_killed_one_resumes_exactly(cluster, cache, tmp_path):
    """Three jobs of one recipe: uninterrupted; preempted (USR1 to the batch shell), which
    checkpoints and is requeued; and one whose rank-1 worker is SIGKILLed, which fails (no
    requeue: a kill may be the OOM killer's, and would repeat) and, requeued by hand, resumes from
    its newest complete checkpoint. All three end with the same 20 steps and losses."""
    full, part, killed = tmp_path / "full", tmp_path / "part", tmp_path / "killed"
    sets = ["train.steps=20", "checkpoint.every=5", "checkpoint.keep=2"]
    done = submit(cluster, str(TINY), "--partition", "debug", "--gpus-per-node", "2", *tiny_sets(full, cache, *sets))
    assert done.returncode == 0, done.stderr
    assert f"log {full}/slurm-%j.out, TensorBoard {full}/tensorboard" in done.stdout
    slow = ["train.eval_every=1", "train.eval_batches=8"]  # a validation each step: a window for the kill
    ids = [done] + [submit(cluster, str(TINY), "--gpus-per-node", "2", *tiny_sets(run, cache, *sets, *more))
                    for run, more in ((part, []), (killed, slow))]
    assert all(out.returncode == 0 for out in ids), [out.stderr for out in ids]
    (data_id, full_id), (_, part_id), (_, killed_id) = (job_ids(out.stdout) for out in ids)
    assert f"submitted job {full_id} (bert-tiny-cpu) after job {data_id}:" in done.stdout

    info = cluster.wait_job(data_id)  # the data's CPU job, before the training job
    log = (full / f"slurm-{data_id}.out").read_text()
    assert info["JobState"] == "COMPLETED" and "data: building" in log and "train-000000000-" in log, log[-3000:]
    info = cluster.wait_job(full_id)
    log = (full / f"slurm-{full_id}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-3000:]
    assert "local: healthy" in log and "finished at step 20/20" in log
    assert "data: building" not in log  # the training job found the data prepared
    assert f"JobId={full_id} " in (cluster.root / "jobcomp.txt").read_text()

    part_log = part / f"slurm-{part_id}.out"
    wait_for_line(part_log, "step 3:")  # mid-run: preempt it as SLURM does before a time limit
    cluster.run("scancel", "--signal=USR1", "--batch", part_id)

    # the killed job runs while the preempted one waits to restart
    killed_log = killed / f"slurm-{killed_id}.out"
    rank1 = worker(killed, rank=1)  # found while it imports, so that the kill comes right after the first save
    while not (killed / "checkpoints" / "latest").is_file():  # the step-5 checkpoint is complete
        time.sleep(0.02)
    rank1.kill()  # SIGKILL: no signal SLURM forwards, none a handler sees (the OOM killer's way)
    info = cluster.wait_job(killed_id)
    log = killed_log.read_text()
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", log[-3000:]
    assert "b2b: the workers failed" in log and "requeueing" not in log
    assert not (killed / "lock").exists() and not (killed / "status.json").exists()
    cluster.run("scontrol", "requeue", killed_id)  # what the user does once the cause is known

    info = cluster.wait_job(part_id, restarts=1)
    log = part_log.read_text()  # --open-mode=append: both runs of the job in one log
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log[-3000:]
    assert "stopped by signal SIGUSR1" in log and f"requeueing job {part_id}" in log
    assert "(restart 1)" in log and "resumed from" in log
    info = cluster.wait_job(killed_id, restarts=1)
    log = killed_log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log[-3000:]
    assert "(restart 1)" in log and "resumed from" in log and "finished at step 20/20" in log

    a = read_scalars(full)["train/loss"]
    for run in (part, killed):
        b = read_scalars(run)["train/loss"]
        assert sorted(a) == sorted(b) == list(range(1, 21))
        for step in range(1, 21):
            assert abs(a[step] - b[step]) <= 1e-6, (run.name, step)
    for run in (full, part, killed):
        assert not (run / "lock").exists()  # released by the batch shell, at the requeue too
        assert json.loads((run / "status.json").read_text())["state"] == "finished"
        assert (run / "checkpoints" / "latest").read_text() == "step00000020"
        assert (run / "final" / "config.json").is_file()


def test_two_nodes_train_through_gloo_across_network_namespaces(cluster, cache, tmp_path):
    if cluster.multi_error:
        pytest.skip(f"no second SLURM node: {cluster.multi_error}")
    run = tmp_path / "run"
    env = dict(cluster.env, GLOO_SOCKET_IFNAME="eth0")  # each node namespace's only link to the other
    done = submit(cluster, str(TINY), "--partition", "multi", "--nodes", "2", "--gpus-per-node", "1",
                  *tiny_sets(run, cache, "train.steps=6"), env=env)
    assert done.returncode == 0, done.stderr
    (_, job) = job_ids(done.stdout)  # the data's job, and the training job after it
    info = cluster.wait_job(job)
    log = (run / f"slurm-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["NodeList"] == "n[1-2]", log[-3000:]
    assert "head 10.77.0.1:" in log and "n1: healthy" in log and "n2: healthy" in log
    assert "2 process(es)" in log and "finished at step 6/6" in log
    assert sorted(read_scalars(run)["train/loss"]) == list(range(1, 7))
    assert (run / "checkpoints" / "latest").read_text() == "step00000006"
