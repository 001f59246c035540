"""Quantize a trained model with bitsandbytes and save it in the standard transformers format."""

from __future__ import annotations

import copy
import importlib.util
import json
import tempfile
from pathlib import Path

import torch
from torch import nn

from .config import DEFAULT_HEAD_MODULES, QuantizationArguments
from .precision import precision_summary

EMBEDDINGS_FILE = "quantized_embeddings.safetensors"
EMBEDDINGS_CONFIG_KEY = "hf_compress_quantized_embeddings"
REPORT_FILE = "quantization_report.json"
# Stands in `model.safetensors` for each embedding stored in low bits: its shape differs from the model's, so a plain
# `from_pretrained` / `pipeline()` stops with a size-mismatch error instead of silently re-initialising the table.
EMBEDDING_SENTINEL_SHAPE = (0,)
SUPPORTED_DEVICES = ("cpu", "cuda", "xpu")
# bitsandbytes' 4-bit blocks (64 values) and the row tiles of its AVX512-BF16 CPU inference kernel (32 rows).
BLOCKSIZE_4BIT = 64
ROW_TILE_4BIT = 32


def require_bitsandbytes(bits: int = 8) -> None:
    """Raise a one-line `ImportError` naming the fix when bitsandbytes is not installed."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(f"bitsandbytes {bits}-bit export needs bitsandbytes: `pip install bitsandbytes`.")


def _check(model, args: QuantizationArguments) -> torch.device:
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


def should_quantize(name: str, skip_modules: list[str]) -> bool:
    """transformers' rule for `llm_int8_skip_modules`: a pattern matches from the start up to a module boundary
    (also as a regex) or as a suffix."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    return should_convert_module(name, skip_modules)


def _tied_names(model) -> set[str]:
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    return {k.removesuffix(".weight") for k in set(tied) | set(tied.values())}


def unsupported_4bit_modules(model, embeddings: bool = True) -> list[str]:
    """Linear layers and embedding tables whose shapes bitsandbytes' CPU 4-bit kernels get wrong.

    bitsandbytes (0.50) stores a weight as 64-value blocks of the flattened tensor, but its AVX512 CPU
    dequantization walks blocks row by row, so a row length (`in_features`, `embedding_dim`) that is not a multiple
    of 64 gives wrong weights; its AVX512-BF16 inference kernel also needs `in_features % 64 == 0` and
    `out_features % 32 == 0` (it crashes otherwise). Such layers are kept in full precision: a checkpoint must give
    the same logits on every machine. Real transformer widths (384, 576, 768, 1536, ...) are all multiples.
    """
    from ..architectures import is_conv1d

    names = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) or is_conv1d(module):
            # bitsandbytes quantizes a Conv1D [in, out] as the transposed nn.Linear [out, in].
            out_features, in_features = module.weight.shape[:: -1 if is_conv1d(module) else 1]
            if in_features % BLOCKSIZE_4BIT or out_features % ROW_TILE_4BIT:
                names.append(name)
        elif embeddings and isinstance(module, nn.Embedding) and module.embedding_dim % BLOCKSIZE_4BIT:
            names.append(name)
    return names


def _base_skip_modules(model, args: QuantizationArguments) -> list[str]:
    if args.skip_modules is not None:
        return list(args.skip_modules)
    names = [n for n, _ in model.named_modules() if n]
    skip = [h for h in DEFAULT_HEAD_MODULES if any(n == h or n.startswith(h + ".") or n.endswith("." + h) for n in names)]
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    skip += [n for n, m in model.named_modules() if out_emb is not None and m is out_emb]
    return skip + sorted(_tied_names(model))


def shape_skipped_modules(model, args: QuantizationArguments) -> list[str]:
    """The layers a 4-bit export keeps in full precision only because of their shape ([`unsupported_4bit_modules`])."""
    if args.bits != 4:
        return []
    skip = _base_skip_modules(model, args)
    return sorted(n for n in unsupported_4bit_modules(model, args.quantize_embeddings) if should_quantize(n, skip))


def resolve_skip_modules(model, args: QuantizationArguments) -> list[str]:
    """`args.skip_modules`, or the task heads present in `model` plus its output embeddings and tied weights; with
    4 bits also the layers whose shapes bitsandbytes' CPU kernels do not support ([`shape_skipped_modules`])."""
    return sorted(set(_base_skip_modules(model, args)) | set(shape_skipped_modules(model, args)))


def use_reference_cpu_kernel(model, enabled: bool = True):
    """Route bitsandbytes' CPU 4-bit inference through its float32 reference path (dequantize, then matmul).

    On CPUs with AVX512-BF16, bitsandbytes >= 0.49 switches `Linear4bit` in eval mode without gradients to a
    packed bf16 kernel that rounds the activations and block scales to bfloat16. That kernel is faster, but its
    logits differ from the float32 path by bf16 rounding (about 1e-2 relative), and the float32 path is the one
    quantization-aware training replays exactly. Returns `model`.
    """
    from . import bnb as backend

    for module in model.modules():
        if backend.is_linear_4bit(module) and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = not enabled and backend.cpu_has_avx512bf16()
    return model


def quantization_targets(model, args: QuantizationArguments) -> tuple[list[str], list[str]]:
    """(Linear layers bitsandbytes will quantize, embedding tables stored in low bits) for `model`, by name; with
    `backend="compressed-tensors"` the weights its QAT fake-quantizes ([`compressed_tensors.targets_for_qat`])."""
    if args.backend == "compressed-tensors":
        from .compressed_tensors import targets_for_qat

        return targets_for_qat(model, args)
    from ..architectures import is_conv1d

    skip = resolve_skip_modules(model, args)
    # transformers' bitsandbytes integration replaces `Conv1D` (GPT-2) too, so QAT fake-quantizes it as well.
    linears = [
        n for n, m in model.named_modules() if (isinstance(m, nn.Linear) or is_conv1d(m)) and should_quantize(n, skip)
    ]
    embeddings = []
    if args.quantize_embeddings:
        tied = _tied_names(model)
        out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        for n, m in model.named_modules():
            if not isinstance(m, nn.Embedding) or n in tied or not should_quantize(n, skip):
                continue
            if out_emb is not None and getattr(out_emb, "weight", None) is m.weight:
                continue
            embeddings.append(n)
    return linears, embeddings


def _plain_copy(model):
    """A parametrization-free copy: fake-quantized weights as their full-precision originals (which the export
    quantizes exactly as QAT did), any other parametrization (pruning masks) baked into the weight.

    Built as a fresh model plus a state dict, not by `deepcopy`: a deep-copied parametrized module shares its
    generated class with the original, so removing parametrizations from the copy would break the original.
    """
    from torch.nn.utils import parametrize

    from .qat import FakeQuantize

    state = model.state_dict()
    with torch.no_grad():
        for prefix, module in model.named_modules():
            if not parametrize.is_parametrized(module):
                continue
            prefix = f"{prefix}." if prefix else ""
            for name, plist in module.parametrizations.items():
                value = plist.original
                for p in plist:
                    if not isinstance(p, FakeQuantize):
                        value = p(value)
                inner = f"{prefix}parametrizations.{name}."
                state = {k: v for k, v in state.items() if not k.startswith(inner)}
                state[f"{prefix}{name}"] = value.detach()
    plain = type(model)(copy.deepcopy(model.config))
    plain.load_state_dict(state)
    return plain.to(next(model.parameters()).dtype)


def fake_quantized_copy(model, args: QuantizationArguments):
    """
    A copy of `model` (the caller's is not changed) whose forward pass is what the export of `model` with `args` must
    compute: the export's fake quantizers ([`attach_fake_quant`] on [`quantization_targets`], QAT's exact numerics)
    on its full-precision weights, in eval mode. The reference the loaders check compares a written checkpoint with.
    """
    from .qat import attach_fake_quant

    plain, _ = _merge_adapters(model)
    plain = _plain_copy(plain).eval()
    attach_fake_quant(plain, args, *quantization_targets(plain, args))
    return plain


def _weight_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def _quantize_linears(model, args: QuantizationArguments, device: torch.device):
    """The bnb model as `from_pretrained(..., quantization_config=...)` builds it, and the export info."""
    from . import bnb as backend

    plain = _plain_copy(model).to("cpu")
    skip = resolve_skip_modules(plain, args)
    linears, embeddings = quantization_targets(plain, args)
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
        "source_weight_bytes": _weight_bytes(plain),
        "num_parameters": sum(p.numel() for p in plain.parameters()),
    }
    return qmodel, info, embedding_tensors


def _swap_embeddings(qmodel, embedding_tensors, bits: int, quant_type: str):
    from . import bnb as backend

    device = next(qmodel.parameters()).device
    for name, tensors in embedding_tensors.items():
        old = qmodel.get_submodule(name)
        # The table's output keeps the dtype of the module it replaces (the model's), as an unquantized one would.
        dtype = old.weight.dtype if old.weight.is_floating_point() else qmodel.dtype
        new = backend.embedding_module(old.num_embeddings, old.embedding_dim, tensors, bits, quant_type, device, dtype)
        qmodel.set_submodule(name, new)
    return qmodel


def quantize_model(model, args: QuantizationArguments):
    """
    Quantize `model` in memory exactly as [`quantize_and_save`] stores it (the model itself is not changed).

    Returns:
        `(quantized_model, info)`: the bitsandbytes model in eval mode and a dict saying what was quantized.
    """
    model, merge = _merge_adapters(model)
    if getattr(args, "backend", None) == "compressed-tensors":
        from . import compressed_tensors

        qmodel, _, info = compressed_tensors.quantize_model(model, args)
        if merge is not None:
            info["peft_merge"] = merge.finish(qmodel)
        return qmodel, info
    device = _check(model, args)
    qmodel, info, embedding_tensors = _quantize_linears(model, args, device)
    qmodel = _swap_embeddings(qmodel, embedding_tensors, args.bits, args.quant_type)
    info["precision"] = precision_summary(qmodel)
    if merge is not None:
        info["peft_merge"] = merge.finish(qmodel)
    return qmodel, info


def _merge_adapters(model):
    """A PEFT model is merged into a plain one before export ([`hf_compress.peft_utils.merge_adapters`]); peft is
    imported only when the model is one."""
    if not (hasattr(model, "peft_config") and hasattr(model, "get_base_model")):
        return model, None
    from ..peft_utils import merge_adapters

    merge = merge_adapters(model)
    return merge.model, merge


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


def folder_bytes(folder) -> dict[str, int]:
    files = [p for p in Path(folder).rglob("*") if p.is_file()]
    return {
        "bytes_on_disk": sum(p.stat().st_size for p in files),
        "weight_bytes_on_disk": sum(p.stat().st_size for p in files if p.suffix == ".safetensors"),
    }


def quantize_and_save(model, output_dir, args: QuantizationArguments, tokenizer=None) -> dict:
    """
    Quantize `model` with bitsandbytes and save it so that `AutoModelFor*.from_pretrained(output_dir)` reloads
    the quantized model with no extra argument (`config.json` carries `quantization_config`).

    The task head (`classifier`, `qa_outputs`, `lm_head`, `score`) and the output embeddings stay unquantized, in
    the model's own dtype (a bf16 model's stay bf16), unless `args.skip_modules` says otherwise; the report's
    `precision` says what is stored in which precision. A PEFT model (LoRA, or QLoRA over a bitsandbytes base) is
    merged first ([`hf_compress.peft_utils.merge_adapters`]) and the report's `peft_merge` gives the merge's error. A model under [`QATCallback`] fake quantization is
    exported from its full-precision weights, which gives exactly the fake-quantized forward pass. With
    `args.quantize_embeddings` the embedding tables go to `quantized_embeddings.safetensors`, which
    transformers does not read: reload those with [`load_quantized`].

    The folder is written next to `output_dir` under a temporary name and renamed into place at the end, so
    an interrupted export never leaves a half-written checkpoint.

    Args:
        model ([`PreTrainedModel`]): The full-precision model (pruned, distilled, fake-quantized: any).
        output_dir (`str` or `os.PathLike`): Where to save; replaced if it exists.
        args ([`QuantizationArguments`]): Bits, data type, embeddings, modules to skip.
        tokenizer (*optional*): Saved alongside when given.

    Returns:
        `dict`: bits and data type, the quantized and full-precision module names, the quantized embeddings,
        `bytes_on_disk` (whole folder), `weight_bytes_on_disk` (safetensors files), `source_weight_bytes`
        (the full-precision state dict), `output_dir` and `reload` (how to load it back).
    """
    model, merge = _merge_adapters(model)
    if getattr(args, "backend", None) == "compressed-tensors":  # pack-quantized int8/int4: see `compressed_tensors.py`
        from . import compressed_tensors

        info = compressed_tensors.save(model, output_dir, args, tokenizer=tokenizer)
        if merge is not None:  # the merge's own rounding error (the export's is measured by reloading the folder)
            info["peft_merge"] = merge.info
        return info
    device = _check(model, args)
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    qmodel, info, embedding_tensors = _quantize_linears(model, args, device)
    from ..atomic import atomic_output_dir

    with atomic_output_dir(str(output_dir), marker=True) as tmp_name:  # written beside, swapped in whole
        tmp = Path(tmp_name)
        qmodel.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if embedding_tensors:
            _save_embeddings(tmp, embedding_tensors, args)
        qmodel = _swap_embeddings(qmodel, embedding_tensors, args.bits, args.quant_type)
        info["precision"] = precision_summary(qmodel)
        if merge is not None:
            info["peft_merge"] = merge.finish(qmodel)
        info["reload"] = "hf_compress.quantization.load_quantized" if embedding_tensors else "AutoModel*.from_pretrained"
        info.update(folder_bytes(tmp))
        info["output_dir"] = str(output_dir)
        (tmp / REPORT_FILE).write_text(json.dumps(info, indent=2))
    return info


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


def load_quantized(path, model_class=None, device=None, cpu_bf16_kernel: bool = False, **kwargs):
    """
    Load a folder written by [`quantize_and_save`]: `from_pretrained`, then the low-bit embedding tables if the
    export stored any (bitsandbytes `Embedding8bit` / `Embedding4bit`).

    Args:
        path (`str` or `os.PathLike`): The exported folder, or a Hub repo id (downloaded with `snapshot_download`,
            as `from_pretrained` would; `HF_ENDPOINT` and the saved token apply).
        model_class (*optional*): The model class; defaults to `config.architectures[0]` from transformers.
        device (*optional*): Device to load on (default: CPU).
        cpu_bf16_kernel (`bool`, *optional*, defaults to `False`):
            Let bitsandbytes run 4-bit layers through its AVX512-BF16 CPU kernel where the CPU has one (faster,
            logits within bf16 rounding). The default keeps its float32 reference path, whose logits are the ones
            quantization-aware training produced (see [`use_reference_cpu_kernel`]).
        kwargs: Passed to `from_pretrained`.
    """
    import transformers
    from safetensors.torch import load_file

    if not Path(path).is_dir():  # a Hub id, as the model card's snippet passes it
        from huggingface_hub import snapshot_download

        path = snapshot_download(str(path), revision=kwargs.pop("revision", None))
    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    if model_class is None:
        model_class = getattr(transformers, config["architectures"][0])
    stored = config.get(EMBEDDINGS_CONFIG_KEY)
    device = torch.device(device or "cpu")
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
        _swap_embeddings(model, tensors, stored["bits"], stored["quant_type"])
    if config.get("quantization_config", {}).get("load_in_4bit"):
        use_reference_cpu_kernel(model, enabled=not cpu_bf16_kernel)
    return model.eval()
