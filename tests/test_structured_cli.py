"""`hf-compress --prune_structure ...`: structured pruning in the pipeline (one-shot before distillation, gradual)."""

from __future__ import annotations

import json
import os

import pytest
from test_cli import FAST, make_csv, make_tiny_model

from hf_compress.cli.main import main


@pytest.fixture
def setup(tmp_path):
    return make_tiny_model(tmp_path / "model", head=True), make_csv(tmp_path / "data.csv"), tmp_path


@pytest.mark.parametrize("schedule", ["oneshot", "gradual"])
def test_cli_structured_pruning_distilled_from_base(setup, schedule, capsys):
    from transformers import AutoModelForSequenceClassification

    model, data, tmp = setup
    out = tmp / schedule
    rc = main(["--model", model, "--dataset", data, "--output_dir", str(out), "--no_quantize", "--no_prune",
               "--teacher", "base", "--prune_structure", "ffn,layers", "--prune_ffn_keep", "0.5", "--prune_layers_keep",
               "0.5", "--prune_calibration_batches", "2", "--prune_schedule", schedule, "--prune_frequency", "1", *FAST])
    assert rc == 0, capsys.readouterr().err
    reloaded = AutoModelForSequenceClassification.from_pretrained(out)  # plain transformers
    assert (reloaded.config.intermediate_size, reloaded.config.num_hidden_layers) == (64, 1)
    with open(os.path.join(out, "compression_report.json")) as f:
        report = json.load(f)
    assert report["techniques"][0] == "structured pruning" and "distillation" in report["techniques"]
    stage = report["pipeline"]["stages"]["structured_pruning"]
    assert stage["schedule"] == schedule
    if schedule == "oneshot":
        assert len(stage["scores"]["ffn"]) == 2 and len(stage["scores"]["ffn"][0]) == 128  # saved importance scores
        assert stage["parameters_after"] == reloaded.num_parameters()
        # the run's self-check of the cut (pruned and reloaded vs masked, relative to the logit scale)
        assert stage["check"]["tolerance"] == 1e-4
        assert stage["check"]["pruned_vs_masked"] <= 1e-5 and stage["check"]["reloaded_vs_masked"] <= 1e-5


def test_cli_structured_pruning_bad_target_is_one_line(setup, capsys):
    model, data, tmp = setup
    rc = main(["--model", model, "--dataset", data, "--output_dir", str(tmp / "x"), "--prune_structure", "ffn,heads"])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err == "hf-compress: error: prune_structure='ffn,heads' needs a target for ffn,heads: set --prune_keep, --prune_ffn_keep or --prune_target_params."


def test_cli_gradual_structured_with_unstructured_sparsity_is_refused_before_any_work(setup, capsys):
    # The gradual cut at the end of training would leave magnitude masks of the uncut shapes (it crashed in
    # `apply_masks` before this refusal); the one-shot cut first, then unstructured pruning, runs.
    model, data, tmp = setup
    rc = main(["--model", model, "--dataset", data, "--output_dir", str(tmp / "x"), "--sparsity", "0.3",
               "--prune_structure", "ffn", "--prune_ffn_keep", "0.5", "--prune_schedule", "gradual", *FAST])
    assert rc == 2
    out, err = capsys.readouterr()
    assert err.strip() == (
        "hf-compress: error: `--prune_schedule gradual` cuts ffn at the end of training, after the magnitude masks of "
        "`--sparsity 0.3` were fixed on the uncut shapes; pass `--prune_schedule oneshot` (cut first, then prune the "
        "smaller model) or `--no_prune`.")
    assert out == "" and not (tmp / "x").exists()
