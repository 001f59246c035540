"""`--target latency`: the latency search. Each candidate of `--latency_candidates` (least aggressive first) is the
base cut one-shot ([`prune_structured`]), distilled from the base (or `--teacher`) for the run's steps ([`train`]),
exported to ONNX Runtime ([`export`]), evaluated on the held-out split and timed on this machine; the fastest
candidate whose main metric is within the quality guard's budget of the base (`--max_metric_drop`, spelled
`--max_accuracy_drop` too; perplexity: `--max_perplexity_increase`) becomes the run's result, and the report keeps
every row. The search stops at the first candidate over the budget: the later ones cut more.

The pure parts (`pick`, `median_ms`) take numbers; [`search_latency`] is the stage.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import statistics
import time

from .arguments import candidate_name
from .context import RunContext
from .export import export
from .report import format_metrics
from .stages import prune_structured, train

TIMED_CALLS = 7  # per candidate, after WARMUP_CALLS untimed ones; the median is reported
WARMUP_CALLS = 2


def candidate_plan(plan, candidate: dict):
    """The run's plan for one candidate: the structures cut one-shot with their kept amounts (the user's calibration
    settings kept), distilled from the base unless `--teacher` names another; `none` is the base as it is (no
    training: it was fine-tuned or came with its head)."""
    from ..pruning.structured_config import StructuredPruningArguments

    sa = plan.structured_args or StructuredPruningArguments()
    keeps = {f"prune_{s}_keep": candidate.get(s) for s in ("ffn", "heads", "hidden", "layers")}
    sa = dataclasses.replace(sa, prune_structure=",".join(candidate) or None, prune_keep=None,
                             prune_target_params=None, prune_schedule="oneshot", **keeps)
    ma = plan.model_args
    ma = dataclasses.replace(ma, teacher=ma.teacher or "base") if candidate else dataclasses.replace(ma, train=False)
    recipe = {**plan.recipe, "latency_choice": candidate_name(candidate)}
    return dataclasses.replace(plan, structured_args=sa, model_args=ma, recipe=recipe)


def median_ms(call, warmup: int = WARMUP_CALLS, repeats: int = TIMED_CALLS) -> float:
    """The median wall time of `call()` in milliseconds, after `warmup` untimed calls."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)


def pick(rows: list[dict]) -> tuple[int, bool]:
    """The index of the fastest row within the budget (`within_budget`, `latency_ms`) and `True`; with none within
    it, the row closest to the base's metric (`metric_gap`: how far it is past the base, in the guard's unit) and
    `False`."""
    within = [i for i, r in enumerate(rows) if r["within_budget"]]
    if within:
        return min(within, key=lambda i: rows[i]["latency_ms"]), True
    return min(range(len(rows)), key=lambda i: rows[i]["metric_gap"]), False


def timing_batch(ctx: RunContext) -> dict:
    """The first `latency_batch_size` held-out examples as one batch of the model's inputs (the task's collator)."""
    from .training import calibration_batches

    size = ctx.plan.model_args.latency_batch_size
    args = dataclasses.replace(ctx.plan.training_args, per_device_train_batch_size=size)
    batch = calibration_batches(ctx.base, ctx.eval_dataset, ctx.collator, args, 1)[0]
    return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


def time_model(model, batch: dict) -> float:
    """Median milliseconds of one forward pass of `model` on `batch` (no gradients)."""
    import torch

    with torch.no_grad():
        return median_ms(lambda: model(**batch))


def search_latency(ctx: RunContext) -> dict | None:  # long: one candidate per loop turn, then the choice adopted
    """
    The stage: every candidate tried in order (its training bar, a line with its metric, latency and size), the
    choice put into `ctx` (model, checkpoint, reloaded result, plan and the candidate's stage records) as if the run
    had been that candidate's; returns the search's record (`rows` of every candidate tried, the base's PyTorch
    latency on the same batch, the choice and whether it is within the budget).
    """
    from ..model_cards.guard import quality_warning
    from ..model_cards.report import checkpoint_bytes

    plan = ctx.plan
    ma, task = plan.model_args, plan.task
    if ma.target != "latency":
        return None
    metric = next(m for m in task.metric_names if m in ctx.base_metrics)
    lower = metric in task.lower_is_better
    base_value = ctx.base_metrics[metric]
    batch = timing_batch(ctx)
    base_ms = time_model(ctx.base, batch)
    shape = list(batch["input_ids"].shape)
    ctx.log(f"Latency search: the base takes {base_ms:.1f} ms per batch of {shape[0]} x {shape[1]} tokens in PyTorch "
            f"here; {metric} {base_value:.4f}.")
    candidates = plan.latency_candidates
    # Each candidate starts from a copy of the model as loaded (or fine-tuned), never of `ctx.base`: the base is the
    # teacher, and distillation freezes its parameters in place.
    source, rows, kept = ctx.model, [], {}
    for i, candidate in enumerate(candidates):
        name = candidate_name(candidate)
        cplan = candidate_plan(plan, candidate)
        work = os.path.join(ctx.work, f"candidate-{i}")
        os.makedirs(work, exist_ok=True)
        cctx = dataclasses.replace(ctx, plan=cplan, work=work, model=copy.deepcopy(source), callbacks=[],
                                   stages=dict(ctx.stages), checkpoint="", result=None, gptq=None,
                                   self_check_batch=None, report=None)
        cctx.record("structured_pruning", prune_structured(cctx))
        cctx.record("train", train(cctx))
        cctx.record("export", export(cctx))
        metrics = task.evaluate(cctx.result, cctx.eval_dataset, cctx.tokenizer, plan.eval_dataset,
                                desc=f"Evaluating candidate {name}")
        value = metrics[metric]
        warning = quality_warning(metric, base_value, value, lower, ma.max_metric_drop, ma.max_perplexity_increase)
        ms = time_model(cctx.result, batch)
        gap = (value / base_value - 1.0) if lower else 100.0 * (base_value - value)
        row = {"candidate": name, "metric": metric, "value": value, "metric_gap": round(gap, 6),
               "within_budget": warning is None, "latency_ms": round(ms, 4), "latency_x_base": round(ms / base_ms, 6),
               "parameters": cctx.model.num_parameters(), "weights_bytes": checkpoint_bytes(cctx.checkpoint)["weights_bytes"],
               "train_steps": (cctx.stages.get("train") or {}).get("steps", 0), "metrics": metrics}
        rows.append(row)
        unit = f"{gap:+.1%}" if lower else f"{0.0 - gap:+.2f} pt"
        ctx.log(f"Candidate {i + 1}/{len(candidates)} {name}: {format_metrics({metric: value})} ({unit}), "
                f"{ms:.1f} ms ({ms / base_ms:.2f}x the base), {row['weights_bytes'] / 1e6:.1f} MB"
                f"{'' if row['within_budget'] else ', over the budget'}.")
        kept[i] = cctx
        best, _ = pick(rows)
        kept = {j: c for j, c in kept.items() if j == best}  # only the current choice stays in memory
        if not row["within_budget"]:
            break
    chosen, within = pick(rows)
    adopt(ctx, kept[chosen])
    not_tried = [candidate_name(c) for c in candidates[len(rows):]]
    skipped = [{"candidate": name, "why": why} for name, why in plan.latency_skipped]
    ctx.log(f"Latency search: kept {rows[chosen]['candidate']} ({rows[chosen]['latency_x_base']:.2f}x the base's "
            "latency)" + ("" if within else ", the closest to the base: no candidate is within the budget") +
            (f"; not tried (a less aggressive candidate was over the budget): {'; '.join(not_tried)}" if not_tried else "")
            + ".")
    return {"metric": metric, "lower_is_better": lower, "base_value": base_value, "budget":
            {"max_metric_drop": ma.max_metric_drop, "max_perplexity_increase": ma.max_perplexity_increase},
            "batch_shape": shape, "base_pytorch_ms": round(base_ms, 4), "timed_calls": TIMED_CALLS,
            "rows": rows, "chosen": rows[chosen]["candidate"], "within_budget": within, "not_tried": not_tried,
            "skipped": skipped}


def adopt(ctx: RunContext, chosen: RunContext) -> None:
    """Make the run the chosen candidate's: its plan (techniques, recipe), model, written folder and stage records."""
    ctx.plan, ctx.model, ctx.checkpoint, ctx.result = chosen.plan, chosen.model, chosen.checkpoint, chosen.result
    for name in ("structured_pruning", "train", "export"):
        if name in chosen.stages:
            ctx.stages[name] = chosen.stages[name]


def describe_search(record: dict) -> list[str]:
    """The search as a markdown table (the console summary and the card): one row per candidate tried."""
    lower = record["lower_is_better"]
    lines = [f"| candidate | {record['metric']} | vs base | ms / batch {'x'.join(map(str, record['batch_shape']))} "
             "| x base (PyTorch) | MB | kept |", "|---|---:|---:|---:|---:|---:|---|"]
    lines.append(f"| base (PyTorch) | {record['base_value']:.4f} | | {record['base_pytorch_ms']:.1f} | 1.00 | | |")
    for r in record["rows"]:
        gap = f"{r['metric_gap']:+.1%}" if lower else f"{0.0 - r['metric_gap']:+.2f} pt"
        mark = "**kept**" if r["candidate"] == record["chosen"] else ("" if r["within_budget"] else "over budget")
        lines.append(f"| {r['candidate']} | {r['value']:.4f} | {gap} | {r['latency_ms']:.1f} | "
                     f"{r['latency_x_base']:.2f} | {r['weights_bytes'] / 1e6:.1f} | {mark} |")
    return lines
