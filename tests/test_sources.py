"""Where a source model comes from: the packaged real SmolLM2-135M-Instruct (a Q4_1 GGUF file,
dequantised once into a cached HF directory), GGUF files in general, and hub ids read from the
local HF cache (pre-filled here; HF_HUB_OFFLINE=1, nothing downloads)."""

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest

from growth import Shape, shape_from_config
from growth.adapters.files import resolve
from growth.shape import PRESETS
from launchers.cli import main

from conftest import make_model

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
SMOLLM2_WIDE = "layers=40,hidden=1152,heads=18,ffn=3072"  # 2x width (6 KV heads), identity depth 30 -> 40


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        root = tmp_path_factory.mktemp("b2b-cache")
        mp.setenv("B2B_CACHE", str(root))
        yield root


def test_a_dry_run_reads_a_gguf_source_from_its_metadata_without_dequantising(cache, capsys):
    """The cluster set (SmolLM2 as its source_model and tokenizer) checks and dry-runs from the GGUF
    file's metadata: config.json and the tokenizer, in seconds; the weights are dequantised only
    when something reads them, into a directory whose config and tokenizer are the same."""
    assert main(["train", str(RECIPES / "smollm2-1b.yaml"), "--procs", "8", "--dry-run"]) == 0
    assert main(["run", str(RECIPES / "sets" / "smollm2-1b.yaml"), "--dry-run"]) == 0
    assert "FLOPs budget" in capsys.readouterr().out
    [entry] = (cache / "gguf").iterdir()
    assert entry.name.endswith(".config") and not (entry / "model.safetensors").exists()
    meta = json.loads((entry / "config.json").read_text())
    full = resolve("smollm2")
    assert full.name + ".config" == entry.name and (full / "model.safetensors").is_file()
    config = json.loads((full / "config.json").read_text())
    keys = ("architectures", "model_type", "num_hidden_layers", "hidden_size", "num_attention_heads",
            "num_key_value_heads", "intermediate_size", "vocab_size", "tie_word_embeddings", "rope_theta",
            "rms_norm_eps", "max_position_embeddings")
    assert {k: meta.get(k) for k in keys} == {k: config.get(k) for k in keys}
    assert (entry / "tokenizer.json").read_bytes() == (full / "tokenizer.json").read_bytes()
    assert resolve("smollm2", weights=False) == full  # once converted, the full directory serves both


def test_smollm2_grows_exactly_twice_as_wide_and_deeper(cache, tmp_path, capsys):
    source = resolve("smollm2")  # dequantised into the cache once
    assert source.parent.parent == cache and resolve("smollm2") == source
    config = json.loads((source / "config.json").read_text())
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"],
            config["num_key_value_heads"], config["intermediate_size"], config["tie_word_embeddings"],
            config["vocab_size"]) == ("llama", 30, 576, 9, 3, 1536, True, 49152)
    assert "quantization_config" not in config and (source / "tokenizer.json").is_file()
    assert shape_from_config(config) == PRESETS["smollm2-135m"]  # the preset is the real model's shape
    out = tmp_path / "smollm2-wide"
    capsys.readouterr()
    assert main(["grow", "smollm2", "--to", SMOLLM2_WIDE, "--width", "exact", "--depth", "identity",
                 "--out", str(out)]) == 0
    manifest = json.loads((out / "growth.json").read_text())
    assert manifest["target_shape"] == {"layers": 40, "hidden": 1152, "heads": 18, "kv_heads": 6, "ffn": 3072}
    assert manifest["exact"] and manifest["check"]["max_rel"] < 1e-4  # real text, the model's own tokenizer
    assert "dequantising" not in capsys.readouterr().out
    assert main(["verify", "smollm2", str(out)]) == 0
    assert "growth.json says exact: OK" in capsys.readouterr().out


def test_smollm2_converts_to_torch_dist_and_back_bit_for_bit(cache, tmp_path, capsys):
    """The real SmolLM2-135M (Llama, 9 query heads in 3 groups, tied) into a megatron-core torch_dist
    checkpoint and back: the same tensors, bit for bit; `b2b verify` reads the torch_dist one as the
    HF model of its config and finds the source's logits."""
    from safetensors.torch import load_file
    source = resolve("smollm2")
    assert main(["convert", "smollm2", "--out", str(tmp_path / "mc")]) == 0
    assert main(["convert", str(tmp_path / "mc"), "--out", str(tmp_path / "back")]) == 0
    a, b = load_file(source / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    capsys.readouterr()
    assert main(["verify", "smollm2", str(tmp_path / "mc")]) == 0
    assert "logits: max abs 0.000e+00" in capsys.readouterr().out  # the same weights, the same HF model


def test_a_gguf_file_of_an_unsupported_architecture_is_one_line(cache, tmp_path, capsys):
    t5 = gguf.GGUFWriter(str(tmp_path / "t5.gguf"), "t5")
    t5.add_block_count(1)
    t5.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    t5.write_header_to_file()
    t5.write_kv_data_to_file()
    t5.write_tensors_to_file()
    t5.close()
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    for name in ("t5.gguf", "junk.gguf", "missing.gguf"):
        capsys.readouterr()
        assert main(["grow", str(tmp_path / name), "--to", "layers=2", "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("b2b grow: error:") and name in err and len(err.strip().splitlines()) == 1, err
        if name == "t5.gguf":
            assert "a GGUF model of architecture 't5'; b2b grows llama, mistral, qwen2, gpt2" in err, err
    assert not (tmp_path / "out").exists() and not list((cache / "gguf").glob("*t5*"))


def test_a_hub_id_is_read_from_the_local_hf_cache(tmp_path, monkeypatch, capsys):
    """The cache layout huggingface_hub writes: models--ORG--NAME/{refs/main, snapshots/COMMIT/...}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tiny-org--tiny-llama"
    make_model("LlamaForCausalLM", Shape(2, 32, 4, 48, kv_heads=2)).save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "grown"
    assert main(["grow", "tiny-org/tiny-llama", "--to", "hidden=64,heads=8", "--width", "exact",
                 "--out", str(out)]) == 0
    assert json.loads((out / "growth.json").read_text())["source"].endswith(commit)
    capsys.readouterr()
    assert main(["grow", "tiny-org/no-such-model", "--to", "layers=3", "--out", str(tmp_path / "no")]) == 2
    err = capsys.readouterr().err
    assert "no hub id tiny-org/no-such-model in the local HF cache (HF_HUB_OFFLINE=1" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "no").exists()
    shutil.rmtree(repo)
