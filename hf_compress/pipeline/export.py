"""The export stage: the trained model written into the run's scratch folder in the `--format` chosen, loaded back
the way a user loads it, and the unstructured pruning self-check's second half on what was written.
"""

from __future__ import annotations

import os

from .context import RunContext
from .plan import CompressionPlan


def export(ctx: RunContext) -> dict:
    """Write the checkpoint ([`export_checkpoint`]) into `<work>/checkpoint` and keep it and its reloaded model in the
    context; returns what the export did."""
    ctx.checkpoint = os.path.join(ctx.work, "checkpoint")
    ctx.gptq = run_gptq(ctx)
    extra = {"precomputed": ctx.gptq} if ctx.gptq else {}
    ctx.result, info = export_checkpoint(ctx.plan, ctx.model, ctx.tokenizer, ctx.checkpoint, ctx.log, **extra)
    # The temporary work folder is no place a user can use, and a machine path in a pushed report.
    return {k: v for k, v in info.items() if k != "output_dir"}


def check_export(ctx: RunContext) -> dict | None:
    """
    The unstructured pruning self-check's second half: the written folder, loaded back, against the in-memory model,
    added to the `pruning` record (still in the work folder: a failed check leaves no output). A quantized export
    computes another (quantized) function by design: the loaders check compares it with the fake-quantized model
    instead. Returns what it added; `None` without unstructured pruning.
    """
    from ..pruning.self_check import check_reload

    if "pruning" not in ctx.stages:
        return None
    plan, model, result = ctx.plan, ctx.model, ctx.result
    if plan.model_args.quantize:
        check = {"reloaded": "quantized export: checked by the loaders check against the fake-quantized model"}
    elif plan.model_args.format == "onnx":
        check = {"reloaded": "ONNX graph: checked against the in-memory model by the export (1e-4) and by the loaders check"}
    else:
        if plan.model_args.format != "bitmask":  # the dense export hands back the in-memory model: load what was written
            result = type(model).from_pretrained(ctx.checkpoint, dtype=next(model.parameters()).dtype)
        check = check_reload(model, result, ctx.self_check_batch)
    ctx.stages["pruning"]["check"].update(check)
    return check


def run_gptq(ctx: RunContext) -> dict | None:
    """`--quant_method gptq`: GPTQ's integers and scales for the trained model, measured on the first
    `gptq_calibration_batches` training batches (act-order, MSE scales); `None` otherwise."""
    qa = ctx.plan.quantization_args
    if not ctx.plan.model_args.quantize or getattr(qa, "quant_method", "rtn") != "gptq":
        return None
    from ..quantization.gptq import gptq_quantize
    from .training import calibration_batches

    batches = calibration_batches(ctx.model, ctx.train_dataset, ctx.collator, ctx.plan.training_args,
                                  qa.gptq_calibration_batches)
    inputs = [{k: b[k] for k in ("input_ids", "attention_mask") if k in b} for b in batches]
    ctx.log(f"GPTQ on {len(inputs)} calibration batches (act-order, MSE scales).")
    return gptq_quantize(ctx.model, inputs, bits=qa.bits, group_size=qa.group_size, act_order=True, scale_search="mse")


def export_checkpoint(plan: CompressionPlan, model, tokenizer, ckpt: str, log, precomputed=None) -> tuple[object, dict]:
    """
    The export stage: write the trained `model` (and tokenizer) into `ckpt` and return the model as a user reloads
    it, with what the stage did. Every on-disk format goes through here.
    """
    from ..formats import get_format

    ma = plan.model_args
    args = plan.quantization_args if ma.quantize else None  # `--format onnx --no_quantize` writes an fp32 graph
    extra = {} if precomputed is None else {"precomputed": precomputed}  # GPTQ's integers and scales
    result, info, message = get_format(ma.format).export(model, tokenizer, ckpt, args, task=plan.task.name, **extra)
    if message:
        log(message)
    return result, info
