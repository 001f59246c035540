"""bitsandbytes export, reload and QAT on tiny models: exact numerics against bitsandbytes itself."""

from __future__ import annotations

import copy
import json
import logging
import subprocess
import sys

import pytest
import torch
import transformers
from conftest import random_classification_dataset, tiny_bert_config, tiny_llama_config

from hf_compress.quantization import (
    QuantizationArguments,
    attach_fake_quant,
    dequantize_4bit,
    fake_quantize_weight,
    int8_linear,
    int8_rowwise_quantize,
    is_fake_quantized,
    load_quantized,
    quantization_targets,
    quantize_4bit,
    quantize_and_save,
    quantize_model,
    remove_fake_quant,
    straight_through,
)
from hf_compress.quantization import numerics as Q

transformers.utils.logging.disable_progress_bar()
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # the float16 cast of LLM.int8 inputs
bnb = pytest.importorskip("bitsandbytes")
BF = bnb.functional
# bitsandbytes' CPU 4-bit kernels need rows of a multiple of 64 values (see `unsupported_4bit_modules`): the tiny
# models of this file are 64 wide so that every encoder Linear is quantized; the conftest ones (32 wide) test the
# shape rule below.
ALIGNED = dict(hidden_size=64, intermediate_size=128)


@pytest.fixture
def tiny_bert():
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(tiny_bert_config(**ALIGNED))


@pytest.fixture
def tiny_llama():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(tiny_llama_config(**ALIGNED))


def _ids(n=3, seq=12, seed=1):
    return torch.randint(5, 97, (n, seq), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


# --- pure numerics against bitsandbytes -------------------------------------------------------------------


def test_int8_rowwise_by_hand():
    cb, scb = int8_rowwise_quantize(torch.tensor([[1.0, -0.5, 0.25], [0.0, 2.0, -1.0]]))
    # 127 * [1, -0.5, 0.25] = [127, -63.5, 31.75] -> round half to even; row 2 scaled by 127 / 2.
    assert cb.tolist() == [[127, -64, 32], [0, 127, -64]]
    assert scb.tolist() == [1.0, 2.0]


def test_nf4_by_hand():
    w = torch.tensor([[1.0, 0.5, -0.25, 0.0]])
    q, absmax = quantize_4bit(w, "nf4")
    # Nearest NF4 values: 0.5 lies below the 0.4407/0.5626 midpoint, -0.25 below the -0.2844/-0.1848 one.
    assert q.tolist() == [15, 12, 4, 7]
    assert absmax.tolist() == [1.0]
    expected = torch.tensor([[1.0, 0.44070982933044434, -0.28444138169288635, 0.0]])
    assert torch.equal(dequantize_4bit(q, absmax, w.shape, "nf4"), expected)


@pytest.mark.parametrize("shape", [(64, 48), (97, 32), (5, 30)])
def test_int8_weights_match_bitsandbytes(shape):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 0.05
    cb, scb, _ = BF.int8_vectorwise_quant(w.to(torch.float16))
    mine_cb, mine_scb = int8_rowwise_quantize(w)
    assert torch.equal(cb, mine_cb) and torch.equal(scb, mine_scb)


def _unpack_nibbles(packed):
    p = packed.reshape(-1)
    codes = torch.empty(2 * p.numel(), dtype=torch.uint8)
    codes[0::2], codes[1::2] = p >> 4, p & 0xF  # bitsandbytes stores the first value in the high nibble
    return codes


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", [(64, 48), (97, 32), (6, 30), (32, 128), (96, 384)])
def test_4bit_codes_match_bitsandbytes(quant_type, shape):
    # What is stored: the same 4-bit code for every value and the same absmax for every 64-value block.
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 0.05
    packed, state = BF.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type=quant_type)
    q, absmax = quantize_4bit(w, quant_type)
    assert torch.equal(q.reshape(-1), _unpack_nibbles(packed)[: w.numel()])
    assert torch.equal(absmax, state.absmax)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", [(32, 128), (96, 384), (6, 30)])
def test_4bit_weights_match_bitsandbytes(quant_type, shape):
    # The dequantized weight bitsandbytes computes with, for the shapes its CPU kernels support (rows of a
    # multiple of 64 values; an odd row length takes its generic path).
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 0.05
    packed, state = BF.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type=quant_type)
    assert torch.equal(fake_quantize_weight(w, 4, quant_type), BF.dequantize_4bit(packed, state))


def test_unsupported_4bit_shapes_stay_full_precision(tmp_path):
    # A 32-wide model: blocks of 64 values cross rows, which bitsandbytes' AVX512 CPU kernels get wrong, so those
    # layers are kept in float32 and named; the 64-wide intermediate -> output Linear is still quantized.
    from hf_compress.quantization import unsupported_4bit_modules

    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(tiny_bert_config())
    args = QuantizationArguments(bits=4)
    unsupported = unsupported_4bit_modules(model, embeddings=False)
    assert len(unsupported) == 2 * 5 + 2  # per layer: q, k, v, attention output, intermediate (in 32); pooler; head
    info = quantize_and_save(model, tmp_path / "q", args)
    assert info["quantized_linear_modules"] == [f"bert.encoder.layer.{i}.output.dense" for i in range(2)]
    assert info["unsupported_shape_modules"] == sorted(set(unsupported) - {"classifier"})
    linears, _ = quantization_targets(model, args)  # QAT fake-quantizes exactly what the export quantizes
    assert linears == info["quantized_linear_modules"]
    ids = _ids()
    fake = copy.deepcopy(model)
    attach_fake_quant(fake, args, linears, [])
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "q")  # bnb's own path
    torch.testing.assert_close(_logits(fake, ids), _logits(load_quantized(tmp_path / "q"), ids), atol=1e-6, rtol=0)
    torch.testing.assert_close(_logits(fake, ids), _logits(reloaded, ids), atol=1e-2, rtol=1e-2)
    # 8-bit has no such restriction: everything but the head is quantized.
    assert len(quantize_and_save(model, tmp_path / "q8", QuantizationArguments(bits=8))["quantized_linear_modules"]) == 13


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_from_pretrained_bf16_kernel_close_to_reference(tiny_bert, tmp_path, quant_type):
    # Plain `from_pretrained` lets bitsandbytes pick its CPU kernel: on AVX512-BF16 CPUs the packed bf16 one, whose
    # logits are the float32 reference's within bf16 rounding; elsewhere the reference itself.
    from hf_compress.quantization import bnb as backend

    quantize_and_save(tiny_bert, tmp_path / "q", QuantizationArguments(bits=4, quant_type=quant_type))
    ids = _ids(n=8)
    reference = _logits(load_quantized(tmp_path / "q"), ids)
    default = _logits(transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "q"), ids)
    fast = _logits(load_quantized(tmp_path / "q", cpu_bf16_kernel=True), ids)
    assert torch.equal(default, fast)
    if backend.cpu_has_avx512bf16():
        assert not torch.equal(default, reference)  # the two paths really differ here
        torch.testing.assert_close(default, reference, atol=2e-2, rtol=2e-2)
    else:
        assert torch.equal(default, reference)


def test_double_quant_close_to_bitsandbytes():
    # bnb's CPU kernel finds the nested 8-bit code by an approximate binary search; ours takes the nearest
    # code, so a few near-ties land one code step apart.
    w = torch.randn(384, 384, generator=torch.Generator().manual_seed(0)) * 0.05
    packed, state = BF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    _, absmax = quantize_4bit(w, "nf4")
    q, absmax2 = Q.quantize_blockwise_dynamic(absmax - absmax.mean())
    assert torch.equal(absmax2, state.state2.absmax)
    assert (q != state.absmax).float().mean().item() < 0.01
    assert ((q.int() - state.absmax.int()).abs() <= 1).all()
    diff = (fake_quantize_weight(w, 4, "nf4", double_quant=True) - BF.dequantize_4bit(packed, state)).abs()
    assert diff.max().item() < 2e-3


@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_int8_linear_matches_linear8bitlt(threshold):
    g = torch.Generator().manual_seed(0)
    w, bias = torch.randn(64, 48, generator=g) * 0.05, torch.randn(64, generator=g) * 0.1
    x = torch.randn(2, 7, 48, generator=g) * 3  # values >= 6 exist: the outlier path runs
    assert (x.abs() >= 6).any()
    layer = bnb.nn.Linear8bitLt(48, 64, bias=True, has_fp16_weights=False, threshold=threshold)
    layer.weight = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False)
    layer.bias = torch.nn.Parameter(bias.clone())
    layer = layer.to("cpu").eval()
    with torch.no_grad():
        expected = layer(x)
    cb, scb = int8_rowwise_quantize(w)
    assert torch.equal(int8_linear(x, cb, scb, bias, threshold), expected)


def test_straight_through_gradient_is_identity():
    w = torch.randn(4, 64, requires_grad=True)
    out = straight_through(w, fake_quantize_weight(w, 4, "nf4"))
    assert torch.equal(out, fake_quantize_weight(w, 4, "nf4"))
    upstream = torch.randn(4, 64)
    out.backward(upstream)
    assert torch.equal(w.grad, upstream)


# --- export and reload ------------------------------------------------------------------------------------

CASES = [
    dict(bits=8),
    dict(bits=4, quant_type="nf4"),
    dict(bits=4, quant_type="fp4"),
    dict(bits=4, quant_type="nf4", double_quant=True),
]


def _expected_weight_bytes(model, info):
    """Tensor bytes of the checkpoint from the layer shapes alone (safetensors header excluded)."""
    total = info["source_weight_bytes"]
    for name in info["quantized_linear_modules"]:
        n_out, n_in = model.get_submodule(name).weight.shape
        n = n_out * n_in
        if info["bits"] == 8:
            total += -4 * n + n + 4 * n_out + 1  # int8 weight, float32 SCB, uint8 weight_format
        else:
            total += -4 * n + (n + 1) // 2 + 4 * -(-n // 64) + 16 * 4  # packed codes, absmax, quant_map
    return total


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_round_trip_head_fp32_and_size(tiny_bert, tmp_path, case):
    args = QuantizationArguments(**case)
    ids = _ids()
    qmodel, _ = quantize_model(tiny_bert, args)
    info = quantize_and_save(tiny_bert, tmp_path / "q", args)
    reloaded = load_quantized(tmp_path / "q")  # from_pretrained, on bitsandbytes' float32 reference path
    assert torch.equal(_logits(reloaded, ids), _logits(qmodel, ids))

    # The head stays a float32 nn.Linear; every other Linear is a bnb layer.
    assert type(reloaded.classifier) is torch.nn.Linear and reloaded.classifier.weight.dtype == torch.float32
    assert info["full_precision_linear_modules"] == ["classifier"]
    assert len(info["quantized_linear_modules"]) == 2 * 6 + 1  # 6 Linear per layer, 2 layers, the pooler
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert cfg["llm_int8_skip_modules"] == ["classifier"]
    assert cfg["load_in_8bit" if args.bits == 8 else "load_in_4bit"] is True

    expected = _expected_weight_bytes(tiny_bert, info)
    if not args.double_quant:  # double quant stores its nested state too: only the bound below applies
        assert expected <= info["weight_bytes_on_disk"] < expected + 16_000  # + the JSON header
    assert info["weight_bytes_on_disk"] < 0.7 * info["source_weight_bytes"]
    assert json.loads((tmp_path / "q" / "quantization_report.json").read_text())["bits"] == args.bits


def test_4bit_smaller_than_8bit(tiny_bert, tmp_path):
    b8 = quantize_and_save(tiny_bert, tmp_path / "b8", QuantizationArguments(bits=8))["weight_bytes_on_disk"]
    b4 = quantize_and_save(tiny_bert, tmp_path / "b4", QuantizationArguments(bits=4))["weight_bytes_on_disk"]
    assert b4 < b8


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_embeddings_round_trip(tiny_bert, tmp_path, bits):
    args = QuantizationArguments(bits=bits, quantize_embeddings=True)
    ids = _ids()
    qmodel, info = quantize_model(tiny_bert, args)
    assert info["quantized_embeddings"] == [
        "bert.embeddings.word_embeddings", "bert.embeddings.position_embeddings", "bert.embeddings.token_type_embeddings"
    ]
    saved = quantize_and_save(tiny_bert, tmp_path / "q", args)
    plain = quantize_and_save(tiny_bert, tmp_path / "p", QuantizationArguments(bits=bits))
    assert saved["reload"] == "hf_compress.quantization.load_quantized"
    reloaded = load_quantized(tmp_path / "q")
    assert torch.equal(_logits(reloaded, ids), _logits(qmodel, ids))
    assert isinstance(reloaded.bert.embeddings.word_embeddings, (bnb.nn.Embedding8bit, bnb.nn.Embedding4bit))
    # The float32 tables (97 + 64 + 2 rows of 64) leave model.safetensors; 1 or 1/2 byte a value remains.
    table = (97 + 64 + 2) * ALIGNED["hidden_size"]
    saved_delta = plain["weight_bytes_on_disk"] - saved["weight_bytes_on_disk"]
    assert saved_delta > table * (4 - 1) - 4_000 if bits == 8 else saved_delta > table * (4 - 0.5) - 6_000


def test_llama_lm_head_kept(tiny_llama, tmp_path):
    args = QuantizationArguments(bits=4)
    qmodel, _ = quantize_model(tiny_llama, args)
    info = quantize_and_save(tiny_llama, tmp_path / "q", args)
    reloaded = load_quantized(tmp_path / "q")
    assert info["full_precision_linear_modules"] == ["lm_head"]
    ids = _ids()
    assert torch.equal(_logits(reloaded, ids), _logits(qmodel, ids))


def test_export_replaces_existing_folder_atomically(tiny_bert, tmp_path):
    out = tmp_path / "q"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    quantize_and_save(tiny_bert, out, QuantizationArguments(bits=8))
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # no temporary folder left behind


def test_model_is_not_modified(tiny_bert, tmp_path):
    before = {k: v.clone() for k, v in tiny_bert.state_dict().items()}
    quantize_and_save(tiny_bert, tmp_path / "q", QuantizationArguments(bits=4))
    assert all(torch.equal(before[k], v) for k, v in tiny_bert.state_dict().items())


# --- QAT --------------------------------------------------------------------------------------------------

QAT_CASES = CASES + [dict(bits=8, quantize_embeddings=True), dict(bits=4, quantize_embeddings=True)]


@pytest.mark.parametrize("case", QAT_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_fake_quant_logits_equal_exported(tiny_bert, tmp_path, case):
    args = QuantizationArguments(**case)
    ids = _ids()
    fake = copy.deepcopy(tiny_bert)
    linears, embeddings = quantization_targets(fake, args)
    assert attach_fake_quant(fake, args, linears, embeddings) == len(linears) + len(embeddings)
    quantize_and_save(fake, tmp_path / "q", args)  # exported from the fake-quantized model itself
    exported = load_quantized(tmp_path / "q")
    # double quant: a few block scales one nested code apart (test_double_quant_close_to_bitsandbytes); 1.9e-5 measured
    atol = 1e-4 if args.double_quant else 1e-6
    torch.testing.assert_close(_logits(fake, ids), _logits(exported, ids), atol=atol, rtol=0)
    # and the tolerance is far below what quantization changes: the fp32 model's logits differ by more
    assert (_logits(tiny_bert, ids) - _logits(exported, ids)).abs().max().item() > 10 * atol


def test_remove_fake_quant_restores_weights_and_keeps_other_parametrizations(tiny_bert):
    from torch.nn.utils import parametrize

    class Mask(torch.nn.Module):
        def forward(self, w):
            return w * 2

    model = copy.deepcopy(tiny_bert)
    layer = model.bert.encoder.layer[0].attention.self.query
    original = layer.weight.detach().clone()
    parametrize.register_parametrization(layer, "weight", Mask())
    args = QuantizationArguments(bits=4)
    attach_fake_quant(model, args, *quantization_targets(model, args))
    assert is_fake_quantized(layer)
    remove_fake_quant(model)
    assert not is_fake_quantized(layer) and parametrize.is_parametrized(layer, "weight")
    assert torch.equal(layer.weight, original * 2)


class _FakeQuantSpy(transformers.TrainerCallback):
    def __init__(self, module_name):
        self.module_name, self.seen = module_name, []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.seen.append(is_fake_quantized(model.get_submodule(self.module_name)))


def test_qat_and_export_callbacks_in_trainer(tiny_bert, tmp_path):
    from hf_compress.callbacks import QATCallback, QuantizationCallback

    args = QuantizationArguments(bits=4, qat_fraction=0.5)
    spy = _FakeQuantSpy("bert.encoder.layer.0.output.dense")
    qat = QATCallback(args)
    export = QuantizationCallback(args, str(tmp_path / "q"), eval_fn=lambda m: {"n_params": sum(1 for _ in m.parameters())})
    train_args = transformers.TrainingArguments(
        str(tmp_path / "run"), max_steps=8, per_device_train_batch_size=8, learning_rate=1e-3, report_to="none",
        save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
    )
    model = tiny_bert
    before = model.bert.encoder.layer[0].output.dense.weight.detach().clone()
    trainer = transformers.Trainer(
        model=model, args=train_args, train_dataset=random_classification_dataset(), callbacks=[qat, spy, export]
    )
    trainer.train()
    assert qat.start_step == 4
    assert spy.seen == [False] * 4 + [True] * 4  # fake quantization over the last half only
    assert not is_fake_quantized(model.bert.encoder.layer[0].output.dense)  # removed at the end
    assert not torch.equal(model.bert.encoder.layer[0].output.dense.weight, before)  # STE gradients reached it
    assert export.export_info["bits"] == 4 and export.export_info["eval"]["n_params"] > 0
    ids = _ids()
    reloaded = load_quantized(tmp_path / "q")
    fake = copy.deepcopy(model)
    attach_fake_quant(fake, args, *quantization_targets(fake, args))
    torch.testing.assert_close(_logits(fake, ids), _logits(reloaded, ids), atol=1e-6, rtol=0)


@pytest.mark.parametrize("fraction,max_steps,start", [(0.25, 100, 75), (1.0, 10, 0), (0.01, 10, 9)])
def test_qat_start_step(fraction, max_steps, start):
    from hf_compress.callbacks import QATCallback

    assert QATCallback.start_step_for(max_steps, fraction) == start


# --- errors -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(bits=3), "bits must be 4 or 8, got 3"),
        (dict(bits=4, quant_type="int4"), "quant_type must be one of nf4, fp4, got 'int4'"),
        (dict(bits=8, double_quant=True), "double_quant only applies to 4-bit"),
        (dict(qat_fraction=0.0), r"qat_fraction must be in \(0, 1\], got 0.0"),
        (dict(llm_int8_threshold=-1.0), "llm_int8_threshold must be >= 0"),
        (dict(bits="8"), "bits must be 4 or 8, got '8'"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantizationArguments(**kwargs)


@pytest.mark.parametrize("name", ["qat_fraction", "llm_int8_threshold"])
def test_non_numeric_arguments(name):
    with pytest.raises(TypeError, match=rf"^{name} must be a number, got '0\.5' \(str\)\.$"):
        QuantizationArguments(**{name: "0.5"})


def test_bitsandbytes_missing(tiny_bert, tmp_path, monkeypatch):
    import importlib.util

    from hf_compress.callbacks import QuantizationCallback

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ImportError, match=r"bitsandbytes 4-bit export needs bitsandbytes: `pip install bitsandbytes`"):
        quantize_and_save(tiny_bert, tmp_path / "q", QuantizationArguments(bits=4))
    with pytest.raises(ImportError, match="pip install bitsandbytes"):
        QuantizationCallback(QuantizationArguments(bits=8), str(tmp_path / "q"))
    assert not (tmp_path / "q").exists()


def test_unsupported_device_and_model(tmp_path):
    meta = transformers.BertForSequenceClassification(tiny_bert_config()).to("meta")
    with pytest.raises(ValueError, match="bitsandbytes quantization runs on cpu, cuda, xpu, got a model on 'meta'"):
        quantize_and_save(meta, tmp_path / "q", QuantizationArguments())
    with pytest.raises(TypeError, match="needs a transformers `PreTrainedModel`, got Linear"):
        quantize_and_save(torch.nn.Linear(2, 2), tmp_path / "q", QuantizationArguments())
    assert not (tmp_path / "q").exists()


def test_import_without_bitsandbytes():
    code = (
        "import sys; sys.modules['bitsandbytes'] = None\n"
        "import hf_compress, hf_compress.quantization, hf_compress.callbacks.quantization\n"
        "from hf_compress.callbacks import QATCallback, QuantizationCallback\n"
        "from hf_compress.quantization import QuantizationArguments, quantize_and_save\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_tiny_llama_config_unused_guard():
    # tiny_llama_config has untied embeddings: nothing is tied, so embeddings are eligible for quantization.
    model = transformers.LlamaForCausalLM(tiny_llama_config())
    _, embeddings = quantization_targets(model, QuantizationArguments(bits=8, quantize_embeddings=True))
    assert embeddings == ["model.embed_tokens"]
    tied = transformers.LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=True))
    _, embeddings = quantization_targets(tied, QuantizationArguments(bits=8, quantize_embeddings=True))
    assert embeddings == []  # tied to the full-precision lm_head: left alone


def test_checkpoints_during_qat_use_plain_names(tiny_bert, tmp_path):
    # A Trainer checkpoint saved mid-QAT must load into a plain model (resume, from_pretrained): the fp32
    # master weights keep their usual names and values.
    reference = {k: v.clone() for k, v in tiny_bert.state_dict().items()}
    args = QuantizationArguments(bits=8)
    attach_fake_quant(tiny_bert, args, *quantization_targets(tiny_bert, args))
    state = tiny_bert.state_dict()
    assert sorted(state) == sorted(reference)
    assert all(torch.equal(state[k], reference[k]) for k in reference)
    tiny_bert.save_pretrained(tmp_path / "ckpt")
    plain = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "ckpt")
    assert all(torch.equal(plain.state_dict()[k], reference[k]) for k in reference)
    again = transformers.BertForSequenceClassification(tiny_bert_config(**ALIGNED))  # a resumed run re-attaches first
    attach_fake_quant(again, args, *quantization_targets(again, args))
    again.load_state_dict(state)
    assert torch.equal(again.bert.pooler.dense.parametrizations.weight.original, reference["bert.pooler.dense.weight"])
