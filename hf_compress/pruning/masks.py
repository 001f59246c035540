"""Which weights to prune, how to choose the pruned entries, and masks kept as buffers on their modules.

Three separate steps, each a plain function: `default_targets` / `resolve_targets` name the parameters,
`magnitude_masks` / `nm_masks` choose the entries, `attach_masks` / `apply_masks` / `remove_masks` hold them.
A mask is a boolean *keep* mask registered as the buffer `<param>_mask` of the module that owns the
parameter (the convention of `torch.nn.utils.prune` and torchao's `FakeSparsity`), so `model.to(device)`
moves it and the parameter's full dotted name finds it. The buffers are non-persistent: `save_pretrained`
writes a normal checkpoint, and the callback saves the masks next to it (see `save_masks`).
"""

from __future__ import annotations

import json
import re

import numpy as np
import torch
from torch import nn

from ..architectures import WeightLayout, is_conv1d, weight_layout
from ..fsdp import count_zeros, full_tensor

MASK_SUFFIX = "_mask"
# Task heads and poolers that are left dense unless named in `target_modules`.
HEAD_NAMES = ("classifier", "qa_outputs", "lm_head", "pooler", "score", "cls", "pre_classifier", "embed_out")
_BLOCK = re.compile(r"\.\d+(\.|$)")


def _adapter_prefixes(model: nn.Module) -> list[str]:
    """Module names of PEFT tuner layers (LoRA, DoRA, ...): modules that wrap the original layer as `base_layer`.

    Found by that convention rather than by importing peft, so a model without adapters costs nothing. Inside such a
    layer only `base_layer` holds the pretrained weight; `lora_A`, `lora_B` and the other adapter modules are
    trained deltas that pruning must leave alone.
    """
    return [n for n, m in model.named_modules() if n and isinstance(getattr(m, "base_layer", None), nn.Module)]


def _is_adapter_module(name: str, prefixes: list[str]) -> bool:
    # A module under a tuner layer that is not its base layer: an adapter (or a peft modules_to_save copy).
    for prefix in prefixes:
        if name.startswith(prefix + ".") and not name.startswith(prefix + ".base_layer"):
            return True
    return False


def _embedding_weights(model: nn.Module) -> dict[int, str]:
    """`id(weight) -> module name` of every embedding table (an `lm_head` tied to one shares its weight)."""
    found = {id(m.weight): n for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
    get_input = getattr(model, "get_input_embeddings", None)
    try:
        emb = get_input() if callable(get_input) else None
    except (NotImplementedError, AttributeError):
        emb = None
    if emb is not None and getattr(emb, "weight", None) is not None:
        found.setdefault(id(emb.weight), "input embeddings")
    return found


def _prunable(module: nn.Module) -> list[str]:
    """Names of the weights of `module` that are pruning targets by type: the weight of an `nn.Linear` or a
    `Conv1D` (GPT-2), and the stacked (3-D) parameters of a mixture-of-experts module."""
    if isinstance(module, nn.Linear) or is_conv1d(module):
        return ["weight"]
    return [n for n, p in module.named_parameters(recurse=False) if p.ndim == 3]


def _check_experts(model: nn.Module, module_name: str, params: list[str]) -> None:
    # Stacked expert weights of a family whose layout is not known are refused: pruning them as one matrix would
    # leave some experts far sparser than others.
    for param in params:
        if param != "weight":
            weight_layout(model, f"{module_name}.{param}")


def default_targets(model: nn.Module) -> list[str]:
    """
    Dotted names of the weights pruned by default: every `nn.Linear` or `Conv1D` (GPT-2) weight inside the repeated
    encoder / decoder blocks (a module path with a numeric index such as `bert.encoder.layer.3.output.dense` or
    `model.layers.0.mlp.up_proj`: for a decoder q/k/v/o and gate/up/down, fused `qkv_proj` / `c_attn` /
    `query_key_value` / `gate_up_proj` included, each part pruned on its own, see
    [`hf_compress.architectures.weight_layout`]), and the stacked expert weights of a mixture of experts whose
    layout is known (`EXPERT_PARAMETERS`: Qwen3-MoE's `experts.gate_up_proj` / `experts.down_proj`; the router is
    left dense). Embeddings, `lm_head` (tied to the embedding or not), norms, biases, the pooler and the task head
    stay dense. In a PEFT model the base layers (`...q_proj.base_layer`) are the targets, never the adapters
    (`lora_A`, `lora_B`).

    Raises:
        `ValueError`: for stacked expert weights of a model type whose expert layout is not known.
    """
    adapters = _adapter_prefixes(model)
    embeddings = _embedding_weights(model)
    names = []
    for name, module in model.named_modules():
        params = _prunable(module)
        if not params or not _BLOCK.search(name):
            continue
        if any(part in HEAD_NAMES for part in name.split(".")) or _is_adapter_module(name, adapters):
            continue
        if any(id(getattr(module, p)) in embeddings for p in params):
            continue
        _check_experts(model, name, params)
        names += [f"{name}.{p}" for p in params]
    return names


def resolve_targets(model: nn.Module, target_modules: list[str] | None = None) -> list[str]:
    """
    Weights to prune: `default_targets(model)`, or the weight of every `nn.Linear` / `Conv1D` (and the stacked
    weights of every expert module) whose dotted module name matches one of the regular expressions in
    `target_modules` (`re.search`). PEFT adapter layers (`lora_A`, `lora_B`, ...) are never targets: a pattern such
    as `q_proj` selects the wrapped `q_proj.base_layer`.

    Raises:
        `ValueError`: when nothing matches, when a matched weight is an embedding table (an `lm_head` tied to
        the input embedding): pruning it would prune the embedding too, or when it is a stacked expert weight whose
        layout is not known.
    """
    if target_modules is None:
        names = default_targets(model)
        if not names:
            raise ValueError(
                f"{type(model).__name__} has no nn.Linear or Conv1D inside numbered encoder/decoder blocks to prune; "
                "name the modules with `target_modules`."
            )
        return names
    patterns = [re.compile(p) for p in target_modules]
    adapters = _adapter_prefixes(model)
    embeddings = _embedding_weights(model)
    names = []
    for name, module in model.named_modules():
        params = _prunable(module)
        if not params or not any(p.search(name) for p in patterns):
            continue
        if _is_adapter_module(name, adapters):
            continue
        for param in params:
            if id(getattr(module, param)) in embeddings:
                raise ValueError(
                    f"{name}.{param} is tied to the embedding table {embeddings[id(getattr(module, param))]} "
                    "(tie_word_embeddings), so pruning it would prune the input embedding too; leave it out of "
                    "`target_modules` or untie it first."
                )
        _check_experts(model, name, params)
        names += [f"{name}.{p}" for p in params]
    if not names:
        example = next((n for n, m in model.named_modules() if _prunable(m)), "<none>")
        raise ValueError(
            f"target_modules {list(target_modules)} matched no nn.Linear in {type(model).__name__} (nor a Conv1D or "
            f"stacked expert weight); use regular expressions over module names such as {example!r}."
        )
    return names


def num_to_prune(numel: int, sparsity: float) -> int:
    """How many of `numel` weights are zero at `sparsity` (rounded to the nearest count)."""
    return int(round(sparsity * numel))


def _scores(weight: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    # Already-pruned entries score -1 (below any |w|), so masks only ever grow: a pruned weight stays pruned.
    score = weight.detach().abs().float()
    if mask is not None:
        score = score.masked_fill(~mask, -1.0)
    return score


def smallest_k_keep_mask(flat: torch.Tensor, k: int) -> torch.Tensor:
    """
    Keep-mask of a 1-D score tensor with its `k` smallest entries pruned, exactly as the first `k` of a stable
    ascending sort (ties broken by position), via a linear-time selection instead of a full sort.
    """
    keep = torch.ones(flat.numel(), dtype=torch.bool, device=flat.device)
    if k <= 0:
        return keep
    if k >= flat.numel() or torch.isnan(flat).any():  # NaN: let the sort's ordering (NaN last) decide
        keep[torch.argsort(flat, stable=True)[:k]] = False
        return keep
    threshold = flat.kthvalue(k).values
    below = flat < threshold
    keep[below] = False
    remaining = k - int(below.sum())  # >= 1: the k-th value itself is not below the threshold
    ties = (flat == threshold).nonzero().flatten()  # in position order, as a stable sort leaves them
    keep[ties[:remaining]] = False
    return keep


def _layer_keep_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    flat = score.flatten()
    k = max(num_to_prune(flat.numel(), sparsity), int((flat < 0).sum()))
    # Ties (e.g. equal magnitudes) break by position: the same way on every run and rank.
    return smallest_k_keep_mask(flat, k).view_as(score)


@torch.no_grad()
def magnitude_masks(
    weights: dict[str, torch.Tensor],
    sparsity: float,
    scope: str = "layer",
    current_masks: dict[str, torch.Tensor] | None = None,
    layouts: dict[str, WeightLayout] | None = None,
) -> dict[str, torch.Tensor]:
    """
    Keep-masks that zero the `sparsity` fraction of smallest-magnitude entries.

    Args:
        weights (`dict[str, torch.Tensor]`): the weights, by dotted name.
        sparsity (`float`): fraction in [0, 1) to prune, `round(sparsity * numel)` entries exactly.
        scope (`str`, *optional*, defaults to `"layer"`): `"layer"` prunes that fraction of every tensor (of every
            part of a fused one); `"global"` ranks all entries of all tensors together (one threshold, per-tensor
            sparsity varies; see [`global_keep_masks`]: computed on the weights' device, nothing copied to the CPU).
        current_masks (`dict[str, torch.Tensor]`, *optional*): masks already in force; their pruned entries
            are pruned first, so sparsity is monotone over a schedule.
        layouts (`dict[str, WeightLayout]`, *optional*): the [`~hf_compress.architectures.WeightLayout`] of fused
            weights (`weight_layouts(model, names)`): with `"layer"` scope each part (q, k, v of a `qkv_proj`, gate
            and up of a `gate_up_proj`, each expert) gets exactly `round(sparsity * numel(part))` zeros. Weights not
            listed are one part.

    Returns:
        `dict[str, torch.Tensor]`: boolean masks (True = keep), same shapes as the weights.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}.")
    if scope not in ("layer", "global"):
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}.")
    current_masks = current_masks or {}
    layouts = layouts or {}
    if scope == "layer":
        masks = {}
        for name, w in weights.items():
            score = _scores(w, current_masks.get(name))
            layout = layouts.get(name)
            if layout is None or not layout.fused:
                masks[name] = _layer_keep_mask(score, sparsity)
                continue
            keep = torch.ones_like(score, dtype=torch.bool)
            for _, index in layout.parts:
                keep[index] = _layer_keep_mask(score[index], sparsity)
            masks[name] = keep
        return masks
    # One threshold over everything: the parts of a fused weight are ranked with all the others (exact total).
    return global_keep_masks(weights, sparsity, current_masks)


# Radix selection over the float32 bit patterns of |w|: for non-negative floats the int32 view is monotone, so the
# k-th smallest magnitude is found from two integer histograms (high 16 bits, then low 16 bits of one bin).
_HI_BINS = 1 << 15  # |w| has the sign bit clear: 15 high bits (+1 bin for already-pruned entries, key -1)
_LO_BINS = 1 << 16


def _sort_keys(weight: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """int32 keys ordered like |w| (float32), already-pruned entries -1; computed on the weight's device."""
    key = weight.detach().abs().float().contiguous().view(torch.int32)
    if mask is not None:
        key = key.masked_fill(~mask.to(key.device), -1)
    return key


@torch.no_grad()
def global_keep_masks(
    weights: dict[str, torch.Tensor], sparsity: float, current_masks: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """
    Keep-masks with exactly `round(sparsity * total)` entries pruned over all `weights` together: the smallest
    magnitudes, ties broken by position in `weights`' order then in each tensor (the first `k` of a stable sort of
    the concatenation), already-pruned entries first.

    Nothing is concatenated or copied to the CPU: the threshold is found by a radix selection on the float32 bit
    patterns of `|w|` (two integer histograms, each one pass over the weights on their own device), and a third
    pass writes the masks. Peak extra memory is a few copies of the largest single tensor, not of the model.
    """
    current_masks = current_masks or {}
    total = sum(w.numel() for w in weights.values())
    already = sum(int((~m).sum()) for m in current_masks.values() if m is not None)
    k = max(num_to_prune(total, sparsity), already)
    if k >= total:
        return {n: torch.zeros_like(w, dtype=torch.bool) for n, w in weights.items()}
    # Pass 1: histogram of the high 16 bits (bin 0: already pruned, key -1).
    hist = None
    for name, w in weights.items():
        h = torch.bincount(((_sort_keys(w, current_masks.get(name)) >> 16) + 1).flatten().long(), minlength=_HI_BINS + 1)
        hist = h if hist is None else hist + h.to(hist.device)
    cum = hist.cumsum(0)
    if k == 0 or int(cum[0]) >= k:  # nothing beyond the masks already in force
        return {n: (current_masks[n].clone().to(w.device) if current_masks.get(n) is not None else torch.ones_like(w, dtype=torch.bool)) for n, w in weights.items()}
    b = int(torch.searchsorted(cum, torch.tensor([k], device=cum.device))[0])
    high, below = b - 1, int(cum[b - 1])
    # Pass 2: histogram of the low 16 bits of the entries in the threshold's high bin.
    hist_lo = None
    for name, w in weights.items():
        key = _sort_keys(w, current_masks.get(name)).flatten()
        h = torch.bincount((key[(key >> 16) == high] & 0xFFFF).long(), minlength=_LO_BINS)
        hist_lo = h if hist_lo is None else hist_lo + h.to(hist_lo.device)
    cum_lo = hist_lo.cumsum(0)
    low = int(torch.searchsorted(cum_lo, torch.tensor([k - below], device=cum_lo.device))[0])
    threshold = (high << 16) | low
    below += int(cum_lo[low - 1]) if low > 0 else 0
    remaining = k - below  # ties at the threshold still to prune, first by position
    # Pass 3: the masks.
    masks = {}
    for name, w in weights.items():
        key = _sort_keys(w, current_masks.get(name)).flatten()
        keep = key > threshold
        ties = key == threshold
        if remaining > 0:
            n_ties = int(ties.sum())
            if n_ties > remaining:
                ties[ties.nonzero().flatten()[:remaining]] = False  # the first `remaining` ties are pruned
                keep |= ties
            remaining = max(remaining - n_ties, 0)
        else:
            keep |= ties
        masks[name] = keep.view_as(w)
    return masks


def parse_nm(pattern: str) -> tuple[int, int]:
    """`"2:4"` -> `(2, 4)`: keep N of every M consecutive weights along the input dimension."""
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(pattern))
    if not match or not 0 < int(match.group(1)) < int(match.group(2)):
        raise ValueError(f"pattern must be 'N:M' with 0 < N < M (e.g. '2:4'), got {pattern!r}.")
    return int(match.group(1)), int(match.group(2))


@torch.no_grad()
def nm_masks(
    weights: dict[str, torch.Tensor], pattern: str = "2:4", layouts: dict[str, WeightLayout] | None = None
) -> dict[str, torch.Tensor]:
    """
    N:M semi-structured keep-masks: in every group of M consecutive entries along the input dimension (a row of an
    `nn.Linear` weight [out, in], the layout sparse tensor cores expect) the N largest magnitudes are kept.

    Args:
        weights (`dict[str, torch.Tensor]`): the weights, by dotted name.
        pattern (`str`, *optional*, defaults to `"2:4"`): `"N:M"`.
        layouts (`dict[str, WeightLayout]`, *optional*): where a weight's input dimension is not the last one, its
            [`~hf_compress.architectures.WeightLayout`]: a `Conv1D` weight is [in, out], so its groups run down the
            columns (`in_dim=0`). Every group lies inside one output row, so each part of a fused projection is at
            exactly N/M too.

    Raises:
        `ValueError`: when a weight's input dimension is not a multiple of M.
    """
    n, m = parse_nm(pattern)
    layouts = layouts or {}
    masks = {}
    for name, w in weights.items():
        in_dim = layouts[name].in_dim if name in layouts else w.ndim - 1
        t = w.detach().movedim(in_dim, -1)
        if t.shape[-1] % m:
            raise ValueError(
                f"{name} has {t.shape[-1]} input features, not a multiple of {m}, so it cannot take the {n}:{m} "
                "pattern; leave it out with `target_modules` or use unstructured pruning."
            )
        groups = t.abs().float().reshape(-1, m)
        keep = torch.zeros_like(groups, dtype=torch.bool)
        keep.scatter_(1, torch.argsort(groups, dim=1, descending=True, stable=True)[:, :n], True)
        masks[name] = keep.view(t.shape).movedim(-1, in_dim).contiguous()
    return masks


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    module_name, _, param_name = name.rpartition(".")
    return (model.get_submodule(module_name) if module_name else model), param_name


def _stored(module: nn.Module, param_name: str) -> torch.Tensor:
    """The stored parameter: under a parametrization (e.g. QAT's fake quantizer) its `original`, not the
    computed value, so masks keep acting on the weights the optimizer updates."""
    if nn.utils.parametrize.is_parametrized(module, param_name):
        return module.parametrizations[param_name].original
    return getattr(module, param_name)


def _is_param(module: nn.Module, param_name: str) -> bool:
    return param_name in module._parameters or nn.utils.parametrize.is_parametrized(module, param_name)


def attach_masks(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """Register an all-True `<param>_mask` buffer next to each named parameter (kept if already there)."""
    masks = {}
    for name in names:
        module, param_name = _owner(model, name)
        param = _stored(module, param_name)
        buffer = module._buffers.get(param_name + MASK_SUFFIX)
        if buffer is None:
            buffer = torch.ones_like(param, dtype=torch.bool)
            module.register_buffer(param_name + MASK_SUFFIX, buffer, persistent=False)
        masks[name] = buffer
    return masks


def get_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """The masks attached to `model`, keyed by the dotted name of the parameter each one masks."""
    masks = {}
    for module_name, module in model.named_modules():
        for buffer_name, buffer in module._buffers.items():
            if buffer_name.endswith(MASK_SUFFIX) and _is_param(module, buffer_name[: -len(MASK_SUFFIX)]):
                prefix = f"{module_name}." if module_name else ""
                masks[prefix + buffer_name[: -len(MASK_SUFFIX)]] = buffer
    return masks


@torch.no_grad()
def apply_masks(model: nn.Module) -> None:
    """Zero every masked entry in place (`masked_fill`, so pruned weights are +0.0)."""
    for name, mask in get_masks(model).items():
        module, param_name = _owner(model, name)
        _stored(module, param_name).masked_fill_(~mask, 0.0)


@torch.no_grad()
def remove_masks(model: nn.Module, apply: bool = True) -> None:
    """Make the pruning permanent: zero the masked entries, then drop the buffers (a plain model again). `apply=False`
    only drops them (the caller zeroed the weights itself, e.g. through DeepSpeed ZeRO-3)."""
    if apply:
        apply_masks(model)
    for name in list(get_masks(model)):
        module, param_name = _owner(model, name)
        del module._buffers[param_name + MASK_SUFFIX]


@torch.no_grad()
def sparsity_stats(model: nn.Module, names: list[str] | None = None) -> dict:
    """
    Fraction of exactly-zero entries, globally and per tensor.

    Args:
        model (`nn.Module`): the model.
        names (`list[str]`, *optional*): parameters to count; defaults to the masked ones, or
            `default_targets(model)` when no masks are attached.

    Returns:
        `dict`: `{"sparsity": float, "zeros": int, "total": int, "layers": {name: float}, "parts": {"name[part]":
        float}}` (`"parts"`: each part of a fused weight, see [`~hf_compress.architectures.weight_layout`];
        `"global_sparsity"` repeats `"sparsity"`).
    """
    if names is None:
        names = list(get_masks(model)) or default_targets(model)
    zeros = total = 0
    layers, parts = {}, {}
    for name in names:
        w = _stored(*_owner(model, name))
        z = count_zeros(w)  # an FSDP2 shard (DTensor): counted per shard, summed over the mesh
        layers[name] = z / w.numel()
        zeros += z
        total += w.numel()
        layout = weight_layout(model, name)
        if layout.fused:
            whole = full_tensor(w)  # the parts of a sharded fused weight may span shards
            for part, index in layout.parts:
                piece = whole[index]
                parts[f"{name}[{part}]"] = int((piece == 0).sum()) / piece.numel()
    sparsity = zeros / total if total else 0.0
    return {"sparsity": sparsity, "global_sparsity": sparsity, "zeros": zeros, "total": total, "layers": layers,
            "parts": parts}


# --- masks on disk (bit-packed), used by the callback's checkpoints and the compressed format ---------------


def pack_bool(mask: torch.Tensor) -> torch.Tensor:
    """A boolean tensor as a flat uint8 tensor of bits (8 entries a byte)."""
    return torch.from_numpy(np.packbits(mask.detach().cpu().numpy().reshape(-1)))


def unpack_bool(packed: torch.Tensor, shape) -> torch.Tensor:
    """Inverse of `pack_bool`."""
    numel = int(np.prod(shape)) if len(shape) else 1
    return torch.from_numpy(np.unpackbits(packed.numpy(), count=numel).astype(bool)).reshape(tuple(shape))


def save_masks(masks: dict[str, torch.Tensor], path: str) -> None:
    """Write masks bit-packed to a safetensors file (shapes in its metadata)."""
    from safetensors.torch import save_file

    shapes = {name: list(mask.shape) for name, mask in masks.items()}
    save_file({name: pack_bool(mask) for name, mask in masks.items()}, path, metadata={"shapes": json.dumps(shapes)})


def load_masks(path: str) -> dict[str, torch.Tensor]:
    """Read masks written by `save_masks`."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        shapes = json.loads(f.metadata()["shapes"])
        return {name: unpack_bool(f.get_tensor(name), shape) for name, shape in shapes.items()}
