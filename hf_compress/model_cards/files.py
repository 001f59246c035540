"""What a checkpoint folder's weight files hold, read from their safetensors headers (no tensor is loaded).

The card and report describe the written files, not a reloaded model: a compressed-tensors folder reloaded by
transformers is decompressed to float weights in memory (or keeps packed int32 words, bf16 scales and int64 shapes as
"parameters"), so counting the reloaded model's parameters or dtypes misreports what was written. Here each tensor
name is read with its dtype and shape, and grouped by module:

- compressed-tensors `pack-quantized`: `<module>.weight_packed` (int32 words, `32 / bits` codes each) with
  `weight_scale` / `weight_zero_point` / `weight_shape` / `weight_g_idx` beside it -> the module is `int<bits>`;
- bitsandbytes 8-bit: `<module>.weight` int8 with `<module>.SCB` -> `int8`; 4-bit: `<module>.weight` uint8 (two codes a
  byte) with `<module>.weight.absmax` and `<module>.weight.quant_state.bitsandbytes__nf4|fp4` -> `nf4 (4-bit)` /
  `fp4 (4-bit)`; the low-bit embedding tables of `quantized_embeddings.safetensors` alike (their empty sentinel in
  `model.safetensors` is skipped);
- bitmask: the nonzero values under the weight's name with `<name>_bitmask`, the logical shape in the file metadata;
- anything else: a parameter stored in its dtype.

Scales, zero points, shapes, bitmasks and quantization states are counted as `auxiliary` tensors, never as parameters.
"""

from __future__ import annotations

import json
import os
import re
import struct

# safetensors dtype names -> torch's
_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
           "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1}
# compressed-tensors' per-module tensors beside `weight_packed`
_CT_AUX = ("weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx")
_BITMASK_SUFFIX = "_bitmask"
_SENTINEL_SHAPE = [0]


def read_header(path: str) -> tuple[dict[str, dict], dict]:
    """`({tensor name: {"dtype", "shape"}}, metadata)` of one safetensors file, from its JSON header only."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    metadata = header.pop("__metadata__", None) or {}
    return {k: {"dtype": v["dtype"], "shape": list(v["shape"])} for k, v in header.items()}, metadata


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _pattern(module: str) -> str:
    """`model.layers.3.mlp.up_proj` -> `model.layers.*.mlp.up_proj` (as `precision_summary` names modules)."""
    return re.sub(r"\.\d+(?=\.|$)", ".*", module)


def _ct_bits(qconfig: dict) -> tuple[dict[str, int], int | None]:
    """`({module name: bits}, bits of a single group)` from a compressed-tensors `quantization_config`."""
    by_name, single = {}, None
    groups = [g for g in (qconfig.get("config_groups") or {}).values() if g.get("weights")]
    for g in groups:
        for t in g.get("targets") or []:
            by_name[t] = int(g["weights"]["num_bits"])
    if len(groups) == 1:
        single = int(groups[0]["weights"]["num_bits"])
    return by_name, single


def describe_stored(folder: str) -> dict:
    """
    What the weight files of `folder` store, module by module.

    Returns:
        `dict`: `modules` (`{module: {"stored_as", "parameters"}}`, plus `group_size` for grouped compressed-tensors
        layers), `precision` (`{kind: {"parameters", "modules"}}`, kind `int8` / `int4` / `nf4 (4-bit)` /
        `fp4 (4-bit)` for quantized weights or a dtype name; module names with layer indices as `*`), `quantized`
        (the quantized kinds only, same shape), `parameters` (the model's parameters as stored: logical weights,
        each stored tensor once) and `auxiliary` (`{"tensors", "bytes"}` of scales, zero points, shapes, bitmasks
        and quantization states: not parameters).
    """
    from ..formats.base import read_config
    from ..quantization.backends.bitsandbytes import EMBEDDINGS_CONFIG_KEY, EMBEDDINGS_FILE

    config = read_config(folder)
    qconfig = config.get("quantization_config") or {}
    ct_bits = _ct_bits(qconfig) if qconfig.get("quant_method") == "compressed-tensors" else ({}, None)
    low_bit = config.get(EMBEDDINGS_CONFIG_KEY) or {}
    tensors, sparse_shapes = _stored_tensors(folder, low_bit, EMBEDDINGS_FILE)
    modules, aux_keys = _quantized_modules(folder, tensors, ct_bits, low_bit)
    quantized = set(modules)
    precision = _precision(tensors, sparse_shapes, modules, aux_keys)
    aux_bytes = sum(_numel(tensors[k]["shape"]) * _DTYPE_BYTES.get(tensors[k]["dtype"], 1) for k in aux_keys)
    return {
        "modules": modules,
        "precision": precision,
        "quantized": {k: precision[k] for k in sorted({modules[m]["stored_as"] for m in quantized})},
        "parameters": sum(g["parameters"] for g in precision.values()),
        "auxiliary": {"tensors": len(aux_keys), "bytes": aux_bytes},
    }


def _stored_tensors(folder: str, low_bit: dict, embeddings_file: str) -> tuple[dict[str, dict], dict]:
    """`({tensor name: {"dtype", "shape"}}, {bitmask-stored name: its logical shape})` over every safetensors file of
    `folder`, without the empty stand-ins (in the other files) of the tables stored in `embeddings_file`."""
    tensors, sparse_shapes = {}, {}
    names = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors")) if os.path.isdir(folder) else []
    for name in names:
        header, metadata = read_header(os.path.join(folder, name))
        if metadata.get("sparse"):
            sparse_shapes.update(json.loads(metadata["sparse"]))
        for key, info in header.items():
            if name != embeddings_file and info["shape"] == _SENTINEL_SHAPE and key.removesuffix(".weight") in low_bit.get("modules", ()):
                continue  # the empty stand-in for a table stored in quantized_embeddings.safetensors
            tensors[key] = info
    return tensors, sparse_shapes


def _quantized_modules(folder: str, tensors: dict, ct_bits: tuple[dict[str, int], int | None], low_bit: dict):
    """`({module: {"stored_as", "parameters", ...}}, auxiliary tensor names)` of the modules stored quantized, in
    the order their tensors come, recognised by the tensors each format writes beside the weight."""
    by_name, single = ct_bits
    modules: dict[str, dict] = {}
    aux_keys: set[str] = set()
    for key, info in tensors.items():
        if key.endswith(".weight_packed"):  # compressed-tensors pack-quantized
            module = key.removesuffix(".weight_packed")
            bits = by_name.get(module, single)
            if bits is None:
                raise ValueError(f"{folder}: `{key}` has no compressed-tensors config group naming its bits.")
            rows, words = info["shape"]
            entry = {"stored_as": f"int{bits}", "parameters": rows * words * (32 // bits), "shape": [rows, words * (32 // bits)]}
            scale = tensors.get(module + ".weight_scale")
            if scale is not None and len(scale["shape"]) == 2 and scale["shape"][1] > 1:
                entry["group_size"] = entry["parameters"] // rows // scale["shape"][1]
            modules[module] = entry
            aux_keys |= {f"{module}.{a}" for a in _CT_AUX if f"{module}.{a}" in tensors}
        elif key.endswith(".SCB") and tensors.get(key.removesuffix(".SCB") + ".weight", {}).get("dtype") == "I8":
            module = key.removesuffix(".SCB")  # bitsandbytes LLM.int8 (Linear8bitLt or Embedding8bit)
            modules[module] = {"stored_as": "int8", "parameters": _numel(tensors[module + ".weight"]["shape"])}
            aux_keys |= {k for k in (key, module + ".weight_format") if k in tensors}
        elif ".weight.quant_state.bitsandbytes__" in key:  # bitsandbytes Linear4bit
            module = key.split(".weight.quant_state.")[0]
            kind = key.rsplit("__", 1)[1]
            modules[module] = {"stored_as": f"{kind} (4-bit)", "parameters": 2 * _numel(tensors[module + ".weight"]["shape"])}
            aux_keys |= {k for k in tensors if k.startswith(module + ".weight.")}
        elif key.endswith(".absmax") and tensors.get(key.removesuffix(".absmax") + ".weight", {}).get("dtype") == "U8":
            module = key.removesuffix(".absmax")  # a 4-bit table of quantized_embeddings.safetensors
            modules[module] = {"stored_as": f"{low_bit.get('quant_type', 'nf4')} (4-bit)",
                               "parameters": 2 * _numel(tensors[module + ".weight"]["shape"])}
            aux_keys.add(key)
    return modules, aux_keys


def _precision(tensors: dict, sparse_shapes: dict, modules: dict, aux_keys: set[str]) -> dict[str, dict]:
    """`{kind: {"parameters", "modules"}}`: the quantized modules first, then every other stored tensor in its dtype.
    Adds the remaining modules (in their dtype, or `mixed`) to `modules` and the bitmasks to `aux_keys`."""
    quantized = set(modules)
    quantized_weights = {m + suffix for m in quantized for suffix in (".weight", ".weight_packed")}
    precision: dict[str, dict] = {}

    def add(kind: str, module: str, count: int) -> None:
        group = precision.setdefault(kind, {"parameters": 0, "modules": []})
        group["parameters"] += count
        if _pattern(module) not in group["modules"]:
            group["modules"].append(_pattern(module))

    for module in sorted(quantized):
        add(modules[module]["stored_as"], module, modules[module]["parameters"])
    for key, info in sorted(tensors.items()):
        if key in aux_keys or key in quantized_weights:
            continue
        if key.endswith(_BITMASK_SUFFIX) and key.removesuffix(_BITMASK_SUFFIX) in sparse_shapes:
            aux_keys.add(key)
            continue
        module = key.rpartition(".")[0]
        numel = _numel(sparse_shapes[key]["shape"]) if key in sparse_shapes else _numel(info["shape"])
        dtype = _DTYPES.get(info["dtype"], info["dtype"])
        # A quantized module's bias stays in its dtype: counted there, the module keeps its quantized kind.
        entry = modules.setdefault(module, {"stored_as": dtype, "parameters": 0})
        entry["parameters"] += numel
        if module not in quantized and entry["stored_as"] != dtype:
            entry["stored_as"] = "mixed"
        add(dtype, module, numel)
    return precision
