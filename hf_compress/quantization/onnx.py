"""`--format onnx`: the trained model as an ONNX Runtime graph (fp32, or dynamic int8), checked against the model.

The graph is written with the TorchScript exporter (`torch.onnx.export(..., dynamo=False)`, opset 17) and, when
quantizing, converted by `onnxruntime.quantization.quantize_dynamic` (int8 weights per tensor, activations quantized
per tensor at run time by `DynamicQuantizeLinear`, matrix products in `MatMulInteger`). It is our own small exporter:
optimum-onnx does not install with our transformers pin. Covered: the encoder tasks (`logits`, or `start_logits` /
`end_logits` for extractive QA) and causal LMs as one graph with a KV cache for prefill and decode ([`onnx_kv`]:
`past_key_values.{i}.key/value` in, `logits` and `present.{i}.key/value` out, the optimum / onnxruntime-genai names),
checked on a padded prompt and decode steps. With `--bits 4` the fp32 graph is rewritten to weight-only int4 on our compressed-tensors
grid (`MatMulNBits`, [`onnx_int4`]), which QAT replays exactly. Nothing here imports onnx or onnxruntime at import
time.
"""

from __future__ import annotations

import collections
import inspect
import os
import tempfile

import torch

from ..tasks import TASKS, get_task

ONNX_FILE = "model.onnx"
OPSET = 17
# The fp32 graph must reproduce the trained model within this times max(1, max |logit|) on a probe of another shape
# than the traced one (a traced branch that depends on the shape would show here); int8 differences are recorded,
# not bounded.
FP32_ATOL = 1e-4
# Tasks and the graph outputs they get: each task's distilled outputs (`Task.logit_layout.outputs`).
OUTPUTS = {name: get_task(name).logit_layout.outputs for name in TASKS}
# Model types whose fp32 graph matched the model within `FP32_ATOL` on the tiny configs of tests/family_configs.py
# (every head transformers has); others are refused before training rather than exported unchecked. Refused
# after that check: cohere (a traced reshape keeps the traced head count), qwen3_moe (`aten::histc` has no ONNX op).
ONNX_MODEL_TYPES = ("bert", "roberta", "llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "gpt2",
                    "gpt_neox", "olmo2", "stablelm", "deberta-v2")
INT8_OPS = ("MatMulInteger", "DynamicQuantizeLinear", "DequantizeLinear", "QuantizeLinear", "ConvInteger")
FLOAT_MATMUL_OPS = ("MatMul", "Gemm", "FusedMatMul")


def onnx_refusal(model_type: str | None, task: str, quantize: bool, bits: int, qat: bool, train: bool,
                 group_size: int | None = None, backend: str | None = None, config=None) -> str | None:
    """
    Why `--format onnx` cannot make this model exactly, in one line (`None` when it can): a pure function of the
    config values, so [`prepare`] refuses before any data is read or any step is trained. `bits=4` is the int4 graph
    of [`onnx_int4`]: `group_size`, `backend` and the model `config`'s widths decide whether it can be written.
    """
    if task not in OUTPUTS:
        return f"`--format onnx` exports {', '.join(OUTPUTS)}, not {task!r}; use `--format compressed-tensors`."
    if model_type not in ONNX_MODEL_TYPES:
        return (f"`--format onnx` is checked for model types {', '.join(ONNX_MODEL_TYPES)}, not {model_type!r}; use "
                "`--format compressed-tensors` (or `dense`) for this model.")
    if quantize and bits == 4:  # exact int4 weights: QAT replays them, so it is allowed
        from .onnx_int4 import int4_refusal

        reason = int4_refusal(model_type, group_size, backend, config)
        if reason is not None:
            return reason
    elif quantize and bits != 8:
        return (f"`--format onnx` quantizes with ONNX Runtime's dynamic int8 or to our int4 grid, got `--bits {bits}`; "
                "pass `--bits 8` or `--bits 4`.")
    if quantize and bits == 8 and qat and train:
        return ("`--format onnx` int8 rounds activations per tensor at run time (`DynamicQuantizeLinear`), which QAT does "
                "not replay, so QAT would train for other numerics; pass `--no_qat`, or `--format compressed-tensors` to "
                "train with QAT.")
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return "`--format onnx` needs onnx and onnxruntime: `pip install 'hf_compress[onnx]'`."
    return None


class _Graph(torch.nn.Module):
    """The traced function of an encoder task: named tensor inputs in, the task's output tensors out (no
    `ModelOutput`). A causal LM is traced with its cache by [`onnx_kv.CachedLM`] instead."""

    def __init__(self, model, input_names, output_names):
        super().__init__()
        self.model, self.input_names, self.output_names = model, list(input_names), list(output_names)

    def forward(self, *inputs):
        out = self.model(**dict(zip(self.input_names, inputs)))
        return tuple(out[name] for name in self.output_names)


def graph_inputs(model, tokenizer) -> list[str]:
    """The tokenizer's inputs the model takes (`input_ids`, `attention_mask`, and `token_type_ids` where it has them)."""
    params = inspect.signature(model.forward).parameters
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in params]
    return [n for n in names if n == "input_ids" or n in tokenizer.model_input_names]


def _probe(vocab_size: int, names, batch: int, length: int, seed: int) -> dict:
    """Token ids with a padded row (so the graph must use the mask), other shapes than those traced."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, max(4, min(vocab_size, 1000)), (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, length // 2:] = 0
    values = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    return {n: values[n] for n in names}


def _logit_scale(reference: list[torch.Tensor]) -> float:
    """`max(1, max |logit|)` over the reference outputs: the scale the fp32 and int4 checks' bounds are relative to."""
    return max(1.0, max(float(r.abs().max()) for r in reference))


def _stack(outputs) -> torch.Tensor:
    return outputs[0] if len(outputs) == 1 else torch.stack(list(outputs), -1)


def op_counts(path: str) -> dict:
    """Node types of an ONNX graph: the int8 ones (`MatMulInteger`, `DynamicQuantizeLinear`, `QLinear*`, ...), the
    float matrix products left (`MatMul`/`Gemm`), and the int8 weight tensors."""
    import onnx

    graph = onnx.load(path, load_external_data=False).graph
    ops = collections.Counter(n.op_type for n in graph.node)
    int8 = {op: c for op, c in sorted(ops.items()) if op in INT8_OPS or op.startswith("QLinear")}
    floats = {op: c for op, c in sorted(ops.items()) if op in FLOAT_MATMUL_OPS}
    int4 = {op: c for op, c in sorted(ops.items()) if op in ("MatMulNBits", "GatherBlockQuantized")}
    packed = {i for n in graph.node if n.op_type in int4 for i in n.input}  # uint8-packed int4, not int8
    int8_weights = sum(1 for t in graph.initializer if t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
                       and len(t.dims) >= 2 and t.name not in packed)
    counts = {"int8_ops": int8, "float_matmul_ops": floats, "int8_weight_tensors": int8_weights}
    return {**counts, "int4_ops": int4} if int4 else counts


def graph_bits(counts: dict) -> int | None:
    """The integer width a graph with these [`op_counts`] computes its quantized products in: `4` (`MatMulNBits`),
    `8` (`MatMulInteger`, `QLinear*`), `None` for an fp32 graph."""
    return 4 if counts.get("int4_ops") else 8 if counts.get("int8_ops") else None


class _EncoderExport:
    """The encoder tasks' graph (no cache): traced on one probe, checked on another of other shapes."""

    def __init__(self, model, tokenizer, task: str, path: str):
        layout = get_task(task).logit_layout
        self.inputs, self.outputs = graph_inputs(model, tokenizer), list(layout.outputs)
        self.vocab = model.get_input_embeddings().num_embeddings
        traced = _probe(self.vocab, self.inputs, batch=2, length=8, seed=0)
        axes = {n: {0: "batch", 1: "sequence"} for n in self.inputs}
        axes.update({n: ({0: "batch", 1: "sequence"} if layout.per_position else {0: "batch"}) for n in self.outputs})
        with torch.no_grad():
            torch.onnx.export(_Graph(model, self.inputs, self.outputs).eval(),
                              tuple(traced[n] for n in self.inputs), path, input_names=self.inputs,
                              output_names=self.outputs, dynamic_axes=axes, opset_version=OPSET, dynamo=False,
                              training=torch.onnx.TrainingMode.EVAL)
        self.probe = _probe(self.vocab, self.inputs, batch=3, length=11, seed=1)
        self.info = {"inputs": self.inputs, "outputs": self.outputs, "kv_cache": False}

    def reference(self, model) -> list[torch.Tensor]:
        """The model's outputs on the probe, stacked (one call: a one-element list, as the causal graph's steps)."""
        with torch.no_grad():
            return [_stack(_Graph(model, self.inputs, self.outputs)(*(self.probe[n] for n in self.inputs))).float()]

    def diff(self, path: str, reference: list[torch.Tensor]) -> float:
        import onnxruntime as ort

        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        got = sess.run(self.outputs, {n: self.probe[n].numpy() for n in self.inputs})
        return float((_stack([torch.from_numpy(g) for g in got]) - reference[0]).abs().max())


class _CausalExport:
    """A causal LM's graph with its KV cache ([`onnx_kv`]), checked on a padded prefill and decode steps."""

    def __init__(self, model, tokenizer, task: str, path: str):
        from . import onnx_kv

        self.kv = onnx_kv
        self.info = {**onnx_kv.export_kv_graph(model, path, OPSET), "kv_cache": True}
        self.names = self.info.pop("token_inputs")
        self.steps = onnx_kv.probe_steps(model.get_input_embeddings().num_embeddings)

    def reference(self, model) -> list[torch.Tensor]:
        return self.kv.reference_logits(model, self.steps, self.names)

    def diff(self, path: str, reference) -> float:
        return self.kv.kv_max_diff(path, self.steps, self.names, reference, self.info)


def export_onnx(model, folder: str, tokenizer, task: str, quantize: bool, quantize_embeddings: bool = False,
                args=None) -> dict:
    """
    Write `model` as `folder/model.onnx` (the dynamic-int8 graph when `quantize`, else fp32) with its `config.json`
    and tokenizer, and check it against `model` on a probe batch of another shape than the traced one. A causal LM is
    written with its KV cache ([`onnx_kv`]) and checked on a padded prompt and decode steps fed the graph's own
    `present`. int8 covers the `MatMul` weights, and the embedding tables (`Gather`) only with `quantize_embeddings`,
    as the other formats. With `quantize` and `args.bits == 4` (`args`: the [`QuantizationArguments`],
    compressed-tensors, a group size) it is the weight-only int4 graph of [`onnx_int4`], checked against the
    fake-quantized model instead.

    Returns:
        `dict`: `format`, `precision`, the inputs and outputs, `max_abs_logit_diff_fp32` (fp32 graph vs model,
        must be <= `FP32_ATOL`), `max_abs_logit_diff` (the written graph vs model) and the graph's `op_counts`.

    Raises:
        `RuntimeError`: the fp32 graph differs from the model by more than `FP32_ATOL` (nothing is written); int4: the
        graph differs from the fake-quantized model by more than `onnx_int4.RELATIVE_ATOL` of its logit scale.
    """
    import onnxruntime as ort

    int4 = bool(quantize and args is not None and args.bits == 4)
    if int4:  # traced without fake quantizers; the graph must then compute QAT's fake-quantized forward
        from . import onnx_int4

        model, int4_model = onnx_int4.plain_and_reference(model, args)
    model = model.eval()
    kind = _CausalExport if get_task(task).logit_layout.shift_labels else _EncoderExport
    os.makedirs(folder, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".onnx-") as tmp:
        fp32 = os.path.join(tmp, "fp32.onnx")
        graph = kind(model, tokenizer, task, fp32)
        reference = graph.reference(model)
        diff_fp32 = graph.diff(fp32, reference)
        # Relative to the logits' scale (as the loaders check's `relative_logit_tolerance`): fp32 rounding grows with
        # it (SmolLM2-135M, logits up to ~25: 8.8e-5), a traced shape-dependent branch gives differences of order 1.
        logit_scale = _logit_scale(reference)
        fp32_tolerance = FP32_ATOL * logit_scale
        if not diff_fp32 <= fp32_tolerance:
            raise RuntimeError(f"The ONNX graph of `{type(model).__name__}` differs from the model by {diff_fp32:.2e} "
                               f"(> {FP32_ATOL} x max(1, |logit|) = {fp32_tolerance:.2e}); nothing was written. Use "
                               "`--format compressed-tensors` for this model.")
        written, extra = fp32, {}
        if int4:
            written = os.path.join(tmp, "int4.onnx")
            extra = onnx_int4.write_int4(fp32, written, model, args)
            int4_reference = graph.reference(int4_model)
            extra["max_abs_logit_diff_fake_quantized"] = onnx_int4.check_exact(graph.diff(written, int4_reference),
                                                                               _logit_scale(int4_reference))
        elif quantize:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            written = os.path.join(tmp, "int8.onnx")
            ops = ["MatMul", "Gather"] if quantize_embeddings else ["MatMul"]
            quantize_dynamic(fp32, written, weight_type=QuantType.QInt8, op_types_to_quantize=ops)
        precision = "dynamic int8 (weights per tensor, activations per tensor at run time)" if quantize else "fp32"
        info = {"format": "onnx", "task": task, "runtime": f"onnxruntime {ort.__version__}", "opset": OPSET,
                "precision": extra.pop("precision", precision),
                "quantized_embeddings": bool(quantize and quantize_embeddings), **graph.info, "fp32_atol": FP32_ATOL,
                "fp32_tolerance": fp32_tolerance, "logit_scale": logit_scale,
                "max_abs_logit_diff_fp32": diff_fp32, "max_abs_logit_diff": graph.diff(written, reference),
                "op_counts": op_counts(written), **extra}
        model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(written, os.path.join(folder, ONNX_FILE))
        for name in os.listdir(tmp):
            if name not in ("fp32.onnx", "int8.onnx", "int4.onnx"):
                os.replace(os.path.join(tmp, name), os.path.join(folder, name))
    return info


def is_onnx_checkpoint(folder) -> bool:
    return bool(folder) and os.path.isfile(os.path.join(folder, ONNX_FILE))


class OnnxRuntimeModel(torch.nn.Module):
    """
    An ONNX Runtime session behind the `transformers` call convention (`model(**batch)` returns a `ModelOutput`), so
    the pipeline evaluates the graph it wrote, not the torch model. `source` (the torch model the graph came from)
    is kept only for the report's parameter and sparsity counts; it never computes an output.
    """

    def __init__(self, folder: str, source=None):
        super().__init__()
        import onnxruntime as ort

        self.session = ort.InferenceSession(os.path.join(folder, ONNX_FILE), providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        from transformers import AutoConfig

        self.config = AutoConfig.from_pretrained(folder)
        self.architecture_name = (self.config.architectures or [None])[0] or type(source).__name__
        self.source = source
        # `batched_outputs` reads the device from the first parameter; an empty one says CPU and counts nothing.
        self.anchor = torch.nn.Parameter(torch.zeros(0), requires_grad=False)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, **unused):
        # Named like a transformers `forward`: callers pick the columns to pass from this signature; labels and
        # other columns are not graph inputs and are ignored. A KV-cache graph gets an empty past and positions
        # 0, 1, ... (what the model computes without a cache) from `full_sequence_feed`.
        from transformers.modeling_outputs import CausalLMOutput, QuestionAnsweringModelOutput

        from .onnx_kv import full_sequence_feed

        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        feed = full_sequence_feed(self.session, {k: v.detach().cpu().numpy() for k, v in batch.items() if v is not None})
        names = [n for n in self.output_names if not n.startswith("present.")]
        got = dict(zip(names, (torch.from_numpy(o) for o in self.session.run(names, feed))))
        if "start_logits" in got:
            return QuestionAnsweringModelOutput(start_logits=got["start_logits"], end_logits=got["end_logits"])
        return CausalLMOutput(logits=got["logits"])


def load_onnx(folder: str, source=None) -> OnnxRuntimeModel:
    """The `--format onnx` folder as a callable model (see [`OnnxRuntimeModel`])."""
    return OnnxRuntimeModel(folder, source=source).eval()


def export_info(report: dict | None) -> dict:
    """What the export stage recorded (inputs, outputs, op counts, differences) in a pipeline report, or `{}`."""
    return (((report or {}).get("pipeline") or {}).get("stages") or {}).get("export") or {}


def describe_export(report: dict | None) -> str:
    """The card's format sentence: the runtime, the precision, which ops run in int8 and the measured difference."""
    info = export_info(report)
    if info.get("kv_cache"):
        text = (f"ONNX Runtime graph (`model.onnx`) with a KV cache, one graph for the prompt and each new token: inputs "
                f"`{'`, `'.join(n for n in info['inputs'] if not n.startswith('past_'))}` and `past_key_values.{{i}}.key` / "
                f"`.value` ([batch, {info.get('kv_heads')} heads, past, {info.get('head_dim')}], past may be 0; "
                f"{info.get('num_layers')} layers), outputs `logits` and `present.{{i}}.key` / `.value` (the names "
                "optimum and onnxruntime-genai use); load it with `onnxruntime.InferenceSession` and the tokenizer, no "
                "torch or hf_compress needed.")
    else:
        text = ("ONNX Runtime graph (`model.onnx`, each call runs the whole sequence); load it with "
                "`onnxruntime.InferenceSession` and the tokenizer, no torch or hf_compress needed.")
    if not info:
        return text
    counts = info.get("op_counts") or {}
    int8 = ", ".join(f"{c} `{op}`" for op, c in (counts.get("int8_ops") or {}).items()) or "none"
    floats = ", ".join(f"{c} `{op}`" for op, c in (counts.get("float_matmul_ops") or {}).items()) or "none"
    int4 = ", ".join(f"{c} `{op}`" for op, c in (counts.get("int4_ops") or {}).items())
    text += f" Precision: {info.get('precision')}. " + (f"int4 nodes: {int4}" if int4 else f"int8 nodes: {int8}")
    text += f"; float matrix products left: {floats}"
    text += " (the attention products of two activations)." if info.get("precision", "").startswith("dynamic") else "."
    text += (f" Max |logit diff| to the trained model on a probe batch: {info.get('max_abs_logit_diff', float('nan')):.2e}"
             f" (fp32 graph: {info.get('max_abs_logit_diff_fp32', float('nan')):.2e}, tolerance {info.get('fp32_atol')}).")
    return text


def usage_snippet(ref: str, report: dict | None = None) -> str:
    """The card's code: the graph with `onnxruntime.InferenceSession` and the tokenizer, no torch model. A KV-cache
    graph gets the greedy loop [`onnx_kv.onnx_generate`], its source pasted in (numpy and onnxruntime only)."""
    info = export_info(report)
    outputs, inputs = info.get("outputs") or ["logits"], info.get("inputs") or ["input_ids", "attention_mask"]
    head = ("import os\n\nimport onnxruntime\nfrom huggingface_hub import snapshot_download\n"
            "from transformers import AutoTokenizer\n\n"
            f"ref = {ref!r}  # a Hub id or a local folder\n"
            "folder = ref if os.path.isdir(ref) else snapshot_download(ref)\n"
            "tokenizer = AutoTokenizer.from_pretrained(folder)\n"
            f"session = onnxruntime.InferenceSession(os.path.join(folder, {ONNX_FILE!r}), providers=['CPUExecutionProvider'])\n")
    if info.get("kv_cache"):
        from .onnx_kv import onnx_generate

        return (head + "\n\n" + inspect.getsource(onnx_generate) + "\n\n"
                "new_tokens = onnx_generate(session, tokenizer, 'The first words of a text', max_new_tokens=16)\n"
                "print(new_tokens)\nprint(tokenizer.decode(new_tokens))")
    batch = "batch = tokenizer(['A first example.', 'A second, longer example.'], padding=True, return_tensors='np')\n"
    return (head + batch +
            f"{', '.join(outputs)}, = session.run({outputs!r}, {{k: batch[k].astype('int64') for k in {inputs!r}}})\n"
            f"print({outputs[0]}.shape)")
