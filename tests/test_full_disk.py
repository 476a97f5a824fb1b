"""A full disk (issue 20, item 3), on a small filesystem the test mounts (a size-limited tmpfs,
unmounted after): growth, the data cache and a checkpoint that run out of space each end in one
clear line, leave nothing half-written, and a checkpoint's run keeps its previous checkpoint and
the resumable exit code, then resumes once there is room; a checkpoint that one rank alone
cannot write stops both ranks the same way, without a hang."""

import os
import subprocess
from pathlib import Path

import pytest

from launchers.checkpoint import EXIT_STOPPED
from launchers.cli import main

import harness

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
TINY = RECIPES / "bert-tiny-cpu.yaml"
SETS = ["data.max_documents=800", "data.vocab_size=512", "logging.progress=false"]


@pytest.fixture
def small_fs(tmp_path):
    """A size-limited tmpfs at tmp_path/fs: mount(size) mounts it."""
    mounts = []

    def mount(size: str) -> Path:
        fs = tmp_path / f"fs{len(mounts)}"
        fs.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(fs)], capture_output=True,
                              text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (root needed): {done.stderr.strip()}")
        mounts.append(fs)
        return fs
    yield mount
    for fs in mounts:
        subprocess.run(["umount", "-l", str(fs)], check=True)


def one_error_line(capfd) -> str:
    err = capfd.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_growth_that_runs_out_of_space_says_so_and_leaves_nothing(small_fs, capfd):
    fs = small_fs("4m")
    assert main(["grow", "minilm", "--to", "layers=6,hidden=768,heads=12,ffn=3072", "--width", "exact",
                 "--out", str(fs / "grown")]) == 2
    assert "no space left on the device" in one_error_line(capfd)
    assert list(fs.iterdir()) == []


def test_a_data_cache_that_runs_out_of_space_says_so_and_leaves_nothing(small_fs, tmp_path, capfd):
    fs = small_fs("64k")
    done = harness.train(TINY, tmp_path / "run", [f"data.cache_dir={fs}", *SETS])
    assert done.returncode == 2 and "no space left on the device" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert list(fs.iterdir()) == [] and not (tmp_path / "run").exists()


def test_a_checkpoint_without_room_stops_resumably_and_keeps_the_last_one(small_fs, tmp_path):
    fs = small_fs("16m")
    run, ckpts = fs / "run", fs / "run" / "checkpoints"
    sets = [f"data.cache_dir={tmp_path / 'cache'}", *SETS, "train.steps=8", "train.eval_every=0",
            "optim.warmup_steps=2", "checkpoint.every=4", "checkpoint.keep=2"]
    first = harness.train(TINY, run, [*sets, "train.stop_at=4"])
    assert first.returncode == EXIT_STOPPED, first.stderr[-3000:]
    filler = fs / "filler"
    with open(filler, "wb") as f:  # the disk fills up while the run is away
        os.posix_fallocate(f.fileno(), 0, os.statvfs(fs).f_bavail * os.statvfs(fs).f_frsize - 2**16)

    full = harness.train(TINY, run, sets, resume="auto")
    assert full.returncode == EXIT_STOPPED, full.stderr[-3000:]
    errors = [line for line in full.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "free space, then continue with --resume auto" in errors[0], full.stderr[-3000:]
    assert "the checkpoint step00000004 is intact" in errors[0]
    assert (ckpts / "latest").read_text() == "step00000004"
    assert sorted(p.name for p in ckpts.glob("step*")) == ["step00000004"]  # nothing half-written

    filler.unlink()
    done = harness.train(TINY, run, sets, resume="auto")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stdout and (run / "final" / "config.json").is_file()


def test_a_disk_that_fills_while_both_ranks_write_the_first_checkpoint_stops_resumably(small_fs, tmp_path):
    """No earlier checkpoint, so no size to check first: the save itself runs out of space on
    the ranks that write, mid-file. One line, the resumable exit, no 'latest'; the next start
    removes the half-written tag with a warning and trains from the start."""
    fs = small_fs("1m")  # a checkpoint is 2.4 MiB
    run, ckpts = fs / "run", fs / "run" / "checkpoints"
    sets = [f"data.cache_dir={tmp_path / 'cache'}", *SETS, "train.steps=4", "train.eval_every=0",
            "optim.warmup_steps=2", "checkpoint.every=2", "checkpoint.keep=1"]
    full = harness.train(TINY, run, sets)
    assert full.returncode == EXIT_STOPPED, full.stderr[-3000:]
    errors = [line for line in full.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, full.stderr[-3000:]
    assert "could not be written (no space left on the device): free space, then continue with --resume auto; " \
           "there is no earlier checkpoint" in errors[0]
    assert not (ckpts / "latest").exists()

    subprocess.run(["mount", "-o", "remount,size=64m", str(fs)], check=True)
    done = harness.train(TINY, run, sets, resume="auto")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "a checkpoint whose save did not finish" in done.stdout + done.stderr
    assert sorted(p.name for p in ckpts.glob("step*")) == ["step00000004"]


def test_a_checkpoint_one_rank_cannot_write_stops_both_resumably(tmp_path):
    """Rank 1 alone fails to write its optimizer shard (its file's path taken by a directory): it
    leaves the save's collectives, and rank 0, waiting in DeepSpeed's closing barrier, fails as
    soon as it exits (gloo: the connection resets) instead of hanging. Both exit 75, each saying
    why in one line; 'latest' never names the tag."""
    from launchers.workers import wait
    run = tmp_path / "run"
    sets = [f"data.cache_dir={tmp_path / 'cache'}", *SETS, "train.steps=8", "train.eval_every=0",
            "optim.warmup_steps=2", "checkpoint.every=4", "zero.stage=2", f"out_dir={run}"]
    assert main(["train", str(TINY), "--procs", "2", "--prepare-only", *sum((["--set", s] for s in sets), [])]) == 0
    (run / "checkpoints" / "step00000004" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").mkdir(parents=True)
    workers = harness.start_run(run, 2)
    assert wait(workers, timeout=300) == EXIT_STOPPED and [w.poll() for w in workers] == [EXIT_STOPPED] * 2
    errors = [[line for line in (run / f"rank{r}.log").read_text().splitlines() if "error" in line] for r in (0, 1)]
    assert len(errors[0]) == len(errors[1]) == 1, errors
    assert "Is a directory" in errors[1][0] and "could not be written" in errors[0][0]
    assert not (run / "checkpoints" / "latest").exists()
