"""`b2b train` end to end: two processes on CPU (gloo), ZeRO-2 and ZeRO-3, a tiny BERT and a tiny
GPT-2: the loss falls, TensorBoard scalars are read back, sharded checkpoints are written and
pruned, a stopped run resumes exactly, and a grown HF checkpoint initialises the model under
ZeRO-3's partitioning (workers started by tests/harness.py); Ctrl-C to `b2b train`, as a user types it,
stops a run with a checkpoint."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

from launchers import config
from launchers.batches import Batches
from launchers.checkpoint import EXIT_STOPPED
from launchers.data import cache_path
from launchers.events import read_scalars
from launchers.model import train_flops_per_token

import harness

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
TINY = {"bert": RECIPES / "bert-tiny-cpu.yaml", "gpt2": RECIPES / "gpt-tiny-cpu.yaml",
        "llama": RECIPES / "llama-tiny-cpu.yaml", "qwen2": RECIPES / "llama-tiny-cpu.yaml"}  # + model.arch=qwen2


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def train_cmd(recipe, out_dir, cache, *sets, resume=None):
    sets = [f"out_dir={out_dir}", f"data.cache_dir={cache}", "data.max_documents=800", "data.vocab_size=512",
            "logging.progress=false", *sets]
    cmd = [sys.executable, "-m", "launchers.cli", "train", str(recipe), "--procs", "2"]
    cmd += sum((["--set", s] for s in sets), []) + (["--resume", resume] if resume else [])
    return cmd


def b2b_train(recipe, out_dir, cache, *sets, resume="none"):
    """`b2b train --procs 2` through the test harness (its workers started directly)."""
    return harness.train(recipe, out_dir, [f"data.cache_dir={cache}", "data.max_documents=800", "data.vocab_size=512",
                                           "logging.progress=false", *sets], resume=resume)


# each architecture, each way ZeRO shards (Qwen2: the Llama recipe with q/k/v biases)
@pytest.mark.parametrize("arch,stage", [("bert", 2), ("bert", 3), ("gpt2", 2), ("gpt2", 3), ("llama", 2),
                                        ("qwen2", 3)])
def test_trains_checkpoints_and_resumes_exactly(arch, stage, tmp_path, cache):
    sets = [f"zero.stage={stage}", "train.steps=12", "train.eval_every=6", "optim.warmup_steps=2",
            "checkpoint.every=4", "checkpoint.keep=2", f"model.arch={arch}"]
    full, part = tmp_path / "full", tmp_path / "part"
    done = b2b_train(TINY[arch], full, cache, *sets)
    assert done.returncode == 0, done.stderr[-3000:]

    stopped = b2b_train(TINY[arch], part, cache, *sets, "train.stop_at=6")
    assert stopped.returncode == EXIT_STOPPED, stopped.stderr[-3000:]
    assert (part / "checkpoints" / "latest").read_text() == "step00000006"
    # a save that died half-way (no 'latest' pointing at it) must never be resumed from
    partial = part / "checkpoints" / "step00000009"
    partial.mkdir()
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"truncated")
    resumed = b2b_train(TINY[arch], part, cache, *sets, resume="auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "step00000006 at step 6" in resumed.stdout
    assert not partial.exists()  # removed, with a warning, before the workers started

    a, b = read_scalars(full), read_scalars(part)
    assert sorted(a["train/loss"]) == sorted(b["train/loss"]) == list(range(1, 13))
    for step in range(1, 13):  # fp32 on CPU: every step after the resume equals the uninterrupted run's
        assert abs(a["train/loss"][step] - b["train/loss"][step]) <= 1e-6, step
    assert abs(a["val/loss"][12] - b["val/loss"][12]) <= 1e-6
    loss = a["train/loss"]
    assert sum(loss[s] for s in (10, 11, 12)) / 3 < sum(loss[s] for s in (1, 2, 3)) / 3 - 0.1
    # step 0 validates the starting model (once: the resumed process does not log it again)
    assert sorted(a["val/loss"]) == sorted(b["val/loss"]) == [0, 6, 12]
    assert a["val/loss"][12] < a["val/loss"][6] < a["val/loss"][0] and a["train/flops"][0] == 0
    assert abs(a["val/loss"][0] - b["val/loss"][0]) <= 1e-6

    recipe = config.load(TINY[arch], [f"data.cache_dir={cache}", "data.max_documents=800", "data.vocab_size=512"])
    tokens = 8 * 2 * recipe.data.seq_len
    for step in range(1, 13):
        assert a["train/tokens"][step] == step * tokens
        assert a["train/flops"][step] == pytest.approx(step * a["train/flops"][1], rel=1e-6)
        assert a["train/grad_norm"][step] > 0 and a["perf/tokens_per_s"][step] > 0
    lr = a["train/lr"]  # 2 warmup steps from 0 (step 1 at 0, as HF's schedules), then decay from the peak
    assert lr[1] == 0.0 and lr[2] == pytest.approx(5e-4, rel=1e-6)  # TensorBoard stores float32
    assert max(lr.values()) == lr[3] <= 1e-3 * (1 + 1e-6)
    assert lr[12] < lr[6] < lr[3]

    for run in (full, part):  # saves at 4, 8 and 12 (and 6 when stopped), keep 2; the partial save pruned
        ckpts = run / "checkpoints"
        assert (ckpts / "latest").read_text() == "step00000012"
        assert sorted(p.name for p in ckpts.glob("step*")) == ["step00000008", "step00000012"]
        assert (ckpts / "step00000012" / "recipe.yaml").is_file()
        assert json.loads((run / "status.json").read_text())["state"] == "finished"
    shards = sorted(p.name for p in (full / "checkpoints" / "step00000012").glob("*optim_states.pt"))
    assert len(shards) == 2  # one optimizer shard per data-parallel rank
    auto = AutoModelForMaskedLM if arch == "bert" else AutoModelForCausalLM
    final = auto.from_pretrained(full / "final").config
    assert final.num_hidden_layers == 2 and final.model_type == arch
    if arch in ("llama", "qwen2"):  # grouped-query attention, tied, and the analytic FLOPs of SwiGLU and GQA
        assert (final.num_attention_heads, final.num_key_value_heads, final.tie_word_embeddings) == (4, 2, True)
        flops = train_flops_per_token(recipe.shape, recipe.data.seq_len, len(AutoTokenizer.from_pretrained(
            full / "final")), arch)
        assert a["train/flops"][1] == pytest.approx(tokens * flops, rel=1e-6)


def test_ctrl_c_stops_with_a_checkpoint_and_the_run_resumes(tmp_path, cache):
    """Ctrl-C as a terminal sends it, SIGINT to b2b's whole process group: one line, a checkpoint at
    the end of the step, exit 75, the signal named in status.json, no process of the run left."""
    import os
    run = tmp_path / "run"
    sets = ["train.steps=40", "train.eval_every=0", "checkpoint.every=0", "optim.warmup_steps=2"]
    proc = subprocess.Popen(train_cmd(TINY["bert"], run, cache, *sets), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)  # a terminal's job
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step 3:"):
            os.killpg(proc.pid, signal.SIGINT)
            break
    lines += proc.stdout.readlines()
    assert proc.wait(timeout=300) == EXIT_STOPPED, "".join(lines[-40:])
    text = "".join(lines)
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-3000:]
    assert text.count("b2b train: SIGINT: saving a checkpoint") == 1
    assert f"continue with: b2b train {TINY['bert']} --resume auto" in text
    assert not harness.run_processes(run)
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "stopped" and status["reason"] == "stopped by signal SIGINT"
    assert 3 <= status["step"] < 40
    assert (run / "checkpoints" / "latest").read_text() == f"step{status['step']:08d}"
    resumed = b2b_train(TINY["bert"], run, cache, *sets, resume="auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert sorted(read_scalars(run)["train/loss"]) == list(range(1, 41))


def test_ctrl_c_while_the_workers_start_is_kept_not_lost(tmp_path, cache):
    """Ctrl-C in the seconds the workers spend importing and building their engines: caught from
    their first line, so the run stops at the end of step 1 with a checkpoint (found when a signal
    to a background `b2b run` reached workers that had inherited SIGINT ignored and trained on)."""
    import os
    import time
    run = tmp_path / "run"
    sets = ["train.steps=40", "train.eval_every=0", "checkpoint.every=0", "optim.warmup_steps=2"]
    proc = subprocess.Popen(train_cmd(TINY["bert"], run, cache, *sets), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    while not any("launchers.train" in " ".join(p.info["cmdline"]) for p in harness.run_processes(run)):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == EXIT_STOPPED and "Traceback" not in out, out[-3000:]
    status = json.loads((run / "status.json").read_text())
    assert status["reason"] == "stopped by signal SIGINT" and status["step"] == 1


def test_resume_errors(tmp_path, cache):
    run = tmp_path / "run"
    first = b2b_train(TINY["gpt2"], run, cache, "train.steps=2", "optim.warmup_steps=2")
    assert first.returncode == 0, first.stderr[-3000:]
    again = b2b_train(TINY["gpt2"], run, cache, "train.steps=2", "optim.warmup_steps=2")
    assert again.returncode == 2 and "already holds checkpoints: continue it with --resume auto" in again.stderr
    done = b2b_train(TINY["gpt2"], run, cache, "train.steps=2", "optim.warmup_steps=2", resume="auto")
    assert done.returncode == 0 and "already finished at step 2" in done.stdout and "step 1:" not in done.stdout
    # a larger budget continues the run, and its first resumed step runs on the new schedule: cosine from
    # step 2 to 4, so step 3 is at iteration 2, half-way down to 10% (the old schedule had ended at 10%)
    longer = b2b_train(TINY["gpt2"], run, cache, "train.steps=4", "optim.warmup_steps=2", resume="auto")
    assert longer.returncode == 0, longer.stderr[-3000:]
    lr = read_scalars(run)["train/lr"]
    assert lr[3] == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5), rel=1e-6)  # without the fix: 1e-4, the old end
    assert lr[2] == pytest.approx(1e-3 * 0.5, rel=1e-6)  # step 2 of the first run: warmup iteration 1 of 2
    missing = b2b_train(TINY["gpt2"], run, cache, "train.steps=2", "optim.warmup_steps=2", resume="step00000099")
    assert missing.returncode == 2 and "--resume step00000099: no such checkpoint" in missing.stderr
    # a checkpoint past the recipe's end: refused at once, not "stopped before the end" and requeued forever
    fewer = b2b_train(TINY["gpt2"], run, cache, "train.steps=1", "optim.warmup_steps=1", "optim.schedule=linear",
                      resume="auto")
    assert fewer.returncode == 2 and "train.steps: 1, but" in fewer.stderr and "at step 4" in fewer.stderr
    assert len(fewer.stderr.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def grown_minilm(tmp_path_factory):
    out = tmp_path_factory.mktemp("grown") / "minilm-8l"
    done = subprocess.run([sys.executable, "-m", "launchers.cli", "grow", "minilm", "--to", "layers=8",
                           "--width", "fpi", "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return out


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_init_from_a_grown_checkpoint(stage, grown_minilm, tmp_path, cache):
    """The first step's loss is the grown model's own loss on that step's batches: the weights
    arrive intact at every ZeRO stage (ZeRO-3 partitions the module; 0-2 keep it whole)."""
    run = tmp_path / "run"
    sets = [f"model.init_from={grown_minilm}", "model.dropout=0.0", "data.seq_len=32",
            "data.max_documents=300", "batch.micro=2", f"zero.stage={stage}", "train.steps=1",
            "optim.warmup_steps=1", "train.eval_batches=1"]
    done = b2b_train(TINY["bert"], run, cache, *sets)
    assert done.returncode == 0, done.stderr[-3000:]
    logged = read_scalars(run)["train/loss"][1]

    recipe = config.load(run / "recipe.yaml")
    assert recipe.model.layers == 8 and recipe.model.hidden == 384
    torch.manual_seed(recipe.seed)  # the MLM head MiniLM lacks is initialised as the trainer did
    model = AutoModelForMaskedLM.from_pretrained(grown_minilm).eval()
    with torch.no_grad():
        losses = [model(**Batches(cache_path(recipe), recipe, rank, 2).train_batch(1, 0)).loss for rank in (0, 1)]
    assert abs(logged - sum(losses).item() / 2) < 1e-5


def test_speed_options_train_the_same_model(tmp_path, cache):
    """Activation checkpointing (non-reentrant, random states kept: the same dropout), torch's fused
    AdamW and eager attention change how a step is computed, not what it computes."""
    sets = ["zero.stage=2", "train.steps=8", "train.eval_every=4", "optim.warmup_steps=2"]
    plain = b2b_train(TINY["bert"], tmp_path / "plain", cache, *sets)
    fast = b2b_train(TINY["bert"], tmp_path / "fast", cache, *sets, "perf.activation_checkpointing=true",
                     "perf.optimizer=fused", "perf.attention=eager")
    assert plain.returncode == fast.returncode == 0, plain.stderr[-2000:] + fast.stderr[-2000:]
    a, b = read_scalars(tmp_path / "plain"), read_scalars(tmp_path / "fast")
    assert sorted(b["train/loss"]) == list(range(1, 9))
    for step in range(1, 9):  # float32 summation order only
        assert abs(a["train/loss"][step] - b["train/loss"][step]) <= 1e-5, step
    assert abs(a["val/loss"][8] - b["val/loss"][8]) <= 1e-5
    ds = json.loads((tmp_path / "fast" / "deepspeed.json").read_text())
    assert ds["optimizer"]["params"]["fused"] is True


@pytest.mark.slow  # inductor compiles each rank's model on CPU: about a minute
def test_a_compiled_model_trains_as_the_eager_one_and_resumes(tmp_path, cache):
    sets = ["zero.stage=2", "train.steps=6", "train.eval_every=3", "optim.warmup_steps=2", "model.dropout=0.0",
            "checkpoint.every=3"]  # no dropout: inductor draws its random numbers its own way
    eager = b2b_train(TINY["gpt2"], tmp_path / "eager", cache, *sets)
    stopped = b2b_train(TINY["gpt2"], tmp_path / "compiled", cache, *sets, "perf.compile=true", "train.stop_at=3")
    resumed = b2b_train(TINY["gpt2"], tmp_path / "compiled", cache, *sets, "perf.compile=true", resume="auto")
    assert eager.returncode == resumed.returncode == 0 and stopped.returncode == EXIT_STOPPED, resumed.stderr[-3000:]
    a, b = read_scalars(tmp_path / "eager"), read_scalars(tmp_path / "compiled")
    for step in range(1, 7):
        assert abs(a["train/loss"][step] - b["train/loss"][step]) <= 1e-4, step


def test_the_rendezvous_port_is_held_from_before_the_workers_start_until_they_end(tmp_path):
    """b2b train hosts the workers' rendezvous store (workers.rendezvous_store), as torchrun's agent
    does: its port cannot be taken by another process between being chosen and rank 0's start (a
    free-port probe's race: EADDRINUSE, seen in CI), nor while the workers run."""
    import socket

    from launchers.workers import rendezvous_store, world_env
    store = rendezvous_store()
    port = int(world_env(2, store)["MASTER_PORT"])
    with socket.socket() as other, pytest.raises(OSError, match="in use"):
        other.bind(("127.0.0.1", port))
    del store
    with socket.socket() as other:  # given back once no worker holds it
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        other.bind(("127.0.0.1", port))


def test_a_run_on_a_mixture_resumes_exactly(tmp_path, cache):
    """data.sources through b2b train: stopped at step 4 and resumed, every loss equals an
    uninterrupted run's (the mixture's draws are a function of the seed and the sample)."""
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("".join(f"alpha apple avocado almond {i}\n" for i in range(1500)))
    b.write_text("".join(f"beta banana berry blueberry {i}\n" for i in range(500)))
    sets = [f"data.sources=[{{files: [{a}], weight: 2}}, {{files: [{b}], weight: 1}}]", "data.max_documents=null",
            "train.steps=8", "train.eval_every=4", "optim.warmup_steps=2", "checkpoint.every=4"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert b2b_train(TINY["gpt2"], full, cache, *sets).returncode == 0
    assert b2b_train(TINY["gpt2"], part, cache, *sets, "train.stop_at=4").returncode == EXIT_STOPPED
    resumed = b2b_train(TINY["gpt2"], part, cache, *sets, resume="auto")
    assert resumed.returncode == 0 and "step00000004 at step 4" in resumed.stdout, resumed.stderr[-3000:]
    x, y = read_scalars(full)["train/loss"], read_scalars(part)["train/loss"]
    assert sorted(x) == sorted(y) == list(range(1, 9))
    assert all(abs(x[s] - y[s]) <= 1e-6 for s in x)
