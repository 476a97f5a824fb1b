"""The Llama family (Llama, Mistral, Qwen2): RMSNorm, grouped-query attention, SwiGLU and RoPE
grown by width and depth, exactly where the method promises it, on drawn shapes."""

import json
import random

import pytest
import torch

from growth import Grower, Shape, schema_for
from growth.adapters.hf import grow_model
from launchers.cli import main

from conftest import check_fpi_off_an_integer_ratio, make_model, max_rel, model_outputs

FAMILIES = [("LlamaForCausalLM", False), ("LlamaForCausalLM", True), ("MistralForCausalLM", False),
            ("Qwen2ForCausalLM", False)]  # (class, Llama's attention and MLP biases); Qwen2 has q/k/v biases


def drawn_growth(rng: random.Random) -> tuple[Shape, Shape]:
    """A source with multi-head or grouped-query attention and a wider target at an integer hidden
    ratio, head_dim fixed (RoPE): key/value heads grown with the query heads, kept (the query heads
    grow inside each group), or in between."""
    head_dim, kv = rng.choice([4, 8]), rng.choice([1, 2, 3])
    group = rng.choice([1, 2, 3])
    source = Shape(rng.randint(1, 3), kv * group * head_dim, kv * group, rng.randint(8, 40), kv_heads=kv)
    ratio = rng.choice([1, 2, 3])
    heads = source.heads * ratio
    kv_options = [k for k in range(kv, heads + 1) if heads % k == 0 and heads // k >= group]
    return source, Shape(source.layers, heads * head_dim, heads, source.ffn + rng.randint(0, 30),
                         kv_heads=rng.choice(kv_options))


@pytest.mark.parametrize("symmetry", ["none", "split", "noise"])
@pytest.mark.parametrize("width", ["exact", "fpi"])
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("cls,bias", FAMILIES)
def test_integer_ratio_width_growth_preserves_the_logits(cls, bias, tied, width, symmetry, ids):
    rng = random.Random(f"{cls}{bias}{tied}{width}{symmetry}")
    for draw in range(3):
        source, target = drawn_growth(rng)
        small = make_model(cls, source, tied, seed=draw, bias=bias)
        grown, manifest = grow_model(small, target, width=width, seed=draw, symmetry=symmetry)
        assert manifest["exact"], manifest["exact_reason"]
        assert grown.config.num_key_value_heads == target.kv_heads
        assert max_rel(model_outputs(small, ids)[0], model_outputs(grown, ids)[0]) < 1e-5, (source, target)


@pytest.mark.parametrize("cls", ["LlamaForCausalLM", "Qwen2ForCausalLM"])
def test_fpi_off_an_integer_ratio_is_bounded_as_for_layernorm(cls, ids):
    """Off an integer ratio only RMSNorm's statistic moves (docs/growth.md: LayerNorm's rule and
    bound): copy counts differ by at most one, and the logits stay within the same bound as
    test_width's for BERT and GPT-2. Head_dim fixed, so the heads grow by the hidden ratio."""
    check_fpi_off_an_integer_ratio(cls, [
        (Shape(2, 24, 6, 40, kv_heads=3), Shape(2, 36, 9, 60, kv_heads=3)),   # 1.5x, groups of 2 -> 3
        (Shape(1, 16, 4, 30, kv_heads=2), Shape(1, 24, 6, 50, kv_heads=3)),   # 1.5x, KV heads grown
        (Shape(2, 32, 4, 40, kv_heads=1), Shape(2, 40, 5, 64, kv_heads=1))], ids)  # 1.25x, one group


def test_smollm2_grows_into_each_llama_preset_of_its_head_dim_and_is_refused_the_others():
    """The presets are Llama shapes (heads x head_dim = hidden, whole query groups); from
    SmolLM2-135M (head_dim 64, groups of 3, 30 layers) growth is planned into the width of each one
    of head_dim 64, 3 KV heads or more and groups of 3 or more; the others are refused with the
    reason (fewer KV heads; RoPE fixes head_dim; a target group copies one source group)."""
    import dataclasses

    from growth import GrowthError
    from growth.shape import LLAMA_PRESETS, PRESETS
    source = PRESETS["smollm2-135m"]
    for name in LLAMA_PRESETS:
        assert PRESETS[name].hidden % PRESETS[name].heads == 0 and PRESETS[name].heads % PRESETS[name].kv_heads == 0
        target = dataclasses.replace(PRESETS[name], layers=max(PRESETS[name].layers, source.layers))
        if name == "smollm2-135m":
            continue
        if target.kv_heads < source.kv_heads:
            with pytest.raises(GrowthError, match="smaller than the source on: kv_heads"):
                Grower(schema_for("llama"), source, target, width="fpi")
        elif target.hidden // target.heads != 64:
            with pytest.raises(GrowthError, match="head_dim"):
                Grower(schema_for("llama"), source, target, width="fpi")
        elif target.heads // target.kv_heads < 3:  # SmolLM2's groups of 3 query heads fit no smaller group
            with pytest.raises(GrowthError, match="cannot hold the source's groups of 3"):
                Grower(schema_for("llama"), source, target, width="fpi")
        else:
            Grower(schema_for("llama"), source, target, width="fpi")


def test_the_headless_model_keeps_its_hidden_states(ids):
    source = Shape(2, 24, 6, 40, kv_heads=2)
    small = make_model("LlamaModel", source)
    grown, _ = grow_model(small, Shape(2, 48, 12, 80, kv_heads=4), width="exact")
    assert max_rel(model_outputs(small, ids, 24)[0], model_outputs(grown, ids, 24)[0]) < 1e-5


@pytest.mark.parametrize("width", ["fpi", "aki", "exact"])
def test_every_query_head_attends_with_a_copy_of_its_source_heads_key_value_head(width):
    """HF's layout: query head j uses key/value head j // group. After growth, the source of the
    target key/value head j // group is the key/value head of j's source head, for every j."""
    rng = random.Random(width)
    for _ in range(20):
        source, target = drawn_growth(rng)
        grower = Grower(schema_for("llama"), source, target, width=width, seed=rng.randint(0, 99))
        d = source.head_dim
        for maps in grower.layer_maps:
            query_source = maps["q_out"].index[::d] // d  # the source head of every target query head
            kv_source = maps["kv_out"].index[::d] // d    # the source kv head of every target kv head
            heads = torch.arange(target.heads)
            assert torch.equal(kv_source[heads // target.group], query_source // source.group), (source, target)
            assert torch.equal(torch.bincount(query_source, minlength=source.heads).bool(),
                               torch.ones(source.heads, dtype=torch.bool))  # every source head kept


def test_aki_fills_new_heads_and_ffn_units_from_the_next_layer():
    source, target = Shape(2, 24, 6, 16, kv_heads=2), Shape(2, 48, 12, 32, kv_heads=4)
    small = make_model("LlamaForCausalLM", source, tied=False)
    state = small.state_dict()
    grown, _ = grow_model(small, target, width="aki")
    g = grown.state_dict()
    grower = Grower(schema_for("llama"), source, target, width="aki")
    maps = grower.layer_maps[0]
    hidden = grower.hidden.index
    for name, role, rows in [("self_attn.k_proj", "kv_out", target.kv_heads * 4), ("self_attn.q_proj", "q_out", 48),
                             ("mlp.gate_proj", "f_out", 32), ("mlp.up_proj", "f_out", 32)]:
        m = maps[role]
        new = m.is_new.nonzero().squeeze(1)
        assert 0 < new.numel() < rows
        upper = state[f"model.layers.1.{name}.weight"][m.index[new]][:, hidden]
        share = grower.hidden.share.to(upper.dtype)
        assert torch.allclose(g[f"model.layers.0.{name}.weight"][new], upper * share, atol=1e-7), name
        kept = (~m.is_new).nonzero().squeeze(1)
        lower = state[f"model.layers.0.{name}.weight"][m.index[kept]][:, hidden]
        assert torch.allclose(g[f"model.layers.0.{name}.weight"][kept], lower * share, atol=1e-7), name


@pytest.mark.parametrize("tied", [True, False])
def test_identity_depth_is_exact_at_every_depth_and_width(tied, ids):
    source = Shape(2, 24, 6, 40, kv_heads=3)
    small = make_model("LlamaForCausalLM", source, tied)
    for target in (Shape(3, 24, 6, 40, kv_heads=3), Shape(5, 48, 12, 80, kv_heads=6)):
        grown, manifest = grow_model(small, target, width="exact", depth="identity")
        assert manifest["exact"]
        assert max_rel(model_outputs(small, ids)[0], model_outputs(grown, ids)[0]) < 1e-5, target


def test_b2b_grow_and_verify_a_llama_directory(tmp_path, capsys):
    src = tmp_path / "llama"
    make_model("LlamaForCausalLM", Shape(2, 32, 4, 48, kv_heads=2)).save_pretrained(src)
    out = tmp_path / "grown"
    assert main(["grow", str(src), "--to", "layers=4,hidden=64,heads=8,ffn=96", "--width", "exact",
                 "--depth", "identity", "--out", str(out)]) == 0
    manifest = json.loads((out / "growth.json").read_text())
    assert manifest["target_shape"] == {"layers": 4, "hidden": 64, "heads": 8, "kv_heads": 4, "ffn": 96}
    config = json.loads((out / "config.json").read_text())
    assert (config["num_key_value_heads"], config["head_dim"], config["num_hidden_layers"]) == (4, 8, 4)
    capsys.readouterr()
    assert main(["verify", str(src), str(out)]) == 0
    assert "growth.json says exact: OK" in capsys.readouterr().out


@pytest.mark.parametrize("to,message", [
    ("hidden=64,heads=4", "head_dim 8 -> 16: llama rotates query and key channels by RoPE"),
    ("hidden=64,heads=8,kv_heads=3", "kv_heads=3 does not divide heads=8"),
    ("hidden=64,heads=8,kv_heads=8", "target groups of 1 query heads per key/value head cannot hold the "
                                     "source's groups of 2"),
    ("kv_heads=1", "target is smaller than the source on: kv_heads 2 -> 1"),
])
def test_impossible_llama_targets_are_one_line_and_write_nothing(to, message, tmp_path, capsys):
    src = tmp_path / "llama"
    make_model("LlamaForCausalLM", Shape(2, 32, 4, 48, kv_heads=2)).save_pretrained(src)
    capsys.readouterr()
    assert main(["grow", str(src), "--to", to, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("insert,layers,expected", [
    ("even", 40, [3 + 4 * i for i in range(10)]),  # LLaMA-Pro: after every 3 of SmolLM2's 30 layers
    ("every=6", 35, [6, 13, 20, 27, 34]),
    ("top", 32, [30, 31]),
])
def test_identity_blocks_go_where_insert_says_and_copy_the_layer_below(insert, layers, expected):
    grower = Grower(schema_for("llama"), Shape(30, 16, 2, 8), Shape(layers, 16, 2, 8), width="exact",
                    depth="identity", insert=insert)
    assert grower.new_layers == expected and grower.manifest()["identity_layers"] == expected
    if insert != "top":
        assert all(grower.order[t] == grower.order[t - 1] for t in expected)
    assert sorted(set(range(layers)) - set(expected)) == [grower.order.index(s) for s in range(30)]  # originals kept


@pytest.mark.parametrize("insert", ["even", "every=1", "top"])
def test_identity_depth_is_exact_at_every_insertion_pattern(insert, ids):
    small = make_model("LlamaForCausalLM", Shape(2, 24, 6, 40, kv_heads=3))
    grown, manifest = grow_model(small, Shape(4, 48, 12, 80, kv_heads=6), width="exact", depth="identity",
                                 insert=insert)
    assert manifest["exact"] and manifest["insert"] == insert
    assert max_rel(model_outputs(small, ids)[0], model_outputs(grown, ids)[0]) < 1e-5
    stacked, _ = grow_model(small, Shape(4, 48, 12, 80, kv_heads=6), width="exact", depth="stack")
    assert max_rel(model_outputs(small, ids)[0], model_outputs(stacked, ids)[0]) > 1e-3  # stacking is not


@pytest.mark.parametrize("argv,message", [
    (["--insert", "every=4"], "--insert every=4 places identity blocks: it applies to --depth identity"),
    (["--depth", "identity", "--insert", "every=4"], "--insert every=4: 2 layers with a new block after every 4"),
    (["--depth", "identity", "--insert", "middle"], "--insert 'middle': use even, top or every=N"),
])
def test_bad_insertions_are_one_line(argv, message, tmp_path, capsys):
    src = tmp_path / "llama"
    make_model("LlamaForCausalLM", Shape(2, 32, 4, 48, kv_heads=2)).save_pretrained(src)
    capsys.readouterr()
    assert main(["grow", str(src), "--to", "layers=3", *argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
