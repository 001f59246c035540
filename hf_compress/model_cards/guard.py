"""The quality guard: one plain line when the compressed model is far worse than its base, with what to try and
where the bytes still are. `quality_warning` is a pure function of the numbers; `tensor_bytes` reads them from
the written folder (safetensors headers or ONNX initializers, no weight is loaded)."""

from __future__ import annotations

import json
import os
import struct

_DTYPE_BITS = {"F64": 64, "F32": 32, "F16": 16, "BF16": 16, "I64": 64, "I32": 32, "I16": 16, "I8": 8, "U8": 8,
               "F8_E4M3": 8, "F8_E5M2": 8, "BOOL": 8}


def quality_warning(metric: str, base: float, result: float, lower_is_better: bool, max_metric_drop: float = 1.0,
                    max_perplexity_increase: float = 0.10, embedding_share: float | None = None,
                    embedding_bits: int | None = None) -> str | None:
    """
    One line when `result` is far worse than `base` on the main `metric`, else `None`.

    Far worse is a drop of more than `max_metric_drop` points (metrics are fractions in [0, 1], a point is 0.01) for
    a higher-is-better metric, or a rise of more than `max_perplexity_increase` (a fraction of the base) for a
    lower-is-better one. `embedding_share` (of the weight bytes, with its `embedding_bits`) says where the bytes are.
    """
    if lower_is_better:
        rise = round(result / base - 1.0, 9) if base > 0 else float("inf")
        if not rise > max_perplexity_increase:
            return None
        what = (f"{metric} is {result / base:.2f}x the base ({base:.4g} -> {result:.4g}; allowed "
                f"+{max_perplexity_increase:.0%}, `--max_perplexity_increase`)")
    else:
        drop = round(100.0 * (base - result), 6)  # 0.85 - 0.84 is one point, not 1.0000000000000009
        if not drop > max_metric_drop:
            return None
        what = (f"{metric} is {drop:.1f} points below the base ({base:.4f} -> {result:.4f}; allowed {max_metric_drop:g}, "
                "`--max_metric_drop`)")
    line = (f"Quality guard: the result is far worse than the base: {what}. Try less `--target_sparsity`, more "
            "`--max_steps`, structured pruning with distillation (`--prune_structure ffn --teacher base`), or "
            "`--quantize_embeddings`")
    if embedding_share is not None:
        bits = f"{embedding_bits}-bit " if embedding_bits else ""
        line += f"; the {bits}embedding is {embedding_share:.0%} of the weight bytes"
    return line + "."


def tensor_bytes(folder: str) -> dict:
    """`{tensor name: (bytes, bits per value)}` of the weights in `folder` (`*.safetensors` headers, or the
    initializers of `model.onnx`)."""
    out = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.endswith(".safetensors"):
            with open(path, "rb") as f:
                header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
            for key, meta in header.items():
                if key != "__metadata__":
                    start, end = meta["data_offsets"]
                    out[key] = (end - start, _DTYPE_BITS.get(meta["dtype"]))
        elif name.endswith(".onnx"):
            import onnx
            from onnx import helper

            for t in onnx.load(path, load_external_data=False).graph.initializer:
                bits = 8 * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
                n = 1
                for d in t.dims:
                    n *= d
                out[t.name] = (n * bits // 8, bits)
    return out


def embedding_bytes(folder: str, embedding_names) -> tuple[float, int] | None:
    """The share of the weight bytes in the tensors named `embedding_names` (matched as name suffixes: the ONNX
    export prefixes them), and their bits per value; `None` when none is found."""
    sizes = tensor_bytes(folder)
    total = sum(b for b, _ in sizes.values())
    hits = [(b, bits) for key, (b, bits) in sizes.items() if any(key == n or key.endswith("." + n) for n in embedding_names)]
    if not hits or not total:
        return None
    return sum(b for b, _ in hits) / total, max(bits or 0 for _, bits in hits) or None


def embedding_parameter_names(model) -> list[str]:
    """The dotted names of `model`'s input (and tied output) embedding weight."""
    try:
        weight = model.get_input_embeddings().weight
    except (AttributeError, NotImplementedError):
        return []
    return [n for n, p in model.named_parameters(remove_duplicate=False) if p is weight]


def report_warning(report: dict, folder: str, embedding_names, max_metric_drop: float = 1.0,
                   max_perplexity_increase: float = 0.10) -> str | None:
    """[`quality_warning`] for a pipeline report: its headline metric, base against compressed, and the embedding's
    share of the bytes written in `folder`. `None` when not evaluated or within the budget."""
    task = report.get("task") or {}
    names = task.get("metric_names") or []
    metrics = report.get("metrics") or {}
    base, result = metrics.get("base") or {}, metrics.get("compressed") or {}
    if not names or names[0] not in base or names[0] not in result:
        return None
    metric = names[0]
    share = embedding_bytes(folder, embedding_names) if embedding_names else None
    return quality_warning(metric, base[metric], result[metric], metric in (task.get("lower_is_better") or []),
                           max_metric_drop, max_perplexity_increase,
                           embedding_share=share[0] if share else None, embedding_bits=share[1] if share else None)
