"""The real MiniLM-L6 fine-tuned on Rotten Tomatoes, exported to compressed-tensors: the card's loading code runs
verbatim in a Python without hf_compress, `pipeline(task, model=dir)` reproduces the report's recorded logits, and
size and accuracy hold against fp32 and the information limit."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import evaluate_accuracy

ROWS = 500  # first rows of the fixed test split


@pytest.mark.slow
def test_compressed_tensors_minilm_card_snippet_pipeline_and_accuracy(real_finetuned, real_finetuned_accuracy, real_data,
                                                                      tmp_path):
    from transformers import AutoModelForSequenceClassification, pipeline

    from hf_compress.model_cards import build_report, build_model_card
    from hf_compress.model_cards.clean_interpreter import run_without_hf_compress
    from hf_compress.quantization import QuantizationArguments, quantize_and_save

    tok, ds = real_data
    test = ds["test"].select(range(ROWS))
    model = AutoModelForSequenceClassification.from_pretrained(real_finetuned).eval()
    fp32_acc = real_finetuned_accuracy(ROWS)
    results = {}
    for name, fields in [("int8", dict(bits=8)), ("int4-g32", dict(bits=4, group_size=32))]:
        folder = tmp_path / name
        args = QuantizationArguments(backend="compressed-tensors", quantize_embeddings=True, **fields)
        info = quantize_and_save(model, folder, args, tokenizer=tok)
        loaded = AutoModelForSequenceClassification.from_pretrained(folder).eval()
        acc = evaluate_accuracy(loaded, test, tok)
        results[name] = (acc, info["weight_bytes_on_disk"], info["information_limit_bytes"])
        print(f"MiniLM-L6 ct {name} + embeddings: accuracy {acc:.4f} (fp32 {fp32_acc:.4f}) on test[:{ROWS}], "
              f"{info['weight_bytes_on_disk']} bytes on disk, information limit {info['information_limit_bytes']}")
        # the file is the information limit plus the safetensors header and per-tensor int32 shapes
        assert info["information_limit_bytes"] <= info["weight_bytes_on_disk"] <= 1.003 * info["information_limit_bytes"]
    assert results["int8"][0] >= fp32_acc - 0.01
    assert results["int4-g32"][0] >= fp32_acc - 0.03
    assert results["int8"][1] < 0.26 * 90_867_952 and results["int4-g32"][1] < 0.16 * 90_867_952

    # The card of the int8 export: its code, run verbatim where hf_compress cannot be imported, gives the logits the
    # report recorded; and pipeline(task, model=dir) gives them too.
    folder = tmp_path / "int8"
    loaded = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    report = build_report(loaded, str(folder), eval_dataset=test.select(range(32)), tokenizer=tok, save=False)
    card = build_model_card(report, {"backend": "compressed-tensors", "bits": 8}, "hf-compress --format compressed-tensors",
                            model_name=str(folder), output_dir=str(folder))
    text = str(card)
    snippet = text.split("```python\n")[-1].split("```")[0]
    assert "from_pretrained(" in snippet and "hf_compress" not in snippet.split("#")[0]
    recorded = report["verification"]
    check = snippet + (
        "\nimport json, torch\n"
        f"inputs = {{k: torch.tensor(v) for k, v in {json.dumps(recorded['inputs'])}.items()}}\n"
        "with torch.no_grad():\n    print('LOGITS ' + json.dumps(model(**inputs).logits.tolist()))\n"
        "print('PIPELINE ' + json.dumps(classifier('a wonderful, moving film')))\n"
    )
    proc = run_without_hf_compress(check, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    logits = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("LOGITS "))[7:])
    assert torch.allclose(torch.tensor(logits), torch.tensor(recorded["logits"]), atol=1e-4)
    pipe = pipeline("text-classification", model=str(folder))
    with torch.no_grad():
        pipe_logits = pipe.model(**{k: torch.tensor(v) for k, v in recorded["inputs"].items()}).logits
    assert torch.allclose(pipe_logits, torch.tensor(recorded["logits"]), atol=1e-4)
    assert pipe_logits.argmax(-1).tolist() == recorded["predictions"]
