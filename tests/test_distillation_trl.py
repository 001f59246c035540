"""Distillation and the compression callbacks under the real `trl.SFTTrainer` (tiny LLaMA, word-level tokenizer)."""

import pytest
import torch
from datasets import Dataset
from transformers import LlamaForCausalLM

from conftest import tiny_llama_config
from hf_compress.distillation import distillation_loss, layer_dropped_student
from lm_helpers import tiny_tokenizer

trl = pytest.importorskip("trl")

from hf_compress.trainers import SFTDistillationConfig, SFTDistillationTrainer  # noqa: E402

TEMPLATE = "{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"


def chat_tokenizer():
    tok = tiny_tokenizer()
    tok.chat_template = TEMPLATE
    return tok


def words(g, lo, hi):
    return " ".join(f"t{int(i)}" for i in torch.randint(5, 97, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g))


def prompt_completion_chats(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Dataset.from_dict({
        "prompt": [[{"role": "user", "content": words(g, 3, 8)}] for _ in range(n)],
        "completion": [[{"role": "assistant", "content": words(g, 2, 7)}] for _ in range(n)],
    })


def message_chats(n=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return Dataset.from_dict({"messages": [
        [{"role": "user", "content": words(g, 3, 8)}, {"role": "assistant", "content": words(g, 2, 7)}] for _ in range(n)
    ]})


def pair(seed=0):
    torch.manual_seed(seed)
    teacher = LlamaForCausalLM(tiny_llama_config(num_hidden_layers=3))
    return layer_dropped_student(teacher, [0, 2]), teacher


def config(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=4, per_device_eval_batch_size=5,
        learning_rate=1e-3, report_to="none", save_strategy="no", use_cpu=True, logging_steps=1, seed=0,
        disable_tqdm=True, bf16=False, max_length=48, teacher_cache_dir=str(tmp_path / "cache"),
    )
    base.update(kw)
    return SFTDistillationConfig(**base)


def test_completion_only_loss_masks_the_prompt_in_both_parts(tmp_path):
    student, teacher = pair()
    trainer = SFTDistillationTrainer(
        model=student, teacher_model=teacher, args=config(tmp_path, temperature=3.0, alpha=0.7, completion_only_loss=True),
        train_dataset=prompt_completion_chats(), processing_class=chat_tokenizer(),
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    # TRL folded the completion mask into `labels`: the prompt's tokens are -100 there.
    rows = [trainer.train_dataset[i] for i in range(4)]
    prompt_tokens = sum(sum(1 for y in r["labels"] if y == -100) for r in rows)
    assert prompt_tokens >= 4 * 3 and int((batch["labels"] == -100).sum()) >= prompt_tokens
    student.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(student, batch).item()
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = distillation_loss(s, t, batch["labels"], 3.0, 0.7, shift_labels=True, attention_mask=batch["attention_mask"])
    assert loss == pytest.approx(expected.loss.item(), rel=1e-5)
    # Scoring the prompt tokens too would give another value: the mask is what TRL built.
    everything = distillation_loss(s, t, batch["input_ids"], 3.0, 0.7, shift_labels=True, attention_mask=batch["attention_mask"])
    assert everything.loss.item() != pytest.approx(loss, rel=1e-3)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3 and all(h["loss"] == pytest.approx(0.3 * h["hard_loss"] + 0.7 * h["soft_loss"], rel=1e-3) for h in logs)


def test_messages_are_rendered_with_the_chat_template_and_distilled(tmp_path):
    student, teacher = pair()
    tok = chat_tokenizer()
    data = message_chats()
    trainer = SFTDistillationTrainer(
        model=student, teacher_model=teacher, args=config(tmp_path), train_dataset=data, processing_class=tok,
    )
    expected = tok.apply_chat_template(data[0]["messages"], tokenize=True)
    expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
    assert trainer.train_dataset[0]["input_ids"] == list(expected)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    trainer.train()
    assert any(not torch.equal(v, student.state_dict()[k]) for k, v in before.items())
    assert all("soft_loss" in h for h in trainer.state.log_history if "loss" in h)


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed-padding-free"])
def test_cached_teacher_under_sft_equals_the_live_teacher(packing, tmp_path):
    student, teacher = pair()
    kw = dict(train_dataset=message_chats(), processing_class=chat_tokenizer())
    live = SFTDistillationTrainer(model=student, teacher_model=teacher, args=config(tmp_path / "l", packing=packing), **kw)
    cached = SFTDistillationTrainer(
        model=student, teacher_model=teacher, args=config(tmp_path / "c", packing=packing, cache_teacher_logits=True), **kw
    )
    rows = [2, 0, 3] if packing else [7, 1, 4, 10]
    rows = [r for r in rows if r < len(live.train_dataset)]
    live_batch = live.data_collator([live.train_dataset[i] for i in rows])
    cached_batch = cached.data_collator([cached.train_dataset[i] for i in rows])
    if packing:
        assert live_batch["input_ids"].shape[0] == 1 and "position_ids" in live_batch  # one padding-free row
    student.eval()
    with torch.no_grad():
        assert cached.compute_loss(student, cached_batch).item() == pytest.approx(
            live.compute_loss(student, live_batch).item(), rel=1e-4
        )
    cached.train()


def test_pruning_and_qat_callbacks_under_sft_trainer(tmp_path):
    from trl import SFTConfig, SFTTrainer

    from hf_compress.callbacks import GradualPruningCallback, QATCallback
    from hf_compress.pruning.masks import default_targets
    from hf_compress.quantization import QuantizationArguments

    student, teacher = pair()
    targets = default_targets(student)
    assert len(targets) == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 decoder layers
    cfg = dict(output_dir=str(tmp_path / "p"), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-3,
               report_to="none", save_strategy="no", use_cpu=True, logging_steps=1, disable_tqdm=True, bf16=False, max_length=48)
    for trainer_cls, extra in ((SFTTrainer, {}), (SFTDistillationTrainer, {"teacher_model": teacher})):
        model = layer_dropped_student(teacher, [0, 2])
        args = (SFTConfig if trainer_cls is SFTTrainer else SFTDistillationConfig)(**cfg)
        qat = QATCallback(QuantizationArguments(bits=4, qat_fraction=0.5))
        trainer = trainer_cls(
            model=model, args=args, train_dataset=message_chats(), processing_class=chat_tokenizer(),
            callbacks=[GradualPruningCallback(target_sparsity=0.5, end_step=3, frequency=1), qat], **extra,
        )
        trainer.train()
        zeros = sum(int((model.get_parameter(n) == 0).sum()) for n in targets)
        assert zeros == sum(round(0.5 * model.get_parameter(n).numel()) for n in targets), trainer_cls.__name__
        assert qat.num_fake_quantized > 0
        assert not any("parametrizations" in n for n, _ in model.named_parameters())  # fake quantizers removed
