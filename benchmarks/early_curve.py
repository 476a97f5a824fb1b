"""The early validation curve and the copies' similarity of a set of runs, grouped by method and
setting (mean over the seeds), from their scalars (event files or kept scalars.json):

    python benchmarks/early_curve.py docs/runs/demo-bert-width-lr/*-s? [--steps 0,20,50,100,150,200,280]

Prints, per group: the mean validation loss at the given steps; for each run the first step
after which its loss stays below its step-0 value ("back below start"), and its largest rise
above it; and the mean growth/copy_cosine/* at the last evaluation.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import yaml

from launchers.events import read_scalars


def back_below_start(val: dict[int, float]) -> int | None:
    """The first step from which every later validation loss is below the step-0 loss."""
    steps = sorted(s for s in val if s > 0)
    return next((s for i, s in enumerate(steps) if all(val[t] < val[0] for t in steps[i:])), None)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--steps", default="0,20,50,100,150,200,280")
    args = p.parse_args()
    steps = [int(s) for s in args.steps.split(",")]
    groups: dict[tuple, list[dict]] = {}
    for run in args.runs:
        recipe = yaml.safe_load((run / "recipe.yaml").read_text())
        groups.setdefault((recipe.get("method"), recipe.get("setting")), []).append(read_scalars(run))
    for (method, setting), runs in groups.items():
        vals = [r["val/loss"] for r in runs]
        curve = " ".join(f"{s}:{statistics.fmean(v[s] for v in vals):.3f}" for s in steps if all(s in v for v in vals))
        back = [back_below_start(v) if 0 in v else None for v in vals]
        rise = [round(max(v[s] for s in v if s > 0) - v[0], 3) if 0 in v else None for v in vals]
        cosines = {tag.rsplit("/", 1)[-1]: round(statistics.fmean(r[tag][max(r[tag])] for r in runs), 3)
                   for tag in sorted(runs[0]) if tag.startswith("growth/copy_cosine/") and all(tag in r for r in runs)}
        print(f"{method} {setting or ''} ({len(runs)} runs): {curve}; back below start at {back}; "
              f"rise {rise}; copies {cosines}")


if __name__ == "__main__":
    main()
