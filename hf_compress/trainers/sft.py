"""Distillation under TRL's `SFTTrainer`: chat templates, completion-only loss and packing keep working.

Needs `trl` (`pip install hf_compress[llm]`). [`SFTDistillationTrainer`] is [`DistillationMixin`] on top of
`trl.SFTTrainer`: TRL prepares the data (applies the chat template to `messages`, tokenizes, masks the prompt when
`completion_only_loss`, packs) and collates it; the mixin only replaces the loss with the distillation loss on the
labels TRL built, so the prompt tokens that TRL masks count in neither the hard nor the soft part.
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
    `distillation_task`), in one dataclass that `HfArgumentParser` reads.
    """


class SFTDistillationTrainer(DistillationMixin, SFTTrainer):
    """`trl.SFTTrainer` whose loss is [`~hf_compress.distillation.distillation_loss`] against a teacher.

    Args:
        model (`PreTrainedModel` or `str`): the student (or its path; SFTTrainer loads it, and its tokenizer).
        teacher_model (`PreTrainedModel` or `str`): the teacher, sharing the student's vocabulary.
        args ([`SFTDistillationConfig`]): SFT and distillation options.
        teacher_tokenizer (*optional*): the teacher's tokenizer, checked against the student's.
        **kwargs: everything else `trl.SFTTrainer` takes (`train_dataset` with `text`, `messages` or
            `prompt`/`completion`, `processing_class`, `peft_config`, `callbacks`, ...).

    Example:

    ```python
    from hf_compress.trainers.sft import SFTDistillationConfig, SFTDistillationTrainer

    args = SFTDistillationConfig("out", alpha=0.9, temperature=2.0, max_length=512, packing=True)
    trainer = SFTDistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=chats)
    trainer.train()
    ```
    """

    default_task = "causal-lm"
    needs_tokenized_dataset = False  # SFTTrainer tokenizes `text` / `messages` itself


__all__ = ["SFTDistillationConfig", "SFTDistillationTrainer"]
