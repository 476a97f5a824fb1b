"""Depth growth: StackBERT order, exact identity blocks for pre-LN GPT-2, refused for BERT."""

import pytest
import torch

from growth import Grower, GrowthError, Shape, grow_state_dict, layer_map, schema_for
from growth.adapters.hf import grow_model

from conftest import make_model, max_rel, model_outputs


def test_stack_order_and_remainder_from_the_top():
    assert layer_map(6, 12) == [0, 1, 2, 3, 4, 5] * 2
    assert layer_map(6, 16) == [0, 1, 2, 3, 4, 5] * 2 + [2, 3, 4, 5]
    assert layer_map(3, 4) == [0, 1, 2, 2]
    assert layer_map(4, 4) == [0, 1, 2, 3]


@pytest.mark.parametrize("cls,prefix", [("BertForMaskedLM", "bert.encoder.layer."),
                                        ("GPT2LMHeadModel", "transformer.h.")])
def test_stacked_layers_copy_their_source_layer(cls, prefix):
    source = Shape(3, 8, 2, 16)
    small = make_model(cls, source)
    sd = small.state_dict()
    schema = schema_for("bert" if cls.startswith("Bert") else "gpt2")
    got, manifest = grow_state_dict(sd, schema, source, Shape(7, 8, 2, 16), width="fpi")
    assert manifest["layer_map"] == [0, 1, 2, 0, 1, 2, 2]
    layer_keys = [k for k in sd if k.startswith(prefix + "0.")]
    for t, s in enumerate(manifest["layer_map"]):
        for key in layer_keys:
            grown = got[key.replace(f"{prefix}0.", f"{prefix}{t}.")]
            assert torch.equal(grown, sd[key.replace(f"{prefix}0.", f"{prefix}{s}.")])
    # every target layer owns its storage (safetensors refuses shared tensors)
    ptrs = [got[f"{prefix}{t}.{layer_keys[0][len(prefix) + 2:]}"].data_ptr() for t in range(7)]
    assert len(set(ptrs)) == 7


@pytest.mark.parametrize("width", ["exact", "fpi"])
def test_identity_depth_is_exact_for_gpt2(width, ids):
    small = make_model("GPT2LMHeadModel", Shape(2, 8, 2, 16))
    grown, manifest = grow_model(small, Shape(5, 16, 4, 32), width=width, depth="identity")
    assert manifest["exact"]
    assert max_rel(model_outputs(small, ids)[0], model_outputs(grown, ids)[0]) < 1e-5
    new_block = grown.transformer.h[3]
    assert torch.all(new_block.attn.c_proj.weight == 0) and torch.all(new_block.mlp.c_proj.bias == 0)
    assert not torch.all(new_block.mlp.c_fc.weight == 0)


def test_identity_depth_is_refused_for_post_ln_bert():
    with pytest.raises(GrowthError, match="post-LN"):
        Grower(schema_for("bert"), Shape(2, 8, 2, 16), Shape(4, 8, 2, 16), depth="identity")
    # no new layers: nothing to refuse
    Grower(schema_for("bert"), Shape(2, 8, 2, 16), Shape(2, 16, 2, 16), depth="identity")


def test_stacking_is_not_claimed_exact(ids):
    small = make_model("BertForMaskedLM", Shape(2, 8, 2, 16))
    grown, manifest = grow_model(small, Shape(4, 16, 2, 32), width="exact", depth="stack")
    assert not manifest["exact"] and "stacked" in manifest["exact_reason"]
    assert max_rel(model_outputs(small, ids)[0], model_outputs(grown, ids)[0]) > 1e-3
