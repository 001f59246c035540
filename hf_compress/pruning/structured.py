"""Structured (Minitron-style) width and depth pruning that makes a model physically smaller.

Pure functions over an ordinary transformers model, after NVIDIA's Minitron
([Muralidharan et al. 2024, "Compact Language Models via Pruning and Knowledge Distillation"](https://arxiv.org/abs/2407.14679)):

1. [`structured_importance`] scores every FFN neuron, attention KV group, hidden channel and block from activations
   on calibration batches (mean activation magnitude; block importance as `1 - cos(input, output)` or as the loss
   increase when the block is skipped), or from weight magnitudes when no batch is given.
2. [`select_structures`] turns scores and keep-targets into a [`StructuredPlan`]: which indices survive.
3. [`prune_structures`] slices the tensors and rewrites the config (`intermediate_size`, `num_attention_heads`,
   `num_key_value_heads`, `head_dim`, `hidden_size`, `num_hidden_layers`, `layer_types`), so the result is an ordinary
   checkpoint that plain `from_pretrained` loads. [`attach_structured_masks`] computes exactly what the pruned model
   computes while keeping the full shapes (the gradual callback trains under these masks, then prunes at the end).

Which families can express which structure, and where each keeps its blocks, norms, q/k norms, fused projections
and heads, is read from [`hf_compress.architectures.FAMILIES`]; what a family cannot express is refused from the
config alone ([`~hf_compress.architectures.check_structured_support`]). Every cut is checked against the masked
model, in memory and after a reload ([`check_structured_cut`]).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..architectures import (
    HEAD_MODULES,
    STRUCTURES,
    Family,
    StructuredPruningError,
    check_structured_support,
    family_of,
    fused_parts,
)

from .self_check import (
    SelfCheckError,
    check_batch,
    compare,
    forward_batch,
    logits_on,
    model_inputs,
    raise_if_beyond,
    reload_pretrained,
)

_MASK_HOOKS = "_hf_compress_structured_hooks"


class StructuredSelfCheckError(StructuredPruningError, SelfCheckError):
    """A cut that does not compute what the masked model computed: both a structured-pruning error and a
    failed self-check (what the CLI reports in one line)."""


# ---- the model's structure (read from `hf_compress.architectures`) --------------------------------------------


def _at(root: nn.Module, path: str | None):
    if path is None:
        return None
    for part in path.split("."):
        root = getattr(root, part, None)
        if root is None:
            return None
    return root


@dataclass
class _Blocks:
    family: Family
    base: nn.Module  # the module holding the embeddings and the layer list
    layers: nn.ModuleList


def _blocks(model) -> _Blocks:
    family = family_of(model.config)
    base = getattr(model, "base_model", model)
    layers = _at(base, family.layers)
    if not isinstance(layers, nn.ModuleList) or not len(layers) or _at(layers[0], family.ffn_out) is None:
        raise StructuredPruningError(
            f"`{type(model).__name__}` (model type `{model.config.model_type}`) does not have the layout structured "
            f"pruning expects (`{family.layers}` with `{family.ffn_out}`); use unstructured pruning for it."
        )
    return _Blocks(family, base, layers)


def _is_conv1d(m) -> bool:
    return type(m).__name__ == "Conv1D"


def _ffn_in(blocks: _Blocks, layer) -> list[tuple[nn.Module, int]]:
    """Projections whose output rows are the FFN neurons, each with its number of parts (a fused gate|up has 2)."""
    fam = blocks.family
    if fam.ffn_fused is not None:
        return [(_at(layer, fam.ffn_fused), 2)]
    return [(m, 1) for m in (_at(layer, p) for p in fam.ffn_in) if m is not None]


def _ffn_out(blocks: _Blocks, layer) -> nn.Module:
    """The projection whose inputs are the FFN neurons."""
    return _at(layer, blocks.family.ffn_out)


def _attn_out(blocks: _Blocks, layer) -> nn.Module:
    return _at(layer, blocks.family.attn_out)


def ffn_size(model) -> int:
    """The FFN width of `model` (`intermediate_size`; GPT-2's `n_inner`, which defaults to 4 x hidden)."""
    fam = family_of(model.config)
    return getattr(model.config, fam.ffn_size, None) or 4 * model.config.hidden_size


def _head_dims(model) -> tuple[int, int, int]:
    """(query heads, KV heads, head_dim) of a decoder."""
    cfg = model.config
    n_q = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_q
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_q
    return n_q, n_kv, head_dim


def _hidden_norms(blocks: _Blocks, model) -> list[nn.Module]:
    """Every norm over the residual stream, as the family table names them: each block's, then the final one."""
    fam = blocks.family
    norms = [m for layer in blocks.layers for m in (_at(layer, p) for p in fam.block_norms) if m is not None]
    final = _at(blocks.base, fam.final_norm)
    if final is not None:
        norms.append(final)
    return norms


def _hidden_writers(blocks: _Blocks) -> list[nn.Module]:
    """Projections whose outputs are added to the residual stream (or normed, then added)."""
    return [m for layer in blocks.layers for m in (_attn_out(blocks, layer), _ffn_out(blocks, layer))]


def _hidden_readers(blocks: _Blocks) -> list[nn.Module]:
    """Projections that read a normed residual stream."""
    out = []
    for layer in blocks.layers:
        out += [_at(layer, p) for p in blocks.family.attn_in]
        out += [_at(layer, blocks.family.qkv)] if blocks.family.qkv else []  # a fused q|k|v reads the stream too
        out += [m for m, _ in _ffn_in(blocks, layer)]
    return out


def _task_heads(model, hidden: int) -> list[nn.Module]:
    """The task model's heads that read the hidden stream (`lm_head`, `score`, `classifier`, `qa_outputs`)."""
    out = []
    for name in HEAD_MODULES:
        m = getattr(model, name, None)
        if isinstance(m, nn.Linear) and m.in_features == hidden:
            out.append(m)
    return out


def check_structures(model, structures) -> list[str]:
    """Validate `structures` (names from `STRUCTURES`) against `model`'s family (see
    [`~hf_compress.architectures.check_structured_support`]); returns them as a list."""
    structures = check_structured_support(model.config, structures)
    _blocks(model)
    return structures


# ---- importance -----------------------------------------------------------------------------------------------


def _token_weights(batch) -> torch.Tensor | None:
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    return None if mask is None else mask.float()


def _accumulate(store: dict, key, values: torch.Tensor, weights: torch.Tensor | None):
    """Add the sum over tokens of `values` (B, T, N) -> (N,), weighted by the attention mask, and the token count."""
    values = values.detach().float()
    if weights is not None and weights.shape == values.shape[:2]:
        total = torch.einsum("btn,bt->n", values, weights.to(values.device))
        count = weights.sum().item()
    else:
        total = values.reshape(-1, values.shape[-1]).sum(0)
        count = values[..., 0].numel()
    s, c = store.get(key, (0.0, 0.0))
    store[key] = (s + total, c + count)


@torch.no_grad()
def structured_importance(model, batches=None, structures=STRUCTURES, layer_metric: str = "cosine") -> dict[str, torch.Tensor]:
    r"""
    Importance score of every structure, higher = more important (Minitron's activation-based estimates).

    Args:
        model (`PreTrainedModel`): a Llama-style decoder or a BERT-style encoder.
        batches (iterable of `dict[str, Tensor]`, *optional*):
            Calibration batches (`input_ids`, `attention_mask`, ...; `labels` for `layer_metric="loss"`). Without
            them, the scores fall back to weight magnitudes.
        structures (`list[str]`): which of `ffn`, `heads`, `hidden`, `layers` to score.
        layer_metric (`str`, *optional*, defaults to `"cosine"`):
            `"cosine"`: a block's importance is the mean over tokens of `1 - cos(input, output)` (how much it changes
            its input, ShortGPT's Block Influence); `"loss"`: the loss increase when the block alone is skipped.

    Returns:
        `dict` with `ffn` (layers x intermediate_size: mean |activation| at the input of the FFN's down projection),
        `heads` (layers x KV groups: the sum over a group's query heads of the mean L2 norm of each head's output),
        `hidden` (hidden_size: mean |output| of every residual-stream norm, summed over the norms), `layers`
        (num_hidden_layers), and `method` (`"activation"` or `"magnitude"`), for the structures asked.
    """
    structures = check_structures(model, structures)
    if layer_metric not in ("cosine", "loss"):
        raise StructuredPruningError(f"layer_metric must be 'cosine' or 'loss', got {layer_metric!r}.")
    blocks = _blocks(model)
    if batches is None:
        return _magnitude_importance(model, blocks, structures)
    batches = list(batches)
    if not batches:
        raise StructuredPruningError("structured_importance got an empty list of calibration batches; pass at least one batch.")
    was_training = model.training
    model.eval()
    store: dict = {}
    current: dict = {}
    head_shape = _head_dims(model) if "heads" in structures else (None, None, None)
    handles = _importance_hooks(model, blocks, structures, layer_metric, store, current, head_shape)
    try:
        for batch in batches:
            current["w"] = _token_weights(batch)
            forward_batch(model, model_inputs(batch, labels=False))
    finally:
        for h in handles:
            h.remove()
    scores = _activation_scores(store, len(blocks.layers), structures, layer_metric, head_shape)
    if "layers" in structures and layer_metric == "loss":
        scores["layers"] = _skip_loss_importance(model, blocks, batches)
    model.train(was_training)
    return scores


def _importance_hooks(model, blocks: _Blocks, structures, layer_metric: str, store: dict, current: dict, head_shape):
    """Registers the forward hooks that add each structure's activations to `store` (weighted by the attention mask
    the caller puts in `current["w"]` before each batch); returns their handles (all removed again if one fails)."""
    n_q, _, head_dim = head_shape
    handles = []
    try:
        for i, layer in enumerate(blocks.layers):
            if "ffn" in structures:
                handles.append(_ffn_out(blocks, layer).register_forward_pre_hook(
                    lambda m, args, i=i: _accumulate(store, ("ffn", i), args[0].abs(), current.get("w"))))
            if "heads" in structures:
                def head_hook(m, args, i=i):
                    x = args[0]
                    per_head = x.reshape(*x.shape[:-1], n_q, head_dim).float().norm(dim=-1)
                    _accumulate(store, ("heads", i), per_head, current.get("w"))
                handles.append(_attn_out(blocks, layer).register_forward_pre_hook(head_hook))
            if "layers" in structures and layer_metric == "cosine":
                def layer_hook(m, args, kwargs, output, i=i):
                    x = args[0] if args else kwargs["hidden_states"]
                    y = output[0] if isinstance(output, tuple) else output
                    change = 1 - torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)
                    _accumulate(store, ("layers", i), change.unsqueeze(-1), current.get("w"))
                handles.append(layer.register_forward_hook(layer_hook, with_kwargs=True))
        if "hidden" in structures:
            for norm in _hidden_norms(blocks, model):
                handles.append(norm.register_forward_hook(
                    lambda m, args, out: _accumulate(store, "hidden", out.abs(), current.get("w"))))
    except BaseException:
        for h in handles:
            h.remove()
        raise
    return handles


def _activation_scores(store: dict, num_layers: int, structures, layer_metric: str, head_shape) -> dict:
    """The mean activations in `store` as scores (`method: "activation"`); `layers` only for the cosine metric."""
    n_q, n_kv, _ = head_shape
    L = num_layers
    scores: dict[str, torch.Tensor] = {"method": "activation"}

    def mean(key):
        s, c = store[key]
        return s / max(c, 1.0)

    if "ffn" in structures:
        scores["ffn"] = torch.stack([mean(("ffn", i)) for i in range(L)]).cpu()
    if "heads" in structures:
        per_q = torch.stack([mean(("heads", i)) for i in range(L)]).cpu()
        scores["heads"] = per_q.reshape(L, n_kv, n_q // n_kv).sum(-1)  # query heads of a group are contiguous
    if "hidden" in structures:
        scores["hidden"] = mean("hidden").cpu()
    if "layers" in structures and layer_metric == "cosine":
        scores["layers"] = torch.stack([mean(("layers", i))[0] for i in range(L)]).cpu()
    return scores


def _mean_loss(model, batches) -> float:
    losses = []
    for batch in batches:
        inputs = model_inputs(batch, labels=True)
        if "labels" not in inputs:
            if not hasattr(model, "lm_head"):
                raise StructuredPruningError("layer_metric='loss' needs `labels` in the calibration batches; add them or use 'cosine'.")
            inputs["labels"] = inputs["input_ids"]
        losses.append(forward_batch(model, inputs).loss.item())
    return sum(losses) / len(losses)


def _skip_loss_importance(model, blocks, batches) -> torch.Tensor:
    full = _mean_loss(model, batches)
    out = []
    for layer in blocks.layers:
        handle = layer.register_forward_hook(_skip_hook, with_kwargs=True)
        try:
            out.append(_mean_loss(model, batches) - full)
        finally:
            handle.remove()
    return torch.tensor(out)


def _magnitude_importance(model, blocks, structures) -> dict:
    """Weight-norm fallback: a neuron's in-rows x out-column norms, a group's output-projection columns, a channel's
    embedding column, a block's output projections (weak for depth: prefer calibration data)."""
    scores: dict = {"method": "magnitude"}
    with torch.no_grad():
        if "ffn" in structures:
            rows = []
            for layer in blocks.layers:
                s = _rows(_ffn_out(blocks, layer)).float().norm(dim=0)
                for lin, parts in _ffn_in(blocks, layer):
                    for part in _rows(lin).float().norm(dim=1).chunk(parts):
                        s = s * part
                rows.append(s)
            scores["ffn"] = torch.stack(rows)
        if "heads" in structures:
            n_q, n_kv, hd = _head_dims(model)
            scores["heads"] = torch.stack([
                _attn_out(blocks, layer).weight.float().reshape(-1, n_kv, (n_q // n_kv) * hd).norm(dim=(0, 2))
                for layer in blocks.layers])
        if "hidden" in structures:
            scores["hidden"] = model.get_input_embeddings().weight.float().norm(dim=0)
        if "layers" in structures:
            scores["layers"] = torch.tensor([
                sum(m.weight.float().norm().item() for m in (_attn_out(blocks, layer), _ffn_out(blocks, layer)))
                for layer in blocks.layers])
    return scores


def _rows(m: nn.Module) -> torch.Tensor:
    """The weight as (out, in) (`Conv1D` stores it transposed)."""
    return m.weight.t() if _is_conv1d(m) else m.weight


# ---- the plan -------------------------------------------------------------------------------------------------


@dataclass
class StructuredPlan:
    """Which structures survive, as indices into the ORIGINAL model (sorted ascending).

    Attributes:
        ffn (`list[list[int]]`, *optional*): kept FFN neurons of each layer (same count in every layer: the config
            has one `intermediate_size`).
        kv_groups (`list[list[int]]`, *optional*): kept KV heads of each layer; each keeps its query heads.
        hidden (`list[int]`, *optional*): kept residual-stream channels.
        layers (`list[int]`, *optional*): kept blocks.
    """

    ffn: list[list[int]] | None = None
    kv_groups: list[list[int]] | None = None
    hidden: list[int] | None = None
    layers: list[int] | None = None
    scores: dict = field(default_factory=dict, repr=False)
    check: dict | None = None  # the self-check's figures (see `check_structured_cut`), once cut

    def to_dict(self) -> dict:
        """JSON-safe summary plus the importance scores and the self-check (for the compression report)."""
        out = {k: getattr(self, k) for k in ("ffn", "kv_groups", "hidden", "layers", "check") if getattr(self, k) is not None}
        out["scores"] = {k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in self.scores.items()}
        return out


def _count(keep, total: int, what: str) -> int:
    """A kept amount -> a count: a value in (0, 1] is a fraction of `total`, a whole number > 1 is a count."""
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise StructuredPruningError(f"the kept amount of {what} must be a fraction in (0, 1] or a count, got {keep!r}.")
    if keep > 1 and float(keep).is_integer():
        n = int(keep)
    elif 0 < keep <= 1:
        n = round(float(keep) * total)
    else:
        raise StructuredPruningError(
            f"the kept amount of {what} must be a fraction in (0, 1] or a whole count > 1, got {keep}."
        )
    if not 1 <= n <= total:
        raise StructuredPruningError(f"keeping {keep} of {total} {what} leaves {n}; keep between 1 and {total}.")
    return n


def _hidden_count(model, keep: dict) -> int:
    """Kept hidden channels, rounded down to a multiple of the (kept) query heads: Llama-family configs refuse a
    `hidden_size` that `num_attention_heads` does not divide, even with an explicit `head_dim`."""
    n_q, n_kv, _ = _head_dims(model)
    heads = n_q if "heads" not in keep else _count(keep["heads"], n_kv, "KV head groups") * (n_q // n_kv)
    n = _count(keep["hidden"], model.config.hidden_size, "hidden channels")
    n -= n % heads
    if n < heads:
        raise StructuredPruningError(f"keeping {keep['hidden']} hidden channels leaves fewer than the {heads} attention heads; keep more.")
    return n


def _top(scores: torch.Tensor, k: int) -> list[int]:
    # Stable: ties keep the lower index, so the plan is deterministic.
    order = torch.sort(-scores.float(), stable=True).indices[:k]
    return sorted(order.tolist())


def select_structures(model, scores: dict, keep: dict) -> StructuredPlan:
    """
    The [`StructuredPlan`] that keeps the highest-scoring structures.

    Args:
        model: the model `scores` were measured on.
        scores (`dict`): from [`structured_importance`].
        keep (`dict[str, float | int]`): per structure, the kept fraction in (0, 1] (a float) or count (an int > 1):
            `ffn` neurons per layer, `heads` KV groups per layer (with all their query heads), `hidden` channels,
            `layers` blocks. E.g. `{"ffn": 0.5, "layers": 4}`.
    """
    check_structures(model, list(keep))
    blocks = _blocks(model)
    plan = StructuredPlan(scores=dict(scores))
    if "ffn" in keep:
        k = _count(keep["ffn"], ffn_size(model), "FFN neurons")
        plan.ffn = [_top(row, k) for row in scores["ffn"]]
    if "heads" in keep:
        n_q, n_kv, _ = _head_dims(model)
        k = _count(keep["heads"], n_kv, "KV head groups")
        plan.kv_groups = [_top(row, k) for row in scores["heads"]]
    if "hidden" in keep:
        n = _hidden_count(model, keep)
        plan.hidden = _top(scores["hidden"], n)
    if "layers" in keep:
        plan.layers = _top(scores["layers"], _count(keep["layers"], len(blocks.layers), "layers"))
    return plan


# ---- physical pruning -----------------------------------------------------------------------------------------


def _slice_linear(lin: nn.Module, dim: int, idx: torch.Tensor) -> None:
    """Keep output rows (`dim=0`, with the bias) or input columns (`dim=1`) `idx` of an `nn.Linear` or a `Conv1D`."""
    idx = idx.to(lin.weight.device)
    conv = _is_conv1d(lin)
    wdim = (1 - dim) if conv else dim  # Conv1D stores (in, out)
    lin.weight = nn.Parameter(lin.weight.data.index_select(wdim, idx).clone(), requires_grad=lin.weight.requires_grad)
    if dim == 0:
        if conv:
            lin.nf = len(idx)
        else:
            lin.out_features = len(idx)
        if lin.bias is not None:
            lin.bias = nn.Parameter(lin.bias.data.index_select(0, idx).clone(), requires_grad=lin.bias.requires_grad)
    elif not conv:
        lin.in_features = len(idx)


def _slice_vector(module: nn.Module, name: str, idx: torch.Tensor) -> None:
    p = getattr(module, name, None)
    if p is not None:
        setattr(module, name, nn.Parameter(p.data.index_select(0, idx.to(p.device)).clone(), requires_grad=p.requires_grad))


def _scale_norm(norm: nn.Module, kind: str, factor: float) -> None:
    """Multiply a norm's output by `factor` through its parameters (`rms_1p` stores `w` of `(1 + w) * x`)."""
    with torch.no_grad():
        if kind == "rms_1p":
            norm.weight.copy_((1.0 + norm.weight.double()) * factor - 1.0)
        else:
            norm.weight.mul_(factor)
            if getattr(norm, "bias", None) is not None:
                norm.bias.mul_(factor)


def _qk_norms(blocks: _Blocks, layer) -> tuple[nn.Module, nn.Module]:
    return tuple(_at(layer, p) for p in blocks.family.qk_norms)


def _head_index(groups: list[int], n_q: int, n_kv: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices of the kept query heads and of the kept KV heads (whole GQA groups)."""
    rep = n_q // n_kv
    q_heads = [g * rep + j for g in groups for j in range(rep)]
    q = torch.tensor([h * head_dim + d for h in q_heads for d in range(head_dim)])
    kv = torch.tensor([g * head_dim + d for g in groups for d in range(head_dim)])
    return q, kv


@torch.no_grad()
def prune_structures(model, plan: StructuredPlan):
    """
    Remove the structures `plan` drops, in place: smaller tensors and a config that says so. Returns `model`.

    The result computes exactly what `model` computes under [`attach_structured_masks`] with the same plan. Tied
    input/output embeddings stay tied. Removing a KV head removes its whole GQA group of query heads, so
    `num_attention_heads / num_key_value_heads` is unchanged.
    """
    blocks = _blocks(model)
    if plan.ffn is not None:
        _prune_ffn(model, blocks, plan.ffn)
    if plan.kv_groups is not None:
        _prune_kv_groups(model, blocks, plan.kv_groups)
    if plan.hidden is not None:
        _prune_hidden(model, blocks, plan.hidden)
    if plan.layers is not None:
        drop_layers(model, plan.layers)
    return model


def _prune_ffn(model, blocks: _Blocks, kept_neurons: list[list[int]]) -> None:
    """Keep FFN neurons `kept_neurons[layer]` (the same count in every layer) and set the config's FFN size."""
    sizes = {len(k) for k in kept_neurons}
    if len(sizes) != 1 or len(kept_neurons) != len(blocks.layers):
        raise StructuredPruningError("plan.ffn must keep the same number of neurons in every layer (one intermediate_size).")
    width = ffn_size(model)
    for layer, kept in zip(blocks.layers, kept_neurons):
        idx = torch.tensor(kept)
        for lin, parts in _ffn_in(blocks, layer):  # a fused gate|up keeps neuron j's row in each half
            _slice_linear(lin, 0, torch.cat([idx + p * width for p in range(parts)]))
        _slice_linear(_ffn_out(blocks, layer), 1, idx)
    setattr(model.config, blocks.family.ffn_size, sizes.pop())


def _prune_kv_groups(model, blocks: _Blocks, kv_groups: list[list[int]]) -> None:
    """Keep KV groups `kv_groups[layer]` (each with all its query heads, the same count in every layer) and set the
    head counts, in the config and where attention modules cached them."""
    cfg = model.config
    n_q, n_kv, head_dim = _head_dims(model)
    sizes = {len(k) for k in kv_groups}
    if len(sizes) != 1 or len(kv_groups) != len(blocks.layers):
        raise StructuredPruningError("plan.kv_groups must keep the same number of KV heads in every layer.")
    for layer, groups in zip(blocks.layers, kv_groups):
        q_idx, kv_idx = _head_index(groups, n_q, n_kv, head_dim)
        if blocks.family.attn_in:
            q, k, v = (_at(layer, p) for p in blocks.family.attn_in)
            _slice_linear(q, 0, q_idx)
            _slice_linear(k, 0, kv_idx)
            _slice_linear(v, 0, kv_idx)
        else:  # one fused q|k|v projection: its layout from `FUSED_PROJECTIONS`
            parts = {k: torch.tensor(v) for k, v in fused_parts(blocks.family.qkv.split(".")[-1], cfg).items()}
            fused = torch.cat([parts["q"][q_idx], parts["k"][kv_idx], parts["v"][kv_idx]])
            _slice_linear(_at(layer, blocks.family.qkv), 0, fused)
        _slice_linear(_attn_out(blocks, layer), 1, q_idx)
        if blocks.family.qk_norm == "full":  # OLMo-2: one norm over all heads' rows
            q_norm, k_norm = _qk_norms(blocks, layer)
            _slice_vector(q_norm, "weight", q_idx)
            _slice_vector(k_norm, "weight", kv_idx)
    kept = sizes.pop()
    for layer in blocks.layers:  # head counts some attention modules cache from the config at init (Phi-3)
        for module in layer.modules():
            for name, value in (("num_key_value_heads", kept), ("num_heads", kept * (n_q // n_kv))):
                if isinstance(getattr(module, name, None), int):
                    setattr(module, name, value)
    cfg.head_dim = head_dim  # explicit: hidden_size / heads no longer gives it
    cfg.num_key_value_heads = kept
    cfg.num_attention_heads = kept * (n_q // n_kv)


def _prune_hidden(model, blocks: _Blocks, kept_channels: list[int]) -> None:
    """Keep hidden channels `kept_channels` everywhere the residual stream is read or written (embeddings, norms,
    blocks, heads), keep tied embeddings tied and the stream's scale unchanged, and set `hidden_size`."""
    cfg = model.config
    _, _, head_dim = _head_dims(model)
    cfg.head_dim = head_dim
    fam = blocks.family
    idx = torch.tensor(kept_channels)
    old, new = cfg.hidden_size, len(idx)
    emb = model.get_input_embeddings()
    out_emb = model.get_output_embeddings()
    tied = out_emb is not None and out_emb.weight is emb.weight
    heads = [h for h in _task_heads(model, old) if h is not out_emb]
    weight = emb.weight.data.index_select(1, idx.to(emb.weight.device))
    # Gemma multiplies the embeddings by sqrt(hidden_size), a buffer rebuilt from the config on load: fold
    # sqrt(old / new) into the embedding weights so the stream keeps its scale, in memory and after a reload.
    ratio = (old**0.5 / new**0.5) if fam.embed_scale else 1.0
    emb.weight = nn.Parameter((weight * ratio).clone(), requires_grad=emb.weight.requires_grad)
    emb.embedding_dim = new
    if fam.embed_scale:
        emb.embed_scale.copy_(torch.tensor(new**0.5))
        emb.scalar_embed_scale = new**0.5
    if out_emb is not None:
        if tied:
            out_emb.weight = emb.weight
            out_emb.in_features = new
        else:
            _slice_linear(out_emb, 1, idx)
    for lin in _hidden_readers(blocks) + heads:
        _slice_linear(lin, 1, idx)
    for lin in _hidden_writers(blocks):
        _slice_linear(lin, 0, idx)
    norms = _hidden_norms(blocks, model)
    for norm in norms:
        _slice_vector(norm, "weight", idx)
        _slice_vector(norm, "bias", idx)
    if tied and ratio != 1.0 and norms:
        # The tied output embeddings grew by `ratio` too: the final norm (the head's only input) shrinks by it.
        _scale_norm(norms[-1], fam.norm, 1.0 / ratio)
    cfg.hidden_size = new


def drop_layers(model, keep_layers: list[int]):
    """Keep only the blocks `keep_layers` (in place), renumbering their `layer_idx` and the config's per-layer lists.

    Works on any model: a family structured pruning lists gives its block list; any other model, its one
    `nn.ModuleList` of `config.num_hidden_layers` modules (what a layer-dropped distillation student needs).
    """
    try:
        layers = _blocks(model).layers
    except StructuredPruningError:
        n = model.config.num_hidden_layers
        layers = next((m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == n), None)
        if layers is None:
            raise StructuredPruningError(
                f"Cannot find the {n} transformer layers of `{type(model).__name__}` to drop some of them."
            ) from None
    n = len(layers)
    if not keep_layers or any(not 0 <= i < n for i in keep_layers) or len(set(keep_layers)) != len(keep_layers):
        raise StructuredPruningError(f"keep_layers must be distinct layer indices in [0, {n}), got {keep_layers}.")
    keep_layers = sorted(keep_layers)
    kept = [layers[i] for i in keep_layers]
    for new_idx, layer in enumerate(kept):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx  # KV-cache slot of decoder layers
    layers._modules.clear()
    for i, layer in enumerate(kept):
        layers.add_module(str(i), layer)
    cfg = model.config
    for name in ("layer_types", "sliding_window_pattern_list", "mlp_only_layers"):
        value = getattr(cfg, name, None)
        if isinstance(value, (list, tuple)) and len(value) == n:
            setattr(cfg, name, [value[i] for i in keep_layers])
    cfg.num_hidden_layers = len(kept)
    return model


# ---- masks: the same computation at full shape ----------------------------------------------------------------


def _skip_hook(module, args, kwargs, output):
    x = args[0] if args else kwargs["hidden_states"]
    if isinstance(output, tuple):
        return (x,) + tuple(output[1:])
    return x


def _masked_skip_hook(module, args, kwargs, output):
    keep = module.hf_compress_layer_keep
    if bool(keep.item()):
        return output
    return _skip_hook(module, args, kwargs, output)


def _pre_mask(buffer: str):
    def hook(module, args):
        return (args[0] * getattr(module, buffer),) + tuple(args[1:])
    return hook


def _post_mask(module, args, output):
    return output * module.hf_compress_channel_mask


def masked_norm(x: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, kind: str,
                eps: float) -> torch.Tensor:
    """
    What a norm computes on only the channels `mask` keeps (zero elsewhere): its statistics are taken over them.

    Args:
        kind (`str`): `rms` (`w * x / rms(x)`), `rms_1p` (Gemma: `(1 + w) * x / rms(x)`) or `mean` (LayerNorm:
            `w * (x - mean) / std + b`).
    """
    dtype = x.dtype
    x = x.float()
    m = mask.float()
    n = m.sum()
    if kind == "mean":
        mu = (x * m).sum(-1, keepdim=True) / n
        var = (((x - mu) * m) ** 2).sum(-1, keepdim=True) / n
        y = (x - mu) * torch.rsqrt(var + eps) * weight.float()
        y = y + (bias.float() if bias is not None else 0)
    else:
        var = (x * x * m).sum(-1, keepdim=True) / n
        y = x * torch.rsqrt(var + eps)
        y = y * (1.0 + weight.float()) if kind == "rms_1p" else weight.float() * y.to(dtype)
    return (y * m).to(dtype)


def _norm_eps(module) -> float:
    for name in ("variance_epsilon", "eps", "epsilon"):
        value = getattr(module, name, None)
        if isinstance(value, float):
            return value
    raise StructuredPruningError(f"cannot find the epsilon of `{type(module).__name__}`; structured pruning refuses it.")


def _masked_norm_hook(kind: str, buffer: str = "hf_compress_channel_mask"):
    def hook(module, args, output):
        return masked_norm(args[0], getattr(module, buffer), module.weight, getattr(module, "bias", None), kind,
                           _norm_eps(module)).to(output.dtype)
    return hook


def _set_buffer(module: nn.Module, name: str, value: torch.Tensor):
    value = value.to(module.weight.device if hasattr(module, "weight") else value.device)
    if name in module._buffers:
        module._buffers[name].copy_(value)
    else:
        module.register_buffer(name, value, persistent=False)  # never saved: the checkpoint stays ordinary


def plan_masks(model, plan: StructuredPlan) -> dict[str, list[torch.Tensor] | torch.Tensor]:
    """0/1 masks at full shape for `plan`: `ffn` (per layer, intermediate_size), `heads` (per layer, q heads x
    head_dim), `hidden` (hidden_size), `layers` (num_hidden_layers)."""
    blocks = _blocks(model)
    cfg = model.config
    L = len(blocks.layers)
    masks: dict = {}
    if plan.ffn is not None:
        masks["ffn"] = []
        for kept in plan.ffn:
            m = torch.zeros(ffn_size(model))
            m[kept] = 1
            masks["ffn"].append(m)
    if plan.kv_groups is not None:
        n_q, n_kv, hd = _head_dims(model)
        masks["heads"] = []
        for groups in plan.kv_groups:
            m = torch.zeros(n_q * hd)
            m[_head_index(groups, n_q, n_kv, hd)[0]] = 1
            masks["heads"].append(m)
    if plan.hidden is not None:
        m = torch.zeros(cfg.hidden_size)
        m[plan.hidden] = 1
        masks["hidden"] = m
    if plan.layers is not None:
        m = torch.zeros(L)
        m[plan.layers] = 1
        masks["layers"] = m
    return masks


def attach_structured_masks(model, masks: dict) -> None:
    """
    Make `model` compute what the pruned model computes, at full shape: zero the dropped FFN neurons (input of the
    down projection) and heads (input of the output projection), skip the dropped blocks, and keep the dropped
    hidden channels at zero in the residual stream with each norm's statistics over the kept channels only.

    Masks are non-persistent buffers on the modules they act on; calling it again updates them in place (what the
    gradual callback does). `masks` as from [`plan_masks`]. Undo with [`remove_structured_masks`].
    """
    blocks = _blocks(model)
    hooks = getattr(model, _MASK_HOOKS, None)
    first = hooks is None
    if first:
        hooks = []
        object.__setattr__(model, _MASK_HOOKS, hooks)
    for i, layer in enumerate(blocks.layers):
        if "ffn" in masks:
            mod = _ffn_out(blocks, layer)
            new = "hf_compress_ffn_mask" not in mod._buffers
            _set_buffer(mod, "hf_compress_ffn_mask", masks["ffn"][i])
            if new:
                hooks.append(mod.register_forward_pre_hook(_pre_mask("hf_compress_ffn_mask")))
        if "heads" in masks:
            mod = _attn_out(blocks, layer)
            new = "hf_compress_head_mask" not in mod._buffers
            _set_buffer(mod, "hf_compress_head_mask", masks["heads"][i])
            if new:
                hooks.append(mod.register_forward_pre_hook(_pre_mask("hf_compress_head_mask")))
            if blocks.family.qk_norm == "full":
                # OLMo-2's q/k norms span all heads: the pruned one takes its statistics over the kept heads only.
                n_q, n_kv, hd = _head_dims(model)
                q_mask = masks["heads"][i]
                kv_mask = q_mask.reshape(n_kv, n_q // n_kv, hd)[:, 0, :].reshape(-1)
                for norm, m in zip(_qk_norms(blocks, layer), (q_mask, kv_mask)):
                    new = "hf_compress_qk_mask" not in norm._buffers
                    _set_buffer(norm, "hf_compress_qk_mask", m)
                    if new:
                        hooks.append(norm.register_forward_hook(_masked_norm_hook(blocks.family.norm, "hf_compress_qk_mask")))
        if "layers" in masks:
            new = "hf_compress_layer_keep" not in layer._buffers
            _set_buffer(layer, "hf_compress_layer_keep", masks["layers"][i].reshape(()))
            if new:
                hooks.append(layer.register_forward_hook(_masked_skip_hook, with_kwargs=True))
    if "hidden" in masks:
        m = masks["hidden"]
        emb = model.get_input_embeddings()
        for mod in [emb] + _hidden_writers(blocks):
            new = "hf_compress_channel_mask" not in mod._buffers
            _set_buffer(mod, "hf_compress_channel_mask", m)
            if new:
                hooks.append(mod.register_forward_hook(_post_mask))
        for norm in _hidden_norms(blocks, model):
            new = "hf_compress_channel_mask" not in norm._buffers
            _set_buffer(norm, "hf_compress_channel_mask", m)
            if new:
                hooks.append(norm.register_forward_hook(_masked_norm_hook(blocks.family.norm)))


def remove_structured_masks(model) -> None:
    """Remove the hooks and mask buffers of [`attach_structured_masks`]."""
    for h in getattr(model, _MASK_HOOKS, []) or []:
        h.remove()
    if hasattr(model, _MASK_HOOKS):
        object.__delattr__(model, _MASK_HOOKS)
    for module in model.modules():
        for name in [b for b in module._buffers if b.startswith("hf_compress_") and b.endswith(("_mask", "_keep"))]:
            del module._buffers[name]


# ---- parameter budgets ----------------------------------------------------------------------------------------


def pruned_config(model, keep: dict):
    """The config the model would have after keeping `keep` (see [`select_structures`]), without touching weights."""
    import copy

    blocks = _blocks(model)
    cfg = copy.deepcopy(model.config)
    if "ffn" in keep:
        setattr(cfg, blocks.family.ffn_size, _count(keep["ffn"], ffn_size(model), "FFN neurons"))
    if "heads" in keep:
        n_q, n_kv, hd = _head_dims(model)
        k = _count(keep["heads"], n_kv, "KV head groups")
        cfg.head_dim, cfg.num_key_value_heads, cfg.num_attention_heads = hd, k, k * (n_q // n_kv)
    if "hidden" in keep:
        cfg.head_dim = _head_dims(model)[2]
        cfg.hidden_size = _hidden_count(model, keep)
    if "layers" in keep:
        n = _count(keep["layers"], len(blocks.layers), "layers")
        if isinstance(getattr(cfg, "layer_types", None), list):
            cfg.layer_types = cfg.layer_types[:n]
        cfg.num_hidden_layers = n
    return cfg


def count_parameters(model_class, config) -> int:
    """Parameters of `model_class(config)` (tied weights once), built on the meta device (no memory, no init)."""
    with torch.device("meta"):
        m = model_class(config)
    return sum(p.numel() for p in m.parameters())


def keep_for_parameter_budget(model, structures, target_params: int) -> dict:
    """One kept fraction `r` for every structure in `structures` (layers and widths alike), the largest whose pruned
    model has at most `target_params` parameters. Returns the `keep` dict for [`select_structures`]."""
    structures = check_structures(model, structures)
    total = count_parameters(type(model), model.config)
    if isinstance(target_params, bool) or not isinstance(target_params, int) or target_params <= 0:
        raise StructuredPruningError(f"target_params must be a positive integer, got {target_params!r}.")
    if target_params >= total:
        raise StructuredPruningError(f"target_params={target_params:,} is not below the model's {total:,} parameters; ask for fewer.")

    def size(r):
        keep = {s: max(r, 1e-9) for s in structures}
        try:
            return count_parameters(type(model), pruned_config(model, keep))
        except StructuredPruningError:
            return None

    lo, hi = 0.0, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        n = size(mid)
        if n is not None and n <= target_params:
            lo = mid
        else:
            hi = mid
    if lo == 0.0 or size(lo) is None:
        raise StructuredPruningError(
            f"target_params={target_params:,} cannot be reached by pruning {','.join(structures)}; "
            "add structures or ask for more parameters."
        )
    return {s: lo for s in structures}


def structured_prune(model, structures, keep: dict | None = None, batches=None, target_params: int | None = None,
                     layer_metric: str = "cosine") -> StructuredPlan:
    """
    One shot: score (activations on `batches`, else magnitudes), select, and physically prune `model` in place.

    Args:
        model: the model to prune (in place; `copy.deepcopy` it first to keep the original, e.g. as a teacher).
        structures (`str` or `list[str]`): e.g. `"ffn,heads,layers"`.
        keep (`dict`, *optional*): per structure, a kept fraction (float) or count (int > 1).
        batches (*optional*): calibration batches.
        target_params (`int`, *optional*): instead of `keep`, one kept fraction for all `structures` chosen so that
            the model has at most this many parameters.
        layer_metric (`str`): see [`structured_importance`].

    Returns:
        The [`StructuredPlan`] applied, with its importance scores.
    """
    structures = check_structures(model, structures)
    if (keep is None) == (target_params is None):
        raise StructuredPruningError("pass exactly one of `keep` (kept fraction per structure) and `target_params`.")
    batches = None if batches is None else list(batches)  # read twice: importance, then the self-check
    if keep is None:
        keep = keep_for_parameter_budget(model, structures, target_params)
    missing = [s for s in structures if s not in keep]
    if missing or set(keep) - set(structures):
        raise StructuredPruningError(f"keep must name exactly the structures {structures}, got {sorted(keep)}.")
    scores = structured_importance(model, batches, structures, layer_metric)
    plan = select_structures(model, scores, keep)
    cut_and_check(model, plan, check_batch(model, batches))
    return plan


# ---- the self-check: pruned == masked, and the same after a reload --------------------------------------------


def check_structured_cut(model, batch: dict, expected: torch.Tensor, tolerance: float | None = None,
                         reload: bool = True) -> dict:
    r"""
    Check a physically pruned `model` against the logits `expected` of the masked model, then the same after
    `save_pretrained` / `from_pretrained` (in a temporary folder, deleted afterwards).

    Args:
        model: the pruned model.
        batch (`dict`): model inputs (padded positions, by `attention_mask`, are not compared).
        expected (`torch.Tensor`): the masked model's logits on `batch` (as [`~hf_compress.pruning.self_check.logits_on`] returns them).
        tolerance (`float`, *optional*): largest `max |logits - expected| / max |expected|`; defaults to
            [`~hf_compress.pruning.self_check.tolerance_for`] the model's dtype.
        reload (`bool`, *optional*, defaults to `True`): also check the reloaded checkpoint.

    Returns:
        `dict` with `logit_scale`, `tolerance`, `pruned_vs_masked` and `reloaded_vs_masked` (relative max diffs).

    Raises:
        [`StructuredSelfCheckError`] (a [`StructuredPruningError`]): when a figure is beyond the tolerance (one line: the model type and the figures).
    """
    reload = reload_pretrained if reload else None
    figures = compare(model, batch, expected, "pruned", "masked", tolerance, reload)
    return raise_if_beyond(figures, model, "structured pruning",
                           "Please report this model type; use unstructured pruning for it meanwhile.",
                           error=StructuredSelfCheckError)


def cut_and_check(model, plan: StructuredPlan, batch: dict, reload: bool = True) -> dict:
    """Run the masked model on `batch`, cut `model` to `plan` in place, and [`check_structured_cut`] it. The figures
    are stored in `plan.check` (and so in `plan.to_dict()`, the stage record)."""
    remove_structured_masks(model)
    attach_structured_masks(model, plan_masks(model, plan))
    try:
        expected = logits_on(model, batch)
    finally:
        remove_structured_masks(model)
    prune_structures(model, plan)
    plan.check = check_structured_cut(model, batch, expected, reload=reload)
    return plan.check
