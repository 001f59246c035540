"""Step-time overhead of quantization-aware fine-tuning on the real MiniLM-L6.

Prints, from one run: QAT 4-bit NF4 / plain and QAT 8-bit LLM.int8 / plain median optimizer-step time (fake
quantization of every encoder Linear, plus int8 activation replay in 8-bit).
Usage: `python -m benchmarks.quant_overhead [--steps N]`.
"""

from __future__ import annotations

from benchmarks.common import StepTimer, print_ratios, real_data, scratch_dir, steps_main


def run(steps: int = 12, batch_size: int = 16) -> dict:
    import torch
    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, Trainer, TrainingArguments

    from hf_compress.callbacks import QATCallback
    from hf_compress.models import default_model_path
    from hf_compress.quantization import QuantizationArguments

    tok, ds = real_data(max_train=steps * batch_size)
    modes = {
        "plain": None,
        "QAT 4-bit NF4": QuantizationArguments(bits=4, quant_type="nf4", qat_fraction=1.0),
        "QAT 8-bit LLM.int8": QuantizationArguments(bits=8, qat_fraction=1.0),
    }
    times = {}
    for mode, qargs in modes.items():
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(default_model_path(), num_labels=2)
        args = TrainingArguments(
            scratch_dir("quant"), max_steps=steps,
            per_device_train_batch_size=batch_size, report_to="none", save_strategy="no", use_cpu=True, seed=0,
            disable_tqdm=True,
        )
        timer = StepTimer()
        callbacks = [timer] + ([QATCallback(qargs)] if qargs else [])
        Trainer(model=model, args=args, train_dataset=ds["train"], data_collator=DataCollatorWithPadding(tok),
                callbacks=callbacks).train()
        times[mode] = timer.median()
    result = {"steps": steps, "batch_size": batch_size, "plain_step_s": times["plain"]}
    result.update({f"{m} / plain": t / times["plain"] for m, t in times.items() if m != "plain"})
    print_ratios(times)
    return result


def main(argv=None) -> int:
    return steps_main(run, __doc__, 12, argv)


if __name__ == "__main__":
    raise SystemExit(main())
