"""Build a smaller student from a teacher by keeping a subset of its layers (as DistilBERT's initialisation)."""

from __future__ import annotations

import copy

from ..pruning.structured import drop_layers


def layer_dropped_student(teacher, keep_layers: list[int]):
    """A copy of `teacher` with only the layers `keep_layers` (initialised from them, in increasing order), e.g.
    `[0, 2, 4]`.

    The student shares the teacher's vocabulary, hidden size and head, so logits are distilled without any
    projection. The layers are dropped by [`~hf_compress.pruning.drop_layers`] (the one layer-dropping code, also
    depth pruning's); the teacher is left as it is.

    Raises:
        `ValueError`: `keep_layers` are not distinct indices of the teacher's layers.
    """
    student = drop_layers(copy.deepcopy(teacher), keep_layers)
    student.requires_grad_(True)
    return student
