"""Recipes: every recipe parses and dry-runs; overrides are typed; bad recipes fail before any
process starts, naming the key, with nothing written."""

import itertools
import json
from pathlib import Path

import pytest
import yaml

from launchers import config, ds_config
from launchers.cli import main

RECIPES = sorted(Path(__file__).resolve().parent.parent.joinpath("recipes").glob("*.yaml"))


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def dry_run(capsys, recipe, *sets, procs=2):
    code, out, err = run(capsys, "train", recipe, "--dry-run", "--procs", procs, *sum((["--set", s] for s in sets), []))
    assert code == 0, err
    text, _, ds = out.partition("# DeepSpeed config")
    ds, _, budget = ds.partition("# FLOPs budget: ")
    assert float(budget.split()[0]) > 0
    return yaml.safe_load(text), json.loads(ds[ds.index("{"):])


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_every_recipe_dry_runs(recipe, capsys):
    resolved, ds = dry_run(capsys, recipe, procs=8)
    b = resolved["batch"]
    assert ds["train_batch_size"] == b["micro"] * b["accum"] * 8 // resolved["parallel"]["tensor"]  # data-parallel size
    assert ds["train_micro_batch_size_per_gpu"] == b["micro"]
    assert ds["zero_optimization"]["stage"] == resolved["zero"]["stage"]
    assert ds["bf16"]["enabled"] == (resolved["train"]["precision"] == "bf16")
    assert ds["optimizer"]["params"]["lr"] == resolved["optim"]["lr"]
    assert ds["scheduler"]["params"]["warmup_num_steps"] == resolved["optim"]["warmup_steps"]


def test_cluster_recipes_derive_accumulation_from_the_global_batch(capsys):
    for procs, accum in ((8, 1), (2, 4), (1, 8)):
        resolved, ds = dry_run(capsys, RECIPES[0].parent / "bert-large.yaml", procs=procs)
        assert resolved["batch"]["accum"] == accum and ds["train_batch_size"] == 256


def test_overrides_are_typed_and_reach_the_deepspeed_config(capsys):
    resolved, ds = dry_run(capsys, RECIPES[0].parent / "gpt-tiny-cpu.yaml", "optim.lr=3e-4", "model.layers=3",
                           "optim.betas=[0.8, 0.9]", "zero.stage=3", "batch.accum=2")
    assert resolved["optim"]["lr"] == 3e-4 and resolved["model"]["layers"] == 3
    assert ds["optimizer"]["params"]["betas"] == [0.8, 0.9]
    assert ds["zero_optimization"]["stage"] == 3 and ds["train_batch_size"] == 8 * 2 * 2


def test_a_recipe_names_only_what_differs_from_its_base(tmp_path, capsys):
    child = tmp_path / "child.yaml"
    child.write_text(f"base: {RECIPES[0].parent / 'bert-tiny-cpu.yaml'}\nname: child\noptim: {{lr: 5.0e-4}}\n")
    resolved, _ = dry_run(capsys, child)
    assert resolved["name"] == "child" and resolved["optim"]["lr"] == 5e-4
    assert resolved["optim"]["warmup_steps"] == 10 and resolved["model"]["hidden"] == 64


BAD = {
    "unknown key": ("optim: {lrr: 1.0e-3}", [], "unknown key optim.lrr: did you mean optim.lr?"),
    "unknown section": ("optimizer: {lr: 1.0e-3}", [], "unknown key optimizer"),
    "duplicate key": ("train: {steps: 10}\ntrain: {steps: 20}", [], "duplicate key 'train'"),
    "wrong type": ("train: {steps: ten}", [], "train.steps: expected int, got 'ten'"),
    "bool for int": ("batch: {micro: true}", [], "batch.micro: expected int"),
    "negative lr": ("", ["optim.lr=-1"], "optim.lr: -1.0: must be positive"),
    "zero stage": ("", ["zero.stage=4"], "zero.stage: 4: use 0, 1, 2 or 3"),
    "warmup past the end": ("", ["optim.warmup_steps=500"], "optim.warmup_steps: 500"),
    "no warmup": ("", ["optim.warmup_steps=0"], "optim.warmup_steps: 0: must be in [1, train.steps]"),
    "sequence past positions": ("", ["data.seq_len=4096"], "data.seq_len: 4096"),
    "heads do not divide": ("", ["model.heads=3"], "heads=3 does not divide hidden=64"),
    "missing data file": ("", ["data.files=[/no/such/corpus.txt]"], "data.files: /no/such/corpus.txt: no such file"),
    "missing init_from": ("", ["model.init_from=/no/such/model"], "model.init_from: /no/such/model"),
    "shape set twice": ("", ["model.arch=null"], "model.arch: required"),
    "global batch": ("", ["batch.global_size=100", "batch.accum=1"], "batch.global_size: 100 but"),
    "indivisible global batch": ("", ["batch.accum=null", "batch.global_size=20"],
                                 "batch.global_size: 20 is not a multiple"),
    "bad override": ("", ["optim.lr"], "--set 'optim.lr': expected key=value"),
    "missing tokenizer": ("", ["data.tokenizer=/no/such/tok"], "data.tokenizer: /no/such/tok"),
    "a tokenizer the model was not trained with": ("", ["model.init_from=minilm", "data.tokenizer=wordpiece"],
                                                   "model.init_from: minilm has a vocabulary of 30522 rows, but "
                                                   "data.tokenizer wordpiece trains a new one"),
    "a shape the model does not have": ("", ["model.init_from=minilm", "model.layers=4"],
                                        "model.layers: 4 but model.init_from minilm has 6: take the model's with "
                                        "--set model.layers=null"),
    "moments without a ZeRO source": ("", ["model.grow_from=minilm", "model.layers=6", "model.hidden=768",
                                            "model.heads=12", "model.ffn=3072", "model.growth.optimizer=grow"],
                                      "model.growth.optimizer: grow carries the source's Adam moments, which only "
                                      "a ZeRO checkpoint holds"),
    "symmetry breaking of no copies": ("", ["model.grow_from=minilm", "model.layers=6", "model.hidden=768",
                                            "model.heads=12", "model.ffn=3072", "model.growth.width=direct",
                                            "model.growth.symmetry=noise"],
                                       "model.growth.symmetry: symmetry breaking applies to copied units"),
    "a placement of identity blocks that is none": ("", ["model.grow_from=minilm", "model.layers=8",
                                                          "model.growth.insert=middle"],
                                                     "--insert 'middle': use even, top or every=N"),
    "a recipe set": ("methods: {scratch: {}}", [], "a recipe set (it names methods), not a training recipe: run it "
                                                  "with b2b run"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_recipes_fail_before_anything_starts(case, tmp_path, capsys):
    text, sets, message = BAD[case]
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(f"base: {RECIPES[0].parent / 'bert-tiny-cpu.yaml'}\n{text}\n")
    out_dir = tmp_path / "run"
    argv = ["train", recipe, "--procs", 2, "--set", f"out_dir={out_dir}"] + sum((["--set", s] for s in sets), [])
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert err.startswith("b2b train: error: ") and message in err, err
    assert len(err.strip().splitlines()) == 1
    assert not out_dir.exists()


def test_a_missing_recipe_file_and_a_base_cycle(tmp_path, capsys):
    code, _, err = run(capsys, "train", tmp_path / "nope.yaml", "--dry-run")
    assert code == 2 and "nope.yaml: no such recipe file" in err
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    code, _, err = run(capsys, "train", tmp_path / "a.yaml", "--dry-run")
    assert code == 2 and "cycle" in err


def test_a_starting_model_on_the_command_line_brings_its_shape_arch_and_tokenizer(tmp_path):
    from growth.adapters.files import resolve
    recipe = config.load(RECIPES[0].parent / "bert-tiny-cpu.yaml", ["model.init_from=minilm"])
    m = recipe.model
    assert (m.arch, m.layers, m.hidden, m.heads, m.ffn) == ("bert", 6, 384, 12, 1536)
    assert recipe.data.tokenizer is None  # the model's own: tokenizer_source is its directory
    from launchers.data import tokenizer_source
    assert Path(tokenizer_source(recipe)) == resolve("minilm").resolve()
    grown = config.load(RECIPES[0].parent / "bert-tiny-cpu.yaml", ["model.grow_from=minilm", "model.layers=8",
                                                                     "model.hidden=768", "model.heads=12",
                                                                     "model.ffn=3072", "data.seq_len=32"])
    assert grown.model.layers == 8 and grown.data.tokenizer is None and grown.data.seq_len == 32
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("some text\n")
    one = config.load(RECIPES[0].parent / "bert-tiny-cpu.yaml", [f"data.files={corpus}"])
    assert one.data.files == [str(corpus)]  # a single path is a list of one


def test_procs_zero_is_refused(capsys):
    code, _, err = run(capsys, "train", RECIPES[0].parent / "bert-tiny-cpu.yaml", "--dry-run", "--procs", 0)
    assert code == 2 and "--procs 0: must be >= 1" in err


def test_reduced_precision_needs_a_gpu(tmp_path, capsys):
    out_dir = tmp_path / "run"
    code, _, err = run(capsys, "train", RECIPES[0].parent / "bert-tiny-cpu.yaml", "--set", "train.precision=bf16",
                       "--set", f"out_dir={out_dir}")
    assert code == 2 and "train.precision: bf16 needs a GPU" in err and not out_dir.exists()


def test_deepspeed_schedules():
    recipe = config.load(RECIPES[0].parent / "gpt-tiny-cpu.yaml")
    ds = ds_config.deepspeed_config(recipe, 1, cpu=True)
    assert ds["scheduler"]["type"] == "WarmupCosineLR"
    assert ds["scheduler"]["params"]["cos_min_ratio"] == 0.1
    assert ds["optimizer"]["params"]["torch_adam"] is True
    for schedule, kind in (("linear", "WarmupDecayLR"), ("constant", "WarmupLR")):
        recipe = config.load(RECIPES[0].parent / "gpt-tiny-cpu.yaml", [f"optim.schedule={schedule}"])
        assert ds_config.deepspeed_config(recipe, 1, cpu=False)["scheduler"]["type"] == kind


def test_decay_steps_end_the_decay_early_and_the_early_evaluations():
    tiny = RECIPES[0].parent / "gpt-tiny-cpu.yaml"
    for schedule in ("linear", "cosine"):
        recipe = config.load(tiny, [f"optim.schedule={schedule}", "train.steps=100", "optim.decay_steps=60"])
        assert ds_config.deepspeed_config(recipe, 1, cpu=True)["scheduler"]["params"]["total_num_steps"] == 60
    recipe = config.load(tiny, ["train.steps=100"])
    assert ds_config.deepspeed_config(recipe, 1, cpu=True)["scheduler"]["params"]["total_num_steps"] == 100
    for sets, message in ((["optim.schedule=constant", "optim.decay_steps=50"], "does not decay"),
                          (["optim.warmup_steps=10", "optim.decay_steps=10"], "greater than optim.warmup_steps")):
        with pytest.raises(config.RecipeError, match=message):
            config.load(tiny, sets)
    from launchers.train import is_eval_step
    t = config.TrainConfig(steps=100, eval_every=40, eval_early_every=10, eval_early_until=30)
    assert [s for s in range(1, 101) if is_eval_step(t, s)] == [10, 20, 30, 40, 80, 100]


SETS = sorted(RECIPES[0].parent.joinpath("sets").glob("*.yaml"))


@pytest.mark.parametrize("recipe_set", SETS, ids=[s.stem for s in SETS])
def test_every_recipe_set_dry_runs(recipe_set, capsys):
    code, out, err = run(capsys, "run", recipe_set, "--dry-run")
    assert code == 0, err
    lines = out.strip().splitlines()
    s = config.load_raw(recipe_set)
    seeds = s["seeds"]
    sweep_seeds = s.get("sweep_seeds", seeds[:1])
    expected, swept = [], False
    for name, method in s["methods"].items():
        sweep = method.get("sweep", s.get("sweep", {}))
        combos = list(itertools.product(*[[(k.rsplit(".", 1)[-1], v) for v in values] for k, values in sweep.items()]))
        labels = ["-".join(f"{k}{v}" for k, v in combo) for combo in combos]
        swept |= len(combos) > 1
        expected += [f"{name}-{label}-s{x}" if label else f"{name}-s{x}" for label in labels
                     for x in (sweep_seeds if len(combos) > 1 else seeds)]
    later = [x for x in seeds if x not in sweep_seeds] if swept else []
    assert sorted(line.split(":")[0] for line in lines[1:len(lines) - bool(later)]) == sorted(expected)
    if later:  # a line for the best settings at the other seeds
        assert lines[-1].startswith(f"then at seeds {later}")


def test_a_sweep_expands_per_method(tmp_path, capsys):
    target = RECIPES[0].parent / "demo-bert-target.yaml"
    (tmp_path / "set.yaml").write_text(
        f"target: {target}\nsource_model: /x\nseeds: [0, 1, 2]\nsweep_seeds: [0, 1]\n"
        "sweep: {optim.lr: [1.0e-3, 2.0e-3]}\n"
        "methods: {scratch: {}, fpi: {grow: fpi, sweep: {optim.lr: [3.0e-3], optim.warmup_steps: [5, 10]}},"
        " aki: {grow: aki, sweep: {}}}\n")
    code, out, err = run(capsys, "run", tmp_path / "set.yaml", "--dry-run")
    assert code == 0, err
    runs = [line.split(":")[0] for line in out.splitlines()[1:-1]]
    assert runs == ["scratch-lr0.001-s0", "scratch-lr0.002-s0", "fpi-lr0.003-warmup_steps5-s0",
                    "fpi-lr0.003-warmup_steps10-s0", "aki-s0",
                    "scratch-lr0.001-s1", "scratch-lr0.002-s1", "fpi-lr0.003-warmup_steps5-s1",
                    "fpi-lr0.003-warmup_steps10-s1", "aki-s1", "aki-s2"]
    line = next(x for x in out.splitlines() if x.startswith("fpi-lr0.003-warmup_steps10-s1:"))
    assert "--set 'optim.lr=0.003'" in line and "--set 'optim.warmup_steps=10'" in line
    assert """--set 'setting="optim.lr=0.003,optim.warmup_steps=10"'""" in line
    assert out.splitlines()[-1] == "then at seeds [2]: the best setting of scratch, fpi (b2b report's rule)"


def test_a_method_with_grown_moments_starts_from_the_source_runs_checkpoint(tmp_path, capsys):
    recipes = RECIPES[0].parent
    (tmp_path / "set.yaml").write_text(
        f"out_dir: {tmp_path / 'out'}\nsource: {recipes / 'demo-bert-narrow-zero1.yaml'}\n"
        f"target: {recipes / 'demo-bert-target.yaml'}\nmethods: {{fpi: {{grow: fpi, set: {{zero.stage: 1}}}},"
        " fpi-adam: {grow: fpi, optimizer: grow, set: {zero.stage: 1}}}\n")
    code, out, err = run(capsys, "run", tmp_path / "set.yaml", "--dry-run")
    assert code == 0, err
    fpi, adam = (next(x for x in out.splitlines() if x.startswith(f"{m}-s0:")) for m in ("fpi", "fpi-adam"))
    source = tmp_path / "out" / "source"
    assert f"--set 'model.grow_from=\"{source / 'final'}\"'" in fpi and "model.growth.optimizer" not in fpi
    assert f"--set 'model.grow_from=\"{source / 'checkpoints'}\"'" in adam
    assert "--set 'model.growth.optimizer=\"grow\"'" in adam


def test_bad_recipe_sets(tmp_path, capsys):
    target = RECIPES[0].parent / "demo-bert-target.yaml"
    cases = {
        f"target: {target}\nsource_model: /x\nmethods: {{a: {{grow: wide}}}}\n": "methods.a.grow: 'wide'",
        f"target: {target}\nmethods: {{a: {{}}}}\n": "set one of source",
        f"target: {target}\nsource_model: /x\nmethods: {{a: {{set: {{optim.lrr: 1}}}}}}\n": "unknown key optim.lrr",
        f"target: {target}\nsource_model: /x\nmethodz: {{}}\n": "unknown key methodz",
        f"target: {target}\nsource_model: /x\nmethods: {{a: {{}}}}\nsweep: {{optim.lr: []}}\n": "sweep.optim.lr",
        f"target: {target}\nsource_model: /x\nmethods: {{a: {{}}}}\nsweep: {{optim.lrr: [1]}}\n":
            "unknown key optim.lrr",
        f"target: {target}\nsource_model: /x\nmethods: {{a: {{}}}}\nsweep_seeds: [4]\n": "sweep_seeds",
        f"target: {target}\nsource_model: /x\nmethods: {{a: {{optimizer: grow}}}}\n":
            "methods.a.optimizer: 'grow': use reset, or grow with a grow method",
        f"target: {target}\nsource: {target}\nmethods: {{a: {{grow: fpi, optimizer: grow, set: {{zero.stage: 1}}}}}}\n":
            f"methods.a.optimizer: grow reads the source run's Adam moments from its ZeRO checkpoint, but {target} "
            "trains at zero.stage 0",
        f"target: {target}\nsource_model: /x\nmethods: {{a: {{grow: fpi, optimizer: grow}}}}\n":
            "methods.a.optimizer: grow starts from a DeepSpeed universal checkpoint, which loads into ZeRO stages 1-3",
    }
    for text, message in cases.items():
        path = tmp_path / "set.yaml"
        path.write_text(text)
        code, _, err = run(capsys, "run", path, "--dry-run")
        assert code == 2 and message in err, (text, err)


def test_a_set_whose_source_is_missing_is_one_line_and_leaves_no_directory(tmp_path, capsys):
    path = tmp_path / "set.yaml"
    out = tmp_path / "out"
    path.write_text(f"target: {RECIPES[0].parent / 'demo-bert-target.yaml'}\nsource_model: {tmp_path / 'nothing'}\n"
                    f"out_dir: {out}\nmethods: {{fpi: {{grow: fpi}}}}\n")
    code, _, err = run(capsys, "run", path)
    assert code == 2 and err.count("\n") == 1 and "no such model directory" in err, err
    assert not out.exists()


@pytest.mark.parametrize("kernel,cpu,params", [
    ("auto", True, {"torch_adam": True, "foreach": False}),  # torch.optim.AdamW's for-loop, as before perf
    ("auto", False, {"torch_adam": True, "fused": True}),
    ("fused", True, {"torch_adam": True, "fused": True}),
    ("foreach", False, {"torch_adam": True, "foreach": True}),
    ("forloop", False, {"torch_adam": True, "foreach": False}),
    ("deepspeed", False, {"torch_adam": False})])
def test_the_optimizer_kernel_reaches_the_deepspeed_config(kernel, cpu, params, capsys):
    assert ds_config.adam_kernel(kernel, cpu) == params
    _, ds = dry_run(capsys, RECIPES[0].parent / "bert-tiny-cpu.yaml", f"perf.optimizer={kernel}")
    optimizer = ds["optimizer"]["params"]
    assert {k: optimizer[k] for k in ("torch_adam", "fused", "foreach") if k in optimizer} == \
        ds_config.adam_kernel(kernel, cpu=True)  # the dry run describes this machine: no GPU


@pytest.mark.parametrize("sets,message", [
    (["perf.attention=flash_attention_2"], "perf.attention: flash_attention_2 is a CUDA kernel"),
    (["perf.optimizer=deepspeed"], "perf.optimizer: deepspeed is DeepSpeed's FusedAdam, a CUDA kernel"),
    (["perf.activation_checkpointing=true", "parallel.megatron=true", "zero.stage=1"],
     "perf.activation_checkpointing: megatron-core's recomputation keeps CUDA random states"),
    (["perf.attention=eager", "parallel.megatron=true", "zero.stage=1"],
     "perf.attention: eager: megatron-core's GPTModel has its own core attention"),
    (["perf.compile=true", "stage1.steps=10", "stage1.block=1"], "perf.compile: bert2BERT's stage 1 runs another"),
    (["perf.attention=flash"], "perf.attention: 'flash': use one of auto, eager, sdpa, flash_attention_2"),
    (["perf.optimizer=lion"], "perf.optimizer: 'lion': use one of auto, fused, foreach, forloop, deepspeed")])
def test_speed_options_that_cannot_apply_are_refused_in_one_line(sets, message, tmp_path, capsys):
    out_dir = tmp_path / "run"
    code, _, err = run(capsys, "train", RECIPES[0].parent / "gpt-tiny-cpu.yaml", "--set", f"out_dir={out_dir}",
                       *sum((["--set", s] for s in sets), []))
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out_dir.exists()
