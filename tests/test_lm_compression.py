"""Pruning, PEFT and export of causal LMs on tiny LLaMAs: targets, global and 2:4 masks at LLM shapes, clipping that
sees only kept weights, LoRA / QLoRA merge before export, and bf16 exports that stay smaller than the bf16 save."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from conftest import random_lm_dataset, tiny_llama_config
from transformers import BitsAndBytesConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

from hf_compress.callbacks import GradualPruningCallback
from hf_compress.pruning import default_targets, magnitude_masks, nm_masks, resolve_targets, sparsity_stats
from hf_compress.pruning.masks import global_keep_masks

DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# SmolLM2-135M's decoder matrices (out, in): q/o 576x576, k/v 192x576 (3 KV heads of 64), gate/up 1536x576, down
SMOLLM2_SHAPES = {"q": (576, 576), "k": (192, 576), "v": (192, 576), "o": (576, 576), "gate": (1536, 576), "up": (1536, 576), "down": (576, 1536)}


def bnb_llama_config(**kw):
    """Widths bitsandbytes' CPU 4-bit kernels support (in % 64, out % 32: README "CPU kernels")."""
    base = dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=1)
    base.update(kw)
    return tiny_llama_config(**base)


# --- targets --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [False, True])
def test_default_targets_are_the_seven_decoder_linears(tied):
    model = LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=tied))
    names = default_targets(model)
    expected = [f"model.layers.{i}.{'self_attn' if p in DECODER_LINEARS[:4] else 'mlp'}.{p}.weight" for i in range(2) for p in DECODER_LINEARS]
    assert names == expected
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied


def test_tied_lm_head_is_refused_as_explicit_target_untied_is_allowed():
    tied = LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=True))
    with pytest.raises(ValueError, match=r"lm_head.weight is tied to the embedding table model.embed_tokens"):
        resolve_targets(tied, ["lm_head"])
    untied = LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=False))
    assert resolve_targets(untied, ["lm_head"]) == ["lm_head.weight"]


def _lora(model, targets=("q_proj", "v_proj", "down_proj")):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=list(targets)))
    torch.manual_seed(1)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero (delta 0); a trained adapter has a delta to merge
            torch.nn.init.normal_(p, std=0.05)
    return peft_model


def test_peft_targets_are_base_layers_never_lora():
    torch.manual_seed(0)
    peft_model = _lora(LlamaForCausalLM(tiny_llama_config()))
    names = default_targets(peft_model)
    assert len(names) == 2 * 7
    assert not any("lora_" in n for n in names)
    assert "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight" in names
    assert "base_model.model.model.layers.0.self_attn.k_proj.weight" in names  # no adapter: the plain Linear
    assert resolve_targets(peft_model, ["q_proj"]) == [
        f"base_model.model.model.layers.{i}.self_attn.q_proj.base_layer.weight" for i in range(2)
    ]


def test_pruning_callback_on_lora_model_prunes_base_and_trains_dense_adapters(tmp_path):
    torch.manual_seed(0)
    peft_model = _lora(LlamaForCausalLM(tiny_llama_config()))
    lora_before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_" in n}
    callback = GradualPruningCallback(target_sparsity=0.5, end_step=4, frequency=2)
    args = TrainingArguments(
        str(tmp_path), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-2, report_to="none", use_cpu=True,
        save_strategy="no", disable_tqdm=True, logging_steps=1,
    )
    Trainer(model=peft_model, args=args, train_dataset=random_lm_dataset(), callbacks=[callback]).train()
    stats = sparsity_stats(peft_model, default_targets(peft_model))
    for name, weight in ((n, peft_model.get_parameter(n)) for n in default_targets(peft_model)):
        assert int((weight == 0).sum()) == round(0.5 * weight.numel()), name
    assert stats["zeros"] == stats["total"] // 2
    for name, p in peft_model.named_parameters():
        if "lora_" in name:
            assert int((p == 0).sum()) == 0, name  # adapters are never masked
            assert not torch.equal(p, lora_before[name]), name  # and they trained


# --- global scope and N:M at LLM shapes -------------------------------------------------------------------------


def _stable_sort_reference(weights, sparsity, current=None):
    """The definition: the first k entries of a stable ascending sort of all |w| concatenated (pruned first)."""
    current = current or {}
    flat = torch.cat(
        [w.abs().float().masked_fill(~current[n], -1).flatten() if n in current else w.abs().float().flatten() for n, w in weights.items()]
    )
    k = max(round(sparsity * flat.numel()), int((flat < 0).sum()))
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    keep[torch.argsort(flat, stable=True)[:k]] = False
    out, offset = {}, 0
    for n, w in weights.items():
        out[n] = keep[offset : offset + w.numel()].view_as(w)
        offset += w.numel()
    return out


@pytest.mark.parametrize("kind", ["distinct", "ties", "pruned", "bf16", "zeros", "nan"])
def test_global_masks_equal_a_stable_sort_without_concatenating(kind, monkeypatch):
    g = torch.Generator().manual_seed(0)
    weights = {"a": torch.randn(37, 19, generator=g), "b": torch.randn(64, 8, generator=g) * 3, "c": torch.randn(5, 3, generator=g)}
    current = None
    if kind == "ties":
        weights = {n: torch.randint(0, 5, w.shape, generator=g).float() for n, w in weights.items()}
    elif kind == "bf16":
        weights = {n: w.bfloat16() for n, w in weights.items()}
    elif kind == "zeros":
        weights["a"][:10] = 0.0
        weights["b"][:, :2] = -0.0
    elif kind == "nan":
        weights["b"][3, 3] = float("nan")
    elif kind == "pruned":
        current = {n: torch.rand(w.shape, generator=g) > 0.3 for n, w in weights.items()}
    references = {s: _stable_sort_reference(weights, s, current) for s in (0.0, 0.001, 0.3, 0.5, 0.77, 0.999)}
    # The selection itself must not build the concatenation (a full copy of every weight, on the CPU before).
    monkeypatch.setattr(torch, "cat", lambda *a, **k: pytest.fail("global selection concatenated the weights"))
    for sparsity, reference in references.items():
        masks = magnitude_masks(weights, sparsity, "global", current_masks=current)
        for name in weights:
            assert torch.equal(masks[name], reference[name]), (kind, sparsity, name)


def test_global_masks_exact_count_on_smollm2_shapes():
    g = torch.Generator().manual_seed(0)
    weights = {n: torch.randn(*s, generator=g).bfloat16() * (i + 1) for i, (n, s) in enumerate(SMOLLM2_SHAPES.items())}
    total = sum(w.numel() for w in weights.values())
    masks = global_keep_masks(weights, 0.5)
    assert sum(int((~m).sum()) for m in masks.values()) == round(0.5 * total)
    # one threshold: every pruned magnitude <= every kept one
    pruned_max = max(float(w.abs()[~masks[n]].float().max()) for n, w in weights.items())
    kept_min = min(float(w.abs()[masks[n]].float().min()) for n, w in weights.items())
    assert pruned_max <= kept_min


def test_two_four_exact_on_smollm2_shapes():
    g = torch.Generator().manual_seed(0)
    weights = {n: torch.randn(*s, generator=g).bfloat16() for n, s in SMOLLM2_SHAPES.items()}
    weights["q"][0, :8] = 0.0  # ties inside a group: still exactly 2 kept, the first by position
    masks = nm_masks(weights, "2:4")
    for name, w in weights.items():
        groups, kept = w.abs().float().reshape(-1, 4), masks[name].reshape(-1, 4)
        assert (kept.sum(1) == 2).all(), name
        assert int((~masks[name]).sum()) == w.numel() // 2
        assert (groups[kept].reshape(-1, 2).min(1).values >= groups[~kept].reshape(-1, 2).max(1).values).all(), name
    assert masks["q"][0, :8].tolist() == [True, True, False, False, True, True, False, False]


# --- clipping and grad_norm see only kept weights ----------------------------------------------------------------


class _GradNormLog(TrainerCallback):
    def __init__(self):
        self.grad_norms = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "grad_norm" in logs:
            self.grad_norms.append(logs["grad_norm"])


def test_grad_norm_and_clipping_see_only_kept_weights_with_accumulation(tmp_path):
    """One optimizer step over 4 rows (2 micro-batches of 2): the logged grad_norm is the norm of the masked mean
    gradient computed by hand, and SGD moves each kept weight by lr * clip_coef * its gradient."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    start = copy.deepcopy(model)
    data = random_lm_dataset(n=4, seq_len=16)
    lr, max_norm = 0.1, 0.05
    log = _GradNormLog()
    args = TrainingArguments(
        str(tmp_path), max_steps=1, per_device_train_batch_size=2, gradient_accumulation_steps=2, learning_rate=lr,
        optim="sgd", weight_decay=0.0, max_grad_norm=max_norm, lr_scheduler_type="constant", logging_steps=1,
        report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True,
    )
    pruning = GradualPruningCallback(pattern="2:4", target_sparsity=0.5, start_step=0)
    Trainer(model=model, args=args, train_dataset=data, callbacks=[pruning, log]).train()

    # By hand: 2:4 masks of the starting weights, the mean token loss over the 4 rows, masked gradients.
    names = default_targets(start)
    masks = nm_masks({n: start.get_parameter(n) for n in names}, "2:4")
    with torch.no_grad():
        for n in names:
            start.get_parameter(n).mul_(masks[n])
    ids = torch.tensor(data["input_ids"])
    start(input_ids=ids, labels=ids).loss.backward()
    unmasked = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in start.parameters()]))
    for n in names:
        start.get_parameter(n).grad.mul_(masks[n])
    grads = {n: p.grad for n, p in start.named_parameters()}
    masked = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads.values()]))

    assert log.grad_norms[0] == pytest.approx(float(masked), rel=1e-5)
    assert float(unmasked) > float(masked) * 1.01  # the two differ: the test can tell them apart
    coef = min(1.0, max_norm / (float(masked) + 1e-6))
    for name, p in model.named_parameters():
        expected = start.get_parameter(name).detach() - lr * coef * grads[name]
        torch.testing.assert_close(p.detach(), expected, rtol=1e-4, atol=1e-6, msg=name)
    for n in names:
        assert int((model.get_parameter(n) == 0).sum()) == model.get_parameter(n).numel() // 2


# --- export keeps the model's dtype ------------------------------------------------------------------------------


def _weights_bytes(folder):
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors"))


@pytest.mark.parametrize("bits", [8, 4])
def test_bf16_export_not_larger_than_bf16_save_and_says_what_stayed_bf16(tmp_path, bits):
    from hf_compress.quantization import QuantizationArguments, load_quantized, quantize_and_save

    torch.manual_seed(0)
    model = LlamaForCausalLM(bnb_llama_config(tie_word_embeddings=True)).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    info = quantize_and_save(model, tmp_path / "q", QuantizationArguments(bits=bits))
    assert info["dtype"] == "bfloat16"
    assert _weights_bytes(tmp_path / "q") <= _weights_bytes(tmp_path / "bf16")
    kind = "int8" if bits == 8 else "nf4 (4-bit)"
    linears = 2 * (64 * 64 * 2 + 32 * 64 * 2 + 64 * 128 * 3)
    assert info["precision"][kind]["parameters"] == linears
    kept = info["precision"]["bfloat16"]
    assert kept["parameters"] == 97 * 64 + 2 * 2 * 64 + 64  # embedding (tied head counted once) + norms
    assert "lm_head (tied to model.embed_tokens)" in kept["modules"] and "model.embed_tokens" in kept["modules"]
    assert set(info["precision"]) == {kind, "bfloat16"}  # nothing written in float32
    assert json.loads((tmp_path / "q" / "quantization_report.json").read_text())["precision"] == info["precision"]
    reloaded = load_quantized(tmp_path / "q")
    assert reloaded.model.embed_tokens.weight.dtype == torch.bfloat16
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, out = model(ids).logits.float(), reloaded(ids).logits.float()
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()  # a quantized model of this one, not garbage


def test_card_lists_precision_of_each_part(tmp_path):
    from hf_compress.model_cards.report import quantization_summary
    from hf_compress.quantization import QuantizationArguments, load_quantized, quantize_and_save

    torch.manual_seed(0)
    model = LlamaForCausalLM(bnb_llama_config(tie_word_embeddings=True)).to(torch.bfloat16)
    quantize_and_save(model, tmp_path / "q", QuantizationArguments(bits=8))
    summary = quantization_summary(load_quantized(tmp_path / "q"), str(tmp_path / "q"))
    assert summary["precision"]["bfloat16"]["parameters"] == 97 * 64 + 5 * 64
    from jinja2 import Template
    from importlib import resources

    template = resources.files("hf_compress.model_cards").joinpath("template.md").read_text()
    block = template[template.index("{% for kind, group"): template.index("{% endfor %}", template.index("{% for kind, group")) + len("{% endfor %}")]
    text = Template(block).render(quantization=summary)
    assert "- stored as bfloat16: 6,528 parameters (model.embed_tokens" in text
    assert "lm_head (tied to model.embed_tokens)" in text and "- stored as int8: 73,728 parameters" in text


# --- PEFT: merge before export ---------------------------------------------------------------------------------


def test_lora_export_merges_first_and_reports_merge_error(tmp_path):
    from hf_compress.peft_utils import merge_adapters, probe_inputs
    from hf_compress.quantization import QuantizationArguments, load_quantized, quantize_and_save

    torch.manual_seed(0)
    peft_model = _lora(LlamaForCausalLM(bnb_llama_config()))
    ids = probe_inputs(peft_model)
    with torch.no_grad():
        adapter_logits = peft_model(**ids).logits
    merged = merge_adapters(peft_model)
    assert merged.info["max_abs_logit_diff"] < 1e-5  # float32 merge: rounding only
    assert not any("lora" in n for n, _ in merged.model.named_parameters())
    torch.testing.assert_close(merged.model(**ids).logits, adapter_logits, atol=1e-5, rtol=0)
    info = quantize_and_save(peft_model, tmp_path / "q", QuantizationArguments(bits=8))
    assert info["peft_merge"]["merged_modules"] == 2 * 3 and info["peft_merge"]["base_quantization"] is None
    reloaded = load_quantized(tmp_path / "q")
    with torch.no_grad():
        diff = float((reloaded(**ids).logits - adapter_logits).abs().max())
    assert info["peft_merge"]["export_max_abs_logit_diff"] == pytest.approx(diff, abs=1e-6)
    assert any("lora_A" in n for n, _ in peft_model.named_parameters())  # the caller's model is untouched


def test_lora_merge_keeps_pruned_zeros_when_asked():
    from hf_compress.peft_utils import merge_adapters

    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_llama_config())
    weights = {n: base.get_parameter(n) for n in default_targets(base)}
    with torch.no_grad():
        for n, m in nm_masks(weights, "2:4").items():
            weights[n].mul_(m)
    peft_model = _lora(base)
    dense = merge_adapters(peft_model).model
    sparse = merge_adapters(peft_model, keep_sparsity=True)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert int((dense.get_parameter(q) == 0).sum()) == 0  # B @ A fills the pruned entries
    assert int((sparse.model.get_parameter(q) == 0).sum()) == dense.get_parameter(q).numel() // 2
    k = "model.layers.0.self_attn.k_proj.weight"  # no adapter: zeros stay either way
    assert int((dense.get_parameter(k) == 0).sum()) == dense.get_parameter(k).numel() // 2
    assert sparse.info["zeros_kept"] == 2 * (32 * 32 + 32 * 16 + 32 * 64) // 2
    assert sparse.info["max_abs_logit_diff"] > 1e-4  # dropping the delta there is a real change, and reported


def test_qlora_export_dequantizes_merges_and_quantizes_again(tmp_path):
    from hf_compress.peft_utils import merge_adapters
    from hf_compress.quantization import QuantizationArguments, load_quantized, quantize_and_save

    torch.manual_seed(0)
    LlamaForCausalLM(bnb_llama_config()).save_pretrained(tmp_path / "base")
    qbase = LlamaForCausalLM.from_pretrained(
        tmp_path / "base", dtype=torch.float32,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    )
    peft_model = _lora(qbase)
    with torch.no_grad():
        peft_model.eval()(input_ids=torch.tensor([[1, 2, 3]]))  # eval forward: bitsandbytes may repack for its bf16 kernel
    merged = merge_adapters(peft_model)
    assert merged.info["base_quantization"] == "bitsandbytes 4-bit nf4"
    assert merged.info["merged_modules"] == 6 and merged.info["dequantized_modules"] == 2 * 4
    assert merged.info["max_abs_logit_diff"] < 1e-5  # dequantize + merge in float32 is exact up to rounding
    assert getattr(merged.model.config, "quantization_config", None) is None
    assert all(type(m) is torch.nn.Linear for n, m in merged.model.named_modules() if n.endswith("_proj"))
    info = quantize_and_save(peft_model, tmp_path / "q", QuantizationArguments(bits=4))
    assert 0 < info["peft_merge"]["export_max_abs_logit_diff"] < 0.5
    assert len(info["quantized_linear_modules"]) == 2 * 7
    reloaded = load_quantized(tmp_path / "q")
    ids = merged.inputs
    with torch.no_grad():
        diff = float((reloaded(**ids).logits - merged.reference).abs().max())
    assert info["peft_merge"]["export_max_abs_logit_diff"] == pytest.approx(diff, abs=1e-5)
