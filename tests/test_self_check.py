"""The self-check every pruning run ends with (issue 19): unstructured masks made permanent vs the masked model, the
written folder's reload vs the model, the gradual structured cut's figures in the report, and a failed check (or a
loader that computes something else) reaching the CLI user in one line with a non-zero exit code.

Tiny models with randomised norm weights and biases; a wrong cut is injected by patching the step that makes the
pruning permanent to zero one extra row.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import transformers
from test_cli import FAST, make_csv, make_tiny_model

from hf_compress.cli.main import main
from hf_compress.pruning import attach_masks, magnitude_masks, remove_masks, resolve_targets
from hf_compress.formats.bitmask import load_compressed, save_compressed
from hf_compress.pruning.self_check import (
    SelfCheckError,
    check_batch,
    check_permanent,
    check_reload,
    logits_on,
    reload_pretrained,
)

VOCAB = 96


def _tiny(family: str):
    """A 2-layer Llama (biases everywhere) or GPT-2 (Conv1D, fused `c_attn`), every 1-D parameter randomised."""
    torch.manual_seed(0)
    if family == "llama":
        config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64,
                                          attention_bias=True, mlp_bias=True, initializer_range=0.1, pad_token_id=0)
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_inner=128, n_positions=64,
                                         initializer_range=0.1, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model.eval()


def _masked(model, sparsity: float = 0.5):
    """Magnitude masks at `sparsity` attached and applied (what the callback leaves at the end of training)."""
    names = resolve_targets(model)
    params = dict(model.named_parameters())
    masks = magnitude_masks({n: params[n].detach() for n in names}, sparsity, "layer")
    for n, buffer in attach_masks(model, names).items():
        buffer.copy_(masks[n])
    with torch.no_grad():
        for n, m in masks.items():
            params[n].masked_fill_(~m, 0.0)
    return names


def _zero_extra_row(model) -> None:
    """The injected bug: one more row zeroed than the masks (or the plan) say, in the last block's FFN output
    projection (a row that writes into the hidden stream: a query row of a random model would hardly matter)."""
    name = resolve_targets(model)[-1]
    with torch.no_grad():
        dict(model.named_parameters())[name][0].zero_()


def _wrong_remove_masks(model) -> None:
    remove_masks(model)
    _zero_extra_row(model)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_permanent_equals_masked_exactly(family):
    model = _tiny(family)
    names = _masked(model)
    batch = check_batch(model)
    figures = check_permanent(model, batch, remove_masks)
    # Made permanent by zeroing what is already zero: the same floats, so exactly equal.
    assert figures["permanent_vs_masked"] == 0.0
    assert figures["tolerance"] == 1e-4 and figures["logit_scale"] > 0.1
    assert not any(n.endswith("_mask") for n, _ in model.named_buffers())  # a plain model again
    weights = dict(model.named_parameters())
    assert all(int((weights[n] == 0).sum()) == round(0.5 * weights[n].numel()) for n in names)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_wrong_permanent_step_stops_in_one_line(family):
    model = _tiny(family)
    _masked(model)
    with pytest.raises(SelfCheckError, match=rf"^unstructured pruning self-check failed for `{family}`: permanent vs "
                                             r"masked \d\.\d+(e-0\d)? \(relative to the logit scale [0-9.e+-]+; "
                                             r"tolerance 0\.0001\); nothing was written\. Please report this model "
                                             r"type; the masks are in `get_masks\(model\)` until then\.$") as err:
        check_permanent(model, check_batch(model), _wrong_remove_masks)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("fmt", ["bitmask", "dense"])
def test_reload_of_the_written_folder(family, fmt, tmp_path):
    model = _tiny(family)
    _masked(model)
    batch = check_batch(model)
    check_permanent(model, batch, remove_masks)
    if fmt == "bitmask":
        save_compressed(model, str(tmp_path))
        reloaded = load_compressed(str(tmp_path))
    else:
        reloaded = reload_pretrained(model, str(tmp_path))
    figures = check_reload(model, reloaded, batch)
    assert figures["reloaded_vs_permanent"] == 0.0  # both formats store the weights bit for bit
    _zero_extra_row(reloaded)  # a format that loses a row
    with pytest.raises(SelfCheckError, match=rf"^unstructured pruning self-check failed for `{family}`: reloaded vs "
                                             r"permanent \d\.\d+(e-0\d)? \(relative to the logit scale"):
        check_reload(model, reloaded, batch)


def test_check_batch_is_the_first_rows_of_real_data():
    model = _tiny("llama")
    ids = torch.arange(5 * 80).reshape(5, 80) % VOCAB
    batch = check_batch(model, [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}])
    assert set(batch) == {"input_ids", "attention_mask"}  # labels are not model inputs of the check
    assert torch.equal(batch["input_ids"], ids[:2, :64])
    # Padded positions are nobody's output: only real tokens are compared.
    batch["attention_mask"][1, 10:] = 0
    assert logits_on(model, batch).shape == (64 + 10, VOCAB)


def _trainer(model, tmp_path, callback):
    ids = torch.randint(3, VOCAB, (16, 12), generator=torch.Generator().manual_seed(3))
    ds = [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r} for r in ids]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4,
                                          learning_rate=1e-3, report_to="none", use_cpu=True, save_strategy="no",
                                          disable_tqdm=True)
    return transformers.Trainer(model=model, args=args, train_dataset=ds, callbacks=[callback])


def test_gradual_callback_checks_the_permanent_masks(tmp_path):
    from hf_compress.callbacks import GradualPruningCallback

    model = _tiny("llama").train()
    cb = GradualPruningCallback(target_sparsity=0.5, end_step=2, frequency=1)
    _trainer(model, tmp_path, cb).train()
    assert cb.check["permanent_vs_masked"] == 0.0 and cb.check["tolerance"] == 1e-4
    assert tuple(cb.check_batch["input_ids"].shape) == (2, 12)  # the first training batch, not random ids
    assert not any(n.endswith("_mask") for n, _ in model.named_buffers())


def test_gradual_callback_stops_a_wrong_permanent_step(tmp_path, monkeypatch):
    import hf_compress.callbacks.pruning as cbmod
    from hf_compress.callbacks import GradualPruningCallback

    monkeypatch.setattr(cbmod, "remove_masks", _wrong_remove_masks)
    model = _tiny("llama").train()
    cb = GradualPruningCallback(target_sparsity=0.5, end_step=2, frequency=1)
    with pytest.raises(SelfCheckError, match=r"^unstructured pruning self-check failed for `llama`: permanent vs masked"):
        _trainer(model, tmp_path, cb).train()
    assert cb._hooks == []  # the gradient hooks are removed even when the check fails


# ---- through the CLI ------------------------------------------------------------------------------------------


@pytest.fixture
def setup(tmp_path):
    return make_tiny_model(tmp_path / "model", head=True), make_csv(tmp_path / "data.csv"), tmp_path


def _report(out) -> tuple[dict, str]:
    with open(os.path.join(out, "compression_report.json")) as f:
        report = json.load(f)
    with open(os.path.join(out, "README.md")) as f:
        return report, f.read()


def _error_line(capsys) -> str:
    """The run's one error line: the last line on stderr, the only `hf-compress:` line, and no traceback (the
    other stderr lines are the data-tokenizing progress bars)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.startswith("hf-compress:")]
    assert len(lines) == 1 and err.strip().splitlines()[-1] == lines[0]
    return lines[0]


def _assert_nothing_written(tmp, out) -> None:
    assert not os.path.exists(out)
    assert [p for p in os.listdir(tmp) if p.startswith(".hf-compress-")] == []


@pytest.mark.parametrize("mode", ["gradual", "oneshot"])
def test_cli_unstructured_figures_in_report_and_card(setup, mode, capsys):
    model, data, tmp = setup
    out = tmp / "out"
    extra = ["--no_train"] if mode == "oneshot" else []
    rc = main(["--model", model, "--dataset", data, "--output_dir", str(out), "--sparsity", "0.5", "--no_quantize",
               "--format", "bitmask", *extra, *FAST])
    assert rc == 0, capsys.readouterr().err
    report, card = _report(out)
    stage = report["pipeline"]["stages"]["pruning"]
    assert stage["schedule"] == mode and stage["target_sparsity"] == 0.5
    check = stage["check"]
    assert check["permanent_vs_masked"] == 0.0 and check["reloaded_vs_permanent"] == 0.0
    assert check["tolerance"] == 1e-4 and check["logit_scale"] > 0
    assert "## Self-check" in card
    assert "| pruning | permanent vs masked | 0 |" in card and "| pruning | reloaded vs permanent | 0 |" in card


def test_cli_gradual_structured_figures_reach_the_report(setup, capsys):
    model, data, tmp = setup
    out = tmp / "out"
    rc = main(["--model", model, "--dataset", data, "--output_dir", str(out), "--no_quantize", "--no_prune",
               "--prune_structure", "ffn", "--prune_ffn_keep", "0.5", "--prune_calibration_batches", "2",
               "--prune_schedule", "gradual", "--prune_frequency", "1", *FAST])
    assert rc == 0, capsys.readouterr().err
    report, card = _report(out)
    stage = report["pipeline"]["stages"]["structured_pruning"]
    assert stage["schedule"] == "gradual" and len(stage["ffn"]) == 2 and len(stage["ffn"][0]) == 64
    assert stage["check"]["tolerance"] == 1e-4
    assert stage["check"]["pruned_vs_masked"] <= 1e-5 and stage["check"]["reloaded_vs_masked"] <= 1e-5
    assert stage["masked_fraction_by_step"][-1][1] == 1.0  # fully masked before the cut
    assert "| structured pruning | pruned vs masked |" in card


def _wrong_cut(real):
    def cut(model, plan):
        real(model, plan)
        _zero_extra_row(model)

    return cut


@pytest.mark.parametrize("schedule", ["oneshot", "gradual"])
def test_cli_wrong_structured_cut_is_one_line_and_writes_nothing(setup, schedule, monkeypatch, capsys):
    import hf_compress.pruning.structured as structured

    monkeypatch.setattr(structured, "prune_structures", _wrong_cut(structured.prune_structures))
    model, data, tmp = setup
    out = tmp / "out"
    capsys.readouterr()
    rc = main(["--model", model, "--dataset", data, "--output_dir", str(out), "--no_quantize", "--no_prune",
               "--prune_structure", "ffn", "--prune_ffn_keep", "0.5", "--prune_calibration_batches", "2",
               "--prune_schedule", schedule, "--prune_frequency", "1", *FAST])
    assert rc == 1
    err = _error_line(capsys)
    assert err.startswith("hf-compress: error: structured pruning self-check failed for `bert`: pruned vs masked ")
    assert err.endswith("nothing was written. Please report this model type; use unstructured pruning for it meanwhile.")
    _assert_nothing_written(tmp, out)


@pytest.mark.parametrize("mode", ["gradual", "oneshot"])
def test_cli_wrong_permanent_step_is_one_line_and_writes_nothing(setup, mode, monkeypatch, capsys):
    import hf_compress.callbacks.pruning as cbmod
    import hf_compress.pruning as pruning

    monkeypatch.setattr(cbmod, "remove_masks", _wrong_remove_masks)  # the callback's permanent step
    monkeypatch.setattr(pruning, "remove_masks", _wrong_remove_masks)  # the one-shot's
    model, data, tmp = setup
    out = tmp / "out"
    capsys.readouterr()
    extra = ["--no_train"] if mode == "oneshot" else []
    rc = main(["--model", model, "--dataset", data, "--output_dir", str(out), "--sparsity", "0.5", "--no_quantize",
               *extra, *FAST])
    assert rc == 1
    err = _error_line(capsys)
    assert err.startswith("hf-compress: error: unstructured pruning self-check failed for `bert`: permanent vs masked ")
    _assert_nothing_written(tmp, out)


def test_cli_wrong_bitmask_reload_is_one_line_and_writes_nothing(setup, monkeypatch, capsys):
    import hf_compress.formats.bitmask as bitmask  # the bitmask format's loader, which the export stage reloads with

    real = bitmask.load_compressed

    def lossy_load(folder, *args, **kwargs):
        model = real(folder, *args, **kwargs)
        _zero_extra_row(model)
        return model

    monkeypatch.setattr(bitmask, "load_compressed", lossy_load)
    model, data, tmp = setup
    out = tmp / "out"
    capsys.readouterr()
    rc = main(["--model", model, "--dataset", data, "--output_dir", str(out), "--sparsity", "0.5", "--no_quantize",
               "--format", "bitmask", "--no_train", *FAST])
    assert rc == 1
    err = _error_line(capsys)
    assert err.startswith("hf-compress: error: unstructured pruning self-check failed for `bert`: reloaded vs permanent ")
    _assert_nothing_written(tmp, out)


def test_cli_loader_mismatch_is_a_failed_line_and_exit_1(setup, monkeypatch, capsys):
    import hf_compress.model_cards.loading as loading

    real = loading.check_loaders

    def shifted(folder, texts, reference_logits, atol=None):
        # The loaders really load and compare, against logits shifted by 1: every loader computes "something else".
        return real(folder, texts, reference_logits + 1.0, atol)

    monkeypatch.setattr(loading, "check_loaders", shifted)
    model, data, tmp = setup
    out = tmp / "out"
    rc = main(["--model", model, "--dataset", data, "--output_dir", str(out), "--sparsity", "0.5", "--no_quantize",
               "--no_train", *FAST])
    assert rc == 1
    report, _ = _report(out)  # the folder is written (its card says FAILED); the exit code says so too
    assert report["loaders"]["from_pretrained (without hf_compress)"]["status"] == "mismatch"
    summary = capsys.readouterr().out
    closing = summary[summary.index("Techniques:"):].splitlines()
    assert closing[1].startswith("FAILED verification: from_pretrained (without hf_compress) loads the output but "
                                 "computes something else than the trained model: max abs logit diff 1 (tolerance ")
    assert len([line for line in closing if line.startswith("FAILED verification: ")]) == sum(
        v["status"] == "mismatch" for v in report["loaders"].values())


def test_cli_structured_refusal_found_in_the_run_is_one_line_exit_2(setup, capsys):
    # An unreachable parameter budget is only found once the model is loaded, inside `run()`: bad input (2), one line.
    model, data, tmp = setup
    out = tmp / "out"
    capsys.readouterr()
    rc = main(["--model", model, "--dataset", data, "--output_dir", str(out), "--no_quantize", "--no_prune",
               "--prune_structure", "ffn", "--prune_target_params", "10", *FAST])
    assert rc == 2
    assert _error_line(capsys) == ("hf-compress: error: target_params=10 cannot be reached by pruning ffn; add "
                                   "structures or ask for more parameters.")
    _assert_nothing_written(tmp, out)
