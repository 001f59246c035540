"""Token classification (NER, POS): word-level tags aligned to word pieces, entity-level F1 with seqeval."""

from __future__ import annotations

from .base import CompressionInputError, LabelledTask, batched_outputs, encode_labels, pick_column
from .layout import LogitLayout

TOKENS_COLUMNS = ("tokens", "words")
TAGS_COLUMNS = ("ner_tags", "tags", "labels", "label", "pos_tags", "chunk_tags")
IGNORE = -100


class TokenClassificationTask(LabelledTask):
    label_key = "tags"
    label_noun = "tags"
    name = "token-classification"
    auto_class = "AutoModelForTokenClassification"
    class_suffixes = ("ForTokenClassification",)
    mapping_names = "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES"
    optimum_tasks = ("token-classification",)
    pipeline_tag = "token-classification"
    # seqeval's entity-level F1 first: the standard NER figure; `accuracy` is per word.
    metric_names = ("f1", "precision", "recall", "accuracy")
    # One distribution over the tags per token, averaged over the accumulated batch's labelled tokens.
    logit_layout = LogitLayout(token_average=True)

    def resolve(self, train, evaluation, eval_split):
        import datasets

        da, name = self.data_args, self.dataset_name
        columns = train.column_names
        tokens = pick_column(columns, da.text_column, TOKENS_COLUMNS, "tokens (list of words)", "--text_column", name)
        tags = pick_column(columns, da.label_column, TAGS_COLUMNS, "tags (list of tags)", "--label_column", name)
        for col in (tokens, tags):
            if not isinstance(train.features[col], (datasets.Sequence, datasets.List)):
                raise CompressionInputError(
                    f"Column {col!r} holds one value per row, not a list per sentence; token classification "
                    "needs a list of words and a list of tags per row (JSONL: {\"tokens\": [...], \"tags\": [...]})."
                )
        if tags not in evaluation.column_names:
            raise CompressionInputError(f"The held-out split {eval_split!r} has no tags column {tags!r}; add the tags.")
        self.columns = {"tokens": tokens, "tags": tags}
        inner = getattr(train.features[tags], "feature", None)
        flat = [t for row in train[tags] for t in row]
        held = [t for row in evaluation[tags] for t in row]
        names, index = encode_labels(flat, held, tags, eval_split, inner)
        self.label_names = names
        return self._clean(train, index, "train"), self._clean(evaluation, index, "eval")

    def _clean(self, ds, index, split):
        tokens, tags = self.columns["tokens"], self.columns["tags"]
        n = len(ds)
        ds = ds.filter(lambda r: bool(r[tokens]) and r[tags] is not None and len(r[tokens]) == len(r[tags]))
        self._note(split, dropped_empty_or_misaligned=n - len(ds))
        if not len(ds):
            raise CompressionInputError(
                f"No row of the {split} split has as many `{tags}` as `{tokens}`; each word needs one tag."
            )
        return ds.map(lambda r: {"words": [str(w) for w in r[tokens]], "tag_ids": [index[t] for t in r[tags]]},
                      remove_columns=ds.column_names)

    def preprocess(self, dataset, tokenizer, train):
        max_length = self.data_args.max_length
        split = "train" if train else "eval"

        def fn(batch):
            enc = tokenizer(batch["words"], is_split_into_words=True, truncation=True, max_length=max_length)
            labels, truncated = [], []
            for i, tags in enumerate(batch["tag_ids"]):
                word_ids = enc.word_ids(i)
                row, prev = [], None
                for w in word_ids:
                    # The first word piece of a word carries its tag; the other pieces and special tokens are ignored.
                    row.append(tags[w] if w is not None and w != prev else IGNORE)
                    prev = w
                labels.append(row)
                seen = [w for w in word_ids if w is not None]
                truncated.append((max(seen) + 1 if seen else 0) < len(tags))
            enc["labels"] = labels
            enc["truncated"] = truncated
            return enc

        return self._tokenize(dataset, fn, split)

    def collator(self, tokenizer):
        from transformers import DataCollatorForTokenClassification

        return DataCollatorForTokenClassification(tokenizer)

    def prepare_tokenizer(self, tokenizer):
        # Byte-level BPE tokenizers (RoBERTa, GPT-2) need a prefix space to take pre-split words.
        if hasattr(tokenizer, "add_prefix_space") and getattr(tokenizer, "add_prefix_space", None) is False:
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(tokenizer.name_or_path, add_prefix_space=True)
        return tokenizer

    def evaluate(self, model, features, tokenizer, examples=None, batch_size=32, desc="Evaluating"):
        from ..metrics import load_metric

        cols = [c for c in ("input_ids", "attention_mask", "token_type_ids", "labels") if c in features.column_names]
        preds, refs = [], []
        names = self.label_names
        for batch, out in batched_outputs(model, features.select_columns(cols), self.collator(tokenizer), batch_size, desc):
            p = out.logits.argmax(-1).cpu().numpy()
            labels = batch["labels"].cpu().numpy()
            for pr, lr in zip(p, labels):
                keep = lr != IGNORE
                preds.append([names[i] for i in pr[keep]])
                refs.append([names[i] for i in lr[keep]])
        out = load_metric("seqeval").compute(predictions=preds, references=refs)
        return {k: round(float(out[k]), 6) for k in self.metric_names}


def read_conll(path: str) -> dict:
    """Rows `{"tokens": [...], "tags": [...]}` of a CoNLL-style file: `word<TAB or space>tag` per line, a blank line
    between sentences (the last column is the tag)."""
    rows, words, tags = [], [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line.strip():
                if words:
                    rows.append((words, tags))
                words, tags = [], []
                continue
            parts = line.split("\t") if "\t" in line else line.split()
            words.append(parts[0])
            tags.append(parts[-1])
    if words:
        rows.append((words, tags))
    return {"tokens": [r[0] for r in rows], "tags": [r[1] for r in rows]}
