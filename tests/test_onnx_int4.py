"""`--format onnx --bits 4`: the weight-only int4 graph (`MatMulNBits` / `GatherBlockQuantized`) written from our
compressed-tensors int4 integers and scales. The packing round trip, ONNX Runtime's kernels dequantizing our codes bit
for bit, the graph's logits against the fake-quantized (QAT) model and the compressed-tensors reload, which nodes are
int4, the file size, the refusals, and the CLI with QAT end to end.

Tolerance: the graph against the fake-quantized model within `RELATIVE_ATOL` (1e-5) of max(1, |logit|); measured on
these tiny random models at most 2.2e-8 (BERT) and 2.4e-7 (Llama / Qwen2) absolute, the same order as the fp32 graph
against the fp32 model: what is left is fp32 rounding of sums taken in another order.
"""

from __future__ import annotations

import copy
import json
import os
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from family_configs import build  # noqa: E402
from task_helpers import onnx_batch, onnx_tokenizer  # noqa: E402

from hf_compress.quantization import QuantizationArguments, attach_fake_quant, quantization_targets  # noqa: E402
from hf_compress.quantization.numerics import fake_quantize_int  # noqa: E402
from hf_compress.quantization.onnx import export_onnx, onnx_refusal, op_counts  # noqa: E402
from hf_compress.quantization.onnx_int4 import (  # noqa: E402
    RELATIVE_ATOL,
    dequantize_gather_block,
    dequantize_matmul_nbits,
    gather_block_weights,
    int4_refusal,
    matmul_nbits_weights,
    pack_nibbles,
    rewrite_int4,
    unpack_nibbles,
)
from hf_compress.quantization.onnx_kv import full_sequence_feed  # noqa: E402

CT = "compressed-tensors"
CASES = {  # name -> (family, head, task, outputs, group size, quantize_embeddings)
    "bert-seq-cls-g32": ("bert", "seq-cls", "sequence-classification", ["logits"], 32, False),
    "bert-qa-g64-emb": ("bert", "qa", "question-answering", ["start_logits", "end_logits"], 64, True),
    "llama-causal-lm-g32": ("llama", "causal-lm", "causal-lm", ["logits"], 32, False),
    "qwen2-tied-g32-emb": ("qwen2", "causal-lm", "causal-lm", ["logits"], 32, True),  # tied lm_head reads the table
}


def _args(group_size=32, emb=False):
    return QuantizationArguments(backend=CT, bits=4, group_size=group_size, quantize_embeddings=emb)


def _fake_quantized(model, args):
    fake = copy.deepcopy(model)
    attach_fake_quant(fake, args, *quantization_targets(fake, args))
    return fake.eval()


def _run(path, batch, outputs):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = full_sequence_feed(sess, {k: v.numpy() for k, v in batch.items()})  # a causal LM's graph: empty past
    return [torch.from_numpy(o) for o in sess.run(outputs, feed)]


def _max_diff(got, model, batch, outputs):
    with torch.no_grad():
        out = model(**batch)
    ref = [out[n].float() for n in outputs]
    return max(float((g - r).abs().max()) for g, r in zip(got, ref)), max(float(r.abs().max()) for r in ref)


# --- packing ---------------------------------------------------------------------------------------------------


def test_pack_nibbles_round_trip_and_low_nibble_first():
    codes = torch.randint(0, 16, (5, 3, 32), generator=torch.Generator().manual_seed(0))
    packed = pack_nibbles(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 3, 16)
    assert torch.equal(unpack_nibbles(packed), codes.to(torch.uint8))
    assert pack_nibbles(torch.tensor([1, 2, 15, 0])).tolist() == [0x21, 0x0F]  # first value in the low nibble


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_packed_weights_dequantize_to_the_qat_weights_bit_for_bit(group_size):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(48, 256, generator=g)
    w[3] = 0.0  # an all-zero row (epsilon scale) and pruned zeros stay exact
    w[5, ::3] = 0.0
    w[7, :group_size] *= 40  # one large block: other blocks keep their own scale
    b, scales = matmul_nbits_weights(w, group_size)
    assert b.shape == (48, 256 // group_size, group_size // 2) and scales.shape == (48, 256 // group_size)
    # q + 8: the scale is absmax / 7.5, so -absmax rounds (half to even) to -8, code 0, and +absmax clamps to 7, code 15
    assert int(unpack_nibbles(b).min()) == 0 and int(unpack_nibbles(b).max()) == 15
    assert torch.equal(dequantize_matmul_nbits(b, scales), fake_quantize_int(w, 4, group_size))
    data, table_scales = gather_block_weights(w, group_size)
    tensor = onnx.helper.make_tensor("t", onnx.TensorProto.INT4, list(w.shape), data, raw=True)
    assert len(data) == w.numel() // 2
    q = onnx.numpy_helper.to_array(tensor)
    assert q.min() >= -8 and q.max() <= 7
    assert torch.equal(dequantize_gather_block(q, table_scales), fake_quantize_int(w, 4, group_size))


def test_onnxruntime_kernels_dequantize_our_codes_exactly(tmp_path):
    """One `MatMulNBits` fed the identity gives the dequantized weight itself, and one `GatherBlockQuantized` fed every
    row index gives the table: every value equal (bit for bit) to our fake-quantized weight."""
    from onnx import TensorProto, helper, numpy_helper

    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(2))
    expected = fake_quantize_int(w, 4, 32)
    b, scales = matmul_nbits_weights(w, 32)
    data, table_scales = gather_block_weights(w, 32)
    nodes = [helper.make_node("MatMulNBits", ["A", "B", "S"], ["Y"], domain="com.microsoft", K=64, N=24, bits=4,
                              block_size=32, accuracy_level=0),
             helper.make_node("GatherBlockQuantized", ["D", "idx", "T"], ["E"], domain="com.microsoft", gather_axis=0,
                              quantize_axis=1, block_size=32, bits=4)]
    inits = [numpy_helper.from_array(b.numpy(), "B"), numpy_helper.from_array(scales.numpy().reshape(-1), "S"),
             helper.make_tensor("D", TensorProto.INT4, [24, 64], data, raw=True),
             numpy_helper.from_array(table_scales.numpy(), "T")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [64, 64]),
                                           helper.make_tensor_value_info("idx", TensorProto.INT64, [24])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [64, 24]),
                               helper.make_tensor_value_info("E", TensorProto.FLOAT, [24, 64])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    onnx.save(model, str(tmp_path / "k.onnx"))
    sess = ort.InferenceSession(str(tmp_path / "k.onnx"), providers=["CPUExecutionProvider"])
    y, e = sess.run(["Y", "E"], {"A": np.eye(64, dtype=np.float32), "idx": np.arange(24, dtype=np.int64)})
    assert torch.equal(torch.from_numpy(y).t(), expected)
    assert torch.equal(torch.from_numpy(e), expected)


# --- the graph -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_int4_graph_computes_the_fake_quantized_model(case, tmp_path):
    family, head, task, outputs, group, emb = CASES[case]
    model = build(family, head)  # norms and biases randomised
    args = _args(group, emb)
    info = export_onnx(model, str(tmp_path / "out"), onnx_tokenizer(tmp_path / "tok", family), task, quantize=True,
                       quantize_embeddings=emb, args=args)
    batch = onnx_batch(family)  # another shape and padding than the traced and probe batches
    got = _run(tmp_path / "out" / "model.onnx", batch, outputs)
    diff, scale = _max_diff(got, _fake_quantized(model, args), batch, outputs)
    assert diff <= RELATIVE_ATOL * max(1.0, scale)
    assert info["max_abs_logit_diff_fake_quantized"] <= RELATIVE_ATOL * max(1.0, scale)
    assert _max_diff(got, model.eval(), batch, outputs)[0] > 1e-3  # really int4, not the fp32 graph
    # Which nodes: every quantized Linear is one MatMulNBits (a tied lm_head too), the layers kept fp32 (the heads) and
    # the 2 attention products of each of the 2 layers stay float; embeddings are int4 only when asked.
    linears, embeddings = quantization_targets(model, args)
    all_linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    counts = op_counts(str(tmp_path / "out" / "model.onnx"))
    assert counts["int4_ops"]["MatMulNBits"] == len(linears)
    assert sum(counts["float_matmul_ops"].values()) == len(all_linears) - len(linears) + 2 * 2
    assert counts["int4_ops"].get("GatherBlockQuantized", 0) == len(embeddings)
    assert len(embeddings) == ({"bert": 3, "qwen2": 1}[family] if emb else 0)  # BERT: word, position, token type
    assert counts["int8_ops"] == {} and counts["int8_weight_tensors"] == 0
    assert info["int4_linear_modules"] == linears and info["accuracy_level"] == 0
    if family == "qwen2":
        assert "lm_head" in linears  # tied to the quantized table: reads its int4 codes
    # One token: the shape branches traced at length 8 still hold.
    one = {k: v[:1, :1] for k, v in batch.items()}
    diff_one, scale_one = _max_diff(_run(tmp_path / "out" / "model.onnx", one, outputs), _fake_quantized(model, args),
                                    one, outputs)
    assert diff_one <= RELATIVE_ATOL * max(1.0, scale_one)


@pytest.fixture(scope="module")
def llama_graphs(tmp_path_factory):
    """One randomised tiny Llama exported once as the fp32 graph and once as the int4 (group 32) graph, for the tests
    below that only read the graphs (exporting is the slow part of each). `export_onnx` leaves the model as it was."""
    root = tmp_path_factory.mktemp("llama-graphs")
    model, args = build("llama", "causal-lm"), _args(32)
    tok = onnx_tokenizer(root / "tok", "llama")
    fp32 = export_onnx(model, str(root / "fp32"), tok, "causal-lm", quantize=False)
    int4 = export_onnx(model, str(root / "int4"), tok, "causal-lm", quantize=True, args=args)
    return SimpleNamespace(model=model, args=args, fp32=fp32, int4=int4, fp32_path=root / "fp32" / "model.onnx",
                           int4_path=root / "int4" / "model.onnx")


def test_int4_graph_size_is_half_a_byte_per_weight_plus_scales(llama_graphs):
    model, args, info = llama_graphs.model, llama_graphs.args, llama_graphs.int4
    assert llama_graphs.fp32["precision"] == "fp32"
    linears, _ = quantization_targets(model, args)
    n = sum(model.get_submodule(name).weight.numel() for name in linears)
    assert info["int4_weight_bytes"] == n // 2 + (n // 32) * 4  # 0.5 byte per weight + one fp32 scale per 32
    fp32_bytes = os.path.getsize(llama_graphs.fp32_path)
    int4_bytes = os.path.getsize(llama_graphs.int4_path)
    # The file shrinks by the fp32 bytes of the quantized weights less their int4 bytes; the nodes' attributes and the
    # longer initializer names add a few hundred bytes each (3.7 KB for these 14 measured).
    overhead = int4_bytes - (fp32_bytes - 4 * n + info["int4_weight_bytes"])
    assert 0 <= overhead < 512 * len(linears)


def test_a_trained_qat_model_exports_exactly(tmp_path):
    """A model still under QAT's fake quantizers (as training leaves it) and trained a few steps: the graph reads the
    master weights' codes and equals the fake-quantized forward."""
    model = build("bert", "seq-cls")
    args = _args(32)
    attach_fake_quant(model, args, *quantization_targets(model, args))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    batch = onnx_batch("bert")
    for _ in range(3):
        model(**batch).logits.pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    export_onnx(model, str(tmp_path / "out"), onnx_tokenizer(tmp_path / "tok", "bert"), "sequence-classification",
                quantize=True, args=args)
    diff, scale = _max_diff(_run(tmp_path / "out" / "model.onnx", batch, ["logits"]), model, batch, ["logits"])
    assert diff <= RELATIVE_ATOL * max(1.0, scale)
    assert any("parametrizations" in n for n, _ in model.named_parameters())  # the caller's model is not changed


def test_int4_graph_equals_the_compressed_tensors_reload(llama_graphs, tmp_path):
    """The int4 graph and the compressed-tensors checkpoint reloaded by plain `from_pretrained`: the same dequantized
    weights bit for bit, the same logits within fp32 rounding."""
    from onnx import numpy_helper
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from hf_compress.quantization import quantize_and_save

    model, args = llama_graphs.model, llama_graphs.args
    quantize_and_save(copy.deepcopy(model), str(tmp_path / "ct"), args)
    # Decompressed on load (as the pipeline's own check reloads it): plain `nn.Linear` weights.
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct",
                                                    quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
    graph = onnx.load(str(llama_graphs.int4_path)).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    linears, _ = quantization_targets(model, args)
    for name in linears:
        b = torch.from_numpy(inits[f"{name}.weight_int4.B"])
        scales = torch.from_numpy(inits[f"{name}.weight_int4.scales"]).reshape(b.shape[0], b.shape[1])
        assert torch.equal(dequantize_matmul_nbits(b, scales), reloaded.get_submodule(name).weight.detach()), name
    batch = onnx_batch("llama")
    got = _run(llama_graphs.int4_path, batch, ["logits"])
    diff, scale = _max_diff(got, reloaded, batch, ["logits"])
    assert diff <= RELATIVE_ATOL * max(1.0, scale)


def test_onnxruntime_quantizer_rounds_otherwise(llama_graphs, tmp_path):
    """Why our own integers: ONNX Runtime's `MatMulNBitsQuantizer` (symmetric, block 32) on the same fp32 graph computes
    something QAT did not train, far beyond fp32 rounding; our graph does not."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model, args = llama_graphs.model, llama_graphs.args
    quantizer = MatMulNBitsQuantizer(onnx.load(str(llama_graphs.fp32_path)), block_size=32, is_symmetric=True,
                                     accuracy_level=0)
    quantizer.process()
    quantizer.model.save_model_to_file(str(tmp_path / "ort.onnx"))
    batch, fake = onnx_batch("llama"), _fake_quantized(model, args)
    ours, scale = _max_diff(_run(llama_graphs.int4_path, batch, ["logits"]), fake, batch, ["logits"])
    theirs, _ = _max_diff(_run(tmp_path / "ort.onnx", batch, ["logits"]), fake, batch, ["logits"])
    assert ours <= RELATIVE_ATOL * max(1.0, scale) and theirs > 100 * RELATIVE_ATOL * max(1.0, scale)


def test_a_linear_missing_from_the_graph_is_refused(llama_graphs, tmp_path):
    stray = {"model.layers.0.mlp.down_proj": torch.randn(64, 128)}  # no node reads these values
    with pytest.raises(ValueError, match=r"found no `MatMul`/`Gemm`/`Gather` reading the weight of model.layers.0.mlp.down_proj"):
        rewrite_int4(str(llama_graphs.fp32_path), str(tmp_path / "x.onnx"), stray, {}, 32)
    assert not os.path.exists(tmp_path / "x.onnx")


# --- refusals --------------------------------------------------------------------------------------------------


class _Config:
    hidden_size, intermediate_size = 96, 192


REFUSALS = {  # (model_type, group_size, backend, config) -> message
    "bnb-backend": (("bert", 32, "bitsandbytes", None), r"got `--backend bitsandbytes`; pass `--backend compressed-tensors --group_size 32`"),
    "per-channel": (("llama", None, CT, None), r"needs `--group_size` 32, 64 or 128"),
    "not-a-power-of-two": (("llama", 48, CT, None), r"powers of two >= 16, got `--group_size 48`"),
    "conv1d": (("gpt2", 32, CT, None), r"a `gpt2` model's projections are not; use `--format onnx --bits 8`"),
    "width": (("bert", 64, CT, _Config()), r"`--group_size 64` does not divide the model's hidden_size 96"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_int4_refusal_lines(case):
    args, pattern = REFUSALS[case]
    line = int4_refusal(*args)
    assert re.search(pattern, line) and "\n" not in line
    model_type, group, backend, config = args
    assert onnx_refusal(model_type, "causal-lm", True, 4, True, True, group_size=group, backend=backend, config=config) == line


def test_int4_accepts_qat():
    assert onnx_refusal("bert", "sequence-classification", True, 4, True, True, group_size=32, backend=CT, config=_Config()) is None
    assert onnx_refusal("llama", "causal-lm", True, 4, True, True, group_size=128, backend=CT) is None
    # int8 keeps its refusal of QAT
    assert "which QAT does not replay" in onnx_refusal("llama", "causal-lm", True, 8, True, True, group_size=None, backend=CT)


# --- CLI -------------------------------------------------------------------------------------------------------


def test_cli_int4_with_qat_end_to_end(tmp_path, capsys):
    from test_cli import make_csv, make_tiny_model
    from test_onnx_export import FAST

    from hf_compress.cli.main import main

    model, data, out = make_tiny_model(tmp_path / "m"), make_csv(tmp_path / "d.csv"), tmp_path / "out"
    assert main(["--model", model, "--dataset", data, "--output_dir", str(out), "--format", "onnx", "--bits", "4",
                 "--backend", CT, "--group_size", "32", *FAST]) == 0
    report = json.loads((out / "compression_report.json").read_text())
    assert report["pipeline"]["stages"]["qat"] == {"bits": 4, "fraction": 0.25}
    export = report["pipeline"]["stages"]["export"]
    assert export["op_counts"]["int4_ops"] == {"MatMulNBits": 13}  # 2 layers x 6, pooler; the classifier stays fp32
    assert export["max_abs_logit_diff_fake_quantized"] <= RELATIVE_ATOL * 10
    (name, check), = report["loaders"].items()  # the graph as the card loads it, against the fake-quantized model
    assert check["status"] == "match" and check["max_abs_logit_diff"] <= check["tolerance"] <= 1e-3
    assert "int4 nodes: 13 `MatMulNBits`" in (out / "README.md").read_text()
