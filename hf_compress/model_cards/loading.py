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


# vLLM's code as read for the serving claims (not run: no vLLM is installed here). Its Llama builds the input
# embedding as `VocabParallelEmbedding(vocab_size, hidden_size, org_num_embeddings=...)`, with no quant config and no
# prefix, and a tied head as `self.lm_head.weight = self.model.embed_tokens.weight` (vllm/model_executor/models/llama.py
# at commit 0035bdf2b1ac243ef6f31eef27411b022461df8e), so a checkpoint whose `embed_tokens` is stored as
# `weight_packed` / `weight_scale` has no parameter to load into. Its compressed-tensors WNA16 scheme runs int4 / int8
# weights (`WNA16_SUPPORTED_BITS = [4, 8]`, schemes/compressed_tensors_wNa16.py) on the Marlin kernels:
# `MARLIN_SUPPORTED_GROUP_SIZES = [-1, 32, 64, 128]` (-1: one scale per row) and, per tensor-parallel shard,
# out_features % 64 == 0 and in_features % 128 == 0 (`GPTQ_MARLIN_MIN_THREAD_N`, `GPTQ_MARLIN_MIN_THREAD_K`,
# vllm/model_executor/layers/quantization/utils/marlin_utils.py at commit 007d50058a06dec0f82472d63c819244d460c40d).
VLLM_SOURCE = ("vLLM source read (not run): models/llama.py @ 0035bdf2, quantization/compressed_tensors/schemes/"
               "compressed_tensors_wNa16.py, quantization/utils/marlin_utils.py @ 007d5005")
VLLM_ARCHITECTURES_READ = ("LlamaForCausalLM",)
MARLIN_MIN_OUT, MARLIN_MIN_IN = 64, 128


_EMBEDDING_NAMES = ("embed_tokens", "word_embeddings", "wte", "wpe", "position_embeddings", "token_type_embeddings",
                    "embed_positions")


def _export_info(folder: str) -> dict:
    from ..quantization.export import REPORT_FILE

    try:
        with open(os.path.join(folder, REPORT_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def vllm_support(folder: str) -> dict:
    """
    Whether vLLM serves the checkpoint in `folder`, from what was read in vLLM's code ([`VLLM_SOURCE`]):
    `{"serves": True | False | None, "why": str, "source": str}`; `None` is "not established" (not read or not run),
    never assumed either way.
    """
    from ..quantization.config import VLLM_GROUP_SIZES
    from .files import describe_stored

    fmt = checkpoint_format(folder)
    config = _config(folder)
    arch = (config.get("architectures") or [None])[0]
    out = {"source": VLLM_SOURCE}
    if fmt["format"] == "bitmask":
        return {**out, "serves": False, "why": "`hf_compress_bitmask` is hf_compress' own format; vLLM has no loader for it."}
    if fmt["format"] == "bitsandbytes" and fmt["low_bit_embeddings"]:
        return {**out, "serves": False, "why": "the low-bit embedding tables sit in `quantized_embeddings.safetensors`, "
                                              "hf_compress' own file, behind empty sentinels in `model.safetensors`."}
    if fmt["format"] != "compressed-tensors":
        return {**out, "serves": None, "why": f"not checked: vLLM's loader for {fmt['format']} checkpoints was not read or run here."}
    qc = config.get("quantization_config") or {}
    stored = describe_stored(folder)
    packed = {n: m for n, m in stored["modules"].items() if "shape" in m}
    embeddings = set(_export_info(folder).get("quantized_embeddings") or ())
    embeddings |= {n for n in packed if n.rsplit(".", 1)[-1] in _EMBEDDING_NAMES}
    if embeddings & set(packed):
        name = sorted(embeddings & set(packed))[0]
        return {**out, "serves": False, "why": f"the input embedding is stored quantized (`{name}.weight_packed`): vLLM's "
                "Llama builds its embedding without a quantization config, so those weights have nowhere to load, and a "
                "tied `lm_head` reads the embedding's `weight`. Export without `--quantize_embeddings` for vLLM."}
    for group in (qc.get("config_groups") or {}).values():
        w = group.get("weights") or {}
        if w.get("num_bits") not in (4, 8) or not w.get("symmetric", False):
            return {**out, "serves": False, "why": f"{w.get('num_bits')}-bit {'symmetric' if w.get('symmetric') else 'asymmetric'} "
                    "weights: vLLM's WNA16 scheme runs symmetric 4 and 8 bits."}
        if w.get("group_size") not in VLLM_GROUP_SIZES:
            return {**out, "serves": False, "why": f"group_size {w.get('group_size')}: vLLM's Marlin kernels run "
                    + ", ".join("per-channel" if g is None else str(g) for g in VLLM_GROUP_SIZES) + "."}
    bad = sorted(n for n, m in packed.items() if m["shape"][0] % MARLIN_MIN_OUT or m["shape"][1] % MARLIN_MIN_IN)
    if bad:
        return {**out, "serves": None, "why": f"not established: {len(bad)} quantized layers (e.g. `{bad[0]}`) miss Marlin's "
                f"shape rule (out % {MARLIN_MIN_OUT}, in % {MARLIN_MIN_IN}); vLLM may choose another kernel, not read here."}
    if arch not in VLLM_ARCHITECTURES_READ:
        return {**out, "serves": None, "why": f"the format is one vLLM's WNA16 scheme runs; its `{arch}` model code was not read here."}
    return {**out, "serves": True, "why": "Linear-only pack-quantized int weights with a group size and layer shapes vLLM's "
            "WNA16 / Marlin path runs, embedding and `lm_head` in 16-bit (read in vLLM's code, not run here)."}


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


def run_result_without_hf_compress(code: str, timeout: int = 300) -> dict:
    """Run `code` in a fresh interpreter without hf_compress (a temporary cwd) and return the JSON it printed on its
    `RESULT ` line, or `{"error": <the last line of stderr>}` when it printed none."""
    import tempfile

    with tempfile.TemporaryDirectory() as cwd:
        proc = run_without_hf_compress(code, cwd, timeout=timeout)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    return json.loads(line[7:]) if line else {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]}


def main_logits(output):
    """The logits a loader check compares: `logits`, or start and end logits stacked for extractive QA."""
    import torch

    if getattr(output, "logits", None) is not None:
        return output.logits
    return torch.stack([output.start_logits, output.end_logits], -1)


# Max |logit difference| allowed between a loader's output and the trained in-memory model (under the export's fake
# quantization when quantized), relative to the logit scale `max(1, max |reference logit|)`. What bounds each:
# - dense, bitmask: the same float weights through the same kernels; only float reassociation differs (1e-5).
# - compressed-tensors: the loader dequantizes to exactly the weights `IntFakeQuantize` computes (bit for bit,
#   tested), then runs the same float forward (1e-5).
# - bitsandbytes through `load_quantized`: the float32 reference path that `BnbFakeQuantize` replays op for op; LLM.int8
#   rounds activations to int8 per row at run time, so a one-ulp float difference upstream can move an activation one
#   int8 step (1e-4).
# - bitsandbytes 4-bit through plain `from_pretrained` / `pipeline()`: those may take bitsandbytes' AVX512-BF16 CPU
#   kernel, which rounds activations and block scales to bfloat16 (8-bit mantissa, 2^-8 ~ 4e-3 per product,
#   accumulated over a layer stack), so 2e-2; 8-bit through them runs the same LLM.int8 kernels (1e-4).
# - bitsandbytes in a bf16 / fp16 model: the replay and bitsandbytes' kernels round the 16-bit activations at different
#   points (LLM.int8 casts them to float16 first), so they differ by a few units in the last place of the model's
#   dtype: at least 2 x its machine epsilon (bf16: 1.6e-2, fp16: 2e-3; 3.9e-3 measured on a tiny bf16 Llama).
RELATIVE_LOGIT_TOLERANCE = {"dense": 1e-5, "bitmask": 1e-5, "compressed-tensors": 1e-5, "bitsandbytes": 1e-4,
                            "onnx": 1e-4}
# ONNX Runtime's dynamic int8 rounds every activation per tensor at run time (`DynamicQuantizeLinear`), which no
# replay of the weights reproduces: the graph is held to 5% of the logit scale against the unquantized trained
# model (measured on the tiny family models: at most 6.6e-3 absolute for encoders, 0.14 for decoders).
ONNX_INT8_TOLERANCE = 5e-2
BNB_4BIT_BF16_KERNEL_TOLERANCE = 2e-2
PLAIN_LOADERS = ("from_pretrained (without hf_compress)", "pipeline()")


def logit_tolerance(fmt: str, loader: str, logit_scale: float, bits: int | None = None, dtype=None) -> float:
    """The absolute logit tolerance of `loader` reading a `fmt` checkpoint of a model whose logits come in `dtype`
    ([`RELATIVE_LOGIT_TOLERANCE`] times the logit scale `max(1, logit_scale)`)."""
    import torch

    relative = RELATIVE_LOGIT_TOLERANCE[fmt]
    if fmt == "bitsandbytes" and bits == 4 and loader in PLAIN_LOADERS:
        relative = BNB_4BIT_BF16_KERNEL_TOLERANCE
    if fmt == "onnx" and bits == 8:
        relative = ONNX_INT8_TOLERANCE
    if fmt == "bitsandbytes" and dtype in (torch.bfloat16, torch.float16):
        relative = max(relative, 2 * torch.finfo(dtype).eps)
    return relative * max(1.0, float(logit_scale))


def _bits(folder: str) -> int | None:
    from ..quantization.onnx import is_onnx_checkpoint, op_counts

    if is_onnx_checkpoint(folder):
        return 8 if op_counts(os.path.join(folder, "model.onnx"))["int8_ops"] else None
    qc = _config(folder).get("quantization_config") or {}
    return 4 if qc.get("load_in_4bit") else 8 if qc.get("load_in_8bit") else None


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

    folder = os.path.abspath(folder)
    info = checkpoint_format(folder)
    auto = auto_class_name((_config(folder).get("architectures") or [None])[0])
    dtype = reference_logits.dtype if isinstance(reference_logits, torch.Tensor) else torch.float32
    ref = torch.as_tensor(reference_logits, dtype=torch.float32)
    scale = float(ref.abs().max()) if ref.numel() else 1.0
    bits = _bits(folder)
    out = {}

    def compare(logits, loader):
        tol = atol if atol is not None else logit_tolerance(info["format"], loader, scale, bits, dtype)
        logits = torch.as_tensor(logits, dtype=torch.float32)
        if logits.shape != ref.shape:
            return {"ok": False, "status": "mismatch", "error": f"logits of shape {list(logits.shape)}, expected {list(ref.shape)}",
                    "tolerance": tol}
        diff = float((logits - ref).abs().max())
        ok = diff <= tol  # NaN compares False: a failure
        return {"ok": ok, "status": "match" if ok else "mismatch", "max_abs_logit_diff": diff, "tolerance": tol}

    if info["format"] == "onnx":  # no torch weights in the folder: the graph is what users run
        return {"onnxruntime.InferenceSession (without hf_compress)": _check_onnx(folder, texts, compare)}
    code = (f"import json, torch, transformers\nfrom transformers import AutoTokenizer\n"
            f"tok = AutoTokenizer.from_pretrained({folder!r})\n"
            f"try:\n    m = transformers.{auto}.from_pretrained({folder!r}).eval()\n"
            f"    with torch.no_grad():\n        o = m(**tok({texts!r}, padding=True, truncation=True, return_tensors='pt'))\n"
            f"    l = o.logits if getattr(o, 'logits', None) is not None else torch.stack([o.start_logits, o.end_logits], -1)\n"
            f"    print('RESULT', json.dumps({{'logits': l.tolist()}}))\n"
            f"except Exception as e:\n    print('RESULT', json.dumps({{'error': type(e).__name__ + ': ' + str(e).splitlines()[0][:200]}}))\n")
    result = run_result_without_hf_compress(code)
    key = "from_pretrained (without hf_compress)"
    out[key] = compare(result["logits"], key) if "logits" in result else {"ok": False, "status": "error", "error": result["error"]}

    from transformers import AutoTokenizer, pipeline

    tok = AutoTokenizer.from_pretrained(folder)
    task = _TASKS.get(auto)
    if task is not None:
        try:
            # The same right-padded batch as the other loaders, made before `pipeline()` can change the tokenizer
            # it is given (text-generation turns it to left padding).
            inputs = tok(texts, padding=True, truncation=True, return_tensors="pt")
            pipe = pipeline(task, model=folder, tokenizer=tok)
            with torch.no_grad():
                logits = main_logits(pipe.model(**inputs))
            out["pipeline()"] = compare(logits, "pipeline()")
        except Exception as err:  # the expected loud errors are recorded, not raised
            out["pipeline()"] = {"ok": False, "status": "error", "error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
    if info["format"] in ("bitmask", "bitsandbytes"):
        from ..hub.push import load_checkpoint

        name = "load_compressed" if info["format"] == "bitmask" else "load_quantized"
        model = load_checkpoint(folder)
        with torch.no_grad():
            out[name] = compare(main_logits(model(**tok(texts, padding=True, truncation=True, return_tensors="pt"))), name)
    return out


def _check_onnx(folder: str, texts: list[str], compare) -> dict:
    """The `--format onnx` folder read as the card says (tokenizer + `onnxruntime.InferenceSession`), in a clean
    interpreter without hf_compress; the graph's inputs and outputs come from the graph itself."""

    import torch

    code = (f"import json, os, numpy as np, onnxruntime\nfrom transformers import AutoTokenizer\n"
            f"tok = AutoTokenizer.from_pretrained({folder!r})\n"
            f"s = onnxruntime.InferenceSession(os.path.join({folder!r}, 'model.onnx'), providers=['CPUExecutionProvider'])\n"
            f"b = tok({texts!r}, padding=True, truncation=True, return_tensors='np')\n"
            f"outs = s.run(None, {{i.name: b[i.name].astype('int64') for i in s.get_inputs()}})\n"
            f"l = outs[0] if len(outs) == 1 else np.stack(outs, -1)\n"
            f"print('RESULT', json.dumps({{'logits': l.tolist()}}))\n")
    result = run_result_without_hf_compress(code)
    if "logits" not in result:
        return {"ok": False, "error": result["error"]}
    return compare(torch.tensor(result["logits"]), "onnxruntime.InferenceSession (without hf_compress)")
