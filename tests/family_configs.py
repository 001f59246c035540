"""Tiny configs of every model family hf_compress supports (hidden 64, 2 layers, vocabulary 128), shared by the
family test matrices. Norm weights and biases are randomised by `build`, so a wrong formula cannot hide behind
ones and zeros."""

from __future__ import annotations

import torch

VOCAB = 128
_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
_DECODER = dict(
    vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=128, max_position_embeddings=64, tie_word_embeddings=False, **_IDS,
)
_ENCODER = dict(
    vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
    max_position_embeddings=66, type_vocab_size=2, **_IDS,
)

# family -> (config class, kwargs); the model type is the config's.
FAMILIES = {
    "llama": ("LlamaConfig", _DECODER),
    "mistral": ("MistralConfig", {**_DECODER, "sliding_window": None}),
    "qwen2": ("Qwen2Config", {**_DECODER, "tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", {**_DECODER, "head_dim": 16}),
    "gemma2": ("Gemma2Config", {**_DECODER, "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 8,
                                "tie_word_embeddings": True}),
    "gemma3_text": ("Gemma3TextConfig", {**_DECODER, "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 8,
                                         "tie_word_embeddings": True}),
    "phi3": ("Phi3Config", {**_DECODER, "original_max_position_embeddings": 64}),
    "gpt2": ("GPT2Config", dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, **_IDS)),
    "gpt_neox": ("GPTNeoXConfig", dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=128, max_position_embeddings=64, rotary_pct=0.5, **_IDS)),
    "olmo2": ("Olmo2Config", _DECODER),
    "stablelm": ("StableLmConfig", {**_DECODER, "partial_rotary_factor": 0.5, "use_qkv_bias": True}),
    "cohere": ("CohereConfig", {**_DECODER, "tie_word_embeddings": True}),
    "qwen3_moe": ("Qwen3MoeConfig", {**_DECODER, "head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2,
                                     "moe_intermediate_size": 32, "decoder_sparse_step": 1}),
    "bert": ("BertConfig", _ENCODER),
    "roberta": ("RobertaConfig", _ENCODER),
    "deberta_v2": ("DebertaV2Config", {**_ENCODER, "relative_attention": True, "position_buckets": 16,
                                       "pos_att_type": ["p2c", "c2p"], "max_relative_positions": 32}),
}
ENCODERS = ("bert", "roberta", "deberta_v2")
HEADS = ("causal-lm", "seq-cls", "token-cls", "qa")


def config_of(family: str, **kw):
    import transformers

    cls, base = FAMILIES[family]
    return getattr(transformers, cls)(**{**base, "num_labels": 3, **kw})


def model_class(family: str, head: str):
    """The transformers class of `family` with `head`, or `None` where transformers has none."""
    import transformers
    from transformers.models.auto import modeling_auto as auto

    table = {
        "causal-lm": auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        "seq-cls": auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
        "token-cls": auto.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES,
        "qa": auto.MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES,
    }[head]
    name = table.get(config_of(family).model_type)
    if family in ENCODERS and head == "causal-lm":
        return None  # an encoder's LM head (`...ForCausalLM` as a decoder) is not a head people compress
    return getattr(transformers, name) if name else None


def randomise(model, seed: int = 0):
    """Random norm weights and biases (and everything else left at a constant by `_init_weights`)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if "norm" in name.lower() else 0.0))
            elif p.ndim == 3:  # stacked experts are left uninitialised (empty) by some versions
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def build(family: str, head: str = None, seed: int = 0, **kw):
    head = head or default_head(family)
    if head == "qa":
        kw = {"num_labels": 2, **kw}  # start and end logits
    torch.manual_seed(seed)
    return randomise(model_class(family, head)(config_of(family, **kw)).eval(), seed)


def default_head(family: str) -> str:
    return "seq-cls" if family in ENCODERS else "causal-lm"
