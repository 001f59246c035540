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

Supported: Llama-style decoders (Llama, Qwen2/3, Mistral, SmolLM2: `self_attn.{q,k,v,o}_proj`, `mlp.{gate,up,down}_proj`,
RMSNorm) for `ffn`, `heads`, `hidden`, `layers`; BERT-style encoders (`attention.self`, `intermediate`, `output`) for
`ffn` and `layers`. BERT heads cannot be removed through the config: `BertConfig` derives the head size as
`hidden_size / num_attention_heads` and the attention output projection is `hidden_size x hidden_size`, so fewer
heads would mean wider heads, not fewer of them (transformers 5 also removed `prune_heads`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

STRUCTURES = ("ffn", "heads", "hidden", "layers")
_MASK_HOOKS = "_hf_compress_structured_hooks"


class StructuredPruningError(ValueError):
    """A structured-pruning request the model cannot express (one line, names the value and the fix)."""


# ---- the model's structure ------------------------------------------------------------------------------------


@dataclass
class _Blocks:
    kind: str  # "decoder" or "bert"
    base: nn.Module  # the module holding the embeddings and the layer list
    layers: nn.ModuleList


def _blocks(model) -> _Blocks:
    for base_name in ("model", "bert", "roberta", "transformer"):
        base = getattr(model, base_name, None)
        if base is None:
            continue
        layers = getattr(base, "layers", None)
        if isinstance(layers, nn.ModuleList) and len(layers) and _is_decoder_layer(layers[0]):
            return _Blocks("decoder", base, layers)
        encoder = getattr(base, "encoder", None)
        layers = getattr(encoder, "layer", None)
        if isinstance(layers, nn.ModuleList) and len(layers) and _is_bert_layer(layers[0]):
            return _Blocks("bert", base, layers)
    raise StructuredPruningError(
        f"structured pruning supports Llama-style decoders and BERT-style encoders, got `{type(model).__name__}`; "
        "use unstructured pruning (`GradualPruningCallback`) for other architectures."
    )


def _is_decoder_layer(layer) -> bool:
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    return all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")) and all(
        hasattr(mlp, n) for n in ("up_proj", "down_proj")
    )


def _is_bert_layer(layer) -> bool:
    return hasattr(layer, "intermediate") and hasattr(layer, "output") and hasattr(getattr(layer, "attention", None), "self")


def _ffn_in(blocks: _Blocks, layer) -> list[nn.Linear]:
    """Linear layers whose output rows are the FFN neurons."""
    if blocks.kind == "bert":
        return [layer.intermediate.dense]
    return [m for m in (getattr(layer.mlp, "gate_proj", None), layer.mlp.up_proj) if m is not None]


def _ffn_out(blocks: _Blocks, layer) -> nn.Linear:
    """The Linear layer whose input columns are the FFN neurons."""
    return layer.output.dense if blocks.kind == "bert" else layer.mlp.down_proj


def _head_dims(model) -> tuple[int, int, int]:
    """(query heads, KV heads, head_dim) of a decoder."""
    cfg = model.config
    n_q = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_q
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_q
    return n_q, n_kv, head_dim


def _hidden_norms(blocks: _Blocks, model) -> list[nn.Module]:
    """Every norm over the residual stream: each layer's norms of `hidden_size` weights, then the final one."""
    hidden = model.config.hidden_size
    norms = []
    for layer in blocks.layers:
        for name, m in layer.named_children():
            w = getattr(m, "weight", None)
            if "norm" in type(m).__name__.lower() and w is not None and w.dim() == 1 and w.numel() == hidden:
                norms.append(m)
    final = getattr(blocks.base, "norm", None)
    if final is not None:
        norms.append(final)
    return norms


def _hidden_writers(blocks: _Blocks) -> list[nn.Linear]:
    """Linear layers whose outputs are added to the residual stream."""
    return [m for layer in blocks.layers for m in (layer.self_attn.o_proj, layer.mlp.down_proj)]


def _hidden_readers(blocks: _Blocks) -> list[nn.Linear]:
    """Linear layers that read a normed residual stream."""
    out = []
    for layer in blocks.layers:
        out += [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]
        out += [m for m in (getattr(layer.mlp, "gate_proj", None), layer.mlp.up_proj) if m is not None]
    return out


def check_structures(model, structures) -> list[str]:
    """Validate `structures` (names from `STRUCTURES`) against `model`; returns them as a list."""
    if isinstance(structures, str):
        structures = [s.strip() for s in structures.split(",") if s.strip()]
    structures = list(structures)
    bad = [s for s in structures if s not in STRUCTURES]
    if bad or not structures:
        raise StructuredPruningError(
            f"prune_structure must be a comma-separated subset of {','.join(STRUCTURES)}, got {','.join(structures) or 'nothing'}."
        )
    blocks = _blocks(model)
    if blocks.kind == "bert":
        for s in ("heads", "hidden"):
            if s in structures:
                raise StructuredPruningError(
                    f"`{s}` pruning is not supported for BERT-style `{type(model).__name__}` "
                    + ("(BertConfig ties head size to hidden_size / num_attention_heads); " if s == "heads" else "(its LayerNorms, embeddings and pooler would all change width); ")
                    + "use ffn,layers."
                )
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


def _forward(model, batch):
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
    return model(**batch)


def _model_inputs(batch, labels: bool):
    keep = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
    out = {k: v for k, v in batch.items() if k in keep}
    if labels:
        lab = batch.get("labels", batch.get("label"))
        if lab is not None:
            out["labels"] = lab
    return out


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
    handles = []
    n_q = n_kv = head_dim = None
    if blocks.kind == "decoder":
        n_q, n_kv, head_dim = _head_dims(model)
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
                handles.append(layer.self_attn.o_proj.register_forward_pre_hook(head_hook))
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
        for batch in batches:
            current["w"] = _token_weights(batch)
            _forward(model, _model_inputs(batch, labels=False))
    finally:
        for h in handles:
            h.remove()
    L = len(blocks.layers)
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
    if "layers" in structures:
        if layer_metric == "cosine":
            scores["layers"] = torch.stack([mean(("layers", i))[0] for i in range(L)]).cpu()
        else:
            scores["layers"] = _skip_loss_importance(model, blocks, batches)
    model.train(was_training)
    return scores


def _mean_loss(model, batches) -> float:
    losses = []
    for batch in batches:
        inputs = _model_inputs(batch, labels=True)
        if "labels" not in inputs:
            if not hasattr(model, "lm_head"):
                raise StructuredPruningError("layer_metric='loss' needs `labels` in the calibration batches; add them or use 'cosine'.")
            inputs["labels"] = inputs["input_ids"]
        losses.append(_forward(model, inputs).loss.item())
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
                s = _ffn_out(blocks, layer).weight.float().norm(dim=0)
                for lin in _ffn_in(blocks, layer):
                    s = s * lin.weight.float().norm(dim=1)
                rows.append(s)
            scores["ffn"] = torch.stack(rows)
        if "heads" in structures:
            n_q, n_kv, hd = _head_dims(model)
            scores["heads"] = torch.stack([
                layer.self_attn.o_proj.weight.float().reshape(-1, n_kv, (n_q // n_kv) * hd).norm(dim=(0, 2))
                for layer in blocks.layers])
        if "hidden" in structures:
            scores["hidden"] = model.get_input_embeddings().weight.float().norm(dim=0)
        if "layers" in structures:
            scores["layers"] = torch.tensor([
                sum(m.weight.float().norm().item() for m in _block_outputs(blocks, layer)) for layer in blocks.layers])
    return scores


def _block_outputs(blocks, layer):
    if blocks.kind == "bert":
        return [layer.attention.output.dense, layer.output.dense]
    return [layer.self_attn.o_proj, layer.mlp.down_proj]


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

    def to_dict(self) -> dict:
        """JSON-safe summary plus the importance scores (for the compression report)."""
        out = {k: getattr(self, k) for k in ("ffn", "kv_groups", "hidden", "layers") if getattr(self, k) is not None}
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
    cfg = model.config
    if "ffn" in keep:
        k = _count(keep["ffn"], cfg.intermediate_size, "FFN neurons")
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


def _slice_linear(lin: nn.Linear, dim: int, idx: torch.Tensor) -> None:
    idx = idx.to(lin.weight.device)
    lin.weight = nn.Parameter(lin.weight.data.index_select(dim, idx).clone(), requires_grad=lin.weight.requires_grad)
    if dim == 0:
        lin.out_features = len(idx)
        if lin.bias is not None:
            lin.bias = nn.Parameter(lin.bias.data.index_select(0, idx).clone(), requires_grad=lin.bias.requires_grad)
    else:
        lin.in_features = len(idx)


def _slice_vector(module: nn.Module, name: str, idx: torch.Tensor) -> None:
    p = getattr(module, name, None)
    if p is not None:
        setattr(module, name, nn.Parameter(p.data.index_select(0, idx.to(p.device)).clone(), requires_grad=p.requires_grad))


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
    cfg = model.config
    if plan.ffn is not None:
        sizes = {len(k) for k in plan.ffn}
        if len(sizes) != 1 or len(plan.ffn) != len(blocks.layers):
            raise StructuredPruningError("plan.ffn must keep the same number of neurons in every layer (one intermediate_size).")
        for layer, kept in zip(blocks.layers, plan.ffn):
            idx = torch.tensor(kept)
            for lin in _ffn_in(blocks, layer):
                _slice_linear(lin, 0, idx)
            _slice_linear(_ffn_out(blocks, layer), 1, idx)
        cfg.intermediate_size = sizes.pop()
    if plan.kv_groups is not None:
        n_q, n_kv, head_dim = _head_dims(model)
        sizes = {len(k) for k in plan.kv_groups}
        if len(sizes) != 1 or len(plan.kv_groups) != len(blocks.layers):
            raise StructuredPruningError("plan.kv_groups must keep the same number of KV heads in every layer.")
        for layer, groups in zip(blocks.layers, plan.kv_groups):
            q_idx, kv_idx = _head_index(groups, n_q, n_kv, head_dim)
            attn = layer.self_attn
            _slice_linear(attn.q_proj, 0, q_idx)
            _slice_linear(attn.k_proj, 0, kv_idx)
            _slice_linear(attn.v_proj, 0, kv_idx)
            _slice_linear(attn.o_proj, 1, q_idx)
        kept = sizes.pop()
        cfg.head_dim = head_dim  # explicit: hidden_size / heads no longer gives it
        cfg.num_key_value_heads = kept
        cfg.num_attention_heads = kept * (n_q // n_kv)
    if plan.hidden is not None:
        _, _, head_dim = _head_dims(model)
        cfg.head_dim = head_dim
        idx = torch.tensor(plan.hidden)
        emb = model.get_input_embeddings()
        out_emb = model.get_output_embeddings()
        tied = out_emb is not None and out_emb.weight is emb.weight
        emb.weight = nn.Parameter(emb.weight.data.index_select(1, idx.to(emb.weight.device)).clone())
        emb.embedding_dim = len(idx)
        if out_emb is not None:
            if tied:
                out_emb.weight = emb.weight
                out_emb.in_features = len(idx)
            else:
                _slice_linear(out_emb, 1, idx)
        for lin in _hidden_readers(blocks):
            _slice_linear(lin, 1, idx)
        for lin in _hidden_writers(blocks):
            _slice_linear(lin, 0, idx)
        for norm in _hidden_norms(blocks, model):
            _slice_vector(norm, "weight", idx)
            _slice_vector(norm, "bias", idx)
        cfg.hidden_size = len(idx)
    if plan.layers is not None:
        drop_layers(model, plan.layers)
    return model


def drop_layers(model, keep_layers: list[int]):
    """Keep only the blocks `keep_layers` (in place), renumbering their `layer_idx` and the config's per-layer lists."""
    blocks = _blocks(model)
    n = len(blocks.layers)
    if not keep_layers or any(not 0 <= i < n for i in keep_layers) or len(set(keep_layers)) != len(keep_layers):
        raise StructuredPruningError(f"keep_layers must be distinct layer indices in [0, {n}), got {keep_layers}.")
    keep_layers = sorted(keep_layers)
    kept = [blocks.layers[i] for i in keep_layers]
    for new_idx, layer in enumerate(kept):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx  # KV-cache slot of decoder layers
    blocks.layers._modules.clear()
    for i, layer in enumerate(kept):
        blocks.layers.add_module(str(i), layer)
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


def _masked_norm(module, args, output):
    # The pruned model's norm sees only the kept channels: its statistics (mean of squares; mean for LayerNorm)
    # are taken over them. Recompute the norm with the dropped channels excluded from the statistics.
    x = args[0].float()
    m = module.hf_compress_channel_mask.float()
    n = m.sum()
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6))
    if isinstance(module, nn.LayerNorm):
        mu = (x * m).sum(-1, keepdim=True) / n
        var = (((x - mu) * m) ** 2).sum(-1, keepdim=True) / n
        y = (x - mu) * torch.rsqrt(var + eps) * module.weight + (module.bias if module.bias is not None else 0)
    else:
        var = (x * x * m).sum(-1, keepdim=True) / n
        y = module.weight * (x * torch.rsqrt(var + eps)).to(args[0].dtype)
    return (y * m).to(output.dtype)


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
            m = torch.zeros(cfg.intermediate_size)
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
            mod = layer.self_attn.o_proj
            new = "hf_compress_head_mask" not in mod._buffers
            _set_buffer(mod, "hf_compress_head_mask", masks["heads"][i])
            if new:
                hooks.append(mod.register_forward_pre_hook(_pre_mask("hf_compress_head_mask")))
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
                hooks.append(norm.register_forward_hook(_masked_norm))


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
        cfg.intermediate_size = _count(keep["ffn"], cfg.intermediate_size, "FFN neurons")
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
    if keep is None:
        keep = keep_for_parameter_budget(model, structures, target_params)
    missing = [s for s in structures if s not in keep]
    if missing or set(keep) - set(structures):
        raise StructuredPruningError(f"keep must name exactly the structures {structures}, got {sorted(keep)}.")
    scores = structured_importance(model, batches, structures, layer_metric)
    plan = select_structures(model, scores, keep)
    prune_structures(model, plan)
    return plan
