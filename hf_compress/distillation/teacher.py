"""Teacher handling: loading, freezing, placing, and checking it against the student."""

from __future__ import annotations

import torch

from ..tasks import get_task, task_of_model

# The older name of `hf_compress.tasks.task_of_model` (the task of a loaded `*For<Task>` model), kept for imports.
infer_task = task_of_model


def load_teacher(teacher, task: str, dtype: str | None = None):
    """A teacher model from a `PreTrainedModel` or a path / Hub id, loaded with the task's auto class."""
    if isinstance(teacher, torch.nn.Module):
        return teacher
    if not isinstance(teacher, str):
        raise TypeError(f"teacher_model must be a PreTrainedModel or a path, got {type(teacher).__name__}.")
    import transformers

    auto_class = getattr(transformers, get_task(task).auto_class)
    kwargs = {"dtype": getattr(torch, dtype)} if dtype else {}
    try:
        return auto_class.from_pretrained(teacher, **kwargs)
    except OSError as err:
        raise ValueError(f"Cannot load the teacher {teacher!r}: {err}; pass a local model directory or a Hub id.") from err


_MAX_PADDING_ROWS = 1024


def is_quantized(model) -> bool:
    return bool(getattr(model, "is_quantized", False) or getattr(model, "is_loaded_in_8bit", False)
                or getattr(model, "is_loaded_in_4bit", False))


def is_dispatched(model) -> bool:
    """Whether accelerate placed the model (`device_map=...`): its hooks move tensors between its devices."""
    return bool(getattr(model, "hf_device_map", None))


def prepare_teacher(teacher, device=None, dtype: str | None = None, accelerator=None, cached: bool = False):
    """Freeze the teacher (eval mode, no gradients) and place it.

    A bitsandbytes-quantized teacher, or one loaded with `device_map`, stays where it was loaded (moving it would
    break its quantization state or its dispatch hooks). Under DeepSpeed ZeRO-3 the teacher is sharded as TRL
    shards its reference models (`trl.models.utils.prepare_deepspeed`); otherwise it is moved to `device` and
    cast to `dtype`.
    """
    teacher.eval()
    teacher.requires_grad_(False)
    plugin = getattr(getattr(accelerator, "state", None), "deepspeed_plugin", None)
    if plugin is not None and getattr(plugin, "zero_stage", 0) == 3:
        if cached:
            raise ValueError(
                "cache_teacher_logits runs the teacher on the main process alone, which a ZeRO-3-sharded teacher "
                "cannot do; train with the live teacher (`cache_teacher_logits=False`) or use ZeRO stage 2."
            )
        try:
            from trl.models.utils import prepare_deepspeed
        except ImportError as err:
            raise ImportError(
                "A teacher under DeepSpeed ZeRO-3 is sharded with TRL's `prepare_deepspeed`: `pip install trl`."
            ) from err
        if dtype:
            teacher.to(getattr(torch, dtype))
        return prepare_deepspeed(teacher, accelerator)
    if is_quantized(teacher) or is_dispatched(teacher):
        return teacher
    if dtype:
        teacher.to(getattr(torch, dtype))
    if device is not None:
        teacher.to(device)
    return teacher


def input_vocabulary_rows(model) -> int | None:
    """The rows of the model's input embedding (`get_input_embeddings().num_embeddings`): the token ids it reads.

    Falls back to `config.vocab_size` for a model without an `nn.Embedding` input, `None` when neither exists.
    """
    try:
        embedding = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        embedding = None
    rows = getattr(embedding, "num_embeddings", None)
    if rows is None and getattr(embedding, "weight", None) is not None:
        rows = embedding.weight.shape[0]
    if rows is None:
        rows = getattr(getattr(model, "config", None), "vocab_size", None)
    return int(rows) if rows is not None else None


def _shared_rows(what: str, s: int, t: int, student_tokenizer, teacher_tokenizer, mismatch: str) -> int:
    """The narrower of two vocabulary sizes when they differ only by padding, else a one-line `ValueError`.

    Embedding matrices padded to a multiple (Qwen2.5: 152,064 rows for a 151,665-token tokenizer, its 0.5B sibling
    151,936) differ in rows but not in vocabulary: a tokenizer that fits in both shows it. With one tokenizer only,
    a few hundred padded rows are padding; a bigger gap needs both tokenizers (then compared token by token).
    """
    tokenizer = student_tokenizer if student_tokenizer is not None else teacher_tokenizer
    vocab = len(tokenizer) if tokenizer is not None else None
    both = student_tokenizer is not None and teacher_tokenizer is not None
    if vocab is not None and vocab <= min(s, t) and (both or max(s, t) - vocab < _MAX_PADDING_ROWS):
        return min(s, t)
    if vocab is None:
        fix = ("use a teacher with the same tokenizer (if one embedding is only padded, pass the tokenizer as "
               "`processing_class` so the shared vocabulary can be checked)")
    elif vocab > min(s, t):
        fix = f"the tokenizer has {vocab} tokens, more than the narrower {mismatch}; use a teacher with the same tokenizer"
    else:
        fix = (f"{max(s, t) - vocab} rows past the tokenizer's {vocab} tokens is more than padding; pass "
               "`teacher_tokenizer` to show both share the vocabulary, or use a teacher with the same tokenizer")
    raise ValueError(f"The student has {what} {s} but the teacher has {t}; {fix}.")


def check_compatible(student, teacher, task: str, student_tokenizer=None, teacher_tokenizer=None) -> int | None:
    """Raise a one-line error when the teacher's outputs, vocabulary or tokenizer do not match the student's.

    For every task the teacher reads the student's token ids, so the input embeddings must cover the same
    vocabulary (`get_input_embeddings().num_embeddings`), and the tokenizers, when both are known, must map every
    token to the same id. Sizes that differ only by padding rows are accepted when a tokenizer fits in both. Logits
    over a vocabulary (a causal LM) are also compared on their usable width: with padded heads the logits are sliced
    to the narrower width, which is returned. Returns `None` when the widths are equal or not a vocabulary.
    """
    layout = get_task(task).logit_layout
    what, s = layout.class_count(student)
    _, t = layout.class_count(teacher)
    width = None
    if s != t:
        if not layout.over_vocabulary:
            raise ValueError(f"The student has {what} {s} but the teacher has {t}; use a teacher trained on the same labels.")
        width = _shared_rows(what, s, t, student_tokenizer, teacher_tokenizer, "head")
    s_in, t_in = input_vocabulary_rows(student), input_vocabulary_rows(teacher)
    if s_in is not None and t_in is not None and s_in != t_in:
        _shared_rows(
            "input-embedding size (`get_input_embeddings().num_embeddings`)", s_in, t_in, student_tokenizer,
            teacher_tokenizer, "embedding",
        )
    if layout.compares_label_maps:
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
    return width
