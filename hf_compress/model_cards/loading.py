"""Which loaders read a checkpoint folder, and the card's "how to load" code for it.

`checkpoint_format(folder)` names the format from the files and `config.json`; `check_loaders(folder, ...)` actually
loads the folder with each loader that could apply (plain `from_pretrained`, `pipeline()`, hf_compress' own loader)
and records which worked and how far their logits are from the reference; `usage_snippet` is the card's code.
"""

from __future__ import annotations

import json
import os

FORMATS = ("dense", "bitmask", "bitsandbytes", "compressed-tensors", "onnx")
_AUTO = (("ForSequenceClassification", "AutoModelForSequenceClassification"), ("ForCausalLM", "AutoModelForCausalLM"),
         ("ForTokenClassification", "AutoModelForTokenClassification"), ("ForQuestionAnswering", "AutoModelForQuestionAnswering"))
_TASKS = {"AutoModelForSequenceClassification": "text-classification", "AutoModelForCausalLM": "text-generation",
          "AutoModelForTokenClassification": "token-classification", "AutoModelForQuestionAnswering": "question-answering"}


def _config(folder) -> dict:
    try:
        with open(os.path.join(folder, "config.json")) as f:
            return json.load(f)
    except (OSError, ValueError, TypeError):
        return {}


def checkpoint_format(folder=None, report: dict | None = None) -> dict:
    """`{"format", "low_bit_embeddings"}` of a checkpoint folder (or, without one, of a compression report)."""
    from ..pruning.compressed import is_bitmask_checkpoint
    from ..quantization.export import EMBEDDINGS_CONFIG_KEY

    config = _config(folder) if folder else {}
    if not config and report is not None:
        config = {"quantization_config": (report.get("quantization") or {}).get("quantization_config")}
    qc = config.get("quantization_config") or {}
    from ..quantization.onnx import is_onnx_checkpoint

    if is_onnx_checkpoint(folder) or (not folder and (report or {}).get("format") == "onnx"):
        return {"format": "onnx", "low_bit_embeddings": False}
    if (folder and is_bitmask_checkpoint(folder)) or qc.get("quant_method") == "hf_compress_bitmask":
        fmt = "bitmask"
    elif qc.get("quant_method") == "compressed-tensors":
        fmt = "compressed-tensors"
    elif qc.get("load_in_8bit") or qc.get("load_in_4bit") or qc.get("quant_method") == "bitsandbytes":
        fmt = "bitsandbytes"
    else:
        fmt = "dense"
    weight_files = ((report or {}).get("size") or {}).get("compressed_weight_files") or []
    low_bit = bool(config.get(EMBEDDINGS_CONFIG_KEY)) or any(f.endswith("quantized_embeddings.safetensors") for f in weight_files)
    return {"format": fmt, "low_bit_embeddings": low_bit}


def auto_class_name(architecture: str | None) -> str:
    for suffix, auto in _AUTO:
        if architecture and architecture.endswith(suffix):
            return auto
    return "AutoModel"


def usage_snippet(report: dict, ref: str, weight_files=(), folder=None) -> str:
    """The card's loading code for the checkpoint at `ref` (a Hub id or a folder)."""
    info = checkpoint_format(folder, report)
    note = "# " + format_note(report, folder) + "\n"
    if info["format"] == "onnx":
        from ..quantization.onnx import usage_snippet as onnx_snippet

        return note + onnx_snippet(ref, report)
    auto = auto_class_name(report.get("architecture"))
    task = _TASKS.get(auto)
    tail = f'\nclassifier = pipeline("{task}", model=model, tokenizer=tokenizer)' if task else ""
    if info["format"] == "bitsandbytes" and info["low_bit_embeddings"]:
        # Plain from_pretrained stops on the embedding sentinel (loudly); load_quantized restores the 8/4-bit tables.
        return note + (f"from hf_compress.quantization import load_quantized\nfrom transformers import AutoTokenizer, pipeline\n\n"
                f"model = load_quantized({ref!r})  # restores the 8/4-bit embeddings\n"
                f"tokenizer = AutoTokenizer.from_pretrained({ref!r}){tail}")
    head = ""
    if info["format"] == "bitmask":
        head = "import hf_compress  # registers the bitmask format with transformers' from_pretrained\n"
    elif info["format"] == "compressed-tensors":
        head = "# needs `pip install compressed-tensors` (not hf_compress)\n"
    return note + (f"{head}from transformers import {auto}, AutoTokenizer, pipeline\n\n"
            f"model = {auto}.from_pretrained({ref!r})\n"
            f"tokenizer = AutoTokenizer.from_pretrained({ref!r}){tail}")


def format_note(report: dict, folder=None) -> str:
    """One sentence for the card: the format and who can load it."""
    info = checkpoint_format(folder, report)
    if info["format"] == "onnx":
        from ..quantization.onnx import describe_export

        return describe_export(report)
    return {
        "dense": "Dense safetensors: loads anywhere transformers runs.",
        "bitmask": ("Bitmask format (nonzero values + a bitmask, smaller on disk): `from_pretrained` and `pipeline()` read it "
                    "after `import hf_compress`; without hf_compress they stop with a size-mismatch error. "
                    "For sharing where size is not the point, the dense save (`save_pretrained`) loads everywhere."),
        "compressed-tensors": ("compressed-tensors `pack-quantized` int weights: plain `from_pretrained`, `pipeline()` and "
                               "vLLM load it with `compressed-tensors` installed; hf_compress is not needed."),
        "bitsandbytes": ("bitsandbytes weights: `from_pretrained` loads them with bitsandbytes installed"
                         + ("; the low-bit embedding tables need `hf_compress.quantization.load_quantized` (plain "
                            "`from_pretrained` stops with a size-mismatch error)." if info["low_bit_embeddings"] else ".")),
    }[info["format"]]


def python_without_hf_compress() -> list[str]:
    """A command prefix running Python with the installed packages but without hf_compress importable: no site
    processing (so no editable-install hook), site-packages appended by hand; run it with a `cwd` outside the repo."""
    import site
    import sys

    paths = [p for p in site.getsitepackages() if os.path.isdir(p)]
    boot = "import sys; sys.path.extend(%r); sys.argv = sys.argv[1:]; exec(compile(open(sys.argv[0]).read(), sys.argv[0], 'exec'))" % paths
    return [sys.executable, "-S", "-c", boot]


def run_without_hf_compress(code: str, cwd: str, timeout: int = 300):
    """Run `code` in a fresh Python where `import hf_compress` fails (checked first); returns the CompletedProcess."""
    import subprocess
    import tempfile

    guard = ("try:\n    import hf_compress\nexcept ImportError:\n    pass\nelse:\n"
             "    raise SystemExit('hf_compress is importable in the clean interpreter')\n")
    with tempfile.NamedTemporaryFile("w", suffix=".py", dir=cwd, delete=False) as f:
        f.write(guard + code)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP", "PYTHONHOME")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    try:
        return subprocess.run(python_without_hf_compress() + [f.name], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=timeout)
    finally:
        os.unlink(f.name)


def main_logits(output):
    """The logits a loader check compares: `logits`, or start and end logits stacked for extractive QA."""
    import torch

    if getattr(output, "logits", None) is not None:
        return output.logits
    return torch.stack([output.start_logits, output.end_logits], -1)


def check_loaders(folder: str, texts: list[str], reference_logits, atol: float = 1e-4) -> dict:
    """
    Load `folder` with every loader and compare the logits of `texts` (tokenized by the folder's tokenizer) with
    `reference_logits`. Returns `{loader: {"ok": bool, "max_abs_logit_diff" or "error"}}` for
    `from_pretrained (without hf_compress)` (a clean subprocess), `pipeline()` and the hf_compress loader.
    """
    import tempfile

    import torch

    folder = os.path.abspath(folder)
    info = checkpoint_format(folder)
    auto = auto_class_name((_config(folder).get("architectures") or [None])[0])
    ref = torch.as_tensor(reference_logits, dtype=torch.float32)
    out = {}

    def compare(logits):
        diff = float((torch.as_tensor(logits, dtype=torch.float32) - ref).abs().max())
        return {"ok": diff <= atol, "max_abs_logit_diff": diff}

    if info["format"] == "onnx":  # no torch weights in the folder: the graph is what users run
        return {"onnxruntime.InferenceSession (without hf_compress)": _check_onnx(folder, texts, compare)}
    code = (f"import json, torch, transformers\nfrom transformers import AutoTokenizer\n"
            f"tok = AutoTokenizer.from_pretrained({folder!r})\n"
            f"try:\n    m = transformers.{auto}.from_pretrained({folder!r}).eval()\n"
            f"    with torch.no_grad():\n        o = m(**tok({texts!r}, padding=True, return_tensors='pt'))\n"
            f"    l = o.logits if getattr(o, 'logits', None) is not None else torch.stack([o.start_logits, o.end_logits], -1)\n"
            f"    print('RESULT', json.dumps({{'logits': l.tolist()}}))\n"
            f"except Exception as e:\n    print('RESULT', json.dumps({{'error': type(e).__name__ + ': ' + str(e).splitlines()[0][:200]}}))\n")
    with tempfile.TemporaryDirectory() as cwd:
        proc = run_without_hf_compress(code, cwd)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    result = json.loads(line[7:]) if line else {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]}
    key = "from_pretrained (without hf_compress)"
    out[key] = compare(result["logits"]) if "logits" in result else {"ok": False, "error": result["error"]}

    from transformers import AutoTokenizer, pipeline

    tok = AutoTokenizer.from_pretrained(folder)
    task = _TASKS.get(auto)
    if task is not None:
        try:
            pipe = pipeline(task, model=folder, tokenizer=tok)
            with torch.no_grad():
                logits = main_logits(pipe.model(**tok(texts, padding=True, return_tensors="pt")))
            out["pipeline()"] = compare(logits)
        except Exception as err:  # the expected loud errors are recorded, not raised
            out["pipeline()"] = {"ok": False, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
    if info["format"] in ("bitmask", "bitsandbytes"):
        from ..hub.push import load_checkpoint

        name = "load_compressed" if info["format"] == "bitmask" else "load_quantized"
        model = load_checkpoint(folder)
        with torch.no_grad():
            out[name] = compare(main_logits(model(**tok(texts, padding=True, return_tensors="pt"))))
    return out


def _check_onnx(folder: str, texts: list[str], compare) -> dict:
    """The `--format onnx` folder read as the card says (tokenizer + `onnxruntime.InferenceSession`), in a clean
    interpreter without hf_compress; the graph's inputs and outputs come from the graph itself."""
    import tempfile

    import torch

    code = (f"import json, os, numpy as np, onnxruntime\nfrom transformers import AutoTokenizer\n"
            f"tok = AutoTokenizer.from_pretrained({folder!r})\n"
            f"s = onnxruntime.InferenceSession(os.path.join({folder!r}, 'model.onnx'), providers=['CPUExecutionProvider'])\n"
            f"b = tok({texts!r}, padding=True, truncation=True, return_tensors='np')\n"
            f"outs = s.run(None, {{i.name: b[i.name].astype('int64') for i in s.get_inputs()}})\n"
            f"l = outs[0] if len(outs) == 1 else np.stack(outs, -1)\n"
            f"print('RESULT', json.dumps({{'logits': l.tolist()}}))\n")
    with tempfile.TemporaryDirectory() as cwd:
        proc = run_without_hf_compress(code, cwd)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        return {"ok": False, "error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]}
    return compare(torch.tensor(json.loads(line[7:])["logits"]))
