"""torchrun worker for tests/test_megatron_growth.py (world size 2, gloo, real megatron-core).

    torchrun --nproc-per-node 2 tests/megatron_worker.py save DIR [FAMILY]
        a GPT (FAMILY gpt2, the default) or a Llama (llama: 8 query heads in 4 groups, SwiGLU, RoPE,
        untied) at TP=2: DIR/source (torch_dist, as `b2b train` writes it) and DIR/legacy
        (Megatron-LM's iter_XXXXXXX/mp_rank_XX/model_optim_rng.pt), each with config.json
    torchrun --nproc-per-node 2 tests/megatron_worker.py logits DIR CKPT...
        each checkpoint loaded by megatron-core's dist_checkpointing at TP=2 and at TP=1; rank 0
        writes DIR/logits.pt: {(checkpoint, tp): logits over the real vocabulary}
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import AutoConfig, GPT2Config, LlamaConfig  # noqa: E402

from launchers.megatron import GPT, load_dist, save_dist  # noqa: E402

VOCAB, ROWS, POSITIONS = 300, 384, 32
CONFIG = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": 2, "n_embd": 64, "n_head": 4,
          "n_inner": 256, "n_positions": POSITIONS, "vocab_size": VOCAB, "padded_vocab_size": ROWS,
          "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "tie_word_embeddings": True,
          "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2, "hidden_size": 64,
         "num_attention_heads": 8, "num_key_value_heads": 4, "intermediate_size": 96,
         "max_position_embeddings": POSITIONS, "vocab_size": VOCAB, "padded_vocab_size": ROWS, "rms_norm_eps": 1e-6,
         "tie_word_embeddings": False, "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}}
FAMILIES = {"gpt2": (GPT2Config, CONFIG), "llama": (LlamaConfig, LLAMA)}


def parallel(tp: int) -> None:
    from megatron.core import parallel_state as ps
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp)


def save(out: Path, family: str = "gpt2") -> None:
    parallel(2)
    config_class, config = FAMILIES[family]
    model = GPT(config_class(**config), seed=3)
    with torch.no_grad():  # megatron initialises biases and the padding rows to zero: make them matter
        for p in model.gpt.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.02)
    (out / "source").mkdir(parents=True, exist_ok=True)
    dist.barrier()
    save_dist(model, out / "source")
    from megatron.core import parallel_state as ps
    rank = ps.get_tensor_model_parallel_rank()
    legacy = out / "legacy" / "iter_0000007" / f"mp_rank_{rank:02d}"
    legacy.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.gpt.state_dict(), "iteration": 7, "checkpoint_version": 3.0,
                "args": argparse.Namespace(tensor_model_parallel_size=2, num_layers=2)}, legacy / "model_optim_rng.pt")
    if dist.get_rank() == 0:
        for where in (out / "source", out / "legacy"):
            (where / "config.json").write_text(json.dumps(config))
        (out / "legacy" / "latest_checkpointed_iteration.txt").write_text("7")


def logits(out: Path, checkpoints: list[str]) -> None:
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    result = {"ids": ids}
    for tp in (2, 1):
        parallel(tp)
        for ckpt in checkpoints:
            model = GPT(AutoConfig.from_pretrained(ckpt), seed=11).eval()
            load_dist(model, ckpt)
            with torch.no_grad():
                result[(ckpt, tp)] = model(ids).logits
    if dist.get_rank() == 0:
        torch.save(result, out / "logits.pt")


def main() -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    command, out, *rest = sys.argv[1:]
    if command == "save":
        save(Path(out), *rest)
    else:
        logits(Path(out), rest)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
