"""`b2b run SET`: everything a method comparison needs, in order: the source model's pretraining
(or reuse), each method's run for each seed (growth happens inside `b2b train` through
`model.grow_from`), and the report.

A recipe set (YAML) names a source recipe, a target recipe (the shape, data and optimisation
every method shares) and the methods as differences from the target:

    name: demo-bert
    source: demo-bert-source.yaml      # paths relative to the set file
    target: demo-bert-target.yaml
    seeds: [0, 1, 2]
    methods:
      scratch: {}
      fpi: {grow: fpi}                 # model.grow_from = the source's final model, growth width fpi
      bert2bert: {grow: aki, set: {stage1.steps: 150, stage1.block: 1}}

Runs land in OUT/source and OUT/<method>-s<seed>, the report in OUT/report. A finished run is
not run again and a stopped one is resumed, so `b2b run` can be repeated after an interruption.
"""

from __future__ import annotations

import json
import typing
from dataclasses import dataclass, field
from pathlib import Path

from growth import WIDTH_METHODS

from . import config
from .config import RecipeError


@dataclass
class MethodConfig:
    grow: str | None = None  # a b2b grow width method: start from the source grown to the target shape
    set: dict[str, typing.Any] = field(default_factory=dict)  # recipe keys this method changes


@dataclass
class ReportConfig:
    smooth: int = 3
    target: float | None = None
    baseline: str = "scratch"


@dataclass
class RecipeSet:
    name: str = "comparison"
    out_dir: str | None = None  # default runs/<name>
    source: str | None = None  # the source model's recipe
    source_model: str | None = None  # or an existing HF model directory to grow from
    target: str = ""
    seeds: list[int] = field(default_factory=lambda: [0])
    methods: dict[str, MethodConfig] = field(default_factory=dict)
    report: ReportConfig = field(default_factory=ReportConfig)


def load_set(path: Path) -> RecipeSet:
    s = config.build(RecipeSet, config.read_yaml(path))
    here = path.resolve().parent
    if (s.source is None) == (s.source_model is None):
        raise RecipeError(f"{path}: set one of source (a recipe to pretrain) or source_model (a model directory)")
    if not s.methods:
        raise RecipeError(f"{path}: methods: name at least one method")
    if not s.seeds:
        raise RecipeError(f"{path}: seeds: name at least one seed")
    for name, method in s.methods.items():
        if method.grow is not None and method.grow not in WIDTH_METHODS:
            raise RecipeError(f"methods.{name}.grow: {method.grow!r}: use one of {', '.join(WIDTH_METHODS)}")
    s.target = str(here / s.target)
    s.source = s.source and str(here / s.source)
    return s


def as_sets(values: dict) -> list[str]:
    return [f"{key}={json.dumps(value)}" for key, value in values.items()]


def method_sets(s: RecipeSet, out: Path, method: str, seed: int, source_model: Path) -> list[str]:
    m = s.methods[method]
    values = {"name": f"{s.name}-{method}-s{seed}", "method": method, "seed": seed,
              "out_dir": str(out / f"{method}-s{seed}"), **m.set}
    if m.grow:
        values |= {"model.grow_from": str(source_model), "model.growth.width": m.grow}
    return as_sets(values)


def train_once(recipe: str, sets: list[str], procs: int | None, run_dir: Path) -> None:
    """Train unless already finished; resume when stopped."""
    from .launch import train
    from .report import run_state
    if run_state(run_dir) == "finished":
        print(f"b2b run: {run_dir} already finished", flush=True)
        return
    code = train(recipe, sets, procs, resume="auto" if run_dir.is_dir() else "none")
    if code != 0:
        raise RecipeError(f"{run_dir}: b2b train exited with {code}; fix it and run b2b run again to continue")


def run(path: str, methods: list[str] | None = None, seeds: list[int] | None = None, procs: int | None = None,
        dry_run: bool = False) -> int:
    s = load_set(Path(path))
    out = Path(s.out_dir or f"runs/{s.name}").resolve()
    methods = methods or list(s.methods)
    unknown = [m for m in methods if m not in s.methods]
    if unknown:
        raise RecipeError(f"--methods: {unknown[0]!r} is not in {path} ({', '.join(s.methods)})")
    seeds = seeds if seeds is not None else s.seeds
    source_dir = out / "source"
    source_model = Path(s.source_model).resolve() if s.source_model else source_dir / "final"
    # every recipe is checked before anything trains (the grown ones without their source, which may not exist yet)
    if s.source:
        config.load(s.source, as_sets({"out_dir": str(source_dir)}))
    plan = []
    for seed in seeds:
        for method in methods:
            sets = method_sets(s, out, method, seed, source_model)
            config.load(s.target, [x for x in sets if not x.startswith("model.grow_from=")])
            plan.append((out / f"{method}-s{seed}", sets))
    if dry_run:
        print(f"source: {s.source or s.source_model} -> {source_model}")
        for run_dir, sets in plan:
            print(f"{run_dir.name}: b2b train {s.target} " + " ".join(f"--set '{x}'" for x in sets))
        return 0
    if s.source:
        train_once(s.source, as_sets({"out_dir": str(source_dir), "method": "source"}), procs, source_dir)
    for run_dir, sets in plan:
        train_once(s.target, sets, procs, run_dir)
    from .report import report
    r = s.report
    report([str(d) for d, _ in plan], target=r.target, k=r.smooth, baseline=r.baseline, out=str(out / "report"))
    return 0
