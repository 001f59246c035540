"""The stages before the export, in the order [`~hf_compress.pipeline.runner.run`] calls them. Each is a function of
the [`RunContext`] that decides from the plan whether it applies, leaves what later stages need in the context, and
returns its record for the report's `pipeline.stages` (`None` when it did not run).

No stage knows a task: the plan's [`~hf_compress.tasks.Task`] preprocesses, collates and evaluates.
"""

from __future__ import annotations

import copy
import os

from .context import RunContext, training_steps
from .plan import describe_plan
from .report import format_metrics
from .training import calibration_batches, magnitude_prune, trainer_args, train_model


def load_inputs(ctx: RunContext) -> None:
    """The tokenizer, the tokenized splits, the collator and the model, then the plan's lines with the step counts."""
    import transformers
    from transformers import AutoTokenizer

    plan, task = ctx.plan, ctx.plan.task
    ctx.tokenizer = task.prepare_tokenizer(AutoTokenizer.from_pretrained(plan.model_path))
    ctx.train_dataset = task.preprocess(plan.train_dataset, ctx.tokenizer, train=True)
    ctx.eval_dataset = task.preprocess(plan.eval_dataset, ctx.tokenizer, train=False)
    ctx.collator = task.collator(ctx.tokenizer)
    ctx.model = getattr(transformers, task.auto_class).from_pretrained(plan.model_path, **task.model_kwargs(plan.has_head))
    ctx.steps = training_steps(plan.training_args, len(ctx.train_dataset))
    given = plan.model_args.base_finetune_steps
    ctx.base_steps = given if given is not None else ctx.steps
    for line in describe_plan(plan, len(ctx.train_dataset), len(ctx.eval_dataset), ctx.steps, ctx.base_steps):
        ctx.log(line)
    if plan.teacher_logits is not None:
        check_teacher_logits(ctx)


def check_teacher_logits(ctx: RunContext) -> None:
    """`--teacher_logits`: the Hub cache downloaded and its key checked against the tokenized training set, the
    tokenizer, the temperature, the named teacher and the student, before the base is fine-tuned or evaluated (the
    trainer checks the same again, from the downloaded copy); a cache made for another run is one line."""
    from ..distillation import hub_cache
    from ..hub import HubPushError
    from ..tasks import CompressionInputError, task_of_model

    args, source = ctx.plan.training_args, ctx.plan.teacher_logits
    task = args.distillation_task if args.distillation_task != "auto" else task_of_model(ctx.model)
    teacher = ctx.plan.model_args.teacher
    try:
        _, key = hub_cache.open_checked_cache(source, ctx.train_dataset, ctx.tokenizer, task, args.temperature,
                                              teacher, args.teacher_revision)
        hub_cache.check_student_against_key(ctx.model, key, task, ctx.tokenizer, source)
    except (ValueError, HubPushError) as err:
        rows = getattr(err, "field", None) in hub_cache.ROW_FIELDS  # a cache of other rows: rebuild it for these
        fix = ("; build the cache for these rows with `hf-compress cache-teacher --dataset <this --dataset> "
               "<the same data options>`" if rows else "")
        raise CompressionInputError(f"--teacher_logits: {str(err).rstrip('.')}{fix}.") from None


def finetune_base(ctx: RunContext) -> dict | None:
    """A new task head is first fine-tuned dense, so the base figures are those of a trained dense model and
    compression starts from it. Returns the training metrics."""
    plan = ctx.plan
    if plan.has_head or not plan.model_args.train or ctx.base_steps <= 0:
        return None
    args = trainer_args(plan.training_args, os.path.join(ctx.work, "base-run"), max_steps=ctx.base_steps)
    return train_model(ctx.model, args, ctx.train_dataset, ctx.tokenizer, ctx.collator,
                       "Fine-tuning the dense base (new head)")


def keep_base(ctx: RunContext) -> None:
    """A frozen copy of the dense base (the reference of every figure, and the `--teacher base`), saved by the main
    process for the report's size comparison."""
    ctx.base_dir = os.path.join(ctx.work, "base")
    ctx.base = copy.deepcopy(ctx.model).eval()
    if ctx.main:
        ctx.model.save_pretrained(ctx.base_dir)
        ctx.tokenizer.save_pretrained(ctx.base_dir)


def evaluate_base(ctx: RunContext) -> dict | None:
    """The base's metrics on the held-out split (main process); `None` with `--no_evaluate`."""
    plan = ctx.plan
    if not ctx.main or not plan.model_args.evaluate:
        return None
    metrics = plan.task.evaluate(ctx.base, ctx.eval_dataset, ctx.tokenizer, plan.eval_dataset, desc="Evaluating the base")
    ctx.log(f"Base on {plan.eval_split_name}: {format_metrics(metrics)}.")
    return metrics


def prune_structured(ctx: RunContext) -> dict | None:
    """Structured pruning before training (`oneshot`: the smaller model is then trained or distilled from the base),
    or the callback that masks gradually and removes at the end of training (`gradual`, added to `ctx.callbacks`)."""
    sa = ctx.plan.structured_args
    if not ctx.plan.prunes_structures:
        return None
    if sa.prune_schedule == "gradual":
        from ..callbacks.structured_pruning import StructuredPruningCallback

        ctx.log(f"Structured pruning of {sa.prune_structure}, gradual: masked during training, removed at its end.")
        ctx.callbacks.append(StructuredPruningCallback(sa))
        return {"schedule": "gradual", "structures": sa.structures, "keep": sa.keep()}
    from ..pruning.structured import structured_prune

    model = ctx.model
    batches = None
    if sa.prune_calibration_batches:
        batches = calibration_batches(model, ctx.train_dataset, ctx.collator, ctx.plan.training_args,
                                      sa.prune_calibration_batches)
    before = model.num_parameters()
    result = structured_prune(model, sa.structures, keep=sa.keep(), batches=batches, target_params=sa.prune_target_params,
                              layer_metric=sa.prune_layer_metric)
    ctx.log(f"Structured pruning of {sa.prune_structure}: {before:,} -> {model.num_parameters():,} parameters.")
    return {"schedule": "oneshot", "parameters_before": before, "parameters_after": model.num_parameters(),
            **result.to_dict()}


def add_training_callbacks(ctx: RunContext) -> dict | None:
    """The gradual pruning callback, then QAT (`QATCallback`), for the training stage. Returns the QAT record."""
    plan = ctx.plan
    if not plan.model_args.train:
        return None
    from ..callbacks import GradualPruningCallback, QATCallback

    if plan.prunes:
        ctx.callbacks.append(GradualPruningCallback(plan.pruning_args))
    if not plan.fake_quantizes:
        return None
    # After the pruning callback: its masks act on the stored weight under QAT's parametrization.
    qa = plan.quantization_args
    ctx.callbacks.append(QATCallback(qa))
    return {"bits": qa.bits, "fraction": qa.qat_fraction}


def train(ctx: RunContext) -> dict | None:
    """Fine-tune (`Trainer`) or distil (`DistillationTrainer`) under the callbacks; returns the training metrics."""
    plan = ctx.plan
    ma = plan.model_args
    if not ma.train:
        return None
    # a Hub id or directory (with --teacher_logits only named, for the cache's key), or None
    teacher = ctx.base if ma.teacher == "base" else ma.teacher
    what = "Distilling" if plan.distils else "Fine-tuning"
    what += f" with pruning to {plan.pruning_args.target_sparsity:.0%}" if plan.prunes else ""
    return train_model(ctx.model, trainer_args(plan.training_args, os.path.join(ctx.work, "run")), ctx.train_dataset,
                       ctx.tokenizer, ctx.collator, what, teacher, ctx.callbacks, teacher_logits=plan.teacher_logits)


def collect_pruning_checks(ctx: RunContext) -> dict | None:
    """After training: the self-check figures the pruning callbacks hold (`callback.plan` of the structured one, which
    completes the `structured_pruning` record; `callback.check` of the unstructured one, with the batch it ran on
    kept for the export's check). Returns the unstructured pruning record."""
    if not ctx.plan.model_args.train:
        return None
    from ..callbacks import GradualPruningCallback
    from ..callbacks.structured_pruning import StructuredPruningCallback

    record = None
    for cb in ctx.callbacks:
        if isinstance(cb, StructuredPruningCallback) and cb.plan is not None:
            ctx.stages["structured_pruning"].update(cb.plan.to_dict(), masked_fraction_by_step=cb.history)
        elif isinstance(cb, GradualPruningCallback) and cb.check is not None:
            record = {"schedule": "gradual", "target_sparsity": ctx.plan.pruning_args.target_sparsity,
                      "check": dict(cb.check)}
            ctx.self_check_batch = cb.check_batch
    return record


def prune_one_shot(ctx: RunContext) -> dict | None:
    """`--no_train`: magnitude masks at the target, made permanent and self-checked on the first training batch."""
    plan = ctx.plan
    if plan.model_args.train or not plan.prunes:
        return None
    from ..pruning.self_check import check_batch as first_check_batch

    pa = plan.pruning_args
    ctx.log(f"Pruning one-shot by magnitude to {pa.target_sparsity:.0%} (no training).")
    batches = calibration_batches(ctx.model, ctx.train_dataset, ctx.collator, plan.training_args, 1)
    ctx.self_check_batch = first_check_batch(ctx.model, batches)
    return {"schedule": "oneshot", "target_sparsity": pa.target_sparsity,
            "check": magnitude_prune(ctx.model, pa, ctx.self_check_batch)}
