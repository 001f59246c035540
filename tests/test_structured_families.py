"""Structured pruning across model families: every (family, task head, structure) is exact or refused.

Exact means: the physically pruned model, and its `save_pretrained` / `from_pretrained` reload, give the masked
model's logits within a relative max |diff| of 1e-5 (relative to the masked model's max |logit|), on a padded batch,
with randomised norm weights and biases (a wrong norm formula or a forgotten bias cannot hide behind ones and zeros).
Refused means: one line naming the model type, the structure, why, and what is supported, raised from the config
before any work (also through `prepare`, before the tokenizer or the data are read).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
import transformers

from hf_compress.architectures import StructuredPruningError, check_structured_support
from hf_compress.pruning.structured import (
    attach_structured_masks,
    cut_and_check,
    plan_masks,
    select_structures,
    structured_importance,
    structured_prune,
)

VOCAB = 96
TOL = 1e-5
KEEP = 0.5  # half of every structure: FFN neurons, KV groups (2 -> 1), hidden channels (64 -> 32), blocks (4 -> 2)

_DEC = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_ENC = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
            max_position_embeddings=64)
_GEMMA = dict(_DEC, head_dim=16, query_pre_attn_scalar=16, sliding_window=4,
              layer_types=["sliding_attention", "full_attention"] * 2)

# family: (config class, config kwargs, {head: model class}, supported structures)
ALL = ("ffn", "heads", "hidden", "layers")
FAMILIES = {
    "llama": ("LlamaConfig", dict(_DEC, attention_bias=True, mlp_bias=True), "Llama", ALL),
    "mistral": ("MistralConfig", dict(_DEC, sliding_window=None), "Mistral", ALL),
    "qwen2": ("Qwen2Config", _DEC, "Qwen2", ALL),
    "qwen3": ("Qwen3Config", dict(_DEC, head_dim=16), "Qwen3", ALL),
    "gemma2": ("Gemma2Config", _GEMMA, "Gemma2", ALL),
    "gemma3_text": ("Gemma3TextConfig", _GEMMA, "Gemma3", ALL),
    "olmo2": ("Olmo2Config", _DEC, "Olmo2", ALL),
    "cohere": ("CohereConfig", _DEC, "Cohere", ALL),
    "phi3": ("Phi3Config", dict(_DEC, partial_rotary_factor=0.5), "Phi3", ALL),
    "stablelm": ("StableLmConfig", dict(_DEC, use_qkv_bias=True), "StableLm", ("ffn", "layers")),
    "gpt2": ("GPT2Config", dict(vocab_size=VOCAB, n_embd=64, n_layer=4, n_head=4, n_inner=128, n_positions=64,
                                pad_token_id=0), "GPT2", ("ffn", "layers")),
    "gpt_neox": ("GPTNeoXConfig", dict(_ENC, pad_token_id=0), "GPTNeoX", ("ffn", "layers")),
    "bert": ("BertConfig", _ENC, "Bert", ("ffn", "layers")),
    "roberta": ("RobertaConfig", dict(_ENC, pad_token_id=1), "Roberta", ("ffn", "layers")),
    "deberta-v2": ("DebertaV2Config", dict(_ENC, relative_attention=True, position_buckets=16,
                                           pos_att_type=["p2c", "c2p"]), "DebertaV2", ("ffn", "layers")),
}
HEADS = ("causal-lm", "seq-cls", "token-cls", "qa")
_CLASS_NAME = {"causal-lm": "{}ForCausalLM", "seq-cls": "{}ForSequenceClassification",
               "token-cls": "{}ForTokenClassification", "qa": "{}ForQuestionAnswering"}
_SPECIAL = {("GPT2", "causal-lm"): "GPT2LMHeadModel", ("Gemma3", "seq-cls"): "Gemma3TextForSequenceClassification",
            ("Bert", "causal-lm"): None, ("Roberta", "causal-lm"): None, ("DebertaV2", "causal-lm"): None}


def _model_class(prefix: str, head: str):
    name = _SPECIAL.get((prefix, head), _CLASS_NAME[head].format(prefix))
    return getattr(transformers, name, None) if name else None


def _heads_of(prefix: str, structure: str) -> list[str]:
    """Every head the family has for `hidden` (the only cut that slices a head); for the other structures, which
    leave the heads as they are, the first head and sequence classification (a decoder classifier), to keep the
    file's runtime near a minute."""
    heads = [h for h in HEADS if _model_class(prefix, h)]
    return heads if structure == "hidden" else list(dict.fromkeys([heads[0]] + [h for h in heads if h == "seq-cls"]))


EXACT = [(f, h, s) for f, (_, _, prefix, ok) in FAMILIES.items() for s in ok for h in _heads_of(prefix, s)]
REFUSED = [(f, s) for f, (_, _, _, ok) in FAMILIES.items() for s in ALL if s not in ok]


def _config(family: str, head: str = "seq-cls"):
    cls, kwargs, _, _ = FAMILIES[family]
    labels = 2 if head == "qa" else 3  # encoders' QA heads split `num_labels` outputs into start and end
    # initializer_range 0.1 (not 0.02): the blocks' outputs must matter next to the randomised biases
    return getattr(transformers, cls)(**kwargs, num_labels=labels, initializer_range=0.1)


def _build(family: str, head: str):
    torch.manual_seed(0)
    model = _model_class(FAMILIES[family][2], head)(_config(family, head)).eval()
    with torch.no_grad():  # every 1-D parameter (norm weights, biases) away from its 1 / 0 initialisation
        g = torch.Generator().manual_seed(1)
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model


def _batch(config) -> dict:
    """Three rows of 12 tokens, two of them right-padded (pad id at the padding)."""
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, VOCAB, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    mask[2, 10:] = 0
    ids[mask == 0] = config.pad_token_id if config.pad_token_id is not None else 0
    return {"input_ids": ids, "attention_mask": mask}


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        out = model(**batch)
    if getattr(out, "logits", None) is not None:
        return out.logits.float()
    return torch.stack([out.start_logits, out.end_logits], -1).float()


def _rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("family, head, structure", EXACT, ids=lambda v: str(v))
def test_pruned_and_reloaded_equal_masked(family, head, structure, tmp_path):
    model = _build(family, head)
    batch = _batch(model.config)
    plan = select_structures(model, structured_importance(model, [batch], [structure]), {structure: KEEP})
    masked = copy.deepcopy(model)
    attach_structured_masks(masked, plan_masks(masked, plan))
    full, ref = _logits(model, batch), _logits(masked, batch)
    assert (full - ref).abs().max() > 1e-3 * ref.abs().max()  # the masks removed something
    pruned = copy.deepcopy(model)
    figures = cut_and_check(pruned, plan, batch, reload=False)  # the run's own self-check (its reload: below)
    assert figures["pruned_vs_masked"] <= TOL
    assert _rel(_logits(pruned, batch), ref) <= TOL
    assert pruned.num_parameters() < model.num_parameters()
    pruned.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path).eval()
    assert _rel(_logits(reloaded, batch), ref) <= TOL


@pytest.mark.parametrize("family, structure", REFUSED, ids=lambda v: str(v))
def test_refused_from_the_config_in_one_line(family, structure):
    config = _config(family)
    supported = ",".join(FAMILIES[family][3])
    message = rf"^`{structure}` pruning is not supported for (BERT-style )?`{config.model_type}` \(.+\); use {supported}\.$"
    with pytest.raises(StructuredPruningError, match=message):
        check_structured_support(config, structure)
    head = next(h for h in HEADS if _model_class(FAMILIES[family][2], h))
    model = _build(family, head)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(StructuredPruningError, match=message):
        structured_prune(model, structure, keep={structure: KEEP})
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())


def test_unknown_family_refused_in_one_line():
    config = transformers.Qwen3MoeConfig(**dict(_DEC, head_dim=16, num_experts=4, num_experts_per_tok=2))
    with pytest.raises(StructuredPruningError, match=r"^structured pruning does not know the model type `qwen3_moe`; "
                                                     r"supported: .*gemma3_text.*\. Use unstructured pruning"):
        check_structured_support(config, "layers")


def test_all_structures_at_once_gemma3_tied(tmp_path):
    model = _build("gemma3_text", "causal-lm")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    batch = _batch(model.config)
    keep = {s: KEEP for s in ALL}
    plan = select_structures(model, structured_importance(model, [batch], ALL), keep)
    masked = copy.deepcopy(model)
    attach_structured_masks(masked, plan_masks(masked, plan))
    figures = cut_and_check(model, plan, batch)
    assert figures["pruned_vs_masked"] <= TOL and figures["reloaded_vs_masked"] <= TOL
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    cfg = model.config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads, cfg.num_hidden_layers) == (32, 64, 1, 2)
    assert len(cfg.layer_types) == 2


def test_gemma3_hidden_reload_in_a_fresh_process_without_hf_compress(tmp_path):
    from safetensors.torch import load_file, save_file

    model = _build("gemma3_text", "causal-lm")
    batch = _batch(model.config)
    structured_prune(model, "hidden", keep={"hidden": KEEP}, batches=[batch])
    model.save_pretrained(tmp_path / "m")
    expected = _logits(model, batch)
    save_file(batch, str(tmp_path / "batch.safetensors"))
    code = (
        "import sys, torch; from safetensors.torch import load_file, save_file; "
        "from transformers import AutoModelForCausalLM; "
        "assert 'hf_compress' not in sys.modules; "
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'm')!r}).eval(); "
        f"b = load_file({str(tmp_path / 'batch.safetensors')!r}); "
        "out = m(**b).logits.detach().float().contiguous(); "
        "assert 'hf_compress' not in sys.modules; "
        f"save_file({{'logits': out}}, {str(tmp_path / 'out.safetensors')!r})"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # cwd outside the worktree and no PYTHONPATH: `import hf_compress` would find only the editable install, and the
    # assertions above check it is never imported.
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=tmp_path, timeout=120)
    assert _rel(load_file(str(tmp_path / "out.safetensors"))["logits"], expected) <= TOL


def _prepare(model_dir, data, out, **structured):
    from hf_compress.distillation import DistillationArguments
    from hf_compress.pipeline import DataArguments, ModelArguments, prepare
    from hf_compress.pruning import PruningArguments
    from hf_compress.pruning.structured_config import StructuredPruningArguments
    from hf_compress.quantization import QuantizationArguments

    return prepare(ModelArguments(model=str(model_dir)), DataArguments(dataset=str(data)),
                   DistillationArguments(output_dir=str(out)), PruningArguments(), QuantizationArguments(),
                   StructuredPruningArguments(**structured))


@pytest.mark.parametrize("family, structure, message", [
    ("gpt2", "heads", r"^`heads` pruning is not supported for `gpt2` \(its attention derives head_dim .+\); use ffn,layers\.$"),
    ("bert", "hidden", r"^`hidden` pruning is not supported for BERT-style `bert` \(.+\); use ffn,layers\.$"),
])
def test_prepare_refuses_before_reading_tokenizer_or_data(family, structure, message, tmp_path):
    from hf_compress.tasks import CompressionInputError

    head = "seq-cls"
    _build(family, head).save_pretrained(tmp_path / "model")  # no tokenizer saved, and the dataset does not exist:
    with pytest.raises(CompressionInputError, match=message):  # refused before either is looked at
        _prepare(tmp_path / "model", tmp_path / "missing.csv", tmp_path / "out", prune_structure=structure, prune_keep=0.5)


def test_prepare_refuses_an_unknown_family(tmp_path):
    from hf_compress.tasks import CompressionInputError

    config = transformers.Qwen3MoeConfig(**dict(_DEC, head_dim=16, num_experts=4, num_experts_per_tok=2))
    config.save_pretrained(tmp_path / "model")
    with pytest.raises(CompressionInputError, match=r"^structured pruning does not know the model type `qwen3_moe`"):
        _prepare(tmp_path / "model", tmp_path / "missing.csv", tmp_path / "out", prune_structure="ffn", prune_keep=0.5)


def test_plan_names_the_structured_stage(tmp_path):
    from test_cli import make_csv, make_tiny_model

    from hf_compress.pipeline import describe_plan

    plan = _prepare(make_tiny_model(tmp_path / "model"), make_csv(tmp_path / "data.csv"), tmp_path / "out",
                    prune_structure="ffn,layers", prune_keep=0.5)
    stages = describe_plan(plan, 80, 16, 6, 0)[-1]
    assert "structured pruning of ffn,layers one-shot (checked against its masked model)" in stages


def test_self_check_stops_a_wrong_cut_in_one_line():
    from hf_compress.pruning.structured import check_structured_cut

    model = _build("llama", "causal-lm")
    batch = _batch(model.config)
    expected = _logits(model, batch)[batch["attention_mask"].bool()]
    figures = check_structured_cut(model, batch, expected, reload=False)
    assert figures["pruned_vs_masked"] == 0.0 and figures["tolerance"] == 1e-4
    wrong = expected.clone()
    wrong[0, 0] += 0.01 * expected.abs().max()
    with pytest.raises(StructuredPruningError, match=r"^structured pruning self-check failed for `llama`: pruned vs "
                                                     r"masked 0\.0\d+ \(relative to the logit scale .+; tolerance "
                                                     r"0\.0001\); nothing was written\."):
        check_structured_cut(model, batch, wrong, reload=False)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_supported_structure_at_once_by_weight_magnitude(family):
    """No calibration data: magnitude scores, all the family's structures in one cut, self-checked (with its
    reload) on seeded random ids."""
    head = next(h for h in HEADS if _model_class(FAMILIES[family][2], h))
    model = _build(family, head)
    supported = FAMILIES[family][3]
    before = model.num_parameters()
    plan = structured_prune(model, ",".join(supported), keep={s: KEEP for s in supported})
    assert plan.scores["method"] == "magnitude"
    assert plan.check["pruned_vs_masked"] <= TOL and plan.check["reloaded_vs_masked"] <= TOL
    assert model.num_parameters() < before
    assert model.config.num_hidden_layers == 2 and len(model.base_model.get_submodule(
        {"gpt2": "h", "bert": "encoder.layer", "roberta": "encoder.layer", "deberta-v2": "encoder.layer"}.get(family, "layers"))) == 2


def test_cli_refuses_in_one_line_before_any_work(tmp_path, capsys):
    from hf_compress.cli.main import main

    _build("gpt_neox", "seq-cls").save_pretrained(tmp_path / "model")  # no tokenizer: refused before it is needed
    capsys.readouterr()  # the save's own progress bar
    rc = main(["--model", str(tmp_path / "model"), "--dataset", str(tmp_path / "missing.csv"), "--output_dir",
               str(tmp_path / "out"), "--prune_structure", "ffn,hidden", "--prune_keep", "0.5"])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err == ("hf-compress: error: `hidden` pruning is not supported for `gpt_neox` (its attention derives head_dim "
                   "as hidden_size / num_attention_heads (no `head_dim` in the config)); use ffn,layers.")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family, name, path, attn_out", [
    ("phi3", "qkv_proj", "self_attn.qkv_proj", "self_attn.o_proj"),
    ("gpt2", "c_attn", "attn.c_attn", "attn.c_proj"),
    ("gpt_neox", "query_key_value", "attention.query_key_value", "attention.dense"),
])
def test_fused_projection_layout_matches_the_model(family, name, path, attn_out):
    """Zeroing the `v` outputs that `fused_parts` names zeroes the attention output (its values are all gone);
    zeroing the same number of other outputs does not."""
    from hf_compress.architectures import fused_parts

    def attention_input(zero: list[int]):
        model = _build(family, "causal-lm")
        layer = model.base_model.get_submodule("h" if family == "gpt2" else "layers")[0]
        fused = layer.get_submodule(path)
        with torch.no_grad():
            if family == "gpt2":  # Conv1D: outputs are weight columns
                fused.weight[:, zero] = 0
            else:
                fused.weight[zero] = 0
            if fused.bias is not None:
                fused.bias[zero] = 0
        seen = {}
        handle = layer.get_submodule(attn_out).register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
        _logits(model, _batch(model.config))
        handle.remove()
        return seen["x"]

    parts = fused_parts(name, _config(family))
    assert attention_input(parts["v"]).abs().max() == 0
    assert attention_input(parts["k"]).abs().max() > 1e-3
