"""`b2b report`: how much training compute grown runs save against the from-scratch baseline.

For each run directory (written by `b2b train`) the report reads the resolved recipe and the
TensorBoard scalars, and smooths the validation-loss curve with a trailing moving average over
the last K evaluations (fewer at the start of the curve). The target loss is `--target`, or the
highest of the baseline runs' final smoothed validation losses (one run per seed), the loss
every baseline run reaches, so that the baseline's FLOPs average over all its seeds. A run reaches
the target between the last evaluation whose smoothed loss is above it and the first at or below
it; its FLOPs and wall-clock to target are `train/flops` and `time/train_seconds` interpolated
linearly between those two evaluations, where the straight line between their smoothed losses
meets the target (so they are not quantised to the evaluation interval). A run that starts at or
below the target (step 0, `train.eval_at_start`) reaches it with 0 FLOPs.

Sweeps (`b2b run` with `sweep:`): runs carry a `setting` (the swept recipe keys). Each method is
ranked at its best setting: the lowest mean final smoothed validation loss over the seeds that
every setting of the method ran. The baseline at its best setting sets the target; the other
settings appear in a sweep table against the same target.

Savings are against F_baseline, the mean FLOPs to target of the baseline's runs that reached it:
`1 - F_run / F_baseline`, paired by seed (against the baseline run of the same seed), and with
the source model's own pretraining cost counted,
`1 - (F_run + F_source) / F_baseline`, where F_source is the `flops` of `training.json` in the
run's `model.grow_from` directory (relative to the current directory, as in the recipe), or
the counters of the ZeRO checkpoint it names; 0 for the baseline and for runs not grown;
unknown, and reported as such, when neither is there.
Per method: runs, how many reached the target, and
mean, sample standard deviation, min and max over those that did. A method that never reached
the target gets no number.

Writes `report.md`, `report.json` and `loss_vs_flops.png` to `--out`, each atomically, and only
after every input has been read and checked.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from growth import B2BError, GrowthError
from growth.adapters.files import atomic_file

from .checkpoint import CLIENT_KEY, RunDir
from .events import SCALARS, read_scalars

VAL, FLOPS, SECONDS = "val/loss", "train/flops", "time/train_seconds"


@dataclass
class Run:
    path: Path
    name: str
    method: str
    setting: str | None  # the swept keys (`b2b run`'s sweep), None when the method was not swept
    seed: int
    grow_from: str | None
    state: str | None  # status.json's state: finished, stopped, or None when absent
    steps: list[int]  # evaluation steps
    val: list[float]  # validation loss at those steps
    smoothed: list[float]
    flops: list[float]  # cumulative training FLOPs at those steps
    seconds: list[float | None]  # cumulative training seconds (None where not logged)
    source_flops: float | None  # None: unknown
    budget: int | None = None  # the recipe's train.steps
    trains: dict = field(default_factory=dict)  # what compared runs must share: the shape, the data, the batch


COMPARED = {"model": ("arch", "layers", "hidden", "heads", "ffn"), "data": ("files", "hub", "seq_len"),
            "batch": ("micro", "accum", "global_size")}


def trains(recipe: dict) -> dict:
    """The keys of a run's recipe that must agree across a comparison (methods differ in the rest:
    the rate, the start model, the stages)."""
    return {f"{section}.{key}": (recipe.get(section) or {}).get(key) for section, keys in COMPARED.items()
            for key in keys}


class ReportError(B2BError):
    """Run directories that cannot be read or compared as asked."""


# ---------------------------------------------------------------- reading runs


def smooth(values: list[float], k: int) -> list[float]:
    """Trailing moving average over the last k values (fewer at the start)."""
    return [statistics.fmean(values[max(0, i - k + 1):i + 1]) for i in range(len(values))]


def read_recipe(run_dir: Path) -> dict:
    path = RunDir(run_dir).recipe
    if not path.is_file():
        raise ReportError(f"{run_dir}: no recipe.yaml; is this a run directory written by b2b train?")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ReportError(f"{path}: not valid YAML ({err})".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise ReportError(f"{path}: expected a mapping, got {type(data).__name__}")
    return data


def source_cost(grow_from: str | None) -> float | None:
    """The source model's pretraining FLOPs from its training.json (or a ZeRO checkpoint's client
    state); 0 when the run was not grown, None when unknown."""
    if grow_from is None:
        return 0.0
    from growth.adapters.deepspeed import ZeroCheckpoint, is_checkpoint
    try:
        if is_checkpoint(Path(grow_from)):  # a ZeRO checkpoint: the step's counters, in DeepSpeed's client state
            return float(ZeroCheckpoint(grow_from).meta[CLIENT_KEY]["flops"])
        return float(json.loads((Path(grow_from) / "training.json").read_text())["flops"])
    except (OSError, ValueError, KeyError, TypeError, GrowthError):
        return None


def run_status(run_dir: Path) -> dict:
    """status.json (state finished or stopped, step, ...); {} when absent or unreadable (still
    running, or crashed)."""
    try:
        status = json.loads(RunDir(run_dir).status.read_text())
    except (OSError, ValueError):
        return {}
    return status if isinstance(status, dict) else {}


def run_state(run_dir: Path) -> str | None:
    """status.json's state (finished or stopped); None when absent or unreadable."""
    return run_status(run_dir).get("state")


def read_run(run_dir: Path, k: int, baseline: str) -> Run:
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: no such run directory")
    recipe = read_recipe(run_dir)
    events = RunDir(run_dir).tensorboard
    if not any(events.glob("events.out.tfevents.*")) and not (run_dir / SCALARS).is_file():
        raise ReportError(f"{run_dir}: no TensorBoard events in {events}")
    scalars = read_scalars(run_dir)
    val = scalars.get(VAL)
    if not val:
        raise ReportError(f"{run_dir}: no {VAL} scalars; the run never validated (train.eval_every)")
    steps = sorted(val)
    flops, seconds = scalars.get(FLOPS, {}), scalars.get(SECONDS, {})
    missing = [s for s in steps if s not in flops]
    if missing:
        raise ReportError(f"{run_dir}: no {FLOPS} at evaluation step {missing[0]}")
    name = str(recipe.get("name") or run_dir.name)
    method = str(recipe.get("method") or name)
    seed = recipe.get("seed", 0)
    if not isinstance(seed, int):
        raise ReportError(f"{RunDir(run_dir).recipe}: seed: expected an integer, got {seed!r}")
    grow_from = (recipe.get("model") or {}).get("grow_from")
    losses = [val[s] for s in steps]
    setting = recipe.get("setting")
    return Run(path=run_dir, name=name, method=method, setting=None if setting is None else str(setting), seed=seed,
               grow_from=grow_from, state=run_state(run_dir), steps=steps, val=losses, smoothed=smooth(losses, k),
               flops=[flops[s] for s in steps], seconds=[seconds.get(s) for s in steps],
               source_flops=0.0 if method == baseline else source_cost(grow_from),
               budget=(recipe.get("train") or {}).get("steps"), trains=trains(recipe))


# ---------------------------------------------------------------- arithmetic


def crossing(run: Run, target: float) -> tuple[int, float] | None:
    """Where the smoothed curve first reaches the target: (i, t) with i the first evaluation whose
    smoothed loss is <= target and t the fraction of the interval from evaluation i - 1 to i at which
    the straight line between their smoothed losses meets the target (t = 1 when i is the first
    evaluation); None when it never does."""
    i = next((i for i, loss in enumerate(run.smoothed) if loss <= target), None)
    if i is None:
        return None
    if i == 0:
        return 0, 1.0
    before, at = run.smoothed[i - 1], run.smoothed[i]
    return i, (before - target) / (before - at)


def at_crossing(values: list, hit: tuple[int, float]) -> float | None:
    """A cumulative counter (FLOPs, seconds, step) at the crossing, interpolated linearly between
    the two evaluations; None when a value is missing."""
    i, t = hit
    if i == 0:
        return values[0]
    if values[i - 1] is None or values[i] is None:
        return None
    return values[i - 1] + t * (values[i] - values[i - 1])


def setting_scores(runs: list[Run]) -> dict[str, dict[str | None, float]]:
    """method -> setting -> its score: the mean final smoothed validation loss over the seeds that
    every setting of the method ran (all of each setting's seeds when they share none); every run
    has the same step budget. The settings keep the order in which the runs were given."""
    scores = {}
    for method in dict.fromkeys(r.method for r in runs):
        mine = [r for r in runs if r.method == method]
        settings = list(dict.fromkeys(r.setting for r in mine))
        common = set.intersection(*({r.seed for r in mine if r.setting == s} for s in settings))
        scores[method] = {s: statistics.fmean(r.smoothed[-1] for r in mine
                                              if r.setting == s and (not common or r.seed in common))
                          for s in settings}
    return scores


def best_settings(runs: list[Run]) -> dict[str, str | None]:
    """Each method's best setting: the lowest score (setting_scores); a tie goes to the one given first."""
    return {method: min(scores, key=scores.get) for method, scores in setting_scores(runs).items()}


def saving(flops: float | None, baseline_flops: float | None) -> float | None:
    if flops is None or baseline_flops is None:
        return None
    return 1.0 - flops / baseline_flops


def stats(values: list[float | None]) -> dict | None:
    """Mean, sample std (0 for one value), min and max; None when empty or any value is unknown."""
    if not values or any(v is None for v in values):
        return None
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def run_row(run: Run, target: float, baseline_flops: float | None, paired_flops: float | None,
            chosen: bool) -> dict:
    """One run against the target; `paired_flops`: the baseline run of the same seed's FLOPs to target."""
    hit = crossing(run, target)
    flops = at_crossing(run.flops, hit) if hit else None
    with_source = flops + run.source_flops if flops is not None and run.source_flops is not None else None
    return {
        "run_dir": str(run.path), "name": run.name, "method": run.method, "setting": run.setting, "chosen": chosen,
        "seed": run.seed, "grow_from": run.grow_from, "state": run.state, "last_step": run.steps[-1],
        "final_val_loss": run.val[-1], "final_smoothed_val_loss": run.smoothed[-1],
        "start_val_loss": run.val[0] if run.steps[0] == 0 else None,
        # how far the validation loss rises above the starting model's (step 0) before it falls
        "rise_above_start": max(run.val[1:]) - run.val[0] if run.steps[0] == 0 and len(run.val) > 1 else None,
        "reached": hit is not None,
        "step_to_target": at_crossing(run.steps, hit) if hit else None,
        "flops_to_target": flops,
        "seconds_to_target": at_crossing(run.seconds, hit) if hit else None,
        "source_flops": run.source_flops,
        "saving": saving(flops, baseline_flops),
        "paired_saving": saving(flops, paired_flops),
        "saving_with_source": saving(with_source, baseline_flops),
    }


def method_summary(rows: list[dict]) -> dict:
    reached = [r for r in rows if r["reached"]]
    rises = [r["rise_above_start"] for r in rows if r["rise_above_start"] is not None]
    return {
        "setting": rows[0]["setting"], "runs": len(rows), "reached": len(reached),
        "final_val_loss": stats([r["final_val_loss"] for r in rows]),  # every run: the loss at equal budget
        "max_rise_above_start": max(rises) if rises else None,
        **{key: stats([r[key] for r in reached])
           for key in ("flops_to_target", "seconds_to_target", "saving", "saving_with_source")},
        # paired by seed: the runs whose seed's baseline run reached the target too
        "paired_saving": stats([r["paired_saving"] for r in reached if r["paired_saving"] is not None]),
    }


def build_report(runs: list[Run], target: float | None, k: int, baseline: str) -> dict:
    """Every method at its best setting (best_settings; the only one when it was not swept): the
    target from the baseline's runs at its best setting, then each run against it."""
    scores = setting_scores(runs)
    best = {method: min(s, key=s.get) for method, s in scores.items()}
    chosen = [r for r in runs if r.setting == best[r.method]]
    base = [r for r in chosen if r.method == baseline]
    given = target is not None
    if not given:
        if not base:
            raise ReportError(f"no run of the baseline method {baseline!r} among the inputs "
                              f"(methods: {', '.join(sorted({r.method for r in runs}))}); "
                              "pass its runs, name another with --baseline, or give --target LOSS")
        target = max(r.smoothed[-1] for r in base)
    base_by_seed = {r.seed: at_crossing(r.flops, hit) for r in base if (hit := crossing(r, target))}
    base_flops = list(base_by_seed.values())
    baseline_flops = statistics.fmean(base_flops) if base_flops and min(base_flops) > 0 else None
    order = [r.method for r in runs]
    labels = sorted(set(order), key=lambda m: (m != baseline, order.index(m)))  # baseline first
    runs = sorted(runs, key=lambda r: (labels.index(r.method), r.setting != best[r.method], r.seed))
    rows = [run_row(r, target, baseline_flops, base_by_seed.get(r.seed) if baseline_flops else None,
                    r.setting == best[r.method]) for r in runs]
    swept = [m for m in labels if len(scores[m]) > 1]
    return {
        "target": target, "target_source": "given" if given else "baseline",
        "smooth": k, "baseline": baseline, "baseline_runs": len(base), "baseline_flops_to_target": baseline_flops,
        "methods": {m: method_summary([row for row in rows if row["method"] == m and row["chosen"]]) for m in labels},
        "sweep": [{"method": m, "setting": setting, "score": score, "chosen": setting == best[m],
                   **method_summary([row for row in rows if row["method"] == m and row["setting"] == setting])}
                  for m in swept for setting, score in scores[m].items()],
        "runs": rows,
    }


# ---------------------------------------------------------------- markdown


def fmt_flops(x: float) -> str:
    return f"{x:.2e}"


def fmt_seconds(x: float) -> str:
    if x < 120:
        return f"{x:.1f} s"
    if x < 7200:
        return f"{x / 60:.1f} min"
    return f"{x / 3600:.2f} h"


def fmt_pct(x: float) -> str:
    return f"{round(100 * x, 1) + 0.0:.1f}%"  # + 0.0: no "-0.0%"


def fmt_stat(s: dict, fmt, n: int) -> str:
    """mean ± sample std over n runs (just the value for one run)."""
    return f"{fmt(s['mean'])} ± {fmt(s['std'])}" if n > 1 else fmt(s["mean"])


def saving_cell(value, baseline_ok: bool, n: int = 1, source: bool = False) -> str:
    """A saving (a stat dict over n runs, or one number), or why there is none."""
    if not baseline_ok:
        return "n/a (no baseline FLOPs)"
    if value is None:
        return "unknown (source cost)" if source else "–"
    return fmt_stat(value, fmt_pct, n) if isinstance(value, dict) else fmt_pct(value)


def fmt_rise(x: float | None) -> str:
    return "–" if x is None else f"{x + 0.0:+.4f}"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [f"| {' | '.join(header)} |", "|" + "---|" * len(header), *(f"| {' | '.join(r)} |" for r in rows)]


def markdown(report: dict) -> str:
    k, baseline, target = report["smooth"], report["baseline"], report["target"]
    how = (f"the highest final smoothed validation loss of the baseline `{baseline}` over its "
           f"{report['baseline_runs']} run(s), which every one of them reaches" if report["target_source"] == "baseline"
           else "given with --target")
    baseline_ok = report["baseline_flops_to_target"] is not None
    swept = bool(report["sweep"])
    lines = [
        "# Compute to target loss", "",
        f"- Target validation loss: **{target:.4f}** ({how}).",
        f"- Smoothing: trailing mean over the last {k} evaluation(s). A run reaches the target between the "
        "last evaluation whose smoothed loss is above it and the first at or below it; FLOPs and wall-clock to "
        "target are interpolated linearly between those two evaluations, at the point where the straight line "
        "between their smoothed losses meets the target.",
        f"- Baseline: `{baseline}`; " + (f"FLOPs to target {fmt_flops(report['baseline_flops_to_target'])} "
                                          "(mean over its runs that reached it)." if baseline_ok else
                                          "no baseline run reached the target (or none was given): no savings."),
        "- Saving: 1 - FLOPs / baseline FLOPs; paired by seed: against the baseline run of the same seed; incl. "
        "source cost adds the source model's own pretraining FLOPs (`training.json` in `model.grow_from`).",
        "- Final val loss: each run's last validation loss (every run of the method, same step budget). "
        "Max rise over step 0: the most the validation loss rose above the starting model's.",
    ]
    if swept:
        lines.append("- Sweep: each method is reported at its best setting, the one with the lowest mean final "
                     "smoothed validation loss over the seeds that all its settings ran (the sweep table); the "
                     "baseline's best setting sets the target.")
    setting = ["setting"] if swept else []
    rows, notes = [], []
    for label, m in report["methods"].items():
        head = [label, *([m["setting"] or "–"] if swept else []), str(m["runs"]), f"{m['reached']} of {m['runs']}",
                fmt_stat(m["final_val_loss"], "{:.4f}".format, m["runs"]), fmt_rise(m["max_rise_above_start"])]
        if m["reached"] == 0:
            rows.append(head + ["did not reach the target", "–", "–", "–", "–"])
            continue
        if m["reached"] < m["runs"]:
            notes.append(f"- `{label}`: {m['reached']} of {m['runs']} runs reached it; statistics over those.")
        n = m["reached"]
        paired = m["paired_saving"]
        rows.append(head + [fmt_stat(m["flops_to_target"], fmt_flops, n),
                            fmt_stat(m["seconds_to_target"], fmt_seconds, n) if m["seconds_to_target"] else "unknown",
                            saving_cell(m["saving"], baseline_ok, n),
                            saving_cell(paired, baseline_ok, n) if paired else "–",
                            saving_cell(m["saving_with_source"], baseline_ok, n, source=True)])
    lines += ["", *table(["method", *setting, "runs", "reached", "final val loss", "max rise over step 0",
                          "FLOPs to target", "wall-clock to target", "saving vs baseline", "saving paired by seed",
                          "saving incl. source cost"], rows), "", *notes, *([""] if notes else [])]
    if swept:
        rows = [[s["method"], s["setting"] or "–", str(s["runs"]), f"{s['score']:.4f}",
                 fmt_stat(s["final_val_loss"], "{:.4f}".format, s["runs"]), f"{s['reached']} of {s['runs']}",
                 saving_cell(s["saving"], baseline_ok, s["reached"]) if s["reached"] else "–",
                 "yes" if s["chosen"] else ""] for s in report["sweep"]]
        lines += ["Sweep:", "", *table(["method", "setting", "runs", "score (final smoothed val loss)",
                                        "final val loss", "reached", "saving vs baseline", "chosen"], rows), ""]
    rows = []
    for r in report["runs"]:
        state = f" ({r['state']} at step {r['last_step']})" if r["state"] == "stopped" else ""
        if r["reached"]:
            cells = [fmt_flops(r["flops_to_target"]), saving_cell(r["saving"], baseline_ok),
                     saving_cell(r["paired_saving"], baseline_ok) if r["paired_saving"] is not None else "–",
                     saving_cell(r["saving_with_source"], baseline_ok, source=True)]
        else:
            cells = ["did not reach the target", "–", "–", "–"]
        mark = [f"{r['setting'] or '–'}{' (chosen)' if r['chosen'] else ''}"] if swept else []
        rows.append([f"{r['run_dir']}{state}", r["method"], *mark, str(r["seed"]), f"{r['final_val_loss']:.4f}",
                     fmt_rise(r["rise_above_start"]), *cells])
    lines += table(["run", "method", *setting, "seed", "final val loss", "rise over step 0", "FLOPs to target",
                    "saving", "saving paired by seed", "saving incl. source cost"], rows)
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- plot and files


def plot(runs: list[Run], report: dict, path: Path) -> None:
    """Smoothed validation loss against training FLOPs (log x), each seed's curve in its method's
    colour, the method labelled once; the target as a dashed line and each crossing as a dot."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for n, label in enumerate(report["methods"]):
        colour = f"C{n % 10}"  # matplotlib's default colour cycle
        setting = report["methods"][label]["setting"]  # each method at its best setting
        for j, run in enumerate(r for r in runs if r.method == label and r.setting == setting):
            points = [(f, v) for f, v in zip(run.flops, run.smoothed) if f > 0]
            if points:
                ax.plot(*zip(*points), color=colour, lw=1.5, alpha=0.85, label=label if j == 0 else None)
            hit = crossing(run, report["target"])
            if hit is not None and at_crossing(run.flops, hit) > 0:
                ax.plot(at_crossing(run.flops, hit), report["target"], "o", color=colour, ms=4)
    ax.axhline(report["target"], color="k", ls="--", lw=1, label=f"target {report['target']:.4f}")
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs (cumulative)")
    ax.set_ylabel(f"validation loss (trailing mean of {report['smooth']})")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.savefig(path, format="png", dpi=120)


def report(run_dirs: list[str], target: float | None = None, k: int = 3, baseline: str = "scratch",
           out: str = "runs/report") -> dict:
    """Read and check every run, then write report.md, report.json and loss_vs_flops.png to `out`."""
    if k < 1:
        raise ReportError(f"--smooth {k}: must be >= 1 (the number of evaluations to average)")
    if target is not None and not math.isfinite(target):
        raise ReportError(f"--target {target}: must be a finite loss")
    paths = [Path(d) for d in run_dirs]
    seen = {}
    for p in paths:
        if p.resolve() in seen:
            raise ReportError(f"{p}: run directory given twice")
        seen[p.resolve()] = p
    runs = [read_run(p, k, baseline) for p in paths]
    budgets = sorted({r.budget for r in runs if r.budget is not None})
    if len(budgets) > 1:
        print(f"b2b report: warning: the runs have different step budgets (train.steps {budgets}); their final "
              "losses are not at the same budget", file=sys.stderr)
    other = next((r for r in runs if r.trains != runs[0].trains), None)
    if other is not None:
        differ = [f"{k} {runs[0].trains[k]} vs {v}" for k, v in other.trains.items() if runs[0].trains[k] != v]
        print(f"b2b report: warning: {runs[0].path} and {other.path} train different models, data or batches "
              f"({', '.join(differ)}); their losses do not compare", file=sys.stderr)
    result = build_report(runs, target, k, baseline)
    text = markdown(result)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_file(out_dir / "report.json") as tmp:
        tmp.write_text(json.dumps(result, indent=1) + "\n")
    with atomic_file(out_dir / "report.md") as tmp:
        tmp.write_text(text)
    with atomic_file(out_dir / "loss_vs_flops.png") as tmp:
        plot(runs, result, tmp)
    print(text, end="")
    print(f"wrote {out_dir}/report.md, report.json, loss_vs_flops.png")
    return result
