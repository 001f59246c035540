"""Gradual magnitude pruning (schedule, mask selection, masks on modules, a smaller save format) and structured
(Minitron-style) width/depth pruning that makes the model physically smaller."""

from .compressed import load_compressed, load_compressed_state_dict, save_compressed, size_report
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
