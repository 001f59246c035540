"""The training-side helpers the stages share: the Trainer run under one progress bar, the Trainer's arguments for
the pipeline's scratch runs, calibration batches, and one-shot magnitude pruning.
"""

from __future__ import annotations

import dataclasses


def trainer_args(training_args, output_dir: str, **overrides):
    """The user's `TrainingArguments` with the pipeline's own settings: scratch output, no checkpoints, evaluation
    or pushes from inside the Trainer (the pipeline evaluates, writes and pushes the final folder itself), and no
    `teacher_logits` (the training stage passes them to [`train_model`] itself; the base fine-tune never reads them)."""
    if hasattr(training_args, "teacher_logits"):
        overrides = {"teacher_logits": None, **overrides}
    return dataclasses.replace(
        training_args, output_dir=output_dir, push_to_hub=False, save_strategy="no", load_best_model_at_end=False,
        eval_strategy="no", **overrides,
    )


def train_model(model, args, train_ds, tokenizer, collator, desc: str, teacher=None, callbacks=(),
                teacher_logits: str | None = None) -> dict:
    """Train with `Trainer` (or `DistillationTrainer`, from `teacher` or from the Hub cache `teacher_logits`, with
    `teacher` then only naming the cache's teacher) under one progress bar; returns its metrics, the optimizer
    steps really taken (`steps`, right under DDP) and the log history (per-step dicts stay off the console)."""
    from transformers import Trainer
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from ..progress import StageProgressCallback

    kwargs = dict(model=model, args=args, train_dataset=train_ds, data_collator=collator,
                  processing_class=tokenizer, callbacks=list(callbacks))
    if teacher is not None or teacher_logits is not None:
        from ..trainers import DistillationTrainer

        trainer = DistillationTrainer(teacher_model=teacher, teacher_logits=teacher_logits, **kwargs)
    else:
        trainer = Trainer(**kwargs)
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(StageProgressCallback(desc))
    result = trainer.train()
    metrics = dict(result.metrics)
    metrics["steps"] = trainer.state.global_step
    metrics["log_history"] = trainer.state.log_history
    return metrics


def calibration_batches(model, train_ds, collator, training_args, n: int) -> list[dict]:
    """The first `n` training batches, from the task's own collator over the columns the model takes (as the Trainer
    drops the others)."""
    import inspect

    from torch.utils.data import DataLoader

    from ..data.calibration import first_batches

    accepted = set(inspect.signature(model.forward).parameters) | {"label", "label_ids"}
    cols = [c for c in train_ds.column_names if c in accepted]
    loader = DataLoader(train_ds.select_columns(cols), batch_size=training_args.per_device_train_batch_size,
                        collate_fn=collator)
    return first_batches(loader, n)


def magnitude_prune(model, pruning_args, batch: dict) -> dict:
    """Magnitude masks at the target, attached and applied as the gradual callback's are, then made permanent and
    self-checked on `batch` ([`~hf_compress.pruning.self_check.check_permanent`]); returns the figures."""
    from ..architectures import weight_layouts
    from ..pruning import apply_masks, attach_masks, magnitude_masks, remove_masks, resolve_targets
    from ..pruning.self_check import check_permanent

    names = resolve_targets(model, pruning_args.pruning_target_modules)
    params = dict(model.named_parameters())
    weights = {n: params[n].detach() for n in names}
    masks = magnitude_masks(weights, pruning_args.target_sparsity, pruning_args.pruning_scope,
                            layouts=weight_layouts(model, names))
    for n, buffer in attach_masks(model, names).items():
        buffer.copy_(masks[n])
    apply_masks(model)
    return check_permanent(model, batch, remove_masks)
