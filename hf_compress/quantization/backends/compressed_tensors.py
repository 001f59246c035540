"""The compressed-tensors backend: symmetric int8 / int4 weights in the `pack-quantized` format, which plain
`from_pretrained`, `pipeline()` and vLLM load with only `compressed-tensors` installed (no hf_compress, no
bitsandbytes).

Weight-only, so it is made on the CPU from the trained weights with no calibration data; the scales are
[`~hf_compress.quantization.numerics.symmetric_scales`], the numerics QAT replays. The `compressed_tensors` library
itself is imported only inside the methods.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..config import QuantizationArguments
from ..numerics import int_dequantize, int_quantize, int_range, symmetric_scales
from ..prepare import plain_copy, weight_bytes
from ..targets import compressed_tensors_targets
from .base import QuantizationBackend, write_export_report

FORMAT = "pack-quantized"
# transformers (5.23-5.24) cannot build a compressed `nn.Embedding` on load ('Embedding' object has no attribute
# 'weight'); with `dequantize` in the saved quantization_config it decompresses every weight on load and works.
DEQUANTIZE_KEY = "dequantize"


def require_compressed_tensors() -> None:
    """Raise a one-line `ImportError` naming the fix when compressed-tensors is not installed."""
    import importlib.util

    if importlib.util.find_spec("compressed_tensors") is None:
        raise ImportError("compressed-tensors export needs compressed-tensors: `pip install compressed-tensors`.")


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


def compress(model, args: QuantizationArguments, precomputed: dict | None = None):
    """
    `(compressed_model, compressor, info)`: a compressed-tensors copy of `model` (the model itself is not changed),
    weights compressed in memory as they will be saved, the compressor that writes its config, and the export info.
    The returned model decompresses on its first forward pass.

    `precomputed` (`{module name: result with .q and .scales}`, e.g. from [`~hf_compress.quantization.gptq.gptq_quantize`]):
    integers and scales to store as they are for those modules instead of rounding the weights to nearest
    ([`set_precomputed`]).
    """
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
        apply_quantization_config,
    )

    plain = plain_copy(model).to("cpu").eval()
    linears, embeddings, bad_shape = compressed_tensors_targets(plain, args)
    strategy = "channel" if args.group_size is None else "group"
    weights = QuantizationArgs(num_bits=args.bits, type="int", symmetric=True, strategy=strategy, group_size=args.group_size)
    # Explicit module names (not class names): exactly these layers, whatever the architecture calls its heads.
    names = linears + embeddings
    if not names:
        raise ValueError("No layer to quantize: every Linear and embedding is skipped; check `skip_modules` and `group_size`.")
    # Counted before compressed-tensors registers its scale / zero-point parameters on the modules.
    source_bytes = weight_bytes(plain)
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


class CompressedTensorsBackend(QuantizationBackend):
    """compressed-tensors `pack-quantized` int8 / int4; `from_pretrained` reloads the folder with only
    compressed-tensors installed."""

    name = "compressed-tensors"

    def require(self, bits: int = 8) -> None:
        require_compressed_tensors()

    def quantize(self, model, args, merge=None):
        qmodel, _, info = compress(model, args)
        if merge is not None:
            info["peft_merge"] = merge.finish(qmodel)
        return qmodel, info

    def save(self, model, output_dir, args, tokenizer=None, merge=None, precomputed: dict | None = None) -> dict:
        """`precomputed`: integers and scales stored as given ([`compress`], e.g. GPTQ's)."""
        from ...atomic import atomic_output_dir

        require_compressed_tensors()
        output_dir = Path(output_dir)
        qmodel, compressor, info = compress(model, args, precomputed)
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
            write_export_report(tmp, info, output_dir)
        if merge is not None:  # the merge's own rounding error (the export's is measured by reloading the folder)
            info["peft_merge"] = merge.info
        return info

    def load(self, path: Path, config: dict, model_class, device, cpu_bf16_kernel: bool = False, **kwargs):
        # transformers reads the whole format; `cpu_bf16_kernel` is a bitsandbytes option, without effect here.
        return model_class.from_pretrained(path, device_map={"": device}, **kwargs).eval()
