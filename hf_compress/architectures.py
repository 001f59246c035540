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

# Fused projections: how the output rows of one Linear (or output columns of one Conv1D) split into parts.
# `blocks`: the parts one after another (sizes below); `per_head`: for each head, its q, k, v rows of head_dim each.
# Sizes are config expressions: `q` = num_attention_heads * head_dim, `kv` = num_key_value_heads * head_dim,
# `hidden` = hidden_size, `ffn` = intermediate_size.
FUSED_PROJECTIONS = {
    "qkv_proj": {"families": ("phi3",), "layout": "blocks", "parts": (("q", "q"), ("k", "kv"), ("v", "kv"))},
    "gate_up_proj": {"families": ("phi3",), "layout": "blocks", "parts": (("gate", "ffn"), ("up", "ffn"))},
    "c_attn": {"families": ("gpt2",), "layout": "blocks", "parts": (("q", "hidden"), ("k", "hidden"), ("v", "hidden")),
               "conv1d": True},
    "query_key_value": {"families": ("gpt_neox",), "layout": "per_head", "parts": (("q", "head"), ("k", "head"), ("v", "head"))},
}


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
    """Output indices of each part of the fused projection `name` (a key of `FUSED_PROJECTIONS`) under `config`."""
    spec = FUSED_PROJECTIONS[name]
    n_q = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_q
    n_kv = getattr(config, "num_key_value_heads", None) or n_q
    sizes = {"q": n_q * head_dim, "kv": n_kv * head_dim, "hidden": config.hidden_size,
             "ffn": getattr(config, "intermediate_size", None), "head": head_dim}
    parts = spec["parts"]
    out: dict[str, list[int]] = {}
    if spec["layout"] == "blocks":
        start = 0
        for part, size in parts:
            out[part] = list(range(start, start + sizes[size]))
            start += sizes[size]
        return out
    width = len(parts) * head_dim  # per_head: [q_h, k_h, v_h] for each head h
    for p, (part, _) in enumerate(parts):
        out[part] = [h * width + p * head_dim + d for h in range(n_q) for d in range(head_dim)]
    return out



# ---- fused projections and Conv1D layers (unstructured pruning, QAT, exports) ---------------------------------
