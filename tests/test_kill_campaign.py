"""kill -9 at seeded random moments (benchmarks/kill_campaign.py, issue 20), the test suite's
share: a 2-process StackBERT run at ZeRO-2 killed with SIGKILL, its whole process group, and
started again with --resume auto until it finishes. No process of it outlives a kill (its workers
die with b2b train), 'latest' always names a complete checkpoint, no /dev/shm buffer is left,
each restart takes over the dead run's lock and removes a half-written tag, a kill loses at most
one checkpoint interval, and every step's loss equals an uninterrupted run's. The campaign itself
(every phase, more kills) is `python benchmarks/kill_campaign.py --seed 0 --kills 21`; here the
kills aim at a checkpoint being written, the in-run growth and a training step."""

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "kill_campaign.py"
_spec = importlib.util.spec_from_file_location("kill_campaign", SCRIPT)
kill_campaign = sys.modules["kill_campaign"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up
_spec.loader.exec_module(kill_campaign)


def test_seeded_kill_9s_lose_nothing_but_the_steps_after_the_last_checkpoint(tmp_path):
    c = kill_campaign.campaign(seed=1, kills=3, root=tmp_path, phases=("save", "growth", "step"))
    print(c.table())
    assert not c.broken, c.table()
    assert len(c.log) == 3 and "save" in dict(c.log) and c.recovered == c.runs >= 1  # where each landed, as seen
    assert all(lost <= kill_campaign.EVERY for _, lost in c.log)
