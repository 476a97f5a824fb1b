"""Seeded fuzzing of what users hand to b2b (issue 20, item 5): recipes mutated (wrong types,
unknown and duplicate keys, out-of-range values, missing files, broken YAML), `--set` and `--to`
strings, and byte-level corruptions of the files b2b reads (an HF model's safetensors header and
config, growth.json, a ZeRO checkpoint's 'latest' and rank files). Each case runs the command a
user would (in this process, through `launchers.cli.main`) and ends one way:

    valid        exit 0 (the mutation left a usable input)
    error        exit 2 with one line on stderr, and nothing written
    traceback    any other exception: a bug
    multi-line   an error of more than one line: a bug
    wrote        an error that left an output behind: a bug

tests/test_fuzz.py runs a few hundred cases; benchmarks/faults.py the long campaign.
"""

from __future__ import annotations

import contextlib
import copy
import io
import random
import shutil
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from launchers.cli import main

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ["bert-tiny-cpu.yaml", "gpt-tiny-cpu.yaml", "llama-tiny-cpu.yaml", "demo-bert-target.yaml"]
WRONG = ["abc", "", [1, 2], {"x": 1}, None, True, False, 3.5, -1, 0, "1e-3", [], {}]
OUT_OF_RANGE = [0, -1, -7, -1e-9, 1e12, 2**62, float("nan"), float("inf"), -float("inf"), 0.5, 1.5, 1e-30]
SET_STRINGS = ["", "=", "a", "=1", "optim.lr", "optim.lr=", "optim=3", "optim.lr.x=1", "zero.stage=9", "zero=",
               "model.layers=[", "model.layers={", "train.steps=-1", "train.steps=1e3", "batch.micro=0",
               "data.seq_len=0", "model.heads=7", "optim.schedule=warp", "model.arch=t5", "nope.x=1", "x=1",
               "train.precision=fp8", "checkpoint.keep=0", "..=1", "model..layers=2", "model.growth.width=wide"]
TO_STRINGS = ["", "layers", "layers=", "layers=x", "layers=-2", "layers=0", "layers=1", "hidden=63", "hidden=0",
              "heads=3", "heads=0", "ffn=-1", "layers=4,layers=6", "depth=4", "hidden=96,heads=4", "=4",
              "layers=4,,hidden=96", "kv_heads=3", "head_dim=8", "bert-base", "gpt2-medium", "layers=2.5",
              "LAYERS=4", " layers = 4 ", "layers=4;hidden=96", "hidden=1e2", "heads=2,hidden=130"]


@dataclass
class Case:
    kind: str
    name: str
    run: Callable[[Path], int]  # in a fresh work directory: the exit code of the command it runs
    outputs: Callable[[Path], list[Path]]  # what the command would write there
    verdicts: tuple = (0,)  # exit codes of a command that ran (b2b verify: 1, a check that failed)


@dataclass
class Outcome:
    kind: str
    name: str
    ended: str  # valid | error | traceback | multi-line | wrote
    detail: str = ""


def leaves(tree: dict, prefix: tuple = ()) -> list[tuple]:
    out = []
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out += leaves(value, (*prefix, key))
        else:
            out.append((*prefix, key))
    return out


def put(tree: dict, path: tuple, value) -> None:
    node = tree
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value


def typo(rng: random.Random, word: str) -> str:
    i = rng.randrange(len(word))
    return rng.choice([word[:i] + word[i + 1:], word[:i] + word[i] * 2 + word[i + 1:], word + "s", word.upper()]) \
        or word + "_"


def recipe_text(rng: random.Random, kind: str) -> tuple[str, str]:
    """A mutated copy of a repository recipe: (its text, what was done)."""
    base = rng.choice(RECIPES)
    text = (ROOT / "recipes" / base).read_text()
    tree = yaml.safe_load(text)
    tree.pop("base", None)
    raw = copy.deepcopy(tree)
    if kind == "broken yaml":
        how = rng.choice(["truncate", "tab", "bracket", "bytes", "colon"])
        if how == "truncate":
            text = text[:rng.randrange(1, len(text))]
        elif how == "tab":
            lines = text.splitlines()
            i = rng.randrange(len(lines))
            lines[i] = "\t" + lines[i]
            text = "\n".join(lines)
        elif how == "bracket":
            text = text.replace("}", "", 1) if "}" in text else text + "\nmodel: {layers: 2\n"
        elif how == "bytes":
            data = bytearray(text.encode())
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            text = data.decode("utf-8", "replace")
        else:
            text = text.replace(":", "", 1)
        return text, f"{base}: {how}"
    if kind == "duplicate key":
        lines = [line for line in text.splitlines() if line and not line.startswith("#")]
        line = rng.choice(lines)
        return text + "\n" + line + "\n", f"{base}: {line.split(':')[0]!r} twice"
    path = rng.choice(leaves(tree))
    if kind == "wrong type":
        value = rng.choice(WRONG)
        put(tree, path, value)
    elif kind == "out of range":
        value = rng.choice(OUT_OF_RANGE)
        put(tree, path, value)
    elif kind == "unknown key":
        value = typo(rng, str(path[-1]))
        node = tree
        for key in path[:-1]:
            node = node[key]
        node[value] = node.pop(path[-1])
    elif kind == "missing file":
        path = rng.choice([("data", "files"), ("model", "init_from"), ("model", "grow_from"), ("data", "tokenizer"),
                           ("base",)])
        value = "/nonexistent/" + rng.choice(["corpus.txt", "model", "ckpt", "tok.json", "base.yaml"])
        if path == ("base",):
            tree["base"] = value
        else:
            tree.setdefault(path[0], {})[path[1]] = [value] if path[1] == "files" else value
    else:
        raise ValueError(kind)
    if tree == raw:
        value = "unchanged"
    return yaml.safe_dump(tree, sort_keys=False, allow_unicode=True), f"{base}: {'.'.join(map(str, path))} = {value!r}"


def recipe_case(rng: random.Random, kind: str) -> Case:
    text, name = recipe_text(rng, kind)

    def run(work: Path) -> int:
        (work / "recipe.yaml").write_text(text)
        return main(["train", str(work / "recipe.yaml"), "--dry-run", "--set", f"out_dir={work / 'run'}"])
    return Case(kind, name, run, lambda work: [work / "run"])


def set_case(rng: random.Random) -> Case:
    sets = rng.sample(SET_STRINGS, rng.randint(1, 3))
    recipe = ROOT / "recipes" / rng.choice(RECIPES)

    def run(work: Path) -> int:
        argv = ["train", str(recipe), "--dry-run", "--set", f"out_dir={work / 'run'}"]
        return main(argv + sum((["--set", s] for s in sets), []))
    return Case("--set", f"{recipe.name} {sets}", run, lambda work: [work / "run"])


def to_case(rng: random.Random, source: Path) -> Case:
    spec = rng.choice(TO_STRINGS)
    if rng.random() < 0.5:
        spec = ",".join(rng.sample(TO_STRINGS, 2))
    return Case("--to", repr(spec), lambda work: main(["grow", str(source), "--to", spec, "--out", str(work / "out")]),
                lambda work: [work / "out"])


def corrupt_bytes(rng: random.Random, path: Path, head: int | None = None) -> str:
    """Flip, zero, truncate or drop bytes of `path` (within its first `head` bytes if given)."""
    data = bytearray(path.read_bytes())
    span = min(len(data), head or len(data))
    how = rng.choice(["flip", "zero", "truncate", "empty", "garbage"])
    if how == "flip":
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(span)] ^= 1 << rng.randrange(8)
    elif how == "zero":
        i = rng.randrange(span)
        n = min(rng.randint(1, 64), len(data) - i)
        data[i:i + n] = bytes(n)
    elif how == "truncate":
        data = data[:rng.randrange(len(data))]
    elif how == "empty":
        data = bytearray()
    else:
        i = rng.randrange(span)
        data[i:i + 16] = bytes(rng.randrange(256) for _ in range(16))
    path.write_bytes(bytes(data))
    return how


def safetensors_header(path: Path) -> int:
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


def file_case(rng: random.Random, kind: str, source: Path, command: Callable[[Path, Path], list[str]], file: str,
              head: Callable[[Path], int | None] = lambda p: None, verdicts: tuple = (0,)) -> Case:
    """Corrupt `file` (a path inside `source`) in a copy of `source`, then run `command(copy,
    work)`; the command's output is work/out. `head`: the span of the file to corrupt."""
    seed = rng.randrange(2**32)

    def run(work: Path) -> int:
        copy_dir = work / "src"
        shutil.copytree(source, copy_dir)
        target = copy_dir / file
        local = random.Random(seed)
        corrupt_bytes(local, target, head(target))
        return main(command(copy_dir, work))
    return Case(kind, f"{source.name}/{file} seed {seed}", run, lambda work: [work / "out"], verdicts)


def run_case(case: Case, work: Path) -> Outcome:
    """Run one case in the empty directory `work` and say how it ended."""
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = case.run(work)
    except SystemExit as exit_:  # argparse's usage errors
        code = exit_.code if isinstance(exit_.code, int) else 2
    except BaseException:
        return Outcome(case.kind, case.name, "traceback", traceback.format_exc(limit=-3))
    lines = [line for line in err.getvalue().splitlines() if line.strip() and not line.startswith("b2b: warning")]
    if code in case.verdicts:
        return Outcome(case.kind, case.name, "valid")
    left = [str(p) for p in case.outputs(work) if p.exists()]
    if code == 2 and left:
        return Outcome(case.kind, case.name, "wrote", ", ".join(left))
    errors = [line for line in lines if "error" in line]
    if code != 2 or len(errors) != 1 or len(lines) > 2:
        return Outcome(case.kind, case.name, "multi-line" if code == 2 else f"exit {code}", err.getvalue()[-2000:])
    return Outcome(case.kind, case.name, "error", errors[0])


RECIPE_KINDS = ("wrong type", "out of range", "unknown key", "duplicate key", "missing file", "broken yaml")


def recipe_cases(seed: int, n: int) -> list[Case]:
    rng = random.Random(seed)
    cases = []
    for i in range(n):
        kind = (*RECIPE_KINDS, "--set")[i % (len(RECIPE_KINDS) + 1)]
        cases.append(set_case(rng) if kind == "--set" else recipe_case(rng, kind))
    return cases
