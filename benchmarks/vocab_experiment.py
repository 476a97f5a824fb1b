"""The vocabulary-transfer comparison at demo scale (docs/results.md, "Vocabulary transfer").

    python benchmarks/vocab_experiment.py [--seeds 0,1,2] [--out runs/vocab] [--max-documents N]

Two directions, each the same 2-layer H64 model (recipes/demo-*-source.yaml shape):
  bert: BERT pretrained with the project's WordPiece vocabulary, given a byte-level BPE
        (GPT-2-style) vocabulary plus BERT's role tokens ([CLS] [SEP] [PAD] [MASK]);
  gpt:  GPT-2 pretrained with the project's byte-level BPE vocabulary, given a WordPiece
        (BERT-style) vocabulary whose [SEP] ends documents.
Methods, all trained with recipes/vocab-{bert,gpt}.yaml (same data, steps and FLOPs):
  vipi    the source moved onto the new vocabulary by `b2b vocab transfer --method vipi`
  random  the same source, every vocabulary row fresh (`--method random`)
  scratch the model from scratch with the new vocabulary
--max-documents N: the data-limited variant: the targets train on the first N documents of the
corpus (10% held out for validation) for the same 300 steps, so they repeat their data several
times (the sources and start models are the full-data ones); runs go to OUT/<dir>/docsN/.
It prints every command it runs (so the results can be reproduced one command at a time),
skips steps whose output exists, then writes OUT/<dir>/report (b2b report) and
OUT/<dir>/init.json (validation loss at initialisation, same batches as training's).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("vipi", "random", "scratch")
SOURCE_STEPS = 400  # the source's pretraining with its own vocabulary (the targets train 300 steps)
# direction -> (source recipe, target recipe, source tokenizer kind, target tokenizer kind)
DIRECTIONS = {"bert": ("recipes/demo-bert-source.yaml", "recipes/vocab-bert.yaml", "wordpiece", "bpe"),
              "gpt": ("recipes/demo-gpt-source.yaml", "recipes/vocab-gpt.yaml", "bpe", "wordpiece")}


def b2b(*args: str) -> None:
    print("$ b2b " + " ".join(args), flush=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", RAYON_NUM_THREADS="1")  # one thread: a reproducible vocabulary
    subprocess.run([sys.executable, "-m", "launchers.cli", *args], cwd=ROOT, env=env, check=True)


def tokenizers(out: Path) -> None:
    """The project's two tokenizers, and each with the role tokens the other architecture needs."""
    for kind in ("wordpiece", "bpe"):
        if not (out / kind).is_dir():
            b2b("tokenizer", "--kind", kind, "--vocab-size", "2048", "--out", str(out / kind))
    from transformers import AutoTokenizer
    if not (out / "bpe-bert").is_dir():
        tok = AutoTokenizer.from_pretrained(str(out / "bpe"))
        tok.add_special_tokens({"cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]",
                                "mask_token": "[MASK]"})
        tok.save_pretrained(str(out / "bpe-bert"))
    if not (out / "wordpiece-gpt").is_dir():
        tok = AutoTokenizer.from_pretrained(str(out / "wordpiece"))
        tok.add_special_tokens({"eos_token": "[SEP]", "bos_token": "[CLS]"})
        tok.save_pretrained(str(out / "wordpiece-gpt"))


def target_tokenizer(out: Path, direction: str) -> Path:
    return out / ("bpe-bert" if direction == "bert" else "wordpiece-gpt")


def runs_dir(out: Path, direction: str, documents: int | None) -> Path:
    return out / direction / (f"docs{documents}" if documents else "")


def run_sets(out: Path, direction: str, method: str, seed: int, documents: int | None = None) -> list[str]:
    sets = {"name": f"vocab-{direction}-{method}-s{seed}", "method": method, "seed": seed,
            "out_dir": str(runs_dir(out, direction, documents) / f"{method}-s{seed}"),
            "data.tokenizer": str(target_tokenizer(out, direction))}
    if documents:
        sets.update({"data.max_documents": documents, "data.val_fraction": 0.1})
    if method != "scratch":
        sets["model.init_from"] = str(out / direction / f"start-{method}")
    return [x for k, v in sets.items() for x in ("--set", f"{k}={v}")]


def init_loss(recipe_path: str, sets: list[str]) -> float:
    """Validation loss of a run's starting model on the batches the trainer evaluates."""
    import torch

    from launchers import config
    from launchers.batches import Batches
    from launchers.data import prepare
    from launchers.model import build_model
    recipe = config.load(recipe_path, sets[1::2])
    batches = Batches(prepare(recipe), recipe, 0, 1)
    model = build_model(recipe, batches.tokenizer).eval()
    with torch.no_grad():
        losses = [model(**b).loss.item() for b in batches.val_batches(recipe.train.eval_batches)]
    return sum(losses) / len(losses)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", default="runs/vocab")
    p.add_argument("--directions", default="bert,gpt")
    p.add_argument("--report-only", action="store_true", help="train nothing: report the finished runs")
    p.add_argument("--max-documents", type=int, help="the data-limited variant: train the targets on N documents")
    args = p.parse_args()
    out = (ROOT / args.out).resolve()
    seeds = [int(s) for s in args.seeds.split(",")]
    directions = args.directions.split(",")
    out.mkdir(parents=True, exist_ok=True)
    tokenizers(out)
    for d in [] if args.report_only else directions:
        source_recipe, _, source_kind, _ = DIRECTIONS[d]
        source = out / d / "source"
        if not (source / "final").is_dir():
            b2b("train", source_recipe, "--set", f"out_dir={source}", "--set", "method=source",
                "--set", f"data.tokenizer={out / source_kind}", "--set", f"train.steps={SOURCE_STEPS}")
        for method in ("vipi", "random"):
            start = out / d / f"start-{method}"
            if not start.is_dir():
                b2b("vocab", "transfer", str(source / "final"), "--to-tokenizer", str(target_tokenizer(out, d)),
                    "--method", method, "--out", str(start))
    from launchers.report import run_state
    # seed by seed, so that a cut-short experiment has every method of the first seeds
    for seed in [] if args.report_only else seeds:
        for d in directions:
            for method in METHODS:
                if run_state(runs_dir(out, d, args.max_documents) / f"{method}-s{seed}") != "finished":
                    b2b("train", DIRECTIONS[d][1], *run_sets(out, d, method, seed, args.max_documents))
    for d in directions:
        where = runs_dir(out, d, args.max_documents)
        runs = sorted(str(p) for p in where.glob("*-s*") if run_state(p) == "finished")
        b2b("report", *runs, "--out", str(where / "report"))
        init = {Path(r).name: init_loss(DIRECTIONS[d][1], run_sets(out, d, Path(r).name.split("-s")[0],
                                                                      int(r.rsplit("-s", 1)[1]), args.max_documents))
                for r in runs}
        (where / "init.json").write_text(json.dumps(init, indent=1) + "\n")
        print(f"{d}: validation loss at initialisation {json.dumps(init)}", flush=True)


if __name__ == "__main__":
    main()
