"""`hf-compress --quant_method gptq`: the one-shot GPTQ export through the pipeline (tiny Llama, word-level text)."""

from __future__ import annotations

import json
import os

import pytest

from hf_compress.cli.main import main
from task_helpers import lm_texts, make_tiny

FAST = ["--per_device_train_batch_size", "8", "--logging_steps", "50", "--max_length", "32", "--disable_tqdm", "true",
        "--use_cpu", "true", "--seed", "0"]


@pytest.fixture(scope="module")
def causal(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("gptq-model") / "causal", "causal")


@pytest.fixture
def text(tmp_path):
    data = tmp_path / "lm.txt"
    data.write_text("\n\n".join(lm_texts(60)))
    return str(data)


def test_cli_gptq_export_stores_gptq_integers_and_reloads_as_the_gptq_model(causal, text, tmp_path):
    out = tmp_path / "out"
    assert main(["--model", causal, "--dataset", text, "--output_dir", str(out), "--no_train", "--no_prune", "--bits", "4",
                 "--backend", "compressed-tensors", "--group_size", "32", "--quant_method", "gptq", "--gptq_calibration_batches", "2", *FAST]) == 0
    with open(os.path.join(out, "compression_report.json")) as f:
        report = json.load(f)
    export = report["pipeline"]["stages"]["export"]
    # Every quantized Linear carries GPTQ's own integers and scales, not round-to-nearest ones.
    assert export["precomputed_modules"] == sorted(export["quantized_linear_modules"])
    assert len(export["precomputed_modules"]) == 2 * 7  # 2 decoder layers x q, k, v, o, gate, up, down
    # The loaders check compares each loader with the GPTQ model itself: a RTN reference would not match.
    loaders = report["loaders"]
    for name in ("from_pretrained (without hf_compress)", "pipeline()"):
        assert loaders[name]["status"] == "match"
        assert loaders[name]["max_abs_logit_diff"] <= 1e-5
    # ... and the stored weights are not what round-to-nearest would have written.
    import torch
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from hf_compress.quantization.numerics import fake_quantize_int

    original = AutoModelForCausalLM.from_pretrained(causal)
    written = AutoModelForCausalLM.from_pretrained(out, quantization_config=CompressedTensorsConfig(dequantize=True))
    differ = [n for n in export["precomputed_modules"]
              if not torch.equal(written.get_submodule(n).weight.float(),
                                 fake_quantize_int(original.get_submodule(n).weight.float(), 4, 32))]
    assert len(differ) >= 10


@pytest.mark.parametrize("extra, message", [
    (["--format", "bitsandbytes"], "writes its integers and scales in compressed-tensors"),
    (["--no_quantize"], "needs quantization"),
    (["--max_steps", "2"], "pass `--no_qat`"),
])
def test_cli_gptq_refusals_are_one_line_before_any_work(causal, text, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    code = main(["--model", causal, "--dataset", text, "--output_dir", str(out), "--no_prune", "--bits", "4",
                 "--quant_method", "gptq", *extra, *FAST])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert not out.exists()


def test_cli_gptq_refuses_a_classifier(tmp_path, capsys):
    seq = make_tiny(tmp_path / "seq", "seq")
    data = tmp_path / "reviews.csv"
    data.write_text("text,label\n" + "\n".join(f"good film {i},1\nbad film {i},0" for i in range(20)))
    code = main(["--model", seq, "--dataset", str(data), "--output_dir", str(tmp_path / "out"), "--no_train",
                 "--no_prune", "--bits", "4", "--quant_method", "gptq", *FAST])
    assert code == 2
    assert "runs on causal LMs" in capsys.readouterr().err
