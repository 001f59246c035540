"""Unstructured pruning, 2:4, compressed-tensors int4 export and QAT over every supported family (issue #19).

One parametrized table: tiny configs (hidden 64, 2 layers, vocabulary 128, random norm weights and biases) of each
family x {50 % per-matrix, 50 % global, 2:4, int4 export + reload == QAT}. Each cell is exact (sparsity counted per
matrix and per fused part, logits compared) or refused before any work with the pinned message.
"""

from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

from family_configs import ENCODERS, FAMILIES, HEADS, VOCAB, build, default_head, model_class
from hf_compress.architectures import compressed_tensors_refusal, weight_layout, weight_layouts
from hf_compress.callbacks import GradualPruningCallback
from hf_compress.pruning import default_targets, load_compressed, magnitude_masks, save_compressed, sparsity_stats
from hf_compress.quantization import QuantizationArguments, attach_fake_quant, quantization_targets, quantize_and_save
from hf_compress.quantization.compressed_tensors import fake_quantize_int

FAMILY_LIST = list(FAMILIES)
# The block projections of each family, by module path below the block index (what `default_targets` must find).
BLOCK_PROJECTIONS = {
    **{f: {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj"}
       for f in ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "olmo2", "stablelm", "cohere")},
    "phi3": {"self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"},
    "gpt2": {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"},
    "gpt_neox": {"attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"},
    "qwen3_moe": {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.experts.gate_up_proj", "mlp.experts.down_proj"},
    **{f: {"attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
           "intermediate.dense", "output.dense"} for f in ("bert", "roberta")},
    "deberta_v2": {"attention.self.query_proj", "attention.self.key_proj", "attention.self.value_proj",
                   "attention.self.pos_key_proj", "attention.self.pos_query_proj", "attention.output.dense",
                   "intermediate.dense", "output.dense"},
}
FUSED = {  # family -> {module leaf: parts}
    "phi3": {"qkv_proj": ["q", "k", "v"], "gate_up_proj": ["gate", "up"]},
    "gpt2": {"c_attn": ["q", "k", "v"]},
    "gpt_neox": {"query_key_value": ["q", "k", "v"]},
}
REFUSED_CT = {
    "gpt2": "The compressed-tensors export cannot quantize a `gpt2` model: its block projections are "
            "`transformers.pytorch_utils.Conv1D`",
    "qwen3_moe": "The compressed-tensors export cannot quantize a `qwen3_moe` model: its experts are stacked 3-D parameters",
}
IDS = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


def _block_path(name: str) -> str:
    # `model.layers.0.self_attn.q_proj.weight` -> `self_attn.q_proj`; expert parameters keep their own name.
    after = name.split(".")
    i = max(j for j, p in enumerate(after) if p.isdigit())
    path = after[i + 1 :]
    return ".".join(path[:-1] if path[-1] == "weight" else path)


def _logits(model, ids=IDS):
    out = model(input_ids=ids)
    logits = out.logits if hasattr(out, "logits") else out.start_logits
    return logits.detach().float()


def _rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("family,head", [(f, h) for f in FAMILY_LIST for h in HEADS if model_class(f, h) is not None])
def test_default_targets_are_the_block_projections(family, head):
    model = build(family, head)
    names = default_targets(model)
    paths = [_block_path(n) for n in names]
    layers = model.config.num_hidden_layers
    assert sorted(paths) == sorted(p for p in BLOCK_PROJECTIONS[family] for _ in range(layers))
    bad = ("embed", "wte", "wpe", "lm_head", "norm", "score", "classifier", "qa_outputs", "pooler", "bias", "mlp.gate.")
    assert not [n for n in names if any(b in n for b in bad)]
    # A tied output head shares the embedding's weight: never among the targets.
    out = model.get_output_embeddings()
    if out is not None:
        assert all(model.get_parameter(n) is not out.weight for n in names)


def _fused_names(model, family):
    return [n for n in default_targets(model) if _block_path(n).split(".")[-1] in FUSED.get(family, {})]


@pytest.mark.parametrize("family", ["phi3", "gpt2", "gpt_neox", "qwen3_moe"])
def test_fused_layouts_match_the_forward(family):
    """Zeroing the `v` part of every fused attention projection (and its bias) makes the input of the output
    projection exactly zero; zeroing `up` of every fused MLP (every expert) makes the MLP's output zero. A layout that
    put the parts elsewhere (e.g. GPT-NeoX read as [q; k; v] instead of per head) would leave them nonzero."""
    model = build(family)
    names = [n for n in default_targets(model) if weight_layout(model, n).fused]
    assert names
    seen = {"v": 0, "up": 0}
    with torch.no_grad():
        for name in names:
            layout = weight_layout(model, name)
            module = model.get_submodule(name.rpartition(".")[0])
            weight = model.get_parameter(name)
            for part, index in layout.parts:
                if part.split(".")[-1] in seen:
                    seen[part.split(".")[-1]] += 1
                    weight[index] = 0.0
                    bias = getattr(module, "bias", None)
                    if bias is not None:  # the bias of the same output features
                        bias[index[0] if layout.in_dim == 1 else index[1]] = 0.0
    outputs = {}
    o_proj = {"phi3": "self_attn.o_proj", "gpt2": "attn.c_proj", "gpt_neox": "attention.dense", "qwen3_moe": None}[family]
    mlp = {"phi3": "mlp", "gpt2": None, "gpt_neox": None, "qwen3_moe": "mlp.experts"}[family]
    hooks = []
    for n, m in model.named_modules():
        if o_proj and n.endswith(f".0.{o_proj}"):
            hooks.append(m.register_forward_hook(lambda mod, i, o: outputs.__setitem__("attn_in", i[0])))
        if mlp and n.endswith(f".0.{mlp}"):
            hooks.append(m.register_forward_hook(lambda mod, i, o: outputs.__setitem__("mlp_out", o)))
    model(input_ids=IDS)
    for h in hooks:
        h.remove()
    if o_proj:
        assert seen["v"] == model.config.num_hidden_layers and float(outputs["attn_in"].abs().max()) == 0.0
    if mlp:
        assert seen["up"] > 0 and float(outputs["mlp_out"].abs().max()) == 0.0
