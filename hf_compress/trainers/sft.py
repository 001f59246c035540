"""Distillation under TRL's `SFTTrainer`: chat templates, completion-only loss and packing keep working.

Needs `trl` (`pip install hf_compress[llm]`). [`SFTDistillationTrainer`] is [`DistillationMixin`] on top of
`trl.SFTTrainer`: TRL prepares the data (applies the chat template to `messages`, tokenizes, masks the prompt when
`completion_only_loss`, packs) and collates it; the mixin only replaces the loss with the distillation loss on the
labels TRL built, so the prompt tokens that TRL masks count in neither the hard nor the soft part.

With `teacher_logits="me/teacher-logits"` (a Hub teacher cache) no teacher is loaded: the cache's key is checked
against the rows TRL built, so push the cache for those rows (`SFTDistillationTrainer(...).train_dataset`, or any
`SFTTrainer`'s with the same options and tokenizer). Packed rows are refused there: the cache is computed on padded
rows, without the position ids that separate the packed sequences.
"""

from __future__ import annotations

from dataclasses import dataclass

try:
    from trl import SFTConfig, SFTTrainer
except ImportError as err:  # pragma: no cover - exercised only without the optional dependency
    raise ImportError("Distillation with TRL's SFTTrainer needs `trl`: `pip install hf_compress[llm]`.") from err

from ..distillation.config import DistillationArguments
from .distillation import DistillationMixin


@dataclass
class SFTDistillationConfig(SFTConfig, DistillationArguments):
    r"""
    `trl.SFTConfig` plus the options of [`DistillationArguments`] (`temperature`, `alpha`, `cache_teacher_logits`,
    `teacher_logits_top_k`, `teacher_cache_dir`, `teacher_cache_dtype`, `teacher_dtype`, `teacher_device`,
    `distillation_task`, `teacher_logits`, `teacher_revision`), in one dataclass that `HfArgumentParser` reads.
    """


class SFTDistillationTrainer(DistillationMixin, SFTTrainer):
    """`trl.SFTTrainer` whose loss is [`~hf_compress.distillation.distillation_loss`] against a teacher.

    Args:
        model (`PreTrainedModel` or `str`): the student (or its path; SFTTrainer loads it, and its tokenizer).
        teacher_model (`PreTrainedModel` or `str`): the teacher, sharing the student's vocabulary (`None`, or the
            teacher's id to check, with `teacher_logits`).
        args ([`SFTDistillationConfig`]): SFT and distillation options.
        teacher_tokenizer (*optional*): the teacher's tokenizer, checked against the student's.
        teacher_logits (`str`, *optional*): a Hub teacher cache (dataset repo id, `id@revision`, or its folder)
            replacing the teacher; as `args.teacher_logits`.
        **kwargs: everything else `trl.SFTTrainer` takes (`train_dataset` with `text`, `messages` or
            `prompt`/`completion`, `processing_class`, `peft_config`, `callbacks`, ...).

    Example:

    ```python
    from hf_compress.trainers.sft import SFTDistillationConfig, SFTDistillationTrainer

    args = SFTDistillationConfig("out", alpha=0.9, temperature=2.0, max_length=512, packing=True)
    trainer = SFTDistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=chats)
    trainer.train()

    # or with the teacher's top-k logits pushed to the Hub for the rows TRL builds (no teacher in memory):
    args = SFTDistillationConfig("out", alpha=0.9, temperature=1.0, max_length=512, teacher_revision="<commit>")
    SFTDistillationTrainer(model=student, teacher_logits="me/teacher-logits", args=args, train_dataset=chats,
                           processing_class=tokenizer).train()
    ```
    """

    default_task = "causal-lm"
    needs_tokenized_dataset = False  # SFTTrainer tokenizes `text` / `messages` itself

    def __init__(self, *args, teacher_logits: str | None = None, **kwargs):
        config = kwargs.get("args")
        source = teacher_logits or getattr(config, "teacher_logits", None)
        if source is not None and getattr(config, "packing", False):
            raise ValueError(
                f"teacher_logits={source!r} with `packing=True` is not supported: the cache holds the logits of padded "
                "rows, not of packed sequences (no position ids between them); set `packing=False`, or distil from "
                "the live teacher."
            )
        super().__init__(*args, teacher_logits=teacher_logits, **kwargs)


__all__ = ["SFTDistillationConfig", "SFTDistillationTrainer"]
