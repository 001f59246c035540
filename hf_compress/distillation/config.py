"""`DistillationArguments`: the distillation options as a `TrainingArguments` subclass."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from ..tasks import TASKS

# `auto` (the student's class decides) or a task of the one table, `hf_compress.tasks`.
TASK_CHOICES = ("auto",) + TASKS
TEACHER_DTYPES = ("float32", "bfloat16", "float16")
# Where the frozen teacher lives in a multi-process run; `hf_compress.distillation.teacher.resolve_teacher_placement`.
TEACHER_PLACEMENTS = ("auto", "replicate", "shard", "device_map")


def check_teacher_logits_placement(teacher_logits: str | None, placement: str) -> None:
    """Hub teacher logits load no teacher, so there is nothing to place: only `teacher_placement="auto"` goes."""
    if teacher_logits is not None and placement != "auto":
        raise ValueError(
            f"teacher_placement={placement!r} places a teacher, but teacher_logits={teacher_logits!r} loads none; "
            "drop `teacher_placement` (or drop `teacher_logits` to train with a live teacher)."
        )


def check_teacher_placement(placement: str, cached: bool = False, teacher_device: str | None = None,
                            teacher_logits: str | None = None) -> None:
    """One-line refusals of `teacher_placement` from the arguments alone: an unknown value, a placement with Hub
    teacher logits, `"shard"` with the logit cache or with `teacher_device`. Also asked by
    `hf_compress.distillation.teacher.resolve_teacher_placement` (which adds the run's and the teacher's checks)."""
    if placement not in TEACHER_PLACEMENTS:
        raise ValueError(f"teacher_placement must be one of {', '.join(TEACHER_PLACEMENTS)}, got {placement!r}.")
    check_teacher_logits_placement(teacher_logits, placement)
    if placement == "shard" and cached:
        raise ValueError(
            "teacher_placement='shard' with cache_teacher_logits: the cache is built by the main process with a "
            "whole teacher; use `teacher_placement=\"replicate\"` (or `\"auto\"`), or drop `cache_teacher_logits`."
        )
    if placement == "shard" and teacher_device is not None:
        raise ValueError(
            f"teacher_placement='shard' puts each rank's shard on the student's device, not on "
            f"teacher_device={teacher_device!r}; drop `teacher_device` or use `teacher_placement=\"replicate\"`."
        )


@dataclass
class DistillationArguments(TrainingArguments):
    r"""
    [`TrainingArguments`] plus the options of [`DistillationTrainer`].

    Parameters:
        temperature (`float`, *optional*, defaults to `2.0`):
            Softening temperature of both distributions; the KL part is multiplied by `temperature**2`.
        alpha (`float`, *optional*, defaults to `0.5`):
            Weight of the soft (teacher) loss; `1 - alpha` weighs the hard-label loss. Ignored without labels.
        cache_teacher_logits (`bool`, *optional*, defaults to `False`):
            Run the teacher once over the training set before training and reuse its logits every epoch.
        teacher_logits_top_k (`int`, *optional*):
            With the cache, keep only the teacher's k most probable classes per position (for large vocabularies), as
            log-probabilities at `temperature`; the loss adds a tail bucket with the rest of the mass.
        teacher_cache_dir (`str`, *optional*):
            Save the cached teacher logits there (an Arrow file and its key) and reuse them when the key matches;
            default: a folder keyed on the teacher, data and options under `$HF_DATASETS_CACHE`.
        teacher_cache_dtype (`str`, *optional*):
            Dtype of the stored full-vocabulary logits: `float32`, `float16` or `bfloat16`; defaults to the teacher's
            dtype when it is 16-bit, else `float32`. Top-k log-probabilities are always stored in float32.
        teacher_logits (`str`, *optional*):
            A Hub dataset repo (`namespace/name`, optionally `@revision`) or a local folder holding a teacher cache
            pushed with `hf-compress cache-teacher` / [`~hf_compress.distillation.hub_cache.push_teacher_cache`]:
            train on those logits with no teacher loaded (`teacher_model=None`). Its key is checked against the run.
        teacher_revision (`str`, *optional*):
            With `teacher_logits`: the teacher revision the cache must have been computed from (checked).
        teacher_dtype (`str`, *optional*):
            Cast the teacher to `float32`, `bfloat16` or `float16` (a bitsandbytes-quantized teacher is left as is).
        teacher_device (`str`, *optional*):
            Device of the teacher; defaults to the student's device on each process.
        teacher_placement (`str`, *optional*, defaults to `"auto"`):
            Where the frozen teacher lives: `"replicate"` (a whole teacher on each process's device), `"shard"`
            (under FSDP2: `fully_shard`-ed with the student's mesh, each rank holding its shard; under DeepSpeed ZeRO-3:
            TRL's `prepare_deepspeed`), `"device_map"` (a teacher loaded with `device_map`, left where accelerate
            dispatched it) or `"auto"`: a dispatched teacher stays, a quantized one stays as loaded, ZeRO-3 shards, a
            logit cache replicates (the main process builds it with a whole teacher), FSDP2 shards, else replicate.
        distillation_task (`str`, *optional*, defaults to `"auto"`):
            `sequence-classification`, `token-classification`, `question-answering` or `causal-lm`; `auto`
            infers it from the student's class.
    """

    temperature: float = field(default=2.0, metadata={"help": "Softening temperature (> 0); the KL part is scaled by T^2."})
    alpha: float = field(default=0.5, metadata={"help": "Weight of the soft teacher loss, in [0, 1]."})
    cache_teacher_logits: bool = field(
        default=False, metadata={"help": "Compute the teacher's logits once over the training set and reuse them."}
    )
    teacher_logits_top_k: int | None = field(
        default=None, metadata={"help": "With the cache, store only the teacher's top-k logits per position."}
    )
    teacher_cache_dir: str | None = field(
        default=None, metadata={"help": "Directory where the cached teacher logits are saved and reused."}
    )
    teacher_cache_dtype: str | None = field(
        default=None, metadata={"help": "Stored dtype of cached logits: float32, float16 or bfloat16 (default: the teacher's 16-bit dtype, else float32)."}
    )
    teacher_logits: str | None = field(
        default=None,
        metadata={"help": "Hub dataset repo (namespace/name[@revision]) or folder of teacher logits pushed with "
                  "`hf-compress cache-teacher`: train on them with no teacher loaded."},
    )
    teacher_revision: str | None = field(
        default=None, metadata={"help": "With teacher_logits: the teacher revision the cache must come from (checked)."}
    )
    teacher_dtype: str | None = field(
        default=None, metadata={"help": "Teacher dtype: float32, bfloat16 or float16 (default: as loaded)."}
    )
    teacher_device: str | None = field(
        default=None, metadata={"help": "Teacher device (default: the student's device on each process)."}
    )
    teacher_placement: str = field(
        default="auto",
        metadata={"help": "Where the frozen teacher lives: auto, replicate (whole on each rank), shard (FSDP2 "
                  "`fully_shard` with the student's mesh / ZeRO-3), device_map (as dispatched by `device_map`)."},
    )
    distillation_task: str = field(
        default="auto", metadata={"help": f"One of {', '.join(TASK_CHOICES)}."}
    )

    def __post_init__(self):
        for name in ("temperature", "alpha"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__}).")
        if self.teacher_logits_top_k is not None and (
            isinstance(self.teacher_logits_top_k, bool) or not isinstance(self.teacher_logits_top_k, int)
        ):
            raise TypeError(
                f"teacher_logits_top_k must be an integer, got {self.teacher_logits_top_k!r} "
                f"({type(self.teacher_logits_top_k).__name__})."
            )
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}.")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}.")
        if self.teacher_logits_top_k is not None:
            if self.teacher_logits_top_k < 1:
                raise ValueError(f"teacher_logits_top_k must be >= 1, got {self.teacher_logits_top_k}.")
            if not self.cache_teacher_logits:
                raise ValueError(
                    f"teacher_logits_top_k={self.teacher_logits_top_k} only applies to cached logits; "
                    "set `cache_teacher_logits=True` or drop `teacher_logits_top_k`."
                )
        if self.teacher_logits is not None:
            if not isinstance(self.teacher_logits, str) or not self.teacher_logits:
                raise ValueError(f"teacher_logits must be a Hub dataset repo id or a folder, got {self.teacher_logits!r}.")
            if self.cache_teacher_logits:
                raise ValueError(
                    f"teacher_logits={self.teacher_logits!r} replaces the teacher and its cache; drop "
                    "`cache_teacher_logits` (and `teacher_logits_top_k`, which the pushed cache fixes)."
                )
            if self.teacher_cache_dir is not None:
                raise ValueError(
                    f"teacher_logits={self.teacher_logits!r} is downloaded to the Hugging Face cache, not to "
                    f"teacher_cache_dir={self.teacher_cache_dir!r}; drop `teacher_cache_dir`."
                )
        if self.teacher_dtype is not None and self.teacher_dtype not in TEACHER_DTYPES:
            raise ValueError(f"teacher_dtype must be one of {', '.join(TEACHER_DTYPES)}, got {self.teacher_dtype!r}.")
        if self.teacher_cache_dtype is not None and self.teacher_cache_dtype not in TEACHER_DTYPES:
            raise ValueError(
                f"teacher_cache_dtype must be one of {', '.join(TEACHER_DTYPES)}, got {self.teacher_cache_dtype!r}."
            )
        # What the arguments alone show; the run's and the teacher's checks: `resolve_teacher_placement`.
        check_teacher_placement(self.teacher_placement, self.cache_teacher_logits, self.teacher_device,
                                self.teacher_logits)
        if self.distillation_task not in TASK_CHOICES:
            raise ValueError(
                f"distillation_task must be one of {', '.join(TASK_CHOICES)}, got {self.distillation_task!r}."
            )
        super().__post_init__()
