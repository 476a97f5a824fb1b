"""How far copied units have moved apart: the cosine similarity between every copy that width
growth made and the unit it copies, in a grown model's current weights.

Growth duplicates units (FPI, exact; AKI's hidden units), and equal copies get equal updates
unless something breaks the symmetry (dropout, AKI's next-layer units, `--break-symmetry`). A
copy and its original are compared along every parameter axis of their kind: the slice of the
tensor at the copy's index against the slice at the original's, flattened. The figure per kind
(hidden, heads, ffn) is the mean over all copies and all such axes; 1.0 means the copies are
still identical up to scale, as at initialisation.

The maps come from the growth manifest (growth.json): the Grower is rebuilt from its shapes,
methods and seed, which determine every map, and checked against the manifest's hidden map.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .errors import GrowthError
from .grow import Grower
from .maps import AxisMap
from .schema import schema_for
from .shape import Shape

KINDS = {"h_out": "hidden", "h_in": "hidden", "a_out": "heads", "q_out": "heads", "a_in": "heads",
         "kv_out": "heads", "qkv_out": "heads", "hqkv_out": "heads", "f_out": "ffn", "f_in": "ffn"}


def grower_from_manifest(manifest: dict) -> Grower | None:
    """The Grower that made a growth.json's model (None for DirectCopy, which copies no unit)."""
    if manifest.get("width") == "direct":
        return None
    old_identity = "top" if manifest.get("depth") == "identity" else "even"  # manifests before --insert
    try:
        grower = Grower(schema_for(manifest["architecture"]), Shape(**manifest["source_shape"]),
                        Shape(**manifest["target_shape"]), width=manifest["width"], depth=manifest["depth"],
                        seed=manifest["seed"], symmetry=manifest.get("symmetry", "none"),
                        noise_db=manifest.get("noise_db", 10.0), insert=manifest.get("insert", old_identity),
                        shards=manifest.get("tensor_parallel_growth", 1))
    except (KeyError, TypeError) as err:
        raise GrowthError(f"growth.json: not a growth manifest ({err})") from None
    if grower.hidden.index.tolist() != manifest.get("hidden_map"):
        raise GrowthError("growth.json: its hidden map is not the one its seed and shapes give; "
                          "it was written by another version of b2b grow or edited")
    return grower


def _originals(m: AxisMap) -> tuple[torch.Tensor, torch.Tensor]:
    """(copies, originals): the positions of the copied units and of the unit each one copies."""
    position = torch.arange(m.index.numel())
    first = torch.full((int(m.index.max()) + 1,), m.index.numel()).scatter_reduce(0, m.index, position, "amin")
    copies = m.is_new.nonzero().squeeze(1)
    return copies, first[m.index[copies]]


def copy_cosines(grower: Grower, params: Iterable[tuple[str, torch.Tensor]]) -> dict[str, float]:
    """kind -> mean cosine similarity between each copy and its original over every axis of
    that kind, for the target model's named parameters."""
    found: dict[str, list[torch.Tensor]] = {}
    schema = grower.schema
    for name, tensor in params:
        param = schema.lookup(name)
        if param is None or tensor.dim() < 2:  # a copy's bias or norm weight is one number, no direction
            continue
        layer, _ = schema.split(name)
        maps = grower.layer_maps[grower.order[layer] if layer is not None else 0]
        for dim, role in enumerate(param.axes):
            if role is None or tensor.shape[dim] != maps[role].index.numel():
                continue
            copies, originals = _originals(maps[role])
            if not copies.numel():
                continue
            t = tensor.detach().float().movedim(dim, 0)
            a, b = t[copies].flatten(1), t[originals].flatten(1)
            found.setdefault(KINDS[role], []).append(torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-12))
    return {kind: float(torch.cat(values).mean()) for kind, values in found.items()}
