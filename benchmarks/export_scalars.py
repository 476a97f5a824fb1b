"""Keep what a results table needs, small, in the repository: each run's recipe.yaml and its
report-relevant TensorBoard scalars as one JSON file (runs/ is not in git).

    python benchmarks/export_scalars.py runs/demo-bert-width-lr/*-s? --out docs/runs/demo-bert-width-lr

Writes OUT/<run>/recipe.yaml, status.json and scalars.json ({tag: {step: value}} for the tags
below), and the source's training.json as OUT/source/final (the recipe's model.grow_from then
points there, relative to the repository root). `b2b report OUT/*-s?`, run from the repository
root, reads these directories as it reads runs: scalars.json stands in for the event files
(launchers/events.py).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import yaml

from launchers.events import read_scalars
from launchers.report import source_cost

TAGS = ("val/loss", "train/flops", "time/train_seconds", "train/lr", "train/loss", "train/stage")
PREFIXES = ("growth/copy_cosine/",)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--out", required=True, type=Path)
    args = p.parse_args()
    for run in args.runs:
        scalars = read_scalars(run)
        keep = {tag: {str(step): value for step, value in sorted(values.items())}
                for tag, values in scalars.items() if tag in TAGS or tag.startswith(PREFIXES)}
        out = args.out / run.name
        out.mkdir(parents=True, exist_ok=True)
        recipe = yaml.safe_load((run / "recipe.yaml").read_text())
        grow_from = (recipe.get("model") or {}).get("grow_from")
        cost = source_cost(grow_from) if grow_from else None  # the source's cost, for the report
        if cost is not None:
            source = args.out / "source" / "final"
            source.mkdir(parents=True, exist_ok=True)
            if (Path(grow_from) / "training.json").is_file():
                shutil.copy2(Path(grow_from) / "training.json", source / "training.json")
            else:  # a ZeRO checkpoint (model.growth.optimizer: grow): its counters
                (source / "training.json").write_text(json.dumps({"flops": cost}) + "\n")
            recipe["model"]["grow_from"] = str(source)  # relative to where the script runs: the repository root
        (out / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
        if (run / "status.json").is_file():
            shutil.copy2(run / "status.json", out / "status.json")
        (out / "scalars.json").write_text(json.dumps(keep, separators=(",", ":")) + "\n")
        print(f"{out}: {sum(len(v) for v in keep.values())} values")


if __name__ == "__main__":
    main()
