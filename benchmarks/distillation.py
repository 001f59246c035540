"""Step-time overhead of distillation on the real MiniLM-L6 (teacher, 6 layers) -> 3-layer student.

Prints, from one run: live-teacher distillation / plain fine-tuning, and cached-teacher distillation / plain
fine-tuning (target: cached <= 1.05x). Usage: `python -m benchmarks.distillation [--steps N]`.
"""

from __future__ import annotations

from benchmarks.common import StepTimer, print_ratios, real_data, scratch_dir, steps_main


def run(steps: int = 20, batch_size: int = 16) -> dict:
    import torch
    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, Trainer

    from hf_compress.distillation import DistillationArguments, layer_dropped_student
    from hf_compress.models import default_model_path
    from hf_compress.trainers import DistillationTrainer

    tok, ds = real_data(max_train=steps * batch_size)
    torch.manual_seed(0)
    teacher = AutoModelForSequenceClassification.from_pretrained(default_model_path(), num_labels=2)
    times = {}
    for mode in ("plain", "live teacher", "cached teacher"):
        torch.manual_seed(0)
        student = layer_dropped_student(teacher, [0, 2, 4])
        args = DistillationArguments(
            output_dir=scratch_dir("distill"), max_steps=steps, per_device_train_batch_size=batch_size,
            report_to="none", save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True,
            cache_teacher_logits=mode == "cached teacher",
        )
        timer = StepTimer()
        common = dict(model=student, args=args, train_dataset=ds["train"], data_collator=DataCollatorWithPadding(tok), callbacks=[timer])
        trainer = Trainer(**common) if mode == "plain" else DistillationTrainer(teacher_model=teacher, **common)
        trainer.train()
        times[mode] = timer.median()
    result = {
        "steps": steps,
        "batch_size": batch_size,
        "plain_step_s": times["plain"],
        "live_over_plain": times["live teacher"] / times["plain"],
        "cached_over_plain": times["cached teacher"] / times["plain"],
    }
    print_ratios(times)
    print(f"cached/plain = {result['cached_over_plain']:.3f} (target <= 1.05)")
    return result


def main(argv=None) -> int:
    return steps_main(run, __doc__, 20, argv)


if __name__ == "__main__":
    raise SystemExit(main())
