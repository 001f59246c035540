"""Step-time overhead of distillation on the real MiniLM-L6 (teacher, 6 layers) -> 3-layer student.

Prints, from one run: live-teacher distillation / plain fine-tuning, and cached-teacher distillation / plain
fine-tuning (target: cached <= 1.05x). Usage: `python -m benchmarks.distillation [--steps N]`.
"""

from __future__ import annotations

from benchmarks.common import StepTimer, print_ratios, real_data, scratch_dir, steps_main


def run(steps: int = 20, batch_size: int = 16, rounds: int = 3) -> dict:
    import statistics

    import torch
    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, Trainer

    from hf_compress.distillation import DistillationArguments, layer_dropped_student
    from hf_compress.models import default_model_path
    from hf_compress.trainers import DistillationTrainer

    tok, ds = real_data(max_train=steps * batch_size)
    torch.manual_seed(0)
    teacher = AutoModelForSequenceClassification.from_pretrained(default_model_path(), num_labels=2)
    modes = ("plain", "live teacher", "cached teacher")
    times = {mode: [] for mode in modes}
    # The modes take turns, `rounds` times: a machine whose speed drifts during the run (another job, clocks) then
    # shifts every mode alike, and each ratio is the median of the per-round ratios.
    for _ in range(rounds):
        for mode in modes:
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
            times[mode].append(timer.median())

    def ratio(mode):
        return statistics.median(t / p for t, p in zip(times[mode], times["plain"]))

    result = {
        "steps": steps,
        "batch_size": batch_size,
        "rounds": rounds,
        "plain_step_s": statistics.median(times["plain"]),
        "step_s_per_round": times,
        "live_over_plain": ratio("live teacher"),
        "cached_over_plain": ratio("cached teacher"),
    }
    print_ratios({mode: statistics.median(t) for mode, t in times.items()})
    print(f"median of per-round ratios: live/plain = {result['live_over_plain']:.3f}, "
          f"cached/plain = {result['cached_over_plain']:.3f} (target <= 1.05)")
    return result


def main(argv=None) -> int:
    return steps_main(run, __doc__, 20, argv)


if __name__ == "__main__":
    raise SystemExit(main())
