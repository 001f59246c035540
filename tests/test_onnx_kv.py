"""`--format onnx` for causal LMs: one graph with a KV cache (optimum / onnxruntime-genai names) for prefill and
decode, against the in-memory model with its own cache on every exported decoder family; int8 and int4 on it; the
export's refusal when the graph is not exact; the greedy loop against `model.generate`; the card's loop run verbatim
without hf_compress; and the real SmolLM2-135M (slow).

Tolerances: fp32 graph vs model within `FP32_ATOL` (1e-4; measured at most 3e-6, Gemma 3); int8 within `INT8_ATOL`
(as tests/test_onnx_export.py); int4 vs the fake-quantized model within `RELATIVE_ATOL` of max(1, |logit|).
"""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from family_configs import build  # noqa: E402
from task_helpers import tiny_tokenizer  # noqa: E402

from hf_compress.quantization import QuantizationArguments, attach_fake_quant, quantization_targets  # noqa: E402
from hf_compress.quantization import onnx_kv  # noqa: E402
from hf_compress.quantization.onnx import FP32_ATOL, ONNX_MODEL_TYPES, export_onnx, usage_snippet  # noqa: E402
from hf_compress.quantization.onnx_int4 import RELATIVE_ATOL  # noqa: E402
from hf_compress.quantization.onnx_kv import onnx_generate  # noqa: E402

INT8_ATOL = 8e-2  # the bound of tests/test_onnx_export.py (measured 5.5e-2 on the tiny Llama)
DECODERS = [f for f in ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "gpt_neox", "olmo2",
                        "stablelm", "gpt2")]
PROMPT, DECODE = 10, 3  # longer than the tiny Gemma configs' sliding window (8); other shapes than traced and probed


def _tokenizer(folder):
    tok = tiny_tokenizer(folder)
    tok.model_input_names = ["input_ids", "attention_mask"]
    return tok


def _session(folder):
    return ort.InferenceSession(os.path.join(folder, "model.onnx"), providers=["CPUExecutionProvider"])


def _steps(seed=7, batch=2):
    """A prompt of `PROMPT` tokens (no padding), then `DECODE` single tokens: (input ids, full mask, positions)."""
    ids = torch.randint(3, 128, (batch, PROMPT + DECODE), generator=torch.Generator().manual_seed(seed))
    bounds = [0, PROMPT] + list(range(PROMPT + 1, PROMPT + DECODE + 1))
    return [{"input_ids": ids[:, a:b], "attention_mask": torch.ones(batch, b, dtype=torch.long),
             "position_ids": torch.arange(a, b).expand(batch, b - a).contiguous()} for a, b in zip(bounds, bounds[1:])]


def _run_graph(sess, steps, names):
    """Each step's logits from the graph, fed its own `present` back; plus the last present's shapes."""
    past = {i.name: np.zeros((steps[0]["input_ids"].shape[0], i.shape[1], 0, i.shape[3]), np.float32)
            for i in sess.get_inputs() if i.name.startswith("past_key_values.")}
    outputs = ["logits"] + [n.replace("past_key_values.", "present.") for n in past]
    logits = []
    for step in steps:
        got = sess.run(outputs, {**{n: step[n].numpy() for n in names}, **past})
        logits.append(got[0])
        past = dict(zip(past, got[1:]))
    return logits, [v.shape for v in past.values()]


def _run_model(model, steps, names):
    out, cache = [], None
    with torch.no_grad():
        for step in steps:
            result = model(**{n: step[n] for n in names}, cache=cache, use_cache=True)
            cache = result.cache
            out.append(result.logits.float().numpy())
    return out


def test_every_exported_decoder_family_has_a_kv_graph():
    encoders = {"bert", "roberta", "deberta-v2"}
    assert sorted(DECODERS) == sorted(t for t in ONNX_MODEL_TYPES if t not in encoders)


@pytest.mark.parametrize("family", DECODERS)
def test_kv_graph_matches_the_model_on_prefill_and_decode(family, tmp_path):
    model = build(family, "causal-lm")
    info = export_onnx(model, str(tmp_path / "out"), _tokenizer(tmp_path / "tok"), "causal-lm", quantize=False)
    layers = model.config.num_hidden_layers
    names = ["input_ids", "attention_mask", "position_ids"]
    assert info["kv_cache"] is True and info["num_layers"] == layers
    assert info["inputs"] == names + [f"past_key_values.{i}.{t}" for i in range(layers) for t in ("key", "value")]
    assert info["outputs"] == ["logits"] + [f"present.{i}.{t}" for i in range(layers) for t in ("key", "value")]
    assert info["max_abs_logit_diff_fp32"] <= FP32_ATOL
    sess = _session(tmp_path / "out")
    assert [i.name for i in sess.get_inputs()] == info["inputs"]
    steps = _steps()
    got, present = _run_graph(sess, steps, names)
    for g, r in zip(got, _run_model(model, steps, names)):
        assert g.shape == r.shape
        assert float(np.abs(g - r).max()) <= FP32_ATOL
    assert present == [(2, info["kv_heads"], PROMPT + DECODE, info["head_dim"])] * (2 * layers)


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_greedy_loop_returns_the_tokens_of_model_generate(family, tmp_path):
    model = build(family, "causal-lm")
    tok = _tokenizer(tmp_path / "tok")
    export_onnx(model, str(tmp_path / "out"), tok, "causal-lm", quantize=False)
    prompt = "the movie was a fine film"
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)[0, ids.shape[1]:].tolist()
    assert len(expected) == 12
    assert onnx_generate(_session(tmp_path / "out"), tok, prompt, max_new_tokens=12, eos_token_id=-1) == expected
    # A list of token ids is the same prompt; the loop stops after the eos token it is given.
    assert onnx_generate(_session(tmp_path / "out"), tok, ids[0].tolist(), 12, eos_token_id=expected[3]) == \
        expected[:expected.index(expected[3]) + 1]


def test_int8_and_int4_rewrites_apply_to_the_kv_graph(tmp_path):
    model = build("llama", "causal-lm")
    tok = _tokenizer(tmp_path / "tok")
    names, steps = ["input_ids", "attention_mask", "position_ids"], _steps(seed=11)
    linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    reference = _run_model(model, steps, names)

    int8 = export_onnx(model, str(tmp_path / "int8"), tok, "causal-lm", quantize=True)
    assert int8["kv_cache"] is True and int8["op_counts"]["int8_ops"]["MatMulInteger"] == linears
    got, _ = _run_graph(_session(tmp_path / "int8"), steps, names)
    diff8 = max(float(np.abs(g - r).max()) for g, r in zip(got, reference))
    assert 1e-6 < diff8 <= INT8_ATOL  # really quantized, decode steps included

    args = QuantizationArguments(backend="compressed-tensors", bits=4, group_size=32)
    int4 = export_onnx(model, str(tmp_path / "int4"), tok, "causal-lm", quantize=True, args=args)
    assert int4["kv_cache"] is True and int4["op_counts"]["int4_ops"]["MatMulNBits"] == len(int4["int4_linear_modules"])
    fake = copy.deepcopy(model)
    attach_fake_quant(fake, args, *quantization_targets(fake, args))
    fake_reference = _run_model(fake.eval(), steps, names)
    got, _ = _run_graph(_session(tmp_path / "int4"), steps, names)
    bound = RELATIVE_ATOL * max(1.0, max(float(np.abs(r).max()) for r in fake_reference))
    assert max(float(np.abs(g - r).max()) for g, r in zip(got, fake_reference)) <= bound


def test_export_refuses_a_kv_graph_that_differs_from_the_model(tmp_path, monkeypatch):
    real = onnx_kv.reference_logits
    monkeypatch.setattr(onnx_kv, "reference_logits", lambda *a: [r + 1e-3 for r in real(*a)])  # a 1e-3 shift
    with pytest.raises(RuntimeError, match=r"differs from the model by 1\.00e-03 .* Use `--format compressed-tensors`"):
        export_onnx(build("llama", "causal-lm"), str(tmp_path / "out"), _tokenizer(tmp_path / "tok"), "causal-lm",
                    quantize=False)
    assert not os.path.exists(tmp_path / "out" / "model.onnx")


def test_card_snippet_generates_the_greedy_tokens_without_hf_compress(tmp_path):
    from hf_compress.model_cards.clean_interpreter import run_without_hf_compress

    model = build("qwen2", "causal-lm")
    tok = _tokenizer(tmp_path / "tok")
    info = export_onnx(model, str(tmp_path / "my-model"), tok, "causal-lm", quantize=False)
    code = usage_snippet("my-model", {"pipeline": {"stages": {"export": info}}})
    assert "import hf_compress" not in code and "import torch" not in code and "def onnx_generate(" in code
    code += "\nimport json\nprint('OUT', json.dumps(new_tokens))\n"
    proc = run_without_hf_compress(code, str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    got = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("OUT "))[4:])
    ids = tok("The first words of a text", return_tensors="pt")["input_ids"]  # the snippet's prompt
    with torch.no_grad():  # the tiny tokenizer has no eos token: 16 tokens
        expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)[0, ids.shape[1]:].tolist()
    assert got == expected and len(got) == 16


@pytest.mark.slow
def test_smollm2_kv_graph_generates_the_greedy_tokens_of_pytorch(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_compress.models import smollm2_path

    path = smollm2_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    info = export_onnx(model, str(tmp_path / "out"), tok, "causal-lm", quantize=False)
    assert info["max_abs_logit_diff_fp32"] <= FP32_ATOL and info["num_layers"] == 30 and info["kv_heads"] == 3
    prompt = "To be, or not to be, that is the question:"
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                                  eos_token_id=None, pad_token_id=tok.eos_token_id)[0, ids.shape[1]:].tolist()
    got = onnx_generate(_session(tmp_path / "out"), tok, prompt, max_new_tokens=16, eos_token_id=-1)
    assert len(expected) == 16 and got == expected


def test_fp32_check_is_relative_to_the_logit_scale(tmp_path):
    # A trained model's logits are larger than the tiny configs' (SmolLM2's reach ~25, its graph is 8.8e-5 off): the
    # fp32 rounding grows with them, so the bound is `FP32_ATOL * max(1, max |logit|)`, not an absolute 1e-4.
    model = build("llama", "causal-lm")
    with torch.no_grad():
        model.lm_head.weight.mul_(1000.0)
    info = export_onnx(model, str(tmp_path / "out"), _tokenizer(tmp_path / "tok"), "causal-lm", quantize=False)
    assert info["logit_scale"] > 100 and info["fp32_tolerance"] == FP32_ATOL * info["logit_scale"]
    assert FP32_ATOL < info["max_abs_logit_diff_fp32"] <= info["fp32_tolerance"]
