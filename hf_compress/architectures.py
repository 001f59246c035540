"""Architecture knowledge in one place: what each model family looks like to the compression techniques.

Structured pruning, unstructured pruning, QAT and the exports ask this module where a family keeps its blocks,
norms, embedding scale, fused projections, Conv1D layers and task heads, and what it cannot express, instead of
switching on model types themselves. A family that is not listed here is refused in one line before any work.
"""

from __future__ import annotations

from dataclasses import dataclass

# ---- families: blocks, norms, embeddings, heads (structured pruning) ------------------------------------------


# ---- fused projections and Conv1D layers (unstructured pruning, QAT, exports) ---------------------------------
#
# Unstructured pruning and quantization see a model as a list of weight matrices. Three things in a family change
# what "one matrix" means:
# - `transformers.pytorch_utils.Conv1D` (GPT-2) stores its weight as [in, out], the transpose of `nn.Linear`, so the
#   input (reduction) axis is 0, not 1;
# - a fused projection holds several matrices side by side along its output axis (q, k and v in one `qkv_proj`,
#   gate and up in one `gate_up_proj`); each part is pruned to the target on its own;
# - a mixture of experts keeps all experts in one 3-D parameter [experts, out, in].
# `weight_layout(model, name)` answers all three for one parameter; the table below is where each family's fused
# layouts come from (read from transformers' modeling code: the `split` / `chunk` / `view` in each forward).

# Stacked (3-D) expert parameters: the model types whose layout is listed, `<leaf module>.<parameter>` -> fused
# parts along dim 1 of each expert's [out, in] matrix (sizes from the config). transformers 5 Qwen3MoeExperts:
# `linear(x, gate_up_proj[e]).chunk(2, dim=-1)` then `linear(h, down_proj[e])`.
EXPERT_PARAMETERS = {
    "qwen3_moe": {
        "experts.gate_up_proj": lambda c: [("gate", c.moe_intermediate_size), ("up", c.moe_intermediate_size)],
        "experts.down_proj": lambda c: [("", c.hidden_size)],
    },
}

# Fused projections: (model type, leaf module name) -> (kind, parts). `concat`: the parts one after the other along
# the output axis; `per_head`: the parts repeat for every head ([h0_q, h0_k, h0_v, h1_q, ...]).
#   phi3 `qkv_proj`: qkv[..., :q], [q : q + kv], [q + kv :], with q = n_heads * head_dim, kv = n_kv * head_dim;
#   phi3 `gate_up_proj`: `.chunk(2, dim=-1)` -> gate, up;
#   gpt2 `c_attn`: `.split(embed_dim, dim=2)` -> q, k, v (Conv1D: along its output columns);
#   gpt_neox `query_key_value`: `.view(..., -1, 3 * head_size)` then `.chunk(3, dim=-1)`: per head q, k, v.
FUSED_PROJECTIONS = {
    ("phi3", "qkv_proj"): lambda c: ("concat", [
        ("q", c.num_attention_heads * _head_dim(c)),
        ("k", _num_kv_heads(c) * _head_dim(c)),
        ("v", _num_kv_heads(c) * _head_dim(c)),
    ]),
    ("phi3", "gate_up_proj"): lambda c: ("concat", [("gate", c.intermediate_size), ("up", c.intermediate_size)]),
    ("gpt2", "c_attn"): lambda c: ("concat", [("q", c.n_embd), ("k", c.n_embd), ("v", c.n_embd)]),
    ("gpt_neox", "query_key_value"): lambda c: ("per_head", [("q", _head_dim(c)), ("k", _head_dim(c)), ("v", _head_dim(c))]),
}

# Module names that are fused projections in the families that use them (Falcon and BLOOM `query_key_value`, MPT and
# Phi-1 `Wqkv`, Baichuan `W_pack`, ...): in a model type not listed in `FUSED_PROJECTIONS` their layout is unknown,
# so they are refused rather than pruned as one matrix.
FUSED_NAMES = ("qkv_proj", "gate_up_proj", "c_attn", "query_key_value", "Wqkv", "W_pack", "qkv")


def _head_dim(config) -> int:
    head_dim = getattr(config, "head_dim", None)
    return head_dim or config.hidden_size // config.num_attention_heads


def _num_kv_heads(config) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def is_conv1d(module) -> bool:
    """Whether `module` is transformers' `Conv1D` (GPT-2's projections: weight stored as [in, out])."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


@dataclass(frozen=True)
class WeightLayout:
    """
    How one prunable weight is laid out.

    Args:
        in_dim (`int`): The axis of the input features, which the layer's product reduces over: 1 for an
            `nn.Linear` weight [out, in], 0 for a `Conv1D` weight [in, out], 2 for stacked experts [experts, out, in].
            N:M groups run along it.
        parts (`tuple[tuple[str, tuple], ...]`): `(name, index)` pairs; `weight[index]` are the entries of that part
            and the parts cover every entry exactly once. One part `("", (...,))` for a plain matrix; `q`, `k`, `v`
            (or `gate`, `up`) for a fused projection; `expert.<e>[.<part>]` for stacked experts.
    """

    in_dim: int
    parts: tuple[tuple[str, tuple], ...]

    @property
    def fused(self) -> bool:
        return len(self.parts) > 1


# The layout of a plain (not fused) weight: one part, all of it.
WHOLE = (("", (Ellipsis,)),)


def _output_indices(kind: str, sizes: list[tuple[str, int]], out_features: int) -> list[tuple[str, object]]:
    """(part, index along the output axis) for a fused projection of `out_features` outputs."""
    if kind == "concat":
        if sum(s for _, s in sizes) != out_features:
            raise ValueError(
                f"the fused parts {sizes} add up to {sum(s for _, s in sizes)} outputs, not {out_features}; "
                "the config does not describe this weight."
            )
        out, start = [], 0
        for name, size in sizes:
            out.append((name, slice(start, start + size)))
            start += size
        return out
    import torch

    per_head = sum(s for _, s in sizes)
    if out_features % per_head:
        raise ValueError(f"{out_features} outputs are not a whole number of heads of {per_head}.")
    heads = torch.arange(out_features // per_head) * per_head
    out, offset = [], 0
    for name, size in sizes:
        rows = (heads[:, None] + offset + torch.arange(size)[None, :]).flatten()
        out.append((name, rows))
        offset += size
    return out


def weight_layout(model, name: str) -> WeightLayout:
    """
    The [`WeightLayout`] of the parameter `name` (dotted, as in `named_parameters`) of `model`.

    Raises:
        `ValueError`: for a stacked (3-D) expert parameter of a model type whose layout is not in
        `EXPERT_PARAMETERS`, or a module named like a fused projection (`FUSED_NAMES`) in a model type whose layout
        is not in `FUSED_PROJECTIONS`.
    """
    module_name, _, param = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    weight = getattr(module, param)
    parts_of = module_name.removesuffix(".base_layer").split(".")
    leaf = parts_of[-1] if parts_of else ""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if weight.ndim == 3:
        layouts = EXPERT_PARAMETERS.get(model_type, {})
        sizes_of = layouts.get(f"{leaf}.{param}")
        if sizes_of is None:
            raise ValueError(
                f"{name} is a stacked expert parameter of shape {tuple(weight.shape)} in a `{model_type}` model, whose "
                f"expert layout hf_compress does not know (known: {', '.join(sorted(EXPERT_PARAMETERS))}); leave it "
                "out with `target_modules`."
            )
        sizes = sizes_of(config)
        parts = []
        for e in range(weight.shape[0]):
            for part, index in _output_indices("concat", sizes, weight.shape[1]):
                parts.append((f"expert.{e}" + (f".{part}" if part else ""), (e, index)))
        return WeightLayout(in_dim=2, parts=tuple(parts))
    if weight.ndim != 2:
        return WeightLayout(in_dim=weight.ndim - 1, parts=WHOLE)
    conv1d = is_conv1d(module)
    in_dim, out_dim = (0, 1) if conv1d else (1, 0)
    fused = FUSED_PROJECTIONS.get((model_type, leaf)) if param == "weight" else None
    if fused is None and leaf in FUSED_NAMES:
        known = ", ".join(f"`{t}.{n}`" for t, n in FUSED_PROJECTIONS)
        raise ValueError(
            f"{name} looks like a fused projection (`{leaf}`) of a `{model_type}` model, whose layout hf_compress does "
            f"not know (known: {known}), so its parts cannot each be pruned to the target; leave it out with "
            "`target_modules`."
        )
    if fused is None:
        return WeightLayout(in_dim=in_dim, parts=WHOLE)
    kind, sizes = fused(config)
    parts = []
    for part, index in _output_indices(kind, sizes, weight.shape[out_dim]):
        parts.append((part, (index,) if out_dim == 0 else (slice(None), index)))
    return WeightLayout(in_dim=in_dim, parts=tuple(parts))


def weight_layouts(model, names) -> dict[str, WeightLayout]:
    """`{name: weight_layout(model, name)}` for every name in `names`."""
    return {name: weight_layout(model, name) for name in names}


# Model types whose block projections are `Conv1D` (compressed-tensors quantizes `nn.Linear` only).
CONV1D_MODEL_TYPES = ("gpt2",)


def compressed_tensors_refusal(model_type: str | None) -> str | None:
    """
    Why a compressed-tensors int export of a `model_type` model cannot be exact, or `None` when it can.

    compressed-tensors (0.20) quantizes `nn.Linear` layers only: GPT-2's `Conv1D` projections would stay in full
    precision (its export would quantize no block layer at all), and the stacked expert parameters of a mixture of
    experts are neither quantized nor reloaded by transformers from such a checkpoint (tested: `from_pretrained`
    stops with a conversion error on `experts.gate_up_proj`).
    """
    if model_type in CONV1D_MODEL_TYPES:
        return (
            f"The compressed-tensors export cannot quantize a `{model_type}` model: its block projections are "
            "`transformers.pytorch_utils.Conv1D`, which compressed-tensors does not quantize (only `nn.Linear`); "
            "use `--format bitsandbytes` (backend='bitsandbytes', which quantizes Conv1D) or `--no_quantize`."
        )
    if model_type in EXPERT_PARAMETERS:
        return (
            f"The compressed-tensors export cannot quantize a `{model_type}` model: its experts are stacked 3-D "
            "parameters, which compressed-tensors does not quantize and transformers cannot reload from its "
            "checkpoint; export it dense with `--no_quantize`."
        )
    return None


def check_compressed_tensors(model_or_config) -> None:
    """Raise the one-line `ValueError` of [`compressed_tensors_refusal`] for a model or a config."""
    config = getattr(model_or_config, "config", model_or_config)
    reason = compressed_tensors_refusal(getattr(config, "model_type", None))
    if reason is not None:
        raise ValueError(reason)
