"""The real MiniLM-L6 fine-tuned on Rotten Tomatoes: held-out accuracy and on-disk size per quantization."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from conftest import evaluate_accuracy

from hf_compress.quantization import (
    QuantizationArguments,
    attach_fake_quant,
    load_quantized,
    quantization_targets,
    quantize_and_save,
)

transformers.utils.logging.disable_progress_bar()
pytest.importorskip("bitsandbytes")

QAT_STEPS = 30
EVAL_ROWS = 500  # bitsandbytes' CPU kernels make each evaluation the slow part of this test


@pytest.mark.slow
def test_real_minilm_quantization_table(real_data, real_finetuned, real_finetuned_accuracy, tmp_path):
    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, Trainer, TrainingArguments

    from hf_compress.callbacks import QATCallback, QuantizationCallback

    tok, ds = real_data
    test = ds["test"].select(range(EVAL_ROWS))
    fp32 = AutoModelForSequenceClassification.from_pretrained(real_finetuned)
    fp32_bytes = sum(p.stat().st_size for p in real_finetuned.glob("*.safetensors"))
    rows = [{"model": "fp32", "accuracy": real_finetuned_accuracy(EVAL_ROWS), "MB": fp32_bytes / 1e6}]

    settings = {
        "8-bit LLM.int8": QuantizationArguments(bits=8),
        "4-bit NF4": QuantizationArguments(bits=4, quant_type="nf4"),
        "8-bit + 8-bit embeddings": QuantizationArguments(bits=8, quantize_embeddings=True),
        "4-bit NF4 + 4-bit embeddings": QuantizationArguments(bits=4, quantize_embeddings=True),
    }
    infos = {}
    for label, args in settings.items():
        info = quantize_and_save(fp32, tmp_path / label.replace(" ", "_"), args)
        model = load_quantized(info["output_dir"])
        infos[label] = info
        rows.append({"model": label, "accuracy": evaluate_accuracy(model, test, tok), "MB": info["weight_bytes_on_disk"] / 1e6})

    # Quantization-aware fine-tuning: QAT_STEPS steps from the fine-tuned model, fake NF4 all along.
    qat_args = QuantizationArguments(bits=4, quant_type="nf4", qat_fraction=1.0)
    student = AutoModelForSequenceClassification.from_pretrained(real_finetuned)
    export = QuantizationCallback(qat_args, str(tmp_path / "qat_nf4"))
    train_args = TrainingArguments(
        str(tmp_path / "run"), max_steps=QAT_STEPS, per_device_train_batch_size=16, learning_rate=2e-5,
        warmup_steps=0, report_to="none", save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True,
    )
    Trainer(
        model=student, args=train_args, train_dataset=ds["train"], data_collator=DataCollatorWithPadding(tok),
        callbacks=[QATCallback(qat_args), export],
    ).train()
    qat_model = load_quantized(export.export_info["output_dir"])
    rows.append({
        "model": f"4-bit NF4 after {QAT_STEPS} QAT steps",
        "accuracy": evaluate_accuracy(qat_model, test, tok),
        "MB": export.export_info["weight_bytes_on_disk"] / 1e6,
    })

    print(f"\nRotten Tomatoes test split, first {EVAL_ROWS} rows; MB = safetensors bytes on disk")
    print("| model | accuracy | MB |\n|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['accuracy']:.3f} | {r['MB']:.1f} |")

    acc = {r["model"]: r["accuracy"] for r in rows}
    size = {r["model"]: r["MB"] for r in rows}
    assert acc["fp32"] > 0.70  # the fixture really learned the task
    assert acc["8-bit LLM.int8"] >= acc["fp32"] - 0.02
    assert acc["4-bit NF4"] >= acc["fp32"] - 0.04
    assert acc[f"4-bit NF4 after {QAT_STEPS} QAT steps"] >= acc["fp32"] - 0.04
    # The word embedding (11.7 M of 22.7 M parameters) dominates: without it sizes shrink far less than 4x.
    assert size["8-bit LLM.int8"] < 0.70 * size["fp32"]
    assert size["4-bit NF4"] < size["8-bit LLM.int8"]
    assert size["8-bit + 8-bit embeddings"] < 0.30 * size["fp32"]
    assert size["4-bit NF4 + 4-bit embeddings"] < 0.17 * size["fp32"]
    assert infos["4-bit NF4"]["full_precision_linear_modules"] == ["classifier"]
    assert infos["4-bit NF4"]["unsupported_shape_modules"] == []  # MiniLM's 384 / 1536 widths are all supported

    # bitsandbytes' own CPU kernel choice (AVX512-BF16 where the CPU has it) on the same export: within bf16 rounding
    # of the float32 reference path the table was measured on.
    from hf_compress.quantization import bnb as backend

    nf4_dir = infos["4-bit NF4"]["output_dir"]
    fast = load_quantized(nf4_dir, cpu_bf16_kernel=True)
    reference = load_quantized(nf4_dir)
    batch = DataCollatorWithPadding(tok)([{k: test[i][k] for k in ("input_ids", "attention_mask")} for i in range(16)])
    with torch.no_grad():
        fast_logits, ref_logits = fast(**batch).logits, reference(**batch).logits
    if backend.cpu_has_avx512bf16():
        assert not torch.equal(fast_logits, ref_logits)  # the option really switches kernels here
        torch.testing.assert_close(fast_logits, ref_logits, atol=5e-2, rtol=5e-2)
    else:
        assert torch.equal(fast_logits, ref_logits)
    assert abs(evaluate_accuracy(fast, test, tok) - acc["4-bit NF4"]) <= 0.01

    # The QAT model's fake-quantized logits are the exported model's logits.
    fake = copy.deepcopy(student)
    attach_fake_quant(fake, qat_args, *quantization_targets(fake, qat_args))
    batch = DataCollatorWithPadding(tok)([{k: test[i][k] for k in ("input_ids", "attention_mask")} for i in range(16)])
    with torch.no_grad():
        torch.testing.assert_close(fake.eval()(**batch).logits, qat_model(**batch).logits, atol=1e-5, rtol=0)
