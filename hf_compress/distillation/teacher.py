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


def accelerator_backend(accelerator) -> str:
    """What the run's `accelerate.Accelerator` shards with: `"deepspeed-zero3"`, `"fsdp"` (FSDP2) or `"other"`.

    accelerate switches to FSDP only on accelerator devices: on CPU under gloo it keeps `MULTI_CPU` and drops the FSDP
    plugin, so `is_fsdp2` is `False` there.
    """
    plugin = getattr(getattr(accelerator, "state", None), "deepspeed_plugin", None)
    if plugin is not None and getattr(plugin, "zero_stage", 0) == 3:
        return "deepspeed-zero3"
    if getattr(accelerator, "is_fsdp2", False):
        return "fsdp"
    return "other"


def resolve_teacher_placement(placement: str, backend: str, teacher, cached: bool = False) -> str:
    """The placement `prepare_teacher` applies: `"shard"`, `"replicate"`, `"device_map"` or `"as_loaded"`.

    `backend` is the run's sharding (`"fsdp"`, `"deepspeed-zero3"`, anything else: none), `cached` whether the
    teacher's logits are cached before training. `"auto"` picks, in this order: under DeepSpeed ZeRO-3, `"shard"`
    (TRL's `prepare_deepspeed`, as before; ZeRO-3 may partition the teacher while it loads, so nothing else is
    offered there); a teacher loaded with `device_map` stays where accelerate dispatched it and a quantized one as
    it was loaded (moving either breaks its hooks or its quantization state); with the logit cache, `"replicate"`
    (the main process builds the cache with a whole teacher, then no teacher runs during training); under FSDP2,
    `"shard"` (no rank holds a whole teacher, which is what FSDP is for); else `"replicate"`. An explicit choice
    that cannot work is refused in one line naming the value and the fix.
    """
    from .config import check_teacher_placement

    check_teacher_placement(placement)
    zero3, fsdp2 = backend == "deepspeed-zero3", backend == "fsdp"
    loaded = "loaded with `device_map` (it has an `hf_device_map`)" if is_dispatched(teacher) else (
        "quantized (bitsandbytes)" if is_quantized(teacher) else None)
    if placement == "auto":
        if zero3:
            if cached:
                raise ValueError(
                    "cache_teacher_logits runs the teacher on the main process alone, which a ZeRO-3-sharded teacher "
                    "cannot do; train with the live teacher (`cache_teacher_logits=False`) or use ZeRO stage 2."
                )
            return "shard"
        if is_dispatched(teacher):
            return "device_map"
        if loaded is not None:
            return "as_loaded"
        return "replicate" if cached or not fsdp2 else "shard"
    if zero3 and placement != "shard":
        raise ValueError(
            f"teacher_placement={placement!r} is not offered under DeepSpeed ZeRO-3, which may partition the teacher "
            "while it loads; use `teacher_placement=\"shard\"` or `\"auto\"` (TRL's `prepare_deepspeed`)."
        )
    if placement == "shard":
        if not (zero3 or fsdp2):
            raise ValueError(
                f"teacher_placement='shard' needs FSDP2 or DeepSpeed ZeRO-3, but this run is {backend!r}; launch with "
                "FSDP2 (`fsdp_config={'version': 2}` on GPUs) or use `teacher_placement=\"replicate\"`."
            )
        check_teacher_placement(placement, cached)
        if loaded is not None:
            raise ValueError(
                f"teacher_placement='shard' cannot shard a teacher {loaded}; use `teacher_placement=\"auto\"` "
                "(it stays where it was loaded), or load it unquantized without `device_map`."
            )
    elif placement == "device_map" and not is_dispatched(teacher):
        raise ValueError(
            "teacher_placement='device_map' needs a teacher loaded with `device_map` (this one has no `hf_device_map`); "
            "load it with `from_pretrained(..., device_map=\"auto\")` or use `teacher_placement=\"auto\"`."
        )
    elif placement == "replicate" and loaded is not None:
        raise ValueError(
            f"teacher_placement='replicate' would move a teacher {loaded}, which breaks it; use "
            "`teacher_placement=\"auto\"` (it stays where it was loaded)."
        )
    return placement


def _fsdp2_options(accelerator) -> dict:
    """`shard_teacher` options from the run's FSDP2 plugin and mesh, as `trl.models.utils.prepare_fsdp` reads them.

    The plugin's `ignored_modules` name the student's modules and are not passed."""
    plugin = accelerator.state.fsdp_plugin
    mesh = getattr(accelerator, "torch_device_mesh", None)
    if mesh is not None:
        mesh = mesh[tuple(accelerator.parallelism_config.fsdp_dim_names)]
    return {"mesh": mesh, "mp_policy": plugin.mixed_precision_policy, "offload_policy": plugin.cpu_offload or None}


def prepare_teacher(teacher, device=None, dtype: str | None = None, accelerator=None, cached: bool = False,
                    placement: str = "auto"):
    """Freeze the teacher (eval mode, no gradients) and place it as [`resolve_teacher_placement`] decides.

    `"replicate"` casts it to `dtype` and moves it to `device`; `"shard"` casts it, then under DeepSpeed ZeRO-3 shards
    it as TRL shards its reference models (`trl.models.utils.prepare_deepspeed`) and under FSDP2
    (`accelerator.is_fsdp2`) `fully_shard`s it with the student's mesh and mixed-precision / offload policies
    ([`~hf_compress.fsdp.shard_teacher`]); `"device_map"` and `"as_loaded"` leave it where it was loaded.
    """
    teacher.eval()
    teacher.requires_grad_(False)
    backend = accelerator_backend(accelerator)
    where = resolve_teacher_placement(placement, backend, teacher, cached)
    if where in ("device_map", "as_loaded"):
        return teacher
    if dtype:
        teacher.to(getattr(torch, dtype))
    if where == "replicate":
        return teacher.to(device) if device is not None else teacher
    if backend == "deepspeed-zero3":
        try:
            from trl.models.utils import prepare_deepspeed
        except ImportError as err:
            raise ImportError(
                "A teacher under DeepSpeed ZeRO-3 is sharded with TRL's `prepare_deepspeed`: `pip install trl`."
            ) from err
        return prepare_deepspeed(teacher, accelerator)
    from ..fsdp import shard_teacher

    return shard_teacher(teacher, **_fsdp2_options(accelerator))


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
