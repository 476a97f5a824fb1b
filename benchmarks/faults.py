"""The fuzzing campaign of issue 20 (item 5), longer than the test suite's share: seeded mutations
of recipes and `--set` strings, `--to` strings, and byte-level corruptions of an HF model's
safetensors header and config, of a megatron-core torch_dist checkpoint's files (.metadata, the
chunk file, metadata.json, config.json; written by `b2b convert`) and of a growth manifest
(tests/fuzz.py's cases; the ZeRO checkpoint cases need DeepSpeed checkpoints and run in
tests/test_zero_growth.py). Prints how
the cases ended, by kind; exits 1 if any ended in a traceback, a multi-line error or an output
left behind. Of the corrupted files a growth accepted, it counts those whose grown tensors differ
from the intact file's growth: changes the formats cannot tell from a different model (no
checksums in safetensors or torch_dist), so no check of b2b's can refuse them.

    python benchmarks/faults.py --seed 0 --cases 1400
"""

from __future__ import annotations

import argparse
import collections
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from growth import Shape  # noqa: E402
from launchers.cli import main as b2b  # noqa: E402

import fuzz  # noqa: E402
from conftest import make_model  # noqa: E402

TARGET = "layers=3,hidden=64,heads=4,ffn=128"


def same_tensors(out: Path, intact: Path) -> bool:
    """Whether a growth wrote the same tensor files, byte for byte, as the intact input's."""
    files = [p.relative_to(intact) for p in intact.rglob("*") if p.suffix in (".safetensors", ".distcp")]
    return bool(files) and all((out / f).is_file() and (out / f).read_bytes() == (intact / f).read_bytes()
                               for f in files)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cases", type=int, default=1400, help="recipe and --set cases; a tenth as many of each other kind")
    args = p.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        make_model("BertForMaskedLM", Shape(layers=2, hidden=32, heads=2, ffn=64)).save_pretrained(root / "src")
        make_model("GPT2LMHeadModel", Shape(layers=2, hidden=32, heads=2, ffn=64)).save_pretrained(root / "gpt")
        assert b2b(["convert", str(root / "gpt"), "--out", str(root / "dist")]) == 0
        dist_files = sorted(p.name for p in (root / "dist").iterdir() if p.name != "common.pt")
        assert b2b(["grow", str(root / "src"), "--to", TARGET, "--width", "exact", "--out", str(root / "grown")]) == 0
        grow = lambda src, work: ["grow", str(src), "--to", TARGET, "--out", str(work / "out")]  # noqa: E731
        intact = {kind: root / f"intact-{kind}" for kind in ("src", "dist")}
        for kind, out in intact.items():
            assert b2b(["grow", str(root / kind), "--to", TARGET, "--out", str(out)]) == 0
        verify = lambda src, work: ["verify", str(root / "src"), str(src)]  # noqa: E731
        n = max(1, args.cases // 10)
        cases = fuzz.recipe_cases(args.seed, args.cases)
        cases += [fuzz.to_case(rng, root / "src") for _ in range(n)]
        cases += [fuzz.file_case(rng, "safetensors header", root / "src", grow, "model.safetensors",
                                 head=fuzz.safetensors_header) for _ in range(n)]
        cases += [fuzz.file_case(rng, "config.json", root / "src", grow, "config.json") for _ in range(n)]
        cases += [fuzz.file_case(rng, "torch_dist checkpoint", root / "dist", grow, dist_files[i % len(dist_files)])
                  for i in range(n)]
        cases += [fuzz.file_case(rng, "growth.json", root / "grown", verify, "growth.json", verdicts=(0, 1))
                  for _ in range(n)]
        tally: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        bad = []
        for i, case in enumerate(cases):
            work = root / f"case{i}"
            work.mkdir()
            outcome = fuzz.run_case(case, work)
            tally[case.kind][outcome.ended] += 1
            source = case.name.split("/")[0]
            if outcome.ended == "valid" and source in intact and not same_tensors(work / "out", intact[source]):
                tally[case.kind]["differs"] += 1
            if outcome.ended not in ("valid", "error"):
                bad.append(outcome)
    print("| kind | cases | valid | of which grown tensors differ | error (one line, exit 2, nothing written) "
          "| broke the contract |")
    print("|---|---|---|---|---|---|")
    for kind, ended in tally.items():
        broke = sum(v for k, v in ended.items() if k not in ("valid", "differs", "error"))
        print(f"| {kind} | {ended.total() - ended['differs']} | {ended['valid']} | {ended['differs']} | "
              f"{ended['error']} | {broke} |")
    for outcome in bad:
        print(f"{outcome.kind} {outcome.name}: {outcome.ended}\n{outcome.detail}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
