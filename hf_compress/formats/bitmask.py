"""`--format bitmask`: a smaller save format for pruned models, a bitmask plus the nonzero values, in safetensors.

Each tensor whose zeros make it worth it is stored as `<name>.__bits` (its zero / nonzero pattern, 8 entries a
byte) and `<name>.__values` (the nonzero entries, in order, original dtype); the others are stored dense. The
zero test looks at the bit pattern, so `-0.0` is kept as a value and the reload is bit-identical. A pruned
model stored this way takes about `nonzeros x bits + numel mask bits`, the information limit of the format.
"""

from __future__ import annotations

import copy
import json
import os
import logging

import torch

from ..pruning.masks import pack_bool, unpack_bool
from .base import CheckpointFormat

# v2 (current): `model.safetensors` + a `quantization_config` that `from_pretrained` reads once hf_compress is imported
# (see `bitmask_quantizer.py`); v1: `model.compressed.safetensors`, read by `load_compressed` only.
SAFE_WEIGHTS_NAME = "model.safetensors"
WEIGHTS_NAME = "model.compressed.safetensors"
FORMAT = "hf_compress.bitmask.v1"
FORMAT_V2 = "hf_compress.bitmask.v2"
# The `quant_method` of a v2 folder's `quantization_config`, which `bitmask_quantizer.py` registers with transformers,
# and the suffix of the bitmask stored beside each sparse weight's values.
QUANT_METHOD = "hf_compress_bitmask"
BITMASK_SUFFIX = "_bitmask"
logger = logging.getLogger(__name__)
_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bitmask_quantization_config(format_version: int = 2) -> dict:
    """The `quantization_config` a v2 bitmask folder's `config.json` carries (what `BitmaskConfig.to_dict` gives)."""
    return {"quant_method": QUANT_METHOD, "format_version": format_version}


def _nonzero_bits(t: torch.Tensor) -> torch.Tensor:
    # Compare raw bits, not values: -0.0 == 0.0 as floats but not as bits.
    return t.contiguous().view(_INT_VIEW[t.element_size()]) != 0


def _unique_state(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict without tied duplicates, and `{alias: name}` for the duplicates."""
    tensors, aliases, seen = {}, {}, {}
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()))
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().cpu()
    return tensors, aliases


def size_report(model: torch.nn.Module) -> dict:
    """
    Sizes of `model` in bytes: `dense_bytes` (every unique tensor at its dtype) and `information_limit_bytes`
    (sparse-stored `*.weight` tensors at `nonzeros x bits + numel mask bits`, the others dense), plus the global count of
    zeros among floating-point weights.
    """
    tensors, _ = _unique_state(model)
    dense = limit = 0
    for name, t in tensors.items():
        bits = t.element_size() * 8
        dense_bits = t.numel() * bits
        if name.endswith(".weight") and t.is_floating_point() and t.numel():
            nnz = int(_nonzero_bits(t).sum())
            limit += min(dense_bits, nnz * bits + t.numel())
        else:
            limit += dense_bits
        dense += dense_bits
    return {"dense_bytes": dense // 8, "information_limit_bytes": -(-limit // 8)}


def save_compressed(model: torch.nn.Module, output_dir: str, tokenizer=None) -> dict:
    """
    Save `model` (its config and weights) in the bitmask + nonzero-values format. Written to a new folder beside
    `output_dir` and swapped in whole ([`hf_compress.atomic.atomic_output_dir`]): a failure never leaves half a
    checkpoint, and nothing of an older save in `output_dir` survives (no stale shard, index, tokenizer file or
    v1 `model.compressed.safetensors`: an existing `output_dir` is replaced, not merged into). The dense
    `save_pretrained` stays available and is unaffected (and is the one to share where size is not the point: it
    loads without hf_compress).

    The folder loads with `AutoModelFor*.from_pretrained(output_dir)` and `pipeline()` once `hf_compress` is
    imported (it registers the `hf_compress_bitmask` quantization method with transformers), or with
    [`load_compressed`]; without hf_compress, `from_pretrained` stops with a size-mismatch error rather than
    loading random weights.

    Args:
        model (`torch.nn.Module`): a `PreTrainedModel` (masks made permanent or not: only the weights count).
        output_dir (`str`): folder to write `config.json` and `model.safetensors` to.
        tokenizer (*optional*): saved alongside when given, so `pipeline(task, model=output_dir)` works.

    Returns:
        `dict`: `dense_bytes`, `compressed_bytes` (the weights file on disk), `information_limit_bytes`,
        `sparse_tensors` (how many tensors were stored as bitmask + values) and `path`.
    """
    from safetensors.torch import save_file

    from ..atomic import atomic_output_dir

    if not hasattr(model, "config"):
        raise ValueError(f"save_compressed needs a transformers PreTrainedModel with a `config`, got {type(model).__name__}.")
    tensors, aliases = _unique_state(model)
    out, layout = {}, {}
    for name, t in tensors.items():
        sparse = False
        # Only `*.weight` tensors: transformers' loader pairs `weight` with `weight_bitmask`.
        if name.endswith(".weight") and t.is_floating_point() and t.numel():
            nz = _nonzero_bits(t)
            nnz = int(nz.sum())
            sparse = nnz * t.element_size() * 8 + t.numel() < t.numel() * t.element_size() * 8
        if sparse:
            # The values under the weight's own name: 1-D and shorter, so a loader that does not know the format
            # fails on the shape instead of loading something else.
            out[name] = t.contiguous().reshape(-1)[nz.reshape(-1)].clone()
            out[name + BITMASK_SUFFIX] = pack_bool(nz)
            layout[name] = {"shape": list(t.shape)}
        else:
            out[name] = t.contiguous().clone()
    metadata = {"format": "pt", "hf_compress_format": FORMAT_V2, "sparse": json.dumps(layout), "aliases": json.dumps(aliases)}

    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]  # as save_pretrained does, so load_compressed finds the class
    config.quantization_config = bitmask_quantization_config()

    with atomic_output_dir(str(output_dir), marker=True) as folder:
        config.save_pretrained(folder)
        save_file(out, os.path.join(folder, SAFE_WEIGHTS_NAME), metadata=metadata)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
    report = size_report(model)
    report.update(
        compressed_bytes=os.path.getsize(os.path.join(output_dir, SAFE_WEIGHTS_NAME)),
        sparse_tensors=len(layout),
        path=str(output_dir),
    )
    return report


def _bitmask_config(folder: str) -> dict | None:
    """The `quantization_config` of `folder/config.json` when it names the v2 bitmask format, else None."""
    try:
        with open(os.path.join(folder, "config.json")) as f:
            qc = json.load(f).get("quantization_config") or {}
    except (OSError, ValueError):
        return None
    return qc if qc.get("quant_method") == QUANT_METHOD else None


def is_bitmask_checkpoint(folder: str) -> bool:
    """Whether `folder` holds a bitmask checkpoint ([`save_compressed`], either layout)."""
    return _bitmask_config(folder) is not None or os.path.isfile(os.path.join(folder, WEIGHTS_NAME))


def bitmask_weights_file(folder: str) -> str:
    """
    The weights file of the bitmask checkpoint in `folder`, chosen by its `config.json`: a v2 save writes
    `quantization_config` (`hf_compress_bitmask`) with `model.safetensors`, a v1 save wrote neither and
    `model.compressed.safetensors`. The config is written by the same save as the weights, and it is what
    `from_pretrained` and `pipeline()` read too, so every loader takes the same file: a v1
    `model.compressed.safetensors` left beside a v2 save by an older hf_compress (which merged saves into the
    folder) is the older model and is ignored, with a warning naming it.

    Raises:
        `FileNotFoundError`: no bitmask checkpoint in `folder`, or the file its config names is missing.
    """
    v1, v2 = os.path.join(folder, WEIGHTS_NAME), os.path.join(folder, SAFE_WEIGHTS_NAME)
    if _bitmask_config(folder) is not None:
        if not os.path.isfile(v2):
            raise FileNotFoundError(f"{folder}/config.json names a v2 bitmask checkpoint but {SAFE_WEIGHTS_NAME} is "
                                    "missing; save it again with `save_compressed(model, dir)`.")
        if os.path.isfile(v1):
            logger.warning("Ignoring %s: a v1 file from an older save; config.json names %s (v2), which is loaded. "
                           "Delete the v1 file.", v1, SAFE_WEIGHTS_NAME)
        return v2
    if os.path.isfile(v1):
        return v1
    raise FileNotFoundError(f"No bitmask checkpoint in {folder}; write one with `save_compressed(model, dir)`.")


def load_compressed_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The full (dense) state dict stored in a `model.compressed.safetensors` file."""
    from safetensors import safe_open

    from ..distributed import check_safetensors_file

    check_safetensors_file(path)  # one line naming the file if it is truncated or corrupt
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        version = meta.get("hf_compress_format", meta.get("format"))
        if version not in (FORMAT, FORMAT_V2):
            raise ValueError(f"{path} is not a {FORMAT_V2} file (format={version!r}); save it with `save_compressed`.")
        layout, aliases = json.loads(meta["sparse"]), json.loads(meta["aliases"])
        raw = {k: f.get_tensor(k) for k in f.keys()}
    values_key, bits_key = ("{}.__values", "{}.__bits") if version == FORMAT else ("{}", "{}_bitmask")
    packed = {values_key.format(n) for n in layout} | {bits_key.format(n) for n in layout}
    # clone: fresh, aligned memory, as from_pretrained gives (kernels may take another path on unaligned data)
    state = {k: v.clone() for k, v in raw.items() if k not in packed}
    for name, info in layout.items():
        values = raw[values_key.format(name)]
        nz = unpack_bool(raw[bits_key.format(name)], info["shape"])
        dense = torch.zeros(info["shape"], dtype=values.dtype)
        dense[nz] = values
        state[name] = dense
    for alias, name in aliases.items():
        state[alias] = state[name]
    return state


def load_compressed(model_dir: str, model_class=None):
    """
    Rebuild a model saved with `save_compressed`, bit-identical to the saved weights. The weights file is the one
    `config.json` names ([`bitmask_weights_file`]), the one `from_pretrained` reads as well.

    Args:
        model_dir (`str`): the folder written by `save_compressed`.
        model_class (*optional*): a `PreTrainedModel` class (e.g. `AutoModelForSequenceClassification` or
            `BertForSequenceClassification`); defaults to `config.architectures[0]`.

    Returns:
        The model, in eval mode.
    """
    import transformers
    from transformers import AutoConfig

    path = bitmask_weights_file(model_dir)  # v2 or v1 as config.json says; never an older file beside it
    config = AutoConfig.from_pretrained(model_dir)
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config  # the model is rebuilt dense
    if model_class is None:
        arch = (config.architectures or [None])[0]
        model_class = getattr(transformers, arch, None) if arch else None
        if model_class is None:
            raise ValueError(f"config.architectures={config.architectures} names no transformers class; pass `model_class`.")
    state = load_compressed_state_dict(path)
    if hasattr(model_class, "from_config"):  # Auto classes
        model = model_class.from_config(config)
    else:
        model = model_class(config)
    model.load_state_dict(state, strict=True, assign=True)
    if hasattr(model, "tie_weights") and _has_aliases(state):
        model.tie_weights()
    return model.eval()


def _has_aliases(state: dict[str, torch.Tensor]) -> bool:
    ptrs = [t.data_ptr() for t in state.values() if t.numel()]
    return len(ptrs) != len(set(ptrs))


class BitmaskFormat(CheckpointFormat):
    """`--format bitmask`: pruned weights as their nonzero values plus a bitmask, loaded back dense and bit-identical
    ([`save_compressed`], [`load_compressed`])."""

    name = "bitmask"
    own_loader = "load_compressed"

    @classmethod
    def detect(cls, folder, config: dict) -> bool:
        qc = config.get("quantization_config") or {}
        return bool(folder and is_bitmask_checkpoint(folder)) or qc.get("quant_method") == QUANT_METHOD

    def save(self, model, tokenizer, folder: str, args=None, task: str | None = None) -> dict:
        info = save_compressed(model, folder, tokenizer=tokenizer)
        return {"format": "bitmask", **{k: v for k, v in info.items() if isinstance(v, (int, float, str))}}

    def load(self, folder: str, **kwargs):
        return load_compressed(folder, **kwargs)

    def export(self, model, tokenizer, folder: str, args=None, task: str | None = None):
        result, info, _ = super().export(model, tokenizer, folder, args, task)
        return result, info, "Saved in the bitmask format (from_pretrained reads it once hf_compress is imported)."

    def plain_loaders(self, low_bit_embeddings: bool = False) -> dict:
        return {"from_pretrained": True, "pipeline": True, "needs_hf_compress": True, "needs": []}

    def vllm_support(self, folder: str, config: dict) -> dict:
        return {**super().vllm_support(folder, config), "serves": False,
                "why": "`hf_compress_bitmask` is hf_compress' own format; vLLM has no loader for it."}

    def card_note(self, report: dict, folder, low_bit_embeddings: bool) -> str:
        return ("Bitmask format (nonzero values + a bitmask, smaller on disk): `from_pretrained` and `pipeline()` read it "
                "after `import hf_compress`; without hf_compress they stop with a size-mismatch error. "
                "For sharing where size is not the point, the dense save (`save_pretrained`) loads everywhere.")

    def _snippet_head(self) -> str:
        return "import hf_compress  # registers the bitmask format with transformers' from_pretrained\n"
