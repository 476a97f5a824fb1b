"""bert2BERT growth: pure tensor operators over state dicts, with format adapters at the edge
(growth.adapters). Nothing here imports DeepSpeed or touches process groups."""

from .errors import B2BError, CheckpointError, GrowthError
from .grow import DEPTH_METHODS, SYMMETRY_METHODS, WIDTH_METHODS, Grower, check_source, grow_state_dict
from .maps import layer_map, prefix_map
from .schema import SCHEMAS, schema_for
from .shape import LLAMA_FAMILY, PRESETS, Shape, check_growable, parse_target, shape_from_config

__all__ = [
    "B2BError", "CheckpointError", "GrowthError", "Grower", "grow_state_dict", "check_source", "WIDTH_METHODS",
    "DEPTH_METHODS", "SYMMETRY_METHODS",
    "layer_map", "prefix_map", "SCHEMAS", "schema_for", "PRESETS", "Shape", "check_growable",
    "parse_target", "shape_from_config", "LLAMA_FAMILY",
]
