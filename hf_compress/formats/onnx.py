"""`--format onnx`: an ONNX Runtime graph (fp32, dynamic int8, or weight-only int4 on the compressed-tensors grid).

The exporter, its check and the ONNX Runtime model stay in [`hf_compress.quantization.onnx`] (the `prepare` stage asks
it for `onnx_refusal` before training, and benchmarks call `export_onnx` directly); this class is the format's entry in
the registry and only wraps it.
"""

from __future__ import annotations

import os

from .base import CheckpointFormat

class OnnxFormat(CheckpointFormat):
    """`model.onnx` with `config.json` and the tokenizer; no torch weights, read with `onnxruntime.InferenceSession`."""

    name = "onnx"
    graph_runtime = "onnxruntime.InferenceSession (without hf_compress)"
    # The bound of the export's own fp32 check (`FP32_ATOL`). fp32 and int4 graphs are compared with the trained
    # (fake-quantized) model; a dynamic-int8 graph, whose run-time activation rounding has no replay, with the graph
    # the run evaluated in process (`pipeline.report.check_loaders`), so one bound holds for all three.
    relative_logit_tolerance = 1e-4

    @classmethod
    def detect(cls, folder, config: dict) -> bool:
        from ..quantization.onnx import is_onnx_checkpoint

        return is_onnx_checkpoint(folder)

    def save(self, model, tokenizer, folder: str, args=None, task: str | None = None) -> dict:
        from ..quantization.onnx import export_onnx

        return export_onnx(model, folder, tokenizer, task, quantize=args is not None,
                           quantize_embeddings=bool(args is not None and args.quantize_embeddings), args=args)

    def load(self, folder: str, source=None, **kwargs):
        from ..quantization.onnx import load_onnx

        return load_onnx(folder, source=source)

    def export(self, model, tokenizer, folder: str, args=None, task: str | None = None):
        info = self.save(model, tokenizer, folder, args, task=task)
        message = (f"Exported an ONNX Runtime graph ({info['precision']}); max |logit diff| to the trained model "
                   f"{info['max_abs_logit_diff']:.2e}.")
        return self.load(folder, source=model.eval()), info, message  # evaluated through onnxruntime, as users run it

    def bits(self, folder: str, config: dict) -> int | None:
        from ..quantization.onnx import ONNX_FILE, graph_bits, op_counts

        return graph_bits(op_counts(os.path.join(folder, ONNX_FILE)))

    def plain_loaders(self, low_bit_embeddings: bool = False) -> dict:
        return {"from_pretrained": False, "pipeline": False, "needs_hf_compress": False, "needs": ["onnxruntime"]}

    def card_note(self, report: dict, folder, low_bit_embeddings: bool) -> str:
        from ..quantization.onnx import describe_export

        return describe_export(report)

    def usage_snippet(self, ref: str, report: dict, low_bit_embeddings: bool) -> str:
        from ..quantization.onnx import usage_snippet

        return usage_snippet(ref, report)
