"""Architecture knowledge in one place: what each model family looks like to the compression techniques.

Structured pruning, unstructured pruning, QAT and the exports ask this module where a family keeps its blocks,
norms, embedding scale, fused projections, Conv1D layers and task heads, and what it cannot express, instead of
switching on model types themselves. A family that is not listed here is refused in one line before any work.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# ---- families: blocks, norms, embeddings, heads (structured pruning) ------------------------------------------


STRUCTURES = ("ffn", "heads", "hidden", "layers")

# Task heads that read the (final-normed) hidden stream, as attributes of the task model.
HEAD_MODULES = ("lm_head", "score", "classifier", "qa_outputs")

class StructuredPruningError(ValueError):
    """A structured-pruning request the model cannot express (one line, names the value and the fix)."""


@dataclass(frozen=True)
class Family:
    """Where a family keeps what structured pruning touches. Paths are dotted attribute names: `layers` and
    `final_norm` under the base model, the others under one block.

    Attributes:
        layers: the block list. attn_in: q, k, v projections (empty: fused `qkv`). qkv: a fused projection
        (see `FUSED_PROJECTIONS`). attn_out: the attention output projection. ffn_in: projections whose output rows
        are the FFN neurons; ffn_fused: one projection holding gate and up rows; ffn_out: the FFN down projection.
        ffn_size: the config field of the FFN width. norm: `rms` (`w * x / rms(x)`), `rms_1p` (Gemma,
        `(1 + w) * x / rms(x)`) or `mean` (LayerNorm: mean-centred, optional bias). block_norms: the norms over the
        residual stream inside a block (input or output side); final_norm: the last one. qk_norm: `per_head`
        (over head_dim: untouched by any cut), `full` (over all heads' rows: sliced with the heads, statistics
        follow the kept heads) or `None`. embed_scale: the embedding output is multiplied by sqrt(hidden_size),
        rebuilt from the config on load. conv1d: GPT-2 `Conv1D` (weight stored in x out). parallel: attention and
        FFN read the same input (no sequential residual between them). refused: structure -> why it cannot be
        expressed exactly in this family's config.
    """

    layers: str
    attn_out: str
    ffn_out: str
    norm: str
    block_norms: tuple[str, ...]
    final_norm: str | None
    attn_in: tuple[str, ...] = ()
    qkv: str | None = None
    ffn_in: tuple[str, ...] = ()
    ffn_fused: str | None = None
    ffn_size: str = "intermediate_size"
    qk_norm: str | None = None
    qk_norms: tuple[str, ...] = ("self_attn.q_norm", "self_attn.k_norm")
    embed_scale: bool = False
    conv1d: bool = False
    parallel: bool = False
    refused: dict = field(default_factory=dict)


_LLAMA_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_LLAMA = dict(layers="layers", attn_in=_LLAMA_ATTN, attn_out="self_attn.o_proj",
              ffn_in=("mlp.gate_proj", "mlp.up_proj"), ffn_out="mlp.down_proj", final_norm="norm")
_BERT = dict(layers="encoder.layer", attn_in=("attention.self.query", "attention.self.key", "attention.self.value"),
             attn_out="attention.output.dense", ffn_in=("intermediate.dense",), ffn_out="output.dense", norm="mean",
             block_norms=("attention.output.LayerNorm", "output.LayerNorm"), final_norm=None)
_BERT_REFUSED = {
    "heads": "its config ties the head size to hidden_size / num_attention_heads, so fewer heads would be wider heads",
    "hidden": "its LayerNorms, embeddings, position embeddings and pooler would all change width",
}
_HEAD_DIM_FIXED = "its attention derives head_dim as hidden_size / num_attention_heads (no `head_dim` in the config)"

FAMILIES: dict[str, Family] = {
    **{t: Family(**_LLAMA, norm="rms", block_norms=("input_layernorm", "post_attention_layernorm"))
       for t in ("llama", "mistral", "qwen2")},
    "qwen3": Family(**_LLAMA, norm="rms", block_norms=("input_layernorm", "post_attention_layernorm"), qk_norm="per_head"),
    "gemma2": Family(**_LLAMA, norm="rms_1p", embed_scale=True, block_norms=(
        "input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")),
    "gemma3_text": Family(**_LLAMA, norm="rms_1p", embed_scale=True, qk_norm="per_head", block_norms=(
        "input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")),
    "olmo2": Family(**_LLAMA, norm="rms", qk_norm="full", block_norms=("post_attention_layernorm", "post_feedforward_layernorm")),
    "cohere": Family(**_LLAMA, norm="mean", parallel=True, block_norms=("input_layernorm",)),
    "phi3": Family(layers="layers", qkv="self_attn.qkv_proj", attn_out="self_attn.o_proj", ffn_fused="mlp.gate_up_proj",
                   ffn_out="mlp.down_proj", norm="rms", block_norms=("input_layernorm", "post_attention_layernorm"),
                   final_norm="norm"),
    "stablelm": Family(**_LLAMA, norm="mean", block_norms=("input_layernorm", "post_attention_layernorm"),
                       refused={"heads": _HEAD_DIM_FIXED, "hidden": _HEAD_DIM_FIXED}),
    "gpt2": Family(layers="h", qkv="attn.c_attn", attn_out="attn.c_proj", ffn_in=("mlp.c_fc",), ffn_out="mlp.c_proj",
                   ffn_size="n_inner", norm="mean", block_norms=("ln_1", "ln_2"), final_norm="ln_f", conv1d=True,
                   refused={"heads": _HEAD_DIM_FIXED, "hidden": _HEAD_DIM_FIXED + " and its position embeddings `wpe`"}),
    "gpt_neox": Family(layers="layers", qkv="attention.query_key_value", attn_out="attention.dense",
                       ffn_in=("mlp.dense_h_to_4h",), ffn_out="mlp.dense_4h_to_h", norm="mean",
                       block_norms=("input_layernorm", "post_attention_layernorm"), final_norm="final_layer_norm",
                       parallel=True, refused={"heads": _HEAD_DIM_FIXED, "hidden": _HEAD_DIM_FIXED}),
    "bert": Family(**_BERT, refused=_BERT_REFUSED),
    "roberta": Family(**_BERT, refused=_BERT_REFUSED),
    "deberta-v2": Family(**_BERT, refused={
        "heads": "its relative-position projections share the key and query projections across heads",
        "hidden": _BERT_REFUSED["hidden"] + ", and the relative-position embeddings"}),
}


def family_of(config) -> Family:
    """The [`Family`] of a config's `model_type`; [`StructuredPruningError`] (one line) if the family is not listed."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise StructuredPruningError(
            f"structured pruning does not know the model type `{model_type}`; supported: {', '.join(sorted(FAMILIES))}. "
            "Use unstructured pruning (`--target_sparsity`) for it."
        )
    return FAMILIES[model_type]


def structured_refusals(config) -> dict[str, str]:
    """Structure -> why this config cannot express it exactly (the family's refusals plus config-dependent ones)."""
    fam = family_of(config)
    out = dict(fam.refused)
    if getattr(config, "use_qk_norm", False):  # Cohere's optional q/k LayerNorm has a (heads, head_dim) weight
        out.setdefault("heads", "its `use_qk_norm` LayerNorm over (heads, head_dim) is not sliced by hf_compress")
    if getattr(config, "qk_layernorm", False):  # StableLM's per-head LayerNorms
        out.setdefault("heads", "its per-head `qk_layernorm` modules are not sliced by hf_compress")
    if getattr(config, "scale_attn_by_inverse_layer_idx", False):  # GPT-2: a block's scale depends on its index
        out.setdefault("layers", "`scale_attn_by_inverse_layer_idx` makes each block's attention depend on its index")
    if getattr(config, "conv_kernel_size", 0):  # DeBERTa-v2's convolution after the first block
        out.setdefault("layers", "its `conv_kernel_size` convolution is tied to the first block")
    return out


def parse_structures(structures) -> list[str]:
    """`"ffn,layers"` or a list -> a checked list of names from `STRUCTURES`."""
    if isinstance(structures, str):
        structures = [s.strip() for s in structures.split(",") if s.strip()]
    structures = list(structures)
    bad = [s for s in structures if s not in STRUCTURES]
    if bad or not structures:
        raise StructuredPruningError(
            f"prune_structure must be a comma-separated subset of {','.join(STRUCTURES)}, got {','.join(structures) or 'nothing'}."
        )
    return structures


def check_structured_support(config, structures) -> list[str]:
    """
    Refuse, from the config alone (no weights), a structure the model's family cannot express exactly.

    Args:
        config (`PretrainedConfig`): the model's config.
        structures (`str` or `list[str]`): e.g. `"ffn,hidden"`.

    Returns:
        The structures as a list.

    Raises:
        [`StructuredPruningError`]: one line naming the model type, the structure, why, and what is supported.
    """
    structures = parse_structures(structures)
    refused = structured_refusals(config)
    for s in structures:
        if s in refused:
            ok = [t for t in STRUCTURES if t not in refused]
            model_type = config.model_type
            style = "BERT-style " if FAMILIES[model_type].layers == "encoder.layer" else ""
            raise StructuredPruningError(
                f"`{s}` pruning is not supported for {style}`{model_type}` ({refused[s]}); use {','.join(ok)}."
            )
    return structures


def fused_parts(name: str, config) -> dict[str, list[int]]:
    """Output indices of each part of the fused projection `name` (a leaf module name such as `qkv_proj`) of the
    family `config.model_type`, from `FUSED_PROJECTIONS` (the one table unstructured pruning reads too)."""
    kind, sizes = FUSED_PROJECTIONS[(config.model_type, name)](config)
    total = sum(size for _, size in sizes)
    if kind == "per_head":
        total *= config.num_attention_heads
    out = {}
    for part, index in _output_indices(kind, sizes, total):
        out[part] = list(range(total))[index] if isinstance(index, slice) else index.tolist()
    return out


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


# ---- causal-LM logits: what a family's forward does to its output head's result -------------------------------


@dataclass(frozen=True)
class LogitTransform:
    """What a family's `*ForCausalLM.forward` does to the output head's result before returning it as `logits`, in
    this order (each `None` when the family does not): `logits * scale` (Cohere's `logit_scale`), `logits / divisor`
    (Granite's `logits_scaling`), then the soft cap `tanh(logits / softcap) * softcap` (Gemma 2/3's
    `final_logit_softcapping`), each in the head's dtype, as transformers 5 writes them.
    """

    scale: float | None = None
    divisor: float | None = None
    softcap: float | None = None


# Families whose forward returns `lm_head(hidden)` untouched (read in transformers 5.24's modeling files).
_PLAIN_LOGITS = ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "phi", "phi3",
                 "olmo", "olmo2", "gpt2", "gpt_neox", "starcoder2", "smollm3", "stablelm")
LOGIT_TRANSFORMS = {
    **{t: lambda config: LogitTransform() for t in _PLAIN_LOGITS},
    **{t: lambda config: LogitTransform(softcap=config.final_logit_softcapping) for t in ("gemma2", "gemma3_text")},
    **{t: lambda config: LogitTransform(scale=config.logit_scale) for t in ("cohere", "cohere2")},
    **{t: lambda config: LogitTransform(divisor=config.logits_scaling) for t in ("granite", "granitemoe")},
}


def logit_transform(config) -> LogitTransform | None:
    """The [`LogitTransform`] of a causal LM's family, or `None` for a family not listed (its logits are then only
    read from its own forward)."""
    make = LOGIT_TRANSFORMS.get(getattr(config, "model_type", None))
    return None if make is None else make(config)
