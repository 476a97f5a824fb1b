"""Worker for tests/test_zero_growth.py, started with torchrun (gloo on CPU): real DeepSpeed engines.

    save DIR   train each tiny model of SOURCES a few steps with ZeRO and save a checkpoint in
               DIR/<name> (plus its HF config.json in the tag directory, as b2b train does), the
               full fp32 weights as DeepSpeed itself reports them (DIR/<name>.reference.pt,
               rank 0), and one step later another save (DIR/<name>-later).
    load DIR   for each DIR/<name>.grown (a universal checkpoint written by `b2b grow`), build the
               target model, load the checkpoint with load_universal at the ZeRO stage named in
               DIR/<name>.grown.stage, and write what DeepSpeed holds afterwards and the logits of
               fixed inputs, then train one step (DIR/<name>.loaded-<world>.pt, rank 0).
"""

import json
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, BertConfig, GPT2Config, LlamaConfig

from launchers.workers import init_distributed

VOCAB = 101
# name: (architecture, ZeRO stage, precision, optimizer, tied output)
SOURCES = {
    "bert-z1-fp32": ("bert", 1, "fp32", "adamw", True),
    "bert-z2-bf16": ("bert", 2, "bf16", "adamw", True),
    "bert-z3-fp32": ("bert", 3, "fp32", "adamw", True),
    "gpt2-z1-bf16": ("gpt2", 1, "bf16", "adamw", True),
    "gpt2-z2-fp32": ("gpt2", 2, "fp32", "adamw", False),
    "gpt2-z3-bf16": ("gpt2", 3, "bf16", "adamw", True),
    "llama-z1-bf16": ("llama", 1, "bf16", "adamw", False),  # grouped-query attention: 2 heads, 1 KV head
    "llama-z3-fp32": ("llama", 3, "fp32", "adamw", True),
    "bert-z2-sgd": ("bert", 2, "fp32", "sgd", True),
}
STEPS = 3


def ids(seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))


def ds_config(stage: int, precision: str = "fp32", optimizer: str = "adamw", universal: bool = False) -> dict:
    cfg = {"train_batch_size": 2 * dist.get_world_size(), "train_micro_batch_size_per_gpu": 2,
           "zero_optimization": {"stage": stage}, "bf16": {"enabled": precision == "bf16"},
           "gradient_clipping": 1.0, "steps_per_print": 10 ** 9, "zero_allow_untested_optimizer": True,
           "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_num_steps": 2, "total_num_steps": 20,
                                                             "warmup_max_lr": 1e-2}}}
    if optimizer == "adamw":
        cfg["optimizer"] = {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True, "weight_decay": 0.01}}
    if universal:
        cfg["checkpoint"] = {"load_universal": True}
    return cfg


def engine(model, cfg: dict, optimizer: str = "adamw"):
    named = list(model.named_parameters())
    groups = [{"params": [p for n, p in named if not n.endswith("bias")], "weight_decay": 0.01},
              {"params": [p for n, p in named if n.endswith("bias")], "weight_decay": 0.0}]
    opt = torch.optim.SGD(groups, lr=1e-2, momentum=0.9) if optimizer == "sgd" else None
    eng, *_ = deepspeed.initialize(model=model, model_parameters=None if opt else groups, optimizer=opt, config=cfg)
    return eng


def train(eng, steps: int, seed: int) -> float:
    for step in range(steps):
        batch = ids(seed + 10 * step + dist.get_rank())
        loss = eng(input_ids=batch, labels=batch).loss
        eng.backward(loss)
        eng.step()
    return loss.item()


def full_state(eng, with_moments: bool) -> dict:
    state = {}
    for name, p in eng.module.named_parameters():
        state[name] = {"fp32": safe_get_full_fp32_param(p)}
        if with_moments:
            for key in ("exp_avg", "exp_avg_sq"):
                state[name][key] = safe_get_full_optimizer_state(p, key)
    return state


def save(out: Path) -> None:
    for name, (arch, stage, precision, optimizer, tied) in SOURCES.items():
        torch.manual_seed(0)
        if arch == "bert":
            cfg = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=37, max_position_embeddings=32, tie_word_embeddings=tied)
            model = AutoModelForMaskedLM.from_config(cfg)
        elif arch == "llama":
            cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                              num_key_value_heads=1, intermediate_size=37, max_position_embeddings=32,
                              tie_word_embeddings=tied)
            model = AutoModelForCausalLM.from_config(cfg)
        else:
            cfg = GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_inner=37, n_positions=32,
                             tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0)
            model = AutoModelForCausalLM.from_config(cfg)
        eng = engine(model, ds_config(stage, precision, optimizer), optimizer)
        train(eng, STEPS, seed=1)
        tag = f"step{STEPS:08d}"
        reference = full_state(eng, False)
        eng.save_checkpoint(str(out / name), tag, client_state={"b2b": {"step": STEPS}})
        train(eng, 1, seed=2)
        eng.save_checkpoint(str(out / f"{name}-later"), f"step{STEPS + 1:08d}")  # for mixed-save tests
        if dist.get_rank() == 0:
            cfg.architectures = [type(model).__name__]
            cfg.save_pretrained(out / name / tag)
            torch.save(reference, out / f"{name}.reference.pt")
        dist.barrier()
        eng.destroy()


def load(out: Path) -> None:
    world = dist.get_world_size()
    for grown in sorted(out.glob("*.grown")):
        stage = int((out / f"{grown.name}.stage").read_text())
        torch.manual_seed(123)  # any initialisation: the checkpoint must replace it
        cfg = AutoConfig.from_pretrained(grown)
        auto = AutoModelForMaskedLM if cfg.model_type == "bert" else AutoModelForCausalLM
        eng = engine(auto.from_config(cfg), ds_config(stage, universal=True))
        keep = json.loads((grown / "growth.json").read_text())["schedule"] == "keep"
        eng.load_checkpoint(str(grown), load_optimizer_states=True, load_lr_scheduler_states=keep)
        loaded = full_state(eng, True)
        eng.eval()
        with torch.no_grad():
            logits = eng(input_ids=ids(99)).logits.float()
        eng.train()
        loss = train(eng, 1, seed=5)
        after = full_state(eng, False)
        if dist.get_rank() == 0:
            torch.save({"state": loaded, "logits": logits, "loss": loss, "after": after,
                        "lr_iteration": eng.lr_scheduler.last_batch_iteration},
                       out / f"{grown.stem}.loaded-{world}.pt")
        dist.barrier()
        eng.destroy()


if __name__ == "__main__":
    init_distributed(cpu=True)  # as the trainer's workers
    {"save": save, "load": load}[sys.argv[1]](Path(sys.argv[2]))
    dist.destroy_process_group()
