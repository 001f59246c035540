"""Shared fixtures: tiny random models built from configs (fast tests) and the real fine-tuned MiniLM-L6."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from datasets import Dataset

VOCAB = 97

# `pytest` runs the suite in two pytest-xdist workers (pyproject's addopts: `-n 2 --dist loadgroup`); each worker gets
# its share of the cores (torch's threads, and OMP_NUM_THREADS for the subprocesses it starts), so two trainings side
# by side do not oversubscribe the CPU. `pytest -n 0` runs in one process with every core.
XDIST_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
if XDIST_WORKERS:
    _threads = str(max(1, (os.cpu_count() or 1) // XDIST_WORKERS))
    os.environ["OMP_NUM_THREADS"] = _threads
    torch.set_num_threads(int(_threads))

# Tests that share the session's fine-tuned MiniLM run in one worker, so it is trained once.
SHARED_SESSION_FIXTURES = ("real_finetuned",)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Under xdist, one work unit per test file (module fixtures built once), the tests of a shared session fixture
    in one unit, and the units with slow real-model tests first, so the longest start while the other worker takes
    the short ones (xdist's own hook, which reads the `xdist_group` marks, runs after this one)."""
    if not XDIST_WORKERS:
        return
    files = {}
    for item in items:
        files.setdefault(item.nodeid.split("::")[0], []).append(item)
    groups = {}
    for name, its in files.items():
        shared = [f for f in SHARED_SESSION_FIXTURES if any(f in i.fixturenames for i in its)]
        group = shared[0] if shared else name
        for item in its:
            item.add_marker(pytest.mark.xdist_group(group))
        groups.setdefault(group, []).extend(its)
    rank = {g: (0 if g in SHARED_SESSION_FIXTURES else 1 if any(i.get_closest_marker("slow") for i in its) else 2)
            for g, its in groups.items()}
    items[:] = [i for g in sorted(groups, key=lambda g: rank[g]) for i in groups[g]]  # stable within a rank


def tiny_bert_config(**kw):
    from transformers import BertConfig

    base = dict(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, num_labels=2,
    )
    base.update(kw)
    return BertConfig(**base)


def tiny_llama_config(**kw):
    from transformers import LlamaConfig

    base = dict(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=64, tie_word_embeddings=False,
    )
    base.update(kw)
    return LlamaConfig(**base)


@pytest.fixture
def tiny_bert():
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(tiny_bert_config())


@pytest.fixture
def tiny_llama():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config())


def random_classification_dataset(n: int = 64, seq_len: int = 12, num_labels: int = 2, seed: int = 0) -> Dataset:
    """Token ids whose label is a learnable function of the tokens (the parity of the first token)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (n, seq_len), generator=g)
    labels = (ids[:, 0] % num_labels).tolist()
    return Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(), "labels": labels}
    )


def random_lm_dataset(n: int = 32, seq_len: int = 16, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (n, seq_len), generator=g)
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(), "labels": ids.tolist()})


@pytest.fixture
def tiny_cls_data():
    return random_classification_dataset()


# --- the real model on the real data -------------------------------------------------------------------------

REAL_MAX_LENGTH = 48
REAL_EVAL_ROWS = 1000  # the first 1,000 rows of the fixed `test` split


@pytest.fixture(scope="session")
def real_data():
    """Rotten Tomatoes, tokenized for MiniLM: (tokenizer, DatasetDict with train / validation / test)."""
    from transformers import AutoTokenizer

    from hf_compress.data import load_rotten_tomatoes
    from hf_compress.models import default_model_path, tokenize_text_classification

    tok = AutoTokenizer.from_pretrained(default_model_path())
    ds = load_rotten_tomatoes(max_eval=REAL_EVAL_ROWS)
    return tok, tokenize_text_classification(ds, tok, max_length=REAL_MAX_LENGTH)


@pytest.fixture(scope="session")
def real_finetuned(real_data, tmp_path_factory):
    """MiniLM-L6 fine-tuned on Rotten Tomatoes `train` (once per session); returns its saved directory."""
    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, Trainer, TrainingArguments

    from hf_compress.models import default_model_path

    tok, ds = real_data
    out = tmp_path_factory.mktemp("minilm-rt")
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(default_model_path(), num_labels=2)
    args = TrainingArguments(
        str(out / "run"), max_steps=200, per_device_train_batch_size=16, learning_rate=1e-4, warmup_steps=20,
        report_to="none", save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True,
    )
    Trainer(model=model, args=args, train_dataset=ds["train"], data_collator=DataCollatorWithPadding(tok)).train()
    model.save_pretrained(out / "model")
    tok.save_pretrained(out / "model")
    return out / "model"


@pytest.fixture(scope="session")
def real_finetuned_accuracy(real_finetuned, real_data):
    """`accuracy(rows)`: held-out accuracy of `real_finetuned` on the first `rows` rows of the test split, evaluated
    once per row count in a session: the fp32 reference that several real-model tests compare with."""
    from transformers import AutoModelForSequenceClassification

    tok, ds = real_data
    model = AutoModelForSequenceClassification.from_pretrained(real_finetuned)
    cache = {}

    def accuracy(rows: int = REAL_EVAL_ROWS) -> float:
        if rows not in cache:
            cache[rows] = evaluate_accuracy(model, ds["test"].select(range(rows)), tok)
        return cache[rows]

    return accuracy


def evaluate_accuracy(model, dataset, tokenizer, batch_size: int = 64) -> float:
    """Held-out accuracy of a sequence classifier, in eval mode and without grad."""
    from torch.utils.data import DataLoader
    from transformers import DataCollatorWithPadding

    cols = [c for c in dataset.column_names if c in ("input_ids", "attention_mask", "token_type_ids", "label", "labels")]
    loader = DataLoader(dataset.select_columns(cols), batch_size=batch_size, collate_fn=DataCollatorWithPadding(tokenizer))
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for batch in loader:
            labels = batch.pop("labels")
            logits = model(**batch).logits
            correct += (logits.argmax(-1) == labels).sum().item()
            total += labels.numel()
    return correct / total


HUB_TOKEN = "hf_testtoken_3f9c1e7a5b"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """The test Hub, with the client switched online, pointed at it, and holding the token in `HF_TOKEN`."""
    from huggingface_hub import constants
    from hub_server import HubServer

    server = HubServer(tmp_path / "hub_storage", require_token=HUB_TOKEN).start()
    # huggingface_hub reads these at import time; conftest set HF_HUB_OFFLINE=1 for everything else.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setenv("HF_TOKEN", HUB_TOKEN)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    yield server
    server.stop()
