"""Fuzzed input (issue 20, item 5; the cases are tests/fuzz.py's): every mutated recipe, `--set`
and `--to` string and corrupted model file ends in a valid command or one error line with exit 2,
never a traceback, and an error writes nothing. The ZeRO checkpoint cases are in
tests/test_zero_growth.py, beside the checkpoints they corrupt."""

import collections
import random

import pytest

from growth import Shape
from launchers.cli import main

import fuzz
from conftest import make_model

RECIPE_CASES = 280  # 40 of each recipe mutation and of --set strings, seed 0


def check(cases, tmp_path) -> collections.Counter:
    ended, bad = collections.Counter(), []
    for i, case in enumerate(cases):
        work = tmp_path / f"case{i}"
        work.mkdir()
        outcome = fuzz.run_case(case, work)
        ended[outcome.ended] += 1
        if outcome.ended not in ("valid", "error"):
            bad.append(f"{case.kind} {case.name}: {outcome.ended}\n{outcome.detail}")
    assert not bad, f"{len(bad)} of {len(cases)} cases broke the contract:\n" + "\n".join(bad[:5])
    return ended


def test_mutated_recipes_and_set_strings_end_cleanly(tmp_path):
    ended = check(fuzz.recipe_cases(seed=0, n=RECIPE_CASES), tmp_path)
    assert ended["error"] > RECIPE_CASES / 2  # most mutations are refused, and are refused cleanly


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny BERT and its growth (with growth.json), as files on disk."""
    root = tmp_path_factory.mktemp("fuzz-models")
    make_model("BertForMaskedLM", Shape(layers=2, hidden=32, heads=2, ffn=64)).save_pretrained(root / "src")
    assert main(["grow", str(root / "src"), "--to", "layers=3,hidden=64,heads=4,ffn=128", "--width", "exact",
                 "--out", str(root / "grown")]) == 0
    return root


def test_fuzzed_targets_end_cleanly(models, tmp_path):
    rng = random.Random(0)
    ended = check([fuzz.to_case(rng, models / "src") for _ in range(40)], tmp_path)
    assert ended["valid"] and ended["error"]


def test_corrupted_model_files_end_cleanly(models, tmp_path):
    rng = random.Random(0)
    grow = lambda src, work: ["grow", str(src), "--to", "layers=3,hidden=64,heads=4,ffn=128", "--out",  # noqa: E731
                              str(work / "out")]
    verify = lambda src, work: ["verify", str(models / "src"), str(src)]  # noqa: E731
    cases = [fuzz.file_case(rng, "safetensors header", models / "src", grow, "model.safetensors",
                            head=fuzz.safetensors_header) for _ in range(16)]
    cases += [fuzz.file_case(rng, "config.json", models / "src", grow, "config.json")
              for _ in range(12)]
    cases += [fuzz.file_case(rng, "growth.json", models / "grown", verify, "growth.json",
                             verdicts=(0, 1)) for _ in range(12)]
    check(cases, tmp_path)
