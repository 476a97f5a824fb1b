"""Width growth: exact and FPI preserve the function; FPI off-integer is bounded; AKI and
DirectCopy fill new units as specified."""

import random

import pytest
import torch

from growth import Grower, Shape, grow_state_dict, schema_for
from growth.adapters.hf import grow_model

from conftest import check_fpi_off_an_integer_ratio, make_model, max_rel, model_outputs, random_growth

HEADED = [("BertForMaskedLM", True), ("BertForMaskedLM", False), ("BertForPreTraining", True),
          ("GPT2LMHeadModel", True), ("GPT2LMHeadModel", False)]
HEADLESS = ["BertModel", "GPT2Model"]


@pytest.mark.parametrize("symmetry", ["none", "split", "noise"])
@pytest.mark.parametrize("width", ["exact", "fpi"])
@pytest.mark.parametrize("cls,tied", HEADED + [(c, True) for c in HEADLESS])
def test_integer_hidden_ratio_preserves_outputs(cls, tied, width, symmetry, ids):
    rng = random.Random(f"{cls}{tied}{width}")
    for draw in range(3):
        source, target = random_growth(rng, integer_hidden=True)
        small = make_model(cls, source, tied, seed=draw)
        grown, manifest = grow_model(small, target, width=width, seed=draw, symmetry=symmetry)
        assert manifest["exact"], manifest["exact_reason"]
        assert manifest["symmetry"] == symmetry
        for a, b in zip(model_outputs(small, ids, source.hidden), model_outputs(grown, ids, source.hidden)):
            assert max_rel(a, b) < 1e-5, (source, target)


@pytest.mark.parametrize("symmetry", ["none", "split", "noise"])
def test_head_dim_growth_is_compensated(symmetry, ids):
    """MiniLM-like H384/12 heads -> BERT_BASE-like 768/12 heads doubles head_dim."""
    small = make_model("BertForMaskedLM", Shape(2, 24, 12, 48))
    grown, _ = grow_model(small, Shape(2, 48, 12, 96), width="fpi", symmetry=symmetry)
    assert max_rel(model_outputs(small, ids)[0], model_outputs(grown, ids)[0]) < 1e-5


@pytest.mark.parametrize("cls,tied", HEADED)
def test_symmetry_breaking_gives_a_unit_and_its_copy_different_gradients(cls, tied, ids):
    """With equal copies (none) a hidden unit and its copy get the same gradient, so they stay
    equal; split gives each copy its share of the gradient, noise a different mix of the fan-in
    weights' gradients, at the same outputs."""
    small = make_model(cls, Shape(2, 16, 2, 32), tied)
    grads = {}
    for symmetry in ("none", "split", "noise"):
        grown, manifest = grow_model(small, Shape(2, 32, 4, 64), width="fpi", seed=3, symmetry=symmetry)
        assert max_rel(model_outputs(small, ids)[0], model_outputs(grown, ids)[0]) < 1e-5
        out = grown.train(False)(input_ids=ids)
        logits = out["logits"] if "logits" in out else out["prediction_logits"]
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
        embedding = grown.get_input_embeddings().weight.grad  # fan-out copies along the hidden axis
        hidden_map = torch.tensor(manifest["hidden_map"])
        copies = torch.arange(16, 32)
        grads[symmetry] = embedding[:, copies], embedding[:, hidden_map[copies]]
    copy, original = grads["none"]
    assert torch.allclose(copy, original, rtol=1e-4, atol=1e-7)
    for symmetry in ("split", "noise"):
        copy, original = grads[symmetry]
        assert (copy - original).abs().max() > 0.05 * original.abs().max(), symmetry


def test_noise_is_zero_sum_over_the_copies_at_the_strength_asked():
    """--break-symmetry noise multiplies each fan-in weight of a copy by 1 + eps: over the copies
    of a source unit the added parts cancel (so a fan-in that reads equal copies is unchanged), and
    eps has the asked std before it is made zero-sum (for two copies, sqrt(1/2) of it after)."""
    source, target = Shape(2, 64, 4, 256), Shape(2, 128, 8, 512)
    small = make_model("BertForMaskedLM", source)
    state = small.state_dict()
    name = "bert.encoder.layer.0.output.dense.weight"  # h_out x f_in
    plain = grow_state_dict(state, schema_for("bert"), source, target, width="exact")[0][name].double()
    for db in (10.0, 20.0):
        grown, manifest = grow_state_dict(state, schema_for("bert"), source, target, width="exact",
                                          symmetry="noise", noise_db=db)
        assert manifest["symmetry"] == "noise" and manifest["noise_db"] == db
        w = grown[name].double()
        eps = w / plain - 1
        assert (w - plain).view(128, 2, 256).sum(1).abs().max() < 1e-6 * plain.abs().max()  # copies j, j + 256
        assert abs(eps.std().item() / (10 ** (-db / 20) * 0.5 ** 0.5) - 1) < 0.02, db
    again = grow_state_dict(state, schema_for("bert"), source, target, width="exact", symmetry="noise")[0]
    assert torch.equal(again[name], grow_state_dict(state, schema_for("bert"), source, target, width="exact",
                                                    symmetry="noise", seed=0)[0][name])
    assert not torch.equal(again[name], grow_state_dict(state, schema_for("bert"), source, target, width="exact",
                                                        symmetry="noise", seed=1)[0][name])


@pytest.mark.parametrize("cls", ["BertForMaskedLM", "GPT2LMHeadModel"])
def test_fpi_non_integer_ratio_is_bounded(cls, ids):
    """Off an integer ratio only LayerNorm statistics move (docs/growth.md): copy counts
    differ by at most one, and the logits stay within the documented bound."""
    rng = random.Random(cls)
    check_fpi_off_an_integer_ratio(cls, [random_growth(rng, integer_hidden=False) for _ in range(4)], ids)


def test_fpi_weights_follow_the_formula():
    """Fan-out copies, fan-in copies divided by the count: checked element by element."""
    small = make_model("BertModel", Shape(1, 8, 2, 12))
    target = Shape(1, 12, 3, 20)
    grower = Grower(schema_for("bert"), Shape(1, 8, 2, 12), target, width="fpi", seed=5)
    grown = dict(grower.items(list(small.state_dict()), small.state_dict().__getitem__))
    w = small.state_dict()["encoder.layer.0.intermediate.dense.weight"]  # [ffn, hidden]
    g_f = grower.layer_maps[0]["f_out"].index
    g_h = grower.hidden.index
    c_h = torch.bincount(g_h).double()[g_h]
    expected = (w[g_f][:, g_h].double() / c_h).float()
    assert torch.equal(grown["encoder.layer.0.intermediate.dense.weight"], expected)
    embeddings = small.state_dict()["embeddings.word_embeddings.weight"]
    assert torch.equal(grown["embeddings.word_embeddings.weight"], embeddings[:, g_h])


def test_aki_new_units_come_from_the_next_layer():
    source, target = Shape(3, 8, 2, 12), Shape(3, 16, 4, 20)
    small = make_model("BertForMaskedLM", source)
    sd = small.state_dict()
    aki = Grower(schema_for("bert"), source, target, width="aki", seed=3)
    fpi = Grower(schema_for("bert"), source, target, width="fpi", seed=3)
    got = dict(aki.items(list(sd), sd.__getitem__))
    ref = dict(fpi.items(list(sd), sd.__getitem__))
    g_h, c_h = aki.hidden.index, torch.bincount(aki.hidden.index).double()[aki.hidden.index]
    for layer in range(source.layers):
        maps = aki.layer_maps[layer]
        for name, role in (("intermediate.dense", "f_out"), ("attention.self.key", "a_out")):
            key = f"bert.encoder.layer.{layer}.{name}.weight"
            new = maps[role].is_new
            if role == "a_out":  # new heads: whole heads appended after the source's
                assert new.nonzero().min() == source.heads * target.head_dim
            assert torch.equal(got[key][~new], ref[key][~new])  # old units: as FPI
            if layer + 1 < source.layers:
                upper = sd[key.replace(f"layer.{layer}.", f"layer.{layer + 1}.")]
                expected = (upper[maps[role].index][:, g_h].double() / c_h).float()
                assert torch.equal(got[key][new], expected[new])
                assert not torch.equal(got[key][new], ref[key][new])
            else:  # top layer: FPI fallback
                assert torch.equal(got[key], ref[key])


def test_direct_copies_the_block_and_initialises_the_rest():
    source, target = Shape(1, 8, 2, 12), Shape(1, 16, 4, 20)
    small = make_model("BertModel", source)
    sd = small.state_dict()
    grower = Grower(schema_for("bert"), source, target, width="direct", seed=1)
    got = dict(grower.items(list(sd), sd.__getitem__))
    w = got["encoder.layer.0.intermediate.dense.weight"]
    assert torch.equal(w[:12, :8], sd["encoder.layer.0.intermediate.dense.weight"])
    assert 0.01 < w[12:].std() < 0.03  # fresh N(0, 0.02^2)
    ln = got["encoder.layer.0.output.LayerNorm.weight"]
    assert torch.equal(ln[:8], sd["encoder.layer.0.output.LayerNorm.weight"]) and torch.all(ln[8:] == 1)
    assert torch.all(got["encoder.layer.0.output.LayerNorm.bias"][8:] == 0)
    assert not grower.exactness()[0]


def test_copy_cosines_from_the_manifest(tmp_path, capsys):
    """growth/copies.py: 1 for every kind right after FPI, lower once the copies move apart; the
    maps are rebuilt from growth.json; DirectCopy and a manifest that does not match are refused."""
    from growth import GrowthError
    from growth.copies import copy_cosines, grower_from_manifest
    from launchers.cli import main
    small = make_model("BertForMaskedLM", Shape(2, 16, 2, 32))
    grown, manifest = grow_model(small, Shape(2, 32, 4, 64), width="fpi", seed=1)
    grower = grower_from_manifest(manifest)
    assert copy_cosines(grower, grown.named_parameters()) == pytest.approx({"hidden": 1.0, "heads": 1.0, "ffn": 1.0})
    with torch.no_grad():
        grown.bert.encoder.layer[0].intermediate.dense.weight.add_(torch.randn(64, 32))
    moved = copy_cosines(grower, grown.named_parameters())
    assert moved["ffn"] < 0.99 and moved["heads"] == pytest.approx(1.0, abs=1e-6)
    assert grower_from_manifest({**manifest, "width": "direct"}) is None
    with pytest.raises(GrowthError, match="hidden map"):
        grower_from_manifest({**manifest, "seed": 2})
    out = tmp_path / "grown"
    grown.save_pretrained(out)
    (out / "growth.json").write_text(__import__("json").dumps(manifest))
    assert main(["copies", str(out)]) == 0
    assert "ffn: " in capsys.readouterr().out
    (out / "growth.json").write_text("{")
    assert main(["copies", str(out)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
