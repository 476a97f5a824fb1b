"""One live run per run directory: RUN/lock, held by the `b2b train` (or `b2b run`, or SLURM job)
that works in it.

The lock is a file created with O_EXCL (atomic on local disks, NFSv3+ and Lustre alike) that
names its holder: host, process, SLURM job and restart, and a token. The holder refreshes its
mtime every HEARTBEAT seconds and removes it when it ends. A lock whose holder is gone is stale
and is taken over, with a one-line warning:

- on this host, its process has died (a kill -9, an OOM kill);
- it belongs to an earlier incarnation of this SLURM job (a requeue: SLURM ends a job's processes
  before it starts it again), which no node can tell from process ids;
- its heartbeat stopped more than STALE seconds ago (a holder killed on another node).

Anything else is a live run: RunLocked, one line naming it. The holder's children inherit its
token (TOKEN_ENV), so the SLURM batch shell's lock covers the `b2b train --prepare-only` it runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from growth import B2BError
from growth.adapters.files import alive

HEARTBEAT = 10.0  # seconds between the holder's refreshes of the lock's mtime
STALE = 60.0  # a lock not refreshed for this long has lost its holder
TOKEN_ENV = "B2B_RUN_LOCK"  # the holder's token, inherited by the processes it starts


class RunLocked(B2BError):
    """A live run holds the directory."""


def lock_path(directory: Path) -> Path:
    return Path(directory) / "lock"


def holder(pid: int | None = None) -> dict:
    env = os.environ
    return {"token": uuid.uuid4().hex, "host": socket.gethostname(), "pid": pid or os.getpid(),
            "job": env.get("SLURM_JOB_ID"), "restart": int(env.get("SLURM_RESTART_COUNT") or 0),
            "command": " ".join(sys.argv)[:200]}


def read(path: Path) -> dict | None:
    """The holder a lock file names; {} for one being written or damaged (judged by its age); None
    if there is none."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def why_stale(path: Path, held: dict) -> str | None:
    """Why the holder of the lock `path` is gone, or None if it may be alive."""
    me = holder()
    if held.get("host") == me["host"] and isinstance(held.get("pid"), int):
        return None if alive(held["pid"]) else f"its process {held['pid']} has ended"
    if held.get("job") and held.get("job") == me["job"] and int(held.get("restart") or 0) < me["restart"]:
        return f"SLURM job {me['job']} was requeued"
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return "it was released"
    return f"its heartbeat stopped {age:.0f} s ago" if age > STALE else None


def inherited(held: dict) -> bool:
    """Whether this process holds the lock through a parent (the token it inherited)."""
    return bool(held.get("token")) and held.get("token") == os.environ.get(TOKEN_ENV)


def busy(directory: Path, held: dict) -> RunLocked:
    job = f", SLURM job {held['job']}" if held.get("job") else ""
    return RunLocked(f"{directory} is in use by process {held.get('pid', '?')} on {held.get('host', '?')}{job} "
                     f"({held.get('command') or 'b2b'}): wait for it to end or stop it (a lock whose holder is "
                     f"gone is taken over; {lock_path(directory)} names the holder)")


def check_free(directory: Path) -> None:
    """Raise RunLocked if a live run other than this process's parents holds the directory."""
    path = lock_path(directory)
    held = read(path)
    if held is not None and not inherited(held) and why_stale(path, held) is None:
        raise busy(directory, held)


def acquire(directory: Path, pid: int | None = None) -> dict | None:
    """Take RUN/lock for this process (or `pid`, its parent shell); None if it already holds it
    through a parent. Raises RunLocked if a live run holds it; takes a stale one over, with a
    one-line warning."""
    path = lock_path(directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    mine = holder(pid)
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as f:
                json.dump(mine, f)
            return mine
        held = read(path)
        if held is None:
            continue  # released meanwhile
        if inherited(held):
            return None
        why = why_stale(path, held)
        if why is None:
            raise busy(directory, held)
        if take_over(path, held):
            print(f"b2b: warning: took over the lock of process {held.get('pid', '?')} on "
                  f"{held.get('host', '?')} in {directory}: {why}", file=sys.stderr, flush=True)
    raise RunLocked(f"{path}: could not be taken (other processes are racing for it); try again")


def take_over(path: Path, held: dict) -> bool:
    """Remove a stale lock, unless another process replaced it since it was read (it is moved aside
    first, and put back if it is not the one judged stale)."""
    aside = path.with_name(f"{path.name}.{uuid.uuid4().hex}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    if read(aside) != held:
        with contextlib.suppress(OSError):
            os.link(aside, path)  # fails if a newer lock exists already; that one is kept
        aside.unlink(missing_ok=True)
        return False
    aside.unlink(missing_ok=True)
    return True


def refresh(directory: Path) -> None:
    with contextlib.suppress(OSError):
        os.utime(lock_path(directory))


def heartbeat(directory: Path, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT):
        refresh(directory)


def release(directory: Path, mine: dict | None) -> None:
    """Remove RUN/lock if it is still this holder's."""
    if mine is not None and (read(lock_path(directory)) or {}).get("token") == mine["token"]:
        lock_path(directory).unlink(missing_ok=True)


@contextlib.contextmanager
def held(directory: Path) -> Iterator[dict | None]:
    """Hold RUN/lock for the block, refreshed every HEARTBEAT seconds by a thread; the processes
    started inside inherit the token (TOKEN_ENV). A directory made for the lock alone is removed
    with it when nothing else was written there (a run refused before its first write)."""
    made = not directory.exists()
    mine = acquire(directory)
    before = os.environ.get(TOKEN_ENV)
    stop = threading.Event()
    if mine is not None:
        os.environ[TOKEN_ENV] = mine["token"]
        threading.Thread(target=heartbeat, args=(directory, stop), daemon=True).start()
    try:
        yield mine
    finally:
        stop.set()
        release(directory, mine)
        if made:
            with contextlib.suppress(OSError):  # not empty: the run wrote there
                directory.rmdir()
        if mine is not None:
            if before is None:
                os.environ.pop(TOKEN_ENV, None)
            else:
                os.environ[TOKEN_ENV] = before


def main(argv: list[str]) -> int:
    """For slurm/entrypoint.sh, whose batch shell holds the lock (and refreshes it with `touch -c`):
    `acquire DIR PID` takes it for the shell PID and prints the token; `release DIR TOKEN`."""
    try:
        if argv[:1] == ["acquire"] and len(argv) == 3 and argv[2].isdigit():
            mine = acquire(Path(argv[1]), pid=int(argv[2]))
            print(mine["token"] if mine else os.environ[TOKEN_ENV])
        elif argv[:1] == ["release"] and len(argv) == 3:
            release(Path(argv[1]), {"token": argv[2]})
        else:
            print("usage: python -m launchers.runlock {acquire DIR PID | release DIR TOKEN}",
                  file=sys.stderr)
            return 2
    except B2BError as err:
        print(f"b2b: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
