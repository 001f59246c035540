"""Gradual magnitude pruning (schedule, mask selection, masks on modules, a smaller save format) and structured
(Minitron-style) width/depth pruning that makes the model physically smaller.

The bitmask save format lives in [`hf_compress.formats.bitmask`]; its functions stay importable from here
(`from hf_compress.pruning import save_compressed`), resolved on first use: that module imports `pruning.masks`, so
importing it while this package initialises would be an import cycle.
"""

from .config import PruningArguments
from .masks import (
    apply_masks,
    attach_masks,
    default_targets,
    get_masks,
    global_keep_masks,
    load_masks,
    magnitude_masks,
    nm_masks,
    remove_masks,
    resolve_targets,
    save_masks,
    sparsity_stats,
)
from .schedule import cubic_sparsity, is_pruning_step
from .structured import (
    StructuredPlan,
    StructuredPruningError,
    attach_structured_masks,
    drop_layers,
    plan_masks,
    prune_structures,
    remove_structured_masks,
    select_structures,
    structured_importance,
    structured_prune,
)
from .structured_config import StructuredPruningArguments

_BITMASK_NAMES = ("load_compressed", "load_compressed_state_dict", "save_compressed", "size_report")


def __getattr__(name: str):
    if name in _BITMASK_NAMES:
        from ..formats import bitmask

        value = getattr(bitmask, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hf_compress.pruning' has no attribute {name!r}")


__all__ = [
    "PruningArguments",
    "StructuredPlan",
    "StructuredPruningArguments",
    "StructuredPruningError",
    "attach_structured_masks",
    "drop_layers",
    "plan_masks",
    "prune_structures",
    "remove_structured_masks",
    "select_structures",
    "structured_importance",
    "structured_prune",
    "apply_masks",
    "attach_masks",
    "cubic_sparsity",
    "default_targets",
    "get_masks",
    "global_keep_masks",
    "is_pruning_step",
    "load_compressed",
    "load_compressed_state_dict",
    "load_masks",
    "magnitude_masks",
    "nm_masks",
    "remove_masks",
    "resolve_targets",
    "save_compressed",
    "save_masks",
    "size_report",
    "sparsity_stats",
]
