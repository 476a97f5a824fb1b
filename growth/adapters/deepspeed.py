"""DeepSpeed ZeRO checkpoints: grow them shard by shard, optimizer state included, into a
DeepSpeed universal checkpoint, without ever holding the whole model.

Source: a checkpoint that `engine.save_checkpoint` wrote with ZeRO stage 1, 2 or 3, fp32 or
bf16, at any data-parallel (DP) size (docs/zero-growth.md has the layouts). The fp32
master weights and Adam's moments live in the per-rank optimizer files; a parameter is read by
slicing its fragments out of the ranks that hold them (stage 1/2: `param_slice_mappings`;
stage 3: each parameter split into DP equal pieces) and concatenating them. Each rank file is
memory-mapped for one parameter and released again, so peak memory follows the largest
parameter, not the model.

Output: DeepSpeed's universal layout (what deepspeed/checkpoint/ds_to_universal.py writes), one
directory per parameter, which DeepSpeed loads at any DP size and ZeRO stage 1-3 with
`"checkpoint": {"load_universal": true}`:

    OUT/config.json, tokenizer files, growth.json    the target model, as for an HF source
    OUT/latest_universal                              names TAG
    OUT/TAG/mp_rank_00_model_states.pt                step counters, lr schedule, client state
    OUT/TAG/zero_pp_rank_0_mp_rank_00_model_states.pt the same, where a ZeRO-3 engine looks
    OUT/TAG/zero/optimizer_state.pt                   param groups and the Adam step
    OUT/TAG/zero/<param>/{fp32,exp_avg,exp_avg_sq,step}.pt

The weights are grown by the same Grower as in memory, so they are bit-identical to
consolidating first (zero_to_fp32) and growing with the same seed. `optimizer="grow"` grows
exp_avg and exp_avg_sq with AxisMap.factor and keeps Adam's step; `"reset"` writes zero moments
and step 0, which is exactly a fresh Adam (DeepSpeed's ZeRO-3 universal loader needs the files).

Files are read with weights_only=True; the three small DeepSpeed classes a checkpoint pickles
beside its tensors are read as plain stand-ins, so reading neither imports DeepSpeed nor runs
code from the file.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..errors import GrowthError
from ..grow import check_source
from .files import (
    atomic_directory,
    copy_side_files,
    dump_manifest,
    free_output,
    grower_for,
    load_torch,
    read_latest,
    target_config,
)

OPTIMIZERS = ("reset", "grow")
SCHEDULES = ("restart", "keep")
STATES = {"fp32": 0, "exp_avg": 1, "exp_avg_sq": 2}  # universal file name -> Grower moment
ADAM_KEYS = {"step", "exp_avg", "exp_avg_sq"}


# -- reading files: weights_only, with stand-ins for DeepSpeed's pickled classes --------------

class _Attributes:
    """Stand-in for a pickled DeepSpeed object: its attributes only (LossScaler, fragment_address)."""


_SAFE = [(_Attributes, "deepspeed.runtime.fp16.loss_scaler.LossScaler"),
         (int, "deepspeed.runtime.zero.config.ZeroStageEnum"),
         (_Attributes, "deepspeed.utils.tensor_fragment.fragment_address")]


def load_file(path: Path) -> dict:
    """A checkpoint file, memory-mapped: tensors are read when sliced."""
    state = load_torch(path, _SAFE, what="checkpoint file")
    if not isinstance(state, dict):
        raise GrowthError(f"{path}: not a DeepSpeed checkpoint file")
    return state


def is_checkpoint(path: Path) -> bool:
    """A DeepSpeed checkpoint root (with 'latest') or one of its tag directories."""
    path = Path(path)
    return (path / "latest").is_file() or any(path.glob("*model_states.pt"))


def _field(state: dict, *keys, path: Path):
    try:
        for key in keys:
            state = state[key]
        return state
    except (KeyError, IndexError, TypeError):
        raise GrowthError(f"{path}: missing {'/'.join(map(str, keys))}: not a ZeRO checkpoint "
                          "written by DeepSpeed, or a damaged one") from None


class ZeroCheckpoint:
    """One saved ZeRO checkpoint: names and shapes of its trainable parameters, and each one's
    fp32 weights or Adam moments, read from the rank files on demand."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if (path / "latest").is_file():
            tag = read_latest(path / "latest")
            if not (path / tag).is_dir():
                raise GrowthError(f"{path / 'latest'} names {tag!r}, which is missing")
            path = path / tag
        if not path.is_dir():
            raise GrowthError(f"{path}: no such checkpoint directory")
        self.path, self.tag = path, path.name
        models = sorted(path.glob("*model_states.pt"))
        if not models:
            raise GrowthError(f"{path}: no *_model_states.pt: not a DeepSpeed checkpoint directory")
        meta = load_file(models[0])
        self.meta = meta
        self.dp = _field(meta, "dp_world_size", path=models[0])
        if _field(meta, "mp_world_size", path=models[0]) != 1:
            raise GrowthError(f"{path}: saved with model (tensor) parallelism {meta['mp_world_size']}; "
                              "only data-parallel ZeRO checkpoints are grown here")
        groups = _field(meta, "param_shapes", path=models[0])
        self.shapes = {name: tuple(shape) for g in groups for name, shape in g.items()}
        # parameters frozen when the save happened are listed again; only those outside the optimizer
        # (frozen before the engine was built) have no optimizer state to grow
        outside = [name for name in meta.get("frozen_param_shapes") or {} if name not in self.shapes]
        if outside:
            raise GrowthError(f"{path}: parameters {outside[:3]} were frozen when the engine was built, so ZeRO "
                              "keeps no optimizer state for them; not supported")

        prefix = "bf16_" if (path / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt").is_file() else ""
        self.optim_files = [path / f"{prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(self.dp)]
        missing = [f.name for f in self.optim_files if not f.is_file()]
        if missing:
            if not any(path.glob("*optim_states.pt")):
                raise GrowthError(f"{path}: no ZeRO optimizer files: a ZeRO stage-0 checkpoint holds the whole "
                                  "model in its model states; export it as an HF directory and grow that")
            raise GrowthError(f"{path}: missing rank file(s) {missing} of a data-parallel size {self.dp} save")
        extra = sorted(set(path.glob("*optim_states.pt")) - set(self.optim_files))
        if extra:
            raise GrowthError(f"{path}: optimizer files of another save or DP size: {[f.name for f in extra]}")

        self._index = {}  # name -> [(rank, group, start, numel)] (stage 1/2) or (offset, piece) (stage 3)
        steps, stages = set(), set()
        for rank, file in enumerate(self.optim_files):
            osd = _field(load_file(file), "optimizer_state_dict", path=file)
            stage = int(_field(osd, "zero_stage", path=file))
            stages.add(stage)
            count = osd.get("partition_count")
            if (max(count) if isinstance(count, list) else count) != self.dp:
                raise GrowthError(f"{file}: partitioned {count} ways but the model states say DP size {self.dp}: "
                                  "files from two different saves")
            state = _field(osd, "base_optimizer_state" if stage < 3 else "optimizer_state_dict", "state", path=file)
            for group in state.values():
                if set(group) != ADAM_KEYS:
                    raise GrowthError(f"{file}: optimizer state {sorted(group)}: only Adam/AdamW checkpoints "
                                      f"(state {sorted(ADAM_KEYS)}) can be grown")
                steps.add(float(group["step"]))
            if stage < 3:
                for g, mapping in enumerate(_field(osd, "param_slice_mappings", path=file)):
                    for name, frag in mapping.items():
                        self._index.setdefault(name, []).append((rank, g, frag.start, frag.numel))
            else:
                sizes = [t.numel() for t in _field(osd, "fp32_flat_groups", path=file)]
                self._check_stage3(file, sizes)
        if len(stages) != 1 or len(steps) != 1:
            raise GrowthError(f"{path}: rank files disagree (ZeRO stages {sorted(stages)}, Adam steps "
                              f"{sorted(steps)}): "
                              "files from two different saves are mixed")
        self.stage, self.step = stages.pop(), steps.pop()
        if self.stage == 3:
            self._check_stage3_models(models)
        else:
            for name, shape in self.shapes.items():
                got = sum(f[3] for f in self._index.get(name, []))
                if got != math.prod(shape):
                    raise GrowthError(f"{path}: {name} has {got} of its {math.prod(shape)} elements in the rank files: "
                                      "files from two different saves, or a partial save")

    def _check_stage3(self, file: Path, sizes: list[int]) -> None:
        """Stage 3 splits every parameter into DP pieces of ceil(n / DP), laid end to end."""
        if not self._index:
            offset = 0
            for name, shape in self.shapes.items():
                piece = math.ceil(math.prod(shape) / self.dp)
                self._index[name] = (offset, piece)
                offset += piece
            self._flat = offset
            self._bounds = [0] + list(torch.tensor(sizes).cumsum(0).tolist())
        if sum(sizes) != self._flat:
            raise GrowthError(f"{file}: holds {sum(sizes)} elements where the parameters need {self._flat}: "
                              "files from two different saves, or a partial save")

    def _check_stage3_models(self, models: list[Path]) -> None:
        names = {f.name for f in models}
        wanted = {f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(self.dp)}
        if names != wanted:
            raise GrowthError(f"{self.path}: model-state files {sorted(names)} do not match a DP size {self.dp} "
                              f"ZeRO-3 save (missing {sorted(wanted - names)}, extra {sorted(names - wanted)})")
        for file in models[1:]:
            if load_file(file).get("global_steps") != self.meta.get("global_steps"):
                raise GrowthError(f"{file}: saved at another step than {models[0].name}: files from two saves mixed")

    def read(self, name: str, key: str) -> torch.Tensor:
        """The full fp32 tensor of one parameter's weights ('fp32') or moment ('exp_avg', 'exp_avg_sq'),
        assembled from its fragments; each rank file is mapped for this read only."""
        pieces = []
        if self.stage < 3:
            for rank, group, start, numel in self._index[name]:
                osd = load_file(self.optim_files[rank])["optimizer_state_dict"]
                flat = osd["single_partition_of_fp32_groups"][group] if key == "fp32" else \
                    osd["base_optimizer_state"]["state"][group][key]
                pieces.append(flat[start:start + numel])
        else:
            offset, piece = self._index[name]
            for file in self.optim_files:
                osd = load_file(file)["optimizer_state_dict"]
                flats = osd["fp32_flat_groups"] if key == "fp32" else \
                    [osd["optimizer_state_dict"]["state"][g][key] for g in range(len(self._bounds) - 1)]
                for g, flat in enumerate(flats):  # a piece may cross a sub-group boundary
                    lo, hi = max(offset, self._bounds[g]), min(offset + piece, self._bounds[g + 1])
                    if lo < hi:
                        pieces.append(flat[lo - self._bounds[g]:hi - self._bounds[g]])
        numel = math.prod(self.shapes[name])
        return torch.cat(pieces)[:numel].float().view(self.shapes[name])  # cat copies out of the mapping


# -- growing -----------------------------------------------------------------------------------

def find_config(ckpt: ZeroCheckpoint) -> Path:
    """The HF config.json beside the checkpoint: in the tag directory (b2b train writes it there)
    or its parent (HF Trainer's checkpoint-N/ layout)."""
    for where in (ckpt.path, ckpt.path.parent):
        if (where / "config.json").is_file():
            return where
    raise GrowthError(f"{ckpt.path}: no config.json in the tag directory or its parent: save the model's HF "
                      "config there (model.config.save_pretrained) so that its architecture is known")


def _model_states(ckpt: ZeroCheckpoint, shapes: dict, schedule: str) -> dict:
    """The model-states file of the grown checkpoint: DeepSpeed reads counters, the lr schedule and
    the client state from it; weights come from zero/ (module is empty)."""
    meta = {k: v for k, v in ckpt.meta.items() if k not in ("module", "optimizer", "param_shapes")}
    meta.update(module={}, buffer_names=[], param_shapes=[{n: torch.Size(s) for n, s in shapes.items()}],
                frozen_param_shapes={}, frozen_param_fragments={}, mp_world_size=1)
    if schedule == "restart":
        meta.update(lr_scheduler={"last_batch_iteration": -1}, global_steps=0, global_samples=0, skipped_steps=0)
    return meta


def _optimizer_state(ckpt: ZeroCheckpoint, count: int, step: torch.Tensor) -> dict:
    """zero/optimizer_state.pt. DeepSpeed's stage 1/2 universal loader pairs the engine's param groups
    with this list and skips every group beyond its end, so the source's groups are padded with
    its last one up to one per target parameter: any grouping of the target loads. The loaders
    copy these hyperparameters into the engine's groups; set your own after loading (b2b train does)."""
    osd = load_file(ckpt.optim_files[0])["optimizer_state_dict"]
    inner = osd["base_optimizer_state" if ckpt.stage < 3 else "optimizer_state_dict"]
    groups = [{k: v for k, v in g.items() if k != "params"} for g in inner["param_groups"]]
    groups += [groups[-1]] * max(0, count - len(groups))
    return {"ds_version": ckpt.meta.get("ds_version", "0"), "zero_stage": ckpt.stage,
            "param_groups": [dict(g, params=[]) for g in groups],
            "optimizer_state_dict": {"state": {0: {"step": step}}, "param_groups": [dict(groups[0], params=[])]}}


def grow_checkpoint(src: str | Path, out: str | Path, to: str, optimizer: str = "reset", schedule: str = "restart",
                    overwrite: bool = False, log=print, **options) -> dict:
    """`b2b grow CKPT`: grow a ZeRO checkpoint into a universal checkpoint in `out` (`options`: the
    Grower's width, depth, seed, symmetry, noise_db, insert); returns the manifest."""
    if optimizer not in OPTIMIZERS:
        raise GrowthError(f"--optimizer {optimizer!r}: choose one of {OPTIMIZERS}")
    if schedule not in SCHEDULES:
        raise GrowthError(f"--schedule {schedule!r}: choose one of {SCHEDULES}")
    out = free_output(out, overwrite)
    ckpt = ZeroCheckpoint(src)
    where = find_config(ckpt)
    cfg, grower = grower_for(where, to, **options)
    source, target = grower.source, grower.target
    check_source(ckpt.shapes, grower.schema, source)
    plan = grower.plan(ckpt.shapes)
    names = list(ckpt.shapes)
    manifest = {"source": str(ckpt.path), "source_format": f"deepspeed zero-{ckpt.stage} dp={ckpt.dp}",
                **grower.manifest(), "optimizer": optimizer, "schedule": schedule, "adam_step": ckpt.step,
                "format": "deepspeed universal checkpoint: load with \"checkpoint\": {\"load_universal\": true}"}
    log(f"growing {cfg['model_type']} {source} -> {target} from a ZeRO-{ckpt.stage} checkpoint at DP {ckpt.dp} "
        f"({grower.describe()}, optimizer {optimizer}, schedule {schedule})")

    with atomic_directory(out) as tmp:
        zero = tmp / ckpt.tag / "zero"
        zero.mkdir(parents=True)
        step = torch.tensor(ckpt.step if optimizer == "grow" else 0.0)
        for key, moment in STATES.items():
            if key == "fp32" or optimizer == "grow":
                grown = grower.items(names, lambda name, key=key: ckpt.read(name, key), moment=moment)
            else:
                grown = ((name, torch.zeros(shape)) for name, _, shape in plan)
            for name, tensor in grown:
                (zero / name).mkdir(exist_ok=True)
                torch.save({"param": tensor}, zero / name / f"{key}.pt")
        for name, _, _ in plan:
            torch.save(step, zero / name / "step.pt")
        torch.save(_optimizer_state(ckpt, len(plan), step), zero / "optimizer_state.pt")
        meta = _model_states(ckpt, {name: shape for name, _, shape in plan}, schedule)
        for file in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
            torch.save(meta, tmp / ckpt.tag / file)
        (tmp / "latest_universal").write_text(ckpt.tag)
        copy_side_files(where, tmp, target_config(cfg, target))
        (tmp / "growth.json").write_text(dump_manifest(manifest))
    log(f"wrote {out} (tag {ckpt.tag})")
    return manifest


def universal_tag(path: str | Path) -> str | None:
    """The tag of a grown (universal) checkpoint directory, or None if `path` is not one."""
    latest = Path(path) / "latest_universal"
    return latest.read_text().strip() if latest.is_file() else None


def read_universal(path: str | Path, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """The fp32 weights of a universal checkpoint (for checks and exports; small models)."""
    zero = Path(path) / universal_tag(path) / "zero"
    names = names or sorted(p.name for p in zero.iterdir() if p.is_dir())
    return {name: torch.load(zero / name / "fp32.pt", map_location="cpu", weights_only=True)["param"]
            for name in names}

