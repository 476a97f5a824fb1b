"""`b2b report` on hand-made run directories (recipe.yaml + real TensorBoard event files): the
arithmetic of report.json recomputed here from the scalars written, methods that never or only
partly reach the target, --target, the plot, and bad inputs ending in one line, exit code 2 and
no output directory."""

import json
import statistics

import pytest
import yaml
from torch.utils.tensorboard import SummaryWriter

from launchers.cli import main

EVAL_STEPS = [100, 200, 300, 400, 500, 600, 700, 800]
FLOPS_PER_STEP = 2e9
SOURCE_FLOPS = 2.5e11

# method -> seed -> validation loss at EVAL_STEPS
CURVES = {
    "scratch": {0: [6.0, 5.0, 4.2, 3.6, 3.2, 3.0, 2.9, 2.85],
                1: [6.1, 5.1, 4.3, 3.6, 3.0, 2.8, 3.0, 3.2]},  # dips below the target, then rises
    "aki": {0: [4.0, 3.4, 3.0, 2.8, 2.7, 2.65, 2.6, 2.6],
            1: [4.1, 3.6, 3.3, 3.1, 3.0, 2.8, 2.7, 2.6]},  # crosses later than seed 0
    "fpi": {0: [4.5, 3.8, 3.2, 2.9, 2.8, 2.75, 2.7, 2.7]},  # grown, source cost unknown
    "direct": {0: [7.0, 6.5, 6.2, 6.0, 5.9, 5.8, 5.8, 5.7]},  # never reaches
    "stack": {0: [4.2, 3.6, 3.1, 2.9, 2.8, 2.7, 2.7, 2.7],
              1: [5.0, 4.6, 4.3, 4.1, 4.0, 3.9, 3.9, 3.9]},  # 1 of 2 reach
}


def flops(step):
    return step * FLOPS_PER_STEP


def seconds(step, seed):
    return step * 0.3 + 7 * seed


def write_events(run, evals: dict[int, float], seed: int, log_every: int = 50):
    w = SummaryWriter(log_dir=str(run / "tensorboard"))
    for step in range(log_every, max(evals) + 1, log_every):
        w.add_scalar("train/flops", flops(step), step)
        w.add_scalar("time/train_seconds", seconds(step, seed), step)
        w.add_scalar("train/loss", 9.0, step)
        if step in evals:
            w.add_scalar("val/loss", evals[step], step)
    w.close()


def make_run(root, method, seed, losses, grow_from="absent"):
    run = root / f"{method}-s{seed}"
    run.mkdir()
    recipe = {"name": f"{method}-s{seed}", "method": method, "seed": seed}
    if grow_from != "absent":
        recipe["model"] = {"grow_from": grow_from, "layers": 2}
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    (run / "status.json").write_text(json.dumps({"state": "finished", "step": EVAL_STEPS[-1]}))
    write_events(run, dict(zip(EVAL_STEPS, losses)), seed)
    return run


@pytest.fixture
def runs(tmp_path):
    source = tmp_path / "source-small"
    source.mkdir()
    (source / "training.json").write_text(json.dumps({"flops": SOURCE_FLOPS, "tokens": 1, "steps": 1,
                                                      "train_seconds": 1.0}))
    no_record = tmp_path / "source-no-record"
    no_record.mkdir()
    grow_from = {"scratch": "absent", "aki": str(source), "fpi": str(no_record), "direct": None,
                 "stack": str(source)}
    return [make_run(tmp_path, method, seed, losses, grow_from[method])
            for method, seeds in CURVES.items() for seed, losses in seeds.items()]


def run_cli(capsys, *argv):
    code = main(["report", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def smoothed(losses, k):
    return [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1]) for i in range(len(losses))]


def expected(target, k):
    """Per (method, seed): (step, flops, seconds) where the smoothed curve, drawn as straight lines
    between evaluations, first meets the target, or None. FLOPs and seconds are linear in the step
    here, so they are those of the interpolated step."""
    out = {}
    for method, seeds in CURVES.items():
        for seed, losses in seeds.items():
            curve = smoothed(losses, k)
            i = next((i for i, v in enumerate(curve) if v <= target), None)
            if i is None:
                out[method, seed] = None
                continue
            fraction = 0.0 if i == 0 else (curve[i - 1] - target) / (curve[i - 1] - curve[i])
            step = EVAL_STEPS[0] if i == 0 else EVAL_STEPS[i - 1] + fraction * (EVAL_STEPS[i] - EVAL_STEPS[i - 1])
            out[method, seed] = (step, flops(step), seconds(step, seed))
    return out


def test_report_arithmetic_against_the_scalars_written(runs, tmp_path, capsys):
    out = tmp_path / "report"
    code, stdout, err = run_cli(capsys, *runs, "--out", out)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    k = 3
    target = max(smoothed(CURVES["scratch"][s], k)[-1] for s in (0, 1))
    assert report["smooth"] == k and report["baseline"] == "scratch" and report["target_source"] == "baseline"
    assert report["target"] == pytest.approx(target, rel=1e-6)

    exp = expected(target, k)
    # the curves do what they were designed for: both baseline seeds reach (seed 1 on a dip, not at its end)
    assert exp["scratch", 0] and exp["scratch", 1] and exp["scratch", 1][0] < EVAL_STEPS[-1]
    assert exp["direct", 0] is None and exp["stack", 0] and exp["stack", 1] is None
    assert exp["aki", 0][0] != exp["aki", 1][0]  # so the standard deviations are not 0
    f_base = statistics.mean(exp["scratch", s][1] for s in (0, 1))
    assert report["baseline_flops_to_target"] == pytest.approx(f_base)

    source = {"scratch": 0.0, "aki": SOURCE_FLOPS, "fpi": None, "direct": None, "stack": SOURCE_FLOPS}
    rows = {(r["method"], r["seed"]): r for r in report["runs"]}
    assert set(rows) == set(exp)
    for key, hit in exp.items():
        row = rows[key]
        assert row["final_val_loss"] == pytest.approx(CURVES[key[0]][key[1]][-1], rel=1e-6)
        if hit is None:
            assert not row["reached"]
            assert row["flops_to_target"] is row["seconds_to_target"] is row["saving"] is None
            continue
        step, f, s = hit
        assert row["reached"] and row["step_to_target"] == pytest.approx(step, rel=1e-5)
        assert row["flops_to_target"] == pytest.approx(f, rel=1e-5)
        assert row["seconds_to_target"] == pytest.approx(s, rel=1e-5)
        assert row["saving"] == pytest.approx(1 - f / f_base, abs=1e-6)  # float32 losses
        src = source[key[0]]
        if src is None:
            assert row["source_flops"] is None and row["saving_with_source"] is None
        else:
            assert row["saving_with_source"] == pytest.approx(1 - (f + src) / f_base, abs=1e-6)

    m = report["methods"]
    assert list(m) == ["scratch", "aki", "fpi", "direct", "stack"]  # the baseline first, then as given
    aki = [exp["aki", s] for s in (0, 1)]
    assert m["aki"]["runs"] == m["aki"]["reached"] == 2
    for field, values in {"flops_to_target": [h[1] for h in aki], "seconds_to_target": [h[2] for h in aki],
                          "saving": [1 - h[1] / f_base for h in aki],
                          "saving_with_source": [1 - (h[1] + SOURCE_FLOPS) / f_base for h in aki]}.items():
        stat = m["aki"][field]
        assert stat["mean"] == pytest.approx(statistics.mean(values), rel=1e-5, abs=1e-6)
        assert stat["std"] == pytest.approx(statistics.stdev(values), rel=1e-4, abs=1e-6)
        assert (stat["min"], stat["max"]) == pytest.approx((min(values), max(values)), rel=1e-5, abs=1e-6)
    assert m["scratch"]["saving"]["mean"] == pytest.approx(0.0, abs=1e-6)  # float32 scalars
    assert (m["stack"]["runs"], m["stack"]["reached"]) == (2, 1)
    assert m["stack"]["flops_to_target"] == pytest.approx(
        {"mean": exp["stack", 0][1], "std": 0.0, "min": exp["stack", 0][1], "max": exp["stack", 0][1]})
    assert m["fpi"]["saving"] is not None and m["fpi"]["saving_with_source"] is None
    assert (m["direct"]["runs"], m["direct"]["reached"]) == (1, 0)
    assert all(m["direct"][f] is None for f in ("flops_to_target", "seconds_to_target", "saving",
                                                "saving_with_source"))

    md = (out / "report.md").read_text()
    assert stdout.startswith(md)
    assert f"{target:.4f}" in md and "trailing mean over the last 3" in md
    method_rows = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ")}
    assert "did not reach the target" in method_rows["direct"]
    assert not any(ch.isdigit() for cell in method_rows["direct"].split("|")[5:] for ch in cell)
    finals = [CURVES["aki"][s][-1] for s in (0, 1)]
    assert m["aki"]["final_val_loss"]["mean"] == pytest.approx(statistics.mean(finals), rel=1e-6)
    assert f"| {statistics.mean(finals):.4f} ± {statistics.stdev(finals):.4f} |" in method_rows["aki"]
    assert f"| {CURVES['direct'][0][-1]:.4f} |" in method_rows["direct"]  # a run that missed the target has one too
    assert "1 of 2 runs reached it" in md
    assert "unknown" in method_rows["fpi"]
    assert f"{statistics.mean(h[1] for h in aki):.2e}" in method_rows["aki"]
    assert f"{100 * statistics.mean(1 - h[1] / f_base for h in aki):.1f}%" in method_rows["aki"]

    png = (out / "loss_vs_flops.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    assert sorted(p.name for p in out.iterdir()) == ["loss_vs_flops.png", "report.json", "report.md"]


def test_target_overrides_and_smoothing(runs, tmp_path, capsys):
    out = tmp_path / "r2"
    code, _, err = run_cli(capsys, *runs, "--target", 3.5, "--smooth", 1, "--out", out)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["target"] == 3.5 and report["target_source"] == "given" and report["smooth"] == 1
    exp = expected(3.5, 1)
    f_base = statistics.mean(exp["scratch", s][1] for s in (0, 1))
    for row in report["runs"]:
        hit = exp[row["method"], row["seed"]]
        assert row["reached"] == (hit is not None)
        if hit:
            assert row["step_to_target"] == pytest.approx(hit[0])
            assert row["saving"] == pytest.approx(1 - hit[1] / f_base)


def test_without_baseline_a_given_target_still_reports(runs, tmp_path, capsys):
    out = tmp_path / "r3"
    aki = [r for r in runs if r.name.startswith("aki")]
    code, _, err = run_cli(capsys, *aki, "--target", 3.0, "--out", out)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["baseline_flops_to_target"] is None and report["methods"]["aki"]["saving"] is None
    assert report["methods"]["aki"]["flops_to_target"] is not None
    assert "no savings" in (out / "report.md").read_text()


def test_missing_training_json_makes_the_source_cost_unknown_not_zero(runs, tmp_path, capsys):
    out = tmp_path / "r4"
    fpi = [r for r in runs if r.name.startswith(("fpi", "scratch"))]
    assert run_cli(capsys, *fpi, "--out", out)[0] == 0
    row = next(r for r in json.loads((out / "report.json").read_text())["runs"] if r["method"] == "fpi")
    assert row["source_flops"] is None and row["saving_with_source"] is None


def bad_inputs(tmp_path, runs):
    no_recipe = tmp_path / "no-recipe"
    no_recipe.mkdir()
    no_events = tmp_path / "no-events"
    no_events.mkdir()
    (no_events / "recipe.yaml").write_text("name: x\nseed: 0\n")
    no_val = tmp_path / "no-val"
    (no_val / "tensorboard").mkdir(parents=True)
    (no_val / "recipe.yaml").write_text("name: x\nmethod: scratch\nseed: 0\n")
    w = SummaryWriter(log_dir=str(no_val / "tensorboard"))
    w.add_scalar("train/flops", 1e9, 10)
    w.close()
    aki = [r for r in runs if r.name.startswith("aki")]
    return {
        "does not exist": ([tmp_path / "nope"], [], "no such run directory"),
        "no recipe": ([no_recipe], [], "no recipe.yaml"),
        "no events": ([no_events], [], "no TensorBoard events"),
        "no val/loss": ([no_val], [], "no val/loss"),
        "smooth 0": (runs[:1], ["--smooth", "0"], "--smooth 0"),
        "no baseline": (aki, [], "baseline"),
        "twice": ([runs[0], runs[0]], [], "given twice"),
    }


@pytest.mark.parametrize("case", ["does not exist", "no recipe", "no events", "no val/loss", "smooth 0",
                                  "no baseline", "twice"])
def test_bad_inputs_fail_in_one_line_and_write_nothing(case, runs, tmp_path, capsys):
    dirs, extra, message = bad_inputs(tmp_path, runs)[case]
    out = tmp_path / "out" / "report"
    code, stdout, err = run_cli(capsys, *dirs, *extra, "--out", out)
    assert code == 2 and stdout == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("b2b report: error:") and message in err
    assert not (tmp_path / "out").exists()


def write_run(root, method, seed, losses, steps=(0, 100, 200, 300), setting=None):
    """A run directory with validation at `steps` (step 0: the starting model, 0 FLOPs)."""
    run = root / f"{method}{'-' + setting if setting else ''}-s{seed}"
    run.mkdir()
    recipe = {"name": run.name, "method": method, "seed": seed, **({"setting": setting} if setting else {})}
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    w = SummaryWriter(log_dir=str(run / "tensorboard"))
    for step, loss in zip(steps, losses):
        w.add_scalar("train/flops", flops(step), step)
        w.add_scalar("time/train_seconds", 0.5 * step, step)
        w.add_scalar("val/loss", loss, step)
    w.close()
    return run


def test_interpolated_crossing_paired_savings_and_the_rise_over_step_0_by_hand(tmp_path, capsys):
    # smoothing 1, target = the highest final scratch loss = 4.0 (scratch-s0 ends on it at step 300)
    runs = [write_run(tmp_path, "scratch", 0, [8.0, 6.0, 5.0, 4.0]),
            write_run(tmp_path, "scratch", 1, [8.0, 6.0, 4.5, 3.9]),  # 4.5 -> 3.9 meets 4.0 at 5/6: step 283 1/3
            write_run(tmp_path, "aki", 0, [5.0, 5.02, 4.5, 3.5]),  # 4.5 -> 3.5 meets 4.0 halfway: step 250
            write_run(tmp_path, "aki", 1, [5.0, 4.8, 4.2, 3.0])]  # 4.2 -> 3.0 meets 4.0 at 1/6: step 216 2/3
    code, _, err = run_cli(capsys, *runs, "--smooth", 1, "--out", tmp_path / "r")
    assert code == 0, err
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    rows = {(r["method"], r["seed"]): r for r in report["runs"]}
    assert report["target"] == pytest.approx(4.0)
    steps = {("scratch", 0): 300.0, ("scratch", 1): 850 / 3, ("aki", 0): 250.0, ("aki", 1): 650 / 3}
    for key, step in steps.items():
        assert rows[key]["step_to_target"] == pytest.approx(step, rel=1e-6)
        assert rows[key]["flops_to_target"] == pytest.approx(2e9 * step, rel=1e-6)
        assert rows[key]["seconds_to_target"] == pytest.approx(0.5 * step, rel=1e-6)
    base = (300 + 850 / 3) / 2
    assert report["baseline_flops_to_target"] == pytest.approx(2e9 * base, rel=1e-6)
    assert rows["aki", 0]["saving"] == pytest.approx(1 - 250 / base, abs=1e-6)
    assert rows["aki", 0]["paired_saving"] == pytest.approx(1 / 6, abs=1e-6)  # 1 - 250 / 300
    assert rows["aki", 1]["paired_saving"] == pytest.approx(4 / 17, abs=1e-6)  # 1 - (650/3) / (850/3)
    paired = report["methods"]["aki"]["paired_saving"]
    assert paired["mean"] == pytest.approx((1 / 6 + 4 / 17) / 2, abs=1e-6)
    assert rows["aki", 0]["rise_above_start"] == pytest.approx(0.02, abs=1e-6)
    assert rows["aki", 1]["rise_above_start"] == pytest.approx(-0.2, abs=1e-6)  # never rose: its highest later loss
    assert report["methods"]["aki"]["max_rise_above_start"] == pytest.approx(0.02, abs=1e-6)
    md = (tmp_path / "r" / "report.md").read_text()
    assert "+0.0200" in md and "interpolated linearly" in md and "paired by seed" in md


def test_a_sweep_ranks_each_method_at_its_best_setting(tmp_path, capsys):
    lr1, lr2 = "optim.lr=0.001", "optim.lr=0.002"
    runs = [write_run(tmp_path, "scratch", 0, [8.0, 6.0, 5.0, 4.4], setting=lr1),
            write_run(tmp_path, "scratch", 0, [8.0, 6.0, 4.5, 4.0], setting=lr2),  # better: sets the target 4.0
            write_run(tmp_path, "scratch", 1, [8.0, 6.0, 4.6, 3.9], setting=lr2),
            write_run(tmp_path, "aki", 0, [5.0, 4.4, 4.1, 3.6], setting=lr1),  # better on seed 0, the common seed
            write_run(tmp_path, "aki", 0, [5.0, 4.6, 4.3, 3.7], setting=lr2),
            write_run(tmp_path, "aki", 1, [5.0, 4.6, 4.3, 2.0], setting=lr2)]  # not compared: lr1 has no seed 1
    code, _, err = run_cli(capsys, *runs, "--smooth", 1, "--out", tmp_path / "r")
    assert code == 0, err
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["target"] == pytest.approx(4.0)  # scratch at lr2; lr1 (4.4) would have set 4.4
    m = report["methods"]
    assert (m["scratch"]["setting"], m["scratch"]["runs"]) == (lr2, 2)
    assert (m["aki"]["setting"], m["aki"]["runs"]) == (lr1, 1)
    sweep = {(s["method"], s["setting"]): s for s in report["sweep"]}
    assert sweep["aki", lr1]["score"] == pytest.approx(3.6) and sweep["aki", lr2]["score"] == pytest.approx(3.7)
    assert sweep["aki", lr1]["chosen"] and not sweep["aki", lr2]["chosen"]
    assert sweep["scratch", lr1]["reached"] == 0 and sweep["aki", lr2]["runs"] == 2
    aki = next(r for r in report["runs"] if r["method"] == "aki" and r["chosen"])
    assert aki["step_to_target"] == pytest.approx(200 + 100 * 0.1 / 0.5, rel=1e-6)  # 4.1 -> 3.6 meets 4.0 at 1/5
    md = (tmp_path / "r" / "report.md").read_text()
    assert "Sweep:" in md and f"| aki | {lr1} | 1 |" in md and f"{lr1} (chosen)" in md


def test_a_run_kept_as_exported_scalars_reports_as_its_event_files(runs, tmp_path, capsys):
    """benchmarks/export_scalars.py keeps recipe.yaml and scalars.json in the repository; the
    report reads them as it reads the event files."""
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    chosen = [r for r in runs if r.name.startswith(("scratch", "aki"))]
    done = subprocess.run([sys.executable, str(root / "benchmarks" / "export_scalars.py"), *map(str, chosen),
                           "--out", str(tmp_path / "kept")], capture_output=True, text=True, cwd=root)
    assert done.returncode == 0, done.stderr
    kept = sorted((tmp_path / "kept").glob("*-s?"))
    assert [p.name for p in kept] == sorted(r.name for r in chosen) and not any(kept[0].glob("tensorboard"))
    for dirs, out in ((chosen, "a"), (kept, "b")):
        assert run_cli(capsys, *dirs, "--out", tmp_path / out)[0] == 0
    a, b = (json.loads((tmp_path / x / "report.json").read_text()) for x in "ab")
    assert a["methods"] == b["methods"] and a["target"] == b["target"]


def test_different_step_budgets_are_warned_about(tmp_path, capsys):
    runs = [write_run(tmp_path, "scratch", 0, [8.0, 6.0, 5.0, 4.0]),
            write_run(tmp_path, "aki", 0, [5.0, 4.5, 4.0, 3.5])]
    recipe = yaml.safe_load((runs[1] / "recipe.yaml").read_text())
    (runs[1] / "recipe.yaml").write_text(yaml.safe_dump({**recipe, "train": {"steps": 400}}))
    code, _, err = run_cli(capsys, *runs, "--out", tmp_path / "r")
    assert code == 0 and err == ""  # one run says nothing of its budget: nothing to compare
    recipe = yaml.safe_load((runs[0] / "recipe.yaml").read_text())
    (runs[0] / "recipe.yaml").write_text(yaml.safe_dump({**recipe, "train": {"steps": 800}}))
    code, _, err = run_cli(capsys, *runs, "--out", tmp_path / "r")
    assert code == 0 and "different step budgets (train.steps [400, 800])" in err


def test_runs_of_different_models_or_data_are_warned_about(tmp_path, capsys):
    runs = [write_run(tmp_path, "scratch", 0, [8.0, 6.0, 5.0, 4.0]),
            write_run(tmp_path, "aki", 0, [5.0, 4.5, 4.0, 3.5])]
    for run in runs:  # the same target shape, whatever the method (aki differs in its rate alone)
        recipe = yaml.safe_load((run / "recipe.yaml").read_text())
        recipe |= {"model": {"layers": 4, "hidden": 128}, "optim": {"lr": 1e-3 if run == runs[0] else 2e-3}}
        (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    code, _, err = run_cli(capsys, *runs, "--out", tmp_path / "r")
    assert code == 0 and err == ""
    recipe = yaml.safe_load((runs[1] / "recipe.yaml").read_text())
    (runs[1] / "recipe.yaml").write_text(yaml.safe_dump({**recipe, "model": {"layers": 4, "hidden": 96}}))
    code, _, err = run_cli(capsys, *runs, "--out", tmp_path / "r")
    assert code == 0 and "train different models, data or batches (model.hidden 128 vs 96)" in err
