"""Helpers for the causal-LM distillation tests: a word-level tokenizer for the tiny LLaMA, mixed-length data and
a collator that pads on either side with or without an `attention_mask`."""

from __future__ import annotations

import torch
from datasets import Dataset

from conftest import VOCAB

PAD = 0


def tiny_tokenizer(padding_side: str = "right", size: int = VOCAB):
    """A `PreTrainedTokenizerFast` with `size` tokens (`<pad>`, `<unk>`, `<s>`, `</s>`, then `t4`, `t5`, ...)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3, **{f"t{i}": i for i in range(4, size)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        padding_side=padding_side,
    )


def mixed_length_lm_dataset(n: int = 12, min_len: int = 4, max_len: int = 14, seed: int = 0) -> Dataset:
    """Token rows of different lengths (ids 5..VOCAB-1, never the pad id) with their labels."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(5, VOCAB, (int(torch.randint(min_len, max_len + 1, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]
    return Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows], "labels": rows})


class PadCollator:
    """Pads `input_ids` / `labels` on `side`; keeps `attention_mask` only when `with_mask`."""

    def __init__(self, side: str = "right", with_mask: bool = True):
        self.side, self.with_mask = side, with_mask

    def __call__(self, features):
        length = max(len(f["input_ids"]) for f in features)

        def pad(row, value):
            fill = [value] * (length - len(row))
            return fill + list(row) if self.side == "left" else list(row) + fill

        batch = {
            "input_ids": torch.tensor([pad(f["input_ids"], PAD) for f in features]),
            "labels": torch.tensor([pad(f["labels"], -100) for f in features]),
        }
        if self.with_mask:
            batch["attention_mask"] = torch.tensor([pad([1] * len(f["input_ids"]), 0) for f in features])
        return batch
