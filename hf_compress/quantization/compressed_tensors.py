"""Export to compressed-tensors' `pack-quantized` format: symmetric int8 / int4 weights that plain `from_pretrained`,
`pipeline()` and vLLM load with only `compressed-tensors` installed (no hf_compress, no bitsandbytes).

Weight-only, so it is made on the CPU from the trained weights with no calibration data: each row (or each group of
`group_size` weights of a row) gets the scale `absmax / ((2^bits - 1) / 2)`, the weights are divided by it, clamped
to [-2^(bits-1), 2^(bits-1) - 1] and rounded half to even, and compressed-tensors packs the integers into int32
words. The pure functions below are exactly what compressed-tensors 0.20 computes (`calculate_qparams`, `quantize`,
`dequantize`), so the fake quantization of quantization-aware training gives the reloaded checkpoint's weights bit
for bit. Zeros stay zeros (0 / scale rounds to 0), so pruned weights survive.

The `compressed_tensors` library itself is imported only inside the export.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .config import QuantizationArguments

FORMAT = "pack-quantized"
# transformers (5.23-5.24) cannot build a compressed `nn.Embedding` on load ('Embedding' object has no attribute
# 'weight'); with `dequantize` in the saved quantization_config it decompresses every weight on load and works.
DEQUANTIZE_KEY = "dequantize"


# --- numerics (pure torch) --------------------------------------------------------------------------------------


def int_range(bits: int) -> tuple[int, int]:
    """The signed integer range of `bits` bits: (-2^(bits-1), 2^(bits-1) - 1)."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def _grouped(weight: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """`weight` as (rows, groups, group_size); per-channel is one group of the whole row."""
    w = weight.detach()
    size = w.shape[-1] if group_size is None else group_size
    if w.shape[-1] % size:
        raise ValueError(f"group_size {size} does not divide the row length {w.shape[-1]}; keep this layer in full precision.")
    return w.unflatten(-1, (w.shape[-1] // size, size))


def symmetric_scales(weight: torch.Tensor, bits: int, group_size: int | None = None) -> torch.Tensor:
    """The scale of each row (`group_size=None`, shape (rows, 1)) or of each group (shape (rows, groups)), as
    compressed-tensors' `calculate_qparams` computes it for symmetric int weights: absmax over (2^bits - 1) / 2, a
    zero scale replaced by the dtype's epsilon."""
    g = _grouped(weight, group_size)
    lo, hi = int_range(bits)
    mins = torch.minimum(g.amin(-1), torch.zeros((), dtype=g.dtype))
    maxs = torch.maximum(g.amax(-1), torch.zeros((), dtype=g.dtype))
    absmax = torch.maximum(mins.abs(), maxs.abs())
    scales = absmax / (torch.tensor(hi - lo, dtype=absmax.dtype) / 2)
    return torch.where(scales == 0, torch.tensor(torch.finfo(scales.dtype).eps, dtype=scales.dtype), scales)


def int_quantize(weight: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int | None = None) -> torch.Tensor:
    """Integer codes (int8 tensor, weight's shape): divide by the scale, clamp, round half to even."""
    lo, hi = int_range(bits)
    g = _grouped(weight, group_size)
    q = torch.round(torch.clamp(g / scales.unsqueeze(-1), lo, hi))
    return q.flatten(-2).to(torch.int8)


def int_dequantize(q: torch.Tensor, scales: torch.Tensor, group_size: int | None = None) -> torch.Tensor:
    """The weight a loader multiplies by: code x scale, in the scale's dtype."""
    g = _grouped(q, group_size).to(scales.dtype)
    return (g * scales.unsqueeze(-1)).flatten(-2)


def fake_quantize_int(weight: torch.Tensor, bits: int, group_size: int | None = None) -> torch.Tensor:
    """The weight the compressed-tensors checkpoint holds after reload (no gradient; see `straight_through`)."""
    with torch.no_grad():
        scales = symmetric_scales(weight, bits, group_size)
        return int_dequantize(int_quantize(weight, scales, bits, group_size), scales, group_size).to(weight.dtype)


def information_limit_bytes(model: nn.Module, quantized: dict[str, tuple[int, int | None]]) -> int:
    """Bytes of `bits x weights + 32-bit scales` for the quantized weights plus the other tensors at their dtype
    (tied tensors counted once): what the format cannot go below."""
    bits_total, seen = 0, set()
    for name, t in model.state_dict().items():
        key = t.data_ptr()
        if t.numel() and key in seen:
            continue
        seen.add(key)
        module = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and module in quantized:
            bits, group = quantized[module]
            groups = t.shape[0] * (1 if group is None else t.shape[-1] // group)
            bits_total += t.numel() * bits + groups * t.element_size() * 8
        else:
            bits_total += t.numel() * t.element_size() * 8
    return -(-bits_total // 8)


# --- targets ---------------------------------------------------------------------------------------------------


def _is_input_embedding(model, name: str) -> bool:
    get = getattr(model, "get_input_embeddings", None)
    return get is not None and model.get_submodule(name) is get()


def targets(model, args: QuantizationArguments) -> tuple[list[str], list[str], list[str]]:
    """
    (Linear layers, embedding tables, layers kept in full precision only because `group_size` does not divide
    their row length) that the compressed-tensors export quantizes.

    The task heads and output embeddings are skipped by default, as with bitsandbytes ([`resolve_skip_modules`]).
    With `quantize_embeddings`, a tied input embedding is quantized too (its tied output layer, e.g. `lm_head`,
    reads the same weights); [`targets_for_qat`] fake-quantizes both.

    Raises:
        `ValueError`: for a family whose export cannot be exact ([`~hf_compress.architectures.compressed_tensors_refusal`]:
        GPT-2's `Conv1D`, stacked experts).
    """
    from ..architectures import check_compressed_tensors
    from .export import _base_skip_modules, _tied_names, should_quantize

    check_compressed_tensors(model)  # GPT-2's Conv1D, stacked experts: refused, not silently kept dense
    skip = _base_skip_modules(model, args)
    tied = _tied_names(model)
    linears, embeddings, bad_shape = [], [], []

    def fits(module) -> bool:
        return args.group_size is None or module.weight.shape[-1] % args.group_size == 0

    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and should_quantize(name, skip):
            (linears if fits(module) else bad_shape).append(name)
        elif args.quantize_embeddings and isinstance(module, nn.Embedding):
            tied_input = name in tied and _is_input_embedding(model, name)
            if should_quantize(name, [s for s in skip if s != name]) if tied_input else should_quantize(name, skip):
                (embeddings if fits(module) else bad_shape).append(name)
    return linears, embeddings, bad_shape


def tied_output_modules(model, embeddings: list[str]) -> list[str]:
    """Modules (e.g. `lm_head`) whose weight is the same tensor as one of the quantized `embeddings`: after export they
    read the embedding's quantized weight, so QAT fake-quantizes them with it."""
    weights = {id(model.get_submodule(n).weight) for n in embeddings}
    return [n for n, m in model.named_modules()
            if n not in embeddings and id(getattr(m, "weight", None)) in weights and isinstance(m, nn.Linear)]


def targets_for_qat(model, args: QuantizationArguments) -> tuple[list[str], list[str]]:
    """
    The weights [`QATCallback`] fake-quantizes: exactly those the export quantizes. The Linear layers of [`targets`]
    plus the output layers tied to a quantized input embedding (a tied `lm_head` multiplies by the embedding's
    quantized table after export), and the embeddings, tied ones included. A parametrization on each of two tied
    modules keeps one shared `original` tensor, so training still updates a single tied weight.
    """
    linears, embeddings, _ = targets(model, args)
    return linears + tied_output_modules(model, embeddings), embeddings


# --- export ----------------------------------------------------------------------------------------------------


def require_compressed_tensors() -> None:
    import importlib.util

    if importlib.util.find_spec("compressed_tensors") is None:
        raise ImportError("compressed-tensors export needs compressed-tensors: `pip install compressed-tensors`.")


def quantize_model(model, args: QuantizationArguments, precomputed: dict | None = None):
    """
    A compressed-tensors copy of `model` (the model itself is not changed), weights compressed in memory as they will
    be saved, and the export info. The returned model decompresses on its first forward pass.

    `precomputed` (`{module name: result with .q and .scales}`, e.g. from [`gptq.gptq_quantize`]): integers and scales
    to store as they are for those modules instead of rounding the weights to nearest ([`set_precomputed`]).
    """
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
        apply_quantization_config,
    )

    from .export import _plain_copy, _weight_bytes

    plain = _plain_copy(model).to("cpu").eval()
    linears, embeddings, bad_shape = targets(plain, args)
    strategy = "channel" if args.group_size is None else "group"
    weights = QuantizationArgs(num_bits=args.bits, type="int", symmetric=True, strategy=strategy, group_size=args.group_size)
    # Explicit module names (not class names): exactly these layers, whatever the architecture calls its heads.
    names = linears + embeddings
    if not names:
        raise ValueError("No layer to quantize: every Linear and embedding is skipped; check `skip_modules` and `group_size`.")
    # Counted before compressed-tensors registers its scale / zero-point parameters on the modules.
    source_bytes = _weight_bytes(plain)
    limit = information_limit_bytes(plain, {n: (args.bits, args.group_size) for n in names})
    config = QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=names, weights=weights, format=FORMAT)}, format=FORMAT
    )
    apply_quantization_config(plain, config, show_progress=False)
    with torch.no_grad():
        for name in names:
            module = plain.get_submodule(name)
            if precomputed is not None and name in precomputed:
                set_precomputed(module, precomputed[name].q, precomputed[name].scales, args.bits, args.group_size)
                continue
            scales = symmetric_scales(module.weight, args.bits, args.group_size)
            module.weight_scale.data.copy_(scales.reshape(module.weight_scale.shape).to(module.weight_scale.dtype))
            module.weight_zero_point.data.zero_()
            module.quantization_status = QuantizationStatus.FROZEN
    info = {
        "method": "compressed-tensors",
        "format": FORMAT,
        "bits": args.bits,
        "group_size": args.group_size,
        "strategy": strategy,
        "symmetric": True,
        "quantized_linear_modules": linears,
        "full_precision_linear_modules": [n for n, m in plain.named_modules() if isinstance(m, nn.Linear) and n not in linears],
        "quantized_embeddings": embeddings,
        "unsupported_shape_modules": bad_shape,
        "source_weight_bytes": source_bytes,
        "num_parameters": sum(p.numel() for p in plain.parameters()),
        "information_limit_bytes": limit,
    }
    if precomputed:  # only then, so the plain export's report is unchanged
        info["precomputed_modules"] = sorted(n for n in names if n in precomputed)
    compressor = ModelCompressor.from_pretrained_model(plain, quantization_format=FORMAT)
    compressor.compress_model(plain)
    return plain, compressor, info


def set_precomputed(module, q: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int | None) -> None:
    """Make a module prepared by `apply_quantization_config` store the integers `q` and `scales` given (GPTQ's) rather
    than round-to-nearest ones: its weight becomes `q x scale` and its scale `scales`, so compressed-tensors'
    compression (divide, clamp, round) gives back `q` exactly; checked here with the same numerics."""
    from compressed_tensors.quantization import QuantizationStatus

    lo, hi = int_range(bits)
    if q.shape != module.weight.shape or int(q.min()) < lo or int(q.max()) > hi:
        raise ValueError(f"precomputed integers of shape {tuple(q.shape)} in [{int(q.min())}, {int(q.max())}] do not fit a "
                         f"{tuple(module.weight.shape)} weight on the {bits}-bit grid [{lo}, {hi}].")
    scales = scales.reshape(module.weight_scale.shape).to(module.weight_scale.dtype)
    weight = int_dequantize(q, scales.reshape(q.shape[0], -1), group_size).to(module.weight.dtype)
    if not torch.equal(int_quantize(weight, scales.reshape(q.shape[0], -1), bits, group_size), q.to(torch.int8)):
        raise ValueError("precomputed integers do not survive compression at these scales (a zero or non-finite scale?).")
    module.weight.data.copy_(weight)
    module.weight_scale.data.copy_(scales)
    module.weight_zero_point.data.zero_()
    module.quantization_status = QuantizationStatus.FROZEN


def save(model, output_dir, args: QuantizationArguments, tokenizer=None, precomputed: dict | None = None) -> dict:
    """
    Quantize `model` to compressed-tensors `pack-quantized` int8/int4 and save it so that
    `AutoModelFor*.from_pretrained(output_dir)` (and `pipeline()`) reload it with only compressed-tensors installed.
    Written next to `output_dir` under a temporary name and renamed into place. Returns the export info with the
    byte counts, as [`quantize_and_save`]. `precomputed`: integers and scales stored as given ([`quantize_model`]).
    """
    from .export import REPORT_FILE, folder_bytes

    require_compressed_tensors()
    from ..distributed import atomic_output_dir

    output_dir = Path(output_dir)
    qmodel, compressor, info = quantize_model(model, args, precomputed)
    with atomic_output_dir(str(output_dir), marker=True) as tmp_name:  # whole or absent, as every other export
        tmp = Path(tmp_name)
        state = qmodel.state_dict()
        tied_outputs = _tied_output_keys(qmodel, info["quantized_embeddings"])
        qmodel.save_pretrained(tmp, state_dict={k: v for k, v in state.items() if k not in tied_outputs})
        compressor.update_config(str(tmp))
        config_path = tmp / "config.json"
        config = json.loads(config_path.read_text())
        if info["quantized_embeddings"]:
            config["quantization_config"][DEQUANTIZE_KEY] = True
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        info["reload"] = "AutoModel*.from_pretrained"
        info.update(folder_bytes(tmp))
        info["output_dir"] = str(output_dir)
        (tmp / REPORT_FILE).write_text(json.dumps(info, indent=2))
    return info


def _tied_output_keys(model, embeddings: list[str]) -> set[str]:
    """State-dict keys of output layers tied to a quantized input embedding: transformers re-ties them on load, and
    the compressed embedding no longer has a `weight` that `save_pretrained` would recognise as the tie."""
    if not embeddings or not getattr(model.config, "tie_word_embeddings", False):
        return set()
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is None:
        return set()
    name = next(n for n, m in model.named_modules() if m is out)
    return {f"{name}.weight"}
