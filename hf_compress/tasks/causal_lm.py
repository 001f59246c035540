"""Causal language modelling: plain text tokenized and grouped into blocks, or chat `messages` rendered with the
tokenizer's chat template; perplexity and next-token accuracy."""

from __future__ import annotations

import math

import torch

from .base import CompressionInputError, Task, batched_outputs, is_string_feature, pick_column
from .layout import LogitLayout

TEXT_COLUMNS = ("text", "content", "document", "story", "body")
MESSAGES_COLUMNS = ("messages", "conversations")
IGNORE = -100


class CausalLMTask(Task):
    name = "causal-lm"
    auto_class = "AutoModelForCausalLM"
    class_suffixes = ("ForCausalLM", "LMHeadModel")
    mapping_names = "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"
    optimum_tasks = ("text-generation", "text-generation-with-past")
    pipeline_tag = "text-generation"
    metric_names = ("perplexity", "token_accuracy")
    lower_is_better = ("perplexity",)
    # Next-token logits over the vocabulary, averaged over the accumulated batch's tokens.
    logit_layout = LogitLayout(classes="vocabulary", shift_labels=True, token_average=True)

    def resolve(self, train, evaluation, eval_split):
        da, name = self.data_args, self.dataset_name
        columns = train.column_names
        messages = None if da.text_column else next((c for c in MESSAGES_COLUMNS if c in columns), None)
        if messages is not None:
            self.columns = {"messages": messages}
        else:
            text = pick_column(columns, da.text_column, TEXT_COLUMNS, "text", "--text_column", name, required=False)
            text = text or next((c for c in columns if is_string_feature(train.features[c])), None)
            if text is None:
                raise CompressionInputError(
                    f"Dataset {name!r} has no text or `messages` column (columns: {', '.join(columns)}); pass `--text_column`."
                )
            self.columns = {"text": text}
        col = next(iter(self.columns.values()))
        if col not in evaluation.column_names:
            raise CompressionInputError(f"The held-out split {eval_split!r} has no {col!r} column; add it.")
        return self._clean(train, "train"), self._clean(evaluation, "eval")

    def _clean(self, ds, split):
        col = next(iter(self.columns.values()))
        n = len(ds)
        if "messages" in self.columns:
            ds = ds.filter(lambda r: isinstance(r[col], list) and len(r[col]) > 0)
        else:
            ds = ds.filter(lambda r: isinstance(r[col], str) and r[col].strip() != "")
        self._note(split, dropped_empty=n - len(ds))
        if not len(ds):
            raise CompressionInputError(f"Every row of the {split} split has an empty `{col}`; pass some text.")
        return ds.select_columns([col])

    def check_tokenizer(self, tokenizer):
        if "messages" in self.columns and not getattr(tokenizer, "chat_template", None):
            raise CompressionInputError(
                "The data has chat `messages` but the tokenizer has no chat template; use a chat model or plain text."
            )

    def prepare_tokenizer(self, tokenizer):
        if tokenizer.pad_token is None:  # only used to pad a last short block; those positions carry no loss
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        return tokenizer

    def _render(self, batch, tokenizer):
        if "messages" not in self.columns:
            return batch[self.columns["text"]]
        if not getattr(tokenizer, "chat_template", None):
            raise CompressionInputError(
                "The data has chat `messages` but the tokenizer has no chat template; use a chat model or plain text."
            )
        out = []
        for conv in batch[self.columns["messages"]]:
            try:
                out.append(tokenizer.apply_chat_template(conv, tokenize=False))
            except Exception as err:
                raise CompressionInputError(
                    f"Cannot render a `messages` row with the chat template ({type(err).__name__}: {err}); each message "
                    "needs `role` and `content`."
                ) from None
        return out

    def preprocess(self, dataset, tokenizer, train):
        block = self.data_args.max_length
        eos = tokenizer.eos_token_id

        def fn(batch):
            # Documents are joined with the end-of-sequence token between them and cut into blocks of `max_length`:
            # no padding, every position trains. The last, shorter block of a batch is kept (padded in the collator).
            ids = []
            for ex in tokenizer(self._render(batch, tokenizer), add_special_tokens=True)["input_ids"]:
                ids.extend(ex + ([eos] if eos is not None and (not ex or ex[-1] != eos) else []))
            blocks = [ids[i : i + block] for i in range(0, len(ids), block)]
            blocks = [b for b in blocks if len(b) > 1]
            return {"input_ids": blocks, "attention_mask": [[1] * len(b) for b in blocks], "labels": [list(b) for b in blocks]}

        ds = dataset.map(fn, batched=True, batch_size=1000, remove_columns=dataset.column_names, desc="Tokenizing")
        self._note("train" if train else "eval", blocks=len(ds), tokens=sum(len(x) for x in ds["input_ids"]))
        return ds

    def collator(self, tokenizer):
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

        def collate(rows):
            width = max(len(r["input_ids"]) for r in rows)

            def padded(key, value):
                return torch.tensor([list(r[key]) + [value] * (width - len(r[key])) for r in rows])

            return {"input_ids": padded("input_ids", pad), "attention_mask": padded("attention_mask", 0),
                    "labels": padded("labels", IGNORE)}

        return collate

    def evaluate(self, model, features, tokenizer, examples=None, batch_size=8, desc="Evaluating"):
        nll, correct, count = 0.0, 0, 0
        cols = ["input_ids", "attention_mask", "labels"]
        for batch, out in batched_outputs(model, features.select_columns(cols), self.collator(tokenizer), batch_size, desc):
            logits = out.logits[:, :-1].float()
            target = batch["labels"][:, 1:]
            mask = target != IGNORE
            nll += float(torch.nn.functional.cross_entropy(logits[mask], target[mask], reduction="sum"))
            correct += int((logits.argmax(-1)[mask] == target[mask]).sum())
            count += int(mask.sum())
        if count == 0:
            raise CompressionInputError("The held-out split has no token to predict; pass longer texts.")
        return {"perplexity": round(math.exp(nll / count), 4), "token_accuracy": round(correct / count, 6)}
