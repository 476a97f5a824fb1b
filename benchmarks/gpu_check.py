"""The prepared GPU check: what a user's first `b2b train` of the cluster recipes does on a GPU,
measured in one JSON file.

    python benchmarks/gpu_check.py [--cpu] [--out runs/gpu_check/gpu_check.json]

On a GPU (bf16, every GPU of the machine):
- `b2b train` of recipes/bert-large.yaml (seq 512) and recipes/gpt-base.yaml (seq 1024) at the
  largest micro batch that fits: a first run at a small micro batch measures the peak memory, the
  second runs at the micro batch that memory predicts (largest_micro), backing off if it does not
  fit. Each reports tokens/s, achieved TFLOP/s and MFU (the trainer's perf/* scalars, medians over
  the steps after the warm-up) and the peak GPU memory.
- exact resume in bf16: GPT_BASE stopped half-way and resumed, its losses against the first
  (uninterrupted) run's;
- `b2b grow` of a BERT_BASE into BERT_LARGE (AKI), timed;
- megatron-core's GPTModel at TP 1 (NCCL) on GPT_BASE.
The corpus is the offline one (the machine may reach no hub) and BERT's vocabulary a WordPiece of
bert-base-uncased's size trained on it. `--cpu` runs the same steps with the tiny CPU recipes in
fp32 on 2 processes (tests/test_gpu_check.py), so that the script cannot rot; there is no memory
to fill, so the micro batch stays the first one.

benchmarks/gpu_check.sh runs this on a bare GPU machine, installing carried wheels first.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from launchers.events import read_scalars  # noqa: E402

MEMORY_FILL = 0.85  # of the GPU's memory, the most a predicted micro batch may use
MEGATRON = ("parallel.megatron=true", "zero.stage=1")  # megatron-core trains with ZeRO 0-1
MFU_GOALS = {"bert-large": 0.40, "gpt-base": 0.45}  # the targets, reported beside the figures


@dataclass
class Case:
    name: str
    recipe: str
    sets: list[str]
    micro: int  # the first micro batch tried


@dataclass
class Mode:
    cases: list[Case]
    sets: list[str]  # for every run
    steps: int
    warmup: int  # steps left out of the medians (compilation, allocator warm-up)
    grow: tuple[str, str, str]  # the grown source's shape, its tokenizer kind and size, the target
    procs: int | None = None  # None: every GPU
    notes: list[str] = field(default_factory=list)


GPU = Mode(
    cases=[Case("bert-large", "recipes/bert-large.yaml", ["data.seq_len=512", "data.tokenizer=wordpiece",
                                                          "data.vocab_size=30522"], 8),
           Case("gpt-base", "recipes/gpt-base.yaml", [], 8)],
    sets=["train.precision=bf16"], steps=20, warmup=5,
    grow=("layers=12,hidden=768,heads=12,ffn=3072", "30522", "bert-large"))
CPU = Mode(
    cases=[Case("bert-large", "recipes/bert-tiny-cpu.yaml", ["data.max_documents=400", "data.vocab_size=512"], 4),
           Case("gpt-base", "recipes/gpt-tiny-cpu.yaml", ["data.max_documents=400", "data.vocab_size=512"], 4)],
    sets=["train.precision=fp32"], steps=6, warmup=2, procs=2,
    grow=("layers=2,hidden=64,heads=2,ffn=256", "512", "layers=4,hidden=128,heads=4,ffn=512"),
    notes=["cpu mode: the tiny CPU recipes stand in for bert-large and gpt-base, in fp32"])


def largest_micro(micro: int, peak_gib: float, static_gib: float, capacity_gib: float) -> int:
    """The largest micro batch whose predicted peak stays within MEMORY_FILL of the GPU: activations
    grow linearly with the micro batch, above the static memory (weights, gradients, optimizer
    state), so a peak measured at one micro batch predicts the rest. At least `micro`."""
    per_sequence = max(peak_gib - static_gib, 1e-9) / micro
    return max(micro, math.floor((MEMORY_FILL * capacity_gib - static_gib) / per_sequence))


def b2b(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launchers.cli", *args], cwd=ROOT, capture_output=True, text=True)


class Check:
    def __init__(self, mode: Mode, out: Path, b2b=b2b):
        """b2b: runs a b2b command, as subprocess.run does (tests/test_gpu_check.py: in its process)."""
        self.mode, self.out, self.b2b = mode, out, b2b
        self.work = out.parent
        self.cache = self.work / "cache"

    def train(self, case: Case, name: str, micro: int, *sets: str, resume: str = "none") -> dict | None:
        """One `b2b train` of the case: its perf figures and losses, or None if it ran out of memory."""
        m = self.mode
        run_dir = self.work / name
        if resume == "none" and run_dir.exists():  # an earlier check's
            shutil.rmtree(run_dir)
        procs = ["--procs", str(m.procs)] if m.procs else []
        sets = [f"out_dir={run_dir}", f"data.cache_dir={self.cache}", "data.hub=null", "data.hub_config=null",
                f"batch.micro={micro}", "batch.accum=1", "batch.global_size=null", f"train.steps={m.steps}",
                "optim.warmup_steps=2", "train.eval_at_start=false", "train.eval_every=0", "train.eval_batches=1",
                "checkpoint.every=0", "logging.every=1", "logging.progress=false",
                *m.sets, *case.sets, *sets]
        done = self.b2b("train", case.recipe, *procs, "--resume", resume, *sum((["--set", s] for s in sets), []))
        output = done.stdout + done.stderr
        if done.returncode not in (0, 75):
            if "out of memory" in output.lower():
                return None
            raise SystemExit(f"gpu_check: b2b train {case.recipe} ({name}) failed with exit {done.returncode}:\n"
                             f"{output[-4000:]}")
        s = read_scalars(run_dir)
        steps = [k for k in sorted(s["train/loss"]) if k > m.warmup]

        def median(tag):
            values = [s[tag][k] for k in steps if k in s.get(tag, {})]
            return statistics.median(values) if values else None

        peak = max(s.get("perf/peak_memory_gib", {}).values(), default=None)
        recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
        return {"micro": micro, "seq_len": recipe["data"]["seq_len"], "tokens_per_s": median("perf/tokens_per_s"),
                "tflops_per_device": median("perf/tflops_per_device"),
                "mfu": median("perf/mfu"), "peak_memory_gib": peak, "loss": s["train/loss"]}

    def speed(self, case: Case) -> tuple[dict, dict]:
        """The case at the largest micro batch that fits: its report entry, and the first run (which
        also serves exact resume)."""
        first = self.train(case, f"{case.name}-m{case.micro}", case.micro)
        if first is None:
            raise SystemExit(f"gpu_check: {case.name} does not fit at micro batch {case.micro}")
        tried, best = [first], first
        capacity = gpu_memory_gib()
        if capacity is not None and first["peak_memory_gib"]:
            static = static_gib(case, self)
            micro = largest_micro(case.micro, first["peak_memory_gib"], static, capacity)
            while micro > case.micro:
                result = self.train(case, f"{case.name}-m{micro}", micro)
                tried.append(result or {"micro": micro, "peak_memory_gib": None, "out_of_memory": True})
                if result is not None:
                    best = result
                    break
                micro = max(case.micro, int(micro * 0.75))
        goal = MFU_GOALS.get(case.name)
        return {**figures(best), "mfu_goal": goal, "mfu_goal_met": None if best["mfu"] is None else best["mfu"] >= goal,
                "tried": [{k: t[k] for k in ("micro", "peak_memory_gib", "out_of_memory") if k in t} for t in tried]}, \
            first

    def resume(self, case: Case, uninterrupted: dict) -> dict:
        """Stop half-way, resume, and compare every step after the resume with the first run's."""
        half = self.mode.steps // 2
        name = f"{case.name}-resume"
        stopped = self.train(case, name, uninterrupted["micro"], f"train.stop_at={half}")
        resumed = self.train(case, name, uninterrupted["micro"], resume="auto")
        if stopped is None or resumed is None:
            raise SystemExit(f"gpu_check: the resume check of {case.name} ran out of memory")
        diffs = [abs(resumed["loss"][k] - uninterrupted["loss"][k]) for k in range(half + 1, self.mode.steps + 1)]
        return {"recipe": case.recipe, "micro": uninterrupted["micro"], "steps": self.mode.steps, "resumed_at": half,
                "max_abs_loss_diff": max(diffs), "bit_exact": max(diffs) == 0.0}

    def grow(self) -> dict:
        """A BERT of the source shape (random weights: growth's cost does not depend on them) with a
        trained WordPiece vocabulary, grown by `b2b grow` (AKI) into the target, timed."""
        shape, vocab, target = self.mode.grow
        source, out = self.work / "grow-source", self.work / "grow-target"
        tokenizer = self.work / "grow-tokenizer"
        if not tokenizer.is_dir():
            must_succeed(self.b2b("tokenizer", "--kind", "wordpiece", "--vocab-size", vocab, "--out", str(tokenizer)))
        from transformers import AutoTokenizer, BertConfig, BertForMaskedLM
        tok = AutoTokenizer.from_pretrained(tokenizer)
        dims = dict(item.split("=") for item in shape.split(","))
        model = BertForMaskedLM(BertConfig(vocab_size=len(tok), num_hidden_layers=int(dims["layers"]),
                                           hidden_size=int(dims["hidden"]), num_attention_heads=int(dims["heads"]),
                                           intermediate_size=int(dims["ffn"])))
        model.save_pretrained(source)
        tok.save_pretrained(source)
        start = time.perf_counter()
        must_succeed(self.b2b("grow", str(source), "--to", target, "--width", "aki", "--out", str(out), "--overwrite"))
        seconds = time.perf_counter() - start
        grown = json.loads((out / "config.json").read_text())
        return {"from": shape, "to": target, "width": "aki", "seconds": round(seconds, 2),
                "layers": grown["num_hidden_layers"], "hidden": grown["hidden_size"]}

    def megatron(self, case: Case, micro: int) -> dict:
        result = self.train(case, f"{case.name}-megatron", micro, *MEGATRON)
        if result is None:
            result = self.train(case, f"{case.name}-megatron-half", max(1, micro // 2), *MEGATRON)
        if result is None:
            raise SystemExit(f"gpu_check: megatron-core's {case.name} does not fit at micro batch {micro // 2}")
        return figures(result)

    def run(self) -> dict:
        import torch
        start = time.perf_counter()
        report = {"mode": "cpu" if self.mode is CPU else "gpu", "python": platform.python_version(),
                  "torch": torch.__version__, "device": device_name(), "gpu_memory_gib": gpu_memory_gib(),
                  "notes": self.mode.notes, "train": {}}
        gpt = self.mode.cases[1]
        first = {}
        for case in self.mode.cases:
            report["train"][case.name], first[case.name] = self.speed(case)
        report["resume"] = self.resume(gpt, first[gpt.name])
        report["grow"] = self.grow()
        report["megatron_tp1"] = self.megatron(gpt, report["train"][gpt.name]["micro"])
        report["seconds"] = round(time.perf_counter() - start, 1)
        return report


def figures(result: dict) -> dict:
    """A run's figures for the report: all but its per-step losses."""
    return {k: v for k, v in result.items() if k != "loss"}


def static_gib(case: Case, check: Check) -> float:
    """Weights, gradients and optimizer state of one rank, from the first run's parameter count: in
    bf16 with fp32 master weights, about 16 bytes a parameter (2 weight, 2 gradient, 4 master,
    8 Adam)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM
    final = check.work / f"{case.name}-m{case.micro}" / "final"
    config = AutoConfig.from_pretrained(final)
    auto = AutoModelForMaskedLM if config.model_type == "bert" else AutoModelForCausalLM
    with torch.device("meta"):
        params = sum(p.numel() for p in auto.from_config(config).parameters())
    return params * 16 / 2 ** 30


def device_name() -> str:
    import torch
    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.processor() or 'x86-64'})"


def gpu_memory_gib() -> float | None:
    import torch
    return torch.cuda.get_device_properties(0).total_memory / 2 ** 30 if torch.cuda.is_available() else None


def must_succeed(done: subprocess.CompletedProcess) -> None:
    if done.returncode:
        raise SystemExit(f"gpu_check: {' '.join(map(str, done.args))} failed:\n{(done.stdout + done.stderr)[-4000:]}")


def main(argv=None, b2b=b2b) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="tiny shapes in fp32 on CPU: checks the script itself")
    p.add_argument("--out", default=str(ROOT / "runs" / "gpu_check" / "gpu_check.json"))
    args = p.parse_args(argv)
    import torch
    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no GPU here; --cpu checks the script with tiny shapes")
    out = Path(args.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    report = Check(CPU if args.cpu else GPU, out, b2b).run()
    out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
