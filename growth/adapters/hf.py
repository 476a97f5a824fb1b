"""HF transformers model directories: read a source, write a grown target, compare the two.

The format edge of growth/: it reads config.json and safetensors (or a weights-only
torch file), hands tensors to growth.Grower, and writes an HF directory atomically
(a temporary sibling directory renamed into place once complete and checked).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import GrowthError
from ..grow import check_source, grow_state_dict
from ..schema import schema_for
from ..shape import Shape, shape_from_config
from .files import (
    EXACT_TOLERANCE,
    atomic_directory,
    copy_side_files,
    dump_manifest,
    free_output,
    grower_for,
    has_tied_output,
    open_weights,
    read_json,
    resolve,
    sha256,
    target_config,
    weight_files,
)
from .safetensors_io import write_streaming


def grow_directory(src: str | Path, out: str | Path, to: str, overwrite: bool = False, log=print,
                   check: bool = True, **options) -> dict:
    """`b2b grow`: grow an HF model directory into `out` (`options`: the Grower's width, depth,
    seed, symmetry, noise_db, insert); returns the manifest. An exact growth is run against the
    source before it is saved (`check`), which holds both models in memory."""
    out = free_output(out, overwrite)
    src = resolve(src)
    cfg, grower = grower_for(src, to, **options)
    source, target = grower.source, grower.target
    files = weight_files(src)
    weights = open_weights(files)
    shapes = weights.shapes
    check_source(shapes, grower.schema, source)
    manifest = {"source": str(src), "source_sha256": sha256(files), **grower.manifest()}
    log(f"growing {cfg['model_type']} {source} -> {target} ({grower.describe()})")

    with atomic_directory(out) as tmp:
        plan = [(t, shape, weights.dtypes[s]) for t, s, shape in grower.plan(shapes)]
        write_streaming(tmp / "model.safetensors", plan, grower.items(list(shapes), weights.__getitem__))
        copy_side_files(src, tmp, target_config(cfg, target))
        if manifest["exact"] and not check:
            manifest["check"] = "skipped (--no-check): b2b verify SOURCE OUT runs it"
            log("exact by construction; not checked (--no-check)")
        elif manifest["exact"]:
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
    return grower_from_manifest(read_json(manifest, "growth manifest"))
