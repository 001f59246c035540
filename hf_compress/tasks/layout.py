"""How a task's model lays out its logits: what distillation reads instead of the task's name.

The distillation loss, the teacher-logit cache and the teacher checks ask a task's [`LogitLayout`] (its
`Task.logit_layout`) which outputs to distil, whether there is one distribution per token, what the classes are and
how labels line up; none of them compares task names.
"""

from __future__ import annotations

from dataclasses import dataclass

CLASSES = ("labels", "vocabulary", "positions")


@dataclass(frozen=True)
class LogitLayout:
    r"""
    The shape of a task's logits, as distillation sees them.

    Attributes:
        outputs (`tuple[str]`, defaults to `("logits",)`):
            The model outputs distilled, each a distribution over classes (question answering: `start_logits` and
            `end_logits`, whose losses are averaged).
        per_position (`bool`, defaults to `True`):
            One distribution per token; `False`: one per example (sequence classification), with no attention mask
            in the loss and one cache row of `width` values per example.
        classes (`str`, defaults to `"labels"`):
            What the last axis counts. `"labels"`: the head's `config.num_labels` (the teacher's `id2label` must
            agree). `"vocabulary"`: the LM head's rows (a padded head is sliced to the width both models share).
            `"positions"`: the sequence itself, so padding is masked out of the classes (QA spans).
        shift_labels (`bool`, defaults to `False`):
            Logits at position `i` are scored against label `i + 1` (causal LM).
        token_average (`bool`, defaults to `False`):
            Divide by the accumulated batch's label count (`num_items_in_batch`), so gradient accumulation averages
            over tokens as one large batch would; otherwise each micro-batch is averaged on its own.
        label_names (`tuple[str]`, defaults to `()`):
            The batch entries holding the labels when they are not the Trainer's own (`start_positions`,
            `end_positions`).
    """

    outputs: tuple = ("logits",)
    per_position: bool = True
    classes: str = "labels"
    shift_labels: bool = False
    token_average: bool = False
    label_names: tuple = ()

    def __post_init__(self):
        if self.classes not in CLASSES:
            raise ValueError(f"classes must be one of {', '.join(CLASSES)}, got {self.classes!r}.")

    @property
    def over_positions(self) -> bool:
        """The classes are the sequence positions (question answering)."""
        return self.classes == "positions"

    @property
    def over_vocabulary(self) -> bool:
        """The classes are the LM head's rows (a causal LM): the teacher cache stores `width` of them."""
        return self.classes == "vocabulary"

    @property
    def compares_label_maps(self) -> bool:
        """The classes are named labels, so the student's and the teacher's `id2label` must agree."""
        return self.classes == "labels"

    def class_count(self, model) -> tuple[str, int]:
        """`(what, n)`: what the student and the teacher must agree on, and this model's value of it."""
        if self.over_vocabulary:
            out = model.get_output_embeddings()
            return "vocab_size", out.weight.shape[0] if out is not None else model.config.vocab_size
        if self.over_positions:
            return "outputs", len(self.outputs)
        return "num_labels", model.config.num_labels
