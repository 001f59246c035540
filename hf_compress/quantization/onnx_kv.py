"""The causal-LM graph of `--format onnx`: one graph with a KV cache for prefill and decode, and its greedy loop.

Inputs and outputs carry the names optimum and onnxruntime-genai use, so code written for their decoder graphs drives
it: `input_ids` `[batch, sequence]`, `attention_mask` `[batch, past + sequence]`, `position_ids` `[batch, sequence]`
(every family we export takes it) and `past_key_values.{i}.key` / `.value` `[batch, kv_heads, past, head_dim]` in;
`logits` `[batch, sequence, vocab]` and `present.{i}.key` / `.value` `[batch, kv_heads, past + sequence, head_dim]` out.
`past` may be 0: the same graph runs the prompt (prefill) and each new token (decode).

The graph is traced (TorchScript exporter, as the encoder graphs) through [`CachedLM`], which rebuilds a
`transformers.DynamicCache` from the flat past tensors. The cache is built without the model's config, so every layer
is a full `DynamicLayer`: a sliding-window layer (Gemma 2 / 3) keeps its whole past and the window is applied by the
attention mask that transformers builds for that layer, which gives the same logits as the model's own cropped
cache (checked at export by [`kv_max_diff`], on a prompt longer than the tiny models' window) and keeps one cache
shape for every layer. The trace is taken with a non-empty past: `DynamicLayer.get_seq_length` returns a constant 0 for
an empty one, a Python branch the trace would freeze.

[`onnx_generate`] and [`full_sequence_feed`] use numpy only: their source is pasted into the model card and into the
loaders check, which run without torch models or hf_compress.
"""

from __future__ import annotations

import inspect

import torch

PAST = "past_key_values.{}.{}"
PRESENT = "present.{}.{}"
# Shapes traced (batch, past, new tokens) and probed: the probe differs in each, covers an empty past (prefill), a
# prompt longer than the tiny configs' sliding window (8) and two decode steps fed the graph's own `present`.
TRACED = (2, 5, 3)
PROBE_BATCH, PROBE_PROMPT, PROBE_DECODE_STEPS = 3, 11, 2


class CachedLM(torch.nn.Module):
    """The traced function: token inputs and the flat past in, `logits` and the flat present out."""

    def __init__(self, model, token_inputs, num_layers: int):
        super().__init__()
        self.model, self.token_inputs, self.num_layers = model, list(token_inputs), num_layers

    def forward(self, *inputs):
        from transformers import DynamicCache

        kwargs = dict(zip(self.token_inputs, inputs))
        flat = inputs[len(self.token_inputs):]
        cache = DynamicCache(ddp_cache_data=[(flat[2 * i], flat[2 * i + 1]) for i in range(self.num_layers)])
        out = self.model(**kwargs, cache=cache, use_cache=True)
        present = [t for layer in out.cache.layers for t in (layer.keys, layer.values)]
        return (out.logits, *present)


def cache_geometry(model) -> dict:
    """`num_layers`, `kv_heads`, `head_dim` and the dtype of the model's KV cache, read from one forward step (the
    configs name them differently: `n_head`, `num_key_value_heads`, `head_dim` or none)."""
    with torch.no_grad():
        cache = model(input_ids=torch.ones(1, 1, dtype=torch.long), use_cache=True).cache
    keys = cache.layers[0].keys
    shapes = {tuple(layer.keys.shape[1::2]) for layer in cache.layers}
    if len(shapes) != 1:
        raise ValueError(f"`--format onnx` writes one KV-cache shape for every layer; `{type(model).__name__}` has "
                         f"{sorted(shapes)} (heads, head_dim). Use `--format compressed-tensors` for this model.")
    return {"num_layers": len(cache.layers), "kv_heads": keys.shape[1], "head_dim": keys.shape[3], "dtype": keys.dtype}


def graph_names(token_inputs, num_layers: int) -> tuple[list[str], list[str], dict]:
    """(input names, output names, dynamic axes) of the KV-cache graph."""
    past = [PAST.format(i, t) for i in range(num_layers) for t in ("key", "value")]
    present = [PRESENT.format(i, t) for i in range(num_layers) for t in ("key", "value")]
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "position_ids": {0: "batch", 1: "sequence"},
            "attention_mask": {0: "batch", 1: "total_sequence"}, "logits": {0: "batch", 1: "sequence"}}
    axes = {n: a for n, a in axes.items() if n in token_inputs or n == "logits"}
    axes.update({n: {0: "batch", 2: "past_sequence"} for n in past})
    axes.update({n: {0: "batch", 2: "total_sequence"} for n in present})
    return list(token_inputs) + past, ["logits"] + present, axes


def token_inputs(model) -> list[str]:
    """The token inputs of the graph: `input_ids`, `attention_mask`, and `position_ids` when the model takes it."""
    params = inspect.signature(model.forward).parameters
    return ["input_ids", "attention_mask"] + (["position_ids"] if "position_ids" in params else [])


def _random_step(geometry, names, batch, past, new, vocab, seed) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    values = {"input_ids": torch.randint(3, max(4, min(vocab, 1000)), (batch, new), generator=g),
              "attention_mask": torch.ones(batch, past + new, dtype=torch.long),
              "position_ids": torch.arange(past, past + new).expand(batch, new).contiguous()}
    shape = (batch, geometry["kv_heads"], past, geometry["head_dim"])
    kv = [torch.randn(shape, generator=g).to(geometry["dtype"]) for _ in range(2 * geometry["num_layers"])]
    return [values[n] for n in names] + kv


def export_kv_graph(model, path: str, opset: int) -> dict:
    """Trace `model` (a causal LM, eval mode) through [`CachedLM`] into the ONNX file `path`; returns the graph's
    `inputs`, `outputs`, `token_inputs` and the cache geometry."""
    geometry = cache_geometry(model)
    names = token_inputs(model)
    inputs, outputs, axes = graph_names(names, geometry["num_layers"])
    wrapper = CachedLM(model, names, geometry["num_layers"]).eval()
    batch, past, new = TRACED
    example = _random_step(geometry, names, batch, past, new, model.get_input_embeddings().num_embeddings, seed=0)
    with torch.no_grad():
        torch.onnx.export(wrapper, tuple(example), path, input_names=inputs, output_names=outputs, dynamic_axes=axes,
                          opset_version=opset, dynamo=False, training=torch.onnx.TrainingMode.EVAL)
    return {"inputs": inputs, "outputs": outputs, "token_inputs": names, "num_layers": geometry["num_layers"],
            "kv_heads": int(geometry["kv_heads"]), "head_dim": int(geometry["head_dim"])}


def probe_steps(vocab_size: int, seed: int = 1) -> list[dict]:
    """The check's calls: a left-padded prompt batch (row 1 starts 3 tokens late), then `PROBE_DECODE_STEPS` single
    tokens; each a dict of `input_ids`, the full `attention_mask` and `position_ids` (counted over the real tokens, as
    `generate` does)."""
    g = torch.Generator().manual_seed(seed)
    length = PROBE_PROMPT + PROBE_DECODE_STEPS
    ids = torch.randint(3, max(4, min(vocab_size, 1000)), (PROBE_BATCH, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    steps, start = [], 0
    for end in [PROBE_PROMPT] + list(range(PROBE_PROMPT + 1, length + 1)):
        steps.append({"input_ids": ids[:, start:end], "attention_mask": mask[:, :end],
                      "position_ids": positions[:, start:end], "real": mask[:, start:end].bool()})
        start = end
    return steps


def reference_logits(model, steps, names) -> list[torch.Tensor]:
    """The in-memory model on the probe steps with its own cache (`DynamicCache` from its config, cropped for
    sliding-window layers): the logits the graph must reproduce."""
    out, cache = [], None
    with torch.no_grad():
        for step in steps:
            result = model(**{n: step[n] for n in names}, cache=cache, use_cache=True)
            cache = result.cache
            out.append(result.logits.float())
    return out


def kv_max_diff(path: str, steps, names, reference, geometry: dict) -> float:
    """Max |logit difference| of the graph at `path` against `reference` over the probe steps, each step fed the
    `present` the graph returned at the step before (real tokens only: a padded query position has no defined
    output)."""
    import numpy as np
    import onnxruntime as ort

    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    inputs, outputs, _ = graph_names(names, geometry["num_layers"])
    shape = (PROBE_BATCH, geometry["kv_heads"], 0, geometry["head_dim"])
    past = {n: np.zeros(shape, np.float32) for n in inputs[len(names):]}
    worst = 0.0
    for step, ref in zip(steps, reference):
        got = sess.run(outputs, {**{n: step[n].numpy() for n in names}, **past})
        past = dict(zip(past, got[1:]))
        real = step["real"]
        worst = max(worst, float((torch.from_numpy(got[0])[real] - ref[real]).abs().max()))
    return worst


def full_sequence_feed(session, batch):
    """The feed of one call over whole sequences without a past (what an encoder graph is fed): `batch`'s numpy
    `input_ids` / `attention_mask` (and `token_type_ids`), `position_ids` 0, 1, ... and empty past tensors for a
    KV-cache graph."""
    import numpy as np

    ids = batch["input_ids"].astype("int64")
    feed = {}
    for i in session.get_inputs():
        if i.name in batch:
            feed[i.name] = batch[i.name].astype("int64")
        elif i.name == "position_ids":
            feed[i.name] = np.broadcast_to(np.arange(ids.shape[1], dtype="int64"), ids.shape).copy()
        elif i.name.startswith("past_key_values."):
            feed[i.name] = np.zeros((ids.shape[0], i.shape[1], 0, i.shape[3]), dtype="float32")
        else:  # a call without a mask or segment ids
            feed[i.name] = np.zeros_like(ids) if i.name == "token_type_ids" else np.ones_like(ids)
    return feed


def onnx_generate(session, tokenizer, prompt, max_new_tokens=32, eos_token_id=None):
    """Greedy decoding with the KV-cache graph: the prompt (a text, or a list of token ids) in one call, then one
    token per call fed the `present` tensors back as `past_key_values`. Returns the new token ids (ending with the
    eos token if one was generated; `eos_token_id=-1` never stops early)."""
    import numpy as np

    names = [i.name for i in session.get_inputs()]
    eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    ids = tokenizer(prompt, return_tensors="np")["input_ids"] if isinstance(prompt, str) else np.array([prompt])
    ids = ids.astype("int64")
    past = {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), dtype="float32")
            for i in session.get_inputs() if i.name.startswith("past_key_values.")}
    outputs = ["logits"] + [name.replace("past_key_values.", "present.") for name in past]
    new, seen = [], 0
    while len(new) < max_new_tokens:
        feed = {"input_ids": ids, "attention_mask": np.ones((1, seen + ids.shape[1]), dtype="int64"), **past}
        if "position_ids" in names:
            feed["position_ids"] = np.arange(seen, seen + ids.shape[1], dtype="int64")[None]
        logits, *present = session.run(outputs, feed)
        seen += ids.shape[1]
        past = dict(zip(past, present))
        token = int(logits[0, -1].argmax())
        new.append(token)
        if token == eos:
            break
        ids = np.array([[token]], dtype="int64")
    return new
