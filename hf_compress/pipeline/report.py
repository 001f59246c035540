"""The report of a run: the exported model evaluated on the held-out split, measured against the base
([`~hf_compress.model_cards.build_report`]), the loaders check, the stage records and the quality guard.
"""

from __future__ import annotations

import time

import torch

from .context import RunContext
from .plan import dataset_id, model_id


def format_metrics(metrics: dict) -> str:
    """`name value` pairs for a console line (floats to 4 decimals)."""
    return ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())


def evaluate_result(ctx: RunContext) -> dict | None:
    """The exported model (as reloaded) on the held-out split; `None` with `--no_evaluate`."""
    plan = ctx.plan
    if not plan.model_args.evaluate:
        return None
    metrics = plan.task.evaluate(ctx.result, ctx.eval_dataset, ctx.tokenizer, plan.eval_dataset, desc="Evaluating the result")
    ctx.log(f"Result on {plan.eval_split_name}: {format_metrics(metrics)}.")
    return metrics


def build_run_report(ctx: RunContext, result_metrics: dict | None) -> dict:
    """Measure everything into the report: sizes, counts, sparsity and bits against the base, the metrics, the
    verification sample `--verify_push` recomputes, the task and format, the loaders check ([`check_loaders`]) and the
    records of the stages."""
    from ..model_cards import build_report
    from ..model_cards.loading import serving_engines

    plan = ctx.plan
    ma, task = plan.model_args, plan.task
    meta = task.card_metadata()
    report = build_report(
        ctx.result, ctx.checkpoint, base_model=ctx.base, base_dir=ctx.base_dir, base_model_id=model_id(plan.model_path),
        techniques=plan.techniques, base_metrics=ctx.base_metrics, compressed_metrics=result_metrics,
        tokenizer=ctx.tokenizer, metrics=task.metric_names,
        eval_info={"dataset": dataset_id(plan.data_args.dataset), "dataset_name": dataset_id(plan.data_args.dataset),
                   "split": plan.eval_split_name, "task": meta["task"], "num_examples": len(plan.eval_dataset)},
        verification_examples=0, save=False,
    )
    if ma.evaluate:  # a few held-out rows and the model's outputs on them, which `--verify_push` recomputes
        report["verification"] = task.verification_sample(ctx.result, ctx.eval_dataset, ctx.tokenizer)
    report["task"] = {"name": task.name, **meta, "columns": task.columns, "data_notes": task.data_notes,
                      "lower_is_better": list(task.lower_is_better)}
    report["format"] = ma.format
    report["loaders"] = check_loaders(ctx)
    report["serving"] = serving_engines(ctx.checkpoint, report["loaders"])
    stages = ctx.stages
    train_steps = stages.get("train", {}).get("steps", 0)
    report["pipeline"] = {"stages": jsonable(stages), "train_steps": train_steps if ma.train else 0,
                          "base_finetune_steps": stages.get("base_finetune", {}).get("steps", 0),
                          "wall_seconds": round(time.time() - ctx.started, 1)}
    return report


def quality_guard(ctx: RunContext) -> str | None:
    """The plain warning when the main metric fell more than `--max_metric_drop` points below the base (perplexity:
    rose more than `--max_perplexity_increase`), logged; the CLI summary and the card repeat it."""
    from ..model_cards.guard import embedding_parameter_names, report_warning

    ma = ctx.plan.model_args
    guard = report_warning(ctx.report, ctx.checkpoint, embedding_parameter_names(ctx.model), ma.max_metric_drop,
                           ma.max_perplexity_increase)
    if guard:
        ctx.log(guard)
    return guard


def probe_texts(plan, n: int = 4) -> list[str]:
    """A few held-out texts to feed every loader: the task's first text column (word lists joined by spaces)."""
    rows = plan.eval_dataset.select(range(min(n, len(plan.eval_dataset))))
    for column in plan.task.columns.values():
        if column in rows.column_names:
            values = rows[column]
            if all(isinstance(v, str) for v in values):
                return [v or " " for v in values]
            if all(isinstance(v, list) and all(isinstance(w, str) for w in v) for v in values):
                return [" ".join(v) or " " for v in values]
    return []


def check_loaders(ctx: RunContext) -> dict:
    """
    Which loaders read the written folder, and whether what they compute is the model that was trained: each loader's
    logits on a few held-out texts against those of the trained model (`ctx.model`), under the export's fake quantization when quantizing (QAT's
    exact numerics, what the export must reproduce), within the format's tolerance
    ([`model_cards.loading.logit_tolerance`]). An ONNX Runtime dynamic-int8 graph is compared with the graph the run
    evaluated (`ctx.result`), its difference to the trained model recorded as `max_abs_logit_diff_to_trained`. A loader
    over tolerance is a failure, logged and shown in the card.
    """
    from ..model_cards.loading import check_loaders as check_folder_loaders

    plan, trained, tokenizer, log = ctx.plan, ctx.model, ctx.tokenizer, ctx.log
    texts = probe_texts(plan)
    if not texts:
        log("Loaders not checked: the held-out split has no plain text column to feed them.")
        return {}
    reference = trained
    # ORT's dynamic int8 rounds activations per tensor at run time, which no replay reproduces: the folder is checked
    # against the int8 graph this run evaluated (in-process ONNX Runtime), exactly, and its difference to the trained
    # model is recorded beside it (the export stage checked the fp32 graph it came from against the trained model).
    # The int4 graph (`--bits 4`) computes the fake-quantized model exactly.
    int8_graph = plan.model_args.format == "onnx" and plan.model_args.quantize and plan.quantization_args.bits == 8
    if int8_graph:
        reference = ctx.result
    elif ctx.gptq:  # GPTQ's own integers and scales, not round-to-nearest ones
        import copy

        from ..quantization.gptq import apply_gptq

        reference = apply_gptq(copy.deepcopy(trained), ctx.gptq)
    elif plan.model_args.quantize and (plan.model_args.format != "onnx" or plan.quantization_args.bits == 4):
        from ..quantization.export import fake_quantized_copy

        reference = fake_quantized_copy(trained, plan.quantization_args)
    inputs = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    logits = _eval_logits(reference, inputs)
    loaders = check_folder_loaders(ctx.checkpoint, texts, logits)
    if int8_graph:
        to_trained = float((logits.float() - _eval_logits(trained, inputs).float()).abs().max())
        for v in loaders.values():
            v.update(compared_with="the int8 graph as this run evaluated it (in-process ONNX Runtime)",
                     max_abs_logit_diff_to_trained=to_trained)
    log("Loads with: " + (", ".join(k for k, v in loaders.items() if v["ok"]) or "none") +
        "; fails loudly with: " + (", ".join(k for k, v in loaders.items() if v.get("status") == "error") or "none") + ".")
    for name, v in loaders.items():
        if v.get("status") == "mismatch":
            log(f"FAILED verification: {name} loads the written folder but its logits differ from the trained model by "
                f"{v.get('max_abs_logit_diff', float('nan')):.3g} (tolerance {v['tolerance']:.3g}); do not share this folder.")
    return loaders


def _eval_logits(model, inputs: dict) -> torch.Tensor:
    """`model`'s main logits on the tokenized `inputs` (on the model's own device), in eval mode without gradients, on
    the CPU; the model's train / eval mode is restored."""
    from ..model_cards.loading import main_logits

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = main_logits(model(**{k: v.to(device) for k, v in inputs.items()})).cpu()
    model.train(was_training)
    return logits


def jsonable(obj):
    """A JSON-safe copy of `obj`: dict keys as strings, tuples as lists, anything else not JSON as its `str`."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (int, float, str, bool)) or obj is None:
        return obj
    return str(obj)
