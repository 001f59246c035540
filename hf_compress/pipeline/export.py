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
    ctx.result, info = export_checkpoint(ctx.plan, ctx.model, ctx.tokenizer, ctx.checkpoint, ctx.log)
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


def export_checkpoint(plan: CompressionPlan, model, tokenizer, ckpt: str, log) -> tuple[object, dict]:
    """
    The export stage: write the trained `model` (and tokenizer) into `ckpt` and return the model as a user reloads
    it, with what the stage did. Every on-disk format goes through here.
    """
    from tqdm.auto import tqdm

    ma, qa = plan.model_args, plan.quantization_args
    if ma.format == "onnx":
        from ..quantization.onnx import export_onnx, load_onnx

        info = export_onnx(model, ckpt, tokenizer, plan.task.name, quantize=ma.quantize,
                           quantize_embeddings=qa.quantize_embeddings)
        log(f"Exported an ONNX Runtime graph ({info['precision']}); max |logit diff| to the trained model "
            f"{info['max_abs_logit_diff']:.2e}.")
        return load_onnx(ckpt, source=model.eval()), info  # evaluated through onnxruntime, as users run it
    if ma.quantize:
        from ..quantization import load_quantized, quantize_and_save

        with tqdm(total=2, desc=f"Exporting {qa.bits}-bit", leave=False) as bar:
            info = quantize_and_save(model, ckpt, qa, tokenizer=tokenizer)
            bar.update()
            # Evaluate what was written, reloaded the way a user loads it (low-bit embeddings need `load_quantized`).
            # compressed-tensors decompressed on load: the same weights and logits as its compressed forward (the
            # loaders check compares both with the trained model), and the report then counts the model's weights
            # and zeros, not packed int32 words, scales and shapes.
            import warnings

            kwargs = {}
            if qa.backend == "compressed-tensors":
                from transformers import CompressedTensorsConfig

                kwargs["quantization_config"] = CompressedTensorsConfig(dequantize=True)
            with warnings.catch_warnings():  # "loading attributes (['dequantize', ...]) will be overwritten": asked for
                warnings.filterwarnings("ignore", message="You passed `quantization_config`")
                result = load_quantized(ckpt, **kwargs)
            bar.update()
        log(f"Exported {qa.bits}-bit weights ({qa.backend}).")
        return result.eval(), info
    if ma.format == "bitmask":
        from ..pruning import load_compressed, save_compressed

        with tqdm(total=2, desc="Exporting bitmask", leave=False) as bar:
            info = save_compressed(model, ckpt, tokenizer=tokenizer)
            bar.update()
            result = load_compressed(ckpt)
            bar.update()
        log("Saved in the bitmask format (from_pretrained reads it once hf_compress is imported).")
        return result.eval(), {"format": "bitmask", **{k: v for k, v in info.items() if isinstance(v, (int, float, str))}}
    with tqdm(total=1, desc="Exporting", leave=False) as bar:
        model.save_pretrained(ckpt)
        tokenizer.save_pretrained(ckpt)
        bar.update()
    return model.eval(), {"format": "safetensors"}
