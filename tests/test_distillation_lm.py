"""Causal-LM distillation on the tiny LLaMA: padding alignment of cached logits, per-token logging under gradient
accumulation, padded vocabularies, teacher placement, the cache's dtype, size warning and key."""

import logging
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaForCausalLM

from conftest import VOCAB, tiny_llama_config
from hf_compress.distillation import DistillationArguments, distillation_loss, layer_dropped_student
from hf_compress.distillation import cache as teacher_cache
from hf_compress.distillation.teacher import prepare_teacher
from hf_compress.trainers import DistillationTrainer
from lm_helpers import PadCollator, mixed_length_lm_dataset, tiny_tokenizer

ROWS = [7, 1, 4, 10]  # a training batch that crosses the cache's batches of 5


def args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4, per_device_eval_batch_size=5,
        learning_rate=1e-3, report_to="none", save_strategy="no", use_cpu=True, logging_steps=1, seed=0,
        disable_tqdm=True, remove_unused_columns=False, teacher_cache_dir=str(tmp_path / "cache"),
    )
    base.update(kw)
    return DistillationArguments(**base)


def pair(seed=0, teacher_vocab=VOCAB):
    torch.manual_seed(seed)
    teacher = LlamaForCausalLM(tiny_llama_config(num_hidden_layers=3, vocab_size=teacher_vocab))
    if teacher_vocab != VOCAB:
        return LlamaForCausalLM(tiny_llama_config(num_hidden_layers=2)), teacher
    return layer_dropped_student(teacher, [0, 2]), teacher


@torch.no_grad()
def unpadded_reference(student, teacher, rows, temperature=2.0, alpha=0.5, width=VOCAB):
    """Hard and soft per-token averages with each row run alone (no padding anywhere)."""
    hard = soft = count = 0.0
    for row in rows:
        ids = torch.tensor([row])
        s, t = student(input_ids=ids).logits, teacher(input_ids=ids).logits[..., :width]
        out = distillation_loss(s, t, ids, temperature, alpha, shift_labels=True, num_items_in_batch=1)
        hard, soft, count = hard + out.hard_loss.item(), soft + out.soft_loss.item(), count + len(row) - 1
    return hard / count, soft / count


@pytest.mark.parametrize("with_tokenizer", [True, False], ids=["processing_class", "no-processing_class"])
@pytest.mark.parametrize("with_mask", [True, False], ids=["attention_mask", "no-attention_mask"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_cached_logits_land_on_each_rows_own_tokens(side, with_mask, with_tokenizer, tmp_path):
    student, teacher = pair()
    ds = mixed_length_lm_dataset()
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args(tmp_path, cache_teacher_logits=True), train_dataset=ds,
        data_collator=PadCollator(side, with_mask), processing_class=tiny_tokenizer(side) if with_tokenizer else None,
    )
    features = [trainer.train_dataset[i] for i in ROWS]
    batch = trainer.data_collator(features)
    width = batch["input_ids"].shape[1]
    assert len({len(f["input_ids"]) for f in features}) > 1 and ("attention_mask" in batch) == with_mask
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        span = slice(0, n) if side == "right" else slice(width - n, width)
        with torch.no_grad():
            alone = teacher(input_ids=torch.tensor([f["input_ids"]])).logits[0]
        torch.testing.assert_close(batch["teacher_logits"][i, span], alone, rtol=1e-4, atol=1e-4)
        covered = torch.zeros(width, dtype=torch.bool)
        covered[span] = True
        assert torch.equal(batch["teacher_cache_mask"][i], covered)


@pytest.mark.parametrize(
    "side, with_mask, with_tokenizer",
    [("right", True, True), ("left", True, True), ("left", True, False), ("right", False, False)],
)
def test_cached_and_live_losses_equal_the_unpadded_per_token_average(side, with_mask, with_tokenizer, tmp_path):
    student, teacher = pair()
    ds = mixed_length_lm_dataset()
    kw = dict(data_collator=PadCollator(side, with_mask), processing_class=tiny_tokenizer(side) if with_tokenizer else None)
    live = DistillationTrainer(model=student, teacher_model=teacher, args=args(tmp_path / "l"), train_dataset=ds, **kw)
    cached = DistillationTrainer(
        model=student, teacher_model=teacher, args=args(tmp_path / "c", cache_teacher_logits=True), train_dataset=ds, **kw
    )
    student.eval()
    hard, soft = unpadded_reference(student, teacher, [ds[i]["input_ids"] for i in ROWS])
    expected = 0.5 * hard + 0.5 * soft
    with torch.no_grad():
        live_loss = live.compute_loss(student, live.data_collator([ds[i] for i in ROWS])).item()
        cached_loss = cached.compute_loss(student, cached.data_collator([cached.train_dataset[i] for i in ROWS])).item()
    assert live_loss == pytest.approx(expected, rel=1e-4)
    assert cached_loss == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("cached", [False, True], ids=["live", "cached"])
def test_logged_parts_are_per_token_averages_whatever_gradient_accumulation(cached, tmp_path):
    ds = mixed_length_lm_dataset(n=8, min_len=3, max_len=14, seed=3)  # unequal token counts per micro-batch
    logged = {}
    for bs, ga in ((8, 1), (4, 2), (2, 4)):
        student, teacher = pair()
        if bs == 8:
            hard, soft = unpadded_reference(student, teacher, ds["input_ids"])
        a = args(tmp_path / f"{bs}", max_steps=1, per_device_train_batch_size=bs, gradient_accumulation_steps=ga,
                 cache_teacher_logits=cached)
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=a, train_dataset=ds, data_collator=PadCollator())
        trainer.train()
        logged[ga] = next(h for h in trainer.state.log_history if "loss" in h)
    for ga, log in logged.items():
        # Before the fix the parts logged under accumulation were divided by `ga` once more.
        assert log["hard_loss"] == pytest.approx(hard, rel=1e-4), ga
        assert log["soft_loss"] == pytest.approx(soft, rel=1e-4), ga
        assert log["loss"] == pytest.approx(0.5 * hard + 0.5 * soft, rel=1e-3), ga


def test_padded_teacher_embedding_is_accepted_and_sliced(tmp_path):
    # Same tokenizer (97 tokens), the teacher's head padded to 128 rows as Qwen2.5 pads 151,665 tokens to 152,064.
    student, teacher = pair(teacher_vocab=128)
    ds = mixed_length_lm_dataset()
    tok = tiny_tokenizer()
    for cached in (False, True):
        trainer = DistillationTrainer(
            model=student, teacher_model=teacher, args=args(tmp_path / str(cached), cache_teacher_logits=cached),
            train_dataset=ds, data_collator=PadCollator(), processing_class=tok,
        )
        assert trainer.teacher_width == VOCAB
        student.eval()
        hard, soft = unpadded_reference(student, teacher, [ds[i]["input_ids"] for i in ROWS], width=VOCAB)
        features = [trainer.train_dataset[i] for i in ROWS]
        with torch.no_grad():
            loss = trainer.compute_loss(student, trainer.data_collator(features)).item()
        assert loss == pytest.approx(0.5 * hard + 0.5 * soft, rel=1e-4)
    assert trainer.teacher_cache[0]["length"] * VOCAB == len(trainer.teacher_cache[0]["teacher_logits"])


@pytest.mark.parametrize(
    "student_vocab, teacher_vocab, tokenizer_size, message",
    [
        (90, VOCAB, VOCAB, r"The student has vocab_size 90 but the teacher has 97; the tokenizer has 97 tokens, more "
                           r"than the narrower head; use a teacher with the same tokenizer\."),
        (VOCAB, VOCAB + 1100, VOCAB, r"The student has vocab_size 97 but the teacher has 1197; 1100 rows past the "
                                     r"tokenizer's 97 tokens is more than padding; pass `teacher_tokenizer`"),
    ],
)
def test_real_vocabulary_mismatch_is_refused_naming_both_sizes(student_vocab, teacher_vocab, tokenizer_size, message, tmp_path):
    torch.manual_seed(0)
    student = LlamaForCausalLM(tiny_llama_config(vocab_size=student_vocab))
    teacher = LlamaForCausalLM(tiny_llama_config(vocab_size=teacher_vocab))
    with pytest.raises(ValueError, match=message):
        DistillationTrainer(model=student, teacher_model=teacher, args=args(tmp_path), processing_class=tiny_tokenizer(size=tokenizer_size))


def test_teacher_loaded_with_device_map_is_left_where_it_is(tmp_path):
    from transformers import AutoModelForCausalLM

    student, teacher = pair()
    teacher.save_pretrained(tmp_path / "teacher")
    # A single-device map sets no `hf_device_map`; CPU + disk offload is a real dispatched model on a CPU machine.
    device_map = {"model.embed_tokens": "cpu", "model.layers": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu",
                  "lm_head": "disk"}
    dispatched = AutoModelForCausalLM.from_pretrained(
        tmp_path / "teacher", device_map=device_map, offload_folder=str(tmp_path / "offload"), dtype=torch.float32
    )
    assert dispatched.hf_device_map == device_map

    def refuse(*a, **k):
        raise AssertionError("the trainer moved a teacher placed with device_map")

    dispatched.to = refuse
    trainer = DistillationTrainer(
        model=student, teacher_model=dispatched, args=args(tmp_path, teacher_dtype="bfloat16"),
        train_dataset=mixed_length_lm_dataset(), data_collator=PadCollator(),
    )
    assert trainer.teacher.model.embed_tokens.weight.dtype == torch.float32  # not cast either
    assert trainer.teacher.lm_head.weight.device.type == "meta"  # still offloaded: its hooks load it per forward
    trainer.train()
    assert not trainer.teacher.training


def test_bitsandbytes_teacher_is_left_where_it_is(tmp_path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    student, teacher = pair()
    teacher.save_pretrained(tmp_path / "teacher")
    quantized = AutoModelForCausalLM.from_pretrained(
        tmp_path / "teacher", quantization_config=BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["lm_head"]),
        device_map={"": "cpu"},
    )
    assert quantized.is_loaded_in_8bit
    moved = []
    original_to = quantized.to
    quantized.to = lambda *a, **k: moved.append(a) or original_to(*a, **k)
    trainer = DistillationTrainer(
        model=student, teacher_model=quantized, args=args(tmp_path, teacher_dtype="float16"),
        train_dataset=mixed_length_lm_dataset(), data_collator=PadCollator(),
    )
    trainer.train()
    assert moved == [] and type(trainer.teacher.model.layers[0].mlp.up_proj).__name__ == "Linear8bitLt"


def test_zero3_teacher_is_prepared_as_trl_prepares_reference_models(monkeypatch):
    import trl.models.utils

    _, teacher = pair()
    accelerator = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=3)))
    calls = []
    monkeypatch.setattr(trl.models.utils, "prepare_deepspeed", lambda model, acc: calls.append((model, acc)) or "sharded")
    assert prepare_teacher(teacher, "cpu", None, accelerator=accelerator) == "sharded"
    assert calls == [(teacher, accelerator)] and not teacher.training
    with pytest.raises(ValueError, match=r"^cache_teacher_logits runs the teacher on the main process alone, which a "
                                         r"ZeRO-3-sharded teacher cannot do; train with the live teacher"):
        prepare_teacher(teacher, "cpu", None, accelerator=accelerator, cached=True)


@pytest.mark.parametrize("teacher_dtype, cache_dtype, expected", [
    ("float32", "float16", torch.float16), ("bfloat16", None, torch.bfloat16), ("float32", None, torch.float32),
])
def test_cache_is_stored_in_the_asked_dtype(teacher_dtype, cache_dtype, expected, tmp_path):
    import os

    student, teacher = pair()
    teacher.to(getattr(torch, teacher_dtype))
    ds = mixed_length_lm_dataset()
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args(tmp_path, cache_teacher_logits=True, teacher_cache_dtype=cache_dtype),
        train_dataset=ds, data_collator=PadCollator(),
    )
    tokens = sum(len(r) for r in ds["input_ids"])
    size = os.path.getsize(tmp_path / "cache" / teacher_cache.DATA_FILE)
    per_value = torch.finfo(expected).bits // 8
    assert tokens * VOCAB * per_value <= size < tokens * VOCAB * per_value + 64 * 1024  # values plus Arrow framing
    batch = trainer.data_collator([trainer.train_dataset[i] for i in ROWS])
    assert batch["teacher_logits"].dtype == expected
    for i, row in enumerate(ROWS):
        ids = torch.tensor([ds[row]["input_ids"]])
        with torch.no_grad():
            alone = teacher(input_ids=ids).logits[0].to(expected)
        torch.testing.assert_close(batch["teacher_logits"][i, : ids.shape[1]], alone, rtol=2e-2, atol=2e-2)


def test_full_vocabulary_cache_over_the_bound_warns_once_with_the_fix(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(teacher_cache, "FULL_CACHE_WARN_BYTES", 1000)
    student, teacher = pair()
    with caplog.at_level(logging.WARNING, logger=teacher_cache.__name__):
        DistillationTrainer(
            model=student, teacher_model=teacher, args=args(tmp_path, cache_teacher_logits=True),
            train_dataset=mixed_length_lm_dataset(), data_collator=PadCollator(),
        )
    records = [r for r in caplog.records if r.name == teacher_cache.__name__]
    tokens = sum(len(r) for r in mixed_length_lm_dataset()["input_ids"])
    assert len(records) == 1 and "\n" not in records[0].getMessage()
    assert f"will take {tokens * VOCAB * 4 / 1e9:.2f} GB" in records[0].getMessage()
    assert "set `teacher_logits_top_k=64`" in records[0].getMessage()


def test_cache_key_changes_with_dtype_top_k_teacher_and_data(tmp_path):
    _, teacher = pair()
    ds = mixed_length_lm_dataset()
    base = teacher_cache.cache_key(teacher, ds, "causal-lm", None, 2.0, "float32", VOCAB)
    assert base == teacher_cache.cache_key(teacher, ds, "causal-lm", None, 3.0, "float32", VOCAB)  # raw logits: T-free
    variants = [
        teacher_cache.cache_key(teacher, ds, "causal-lm", None, 2.0, "float16", VOCAB),
        teacher_cache.cache_key(teacher, ds, "causal-lm", 8, 2.0, "float32", VOCAB),
        teacher_cache.cache_key(teacher, ds.select(range(11)), "causal-lm", None, 2.0, "float32", VOCAB),
    ]
    _, other = pair(seed=1)
    variants.append(teacher_cache.cache_key(other, ds, "causal-lm", None, 2.0, "float32", VOCAB))
    assert all(v != base for v in variants)
    # top-k log-probabilities depend on the temperature they were taken at.
    assert teacher_cache.cache_key(teacher, ds, "causal-lm", 8, 2.0, "float32", VOCAB) != teacher_cache.cache_key(
        teacher, ds, "causal-lm", 8, 3.0, "float32", VOCAB)


def test_collator_that_changes_input_ids_is_refused_in_one_line(tmp_path):
    student, teacher = pair()

    def truncating(features):
        return PadCollator()([{k: v[:3] for k, v in f.items()} for f in features])

    with pytest.raises(ValueError, match=r"^The data collator changed the examples' `input_ids` \(truncation, masking or "
                                         r"reordering\), so the cached teacher logits cannot be placed"):
        DistillationTrainer(
            model=student, teacher_model=teacher, args=args(tmp_path, cache_teacher_logits=True),
            train_dataset=mixed_length_lm_dataset(), data_collator=truncating,
        )


def test_cached_training_evaluates_with_the_live_teacher(tmp_path):
    student, teacher = pair()
    ds = mixed_length_lm_dataset()
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args(tmp_path, cache_teacher_logits=True, eval_strategy="steps", eval_steps=2),
        train_dataset=ds, eval_dataset=ds.select(range(5)), data_collator=PadCollator("left"),
    )
    trainer.train()
    student.eval()
    hard, soft = unpadded_reference(student, teacher, ds.select(range(5))["input_ids"])
    metrics = trainer.evaluate()
    assert metrics["eval_hard_loss"] == pytest.approx(hard, rel=1e-4)
    assert metrics["eval_soft_loss"] == pytest.approx(soft, rel=1e-4)
