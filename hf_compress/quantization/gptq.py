"""GPTQ one-shot weight quantization (Frantar et al. 2022, https://arxiv.org/abs/2210.17323) on the grid of our
compressed-tensors int export.

For each Linear layer, GPTQ quantizes the weight one input column at a time and spreads the error of each column over
the columns not yet quantized, weighted by the inverse Hessian `H = 2 X^T X / n` of the layer's calibration inputs
`X`: it minimizes the layer-output error `||W X - Q X||` rather than the weight error that round-to-nearest (RTN)
minimizes. Layers are quantized in the order the model runs them: the inputs of a layer are computed by the layers
before it with their *quantized* weights, so later layers correct for the error of earlier ones.

The grid is exactly what [`compressed_tensors.symmetric_scales`] / [`compressed_tensors.int_quantize`] /
[`compressed_tensors.int_dequantize`] define, i.e. what the `pack-quantized` export stores and a loader multiplies
by: symmetric, no zero point, integers in [-2^(bits-1), 2^(bits-1) - 1], one scale per `group_size` consecutive input
columns of a row, scale `absmax / ((2^bits - 1) / 2)` stored in the weight's dtype, weight = integer x scale in that
dtype. The result is the integers and scales themselves, which [`compressed_tensors.save`] writes unchanged
(`precomputed=`), so the reloaded checkpoint multiplies by exactly the weights GPTQ chose.

Everything here is pure torch; the `compressed_tensors` library is not imported.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from .numerics import int_dequantize, int_range, symmetric_scales

# Shrink factors of the absmax tried by `scale_search="mse"` (1.0 is the plain absmax scale).
MSE_SHRINK = tuple(1.0 - 0.01 * i for i in range(0, 21))


# --- the Hessian --------------------------------------------------------------------------------------------------


def accumulate_hessian(xtx: torch.Tensor | None, count: int, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Add the calibration inputs `x` (`(..., in_features)`, any dtype) of one batch to the running `X^T X` (float32)
    and token count. Every position is a sample."""
    x = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
    xtx = x.t() @ x if xtx is None else xtx.addmm_(x.t(), x)
    return xtx, count + x.shape[0]


def hessian(xtx: torch.Tensor, count: int) -> torch.Tensor:
    """`H = 2 X^T X / n`, the Hessian of the layer-output squared error `||W X - Q X||^2 / n` in `Q`."""
    return xtx * (2.0 / max(count, 1))


# --- one weight matrix --------------------------------------------------------------------------------------------


def group_scale(
    w: torch.Tensor, bits: int, scale_dtype: torch.dtype, scale_search: str = "absmax", h_diag: torch.Tensor | None = None
) -> torch.Tensor:
    """The scale of each row of one group of columns `w` (`(rows, group_size)`, float32), shape `(rows, 1)`, in
    `scale_dtype` (the dtype the export stores).

    `absmax`: compressed-tensors' own formula ([`symmetric_scales`]). `mse`: the absmax shrunk by the factor of
    `MSE_SHRINK` that minimizes the rounding error of the group, weighted by the Hessian diagonal `h_diag` when given
    (clipping the largest weight a little often lowers the error of all the others).
    """
    base = symmetric_scales(w, bits, None).to(scale_dtype)
    if scale_search == "absmax":
        return base
    if scale_search != "mse":
        raise ValueError(f"scale_search must be 'absmax' or 'mse', got {scale_search!r}.")
    weight = torch.ones_like(w[:1]) if h_diag is None else h_diag.reshape(1, -1).to(w.dtype)
    best, best_err = base, None
    for shrink in MSE_SHRINK:
        s = (base.float() * shrink).to(scale_dtype)
        s = torch.where(s == 0, base, s)
        err = ((dequantize_column(quantize_column(w, s, bits), s) - w) ** 2 * weight).sum(1, keepdim=True)
        if best_err is None:
            best_err = err
        else:
            better = err < best_err
            best = torch.where(better, s, best)
            best_err = torch.where(better, err, best_err)
    return best


def quantize_column(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes of `w` on the grid of `scale` (same broadcast), as [`int_quantize`]: divide, clamp, round half
    to even."""
    lo, hi = int_range(bits)
    return torch.round(torch.clamp(w / scale.to(w.dtype), lo, hi))


def dequantize_column(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The value the loader multiplies by, `q x scale` computed in the scale's dtype (as [`int_dequantize`]), in
    float32."""
    return (q.to(scale.dtype) * scale).to(torch.float32)


def gptq_quantize_weight(
    weight: torch.Tensor,
    h: torch.Tensor,
    bits: int = 4,
    group_size: int | None = 64,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    scale_search: str = "absmax",
    scale_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ on one weight matrix (Frantar et al. 2022, Algorithm 1) on the compressed-tensors grid.

    Args:
        weight (`torch.Tensor`): `(out_features, in_features)`.
        h (`torch.Tensor`): `(in_features, in_features)` Hessian of the layer's inputs ([`hessian`]).
        bits (`int`, *optional*, defaults to `4`): integer width (symmetric, `[-2^(bits-1), 2^(bits-1) - 1]`).
        group_size (`int`, *optional*, defaults to `64`): consecutive input columns per scale; `None`: one per row.
        block_size (`int`, *optional*, defaults to `128`): columns per lazy batch update (a multiple of
            `group_size`, so that a group's scale is read from its up-to-date weights).
        damp (`float`, *optional*, defaults to `0.01`): `damp x mean(diag(H))` added to the diagonal.
        act_order (`bool`, *optional*, defaults to `False`): quantize columns in decreasing `diag(H)`. The groups stay
            the contiguous column groups the format stores, so their scales are then fixed up front from the original
            weights ("static groups"); without it each group's scale is taken from its weights when GPTQ reaches it,
            after the error feedback of the groups before.
        scale_search (`str`, *optional*, defaults to `"absmax"`): `absmax` or `mse` ([`group_scale`]).
        scale_dtype (`torch.dtype`, *optional*): dtype the export stores scales in (default: the weight's).

    Returns:
        `(q, scales)`: int8 codes of the weight's shape and scales `(out_features, groups)` in `scale_dtype`, such
        that `int_dequantize(q, scales, group_size)` is the quantized weight.
    """
    scale_dtype = scale_dtype or weight.dtype
    rows, cols = weight.shape
    gs = cols if group_size is None else group_size
    if cols % gs:
        raise ValueError(f"group_size {gs} does not divide the row length {cols}; keep this layer in full precision.")
    if not act_order and block_size % gs and gs % block_size:
        raise ValueError(f"block_size {block_size} must be a multiple of group_size {gs} (or divide it).")
    w = weight.detach().to(torch.float32).clone()
    h = h.detach().to(torch.float32).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h_diag = torch.diag(h).clone()

    scales = torch.empty(rows, cols // gs, dtype=scale_dtype, device=w.device)
    if act_order:  # static groups: every scale from the original weights
        for g in range(cols // gs):
            sl = slice(g * gs, (g + 1) * gs)
            scales[:, g : g + 1] = group_scale(w[:, sl], bits, scale_dtype, scale_search, h_diag[sl])
        perm = torch.argsort(h_diag, descending=True)
    else:
        perm = torch.arange(cols, device=w.device)
    inv_perm = torch.argsort(perm)
    w, h = w[:, perm], h[perm][:, perm]

    h.diagonal().add_(damp * torch.mean(torch.diag(h)))
    # The upper Cholesky factor of H^-1: row i holds the error-feedback weights of column i onto the later ones.
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q_all = _error_feedback(w, hinv, scales, perm, gs, block_size, bits, act_order, scale_search, h_diag, scale_dtype)
    return q_all[:, inv_perm].to(torch.int8), scales


def _error_feedback(w, hinv, scales, perm, gs, block_size, bits, act_order, scale_search, h_diag, scale_dtype):
    """GPTQ's column loop on the permuted weight `w`: quantize a column, spread its error over the later columns
    (within the block at once, onto the later blocks lazily). Fills `scales` group by group (unless `act_order`:
    fixed up front) and returns the integer codes, in the permuted column order."""
    cols = w.shape[1]
    q_all = torch.zeros_like(w)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            g = col // gs
            if not act_order and col % gs == 0:  # a group starts: its scale from its current (updated) weights
                end = min(i + gs, i2 - i1)
                group = torch.cat([w1[:, i:end], w[:, i1 + end : i1 + i + gs]], dim=1)
                scales[:, g : g + 1] = group_scale(group, bits, scale_dtype, scale_search, h_diag[col : col + gs])
            s = scales[:, g : g + 1]
            x = w1[:, i : i + 1]
            q = quantize_column(x, s, bits)
            q1[:, i : i + 1] = q
            e = (x - dequantize_column(q, s)) / hinv1[i, i]
            w1[:, i:] -= e @ hinv1[i : i + 1, i:]
            err1[:, i : i + 1] = e
        q_all[:, i1:i2] = q1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return q_all


def rtn_quantize_weight(weight: torch.Tensor, bits: int = 4, group_size: int | None = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest on the same grid (what the plain export does), as `(q, scales)`."""
    from .numerics import int_quantize

    scales = symmetric_scales(weight, bits, group_size)
    return int_quantize(weight, scales, bits, group_size), scales


# --- the model ----------------------------------------------------------------------------------------------------


@dataclass
class GPTQResult:
    """What [`gptq_quantize`] found for one Linear layer."""

    q: torch.Tensor  # int8 codes, the weight's shape
    scales: torch.Tensor  # (out_features, groups), the weight's dtype
    group_size: int | None

    def dequantize(self) -> torch.Tensor:
        return int_dequantize(self.q, self.scales, self.group_size)


class _Captured(Exception):
    pass


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The `nn.ModuleList` of repeated blocks (decoder layers) holding most parameters: the units GPTQ runs in order."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no `nn.ModuleList` of layers for sequential GPTQ.")
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))


def _as_kwargs(batch) -> dict:
    if isinstance(batch, torch.Tensor):
        return {"input_ids": batch}
    return dict(batch)


def _capture_layer_inputs(model, layer: nn.Module, batches) -> list[tuple[tuple, dict]]:
    """The positional and keyword arguments `layer` receives for each calibration batch (the forward stops there)."""
    captured = []

    def hook(module, args, kwargs):
        captured.append((args, kwargs))
        raise _Captured

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            try:
                model(**_as_kwargs(batch), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    return captured


def _run_layer(layer, args, kwargs, hidden):
    if args:
        out = layer(hidden, *args[1:], **kwargs)
    else:
        out = layer(**{**kwargs, "hidden_states": hidden})
    return out[0] if isinstance(out, (tuple, list)) else out


def _hidden(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


def _layer_input_stats(work, layer, names, inputs) -> dict:
    """Run `layer` on the calibration `inputs` with hooks on the Linears `names`: for each, `[X^T X, rows, call order,
    input pointer]` (Linears called with the same input tensor share a pointer: q/k/v, gate/up)."""
    stats = {n: [None, 0, None, None] for n in names}
    order = [0]

    def make_hook(name):
        def hook(module, args):
            st = stats[name]
            st[0], st[1] = accumulate_hessian(st[0], st[1], args[0])
            if st[2] is None:
                st[2], st[3] = order[0], args[0].data_ptr()
                order[0] += 1
        return hook

    handles = [work.get_submodule(n).register_forward_pre_hook(make_hook(n)) for n in names]
    try:
        for args, kwargs in inputs:
            _run_layer(layer, args, kwargs, _hidden(args, kwargs))
    finally:
        for hd in handles:
            hd.remove()
    return stats


def gptq_quantize(
    model: nn.Module,
    batches,
    bits: int = 4,
    group_size: int | None = 64,
    modules: list[str] | None = None,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    scale_search: str = "absmax",
    true_sequential: bool = True,
) -> dict[str, GPTQResult]:
    """GPTQ on the Linear layers `modules` of `model`, decoder layer after decoder layer (the model is not changed).

    A float32 copy of the model runs the calibration `batches` (tensors of `input_ids`, or dicts of model inputs) up
    to the first decoder layer; then, for each layer in turn, hooks accumulate the Hessian of each target Linear's
    inputs (float32), GPTQ quantizes it ([`gptq_quantize_weight`]), the quantized weight replaces it in the copy, and
    the layer's outputs with quantized weights become the next layer's inputs. With `true_sequential` the Linears of
    a layer are taken in the order they run, grouped by shared input (q/k/v, then o, then gate/up, then down), and
    each group's Hessian is measured after the groups before it are quantized.

    Scales are stored in each weight's own dtype (bf16 for a bf16 model), as the compressed-tensors export stores
    them. `modules` defaults to the Linear layers the compressed-tensors export quantizes with these `bits` and
    `group_size` ([`~hf_compress.quantization.targets.compressed_tensors_targets`]); targets outside the decoder layers (none by default) are rounded
    to nearest.

    Returns:
        `{module name: GPTQResult(q, scales, group_size)}`, to pass to `quantize_and_save(..., precomputed=...)`
        or [`apply_gptq`].
    """
    if modules is None:
        from .targets import compressed_tensors_targets
        from .config import QuantizationArguments

        modules = compressed_tensors_targets(model, QuantizationArguments(backend="compressed-tensors", bits=bits, group_size=group_size))[0]
    dtypes = {n: model.get_submodule(n).weight.dtype for n in modules}
    work = copy.deepcopy(model).to(torch.float32).eval()
    layers = decoder_layers(work)
    layer_names = {id(m): n for n, m in work.named_modules()}
    results: dict[str, GPTQResult] = {}

    def quantize(name: str, h: torch.Tensor | None):
        lin = work.get_submodule(name)
        if h is None:
            q, s = rtn_quantize_weight(lin.weight.detach().to(dtypes[name]), bits, group_size)
        else:
            q, s = gptq_quantize_weight(lin.weight, h, bits, group_size, block_size, damp, act_order, scale_search, dtypes[name])
        results[name] = GPTQResult(q, s, group_size)
        with torch.no_grad():
            lin.weight.copy_(results[name].dequantize().to(torch.float32))

    with torch.no_grad():
        inputs = _capture_layer_inputs(work, layers[0], batches)
        for layer in layers:
            prefix = layer_names[id(layer)] + "."
            pending = [n for n in modules if n.startswith(prefix)]
            while pending:
                stats = _layer_input_stats(work, layer, pending, inputs)
                if true_sequential:
                    first = min((n for n in pending if stats[n][2] is not None), key=lambda n: stats[n][2], default=None)
                    group = [n for n in pending if first is not None and stats[n][3] == stats[first][3]] or pending
                else:
                    group = pending
                for n in group:
                    st = stats[n]
                    quantize(n, None if st[0] is None else hessian(st[0], st[1]))
                pending = [n for n in pending if n not in group]
            inputs = [
                ((_run_layer(layer, args, kwargs, _hidden(args, kwargs)),) + tuple(args[1:]), kwargs) if args
                else ((), {**kwargs, "hidden_states": _run_layer(layer, args, kwargs, _hidden(args, kwargs))})
                for args, kwargs in inputs
            ]
        for n in modules:  # targets outside the repeated layers: round to nearest
            if n not in results:
                quantize(n, None)
    return results


def apply_gptq(model: nn.Module, results: dict[str, GPTQResult]) -> nn.Module:
    """Write each result's dequantized weight (`q x scale` in the scale's dtype) into `model`, in place: the model
    the compressed-tensors checkpoint reloads as."""
    with torch.no_grad():
        for name, r in results.items():
            lin = model.get_submodule(name)
            lin.weight.copy_(r.dequantize().to(lin.weight.dtype))
    return model
