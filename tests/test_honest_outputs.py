"""Issue 23, part 2: what the written folder computes and holds is what the report and card say.

- The loaders check compares each loader's logits with the model that was trained (under the export's fake
  quantization), so a 0.05 gap injected into the checkpoint or into the trained model is reported as a failure with
  the measured gap.
- QAT fake-quantizes exactly what the compressed-tensors export quantizes, tied embeddings and their `lm_head`
  included (`torch.equal`).
- bitsandbytes low-bit embeddings keep the model's dtype (bf16, fp16): forward, reload and the CLI's evaluation run.
- The card and report describe the safetensors files as written (read back here with `safe_open`).
- Serving claims come from vLLM's code as read; group sizes it cannot run are refused.
"""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
from safetensors import safe_open

from hf_compress.cli.main import main
from hf_compress.model_cards import build_model_card, build_report
from hf_compress.model_cards.loading import check_loaders, logit_tolerance, serving_engines, vllm_support
from hf_compress.pruning import save_compressed
from hf_compress.quantization import (
    QuantizationArguments,
    attach_fake_quant,
    load_quantized,
    quantization_targets,
    quantize_and_save,
)
from hf_compress.quantization.export import fake_quantized_copy

from conftest import tiny_llama_config
from test_cli import FAST, make_csv, make_tiny_model

CT = "compressed-tensors"
TEXTS = ["the movie was good", "a dull plot", "great fun film", "the film was poor and dull"]
GAP = 0.05


def _randomise_norms(model, seed: int = 0):
    """Norm weights and biases away from 1 / 0, so a wrong formula cannot hide behind them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() or name.endswith(".bias"):
                p.copy_(torch.rand(p.shape, generator=g) * 0.5 + (0.75 if name.endswith("weight") else -0.25))
    return model


def _logits(model, folder, texts=TEXTS):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        return model.eval()(**tok(texts, padding=True, truncation=True, return_tensors="pt")).logits


# --- 1. verification against the trained model ------------------------------------------------------------------


@pytest.fixture(scope="module")
def ct_export(tmp_path_factory):
    """A tiny BERT classifier (with its tokenizer) exported to compressed-tensors int4, group 32."""
    from transformers import AutoModelForSequenceClassification

    root = tmp_path_factory.mktemp("verify")
    src = make_tiny_model(root / "model")
    model = _randomise_norms(AutoModelForSequenceClassification.from_pretrained(src))
    args = QuantizationArguments(backend=CT, bits=4, group_size=32)
    from transformers import AutoTokenizer

    quantize_and_save(model, root / "ct4", args, tokenizer=AutoTokenizer.from_pretrained(src))
    return model, args, root / "ct4"


def test_loaders_check_passes_for_the_exact_export(ct_export):
    model, args, folder = ct_export
    reference = _logits(fake_quantized_copy(model, args), folder)
    loaders = check_loaders(str(folder), TEXTS, reference)
    assert set(loaders) == {"from_pretrained (without hf_compress)", "pipeline()"}
    for name, v in loaders.items():
        assert v["status"] == "match" and v["ok"], (name, v)
        assert v["tolerance"] == pytest.approx(logit_tolerance(CT, name, float(reference.abs().max())))
        assert v["max_abs_logit_diff"] <= v["tolerance"]
    # the fake-quantized copy is not the full-precision model: the check would see a missing QAT replay
    full = _logits(model, folder)
    assert (full - reference).abs().max() > 10 * loaders["pipeline()"]["tolerance"]


def test_loaders_check_catches_a_gap_written_into_the_checkpoint(ct_export, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    model, args, folder = ct_export
    reference = _logits(fake_quantized_copy(model, args), folder)
    tampered = tmp_path / "tampered"
    shutil.copytree(folder, tampered)
    tensors = load_file(tampered / "model.safetensors")
    tensors["classifier.bias"] = tensors["classifier.bias"] + torch.tensor([GAP, 0.0])  # the head stays float
    save_file(tensors, tampered / "model.safetensors", metadata={"format": "pt"})
    loaders = check_loaders(str(tampered), TEXTS, reference)
    for name, v in loaders.items():
        assert v["status"] == "mismatch" and not v["ok"], (name, v)
        assert v["max_abs_logit_diff"] == pytest.approx(GAP, abs=1e-4)


def _run_cli(tmp_path, out, extra=(), perturb=None, monkeypatch=None):
    """`hf-compress` on the tiny BERT; `perturb(model)` runs on the in-memory trained model right after the export."""
    import hf_compress.pipeline.export as export

    if perturb is not None:
        original = export.export_checkpoint

        def export_then_perturb(plan, model, tokenizer, ckpt, log):
            result = original(plan, model, tokenizer, ckpt, log)
            perturb(model)
            return result

        monkeypatch.setattr(export, "export_checkpoint", export_then_perturb)
    model = make_tiny_model(tmp_path / "model")
    data = make_csv(tmp_path / "data.csv")
    code = main(["--model", model, "--dataset", data, "--output_dir", str(out), "--sparsity", "0.5", *extra, *FAST])
    assert code == (1 if perturb is not None else 0)  # a verification mismatch fails the run (exit 1)
    report = json.loads((out / "compression_report.json").read_text())
    return report, (out / "README.md").read_text()


def test_pipeline_reports_a_gap_between_the_trained_model_and_its_export(tmp_path, monkeypatch, capsys):
    def perturb(model):
        with torch.no_grad():
            model.classifier.bias[0] += GAP

    report, card = _run_cli(tmp_path, tmp_path / "out", ("--bits", "8"), perturb, monkeypatch)
    loaders = report["loaders"]
    assert set(loaders) == {"from_pretrained (without hf_compress)", "pipeline()"}
    for v in loaders.values():
        assert v["status"] == "mismatch" and not v["ok"]
        assert v["max_abs_logit_diff"] == pytest.approx(GAP, abs=1e-4)
    out = capsys.readouterr().out
    assert "FAILED verification: from_pretrained (without hf_compress) loads the written folder but its logits differ" in out
    assert "by 0.05 " in out
    assert card.count("**FAILED: loads but computes something else**") == 2
    assert report["serving"]["transformers"]["serves"] is False


def test_pipeline_verifies_qat_export_against_the_trained_model(tmp_path):
    report, card = _run_cli(tmp_path, tmp_path / "out", ("--bits", "4", "--backend", CT, "--group_size", "32"))
    assert report["pipeline"]["stages"]["qat"] == {"bits": 4, "fraction": 0.25}
    for v in report["loaders"].values():
        assert v["ok"] and v["max_abs_logit_diff"] <= v["tolerance"] < 1e-3
    assert "## Verification" in card and "FAILED" not in card
    assert report["serving"]["transformers"]["serves"] is True


# --- 2. QAT exact for tied embeddings ---------------------------------------------------------------------------


@pytest.mark.parametrize("bits,group_size", [(8, None), (4, None), (4, 32)])
def test_qat_tied_embeddings_equal_export(tmp_path, bits, group_size):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    torch.manual_seed(0)
    model = _randomise_norms(LlamaForCausalLM(tiny_llama_config(hidden_size=64, intermediate_size=128, tie_word_embeddings=True)))
    args = QuantizationArguments(backend=CT, bits=bits, group_size=group_size, quantize_embeddings=True)
    linears, embeddings = quantization_targets(model, args)
    assert embeddings == ["model.embed_tokens"] and "lm_head" in linears  # the tied head reads the quantized table
    attach_fake_quant(model, args, linears, embeddings)
    # one shared master weight: training keeps the tie
    assert model.lm_head.parametrizations.weight.original is model.model.embed_tokens.parametrizations.weight.original
    ids = torch.randint(4, 97, (3, 11), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        fake = model(ids).logits
    quantize_and_save(model, tmp_path / "ct", args)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct").eval()
    with torch.no_grad():
        exported = reloaded(ids).logits
    assert torch.equal(fake, exported)


# --- 3. bitsandbytes low-bit embeddings in bf16 / fp16 ----------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [8, 4])
def test_bnb_quantized_embeddings_keep_the_model_dtype(tmp_path, dtype, bits):
    from transformers import LlamaForCausalLM

    from hf_compress.quantization import quantize_model

    torch.manual_seed(0)
    model = _randomise_norms(LlamaForCausalLM(tiny_llama_config(hidden_size=64, intermediate_size=128))).to(dtype).eval()
    args = QuantizationArguments(bits=bits, quantize_embeddings=True)
    info = quantize_and_save(model, tmp_path / "q", args)
    assert info["quantized_embeddings"] == ["model.embed_tokens"]
    ids = torch.randint(4, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    reloaded = load_quantized(tmp_path / "q")
    in_memory, _ = quantize_model(model, args)
    with torch.no_grad():
        assert reloaded.model.embed_tokens(ids).dtype == dtype
        out, ref, full = reloaded(ids).logits, in_memory(ids).logits, model(ids).logits
    assert out.dtype == dtype and torch.equal(out, ref)
    assert float((out.float() - full.float()).abs().max()) < 0.2 * float(full.float().abs().max())  # a quantized model of it


def test_cli_evaluates_a_bf16_bnb_export_with_quantized_embeddings(tmp_path):
    from transformers import AutoModelForCausalLM

    from task_helpers import make_tiny

    from transformers import AutoTokenizer

    src = make_tiny(tmp_path / "causal", "causal")
    folder = str(tmp_path / "bf16")
    _randomise_norms(AutoModelForCausalLM.from_pretrained(src)).to(torch.bfloat16).save_pretrained(folder)
    AutoTokenizer.from_pretrained(src).save_pretrained(folder)
    data = tmp_path / "lm.txt"
    data.write_text("\n\n".join(" ".join(["alice went to paris ."] * 3) for _ in range(40)))
    out = tmp_path / "out"
    assert main(["--model", folder, "--dataset", str(data), "--output_dir", str(out), "--no_train", "--no_prune",
                 "--format", "bitsandbytes", "--bits", "8", "--quantize_embeddings", "true", "--max_length", "16",
                 "--use_cpu", "true", "--disable_tqdm", "true"]) == 0
    report = json.loads((out / "compression_report.json").read_text())
    comp, base = report["metrics"]["compressed"], report["metrics"]["base"]
    assert comp["perplexity"] == pytest.approx(base["perplexity"], rel=0.05)  # 8-bit of the same random model
    assert report["loaders"]["load_quantized"]["ok"]
    assert report["loaders"]["from_pretrained (without hf_compress)"]["status"] == "error"  # the sentinel, loudly
    assert "model.embed_tokens" in report["quantization"]["precision"]["int8"]["modules"]
    assert set(report["quantization"]["precision"]) == {"int8", "bfloat16"}


# --- 4. card and report describe the files ----------------------------------------------------------------------

FORMATS = {
    "dense": None,
    "bitmask": None,
    "bnb8": dict(bits=8),
    "bnb4": dict(bits=4),
    "ct8": dict(backend=CT, bits=8),
    "ct4": dict(backend=CT, bits=4, group_size=32),
}


def _header(folder):
    """Every tensor of the folder's safetensors files: `{name: (dtype, shape)}`, read by safetensors itself."""
    out = {}
    for name in os.listdir(folder):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), "pt") as f:
                for k in f.keys():
                    s = f.get_slice(k)
                    out[k] = (s.get_dtype(), s.get_shape())
    return out


@pytest.fixture(scope="module")
def every_format(tmp_path_factory):
    from transformers import BertForSequenceClassification

    from conftest import tiny_bert_config

    root = tmp_path_factory.mktemp("files")
    torch.manual_seed(0)
    model = _randomise_norms(BertForSequenceClassification(tiny_bert_config(hidden_size=64, intermediate_size=128))).eval()
    with torch.no_grad():  # 50% pruned encoder matrices, so the bitmask format stores them sparse
        for name, p in model.named_parameters():
            if ".layer." in name and p.ndim == 2:
                p.masked_fill_(p.abs() <= p.abs().flatten().kthvalue(p.numel() // 2).values, 0.0)
    base = root / "base"
    model.save_pretrained(base)
    dirs = {}
    for name, fields in FORMATS.items():
        dirs[name] = root / name
        if name == "dense":
            model.save_pretrained(dirs[name])
        elif name == "bitmask":
            save_compressed(model, str(dirs[name]))
        else:
            quantize_and_save(model, dirs[name], QuantizationArguments(**fields))
    return model, base, dirs


@pytest.mark.parametrize("name", list(FORMATS))
def test_card_and_report_match_the_safetensors_header(every_format, name):
    from transformers import CompressedTensorsConfig

    model, base, dirs = every_format
    folder = dirs[name]
    header = _header(folder)
    if name == "bitmask":
        from hf_compress.pruning import load_compressed

        loaded = load_compressed(str(folder))
    else:
        kwargs = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if name.startswith("ct") else {}
        loaded = load_quantized(folder, **kwargs) if FORMATS[name] else type(model).from_pretrained(folder)
    report = build_report(loaded, str(folder), model, str(base), base_model_id="acme/tiny", save=False,
                          base_metrics={"accuracy": 0.5}, compressed_metrics={"accuracy": 0.5})
    card = build_model_card(report, {}, "hf-compress --bits 8", repo_id="acme/x")
    tags = card.data.tags
    n_params = sum(p.numel() for p in model.parameters())
    assert report["parameters"]["compressed"] == n_params  # the model's, never scales or shapes
    assert report["size"]["bits_per_weight_on_disk"] == pytest.approx(
        8 * sum(os.path.getsize(folder / f) for f in os.listdir(folder) if f.endswith(".safetensors")) / n_params, abs=1e-4)
    # The modules stored quantized, read straight from the header.
    packed = sorted(k.removesuffix(".weight_packed") for k in header if k.endswith(".weight_packed"))
    int8 = sorted(k.removesuffix(".SCB") for k in header if k.endswith(".SCB"))
    nf4 = sorted(k.split(".weight.quant_state.")[0] for k in header if ".weight.quant_state.bitsandbytes__nf4" in k)
    quantized = packed + int8 + nf4
    quant = report["quantization"]
    if not FORMATS[name]:
        assert quantized == [] and quant is None and "## Quantization" not in str(card)
        assert not {"bitsandbytes", "compressed-tensors"} & set(tags)
        return
    assert len(quantized) == 13  # 2 layers x 6 encoder Linears + the pooler; the head stays float
    assert quant["quantized_modules"] == sorted(quantized) and quant["num_quantized_modules"] == 13
    kind = {"bnb8": "int8", "bnb4": "nf4 (4-bit)", "ct8": "int8", "ct4": "int4"}[name]
    linear_weights = sum(m.weight.numel() for n, m in model.named_modules() if n in quantized)
    assert quant["precision"][kind]["parameters"] == linear_weights
    floats = {k: v for k, v in header.items() if v[0] == "F32" and not any(k.startswith(q + ".weight") and k != q + ".weight"
                                                                          for q in quantized) and not k.endswith(".SCB")}
    if name.startswith("ct"):
        floats = {k: v for k, v in floats.items() if not k.endswith(".weight_scale")}
    assert quant["precision"]["float32"]["parameters"] == sum(torch.Size(v[1]).numel() for v in floats.values())
    assert set(quant["precision"]) == {kind, "float32"}  # nothing listed as int64 / int32 / uint8 parameters
    assert f"quantized layers: 13 ({quant['quantized_module_types'][0]}" in str(card)
    assert f"- stored as {kind}: {linear_weights:,} parameters" in str(card)
    assert "int64" not in str(card) and "int32" not in str(card)
    if name.startswith("ct"):
        assert "compressed-tensors" in tags and "bitsandbytes" not in tags
        assert quant["quantized_module_types"] == [f"{kind} pack-quantized"]
    else:
        assert "bitsandbytes" in tags and f"{quant['bits'][0]}-bit" in tags and "compressed-tensors" not in tags


# --- 5. serving claims ------------------------------------------------------------------------------------------


def test_group_sizes_vllm_cannot_run_are_refused():
    for bad in (16, 48, 256):
        with pytest.raises(ValueError, match=rf"group_size {bad} is not one vLLM's int kernels run; use 32, 64, 128 or None"):
            QuantizationArguments(backend=CT, bits=4, group_size=bad)
    assert QuantizationArguments(backend=CT, bits=4, group_size=128).group_size == 128


def test_cli_refuses_a_group_size_in_one_line(tmp_path, capsys):
    model = make_tiny_model(tmp_path / "model")
    data = make_csv(tmp_path / "data.csv")
    capsys.readouterr()  # drop what building the fixtures printed
    assert main(["--model", model, "--dataset", data, "--output_dir", str(tmp_path / "o"), "--backend", CT,
                 "--group_size", "16", *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0] == ("hf-compress: error: group_size 16 is not one vLLM's int kernels run; use 32, 64, 128 or None "
                      "(per-channel).")


def test_vllm_claims_follow_what_was_written(tmp_path):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    # Marlin's shape rule needs out % 64 and in % 128: hidden 128, intermediate 256.
    config = tiny_llama_config(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=4,
                               tie_word_embeddings=True)
    model = _randomise_norms(LlamaForCausalLM(config)).to(torch.bfloat16)
    default = QuantizationArguments(backend=CT, bits=4, group_size=128)  # what `--format compressed-tensors` gives
    quantize_and_save(model, tmp_path / "linear", default)
    header = _header(tmp_path / "linear")
    assert header["model.embed_tokens.weight"] == ("BF16", [97, 128])  # the embedding (and tied lm_head) stay 16-bit
    assert not any(k.startswith("model.embed_tokens.weight_") for k in header)
    claim = vllm_support(str(tmp_path / "linear"))
    assert claim["serves"] is True and "0035bdf2" in claim["source"] and "007d5005" in claim["source"]
    quantize_and_save(model, tmp_path / "emb", dataclasses.replace(default, quantize_embeddings=True))
    claim = vllm_support(str(tmp_path / "emb"))
    assert claim["serves"] is False and "`model.embed_tokens.weight_packed`" in claim["why"]
    quantize_and_save(model, tmp_path / "bnb", QuantizationArguments(bits=8))
    assert vllm_support(str(tmp_path / "bnb"))["serves"] is None  # not read, not claimed
    model.save_pretrained(tmp_path / "dense")
    assert vllm_support(str(tmp_path / "dense"))["serves"] is None
    engines = serving_engines(str(tmp_path / "linear"), {"pipeline()": {"ok": True}})
    assert engines["vLLM"]["serves"] is True and engines["transformers"]["serves"] is True



# Each format's loaders-check tolerance, relative to the logit scale, as its class in `hf_compress.formats` sets it:
# (format, loader, weight bits, logit dtype, relative tolerance).
ONNX_RUNTIME = "onnxruntime.InferenceSession (without hf_compress)"
PLAIN = "from_pretrained (without hf_compress)"
TOLERANCE_CASES = [
    ("dense", PLAIN, None, torch.float32, 1e-5),
    ("bitmask", "load_compressed", None, torch.float32, 1e-5),
    (CT, "pipeline()", 4, torch.float32, 1e-5),
    ("bitsandbytes", "load_quantized", 4, torch.float32, 1e-4),
    ("bitsandbytes", PLAIN, 8, torch.float32, 1e-4),
    ("bitsandbytes", "pipeline()", 4, torch.float32, 2e-2),  # bitsandbytes' bfloat16 CPU kernel
    ("bitsandbytes", "load_quantized", 8, torch.bfloat16, 2 * 2**-7),  # 2 x bf16's machine epsilon
    ("bitsandbytes", "load_quantized", 8, torch.float16, 2 * 2**-10),
    ("bitsandbytes", "pipeline()", 4, torch.float16, 2e-2),  # the larger of the two
    ("onnx", ONNX_RUNTIME, None, torch.float32, 1e-4),
    ("onnx", ONNX_RUNTIME, 4, torch.float32, 1e-4),
    ("onnx", ONNX_RUNTIME, 8, torch.float32, 1e-4),  # against the int8 graph the run evaluated
]


@pytest.mark.parametrize("fmt,loader,bits,dtype,relative", TOLERANCE_CASES)
def test_logit_tolerance_comes_from_the_format(fmt, loader, bits, dtype, relative):
    from hf_compress.formats import get_format
    from hf_compress.model_cards.loading import PLAIN_LOADERS, RELATIVE_LOGIT_TOLERANCE

    assert get_format(fmt).logit_tolerance(loader in PLAIN_LOADERS, bits, dtype) == pytest.approx(relative)
    assert logit_tolerance(fmt, loader, 3.0, bits, dtype) == pytest.approx(3.0 * relative)  # times the logit scale
    assert logit_tolerance(fmt, loader, 0.5, bits, dtype) == pytest.approx(relative)  # a scale below 1 counts as 1
    assert RELATIVE_LOGIT_TOLERANCE[fmt] == get_format(fmt).relative_logit_tolerance


def test_gpt2_lm_head_model_is_loaded_with_its_causal_lm_class(tmp_path):
    # `GPT2LMHeadModel` is a causal LM by the task table's class suffixes: the loaders check (and the card's snippet)
    # use `AutoModelForCausalLM` and `pipeline("text-generation")`, not a headless `AutoModel`.
    from transformers import GPT2Config, GPT2LMHeadModel

    from hf_compress.model_cards.loading import usage_snippet
    from task_helpers import tiny_tokenizer

    folder = str(tmp_path)
    tok = tiny_tokenizer(folder)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=64)).eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    loaders = check_loaders(folder, TEXTS[:2], _logits(model, folder, TEXTS[:2]))
    assert set(loaders) == {PLAIN, "pipeline()"}
    for name, v in loaders.items():
        assert v["status"] == "match" and v["max_abs_logit_diff"] <= 1e-5, (name, v)
    snippet = usage_snippet({"architecture": "GPT2LMHeadModel"}, "acme/tiny-gpt2", folder=folder)
    assert "model = AutoModelForCausalLM.from_pretrained('acme/tiny-gpt2')" in snippet
    assert 'pipeline("text-generation", model=model, tokenizer=tokenizer)' in snippet


def test_clean_interpreter_result_carries_tensors_in_a_safetensors_file():
    # A causal LM's logits travel as a file, not JSON text (minutes at a 49k vocabulary); the JSON's other keys stay.
    from hf_compress.model_cards.clean_interpreter import RESULT_TENSORS, run_result_without_hf_compress

    code = ("import json, torch\nfrom safetensors.torch import save_file\n"
            f"save_file({{'logits': torch.arange(6.0).reshape(2, 3) / 7}}, {RESULT_TENSORS!r})\n"
            f"print('RESULT', json.dumps({{'tensors_file': {RESULT_TENSORS!r}, 'rows': 2}}))\n")
    result = run_result_without_hf_compress(code)
    assert sorted(result) == ["logits", "rows"] and result["rows"] == 2
    assert torch.equal(result["logits"], torch.arange(6.0).reshape(2, 3) / 7)
