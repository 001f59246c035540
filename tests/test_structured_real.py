"""Structured pruning on the real MiniLM-L6 (Rotten Tomatoes text) and the real SmolLM2-135M (Hamlet): the physically
pruned model computes what the masked original computes, and reloads with plain `from_pretrained`."""

from __future__ import annotations

import copy

import pytest
import torch

from hf_compress.pruning.structured import (
    attach_structured_masks,
    plan_masks,
    prune_structures,
    select_structures,
    structured_importance,
)

pytestmark = pytest.mark.slow


def _check(model, batches, keep, inputs, tmp_path, auto_class, atol):
    scores = structured_importance(model, batches, list(keep))
    assert scores["method"] == "activation"
    plan = select_structures(model, scores, keep)
    masked = copy.deepcopy(model)
    attach_structured_masks(masked, plan_masks(masked, plan))
    with torch.no_grad():
        full = model(**inputs).logits
        ref = masked(**inputs).logits
        del masked
        prune_structures(model, plan)
        out = model(**inputs).logits
    torch.testing.assert_close(out, ref, atol=atol, rtol=1e-4)
    assert (full - ref).abs().max() > 10 * atol  # something was really removed
    model.save_pretrained(tmp_path)
    reloaded = auto_class.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, out)
    return reloaded, plan


def test_minilm_ffn_halved_and_two_layers_dropped_equals_masked(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from hf_compress.data import load_rotten_tomatoes
    from hf_compress.models import default_model_path

    tok = AutoTokenizer.from_pretrained(default_model_path())
    texts = load_rotten_tomatoes(max_train=64)["train"]["text"]
    batches = [tok(texts[i:i + 32], padding=True, truncation=True, max_length=48, return_tensors="pt") for i in (0, 32)]
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(default_model_path(), num_labels=2).eval()
    before = model.num_parameters()
    reloaded, plan = _check(model, [dict(b) for b in batches], {"ffn": 0.5, "layers": 4}, dict(batches[0]), tmp_path,
                            AutoModelForSequenceClassification, atol=1e-5)
    assert (reloaded.config.intermediate_size, reloaded.config.num_hidden_layers) == (768, 4)
    # 6 layers x 2 x 384 x 768 FFN weights + 768 biases go, then 2 whole layers of the remaining model.
    ffn_removed = 6 * (2 * 384 * 768 + 768)
    layer_after = 4 * 384 * 384 + 4 * 384 + 2 * 384 * 768 + 768 + 384 + 2 * 2 * 384
    assert reloaded.num_parameters() == before - ffn_removed - 2 * layer_after
    assert len(plan.layers) == 4


def test_smollm2_width_and_depth_pruned_equals_masked(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_compress.data import load_hamlet
    from hf_compress.models import smollm2_path

    path = smollm2_path()
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok(load_hamlet()["train"]["text"][0], return_tensors="pt")["input_ids"][:, :128].reshape(2, 64)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    keep = {"ffn": 0.5, "heads": 2, "hidden": 0.75, "layers": 20}
    # Logits are ~10-30 in size over 49,152 classes: summing over fewer (zero) channels in another order moves them
    # by ~1e-4 after 20 float32 blocks (measured 1.2e-4 at most), a relative 1e-5.
    reloaded, plan = _check(model, [{"input_ids": ids}], keep, {"input_ids": ids}, tmp_path, AutoModelForCausalLM, atol=5e-4)
    cfg = reloaded.config
    # 2 of 3 KV groups keep 6 of 9 query heads; hidden 432 = 0.75 x 576 is a multiple of 6.
    assert (cfg.intermediate_size, cfg.num_key_value_heads, cfg.num_attention_heads, cfg.head_dim, cfg.hidden_size,
            cfg.num_hidden_layers) == (768, 2, 6, 64, 432, 20)
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()  # still tied
    assert reloaded.num_parameters() < 0.5 * 134_515_008
