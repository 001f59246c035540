"""The output head projected in the loss (`HeadLogits`, `distillation/heads.py`): the same loss and gradients as the
full logits, on every listed family's own forward, in the trainer, and a fall-back wherever it could not be exact."""

import pytest
import torch
from transformers import default_data_collator

from conftest import VOCAB, tiny_llama_config
from hf_compress.architectures import LOGIT_TRANSFORMS, LogitTransform
from hf_compress.distillation import heads
from hf_compress.distillation.loss import HeadLogits, distillation_loss, teacher_top_k

TRANSFORMS = {"plain": {}, "softcap": dict(softcap=3.0), "scale": dict(scale=0.5), "divisor": dict(divisor=4.0),
              "width": dict(width=40)}


def _inputs(seed=0, b=2, s=7, h=16, v=50, bias=True, **kw):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(b, s, h, generator=g).requires_grad_()
    w = torch.randn(v, h, generator=g).requires_grad_()
    bb = torch.randn(v, generator=g).requires_grad_() if bias else None
    ht, wt = torch.randn(b, s, h, generator=g), torch.randn(v, h, generator=g)
    width = kw.get("width") or v
    y = torch.randint(0, width, (b, s), generator=g)
    y[0, 2] = -100
    mask = torch.ones(b, s, dtype=torch.long)
    mask[1, -2:] = 0
    return HeadLogits(hs, w, bb, **kw), HeadLogits(ht, wt, None, **kw), y, mask


def _grads(head):
    return [x.grad.clone() for x in (head.hidden, head.weight, head.bias) if x is not None]


def _zero(head):
    for x in (head.hidden, head.weight, head.bias):
        if x is not None:
            x.grad = None


@pytest.mark.parametrize("top_k", [False, True], ids=["dense-teacher", "top-k-teacher"])
@pytest.mark.parametrize("transform", list(TRANSFORMS), ids=list(TRANSFORMS))
def test_projected_head_gives_the_full_logits_loss_and_gradients(transform, top_k):
    student, teacher, y, mask = _inputs(**TRANSFORMS[transform])
    t_logits, t_idx = teacher.logits(), None
    if top_k:
        t_logits, t_idx = teacher_top_k(t_logits, 5, 2.0)
    kw = dict(shift_labels=True, attention_mask=mask, teacher_indices=t_idx, chunk_size=3)
    ref = distillation_loss(student.logits(), t_logits, y, 2.0, 0.3, **kw)
    ref.loss.backward()
    expected = _grads(student)
    _zero(student)
    got = distillation_loss(student, t_logits if top_k else teacher, y, 2.0, 0.3, **kw)
    (got.loss * 3).backward()  # a scaled backward: the held gradients are scaled, not returned as they are
    assert got.loss.item() == pytest.approx(ref.loss.item(), rel=1e-6)
    assert got.hard_loss.item() == pytest.approx(ref.hard_loss.item(), rel=1e-6)
    assert got.soft_loss.item() == pytest.approx(ref.soft_loss.item(), rel=1e-5, abs=1e-7)
    for g, e in zip(_grads(student), expected):
        torch.testing.assert_close(g, 3 * e, rtol=1e-5, atol=1e-6)
    if transform == "width":  # the head's rows past the shared width get no gradient, as with sliced logits
        assert student.weight.grad[40:].abs().sum() == 0 and student.weight.grad[:40].abs().sum() > 0


def test_frozen_head_holds_only_the_hidden_states_gradient_and_no_logits():
    student, teacher, y, mask = _inputs(bias=False)
    student = student._replace(weight=student.weight.detach())  # LoRA elsewhere: the head is frozen
    out = distillation_loss(student, teacher, y, 2.0, 0.5, shift_labels=True, attention_mask=mask)
    saved = [tuple(x.shape) for x in out.loss.grad_fn.saved_tensors if x is not None]
    assert saved == [(2 * 7, 16)]  # [positions, hidden], nothing vocabulary-sized
    out.loss.backward()
    ref_hidden = student.hidden.detach().clone().requires_grad_()
    ref = distillation_loss(student._replace(hidden=ref_hidden).logits(), teacher.logits(), y, 2.0, 0.5,
                            shift_labels=True, attention_mask=mask)
    ref.loss.backward()
    torch.testing.assert_close(student.hidden.grad, ref_hidden.grad, rtol=1e-5, atol=1e-7)


def test_a_loss_backpropagated_as_it_is_gets_the_held_gradient_without_a_copy():
    student, teacher, y, mask = _inputs()
    loss = distillation_loss(student, teacher, y, 2.0, 0.5, shift_labels=True, attention_mask=mask).loss
    held = loss.grad_fn.saved_tensors[1]  # d weight, float32 like the weight
    ptr = held.data_ptr()
    del held
    loss.backward()
    assert student.weight.grad.data_ptr() == ptr  # autograd took the held tensor as the gradient


def test_bfloat16_head_accumulates_its_gradient_in_float32_over_the_chunks():
    student, teacher, y, mask = _inputs(h=64, v=300)
    w16 = student.weight.detach().bfloat16().requires_grad_()
    h16 = student.hidden.detach().bfloat16().requires_grad_()
    s16 = HeadLogits(h16, w16)
    t16 = HeadLogits(teacher.hidden.bfloat16(), teacher.weight.bfloat16())
    distillation_loss(s16, t16, y, 1.0, 0.5, shift_labels=True, attention_mask=mask, chunk_size=1).loss.backward()
    # the logits path on the same bf16 tensors: bf16 logits, their gradient cast to bf16, one bf16 product per weight
    w_ref, h_ref = w16.detach().clone().requires_grad_(), h16.detach().clone().requires_grad_()
    ref = distillation_loss(HeadLogits(h_ref, w_ref).logits(), t16.logits(), y, 1.0, 0.5, shift_labels=True,
                            attention_mask=mask)
    ref.loss.backward()
    assert w16.grad.dtype == torch.bfloat16 and h16.grad.dtype == torch.bfloat16
    # 13 one-position chunks added in float32 and rounded once: within bf16 rounding of the one-product gradient
    for got, exp in ((w16.grad, w_ref.grad), (h16.grad, h_ref.grad)):
        assert ((got.float() - exp.float()).abs().max() / exp.float().abs().max()).item() < 2**-7


# ---- the head read off a model, on each listed family --------------------------------------------------------

def _family(model_type):
    from transformers import AutoConfig, AutoModelForCausalLM

    small = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=64, max_position_embeddings=64, head_dim=8, pad_token_id=0, bos_token_id=1,
                 eos_token_id=2)
    extra = {"gemma2": dict(final_logit_softcapping=3.0), "gemma3_text": dict(final_logit_softcapping=3.0),
             "cohere": dict(logit_scale=0.25), "granite": dict(logits_scaling=4.0),
             "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_positions=64),
             "gpt_neox": dict(rotary_pct=1.0), "phi": dict(partial_rotary_factor=1.0),
             "cohere2": dict(logit_scale=0.25), "granitemoe": dict(logits_scaling=4.0, num_local_experts=4),
             "mixtral": dict(num_local_experts=4), "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                                                     shared_expert_intermediate_size=16),
             "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)}
    config = AutoConfig.for_model(model_type, **small, **extra.get(model_type, {}))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # norm weights and biases random: a transform or a missed bias cannot hide
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    return model


FAMILIES = ["llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
            "gemma3_text", "phi", "phi3", "olmo", "olmo2", "gpt2", "gpt_neox", "starcoder2", "smollm3", "stablelm",
            "cohere", "cohere2", "granite", "granitemoe"]


def test_every_family_with_a_listed_transform_is_tested():
    assert sorted(FAMILIES) == sorted(LOGIT_TRANSFORMS)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_each_listed_familys_head_reproduces_its_forwards_logits(model_type):
    model = _family(model_type)
    head, why = heads.output_head(model)
    assert head is not None, why
    ids = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(1))
    ok, why = heads.check_head(model, head, ids)
    assert ok, why
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        with heads.HeadInputCapture(head) as cap:
            empty = model(input_ids=ids).logits
    assert empty.shape[1] == 0 and cap.calls == 1
    torch.testing.assert_close(head.logits(cap.hidden).logits(), ref, rtol=0, atol=1e-5)


def test_a_family_whose_transform_is_wrong_is_caught_by_the_probe(monkeypatch):
    model = _family("gemma2")
    monkeypatch.setitem(LOGIT_TRANSFORMS, "gemma2", lambda config: LogitTransform())  # soft cap forgotten
    head, _ = heads.output_head(model)
    ok, why = heads.check_head(model, head, torch.tensor([[1, 5, 9, 2]]))
    assert not ok and "differ from its forward's" in why


def test_heads_that_cannot_be_projected_exactly_are_left_to_the_forward(monkeypatch):
    from peft import LoraConfig, get_peft_model

    model = _family("llama")
    monkeypatch.delitem(LOGIT_TRANSFORMS, "llama")
    assert heads.output_head(model)[0] is None  # family not listed
    monkeypatch.undo()
    lora = get_peft_model(_family("llama"), LoraConfig(r=2, target_modules=["lm_head"]))
    head, why = heads.output_head(lora)
    assert head is None and "not a plain `nn.Linear`" in why
    torch.nn.utils.parametrize.register_parametrization(
        model.lm_head, "weight", _Keep())  # a pruning mask's parametrization
    assert heads.output_head(model)[0] is None
    hooked = _family("llama")
    hooked.lm_head.register_forward_hook(lambda m, a, o: o * 2)
    assert "forward hooks" in heads.output_head(hooked)[1]


class _Keep(torch.nn.Module):
    def forward(self, w):
        return w


def test_an_autocast_to_another_dtype_leaves_the_logits_to_the_head():
    model = _family("llama")
    head, _ = heads.output_head(model)
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), heads.HeadInputCapture(head) as cap:
        out = model(input_ids=ids).logits
    assert cap.hidden is None and out.shape == (1, 4, VOCAB)


def test_bf16_trained_head_is_projected_only_when_that_holds_less():
    w = torch.nn.Linear(64, 1000, bias=False).bfloat16()
    head = heads.OutputHead(w, LogitTransform())
    # logits path: 3 x positions x 2 bytes a class; projection: 4 bytes x hidden a class for the float32 buffer
    assert not heads.fused_saves_memory(head, 42) and heads.fused_saves_memory(head, 43)
    w.weight.requires_grad_(False)
    assert heads.fused_saves_memory(head, 1)


# ---- in the trainer --------------------------------------------------------------------------------------------

def _train(tmp_path, fused, family="llama", cached=False, steps=3, collator=None):
    from datasets import Dataset

    from hf_compress.distillation import DistillationArguments
    from hf_compress.trainers import DistillationTrainer

    g = torch.Generator().manual_seed(0)
    lengths = [12, 9, 12, 5, 12, 7, 12, 12]
    ids = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]
    pad = 0
    rows = [r + [pad] * (12 - len(r)) for r in ids]
    ds = Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(r) + [0] * (12 - len(r)) for r in ids],
                            "labels": [r + [-100] * (12 - len(r)) for r in ids]})
    lora, checkpointing = family.endswith("-lora"), family.endswith("-checkpointing")
    family = family.removesuffix("-lora").removesuffix("-checkpointing")
    student, teacher = _family(family), _family(family)
    if lora:
        from peft import LoraConfig, get_peft_model

        student = get_peft_model(student, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    args = DistillationArguments(
        str(tmp_path / f"out-{fused}"), per_device_train_batch_size=4, max_steps=steps, learning_rate=1e-2,
        logging_steps=1, report_to="none", use_cpu=True, save_strategy="no", temperature=2.0, alpha=0.5,
        disable_tqdm=True, seed=0, cache_teacher_logits=cached, teacher_logits_top_k=8 if cached else None,
        teacher_cache_dir=str(tmp_path / f"cache-{fused}"), remove_unused_columns=False,
        gradient_checkpointing=checkpointing,
    )
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=ds, eval_dataset=ds,
                                  data_collator=collator or default_data_collator)
    if not fused:
        trainer._output_heads = (None, None)
    trainer.train()
    losses = [(h["loss"], h["hard_loss"], h["soft_loss"]) for h in trainer.state.log_history if "hard_loss" in h
              and "loss" in h]
    return trainer, losses, {n: p.detach().clone() for n, p in student.named_parameters()}


@pytest.mark.parametrize(
    "family,cached", [("llama", False), ("gemma2", False), ("llama", True), ("llama-lora", False),
                      ("llama-checkpointing", False)],
    ids=["llama-live", "gemma2-softcap-live", "llama-cached-top-k", "llama-lora-frozen-head",
         "llama-gradient-checkpointing"])
def test_trainer_projecting_the_heads_trains_as_with_full_logits(family, cached, tmp_path):
    fused, f_losses, f_params = _train(tmp_path, True, family, cached)
    assert fused._output_heads[0] is not None
    assert (fused._output_heads[1] is not None) == (not cached)  # a cached teacher runs no head at all
    _, losses, params = _train(tmp_path, False, family, cached)
    assert len(f_losses) == len(losses) == 3
    for got, ref in zip(f_losses, losses):
        assert got == pytest.approx(ref, rel=1e-4)
    for name, p in params.items():  # after 3 Adam steps at lr 1e-2: float32 rounding, not a different update
        torch.testing.assert_close(f_params[name], p, rtol=1e-4, atol=1e-4, msg=name)
    # evaluation reads the full logits (the head is projected only for training steps)
    metrics = fused.evaluate()
    assert metrics["eval_loss"] > 0


def test_trainer_step_never_builds_the_vocabulary_sized_logits(tmp_path, monkeypatch):
    seen = []
    orig = heads.HeadInputCapture._pre_hook

    def spy(self, module, args):
        out = orig(self, module, args)
        seen.append(None if out is None else tuple(out[0].shape))
        return out

    monkeypatch.setattr(heads.HeadInputCapture, "_pre_hook", spy)
    trainer, _, _ = _train(tmp_path, True, steps=2)
    # per model and step: the probe's call on the first step, then the head handed zero positions
    assert seen.count((4, 0, 32)) == 4 and all(s is None or s[1] == 0 for s in seen)


def test_ddp_two_ranks_projecting_the_heads_train_as_with_full_logits(tmp_path):
    """Under DDP (2 gloo ranks, gradient accumulation 2) the hidden states' and head's gradients from the loss reach
    DDP's reducer as autograd's would: the same logged losses and the same weights on both ranks as full logits."""
    import json
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(here), env.get("PYTHONPATH", "")])
    runs = {}
    for fused in (1, 0):
        dump = tmp_path / f"dump{fused}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               os.path.join(here, "ddp_heads_worker.py"), "--fused", str(fused), "--output-dir",
               str(tmp_path / f"out{fused}"), "--dump-dir", str(dump)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        runs[fused] = [(json.load(open(dump / f"rank{r}.json")), load_file(dump / f"rank{r}.safetensors"))
                       for r in (0, 1)]
    for info, _ in runs[1]:
        assert info["world_size"] == 2 and info["wrapped"] == "DistributedDataParallel"
        assert info["heads"] == [True, True]
    assert runs[0][0][0]["heads"] == [False, False]
    fused_logs, ref_logs = runs[1][0][0]["logs"], runs[0][0][0]["logs"]
    assert len(fused_logs) == len(ref_logs) == 3
    for got, ref in zip(fused_logs, ref_logs):
        for key in ("loss", "hard_loss", "soft_loss"):
            assert got[key] == pytest.approx(ref[key], rel=1e-4)
    ref = runs[0][0][1]
    for rank in (0, 1):
        for name, p in runs[1][rank][1].items():
            torch.testing.assert_close(p, ref[name], rtol=1e-4, atol=1e-4, msg=name)
    for name, p in runs[1][0][1].items():  # DDP kept the ranks identical
        assert torch.equal(p, runs[1][1][1][name]), name
