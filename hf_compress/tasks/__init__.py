"""The one table of tasks, one module each, and how a checkpoint's or a model's task is inferred.

Each [`Task`] entry holds its name (`--task`, `distillation_task`), its auto class, the class-name suffixes of its
models, its pipeline tag and metrics, and how its logits are laid out ([`LogitLayout`]): the pipeline, distillation
and the model cards read them from here.

Adding a task: write a [`Task`] subclass in a new module and list it in `TASK_CLASSES`.
"""

from __future__ import annotations

from .base import CompressionInputError, Task
from .layout import LogitLayout
from .causal_lm import CausalLMTask
from .question_answering import QuestionAnsweringTask
from .sequence_classification import SequenceClassificationTask
from .token_classification import TokenClassificationTask

TASK_CLASSES: dict[str, type[Task]] = {
    cls.name: cls
    for cls in (SequenceClassificationTask, TokenClassificationTask, QuestionAnsweringTask, CausalLMTask)
}
TASKS = tuple(TASK_CLASSES)
# What optimum calls a checkpoint without a task head (a bare encoder, a masked-LM pre-training checkpoint).
_HEADLESS = ("feature-extraction", "fill-mask")


def get_task(name: str) -> type[Task]:
    if name not in TASK_CLASSES:
        raise CompressionInputError(f"task must be auto or one of {', '.join(TASKS)}, got {name!r}.")
    return TASK_CLASSES[name]


def task_of_class(name: str | None) -> type[Task] | None:
    """The task whose model classes are named like `name` (`BertForSequenceClassification`, `GPT2LMHeadModel`, a
    PEFT `PeftModelForCausalLM`, a card's `architecture`), by [`Task.class_suffixes`]; `None` when none matches."""
    for task in TASK_CLASSES.values():
        if name and name.endswith(task.class_suffixes):
            return task
    return None


def task_of_model(model) -> str:
    """The task name of a loaded `*For<Task>` model, from its class name ([`task_of_class`]); a PEFT model's is its
    base model's.

    Raises:
        `ValueError`: the class names no task; the message asks for the task to be given.
    """
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    name = type(base).__name__
    task = task_of_class(name)
    if task is None:
        raise ValueError(
            f"Cannot tell the task of a `{name}`; pass `distillation_task` (or `--task`): one of {', '.join(TASKS)}."
        )
    return task.name


def _ecosystem_task(arch: str) -> str | None:
    """The task name optimum's `TasksManager` gives a transformers class name (None when optimum is absent or
    does not know it); without optimum, the transformers auto mapping that lists the class."""
    import transformers

    cls = getattr(transformers, arch, None)
    if cls is None:
        return None
    try:
        from optimum.exporters.tasks import TasksManager
    except ImportError:
        TasksManager = None
    if TasksManager is not None:
        try:
            return TasksManager.infer_task_from_model(cls)
        except Exception:  # optimum raises on classes it has no export for
            pass
    from transformers.models.auto import modeling_auto

    for task in TASK_CLASSES.values():
        if arch in getattr(modeling_auto, task.mapping_names).values():
            return task.optimum_tasks[0]
    return None


def infer_task(config) -> tuple[str, bool]:
    """
    The task of a checkpoint from its `config.architectures`, and whether its task head is already trained.

    Uses optimum's `TasksManager.infer_task_from_model` (offline, on the class), else the transformers auto mappings.
    A headless checkpoint (`BertModel`, `*ForMaskedLM`) maps to the first task with `new_head` (sequence
    classification) when its model type has a class for it.

    Raises:
        `CompressionInputError`: no task matches.
    """
    from transformers.models.auto import modeling_auto

    archs = list(getattr(config, "architectures", None) or [])
    headless = not archs
    for arch in archs:
        name = _ecosystem_task(arch)
        for task in TASK_CLASSES.values():
            if name in task.optimum_tasks:
                return task.name, True
        headless = headless or name in _HEADLESS or arch.endswith(("Model", "ForMaskedLM", "ForPreTraining"))
    if headless:
        for task in TASK_CLASSES.values():
            if task.new_head and config.model_type in getattr(modeling_auto, task.mapping_names):
                return task.name, False
    raise CompressionInputError(
        f"No task matches the model (model_type {config.model_type!r}, architectures {archs or None}); "
        f"pass `--task` with one of {', '.join(TASKS)} or use a text model."
    )


def check_task_supported(config, task: str) -> None:
    """One line when the model type has no class for `task`."""
    from transformers.models.auto import modeling_auto

    if config.model_type not in getattr(modeling_auto, get_task(task).mapping_names):
        raise CompressionInputError(
            f"The model type {config.model_type!r} has no {task} class; pick another `--task` or another model."
        )


__all__ = ["TASKS", "TASK_CLASSES", "CompressionInputError", "LogitLayout", "Task", "check_task_supported", "get_task",
           "infer_task", "task_of_class", "task_of_model",
           "CausalLMTask", "QuestionAnsweringTask", "SequenceClassificationTask", "TokenClassificationTask"]
