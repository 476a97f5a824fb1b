"""Index maps g: target units -> source units, with g(i) = i for the first (source) units.

Every map here is balanced: the new units take source units without replacement, pass
after pass, so the copy counts C(j) differ by at most one. At an integer ratio every
unit is copied the same number of times, which is what keeps LayerNorm statistics (and
so the function) unchanged. `fpi` draws each pass as a random permutation (the paper's
random map); `exact` is the symmetric map g(i) = i mod d_small.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from .errors import GrowthError


@dataclasses.dataclass(frozen=True)
class IndexMap:
    index: torch.Tensor   # [large] int64: source unit of each target unit
    small: int
    shares: torch.Tensor | None = None  # [large] float64: each copy's share (split_shares); None: equal, 1/C

    @property
    def share(self) -> torch.Tensor:
        """Each target unit's share of its source unit: the fan-in coefficient of the copy, positive
        and summing to 1 over the copies of a source unit; 1/C(g(i)) unless split."""
        return 1.0 / self.counts if self.shares is None else self.shares

    @property
    def large(self) -> int:
        return self.index.numel()

    @property
    def counts(self) -> torch.Tensor:
        """C(g(i)) for every target unit i: how many target units share its source unit."""
        return torch.bincount(self.index, minlength=self.small).to(torch.float64)[self.index]

    @property
    def is_new(self) -> torch.Tensor:
        """The copies: every target unit but the first that takes its source unit (for a prefix
        map, the units after the first `small`; for a sharded map, those after each shard's prefix)."""
        position = torch.arange(self.large)
        first = torch.full((self.small,), self.large).scatter_reduce(0, self.index, position, "amin")
        return position != first[self.index]

    @property
    def uniform(self) -> bool:
        return self.large % self.small == 0


def prefix_map(small: int, large: int, kind: str, gen: torch.Generator, shards: int = 1) -> IndexMap:
    """Map `small` source units onto `large` target units. With `shards` > 1 the axis is split
    into that many equal blocks (tensor-parallel shards) and each target block takes units of its
    own source block only, so a shard grows from its own shard (its counts are known locally)."""
    if shards > 1:
        if small % shards or large % shards:
            raise GrowthError(f"{shards} tensor-parallel shards do not divide {small} -> {large} units")
        parts = [prefix_map(small // shards, large // shards, kind, gen) for _ in range(shards)]
        return IndexMap(torch.cat([p.index + k * (small // shards) for k, p in enumerate(parts)]), small)
    if large < small:
        raise GrowthError(f"cannot map {small} units onto {large}: target is smaller")
    extra = large - small
    if kind == "exact":
        new = torch.arange(small, large) % small
    elif kind == "random":
        passes = math.ceil(extra / small) if extra else 0
        new = torch.cat([torch.randperm(small, generator=gen) for _ in range(passes)]
                        or [torch.empty(0, dtype=torch.long)])[:extra]
    else:
        raise GrowthError(f"unknown map kind {kind!r}")
    return IndexMap(torch.cat([torch.arange(small), new]), small)


def grouped_heads_map(source_heads: int, target_heads: int, source_groups: int, target_groups: int, kind: str,
                      gen: torch.Generator, shards: int = 1) -> tuple[IndexMap, IndexMap]:
    """(query heads, key/value heads) maps for grouped-query attention in HF's layout, where query
    head j attends with key/value head j // group. The key/value heads are mapped first; then each
    target group's query heads take the query heads of the source group its key/value head copies
    (a prefix map within the group), so every target query head attends with a copy of its source
    head's key/value head. Without grouping (one query head per key/value head) the query map is
    the key/value map, drawn as before."""
    groups = prefix_map(source_groups, target_groups, kind, gen, shards)
    rs, rt = source_heads // source_groups, target_heads // target_groups
    within = [prefix_map(rs, rt, kind, gen) for _ in range(target_groups)]
    index = torch.cat([groups.index[k] * rs + w.index for k, w in enumerate(within)])
    return IndexMap(index, source_heads), groups


def split_shares(m: IndexMap, gen: torch.Generator, spread: float = 0.5) -> IndexMap:
    """LEMON-style symmetry breaking: unequal positive shares for the copies of each source unit,
    proportional to 1 + spread x u with u uniform in [-1, 1] and summing to 1 over the copies, so
    a fan-in that reads the copies with these coefficients still computes the source's function
    exactly while each copy gets a different gradient. A unit with one copy keeps share 1."""
    raw = 1.0 + spread * (2.0 * torch.rand(m.large, generator=gen, dtype=torch.float64) - 1.0)
    total = torch.zeros(m.small, dtype=torch.float64).index_add_(0, m.index, raw)
    return dataclasses.replace(m, shares=raw / total[m.index])


def zero_sum_over_copies(eps: torch.Tensor, dim: int, index: torch.Tensor, share: torch.Tensor) -> torch.Tensor:
    """`eps` less, along `dim`, the share-weighted mean of each source unit's copies (`index`: the
    source unit of each position), so that sum over the copies of share x eps is 0 in every slice.
    A unit with one copy gets 0."""
    eps = eps.movedim(dim, -1)
    weighted = torch.zeros(*eps.shape[:-1], int(index.max()) + 1, dtype=eps.dtype)
    weighted.index_add_(-1, index, eps * share.to(eps.dtype))
    return (eps - weighted.index_select(-1, index)).movedim(-1, dim)


@dataclasses.dataclass(frozen=True)
class AxisMap:
    """How one tensor axis is grown: gather `index`, multiply by `scale` (None = 1); `share` is
    the fraction of its source unit's gradient each target unit gets when the growth preserves the
    function (1/C(g(i)) for equal copies, IndexMap.share); `is_new` marks the target units that
    AKI/DirectCopy fill differently."""
    index: torch.Tensor
    scale: torch.Tensor | None
    is_new: torch.Tensor
    share: torch.Tensor

    def subset(self, rows: torch.Tensor) -> AxisMap:
        return AxisMap(self.index[rows], None if self.scale is None else self.scale[rows], self.is_new[rows],
                       self.share[rows])

    def shard(self, rank: int, shards: int, source_size: int) -> AxisMap:
        """The rows of target shard `rank` of `shards`, indexing into source shard `rank` (whose
        first unit becomes 0); the map must be sharded (prefix_map(..., shards))."""
        size, base = self.index.numel() // shards, rank * (source_size // shards)
        m = self.subset(torch.arange(rank * size, (rank + 1) * size))
        if size and (int(m.index.min()) < base or int(m.index.max()) >= base + source_size // shards):
            raise GrowthError(f"tensor-parallel shard {rank}/{shards} would read another shard's units")
        return dataclasses.replace(m, index=m.index - base)

    def factor(self, moment: int = 0) -> torch.Tensor | None:
        """What a grown tensor is multiplied by along this axis: the weight's scale (moment 0), or
        for Adam's moments (1: exp_avg, 2: exp_avg_sq) the power of share / scale.

        Why: when the growth preserves the function for every value of the source weights, a copy
        on a fan-out axis (scale 1) feeds consumers that read it with its share, so its gradient is
        the source's times the share (1/C for equal copies); a copy on a fan-in axis (scale = share)
        sees the same input as its source unit, so its gradient is the source's (share / scale = 1).
        exp_avg follows the gradient, exp_avg_sq its square."""
        if moment == 0:
            return self.scale
        return (self.share if self.scale is None else self.share / self.scale) ** moment


def attention_map(heads: IndexMap, head_dim: IndexMap) -> IndexMap:
    """Composite map over the flat attention axis (head, dim) -> source (g_h(head), g_d(dim))."""
    index = (heads.index[:, None] * head_dim.small + head_dim.index[None, :]).reshape(-1)
    split = heads.shares is not None or head_dim.shares is not None
    return IndexMap(index, heads.small * head_dim.small,
                    (heads.share[:, None] * head_dim.share[None, :]).reshape(-1) if split else None)


def layer_axis_maps(hidden: IndexMap, heads: IndexMap, head_dim: IndexMap, ffn: IndexMap,
                    kv: IndexMap | None = None) -> dict[str, AxisMap]:
    """The axis roles of the schema, resolved for one layer.

    fan-out ('*_out'): copy rows ('kv_out': grouped-query attention's key/value heads, by the
    `kv` map).  fan-in ('*_in'): copy and multiply by the copy's share
    (1/C(g(i)) for equal copies). 'q_out' also compensates head_dim growth: q.k sums over the
    copies of each dim, so the query copies are multiplied by their share, and the 1/sqrt(head_dim) the target
    applies is undone by sqrt(d_t / d_s).
    """
    attn = attention_map(heads, head_dim)
    new_head = heads.is_new[:, None].expand(heads.large, head_dim.large).reshape(-1)
    kv = heads if kv is None else kv
    kv_attn = attention_map(kv, head_dim)
    new_kv = kv.is_new[:, None].expand(kv.large, head_dim.large).reshape(-1)
    q_scale = math.sqrt(head_dim.large / head_dim.small) * head_dim.share.repeat(heads.large)
    ones = torch.ones(attn.large, dtype=torch.float64)
    a_small = attn.small
    h_share, a_share, f_share = hidden.share, attn.share, ffn.share
    out = {
        "h_out": AxisMap(hidden.index, None, hidden.is_new, h_share),
        "h_in": AxisMap(hidden.index, h_share, hidden.is_new, h_share),
        "a_out": AxisMap(attn.index, None, new_head, a_share),
        "kv_out": AxisMap(kv_attn.index, None, new_kv, kv_attn.share),
        "q_out": AxisMap(attn.index, q_scale, new_head, a_share),
        "a_in": AxisMap(attn.index, a_share, new_head, a_share),
        "qkv_out": AxisMap(torch.cat([attn.index, attn.index + a_small, attn.index + 2 * a_small]),
                           torch.cat([q_scale, ones, ones]), new_head.repeat(3), a_share.repeat(3)),
        "f_out": AxisMap(ffn.index, None, ffn.is_new, f_share),
        "f_in": AxisMap(ffn.index, f_share, ffn.is_new, f_share),
    }
    return {**out, "hqkv_out": fused_qkv(out["q_out"], out["kv_out"], heads.small, kv.small, head_dim.small, kv.large),
            "glu_out": glu(out["f_out"], ffn.small)}


def fused_qkv(q: AxisMap, kv: AxisMap, source_heads: int, source_groups: int, source_head_dim: int,
              target_groups: int) -> AxisMap:
    """megatron-core's fused QKV rows [group, (the group's query heads, k, v), dim] from the maps of
    the query units (q_out: heads x dim) and the key/value units (kv_out: groups x dim); multi-head
    attention is a group a head. A target query unit takes the source row of the source query unit
    it copies (that unit's group, its head's slot in the group, its dim); a key/value unit the
    source's k and v rows of the unit it copies. Scales, new units and shares follow the unit maps."""
    ds, rs, gt = source_head_dim, source_heads // source_groups, target_groups
    head, dim = q.index // ds, q.index % ds
    q_rows = ((head // rs) * (rs + 2) + head % rs) * ds + dim
    k_rows = (kv.index // ds * (rs + 2) + rs) * ds + kv.index % ds

    def arrange(queries: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.cat([queries.reshape(gt, -1), k.reshape(gt, -1), v.reshape(gt, -1)], 1).reshape(-1)
    ones_q, ones_kv = (torch.ones(m.index.numel(), dtype=torch.float64) for m in (q, kv))
    q_scale = ones_q if q.scale is None else q.scale
    return AxisMap(arrange(q_rows, k_rows, k_rows + ds), arrange(q_scale, ones_kv, ones_kv),
                   arrange(q.is_new, kv.is_new, kv.is_new), arrange(q.share, kv.share, kv.share))


def glu(f: AxisMap, source_ffn: int) -> AxisMap:
    """SwiGLU's fused [gate; up] rows (megatron-core's linear_fc1): both halves by the FFN map."""
    return AxisMap(torch.cat([f.index, f.index + source_ffn]), None if f.scale is None else f.scale.repeat(2),
                   f.is_new.repeat(2), f.share.repeat(2))


def layer_map(source_layers: int, target_layers: int) -> list[int]:
    """StackBERT order [0..L-1, 0..L-1, ...]; a remainder copies the top source layers."""
    whole, rest = divmod(target_layers, source_layers)
    return list(range(source_layers)) * whole + list(range(source_layers - rest, source_layers))


def interleaved_layers(source_layers: int, target_layers: int, every: int | None = None) -> tuple[list[int], list[int]]:
    """LLaMA-Pro's placement of new blocks: each is a copy of the source layer right below it,
    inserted after every `every` source layers, or (None) spread evenly, new block i after source
    layer ((i + 1) L - 1) // P of P new blocks (30 -> 40 layers: after layers 2, 5, ..., 29).
    Returns (the source layer of every target layer, the target positions of the new blocks)."""
    extra = target_layers - source_layers
    if every is not None:
        if every < 1 or source_layers // every != extra:
            raise GrowthError(f"--insert every={every}: {source_layers} layers with a new block after every "
                              f"{every} make {source_layers + source_layers // max(every, 1)}, not {target_layers}")
        after = [(i + 1) * every - 1 for i in range(extra)]
    else:
        after = [((i + 1) * source_layers - 1) // extra for i in range(extra)]
    order, new = [], []
    for layer in range(source_layers):
        order.append(layer)
        for _ in range(after.count(layer)):
            new.append(len(order))
            order.append(layer)
    return order, new
