"""Compression report and model card, offline: numbers against hand counts, card metadata and content."""

from __future__ import annotations

import importlib.resources
import json
import os

import pytest
import torch
from conftest import evaluate_accuracy, random_classification_dataset, tiny_bert_config
from huggingface_hub import ModelCard

from hf_compress.model_cards import (
    PLOT_NAME,
    REPORT_NAME,
    build_model_card,
    build_report,
    load_report,
    validate_card_metadata,
    write_model_card,
)

# Tiny BERT (vocab 97, hidden 32, 2 layers, intermediate 64, 64 positions, 2 token types, 2 labels), by hand:
# embeddings 97*32 + 64*32 + 2*32 + LayerNorm 2*32 = 5,280; each layer q/k/v/o 4*(32*32+32) + LN 64
# + intermediate 32*64+64 + output 64*32+32 + LN 64 = 8,544; pooler 32*32+32 = 1,056; classifier 32*2+2 = 66.
TINY_PARAMS = 5280 + 2 * 8544 + 1056 + 66  # 23,490
PRUNED = "bert.encoder.layer.0.intermediate.dense.weight"  # 64 x 32, zeroed entirely
RECIPE = {"pruning": {"target_sparsity": 0.5, "pruning_method": "magnitude"}, "training": {"max_steps": 4, "learning_rate": 1e-4}}
COMMAND = "hf-compress prune --model tiny --target_sparsity 0.5 --max_steps 4 --output_dir out"


@pytest.fixture
def checkpoints(tmp_path, tiny_bert):
    """A saved tiny base and a saved copy with one weight matrix zeroed: `(base, compressed, base_dir, comp_dir)`."""
    from transformers import BertForSequenceClassification

    base_dir, comp_dir = tmp_path / "base", tmp_path / "compressed"
    tiny_bert.save_pretrained(base_dir)
    comp = BertForSequenceClassification(tiny_bert_config())
    comp.load_state_dict(tiny_bert.state_dict())
    with torch.no_grad():
        comp.get_parameter(PRUNED).zero_()
    comp.save_pretrained(comp_dir)
    return tiny_bert.eval(), comp.eval(), str(base_dir), str(comp_dir)


def _report(checkpoints, **kw):
    base, comp, base_dir, comp_dir = checkpoints
    kw.setdefault("eval_dataset", random_classification_dataset(48, seed=1))
    kw.setdefault("eval_info", {"dataset": "rotten_tomatoes", "dataset_name": "Rotten Tomatoes (hf_compress split)", "split": "test[:48]"})
    return build_report(comp, comp_dir, base, base_dir, base_model_id="acme/tiny-bert", techniques=["pruning"], **kw)


def test_checkpoint_bytes_counts_weights_not_trainer_state(tmp_path):
    """A Trainer `checkpoint-N` folder: optimizer, scheduler, RNG and args files are not weights."""
    from hf_compress.model_cards.report import checkpoint_bytes

    sizes = {"model.safetensors": 1000, "training_args.bin": 7, "optimizer.pt": 2000, "scheduler.pt": 3,
             "rng_state.pth": 11, "rng_state_1.pth": 13, "config.json": 5}
    for name, n in sizes.items():
        (tmp_path / name).write_bytes(b"x" * n)
    out = checkpoint_bytes(str(tmp_path))
    assert out["weights_bytes"] == 1000 and out["weight_files"] == ["model.safetensors"]
    assert out["total_bytes"] == sum(sizes.values())


def test_report_numbers_match_hand_counts(checkpoints):
    base, comp, base_dir, comp_dir = checkpoints
    report = _report(checkpoints)

    assert report["parameters"] == {"compressed": TINY_PARAMS, "base": TINY_PARAMS}
    base_nnz = sum(int(torch.count_nonzero(p)) for p in base.parameters())
    assert report["nonzeros"] == {"base": base_nnz, "compressed": base_nnz - 64 * 32}
    assert report["sparsity"]["per_layer"][PRUNED] == 1.0
    assert report["sparsity"]["per_layer"]["bert.encoder.layer.1.intermediate.dense.weight"] == 0.0
    assert report["sparsity"]["global"] == round(1 - (base_nnz - 2048) / TINY_PARAMS, 6)
    assert report["layers"][PRUNED] == {"numel": 2048, "nonzeros": 0, "sparsity": 1.0, "dtype": "float32", "bits": 32}

    base_bytes = os.path.getsize(os.path.join(base_dir, "model.safetensors"))
    comp_bytes = os.path.getsize(os.path.join(comp_dir, "model.safetensors"))
    assert report["size"]["base_weights_bytes"] == base_bytes
    assert report["size"]["compressed_weights_bytes"] == comp_bytes
    assert report["size"]["ratio"] == round(base_bytes / comp_bytes, 4)
    # fp32 weights plus the safetensors header: a little over 32 bits a weight on disk, exactly 32 in memory.
    assert report["bits_per_weight"]["in_memory"] == 32.0
    assert report["bits_per_weight"]["on_disk"] == round(8 * comp_bytes / TINY_PARAMS, 4)
    assert 32.0 < report["bits_per_weight"]["on_disk"] < 32.0 * 1.1
    assert report["quantization"] is None
    assert report["techniques"] == ["pruning"]


def test_report_metrics_are_computed_on_the_same_rows(checkpoints):
    base, comp, *_ = checkpoints
    ds = random_classification_dataset(48, seed=1)
    report = _report(checkpoints, eval_dataset=ds)
    # An independent implementation (the conftest helper, DataCollatorWithPadding) on the same rows.
    assert report["metrics"]["compressed"]["accuracy"] == pytest.approx(evaluate_accuracy(comp, ds, _PadTok()))
    assert report["metrics"]["base"]["accuracy"] == pytest.approx(evaluate_accuracy(base, ds, _PadTok()))
    assert report["metrics"]["base"]["num_examples"] == report["metrics"]["compressed"]["num_examples"] == 48
    sample = report["verification"]
    assert len(sample["predictions"]) == 8 and sample["labels"] == ds["labels"][:8]
    assert sample["metrics"]["accuracy"] == sum(p == l for p, l in zip(sample["predictions"], sample["labels"])) / 8


def test_report_takes_caller_metrics_and_is_saved(checkpoints):
    *_, comp_dir = checkpoints
    report = _report(checkpoints, eval_dataset=None, base_metrics={"accuracy": 0.81}, compressed_metrics={"accuracy": 0.79})
    assert report["metrics"] == {"base": {"accuracy": 0.81}, "compressed": {"accuracy": 0.79}}
    assert "verification" not in report
    assert [v["name"] for v in report["variants"]] == ["base", "compressed"]
    with open(os.path.join(comp_dir, REPORT_NAME)) as f:
        assert json.load(f) == report
    assert load_report(comp_dir) == report
    assert not [f for f in os.listdir(comp_dir) if f.startswith(".report-")]  # no temporary file left


def test_report_bad_input(checkpoints, tmp_path):
    base, comp, base_dir, comp_dir = checkpoints
    with pytest.raises(ValueError, match="base_metrics must be a dict"):
        build_report(comp, comp_dir, base, base_dir, base_metrics=0.8)
    with pytest.raises(ValueError, match="verification_examples must be >= 0"):
        build_report(comp, comp_dir, verification_examples=-1)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_report(comp, str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="No weight file"):
        build_report(comp, str(tmp_path / "empty"))
    assert not os.path.exists(os.path.join(tmp_path / "empty", REPORT_NAME))


def test_card_metadata_and_content(checkpoints):
    *_, comp_dir = checkpoints
    report = _report(checkpoints, eval_dataset=None, base_metrics={"accuracy": 0.8125}, compressed_metrics={"accuracy": 0.796875})
    card = build_model_card(report, RECIPE, COMMAND, repo_id="acme/tiny-bert-pruned", output_dir=comp_dir, license="apache-2.0")

    data = card.data
    assert data.base_model == "acme/tiny-bert"
    assert data.base_model_relation == "finetune"  # the Hub has no "pruned" relation
    assert data.library_name == "transformers"
    assert data.license == "apache-2.0"
    assert data.datasets == ["rotten_tomatoes"]
    assert data.tags == ["hf-compress", "pruning"]
    assert data.model_name == "tiny-bert-pruned"
    results = [(r.metric_type, r.metric_value, r.dataset_type, r.dataset_split, r.task_type) for r in data.eval_results]
    assert results == [
        ("accuracy", 0.796875, "rotten_tomatoes", "test[:48]", "text-classification"),
        ("accuracy", 0.8125, "rotten_tomatoes", "test[:48]", "text-classification"),
    ]
    assert "base model acme/tiny-bert" in data.eval_results[1].metric_name

    text = str(card)
    comp_mb = f"{report['size']['compressed_weights_bytes'] / 1e6:.1f} MB"
    assert f"| compressed (this repo) | {comp_mb} | {report['size']['ratio']:.2f}x | 23,490 |" in text
    assert "| base (`acme/tiny-bert`) |" in text and "| 0.8125 |" in text and "| 0.7969 |" in text
    assert f"| `{PRUNED}` | 1.0000 |" in text
    assert "target_sparsity: 0.5" in text and "max_steps: 4" in text
    assert f"```bash\n{COMMAND}\n```" in text
    assert f"![Accuracy against size]({PLOT_NAME})" in text
    with open(os.path.join(comp_dir, PLOT_NAME), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(os.path.join(comp_dir, PLOT_NAME)) > 5000

    # What the Hub will read back: the same metadata, the same eval results.
    validate_card_metadata(card)
    again = ModelCard(text, ignore_metadata_errors=False)
    assert again.data.to_dict() == data.to_dict()


def test_card_without_base_has_no_plot_and_no_relation(checkpoints):
    _, comp, _, comp_dir = checkpoints
    report = build_report(comp, comp_dir, compressed_metrics={"accuracy": 0.75})
    card = build_model_card(report, RECIPE, COMMAND, output_dir=comp_dir)
    assert card.data.base_model is None and "base_model_relation" not in card.data.to_dict()
    assert not os.path.exists(os.path.join(comp_dir, PLOT_NAME))
    assert "![Accuracy against size]" not in str(card)
    assert card.data.eval_results is None  # no dataset named: no model-index to claim


def test_quantized_checkpoint_gets_quantized_relation(tmp_path, tiny_bert):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig

    base_dir, q_dir = tmp_path / "base", tmp_path / "q8"
    tiny_bert.save_pretrained(base_dir)
    qconf = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["classifier"])
    q = AutoModelForSequenceClassification.from_pretrained(base_dir, quantization_config=qconf)
    q.save_pretrained(q_dir)
    report = build_report(q, str(q_dir), tiny_bert, str(base_dir), base_model_id="acme/tiny-bert",
                          base_metrics={"accuracy": 0.5}, compressed_metrics={"accuracy": 0.5},
                          eval_info={"dataset": "rotten_tomatoes"})
    quant = report["quantization"]
    # 2 layers x (q, k, v, attention output, intermediate, output) + the pooler = 13 Linear8bitLt; head skipped.
    assert quant["bits"] == [8] and quant["num_quantized_modules"] == 13
    assert quant["quantized_module_types"] == ["Linear8bitLt"]
    assert quant["skip_modules"] == ["classifier"]
    assert report["techniques"] == ["quantization"]
    assert report["layers"]["bert.encoder.layer.0.attention.self.query.weight"]["bits"] == 8
    assert report["size"]["compressed_weights_bytes"] < report["size"]["base_weights_bytes"]
    card = build_model_card(report, {"quantization": {"bits": 8}}, "hf-compress quantize --bits 8", repo_id="acme/q8")
    assert card.data.base_model_relation == "quantized"
    assert "bitsandbytes" in card.data.tags
    assert "quantized layers: 13 (Linear8bitLt)" in str(card) and "not quantized (kept in the model's dtype): classifier" in str(card)
    assert "- stored as int8: " in str(card) and "- stored as float32: " in str(card)


def test_card_bad_input_and_bad_metadata(checkpoints):
    *_, comp_dir = checkpoints
    report = _report(checkpoints, eval_dataset=None, base_metrics={"accuracy": 0.8}, compressed_metrics={"accuracy": 0.8})
    with pytest.raises(ValueError, match="command must be the non-empty command line"):
        build_model_card(report, RECIPE, "  ")
    with pytest.raises(ValueError, match="recipe must be a dict"):
        build_model_card(report, ["lr", 1e-4], COMMAND)
    with pytest.raises(ValueError, match="not a compression report"):
        build_model_card({"size": {}}, RECIPE, COMMAND)
    card = build_model_card(report, RECIPE, COMMAND)
    card.data.base_model_relation = "pruned"
    with pytest.raises(ValueError, match="base_model_relation must be one of"):
        validate_card_metadata(ModelCard(str(card)))


def test_template_ships_in_package_and_write_model_card(checkpoints):
    *_, comp_dir = checkpoints
    assert importlib.resources.files("hf_compress.model_cards").joinpath("template.md").is_file()
    _report(checkpoints, eval_dataset=None, base_metrics={"accuracy": 0.8}, compressed_metrics={"accuracy": 0.7})
    card = write_model_card(comp_dir, RECIPE, COMMAND, repo_id="acme/x")
    loaded = ModelCard.load(os.path.join(comp_dir, "README.md"))
    assert loaded.data.to_dict() == card.data.to_dict()
    assert os.path.isfile(os.path.join(comp_dir, PLOT_NAME))


class _PadTok:
    """A stand-in tokenizer for `DataCollatorWithPadding`: pads with id 0 on the right."""

    padding_side = "right"
    pad_token_id = 0
    model_input_names = ["input_ids", "attention_mask"]

    def pad(self, features, return_tensors="pt", **kwargs):
        width = max(len(f["input_ids"]) for f in features)
        out = {}
        for k in features[0]:
            if k in ("input_ids", "attention_mask", "token_type_ids"):
                out[k] = torch.tensor([list(f[k]) + [0] * (width - len(f[k])) for f in features])
            else:
                out[k] = torch.tensor([f[k] for f in features])
        return out


def test_4bit_weights_counted_at_logical_shape(tmp_path, tiny_bert):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig

    from hf_compress.model_cards import weight_stats

    tiny_bert.save_pretrained(tmp_path / "base")
    qconf = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", llm_int8_skip_modules=["classifier"])
    q = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base", quantization_config=qconf)
    q.save_pretrained(tmp_path / "q4")
    stats = weight_stats(q)
    # Two 4-bit codes a byte in storage, but the same 23,490 weights as the fp32 model.
    assert stats["parameters"] == TINY_PARAMS
    assert stats["per_layer"]["bert.encoder.layer.0.attention.self.query.weight"]["numel"] == 32 * 32
    assert stats["per_layer"]["bert.encoder.layer.0.attention.self.query.weight"]["bits"] == 4
    assert len(stats["quantized_modules"]) == 13
    report = build_report(q, str(tmp_path / "q4"), tiny_bert, str(tmp_path / "base"))
    assert report["quantization"]["bits"] == [4] and report["quantization"]["quant_type"] == "nf4"
    assert report["bits_per_weight"]["in_memory"] < 16


def test_linear_sparsity_leaves_quantized_embeddings_out(tiny_bert):
    # bitsandbytes embedding tables (Embedding8bit) are not Linear weights: the linear sparsity that pruning is judged
    # by must not be diluted by them. Linear weights by hand: 2 layers x (4 x 32x32 + 32x64 + 64x32) + pooler 32x32
    # + classifier 32x2 = 17,472; the zeros are those of the int8 codes (a 64 x 32 matrix zeroed, plus the weights
    # LLM.int8 rounds to 0), the same with and without low-bit embeddings.
    pytest.importorskip("bitsandbytes")
    from hf_compress.model_cards.report import weight_stats
    from hf_compress.quantization import QuantizationArguments, quantize_model

    with torch.no_grad():
        tiny_bert.get_parameter(PRUNED).zero_()
    plain, _ = quantize_model(tiny_bert, QuantizationArguments(bits=8))
    q, info = quantize_model(tiny_bert, QuantizationArguments(bits=8, quantize_embeddings=True))
    assert "bert.embeddings.word_embeddings" in info["quantized_embeddings"]
    linear = [m for m in q.modules() if isinstance(m, torch.nn.Linear)]
    assert sum(m.weight.numel() for m in linear) == 17472
    zeros = sum(int((m.weight == 0).sum()) for m in linear)  # int8 codes, and the fp32 head
    assert zeros >= 2048
    stats = weight_stats(q)
    assert stats["linear_sparsity"] == round(zeros / 17472, 6) == weight_stats(plain)["linear_sparsity"]
    assert stats["per_layer"]["bert.embeddings.word_embeddings.weight"]["bits"] == 8  # still listed, as a table
    assert stats["quantized_modules"]["bert.embeddings.word_embeddings"] == "Embedding8bit"


# The card's tags name the format actually written: compressed-tensors is not bitsandbytes (a card once tagged every
# quantized checkpoint `bitsandbytes`). Each export is written by `quantize_and_save` and reloaded the way the
# pipeline's report reads it: compressed-tensors with plain `from_pretrained`, bitsandbytes with `load_quantized`.
FORMAT_TAG_CASES = {
    "compressed-tensors int8": (dict(backend="compressed-tensors", bits=8), ["compressed-tensors"]),
    "compressed-tensors int4 g32": (dict(backend="compressed-tensors", bits=4, group_size=32), ["compressed-tensors"]),
    "bitsandbytes int8": (dict(backend="bitsandbytes", bits=8), ["bitsandbytes", "8-bit"]),
    "bitsandbytes nf4": (dict(backend="bitsandbytes", bits=4), ["bitsandbytes", "4-bit"]),
}


@pytest.mark.parametrize("case", list(FORMAT_TAG_CASES))
def test_quantized_card_tags_name_the_written_format(tmp_path, case):
    from transformers import AutoModelForSequenceClassification, BertForSequenceClassification

    from hf_compress.quantization import QuantizationArguments, load_quantized, quantize_and_save

    fields, format_tags = FORMAT_TAG_CASES[case]
    if fields["backend"] == "bitsandbytes":
        pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    base = BertForSequenceClassification(tiny_bert_config(hidden_size=64, intermediate_size=128)).eval()
    base.save_pretrained(tmp_path / "base")
    quantize_and_save(base, tmp_path / "q", QuantizationArguments(**fields))
    if fields["backend"] == "compressed-tensors":
        exported = AutoModelForSequenceClassification.from_pretrained(tmp_path / "q")
    else:
        exported = load_quantized(tmp_path / "q")
    report = build_report(exported, str(tmp_path / "q"), base, str(tmp_path / "base"), base_model_id="acme/tiny-bert",
                          base_metrics={"accuracy": 0.5}, compressed_metrics={"accuracy": 0.5}, save=False)
    assert report["quantization"]["method"] == fields["backend"]
    assert report["quantization"]["bits"] == [fields["bits"]]
    card = build_model_card(report, {"quantization": fields}, "hf-compress quantize", repo_id="acme/q", tags=["extra"])
    # (nf4 rounds enough random weights to its 0 code for the report to also measure `pruning`: the techniques come
    # from the report, the format tags from the format)
    assert report["techniques"][0] == "quantization"
    assert card.data.tags == ["hf-compress", *report["techniques"], *format_tags, "extra"]
    assert card.data.base_model_relation == "quantized"
    assert ModelCard(str(card)).data.tags == card.data.tags  # as the Hub reads it back
