"""The bitsandbytes backend: LLM.int8 / NF4 / FP4 weights in the standard transformers format (`config.json` carries a
`BitsAndBytesConfig`), and low-bit embedding tables in a file of our own.

bitsandbytes itself is called only from `quantization/bnb.py`, imported inside the methods below.
"""

from __future__ import annotations

import importlib.util
import json
import tempfile
from pathlib import Path

import torch

from ..config import QuantizationArguments
from ..precision import precision_summary
from ..prepare import plain_copy, weight_bytes
from ..targets import bitsandbytes_targets, resolve_skip_modules, shape_skipped_modules
from .base import QuantizationBackend, write_export_report

EMBEDDINGS_FILE = "quantized_embeddings.safetensors"
EMBEDDINGS_CONFIG_KEY = "hf_compress_quantized_embeddings"
# Stands in `model.safetensors` for each embedding stored in low bits: its shape differs from the model's, so a plain
# `from_pretrained` / `pipeline()` stops with a size-mismatch error instead of silently re-initialising the table.
EMBEDDING_SENTINEL_SHAPE = (0,)
SUPPORTED_DEVICES = ("cpu", "cuda", "xpu")


def require_bitsandbytes(bits: int = 8) -> None:
    """Raise a one-line `ImportError` naming the fix when bitsandbytes is not installed."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(f"bitsandbytes {bits}-bit export needs bitsandbytes: `pip install bitsandbytes`.")


def check_model(model, args: QuantizationArguments) -> torch.device:
    """The device of `model`, after checking that bitsandbytes can quantize it (a full-precision transformers model on
    a supported device, bitsandbytes installed)."""
    if not isinstance(args, QuantizationArguments):
        raise TypeError(f"args must be a `QuantizationArguments`, got {type(args).__name__}.")
    if not hasattr(model, "save_pretrained") or not hasattr(model, "config"):
        raise TypeError(
            f"quantization needs a transformers `PreTrainedModel`, got {type(model).__name__}; "
            "load it with `AutoModelFor*.from_pretrained`."
        )
    device = next(model.parameters()).device
    if device.type not in SUPPORTED_DEVICES:
        raise ValueError(
            f"bitsandbytes quantization runs on {', '.join(SUPPORTED_DEVICES)}, got a model on {device.type!r}; "
            "move it with `model.to('cpu')`."
        )
    if getattr(model.config, "quantization_config", None) is not None:
        raise ValueError("The model is already quantized; pass the full-precision model.")
    require_bitsandbytes(args.bits)
    return device


def use_reference_cpu_kernel(model, enabled: bool = True):
    """Route bitsandbytes' CPU 4-bit inference through its float32 reference path (dequantize, then matmul).

    On CPUs with AVX512-BF16, bitsandbytes >= 0.49 switches `Linear4bit` in eval mode without gradients to a
    packed bf16 kernel that rounds the activations and block scales to bfloat16. That kernel is faster, but its
    logits differ from the float32 path by bf16 rounding (about 1e-2 relative), and the float32 path is the one
    quantization-aware training replays exactly. Returns `model`.
    """
    from .. import bnb as backend

    for module in model.modules():
        if backend.is_linear_4bit(module) and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = not enabled and backend.cpu_has_avx512bf16()
    return model


def _quantize_linears(model, args: QuantizationArguments, device: torch.device):
    """The bnb model as `from_pretrained(..., quantization_config=...)` builds it, the export info, and the low-bit
    tensors of the embedding tables to store."""
    from .. import bnb as backend

    plain = plain_copy(model).to("cpu")
    skip = resolve_skip_modules(plain, args)
    linears, embeddings = bitsandbytes_targets(plain, args)
    embedding_tensors = {n: backend.quantize_embedding_tensors(plain.get_submodule(n).weight, args) for n in embeddings}
    # What is not quantized (embeddings, lm_head, norms, biases) keeps the model's own dtype: a bf16 model's export
    # must not be written in float32, or it could be larger than the bf16 checkpoint it came from.
    dtype = plain.dtype
    with tempfile.TemporaryDirectory() as tmp:
        plain.save_pretrained(tmp)
        qmodel = type(model).from_pretrained(
            tmp, quantization_config=backend.bnb_config(args, skip), dtype=dtype, device_map={"": device}
        )
    use_reference_cpu_kernel(qmodel.eval())
    quantized, kept = backend.quantized_linear_names(qmodel)
    info = {
        "method": "bitsandbytes",
        "bits": args.bits,
        "quant_type": args.quant_type if args.bits == 4 else "llm_int8",
        "double_quant": args.double_quant,
        "dtype": str(dtype).removeprefix("torch."),
        "skip_modules": skip,
        "quantized_linear_modules": quantized,
        "full_precision_linear_modules": kept,
        "quantized_embeddings": embeddings,
        # kept in full precision because bitsandbytes' CPU 4-bit kernels do not support their shapes
        "unsupported_shape_modules": shape_skipped_modules(plain, args),
        "source_weight_bytes": weight_bytes(plain),
        "num_parameters": sum(p.numel() for p in plain.parameters()),
    }
    return qmodel, info, embedding_tensors


def swap_embeddings(qmodel, embedding_tensors, bits: int, quant_type: str):
    """Replace each named embedding of `qmodel` by a bitsandbytes `Embedding8bit` / `Embedding4bit` holding the stored
    tensors (`{name: {"weight", "SCB" | "absmax"}}`); returns `qmodel`."""
    from .. import bnb as backend

    device = next(qmodel.parameters()).device
    for name, tensors in embedding_tensors.items():
        old = qmodel.get_submodule(name)
        # The table's output keeps the dtype of the module it replaces (the model's), as an unquantized one would.
        dtype = old.weight.dtype if old.weight.is_floating_point() else qmodel.dtype
        new = backend.embedding_module(old.num_embeddings, old.embedding_dim, tensors, bits, quant_type, device, dtype)
        qmodel.set_submodule(name, new)
    return qmodel


def _strip_keys(folder: Path, keys: set[str]) -> None:
    """Drop `keys` from the safetensors checkpoint in `folder` (single file or shards)."""
    from safetensors.torch import load_file, save_file

    index = folder / "model.safetensors.index.json"
    shards = sorted(p for p in folder.glob("*.safetensors") if p.name != EMBEDDINGS_FILE)
    for shard in shards:
        tensors = load_file(shard)
        if keys & tensors.keys():
            save_file({k: v for k, v in tensors.items() if k not in keys}, shard, metadata={"format": "pt"})
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = {k: v for k, v in data["weight_map"].items() if k not in keys}
        index.write_text(json.dumps(data, indent=2))


def _add_sentinels(folder: Path, keys: list[str]) -> None:
    """Write an empty tensor under each of `keys` in the (first) weights file: see `EMBEDDING_SENTINEL_SHAPE`."""
    from safetensors.torch import load_file, save_file

    index = folder / "model.safetensors.index.json"
    shard = folder / "model.safetensors"
    if index.exists():
        data = json.loads(index.read_text())
        shard = folder / sorted(set(data["weight_map"].values()))[0]
        data["weight_map"].update({k: shard.name for k in keys})
        index.write_text(json.dumps(data, indent=2))
    tensors = load_file(shard)
    tensors.update({k: torch.zeros(EMBEDDING_SENTINEL_SHAPE, dtype=torch.uint8) for k in keys})
    save_file(tensors, shard, metadata={"format": "pt"})


def _save_embeddings(folder: Path, embedding_tensors, args: QuantizationArguments) -> None:
    from safetensors.torch import save_file

    flat = {f"{name}.{k}": v.contiguous().cpu() for name, tensors in embedding_tensors.items() for k, v in tensors.items()}
    save_file(flat, folder / EMBEDDINGS_FILE, metadata={"format": "pt"})
    _strip_keys(folder, {f"{name}.weight" for name in embedding_tensors})
    _add_sentinels(folder, [f"{name}.weight" for name in embedding_tensors])
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config[EMBEDDINGS_CONFIG_KEY] = {"bits": args.bits, "quant_type": args.quant_type, "modules": list(embedding_tensors)}
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))


class BitsAndBytesBackend(QuantizationBackend):
    """LLM.int8 / NF4 / FP4 through transformers' bitsandbytes integration; `from_pretrained` reloads the folder with no
    extra argument, except low-bit embedding tables ([`load`] restores them)."""

    name = "bitsandbytes"

    def require(self, bits: int = 8) -> None:
        require_bitsandbytes(bits)

    def quantize(self, model, args, merge=None):
        device = check_model(model, args)
        qmodel, info, embedding_tensors = _quantize_linears(model, args, device)
        qmodel = swap_embeddings(qmodel, embedding_tensors, args.bits, args.quant_type)
        info["precision"] = precision_summary(qmodel)
        if merge is not None:
            info["peft_merge"] = merge.finish(qmodel)
        return qmodel, info

    def save(self, model, output_dir, args, tokenizer=None, merge=None) -> dict:
        from ...atomic import atomic_output_dir

        device = check_model(model, args)
        output_dir = Path(output_dir)
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        qmodel, info, embedding_tensors = _quantize_linears(model, args, device)
        with atomic_output_dir(str(output_dir), marker=True) as tmp_name:  # written beside, swapped in whole
            tmp = Path(tmp_name)
            qmodel.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            if embedding_tensors:
                _save_embeddings(tmp, embedding_tensors, args)
            qmodel = swap_embeddings(qmodel, embedding_tensors, args.bits, args.quant_type)
            info["precision"] = precision_summary(qmodel)
            if merge is not None:
                info["peft_merge"] = merge.finish(qmodel)
            info["reload"] = "hf_compress.quantization.load_quantized" if embedding_tensors else "AutoModel*.from_pretrained"
            write_export_report(tmp, info, output_dir)
        return info

    def load(self, path: Path, config: dict, model_class, device, cpu_bf16_kernel: bool = False, **kwargs):
        import transformers
        from safetensors.torch import load_file

        stored = config.get(EMBEDDINGS_CONFIG_KEY)
        verbosity = transformers.logging.get_verbosity()
        if stored:
            require_bitsandbytes(stored["bits"])
            # The embedding weights in model.safetensors are empty sentinels (or absent in older exports): silence the
            # expected MISMATCH report, then check that nothing else mismatched.
            transformers.logging.set_verbosity_error()
            kwargs = {**kwargs, "ignore_mismatched_sizes": True, "output_loading_info": True}
        try:
            model = model_class.from_pretrained(path, device_map={"": device}, **kwargs)
        finally:
            transformers.logging.set_verbosity(verbosity)
        if stored:
            model, loading_info = model
            expected = {f"{name}.weight" for name in stored["modules"]}
            other = sorted({k if isinstance(k, str) else k[0] for k in loading_info.get("mismatched_keys", ())} - expected)
            if other:
                raise ValueError(f"{path}: weights {other} do not match the model's shapes; re-export the checkpoint.")
            flat = load_file(path / EMBEDDINGS_FILE)
            tensors = {
                name: {k.removeprefix(name + "."): v for k, v in flat.items() if k.startswith(name + ".")}
                for name in stored["modules"]
            }
            swap_embeddings(model, tensors, stored["bits"], stored["quant_type"])
        if config.get("quantization_config", {}).get("load_in_4bit"):
            use_reference_cpu_kernel(model, enabled=not cpu_bf16_kernel)
        return model.eval()
