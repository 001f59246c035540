"""`--format onnx --bits 4`: the fp32 ONNX graph rewritten to weight-only int4 on the compressed-tensors grid.

Every quantized `nn.Linear` becomes ONNX Runtime's `MatMulNBits` (com.microsoft) and, with `quantize_embeddings`,
every quantized embedding table a `GatherBlockQuantized`, whose initializers are written from OUR integers and scales
([`compressed_tensors.symmetric_scales`] / [`compressed_tensors.int_quantize`]: symmetric, one fp32 scale per
`group_size` input columns of a row, codes in [-8, 7]), not from ONNX Runtime's own quantizer (its round-to-nearest
picks other scales and codes). So the graph dequantizes to exactly the weights [`IntFakeQuantize`] trains with and the
compressed-tensors export reloads to:

- `MatMulNBits`: `B` holds `q + 8` as uint4 (two per byte, low nibble first, `[N, K / block, block / 2]`), `scales`
  is `[N, K / block]` fp32, and `zero_points` is left out, whose default is 8 for 4 bits; ONNX Runtime dequantizes
  `(code - 8) * scale`, the same single fp32 product as `q * scale`. `accuracy_level` 0 keeps the activations in fp32
  (4 would round them to int8 per block at run time, which QAT does not replay).
- `GatherBlockQuantized`: `data` is signed int4 (`q` itself, default zero point 0), blocks along the row
  (`quantize_axis=1`), `output = q * scale`.

What remains is fp32 rounding: the matrix products add in another order than torch's.

The Linear behind each `MatMul` / `Gemm` is found by value: the TorchScript exporter names the (transposed, constant
folded) weights `onnx::MatMul_123`, so a node is matched when its weight initializer equals the module's weight (or its
transpose) bit for bit; a quantized Linear that no node reads is refused rather than left in fp32.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from .numerics import int_quantize, symmetric_scales
from .targets import compressed_tensors_targets, targets_for_qat

BITS = 4
OFFSET = 8  # MatMulNBits' default zero point for 4 bits: a stored code c means c - 8
# MatMulNBits / GatherBlockQuantized need a power-of-two block of at least 16.
MIN_BLOCK = 16
MS_DOMAIN = "com.microsoft"
INT4_OPS = ("MatMulNBits", "GatherBlockQuantized")
# 0 (unset): ONNX Runtime keeps the activations in fp32 and dequantizes the weights exactly; 4 would quantize them.
ACCURACY_LEVEL = 0
# The graph against the fake-quantized model, relative to max(1, |logit|): fp32 rounding of sums taken in another order
# (measured on the tiny test models: see tests/test_onnx_int4.py).
RELATIVE_ATOL = 1e-5


# --- packing (pure) --------------------------------------------------------------------------------------------


def valid_block_size(group_size: int | None) -> bool:
    return group_size is not None and group_size >= MIN_BLOCK and group_size & (group_size - 1) == 0


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Pairs of 4-bit codes (any int dtype, values in [0, 15], last dimension even) as uint8, the first of each pair in
    the low nibble, as `MatMulNBits` and ONNX's int4 / uint4 tensors store them."""
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of [`pack_nibbles`]: uint8 codes in [0, 15], twice as many along the last dimension."""
    p = packed.to(torch.uint8)
    return torch.stack([p & 0xF, p >> 4], dim=-1).flatten(-2)


def matmul_nbits_weights(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """
    The `B` and `scales` inputs of `MatMulNBits` for a Linear weight `[N, K]` (out, in) on our int4 grid.

    Returns:
        `(B, scales)`: uint8 `[N, K // group_size, group_size // 2]` holding `q + 8` two per byte, and the fp32 scales
        `[N, K // group_size]` (those of [`symmetric_scales`]).
    """
    w = weight.detach().float()
    scales = symmetric_scales(w, BITS, group_size)
    q = int_quantize(w, scales, BITS, group_size).to(torch.int16) + OFFSET
    n, k = w.shape
    return pack_nibbles(q.reshape(n, k // group_size, group_size)), scales


def dequantize_matmul_nbits(b: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The `[N, K]` weight ONNX Runtime multiplies by: `(code - 8) * scale`."""
    n, blocks, _ = b.shape
    codes = unpack_nibbles(b).to(torch.float32) - OFFSET
    return (codes * scales.reshape(n, blocks, 1)).reshape(n, -1)


def gather_block_weights(weight: torch.Tensor, group_size: int) -> tuple[bytes, torch.Tensor]:
    """The `data` (signed int4, packed two per byte along the row, as ONNX's int4 raw data) and `scales`
    (`[V, H // group_size]` fp32) of `GatherBlockQuantized` for an embedding table `[V, H]` on our int4 grid."""
    w = weight.detach().float()
    scales = symmetric_scales(w, BITS, group_size)
    q = int_quantize(w, scales, BITS, group_size).to(torch.int16)
    return pack_nibbles(q & 0xF).numpy().tobytes(), scales


def dequantize_gather_block(data: np.ndarray, scales: torch.Tensor) -> torch.Tensor:
    """The table `GatherBlockQuantized` looks rows up in: `q * scale` (`data` as `onnx.numpy_helper` reads an int4
    tensor: one int8 per value)."""
    q = torch.from_numpy(np.asarray(data, dtype=np.int8)).float()
    v, blocks = scales.shape
    return (q.reshape(v, blocks, -1) * scales.reshape(v, blocks, 1)).reshape(v, -1)


# --- what can be written (pure) --------------------------------------------------------------------------------


def int4_refusal(model_type: str | None, group_size: int | None, backend: str | None, config=None) -> str | None:
    """Why the int4 ONNX graph cannot be written exactly for these settings, in one line (`None` when it can); `config`
    (optional) gives the widths the group size must divide."""
    if backend != "compressed-tensors":
        return ("`--format onnx --bits 4` writes compressed-tensors' int4 grid (the one QAT replays), got "
                f"`--backend {backend}`; pass `--backend compressed-tensors --group_size 32` (or 64, 128).")
    if group_size is None:
        return ("`--format onnx --bits 4` needs `--group_size` 32, 64 or 128: `MatMulNBits` has one scale per block of a "
                "power of two >= 16 along the input, not one per row.")
    if not valid_block_size(group_size):
        return f"`--format onnx --bits 4`: `MatMulNBits` blocks are powers of two >= 16, got `--group_size {group_size}`."
    from ..architectures import compressed_tensors_refusal

    if compressed_tensors_refusal(model_type) is not None:
        return (f"`--format onnx --bits 4` quantizes `nn.Linear` layers as compressed-tensors does, which a "
                f"`{model_type}` model's projections are not; use `--format onnx --bits 8` or `--no_quantize`.")
    for field in ("hidden_size", "intermediate_size"):
        width = getattr(config, field, None)
        if isinstance(width, int) and width % group_size:
            return (f"`--format onnx --bits 4`: `--group_size {group_size}` does not divide the model's {field} {width}, "
                    "so its layers would stay fp32; pass a group size that divides it (32, 64 or 128).")
    return None


# --- which weights ----------------------------------------------------------------------------------------------


def int4_targets(model, args) -> tuple[dict, dict, list[str]]:
    """
    ({Linear name: weight}, {embedding name: table}, layers kept fp32 because `group_size` does not divide their row)
    of the int4 graph: exactly the weights [`QATCallback`] fake-quantizes ([`targets_for_qat`]), a tied `lm_head`
    included with a quantized embedding. Read from a model without fake quantizers (their `original` is the weight).
    """
    from torch import nn

    linears, embeddings = targets_for_qat(model, args)
    kept = compressed_tensors_targets(model, args)[2]
    weights = {n: m.weight.detach() for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))}
    return {n: weights[n] for n in linears}, {n: weights[n] for n in embeddings}, kept


# --- graph rewrite ----------------------------------------------------------------------------------------------


def _key(array: np.ndarray) -> tuple:
    a = np.ascontiguousarray(array, dtype=np.float32)
    return a.shape, hashlib.sha1(a.tobytes()).hexdigest()


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


class _Int4Graph:
    """The fp32 graph being rewritten: which weight each node reads, and the int4 initializers made so far (one set
    per module, shared by every node reading that weight)."""

    def __init__(self, model, linears: dict, embeddings: dict, group_size: int, accuracy_level: int):
        from onnx import numpy_helper

        self.model, self.graph = model, model.graph
        self.linears, self.embeddings = linears, embeddings
        self.group_size, self.accuracy_level = group_size, accuracy_level
        self.inits = {t.name: t for t in self.graph.initializer}
        self.arrays = {}
        self.to_array = numpy_helper.to_array
        # Weight as stored in the graph -> module: a MatMul reads W^T [K, N], a Gemm with transB=1 reads W [N, K].
        self.by_matmul = {_key(w.float().numpy().T): n for n, w in linears.items()}
        self.by_gemm_t = {_key(w.float().numpy()): n for n, w in linears.items()}
        self.by_table = {_key(w.float().numpy()): n for n, w in embeddings.items()}
        self.matched = {n: [] for n in list(linears) + list(embeddings)}
        self.made: dict[tuple, list[str]] = {}
        self.int4_bytes = 0

    def array(self, name):
        if name not in self.arrays:
            self.arrays[name] = self.to_array(self.inits[name])
        return self.arrays[name]

    def is_float_2d(self, name) -> bool:
        from onnx import TensorProto

        return name in self.inits and self.inits[name].data_type == TensorProto.FLOAT and len(self.inits[name].dims) == 2

    def linear_inputs(self, name) -> list[str]:
        from onnx import numpy_helper

        if (name, "linear") not in self.made:
            b, scales = matmul_nbits_weights(self.linears[name], self.group_size)
            base = f"{name}.weight_int4"
            self.graph.initializer.extend([
                numpy_helper.from_array(b.numpy(), f"{base}.B"),
                numpy_helper.from_array(scales.numpy().astype(np.float32).reshape(-1), f"{base}.scales")])
            self.int4_bytes += b.numel() + scales.numel() * 4
            self.made[(name, "linear")] = [f"{base}.B", f"{base}.scales"]
        return self.made[(name, "linear")]

    def table_inputs(self, name) -> list[str]:
        from onnx import TensorProto, helper, numpy_helper

        if (name, "table") not in self.made:
            w = self.embeddings[name]
            data, scales = gather_block_weights(w, self.group_size)
            base = f"{name}.weight_int4"
            self.graph.initializer.extend([
                helper.make_tensor(f"{base}.data", TensorProto.INT4, list(w.shape), data, raw=True),
                numpy_helper.from_array(scales.numpy().astype(np.float32), f"{base}.scales")])
            self.int4_bytes += len(data) + scales.numel() * 4
            self.made[(name, "table")] = [f"{base}.data", f"{base}.scales"]
        return self.made[(name, "table")]

    def linear_target(self, node, attrs) -> tuple[str | None, str, str]:
        """(module, activation input, bias input) of a `MatMul` / plain `Gemm` reading a quantized weight."""
        if node.op_type == "MatMul" and self.is_float_2d(node.input[1]):
            return self.by_matmul.get(_key(self.array(node.input[1]))), node.input[0], ""
        if (node.op_type == "Gemm" and self.is_float_2d(node.input[1]) and attrs.get("alpha", 1.0) == 1.0
                and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0)):
            table = self.by_gemm_t if attrs.get("transB", 0) else self.by_matmul
            bias = node.input[2] if len(node.input) > 2 else ""
            if bias and not (bias in self.inits and len(self.inits[bias].dims) == 1):
                return None, "", ""  # a bias that is not a plain [N] vector: leave the node as it is
            return table.get(_key(self.array(node.input[1]))), node.input[0], bias
        return None, "", ""

    def replace(self, node):
        """The int4 node computing `node`, or `node` itself when it reads no quantized weight."""
        from onnx import helper

        attrs = _attrs(node)
        label = node.name or node.output[0]
        target, a, bias = self.linear_target(node, attrs)
        if target is not None:
            n_out, k_in = self.linears[target].shape
            b_name, s_name = self.linear_inputs(target)
            self.matched[target].append(label)
            return helper.make_node(
                "MatMulNBits", [a, b_name, s_name] + (["", "", bias] if bias else []), list(node.output),
                name=f"{label}_int4", domain=MS_DOMAIN, K=k_in, N=n_out, bits=BITS, block_size=self.group_size,
                accuracy_level=self.accuracy_level)
        if node.op_type == "Gather" and attrs.get("axis", 0) == 0 and self.is_float_2d(node.input[0]):
            table = self.by_table.get(_key(self.array(node.input[0])))
            if table is not None:
                d_name, s_name = self.table_inputs(table)
                self.matched[table].append(label)
                return helper.make_node(
                    "GatherBlockQuantized", [d_name, node.input[1], s_name], list(node.output), name=f"{label}_int4",
                    domain=MS_DOMAIN, gather_axis=0, quantize_axis=1, block_size=self.group_size, bits=BITS)
        return node

    def finish(self, new_nodes, dst: str) -> None:
        """Swap the nodes in, drop the fp32 weights no node reads any more, declare the contrib domain, save."""
        import onnx
        from onnx import helper

        graph = self.graph
        del graph.node[:]
        graph.node.extend(new_nodes)
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        kept = [t for t in graph.initializer if t.name in used]
        del graph.initializer[:]
        graph.initializer.extend(kept)
        if not any(o.domain == MS_DOMAIN for o in self.model.opset_import):
            self.model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
        onnx.save(self.model, dst)


def rewrite_int4(src: str, dst: str, linears: dict, embeddings: dict, group_size: int, accuracy_level: int = 0,
                 others: dict | None = None) -> dict:
    """
    Read the fp32 graph `src`, replace the `MatMul` / `Gemm` of every Linear in `linears` ({name: weight [N, K]}) by
    `MatMulNBits` and the `Gather` of every table in `embeddings` by `GatherBlockQuantized`, and write `dst`. `others`
    ({name: weight}) are the Linear layers that stay fp32: one with the very values of a quantized one is refused, as
    the graph could not tell their nodes apart.

    Returns:
        `dict`: `matched` ({module name: [ONNX node names]}) and the byte count of the int4 initializers.

    Raises:
        `ValueError`: a quantized module that no node reads (it would silently stay fp32), or a weight value shared by
        a quantized and an unquantized node role that cannot be told apart.
    """
    import onnx

    g = _Int4Graph(onnx.load(src), linears, embeddings, group_size, accuracy_level)
    clash = [n for n, w in (others or {}).items() if _key(w.float().numpy().T) in g.by_matmul]
    if clash:
        raise ValueError(f"{', '.join(clash)} (kept fp32) holds the same weight values as a quantized Linear, so their "
                         "ONNX nodes cannot be told apart; nothing was written. Use `--format compressed-tensors`.")
    new_nodes = [g.replace(node) for node in g.graph.node]
    missing = [n for n, nodes in g.matched.items() if not nodes]
    if missing:
        raise ValueError(f"The int4 ONNX graph found no `MatMul`/`Gemm`/`Gather` reading the weight of {', '.join(missing)} "
                         "(the traced graph computes it another way); nothing was written. Use `--format compressed-tensors`.")
    g.finish(new_nodes, dst)
    return {"matched": g.matched, "int4_weight_bytes": g.int4_bytes}


def write_int4(src: str, dst: str, model, args) -> dict:
    """The int4 graph of `model` (no fake quantizers; traced as `src`) at `dst`, and what the export records."""
    from torch import nn

    linears, embeddings, kept = int4_targets(model, args)
    others = {n: m.weight.detach() for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in linears}
    done = rewrite_int4(src, dst, linears, embeddings, args.group_size, ACCURACY_LEVEL, others=others)
    return {"precision": f"weight-only int4 (compressed-tensors grid, symmetric, group {args.group_size}; `MatMulNBits`, "
                         f"accuracy_level {ACCURACY_LEVEL}: fp32 activations)",
            "bits": BITS, "group_size": args.group_size, "accuracy_level": ACCURACY_LEVEL,
            "int4_linear_modules": list(linears), "int4_embeddings": list(embeddings),
            "full_precision_linear_modules": list(others), "unsupported_shape_modules": kept,
            "int4_weight_bytes": done["int4_weight_bytes"], "int4_relative_atol": RELATIVE_ATOL}


def check_exact(max_diff: float, logit_scale: float) -> float:
    """`max_diff` (int4 graph vs the fake-quantized model) if within fp32 rounding (`RELATIVE_ATOL` times
    `logit_scale`, the model's `max(1, max |logit|)`), else the `RuntimeError`."""
    bound = RELATIVE_ATOL * logit_scale
    if not max_diff <= bound:
        raise RuntimeError(f"The int4 ONNX graph differs from the fake-quantized model by {max_diff:.2e} (> {bound:.2e}, "
                           "fp32 rounding); nothing was written. Use `--format compressed-tensors`.")
    return max_diff


def plain_and_reference(model, args):
    """(a copy of `model` without fake quantizers, whose graph is traced and whose weights are quantized; a copy under
    the export's fake quantizers, what the int4 graph must compute). The caller's model is not changed."""
    from .export import fake_quantized_copy
    from .qat import remove_fake_quant

    plain = fake_quantized_copy(model, args)
    remove_fake_quant(plain)
    return plain.eval(), fake_quantized_copy(model, args).eval()
