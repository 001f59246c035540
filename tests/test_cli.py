"""`hf-compress` end to end on tiny models saved to temp dirs, and the bad-input table."""

from __future__ import annotations

import csv
import json
import os
import random
import subprocess
import sys

import pytest
import torch

from hf_compress.cli.main import main

WORDS = ["good", "great", "fine", "fun", "bad", "awful", "dull", "poor", "the", "movie", "was", "a", "plot", "film"]
POSITIVE = {"good", "great", "fine", "fun"}
NEGATIVE = {"bad", "awful", "dull", "poor"}


def make_tiny_model(folder, head: bool = True, num_labels: int = 2):
    """A 2-layer BERT (hidden 64: rows of 64 values, which bitsandbytes' CPU 4-bit kernels need) with the tests'
    WordPiece tokenizer (`task_helpers.tiny_tokenizer`, which really splits the words), saved in `folder`."""
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    from task_helpers import tiny_tokenizer

    tok = tiny_tokenizer(folder)
    assert tok.unk_token_id not in tok("the movie was good")["input_ids"]
    config = BertConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64, num_labels=num_labels)
    torch.manual_seed(0)
    model = BertForSequenceClassification(config) if head else BertModel(config)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def make_csv(path, n: int = 96, seed: int = 0, label_column: str = "label", text_column: str = "text"):
    """Sentences whose label is 1 when they hold a positive word, 0 for a negative one."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        word = rng.choice(sorted(POSITIVE if label else NEGATIVE))
        filler = [rng.choice(["the", "movie", "was", "a", "plot", "film"]) for _ in range(4)]
        filler.insert(rng.randrange(5), word)
        rows.append({text_column: " ".join(filler), label_column: label})
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[text_column, label_column])
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


FAST = ["--max_steps", "6", "--per_device_train_batch_size", "8", "--learning_rate", "1e-3", "--logging_steps", "50",
        "--max_length", "16", "--pruning_frequency", "1", "--disable_tqdm", "true", "--use_cpu", "true"]


@pytest.fixture
def tiny_setup(tmp_path):
    model = make_tiny_model(tmp_path / "model", head=True)
    data = make_csv(tmp_path / "data.csv")
    return model, data, tmp_path


def _read(out):
    with open(os.path.join(out, "compression_report.json")) as f:
        report = json.load(f)
    with open(os.path.join(out, "README.md")) as f:
        card = f.read()
    return report, card


def _console_script():
    exe = os.path.join(os.path.dirname(sys.executable), "hf-compress")
    return [exe] if os.path.exists(exe) else [sys.executable, "-m", "hf_compress.cli.main"]


@pytest.fixture(scope="module")
def prune_only_run(tmp_path_factory):
    """`hf-compress --sparsity 0.5 --no_quantize` on the tiny model, run once, through the installed command (a
    subprocess, as users run it): `(CompletedProcess, output folder, the folder it was written in)`. Read by
    `test_prune_only_end_to_end` (the output) and `test_console_script_runs_end_to_end` (the command)."""
    tmp = tmp_path_factory.mktemp("prune-only")
    model, data, out = make_tiny_model(tmp / "model", head=True), make_csv(tmp / "data.csv"), tmp / "out"
    res = subprocess.run(_console_script() + ["--model", model, "--dataset", data, "--output_dir", str(out), "--sparsity",
                                              "0.5", "--no_quantize", *FAST], capture_output=True, text=True, timeout=600)
    return res, out, tmp


def test_prune_only_end_to_end(prune_only_run):
    res, out, tmp = prune_only_run
    assert res.returncode == 0, res.stderr[-2000:]
    names = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "tokenizer.json", "compression_report.json", "README.md"} <= names
    # The run left no temporary folder next to the output.
    assert [p for p in os.listdir(tmp) if p.startswith(".hf-compress-")] == []

    from transformers import AutoModelForSequenceClassification

    from hf_compress.pruning import default_targets, sparsity_stats

    reloaded = AutoModelForSequenceClassification.from_pretrained(out)
    stats = sparsity_stats(reloaded, default_targets(reloaded))
    # Layer scope prunes round(0.5 * numel) entries of every targeted matrix: exactly half of them overall.
    assert stats["zeros"] == stats["total"] // 2
    report, card = _read(out)
    # The report counts every Linear weight (pooler and head too, which are not pruned).
    linear = sum(m.weight.numel() for m in reloaded.modules() if isinstance(m, torch.nn.Linear))
    assert report["sparsity"]["linear_weights"] == round(stats["zeros"] / linear, 6)
    assert report["techniques"] == ["pruning"]
    assert report["quantization"] is None
    # The held-out split: no test/validation in the csv, so a seeded 10% of the 96 rows.
    assert set(report["metrics"]["compressed"]) == {"accuracy", "f1"}
    # 10 held-out rows: every accuracy is a multiple of 1/10.
    assert round(report["metrics"]["compressed"]["accuracy"] * 10, 6) % 1 == 0
    assert report["eval"]["split"] == "train (seeded 10% held out)"
    assert report["pipeline"]["train_steps"] == 6
    assert report["pipeline"]["base_finetune_steps"] == 0  # the head was already there
    assert "--sparsity 0.5" in card or "target_sparsity" in card
    summary = res.stdout
    assert "linear-weight sparsity" in summary
    assert f"{100 * report['sparsity']['linear_weights']:.1f}%" in summary


def test_headless_model_gets_dense_finetune_first(tmp_path):
    """A bare encoder gets a new head: the base is fine-tuned dense first, and its accuracy is the base's."""
    model = make_tiny_model(tmp_path / "enc", head=False)
    data = make_csv(tmp_path / "d.csv")
    out = tmp_path / "out"
    rc = main(["--model", model, "--dataset", data, "--output_dir", str(out), "--no_quantize", "--no_prune",
               "--base_finetune_steps", "4", *FAST])
    assert rc == 0
    report, _ = _read(out)
    assert report["pipeline"]["base_finetune_steps"] == 4
    assert report["pipeline"]["stages"]["base_finetune"]["steps"] == 4
    assert report["sparsity"]["linear_weights"] == 0.0
    cfg = json.load(open(out / "config.json"))
    assert cfg["architectures"] == ["BertForSequenceClassification"]


def test_no_train_one_shot_prune_and_yaml_recipe(tiny_setup):
    model, data, tmp = tiny_setup
    recipe = tmp / "recipe.yaml"
    recipe.write_text(f"model: {model}\ndataset: {data}\nsparsity: 0.75\nquantize: false\ntrain: false\nmax_length: 16\n")
    out = tmp / "out"
    # The command line wins over the recipe: 0.25, not 0.75.
    rc = main(["--config", str(recipe), "--output_dir", str(out), "--sparsity", "0.25", "--use_cpu", "true"])
    assert rc == 0
    report, card = _read(out)
    assert report["pipeline"]["train_steps"] == 0
    from transformers import AutoModelForSequenceClassification

    # No training: the unpruned weights equal the base's exactly.
    base = AutoModelForSequenceClassification.from_pretrained(model)
    res = AutoModelForSequenceClassification.from_pretrained(out)
    wb = base.bert.encoder.layer[0].attention.self.query.weight
    wr = res.bert.encoder.layer[0].attention.self.query.weight
    kept = wr != 0
    assert torch.equal(wr[kept], wb[kept])
    assert int((~kept).sum()) == round(0.25 * wb.numel())
    from hf_compress.pruning import default_targets, sparsity_stats

    stats = sparsity_stats(res, default_targets(res))
    assert stats["zeros"] == sum(round(0.25 * p.numel()) for n, p in res.named_parameters() if n in default_targets(res))
    assert "--config=" in card


def test_overwrite_replaces_output(tiny_setup):
    model, data, tmp = tiny_setup
    out = tmp / "out"
    out.mkdir()
    (out / "old.txt").write_text("x")
    args = ["--model", model, "--dataset", data, "--output_dir", str(out), "--no_quantize", "--no_train", "--sparsity", "0.5", "--use_cpu", "true"]
    assert main(args) == 2
    assert (out / "old.txt").exists()
    # A folder hf-compress did not write is never replaced, even with --overwrite (tests/test_outputs_safety.py).
    assert main(args + ["--overwrite"]) == 2
    assert (out / "old.txt").read_text() == "x"
    (out / "old.txt").unlink()
    assert main(args) == 0  # an empty folder is filled
    first = (out / "compression_report.json").stat().st_ino
    assert main(args + ["--overwrite"]) == 0  # an earlier output of ours is replaced
    assert (out / "compression_report.json").stat().st_ino != first


# --- bad input: one line on stderr, exit code 2, nothing trained or written --------------------------------------

def _bad_cases(tmp):
    model = make_tiny_model(tmp / "model")
    data = make_csv(tmp / "data.csv")
    nolabel = make_csv(tmp / "nolabel.csv", label_column="stars_given")
    (tmp / "full").mkdir()
    (tmp / "full" / "x.txt").write_text("x")
    from transformers import ViTConfig

    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64).save_pretrained(tmp / "vit")
    base = ["--model", model, "--dataset", data, "--output_dir", str(tmp / "out")]
    return {
        "unknown model": (["--model", str(tmp / "nope"), "--dataset", data, "--output_dir", str(tmp / "out")],
                          r"Unknown model '.*nope'"),
        "unknown dataset": (["--model", model, "--dataset", str(tmp / "missing.csv"), "--output_dir", str(tmp / "out")],
                            r"Unknown dataset '.*missing.csv'"),
        "no matching task": (["--model", str(tmp / "vit"), "--dataset", data, "--output_dir", str(tmp / "out")],
                             r"No task matches the model \(model_type 'vit'"),
        "missing label column": (["--model", model, "--dataset", nolabel, "--output_dir", str(tmp / "out")],
                                 r"has no label column \(columns: text, stars_given\); pass `--label_column`"),
        "given label column absent": (base + ["--label_column", "y"], r"has no label column 'y'"),
        "sparsity 1.0": (base + ["--sparsity", "1.0"], r"target_sparsity must be in \[0, 1\), got 1.0"),
        "sparsity negative": (base + ["--sparsity=-0.1"], r"target_sparsity must be in \[0, 1\), got -0.1"),
        "bits 3": (base + ["--bits", "3"], r"bits must be 4 or 8, got 3"),
        "output not empty": (["--model", model, "--dataset", data, "--output_dir", str(tmp / "full")],
                             r"exists and is not empty; pass `--overwrite`"),
        "unknown option": (base + ["--frobnicate", "1"], r"unknown options --frobnicate 1; see `hf-compress --help`"),
        "qa task on classification data": (base + ["--task", "question-answering"],
                                           r"has no question column \(columns: text, label\); pass `--text_column`"),
        "unknown teacher": (base + ["--teacher", str(tmp / "noteacher")], r"--teacher: Unknown model '.*noteacher'"),
    }


BAD = ["unknown model", "unknown dataset", "no matching task", "missing label column", "given label column absent",
       "sparsity 1.0", "sparsity negative", "bits 3", "output not empty", "unknown option", "qa task on classification data", "unknown teacher"]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_one_line_exit_2(case, tmp_path, capsys):
    import re

    argv, pattern = _bad_cases(tmp_path)[case]
    capsys.readouterr()  # drop what building the fixtures printed
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("hf-compress: error: ")
    assert re.search(pattern, err[0]), err[0]
    assert not (tmp_path / "out").exists()
    assert [p for p in os.listdir(tmp_path) if p.startswith(".hf-compress-")] == []


def test_console_script_subprocess(tmp_path):
    """The installed `hf-compress` script: bad input exits 2 with one line and no traceback."""
    cmd = _console_script()
    res = subprocess.run(cmd + ["--model", str(tmp_path / "nope"), "--bits", "4"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == [
        f"hf-compress: error: Unknown model '{tmp_path / 'nope'}': it is not a local directory and could not be "
        "fetched from the Hub (OSError); pass a model directory or a Hub id."
    ]
    res = subprocess.run(cmd + ["--help"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0
    for option in ("--model", "--dataset", "--teacher", "--target_sparsity", "--bits", "--no_quantize", "--overwrite"):
        assert option in res.stdout


@pytest.mark.parametrize("bits", [8, 4])
def test_prune_and_quantize(tiny_setup, bits):
    model, data, tmp = tiny_setup
    out = tmp / f"out{bits}"
    rc = main(["--model", model, "--dataset", data, "--output_dir", str(out), "--sparsity", "0.5", "--bits", str(bits),
               "--format", "bitsandbytes", *FAST])
    assert rc == 0
    report, card = _read(out)
    assert report["techniques"] == ["pruning", "quantization"]
    assert report["quantization"]["bits"] == [bits]
    # Pruning and quantization-aware training compose: the last quarter of the steps was fake-quantized, and the
    # pruned zeros survive bnb's rounding (absmax / NF4 codes map 0 to 0) in every encoder matrix.
    assert report["pipeline"]["stages"]["qat"] == {"bits": bits, "fraction": 0.25}
    encoder = {k: v for k, v in report["sparsity"]["per_layer"].items() if ".encoder.layer." in k and k.endswith("weight")}
    assert len(encoder) == 12 and all(v == pytest.approx(0.5, abs=0.02) for v in encoder.values()), encoder
    # Every encoder Linear (2 layers x 6) is quantized; the head and pooler? the head stays full precision.
    assert report["quantization"]["num_quantized_modules"] >= 12
    cfg = json.load(open(out / "config.json"))
    assert cfg["quantization_config"]["load_in_8bit" if bits == 8 else "load_in_4bit"] is True
    # The result is measured from the reloaded quantized checkpoint, on the same rows as the base.
    from hf_compress.quantization import load_quantized

    reloaded = load_quantized(str(out))
    assert type(reloaded).__name__ == "BertForSequenceClassification"
    assert report["size"]["compressed_weights_bytes"] == os.path.getsize(out / "model.safetensors")
    assert report["size"]["compressed_weights_bytes"] < report["size"]["base_weights_bytes"]
    assert f"{bits}-bit" in card or f"bits: {bits}" in card or f"load_in_{bits}bit" in card


def test_console_script_runs_end_to_end(prune_only_run):
    """The real installed command (subprocess) on a tiny model: files, report and card."""
    res, out, _ = prune_only_run
    assert res.returncode == 0, res.stderr[-2000:]
    report, card = _read(out)
    assert report["techniques"] == ["pruning"]
    assert "compressed" in res.stdout and "linear-weight sparsity" in res.stdout
    assert "hf-compress --model" in card  # the reproducing command is in the card


@pytest.mark.slow
def test_demo_real_model_reduced_steps(tmp_path):
    """`hf-compress demo` on the real MiniLM-L6 and Rotten Tomatoes, with fewer steps and eval rows."""
    out = tmp_path / "demo"
    rc = main(["demo", "--output_dir", str(out), "--base_finetune_steps", "40", "--max_steps", "20",
               "--max_eval_samples", "200", "--disable_tqdm", "true"])
    assert rc == 0
    report, card = _read(out)
    assert report["eval"]["split"] == "test[:200]"
    assert report["quantization"]["bits"] == [8]
    assert report["techniques"] == ["pruning", "quantization"]
    assert report["pipeline"]["base_finetune_steps"] == 40 and report["pipeline"]["train_steps"] == 20
    # The fine-tuned dense base beats chance on 200 balanced-ish rows; the 8-bit file is smaller than fp32.
    assert report["metrics"]["base"]["accuracy"] > 0.6
    assert report["size"]["compressed_weights_bytes"] < 0.8 * report["size"]["base_weights_bytes"]
    assert report["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert "base_model: sentence-transformers/all-MiniLM-L6-v2" in card


def test_qat_without_pruning(tiny_setup, capsys):
    model, data, tmp = tiny_setup
    out = tmp / "qat"
    rc = main(["--model", model, "--dataset", data, "--output_dir", str(out), "--no_prune", "--bits", "8", "--qat_fraction", "0.5", *FAST])
    assert rc == 0
    assert "fine-tune 6 steps (last 50% fake-quantized) -> export 8-bit" in capsys.readouterr().out
    report, _ = _read(out)
    assert report["pipeline"]["stages"]["qat"] == {"bits": 8, "fraction": 0.5}
    assert report["techniques"] == ["quantization"]
    # No fake-quant parametrization survives in the saved checkpoint.
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "parametrizations" in k]


def test_distillation_from_teacher(tiny_setup, capsys):
    """`--teacher` trains with DistillationTrainer: its hard/soft loss parts are logged and the card says so."""
    model, data, tmp = tiny_setup
    teacher = make_tiny_model(tmp / "teacher", head=True)
    out = tmp / "kd"
    rc = main(["--model", model, "--teacher", teacher, "--dataset", data, "--output_dir", str(out), "--no_quantize",
               "--sparsity", "0.5", "--logging_steps", "2", *[a for a in FAST if a not in ("--logging_steps", "50")]])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "distil 6 steps with gradual pruning to 50%" in printed
    report, card = _read(out)
    # The per-step dicts go to the report's log history (and trainer_state / report_to), not to the console.
    logged = [h for h in report["pipeline"]["stages"]["train"]["log_history"] if "loss" in h]
    assert [h["step"] for h in logged] == [2, 4, 6]
    assert "'loss'" not in printed and "sparsity/" not in printed
    assert report["techniques"] == ["distillation", "pruning"]
    assert "distillation" in card


def test_quantized_embeddings_card_loads_with_load_quantized(tiny_setup):
    # Low-bit embedding tables live beside model.safetensors; `from_pretrained` alone would re-initialise them, so the
    # card's snippet must use `load_quantized`, and that loader reproduces the logits recorded in the report.
    from transformers import AutoModelForSequenceClassification

    from hf_compress.quantization import load_quantized

    model, data, tmp = tiny_setup
    out = tmp / "out-emb"
    rc = main(["--model", model, "--dataset", data, "--output_dir", str(out), "--sparsity", "0.5", "--bits", "8",
               "--quantize_embeddings", "true", "--format", "bitsandbytes", *FAST])
    assert rc == 0
    report, card = _read(out)
    assert "load_quantized(" in card and "AutoModelForSequenceClassification.from_pretrained" not in card
    # Checked by loading: plain from_pretrained fails loudly (never silently wrong), load_quantized reproduces.
    assert report["loaders"]["from_pretrained (without hf_compress)"]["ok"] is False
    assert "RuntimeError" in report["loaders"]["from_pretrained (without hf_compress)"]["error"]
    # ... against the trained model under the export's fake quantization: exactly (tolerance 1e-4 x the logit scale)
    loader = report["loaders"]["load_quantized"]
    assert loader["ok"] is True and loader["status"] == "match" and loader["max_abs_logit_diff"] == 0.0
    assert loader["tolerance"] == 1e-4
    # A local dataset is named by its file name in the metadata, not by a path on this machine.
    from huggingface_hub import ModelCard

    assert ModelCard(card).data.datasets == ["data.csv"] and str(tmp) not in card.split("---")[1]  # the metadata
    v = report["verification"]
    inputs = {k: torch.tensor(x) for k, x in v["inputs"].items()}
    with torch.no_grad():
        right = load_quantized(str(out))(**inputs).logits
    torch.testing.assert_close(right, torch.tensor(v["logits"]), atol=1e-5, rtol=0)
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):  # no silent re-initialisation
        AutoModelForSequenceClassification.from_pretrained(str(out))


def _assert_exact(loader: dict) -> None:
    """The loader reproduces the trained model (under the export's fake quantization) exactly."""
    assert loader["ok"] is True and loader["status"] == "match" and loader["max_abs_logit_diff"] == 0.0, loader


@pytest.mark.parametrize("fmt", ["compressed-tensors", "bitmask"])
def test_format_loads_with_plain_from_pretrained(tiny_setup, fmt):
    """The default quantized format (compressed-tensors) loads without hf_compress; bitmask only with it, loudly
    refused without. The report says so, checked by loading, and pipeline() reproduces the recorded logits."""
    from transformers import pipeline

    model, data, tmp = tiny_setup
    out = tmp / f"out-{fmt}"
    args = ["--model", model, "--dataset", data, "--output_dir", str(out), "--sparsity", "0.5", *FAST]
    rc = main(args + (["--quantize_embeddings", "true"] if fmt == "compressed-tensors" else ["--format", fmt]))
    assert rc == 0
    report, card = _read(out)
    assert report["format"] == fmt
    plain = report["loaders"]["from_pretrained (without hf_compress)"]
    if fmt == "compressed-tensors":
        _assert_exact(plain)
        assert json.load(open(out / "config.json"))["quantization_config"]["quant_method"] == "compressed-tensors"
    else:
        assert plain["ok"] is False and "RuntimeError" in plain["error"]
        _assert_exact(report["loaders"]["load_compressed"])
    _assert_exact(report["loaders"]["pipeline()"])
    v = report["verification"]
    pipe = pipeline("text-classification", model=str(out))
    with torch.no_grad():
        logits = pipe.model(**{k: torch.tensor(x) for k, x in v["inputs"].items()}).logits
    torch.testing.assert_close(logits, torch.tensor(v["logits"]), atol=1e-5, rtol=0)
