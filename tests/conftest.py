import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub is imported: it reads it once

import pytest
import torch
import transformers
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForPreTraining,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    GPT2Model,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from growth import Shape

if os.environ.get("PYTEST_XDIST_WORKER"):  # each xdist worker its share of the cores, not all of them
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()

CLASSES = {c.__name__: c for c in (BertModel, BertForMaskedLM, BertForPreTraining, GPT2Model, GPT2LMHeadModel,
                                    LlamaModel, LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM)}
LLAMA_CONFIGS = {"Llama": LlamaConfig, "Mistral": MistralConfig, "Qwen2": Qwen2Config}
VOCAB = 101


def make_model(cls_name: str, shape: Shape, tied: bool = True, seed: int = 0, bias: bool = False):
    """A tiny HF model with every parameter (LayerNorms included) randomised, so that a
    growth bug cannot hide behind HF's ones/zeros initialisation. `bias`: a Llama with
    attention_bias and mlp_bias (Qwen2 has its q/k/v biases anyway)."""
    torch.manual_seed(seed)
    family = next((f for f in LLAMA_CONFIGS if cls_name.startswith(f)), None)
    if family:
        cfg = LLAMA_CONFIGS[family](vocab_size=VOCAB, hidden_size=shape.hidden, num_hidden_layers=shape.layers,
                                    num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                                    intermediate_size=shape.ffn, max_position_embeddings=64,
                                    tie_word_embeddings=tied, **({"attention_bias": bias, "mlp_bias": bias}
                                                                 if family == "Llama" else {}))
    elif cls_name.startswith("Bert"):
        cfg = BertConfig(vocab_size=VOCAB, hidden_size=shape.hidden, num_hidden_layers=shape.layers,
                         num_attention_heads=shape.heads, intermediate_size=shape.ffn,
                         max_position_embeddings=64, tie_word_embeddings=tied)
    else:
        cfg = GPT2Config(vocab_size=VOCAB, n_embd=shape.hidden, n_layer=shape.layers, n_head=shape.heads,
                         n_inner=shape.ffn, n_positions=64, tie_word_embeddings=tied,
                         bos_token_id=0, eos_token_id=0)
    model = CLASSES[cls_name](cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval()


def model_outputs(model, ids, hidden=None):
    with torch.no_grad():
        out = model(input_ids=ids)
    if "logits" in out:
        return [out["logits"]]
    if "prediction_logits" in out:
        return [out["prediction_logits"], out["seq_relationship_logits"]]
    return [out["last_hidden_state"][..., :hidden]]


def max_rel(a, b):
    return ((a.double() - b.double()).abs().max() / a.double().abs().max()).item()


def check_fpi_off_an_integer_ratio(cls: str, growths, ids) -> None:
    """FPI off an integer hidden ratio moves only the norms' statistics (docs/growth.md): for each
    (source, target), copy counts differ by at most one and the logits stay within the documented
    bound (0.5 relative), without being preserved."""
    from growth.adapters.hf import grow_model
    for draw, (source, target) in enumerate(growths):
        small = make_model(cls, source, seed=draw)
        grown, manifest = grow_model(small, target, width="fpi", seed=draw)
        assert not manifest["exact"]
        counts = torch.bincount(torch.tensor(manifest["hidden_map"]))
        assert counts.max() - counts.min() <= 1
        rel = max_rel(model_outputs(small, ids)[0], model_outputs(grown, ids)[0])
        assert 0 < rel < 0.5, (source, target, rel)


def random_growth(rng: random.Random, integer_hidden: bool = True, max_layers: int = 3):
    """A source shape and a wider target: hidden ratio integer (or not), heads and FFN free."""
    # hidden >= 8: a LayerNorm over 2 or 4 units is too ill-conditioned for a 1e-5 float32 check
    heads, head_dim = rng.choice([2, 3, 4]), rng.choice([4, 6, 8])
    source = Shape(rng.randint(1, max_layers), heads * head_dim, heads, rng.randint(8, 40))
    while True:
        if integer_hidden:
            hidden = source.hidden * rng.choice([1, 2, 3])
        else:
            hidden = source.hidden + rng.randint(1, source.hidden - 1) if source.hidden > 1 else 3
            if hidden % source.hidden == 0:
                continue
        options = [h for h in range(heads, hidden + 1) if hidden % h == 0 and hidden // h >= head_dim]
        if options:
            break
    target = Shape(source.layers, hidden, rng.choice(options), source.ffn + rng.randint(0, 30))
    return source, target


@pytest.fixture
def ids():
    return torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(7))


# The longest test files first (seconds summed over their tests, `pytest -n 2 --dist loadfile
# --no-loadscope-reorder --durations=0`, 2026-12-04): pytest-xdist's loadfile hands out files in
# this order, so the two workers finish together instead of one running a long file alone at the
# end. The SLURM file comes third, so that the background install of its packages (below) is done
# when its cluster starts.
LONGEST_FIRST = ["test_train.py", "test_run.py", "test_slurm.py", "test_kill_campaign.py", "test_killed_writers.py",
                 "test_zero_growth.py", "test_two_stage.py", "test_first_hour.py", "test_sources.py",
                 "test_gpu_check.py", "test_runlock.py", "test_cli.py"]


def pytest_configure(config):
    """On a machine without SLURM (CI's fresh Debian), its packages start installing now, in the
    background, while the first test files run: the SLURM tests come later in the order and find
    them installed, or wait for the rest (tests/slurm_cluster.py). Only in the controller (or a
    run without xdist), and only when the run may include the SLURM tests."""
    import slurm_cluster
    paths = [Path(a.split("::")[0]) for a in config.args] or [Path(__file__).parent]
    if os.environ.get("PYTEST_XDIST_WORKER") or os.geteuid() != 0 or slurm_cluster.installed() or \
            not any(p.is_dir() or p.name == "test_slurm.py" for p in paths):
        return
    with open(Path(tempfile.gettempdir()) / "b2b-slurm-install.log", "w") as log:
        config.slurm_install = subprocess.Popen([sys.executable, slurm_cluster.__file__, "install"], stdout=log,
                                                stderr=subprocess.STDOUT, start_new_session=True)


def pytest_unconfigure(config):
    if hasattr(config, "slurm_install"):  # never left half-done by the session's end (it ends long before)
        config.slurm_install.wait()


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: tests keep their order within a file
