"""Build a smaller student from a teacher by keeping a subset of its layers (as DistilBERT's initialisation)."""

from __future__ import annotations

import copy

import torch


def _layer_list(model) -> torch.nn.ModuleList:
    n = model.config.num_hidden_layers
    for _, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"Cannot find the {n} transformer layers of `{type(model).__name__}` to drop some of them.")


def layer_dropped_student(teacher, keep_layers: list[int]):
    """A copy of `teacher` with only the layers `keep_layers` (initialised from them), e.g. `[0, 2, 4]`.

    The student shares the teacher's vocabulary, hidden size and head, so logits are distilled without any
    projection.
    """
    n = teacher.config.num_hidden_layers
    if not keep_layers or any(not 0 <= i < n for i in keep_layers) or len(set(keep_layers)) != len(keep_layers):
        raise ValueError(f"keep_layers must be distinct layer indices in [0, {n}), got {keep_layers}.")
    student = copy.deepcopy(teacher)
    layers = _layer_list(student)
    kept = [layers[i] for i in keep_layers]
    for new_idx, layer in enumerate(kept):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx  # KV-cache slot of decoder layers
    layers._modules.clear()
    for i, layer in enumerate(kept):
        layers.add_module(str(i), layer)
    student.config.num_hidden_layers = len(kept)
    if getattr(student.config, "layer_types", None):
        student.config.layer_types = [teacher.config.layer_types[i] for i in keep_layers]
    student.requires_grad_(True)
    return student
