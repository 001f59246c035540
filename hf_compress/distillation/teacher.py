"""Teacher handling: loading, freezing, placing, and checking it against the student."""

from __future__ import annotations

import torch

_AUTO_CLASSES = {
    "sequence-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "question-answering": "AutoModelForQuestionAnswering",
    "causal-lm": "AutoModelForCausalLM",
}
_CLASS_SUFFIXES = (
    ("ForSequenceClassification", "sequence-classification"),
    ("ForTokenClassification", "token-classification"),
    ("ForQuestionAnswering", "question-answering"),
    ("ForCausalLM", "causal-lm"),
    ("LMHeadModel", "causal-lm"),
)


def infer_task(model) -> str:
    """The distillation task of a `*For<Task>` model, from its class name."""
    name = type(model).__name__
    for suffix, task in _CLASS_SUFFIXES:
        if name.endswith(suffix):
            return task
    raise ValueError(
        f"Cannot tell the task of a `{name}`; pass `distillation_task` (sequence-classification, "
        "token-classification, question-answering or causal-lm)."
    )


def load_teacher(teacher, task: str, dtype: str | None = None):
    """A teacher model from a `PreTrainedModel` or a path / Hub id, loaded with the task's auto class."""
    if isinstance(teacher, torch.nn.Module):
        return teacher
    if not isinstance(teacher, str):
        raise TypeError(f"teacher_model must be a PreTrainedModel or a path, got {type(teacher).__name__}.")
    import transformers

    auto_class = getattr(transformers, _AUTO_CLASSES[task])
    kwargs = {"dtype": getattr(torch, dtype)} if dtype else {}
    try:
        return auto_class.from_pretrained(teacher, **kwargs)
    except OSError as err:
        raise ValueError(f"Cannot load the teacher {teacher!r}: {err}; pass a local model directory or a Hub id.") from err


def is_quantized(model) -> bool:
    return bool(getattr(model, "is_quantized", False) or getattr(model, "is_loaded_in_8bit", False)
                or getattr(model, "is_loaded_in_4bit", False))


def prepare_teacher(teacher, device=None, dtype: str | None = None):
    """Freeze the teacher: eval mode, no gradients, on its own device and dtype (quantized models stay put)."""
    teacher.eval()
    teacher.requires_grad_(False)
    if not is_quantized(teacher):
        if dtype:
            teacher.to(getattr(torch, dtype))
        if device is not None:
            teacher.to(device)
    return teacher


def _num_outputs(model, task: str) -> tuple[str, int]:
    if task == "causal-lm":
        out = model.get_output_embeddings()
        size = out.weight.shape[0] if out is not None else model.config.vocab_size
        return "vocab_size", size
    if task == "question-answering":
        return "outputs", 2
    return "num_labels", model.config.num_labels


def check_compatible(student, teacher, task: str, student_tokenizer=None, teacher_tokenizer=None) -> None:
    """Raise a one-line error when the teacher's outputs or tokenizer do not match the student's."""
    what, s = _num_outputs(student, task)
    _, t = _num_outputs(teacher, task)
    if s != t:
        fix = (
            "use a teacher with the same tokenizer" if what == "vocab_size" else "use a teacher trained on the same labels"
        )
        raise ValueError(f"The student has {what} {s} but the teacher has {t}; {fix}.")
    if task in ("sequence-classification", "token-classification"):
        s_map, t_map = student.config.id2label, teacher.config.id2label
        generic = lambda m: all(v == f"LABEL_{k}" for k, v in m.items())  # noqa: E731
        if not generic(s_map) and not generic(t_map) and s_map != t_map:
            raise ValueError(
                f"The student's labels {s_map} differ from the teacher's {t_map}; align `id2label` before distilling."
            )
    if student_tokenizer is not None and teacher_tokenizer is not None:
        s_vocab, t_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
        if s_vocab != t_vocab:
            differ = sum(1 for tok, i in s_vocab.items() if t_vocab.get(tok) != i)
            raise ValueError(
                f"The student's tokenizer ({len(s_vocab)} tokens) and the teacher's ({len(t_vocab)} tokens) map "
                f"{differ} tokens to different ids; use a teacher with the same tokenizer."
            )
