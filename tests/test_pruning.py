"""Gradual magnitude pruning on tiny models: schedule, mask selection, masks that hold, resume, compressed save."""

from __future__ import annotations

import json
import os
import shutil
import struct

import pytest
import torch
from conftest import random_classification_dataset, tiny_bert_config, tiny_llama_config
from transformers import BertForSequenceClassification, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

from hf_compress.callbacks import GradualPruningCallback
from hf_compress.pruning import (
    PruningArguments,
    cubic_sparsity,
    default_targets,
    get_masks,
    load_compressed,
    load_masks,
    magnitude_masks,
    nm_masks,
    resolve_targets,
    save_compressed,
    sparsity_stats,
)
from hf_compress.pruning.masks import num_to_prune

# --- the schedule -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "step, expected",
    [
        (0, 0.0),  # before start_step: nothing pruned
        (9, 0.0),
        (10, 0.1),  # s_i at t0
        (14, 0.1),  # held between events (frequency 5)
        (15, 0.9 + (0.1 - 0.9) * (1 - 5 / 40) ** 3),
        (37, 0.9 + (0.1 - 0.9) * (1 - 25 / 40) ** 3),
        (49, 0.9 + (0.1 - 0.9) * (1 - 35 / 40) ** 3),
        (50, 0.9),
        (500, 0.9),
    ],
)
def test_cubic_schedule_matches_hand_formula(step, expected):
    assert cubic_sparsity(step, 0.1, 0.9, start_step=10, end_step=50, frequency=5) == pytest.approx(expected, abs=1e-12)


def test_cubic_schedule_reaches_target_when_span_is_not_a_multiple_of_frequency():
    # end - start = 47 is not a multiple of 5: the last regular event is 45, and 47 is exactly the target.
    assert cubic_sparsity(45, 0.0, 0.8, 0, 47, 5) == pytest.approx(0.8 * (1 - (1 - 45 / 47) ** 3))
    assert cubic_sparsity(47, 0.0, 0.8, 0, 47, 5) == 0.8
    values = [cubic_sparsity(t, 0.0, 0.8, 0, 47, 5) for t in range(60)]
    assert values == sorted(values)  # monotone


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(target_sparsity=1.0), "target_sparsity must be in \\[0, 1\\), got 1.0"),
        (dict(initial_sparsity=0.6, target_sparsity=0.5), "initial_sparsity must be in \\[0, target_sparsity=0.5\\], got 0.6"),
        (dict(start_step=10, end_step=10), "end_step must be > start_step=10, got 10"),
        (dict(frequency=0), "frequency must be >= 1 optimizer step, got 0"),
    ],
)
def test_cubic_schedule_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        cubic_sparsity(5, **kwargs)


# --- choosing weights ---------------------------------------------------------------------------------------


def test_default_targets_are_the_block_linears_only(tiny_bert, tiny_llama):
    bert = default_targets(tiny_bert)
    assert len(bert) == 2 * 6  # q, k, v, attention output, intermediate, output per layer
    assert all(".encoder.layer." in n and n.endswith(".weight") for n in bert)
    llama = default_targets(tiny_llama)
    assert len(llama) == 2 * 7  # q, k, v, o, gate, up, down
    assert not any("lm_head" in n or "embed" in n or "norm" in n for n in llama)
    assert resolve_targets(tiny_bert, ["classifier"]) == ["classifier.weight"]


def test_magnitude_masks_prune_exact_counts_of_smallest():
    torch.manual_seed(0)
    weights = {"a": torch.randn(16, 24), "b": torch.randn(8, 8) * 10}
    masks = magnitude_masks(weights, 0.3, "layer")
    for name, w in weights.items():
        k = round(0.3 * w.numel())
        assert int((~masks[name]).sum()) == k
        # the pruned entries are exactly the k smallest magnitudes
        assert torch.equal(torch.sort(w.abs()[~masks[name]]).values, torch.sort(w.abs().flatten()).values[:k])
    glob = magnitude_masks(weights, 0.3, "global")
    assert int(sum((~m).sum() for m in glob.values())) == round(0.3 * (16 * 24 + 64))
    assert int((~glob["b"]).sum()) < int((~glob["a"]).sum())  # b is 10x larger: pruned less under one threshold
    # monotone: masks already in force stay pruned even if the weight grew back
    grown = {"a": weights["a"].clone(), "b": weights["b"]}
    grown["a"][~masks["a"]] = 100.0
    later = magnitude_masks(grown, 0.5, "layer", current_masks=masks)
    assert not (later["a"] & ~masks["a"]).any()
    assert int((~later["a"]).sum()) == round(0.5 * 16 * 24)


@pytest.mark.parametrize("kind", ["distinct", "ties", "pruned", "nan"])
def test_selection_equals_a_stable_sort(kind):
    """The linear-time selection prunes exactly the first k of a stable ascending sort, ties by position."""
    from hf_compress.pruning.masks import smallest_k_keep_mask

    g = torch.Generator().manual_seed(1)
    flat = torch.rand(1000, generator=g)
    if kind == "ties":
        flat = torch.randint(0, 7, (1000,), generator=g).float()  # ~140 copies of each value
    elif kind == "pruned":
        flat[torch.randperm(1000, generator=g)[:300]] = -1.0  # already-pruned entries score -1
    elif kind == "nan":
        flat[5] = float("nan")
    for k in (0, 1, 299, 300, 301, 500, 999, 1000):
        reference = torch.ones(1000, dtype=torch.bool)
        reference[torch.argsort(flat, stable=True)[:k]] = False
        assert torch.equal(smallest_k_keep_mask(flat, k), reference), (kind, k)


def test_two_four_masks_are_valid():
    torch.manual_seed(0)
    w = torch.randn(6, 16)
    mask = nm_masks({"w": w}, "2:4")["w"]
    groups, kept = w.abs().reshape(-1, 4), mask.reshape(-1, 4)
    assert (kept.sum(1) == 2).all()
    assert torch.equal(groups[kept].reshape(-1, 2).min(1).values >= groups[~kept].reshape(-1, 2).max(1).values, torch.ones(24, dtype=torch.bool))
    with pytest.raises(ValueError, match="has 10 input features, not a multiple of 4"):
        nm_masks({"w": torch.randn(3, 10)}, "2:4")
    with pytest.raises(ValueError, match="pattern must be 'N:M' with 0 < N < M"):
        nm_masks({"w": w}, "4:2")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(target_sparsity=-0.1), "target_sparsity must be in \\[0, 1\\), got -0.1"),
        (dict(pruning_scope="row"), "pruning_scope must be 'layer' or 'global', got 'row'"),
        (dict(pruning_frequency=0), "pruning_frequency must be >= 1 optimizer step, got 0"),
        (dict(pruning_start_step=5, pruning_end_step=3), "pruning_end_step must be > pruning_start_step=5, got 3"),
        (dict(pruning_end_fraction=0.0), "pruning_end_fraction must be in \\(0, 1\\], got 0.0"),
        (dict(pruning_pattern="2:4", target_sparsity=0.8), "fixes the sparsity at 0.5, but target_sparsity is 0.8"),
        (dict(pruning_pattern="2-4"), "pattern must be 'N:M'"),
    ],
)
def test_pruning_arguments_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PruningArguments(**kwargs)


def test_pruning_arguments_parse_next_to_training_arguments():
    from transformers import HfArgumentParser

    train, prune = HfArgumentParser((TrainingArguments, PruningArguments)).parse_args_into_dataclasses(
        ["--output_dir", "x", "--target_sparsity", "0.8", "--pruning_frequency", "5", "--pruning_target_modules", "query", "key"]
    )
    cb = GradualPruningCallback(prune)
    assert (cb.config.target_sparsity, cb.config.pruning_frequency, cb.config.pruning_target_modules) == (0.8, 5, ["query", "key"])


def test_pruning_callback_keywords_build_the_same_arguments_as_the_arguments_object():
    by_keywords = GradualPruningCallback(target_sparsity=0.8, end_step=600, frequency=5, scope="global")
    by_args = GradualPruningCallback(PruningArguments(target_sparsity=0.8, pruning_end_step=600, pruning_frequency=5,
                                                      pruning_scope="global"))
    assert by_keywords.config == by_args.config == GradualPruningCallback.from_args(by_args.config).config
    assert (by_keywords.end_step, by_keywords.config.pruning_end_fraction) == (600, 0.75)
    with pytest.raises(TypeError, match=r"unknown options \['sparsity'\]"):
        GradualPruningCallback(sparsity=0.5)
    with pytest.raises(TypeError, match="a `PruningArguments` or keyword options, not both"):
        GradualPruningCallback(PruningArguments(), frequency=3)


# --- the callback in a Trainer ------------------------------------------------------------------------------


class Probe(TrainerCallback):
    """Records, after the pruning callback, the zeros per pruned tensor and the optimizer state at each step."""

    def __init__(self):
        self.zeros, self.masks, self.revived_state = {}, {}, []

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        masks = get_masks(model)
        params = dict(model.named_parameters())
        self.zeros[state.global_step] = {n: int((params[n] == 0).sum()) for n in masks}
        self.masks[state.global_step] = {n: m.clone() for n, m in masks.items()}
        for n, m in masks.items():
            for v in optimizer.state.get(params[n], {}).values():
                if torch.is_tensor(v) and v.shape == m.shape and (v[~m] != 0).any():
                    self.revived_state.append((state.global_step, n))


def _train(tmp_path, callback, steps=12, bs=8, accum=1, resume=None, output_dir=None, save_steps=None, seed=0, init_seed=0):
    torch.manual_seed(init_seed)
    model = BertForSequenceClassification(tiny_bert_config())
    probe = Probe()
    args = TrainingArguments(
        output_dir or str(tmp_path / "run"), max_steps=steps, per_device_train_batch_size=bs, gradient_accumulation_steps=accum,
        learning_rate=5e-3, weight_decay=0.1, optim="adamw_torch", logging_steps=1, report_to="none", use_cpu=True,
        seed=seed, disable_tqdm=True, save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
    )
    trainer = Trainer(model=model, args=args, train_dataset=random_classification_dataset(n=96), callbacks=[callback, probe])
    trainer.train(resume_from_checkpoint=resume)
    return model, probe, trainer


def test_callback_schedule_exact_counts_and_zeros_hold_under_adamw(tmp_path):
    cb = GradualPruningCallback(target_sparsity=0.75, end_step=8, frequency=2)
    model, probe, trainer = _train(tmp_path, cb)
    targets = default_targets(model)
    numel = {n: p.numel() for n, p in model.named_parameters() if n in targets}
    for step, zeros in probe.zeros.items():
        # every pruned tensor has exactly round(s_t * numel) zeros after every step (held between events)
        s = cubic_sparsity(step, 0.0, 0.75, 0, 8, 2)
        assert zeros == {n: num_to_prune(numel[n], s) for n in targets}, step
    assert all(z == {n: num_to_prune(numel[n], 0.75) for n in targets} for t, z in probe.zeros.items() if t >= 8)
    assert probe.revived_state == []  # exp_avg / exp_avg_sq of pruned entries stay zero
    # pruned entries never come back: masks only shrink and the final zeros are the step-8 mask
    for t in range(2, 12):
        for n in targets:
            assert not (probe.masks[t][n] & ~probe.masks[t - 1][n]).any()
    params = dict(model.named_parameters())
    for n in targets:
        assert torch.equal(params[n] == 0, ~probe.masks[12][n])
    # masks made permanent: a plain model again, and the other weights untouched (dense)
    assert get_masks(model) == {}
    assert not any(name.endswith("_mask") for name, _ in model.named_buffers())
    assert int((model.classifier.weight == 0).sum()) == 0
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 12 and all("sparsity" in h for h in logged)
    assert logged[-1]["sparsity"] == pytest.approx(sum(num_to_prune(v, 0.75) for v in numel.values()) / sum(numel.values()))
    assert logged[3]["sparsity_target"] == pytest.approx(cubic_sparsity(4, 0.0, 0.75, 0, 8, 2))
    assert f"sparsity/{targets[0]}" in logged[-1]


def test_without_masking_adamw_would_revive_weights(tmp_path):
    # Control for the test above: zero the weights once, no callback; AdamW moves them off zero.
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config())
    with torch.no_grad():
        model.bert.encoder.layer[0].output.dense.weight[:, :8] = 0
    args = TrainingArguments(str(tmp_path), max_steps=3, per_device_train_batch_size=8, learning_rate=5e-3, weight_decay=0.1,
                             report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=random_classification_dataset(n=32)).train()
    assert int((model.bert.encoder.layer[0].output.dense.weight[:, :8] == 0).sum()) < 8 * 32


def test_gradient_accumulation_does_not_shift_schedule(tmp_path):
    runs = []
    for bs, accum in ((12, 1), (4, 3)):
        cb = GradualPruningCallback(target_sparsity=0.6, start_step=2, end_step=6, frequency=2)
        _, probe, _ = _train(tmp_path / f"a{accum}", cb, steps=8, bs=bs, accum=accum)
        runs.append({t: sum(z.values()) for t, z in probe.zeros.items()})
    numel = sum(p.numel() for n, p in BertForSequenceClassification(tiny_bert_config()).named_parameters() if ".encoder.layer." in n and n.endswith("dense.weight") or n.endswith(("query.weight", "key.weight", "value.weight")))
    assert runs[0].keys() == runs[1].keys() == set(range(1, 9))
    per_tensor = [32 * 32] * 8 + [64 * 32] * 4
    assert numel == sum(per_tensor)
    for t in range(1, 9):
        expected = sum(num_to_prune(n, cubic_sparsity(t, 0.0, 0.6, 2, 6, 2)) for n in per_tensor)
        assert runs[0][t] == runs[1][t] == expected, t


def test_resume_from_checkpoint_gives_identical_masks_and_weights(tmp_path):
    kwargs = dict(target_sparsity=0.7, end_step=6, frequency=2)
    full, probe_full, _ = _train(tmp_path, GradualPruningCallback(**kwargs), steps=8, save_steps=4)
    ckpt = tmp_path / "run" / "checkpoint-4"
    saved = load_masks(str(ckpt / "pruning_masks.safetensors"))
    assert {n: torch.equal(saved[n], probe_full.masks[4][n]) for n in saved} == {n: True for n in saved}
    from safetensors import safe_open

    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        assert not any(k.endswith("_mask") for k in f.keys())  # the checkpoint's model stays a plain model

    other = tmp_path / "resumed"
    shutil.copytree(ckpt, other / "checkpoint-4")
    resumed, probe_resumed, _ = _train(
        tmp_path, GradualPruningCallback(**kwargs), steps=8, save_steps=4, resume=str(other / "checkpoint-4"), output_dir=str(other), init_seed=1
    )  # a different initialisation: everything must come from the checkpoint
    assert sorted(probe_resumed.masks) == [5, 6, 7, 8]
    for t in (5, 6, 7, 8):
        for n, m in probe_full.masks[t].items():
            assert torch.equal(m, probe_resumed.masks[t][n]), (t, n)
    for (n, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), n


def test_two_four_callback(tmp_path):
    cb = GradualPruningCallback(target_sparsity=0.5, pattern="2:4", start_step=1)
    model, probe, _ = _train(tmp_path, cb, steps=4)
    for n in default_targets(model):
        w = dict(model.named_parameters())[n]
        assert ((w.reshape(-1, 4) != 0).sum(1) == 2).all(), n
    assert sum(probe.zeros[1].values()) == sparsity_stats(model)["total"] // 2


def test_callback_errors(tmp_path):
    with pytest.raises(ValueError, match="pruning_end_step 50 is beyond max_steps 12"):
        _train(tmp_path, GradualPruningCallback(end_step=50))
    with pytest.raises(ValueError, match="target_modules \\['nope'\\] matched no nn.Linear in BertForSequenceClassification"):
        _train(tmp_path, GradualPruningCallback(target_modules=["nope"]))
    with pytest.raises(ValueError, match="target_sparsity must be in \\[0, 1\\), got 1.5"):
        GradualPruningCallback(target_sparsity=1.5)


# --- compressed save ----------------------------------------------------------------------------------------


def _bits(t):
    return t.contiguous().view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_compressed_save_reloads_bit_identical_and_is_smaller(tmp_path, tiny_bert, sparsity):
    weights = {n: p for n, p in tiny_bert.named_parameters() if n in default_targets(tiny_bert)}
    masks = magnitude_masks(weights, sparsity)
    with torch.no_grad():
        for n, p in weights.items():
            p.masked_fill_(~masks[n], 0.0)
        first = next(iter(weights.values()))
        idx = int((first.view(-1) != 0).nonzero()[0])
        first.view(-1)[idx] = -0.0  # a signed zero must come back signed
    report = save_compressed(tiny_bert, tmp_path / "c")
    tiny_bert.save_pretrained(tmp_path / "dense")
    reloaded = load_compressed(str(tmp_path / "c"))
    assert type(reloaded) is BertForSequenceClassification
    sd_a, sd_b = tiny_bert.state_dict(), reloaded.state_dict()
    assert sd_a.keys() == sd_b.keys()
    for n in sd_a:
        assert sd_a[n].dtype == sd_b[n].dtype and torch.equal(_bits(sd_a[n]), _bits(sd_b[n])), n
    dense_file = os.path.getsize(tmp_path / "dense" / "model.safetensors")
    comp_file = os.path.getsize(tmp_path / "c" / "model.safetensors")
    assert report["compressed_bytes"] == comp_file < dense_file
    # the file is the information limit plus the safetensors header and at most one padding byte per bitmask
    with open(tmp_path / "c" / "model.safetensors", "rb") as f:
        header = struct.unpack("<Q", f.read(8))[0]
    overhead = comp_file - 8 - header - report["information_limit_bytes"]
    assert 0 <= overhead <= report["sparse_tensors"]
    # pruned weights: (numel - round(s * numel)) fp32 values (the -0.0 among them) + one mask bit per entry
    nonzero_bits = sum((p.numel() - round(sparsity * p.numel())) * 32 + p.numel() for p in weights.values())
    # the rest: dense fp32, except all-zero `*.weight` tensors that cost their mask bits (biases stay dense: the
    # transformers loader pairs only `weight` with `weight_bitmask`)
    rest_bits = sum(t.numel() if not t.any() and n.endswith(".weight") else t.numel() * 32 for n, t in sd_a.items() if n not in weights)
    assert report["information_limit_bytes"] == pytest.approx((nonzero_bits + rest_bits) / 8, abs=report["sparse_tensors"] + 1)
    logits = lambda m: m(input_ids=torch.arange(5, 17)[None]).logits  # noqa: E731
    tiny_bert.eval()
    assert torch.equal(logits(tiny_bert), logits(reloaded))


def test_compressed_save_with_tied_weights(tmp_path):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=True))
    with torch.no_grad():
        model.model.embed_tokens.weight[::2] = 0
    save_compressed(model, tmp_path / "c")
    reloaded = load_compressed(str(tmp_path / "c"))
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    for n, t in model.state_dict().items():
        assert torch.equal(t, reloaded.state_dict()[n]), n
    meta = json.loads(__import__("safetensors").safe_open(str(tmp_path / "c" / "model.safetensors"), "pt").metadata()["sparse"])
    assert "model.embed_tokens.weight" in meta


def test_compressed_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="No bitmask checkpoint in"):
        load_compressed(str(tmp_path))
    with pytest.raises(ValueError, match="save_compressed needs a transformers PreTrainedModel"):
        save_compressed(torch.nn.Linear(2, 2), tmp_path / "x")


def test_pruning_composes_with_qat_fake_quantization(tmp_path):
    """QAT parametrizes the weights it fake-quantizes; the masks keep acting on the stored weights."""
    from transformers import BertForSequenceClassification, Trainer, TrainingArguments

    from conftest import random_classification_dataset, tiny_bert_config
    from hf_compress.callbacks import QATCallback
    from hf_compress.quantization import QuantizationArguments

    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config())
    args = TrainingArguments(str(tmp_path), max_steps=10, report_to="none", use_cpu=True, logging_steps=1,
                             save_strategy="no", disable_tqdm=True)
    pruning = GradualPruningCallback(target_sparsity=0.5, end_step=5, frequency=1)
    qat = QATCallback(QuantizationArguments(bits=4, qat_fraction=0.5))
    Trainer(model=model, args=args, train_dataset=random_classification_dataset(), callbacks=[pruning, qat]).train()
    stats = sparsity_stats(model, default_targets(model))
    assert stats["zeros"] == sum(round(0.5 * model.get_parameter(n).numel()) for n in default_targets(model))


class _ReviveSGD(torch.optim.SGD):
    """An SGD that also pushes every weight by +1e-3 each step: it revives zeros, so it must not be trusted."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(1e-3)
        return loss


def test_optimizer_preserves_zeros_rule():
    from types import SimpleNamespace

    from hf_compress.callbacks.pruning import optimizer_preserves_zeros

    w = [torch.nn.Parameter(torch.zeros(3))]
    assert optimizer_preserves_zeros(torch.optim.AdamW(w, weight_decay=0.1))
    assert optimizer_preserves_zeros(torch.optim.Adam(w, amsgrad=True))
    assert optimizer_preserves_zeros(torch.optim.SGD(w, lr=0.1, momentum=0.9, weight_decay=0.1))
    assert optimizer_preserves_zeros(SimpleNamespace(optimizer=torch.optim.AdamW(w)))  # accelerate's wrapper
    assert not optimizer_preserves_zeros(torch.optim.AdamW(w, eps=0.0))  # 0 / 0 would be NaN
    assert not optimizer_preserves_zeros(torch.optim.Adagrad(w))  # not on the list: masks re-applied
    assert not optimizer_preserves_zeros(_ReviveSGD(w, lr=0.1))  # a subclass may change the update
    assert not optimizer_preserves_zeros(None)
    # The claim behind the list, checked on one step: zero weight, zero gradient, zero state -> still zero.
    for opt_cls, kw in [(torch.optim.AdamW, dict(weight_decay=0.1)), (torch.optim.Adam, dict(weight_decay=0.1)),
                        (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=0.1, nesterov=True))]:
        p = torch.nn.Parameter(torch.tensor([0.0, 1.0]))
        opt = opt_cls([p], **kw)
        for _ in range(3):
            p.grad = torch.tensor([0.0, 0.5])
            opt.step()
        assert p[0].item() == 0.0 and p[1].item() != 1.0, opt_cls


def test_untrusted_optimizer_gets_masks_reapplied(tmp_path):
    cb = GradualPruningCallback(target_sparsity=0.5, end_step=4, frequency=2)
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config())
    optimizer = _ReviveSGD(model.parameters(), lr=1e-2)
    args = TrainingArguments(str(tmp_path / "run"), max_steps=6, per_device_train_batch_size=8, report_to="none",
                             use_cpu=True, save_strategy="no", disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=random_classification_dataset(n=64), callbacks=[cb],
            optimizers=(optimizer, None)).train()
    params = dict(model.named_parameters())
    for n in default_targets(model):
        assert int((params[n] == 0).sum()) == num_to_prune(params[n].numel(), 0.5), n
    assert int((model.classifier.weight == 0).sum()) == 0  # the optimizer did move every other weight
