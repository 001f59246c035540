"""The end-to-end pipeline behind `hf-compress`: fine-tune or distil with gradual pruning, quantize, evaluate base
and result on the same held-out split, and write checkpoint, report and card (optionally push).

It is a composition of the pieces, not a trainer that knows every technique: the loss comes from
`DistillationTrainer` (or the plain `Trainer`), pruning is `GradualPruningCallback`, quantization is
`quantize_and_save`, the report and card are `build_report` / `build_model_card`. Every input is checked in
[`prepare`] before any weight is loaded for training, so bad input is one line, never a half-finished run; [`run`]
is the list of stages ([`hf_compress.pipeline.stages`]), each a function of the run's context.
"""

from __future__ import annotations

import dataclasses

from .arguments import DEFAULT_OUTPUT_DIR, TARGET_DEFAULTS, DataArguments, ModelArguments
from .context import barrier, open_run
from .export import check_export, export
from .latency import search_latency
from .output import push, write_output
from .plan import CompressionPlan, prepare
from .report import build_run_report, evaluate_result, quality_guard
from .stages import (
    add_training_callbacks,
    collect_pruning_checks,
    evaluate_base,
    finetune_base,
    keep_base,
    load_inputs,
    prune_one_shot,
    prune_structured,
    train,
)


def run(plan: CompressionPlan) -> dict | None:
    """
    Execute a checked [`CompressionPlan`] (never changed): returns the compression report (also in `output_dir`).

    The task object in the plan does everything task-specific (preprocessing, collator, evaluation, card metadata);
    this function only sequences the stages, each of which decides from the plan whether it applies. The output is
    written into a temporary folder beside `output_dir` and renamed at the end, so an interrupted run leaves no
    half-written checkpoint. Under `torchrun` / `accelerate launch` every rank trains (DDP) and only the main
    process evaluates, exports, writes and pushes; the other ranks return `None`.
    """
    with open_run(plan) as ctx:  # seed, the shared scratch folder (deleted at the end), quiet bars
        load_inputs(ctx)  # tokenizer, tokenized splits, collator, model; prints the plan
        ctx.record("base_finetune", finetune_base(ctx))  # a new task head: fine-tune the dense base first
        keep_base(ctx)  # a frozen copy of the dense base, the reference of every figure
        ctx.base_metrics = evaluate_base(ctx)
        if plan.model_args.target == "latency":  # one process: candidates cut, distilled, exported and timed
            ctx.record("latency_search", search_latency(ctx))  # the kept one's model, export and records in ctx
        else:
            ctx.record("structured_pruning", prune_structured(ctx))  # one-shot now, or gradual during training
            ctx.record("qat", add_training_callbacks(ctx))  # gradual pruning, then QAT over its masks
            ctx.record("train", train(ctx))  # fine-tune or distil under those callbacks
            ctx.record("pruning", collect_pruning_checks(ctx))  # after training: the callbacks' self-checks
            ctx.record("pruning", prune_one_shot(ctx))  # --no_train: magnitude masks at the target
            if ctx.main:  # the other ranks trained; the main process alone exports
                ctx.record("export", export(ctx))  # the checkpoint in `--format`, loaded back as a user loads it
        if ctx.main:  # the main process alone measures and writes
            check_export(ctx)  # the pruning self-check's second half, on the written folder
            ctx.report = build_run_report(ctx, evaluate_result(ctx))  # metrics, sizes, loaders check, stages
            ctx.report["quality_guard"] = quality_guard(ctx)  # printed by the CLI summary and written into the card
            write_output(ctx)  # report and card, then the folder swapped into `output_dir` whole
        barrier()  # the other ranks leave once the output is in place
    push(ctx)  # --push_to_hub (main process)
    return ctx.report


def compress(model: str | None = None, dataset: str = "rotten_tomatoes", output_dir: str = DEFAULT_OUTPUT_DIR, *,
             teacher: str | None = None, target_sparsity: float | None = None, bits: int = 8, **kwargs) -> dict:
    """
    Python API of `hf-compress`: compress `model` on `dataset` into `output_dir` and return the report.

    Any field of [`ModelArguments`], [`DataArguments`], `DistillationArguments`, `PruningArguments` or
    `QuantizationArguments` can be passed as a keyword (e.g. `max_steps=200`, `quantize=False`).

    Example:

    ```python
    from hf_compress import compress

    report = compress("my-bert-sst2", "data.csv", "out", target_sparsity=0.8, bits=4, max_steps=300)
    print(report["metrics"])
    ```
    """
    from ..distillation import DistillationArguments
    from ..pruning import PruningArguments
    from ..pruning.structured_config import StructuredPruningArguments
    from ..quantization import QuantizationArguments

    # `target_sparsity` defaults to 0.5, or to what a `target=` implies (`TARGET_DEFAULTS`, as on the command line).
    implied = {k: v for k, v in TARGET_DEFAULTS.get(kwargs.get("target"), {}).items() if k not in kwargs}
    values = dict(model=model, dataset=dataset, output_dir=output_dir, teacher=teacher, bits=bits, **implied, **kwargs)
    if target_sparsity is not None or "target_sparsity" not in values:
        values["target_sparsity"] = 0.5 if target_sparsity is None else target_sparsity
    groups = []
    for cls in (ModelArguments, DataArguments, DistillationArguments, PruningArguments, QuantizationArguments,
                StructuredPruningArguments):
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        groups.append(cls(**{k: v for k, v in values.items() if k in names}))
    known = set().union(*({f.name for f in dataclasses.fields(type(g))} for g in groups))
    unknown = sorted(set(values) - known)
    if unknown:
        raise TypeError(f"compress() got unknown options {unknown}; see `hf-compress --help` for the names.")
    from ..redact import redact_mapping

    given = {k: v for k, v in values.items() if v is not None}
    # The card and report record these: a token passed as `hub_token=` (or any secret-looking value) is redacted.
    command = "compress(" + ", ".join(f"{k}={v!r}" for k, v in redact_mapping(given, drop=False).items()) + ")"
    return run(prepare(*groups, command=command, recipe=redact_mapping(given)))
