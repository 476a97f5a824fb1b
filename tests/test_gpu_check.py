"""benchmarks/gpu_check.sh, the prepared GPU check: its CPU mode (tiny shapes, fp32, 2 processes;
run in the test's process, the workers forked: tests/harness.py) runs every step and its JSON holds
every figure, so that the script is ready when a GPU is; the shell script hands over to it; and the
micro-batch prediction it makes from a measured peak."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

import harness

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
_spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
gpu_check = sys.modules["gpu_check"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up
_spec.loader.exec_module(gpu_check)


def test_the_gpu_check_runs_every_step_in_cpu_mode(tmp_path, monkeypatch, capsys):
    out = tmp_path / "check" / "gpu_check.json"
    monkeypatch.chdir(ROOT)  # as gpu_check.sh runs it
    assert gpu_check.main(["--cpu", "--out", str(out)], b2b=harness.b2b) == 0
    report = json.loads(out.read_text())
    assert capsys.readouterr().out.endswith(json.dumps(report, indent=1) + "\n")  # and printed
    assert report["mode"] == "cpu" and report["gpu_memory_gib"] is None
    for name in ("bert-large", "gpt-base"):
        run = report["train"][name]
        assert run["tokens_per_s"] > 0 and run["tflops_per_device"] > 0 and run["seq_len"] == 64
        assert run["mfu"] is None and run["mfu_goal_met"] is None  # no peak known on CPU
        assert [t["micro"] for t in run["tried"]] == [run["micro"]]  # no GPU memory to fill
    resume = report["resume"]  # fp32 on CPU: the resumed steps equal the uninterrupted run's
    assert resume["resumed_at"] == 3 and resume["bit_exact"] and resume["max_abs_loss_diff"] == 0.0
    assert (report["grow"]["layers"], report["grow"]["hidden"]) == (4, 128) and report["grow"]["seconds"] > 0
    assert report["megatron_tp1"]["tokens_per_s"] > 0


def test_without_a_gpu_the_gpu_mode_says_so_in_one_line():
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True)
    assert done.returncode == 1 and done.stderr.strip() == \
        "gpu_check: no GPU here; --cpu checks the script with tiny shapes"


@pytest.mark.parametrize("micro,peak,static,capacity,expected", [
    (8, 40.0, 8.0, 100.0, 19),  # 4 GiB a sequence: (85 - 8) / 4 = 19.25
    (8, 20.0, 4.0, 139.7, 57),  # 2 GiB a sequence: (0.85 x 139.7 - 4) / 2 = 57.37
    (8, 90.0, 10.0, 100.0, 8),  # already past 85%: stays
])
def test_the_largest_micro_batch_is_predicted_from_one_measured_peak(micro, peak, static, capacity, expected):
    assert gpu_check.largest_micro(micro, peak, static, capacity) == expected
