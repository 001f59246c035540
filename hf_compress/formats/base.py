"""What every checkpoint format answers ([`CheckpointFormat`]), and the small helpers formats, the hub and the card
code share (reading `config.json`, the Auto class of an architecture from the task table, the vLLM source the serving
claims cite)."""

from __future__ import annotations

import json
import os

from ..tasks import task_of_class

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


def read_config(folder) -> dict:
    """`folder/config.json` as a dict, `{}` when there is none (or it is not JSON)."""
    try:
        with open(os.path.join(folder, "config.json")) as f:
            return json.load(f)
    except (OSError, ValueError, TypeError):
        return {}


def auto_class_name(architecture: str | None) -> str:
    """The transformers Auto class that loads `architecture` (`...ForCausalLM`, `GPT2LMHeadModel` ->
    `AutoModelForCausalLM`): its task's `auto_class` ([`hf_compress.tasks.task_of_class`]), `AutoModel` for none."""
    task = task_of_class(architecture)
    return task.auto_class if task is not None else "AutoModel"


def pipeline_snippet(architecture: str | None) -> str:
    """The card snippet's `pipeline()` line for `architecture`'s task (its `pipeline_tag`), or `""` for no task."""
    task = task_of_class(architecture)
    return f'\nclassifier = pipeline("{task.pipeline_tag}", model=model, tokenizer=tokenizer)' if task is not None else ""


def load_with_auto_class(folder: str, **kwargs):
    """`AutoModelFor*.from_pretrained(folder)` for the class named by `config.architectures`, in eval mode."""
    import transformers

    auto = auto_class_name((read_config(folder).get("architectures") or [None])[0])
    return getattr(transformers, auto).from_pretrained(folder, **kwargs).eval()


class CheckpointFormat:
    """
    One checkpoint format (a `--format` value): how to recognise it, write it and read it back, which loaders and
    engines take it, and what the card and report say about it. The table of formats is `formats/__init__.py`
    (`FORMATS`, [`get_format`], [`detect_format`]); callers ask it instead of switching on format names.

    Class attributes:
        name (`str`): the `--format` value and the report's `format`.
        quantized (`bool`): whether the format stores quantized weights (`--format` quantizes).
        own_loader (`str`, *optional*): hf_compress' loader that the loaders check runs besides the plain ones
            (`load_compressed`, `load_quantized`), or `None` when the plain loaders are the whole story.
    """

    name: str = ""
    quantized: bool = False
    own_loader: str | None = None
    # The runtime a folder without torch weights is checked with instead of the transformers loaders (ONNX Runtime).
    graph_runtime: str | None = None
    # Max |logit difference| the loaders check allows between a loader's output and the trained in-memory model (under
    # the export's fake quantization when quantized), relative to the logit scale `max(1, max |reference logit|)`.
    # Dense and bitmask: the same float weights through the same kernels; only float reassociation differs.
    relative_logit_tolerance: float = 1e-5

    # --- recognise, write, read ---------------------------------------------------------------------------------

    @classmethod
    def detect(cls, folder: str | None, config: dict) -> bool:
        """Whether the checkpoint in `folder` (whose `config.json` is `config`; without a folder, a config only)
        is in this format."""
        raise NotImplementedError

    def save(self, model, tokenizer, folder: str, args=None, task: str | None = None) -> dict:
        """Write `model` (and `tokenizer`) to `folder` in this format; `args` is the `QuantizationArguments` when
        quantizing, else `None`. Returns what the export did (the pipeline's `export` stage record)."""
        raise NotImplementedError

    def load(self, folder: str, **kwargs):
        """The model in `folder`, as hf_compress loads it (eval mode)."""
        raise NotImplementedError

    def export(self, model, tokenizer, folder: str, args=None, task: str | None = None) -> tuple[object, dict, str | None]:
        """The pipeline's export stage: [`save`], then `(model as a user reloads it, what the stage did, a log line or
        None)`. The model is what the pipeline then evaluates."""
        from tqdm.auto import tqdm

        with tqdm(total=2, desc=f"Exporting {self.name}", leave=False) as bar:
            info = self.save(model, tokenizer, folder, args, task=task)
            bar.update()
            result = self.load(folder)
            bar.update()
        return result.eval(), info, None

    def bits(self, folder: str, config: dict) -> int | None:
        """The weight bits of the folder where they set the loaders check's tolerance, else `None`."""
        return None

    def logit_tolerance(self, plain_loader: bool, bits: int | None = None, dtype=None) -> float:
        """The loaders check's tolerance for this format, relative to the logit scale: [`relative_logit_tolerance`],
        or what `plain_loader` (plain `from_pretrained` / `pipeline()`), the weight `bits` ([`bits`]) and the model's
        logit `dtype` call for."""
        return self.relative_logit_tolerance

    # --- who loads and serves it --------------------------------------------------------------------------------

    def low_bit_embeddings(self, config: dict, report: dict | None = None) -> bool:
        """Whether embedding tables sit in a file that only hf_compress reads (bitsandbytes' low-bit tables)."""
        return False

    def plain_loaders(self, low_bit_embeddings: bool = False) -> dict:
        """Which plain loaders read it: `{"from_pretrained": bool, "pipeline": bool, "needs_hf_compress": bool,
        "needs": extra pip packages}` (as written in the card; the loaders check measures it)."""
        return {"from_pretrained": True, "pipeline": True, "needs_hf_compress": False, "needs": []}

    def vllm_support(self, folder: str, config: dict) -> dict:
        """Whether vLLM serves the folder, from vLLM's code as read ([`VLLM_SOURCE`]): `{"serves": True | False |
        None, "why", "source"}`, `None` being "not established"."""
        return {"source": VLLM_SOURCE, "serves": None,
                "why": f"not checked: vLLM's loader for {self.name} checkpoints was not read or run here."}

    # --- card and report ------------------------------------------------------------------------------------------

    def card_note(self, report: dict, folder: str | None, low_bit_embeddings: bool) -> str:
        """One sentence for the card: the format and who can load it."""
        raise NotImplementedError

    def usage_snippet(self, ref: str, report: dict, low_bit_embeddings: bool) -> str:
        """The card's loading code for the checkpoint at `ref` (a Hub id or a folder), without the note line."""
        auto = auto_class_name(report.get("architecture"))
        tail = pipeline_snippet(report.get("architecture"))
        return (f"{self._snippet_head()}from transformers import {auto}, AutoTokenizer, pipeline\n\n"
                f"model = {auto}.from_pretrained({ref!r})\n"
                f"tokenizer = AutoTokenizer.from_pretrained({ref!r}){tail}")

    def _snippet_head(self) -> str:
        """Lines the default snippet starts with (an import, a `pip install` comment)."""
        return ""

    def tags(self, summary: dict | None) -> list[str]:
        """Hub tags of the format actually written, from the report's quantization summary; none by default."""
        return []

    def config_bits(self, qconfig: dict) -> list[int]:
        """The weight bits a `quantization_config` of this format names (when no layer or file says it)."""
        return []

    def summary_fields(self, qconfig: dict, bits: list[int], stored_kinds: list[str] | None,
                       layer_types: dict[str, str]) -> dict:
        """The format's own fields of the report's quantization summary: `method`, `quant_type`, `double_quant`,
        `quantized_module_types`, `skip_modules`, and any extra ones. `stored_kinds` are the quantized storage kinds
        read from the files (`None` without files); `layer_types` the bitsandbytes layer classes of the model."""
        return {"method": qconfig.get("quant_method", self.name), "quant_type": None, "double_quant": None,
                "quantized_module_types": sorted(set(layer_types.values())) or sorted(stored_kinds or []),
                "skip_modules": []}


class QuantizedFormat(CheckpointFormat):
    """A format written by a quantization backend ([`~hf_compress.quantization.quantize_and_save`] with
    `QuantizationArguments.backend` = `backend`) and read by [`~hf_compress.quantization.load_quantized`]."""

    quantized = True
    backend: str = ""

    def save(self, model, tokenizer, folder: str, args=None, task: str | None = None, precomputed=None) -> dict:
        from ..quantization.export import quantize_and_save

        if args is None or getattr(args, "backend", None) != self.backend:
            got = "no QuantizationArguments" if args is None else f"backend={getattr(args, 'backend', None)!r}"
            raise ValueError(f"`--format {self.name}` writes `QuantizationArguments(backend={self.backend!r})`, got {got}; "
                             f"pass `QuantizationArguments(backend={self.backend!r}, ...)`.")
        return quantize_and_save(model, folder, args, tokenizer=tokenizer, precomputed=precomputed)

    def load(self, folder: str, **kwargs):
        from ..quantization.export import load_quantized

        return load_quantized(folder, **kwargs)

    def evaluation_load_kwargs(self) -> dict:
        """Extra `load_quantized` arguments for the model the pipeline evaluates after the export."""
        return {}

    def export(self, model, tokenizer, folder: str, args=None, task: str | None = None, precomputed=None):
        """As [`CheckpointFormat.export`]; `precomputed`: GPTQ's integers and scales, stored as they are."""
        import warnings

        from tqdm.auto import tqdm

        with tqdm(total=2, desc=f"Exporting {args.bits}-bit", leave=False) as bar:
            info = self.save(model, tokenizer, folder, args, task=task, precomputed=precomputed)
            bar.update()
            # Evaluate what was written, reloaded the way a user loads it (low-bit embeddings need `load_quantized`).
            with warnings.catch_warnings():  # "loading attributes (['dequantize', ...]) will be overwritten": asked for
                warnings.filterwarnings("ignore", message="You passed `quantization_config`")
                result = self.load(folder, **self.evaluation_load_kwargs())
            bar.update()
        return result.eval(), info, f"Exported {args.bits}-bit weights ({args.backend})."
