"""The compression report: sizes, counts, sparsity, bits per weight, what was quantized, and metrics.

Everything in it is measured from the models and from the files on disk, never taken from the recipe, so the
card built from it states what the checkpoint really is. It is saved as `compression_report.json` beside the
checkpoint.
"""

from __future__ import annotations

import json
import os
import re

import torch

from ..atomic import OUTPUT_MARKER
from ..quantization.precision import precision_summary
# The classifier evaluation and the verification sample live below the tasks that use them (hf_compress.tasks).
from ..tasks.evaluation import evaluate_classifier, verification_sample

REPORT_NAME = "compression_report.json"
REPORT_FORMAT = "hf_compress.report.v1"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".onnx")
# What `Trainer` saves next to the weights in a `checkpoint-N` folder: counted in total bytes, never as weights.
TRAINER_STATE_FILES = ("training_args.bin", "optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state")
# Module class names that hold bitsandbytes-quantized weights (matched by name: bitsandbytes stays unimported).
_BNB_BITS = {"Linear8bitLt": 8, "Linear4bit": 4, "LinearNF4": 4, "LinearFP4": 4, "Embedding8bit": 8, "Embedding4bit": 4}


def checkpoint_bytes(folder: str) -> dict:
    """
    On-disk bytes of a saved checkpoint folder.

    Returns:
        `dict`: `weights_bytes` (weight files: `*.safetensors`, `*.bin`, ...), `total_bytes` (every file, the
        report, card and ownership marker excluded so that the numbers do not depend on themselves) and
        `weight_files`.
    """
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"Checkpoint folder {folder!r} does not exist; save the model there first.")
    weights = total = 0
    files = []
    for dirpath, _, names in os.walk(folder):
        for name in sorted(names):
            if name in (REPORT_NAME, "README.md", OUTPUT_MARKER) or name.endswith(".png"):
                continue
            size = os.path.getsize(os.path.join(dirpath, name))
            total += size
            if name.endswith(WEIGHT_SUFFIXES) and not name.startswith(TRAINER_STATE_FILES):
                weights += size
                files.append(os.path.relpath(os.path.join(dirpath, name), folder))
    if not files:
        raise FileNotFoundError(f"No weight file (*.safetensors, *.bin) in {folder!r}; save the model there first.")
    return {"weights_bytes": weights, "total_bytes": total, "weight_files": files}


def _logical_weight(p: torch.Tensor) -> tuple[int, int, int]:
    """`(numel, nonzeros, storage_bits)` of a parameter as the model sees it (4-bit packing undone)."""
    quant_state = getattr(p, "quant_state", None)
    if quant_state is not None:  # bitsandbytes Params4bit: two 4-bit codes a byte, plus per-block absmax
        numel = int(torch.Size(quant_state.shape).numel())
        try:
            import bitsandbytes.functional as bnbf

            nnz = int((bnbf.dequantize_4bit(p.data, quant_state) != 0).sum())
        except Exception:  # dequantizing needs a working bitsandbytes backend; the count is then unknown
            nnz = -1
        return numel, nnz, p.numel() * p.element_size() * 8 + _scale_bits(quant_state)
    bits = p.numel() * p.element_size() * 8
    scb = getattr(p, "SCB", None)  # bitsandbytes Int8Params: one float scale per row
    if isinstance(scb, torch.Tensor):
        bits += scb.numel() * scb.element_size() * 8
    return p.numel(), int(torch.count_nonzero(p.detach())), bits


def _scale_bits(quant_state) -> int:
    """Bits of a 4-bit weight's block scales: `absmax` (one per 64 values), and with double quantization its own
    8-bit code's `absmax` and `offset`; without them 4-bit would read as exactly 4 bits per weight."""
    total = 0
    for t in (getattr(quant_state, "absmax", None), getattr(quant_state, "offset", None)):
        if isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size() * 8
    nested = getattr(quant_state, "state2", None)
    if nested is not None:
        total += _scale_bits(nested)
    return total


def weight_stats(model: torch.nn.Module) -> dict:
    """
    Parameter counts, nonzeros, sparsity and bits per weight of `model`, global and per layer.

    Tied parameters are counted once. Bitsandbytes 4-bit weights are counted at their logical shape (not the
    packed `uint8` storage) and their zeros are counted after dequantization.

    Returns:
        `dict`: `parameters`, `nonzeros`, `sparsity` (zeros / parameters), `linear_sparsity` (the same over
        the weight matrices of `nn.Linear`-like layers, what pruning targets), `bits_per_weight_in_memory`,
        `per_layer` (`{parameter name: {numel, nonzeros, sparsity, dtype, bits}}` for every weight matrix)
        and `quantized_modules` (`{module name: class name}` of bitsandbytes layers).
    """
    seen = set()
    total = nnz_total = bits_total = 0
    lin_numel = lin_nnz = 0
    per_layer, quantized = {}, {}
    for mod_name, module in model.named_modules():
        cls = type(module).__name__
        if cls in _BNB_BITS:
            quantized[mod_name] = cls
        # bitsandbytes' Linear8bitLt / Linear4bit subclass nn.Linear; its Embedding8bit / Embedding4bit tables do not.
        is_linear = isinstance(module, torch.nn.Linear)
        for p_name, p in module.named_parameters(recurse=False):
            key = id(p)
            if key in seen:
                continue
            seen.add(key)
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            numel, nnz, bits = _logical_weight(p)
            total += numel
            nnz_total += nnz if nnz >= 0 else numel
            bits_total += bits
            if p_name == "weight" and (p.dim() >= 2 or getattr(p, "quant_state", None) is not None):
                per_layer[full] = {
                    "numel": numel,
                    "nonzeros": nnz,
                    "sparsity": None if nnz < 0 else round(1 - nnz / numel, 6),
                    "dtype": str(p.dtype).replace("torch.", ""),
                    "bits": _BNB_BITS.get(cls, p.element_size() * 8),
                }
                if is_linear and nnz >= 0:
                    lin_numel += numel
                    lin_nnz += nnz
    return {
        "parameters": total,
        "nonzeros": nnz_total,
        "sparsity": round(1 - nnz_total / total, 6) if total else 0.0,
        "linear_sparsity": round(1 - lin_nnz / lin_numel, 6) if lin_numel else 0.0,
        "bits_per_weight_in_memory": round(bits_total / total, 4) if total else 0.0,
        "per_layer": per_layer,
        "quantized_modules": quantized,
    }


def _tied_labels(model: torch.nn.Module, precision: dict) -> dict:
    """Add `"lm_head (tied to model.embed_tokens)"` to the group of the module a tied weight is stored under: the
    files store a tied tensor once, and the card names the module that reads it too."""
    owner: dict[int, str] = {}
    for mod_name, module in model.named_modules():
        for _, p in module.named_parameters(recurse=False):
            if id(p) not in owner:
                owner[id(p)] = mod_name
                continue
            first = re.sub(r"\.\d+(?=\.|$)", ".*", owner[id(p)])
            for group in precision.values():
                if first in group["modules"] and f"{mod_name} (tied to {owner[id(p)]})" not in group["modules"]:
                    group["modules"].append(f"{mod_name} (tied to {owner[id(p)]})")
    return precision


def quantization_summary(model: torch.nn.Module, folder: str | None = None) -> dict | None:
    """
    What was quantized, read from the written files where there are any ([`describe_stored`]: the safetensors headers
    and `config.json`'s `quantization_config`), else from the model (its `quantization_config` and bitsandbytes
    layers). `None` when nothing is quantized. The format's own fields (method, data type, skipped modules, ...) come
    from the format table ([`hf_compress.formats.quantization_format`]).

    `num_quantized_modules` counts the modules whose weight is stored quantized; `precision` gives, for each storage
    kind (`int8`, `int4`, `nf4 (4-bit)`, ..., or a dtype), the parameters stored that way and the modules holding
    them; scales, zero points, shapes and quantization states are not parameters (`auxiliary_tensors`).
    """
    from ..formats import quantization_format
    from .files import describe_stored

    qconfig = None
    if folder and os.path.isfile(os.path.join(folder, "config.json")):
        with open(os.path.join(folder, "config.json")) as f:
            qconfig = json.load(f).get("quantization_config")
    if qconfig is not None and not quantization_format(qconfig).quantized:
        qconfig = None  # the bitmask format: pruned weights stored compactly and loaded dense; nothing is quantized
    if qconfig is None:
        cfg = getattr(getattr(model, "config", None), "quantization_config", None)
        if cfg is not None:
            qconfig = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    modules = {n: type(m).__name__ for n, m in model.named_modules() if type(m).__name__ in _BNB_BITS}
    stored = describe_stored(folder) if folder and os.path.isdir(folder) else None
    if stored is not None and not stored["parameters"]:
        stored = None  # no safetensors file (e.g. `.bin` only): describe the model instead
    if qconfig is None and not modules and not (stored and stored["quantized"]):
        return None
    fmt = quantization_format(qconfig)
    kinds = None
    if stored is not None:
        kinds = sorted({m["stored_as"] for m in stored["modules"].values() if m["stored_as"] in stored["quantized"]})
        bits = sorted({4 if "4" in k else 8 for k in kinds})
        quantized = sorted(n for n, m in stored["modules"].items() if m["stored_as"] in stored["quantized"])
        precision = _tied_labels(model, stored["precision"])
    else:
        bits = sorted({_BNB_BITS[c] for c in modules.values()}) or fmt.config_bits(qconfig or {})
        quantized, precision = sorted(modules), precision_summary(model)
    fields = fmt.summary_fields(qconfig or {}, bits, kinds, modules)
    out = {
        "method": fields.pop("method"),
        "bits": bits,
        "quant_type": fields.pop("quant_type"),
        "double_quant": fields.pop("double_quant"),
        "num_quantized_modules": len(quantized),
        "quantized_module_types": fields.pop("quantized_module_types"),
        "quantized_modules": quantized,
        "skip_modules": fields.pop("skip_modules"),
        # What each weight is stored in (int8, int4, nf4, bfloat16, ...), tied weights named once.
        "precision": precision,
        "quantization_config": qconfig,
        **fields,  # the format's extra fields (compressed-tensors: `group_size`)
    }
    if stored is not None:
        out["auxiliary_tensors"] = stored["auxiliary"]
    return out


def build_report(
    model,
    output_dir: str,
    base_model=None,
    base_dir: str | None = None,
    *,
    base_model_id: str | None = None,
    techniques: list[str] | None = None,
    base_metrics: dict | None = None,
    compressed_metrics: dict | None = None,
    eval_dataset=None,
    tokenizer=None,
    metrics=("accuracy",),
    eval_info: dict | None = None,
    variants: list[dict] | None = None,
    verification_examples: int = 8,
    save: bool = True,
) -> dict:
    """
    Measure a compressed checkpoint against the model it came from and save `compression_report.json`.

    Args:
        model: the compressed model (as loaded or as trained).
        output_dir (`str`): the compressed checkpoint's folder (its files are measured; the report is written there).
        base_model (*optional*): the uncompressed model, for parameter counts and metrics.
        base_dir (`str`, *optional*): the uncompressed checkpoint's folder, for on-disk bytes and the size ratio.
        base_model_id (`str`, *optional*): Hub id or path of the base model, written to the card as `base_model`.
        techniques (`list[str]`, *optional*): e.g. `["distillation", "pruning"]`; `quantization` and `pruning`
            are added when measured (quantized weights of any backend / more than 1% zeros in linear weights).
        base_metrics, compressed_metrics (`dict`, *optional*): metrics computed by the caller on the same split.
        eval_dataset (`datasets.Dataset`, *optional*): tokenized labelled rows; when given, missing metrics are
            computed with `evaluate_classifier`, and `verification_examples` rows are recorded for `--verify_push`.
        tokenizer (*optional*): used to pad evaluation batches.
        metrics (`tuple[str]`, defaults to `("accuracy",)`): `evaluate` metric names.
        eval_info (`dict`, *optional*): `dataset` (Hub id or name), `dataset_name`, `split` (e.g. `"test[:1000]"`),
            `task` (defaults to `text-classification`): where the metrics come from.
        variants (`list[dict]`, *optional*): more points for the accuracy-vs-size plot, each
            `{"name", "weights_bytes", "metrics"}`.
        verification_examples (`int`, defaults to 8): rows recorded for verification after a push (0: none).
        save (`bool`, defaults to `True`): write `compression_report.json` into `output_dir` (atomically).

    Returns:
        `dict`: the report.
    """
    from .files import describe_stored

    _check_report_arguments(base_metrics, compressed_metrics, verification_examples)
    compressed_files = checkpoint_bytes(output_dir)
    base_files = checkpoint_bytes(base_dir) if base_dir is not None else None
    stats = weight_stats(model)
    base_stats = weight_stats(base_model) if base_model is not None else None
    quant = quantization_summary(model, output_dir)
    # The model's parameters as the files store them (logical weights, tied ones once; never scales, zero points or
    # shapes, which a reloaded compressed-tensors model holds as parameters); the model's own count without safetensors.
    stored_params = describe_stored(output_dir)["parameters"] or stats["parameters"]

    if eval_dataset is not None:
        if compressed_metrics is None:
            compressed_metrics = evaluate_classifier(model, eval_dataset, tokenizer, metrics)
        if base_metrics is None and base_model is not None:
            base_metrics = evaluate_classifier(base_model, eval_dataset, tokenizer, metrics)

    size = _size_section(compressed_files, base_files, stored_params, base_stats)
    report = {
        "format": REPORT_FORMAT,
        "base_model": base_model_id,
        "architecture": getattr(model, "architecture_name", None) or type(model).__name__,  # an ONNX session names its source
        "techniques": _techniques_found(techniques, quant, stats),
        "size": size,
        **_count_sections(stats, base_stats, stored_params, size),  # parameters, nonzeros, sparsity, bits, layers
        "quantization": quant,
        "eval": {"task": "text-classification", **(eval_info or {})},
        "metrics": {"base": base_metrics, "compressed": compressed_metrics},
        "variants": _plot_variants(compressed_files, base_files, base_metrics, compressed_metrics, variants),
    }
    if eval_dataset is not None and verification_examples:
        report["verification"] = verification_sample(model, eval_dataset, tokenizer, verification_examples, metrics)
    if save:
        save_report(report, output_dir)
    return report


def _check_report_arguments(base_metrics, compressed_metrics, verification_examples: int) -> None:
    if base_metrics is not None and not isinstance(base_metrics, dict):
        raise ValueError(f"base_metrics must be a dict like {{'accuracy': 0.8}}, got {type(base_metrics).__name__}.")
    if compressed_metrics is not None and not isinstance(compressed_metrics, dict):
        raise ValueError(f"compressed_metrics must be a dict like {{'accuracy': 0.8}}, got {type(compressed_metrics).__name__}.")
    if verification_examples < 0:
        raise ValueError(f"verification_examples must be >= 0, got {verification_examples}.")


def _techniques_found(techniques: list[str] | None, quant: dict | None, stats: dict) -> list[str]:
    """The caller's techniques, plus `quantization` and `pruning` when the measurements show them (quantized weights;
    more than 1% zeros in the linear weights)."""
    found = list(techniques or [])
    if quant and "quantization" not in found:
        found.append("quantization")
    if stats["linear_sparsity"] > 0.01 and "pruning" not in found:
        found.append("pruning")
    return found


def _size_section(compressed_files: dict, base_files: dict | None, stored_params: int, base_stats: dict | None) -> dict:
    """The report's `size`: bytes on disk of both checkpoints, their ratio and the bits each weight costs on disk."""
    size = {"compressed_weights_bytes": compressed_files["weights_bytes"], "compressed_total_bytes": compressed_files["total_bytes"],
            "compressed_weight_files": compressed_files["weight_files"]}
    if base_files:
        size.update(base_weights_bytes=base_files["weights_bytes"], base_total_bytes=base_files["total_bytes"],
                    ratio=round(base_files["weights_bytes"] / compressed_files["weights_bytes"], 4))
    # The bits each logical weight costs on disk: what a reader of the card compares across formats.
    size["bits_per_weight_on_disk"] = round(8 * compressed_files["weights_bytes"] / stored_params, 4)
    if base_files and base_stats:
        size["base_bits_per_weight_on_disk"] = round(8 * base_files["weights_bytes"] / base_stats["parameters"], 4)
    return size


def _count_sections(stats: dict, base_stats: dict | None, stored_params: int, size: dict) -> dict:
    """The report's `parameters`, `nonzeros`, `sparsity`, `bits_per_weight` and `layers`, in that order."""
    return {
        "parameters": {"compressed": stored_params, "base": base_stats["parameters"] if base_stats else None},
        "nonzeros": {"compressed": stats["nonzeros"], "base": base_stats["nonzeros"] if base_stats else None},
        "sparsity": {
            "global": stats["sparsity"],
            "linear_weights": stats["linear_sparsity"],
            "base_global": base_stats["sparsity"] if base_stats else None,
            "base_linear_weights": base_stats["linear_sparsity"] if base_stats else None,
            "per_layer": {k: v["sparsity"] for k, v in stats["per_layer"].items()},
        },
        "bits_per_weight": {"in_memory": stats["bits_per_weight_in_memory"], "on_disk": size["bits_per_weight_on_disk"],
                            "base_in_memory": base_stats["bits_per_weight_in_memory"] if base_stats else None},
        "layers": stats["per_layer"],
    }


def _plot_variants(compressed_files: dict, base_files: dict | None, base_metrics, compressed_metrics,
                   variants) -> list[dict]:
    """The points of the accuracy-vs-size plot: the base, the caller's `variants`, then the compressed model."""
    out = []
    if base_files and base_metrics:
        out.append({"name": "base", "weights_bytes": base_files["weights_bytes"], "metrics": base_metrics})
    out += list(variants or [])
    if compressed_metrics:
        out.append({"name": "compressed", "weights_bytes": compressed_files["weights_bytes"], "metrics": compressed_metrics})
    return out


def save_report(report: dict, output_dir: str) -> str:
    """Write `report` to `<output_dir>/compression_report.json` through a temporary file (never half written), with
    the ordinary mode `0o666 & ~umask` ([`hf_compress.atomic.write_json`])."""
    from ..atomic import write_json

    return write_json(os.path.join(output_dir, REPORT_NAME), report, indent=2, sort_keys=False)


def load_report(folder: str) -> dict:
    """Read `compression_report.json` from a checkpoint folder."""
    path = os.path.join(folder, REPORT_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No {REPORT_NAME} in {folder!r}; create it with `build_report(model, {folder!r}, ...)`.")
    with open(path) as f:
        return json.load(f)
