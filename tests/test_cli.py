"""`b2b grow` / `b2b verify` on HF directories: the real MiniLM, and every bad input ending
in one clear message, a non-zero exit and no output directory."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel, BertModel

from growth import Shape
from launchers.cli import main

from conftest import make_model


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def tiny_dir(tmp_path):
    path = tmp_path / "tiny"
    make_model("BertForMaskedLM", Shape(2, 16, 2, 32)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def minilm_exact(tmp_path_factory):
    out = tmp_path_factory.mktemp("m") / "minilm-w768"
    assert main(["grow", "minilm", "--to", "layers=6,hidden=768,heads=12,ffn=3072",
                 "--width", "exact", "--out", str(out)]) == 0
    return out


def test_minilm_grows_exactly_to_bert_base_width(minilm_exact, capsys):
    manifest = json.loads((minilm_exact / "growth.json").read_text())
    assert manifest["exact"] and manifest["check"]["max_rel"] < 1e-5
    assert len(manifest["source_sha256"]) == 64
    assert (minilm_exact / "vocab.txt").is_file() and (minilm_exact / "tokenizer.json").is_file()
    model = AutoModel.from_pretrained(minilm_exact)
    assert isinstance(model, BertModel) and model.config.hidden_size == 768
    code, out, _ = run(capsys, "verify", "minilm", minilm_exact)
    assert code == 0 and "says exact: OK" in out


def test_verify_fails_when_an_exact_growth_is_broken(minilm_exact, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(minilm_exact, broken)
    state = load_file(broken / "model.safetensors")
    state["encoder.layer.3.output.dense.weight"][0, 0] += 1.0
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    code, out, _ = run(capsys, "verify", "minilm", broken)
    assert code == 1 and "FAILED" in out


def test_minilm_grows_to_bert_base_with_aki(tmp_path, capsys):
    out = tmp_path / "bert-base"
    code, stdout, _ = run(capsys, "grow", "minilm", "--to", "bert-base", "--width", "aki", "--out", out)
    assert code == 0 and "not function-preserving" in stdout
    model = AutoModel.from_pretrained(out)
    assert (model.config.num_hidden_layers, model.config.hidden_size,
            model.config.num_attention_heads, model.config.intermediate_size) == (12, 768, 12, 3072)
    code, stdout, _ = run(capsys, "verify", "minilm", out)
    assert code == 0 and "says not exact" in stdout


def test_target_from_a_config_json(tiny_dir, tmp_path, capsys):
    target = tmp_path / "target.json"
    cfg = json.loads((tiny_dir / "config.json").read_text())
    target.write_text(json.dumps({**cfg, "hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 64}))
    code, _, err = run(capsys, "grow", tiny_dir, "--to", target, "--width", "exact", "--out", tmp_path / "g")
    assert code == 0, err
    assert json.loads((tmp_path / "g" / "growth.json").read_text())["target_shape"]["hidden"] == 32


def test_grow_refuses_to_save_a_broken_exact_growth(tiny_dir, tmp_path, capsys, monkeypatch):
    # fault injection: a stacked (non-exact) growth claimed exact must fail the pre-write check
    monkeypatch.setattr("growth.grow.Grower.exactness", lambda self: (True, "claimed"))
    code, _, err = run(capsys, "grow", tiny_dir, "--to", "layers=4", "--out", tmp_path / "g")
    assert code == 2 and "refusing to save" in err
    assert list(tmp_path.iterdir()) == [tiny_dir]


def test_no_check_skips_the_pre_write_check_and_verify_runs_it_later(tiny_dir, tmp_path, capsys, monkeypatch):
    """--no-check: the same growth as checked (the check changes nothing written but the manifest),
    saved without the forward pass that holds both models in memory; b2b verify runs it after."""
    code, _, _ = run(capsys, "grow", tiny_dir, "--to", "hidden=32,heads=4,ffn=64", "--width", "exact",
                     "--out", tmp_path / "checked")
    assert code == 0
    monkeypatch.setattr("growth.adapters.verify.compare", lambda *a: pytest.fail("--no-check ran the check"))
    code, out, _ = run(capsys, "grow", tiny_dir, "--to", "hidden=32,heads=4,ffn=64", "--width", "exact",
                       "--no-check", "--out", tmp_path / "unchecked")
    assert code == 0 and "not checked (--no-check)" in out
    manifest = json.loads((tmp_path / "unchecked" / "growth.json").read_text())
    assert manifest["exact"] and manifest["check"].startswith("skipped")
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("checked", "unchecked"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    monkeypatch.undo()
    code, out, _ = run(capsys, "verify", tiny_dir, tmp_path / "unchecked")
    assert code == 0 and "growth.json says exact: OK" in out


def _corrupt(path):
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])


def _unknown_arch(path):
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "model_type": "t5"}))


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def _pickle_with_code(path):
    (path / "model.safetensors").unlink()
    torch.save({"x": Evil()}, path / "pytorch_model.bin")


def _bad_shape(path):
    state = load_file(path / "model.safetensors")
    state["bert.encoder.layer.1.intermediate.dense.weight"] = torch.zeros(31, 16)
    save_file(state, path / "model.safetensors")


def _missing_layer(path):
    state = load_file(path / "model.safetensors")
    state = {k: v for k, v in state.items() if "layer.1.attention.self.key" not in k}
    save_file(state, path / "model.safetensors")


@pytest.mark.parametrize("mutate,to,message", [
    (None, "layers=1", "smaller than the source on: layers 2 -> 1"),
    (None, "hidden=8", "smaller"),
    (None, "hidden=36,heads=5", "heads=5 does not divide hidden=36"),
    (None, "depth=3", "unknown key 'depth'"),
    (None, "no-such-preset", "not a preset"),
    (_unknown_arch, "layers=4", "unknown architecture 't5'"),
    (_corrupt, "layers=4", "corrupt or truncated"),
    (_pickle_with_code, "layers=4", "needs arbitrary pickled code"),
    (_bad_shape, "layers=4", "does not match the config"),
    (_missing_layer, "layers=4", "partial or corrupt"),
    (lambda p: (p / "model.safetensors").unlink(), "layers=4", "no model.safetensors"),
    (lambda p: (p / "config.json").unlink(), "layers=4", "no config.json"),
    (lambda p: (p / "config.json").write_text("{not json"), "layers=4", "corrupt config"),
])
def test_bad_input_is_one_clear_error(tiny_dir, tmp_path, capsys, mutate, to, message):
    if mutate:
        mutate(tiny_dir)
    code, out, err = run(capsys, "grow", tiny_dir, "--to", to, "--out", tmp_path / "g")
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert "pwned" not in out
    assert not (tmp_path / "g").exists() and not any(p.name.startswith(".g") for p in tmp_path.iterdir())


def test_exact_refuses_a_non_integer_hidden_ratio(tiny_dir, tmp_path, capsys):
    code, _, err = run(capsys, "grow", tiny_dir, "--to", "hidden=24", "--width", "exact", "--out", tmp_path / "g")
    assert code == 2 and "integer hidden ratio" in err


def test_existing_output_needs_overwrite(tiny_dir, tmp_path, capsys):
    out = tmp_path / "g"
    out.mkdir()
    (out / "keep").write_text("x")
    code, _, err = run(capsys, "grow", tiny_dir, "--to", "layers=4", "--out", out)
    assert code == 2 and "--overwrite" in err and (out / "keep").exists()
    code, _, _ = run(capsys, "grow", tiny_dir, "--to", "layers=4", "--out", out, "--overwrite")
    assert code == 0 and not (out / "keep").exists() and (out / "growth.json").exists()


def test_console_script_exit_codes(tiny_dir, tmp_path):
    b2b = [sys.executable, "-m", "launchers.cli"]
    ok = subprocess.run(b2b + ["grow", str(tiny_dir), "--to", "hidden=32,heads=4", "--width", "exact",
                               "--out", str(tmp_path / "g")], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run(b2b + ["grow", str(tmp_path / "nope"), "--to", "bert-base", "--out", str(tmp_path / "h")],
                         capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip() == f"b2b grow: error: {tmp_path / 'nope'}: no such model directory"


def test_weights_only_torch_file_is_accepted(tiny_dir, tmp_path, capsys):
    state = load_file(tiny_dir / "model.safetensors")
    (tiny_dir / "model.safetensors").unlink()
    torch.save(state, tiny_dir / "pytorch_model.bin")
    code, _, err = run(capsys, "grow", tiny_dir, "--to", "hidden=32,heads=4", "--width", "exact",
                       "--out", tmp_path / "g")
    assert code == 0, err


def test_verify_runs_on_a_given_text(minilm_exact, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 3)
    code, out, _ = run(capsys, "verify", "minilm", minilm_exact, "--text", text)
    assert code == 0 and "says exact: OK" in out
    code, _, err = run(capsys, "verify", "minilm", minilm_exact, "--text", tmp_path / "missing.txt")
    assert code == 2 and "missing.txt" in err and len(err.strip().splitlines()) == 1


def test_an_output_path_under_a_file_is_one_clear_error(tiny_dir, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("not a directory")
    for argv in (["grow", tiny_dir, "--to", "layers=3", "--out", afile / "x"],
                 ["grow", tiny_dir, "--to", "layers=3", "--width", "direct", "--break-symmetry", "split",
                  "--out", tmp_path / "y"]):
        code, out, err = run(capsys, *argv)
        assert code == 2 and err.startswith("b2b grow: error:") and len(err.strip().splitlines()) == 1, err
    assert "cannot write" in run(capsys, "grow", tiny_dir, "--to", "layers=3", "--out", afile / "x")[2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "tiny"]


def test_noise_symmetry_breaking_is_checked_exact_and_recorded(tiny_dir, tmp_path, capsys):
    out = tmp_path / "noise"
    code, printed, _ = run(capsys, "grow", tiny_dir, "--to", "layers=2,hidden=32,heads=4,ffn=64", "--width", "fpi",
                           "--break-symmetry", "noise", "--noise-db", "3", "--out", out)
    manifest = json.loads((out / "growth.json").read_text())
    assert code == 0 and "check: outputs preserved" in printed
    assert manifest["symmetry"] == "noise" and manifest["noise_db"] == 3.0 and manifest["check"]["max_rel"] < 1e-5
    for argv, message in [(["--noise-db", "3"], "--noise-db applies to --break-symmetry noise, not none"),
                          (["--break-symmetry", "noise", "--noise-db", "nan"], "must be a finite number")]:
        code, _, err = run(capsys, "grow", tiny_dir, "--to", "hidden=32", *argv, "--out", tmp_path / "bad")
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "bad").exists()
