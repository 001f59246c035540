"""Unstructured pruning, 2:4, compressed-tensors int4 export and QAT over every supported family (issue #19).

One parametrized table: tiny configs (hidden 64, 2 layers, vocabulary 128, random norm weights and biases) of each
family x {50 % per-matrix, 50 % global, 2:4, int4 export + reload == QAT}. Each cell is exact (sparsity counted per
matrix and per fused part, logits compared) or refused before any work with the pinned message.
"""

from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

from family_configs import ENCODERS, FAMILIES, HEADS, VOCAB, build, default_head, model_class
from hf_compress.architectures import compressed_tensors_refusal, weight_layout, weight_layouts
from hf_compress.callbacks import GradualPruningCallback
from hf_compress.pruning import default_targets, load_compressed, magnitude_masks, save_compressed, sparsity_stats
from hf_compress.quantization import QuantizationArguments, attach_fake_quant, quantization_targets, quantize_and_save
from hf_compress.quantization.numerics import fake_quantize_int

FAMILY_LIST = list(FAMILIES)
# The block projections of each family, by module path below the block index (what `default_targets` must find).
BLOCK_PROJECTIONS = {
    **{f: {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj"}
       for f in ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "olmo2", "stablelm", "cohere")},
    "phi3": {"self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"},
    "gpt2": {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"},
    "gpt_neox": {"attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"},
    "qwen3_moe": {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.experts.gate_up_proj", "mlp.experts.down_proj"},
    **{f: {"attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
           "intermediate.dense", "output.dense"} for f in ("bert", "roberta")},
    "deberta_v2": {"attention.self.query_proj", "attention.self.key_proj", "attention.self.value_proj",
                   "attention.self.pos_key_proj", "attention.self.pos_query_proj", "attention.output.dense",
                   "intermediate.dense", "output.dense"},
}
FUSED = {  # family -> {module leaf: parts}
    "phi3": {"qkv_proj": ["q", "k", "v"], "gate_up_proj": ["gate", "up"]},
    "gpt2": {"c_attn": ["q", "k", "v"]},
    "gpt_neox": {"query_key_value": ["q", "k", "v"]},
}
REFUSED_CT = {
    "gpt2": "The compressed-tensors export cannot quantize a `gpt2` model: its block projections are "
            "`transformers.pytorch_utils.Conv1D`",
    "qwen3_moe": "The compressed-tensors export cannot quantize a `qwen3_moe` model: its experts are stacked 3-D parameters",
}
IDS = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


def _block_path(name: str) -> str:
    # `model.layers.0.self_attn.q_proj.weight` -> `self_attn.q_proj`; expert parameters keep their own name.
    after = name.split(".")
    i = max(j for j, p in enumerate(after) if p.isdigit())
    path = after[i + 1 :]
    return ".".join(path[:-1] if path[-1] == "weight" else path)


def _logits(model, ids=IDS):
    out = model(input_ids=ids)
    logits = out.logits if hasattr(out, "logits") else out.start_logits
    return logits.detach().float()


def _rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("family,head", [(f, h) for f in FAMILY_LIST for h in HEADS if model_class(f, h) is not None])
def test_default_targets_are_the_block_projections(family, head):
    model = build(family, head)
    names = default_targets(model)
    paths = [_block_path(n) for n in names]
    layers = model.config.num_hidden_layers
    assert sorted(paths) == sorted(p for p in BLOCK_PROJECTIONS[family] for _ in range(layers))
    bad = ("embed", "wte", "wpe", "lm_head", "norm", "score", "classifier", "qa_outputs", "pooler", "bias", "mlp.gate.")
    assert not [n for n in names if any(b in n for b in bad)]
    # A tied output head shares the embedding's weight: never among the targets.
    out = model.get_output_embeddings()
    if out is not None:
        assert all(model.get_parameter(n) is not out.weight for n in names)


def _fused_names(model, family):
    return [n for n in default_targets(model) if _block_path(n).split(".")[-1] in FUSED.get(family, {})]


@pytest.mark.parametrize("family", ["phi3", "gpt2", "gpt_neox", "qwen3_moe"])
def test_fused_layouts_match_the_forward(family):
    """Zeroing the `v` part of every fused attention projection (and its bias) makes the input of the output
    projection exactly zero; zeroing `up` of every fused MLP (every expert) makes the MLP's output zero. A layout that
    put the parts elsewhere (e.g. GPT-NeoX read as [q; k; v] instead of per head) would leave them nonzero."""
    model = build(family)
    names = [n for n in default_targets(model) if weight_layout(model, n).fused]
    assert names
    seen = {"v": 0, "up": 0}
    with torch.no_grad():
        for name in names:
            layout = weight_layout(model, name)
            module = model.get_submodule(name.rpartition(".")[0])
            weight = model.get_parameter(name)
            for part, index in layout.parts:
                if part.split(".")[-1] in seen:
                    seen[part.split(".")[-1]] += 1
                    weight[index] = 0.0
                    bias = getattr(module, "bias", None)
                    if bias is not None:  # the bias of the same output features
                        bias[index[0] if layout.in_dim == 1 else index[1]] = 0.0
    outputs = {}
    o_proj = {"phi3": "self_attn.o_proj", "gpt2": "attn.c_proj", "gpt_neox": "attention.dense", "qwen3_moe": None}[family]
    mlp = {"phi3": "mlp", "gpt2": None, "gpt_neox": None, "qwen3_moe": "mlp.experts"}[family]
    hooks = []
    for n, m in model.named_modules():
        if o_proj and n.endswith(f".0.{o_proj}"):
            hooks.append(m.register_forward_hook(lambda mod, i, o: outputs.__setitem__("attn_in", i[0])))
        if mlp and n.endswith(f".0.{mlp}"):
            hooks.append(m.register_forward_hook(lambda mod, i, o: outputs.__setitem__("mlp_out", o)))
    with torch.no_grad():
        model(input_ids=IDS)
    for h in hooks:
        h.remove()
    if o_proj:
        assert seen["v"] == model.config.num_hidden_layers and float(outputs["attn_in"].abs().max()) == 0.0
    if mlp:
        assert seen["up"] > 0 and float(outputs["mlp_out"].abs().max()) == 0.0


def _dataset(family, n=8, seq=8):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (n, seq), generator=g)
    labels = (ids[:, 0] % 3).tolist() if family in ENCODERS else ids.tolist()
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(), "labels": labels})


class _Snapshot(TrainerCallback):
    """The pruned weights right after the step that reaches the target."""

    def __init__(self, names, step):
        self.names, self.step, self.weights = names, step, None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            self.weights = {n: model.get_parameter(n).detach().clone() for n in self.names}


def _parts(model, name):
    weight = model.get_parameter(name).detach()
    return [(part, weight[index]) for part, index in weight_layout(model, name).parts]


PRUNING = {
    "layer": dict(target_sparsity=0.5, scope="layer", end_step=2, frequency=1),
    "global": dict(target_sparsity=0.5, scope="global", end_step=2, frequency=1),
    "2:4": dict(target_sparsity=0.5, pattern="2:4", start_step=2),
}


@pytest.mark.parametrize("mode", list(PRUNING))
@pytest.mark.parametrize("family", FAMILY_LIST)
def test_unstructured_pruning_is_exact(family, mode, tmp_path):
    model = build(family).train()
    names = default_targets(model)
    snapshot = _Snapshot(names, step=2)
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=4, per_device_train_batch_size=2, learning_rate=1e-2,
        report_to="none", save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
    )
    Trainer(model=model, args=args, train_dataset=_dataset(family),
            callbacks=[GradualPruningCallback(**PRUNING[mode]), snapshot]).train()
    model.eval()
    params = {n: model.get_parameter(n).detach() for n in names}
    if mode == "layer":
        for name, w in params.items():
            assert int((w == 0).sum()) == round(0.5 * w.numel()), name
            for part, piece in _parts(model, name):
                assert int((piece == 0).sum()) == round(0.5 * piece.numel()), (name, part)
    elif mode == "global":
        total = sum(w.numel() for w in params.values())
        assert sum(int((w == 0).sum()) for w in params.values()) == round(0.5 * total)
    else:
        layouts = weight_layouts(model, names)
        for name, w in params.items():
            groups = w.movedim(layouts[name].in_dim, -1).reshape(-1, 4)
            assert bool(((groups != 0).sum(1) == 2).all()), name
            for part, piece in _parts(model, name):
                assert int((piece == 0).sum()) == piece.numel() // 2, (name, part)
    # Masks held over the two steps after the target: same zeros, and the kept weights trained on.
    moved = kept = 0
    for name, w in params.items():
        before = snapshot.weights[name]
        assert torch.equal(w == 0, before == 0), name
        kept += int((before != 0).sum())
        moved += int(((w != before) & (before != 0)).sum())
    assert moved > 0.5 * kept
    stats = sparsity_stats(model, names)
    assert set(stats["parts"]) == {f"{n}[{p}]" for n in names for p, _ in weight_layout(model, n).parts
                                   if weight_layout(model, n).fused}
    # The dense and the bitmask checkpoints reload to the same function.
    model.save_pretrained(tmp_path / "dense")
    dense = model_class(family, default_head(family)).from_pretrained(tmp_path / "dense").eval()
    assert _rel(_logits(dense), _logits(model)) <= 1e-5
    save_compressed(model, str(tmp_path / "pruned"))
    reloaded = load_compressed(str(tmp_path / "pruned")).eval()
    assert _rel(_logits(reloaded), _logits(model)) <= 1e-5


CT4 = dict(backend="compressed-tensors", bits=4, group_size=32)


@pytest.mark.parametrize("family", FAMILY_LIST)
def test_int4_export_reloads_to_the_qat_logits(family, tmp_path):
    """50 %-pruned, exported to compressed-tensors int4 (group 32), reloaded with plain `from_pretrained`: the
    logits of the QAT fake-quantized model exactly (`torch.equal`), every block projection quantized, zeros kept."""
    args = QuantizationArguments(**CT4)
    model = build(family)
    names = default_targets(model)
    with torch.no_grad():
        weights = {n: model.get_parameter(n) for n in names}
        for n, m in magnitude_masks(weights, 0.5, layouts=weight_layouts(model, names)).items():
            weights[n].masked_fill_(~m, 0.0)
    if family in REFUSED_CT:
        assert compressed_tensors_refusal(model.config.model_type).startswith(REFUSED_CT[family])
        with pytest.raises(ValueError, match=REFUSED_CT[family].replace("(", r"\(").replace(")", r"\)")):
            quantize_and_save(model, tmp_path / "ct", args)
        assert not (tmp_path / "ct").exists()
        return
    fake = copy.deepcopy(model)
    attach_fake_quant(fake, args, *quantization_targets(fake, args))
    expected = _logits(fake)
    info = quantize_and_save(model, tmp_path / "ct", args)
    # Every block projection is quantized; besides them only an encoder's pooler (not a task head, not pruned).
    poolers = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".pooler." in f".{n}."}
    assert set(info["quantized_linear_modules"]) == {n.removesuffix(".weight") for n in names} | poolers
    reloaded = model_class(family, default_head(family)).from_pretrained(tmp_path / "ct").eval()
    assert torch.equal(_logits(reloaded), expected)
    for n in names:
        w = reloaded.get_parameter(n).detach()
        assert torch.equal(w, fake_quantize_int(weights[n].detach(), 4, 32)), n
        assert int((w == 0).sum()) >= round(0.5 * w.numel()), n
        assert not torch.equal(w, weights[n].detach()), n  # the int4 rounding is really there


@pytest.mark.parametrize("family", sorted(REFUSED_CT))
def test_qat_callback_refuses_before_any_step(family, tmp_path):
    from hf_compress.callbacks import QATCallback

    model = build(family).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=4, per_device_train_batch_size=4,
                             report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=_dataset(family),
                      callbacks=[QATCallback(QuantizationArguments(**CT4))])
    with pytest.raises(ValueError, match=REFUSED_CT[family].replace("(", r"\(").replace(")", r"\)")):
        trainer.train()
    assert trainer.state.global_step == 0
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("bits", [8, 4])
def test_gpt2_conv1d_bitsandbytes_qat_equals_export(bits, tmp_path):
    """bitsandbytes does quantize GPT-2's Conv1D (transposed); QAT fake-quantizes exactly those layers the same way."""
    from hf_compress.quantization import load_quantized

    args = QuantizationArguments(bits=bits)
    model = build("gpt2")
    fake = copy.deepcopy(model)
    linears, _ = quantization_targets(fake, args)
    assert sorted(linears) == sorted(n.removesuffix(".weight") for n in default_targets(model))
    attach_fake_quant(fake, args, linears, [])
    info = quantize_and_save(model, tmp_path / "bnb", args)
    assert sorted(info["quantized_linear_modules"]) == sorted(linears)
    reloaded = load_quantized(tmp_path / "bnb")
    assert torch.equal(_logits(reloaded), _logits(fake))
    assert not torch.equal(_logits(model), _logits(fake))


@pytest.mark.parametrize("family", sorted(REFUSED_CT))
def test_cli_refuses_compressed_tensors_in_prepare(family, tmp_path, capsys):
    """`hf-compress` (default format compressed-tensors) stops in one line before any data is read or step run."""
    from hf_compress.cli.main import main
    from task_helpers import tiny_tokenizer

    folder = tmp_path / "model"
    build(family, "seq-cls").save_pretrained(folder)
    tiny_tokenizer(folder).save_pretrained(folder)
    data = tmp_path / "data.csv"
    data.write_text("text,label\n" + "".join(f"the movie was {'good' if i % 2 else 'bad'},{i % 2}\n" for i in range(20)))
    capsys.readouterr()
    assert main(["--model", str(folder), "--dataset", str(data), "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hf-compress: error: " + REFUSED_CT[family]), err
    assert not (tmp_path / "out").exists()


def test_unknown_fused_projection_is_refused_before_any_step(tmp_path):
    """Falcon's `query_key_value` is fused, with a layout not in the table: refused in `on_train_begin`."""
    from transformers import FalconConfig, FalconForCausalLM

    torch.manual_seed(0)
    model = FalconForCausalLM(FalconConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, **{"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=4, per_device_train_batch_size=2,
                             report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=_dataset("llama"), callbacks=[GradualPruningCallback()])
    with pytest.raises(ValueError, match=r"transformer\.h\.0\.self_attention\.query_key_value\.weight looks like a fused "
                                         r"projection \(`query_key_value`\) of a `falcon` model"):
        trainer.train()
    assert trainer.state.global_step == 0
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
