"""`b2b grow` and `b2b vocab transfer` killed with SIGKILL at seeded random moments of their
run (imports, reading, growing, the write): the output directory is the previous one, intact, or
absent, never half-written; the hidden siblings the killed writers left are removed by the next
run, which succeeds."""

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

GROW = ["grow", "minilm", "--to", "layers=8,hidden=384,heads=12,ffn=1536", "--depth", "stack"]
KILLS = 4


def b2b(*argv, wait=True):
    proc = subprocess.Popen([sys.executable, "-m", "launchers.cli", *map(str, argv)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    if wait:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-3000:]
    return proc


def digest(directory: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def timed(*argv) -> float:
    start = time.monotonic()
    b2b(*argv)
    return time.monotonic() - start


def kill_at(delay: float, *argv) -> None:
    """Start b2b, and SIGKILL its whole process group after `delay` seconds (or let it finish)."""
    proc = b2b(*argv, wait=False)
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    proc.stdout.close()


def assert_whole_or_absent(out: Path, reference: dict) -> None:
    if out.exists():
        assert digest(out) == reference  # growth is deterministic: a whole output equals the reference
    others = [p.name for p in out.parent.iterdir() if p.name != out.name]
    assert all(name.startswith(f".{out.name}.tmp-") for name in others), others  # hidden: a killed writer's


@pytest.mark.parametrize("previous", [False, True], ids=["new", "overwrite"])
def test_a_killed_grow_leaves_the_previous_output_or_none(previous, tmp_path):
    rng = random.Random(20 + previous)
    reference = tmp_path / "reference"
    seconds = timed(*GROW, "--out", reference)
    expected = digest(reference)
    out = tmp_path / "work" / "grown"
    out.parent.mkdir()
    if previous:
        b2b(*GROW, "--out", out)
    for _ in range(KILLS):
        kill_at(rng.uniform(0.2, 1.0) * seconds, *GROW, "--out", out, "--overwrite")
        assert_whole_or_absent(out, expected)
        if previous:
            assert out.is_dir()  # an existing output is exchanged for the new one in one step, never removed first
    b2b(*GROW, "--out", out, "--overwrite")
    assert digest(out) == expected
    assert [p.name for p in out.parent.iterdir()] == ["grown"]  # the killed writers' siblings removed


def test_a_killed_vocabulary_transfer_leaves_no_output_and_a_rerun_succeeds(tmp_path):
    rng = random.Random(22)
    tokenizer = tmp_path / "tok"
    b2b("tokenizer", "--kind", "bpe", "--vocab-size", 512, "--out", tokenizer)
    transfer = ["vocab", "transfer", "minilm", "--to-tokenizer", tokenizer]
    reference = tmp_path / "reference"
    seconds = timed(*transfer, "--out", reference)
    expected = digest(reference)
    out = tmp_path / "work" / "transferred"
    out.parent.mkdir()
    for _ in range(KILLS):
        kill_at(rng.uniform(0.2, 0.9) * seconds, *transfer, "--out", out)
        assert_whole_or_absent(out, expected)
        if out.exists():
            break  # it finished: a rerun would be refused (the output exists)
    if not out.exists():
        b2b(*transfer, "--out", out)
    assert digest(out) == expected
    assert [p.name for p in out.parent.iterdir()] == ["transferred"]


def test_an_existing_output_is_exchanged_for_the_new_one_in_one_step(tmp_path):
    from growth.adapters.files import atomic_directory, exchange
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "x").write_text("a"), (b / "y").write_text("b")
    assert exchange(a, b)  # Linux's renameat2(RENAME_EXCHANGE) on this filesystem
    assert [p.name for p in a.iterdir()] == ["y"] and [p.name for p in b.iterdir()] == ["x"]
    with atomic_directory(b) as tmp:
        (tmp / "z").write_text("new")
    assert [p.name for p in b.iterdir()] == ["z"] and sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]
