"""Quantization glue for any `transformers.Trainer`: export at the end, fake quantization near the end."""

from __future__ import annotations

from typing import Callable

from transformers import TrainerCallback

from ..quantization.config import QuantizationArguments


class QuantizationCallback(TrainerCallback):
    r"""
    At the end of training, quantize the model with bitsandbytes and save it with [`quantize_and_save`] (on the
    world process zero only), then optionally evaluate the quantized model.

    Args:
        quantization_args ([`QuantizationArguments`]): Bits, data type, embeddings, modules kept in full precision.
        output_dir (`str`): Folder of the quantized checkpoint.
        eval_fn (`Callable[[PreTrainedModel], dict]`, *optional*):
            Called with the reloaded quantized model; its returned metrics are stored under `"eval"` in
            `export_info`.

    After training, `export_info` holds the dict returned by [`quantize_and_save`] (plus `"eval"`).
    """

    def __init__(self, quantization_args: QuantizationArguments, output_dir: str, eval_fn: Callable | None = None):
        if not isinstance(quantization_args, QuantizationArguments):
            raise TypeError(f"quantization_args must be a `QuantizationArguments`, got {type(quantization_args).__name__}.")
        from ..quantization.backends import get_backend

        # Fail at construction, not after hours of training.
        get_backend(quantization_args.backend).require(quantization_args.bits)
        self.quantization_args = quantization_args
        self.output_dir = str(output_dir)
        self.eval_fn = eval_fn
        self.export_info: dict | None = None

    def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if not state.is_world_process_zero or model is None:
            return
        from ..quantization.export import load_quantized, quantize_and_save

        info = quantize_and_save(model, self.output_dir, self.quantization_args, tokenizer=processing_class)
        if self.eval_fn is not None:
            info["eval"] = self.eval_fn(load_quantized(self.output_dir, model_class=type(model)))
        self.export_info = info


class QATCallback(TrainerCallback):
    r"""
    Quantization-aware fine-tuning: over the last `qat_fraction` of the optimizer steps, the weights that the
    export will quantize ([`quantization_targets`]) are replaced in the forward pass by exactly what the export will
    compute ([`BnbFakeQuantize`] parametrizations, in 8-bit also LLM.int8's activation quantization; or, with
    `backend="compressed-tensors"`, [`IntFakeQuantize`], a tied input embedding and the `lm_head` that reads it
    included), while the gradient reaches the full-precision weights unchanged (straight-through estimator). At the
    end of training the fake quantizers are removed; exporting then gives the fake-quantized model's logits.

    Args:
        quantization_args ([`QuantizationArguments`]): The export settings to train for, and `qat_fraction`.
        remove_at_end (`bool`, *optional*, defaults to `True`): Remove the fake quantizers in `on_train_end`.
    """

    def __init__(self, quantization_args: QuantizationArguments, remove_at_end: bool = True):
        if not isinstance(quantization_args, QuantizationArguments):
            raise TypeError(f"quantization_args must be a `QuantizationArguments`, got {type(quantization_args).__name__}.")
        self.quantization_args = quantization_args
        self.remove_at_end = remove_at_end
        self.start_step: int | None = None
        self.num_fake_quantized = 0

    @staticmethod
    def start_step_for(max_steps: int, fraction: float) -> int:
        """First optimizer step trained with fake quantization: the last `fraction` of `max_steps`."""
        return max(0, min(max_steps - 1, int(round(max_steps * (1.0 - fraction)))))

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.start_step = self.start_step_for(state.max_steps, self.quantization_args.qat_fraction)
        if model is not None and self.quantization_args.backend == "compressed-tensors":
            from ..architectures import check_compressed_tensors

            check_compressed_tensors(model)  # before the first step, not when fake quantization starts

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if model is None or self.num_fake_quantized or state.global_step < self.start_step:
            return
        from ..quantization.qat import attach_fake_quant
        from ..quantization.targets import quantization_targets

        linears, embeddings = quantization_targets(model, self.quantization_args)
        self.num_fake_quantized = attach_fake_quant(model, self.quantization_args, linears, embeddings)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.remove_at_end and model is not None:
            from ..quantization.qat import remove_fake_quant

            remove_fake_quant(model)
