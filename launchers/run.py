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
      fpi-adam: {grow: fpi, optimizer: grow}   # from the source run's ZeRO checkpoint, Adam's moments grown
    sweep: {optim.lr: [5.0e-4, 1.0e-3, 2.0e-3]}   # optional: every method at every combination
    sweep_seeds: [0]                              # the settings are compared at these seeds

Runs land in OUT/source and OUT/<method>-s<seed>, the report in OUT/report. A finished run is
not run again and a stopped one is resumed, so `b2b run` can be repeated after an interruption.

A sweep (the set's `sweep:`, or a method's own, which replaces it for that method) runs each
method at every combination of the listed values at the sweep seeds (default: the first seed),
in OUT/<method>-<setting>-s<seed> (the setting's keys by their last part, e.g. lr0.002); then
each method's best setting (b2b report's rule, `report.best_settings`) runs at the remaining
seeds, and the report ranks every method at its best setting.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path

from growth import WIDTH_METHODS
from growth.adapters.deepspeed import OPTIMIZERS

from . import config, runlock
from .checkpoint import RunDir
from .config import RecipeError


@dataclass
class MethodConfig:
    grow: str | None = None  # a b2b grow width method: start from the source grown to the target shape
    optimizer: str = "reset"  # grow: from the source run's ZeRO checkpoint, its Adam moments grown with the model
    set: dict[str, typing.Any] = field(default_factory=dict)  # recipe keys this method changes
    sweep: dict[str, list[typing.Any]] | None = None  # recipe key -> values to sweep (replaces the set's sweep)


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
    sweep: dict[str, list[typing.Any]] = field(default_factory=dict)  # recipe key -> values, for every method
    sweep_seeds: list[int] | None = None  # seeds at which the settings are compared (default: the first seed)
    report: ReportConfig = field(default_factory=ReportConfig)


def load_set(path: Path) -> RecipeSet:
    raw = config.load_raw(path)  # a set may name a base set and what differs
    if "methods" not in raw and set(raw) & {f.name for f in dataclasses.fields(config.Recipe)} - {"name", "out_dir"}:
        raise RecipeError(f"{path}: a training recipe, not a recipe set: train it with b2b train {path}")
    s = config.build(RecipeSet, raw)
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
        if method.optimizer not in OPTIMIZERS or (method.optimizer == "grow" and method.grow is None):
            raise RecipeError(f"methods.{name}.optimizer: {method.optimizer!r}: use reset, or grow with a grow method "
                              "(Adam's moments grown with the model)")
        for key, values in (s.sweep if method.sweep is None else method.sweep).items():
            if not values:
                raise RecipeError(f"sweep.{key}: name at least one value (methods.{name})")
    if s.sweep_seeds is not None and not set(s.sweep_seeds) <= set(s.seeds):
        raise RecipeError(f"sweep_seeds: {s.sweep_seeds}: every sweep seed must be one of seeds {s.seeds}")
    s.target = str(here / s.target)
    s.source = s.source and str(here / s.source)
    return s


def as_sets(values: dict) -> list[str]:
    return [f"{key}={json.dumps(value)}" for key, value in values.items()]


def settings(s: RecipeSet, method: str) -> list[dict]:
    """Every combination of the method's swept values ([{}] when it is not swept)."""
    sweep = s.sweep if s.methods[method].sweep is None else s.methods[method].sweep
    return [dict(zip(sweep, values)) for values in itertools.product(*sweep.values())]


def setting_text(setting: dict) -> str | None:
    """The recipe's `setting`: the swept keys, e.g. 'optim.lr=0.002'; None when not swept."""
    return ",".join(f"{k}={v}" for k, v in setting.items()) or None


def run_name(method: str, setting: dict, seed: int) -> str:
    label = "-".join(f"{k.rsplit('.', 1)[-1]}{v}" for k, v in setting.items())
    return f"{method}-{label}-s{seed}" if label else f"{method}-s{seed}"


def method_sets(s: RecipeSet, out: Path, method: str, seed: int, source_model: Path, setting: dict) -> list[str]:
    m = s.methods[method]
    name = run_name(method, setting, seed)
    values = {"name": f"{s.name}-{name}", "method": method, "seed": seed, "out_dir": str(out / name),
              **m.set, **setting}
    if setting:
        values["setting"] = setting_text(setting)
    if m.grow:
        start = RunDir(out / "source").checkpoints if m.optimizer == "grow" and s.source else source_model
        values |= {"model.grow_from": str(start), "model.growth.width": m.grow}
    if m.optimizer == "grow":
        values["model.growth.optimizer"] = "grow"
    return as_sets(values)


def planned_run(s: RecipeSet, out: Path, method: str, setting: dict, seed: int, source_model: Path) -> tuple:
    """(run directory, --set overrides) of one run, its recipe checked (without the source, which
    may not exist yet)."""
    sets = method_sets(s, out, method, seed, source_model, setting)
    unchecked = ("model.grow_from=", "model.growth.optimizer=")  # they need the source's files
    recipe = config.load(s.target, [x for x in sets if not x.startswith(unchecked)])
    if s.methods[method].optimizer == "grow" and recipe.zero.stage == 0:
        raise RecipeError(f"methods.{method}.optimizer: grow starts from a DeepSpeed universal checkpoint, which "
                          "loads into ZeRO stages 1-3 only: set zero.stage 1-3 in the target or the method's set")
    return out / run_name(method, setting, seed), sets


def first_phase(s: RecipeSet, out: Path, source_model: Path, methods: list[str], seeds: list[int],
                sweep_seeds: list[int]) -> list[tuple]:
    """Every setting of a swept method at the sweep seeds, every seed of the others; the best
    settings' remaining seeds follow once these have run."""
    return [planned_run(s, out, m, setting, seed, source_model) for seed in seeds for m in methods
            for setting in settings(s, m) if len(settings(s, m)) == 1 or seed in sweep_seeds]


@dataclass
class Expansion:
    """What a set runs, in order (`b2b run` and `b2b submit` both follow it)."""
    out: Path  # OUT: every run's directory is below it
    source_dir: Path  # OUT/source, where the set's source recipe trains
    source_model: Path  # the model the grown methods start from
    source_sets: list[str]  # the source run's --set overrides (when the set pretrains one)
    first: list[tuple[Path, list[str]]]  # the first phase's runs: (run directory, --set overrides)
    swept: list[str]  # methods with several settings, whose best then runs at the `later` seeds
    later: list[int]


def expand(s: RecipeSet, methods: list[str] | None = None, seeds: list[int] | None = None) -> Expansion:
    """The set's runs, every recipe checked: the source's, the first phase's, and those of every
    setting that may win at the later seeds."""
    out = Path(s.out_dir or f"runs/{s.name}").resolve()
    methods = methods or list(s.methods)
    unknown = [m for m in methods if m not in s.methods]
    if unknown:
        raise RecipeError(f"--methods: {unknown[0]!r} is not in the set ({', '.join(s.methods)})")
    seeds = seeds if seeds is not None else s.seeds
    sweep_seeds = [x for x in (s.sweep_seeds or s.seeds[:1]) if x in seeds]
    source_dir = out / "source"
    source_model = RunDir(source_dir).final if not s.source_model else \
        Path(s.source_model).resolve() if Path(s.source_model).exists() else Path(s.source_model)  # alias, hub id
    source_sets = as_sets({"out_dir": str(source_dir), "method": "source"})
    if s.source:
        source = config.load(s.source, source_sets)
        moments = [m for m in methods if s.methods[m].optimizer == "grow"]
        if moments and source.zero.stage == 0:
            raise RecipeError(f"methods.{moments[0]}.optimizer: grow reads the source run's Adam moments from its "
                              f"ZeRO checkpoint, but {s.source} trains at zero.stage 0: set zero.stage 1-3 there")
    swept = [m for m in methods if len(settings(s, m)) > 1]
    later = [seed for seed in seeds if seed not in sweep_seeds] if swept else []
    for m in swept:  # any setting may win
        for setting in settings(s, m):
            for seed in later:
                planned_run(s, out, m, setting, seed, source_model)
    return Expansion(out, source_dir, source_model, source_sets,
                     first_phase(s, out, source_model, methods, seeds, sweep_seeds), swept, later)


def train_once(recipe: str, sets: list[str], procs: int | None, run_dir: Path, verbose: bool = False) -> None:
    """Train unless already finished; resume when stopped."""
    from .launch import train
    from .report import run_state
    if run_state(run_dir) == "finished":
        print(f"b2b run: {run_dir} already finished", flush=True)
        return
    code = train(recipe, sets, procs, resume="auto" if run_dir.is_dir() else "none", verbose=verbose)
    if code != 0:
        raise RecipeError(f"{run_dir}: b2b train exited with {code}; fix it and run b2b run again to continue")


def run(path: str, methods: list[str] | None = None, seeds: list[int] | None = None, procs: int | None = None,
        dry_run: bool = False, verbose: bool = False) -> int:
    s = load_set(Path(path))
    e = expand(s, methods, seeds)
    if dry_run:
        print(f"source: {s.source or s.source_model} -> {e.source_model}")
        for run_dir, sets in e.first:
            print(f"{run_dir.name}: b2b train {s.target} " + " ".join(f"--set '{x}'" for x in sets))
        if e.later:
            print(f"then at seeds {e.later}: the best setting of {', '.join(e.swept)} (b2b report's rule)")
        return 0
    with runlock.held(e.out):  # one b2b run per set directory; each run's b2b train locks its own
        return run_plan(s, e, procs, verbose)


def run_plan(s: RecipeSet, e: Expansion, procs: int | None, verbose: bool) -> int:
    if s.source:
        train_once(s.source, e.source_sets, procs, e.source_dir, verbose)
    plan = list(e.first)
    for run_dir, sets in plan:
        train_once(s.target, sets, procs, run_dir, verbose)
    from .report import best_settings, read_run, report
    r = s.report
    if e.later:
        best = best_settings([read_run(d, r.smooth, r.baseline) for d, _ in plan])
        for m in e.swept:
            setting = next(x for x in settings(s, m) if setting_text(x) == best[m])
            print(f"b2b run: {m}: best setting {best[m]}", flush=True)
            for seed in e.later:
                plan.append(planned_run(s, e.out, m, setting, seed, e.source_model))
                train_once(s.target, plan[-1][1], procs, plan[-1][0], verbose)
    report([str(d) for d, _ in plan], target=r.target, k=r.smooth, baseline=r.baseline, out=str(e.out / "report"))
    return 0
