"""`b2b run` end to end on a miniature comparison: source pretraining, growth inside the runs,
scratch / AKI / bert2BERT, the report, and the report's arithmetic against the event files."""

import json
import statistics
from pathlib import Path

from launchers.events import read_scalars

import harness

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def test_a_miniature_comparison_end_to_end(tmp_path):
    common = (f"base: {RECIPES / 'bert-tiny-cpu.yaml'}\n"
              f"data: {{cache_dir: {tmp_path / 'cache'}, max_documents: 400, vocab_size: 256, seq_len: 32}}\n"
              "batch: {micro: 8}\nzero: {stage: 0}\noptim: {warmup_steps: 2}\n"
              "train: {steps: 24, eval_every: 4, eval_batches: 2}\ncheckpoint: {every: 0, keep: 1}\n"
              "logging: {every: 4, progress: false}\n")
    (tmp_path / "target.yaml").write_text(common + "model: {layers: 4, hidden: 64, heads: 4, ffn: 128}\n")
    (tmp_path / "source.yaml").write_text(common + "model: {layers: 2, hidden: 32, heads: 2, ffn: 64}\n")
    (tmp_path / "set.yaml").write_text(
        f"name: mini\nout_dir: {tmp_path / 'out'}\nsource: source.yaml\ntarget: target.yaml\nseeds: [0, 1]\n"
        "sweep_seeds: [0]\nmethods:\n  scratch: {}\n  aki: {grow: aki, sweep: {optim.lr: [1.0e-4, 1.0e-3]}}\n"
        "  bert2bert: {grow: aki, set: {stage1.steps: 8, stage1.block: 2}}\n")
    done = harness.b2b("run", tmp_path / "set.yaml", "--procs", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "out"

    def smoothed(run):
        val = read_scalars(out / run)["val/loss"]
        steps = sorted(val)
        return steps, [statistics.fmean([val[s] for s in steps[max(0, i - 2):i + 1]]) for i in range(len(steps))]

    report = json.loads((out / "report" / "report.json").read_text())
    # the sweep: both settings at seed 0, then the better one (lower final smoothed loss) at seed 1
    final = {lr: smoothed(f"aki-lr{lr}-s0")[1][-1] for lr in ("0.0001", "0.001")}
    best = min(final, key=final.get)
    assert report["methods"]["aki"]["setting"] == f"optim.lr={best}" and report["methods"]["aki"]["runs"] == 2
    expected = [f"aki-lr{lr}-s0" for lr in final] + [f"aki-lr{best}-s1"]
    assert sorted(p.name for p in out.glob("aki-*")) == sorted(expected)
    assert f"aki: best setting optim.lr={best}" in done.stdout
    assert (out / f"aki-lr{best}-s0" / "grown" / "growth.json").is_file()
    assert (out / "report" / "loss_vs_flops.png").read_bytes()[:4] == b"\x89PNG"

    assert abs(report["target"] - max(smoothed(f"scratch-s{s}")[1][-1] for s in (0, 1))) < 1e-9

    def flops_to_target(run):  # interpolated between the evaluations around the crossing
        s, c = smoothed(run)
        i = next((i for i, loss in enumerate(c) if loss <= report["target"]), None)
        if i is None:
            return None
        flops = read_scalars(out / run)["train/flops"]
        if i == 0:
            return flops[s[0]]
        t = (c[i - 1] - report["target"]) / (c[i - 1] - c[i])
        return flops[s[i - 1]] + t * (flops[s[i]] - flops[s[i - 1]])

    scratch = {seed: flops_to_target(f"scratch-s{seed}") for seed in (0, 1)}
    baseline = statistics.fmean(scratch.values())
    source_flops = json.loads((out / "source" / "final" / "training.json").read_text())["flops"]
    assert source_flops == read_scalars(out / "source")["train/flops"][24]
    for row in report["runs"]:
        run = Path(row["run_dir"]).name
        f = flops_to_target(run)
        if f is None:
            assert not row["reached"]
            continue
        assert row["reached"] and abs(row["flops_to_target"] - f) <= 1e-6 * f
        assert abs(row["saving"] - (1 - f / baseline)) < 1e-9
        assert abs(row["paired_saving"] - (1 - f / scratch[row["seed"]])) < 1e-9
        if not run.startswith("scratch"):
            assert abs(row["saving_with_source"] - (1 - (f + source_flops) / baseline)) < 1e-9
    stage = read_scalars(out / "bert2bert-s0")["train/stage"]
    assert {stage[s] for s in (4, 8)} == {1} and stage[12] == 2

    again = harness.b2b("run", tmp_path / "set.yaml", "--procs", "1")  # finished runs are not redone
    assert again.returncode == 0 and again.stdout.count("already finished") == 8, again.stdout[-2000:]
