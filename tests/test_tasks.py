"""`hf-compress` on the four tasks with tiny models (train, prune, quantize, evaluate, card), and a table of odd
and bad datasets built from small files: each row either reaches its metric or fails with its exact one line."""

from __future__ import annotations

import bz2
import csv
import gzip
import json
import os

import pytest
import torch

from hf_compress.cli.main import main
from task_helpers import lm_texts, make_tiny, ner_rows, qa_rows, write_jsonl

FAST = ["--max_steps", "8", "--per_device_train_batch_size", "8", "--learning_rate", "3e-3", "--logging_steps", "50",
        "--max_length", "32", "--pruning_frequency", "1", "--disable_tqdm", "true", "--use_cpu", "true", "--seed", "0"]
NER_LABELS = {0: "B-LOC", 1: "B-PER", 2: "O"}


def _read(out):
    with open(os.path.join(out, "compression_report.json")) as f:
        report = json.load(f)
    from huggingface_hub import ModelCard

    return report, ModelCard.load(os.path.join(out, "README.md"))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("task-models")
    return {
        "token": make_tiny(root / "token", "token", num_labels=3, id2label=NER_LABELS),
        "qa": make_tiny(root / "qa", "qa"),
        "causal": make_tiny(root / "causal", "causal"),
        "seq": make_tiny(root / "seq", "seq"),
    }


def _sparsity_of_targets(model) -> float:
    from hf_compress.pruning import default_targets, sparsity_stats

    stats = sparsity_stats(model, default_targets(model))
    return stats["zeros"] / stats["total"]


# --- every task end to end ----------------------------------------------------------------------------------------

def test_token_classification_end_to_end(models, tmp_path):
    data = write_jsonl(tmp_path / "ner.jsonl", ner_rows(80))
    out = tmp_path / "out"
    assert main(["--model", models["token"], "--dataset", data, "--output_dir", str(out), "--sparsity", "0.5",
                 "--no_quantize", *FAST]) == 0
    report, card = _read(out)
    assert list(report["metrics"]["compressed"]) == ["f1", "precision", "recall", "accuracy"]
    # The tags are a function of the word: 8 steps at lr 3e-3 learn them (the random base does not).
    assert report["metrics"]["compressed"]["f1"] > report["metrics"]["base"]["f1"]
    assert card.data.pipeline_tag == "token-classification"
    assert {r.task_type for r in card.data.eval_results} == {"token-classification"}
    assert card.data.eval_results[0].metric_type == "f1"
    from transformers import AutoModelForTokenClassification

    reloaded = AutoModelForTokenClassification.from_pretrained(out)
    assert reloaded.config.id2label == NER_LABELS
    assert _sparsity_of_targets(reloaded) == pytest.approx(0.5, abs=1e-6)
    assert "AutoModelForTokenClassification.from_pretrained" in str(card)


def test_token_classification_headless_gets_label_names_from_string_tags(tmp_path):
    """A bare encoder with `--task token-classification`: tag strings become `id2label` (sorted) on a new head."""
    from transformers import BertConfig, BertModel

    from task_helpers import tiny_tokenizer

    folder = tmp_path / "enc"
    tok = tiny_tokenizer(folder)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                         intermediate_size=128, max_position_embeddings=64)).save_pretrained(folder)
    tok.save_pretrained(folder)
    data = write_jsonl(tmp_path / "ner.jsonl", ner_rows(40))
    out = tmp_path / "out"
    assert main(["--model", str(folder), "--task", "token-classification", "--dataset", data, "--output_dir", str(out),
                 "--no_prune", "--no_quantize", "--base_finetune_steps", "2", *FAST]) == 0
    cfg = json.load(open(out / "config.json"))
    assert cfg["architectures"] == ["BertForTokenClassification"]
    assert cfg["id2label"] == {"0": "B-LOC", "1": "B-PER", "2": "O"}
    report, _ = _read(out)
    assert report["pipeline"]["base_finetune_steps"] == 2
    assert report["task"]["label_names"] == ["B-LOC", "B-PER", "O"]


def test_question_answering_end_to_end(models, tmp_path):
    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows(64))
    out = tmp_path / "out"
    assert main(["--model", models["qa"], "--dataset", data, "--output_dir", str(out), "--sparsity", "0.5", "--bits", "8",
                 *FAST]) == 0
    report, card = _read(out)
    assert list(report["metrics"]["compressed"]) == ["exact_match", "f1"]
    # 7 held-out questions (a seeded 10% of 64): exact match is a multiple of 1/7.
    em = report["metrics"]["compressed"]["exact_match"]
    assert round(em * 7, 4) == round(em * 7)
    assert report["eval"]["num_examples"] == 7
    assert card.data.pipeline_tag == "question-answering"
    assert {r.metric_type for r in card.data.eval_results} == {"exact_match", "f1"}
    assert report["quantization"]["bits"] == [8]
    assert "AutoModelForQuestionAnswering" in str(card)


@pytest.mark.parametrize("fmt", ["txt", "chat"])
def test_causal_lm_end_to_end(models, tmp_path, fmt):
    if fmt == "txt":
        data = tmp_path / "lm.txt"
        data.write_text("\n\n".join(lm_texts(60)))
    else:
        data = write_jsonl(tmp_path / "chat.jsonl", [
            {"messages": [{"role": "user", "content": "where did alice go ?"}, {"role": "assistant", "content": t}]}
            for t in lm_texts(60)])
    out = tmp_path / "out"
    assert main(["--model", models["causal"], "--dataset", str(data), "--output_dir", str(out), "--sparsity", "0.5",
                 "--bits", "4", *FAST]) == 0
    report, card = _read(out)
    base, comp = report["metrics"]["base"], report["metrics"]["compressed"]
    assert list(comp) == ["perplexity", "token_accuracy"]
    # The text repeats a 5-word pattern: 8 steps bring perplexity far below the random model's (about the vocab size).
    assert comp["perplexity"] < base["perplexity"] / 2
    assert card.data.pipeline_tag == "text-generation"
    assert {r.task_type for r in card.data.eval_results} == {"text-generation"}
    assert card.data.eval_results[0].metric_type == "perplexity"
    assert report["quantization"]["bits"] == [4]
    assert report["task"]["lower_is_better"] == ["perplexity"]
    # 4-bit with its block scales (an fp32 absmax per 64 weights: +0.5 bit) costs more than 4 bits per weight.
    assert report["bits_per_weight"]["base_in_memory"] == 32.0


def test_causal_lm_perplexity_matches_the_model_loss(models, tmp_path):
    """Perplexity is exp of the mean next-token loss, the same number `model(labels=...)` gives on one block."""
    import math

    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_compress.pipeline import DataArguments
    from hf_compress.tasks import CausalLMTask

    tok = AutoTokenizer.from_pretrained(models["causal"])
    model = AutoModelForCausalLM.from_pretrained(models["causal"])
    task = CausalLMTask(DataArguments(max_length=16), "x")
    raw = datasets.Dataset.from_dict({"text": lm_texts(3)})
    train, ev = task.resolve(raw, raw, "test")
    feats = task.preprocess(ev, task.prepare_tokenizer(tok), train=False)
    one = feats.select([0])
    metrics = task.evaluate(model, one, tok, ev)
    ids = torch.tensor([one[0]["input_ids"]])
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert metrics["perplexity"] == pytest.approx(math.exp(float(loss)), rel=1e-4)
    assert len(one[0]["input_ids"]) == 16


def test_token_labels_align_to_first_word_piece(models):
    import datasets
    from transformers import AutoTokenizer

    from hf_compress.pipeline import DataArguments
    from hf_compress.tasks import TokenClassificationTask

    tok = AutoTokenizer.from_pretrained(models["token"])
    task = TokenClassificationTask(DataArguments(max_length=32), "x")
    # `alicebob` is not in the vocabulary: it splits into `alice`, `##bob`; only the first piece carries its tag.
    raw = datasets.Dataset.from_dict({"tokens": [["alicebob", "went", "to", "rome"]], "tags": [["B-PER", "O", "O", "B-LOC"]]})
    train, _ = task.resolve(raw, raw, "test")
    row = task.preprocess(train, tok, train=True)[0]
    pieces = tok.convert_ids_to_tokens(row["input_ids"])
    assert pieces == ["[CLS]", "alice", "##bob", "went", "to", "rome", "[SEP]"]
    assert row["labels"] == [-100, 1, -100, 2, 2, 0, -100]


def test_qa_answer_span_in_a_later_window(models):
    """A context longer than one window: the answer's tokens are found in the window that holds it, the others
    point at [CLS]; best_answers maps the gold span back to the exact text."""
    import datasets
    import numpy as np
    from transformers import AutoTokenizer

    from hf_compress.pipeline import DataArguments
    from hf_compress.tasks import QuestionAnsweringTask
    from hf_compress.tasks.question_answering import best_answers

    tok = AutoTokenizer.from_pretrained(models["qa"])
    task = QuestionAnsweringTask(DataArguments(max_length=24, doc_stride=4), "x")
    context = " ".join(["the movie was good"] * 6) + " alice went to rome ."
    raw = datasets.Dataset.from_dict({"question": ["where did alice go ?"], "context": [context],
                                      "answers": [{"text": ["rome"], "answer_start": [context.index("rome")]}]})
    _, ev = task.resolve(raw, raw, "test")
    feats = task.preprocess(ev, tok, train=False)
    assert len(feats) > 1
    hits = [i for i in range(len(feats)) if feats[i]["start_positions"] != 0]
    assert hits and all(feats[i]["start_positions"] == 0 for i in range(len(feats)) if i not in hits)
    i = hits[-1]
    s, e = feats[i]["start_positions"], feats[i]["end_positions"]
    start = np.full((len(feats), 24), -10.0)
    end = np.full((len(feats), 24), -10.0)
    start[i, s], end[i, e] = 5.0, 5.0
    assert best_answers(start, end, feats["offset_mapping"], feats["example_id"], ev["context"]) == {0: "rome"}


# --- the odd-dataset table -----------------------------------------------------------------------------------------

def _csv(path, rows, fields, delimiter=","):
    opener = gzip.open if str(path).endswith(".gz") else bz2.open if str(path).endswith(".bz2") else open
    with opener(path, "wt", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields, delimiter=delimiter)
        w.writeheader()
        w.writerows(rows)
    return str(path)


NEWS = ["stocks rose at the bank", "the team won the match", "a new phone was launched"]
NEWS_LABELS = ["business", "sport", "tech"]


def _news(n=30, label_key="label"):
    return [{"text": f"{NEWS[i % 3]} {i}", label_key: NEWS_LABELS[i % 3]} for i in range(n)]


def build_string_labels(tmp):  # the reported crash: class names as strings
    return _csv(tmp / "news.csv", _news(), ["text", "label"])


def build_bool_labels(tmp):
    return write_jsonl(tmp / "b.jsonl", [{"text": f"row {i} good", "label": bool(i % 2)} for i in range(30)])


def build_int_labels_with_gaps(tmp):  # a CSV cell left empty: pandas reads the column as float with NaN
    rows = [{"text": f"row {i}", "label": "" if i in (3, 7) else i % 3} for i in range(30)]
    return _csv(tmp / "gaps.csv", rows, ["text", "label"])


def build_classlabel_save_to_disk(tmp):
    import datasets

    feats = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})
    dsd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": [f"t {i}" for i in range(20)], "label": [i % 2 for i in range(20)]}, features=feats),
        "test": datasets.Dataset.from_dict({"text": [f"s {i}" for i in range(6)], "label": [i % 2 for i in range(6)]}, features=feats),
    })
    dsd.save_to_disk(str(tmp / "disk"))
    return str(tmp / "disk")


def build_tsv_text_pairs(tmp):
    rows = [{"premise": f"the movie {i}", "hypothesis": "was good", "label": i % 2} for i in range(30)]
    return _csv(tmp / "pairs.tsv", rows, ["premise", "hypothesis", "label"], delimiter="\t")


def build_parquet(tmp):
    import pandas as pd

    pd.DataFrame(_news()).to_parquet(tmp / "news.parquet")
    return str(tmp / "news.parquet")


def build_csv_gz(tmp):
    return _csv(tmp / "news.csv.gz", _news(), ["text", "label"])


def build_unicode_empty_long(tmp):
    rows = _news(29) + [{"text": "", "label": "sport"}]  # one empty text: dropped and counted
    rows[0]["text"] = "Zürich café naïve 東京 🙂 " + "plot " * 400  # a very long document: truncated and counted
    return write_jsonl(tmp / "odd.jsonl", rows)


def build_unseen_label(tmp):
    os.makedirs(tmp / "split", exist_ok=True)
    _csv(tmp / "split" / "train.csv", _news(30), ["text", "label"])
    _csv(tmp / "split" / "test.csv", _news(6) + [{"text": "rain", "label": "weather"}], ["text", "label"])
    return str(tmp / "split")


def build_float_labels(tmp):
    return _csv(tmp / "f.csv", [{"text": f"r {i}", "label": i / 7} for i in range(30)], ["text", "label"])


def build_negative_labels(tmp):
    return _csv(tmp / "neg.csv", [{"text": f"r {i}", "label": -(i % 2)} for i in range(30)], ["text", "label"])


def build_all_empty_text(tmp):
    return write_jsonl(tmp / "empty.jsonl", [{"text": " ", "label": "a"} for _ in range(30)])


def build_xlsx(tmp):
    (tmp / "data.xlsx").write_bytes(b"PK")
    return str(tmp / "data.xlsx")


def build_conll(tmp):
    with open(tmp / "ner.conll", "w") as f:
        for r in ner_rows(40):
            f.write("\n".join(f"{w}\t{t}" for w, t in zip(r["tokens"], r["tags"])) + "\n\n")
    return str(tmp / "ner.conll")


def build_ner_misaligned(tmp):
    return write_jsonl(tmp / "bad_ner.jsonl", [{"tokens": ["a", "b"], "tags": ["O"]} for _ in range(20)])


def build_ner_flat_columns(tmp):  # a sequence-classification file given to the token task
    return _csv(tmp / "flat.csv", [{"tokens": "a b", "tags": "O O"} for _ in range(20)], ["tokens", "tags"])


def build_squad_json(tmp):
    rows = qa_rows(30)
    data = {"version": "1.1", "data": [{"title": "t", "paragraphs": [
        {"context": r["context"], "qas": [{"id": r["id"], "question": r["question"],
                                            "answers": [{"text": r["answers"]["text"][0], "answer_start": r["answers"]["answer_start"][0]}]}]}
        for r in rows]}]}
    (tmp / "squad.json").write_text(json.dumps(data))
    return str(tmp / "squad.json")


def build_qa_wrong_offsets(tmp):
    rows = qa_rows(20)
    for r in rows:
        r["answers"]["answer_start"] = [0]
    return write_jsonl(tmp / "badqa.jsonl", rows)


def build_chat_without_template(tmp):
    return write_jsonl(tmp / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"}]} for _ in range(20)])


def build_text_bz2(tmp):
    with bz2.open(tmp / "lm.txt.bz2", "wt") as f:
        f.write("\n\n".join(lm_texts(30)))
    return str(tmp / "lm.txt.bz2")


# (builder, model, extra args, expected): expected is ("ok", checks on the report) or ("error", the exact line with
# {data} for the dataset path).
ODD = {
    "string labels (csv)": (build_string_labels, "enc", [], ("ok", {"label_names": ["business", "sport", "tech"], "eval_rows": 3})),
    "bool labels (jsonl)": (build_bool_labels, "enc", [], ("ok", {"label_names": ["False", "True"], "eval_rows": 3})),
    "int labels with empty cells": (build_int_labels_with_gaps, "enc", [], ("ok", {"label_names": ["0", "1", "2"], "dropped": 2})),
    "ClassLabel save_to_disk": (build_classlabel_save_to_disk, "enc", [], ("ok", {"label_names": ["neg", "pos"], "eval_rows": 6, "split": "test"})),
    "text pairs (tsv)": (build_tsv_text_pairs, "enc", [], ("ok", {"label_names": ["0", "1"], "columns": {"text": "premise", "text_pair": "hypothesis", "label": "label"}})),
    "parquet": (build_parquet, "enc", [], ("ok", {"label_names": ["business", "sport", "tech"]})),
    "csv.gz": (build_csv_gz, "enc", [], ("ok", {"label_names": ["business", "sport", "tech"]})),
    "unicode, empty and long text": (build_unicode_empty_long, "enc", [], ("ok", {"truncated": 1, "dropped": 1})),
    "held-out label unseen in train": (build_unseen_label, "enc", [], ("error",
        "Labels 'weather' of the held-out split 'test' do not occur in train (train has business, sport, tech); fix the "
        "labels or pick another `--eval_split`.")),
    "float labels": (build_float_labels, "enc", [], ("error",
        "The label column 'label' holds non-integer numbers (e.g. 0.0); pass class labels (ints, bools or strings) for classification.")),
    "negative labels": (build_negative_labels, "enc", [], ("error",
        "The label column 'label' has negative class ids (-1); use ids 0..N-1 or strings.")),
    "every text empty": (build_all_empty_text, "enc", [], ("error",
        "Every row of the train split has an empty `text` or no `label`; pass rows with text and a label.")),
    "unsupported file type": (build_xlsx, "enc", [], ("error",
        "Cannot read dataset file '{data}': use .csv, .tsv, .json, .jsonl, .parquet, .txt (optionally .gz/.bz2/.xz/.zst) "
        "or .conll, a save_to_disk folder or a Hub id.")),
    "ner conll file": (build_conll, "token", [], ("ok", {"label_names": ["B-LOC", "B-PER", "O"], "eval_rows": 4})),
    "ner tags not one per word": (build_ner_misaligned, "token", [], ("error",
        "No row of the train split has as many `tags` as `tokens`; each word needs one tag.")),
    "ner data without word lists": (build_ner_flat_columns, "token", [], ("error",
        "Column 'tokens' holds one value per row, not a list per sentence; token classification needs a list of words "
        "and a list of tags per row (JSONL: {\"tokens\": [...], \"tags\": [...]}).")),
    "squad json layout": (build_squad_json, "qa", [], ("ok", {"eval_rows": 3, "columns": {"question": "question", "context": "context", "answers": "answers"}})),
    "qa answers at wrong offsets": (build_qa_wrong_offsets, "qa", [], ("error",
        "No row of the train split has a question, a context and `answers` as {'text': [...], 'answer_start': [...]} "
        "with the answer at that offset; fix the data.")),
    "chat data, tokenizer without template": (build_chat_without_template, "seq-as-causal", ["--task", "causal-lm"], ("error",
        "The data has chat `messages` but the tokenizer has no chat template; use a chat model or plain text.")),
    "plain text, bz2": (build_text_bz2, "causal", [], ("ok", {"eval_rows": 3})),
}


@pytest.fixture(scope="module")
def odd_models(models, tmp_path_factory):
    from transformers import BertConfig, BertModel

    from task_helpers import tiny_tokenizer

    folder = tmp_path_factory.mktemp("enc")
    tok = tiny_tokenizer(folder)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                         intermediate_size=128, max_position_embeddings=128)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return {**models, "enc": str(folder), "seq-as-causal": models["seq"]}


@pytest.mark.parametrize("case", list(ODD))
def test_odd_dataset_table(case, odd_models, tmp_path, capsys):
    build, model, extra, (kind, expected) = ODD[case]
    data = build(tmp_path)
    out = tmp_path / "out"
    # No training, pruning or quantization: the table is about reading data; the result must equal the base.
    argv = ["--model", odd_models[model], "--dataset", data, "--output_dir", str(out), "--no_train", "--no_quantize",
            "--sparsity", "0", "--max_length", "32", "--use_cpu", "true", *extra]
    capsys.readouterr()
    rc = main(argv)
    captured = capsys.readouterr()
    if kind == "error":
        assert rc == 2
        assert captured.err.strip().splitlines() == ["hf-compress: error: " + expected.replace("{data}", data)]
        assert not out.exists()
        return
    assert rc == 0, captured.err[-2000:]
    report, card = _read(out)
    assert report["metrics"]["compressed"] == report["metrics"]["base"]
    task = report["task"]
    assert list(report["metrics"]["compressed"]) == task["metric_names"]
    if "label_names" in expected:
        assert task["label_names"] == expected["label_names"]
        cfg = json.load(open(out / "config.json"))
        assert list(cfg["id2label"].values()) == expected["label_names"]
        assert "Labels: " + ", ".join(f"`{n}`" for n in expected["label_names"]) + "." in str(card)
    if "eval_rows" in expected:
        assert report["eval"]["num_examples"] == expected["eval_rows"]
    if "split" in expected:
        assert report["eval"]["split"] == expected["split"]
    if "columns" in expected:
        assert task["columns"] == expected["columns"]
    notes = task["data_notes"]
    if "truncated" in expected:
        assert notes["train"]["truncated"] + notes["eval"]["truncated"] == expected["truncated"]
    if "dropped" in expected:
        dropped = sum(v for split in notes.values() for k, v in split.items() if k.startswith("dropped"))
        assert dropped == expected["dropped"]


# --- budget -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, max_steps, base_steps", [
    (["--sparsity", "0.8", "--bits", "4"], 150, 150),  # the default model, no budget: the demo's
    (["--sparsity", "0.8", "--max_steps", "40"], 40, None),  # a budget given: the user's, nothing else of the demo
    (["--model", "some/model", "--sparsity", "0.8"], -1, None),  # a user's model: the Trainer defaults (3 epochs)
])
def test_demo_budget_applies_to_the_default_model_without_a_budget(argv, max_steps, base_steps):
    from hf_compress.cli.main import parse

    (model_args, data_args, training_args, pruning_args, quant_args, _structured), recipe, _ = parse(argv)
    assert training_args.max_steps == max_steps
    assert model_args.base_finetune_steps == base_steps
    assert pruning_args.target_sparsity == 0.8


# --- --verify_push for every task ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["token", "qa", "causal"])
def test_verify_push_recomputes_recorded_outputs_for_every_task(models, tmp_path, hub, kind):
    """Not only sequence classifiers: the report records each task's outputs on 8 held-out rows (a causal LM's
    [positions, vocab] logits by argmax and max), the pushed checkpoint reproduces them, and a tampered record fails."""
    from conftest import HUB_TOKEN as TOKEN

    from hf_compress.hub import HubPushError, push_to_hub

    if kind == "token":
        data = write_jsonl(tmp_path / "ner.jsonl", ner_rows(80))
    elif kind == "qa":
        data = write_jsonl(tmp_path / "qa.jsonl", qa_rows(96))
    else:
        data = tmp_path / "lm.txt"
        data.write_text("\n\n".join(lm_texts(60)))
    out, repo = tmp_path / "out", f"acme/tiny-{kind}"
    assert main(["--model", models[kind], "--dataset", str(data), "--output_dir", str(out), "--sparsity", "0.5",
                 "--no_quantize", "--push_to_hub", "true", "--hub_model_id", repo, "--hub_endpoint", hub.url,
                 "--hub_token", TOKEN, "--verify_push", "true", *FAST]) == 0
    report, _ = _read(out)
    sample = report["verification"]
    verified = push_to_hub(str(out), repo, endpoint=hub.url, token=TOKEN, verify=True).verified  # as the CLI did
    assert verified["examples"] == len(sample["inputs"]["input_ids"]) >= 4
    assert verified["max_abs_logit_diff"] <= 1e-5
    names = {"token": ["logits"], "qa": ["start_logits", "end_logits"], "causal": ["logits"]}[kind]
    assert list(sample["outputs"]) == names
    record = sample["outputs"][names[0]]
    assert ("argmax" in record) == (kind == "causal")  # a vocabulary axis is recorded by argmax and max
    # A record that the model does not reproduce fails verification, naming the outputs.
    if kind == "causal":
        record["argmax"][0][0] = (record["argmax"][0][0] + 1) % 35
    else:  # the first recorded value (token classification: [rows, positions, labels]; QA: [rows, positions])
        row = record["values"][0]
        while isinstance(row[0], list):
            row = row[0]
        row[0] += 1.0
    (out / "compression_report.json").write_text(json.dumps(report))
    with pytest.raises(HubPushError, match=f"Verification failed.*{names[0]}"):
        push_to_hub(str(out), repo, endpoint=hub.url, token=TOKEN, verify=True)


# --- the one task table ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("class_name, task", [
    ("BertForSequenceClassification", "sequence-classification"),
    ("RobertaForTokenClassification", "token-classification"),
    ("DistilBertForQuestionAnswering", "question-answering"),
    ("LlamaForCausalLM", "causal-lm"),
    ("GPT2LMHeadModel", "causal-lm"),
    ("PeftModelForCausalLM", "causal-lm"),
    ("BertModel", None),
    (None, None),
])
def test_task_of_class_reads_the_class_suffixes_of_the_table(class_name, task):
    from hf_compress.tasks import task_of_class

    found = task_of_class(class_name)
    assert (found.name if found is not None else None) == task


def test_task_of_model_names_the_task_or_asks_for_it():
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

    from hf_compress.distillation import infer_task
    from hf_compress.tasks import task_of_model

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50))
    assert task_of_model(gpt2) == infer_task(gpt2) == "causal-lm"
    from peft import LoraConfig, get_peft_model

    assert task_of_model(get_peft_model(gpt2, LoraConfig(r=2, target_modules=["c_attn"]))) == "causal-lm"
    bare = BertModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8, vocab_size=50))
    with pytest.raises(ValueError, match=r"^Cannot tell the task of a `BertModel`; pass `distillation_task` \(or `--task`\): "
                                         r"one of sequence-classification, token-classification, question-answering, causal-lm\.$"):
        task_of_model(bare)


def test_task_table_holds_the_layout_distillation_and_the_cache_read():
    from hf_compress.distillation.cache import cache_features
    from hf_compress.distillation.config import TASK_CHOICES
    from hf_compress.tasks import TASKS, get_task

    assert TASKS == ("sequence-classification", "token-classification", "question-answering", "causal-lm")
    assert TASK_CHOICES == ("auto",) + TASKS
    rows = [(get_task(t).auto_class, get_task(t).pipeline_tag, get_task(t).logit_layout.outputs,
             get_task(t).logit_layout.per_position, get_task(t).logit_layout.classes,
             get_task(t).logit_layout.shift_labels, get_task(t).logit_layout.token_average) for t in TASKS]
    assert rows == [
        ("AutoModelForSequenceClassification", "text-classification", ("logits",), False, "labels", False, False),
        ("AutoModelForTokenClassification", "token-classification", ("logits",), True, "labels", False, True),
        ("AutoModelForQuestionAnswering", "question-answering", ("start_logits", "end_logits"), True, "positions", False, False),
        ("AutoModelForCausalLM", "text-generation", ("logits",), True, "vocabulary", True, True),
    ]
    # The cache's columns follow the layout: logits over positions are kept whole in float32, never top-k.
    assert {k: str(v.feature.dtype) for k, v in cache_features("question-answering", "bfloat16", 8).items() if k != "length"} == {
        "teacher_start_logits": "float32", "teacher_end_logits": "float32"}
    assert {k: str(v.feature.dtype) for k, v in cache_features("causal-lm", "bfloat16", None).items() if k != "length"} == {
        "teacher_logits": "int16"}
    assert {k: str(v.feature.dtype) for k, v in cache_features("causal-lm", "bfloat16", 8).items() if k != "length"} == {
        "teacher_logits": "float32", "teacher_indices": "int32"}
    with pytest.raises(ValueError, match="classes must be one of labels, vocabulary, positions, got 'tokens'"):
        type(get_task("causal-lm").logit_layout)(classes="tokens")
