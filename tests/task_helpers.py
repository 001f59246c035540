"""Tiny models and small data files for the four `hf-compress` tasks (fast end-to-end tests)."""

from __future__ import annotations

import json
import os
import random

import torch

WORDS = ["good", "great", "fine", "fun", "bad", "awful", "dull", "poor", "the", "movie", "was", "a", "plot", "film",
         "alice", "bob", "paris", "rome", "met", "in", "who", "where", "did", "go", "to", "went", "is", "?", "."]
PEOPLE = ["alice", "bob"]
PLACES = ["paris", "rome"]
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


def tiny_tokenizer(folder):
    """A WordPiece tokenizer over `WORDS` (plus `##bob`, so `alicebob` splits into two pieces). transformers 5 reads
    the vocabulary from `vocab=` (a `vocab_file=` argument is ignored and every word becomes `[UNK]`)."""
    from transformers import BertTokenizerFast

    os.makedirs(folder, exist_ok=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + ["##bob"]
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}, do_lower_case=True)
    assert tok.tokenize("alice went")[0] == "alice"
    return tok


def make_tiny(folder, kind: str, num_labels: int = 2, id2label: dict | None = None) -> str:
    """A 2-layer model (hidden 64: bitsandbytes' CPU 4-bit kernels need rows of 64) of `kind`: `token`, `qa`,
    `causal` (Llama, with a chat template on its tokenizer) or `seq`; saved with its tokenizer in `folder`."""
    from transformers import (BertConfig, BertForQuestionAnswering, BertForSequenceClassification,
                              BertForTokenClassification, LlamaConfig, LlamaForCausalLM)

    tok = tiny_tokenizer(folder)
    torch.manual_seed(0)
    if kind == "causal":
        tok.chat_template = CHAT_TEMPLATE
        tok.eos_token = "[SEP]"
        config = LlamaConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128,
                             tie_word_embeddings=False, eos_token_id=tok.sep_token_id, pad_token_id=0)
        model = LlamaForCausalLM(config)
    else:
        kw = dict(id2label=id2label, label2id={v: k for k, v in id2label.items()}) if id2label else {}
        config = BertConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=128, max_position_embeddings=128, num_labels=num_labels, **kw)
        cls = {"token": BertForTokenClassification, "qa": BertForQuestionAnswering, "seq": BertForSequenceClassification}[kind]
        model = cls(config)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def write_jsonl(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return str(path)


def ner_rows(n: int = 80, seed: int = 0) -> list[dict]:
    """Sentences where people are `B-PER` and places `B-LOC`: learnable from the word alone."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        who, where = rng.choice(PEOPLE), rng.choice(PLACES)
        words = [who, rng.choice(["met", "went"]), rng.choice(["bob", "alice"]), "in", where, "."]
        tags = ["B-PER", "O", "B-PER", "O", "B-LOC", "O"]
        rows.append({"tokens": words, "tags": tags})
    return rows


def qa_rows(n: int = 64, seed: int = 0) -> list[dict]:
    """SQuAD-format rows whose answer is the place in the context."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        who, where = rng.choice(PEOPLE), rng.choice(PLACES)
        filler = " ".join(rng.choice(["the", "movie", "was", "good", "a", "plot"]) for _ in range(rng.randrange(2, 8)))
        context = f"{filler} {who} went to {where} ."
        rows.append({"id": str(i), "question": f"where did {who} go ?", "context": context,
                     "answers": {"text": [where], "answer_start": [context.index(f"to {where}") + 3]}})
    return rows


def lm_texts(n: int = 60, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join([rng.choice(PEOPLE), "went", "to", rng.choice(PLACES), "."] * 3) for _ in range(n)]


def onnx_tokenizer(folder, family: str):
    """`tiny_tokenizer` for an ONNX export of `family`: only BERT takes `token_type_ids`, so the decoder families
    (Llama, Qwen2) get a tokenizer without them, as the graph's inputs."""
    tok = tiny_tokenizer(folder)
    if family != "bert":
        tok.model_input_names = ["input_ids", "attention_mask"]
    return tok


def onnx_batch(family: str, seed: int = 3) -> dict:
    """A batch of 4 x 13 ids, two rows right-padded (from 6 and from 9) and, for BERT, two segments: another shape,
    other padding and segment ids than the batch an export traces and probes with."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (4, 13), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[3, 9:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    if family == "bert":
        batch["token_type_ids"] = (torch.arange(13) >= 7).long().expand(4, 13).contiguous()
    return batch
