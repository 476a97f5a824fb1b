"""A new user's first hour: the README's commands as written (with fewer steps where the README's
would be slow), run from a fresh working directory, and what a user naturally types next."""

import re
import shlex
import sys
from pathlib import Path

import pytest
import torch

from growth.adapters.verify import differences
from launchers.cli import main

ROOT = Path(__file__).resolve().parent.parent
README = re.sub(r" \[[^\]\n]*\]", "", (ROOT / "README.md").read_text())  # its commands without [optional] parts


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A fresh directory with the repository's recipes, as a clone gives them: runs/ lands here."""
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def b2b(capfd, command: str, *extra: str, documented: bool = True) -> tuple[int, str, str]:
    """Run a command line as typed (`b2b ...`), with `extra` arguments appended; a documented
    command must appear in the README exactly so."""
    if documented:
        assert command in README, f"not in README.md: {command}"
    argv = shlex.split(command)[1:] + list(extra)
    try:
        code = main(argv)
    except SystemExit as done:  # argparse: --help, --version, usage errors
        code = done.code
    out = capfd.readouterr()
    return code, out.out, out.err


def test_the_readme_as_a_new_user_types_it(workdir, capfd):
    code, out, _ = b2b(capfd, "b2b --version", documented=False)
    assert code == 0 and out.startswith("b2b ") and "0." in out
    code, out, _ = b2b(capfd, "b2b grow --help", documented=False)
    assert code == 0 and "(default: aki)" in out and "(default: stack)" in out and "(default: 0)" in out

    code, out, _ = b2b(capfd, "b2b grow minilm --to layers=6,hidden=768,heads=12,ffn=3072 --width exact "
                              "--out runs/minilm-w768")
    assert code == 0
    code, out, _ = b2b(capfd, "b2b verify minilm runs/minilm-w768")
    assert code == 0 and "growth.json says exact: OK" in out

    code, out, err = b2b(capfd, "b2b train recipes/bert-large.yaml --procs 8 --dry-run")
    assert code == 0 and "# DeepSpeed config for 8 process(es)" in out, err

    # init_from alone: the model brings its shape, architecture and tokenizer (the README's
    # example, 2 steps instead of the recipe's 100)
    code, _, err = b2b(capfd, "b2b grow minilm --to layers=8 --width fpi --out runs/minilm-8l")
    assert code == 0, err
    code, out, err = b2b(capfd, "b2b train recipes/bert-tiny-cpu.yaml --set model.init_from=runs/minilm-8l "
                                "--set out_dir=runs/minilm-8l-train",
                         "--set", "train.steps=2", "--set", "optim.warmup_steps=1", "--set", "train.eval_every=2",
                         "--set", "checkpoint.every=0")
    assert code == 0, err
    assert "b2b train: finished; the model is in runs/minilm-8l-train/final" in out
    assert not (workdir / "runs/minilm-8l-train/lock").exists()  # released: the next b2b train may start
    recipe = (workdir / "runs/minilm-8l-train/recipe.yaml").read_text()
    assert "layers: 8" in recipe and "hidden: 384" in recipe
    lines = [x for x in out.splitlines() if x.startswith("step ") and not x.startswith("step 0:")]
    assert lines and all("loss=" in x and "lr=" in x and "tokens=" not in x for x in lines), out
    assert "val_loss=" in lines[-1]
    quiet = out + err  # DeepSpeed's routine lines stay out of a user's way unless --verbose
    for noise in ("[INFO]", "Unable to find hostfile", "CUDA_VISIBLE_DEVICES", "built successfully", "UserWarning"):
        assert noise not in quiet, noise

    code, out, err = b2b(capfd, "b2b tokenizer --kind bpe --vocab-size 2048 --out runs/tok-bpe")
    assert code == 0, err
    code, out, err = b2b(capfd, "b2b vocab transfer minilm --to-tokenizer runs/tok-bpe --out runs/minilm-bpe")
    assert code == 0, err
    for argv in ("b2b verify minilm runs/minilm-bpe", "b2b verify runs/minilm-bpe minilm"):  # either order
        code, out, err = b2b(capfd, argv, documented=False)
        assert code == 2 and "different vocabularies" in err and len(err.strip().splitlines()) == 1, err

    code, out, err = b2b(capfd, "b2b run recipes/sets/demo-bert.yaml", "--dry-run")
    assert code == 0 and "bert2bert-s0: b2b train" in out, err


def test_the_wrong_kind_of_file_names_the_right_command(workdir, capfd):
    code, _, err = b2b(capfd, "b2b train recipes/sets/demo-bert.yaml", documented=False)
    assert code == 2 and "a recipe set" in err and "b2b run recipes/sets/demo-bert.yaml" in err
    code, _, err = b2b(capfd, "b2b run recipes/bert-tiny-cpu.yaml", documented=False)
    assert code == 2 and "a training recipe" in err and "b2b train recipes/bert-tiny-cpu.yaml" in err
    code, out, _ = b2b(capfd, "b2b run --help", documented=False)
    example = out.split("(e.g. ")[1].split(")")[0]
    assert (ROOT / example).is_file(), example


def test_a_model_where_none_is_says_what_to_give(workdir, capfd, tmp_path):
    code, _, err = b2b(capfd, "b2b grow HuggingFaceTB/SmolLM2-135M --to layers=8 --out runs/x", documented=False)
    assert code == 2 and "hub id" in err and "HF cache" in err and len(err.strip().splitlines()) == 1
    run = tmp_path / "runs" / "a-run"
    run.mkdir(parents=True)
    (run / "status.json").write_text('{"state": "finished", "step": 2}')
    code, _, err = b2b(capfd, f"b2b grow {run} --to layers=8 --out runs/y", documented=False)
    assert code == 2 and f"{run / 'final'}" in err and f"{run / 'checkpoints'}" in err
    assert not (tmp_path / "runs" / "x").exists() and not (tmp_path / "runs" / "y").exists()


def test_submit_dry_run_without_a_controller_renders_the_real_job(workdir, capfd, monkeypatch):
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))  # no sinfo, no sbatch
    code, out, err = b2b(capfd, "b2b submit recipes/bert-large.yaml --nodes 4 --gpus-per-node 8 --partition gpu "
                                "--time 2-00:00:00 --dry-run", "--cpus-per-node", "64")
    assert code == 0, err
    for line in ("--gres=gpu:8", "--nodes=4", "--ntasks-per-node=8", "--cpus-per-task=8", "--partition=gpu"):
        assert f"#SBATCH {line}\n" in out, line
    assert "could not check the partition" in err and len(err.strip().splitlines()) == 1
    code, _, err = b2b(capfd, "b2b submit recipes/bert-large.yaml --nodes 4 --gpus-per-node 8 --partition gpu "
                              "--time 2-00:00:00", documented=False)
    assert code == 2 and "sbatch: not found" in err and len(err.strip().splitlines()) == 1


def test_verify_mean_relative_difference_never_exceeds_the_max():
    a = torch.tensor([10.0, 0.1, 0.1, 0.1])
    d = differences(a, a + torch.tensor([0.0, 1.0, 1.0, 1.0]))
    assert d["max_rel"] == pytest.approx(0.1) and d["mean_rel"] == pytest.approx(0.075)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        a = torch.randn(50, generator=gen) * torch.rand(50, generator=gen) ** 4
        d = differences(a, a + torch.randn(50, generator=gen))
        assert d["mean_rel"] <= d["max_rel"]


def test_a_failed_start_leaves_nothing_behind(workdir, capfd):
    """A new run whose workers fail before saving anything (here: a truncated weights file) takes
    its run directory with it, so that the next try starts clean."""
    from growth.adapters.files import resolve
    broken = workdir / "broken-minilm"
    broken.mkdir()
    for file in resolve("minilm").iterdir():
        if file.is_file():
            (broken / file.name).write_bytes(file.read_bytes()[:4096] if file.suffix == ".safetensors"
                                             else file.read_bytes())
    code, _, err = b2b(capfd, f"b2b train recipes/bert-tiny-cpu.yaml --set model.init_from={broken} "
                              "--set out_dir=runs/broken --set train.steps=2 --set optim.warmup_steps=1 "
                              "--set data.max_documents=200", documented=False)
    assert code not in (0, 75) and not (workdir / "runs" / "broken").exists(), err
    assert "removed runs/broken" in err


def test_docs_link_only_to_files_inside_the_repository():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "recipes" / "README.md"]
    for page in pages:
        text = page.read_text()
        assert "../shared" not in text, page  # the project's notes beside the clone are not shipped
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if target.startswith(("http://", "https://", "#")):
                continue
            path = (page.parent / target.split("#")[0]).resolve()
            assert path.is_relative_to(ROOT) and path.exists(), f"{page.name}: {target}"
