"""Width and depth growth of a state dict, driven by the architecture's schema.

Pure tensor code: names and tensors in, names and tensors out. `Grower` yields the grown
parameters one at a time from a getter, so a format adapter can read and write them
shard by shard; `grow_state_dict` is the in-memory convenience on top.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Iterator, Mapping

import torch

from .errors import GrowthError
from .maps import (
    AxisMap,
    fused_qkv,
    glu,
    grouped_heads_map,
    interleaved_layers,
    layer_axis_maps,
    layer_map,
    prefix_map,
    split_shares,
    zero_sum_over_copies,
)
from .schema import Param, Schema
from .shape import Shape, check_growable

WIDTH_METHODS = ("fpi", "aki", "direct", "exact")
DEPTH_METHODS = ("stack", "identity")
# split: unequal fan-in shares of the copies (LEMON); noise: zero-sum noise over the copies' fan-in
# weights (HyperCloning). Both are exact at step 0 wherever 'none' is.
SYMMETRY_METHODS = ("none", "split", "noise")
FAN_IN = ("h_in", "a_in", "f_in")
FAN_OUT_NEW_UNITS = ("a_out", "q_out", "kv_out", "qkv_out", "hqkv_out", "f_out", "glu_out")  # AKI fills from l+1
# how many blocks of an axis one tensor-parallel rank holds in a megatron-core checkpoint: SwiGLU's
# fc1 is [gate; up] there, rank r's shard the r-th block of each half (fragments r and T + r of 2T)
FRAGMENTS = {"glu_out": 2}


def axis_size(role: str | None, shape: Shape) -> int | None:
    return {None: None, "h_out": shape.hidden, "h_in": shape.hidden, "a_out": shape.hidden,
            "q_out": shape.hidden, "a_in": shape.hidden, "kv_out": shape.kv_heads * shape.head_dim,
            "qkv_out": 3 * shape.hidden,
            "hqkv_out": (shape.heads + 2 * shape.kv_heads) * shape.head_dim,
            "f_out": shape.ffn, "f_in": shape.ffn, "glu_out": 2 * shape.ffn}[role]


def check_source(shapes: Mapping[str, tuple], schema: Schema, source: Shape) -> None:
    """Every key known, every grown axis the size the config says, every layer complete."""
    seen: dict[int, set] = {}
    for name, shape in shapes.items():
        param = schema.lookup(name)
        if param is None:
            continue
        layer, template = schema.split(name)
        if layer is not None:
            if layer >= source.layers:
                raise GrowthError(f"{name}: layer {layer} but the config has {source.layers} layers")
            seen.setdefault(layer, set()).add(template)
        if len(shape) != len(param.axes):
            raise GrowthError(f"{name}: shape {tuple(shape)} has {len(shape)} axes, expected {len(param.axes)}")
        for dim, role in enumerate(param.axes):
            expected = axis_size(role, source)
            if expected is not None and shape[dim] != expected:
                raise GrowthError(f"{name}: shape {tuple(shape)} does not match the config "
                                  f"({source}): axis {dim} should be {expected}")
    layer_templates = {t for t, p in schema.params.items() if "{L}" in t and not p.optional}
    for layer in range(source.layers):
        missing = layer_templates - seen.get(layer, set())
        if missing:
            raise GrowthError(f"layer {layer} is missing {sorted(missing)[:3]}: partial or corrupt checkpoint")


def _init_like(param: Param, shape: tuple, dtype, gen: torch.Generator, std: float) -> torch.Tensor:
    if param.kind in ("norm_w", "head_norm_w"):
        return torch.ones(shape, dtype=dtype)
    if param.kind in ("weight", "proj_w", "output"):
        return (torch.randn(shape, generator=gen) * std).to(dtype)
    return torch.zeros(shape, dtype=dtype)


def _scale(t: torch.Tensor, dim: int, scale: torch.Tensor) -> torch.Tensor:
    view = [1] * t.dim()
    view[dim] = -1
    if t.dtype in (torch.float32, torch.float64):
        return t.mul_(scale.to(t.dtype).view(view))
    return (t.float() * scale.float().view(view)).to(t.dtype)


def widen(w: torch.Tensor, axes: tuple, maps: Mapping[str, AxisMap], scaled: bool = True,
          moment: int = 0) -> torch.Tensor:
    """Gather every grown axis by its map; fan-in axes (and queries) also get their scale, or for
    an optimizer moment, the moment's factor (AxisMap.factor)."""
    out = w
    for dim, role in enumerate(axes):
        if role is None:
            continue
        m = maps[role]
        out = out.index_select(dim, m.index)
        factor = m.factor(moment)
        if scaled and factor is not None:
            out = _scale(out, dim, factor)
    return out


def check_insert(insert: str, depth: str) -> None:
    """`--insert`: even, top or every=N, and only with --depth identity."""
    if insert not in ("even", "top") and not re.fullmatch(r"every=\d+", insert):
        raise GrowthError(f"--insert {insert!r}: use even, top or every=N")
    if insert != "even" and depth != "identity":
        raise GrowthError(f"--insert {insert} places identity blocks: it applies to --depth identity")


class Grower:
    def __init__(self, schema: Schema, source: Shape, target: Shape, width: str = "fpi",
                 depth: str = "stack", seed: int = 0, tied: bool = True, init_std: float = 0.02,
                 shards: int = 1, symmetry: str = "none", noise_db: float = 10.0, insert: str = "even"):
        """`shards` > 1: the heads and FFN units grow within each of that many tensor-parallel
        shards (prefix_map(..., shards)), so `grow(..., shard=r)` needs source shard r only.
        `symmetry` 'split': the copies of every grown axis (hidden, heads, head_dim, FFN) get
        unequal fan-in shares (maps.split_shares, drawn from seed + 2 after the maps, so the maps
        are those of 'none'): still exact where 'none' is, but a unit and its copy get different
        gradients from the first step. 'noise': every fan-in weight reading a copied axis (hidden,
        attention units, so heads and head_dim, FFN) is multiplied by 1 + eps, eps Gaussian with
        std 10^(-noise_db / 20) and made zero-sum over each source unit's copies
        (maps.zero_sum_over_copies): the copies read equal inputs, so the fan-in's output is
        unchanged, but each copy's fan-out gets a different gradient.
        `insert` places identity blocks (depth 'identity'): 'even' (LLaMA-Pro: each new block a
        copy of the layer below it, spread evenly through the stack), 'every=N' (one after every
        N source layers), or 'top' (StackBERT's order, the new blocks above the source's)."""
        if width not in WIDTH_METHODS:
            raise GrowthError(f"unknown width method {width!r}: choose one of {WIDTH_METHODS}")
        if depth not in DEPTH_METHODS:
            raise GrowthError(f"unknown depth method {depth!r}: choose one of {DEPTH_METHODS}")
        check_growable(source, target)
        if depth == "identity" and target.layers > source.layers and not schema.pre_ln:
            raise GrowthError(f"--depth identity is exact only for pre-LayerNorm models; "
                              f"{schema.model_type} is post-LN, where a block with zero output "
                              "projections still applies its LayerNorm. Use --depth stack")
        if schema.rope and target.head_dim != source.head_dim:
            raise GrowthError(f"head_dim {source.head_dim} -> {target.head_dim}: {schema.model_type} rotates query and "
                              "key channels by RoPE at frequencies set by head_dim, so a wider head changes every "
                              "rotation; grow heads (and kv_heads) with hidden instead, keeping hidden / heads")
        if symmetry not in SYMMETRY_METHODS:
            raise GrowthError(f"unknown symmetry breaking {symmetry!r}: choose one of {SYMMETRY_METHODS}")
        if symmetry != "none" and width == "direct":
            raise GrowthError("--break-symmetry applies to copied units; --width direct initialises new units "
                              "randomly and copies none: use --break-symmetry none")
        if width == "exact" and target.hidden % source.hidden:
            raise GrowthError(f"--width exact needs an integer hidden ratio so that LayerNorm "
                              f"statistics are unchanged; {source.hidden} -> {target.hidden} is not. "
                              "Use --width fpi (approximately function-preserving)")
        self.schema, self.source, self.target = schema, source, target
        if shards > 1 and width == "direct":
            raise GrowthError("--width direct is not available for tensor-parallel checkpoints; "
                              "use exact, fpi or aki")
        self.width, self.depth, self.seed, self.tied, self.init_std = width, depth, seed, tied, init_std
        if not math.isfinite(noise_db):
            raise GrowthError(f"--noise-db {noise_db}: must be a finite number of decibels")
        self.symmetry, self.noise_db = symmetry, float(noise_db)
        self.shards = shards
        check_insert(insert, depth)
        self.order, self.insert = layer_map(source.layers, target.layers), insert
        self.new_layers = list(range(source.layers, target.layers))
        if depth == "identity" and target.layers > source.layers and insert != "top":
            self.order, self.new_layers = interleaved_layers(
                source.layers, target.layers, None if insert == "even" else int(insert.removeprefix("every=")))

        gen = torch.Generator().manual_seed(seed)
        kind = "random" if width in ("fpi", "aki") else "exact"  # direct: prefix blocks, i mod d
        self.hidden = prefix_map(source.hidden, target.hidden, kind, gen)
        if width == "direct":
            self.layer_maps = [_direct_maps(source, target)] * source.layers
        else:
            grouped = source.group > 1 or target.group > 1  # else one key/value head per query head: one map
            per_layer = []
            for _ in range(source.layers):
                heads, kv = grouped_heads_map(source.heads, target.heads, source.kv_heads, target.kv_heads, kind,
                                              gen, shards)
                per_layer.append((heads, prefix_map(source.head_dim, target.head_dim, kind, gen),
                                  prefix_map(source.ffn, target.ffn, kind, gen, shards), kv if grouped else None))
            if symmetry == "split":
                split = torch.Generator().manual_seed(seed + 2)
                self.hidden = split_shares(self.hidden, split)
                per_layer = [tuple(m and split_shares(m, split) for m in maps) for maps in per_layer]
            self.layer_maps = [layer_axis_maps(self.hidden, *maps) for maps in per_layer]
        self.init_gen = torch.Generator().manual_seed(seed + 1)
        self._last = (None, None)  # grow(): the last source tensor grown, reused by its stacked copies

    # -- what the result is -------------------------------------------------------------

    def describe(self) -> str:
        """The growth options, as the adapters log them."""
        extra = ([f"noise {self.noise_db:g} dB"] if self.symmetry == "noise" else []) + \
            ([f"insert {self.insert}"] if self.depth == "identity" and self.target.layers > self.source.layers else [])
        return ", ".join([f"width {self.width}", f"depth {self.depth}", f"seed {self.seed}",
                          f"symmetry {self.symmetry}", *extra])

    def exactness(self) -> tuple[bool, str]:
        s, t = self.source, self.target
        width_grows = (s.hidden, s.heads, s.kv_heads, s.head_dim, s.ffn) != (t.hidden, t.heads, t.kv_heads,
                                                                             t.head_dim, t.ffn)
        reasons = []
        if width_grows:
            if self.width == "direct":
                reasons.append("direct width initialises new units randomly")
            elif self.width == "aki" and (t.heads > s.heads or t.ffn > s.ffn):
                reasons.append("aki fills new heads/FFN units from layer l+1")
            if not self.hidden.uniform:
                reasons.append(f"hidden ratio {t.hidden}/{s.hidden} is not an integer, so "
                               "LayerNorm statistics change (bounded, see docs/growth.md)")
        if t.layers > s.layers and self.depth == "stack":
            reasons.append("stacked layers change the function")
        return (not reasons), "; ".join(reasons) or "function-preserving"

    def manifest(self) -> dict:
        exact, why = self.exactness()
        return {
            "architecture": self.schema.model_type,
            "source_shape": vars_of(self.source), "target_shape": vars_of(self.target),
            "width": self.width, "depth": self.depth, "seed": self.seed, "symmetry": self.symmetry,
            **({"noise_db": self.noise_db} if self.symmetry == "noise" else {}),
            "tied_output": ("tied: the LayerNorm feeding the output embedding is multiplied by the "
                            "hidden copies' shares" if self.tied else "untied or no output layer"),
            "layer_map": self.order,
            **({"insert": self.insert, "identity_layers": self.new_layers} if self.depth == "identity" else {}),
            "hidden_map": self.hidden.index.tolist(),
            "exact": exact, "exact_reason": why,
        }

    # -- the growth itself --------------------------------------------------------------

    def _grow_one(self, name: str, param: Param, get: Callable[[str], torch.Tensor],
                  layer: int | None, moment: int, shard: int | None = None) -> torch.Tensor:
        maps = self.layer_maps[layer if layer is not None else 0]  # non-layer params use h_* only
        role = param.axes[param.tp] if shard is not None and param.tp is not None else None
        if role is not None:  # `get` returns source shard `shard`; grow the target shard's rows from it
            maps = {**maps, role: maps[role].shard(shard, self.shard_count(param), axis_size(role, self.source))}
        w = get(name)
        if self.width == "direct":
            copy = widen(w, param.axes, maps, scaled=False)
            keep = torch.ones(copy.shape, dtype=torch.bool)
            for dim, role in enumerate(param.axes):
                if role is not None:
                    view = [1] * copy.dim()
                    view[dim] = -1
                    keep &= ~maps[role].is_new.view(view)
            init = torch.zeros_like(copy) if moment else \
                _init_like(param, copy.shape, copy.dtype, self.init_gen, self.init_std)
            return torch.where(keep, copy, init)

        out = widen(w, param.axes, maps, moment=moment)
        if self.width == "aki" and layer is not None and layer + 1 < self.source.layers:
            for dim, role in enumerate(param.axes):
                if role in FAN_OUT_NEW_UNITS:
                    m = maps[role]
                    new = m.is_new.nonzero().squeeze(1)
                    if new.numel():  # widen only the rows of layer l+1 that the new units take
                        only_new = {**maps, role: m.subset(new)}
                        upper = get(self.schema.at_layer(name, layer, layer + 1))
                        out.index_copy_(dim, new, widen(upper, param.axes, only_new, moment=moment))
        if self.symmetry == "noise" and moment == 0:
            out = self._with_noise(name, param, maps, out, shard)
        if self.tied and param.kind.startswith("head_norm"):
            extra = self.hidden.share  # an extra weight scale, so a moment gets its inverse power
            out = _scale(out, 0, extra if moment == 0 else extra ** -moment)
        return out

    def _with_noise(self, name: str, param: Param, maps: Mapping[str, AxisMap], w: torch.Tensor,
                    shard: int | None) -> torch.Tensor:
        """w x (1 + eps) along the fan-in axis (Grower's 'noise'). eps is drawn per source tensor and,
        for a tensor-parallel parameter, per shard, so that a shard grown alone gets its part of
        what the whole tensor gets (and stacked copies of a layer get the same noise)."""
        dim = next((d for d, role in enumerate(param.axes) if role in FAN_IN), None)
        if dim is None:
            return w
        sharded = param.tp is not None and self.shards > 1
        if sharded and shard is None:
            parts = w.chunk(self.shard_count(param), param.tp)
            eps = torch.cat([self._draw(name, r, p.shape) for r, p in enumerate(parts)], param.tp)
        else:
            eps = self._draw(name, shard if sharded else None, w.shape)
        m = maps[param.axes[dim]]
        eps = zero_sum_over_copies(eps, dim, m.index, m.share)
        return (w.double() * (1 + eps)).to(w.dtype)

    def shard_count(self, param: Param) -> int:
        """Into how many blocks a tensor-parallel checkpoint splits the parameter's sharded axis
        (the shards, times FRAGMENTS), each grown from the same block of the source."""
        return self.shards * FRAGMENTS.get(param.axes[param.tp], 1) if param.tp is not None else 1

    def _draw(self, name: str, shard: int | None, shape: tuple) -> torch.Tensor:
        key = hashlib.sha256(f"{self.seed}/{name}/{shard}".encode()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(key[:8], "little") >> 1)
        return torch.randn(shape, generator=gen, dtype=torch.float64) * 10 ** (-self.noise_db / 20)

    def _jobs(self, names: list[str]) -> Iterator[tuple[str, str, Param, int | None, int | None]]:
        """(target name, source name, param, source layer, target layer) in output order:
        non-layer parameters, then each source layer's parameters for every target layer
        that stacks it."""
        by_layer: dict[int, list[tuple[str, Param]]] = {}
        for name in names:
            param = self.schema.lookup(name)
            if param is None or (self.tied and param.kind == "output"):
                continue
            layer, _ = self.schema.split(name)
            if layer is None:
                yield name, name, param, None, None
            else:
                by_layer.setdefault(layer, []).append((name, param))
        for src_layer in range(self.source.layers):
            targets = [t for t, s in enumerate(self.order) if s == src_layer]
            for name, param in by_layer.get(src_layer, []):
                for t in targets:
                    yield self.schema.at_layer(name, src_layer, t), name, param, src_layer, t

    def plan(self, shapes: Mapping[str, tuple]) -> list[tuple[str, str, tuple]]:
        """(target name, source name, target shape) of every output, in the order of items()."""
        return [(target_name, name, tuple(axis_size(role, self.target) or shapes[name][dim]
                                          for dim, role in enumerate(param.axes)))
                for target_name, name, param, _, _ in self._jobs(list(shapes))]

    def _zeroed(self, param: Param, target_layer: int | None) -> bool:
        """An identity-grown block's output projections are zero."""
        return self.depth == "identity" and target_layer in self.new_layers and param.kind.startswith("proj")

    def grow(self, target_name: str, get: Callable[[str], torch.Tensor], moment: int = 0,
             shard: int | None = None) -> torch.Tensor:
        """One grown tensor by its target name; with `shard`, the target's tensor-parallel shard of
        a sharded parameter (Param.tp), computed from `get` returning source shards. Consecutive
        calls for layers stacked from the same source tensor (and shard) share one result, as in
        items(): clone before mutating."""
        layer, _ = self.schema.split(target_name)
        name = target_name if layer is None else self.schema.at_layer(target_name, layer, self.order[layer])
        param = self.schema.lookup(name)
        if self._last[0] != (name, shard, moment):
            self._last = ((name, shard, moment),
                          self._grow_one(name, param, get, None if layer is None else self.order[layer], moment, shard))
        grown = self._last[1]
        return torch.zeros_like(grown) if self._zeroed(param, layer) else grown

    def items(self, names: list[str], get: Callable[[str], torch.Tensor],
              moment: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
        """Grown (name, tensor) pairs, computed one source parameter at a time. `get` returns the
        source weights (moment 0) or one of Adam's moments of them (1: exp_avg, 2: exp_avg_sq),
        which are grown consistently with the weights (AxisMap.factor).

        A source layer is widened once; every target layer that stacks it gets the SAME
        tensor object (clone before mutating, as grow_state_dict does)."""
        last_name, grown = None, None
        for target_name, name, param, src_layer, t in self._jobs(names):
            if name != last_name:
                last_name, grown = name, self._grow_one(name, param, get, src_layer, moment)
            if self._zeroed(param, t):
                yield target_name, torch.zeros_like(grown)
            else:
                yield target_name, grown


def _direct_maps(source: Shape, target: Shape) -> dict[str, AxisMap]:
    """DirectCopy: the small matrix goes to the top-left block of every grown axis."""
    def block(small: int, large: int) -> AxisMap:
        m = prefix_map(small, large, "exact", None)
        return AxisMap(m.index, None, m.is_new, torch.ones(large, dtype=torch.float64))
    h, f = block(source.hidden, target.hidden), block(source.ffn, target.ffn)
    qkv = AxisMap(torch.cat([h.index + k * source.hidden for k in range(3)]), None, h.is_new.repeat(3),
                  h.share.repeat(3))
    kv = block(source.kv_heads * source.head_dim, target.kv_heads * target.head_dim)
    return {"h_out": h, "h_in": h, "a_out": h, "q_out": h, "a_in": h, "kv_out": kv, "qkv_out": qkv,
            # megatron-core's fused rows: the same attention units as q_out's and kv_out's, at their rows
            "hqkv_out": fused_qkv(h, kv, source.heads, source.kv_heads, source.head_dim, target.kv_heads),
            "f_out": f, "f_in": f, "glu_out": glu(f, source.ffn)}


def vars_of(shape: Shape) -> dict:
    kv = {"kv_heads": shape.kv_heads} if shape.kv_heads != shape.heads else {}
    return {"layers": shape.layers, "hidden": shape.hidden, "heads": shape.heads, **kv, "ffn": shape.ffn}


def grow_state_dict(state_dict: Mapping[str, torch.Tensor], schema: Schema, source: Shape,
                    target: Shape, **options) -> tuple[dict[str, torch.Tensor], dict]:
    """Grow an in-memory state dict; returns (grown state dict, manifest)."""
    check_source({k: tuple(v.shape) for k, v in state_dict.items()}, schema, source)
    grower = Grower(schema, source, target, **options)
    grown, seen = {}, set()
    for name, tensor in grower.items(list(state_dict), state_dict.__getitem__):
        grown[name] = tensor.clone() if id(tensor) in seen else tensor
        seen.add(id(tensor))
    return grown, grower.manifest()
