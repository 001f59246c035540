"""The quantization numerics of every backend as pure torch functions (no bitsandbytes or compressed-tensors import).

bitsandbytes: each function replays, operation for operation, what bitsandbytes 0.50 computes on its CPU backend, so that a
fake-quantized model gives the logits of the exported bnb model:

- 8-bit weights: `Int8Params._quantize` casts to float16 and quantizes each row by its absmax
  (`int8_vectorwise_quant`); LLM.int8 inference also quantizes activations row-wise and multiplies the columns
  holding outliers (>= threshold) in full precision (Dettmers et al. 2022, https://arxiv.org/abs/2208.07339).
- 4-bit weights: blocks of 64 values scaled by their absmax and rounded to the nearest NF4 / FP4 code
  (Dettmers et al. 2023, https://arxiv.org/abs/2305.14314); double quantization stores the absmax values minus
  their mean in the 8-bit dynamic data type, blocks of 256.

compressed-tensors `pack-quantized` (symmetric int8 / int4, weight-only): each row (or each group of `group_size`
weights of a row) gets the scale `absmax / ((2^bits - 1) / 2)`, the weights are divided by it, clamped to
[-2^(bits-1), 2^(bits-1) - 1] and rounded half to even. These are exactly what compressed-tensors 0.20 computes
(`calculate_qparams`, `quantize`, `dequantize`), so the fake quantization of quantization-aware training gives the
reloaded checkpoint's weights bit for bit. Zeros stay zeros (0 / scale rounds to 0), so pruned weights survive.
"""

from __future__ import annotations

import torch

# bitsandbytes.functional.get_4bit_type("nf4"): quantiles of N(0, 1) normalised to [-1, 1].
NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
# get_4bit_type("fp4"): 1 sign, 2 exponent, 1 mantissa bit, in bit-pattern order, normalised by 12.
FP4_VALUES = (0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)

INT8_SCALE = 127.0
BLOCKSIZE_4BIT = 64
BLOCKSIZE_NESTED = 256


def code_4bit(quant_type: str, device=None) -> torch.Tensor:
    """The 16 values of `nf4` or `fp4`, indexed by the stored 4-bit code (as `get_4bit_type`)."""
    if quant_type == "nf4":
        data = NF4_VALUES
    elif quant_type == "fp4":
        data = FP4_VALUES
    else:
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}.")
    code = torch.tensor(data, device=device, dtype=torch.float32)
    return code.div_(code.abs().max())


def dynamic_code(device=None) -> torch.Tensor:
    """The signed 8-bit dynamic data type of double quantization (`create_dynamic_map()`).

    Its first value is set to -1.0, as bnb's CPU kernel does in place before quantizing, so the stored
    `nested_quant_map` holds -1.0 too.
    """
    data: list[float] = []
    max_exponent_bits, non_sign_bits = 7, 7
    for i in range(max_exponent_bits):
        fraction_items = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1)
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data += [0, 1.0]
    data.sort()
    code = torch.tensor(data, dtype=torch.float32, device=device)
    code[0] = -1.0
    return code


# --- 8-bit ------------------------------------------------------------------------------------------------


def int8_rowwise_quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise absmax int8 quantization of a 2-D weight, as `Int8Params` does.

    Returns:
        `(CB, SCB)`: the int8 weight and the float32 absmax of each row (of the float16 weight).
    """
    w = weight.detach().contiguous().to(torch.float16)
    row_stats = torch.max(w.abs(), dim=1).values.float()
    cb = torch.round(w * (INT8_SCALE / row_stats.unsqueeze(-1))).to(torch.int8)
    return cb, row_stats


def int8_rowwise_dequantize(cb: torch.Tensor, scb: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """The weight the int8 layers multiply by in training (`MatMul8bitFp`) and in `Embedding8bit`."""
    return cb.to(dtype) * (scb.unsqueeze(1) * (1.0 / INT8_SCALE)).to(dtype)


def int8_embedding_dequantize(cb: torch.Tensor, scb: torch.Tensor) -> torch.Tensor:
    """The table `Embedding8bit` looks rows up in: `CB * (SCB / 127)`."""
    return cb * (scb.view(-1, 1) / INT8_SCALE)


def int8_linear(
    x: torch.Tensor, cb: torch.Tensor, scb: torch.Tensor, bias: torch.Tensor | None = None, threshold: float = 0.0
) -> torch.Tensor:
    """LLM.int8 inference matmul (`MatMul8bitLt` with the default kernels): int8 activations x int8 weights.

    Activations are cast to float16 and quantized per row by their absmax; with `threshold > 0` the columns
    holding a value >= threshold are taken out of the int8 product and added back in full precision.
    """
    shape = x.shape
    a = x.reshape(-1, shape[-1])
    a16 = a.to(torch.float16)
    rows = a16.shape[0]
    outlier_cols = None
    if threshold > 0.0:
        outliers = a16.abs() >= threshold
        if outliers.any():
            outlier_cols = torch.argwhere(outliers.any(dim=0)).view(-1)
            a16 = a16.masked_fill(outliers, 0)
    row_stats = torch.max(a16.abs(), dim=1).values.float()
    ca = torch.round(a16 * (INT8_SCALE / row_stats.unsqueeze(-1))).to(torch.int8)
    if rows > 1 and outlier_cols is not None:
        ca[:, outlier_cols] = 0
    # The integer product in float32, as the default `int8_linear_matmul` kernel computes it.
    acc = torch.matmul(ca.float(), cb.float().t()).to(torch.int32)
    out = acc * (row_stats.reshape(-1).unsqueeze(-1) * scb.reshape(-1).unsqueeze(0)) * 6.200124e-05
    if bias is not None:
        out += bias
    out = out.to(a.dtype)
    if outlier_cols is not None and outlier_cols.numel():
        sub_a = a[:, outlier_cols].contiguous()
        sub_b = (cb[:, outlier_cols].contiguous() * scb.view(-1, 1) * 7.874015718698502e-3).to(a.dtype).t()
        out = out.addmm(sub_a, sub_b)
    return out.reshape(*shape[:-1], cb.shape[0])


# --- 4-bit ------------------------------------------------------------------------------------------------


def _blockwise_absmax_scale(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmax of each block and the values scaled into [-1, 1] (bnb's default `quantize_4bit` kernel)."""
    n = flat.numel()
    rem = n % blocksize
    full = n - rem
    blocks = flat[:full].reshape(full // blocksize, blocksize)
    absmax = blocks.abs().max(dim=-1)[0]
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    if rem:
        am = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, am.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / am, -1, 1)])
    return absmax, scaled


def quantize_4bit(
    weight: torch.Tensor, quant_type: str = "nf4", blocksize: int = BLOCKSIZE_4BIT
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise 4-bit codes (one per value, not packed) and the float32 absmax of each block."""
    code = code_4bit(quant_type, weight.device)
    order = torch.argsort(code)
    bounds = (code[order[:-1]] + code[order[1:]]) / 2
    absmax, scaled = _blockwise_absmax_scale(weight.detach().reshape(-1).float(), blocksize)
    q = torch.bucketize(scaled, bounds, out_int32=True)
    if quant_type != "nf4":
        q = order[q]
    return q.to(torch.uint8), absmax


def quantize_blockwise_dynamic(values: torch.Tensor, blocksize: int = BLOCKSIZE_NESTED):
    """8-bit dynamic block-wise quantization of a 1-D float32 tensor, as bnb's CPU `quantize_blockwise`:
    divide by the block absmax, then take the nearest code (ties to the lower one)."""
    code = dynamic_code(values.device)
    n = values.numel()
    absmax = torch.stack([values[i : i + blocksize].abs().max() for i in range(0, n, blocksize)])
    normed = values / absmax.repeat_interleave(blocksize)[:n]
    idx = (torch.searchsorted(code, normed, right=True) - 1).clamp(0, code.numel() - 1)
    right = (idx + 1).clamp(max=code.numel() - 1)
    go_right = (idx < code.numel() - 1) & ((normed - code[right]).abs() < (normed - code[idx]).abs())
    return torch.where(go_right, right, idx).to(torch.uint8), absmax


def dequantize_blockwise_dynamic(q: torch.Tensor, absmax: torch.Tensor, blocksize: int = BLOCKSIZE_NESTED):
    code = dynamic_code(q.device)
    return code[q.long()] * absmax.repeat_interleave(blocksize)[: q.numel()]


def double_quantize_absmax(absmax: torch.Tensor) -> torch.Tensor:
    """The per-block absmax after double quantization: 8-bit codes of `absmax - mean`, plus the mean."""
    offset = absmax.mean()
    q, absmax2 = quantize_blockwise_dynamic(absmax - offset)
    return dequantize_blockwise_dynamic(q, absmax2) + offset


def dequantize_4bit(
    q: torch.Tensor, absmax: torch.Tensor, shape, quant_type: str = "nf4", blocksize: int = BLOCKSIZE_4BIT
) -> torch.Tensor:
    """Code value times block absmax, in float32 (bnb's `dequantize_4bit`)."""
    values = code_4bit(quant_type, q.device)[q.long()]
    n = values.numel()
    rem = n % blocksize
    full = n - rem
    out = torch.empty(n, dtype=torch.float32, device=q.device)
    out[:full] = (values[:full].view(-1, blocksize) * absmax[: full // blocksize].view(-1, 1)).reshape(full)
    if rem:
        out[full:] = values[full:] * absmax[full // blocksize]
    return out.reshape(shape)


# --- fake quantization ------------------------------------------------------------------------------------


def fake_quantize_weight(
    weight: torch.Tensor,
    bits: int,
    quant_type: str = "nf4",
    double_quant: bool = False,
    blocksize: int = BLOCKSIZE_4BIT,
    embedding: bool = False,
) -> torch.Tensor:
    """The weight a bnb layer effectively multiplies by (no gradient; see [`straight_through`]).

    Args:
        weight (`torch.Tensor`): A 2-D float weight.
        bits (`int`): 8 (row-wise absmax int8) or 4 (block-wise NF4 / FP4).
        quant_type (`str`, *optional*, defaults to `"nf4"`): 4-bit data type.
        double_quant (`bool`, *optional*, defaults to `False`): Quantize the 4-bit absmax values too.
        blocksize (`int`, *optional*, defaults to `64`): 4-bit block size.
        embedding (`bool`, *optional*, defaults to `False`): The 8-bit dequantization of `Embedding8bit`.
    """
    with torch.no_grad():
        if bits == 8:
            cb, scb = int8_rowwise_quantize(weight)
            if embedding:
                return int8_embedding_dequantize(cb, scb).to(weight.dtype)
            return int8_rowwise_dequantize(cb, scb, dtype=weight.dtype)
        if bits == 4:
            q, absmax = quantize_4bit(weight, quant_type, blocksize)
            if double_quant:
                absmax = double_quantize_absmax(absmax)
            return dequantize_4bit(q, absmax, weight.shape, quant_type, blocksize).to(weight.dtype)
    raise ValueError(f"bits must be 4 or 8, got {bits!r}.")


class _StraightThrough(torch.autograd.Function):
    """Forward the quantized value exactly; pass the gradient to the full-precision one unchanged."""

    @staticmethod
    def forward(ctx, full: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
        return quantized.detach().clone()

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def straight_through(full: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    """`quantized` in the forward pass, identity gradient to `full` in the backward pass (STE; Bengio et al.
    2013, https://arxiv.org/abs/1308.3432). Unlike `full + (quantized - full).detach()` the forward value is
    bit-exact."""
    return _StraightThrough.apply(full, quantized)


# --- symmetric int (compressed-tensors pack-quantized) -----------------------------------------------------------


def int_range(bits: int) -> tuple[int, int]:
    """The signed integer range of `bits` bits: (-2^(bits-1), 2^(bits-1) - 1)."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def _grouped(weight: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """`weight` as (rows, groups, group_size); per-channel is one group of the whole row."""
    w = weight.detach()
    size = w.shape[-1] if group_size is None else group_size
    if w.shape[-1] % size:
        raise ValueError(f"group_size {size} does not divide the row length {w.shape[-1]}; keep this layer in full precision.")
    return w.unflatten(-1, (w.shape[-1] // size, size))


def symmetric_scales(weight: torch.Tensor, bits: int, group_size: int | None = None) -> torch.Tensor:
    """The scale of each row (`group_size=None`, shape (rows, 1)) or of each group (shape (rows, groups)), as
    compressed-tensors' `calculate_qparams` computes it for symmetric int weights: absmax over (2^bits - 1) / 2, a
    zero scale replaced by the dtype's epsilon."""
    g = _grouped(weight, group_size)
    lo, hi = int_range(bits)
    mins = torch.minimum(g.amin(-1), torch.zeros((), dtype=g.dtype))
    maxs = torch.maximum(g.amax(-1), torch.zeros((), dtype=g.dtype))
    absmax = torch.maximum(mins.abs(), maxs.abs())
    scales = absmax / (torch.tensor(hi - lo, dtype=absmax.dtype) / 2)
    return torch.where(scales == 0, torch.tensor(torch.finfo(scales.dtype).eps, dtype=scales.dtype), scales)


def int_quantize(weight: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int | None = None) -> torch.Tensor:
    """Integer codes (int8 tensor, weight's shape): divide by the scale, clamp, round half to even."""
    lo, hi = int_range(bits)
    g = _grouped(weight, group_size)
    q = torch.round(torch.clamp(g / scales.unsqueeze(-1), lo, hi))
    return q.flatten(-2).to(torch.int8)


def int_dequantize(q: torch.Tensor, scales: torch.Tensor, group_size: int | None = None) -> torch.Tensor:
    """The weight a loader multiplies by: code x scale, in the scale's dtype."""
    g = _grouped(q, group_size).to(scales.dtype)
    return (g * scales.unsqueeze(-1)).flatten(-2)


def fake_quantize_int(weight: torch.Tensor, bits: int, group_size: int | None = None) -> torch.Tensor:
    """The weight the compressed-tensors checkpoint holds after reload (no gradient; see `straight_through`)."""
    with torch.no_grad():
        scales = symmetric_scales(weight, bits, group_size)
        return int_dequantize(int_quantize(weight, scales, bits, group_size), scales, group_size).to(weight.dtype)
