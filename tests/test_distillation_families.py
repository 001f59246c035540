"""Distillation across model families, tasks and collators: the vocabulary check for every task, the cached top-k
teacher on padded batches from a user collator, and student == teacher giving zero soft loss in every family."""

import copy

import pytest
import torch
import transformers
from datasets import Dataset

from conftest import VOCAB, tiny_bert_config
from hf_compress.distillation import DistillationArguments, distillation_loss, teacher_top_k
from hf_compress.distillation.cache import reads_absolute_positions
from hf_compress.distillation.teacher import check_compatible, input_vocabulary_rows
from hf_compress.trainers import DistillationTrainer

PAD = 0
ROWS = [7, 1, 4, 10]  # a training batch that crosses the cache's batches of 5
TOP_K = 8
CAUSAL, SEQ, TOKEN, QA = "causal-lm", "sequence-classification", "token-classification", "question-answering"


def args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4, per_device_eval_batch_size=5,
        learning_rate=1e-3, report_to="none", save_strategy="no", use_cpu=True, logging_steps=1, seed=0,
        disable_tqdm=True, remove_unused_columns=False, teacher_cache_dir=str(tmp_path / "cache"),
    )
    base.update(kw)
    return DistillationArguments(**base)


# ---- tiny models of every family ------------------------------------------------------------------------------

_DECODER = dict(
    vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=64, max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=PAD,
)
_ENCODER = dict(
    vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
    max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=PAD,
)
# family -> (config class, model class prefix, config kwargs)
FAMILIES = {
    "llama": ("LlamaConfig", "Llama", _DECODER),
    "mistral": ("MistralConfig", "Mistral", _DECODER),
    "qwen2": ("Qwen2Config", "Qwen2", _DECODER),
    "qwen3": ("Qwen3Config", "Qwen3", dict(_DECODER, head_dim=8)),
    "gemma2": ("Gemma2Config", "Gemma2", dict(_DECODER, head_dim=8, sliding_window=4)),
    "gemma3": ("Gemma3TextConfig", "Gemma3", dict(_DECODER, head_dim=8, sliding_window=4)),
    "phi3": ("Phi3Config", "Phi3", _DECODER),
    "gpt2": ("GPT2Config", "GPT2", dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=PAD)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoX", dict(_DECODER, num_key_value_heads=4, hidden_dropout=0.0,
                                                  attention_dropout=0.0)),
    "olmo2": ("Olmo2Config", "Olmo2", _DECODER),
    "stablelm": ("StableLmConfig", "StableLm", _DECODER),
    "cohere": ("CohereConfig", "Cohere", _DECODER),
    "bert": ("BertConfig", "Bert", _ENCODER),
    "roberta": ("RobertaConfig", "Roberta", dict(_ENCODER, pad_token_id=1, max_position_embeddings=66)),
    "deberta_v2": ("DebertaV2Config", "DebertaV2", _ENCODER),
}
_HEADS = {CAUSAL: "ForCausalLM", SEQ: "ForSequenceClassification", TOKEN: "ForTokenClassification",
          QA: "ForQuestionAnswering"}
_CAUSAL_CLASS = {"gpt2": "GPT2LMHeadModel"}
CASES = (
    [(f, CAUSAL) for f in FAMILIES if f not in ("bert", "roberta", "deberta_v2")]
    + [(f, task) for f in ("bert", "roberta", "deberta_v2") for task in (SEQ, TOKEN, QA)]
    + [("llama", SEQ), ("qwen2", SEQ)]  # decoder classifiers: the score head reads the last real token
)


def randomise_norms_and_biases(model, seed: int = 0):
    """Norm weights in [0.5, 1.5] and biases ~ N(0, 0.1), so a formula that ignores them cannot pass."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() != 1:
                continue
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            else:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    return model


def build(family: str, task: str, num_labels: int = 3, **kw):
    config_cls, prefix, base = FAMILIES[family]
    num_labels = 2 if task == QA else num_labels  # start and end
    config = getattr(transformers, config_cls)(**{**base, "num_labels": num_labels, **kw})
    cls = _CAUSAL_CLASS.get(family, prefix + _HEADS[task]) if task == CAUSAL else prefix + _HEADS[task]
    torch.manual_seed(0)
    return randomise_norms_and_biases(getattr(transformers, cls)(config)).eval()


# ---- mixed-length data and a collator that only pads -------------------------------------------------------------


def mixed_dataset(task: str, n: int = 12, min_len: int = 4, max_len: int = 14, seed: int = 0) -> Dataset:
    """Rows of 4..14 token ids (5..VOCAB-1, never a pad id) with the task's labels."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(5, VOCAB, (int(torch.randint(min_len, max_len + 1, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]
    data = {"input_ids": rows}
    if task == CAUSAL:
        data["labels"] = rows
    elif task == TOKEN:
        data["labels"] = [[t % 3 for t in r] for r in rows]
    elif task == SEQ:
        data["labels"] = [r[0] % 3 for r in rows]
    else:
        data["start_positions"] = [r[0] % len(r) for r in rows]
        data["end_positions"] = [len(r) - 1 for r in rows]
    return Dataset.from_dict(data)


class PadCollator:
    """Pads `input_ids` (with `pad_id`) and per-token `labels` (with -100) on `side`, with an `attention_mask`:
    a user collator, not a tokenizer's."""

    def __init__(self, side: str = "right", pad_id: int = PAD):
        self.side, self.pad_id = side, pad_id

    def __call__(self, features):
        length = max(len(f["input_ids"]) for f in features)

        def pad(row, value):
            fill = [value] * (length - len(row))
            return fill + list(row) if self.side == "left" else list(row) + fill

        batch = {
            "input_ids": torch.tensor([pad(f["input_ids"], self.pad_id) for f in features]),
            "attention_mask": torch.tensor([pad([1] * len(f["input_ids"]), 0) for f in features]),
        }
        for key in ("labels", "start_positions", "end_positions"):
            if key in features[0]:
                values = [f[key] for f in features]
                batch[key] = torch.tensor([pad(v, -100) for v in values] if isinstance(values[0], list) else values)
        return batch


# ---- 1. the vocabulary check, every task ---------------------------------------------------------------------


@pytest.mark.parametrize("task", [SEQ, TOKEN, QA])
def test_teacher_with_another_vocabulary_is_refused_for_every_task(task, tmp_path):
    # A BERT student and a RoBERTa-sized teacher (more embedding rows): the teacher would read BERT ids as its own.
    student = build("bert", task)
    teacher = build("roberta", task, vocab_size=VOCAB + 1200)
    message = (rf"The student has input-embedding size \(`get_input_embeddings\(\).num_embeddings`\) {VOCAB} but the "
               rf"teacher has {VOCAB + 1200}; use a teacher with the same tokenizer")
    with pytest.raises(ValueError, match=message):
        DistillationTrainer(model=student, teacher_model=teacher, args=args(tmp_path), train_dataset=mixed_dataset(task))
    # Before any step: the check is a function of the two models.
    with pytest.raises(ValueError, match=message):
        check_compatible(student, teacher, task)


@pytest.mark.parametrize("task", [SEQ, TOKEN, QA])
def test_teacher_vocabulary_gap_beyond_padding_is_refused_even_with_a_tokenizer(task, tmp_path):
    from lm_helpers import tiny_tokenizer

    student, teacher = build("bert", task), build("roberta", task, vocab_size=VOCAB + 1200)
    with pytest.raises(ValueError, match=rf"\) {VOCAB} but the teacher has {VOCAB + 1200}; 1200 rows past the "
                                         rf"tokenizer's {VOCAB} tokens is more than padding"):
        DistillationTrainer(model=student, teacher_model=teacher, args=args(tmp_path), processing_class=tiny_tokenizer())


@pytest.mark.parametrize("task", [SEQ, TOKEN, QA])
def test_teacher_with_the_same_vocabulary_is_accepted_for_every_task(task, tmp_path):
    student, teacher = build("bert", task), build("roberta", task)
    assert input_vocabulary_rows(student) == input_vocabulary_rows(teacher) == VOCAB
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args(tmp_path), train_dataset=mixed_dataset(task),
        data_collator=PadCollator(),
    )
    assert trainer.teacher_width is None


def test_padded_teacher_embedding_is_accepted_for_an_encoder_with_its_tokenizer(tmp_path):
    # DeBERTa-v3 style: 128,100 embedding rows for a 128,001-token tokenizer. 31 padding rows here.
    from lm_helpers import tiny_tokenizer

    student, teacher = build("bert", TOKEN), build("bert", TOKEN, vocab_size=128)
    DistillationTrainer(model=student, teacher_model=teacher, args=args(tmp_path), processing_class=tiny_tokenizer())
    with pytest.raises(ValueError, match=rf"input-embedding size .* {VOCAB} but the teacher has 128; use a teacher"):
        DistillationTrainer(model=student, teacher_model=teacher, args=args(tmp_path))


# ---- 2. the cached top-k teacher on padded batches from a user collator -----------------------------------------


@torch.no_grad()
def unpadded_top_k_loss(student, teacher, features, task, temperature=2.0, alpha=0.5):
    """The per-token loss with each row run alone (no padding anywhere) and the teacher truncated to its top k."""
    hard = soft = count = 0.0
    for f in features:
        ids, labels = torch.tensor([f["input_ids"]]), torch.tensor([f["labels"]])
        logp, idx = teacher_top_k(teacher(input_ids=ids).logits, TOP_K, temperature)
        out = distillation_loss(student(input_ids=ids).logits, logp, labels, temperature, alpha,
                                shift_labels=task == CAUSAL, num_items_in_batch=1, teacher_indices=idx)
        hard, soft = hard + out.hard_loss.item(), soft + out.soft_loss.item()
        count += len(f["input_ids"]) - (task == CAUSAL)
    return (1 - alpha) * hard / count + alpha * soft / count


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("task", [CAUSAL, TOKEN])
def test_top_k_cache_with_a_padding_user_collator_equals_the_live_top_k_loss_and_trains(task, side, tmp_path):
    family = "llama" if task == CAUSAL else "bert"
    teacher = build(family, task)
    student = build(family, task, num_hidden_layers=1)
    ds = mixed_dataset(task)
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, train_dataset=ds, data_collator=PadCollator(side),
        args=args(tmp_path, cache_teacher_logits=True, teacher_logits_top_k=TOP_K),
    )
    assert trainer.processing_class is None
    features = [trainer.train_dataset[i] for i in ROWS]
    assert len({len(f["input_ids"]) for f in features}) > 1  # rows of mixed lengths: some are padded
    batch = trainer.data_collator(features)
    student.eval()
    with torch.no_grad():
        cached = trainer.compute_loss(student, batch).item()
    # Each row scores as it would alone: neither the padding nor the batch the cache computed it in shows.
    assert cached == pytest.approx(unpadded_top_k_loss(student, teacher, features, task), rel=1e-5)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    trainer.train()
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.state.log_history if "loss" in h)
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("task", [CAUSAL, TOKEN])
def test_top_k_cache_gives_zero_soft_loss_when_the_student_is_the_teacher(task, side, tmp_path):
    family = "llama" if task == CAUSAL else "bert"
    teacher = build(family, task)
    student = copy.deepcopy(teacher)
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, train_dataset=mixed_dataset(task), data_collator=PadCollator(side),
        args=args(tmp_path, cache_teacher_logits=True, teacher_logits_top_k=TOP_K, alpha=1.0),
    )
    with torch.no_grad():
        soft = trainer.compute_loss(student, trainer.data_collator([trainer.train_dataset[i] for i in ROWS])).item()
    assert abs(soft) <= 1e-6


# ---- 4. student == teacher: zero soft loss in every family, live and cached ----------------------------------------


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("family, task", CASES, ids=[f"{f}-{t}" for f, t in CASES])
def test_student_equal_to_the_teacher_gives_zero_soft_loss(family, task, side, tmp_path):
    teacher = build(family, task)
    student = copy.deepcopy(teacher)
    ds = mixed_dataset(task)
    collator = PadCollator(side, pad_id=teacher.config.pad_token_id)
    losses = {}
    for mode, extra in (("live", {}), ("cache-full", dict(cache_teacher_logits=True)),
                        ("cache-top-k", dict(cache_teacher_logits=True, teacher_logits_top_k=TOP_K))):
        trainer = DistillationTrainer(
            model=student, teacher_model=teacher, train_dataset=ds, data_collator=collator,
            args=args(tmp_path / mode, alpha=1.0, **extra),
        )
        batch = trainer.data_collator([trainer.train_dataset[i] for i in ROWS])
        student.eval()
        with torch.no_grad():
            losses[mode] = trainer.compute_loss(student, batch).item()
    for mode, soft in losses.items():
        assert abs(soft) <= 1e-6, (mode, soft)
    # The loss is not zero for a reason that hides a wrong formula: a different student has a positive soft loss
    # (small for Cohere, whose `logit_scale` 0.0625 shrinks every logit).
    other = build(family, task, num_hidden_layers=1)
    trainer = DistillationTrainer(model=other, teacher_model=teacher, train_dataset=ds, data_collator=collator,
                                  args=args(tmp_path / "other", alpha=1.0))
    with torch.no_grad():
        assert trainer.compute_loss(other, collator([ds[i] for i in ROWS])).item() > 1e-5


def test_only_absolute_position_tables_from_zero_get_unpadded_positions():
    # RoBERTa counts positions from its padding id (given positions would be read at the wrong offset); rotary
    # models are relative. Only BERT-style and GPT-2-style tables are shifted by left padding.
    found = {f: reads_absolute_positions(build(f, CAUSAL if f in ("gpt2", "llama", "gpt_neox") else TOKEN))
             for f in ("bert", "deberta_v2", "gpt2", "roberta", "llama", "gpt_neox")}
    assert found == {"bert": True, "deberta_v2": True, "gpt2": True, "roberta": False, "llama": False, "gpt_neox": False}


@pytest.mark.parametrize("task", [SEQ, TOKEN, QA])
def test_teacher_path_whose_tokenizer_maps_ids_differently_is_refused(task, tmp_path):
    # Same embedding size, so only the tokenizers tell: the one saved with the teacher is loaded and compared.
    from transformers import BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(VOCAB - 5)]
    student_tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(words)})
    swapped = words[:5] + words[6:7] + words[5:6] + words[7:]
    teacher = build("roberta", task)
    teacher.save_pretrained(tmp_path / "teacher")
    BertTokenizerFast(vocab={w: i for i, w in enumerate(swapped)}).save_pretrained(tmp_path / "teacher")
    with pytest.raises(ValueError, match=rf"tokenizer \({VOCAB} tokens\) and the teacher's \({VOCAB} tokens\) map 2 "
                                         r"tokens to different ids; use a teacher with the same tokenizer"):
        DistillationTrainer(model=build("bert", task), teacher_model=str(tmp_path / "teacher"), args=args(tmp_path),
                            processing_class=student_tok)
    # The same tokenizer saved with it: accepted.
    student_tok.save_pretrained(tmp_path / "teacher")
    DistillationTrainer(model=build("bert", task), teacher_model=str(tmp_path / "teacher"), args=args(tmp_path),
                        processing_class=student_tok)
