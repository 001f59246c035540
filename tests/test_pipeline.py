"""The pipeline package's contract: `prepare` resolves everything into a frozen plan that `run` never changes."""

from __future__ import annotations

import dataclasses

import pytest

from hf_compress.cli.main import main


def _prepare(tmp_path, **quantization):
    from test_cli import make_csv, make_tiny_model

    from hf_compress.distillation import DistillationArguments
    from hf_compress.pipeline import DataArguments, ModelArguments, prepare
    from hf_compress.pruning import PruningArguments
    from hf_compress.quantization import QuantizationArguments

    given = QuantizationArguments(**quantization)
    plan = prepare(ModelArguments(model=make_tiny_model(tmp_path / "model")), DataArguments(dataset=make_csv(tmp_path / "d.csv")),
                   DistillationArguments(output_dir=str(tmp_path / "out"), use_cpu=True), PruningArguments(), given)
    return plan, given


def test_prepare_resolves_the_quantized_format_into_a_frozen_plan(tmp_path):
    plan, given = _prepare(tmp_path)  # `--format` defaults to compressed-tensors when quantizing
    assert plan.model_args.format == "compressed-tensors"
    assert plan.quantization_args.backend == "compressed-tensors"
    assert given.backend == "bitsandbytes"  # the caller's arguments are not changed
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.quantization_args = given
    assert plan.prunes and plan.fake_quantizes and not plan.prunes_structures
    assert plan.techniques == ["pruning", "quantization"]


def test_a_format_conflict_is_one_line_before_any_training(tmp_path, capsys):
    """`--bits 4 --double_quant` under the default compressed-tensors format: refused by `prepare` (exit 2)."""
    from test_cli import make_csv, make_tiny_model

    out = tmp_path / "out"
    model, data = make_tiny_model(tmp_path / "model"), make_csv(tmp_path / "d.csv")
    capsys.readouterr()  # the fixture's own "Writing model shards" bar
    code = main(["--model", model, "--dataset", data, "--output_dir", str(out), "--bits", "4", "--double_quant", "true",
                 "--use_cpu", "true"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["hf-compress: error: double_quant is a bitsandbytes option, got backend='compressed-tensors'; drop it."]
    assert not out.exists()


def test_old_compression_module_is_a_warning_alias_of_the_pipeline():
    import importlib
    import sys
    import warnings

    import hf_compress.pipeline as pipeline

    sys.modules.pop("hf_compress.compression", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old = importlib.import_module("hf_compress.compression")
    assert [w.category for w in caught if "hf_compress.pipeline" in str(w.message)] == [FutureWarning]
    assert old.compress is pipeline.compress and old.prepare is pipeline.prepare
    assert old.ModelArguments is pipeline.ModelArguments
