"""Which loaders read a checkpoint folder, and the card's "how to load" code for it.

`checkpoint_format(folder)` names the format from the files and `config.json`; `check_loaders(folder, ...)` actually
loads the folder with each loader that could apply (plain `from_pretrained`, `pipeline()`, hf_compress' own loader)
and records which worked and how far their logits are from the reference; `usage_snippet` is the card's code.
"""

from __future__ import annotations

import os

from ..formats import FORMATS, get_format
from ..formats.base import read_config
from ..tasks import task_of_class
from .clean_interpreter import RESULT_TENSORS, modeling_modules, run_result_without_hf_compress


def checkpoint_format(folder=None, report: dict | None = None) -> dict:
    """`{"format", "low_bit_embeddings"}` of a checkpoint folder (or, without one, of a compression report), as the
    format table recognises it ([`hf_compress.formats.detect_format`])."""
    from ..formats import detect_format, get_format

    config = read_config(folder) if folder else {}
    if not config and report is not None:
        config = {"quantization_config": (report.get("quantization") or {}).get("quantization_config")}
    if not folder and (report or {}).get("format") == "onnx":  # a graph has no config.json entry to recognise it by
        fmt = get_format("onnx")
    else:
        fmt = detect_format(folder, config)
    return {"format": fmt.name, "low_bit_embeddings": fmt.low_bit_embeddings(config, report)}


def usage_snippet(report: dict, ref: str, weight_files=(), folder=None) -> str:
    """The card's loading code for the checkpoint at `ref` (a Hub id or a folder)."""
    from ..formats import get_format

    info = checkpoint_format(folder, report)
    note = "# " + format_note(report, folder) + "\n"
    return note + get_format(info["format"]).usage_snippet(ref, report, info["low_bit_embeddings"])


def format_note(report: dict, folder=None) -> str:
    """One sentence for the card: the format and who can load it."""
    from ..formats import get_format

    info = checkpoint_format(folder, report)
    return get_format(info["format"]).card_note(report, folder, info["low_bit_embeddings"])


def vllm_support(folder: str) -> dict:
    """
    Whether vLLM serves the checkpoint in `folder`, from what was read in vLLM's code ([`VLLM_SOURCE`]):
    `{"serves": True | False | None, "why": str, "source": str}`; `None` is "not established" (not read or not run),
    never assumed either way. The format answers ([`CheckpointFormat.vllm_support`]).
    """
    from ..formats import detect_format

    config = read_config(folder)
    return detect_format(folder, config).vllm_support(folder, config)


def serving_engines(folder: str, loaders: dict | None = None) -> dict:
    """
    The engines the folder is for, each `{"serves": True | False | None, "why", "source"}`: transformers from the
    loaders check (measured by loading the folder), vLLM from its code as read ([`vllm_support`]).
    """
    engines = {}
    if loaders:
        plain = {k: v for k, v in loaders.items() if k in PLAIN_LOADERS}
        ok = bool(plain) and all(v["ok"] for v in plain.values())
        own = [k for k in loaders if k not in PLAIN_LOADERS and loaders[k]["ok"]]
        why = ("plain `from_pretrained` and `pipeline()` load it and reproduce the trained model's logits" if ok else
               "plain loaders: " + "; ".join(f"{k} {v.get('status', 'error')}" for k, v in plain.items()))
        if own:
            why += "; " + ", ".join(f"`{k}`" for k in own) + " reproduces them"
        engines["transformers"] = {"serves": ok or bool(own), "why": why + ".", "source": "checked by loading the written folder"}
    engines["vLLM"] = vllm_support(folder)
    return engines


def main_logits(output):
    """The logits a loader check compares: `logits`, or start and end logits stacked for extractive QA."""
    import torch

    if getattr(output, "logits", None) is not None:
        return output.logits
    return torch.stack([output.start_logits, output.end_logits], -1)


# Max |logit difference| allowed between a loader's output and the trained in-memory model, relative to the logit
# scale: each format's `relative_logit_tolerance` and `logit_tolerance` (hf_compress.formats), where each value says
# what bounds it. This table is read from the format classes.
RELATIVE_LOGIT_TOLERANCE = {name: cls.relative_logit_tolerance for name, cls in FORMATS.items()}
PLAIN_LOADERS = ("from_pretrained (without hf_compress)", "pipeline()")


def logit_tolerance(fmt: str, loader: str, logit_scale: float, bits: int | None = None, dtype=None) -> float:
    """The absolute logit tolerance of `loader` reading a `fmt` checkpoint of a model whose logits come in `dtype`:
    the format's relative tolerance ([`CheckpointFormat.logit_tolerance`]) times the logit scale `max(1, logit_scale)`."""
    return get_format(fmt).logit_tolerance(loader in PLAIN_LOADERS, bits, dtype) * max(1.0, float(logit_scale))


def check_loaders(folder: str, texts: list[str], reference_logits, atol: float | None = None) -> dict:
    """
    Load `folder` with every loader and compare the logits of `texts` (tokenized by the folder's tokenizer) with
    `reference_logits` (in the model's dtype, which sets the tolerance of 16-bit bitsandbytes models), which should come from the trained in-memory model (under the export's fake quantization
    when the folder is quantized): what the written files must reproduce.

    Returns `{loader: {...}}` for `from_pretrained (without hf_compress)` (a clean subprocess), `pipeline()` and the
    hf_compress loader: `ok`, `status` (`match`; `mismatch`, the failure that matters: it loads and computes something
    else; or `error`, a loud refusal), `max_abs_logit_diff` and `tolerance` (`atol`, or [`logit_tolerance`] of the
    folder's format), or `error`.
    """

    import torch

    from ..formats import detect_format

    folder = os.path.abspath(folder)
    config = read_config(folder)
    fmt = detect_format(folder, config)
    task = task_of_class((config.get("architectures") or [None])[0])
    auto = task.auto_class if task is not None else "AutoModel"
    dtype = reference_logits.dtype if isinstance(reference_logits, torch.Tensor) else torch.float32
    ref = torch.as_tensor(reference_logits, dtype=torch.float32)
    scale = float(ref.abs().max()) if ref.numel() else 1.0
    bits = fmt.bits(folder, config)
    out = {}

    def compare(logits, loader):
        tol = atol if atol is not None else logit_tolerance(fmt.name, loader, scale, bits, dtype)
        logits = torch.as_tensor(logits, dtype=torch.float32)
        if logits.shape != ref.shape:
            return {"ok": False, "status": "mismatch", "error": f"logits of shape {list(logits.shape)}, expected {list(ref.shape)}",
                    "tolerance": tol}
        diff = float((logits - ref).abs().max())
        ok = diff <= tol  # NaN compares False: a failure
        return {"ok": ok, "status": "match" if ok else "mismatch", "max_abs_logit_diff": diff, "tolerance": tol}

    if fmt.graph_runtime:  # no torch weights in the folder (ONNX): the graph is what users run
        return {fmt.graph_runtime: _check_onnx(folder, texts, compare)}
    code = (f"import json, torch, transformers\nfrom transformers import AutoTokenizer\n"
            f"tok = AutoTokenizer.from_pretrained({folder!r})\n"
            f"try:\n    m = transformers.{auto}.from_pretrained({folder!r}).eval()\n"
            f"    with torch.no_grad():\n        o = m(**tok({texts!r}, padding=True, truncation=True, return_tensors='pt'))\n"
            f"    l = o.logits if getattr(o, 'logits', None) is not None else torch.stack([o.start_logits, o.end_logits], -1)\n"
            f"    from safetensors.torch import save_file\n"
            f"    save_file({{'logits': l.float().contiguous()}}, {RESULT_TENSORS!r})\n"
            f"    print('RESULT', json.dumps({{'tensors_file': {RESULT_TENSORS!r}}}))\n"
            f"except Exception as e:\n    print('RESULT', json.dumps({{'error': type(e).__name__ + ': ' + str(e).splitlines()[0][:200]}}))\n")
    result = run_result_without_hf_compress(code, preload=modeling_modules(config))
    key = "from_pretrained (without hf_compress)"
    out[key] = compare(result["logits"], key) if "logits" in result else {"ok": False, "status": "error", "error": result["error"]}

    from transformers import AutoTokenizer, pipeline

    tok = AutoTokenizer.from_pretrained(folder)
    if task is not None:
        try:
            # The same right-padded batch as the other loaders, made before `pipeline()` can change the tokenizer
            # it is given (text-generation turns it to left padding).
            inputs = tok(texts, padding=True, truncation=True, return_tensors="pt")
            pipe = pipeline(task.pipeline_tag, model=folder, tokenizer=tok)
            with torch.no_grad():
                logits = main_logits(pipe.model(**inputs))
            out["pipeline()"] = compare(logits, "pipeline()")
        except Exception as err:  # the expected loud errors are recorded, not raised
            out["pipeline()"] = {"ok": False, "status": "error", "error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
    if fmt.own_loader is not None:  # hf_compress' loader of the format (`load_compressed`, `load_quantized`)
        model = fmt.load(folder)
        with torch.no_grad():
            out[fmt.own_loader] = compare(main_logits(model(**tok(texts, padding=True, truncation=True, return_tensors="pt"))),
                                          fmt.own_loader)
    return out


def _check_onnx(folder: str, texts: list[str], compare) -> dict:
    """The `--format onnx` folder read as the card says (tokenizer + `onnxruntime.InferenceSession`), in a clean
    interpreter without hf_compress; the graph's inputs and outputs come from the graph itself (a KV-cache graph is
    fed an empty past and positions 0, 1, ... by `full_sequence_feed`, whose numpy-only source is pasted in)."""
    import inspect

    import torch

    from ..quantization.onnx_kv import full_sequence_feed

    code = (f"import json, os, numpy as np, onnxruntime\nfrom transformers import AutoTokenizer\n\n"
            f"{inspect.getsource(full_sequence_feed)}\n\n"
            f"tok = AutoTokenizer.from_pretrained({folder!r})\n"
            f"s = onnxruntime.InferenceSession(os.path.join({folder!r}, 'model.onnx'), providers=['CPUExecutionProvider'])\n"
            f"b = tok({texts!r}, padding=True, truncation=True, return_tensors='np')\n"
            f"names = [o.name for o in s.get_outputs() if not o.name.startswith('present.')]\n"
            f"outs = s.run(names, full_sequence_feed(s, dict(b)))\n"
            f"l = outs[0] if len(outs) == 1 else np.stack(outs, -1)\n"
            f"from safetensors.numpy import save_file\n"
            f"save_file({{'logits': np.ascontiguousarray(l, dtype=np.float32)}}, {RESULT_TENSORS!r})\n"
            f"print('RESULT', json.dumps({{'tensors_file': {RESULT_TENSORS!r}}}))\n")
    result = run_result_without_hf_compress(code)
    if "logits" not in result:
        return {"ok": False, "error": result["error"]}
    return compare(torch.as_tensor(result["logits"]), "onnxruntime.InferenceSession (without hf_compress)")
