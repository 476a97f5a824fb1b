"""Fine-tuning check of the vocabulary-transfer runs: a sentence-pair task built from the corpus.

    python benchmarks/vocab_finetune.py [--task sop|nsp] [--out runs/vocab] [--directions bert,gpt]
    python benchmarks/vocab_finetune.py [--task sop|nsp] --model minilm [--seeds 0,1,2]

Pairs of sentences from the docstrings of the offline corpus, 1,000 to train and 400 to test,
drawn with a fixed seed. sop (sentence order): two consecutive sentences of one docstring in
order (label 1) or swapped (label 0). nsp (next sentence): a sentence and its successor
(label 1) or a sentence of another docstring (label 0). Each finished run of
benchmarks/vocab_experiment.py (OUT/<direction>/<method>-s<seed>/final) gets a classification
head (BERT: the pooled [CLS]; GPT-2: the last token) and is fine-tuned for 2 epochs (AdamW,
lr 1e-4, batch 16, linear decay) with its own seed; accuracy and F1 (class 1) on the test
pairs, mean and standard deviation over seeds, go to OUT/<direction>/finetune-<task>.json
(runs already there are not fine-tuned again) and stdout as a Markdown table. `--model DIR` fine-tunes
one HF model directory instead ('minilm': the packaged all-MiniLM-L6-v2), which checks that the
task and the harness can be learned at all by a model that knows English.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SEQ, PIECE, TRAIN, TEST, EPOCHS, LR, BATCH = 64, 29, 1000, 400, 2, 1e-4, 16


def pairs(task: str) -> tuple[list, list]:
    """(sentence A, sentence B, label) for training and testing, fixed by seed 1234."""
    from launchers.data import python_docs
    found = []
    for k, doc in enumerate(python_docs()):
        sentences = [s for s in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())) if len(s.split()) >= 4]
        found += [(a, b, k) for a, b in zip(sentences, sentences[1:])]
    rng = random.Random(1234)
    rng.shuffle(found)
    labelled = []
    for i, (a, b, doc) in enumerate(found[:TRAIN + TEST]):
        if rng.random() < 0.5:
            labelled.append((a, b, 1))
        elif task == "sop":
            labelled.append((b, a, 0))
        else:  # a sentence of another docstring, from the pairs not drawn
            other = next(x for x in found[TRAIN + TEST + i:] if x[2] != doc)
            labelled.append((a, other[1], 0))
    return labelled[TEST:], labelled[:TEST]


def encode(tok, data: list, bert: bool) -> dict:
    """BERT: [CLS] A [SEP] B [SEP] with segment ids; GPT-2: A <eos> B <eos>. Padded on the right."""
    rows, types = [], []
    for a, b, _ in data:
        a, b = (tok(x, add_special_tokens=False)["input_ids"][:PIECE] for x in (a, b))
        if bert:
            rows.append([tok.cls_token_id] + a + [tok.sep_token_id] + b + [tok.sep_token_id])
            types.append([0] * (len(a) + 2) + [1] * (len(b) + 1))
        else:
            rows.append(a + [tok.eos_token_id] + b + [tok.eos_token_id])
            types.append([0] * len(rows[-1]))
    ids = torch.full((len(rows), SEQ), tok.pad_token_id)
    mask, segs = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, (r, t) in enumerate(zip(rows, types)):
        ids[i, :len(r)], mask[i, :len(r)], segs[i, :len(r)] = torch.tensor(r), 1, torch.tensor(t)
    out = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([x[2] for x in data])}
    return out | ({"token_type_ids": segs} if bert else {})


def finetune(model_dir: Path, seed: int, train: list, test: list) -> dict:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), num_labels=2,
                                                               pad_token_id=tok.pad_token_id)
    bert = model.config.model_type == "bert"
    tr, te = encode(tok, train, bert), encode(tok, test, bert)
    steps = EPOCHS * (len(train) // BATCH)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(EPOCHS):
        order = torch.randperm(len(train), generator=gen)
        for i in range(0, len(train) - BATCH + 1, BATCH):
            loss = model(**{k: v[order[i:i + BATCH]] for k, v in tr.items()}).loss
            loss.backward()
            opt.step(), sched.step(), opt.zero_grad()
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(**{k: v[i:i + 100] for k, v in te.items() if k != "labels"}).logits.argmax(-1)
                          for i in range(0, len(test), 100)])
    gold = te["labels"]
    tp, fp, fn = [int(((pred == p) & (gold == g)).sum()) for p, g in ((1, 1), (1, 0), (0, 1))]
    return {"accuracy": float((pred == gold).float().mean()), "f1": 2 * tp / max(1, 2 * tp + fp + fn)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=("sop", "nsp"), default="sop")
    p.add_argument("--out", default="runs/vocab")
    p.add_argument("--directions", default="bert,gpt")
    p.add_argument("--model", help="fine-tune this HF model directory (or 'minilm') instead of the runs")
    p.add_argument("--seeds", default="0,1,2", help="with --model: the fine-tuning seeds")
    args = p.parse_args()
    from launchers.data import quiet_libraries
    quiet_libraries()
    train, test = pairs(args.task)
    print(f"{args.task} pairs: {len(train)} train, {len(test)} test, "
          f"{sum(x[2] for x in test) / len(test):.1%} of the test pairs in order")
    if args.model:
        from growth.adapters.files import resolve
        got = [finetune(resolve(args.model), int(seed), train, test) for seed in args.seeds.split(",")]
        for seed, r in zip(args.seeds.split(","), got):
            print(f"{args.model} seed {seed}: {r}")
        print(f"{args.model} {args.task}: accuracy {statistics.mean(r['accuracy'] for r in got):.3f} ± "
              f"{statistics.pstdev(r['accuracy'] for r in got):.3f}, F1 {statistics.mean(r['f1'] for r in got):.3f} ± "
              f"{statistics.pstdev(r['f1'] for r in got):.3f}")
        return
    for d in args.directions.split(","):
        root = ROOT / args.out / d
        saved = root / f"finetune-{args.task}.json"
        results = json.loads(saved.read_text()) if saved.is_file() else {}  # runs already fine-tuned
        for run in sorted(root.glob("*-s*")):
            if (run / "final").is_dir() and run.name not in results:
                results[run.name] = finetune(run / "final", int(run.name.rsplit("-s", 1)[1]), train, test)
                print(run.name, results[run.name], flush=True)
                saved.write_text(json.dumps(results, indent=1) + "\n")
        print(f"\n{d} {args.task}: | method | seeds | accuracy | F1 |\n|---|---|---|---|")
        for method in ("vipi", "random", "scratch"):
            got = [v for k, v in results.items() if k.split("-s")[0] == method]
            if got:
                cell = {m: f"{statistics.mean(x[m] for x in got):.3f} ± "
                           f"{statistics.pstdev(x[m] for x in got):.3f}" for m in ("accuracy", "f1")}
                print(f"| {method} | {len(got)} | {cell['accuracy']} | {cell['f1']} |")


if __name__ == "__main__":
    main()
