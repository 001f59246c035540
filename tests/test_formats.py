"""Checkpoint formats x loaders: each export reloads with the expected logits, or fails loudly; never silently wrong.

Tolerances: compressed-tensors, dense and bitmask reload bit-identically (atol 1e-6: the loader multiplies the same
dequantized weights); bitsandbytes 8-bit through plain `from_pretrained` runs the same LLM.int8 kernels as
`load_quantized` (1e-6); bitsandbytes 4-bit through plain `from_pretrained` may take bitsandbytes' AVX512-BF16 CPU
kernel (bf16 rounding, 2e-2, as in test_quantization.py).
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch

from hf_compress.model_cards.clean_interpreter import run_without_hf_compress
from hf_compress.pruning import save_compressed
from hf_compress.quantization import (
    QuantizationArguments,
    attach_fake_quant,
    load_quantized,
    quantization_targets,
    quantize_and_save,
    quantize_model,
)
from hf_compress.quantization.numerics import fake_quantize_int, symmetric_scales

from conftest import tiny_bert_config

CT = "compressed-tensors"
# name -> (format, QuantizationArguments fields)
FORMATS = {
    "dense": ("dense", {}),
    "bitmask": ("bitmask", {}),
    "bnb8": ("bitsandbytes", dict(bits=8)),
    "bnb8-emb": ("bitsandbytes", dict(bits=8, quantize_embeddings=True)),
    "bnb4": ("bitsandbytes", dict(bits=4)),
    "bnb4-emb": ("bitsandbytes", dict(bits=4, quantize_embeddings=True)),
    "ct8": (CT, dict(bits=8)),
    "ct8-emb": (CT, dict(bits=8, quantize_embeddings=True)),
    "ct4-g32": (CT, dict(bits=4, group_size=32)),
    "ct4-g32-emb": (CT, dict(bits=4, group_size=32, quantize_embeddings=True)),
    "ct4-emb": (CT, dict(bits=4, quantize_embeddings=True)),
}
# What plain `from_pretrained` without hf_compress must do: load (within atol) or raise this error.
PLAIN_EXPECTED = {"bitmask": "RuntimeError", "bnb8-emb": "RuntimeError", "bnb4-emb": "RuntimeError"}
ATOL = {"bnb4": 2e-2}


def _pruned_tiny_bert():
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config(hidden_size=64, intermediate_size=128)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".layer." in name and p.ndim == 2:
                p.masked_fill_(p.abs() <= p.abs().flatten().kthvalue(p.numel() // 2).values, 0.0)
    return model


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Every format written from one 50%-pruned tiny BERT, with the logits of the exported model in memory."""
    root = tmp_path_factory.mktemp("formats")
    model = _pruned_tiny_bert()
    ids = torch.randint(5, 97, (3, 12), generator=torch.Generator().manual_seed(1))
    out = {"ids": ids, "model": model, "dirs": {}, "expected": {}}
    for name, (fmt, fields) in FORMATS.items():
        folder = root / name
        if fmt == "dense":
            model.save_pretrained(folder)
            expected = model(ids).logits
        elif fmt == "bitmask":
            save_compressed(model, str(folder))
            expected = model(ids).logits
        else:
            args = QuantizationArguments(backend=fmt, **fields)
            quantize_and_save(model, folder, args)
            if fmt == CT:  # the QAT fake quantization is the exported model
                fake = copy.deepcopy(model)
                attach_fake_quant(fake, args, *quantization_targets(fake, args))
                expected = fake(ids).logits
            else:
                expected = quantize_model(model, args)[0](ids).logits
        out["dirs"][name] = folder
        out["expected"][name] = expected.detach()
    return out


@pytest.fixture(scope="module")
def plain_results(exports, tmp_path_factory):
    """One clean interpreter (hf_compress not importable) loads every folder with plain `from_pretrained`."""
    folders = {k: str(v) for k, v in exports["dirs"].items()}
    code = f"""
import json, torch
from transformers import AutoModelForSequenceClassification
ids = torch.tensor({exports['ids'].tolist()})
out = {{}}
for name, folder in {folders!r}.items():
    try:
        model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
        with torch.no_grad():
            out[name] = {{"logits": model(ids).logits.tolist()}}
    except Exception as err:
        out[name] = {{"error": type(err).__name__, "message": str(err)[:300]}}
print("RESULT " + json.dumps(out))
"""
    proc = run_without_hf_compress(code, cwd=str(tmp_path_factory.mktemp("clean")))
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def test_clean_interpreter_cannot_import_hf_compress(tmp_path):
    proc = run_without_hf_compress("import transformers, compressed_tensors\nprint('CLEAN', transformers.__version__)\n", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-1000:]
    assert "CLEAN" in proc.stdout
    bad = run_without_hf_compress("import hf_compress\n", str(tmp_path))
    assert bad.returncode != 0 and "ModuleNotFoundError" in bad.stderr


@pytest.mark.parametrize("name", list(FORMATS))
def test_plain_from_pretrained_without_hf_compress(exports, plain_results, name):
    result = plain_results[name]
    if name in PLAIN_EXPECTED:
        assert result.get("error") == PLAIN_EXPECTED[name], result
        assert "mismatch" in result["message"] or "ignore_mismatched_sizes" in result["message"]
        return
    assert "logits" in result, result
    diff = (torch.tensor(result["logits"]) - exports["expected"][name]).abs().max().item()
    assert diff <= ATOL.get(name, 1e-6), (name, diff)


@pytest.mark.parametrize("name", list(FORMATS))
def test_pipeline_and_hf_compress_loaders(exports, name):
    from transformers import pipeline

    from hf_compress.pruning import load_compressed

    folder, ids, expected = str(exports["dirs"][name]), exports["ids"], exports["expected"][name]
    fmt = FORMATS[name][0]
    if name in ("bnb8-emb", "bnb4-emb"):
        with pytest.raises(ValueError, match="Could not load model"):  # wraps the size-mismatch RuntimeError
            pipeline("text-classification", model=folder, tokenizer=None)
        loaded = load_quantized(folder)
    else:
        # hf_compress is imported here, so the bitmask format loads through transformers' own loader too.
        loaded = pipeline("text-classification", model=folder, tokenizer=None).model
    with torch.no_grad():
        diff = (loaded(ids).logits - expected).abs().max().item()
    assert diff <= ATOL.get(name, 1e-6), (name, diff)
    if fmt == "bitmask":
        again = load_compressed(folder)
        assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), exports["model"].state_dict().values()))
    if fmt == "bitsandbytes":
        assert (load_quantized(folder)(ids).logits - expected).abs().max().item() <= 1e-6


def test_pruned_zeros_survive_compressed_tensors(exports):
    from transformers import AutoModelForSequenceClassification

    model = exports["model"]
    loaded = AutoModelForSequenceClassification.from_pretrained(str(exports["dirs"]["ct4-g32"]))
    loaded(exports["ids"])  # compressed-tensors decompresses on the first forward pass
    w0 = model.bert.encoder.layer[0].intermediate.dense.weight
    w1 = loaded.bert.encoder.layer[0].intermediate.dense.weight
    assert int((w0 == 0).sum()) == w0.numel() // 2
    assert bool(((w0 == 0) <= (w1 == 0)).all())  # every pruned zero is still zero (small weights may round to 0 too)
    assert torch.equal(w1, fake_quantize_int(w0, 4, 32))


@pytest.mark.parametrize("bits,group", [(8, None), (4, None), (4, 32), (8, 16)])
def test_numerics_equal_compressed_tensors_library(bits, group):
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    torch.manual_seed(bits)
    w = torch.randn(48, 64)
    w[3] = 0.0  # a zero row: scale falls back to epsilon
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="group" if group else "channel", group_size=group)
    g = w.unflatten(-1, (64 // (group or 64), group or 64))
    ref_scale, zp = calculate_qparams(g.amin(-1), g.amax(-1), args)
    ours = symmetric_scales(w, bits, group)
    assert torch.equal(ours, ref_scale.reshape(ours.shape))
    ref = fake_quantize(w, ref_scale.reshape(ours.shape), zp.reshape(ours.shape), args)
    assert torch.equal(fake_quantize_int(w, bits, group), ref)


def test_information_limit_and_size_by_hand(exports):
    info = json.loads((exports["dirs"]["ct8"] / "quantization_report.json").read_text())
    model = exports["model"]
    q = {n: model.get_submodule(n).weight for n in info["quantized_linear_modules"]}
    quantized_bits = sum(w.numel() * 8 + w.shape[0] * 32 for w in q.values())
    other_bits = sum(t.numel() * 32 for k, t in model.state_dict().items() if k.rsplit(".", 1)[0] not in q or not k.endswith("weight"))
    assert info["information_limit_bytes"] == -(-(quantized_bits + other_bits) // 8)
    assert info["information_limit_bytes"] <= info["weight_bytes_on_disk"] <= info["information_limit_bytes"] + 40_000


def test_import_is_light_and_public_api_resolves():
    code = (
        "import sys, hf_compress\n"
        "heavy = [m for m in ('torch', 'transformers', 'bitsandbytes', 'compressed_tensors') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "from hf_compress import (DistillationTrainer, DistillationArguments, GradualPruningCallback, QATCallback,\n"
        "    QuantizationCallback, QuantizationArguments, PruningArguments, quantize_and_save, save_compressed,\n"
        "    load_compressed, push_to_hub, compress)\n"
        "assert QuantizationArguments(backend='compressed-tensors', bits=4, group_size=32).group_size == 32\n"
        "print('OK')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-1500:]


def test_qat_callback_replays_compressed_tensors_export(tmp_path):
    """Fake-quantized training then export: the reloaded checkpoint gives the fake-quantized logits exactly."""
    from transformers import AutoModelForSequenceClassification

    model = _pruned_tiny_bert()
    args = QuantizationArguments(backend=CT, bits=4, group_size=32, quantize_embeddings=True)
    linears, embeddings = quantization_targets(model, args)
    assert len(linears) == 13 and embeddings == ["bert.embeddings.word_embeddings", "bert.embeddings.position_embeddings",
                                                 "bert.embeddings.token_type_embeddings"]
    attach_fake_quant(model, args, linears, embeddings)
    ids = torch.randint(5, 97, (2, 9))
    fake_logits = model(ids).logits
    quantize_and_save(model, tmp_path / "ct", args)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "ct")
    assert torch.equal(loaded(ids).logits, fake_logits)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(backend="gguf"), "backend must be one of bitsandbytes, compressed-tensors, got 'gguf'"),
        (dict(group_size=32), "group_size applies to backend='compressed-tensors'"),
        (dict(backend=CT, group_size=0), "group_size must be a positive integer"),
        (dict(backend=CT, bits=4, double_quant=True), "double_quant is a bitsandbytes option"),
    ],
)
def test_bad_format_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantizationArguments(**kwargs)


def test_tied_embedding_quantized_once_and_lm_head_follows(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from conftest import tiny_llama_config

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(hidden_size=64, intermediate_size=128, tie_word_embeddings=True)).eval()
    args = QuantizationArguments(backend=CT, bits=4, group_size=32, quantize_embeddings=True)
    info = quantize_and_save(model, tmp_path / "lm", args)
    assert info["quantized_embeddings"] == ["model.embed_tokens"]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "lm")
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert torch.equal(loaded.model.embed_tokens.weight, fake_quantize_int(model.model.embed_tokens.weight, 4, 32))
    from safetensors import safe_open

    with safe_open(str(tmp_path / "lm" / "model.safetensors"), "pt") as f:
        assert not any(k.startswith("lm_head") for k in f.keys())  # stored once
