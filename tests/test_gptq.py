"""GPTQ on the compressed-tensors int grid: the numerics against a hand computation and an unblocked reference, the
layer-output error against round-to-nearest, the grid and scales, and an exact export + reload."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_llama_config

from hf_compress.quantization.numerics import int_dequantize, symmetric_scales
from hf_compress.quantization.gptq import (
    accumulate_hessian,
    apply_gptq,
    gptq_quantize,
    gptq_quantize_weight,
    hessian,
    rtn_quantize_weight,
)

GROUP = 32  # hidden 64: two groups per row of q/k/v/o/gate/up, four of down


def unblocked_gptq(weight, h, bits, group_size, damp):
    """Frantar et al. 2022 column by column, without lazy batches: quantize column j, then push its error onto every
    later column through row j of the upper Cholesky factor of H^-1. A group's scale is the absmax of its current
    weights when the group starts."""
    w = weight.clone().float()
    h = h.clone().float()
    h.diagonal().add_(damp * h.diagonal().mean())
    u = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    q = torch.zeros_like(w)
    scales = torch.zeros(w.shape[0], w.shape[1] // group_size)
    for j in range(w.shape[1]):
        if j % group_size == 0:
            absmax = w[:, j : j + group_size].abs().amax(1)
            scales[:, j // group_size] = absmax / 7.5
        s = scales[:, j // group_size]
        q[:, j] = torch.round(torch.clamp(w[:, j] / s, -8, 7))
        err = (w[:, j] - q[:, j] * s) / u[j, j]
        w[:, j:] -= err[:, None] * u[j, j:][None, :]
    return q.to(torch.int8), scales


def correlated_inputs(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5 + torch.eye(d)
    return torch.randn(n, d, generator=g) @ mix


def test_gptq_hand_computed_2x4_error_feedback():
    # H couples columns 0 and 1 only (no damping): the error e0 of column 0 moves column 1 by -H01/H11 * e0 = +e0/2.
    # Row 0: scale 1.5/7.5 = 0.2; 0.9/0.2 = 4.5 -> 4 (half to even), e0 = 0.1, column 1: 0.27 + 0.05 = 0.32 -> 1.6 -> 2
    # (round-to-nearest: 1.35 -> 1); 1.5/0.2 = 7.5 clamps to 7. Row 1: scale 0.1, no error on column 0.
    w = torch.tensor([[0.9, 0.27, 1.5, 0.0], [0.1, 0.1, 0.1, 0.75]])
    h = torch.tensor([[1.0, 0.5, 0, 0], [0.5, 1.0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])
    q, s = gptq_quantize_weight(w, h, bits=4, group_size=None, block_size=4, damp=0.0)
    assert q.tolist() == [[4, 2, 7, 0], [1, 1, 1, 7]]
    assert torch.allclose(s.float(), torch.tensor([[0.2], [0.1]]))
    rtn_q, _ = rtn_quantize_weight(w, 4, None)
    assert rtn_q.tolist() == [[4, 1, 7, 0], [1, 1, 1, 7]]


@pytest.mark.parametrize("block_size", [32, 64, 128])
def test_gptq_blocked_matches_unblocked_reference(block_size):
    torch.manual_seed(0)
    w = torch.randn(24, 128)
    xtx, n = accumulate_hessian(None, 0, correlated_inputs(512, 128))
    h = hessian(xtx, n)
    q, s = gptq_quantize_weight(w, h, bits=4, group_size=GROUP, block_size=block_size, damp=0.01)
    ref_q, ref_s = unblocked_gptq(w, h, 4, GROUP, 0.01)
    # Same algorithm, different float summation order: identical codes except on a rare rounding tie.
    assert (q == ref_q).float().mean() > 0.998
    assert torch.allclose(s, ref_s, rtol=1e-4)


def test_hessian_is_two_xtx_over_n():
    x = torch.randn(3, 5, 8)
    xtx, n = accumulate_hessian(None, 0, x[:2])
    xtx, n = accumulate_hessian(xtx, n, x[2:])
    flat = x.reshape(-1, 8)
    assert n == 15
    assert torch.allclose(hessian(xtx, n), 2 * flat.t() @ flat / 15, atol=1e-5)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_lowers_layer_output_error_vs_rtn(act_order):
    torch.manual_seed(0)
    w = torch.randn(64, 128) * 0.05
    x = correlated_inputs(1024, 128, seed=1)
    xtx, n = accumulate_hessian(None, 0, x)
    q, s = gptq_quantize_weight(w, hessian(xtx, n), 4, GROUP, act_order=act_order)
    rq, rs = rtn_quantize_weight(w, 4, GROUP)
    err_gptq = (x @ (w - int_dequantize(q, s, GROUP)).t()).norm()
    err_rtn = (x @ (w - int_dequantize(rq, rs, GROUP)).t()).norm()
    assert err_gptq / err_rtn < 0.8


def test_gptq_codes_on_grid_and_scales_as_stated():
    torch.manual_seed(0)
    w = torch.randn(16, 128).to(torch.bfloat16)
    xtx, n = accumulate_hessian(None, 0, correlated_inputs(256, 128))
    q, s = gptq_quantize_weight(w, hessian(xtx, n), 4, GROUP)
    assert q.dtype == torch.int8 and q.shape == w.shape
    assert int(q.min()) >= -8 and int(q.max()) <= 7
    assert s.dtype == torch.bfloat16 and s.shape == (16, 128 // GROUP)
    # The first group sees no error feedback yet: its scale is compressed-tensors' absmax / 7.5 of the weights.
    assert torch.equal(s[:, :1], symmetric_scales(w[:, :GROUP].float(), 4, None).to(torch.bfloat16))
    # Later groups: absmax / 7.5 of the updated weights, so every group uses its scale: some code reaches -8 or 7
    # only when clamped; at least the absmax code 7 or -8 (or -7, rounding 7.5 down) appears in each group.
    grouped = q.reshape(16, -1, GROUP).abs().amax(-1)
    assert bool((grouped >= 7).all())


def _tiny_llama(dtype=torch.float32):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(hidden_size=64, intermediate_size=128, num_attention_heads=4))
    with torch.no_grad():  # norms away from 1, so the inputs of each Linear are not just the raw residual stream
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    for p in model.parameters():  # parameters only: `from_pretrained(dtype=...)` keeps the rotary buffers in float32
        p.data = p.data.to(dtype)
    return model.eval()


def _batches(n=8, seq=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 97, (4, seq), generator=g) for _ in range(n)]


def _linear_inputs(model, names, batches):
    """Inputs of each Linear on the unquantized model (the calibration inputs RTN and GPTQ are compared on)."""
    got = {n: [] for n in names}
    handles = [model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: got[n].append(a[0].reshape(-1, a[0].shape[-1])))
               for n in names]
    with torch.no_grad():
        for b in batches:
            model(input_ids=b)
    for h in handles:
        h.remove()
    return {n: torch.cat(v) for n, v in got.items()}


def test_gptq_model_lowers_layer_and_logit_error_vs_rtn():
    model = _tiny_llama()
    batches = _batches()
    results = gptq_quantize(model, batches, bits=4, group_size=GROUP)
    first_layer = [n for n in results if n.startswith("model.layers.0.")]
    assert sorted(results) == sorted(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head")
    # Layer 0's q/k/v/gate/up see the same inputs in both models; measure every first-layer Linear on the float inputs.
    inputs = _linear_inputs(model, first_layer, batches)
    ratios = []
    for n in first_layer:
        w, x = model.get_submodule(n).weight.detach(), inputs[n]
        rq, rs = rtn_quantize_weight(w, 4, GROUP)
        ratios.append(float((x @ (w - results[n].dequantize()).t()).norm() / (x @ (w - int_dequantize(rq, rs, GROUP)).t()).norm()))
    assert max(ratios) < 0.9, ratios
    # The whole model: the logit error on the calibration batches.
    rtn = copy.deepcopy(model)
    apply_gptq(rtn, {n: type(r)(*rtn_quantize_weight(model.get_submodule(n).weight, 4, GROUP), GROUP) for n, r in results.items()})
    gptq = apply_gptq(copy.deepcopy(model), results)
    with torch.no_grad():
        ids = torch.cat(batches)
        ref = model(input_ids=ids).logits
        err = {k: float((m(input_ids=ids).logits - ref).norm()) for k, m in (("gptq", gptq), ("rtn", rtn))}
    assert err["gptq"] / err["rtn"] < 0.8, err


def test_gptq_model_leaves_model_unchanged():
    model = _tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gptq_quantize(model, _batches(n=2), bits=4, group_size=GROUP)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gptq_export_stores_gptq_ints_and_reloads_exactly(tmp_path, dtype):
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from hf_compress.quantization import QuantizationArguments
    from hf_compress.quantization import quantize_and_save

    model = _tiny_llama(dtype)
    results = gptq_quantize(model, _batches(n=4), bits=4, group_size=GROUP, scale_search="mse")
    args = QuantizationArguments(backend="compressed-tensors", bits=4, group_size=GROUP)
    info = quantize_and_save(model, tmp_path / "out", args, precomputed=results)
    assert info["precomputed_modules"] == sorted(results)
    stored = load_file(str(tmp_path / "out" / "model.safetensors"))
    for n, r in results.items():
        assert torch.equal(stored[f"{n}.weight_scale"], r.scales)
        ints = unpack_from_int32(stored[f"{n}.weight_packed"], 4, r.q.shape)
        assert torch.equal(ints, r.q)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=dtype).eval()
    expected = apply_gptq(copy.deepcopy(model), results)
    ids = torch.cat(_batches(n=2, seed=5))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, expected(input_ids=ids).logits)


def test_precomputed_out_of_grid_is_refused(tmp_path):
    from hf_compress.quantization import QuantizationArguments
    from hf_compress.quantization import quantize_and_save

    model = _tiny_llama()
    results = gptq_quantize(model, _batches(n=1), bits=4, group_size=GROUP)
    name = next(iter(results))
    results[name].q[0, 0] = 9
    with pytest.raises(ValueError, match="do not fit a"):
        quantize_and_save(model, tmp_path / "out", QuantizationArguments(backend="compressed-tensors", bits=4, group_size=GROUP),
                precomputed=results)
