"""Reading a run's TensorBoard scalars back (tests, benchmarks, reports)."""

from __future__ import annotations

import json
from pathlib import Path

from .checkpoint import RunDir

SCALARS = "scalars.json"  # a run's scalars exported from its event files


def read_scalars(run_dir: str | Path) -> dict[str, dict[int, float]]:
    """tag -> {step: value} from every event file under RUN/tensorboard. When a step was logged
    twice (a run resumed from a checkpoint before that step), the later write wins. A run kept in
    the repository without its event files has RUN/scalars.json instead (benchmarks/export_scalars.py)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    directory = RunDir(Path(run_dir)).tensorboard
    exported = Path(run_dir) / SCALARS
    if not directory.is_dir() and exported.is_file():
        return {tag: {int(step): value for step, value in values.items()}
                for tag, values in json.loads(exported.read_text()).items()}
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no TensorBoard events")
    out: dict[str, dict[int, float]] = {}
    for file in sorted(directory.glob("events.out.tfevents.*"), key=lambda p: (p.stat().st_mtime, p.name)):
        acc = EventAccumulator(str(file), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return out
