"""Extractive question answering (SQuAD format): windows over long contexts, answer spans, SQuAD EM / F1."""

from __future__ import annotations

import json

import numpy as np

from .base import CompressionInputError, Task, batched_outputs, pick_column
from .layout import LogitLayout

# The n best start and end logits tried per window, and the longest answer (in tokens): SQuAD v1.1's usual values.
N_BEST = 20
MAX_ANSWER_TOKENS = 30


class QuestionAnsweringTask(Task):
    name = "question-answering"
    auto_class = "AutoModelForQuestionAnswering"
    class_suffixes = ("ForQuestionAnswering",)
    mapping_names = "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES"
    optimum_tasks = ("question-answering",)
    pipeline_tag = "question-answering"
    metric_names = ("exact_match", "f1")
    # Start and end distributions over the positions; the answer span's positions are the labels.
    logit_layout = LogitLayout(outputs=("start_logits", "end_logits"), classes="positions",
                               label_names=("start_positions", "end_positions"))

    def resolve(self, train, evaluation, eval_split):
        da, name = self.data_args, self.dataset_name
        columns = train.column_names
        question = pick_column(columns, da.text_column, ("question",), "question", "--text_column", name)
        context = pick_column(columns, da.text_pair_column, ("context",), "context", "--text_pair_column", name)
        answers = pick_column(columns, da.label_column, ("answers",), "answers", "--label_column", name)
        for col in (question, context, answers):
            if col not in evaluation.column_names:
                raise CompressionInputError(f"The held-out split {eval_split!r} has no {col!r} column; add it.")
        self.columns = {"question": question, "context": context, "answers": answers}
        return self._clean(train, "train"), self._clean(evaluation, "eval")

    def _clean(self, ds, split):
        q, c, a = self.columns["question"], self.columns["context"], self.columns["answers"]

        def ok(r):
            ans = r[a]
            if not (isinstance(r[q], str) and r[q].strip() and isinstance(r[c], str) and r[c].strip()):
                return False
            if not isinstance(ans, dict) or not ans.get("text") or ans.get("answer_start") is None:
                return False
            start, text = ans["answer_start"][0], ans["text"][0]
            # The answer must be where the data says: a wrong offset would train the model on the wrong span.
            return r[c][start : start + len(text)] == text

        n = len(ds)
        ds = ds.filter(ok)
        self._note(split, dropped_empty_or_bad_answer=n - len(ds))
        if not len(ds):
            raise CompressionInputError(
                f"No row of the {split} split has a question, a context and `{a}` as "
                "{'text': [...], 'answer_start': [...]} with the answer at that offset; fix the data."
            )
        ds = ds.map(lambda r: {"question": r[q].strip(), "context": r[c],
                               "answer_texts": list(r[a]["text"]), "answer_starts": [int(s) for s in r[a]["answer_start"]]},
                    remove_columns=ds.column_names)
        return ds.add_column("example_id", list(range(len(ds))))

    def _windows(self, batch, tokenizer):
        max_length = self.data_args.max_length
        stride = self.data_args.doc_stride if self.data_args.doc_stride is not None else max_length // 4
        if stride >= max_length // 2:
            raise CompressionInputError(f"doc_stride ({stride}) must be below half of max_length ({max_length}).")
        return tokenizer(batch["question"], batch["context"], truncation="only_second", max_length=max_length,
                         stride=stride, return_overflowing_tokens=True, return_offsets_mapping=True, padding="max_length")

    def check_tokenizer(self, tokenizer):
        if not tokenizer.is_fast:
            raise CompressionInputError("Question answering needs a fast tokenizer (offsets); save `tokenizer.json` with the model.")

    def preprocess(self, dataset, tokenizer, train):
        self.check_tokenizer(tokenizer)

        def fn(batch):
            enc = self._windows(batch, tokenizer)
            sample = enc.pop("overflow_to_sample_mapping")
            starts, ends, ids, offsets = [], [], [], []
            for i, offs in enumerate(enc["offset_mapping"]):
                j = sample[i]
                seq = enc.sequence_ids(i)
                ctx = [k for k, s in enumerate(seq) if s == 1]
                a0 = batch["answer_starts"][j][0]
                a1 = a0 + len(batch["answer_texts"][j][0])
                # The answer's tokens when the window holds the whole answer, else the first token ([CLS]).
                if ctx and offs[ctx[0]][0] <= a0 and offs[ctx[-1]][1] >= a1:
                    s = next(k for k in ctx if offs[k][1] > a0)
                    e = next(k for k in reversed(ctx) if offs[k][0] < a1)
                else:
                    s = e = 0
                starts.append(s)
                ends.append(e)
                ids.append(batch["example_id"][j])
                offsets.append([o if seq[k] == 1 else None for k, o in enumerate(offs)])
            enc["start_positions"], enc["end_positions"] = starts, ends
            if train:
                enc.pop("offset_mapping")
            else:
                enc["offset_mapping"], enc["example_id"] = offsets, ids
            return enc

        ds = dataset.map(fn, batched=True, remove_columns=dataset.column_names, desc="Tokenizing")
        split = "train" if train else "eval"
        self._note(split, windows=len(ds), contexts_split_into_windows=len(ds) - len(dataset))
        return ds

    def collator(self, tokenizer):
        from transformers import default_data_collator

        return default_data_collator

    def evaluate(self, model, features, tokenizer, examples=None, batch_size=32, desc="Evaluating"):
        from ..metrics import load_metric

        if examples is None:
            raise ValueError("Question answering evaluation needs the raw `examples` to read answers from the contexts.")
        cols = [c for c in ("input_ids", "attention_mask", "token_type_ids") if c in features.column_names]
        start_logits, end_logits = [], []
        for _, out in batched_outputs(model, features.select_columns(cols), self.collator(tokenizer), batch_size, desc):
            start_logits.append(out.start_logits.float().cpu().numpy())
            end_logits.append(out.end_logits.float().cpu().numpy())
        predictions = best_answers(np.concatenate(start_logits), np.concatenate(end_logits), features["offset_mapping"],
                                   features["example_id"], examples["context"])
        refs = examples["answer_texts"]
        out = load_metric("squad").compute(predictions=[predictions.get(i, "") for i in range(len(refs))], references=refs)
        return {k: round(float(out[k]), 6) for k in self.metric_names}


def best_answers(start_logits, end_logits, offsets, example_ids, contexts) -> dict[int, str]:
    """The highest-scoring span (start + end logit) of each example over all its windows, as context text."""
    best: dict[int, tuple[float, str]] = {}
    for i, ex in enumerate(example_ids):
        offs = offsets[i]
        top_s = np.argsort(start_logits[i])[::-1][:N_BEST]
        top_e = np.argsort(end_logits[i])[::-1][:N_BEST]
        for s in top_s:
            for e in top_e:
                if offs[s] is None or offs[e] is None or e < s or e - s + 1 > MAX_ANSWER_TOKENS:
                    continue
                score = float(start_logits[i][s] + end_logits[i][e])
                if ex not in best or score > best[ex][0]:
                    best[ex] = (score, contexts[ex][offs[s][0] : offs[e][1]])
    return {k: v[1] for k, v in best.items()}


def read_squad_json(path: str) -> dict | None:
    """Flat columns (`id`, `title`, `context`, `question`, `answers`) of a file in the official SQuAD layout
    (`{"version", "data": [{"title", "paragraphs": [{"context", "qas": [...]}]}]}`); `None` for any other JSON."""
    import gzip

    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            text = f.read()
        # JSON Lines and plain records are read by `datasets`; only one object with articles of paragraphs is ours.
        if not text.lstrip().startswith("{") or '"paragraphs"' not in text:
            return None
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError, OSError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        return None
    rows = {"id": [], "title": [], "context": [], "question": [], "answers": []}
    for article in data["data"]:
        for para in article.get("paragraphs", []):
            for qa in para.get("qas", []):
                rows["id"].append(str(qa.get("id", len(rows["id"]))))
                rows["title"].append(article.get("title", ""))
                rows["context"].append(para["context"])
                rows["question"].append(qa["question"])
                rows["answers"].append({"text": [a["text"] for a in qa.get("answers", [])],
                                        "answer_start": [int(a["answer_start"]) for a in qa.get("answers", [])]})
    return rows if rows["id"] else None
