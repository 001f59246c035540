"""Structured (Minitron-style) pruning on tiny models: the physically smaller model computes exactly what the original
computes with the same structures masked; GQA groups stay whole; configs round-trip; importance against hand
computations; the gradual callback; bad inputs."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import VOCAB, random_lm_dataset, tiny_bert_config, tiny_llama_config

from hf_compress.pruning.structured import (
    StructuredPruningError,
    attach_structured_masks,
    count_parameters,
    keep_for_parameter_budget,
    plan_masks,
    prune_structures,
    pruned_config,
    remove_structured_masks,
    select_structures,
    structured_importance,
    structured_prune,
)


def _llama(tie: bool = False, **kw):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    base = dict(num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=tie)
    base.update(kw)
    return LlamaForCausalLM(tiny_llama_config(**base)).eval()


def _bert(**kw):
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(tiny_bert_config(num_hidden_layers=3, **kw)).eval()


def _ids(n=3, t=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, t), generator=g)


LLAMA_CASES = [
    {"ffn": 0.5},
    {"heads": 0.5},
    {"hidden": 0.75},
    {"layers": 2},
    {"ffn": 0.25, "heads": 0.25, "hidden": 0.5, "layers": 3},
]


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("keep", LLAMA_CASES, ids=lambda k: "+".join(k))
def test_pruned_llama_equals_masked_llama(keep, tie):
    model = _llama(tie)
    ids = _ids()
    scores = structured_importance(model, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}], list(keep))
    plan = select_structures(model, scores, keep)
    masked = copy.deepcopy(model)
    attach_structured_masks(masked, plan_masks(masked, plan))
    with torch.no_grad():
        full, ref = model(input_ids=ids).logits, masked(input_ids=ids).logits
        pruned = prune_structures(copy.deepcopy(model), plan)
        out = pruned(input_ids=ids).logits
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
    assert (full - ref).abs().max() > 1e-3  # the masks did remove something
    n = sum(p.numel() for p in pruned.parameters())
    assert n == count_parameters(type(model), pruned_config(model, keep)) < sum(p.numel() for p in model.parameters())
    if tie:
        assert pruned.lm_head.weight is pruned.model.embed_tokens.weight


def test_config_says_what_was_removed_and_gqa_groups_stay_whole():
    model = _llama()  # 8 query heads in 4 KV groups of 2
    keep = {"ffn": 16, "heads": 2, "hidden": 24, "layers": 3}
    scores = structured_importance(model, None, list(keep))
    # Hand-made head scores: KV groups 1 and 3 matter most in every layer.
    scores["heads"] = torch.tensor([[0.1, 0.9, 0.2, 0.8]] * 4)
    scores["layers"] = torch.tensor([0.5, 0.1, 0.7, 0.6])
    plan = select_structures(model, scores, keep)
    original = copy.deepcopy(model)
    prune_structures(model, plan)
    cfg = model.config
    assert (cfg.intermediate_size, cfg.num_key_value_heads, cfg.num_attention_heads, cfg.head_dim,
            cfg.hidden_size, cfg.num_hidden_layers) == (16, 2, 4, 4, 24, 3)
    assert plan.kv_groups == [[1, 3]] * 4 and plan.layers == [0, 2, 3]
    # Query heads 2,3 (group 1) and 6,7 (group 3) survive with their KV heads 1 and 3: rows of 4 (head_dim) each.
    q_rows = [r for h in (2, 3, 6, 7) for r in range(4 * h, 4 * h + 4)]
    kv_rows = [r for g in (1, 3) for r in range(4 * g, 4 * g + 4)]
    layer, old = model.model.layers[0].self_attn, original.model.layers[0].self_attn
    hidden = torch.tensor(plan.hidden)
    torch.testing.assert_close(layer.q_proj.weight, old.q_proj.weight[q_rows][:, hidden])
    torch.testing.assert_close(layer.k_proj.weight, old.k_proj.weight[kv_rows][:, hidden])
    torch.testing.assert_close(layer.o_proj.weight, old.o_proj.weight[hidden][:, q_rows])
    assert [m.layer_idx for m in (lay.self_attn for lay in model.model.layers)] == [0, 1, 2]


def test_round_trip_save_from_pretrained_and_plain_subprocess(tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    model = _llama(tie=True)
    ids = _ids()
    structured_prune(model, "ffn,heads,hidden,layers", keep={"ffn": 0.5, "heads": 0.5, "hidden": 0.75, "layers": 3},
                     batches=[{"input_ids": ids}])
    model.save_pretrained(tmp_path / "m")
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected)
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert (cfg["intermediate_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["hidden_size"],
            cfg["num_hidden_layers"]) == (32, 4, 2, 24, 3)
    save_file({"ids": ids}, str(tmp_path / "ids.safetensors"))
    # A fresh interpreter with only transformers: no hf_compress import, no extra package.
    code = (
        "import sys, torch; from safetensors.torch import load_file, save_file; "
        "from transformers import AutoModelForCausalLM; "
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'm')!r}).eval(); "
        f"ids = load_file({str(tmp_path / 'ids.safetensors')!r})['ids']; "
        "assert 'hf_compress' not in sys.modules; "
        f"save_file({{'logits': m(input_ids=ids).logits.detach().contiguous()}}, {str(tmp_path / 'out.safetensors')!r})"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=tmp_path, timeout=120)
    torch.testing.assert_close(load_file(str(tmp_path / "out.safetensors"))["logits"], expected)


@pytest.mark.parametrize("keep", [{"ffn": 0.5}, {"layers": 2}, {"ffn": 0.25, "layers": 2}], ids=lambda k: "+".join(k))
def test_pruned_bert_equals_masked_bert_with_padding(keep, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = _bert()
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    batches = [{"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 1])}]
    plan = select_structures(model, structured_importance(model, batches, list(keep), "loss"), keep)
    masked = copy.deepcopy(model)
    attach_structured_masks(masked, plan_masks(masked, plan))
    prune_structures(model, plan)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids, attention_mask=mask).logits,
                                   masked(input_ids=ids, attention_mask=mask).logits, atol=2e-6, rtol=1e-5)
    assert reloaded.config.intermediate_size == (64 * keep["ffn"] if "ffn" in keep else 64)
    assert reloaded.config.num_hidden_layers == keep.get("layers", 3)


def test_ffn_importance_is_mean_abs_activation_over_real_tokens():
    model = _bert()
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    seen = []
    h = model.bert.encoder.layer[1].output.dense.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    scores = structured_importance(model, [{"input_ids": ids, "attention_mask": mask}], ["ffn"])
    h.remove()
    act = seen[0]  # (batch, tokens, intermediate)
    by_hand = act.abs()[mask.bool()].mean(0)  # padding positions excluded
    torch.testing.assert_close(scores["ffn"][1], by_hand)
    assert scores["method"] == "activation"


def test_head_importance_sums_query_heads_of_a_group():
    model = _llama()
    ids = _ids()
    seen = []
    h = model.model.layers[2].self_attn.o_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    scores = structured_importance(model, [{"input_ids": ids}], ["heads"])
    h.remove()
    per_head = seen[0].reshape(3, 12, 8, 4).norm(dim=-1).mean(dim=(0, 1))  # 8 query heads of head_dim 4
    torch.testing.assert_close(scores["heads"][2], per_head.reshape(4, 2).sum(-1))


def test_block_that_leaves_its_input_unchanged_scores_zero_and_goes_first():
    model = _llama()
    with torch.no_grad():  # block 1 adds nothing to the residual stream: output == input
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()
    ids = _ids()
    scores = structured_importance(model, [{"input_ids": ids}], ["layers"])
    assert scores["layers"][1].abs() < 1e-6 and (scores["layers"][[0, 2, 3]] > 1e-4).all()
    plan = select_structures(model, scores, {"layers": 3})
    assert plan.layers == [0, 2, 3]
    loss_scores = structured_importance(model, [{"input_ids": ids, "labels": ids}], ["layers"], "loss")
    assert abs(loss_scores["layers"][1]) < 1e-6


def test_magnitude_fallback_without_calibration_data():
    model = _llama()
    scores = structured_importance(model, None, ["ffn", "hidden"])
    layer = model.model.layers[0].mlp
    by_hand = layer.down_proj.weight.norm(dim=0) * layer.gate_proj.weight.norm(dim=1) * layer.up_proj.weight.norm(dim=1)
    torch.testing.assert_close(scores["ffn"][0], by_hand)
    torch.testing.assert_close(scores["hidden"], model.model.embed_tokens.weight.norm(dim=0))
    assert scores["method"] == "magnitude"


def test_parameter_budget_is_met_and_tight():
    model = _llama()
    total = sum(p.numel() for p in model.parameters())
    keep = keep_for_parameter_budget(model, ["ffn", "layers"], total // 2)
    n = count_parameters(type(model), pruned_config(model, keep))
    assert n <= total // 2
    r = keep["ffn"]
    assert count_parameters(type(model), pruned_config(model, {"ffn": min(1.0, r + 0.05), "layers": min(1.0, r + 0.05)})) > total // 2


def test_remove_masks_restores_the_original_computation():
    model = _llama()
    ids = _ids()
    with torch.no_grad():
        before = model(input_ids=ids).logits
        plan = select_structures(model, structured_importance(model, None, ["ffn", "hidden"]), {"ffn": 0.5, "hidden": 0.5})
        attach_structured_masks(model, plan_masks(model, plan))
        assert not torch.allclose(model(input_ids=ids).logits, before)
        remove_structured_masks(model)
        torch.testing.assert_close(model(input_ids=ids).logits, before)
    assert not any(k.startswith("hf_compress") for k in dict(model.named_buffers()))


def test_gradual_callback_masks_then_prunes_at_train_end(tmp_path):
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from hf_compress.callbacks.structured_pruning import REPORT_FILE, StructuredPruningCallback

    model = _llama().train()
    probe_ids = _ids()
    recorded = {}

    class Probe(TrainerCallback):  # runs before the pruning callback's on_train_end: sees the masked model
        def on_train_end(self, args, state, control, model=None, **kw):
            with torch.no_grad():
                recorded["masked"] = model.eval()(input_ids=probe_ids).logits

    cb = StructuredPruningCallback("ffn,heads,layers", keep={"ffn": 0.5, "heads": 0.5, "layers": 3},
                                   calibration_batches=2, end_fraction=0.5, frequency=2)
    args = TrainingArguments(str(tmp_path), max_steps=8, per_device_train_batch_size=4, learning_rate=1e-3,
                             report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0)
    Trainer(model=model, args=args, train_dataset=random_lm_dataset(), callbacks=[Probe(), cb]).train()
    # Linear schedule to step 4 (half of 8), updated every 2 steps.
    assert cb.history == [(0, 0.0), (2, 0.5), (4, 1.0)]
    assert (model.config.intermediate_size, model.config.num_key_value_heads, model.config.num_hidden_layers) == (32, 2, 3)
    assert model.model.layers[0].mlp.up_proj.weight.shape == (32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(input_ids=probe_ids).logits, recorded["masked"], atol=2e-6, rtol=1e-5)
    report = json.loads((tmp_path / REPORT_FILE).read_text())
    assert len(report["scores"]["ffn"]) == 4 and report["layers"] == cb.plan.layers


def test_structured_callback_keywords_build_the_same_arguments_as_the_arguments_object():
    from hf_compress.callbacks.structured_pruning import StructuredPruningCallback
    from hf_compress.pruning import StructuredPruningArguments

    by_keywords = StructuredPruningCallback("ffn,layers", keep={"ffn": 0.5, "layers": 3}, end_fraction=0.25, frequency=2)
    by_args = StructuredPruningCallback(StructuredPruningArguments(
        prune_structure="ffn,layers", prune_ffn_keep=0.5, prune_layers_keep=3, prune_end_fraction=0.25,
        prune_frequency=2, prune_schedule="gradual"))
    assert by_keywords.config == by_args.config == StructuredPruningCallback.from_args(by_args.config).config
    assert (by_keywords.keep, by_keywords.end_fraction, by_keywords.frequency) == ({"ffn": 0.5, "layers": 3}, 0.25, 2)
    with pytest.raises(ValueError, match="either prune_target_params or kept amounts"):
        StructuredPruningCallback("ffn", keep={"ffn": 0.5}, target_params=10)
    with pytest.raises(ValueError, match=r"keep must name exactly the structures \['ffn'\], got \['ffn', 'layers'\]"):
        StructuredPruningCallback("ffn", keep={"ffn": 0.5, "layers": 2})
    with pytest.raises(TypeError, match=r"unknown options \['prune_steps'\]"):
        StructuredPruningCallback("ffn", keep={"ffn": 0.5}, steps=3)


def test_partial_plan_masks_least_important_first():
    from hf_compress.callbacks.structured_pruning import partial_plan
    from hf_compress.pruning.structured import StructuredPlan

    plan = StructuredPlan(layers=[0, 3], scores={"layers": torch.tensor([0.9, 0.1, 0.5, 0.8])})
    assert partial_plan(plan, {"layers": 4}, 0.5).layers == [0, 2, 3]  # layer 1 (0.1) goes first
    assert partial_plan(plan, {"layers": 4}, 1.0).layers == [0, 3]
    assert partial_plan(plan, {"layers": 4}, 0.0).layers == [0, 1, 2, 3]


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: structured_prune(_llama(), "ffn,foo", keep={"ffn": 0.5}), "prune_structure must be a comma-separated subset"),
        (lambda: structured_prune(_llama(), "ffn", keep={"ffn": 1.5}), "fraction in \\(0, 1\\] or a whole count > 1, got 1.5"),
        (lambda: structured_prune(_llama(), "layers", keep={"layers": 9}), "keep between 1 and 4"),
        (lambda: structured_prune(_bert(), "heads", keep={"heads": 0.5}), "`heads` pruning is not supported for BERT"),
        (lambda: structured_prune(_llama(), "ffn", keep={"ffn": 0.5}, target_params=10), "pass exactly one of"),
        (lambda: structured_prune(_llama(), "ffn", target_params=10**9), "is not below the model's"),
        (lambda: structured_prune(_llama(), "ffn", keep={"layers": 2}), "keep must name exactly the structures"),
        (lambda: structured_importance(_llama(), [], ["ffn"]), "empty list of calibration batches"),
        (lambda: structured_importance(_llama(), None, ["ffn"], "mse"), "layer_metric must be 'cosine' or 'loss'"),
    ],
)
def test_bad_inputs_one_line(call, message):
    with pytest.raises(StructuredPruningError, match=message) as err:
        call()
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prune_structure="ffn"), "needs a target for ffn"),
        (dict(prune_structure="ffn,bogus", prune_keep=0.5), "prune_structure must be a comma-separated subset"),
        (dict(prune_structure="ffn", prune_ffn_keep=2.5), "whole count > 1, got 2.5"),
        (dict(prune_structure="ffn", prune_keep=0.5, prune_target_params=100), "either prune_target_params or kept"),
        (dict(prune_structure="ffn", prune_keep=0.5, prune_schedule="cubic"), "prune_schedule must be"),
    ],
)
def test_structured_arguments_reject_bad_values(kwargs, message):
    from hf_compress.pruning.structured_config import StructuredPruningArguments

    with pytest.raises(ValueError, match=message):
        StructuredPruningArguments(**kwargs)


def test_structured_arguments_keep_resolves_per_structure():
    from hf_compress.pruning.structured_config import StructuredPruningArguments

    args = StructuredPruningArguments(prune_structure="ffn,layers", prune_keep=0.5, prune_layers_keep=4)
    assert args.keep() == {"ffn": 0.5, "layers": 4}
