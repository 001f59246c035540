"""DistillationTrainer on tiny models: every task, the teacher's handling, the cache, GA, resume, errors."""

import pytest
import torch
from transformers import (
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    LlamaForCausalLM,
    Trainer,
    TrainingArguments,
)

from conftest import VOCAB, random_classification_dataset, random_lm_dataset, tiny_bert_config, tiny_llama_config
from hf_compress.distillation import DistillationArguments, distillation_loss, layer_dropped_student
from hf_compress.trainers import DistillationTrainer

NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=8, learning_rate=1e-3,
        report_to="none", save_strategy="no", use_cpu=True, logging_steps=1, seed=0, disable_tqdm=True,
    )
    base.update(kw)
    return DistillationArguments(**base)


def pair(cls, config_fn, seed=0, **config_kw):
    torch.manual_seed(seed)
    teacher = cls(config_fn(num_hidden_layers=3, **config_kw))
    student = layer_dropped_student(teacher, [0, 2])
    return student, teacher


def token_dataset(n=32, seq=10):
    ds = random_classification_dataset(n, seq, num_labels=3)
    labels = torch.tensor(ds["input_ids"]) % 3
    labels[:, -2:] = -100
    return ds.remove_columns("labels").add_column("labels", labels.tolist())


def qa_dataset(n=32, seq=10):
    ds = random_classification_dataset(n, seq).remove_columns("labels")
    ids = torch.tensor(ds["input_ids"])
    start = ids[:, 0] % 5
    return ds.add_column("start_positions", start.tolist()).add_column("end_positions", (start + 2).tolist())


TASKS = {
    "sequence-classification": (BertForSequenceClassification, tiny_bert_config, lambda: random_classification_dataset()),
    "token-classification": (BertForTokenClassification, lambda **k: tiny_bert_config(num_labels=3, **k), token_dataset),
    "question-answering": (BertForQuestionAnswering, tiny_bert_config, qa_dataset),
    "causal-lm": (LlamaForCausalLM, tiny_llama_config, lambda: random_lm_dataset()),
}


@pytest.mark.parametrize("task", list(TASKS))
def test_every_task_trains_with_frozen_teacher_and_logs_both_parts(task, tmp_path):
    cls, cfg, data = TASKS[task]
    student, teacher = pair(cls, cfg)
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args(tmp_path), train_dataset=data())
    assert trainer.task == task
    trainer.train()
    assert not trainer.teacher.training
    assert all(not p.requires_grad for p in trainer.teacher.parameters())
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_state.items())
    assert any(not torch.equal(v, student.state_dict()[k]) for k, v in student_before.items())
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 4
    for log in logs:
        # The logged loss is the mixture of the logged parts (alpha = 0.5).
        assert log["loss"] == pytest.approx(0.5 * log["hard_loss"] + 0.5 * log["soft_loss"], rel=1e-3, abs=1e-3)


@pytest.mark.parametrize("task", list(TASKS))
def test_compute_loss_equals_the_pure_function(task, tmp_path):
    cls, cfg, data = TASKS[task]
    student, teacher = pair(cls, cfg, **(NO_DROPOUT if cls is not LlamaForCausalLM else {}))
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args(tmp_path, temperature=3.0, alpha=0.7), train_dataset=data()
    )
    batch = trainer.data_collator([data()[i] for i in range(4)])
    student.eval()
    loss = trainer.compute_loss(student, batch)
    with torch.no_grad():
        s = student(**{k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")})
        t = teacher(**{k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")})
    if task == "question-answering":
        parts = [
            distillation_loss(getattr(s, k), getattr(t, k), batch[p], 3.0, 0.7).loss
            for k, p in (("start_logits", "start_positions"), ("end_logits", "end_positions"))
        ]
        expected = (parts[0] + parts[1]) / 2
    else:
        expected = distillation_loss(s.logits, t.logits, batch["labels"], 3.0, 0.7, shift_labels=task == "causal-lm").loss
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_without_labels_pure_soft_distillation(tmp_path):
    student, teacher = pair(LlamaForCausalLM, tiny_llama_config)
    data = random_lm_dataset().remove_columns("labels")
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args(tmp_path, alpha=0.3, remove_unused_columns=False), train_dataset=data,
        data_collator=lambda feats: {k: torch.tensor([f[k] for f in feats]) for k in feats[0]},
    )
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert all("hard_loss" not in log for log in logs)
    assert all(log["loss"] == pytest.approx(log["soft_loss"], rel=1e-3) for log in logs)


def test_cached_teacher_logits_train_exactly_like_the_live_teacher(tmp_path):
    runs = {}
    for cached in (False, True):
        student, teacher = pair(BertForSequenceClassification, tiny_bert_config, **NO_DROPOUT)
        a = args(tmp_path / str(cached), cache_teacher_logits=cached, max_steps=6)
        t = DistillationTrainer(model=student, teacher_model=teacher, args=a, train_dataset=random_classification_dataset())
        if cached:
            assert "teacher_logits" in t.teacher_cache.column_names
            assert "teacher_cache_row" in t.train_dataset.column_names
            t.teacher.forward = None  # the cached run must not call the teacher during training
        t.train()
        runs[cached] = student.state_dict()
    for k, v in runs[False].items():
        torch.testing.assert_close(runs[True][k], v, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("task", ["token-classification", "question-answering", "causal-lm"])
def test_cached_logits_match_live_loss_for_padded_tasks(task, tmp_path):
    cls, cfg, data = TASKS[task]
    kw = NO_DROPOUT if cls is not LlamaForCausalLM else {}
    student, teacher = pair(cls, cfg, **kw)
    ds = data()
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args(tmp_path, cache_teacher_logits=True), train_dataset=ds
    )
    student.eval()
    cached_batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    live_batch = trainer.data_collator.collator([ds[i] for i in range(4)])
    assert trainer.compute_loss(student, cached_batch).item() == pytest.approx(
        trainer.compute_loss(student, live_batch).item(), rel=1e-5
    )


def test_topk_cache_and_cache_dir_reuse(tmp_path):
    student, teacher = pair(LlamaForCausalLM, tiny_llama_config)
    cache_dir = str(tmp_path / "teacher-cache")
    a = args(tmp_path, cache_teacher_logits=True, teacher_logits_top_k=5, teacher_cache_dir=cache_dir)
    t1 = DistillationTrainer(model=student, teacher_model=teacher, args=a, train_dataset=random_lm_dataset())
    row = t1.teacher_cache[0]
    assert row["length"] == 16 and len(row["teacher_logits"]) == 16 * 5 and len(row["teacher_indices"]) == 16 * 5
    t1.train()
    # A second trainer reuses the saved cache instead of running the teacher.
    forward = teacher.forward
    teacher.forward = None
    t2 = DistillationTrainer(model=student, teacher_model=teacher, args=a, train_dataset=random_lm_dataset())
    assert t2.teacher_cache[0]["teacher_indices"] == row["teacher_indices"]
    # Another teacher (changed weights) or another top_k never reuses it.
    teacher.forward = forward
    with torch.no_grad():
        teacher.lm_head.weight.mul_(2)
    t3 = DistillationTrainer(model=student, teacher_model=teacher, args=a, train_dataset=random_lm_dataset())
    assert t3.teacher_cache[0]["teacher_logits"] != row["teacher_logits"]


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    finals = []
    for bs, ga in ((8, 1), (4, 2)):
        student, teacher = pair(LlamaForCausalLM, tiny_llama_config)
        data = random_lm_dataset(16)
        labels = torch.tensor(data["labels"])
        labels[:4, :10] = -100  # unequal token counts across micro-batches
        data = data.remove_columns("labels").add_column("labels", labels.tolist())
        a = args(tmp_path / f"{bs}", max_steps=2, per_device_train_batch_size=bs, gradient_accumulation_steps=ga, optim="sgd", learning_rate=0.5)
        DistillationTrainer(model=student, teacher_model=teacher, args=a, train_dataset=data).train()
        finals.append(student.state_dict())
    for k, v in finals[0].items():
        torch.testing.assert_close(finals[1][k], v, rtol=1e-4, atol=1e-5)


def test_teacher_dtype_and_path_loading(tmp_path):
    student, teacher = pair(BertForSequenceClassification, tiny_bert_config)
    teacher.save_pretrained(tmp_path / "teacher")
    trainer = DistillationTrainer(
        model=student, teacher_model=str(tmp_path / "teacher"), args=args(tmp_path, teacher_dtype="bfloat16"),
        train_dataset=random_classification_dataset(),
    )
    assert next(trainer.teacher.parameters()).dtype == torch.bfloat16
    assert next(student.parameters()).dtype == torch.float32
    trainer.train()
    assert all(torch.isfinite(torch.tensor(log["loss"])) for log in trainer.state.log_history if "loss" in log)


def test_save_evaluate_and_resume(tmp_path):
    student, teacher = pair(BertForSequenceClassification, tiny_bert_config, **NO_DROPOUT)
    a = args(tmp_path, max_steps=6, save_strategy="steps", save_steps=3, eval_strategy="steps", eval_steps=3)
    data = random_classification_dataset()
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=a, train_dataset=data, eval_dataset=data)
    trainer.train()
    evals = [log for log in trainer.state.log_history if "eval_loss" in log]
    assert evals and all("eval_soft_loss" in e and "eval_hard_loss" in e for e in evals)
    trainer.save_model(str(tmp_path / "final"))
    reloaded = BertForSequenceClassification.from_pretrained(tmp_path / "final")
    for k, v in student.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[k], v)
    # Resume from the step-3 checkpoint and land on the same weights.
    student2, teacher2 = pair(BertForSequenceClassification, tiny_bert_config, **NO_DROPOUT)
    t2 = DistillationTrainer(model=student2, teacher_model=teacher2, args=a, train_dataset=data, eval_dataset=data)
    t2.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-3"))
    for k, v in student.state_dict().items():
        torch.testing.assert_close(student2.state_dict()[k], v, rtol=1e-5, atol=1e-6)


def test_vocab_mismatch_is_a_clear_error(tmp_path):
    torch.manual_seed(0)
    student = LlamaForCausalLM(tiny_llama_config())
    teacher = LlamaForCausalLM(tiny_llama_config(vocab_size=VOCAB + 4))
    with pytest.raises(ValueError, match=f"The student has vocab_size {VOCAB} but the teacher has {VOCAB + 4}; use a teacher with the same tokenizer"):
        DistillationTrainer(model=student, teacher_model=teacher, args=args(tmp_path))


def test_label_count_and_label_name_mismatch(tmp_path):
    student = BertForSequenceClassification(tiny_bert_config())
    with pytest.raises(ValueError, match="The student has num_labels 2 but the teacher has 3"):
        DistillationTrainer(model=student, teacher_model=BertForSequenceClassification(tiny_bert_config(num_labels=3)), args=args(tmp_path))
    s = BertForSequenceClassification(tiny_bert_config(id2label={0: "neg", 1: "pos"}))
    t = BertForSequenceClassification(tiny_bert_config(id2label={0: "pos", 1: "neg"}))
    with pytest.raises(ValueError, match="labels .* differ from the teacher's"):
        DistillationTrainer(model=s, teacher_model=t, args=args(tmp_path))


def test_tokenizer_mismatch(tmp_path):
    from transformers import BertTokenizerFast

    def tok(words, d):
        d.mkdir()
        (d / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]))
        return BertTokenizerFast(vocab=str(d / "vocab.txt"))

    student, teacher = pair(BertForSequenceClassification, tiny_bert_config)
    with pytest.raises(ValueError, match=r"tokenizer \(7 tokens\) and the teacher's \(7 tokens\) map 2 tokens to different ids; use a teacher with the same tokenizer"):
        DistillationTrainer(
            model=student, teacher_model=teacher, args=args(tmp_path), processing_class=tok(["a", "b"], tmp_path / "s"),
            teacher_tokenizer=tok(["b", "a"], tmp_path / "t"),
        )


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"temperature": -1.0}, "temperature must be > 0, got -1.0"),
        ({"alpha": 2.0}, r"alpha must be in \[0, 1\], got 2.0"),
        ({"teacher_logits_top_k": 0, "cache_teacher_logits": True}, "teacher_logits_top_k must be >= 1, got 0"),
        ({"teacher_logits_top_k": 8}, "only applies to cached logits; set `cache_teacher_logits=True`"),
        ({"teacher_dtype": "int3"}, "teacher_dtype must be one of float32, bfloat16, float16, got 'int3'"),
        ({"distillation_task": "vision"}, "distillation_task must be one of .*got 'vision'"),
    ],
)
def test_bad_arguments(kw, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        args(tmp_path, **kw)


def test_wrong_argument_types(tmp_path, tiny_bert):
    with pytest.raises(TypeError, match="needs `DistillationArguments`, got `TrainingArguments`"):
        DistillationTrainer(model=tiny_bert, teacher_model=tiny_bert, args=TrainingArguments(str(tmp_path), report_to="none"))
    with pytest.raises(ValueError, match="needs a `teacher_model`"):
        DistillationTrainer(model=tiny_bert, args=args(tmp_path))
    with pytest.raises(ValueError, match="Cannot load the teacher '/no/such/teacher'"):
        DistillationTrainer(model=tiny_bert, teacher_model="/no/such/teacher", args=args(tmp_path))


def test_layer_dropped_student_copies_the_chosen_layers():
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(tiny_bert_config(num_hidden_layers=4))
    student = layer_dropped_student(teacher, [1, 3])
    assert student.config.num_hidden_layers == 2 and teacher.config.num_hidden_layers == 4
    torch.testing.assert_close(student.bert.encoder.layer[1].output.dense.weight, teacher.bert.encoder.layer[3].output.dense.weight)
    with pytest.raises(ValueError, match=r"keep_layers must be distinct layer indices in \[0, 4\), got \[0, 4\]"):
        layer_dropped_student(teacher, [0, 4])


def test_plain_trainer_is_unaffected(tmp_path, tiny_bert):
    # The subclass changes nothing for users of the base class (a sanity check on shared state).
    Trainer(model=tiny_bert, args=TrainingArguments(str(tmp_path), max_steps=1, report_to="none", use_cpu=True), train_dataset=random_classification_dataset()).train()
