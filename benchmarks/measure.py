"""What the growth benchmarks share: RSS readings, and phases run in fresh processes so that each
phase's peak RSS is its own."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time


def rss_bytes(peak: bool) -> int:
    """This process's peak RSS so far, or its current RSS."""
    if peak:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_phase(script: str, *args: str, torchrun: bool = False) -> dict:
    """`script --phase ARGS` in a fresh process (2 processes under torchrun); its last stdout line is
    the phase's JSON result, to which `process_seconds` (the whole process, start-up included) is added."""
    os.sync()  # flush the previous phase's writes so they do not throttle this one
    start = time.perf_counter()
    prefix = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"] if torchrun else [sys.executable]
    done = subprocess.run(prefix + [script, "--phase", *args], capture_output=True, text=True,
                          env={**os.environ, "DS_ACCELERATOR": "cpu"})
    if done.returncode:
        sys.exit(f"phase {args[0]} failed:\n{done.stderr[-4000:]}")
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "process_seconds": time.perf_counter() - start}
