"""YAML files into typed dataclass trees: the loader behind every recipe and recipe set.

A file may name a `base:` file (a path relative to itself) and then only the keys that differ;
`--set key.sub=value` overrides are read as YAML. Duplicate keys, unknown keys (with the closest
known one suggested) and values of the wrong type raise RecipeError naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path

import yaml

from growth import B2BError


class RecipeError(B2BError):
    """A bad recipe or command line: the message names the key and how to fix it."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping."""


def _mapping(loader, node, deep=False):
    seen = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise RecipeError(f"duplicate key {key!r} (line {seen[key]} and line {key_node.start_mark.line + 1}): "
                              "keep one")
        seen[key] = key_node.start_mark.line + 1
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error in one line: what is wrong and where."""
    mark = getattr(err, "problem_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"{' '.join(problem.split())}{where}"


def read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise RecipeError(f"{path}: no such recipe file")
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except RecipeError as err:
        raise RecipeError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML: {yaml_problem(err)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of sections, got {type(data).__name__}")
    return data


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_raw(path: Path, _chain: tuple = ()) -> dict:
    """The recipe's mapping with its `base:` chain merged in (the recipe's own keys win)."""
    path = Path(path).resolve()
    if path in _chain:
        raise RecipeError(f"{path}: base recipes form a cycle: {' -> '.join(map(str, _chain + (path,)))}")
    data = read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise RecipeError(f"{path}: base: expected a recipe path, got {base!r}")
    return merge(load_raw(path.parent / base, _chain + (path,)), data)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """`key.sub=value` overrides; the value is read as YAML (numbers, lists, null)."""
    data = merge({}, data)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise RecipeError(f"--set {item!r}: expected key=value, e.g. --set optim.lr=3e-4")
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError as err:
            raise RecipeError(f"--set {item!r}: the value is not valid YAML: {yaml_problem(err)}") from None
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RecipeError(f"--set {key}: {part} is not a section")
        node[leaf] = value
    return data


# ---------------------------------------------------------------- typed tree


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def _convert(value, tp, key: str):
    """value checked (and int -> float widened) against a field's annotated type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        given = [o for o in options if o is not type(None)]
        if len(given) == 1:  # X | None: X's own error, which names the key inside it
            return _convert(value, given[0], key)
        for option in options:
            if option is not type(None):
                try:
                    return _convert(value, option, key)
                except RecipeError:
                    pass
        raise RecipeError(f"{key}: expected {' or '.join(_type_name(o) for o in options)}, got {value!r}")
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{key}: expected a mapping, got {value!r}")
        _, item = typing.get_args(tp)
        return {k: build(item, v, f"{key}.{k}.") if dataclasses.is_dataclass(item) else _convert(v, item, f"{key}.{k}")
                for k, v in value.items()}
    if origin is list:
        if isinstance(value, str) and typing.get_args(tp) == (str,):
            value = [value]  # a single path (--set data.files=/path)
        if not isinstance(value, list):
            raise RecipeError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [build(item, v, f"{key}[{i}].") if dataclasses.is_dataclass(item) else _convert(v, item, f"{key}[{i}]")
                for i, v in enumerate(value)]
    if tp is typing.Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value) if abs(value) < 1 << 1000 else math.inf
    if tp is float and isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if tp is float and isinstance(value, float) and not math.isfinite(value):
        raise RecipeError(f"{key}: expected a finite number, got {value!r}")
    if tp is bool and not isinstance(value, bool) or not isinstance(value, tp) or \
            (tp is int and isinstance(value, bool)):
        raise RecipeError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    return value


def build(cls, data, prefix: str = ""):
    if not isinstance(data, dict):
        raise RecipeError(f"{prefix.rstrip('.') or 'recipe'}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), names, n=1)
        hint = f"did you mean {prefix}{close[0]}?" if close else f"known keys here: {', '.join(names)}"
        raise RecipeError(f"unknown key {prefix}{key}: {hint}")
    values = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            values[name] = build(tp, value, f"{prefix}{name}.")
        else:
            values[name] = _convert(value, tp, f"{prefix}{name}")
    return cls(**values)
