"""Sequence classification (single texts or text pairs): accuracy and macro F1."""

from __future__ import annotations

from .base import CompressionInputError, LabelledTask, encode_labels, is_string_feature, pick_column
from .layout import LogitLayout

TEXT_COLUMNS = ("text", "sentence", "review", "content", "document", "comment", "tweet", "utterance")
PAIR_COLUMNS = (("sentence1", "sentence2"), ("premise", "hypothesis"), ("question", "sentence"), ("question1", "question2"))
LABEL_COLUMNS = ("label", "labels", "class", "target", "sentiment", "category")


class SequenceClassificationTask(LabelledTask):
    name = "sequence-classification"
    auto_class = "AutoModelForSequenceClassification"
    class_suffixes = ("ForSequenceClassification",)
    mapping_names = "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"
    optimum_tasks = ("text-classification",)
    pipeline_tag = "text-classification"
    metric_names = ("accuracy", "f1")
    new_head = True
    # One distribution over the labels per example (equal-sized micro-batches: averaged per micro-batch).
    logit_layout = LogitLayout(per_position=False)

    def verification_sample(self, model, features, tokenizer, num_examples=8):
        """The examples' logits, predictions and metrics (`tasks.evaluation.verification_sample`): `--verify_push`
        recomputes the metric on them too."""
        from .evaluation import verification_sample

        return verification_sample(model, features, tokenizer, num_examples, self.metric_names)

    def resolve(self, train, evaluation, eval_split):
        da, name = self.data_args, self.dataset_name
        columns = train.column_names
        label = pick_column(columns, da.label_column, LABEL_COLUMNS, "label", "--label_column", name)
        text = pick_column(columns, da.text_column, (), "text", "--text_column", name, required=False)
        pair = pick_column(columns, da.text_pair_column, (), "text pair", "--text_pair_column", name, required=False)
        if text is None:
            for a, b in PAIR_COLUMNS:
                if a in columns and b in columns:
                    text, pair = a, pair or b
                    break
        if text is None:
            text = next((c for c in TEXT_COLUMNS if c in columns), None)
        if text is None:  # the first string column that is not the label
            text = next((c for c in columns if c != label and is_string_feature(train.features[c])), None)
        if text is None:
            raise CompressionInputError(
                f"Dataset {name!r} has no text column (columns: {', '.join(columns)}); pass `--text_column`."
            )
        if label not in evaluation.column_names:
            raise CompressionInputError(f"The held-out split {eval_split!r} has no label column {label!r}; add the labels.")
        self.columns = {"text": text, "text_pair": pair, "label": label}
        names, index = encode_labels(train[label], evaluation[label], label, eval_split, train.features[label])
        self.label_names = names
        return self._clean(train, index, "train"), self._clean(evaluation, index, "eval")

    def _clean(self, ds, index, split):
        """Rows without a label or with empty text are dropped (and counted); labels become integer ids."""
        import datasets

        text, pair, label = self.columns["text"], self.columns["text_pair"], self.columns["label"]

        def keep(row):
            ok = row[label] is not None and isinstance(row[text], str) and row[text].strip() != ""
            return ok and (pair is None or (isinstance(row[pair], str) and row[pair].strip() != ""))

        n = len(ds)
        ds = ds.filter(keep)
        self._note(split, dropped_empty_or_unlabelled=n - len(ds))
        if not len(ds):
            raise CompressionInputError(
                f"Every row of the {split} split has an empty `{text}` or no `{label}`; pass rows with text and a label."
            )
        keep_cols = [c for c in (text, pair) if c]
        ds = ds.select_columns(keep_cols + [label])
        # A fresh `labels` column of ints: mapping a string column in place keeps its string type (the collator
        # then failed with `too many dimensions 'str'`).
        ids = [index[v] for v in ds[label]]
        ds = ds.remove_columns(label).add_column("labels", ids)
        return ds.cast_column("labels", datasets.ClassLabel(names=self.label_names))

    def preprocess(self, dataset, tokenizer, train):
        text, pair = self.columns["text"], self.columns["text_pair"]
        max_length = self.data_args.max_length
        split = "train" if train else "eval"

        def fn(batch):
            args = (batch[text], batch[pair]) if pair else (batch[text],)
            full = tokenizer(*args, truncation=False, verbose=False)["input_ids"]
            out = tokenizer(*args, truncation=True, max_length=max_length)
            out["truncated"] = [len(f) > max_length for f in full]
            out["labels"] = batch["labels"]
            return out

        return self._tokenize(dataset, fn, split)

    def collator(self, tokenizer):
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(tokenizer)

    def evaluate(self, model, features, tokenizer, examples=None, batch_size=64, desc="Evaluating"):
        from .evaluation import evaluate_classifier

        out = evaluate_classifier(model, features, tokenizer, self.metric_names, batch_size, desc=desc)
        out.pop("num_examples", None)
        return {k: round(float(v), 6) for k, v in out.items()}
