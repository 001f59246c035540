"""What an export quantizes: the layers and embedding tables of each backend, the modules kept in full precision (task
heads, output embeddings, tied weights, shapes a kernel cannot run), by name.

Quantization-aware training fake-quantizes exactly these ([`quantization_targets`]), so this module sits below both
QAT and the backends and imports neither (nor bitsandbytes / compressed-tensors).
"""

from __future__ import annotations

from torch import nn

from .config import DEFAULT_HEAD_MODULES, QuantizationArguments

# bitsandbytes' 4-bit blocks (64 values) and the row tiles of its AVX512-BF16 CPU inference kernel (32 rows).
BLOCKSIZE_4BIT = 64
ROW_TILE_4BIT = 32


def should_quantize(name: str, skip_modules: list[str]) -> bool:
    """transformers' rule for `llm_int8_skip_modules`: a pattern matches from the start up to a module boundary
    (also as a regex) or as a suffix."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    return should_convert_module(name, skip_modules)


def tied_names(model) -> set[str]:
    """Module names of the weights `model` ties (both ends of each tie)."""
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


def base_skip_modules(model, args: QuantizationArguments) -> list[str]:
    """`args.skip_modules`, or the task heads present in `model` plus its output embeddings and tied weights (every
    backend's default)."""
    if args.skip_modules is not None:
        return list(args.skip_modules)
    names = [n for n, _ in model.named_modules() if n]
    skip = [h for h in DEFAULT_HEAD_MODULES if any(n == h or n.startswith(h + ".") or n.endswith("." + h) for n in names)]
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    skip += [n for n, m in model.named_modules() if out_emb is not None and m is out_emb]
    return skip + sorted(tied_names(model))


def shape_skipped_modules(model, args: QuantizationArguments) -> list[str]:
    """The layers a 4-bit export keeps in full precision only because of their shape ([`unsupported_4bit_modules`])."""
    if args.bits != 4:
        return []
    skip = base_skip_modules(model, args)
    return sorted(n for n in unsupported_4bit_modules(model, args.quantize_embeddings) if should_quantize(n, skip))


def resolve_skip_modules(model, args: QuantizationArguments) -> list[str]:
    """`args.skip_modules`, or the task heads present in `model` plus its output embeddings and tied weights; with
    4 bits also the layers whose shapes bitsandbytes' CPU kernels do not support ([`shape_skipped_modules`])."""
    return sorted(set(base_skip_modules(model, args)) | set(shape_skipped_modules(model, args)))


# --- bitsandbytes ------------------------------------------------------------------------------------------------


def bitsandbytes_targets(model, args: QuantizationArguments) -> tuple[list[str], list[str]]:
    """(Linear layers bitsandbytes will quantize, embedding tables stored in low bits) for `model`, by name."""
    from ..architectures import is_conv1d

    skip = resolve_skip_modules(model, args)
    # transformers' bitsandbytes integration replaces `Conv1D` (GPT-2) too, so QAT fake-quantizes it as well.
    linears = [
        n for n, m in model.named_modules() if (isinstance(m, nn.Linear) or is_conv1d(m)) and should_quantize(n, skip)
    ]
    embeddings = []
    if args.quantize_embeddings:
        tied = tied_names(model)
        out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        for n, m in model.named_modules():
            if not isinstance(m, nn.Embedding) or n in tied or not should_quantize(n, skip):
                continue
            if out_emb is not None and getattr(out_emb, "weight", None) is m.weight:
                continue
            embeddings.append(n)
    return linears, embeddings


# --- compressed-tensors ------------------------------------------------------------------------------------------


def _is_input_embedding(model, name: str) -> bool:
    get = getattr(model, "get_input_embeddings", None)
    return get is not None and model.get_submodule(name) is get()


def compressed_tensors_targets(model, args: QuantizationArguments) -> tuple[list[str], list[str], list[str]]:
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

    check_compressed_tensors(model)  # GPT-2's Conv1D, stacked experts: refused, not silently kept dense
    skip = base_skip_modules(model, args)
    tied = tied_names(model)
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
    The weights [`QATCallback`] fake-quantizes for a compressed-tensors export: exactly those the export quantizes.
    The Linear layers of [`compressed_tensors_targets`] plus the output layers tied to a quantized input embedding (a
    tied `lm_head` multiplies by the embedding's quantized table after export), and the embeddings, tied ones
    included. A parametrization on each of two tied modules keeps one shared `original` tensor, so training still
    updates a single tied weight.
    """
    linears, embeddings, _ = compressed_tensors_targets(model, args)
    return linears + tied_output_modules(model, embeddings), embeddings


# One entry per `QuantizationArguments.backend`: the names QAT fake-quantizes are the ones that backend's export
# quantizes (a table, so that this module needs no backend import).
TARGETS = {"bitsandbytes": bitsandbytes_targets, "compressed-tensors": targets_for_qat}


def quantization_targets(model, args: QuantizationArguments) -> tuple[list[str], list[str]]:
    """(Linear layers, embedding tables) that the export of `model` with `args` quantizes, by name: what [`QATCallback`]
    fake-quantizes ([`bitsandbytes_targets`], or [`targets_for_qat`] with `backend="compressed-tensors"`)."""
    return TARGETS[getattr(args, "backend", "bitsandbytes")](model, args)
